"""Large groups for the scale test and benchmark of a rekey (tests/pure/test_big_rekey.py,
``python -m bench.bench_scale rekey``): a group of N software members built in one step and
driven through the real delivery service.

The group is made by ``Group.assemble`` (the state real adds reach, software keys, every leaf
with its DevID certificate) and the service's store is seeded with it as the service stores a
group: its devices registered with their real DevID certificates, the group's head and node rows,
its member rows and one ack each of the assembled epoch (every member proven at that epoch, as
the virtual fleet's ``seed_group`` records it). Bulk inserts: registering N devices one
transaction at a time would take longer than the rekey.

What is real after that: the operator's signed command, the service's whole rekey flow on a
SQLite file (committer choice, commit request, commit acceptance, relay, acks, progress,
result), the committer's commit (real MLS), and every member's ack, a signed envelope from its
own DevID key carrying the new epoch's authenticator. What is cheap: only ``processing`` members
process the relayed commit with MLS (``Group.process``); the others (``Follower``) take the new
epoch's authenticator from one that did, instead of computing the same value themselves. The
service cannot tell: an ack is checked against the sender's DevID key and its group's epoch
only.

The network is a loop (``drive``) that hands the service up to ``BATCH`` messages at a time, as
``keyfleet serve`` does with what the broker delivered (``DeliveryService.handle_many``), and
keeps the time spent inside the service apart from the members' (``Clocks``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import insert
from sqlalchemy.orm import Session, sessionmaker

from agent.protocol.errors import ProtocolError
from agent.protocol.mls.group import Group
from agent.protocol.mls.messages import KeyPackage
from agent.protocol.wire.messages.ack import Ack
from agent.protocol.wire.messages.group import CommitMessage
from provisioning import pki
from provisioning.db.schema import Ack as AckRow
from provisioning.db.schema import Device, DeviceState, GroupMember, GroupTreeNode
from provisioning.db.schema import Group as GroupRow
from provisioning.service.core import Publish
from provisioning.service.store import trees
from tests.pure.test_service_core import T0, Fleet, make_fleet
from tests.service_members import Outgoing, SoftDevice, utc

BATCH = 200
"""Messages handed to the service at once (``keyfleet serve``'s batch)."""
ROWS = 10_000
"""Rows per bulk insert."""
SEED_EPOCH = 1


@dataclass
class Follower(SoftDevice):
    """A member that acks a relayed commit without processing it: it signs the ack of the new
    epoch with the authenticator ``reference`` (a member that processed the commit with MLS,
    delivered first) reached. Its own commit, if the service asks it for one, is real."""

    reference: SoftDevice | None = field(default=None, repr=False)
    epochs: dict[str, int] = field(default_factory=dict)  # group -> the epoch it acked last

    def _process(self, body: CommitMessage, now: int) -> list[Outgoing]:
        gid = body.group_id
        if (gid, body.epoch) in self.pending:
            out = super()._process(body, now)  # its own commit: applied for real
            self.epochs.pop(gid, None)
            return out
        group = self.groups.get(gid)
        if group is None or body.epoch != self.epochs.get(gid, group.epoch):
            return []
        processed = None if self.reference is None else self.reference.groups.get(gid)
        if processed is None or processed.epoch != body.epoch + 1:
            raise ProtocolError("test.follower", "the reference member has not processed it")
        self.epochs[gid] = processed.epoch
        return [self.report(Ack(gid, processed.epoch, processed.epoch_authenticator), now)]


@dataclass
class BigGroup:
    """A seeded group: its members (those that process commits first), and its epoch."""

    fleet: Fleet
    group_id: str
    processing: list[SoftDevice]
    followers: list[Follower]

    @property
    def size(self) -> int:
        return len(self.processing) + len(self.followers)


def _member(
    device_id: str, ca: pki.CertificateAuthority, service_key: ec.EllipticCurvePublicKey
) -> tuple[SoftDevice, tuple[KeyPackage, ec.EllipticCurvePrivateKey, ec.EllipticCurvePrivateKey]]:
    device = Follower.create(device_id, ca, service_key, utc(T0))
    cert = pki.x509.load_pem_x509_certificate(device.cert_pem.encode())
    leaf = ec.generate_private_key(ec.SECP256R1())
    kp = KeyPackage.create(
        device_id.encode(),
        device.devid,
        leaf.public_key(),
        cert.public_bytes(serialization.Encoding.DER),
        init_key=ec.generate_private_key(ec.SECP256R1()).public_key(),  # assembled: no Welcome
    )
    return device, (kp, leaf, device.devid)


def build(
    fleet: Fleet,
    group_id: str,
    n: int,
    *,
    processing: int,
    progress: Callable[[str], None] = lambda _: None,
) -> BigGroup:
    """``n`` members (``dev-000000`` ...) of ``group_id`` at epoch 1, in memory and in the
    fleet's store; ``processing`` of them, spread over the tree (the last member among them),
    process commits with MLS (and are delivered to first), the rest are ``Follower``s of the
    first of those."""
    assert fleet.device_ca is not None
    service_key = fleet.service.signing_key
    made = []
    for i in range(n):
        made.append(_member(f"dev-{i:06}", fleet.device_ca, service_key))
        if i and i % 20_000 == 0:
            progress(f"  {i} members made")
    states = Group.assemble(group_id.encode(), [m[1] for m in made], epoch=SEED_EPOCH)
    step = max(1, n // max(1, processing))
    # spread over the tree, and the last member: the one the service asks to commit when every
    # member was heard from at the same time (the highest device id of the most recent)
    chosen = {*range(0, n, step)[: processing - 1], n - 1}
    first: list[SoftDevice] = []
    rest: list[Follower] = []
    for i, ((device, _), state) in enumerate(zip(made, states, strict=True)):
        device.groups[group_id] = state
        if i in chosen:
            # a plain member: processes every commit with MLS
            plain = SoftDevice(device.device_id, device.devid, device.cert_pem, service_key)
            plain.groups[group_id] = state
            first.append(plain)
        else:
            assert isinstance(device, Follower)
            rest.append(device)
    for follower in rest:
        follower.reference = first[0]
    del made
    seed(fleet.sessions, group_id, states[0], [*first, *rest], now=fleet.now)
    fleet.devices = {d.device_id: d for d in [*first, *rest]}
    return BigGroup(fleet, group_id, first, rest)


def seed(
    sessions: sessionmaker[Session],
    group_id: str,
    state: Group,
    members: list[SoftDevice],
    *,
    now: int,
) -> None:
    """The rows of the group as the service stores them, and its members' device rows (active,
    heard from ``now``, their real DevID certificates)."""
    public = state.public_group()
    leaves = {leaf.device_id.decode(): i for i, leaf in public.tree.members()}
    rows = trees.rows_of(public.tree, trees.all_nodes(public.tree))
    nodes = [{"group_id": group_id, "node": x, "data": d} for x, d in rows.items() if d]
    devices = [
        {
            "device_id": m.device_id,
            "ek_cert_fingerprint": f"{leaves[m.device_id]:064x}",
            "devid_cert_pem": m.cert_pem,
            "state": DeviceState.ACTIVE,
            "state_reason": "seeded",
            "registered_at": now,
            "state_changed_at": now,
            "last_seen": now,
        }
        for m in members
    ]
    member_rows = [
        {
            "group_id": group_id,
            "device_id": m.device_id,
            "leaf_index": leaves[m.device_id],
            "joined_epoch": public.epoch,
            "requested_at": now,
        }
        for m in members
    ]
    acks = [
        {
            "group_id": group_id,
            "epoch": public.epoch,
            "device_id": m.device_id,
            "epoch_authenticator": state.epoch_authenticator,
            "received_at": now,
            "received_at_ms": now * 1000,
        }
        for m in members
    ]
    head = {
        "group_id": group_id,
        "epoch": public.epoch,
        "public_tree": trees.head(public.state),
        "group_context": public.state.group_context(),
        "created_at": now,
        "updated_at": now,
    }
    with sessions.begin() as session:
        for table, values in (
            (Device, devices),
            (GroupRow, [head]),
            (GroupTreeNode, nodes),
            (GroupMember, member_rows),
            (AckRow, acks),
        ):
            for start in range(0, len(values), ROWS):
                session.execute(insert(table), values[start : start + ROWS])


@dataclass
class Clocks:
    """Seconds spent inside the service and in the members (and the network loop's routing,
    with them), and the largest operator result payload the service published."""

    service: float = 0.0
    members: float = 0.0
    service_calls: int = 0
    calls: list[tuple[float, int]] = field(default_factory=list)  # (seconds, messages) each
    largest_result: int = 0
    messages: int = 0


def drive(fleet: Fleet, outgoing: list[Outgoing], clocks: Clocks, *, batch: int = BATCH) -> None:
    """Hand ``outgoing`` to the service, ``batch`` at a time, and route everything until the
    network is quiet."""
    queue = deque(outgoing)
    while queue:
        chunk = [queue.popleft() for _ in range(min(batch, len(queue)))]
        clocks.messages += len(chunk)
        start = time.perf_counter()
        publishes = fleet.service.handle_many(chunk, fleet.now)
        spent = time.perf_counter() - start
        clocks.service += spent
        clocks.service_calls += 1
        clocks.calls.append((spent, len(chunk)))
        queue.extend(_deliver(fleet, publishes, clocks))


def _deliver(fleet: Fleet, publishes: list[Publish], clocks: Clocks) -> list[Outgoing]:
    for p in publishes:
        if p.topic.split("/")[2] == "ops":
            clocks.largest_result = max(clocks.largest_result, len(p.payload))
    start = time.perf_counter()
    replies = fleet.deliver(publishes)
    clocks.members += time.perf_counter() - start
    return replies


def command(fleet: Fleet, operator: str, body: Any, clocks: Clocks) -> bytes:
    """An operator's signed command, driven until the network is quiet."""
    drive(fleet, [fleet.operators[operator].command(body, fleet.now)], clocks)
    return bytes(body.command_id)


def tick(fleet: Fleet, seconds: int, clocks: Clocks) -> None:
    fleet.now += seconds
    start = time.perf_counter()
    publishes = fleet.service.tick(fleet.now)
    clocks.service += time.perf_counter() - start
    clocks.service_calls += 1
    drive(fleet, _deliver(fleet, publishes, clocks), clocks)


def big_fleet(tmp_path: Path, **settings: int) -> Iterator[Fleet]:
    """An empty fleet (service, operators, device CA) on a SQLite file in ``tmp_path``."""
    yield from make_fleet(tmp_path, (), **settings)
