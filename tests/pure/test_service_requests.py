"""Dual control in the sans-I/O service: propose, approve, expire, duplicates, the quorum that
starts the change with its Authorization, signed policies (provisioning/service/requests.py).

The fleet is test_service_core's: a real SQLite file, software MLS members, operators with
certificates from a real operator CA; approvals are signed with agent.protocol.authz as the CLI
signs them. The service runs with ``min_approvals = 2`` unless a test says otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from sqlalchemy import update

from agent.protocol import authz
from agent.protocol.wire.messages.operator import Approve, ListRequests, Propose
from agent.protocol.wire.messages.result import RequestInfo, RequestState, ResultStatus
from agent.protocol.wire.messages.service import CommitRequest, WelcomeDelivery
from provisioning.dashboard.app import build_dashboard_app
from provisioning.db.runtime import QuorumRequestRow
from provisioning.registry import DeviceState, Registry
from provisioning.service import store
from provisioning.service.operators import register_operator
from tests.pure.test_service_core import T0, Fleet, make_fleet
from tests.service_members import SoftOperator, command_id, group_add, utc

pytestmark = pytest.mark.pure

TTL = 600


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    for made in make_fleet(
        tmp_path, ("dev-1", "dev-2", "dev-3", "dev-4"), min_approvals=2, request_ttl=TTL
    ):
        made.record = True
        yield made


def propose(
    fleet: Fleet,
    operator: str,
    op: str,
    *members: str,
    group: str | None = None,
    policy: bytes | None = None,
    reason: str | None = None,
) -> RequestInfo:
    body = Propose(command_id(), op, tuple(members), group, policy, reason)
    fleet.send(fleet.operators[operator].command(body, fleet.now))
    answers = fleet.request_results.get(body.command_id)
    assert answers, [r.detail for r in fleet.results.get(body.command_id, [])]
    (info,) = answers[-1].requests
    return info


def approve(
    fleet: Fleet, operator: str, request: bytes, *, signer: str | None = None
) -> tuple[bytes, RequestInfo | None]:
    """``operator`` sends the approval of ``signer`` (default: its own). Returns the command id
    and the service's answer (None: refused, see ``fleet.results``)."""
    who = fleet.operators[signer or operator]
    approval = authz.sign_approval(request, who.key, who.cert).encode()
    body = Approve(command_id(), authz.Request.decode(request).id, approval)
    fleet.send(fleet.operators[operator].command(body, fleet.now))
    answers = fleet.request_results.get(body.command_id)
    return body.command_id, (answers[-1].requests[0] if answers else None)


def refusal(fleet: Fleet, cid: bytes) -> str:
    (result,) = fleet.results[cid]
    assert result.status is ResultStatus.REJECTED
    return result.detail


def create_by_quorum(fleet: Fleet, group: str, *members: str) -> None:
    info = propose(fleet, "op-alice", "group.create", *members, group=group)
    approve(fleet, "op-alice", info.request)
    cid, _ = approve(fleet, "op-admin", info.request)
    assert fleet.final(cid).status is ResultStatus.DONE


def devid_hash(fleet: Fleet, device_id: str) -> bytes:
    from provisioning.service.context import Call, Clock
    from provisioning.service.requests import devid_point

    cx = Call(fleet.service._env, Clock.reading(fleet.now))
    with fleet.sessions() as s:
        return authz.member_key(devid_point(cx, Registry(s), device_id, fleet.now))


# -- propose ------------------------------------------------------------------------------------


def test_propose_returns_the_request_unsigned_with_the_members_devid_key_hashes(
    fleet: Fleet,
) -> None:
    info = propose(fleet, "op-alice", "group.create", "dev-1", "dev-2", group="g1")
    assert info.state is RequestState.PENDING and info.approvers == () and info.required == 2
    request = authz.Request.decode(info.request)
    assert request.op == "group.create" and request.group == "g1" and request.by == "op-alice"
    assert [(m.device_id, m.key) for m in request.members] == [
        ("dev-1", devid_hash(fleet, "dev-1")),
        ("dev-2", devid_hash(fleet, "dev-2")),
    ]
    assert (request.nbf, request.exp) == (fleet.now, fleet.now + TTL)
    # Nothing changed yet: no group, no job; the proposal is audited.
    assert fleet.service.queue_length("g1") == 0
    last = fleet.audit_entries()[-1]
    assert (last.action, last.target) == ("request.propose", request.id.hex())


def test_a_proposal_the_service_could_not_carry_out_is_refused(fleet: Fleet) -> None:
    create_by_quorum(fleet, "g1", "dev-1", "dev-2")
    body = Propose(command_id(), "group.add", ("dev-2",), "g1")
    fleet.send(fleet.operators["op-alice"].command(body, fleet.now))
    assert "ds.group.member" in refusal(fleet, body.command_id)
    body = Propose(command_id(), "device.revoke", ("dev-2",))
    fleet.send(fleet.operators["op-alice"].command(body, fleet.now))
    assert "op.role" in refusal(fleet, body.command_id)  # revocations are for admins


# -- approve ------------------------------------------------------------------------------------


def test_one_approval_leaves_the_add_pending_the_second_runs_it_with_the_authorization(
    fleet: Fleet,
) -> None:
    create_by_quorum(fleet, "g1", "dev-1", "dev-2")
    info = propose(fleet, "op-alice", "group.add", "dev-3", group="g1")
    first, pending = approve(fleet, "op-alice", info.request)
    assert pending is not None and pending.state is RequestState.PENDING
    assert pending.approvers == ("op-alice",) and pending.required == 2
    assert first not in fleet.results  # no operation was started
    assert fleet.members("g1") == ["dev-1", "dev-2"] and fleet.service.queue_length("g1") == 0

    fleet.to_devices.clear()
    second, done = approve(fleet, "op-admin", info.request)
    assert done is not None and done.state is RequestState.EXECUTED
    assert done.approvers == ("op-alice", "op-admin")
    final = fleet.final(second)
    assert final.status is ResultStatus.DONE, final.detail
    assert fleet.members("g1") == ["dev-1", "dev-2", "dev-3"]

    # The commit request carried the Authorization the service verified (the committer puts it
    # into its commit; the Welcome carries it to the joiner inside the GroupInfo).
    commits = [b for _, b in fleet.to_devices if isinstance(b, CommitRequest)]
    welcomes = [(d, b) for d, b in fleet.to_devices if isinstance(b, WelcomeDelivery)]
    assert commits and all(c.authz is not None for c in commits)
    assert [d for d, _ in welcomes] == ["dev-3"]
    carried = commits[0].authz
    assert carried is not None
    verified = authz.AuthzVerifier([fleet.service._env.operator_ca]).verify(
        carried,
        policy=authz.QuorumPolicy.initial(2),
        now=fleet.now,
        op="group.add",
        group="g1",
    )
    assert verified.operators == {"op-alice", "op-admin"}
    actions = [(e.action, e.outcome.value) for e in fleet.audit_entries()[-8:]]
    assert ("request.approve", "accepted") in actions
    assert ("request.execute", "accepted") in actions
    assert ("op.group_add", "accepted") in actions


def test_a_group_created_by_quorum_carries_the_authorization_to_every_founder(
    fleet: Fleet,
) -> None:
    create_by_quorum(fleet, "g1", "dev-1", "dev-2", "dev-3")
    assert fleet.members("g1") == ["dev-1", "dev-2", "dev-3"]
    commits = [b for _, b in fleet.to_devices if isinstance(b, CommitRequest)]
    # the create, then one commit adding both other founders
    assert [c.action.value for c in commits] == ["create", "add"]
    assert commits[1].key_packages is not None and len(commits[1].key_packages) == 2
    assert len({c.authz for c in commits}) == 1 and commits[0].authz is not None


def test_group_remove_and_revoke_by_quorum(fleet: Fleet) -> None:
    create_by_quorum(fleet, "g1", "dev-1", "dev-2", "dev-3")
    info = propose(fleet, "op-alice", "group.remove", "dev-3", group="g1")
    approve(fleet, "op-alice", info.request)
    cid, _ = approve(fleet, "op-admin", info.request)
    assert fleet.final(cid).status is ResultStatus.DONE
    assert fleet.members("g1") == ["dev-1", "dev-2"]
    with fleet.sessions() as s:
        assert Registry(s).device("dev-3").state is not DeviceState.REVOKED

    second_admin = add_operator(fleet, "op-bob", "admin")
    info = propose(fleet, "op-admin", "device.revoke", "dev-2", reason="lost in transit")
    approve(fleet, "op-admin", info.request)
    _, refused = approve(fleet, "op-alice", info.request)
    assert refused is None  # a revocation needs admins
    cid, done = approve(fleet, second_admin, info.request)
    assert done is not None and done.state is RequestState.EXECUTED
    assert fleet.final(cid).status is ResultStatus.DONE
    assert fleet.members("g1") == ["dev-1"]
    with fleet.sessions() as s:
        revoked = Registry(s).device("dev-2")
    assert revoked.state is DeviceState.REVOKED
    request_id = authz.Request.decode(info.request).id.hex()
    assert revoked.state_reason == (
        f"lost in transit (request {request_id} approved by op-admin, op-bob)"
    )


def test_the_same_operator_twice_is_refused_and_counts_once(fleet: Fleet) -> None:
    info = propose(fleet, "op-alice", "group.create", "dev-1", "dev-2", group="g1")
    approve(fleet, "op-alice", info.request)
    cid, answer = approve(fleet, "op-alice", info.request)
    assert answer is None and "quorum.duplicate" in refusal(fleet, cid)
    listed = list_requests(fleet, "op-viewer")
    assert [(i.state, i.approvers) for i in listed] == [(RequestState.PENDING, ("op-alice",))]
    last = fleet.audit_entries()[-1]
    assert last.outcome.value == "refused" and "quorum.duplicate" in (last.reason or "")


def test_an_operator_sends_only_its_own_approval_and_viewers_none(fleet: Fleet) -> None:
    info = propose(fleet, "op-alice", "group.create", "dev-1", group="g1")
    cid, answer = approve(fleet, "op-alice", info.request, signer="op-admin")
    assert answer is None and "quorum.approver" in refusal(fleet, cid)
    cid, answer = approve(fleet, "op-viewer", info.request)
    assert answer is None and "op.role" in refusal(fleet, cid)
    # A signature over other bytes is refused as the devices would refuse it.
    other = propose(fleet, "op-alice", "group.create", "dev-2", group="g2")
    admin = fleet.operators["op-admin"]
    wrong = authz.sign_approval(other.request, admin.key, admin.cert).encode()
    body = Approve(command_id(), authz.Request.decode(info.request).id, wrong)
    fleet.send(admin.command(body, fleet.now))
    assert "authz.signature" in refusal(fleet, body.command_id)


def test_an_expired_request_cannot_be_approved_and_expires_audited(fleet: Fleet) -> None:
    info = propose(fleet, "op-alice", "group.create", "dev-1", "dev-2", group="g1")
    approve(fleet, "op-alice", info.request)
    fleet.now += TTL + 1
    cid, answer = approve(fleet, "op-admin", info.request)
    assert answer is None and "quorum.expired" in refusal(fleet, cid)
    assert fleet.service.queue_length("g1") == 0
    refused = fleet.audit_entries()[-1]
    assert refused.outcome.value == "refused" and "quorum.expired" in (refused.reason or "")

    fleet.tick(1)
    request_id = authz.Request.decode(info.request).id
    with fleet.sessions() as s:
        stored = store.load_request(s, request_id)
    assert stored is not None and stored.state is RequestState.EXPIRED
    expired = [e for e in fleet.audit_entries() if e.action == "request.expire"]
    assert [e.target for e in expired] == [request_id.hex()]
    assert list_requests(fleet, "op-alice") == []
    (shown,) = list_requests(fleet, "op-alice", request_id)
    assert shown.state is RequestState.EXPIRED
    # expiry happens once
    fleet.tick(1)
    assert len([e for e in fleet.audit_entries() if e.action == "request.expire"]) == 1


def test_a_change_that_became_impossible_ends_the_request_refused(fleet: Fleet) -> None:
    create_by_quorum(fleet, "g1", "dev-1", "dev-2")
    add = propose(fleet, "op-alice", "group.add", "dev-3", group="g1")
    approve(fleet, "op-alice", add.request)
    with fleet.sessions.begin() as s:
        Registry(s).set_device_state("dev-3", DeviceState.REVOKED, reason="test", now=fleet.now)
    cid, answer = approve(fleet, "op-admin", add.request)
    assert answer is not None and answer.state is RequestState.REFUSED
    assert "registry.member.device_state" in answer.detail
    assert cid not in fleet.results and fleet.members("g1") == ["dev-1", "dev-2"]
    assert fleet.audit_entries()[-1].action == "request.refuse"


def test_direct_membership_commands_need_a_policy_of_one(fleet: Fleet) -> None:
    cid = fleet.command("op-alice", group_add("g1", "dev-1"))
    assert "quorum.required" in refusal(fleet, cid)


def list_requests(
    fleet: Fleet, operator: str, request_id: bytes | None = None
) -> list[RequestInfo]:
    body = ListRequests(command_id(), request_id)
    fleet.send(fleet.operators[operator].command(body, fleet.now))
    return list(fleet.request_results[body.command_id][-1].requests)


# -- the quorum policy --------------------------------------------------------------------------


def add_operator(fleet: Fleet, name: str, role: str) -> str:
    assert fleet.operator_ca is not None
    operator = SoftOperator.create(name, role, fleet.operator_ca, utc(T0))
    register_operator(
        fleet.sessions,
        operator.cert,
        operator_ca=fleet.operator_ca.certificate,
        role=None,
        actor="local:test",
        now=fleet.now,
    )
    fleet.operators[name] = operator
    return name


def test_a_signed_policy_adopted_by_two_admins_lets_one_operator_add_to_a_lab_group(
    fleet: Fleet,
) -> None:
    create_by_quorum(fleet, "lab", "dev-1", "dev-2")
    add_operator(fleet, "op-bob", "admin")
    policy = authz.QuorumPolicy(serial=1, default={"*": 2}, groups={"lab": {"group.add": 1}})
    info = propose(fleet, "op-admin", "policy", policy=policy.encode())
    approve(fleet, "op-admin", info.request)
    _, adopted = approve(fleet, "op-bob", info.request)
    assert adopted is not None and adopted.state is RequestState.EXECUTED
    assert fleet.audit_entries()[-1].action == "quorum.policy"

    add = propose(fleet, "op-alice", "group.add", "dev-3", group="lab")
    assert add.required == 1
    cid, answer = approve(fleet, "op-alice", add.request)
    assert answer is not None and answer.state is RequestState.EXECUTED
    assert fleet.final(cid).status is ResultStatus.DONE
    assert fleet.members("lab") == ["dev-1", "dev-2", "dev-3"]
    # Elsewhere two are still needed, and a replayed older serial is refused.
    other = propose(fleet, "op-alice", "group.create", "dev-4", group="prod")
    assert other.required == 2
    body = Propose(command_id(), "policy", (), None, policy.encode())
    fleet.send(fleet.operators["op-admin"].command(body, fleet.now))
    assert "authz.policy.serial" in refusal(fleet, body.command_id)


def test_a_policy_row_written_into_the_database_is_not_obeyed(fleet: Fleet) -> None:
    forged = authz.QuorumPolicy(serial=1, default={"*": 1})
    request = authz.Request(
        id=bytes(16),
        op="policy",
        group=None,
        members=(),
        policy=forged.encode(),
        nbf=fleet.now,
        exp=fleet.now + 60,
        by="op-admin",
    ).encode()
    admin = fleet.operators["op-admin"]
    one = authz.sign_approval(request, admin.key, admin.cert)
    with fleet.sessions.begin() as s:
        store.adopt_policy(
            s, 1, authz.Authorization(request=request, approvals=(one,)).encode(), now=fleet.now
        )
    cid = fleet.command("op-alice", group_add("g1", "dev-1"))
    assert "authz.quorum" in refusal(fleet, cid)


def test_the_policy_needs_admins(fleet: Fleet) -> None:
    policy = authz.QuorumPolicy(serial=1, default={"*": 1})
    body = Propose(command_id(), "policy", (), None, policy.encode())
    fleet.send(fleet.operators["op-alice"].command(body, fleet.now))
    assert "op.role" in refusal(fleet, body.command_id)


# -- the dashboard ------------------------------------------------------------------------------


def dashboard_overview(fleet: Fleet, viewer: str) -> str:
    """GET / of the dashboard app, called as the HTTPS server calls it (the operator's client
    certificate in the ASGI TLS extension); no socket: tests/e2e/test_dashboard.py serves it."""
    assert fleet.operator_ca is not None
    app = build_dashboard_app(
        fleet.sessions, operator_ca=fleet.operator_ca.certificate, clock=lambda: fleet.now
    )
    pem = fleet.operators[viewer].cert.public_bytes(serialization.Encoding.PEM).decode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "https",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"dashboard")],
        "server": ("127.0.0.1", 8444),
        "client": ("127.0.0.1", 50000),
        "extensions": {"tls": {"client_cert_chain": [pem]}},
    }
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    assert sent[0]["status"] == 200, sent
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()  # type: ignore[misc]


def test_the_dashboard_lists_pending_requests_read_only(fleet: Fleet) -> None:
    assert 'id="no-pending-requests"' in dashboard_overview(fleet, "op-viewer")
    info = propose(fleet, "op-alice", "group.create", "dev-1", "dev-2", group="g1")
    approve(fleet, "op-alice", info.request)
    request_id = authz.Request.decode(info.request).id.hex()
    page = dashboard_overview(fleet, "op-viewer")
    row = page[page.index(f'data-request="{request_id}"') :].split("</tr>")[0]
    assert "group.create" in row and "dev-1" in row and "dev-2" in row
    assert '<td class="approvers">op-alice</td>' in row
    approve(fleet, "op-admin", info.request)
    assert request_id not in dashboard_overview(fleet, "op-viewer")


def test_a_request_row_edited_in_the_database_is_not_carried_out(fleet: Fleet) -> None:
    create_by_quorum(fleet, "g1", "dev-1", "dev-2")
    info = propose(fleet, "op-alice", "group.add", "dev-3", group="g1")
    approve(fleet, "op-alice", info.request)
    request_id = authz.Request.decode(info.request).id
    with fleet.sessions.begin() as s:  # a database writer swaps the member
        s.execute(
            update(QuorumRequestRow)
            .where(QuorumRequestRow.request_id == request_id.hex())
            .values(members="dev-4")
        )
    cid, answer = approve(fleet, "op-admin", info.request)
    assert answer is None and "quorum.stored" in refusal(fleet, cid)
    assert fleet.members("g1") == ["dev-1", "dev-2"] and fleet.service.queue_length("g1") == 0


def test_a_reenroll_request_names_a_revoked_device_only(fleet: Fleet) -> None:
    body = Propose(command_id(), "device.reenroll", ("dev-1",))
    fleet.send(fleet.operators["op-admin"].command(body, fleet.now))
    assert "revocation.reenroll.state" in refusal(fleet, body.command_id)
    body = Propose(command_id(), "device.reenroll", ("dev-1",))
    fleet.send(fleet.operators["op-alice"].command(body, fleet.now))
    assert "op.role" in refusal(fleet, body.command_id)  # admins only
