"""Operators managed under the quorum (provisioning/service/operatorops.py): operator.add,
operator.remove, operator.role requests, the removed state from the kept removal approvals, the
withdrawn approvals, and the local bootstrap that closes once the fleet is in use.

The fleet is test_service_core's (a real SQLite file, a real operator CA) with dual control
(``min_approvals = 2``) and three admins: op-admin, op-bob, op-carol.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from sqlalchemy import select, update

from agent.protocol import authz
from agent.protocol.errors import ProtocolError
from agent.protocol.membership import Membership
from agent.protocol.operatorsubject import OperatorSubject
from agent.protocol.wire import cbor as codec
from agent.protocol.wire.messages.operator import ListRequests, Propose
from agent.protocol.wire.messages.result import RequestState
from provisioning.dashboard.app import operator_authorizer
from provisioning.db.runtime import QuorumRequestRow
from provisioning.db.schema import Operator
from provisioning.operators_cli import check_bootstrap_open, operator_rows
from provisioning.registry import Registry, Role
from provisioning.requests_cli import check_proposed
from provisioning.service import feed, store
from provisioning.service.store.quorum import StoredRequest
from tests.pure.test_service_core import T0, Fleet, make_fleet
from tests.pure.test_service_requests import add_operator, approve, propose, refusal
from tests.service_members import SoftOperator, command_id, utc

pytestmark = pytest.mark.pure


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    for made in make_fleet(tmp_path, ("dev-1", "dev-2"), min_approvals=2, request_ttl=600):
        for name in ("op-bob", "op-carol"):
            add_operator(made, name, "admin")
        yield made


def der(operator: SoftOperator) -> bytes:
    return operator.cert.public_bytes(serialization.Encoding.DER)


def propose_operator(
    fleet: Fleet, by: str, op: str, name: str, *, cert: bytes | None = None, role: str | None = None
) -> tuple[bytes, object]:
    body = Propose(command_id(), op, (), operator=name, cert=cert, role=role)
    fleet.send(fleet.operators[by].command(body, fleet.now))
    answers = fleet.request_results.get(body.command_id)
    if not answers:
        return body.command_id, None
    (info,) = answers[-1].requests
    return body.command_id, info


def newcomer(fleet: Fleet, name: str = "op-dave", role: str = "operator") -> SoftOperator:
    assert fleet.operator_ca is not None
    return SoftOperator.create(name, role, fleet.operator_ca, utc(T0))


def can_command(fleet: Fleet, operator: SoftOperator) -> bool:
    body = ListRequests(command_id())
    fleet.send(operator.command(body, fleet.now))
    return body.command_id in fleet.request_results


def last_refusal(fleet: Fleet, operator: str) -> str:
    entries = [e for e in fleet.audit_entries() if e.actor == f"operator:{operator}"]
    return entries[-1].reason or ""


# -- the subject --------------------------------------------------------------------------------


def test_subjects_round_trip_and_anything_else_is_refused() -> None:
    digest = hashlib.sha256(b"cert").digest()
    for subject in (
        OperatorSubject(authz.OP_OPERATOR_ADD, "op-dave", digest),
        OperatorSubject(authz.OP_OPERATOR_REMOVE, "op-dave", digest),
        OperatorSubject(authz.OP_OPERATOR_ROLE, "op-dave", digest, "viewer"),
    ):
        assert OperatorSubject.decode(subject.encode()) == subject
    for bad in (
        OperatorSubject(authz.OP_OPERATOR_ADD, "op-dave", digest, "admin").encode(),
        OperatorSubject(authz.OP_OPERATOR_ROLE, "op-dave", digest).encode(),
        OperatorSubject(authz.OP_OPERATOR_ADD, "op-dave", digest[:31]).encode(),
        OperatorSubject("group.add", "op-dave", digest).encode(),  # type: ignore[arg-type]
        b"\x80",
        b"not cbor",
    ):
        with pytest.raises(ProtocolError) as err:
            OperatorSubject.decode(bad)
        assert err.value.check == "operator.subject"


def test_an_approval_of_an_operator_op_by_a_non_admin_certificate_is_refused_by_the_verifier(
    fleet: Fleet,
) -> None:
    request = authz.Request(
        id=b"\x01" * 16,
        op=authz.OP_OPERATOR_ADD,
        group=None,
        members=(),
        policy=None,
        nbf=T0,
        exp=T0 + 60,
        by="op-admin",
        subject=OperatorSubject(authz.OP_OPERATOR_ADD, "op-x", b"\0" * 32).encode(),
    ).encode()
    alice = fleet.operators["op-alice"]
    assert fleet.operator_ca is not None
    verifier = authz.AuthzVerifier([fleet.operator_ca.certificate])
    with pytest.raises(ProtocolError) as err:
        verifier.verify_approval(
            request, authz.sign_approval(request, alice.key, alice.cert), now=T0
        )
    assert err.value.check == "authz.role"


# -- add ----------------------------------------------------------------------------------------


def test_two_admins_add_an_operator_one_alone_leaves_it_pending(fleet: Fleet) -> None:
    dave = newcomer(fleet)
    _cid, info = propose_operator(fleet, "op-admin", "operator.add", "op-dave", cert=der(dave))
    assert info is not None
    request = authz.Request.decode(info.request)  # type: ignore[attr-defined]
    subject = OperatorSubject.decode(request.subject or b"")
    assert subject.cert_sha256 == hashlib.sha256(der(dave)).digest()
    _, pending = approve(fleet, "op-admin", request.encode())
    assert pending is not None and pending.state is RequestState.PENDING
    assert not can_command(fleet, dave)  # not registered yet
    _, done = approve(fleet, "op-bob", request.encode())
    assert done is not None and done.state is RequestState.EXECUTED, done.detail
    assert can_command(fleet, dave)
    with fleet.sessions() as s:
        assert Registry(s).operator("op-dave").role is Role.OPERATOR
        (row,) = [r for r in operator_rows(s) if r["name"] == "op-dave"]
    assert row["state"] == "active" and row["approved_by"] == "op-admin,op-bob"
    added = [e for e in fleet.audit_entries() if e.action == "operator.add" and e.actor == "quorum"]
    assert [e.target for e in added] == ["op-dave"]


def test_operator_requests_are_for_admins_and_bind_what_they_name(fleet: Fleet) -> None:
    dave = newcomer(fleet)
    cid, info = propose_operator(fleet, "op-alice", "operator.add", "op-dave", cert=der(dave))
    assert info is None and "op.role" in refusal(fleet, cid)
    # a certificate naming someone else than the operator named
    cid, info = propose_operator(fleet, "op-admin", "operator.add", "op-eve", cert=der(dave))
    assert info is None and "op.name" in refusal(fleet, cid)
    # a role beyond the certificate's OU
    cid, info = propose_operator(fleet, "op-admin", "operator.role", "op-alice", role="admin")
    assert info is None and "op.role" in refusal(fleet, cid)
    # an active operator is not added twice
    alice = der(fleet.operators["op-alice"])
    cid, info = propose_operator(fleet, "op-admin", "operator.add", "op-alice", cert=alice)
    assert info is None and "registry.operator.exists" in refusal(fleet, cid)


def test_a_role_is_narrowed_by_quorum(fleet: Fleet) -> None:
    _cid, info = propose_operator(fleet, "op-admin", "operator.role", "op-alice", role="viewer")
    assert info is not None
    request = info.request  # type: ignore[attr-defined]
    approve(fleet, "op-admin", request)
    _, done = approve(fleet, "op-carol", request)
    assert done is not None and done.state is RequestState.EXECUTED
    body = Propose(command_id(), "group.create", ("dev-1", "dev-2"), "g1")
    fleet.send(fleet.operators["op-alice"].command(body, fleet.now))
    assert "op.role" in refusal(fleet, body.command_id)


# -- remove -------------------------------------------------------------------------------------


def remove_bob(fleet: Fleet) -> bytes:
    _cid, info = propose_operator(fleet, "op-admin", "operator.remove", "op-bob")
    assert info is not None
    request: bytes = info.request  # type: ignore[attr-defined]
    approve(fleet, "op-admin", request)
    _, done = approve(fleet, "op-carol", request)
    assert done is not None and done.state is RequestState.EXECUTED, done.detail
    return request


def test_removal_refuses_the_operator_and_withdraws_its_pending_approvals(fleet: Fleet) -> None:
    pending = propose(fleet, "op-alice", "group.create", "dev-1", "dev-2", group="g1")
    _, info = approve(fleet, "op-bob", pending.request)
    assert info is not None and info.approvers == ("op-bob",)
    assert can_command(fleet, fleet.operators["op-bob"])
    remove_bob(fleet)
    assert not can_command(fleet, fleet.operators["op-bob"])
    assert "operator.removed" in last_refusal(fleet, "op-bob")
    with fleet.sessions() as s:
        wanted = authz.Request.decode(pending.request).id.hex()
        row = s.scalars(select(QuorumRequestRow).where(QuorumRequestRow.request_id == wanted)).one()
        assert row.state == "pending" and row.approvers == ""
        listed = {r["name"]: r for r in operator_rows(s)}
    assert listed["op-bob"]["state"] == "removed"
    assert listed["op-bob"]["removed_by"] == "op-admin,op-carol"
    actions = [e.action for e in fleet.audit_entries()]
    assert "request.withdraw" in actions and "operator.remove" in actions
    # the removed certificate cannot be added again
    bob = der(fleet.operators["op-bob"])
    cid, again = propose_operator(fleet, "op-admin", "operator.add", "op-bob", cert=bob)
    assert again is None and "operator.removed" in refusal(fleet, cid)


def test_a_removal_becomes_a_feed_entry_devices_verify_and_act_on(fleet: Fleet) -> None:
    assert fleet.operator_ca is not None and fleet.device_ca is not None
    remove_bob(fleet)
    with fleet.sessions() as s:
        head = feed.head(s, now=fleet.now)
    assert head is not None and head.seq == 1
    device = Membership(
        device_cas=(fleet.device_ca.certificate,),
        operator_cas=(fleet.operator_ca.certificate,),
        min_approvals=2,
        require_tpm=False,
    )
    assert device.follow_feed(head)
    bob = hashlib.sha256(der(fleet.operators["op-bob"])).digest()
    assert device.revocations.removed_operators() == {bob: fleet.now}

    def later_release(*approvers: str) -> bytes:
        request = authz.Request(
            id=os.urandom(16),
            op=authz.OP_RELEASE_APPROVE,
            group=None,
            members=(),
            policy=None,
            nbf=fleet.now,
            exp=fleet.now + 60,
            by=approvers[0],
            subject=b"release 2",
        ).encode()
        approvals = tuple(
            authz.sign_approval(request, fleet.operators[a].key, fleet.operators[a].cert)
            for a in approvers
        )
        return authz.Authorization(request, approvals).encode()

    with pytest.raises(ProtocolError) as err:
        device.check_release_approval(later_release("op-bob", "op-carol"))
    assert err.value.check == "operator.removed"
    counted = device.check_release_approval(later_release("op-admin", "op-carol"))
    assert counted.operators == {"op-admin", "op-carol"}


def test_the_last_active_admin_is_not_removed(fleet: Fleet) -> None:
    remove_bob(fleet)
    _cid, info = propose_operator(fleet, "op-admin", "operator.remove", "op-carol")
    assert info is not None
    approve(fleet, "op-admin", info.request)  # type: ignore[attr-defined]
    _, done = approve(fleet, "op-carol", info.request)  # type: ignore[attr-defined]
    assert done is not None and done.state is RequestState.EXECUTED
    cid, last = propose_operator(fleet, "op-admin", "operator.remove", "op-admin")
    assert last is None and "registry.operator.last_admin" in refusal(fleet, cid)


def test_a_database_writer_does_not_reactivate_a_removed_operator(fleet: Fleet) -> None:
    removal = remove_bob(fleet)
    removal_id = authz.Request.decode(removal).id.hex()
    with fleet.sessions.begin() as s:
        # the removal "undone" in its row's state, the operator's row touched
        s.execute(
            update(QuorumRequestRow)
            .where(QuorumRequestRow.request_id == removal_id)
            .values(state="refused")
        )
        s.execute(update(Operator).where(Operator.name == "op-bob").values(updated_at=T0 + 5))
    assert not can_command(fleet, fleet.operators["op-bob"])
    assert "operator.removed" in last_refusal(fleet, "op-bob")


def test_a_removal_is_verified_once_until_its_row_changes(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every operator command reads the removed state; the removal's signatures are verified
    once, and again only when the bytes verified change (a database writer's edit)."""
    removal = remove_bob(fleet)
    calls: list[str] = []
    real = authz.AuthzVerifier.verify

    def counting(self: authz.AuthzVerifier, *args: object, **kwargs: object) -> object:
        calls.append(str(kwargs.get("op")))
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(authz.AuthzVerifier, "verify", counting)
    assert can_command(fleet, fleet.operators["op-carol"])
    first = calls.count(authz.OP_OPERATOR_REMOVE)
    assert first <= 1
    for _ in range(3):
        assert can_command(fleet, fleet.operators["op-carol"])
        assert not can_command(fleet, fleet.operators["op-bob"])
    assert calls.count(authz.OP_OPERATOR_REMOVE) == first
    removal_id = authz.Request.decode(removal).id.hex()
    with fleet.sessions.begin() as s:
        row = s.scalars(
            select(QuorumRequestRow).where(QuorumRequestRow.request_id == removal_id)
        ).one()
        kept = codec.decode(row.approvals)
        assert isinstance(kept, list)
        row.approvals = codec.encode(kept[:1])  # one approval left: below the quorum
    # the edited row is verified afresh: it no longer proves a removal (a writer who deletes
    # the row has the same power; the removal's approvals are also kept in the audit log)
    assert can_command(fleet, fleet.operators["op-bob"])
    assert authz.OP_OPERATOR_REMOVE in calls


def test_a_forged_removal_removes_nobody(fleet: Fleet) -> None:
    # a request row claiming carol's removal, its approvals signed by one admin only
    request = authz.Request(
        id=b"\x02" * 16,
        op=authz.OP_OPERATOR_REMOVE,
        group=None,
        members=(),
        policy=None,
        nbf=fleet.now,
        exp=fleet.now + 60,
        by="op-admin",
        subject=OperatorSubject(
            authz.OP_OPERATOR_REMOVE,
            "op-carol",
            fleet.operators["op-carol"].cert.fingerprint(hashes.SHA256()),
        ).encode(),
    ).encode()
    admin = fleet.operators["op-admin"]

    with fleet.sessions.begin() as s:
        store.insert_request(
            s,
            StoredRequest(
                request_id=b"\x02" * 16,
                op=authz.OP_OPERATOR_REMOVE,
                group_id=None,
                members=(),
                request=request,
                approvals=[authz.sign_approval(request, admin.key, admin.cert).encode()],
                approvers=["op-admin"],
                state=RequestState.EXECUTED,
                proposer="op-admin",
                created_at=fleet.now,
                expires_at=fleet.now + 60,
            ),
            now=fleet.now,
        )
    assert can_command(fleet, fleet.operators["op-carol"])
    with fleet.sessions() as s:  # nor does it reach the devices' feed
        assert feed.head(s, now=fleet.now) is None


# -- the local bootstrap ------------------------------------------------------------------------


def test_the_local_bootstrap_closes_once_the_fleet_is_in_use(fleet: Fleet) -> None:
    with fleet.sessions() as s:
        check_bootstrap_open(s)  # only local registrations so far
    assert can_command(fleet, fleet.operators["op-admin"])
    with fleet.sessions() as s, pytest.raises(ProtocolError) as err:
        check_bootstrap_open(s)
    assert err.value.check == "operator.bootstrap.closed"
    assert "--operator-cert" in err.value.reason


def test_the_dashboard_refuses_a_removed_operator_not_one_whose_removal_is_pending(
    fleet: Fleet,
) -> None:
    assert fleet.operator_ca is not None
    authorize = operator_authorizer(
        fleet.sessions, fleet.operator_ca.certificate, lambda: fleet.now, 2
    )
    bob = fleet.operators["op-bob"].cert
    assert authorize(bob) is not None
    _cid, info = propose_operator(fleet, "op-admin", "operator.remove", "op-bob")
    assert info is not None
    approve(fleet, "op-admin", info.request)  # type: ignore[attr-defined]
    assert authorize(bob) is not None  # one admin's approval removes nobody
    _, done = approve(fleet, "op-carol", info.request)  # type: ignore[attr-defined]
    assert done is not None and done.state is RequestState.EXECUTED
    assert authorize(bob) is None
    assert authorize(fleet.operators["op-carol"].cert) is not None


def test_the_cli_signs_only_the_operator_change_it_asked_for(fleet: Fleet) -> None:
    dave, eve = newcomer(fleet), newcomer(fleet, "op-dave", "admin")
    asked = Propose(command_id(), "operator.add", (), operator="op-dave", cert=der(dave))

    def request(subject: OperatorSubject) -> authz.Request:
        return authz.Request(
            id=b"\x03" * 16,
            op=subject.op,
            group=None,
            members=(),
            policy=None,
            nbf=fleet.now,
            exp=fleet.now + 60,
            by="op-admin",
            subject=subject.encode(),
        )

    digest = hashlib.sha256(der(dave)).digest()
    check_proposed(
        request(OperatorSubject("operator.add", "op-dave", digest)), asked, "op-admin", fleet.now
    )
    for wrong in (
        OperatorSubject("operator.add", "op-dave", hashlib.sha256(der(eve)).digest()),
        OperatorSubject("operator.add", "op-eve", digest),
        OperatorSubject("operator.remove", "op-dave", digest),
    ):
        with pytest.raises(ProtocolError) as err:
            check_proposed(request(wrong), asked, "op-admin", fleet.now)
        assert err.value.check == "quorum.mismatch"
