"""Replacing a device after a TPM failure (RMA) under the quorum: ``device.replace`` requests
(provisioning/service/replaceops.py), their refusals, and what the executed request changes.

The fleet is test_service_core's (a real SQLite file, software MLS members, a real operator CA)
with dual control (``min_approvals = 2``) and two admins, op-admin and op-bob. The members here
do not check authorizations themselves: each commit request's Authorization is checked below as
a device checks it (``AuthzVerifier.verify`` and ``members_match``); the devices' own checks are
tests/pure/test_attacks_membership.py's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from sqlalchemy import func, select

from agent.protocol import authz
from agent.protocol.errors import ProtocolError
from agent.protocol.feed import FeedEntry
from agent.protocol.mls import codec
from agent.protocol.wire.messages.operator import Propose
from agent.protocol.wire.messages.result import RequestState, ResultStatus
from agent.protocol.wire.messages.service import CommitAction, CommitRequest
from provisioning.dashboard.pending import pending_requests
from provisioning.db.runtime import RevocationFeedRow
from provisioning.registry import DeviceState, KeyState, KeyStateReport, Registry
from provisioning.requests_cli import check_proposed, describe, replace_proposal
from provisioning.service import replaceops
from tests.pure.test_service_core import Fleet, agreed, make_fleet
from tests.pure.test_service_requests import (
    add_operator,
    approve,
    create_by_quorum,
    devid_hash,
    propose,
    refusal,
)
from tests.service_members import command_id

pytestmark = pytest.mark.pure


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    for made in make_fleet(
        tmp_path, ("dev-1", "dev-2", "dev-3", "dev-4", "dev-5"), min_approvals=2, request_ttl=600
    ):
        made.record = True
        add_operator(made, "op-bob", "admin")
        create_by_quorum(made, "g1", "dev-1", "dev-2", "dev-3")
        create_by_quorum(made, "g2", "dev-2", "dev-1")
        yield made


def propose_replace(fleet: Fleet, by: str, old: str, new: str) -> tuple[bytes, str | None]:
    """The command id and, when the service refused the proposal, its refusal."""
    body = Propose(command_id(), authz.OP_DEVICE_REPLACE, (old, new), reason="TPM failed")
    fleet.send(fleet.operators[by].command(body, fleet.now))
    if fleet.request_results.get(body.command_id):
        return body.command_id, None
    return body.command_id, refusal(fleet, body.command_id)


def state(fleet: Fleet) -> tuple[object, ...]:
    """What a refused replacement must leave as it was."""
    with fleet.sessions() as s:
        registry = Registry(s)
        devices = tuple((d, registry.device(d).state) for d in sorted(fleet.devices))
        feed = s.scalar(select(func.count()).select_from(RevocationFeedRow))
    return devices, fleet.members("g1"), fleet.members("g2"), feed, fleet.epoch("g1")


def feed_entries(fleet: Fleet) -> list[FeedEntry]:
    with fleet.sessions() as s:
        rows = s.scalars(select(RevocationFeedRow).order_by(RevocationFeedRow.seq))
        return [FeedEntry.decode(row.entry) for row in rows]


def test_two_admins_replace_a_device_new_joins_its_groups_old_is_revoked(fleet: Fleet) -> None:
    with fleet.sessions.begin() as s:  # the old device's key ledger, as its reports made it
        report = KeyStateReport("devid", KeyState.ACTIVE, fleet.now - 60, "devid")
        Registry(s).record_report("dev-1", b"report", [report], now=fleet.now)
    info = propose(fleet, "op-admin", "device.replace", "dev-1", "dev-4", reason="TPM failed")
    request = authz.Request.decode(info.request)
    assert [(m.device_id, m.key) for m in request.members] == [
        ("dev-1", devid_hash(fleet, "dev-1")),
        ("dev-4", devid_hash(fleet, "dev-4")),
    ]
    assert request.group is None and authz.replaced_groups(request.subject) == ("g1", "g2")
    assert "  replace:  dev-1 by dev-4; dev-4 joins g1, g2; dev-1 is revoked" in describe(request)
    asked = Propose(command_id(), "device.replace", ("dev-1", "dev-4"), reason="TPM failed")
    check_proposed(request, asked, "op-admin", fleet.now)  # what the CLI signs
    with pytest.raises(ProtocolError) as err:  # the CLI refuses a swapped replacement
        swapped = Propose(command_id(), "device.replace", ("dev-4", "dev-1"))
        check_proposed(request, swapped, "op-admin", fleet.now)
    assert err.value.check == "quorum.mismatch"

    with fleet.sessions() as s:  # the dashboard lists it, readable, with both identities
        (shown,) = pending_requests(s, now=fleet.now)
    assert shown.readable and shown.members == ("dev-1", "dev-4") and shown.release is None

    # One admin: nothing changes.
    before = state(fleet)
    first, pending = approve(fleet, "op-admin", info.request)
    assert pending is not None and pending.state is RequestState.PENDING
    assert first not in fleet.results and state(fleet) == before

    fleet.to_devices.clear()
    second, done = approve(fleet, "op-bob", info.request)
    assert done is not None and done.state is RequestState.EXECUTED
    final = fleet.final(second)
    assert final.status is ResultStatus.DONE, final.detail
    # (by leaf: the new identity took the old one's leaf, freed by the removal before its add)
    assert fleet.members("g1") == ["dev-4", "dev-2", "dev-3"]
    assert sorted(fleet.members("g2")) == ["dev-2", "dev-4"]
    assert len(agreed(fleet, "g1")) == 1 and len(agreed(fleet, "g2")) == 1
    assert fleet.devices["dev-4"].groups["g1"].epoch == fleet.epoch("g1")

    # Every commit request carried the replacement's Authorization, and each change is one a
    # device accepts under it: the old one removed, the new one added, group by group.
    verifier = authz.AuthzVerifier([fleet.service._env.operator_ca])
    commits = [b for _, b in fleet.to_devices if isinstance(b, CommitRequest)]
    assert sorted((c.group_id, c.action.value, c.member) for c in commits) == [
        ("g1", "add", "dev-4"),
        ("g1", "remove", "dev-1"),
        ("g2", "add", "dev-4"),
        ("g2", "remove", "dev-1"),
    ]
    order = [(c.group_id, c.action) for c in commits]
    for group in ("g1", "g2"):  # the old leaf leaves before the new one joins
        assert order.index((group, CommitAction.REMOVE)) < order.index((group, CommitAction.ADD))
    for commit in commits:
        assert commit.authz is not None
        verified = verifier.verify(
            commit.authz,
            policy=authz.QuorumPolicy.initial(2),
            now=fleet.now,
            op=authz.OP_DEVICE_REPLACE,
            group=None,
        )
        assert verified.operators == {"op-admin", "op-bob"}
        if commit.action is CommitAction.ADD:
            point = (
                fleet.devices["dev-4"]
                .devid.public_key()
                .public_bytes(
                    serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
                )
            )
            authz.members_match(verified, adds=[("dev-4", point)], removes=[])
        else:
            authz.members_match(verified, adds=[], removes=["dev-1"])

    # The old identity is revoked as a revocation revokes it, and its keys are gone.
    with fleet.sessions() as s:
        registry = Registry(s)
        old = registry.device("dev-1")
        assert old.state is DeviceState.REVOKED
        assert old.state_reason is not None and old.state_reason.startswith("replaced by dev-4: ")
        assert [(k.key_name, k.state) for k in registry.key_states("dev-1")] == [
            ("devid", KeyState.DESTROYED)
        ]
        assert registry.device("dev-4").state is not DeviceState.REVOKED
    (entry,) = feed_entries(fleet)
    assert authz.Authorization.decode(entry.authz).request == info.request
    actions = [(e.action, e.target) for e in fleet.audit_entries()]
    assert ("op.replace", "dev-1") in actions
    (replaced,) = [e for e in fleet.audit_entries() if e.action == "device.replace"]
    details = json.loads(replaced.details)
    assert replaced.target == "dev-1" and details["new"] == "dev-4"
    assert details["groups"] == "g1,g2" and details["keys_destroyed"] == "devid"
    assert ("request.execute", request.id.hex()) in actions


@pytest.mark.parametrize(
    ("old", "new", "check"),
    [
        ("dev-9", "dev-4", "replace.old.unknown"),
        ("dev-1", "dev-9", "replace.new.unknown"),
        ("dev-1", "dev-2", "replace.new.member"),
    ],
)
def test_a_replacement_that_cannot_be_made_is_refused_with_nothing_changed(
    fleet: Fleet, old: str, new: str, check: str
) -> None:
    before = state(fleet)
    _, refused = propose_replace(fleet, "op-admin", old, new)
    assert refused is not None and check in refused
    assert state(fleet) == before


def test_a_device_cannot_replace_itself(fleet: Fleet) -> None:
    with pytest.raises(ProtocolError) as err:  # the CLI: nothing is sent
        replace_proposal(command_id(), "dev-1", "dev-1", None)
    assert err.value.check == "replace.same"
    with fleet.sessions() as s, pytest.raises(ProtocolError) as err:  # nor would the service
        replaceops.check(s, "dev-1", "dev-1")
    assert err.value.check == "replace.same"


def test_a_revoked_old_or_new_device_cannot_be_replaced_or_replace(fleet: Fleet) -> None:
    info = propose(fleet, "op-admin", "device.revoke", "dev-5")
    approve(fleet, "op-admin", info.request)
    approve(fleet, "op-bob", info.request)
    before = state(fleet)
    _, refused = propose_replace(fleet, "op-admin", "dev-1", "dev-5")
    assert refused is not None and "replace.new.state" in refused
    _, refused = propose_replace(fleet, "op-admin", "dev-5", "dev-4")
    assert refused is not None and "replace.old.state" in refused
    assert state(fleet) == before


def test_a_group_the_old_device_holds_alone_is_refused(fleet: Fleet) -> None:
    create_by_quorum(fleet, "solo", "dev-3")
    before = state(fleet)
    _, refused = propose_replace(fleet, "op-admin", "dev-3", "dev-4")
    assert refused is not None and "replace.group.alone" in refused
    assert state(fleet) == before


def test_only_admins_propose_or_approve_a_replacement(fleet: Fleet) -> None:
    _, refused = propose_replace(fleet, "op-alice", "dev-1", "dev-4")
    assert refused is not None and "op.role" in refused
    info = propose(fleet, "op-admin", "device.replace", "dev-1", "dev-4")
    approve(fleet, "op-admin", info.request)
    before = state(fleet)
    _, answered = approve(fleet, "op-alice", info.request)
    assert answered is None and state(fleet) == before  # op.role: the operator's approval


def test_groups_that_changed_since_the_proposal_end_the_request_refused(fleet: Fleet) -> None:
    info = propose(fleet, "op-admin", "device.replace", "dev-1", "dev-4")
    approve(fleet, "op-admin", info.request)
    removal = propose(fleet, "op-alice", "group.remove", "dev-1", group="g2")
    approve(fleet, "op-alice", removal.request)
    approve(fleet, "op-admin", removal.request)
    assert fleet.members("g2") == ["dev-2"]
    before = state(fleet)
    _, done = approve(fleet, "op-bob", info.request)
    assert done is not None and done.state is RequestState.REFUSED
    assert "replace.groups" in done.detail
    assert state(fleet) == before


def test_a_replacement_request_names_two_members_and_its_groups() -> None:
    base = {
        "id": b"\x01" * 16,
        "op": authz.OP_DEVICE_REPLACE,
        "group": None,
        "policy": None,
        "nbf": 1,
        "exp": 2,
        "by": "op-admin",
    }
    old, new = authz.Member("dev-1", b"\x01" * 32), authz.Member("dev-4", b"\x04" * 32)
    subject = authz.replace_subject(["g2", "g1", "g1"])
    assert authz.replaced_groups(subject) == ("g1", "g2")
    request = authz.Request(members=(old, new), subject=subject, **base)  # type: ignore[arg-type]
    assert authz.Request.decode(request.encode()) == request
    unsorted = codec.encode([authz.REPLACE_LABEL, ["g2", "g1"]])
    for members, bad_subject, group in (
        ((old,), subject, None),  # one member
        ((old, new), None, None),  # no subject
        ((old, new), subject, "g1"),  # a group
        ((old, new), b"\xa0", None),  # not a replacement's subject
        ((old, new), unsorted, None),  # one subject, one encoding
    ):
        with pytest.raises(ProtocolError) as err:
            authz.Request(
                members=members,  # type: ignore[arg-type]
                subject=bad_subject,
                **{**base, "group": group},  # type: ignore[arg-type]
            )
        assert err.value.check == "authz.decode"
