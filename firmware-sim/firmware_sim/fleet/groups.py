"""SIMULATION BYPASS for benchmarks: a group of every virtual device built in one step.

Adding N members one at a time costs N-1 commits that every member must process (O(N^2) work:
hours at N = 1000). Instead, the protocol core's own constructor, ``Group.assemble``, builds
every member's state of the group at epoch 1 (the state real commits reach once every member has
committed: see its docstring), each device's core installs its state through the public
``AgentCore.install_group``, and the registry gets the group, its members and one ack each
(``firmware_sim.fleet.registry.record_seeded_group``, audited as ``group.seed.simulated``).
Rekeys, removals and adds after that go through the real service as usual."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Final

from sqlalchemy.orm import Session, sessionmaker

from agent.protocol import authz as az
from agent.protocol.hpke import generate_key_pair, serialize_public_key
from agent.protocol.membership import ChangeAuthorization
from agent.protocol.mls import codec
from agent.protocol.mls.group import Group
from agent.protocol.mls.messages import KeyPackage
from firmware_sim.fleet.device import VirtualDevice
from firmware_sim.fleet.registry import record_seeded_group

log = logging.getLogger(__name__)

SEED_EPOCH: Final = 1


def founding_request(
    devices: Sequence[VirtualDevice], group_id: str, *, now: int, lifetime: int = 3600
) -> bytes:
    """The Request (``group.create`` naming every device by id and DevID key) operators sign
    to let ``seed_group`` found ``group_id``."""
    return az.Request(
        id=os.urandom(az.REQUEST_ID_SIZE),
        op=az.OP_GROUP_CREATE,
        group=group_id,
        members=tuple(
            az.Member.of(d.device_id, serialize_public_key(d.keys.devid.public_key()))
            for d in devices
        ),
        policy=None,
        nbf=now - 60,
        exp=now + lifetime,
        by="simulation",
    ).encode()


def seed_group(
    devices: Sequence[VirtualDevice],
    group_id: str,
    sessions: sessionmaker[Session],
    *,
    now: int,
    authz: bytes | None = None,
) -> None:
    """Make every device of ``devices`` (device i at leaf i) a member of a new group
    ``group_id`` at epoch 1, in memory and in the registry. ``authz``: the operators'
    Authorization of the group's creation naming every device (``founding_request`` makes the
    Request to sign), recorded as every leaf's admission; without it the devices follow the
    group's rekeys but refuse any Welcome into it (no admission: ``authz.missing``)."""
    members = []
    for device in devices:
        leaf = device.keys.new_leaf_key()
        key_package = KeyPackage.create(
            device.device_id.encode(),
            device.keys.devid,
            leaf.public_key(),
            device.credential,
            init_key=generate_key_pair().public_key(),  # assembled: no Welcome is sealed to it
        )
        members.append((key_package, leaf, device.keys.devid))
    envelope = None if authz is None else ChangeAuthorization(authz).encode()
    groups = Group.assemble(group_id.encode(), members, epoch=SEED_EPOCH, authz=envelope)
    for device, group in zip(devices, groups, strict=True):
        device.core.install_group(group, now)
    first = groups[0]
    record_seeded_group(
        sessions,
        group_id,
        epoch=SEED_EPOCH,
        public_tree=codec.encode(first.public_group().to_state()),
        group_context=first.group_context(),
        members=[d.device_id for d in devices],
        epoch_authenticator=first.epoch_authenticator,
        now=now,
        authz=envelope,
    )
    log.warning(
        "seeded group %s with %d virtual members directly (simulation only)",
        group_id,
        len(devices),
    )
