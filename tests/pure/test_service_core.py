"""The sans-I/O delivery service against a real SQLite file and real software MLS members.

Every device message here is a signed envelope from a member built on
agent.protocol.mls.group.Group with
software DevID/leaf keys (tests/service_members.py); operators sign with keys certified by a
real operator CA. The network is a loop in the test: service publishes are routed to the
members by topic, members' reports go back to ``DeliveryService.handle``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from agent.protocol.errors import InternalError, ProtocolError
from agent.protocol.mls.group import Group
from agent.protocol.topics import SERVICE_ID, device_cmd_topic, group_commit_topic
from agent.protocol.wire.cose import key_id
from agent.protocol.wire.envelope import Signer, open_message
from agent.protocol.wire.messages.ack import Ack as AckBody
from agent.protocol.wire.messages.base import UINT64_MAX, Body
from agent.protocol.wire.messages.group import CommitMessage, UpdateRequest
from agent.protocol.wire.messages.key_state import KeyStateReport
from agent.protocol.wire.messages.result import OperatorResult, RequestsResult, ResultStatus
from agent.protocol.wire.messages.service import CommitAction, WelcomeDelivery
from provisioning import audit, pki
from provisioning.db.runtime import create_service_schema
from provisioning.db.schema import Ack as AckRow
from provisioning.db.schema import GroupAdmission
from provisioning.metrics import ServiceMetrics
from provisioning.registry import (
    DeviceState,
    Registry,
    Role,
    create_schema,
    make_engine,
    session_factory,
)
from provisioning.service import devices, store
from provisioning.service.commits import AcceptedCommit
from provisioning.service.context import Call, Clock
from provisioning.service.core import (
    DeliveryService,
    Publish,
    ServiceSettings,
)
from provisioning.service.effects import (
    AskAgain,
    Count,
    GroupChanged,
    JobEnded,
    Log,
    Send,
    StartNext,
)
from provisioning.service.model import Job, JobState
from provisioning.service.operators import register_operator
from tests.service_members import (
    Outgoing,
    SoftDevice,
    SoftOperator,
    device_ca,
    group_add,
    group_create,
    rekey,
    revoke,
    utc,
)

pytestmark = pytest.mark.pure

T0 = 1_700_000_000


@dataclass
class Fleet:
    db_path: Path
    sessions: sessionmaker[Session]
    service: DeliveryService
    devices: dict[str, SoftDevice]
    operators: dict[str, SoftOperator]
    now: int = T0
    results: dict[bytes, list[OperatorResult]] = field(default_factory=dict)
    request_results: dict[bytes, list[RequestsResult]] = field(default_factory=dict)
    operator_ca: pki.CertificateAuthority | None = None
    device_ca: pki.CertificateAuthority | None = None
    record: bool = False  # keep what the service sent to devices in ``to_devices``
    to_devices: list[tuple[str, Body]] = field(default_factory=list)
    to_operators: list[tuple[str, Body]] = field(default_factory=list)  # every result, in order
    offline: set[str] = field(default_factory=set)
    inbox: dict[str, list[tuple[str, bytes]]] = field(default_factory=dict)

    # -- the network --------------------------------------------------------------------------

    def _service_signer(self, kid: bytes) -> Signer:
        public = self.service._env.key.public_key()
        assert kid == key_id(public)
        return Signer(SERVICE_ID, public)

    def deliver(self, publishes: list[Publish]) -> list[Outgoing]:
        replies: list[Outgoing] = []
        for p in publishes:
            parts = p.topic.split("/")
            if parts[2] == "ops":
                message = open_message(
                    p.payload, self._service_signer, now=self.now, recipients={parts[3]}
                )
                self.to_operators.append((parts[3], message.body))
                if isinstance(message.body, RequestsResult):
                    self.request_results.setdefault(message.body.command_id, []).append(
                        message.body
                    )
                    continue
                assert isinstance(message.body, OperatorResult)
                self.results.setdefault(message.body.command_id, []).append(message.body)
                continue
            if parts[2] == "dev" and self.record:
                sent = open_message(
                    p.payload, self._service_signer, now=self.now, recipients={parts[3]}
                )
                self.to_devices.append((parts[3], sent.body))
            targets = [parts[3]] if parts[2] == "dev" else list(self.devices)
            for name in targets:
                if name in self.offline:
                    self.inbox.setdefault(name, []).append((p.topic, p.payload))
                else:
                    replies.extend(self.devices[name].receive(p.topic, p.payload, self.now))
        return replies

    def send(self, *outgoing: Outgoing) -> None:
        """Hand messages to the service and route everything until the network is quiet."""
        queue = list(outgoing)
        while queue:
            topic, payload = queue.pop(0)
            queue.extend(self.deliver(self.service.handle(topic, payload, self.now)))

    def tick(self, seconds: int) -> None:
        self.now += seconds
        for topic, payload in self.deliver(self.service.tick(self.now)):
            self.send((topic, payload))

    def come_online(self, name: str, *, lost_session: bool = False) -> None:
        self.offline.discard(name)
        queued = self.inbox.pop(name, [])
        if lost_session:
            queued = []
        for topic, payload in queued:
            self.send(*self.devices[name].receive(topic, payload, self.now))

    # -- operators ----------------------------------------------------------------------------

    def command(self, operator: str, body: Body) -> bytes:
        self.send(self.operators[operator].command(body, self.now))
        return body.command_id

    def final(self, command_id: bytes) -> OperatorResult:
        results = self.results[command_id]
        assert results[-1].status not in (ResultStatus.ACCEPTED, ResultStatus.IN_PROGRESS), [
            (r.status, r.detail) for r in results
        ]
        return results[-1]

    # -- views --------------------------------------------------------------------------------

    def epoch(self, group_id: str) -> int:
        with self.sessions() as s:
            return Registry(s).group(group_id).epoch

    def admissions(self, group_id: str) -> dict[bytes, bytes]:
        """The Authorizations the service keeps for ``group_id`` (``group_admissions``)."""
        with self.sessions() as s:
            rows = s.execute(
                select(GroupAdmission.digest, GroupAdmission.authz).where(
                    GroupAdmission.group_id == group_id
                )
            )
            return {digest: authz for digest, authz in rows}

    def members(self, group_id: str) -> list[str]:
        with self.sessions() as s:
            return [m.device_id for m in Registry(s).members(group_id) if m.leaf_index is not None]

    def audit_entries(self) -> list[audit.AuditRecord]:
        with self.sessions() as s:
            return audit.entries(s)


def make_fleet(
    tmp_path: Path,
    names: tuple[str, ...] = ("dev-1", "dev-2", "dev-3"),
    *,
    url: str | None = None,
    **settings: int,
) -> Iterator[Fleet]:
    """A fleet on a SQLite file in ``tmp_path``, or on the database at ``url`` (PostgreSQL)."""
    now_dt = utc(T0)
    db_path = tmp_path / "fleet.db"
    engine = make_engine(url if url is not None else f"sqlite:///{db_path}")
    create_schema(engine)
    create_service_schema(engine)
    sessions = session_factory(engine)
    service_key = pki.generate_key()
    operator_ca = pki.create_ca("op CA", now=now_dt, valid_for=timedelta(days=2))
    devices_ca = device_ca(now_dt)
    counter = iter(range(1, 1 << 30))
    service = DeliveryService(
        sessions,
        signing_key=service_key,
        operator_ca=operator_ca.certificate,
        device_ca=devices_ca.certificate,
        # One operator may decide alone unless a test asks for dual control: the direct
        # commands these tests send carry no Authorization (tests/pure/test_service_requests.py).
        settings=ServiceSettings(**{"min_approvals": 1, **settings}),
        rng=lambda n: next(counter).to_bytes(n, "big"),
    )
    devices = {}
    for name in names:
        device = SoftDevice.create(name, devices_ca, service_key.public_key(), now_dt)
        device.register(sessions, T0)
        devices[name] = device
    operators = {}
    for name, role in (("op-admin", "admin"), ("op-alice", "operator"), ("op-viewer", "viewer")):
        operator = SoftOperator.create(name, role, operator_ca, now_dt)
        register_operator(
            sessions,
            operator.cert,
            operator_ca=operator_ca.certificate,
            role=None,
            actor="local:test",
            now=T0,
        )
        operators[name] = operator
    yield Fleet(
        db_path,
        sessions,
        service,
        devices,
        operators,
        operator_ca=operator_ca,
        device_ca=devices_ca,
    )
    engine.dispose()


def another_instance(fleet: Fleet, name: str, **settings: int) -> DeliveryService:
    """Another service instance on the fleet's database (or the first one restarted): the same
    key, the same settings but ``settings``, nothing in memory."""
    first = fleet.service
    return DeliveryService(
        fleet.sessions,
        signing_key=first._env.key,
        operator_ca=first._env.operator_ca,
        device_ca=first._env.devices.device_ca,
        settings=replace(first.settings, **settings),
        instance=name,
        metrics=ServiceMetrics(),
    )


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    yield from make_fleet(tmp_path)


def agreed(fleet: Fleet, group_id: str) -> set[bytes]:
    """The epoch authenticators of every member that holds the group (one = no fork)."""
    return {
        d.groups[group_id].epoch_authenticator
        for d in fleet.devices.values()
        if group_id in d.groups
    }


def create_g1(fleet: Fleet, *members: str) -> None:
    cid = fleet.command("op-alice", group_create("g1", *(members or tuple(fleet.devices))))
    result = fleet.final(cid)
    assert result.status is ResultStatus.DONE, result.detail


# -- flows ------------------------------------------------------------------------------------


def test_create_add_rekey_revoke(fleet: Fleet) -> None:
    create_g1(fleet, "dev-1", "dev-2")
    assert fleet.epoch("g1") == 1
    assert fleet.members("g1") == ["dev-1", "dev-2"]
    assert len(agreed(fleet, "g1")) == 1

    cid = fleet.command("op-alice", group_add("g1", "dev-3"))
    done = fleet.final(cid)
    assert done.status is ResultStatus.DONE and done.epoch == 2
    assert (done.acked, done.pending, done.failed, done.stragglers) == (3, 0, 0, ())
    keys = {d.groups["g1"].data_key() for d in fleet.devices.values()}
    assert len(keys) == 1

    statuses = []
    cid = fleet.command("op-alice", rekey("g1"))
    statuses = [r.status for r in fleet.results[cid]]
    assert statuses[0] is ResultStatus.ACCEPTED and statuses[-1] is ResultStatus.DONE
    assert fleet.epoch("g1") == 3 and len(agreed(fleet, "g1")) == 1
    old_key = fleet.devices["dev-3"].groups["g1"].data_key()

    cid = fleet.command("op-admin", revoke("dev-3"))
    assert fleet.final(cid).status is ResultStatus.DONE
    assert fleet.members("g1") == ["dev-1", "dev-2"]
    with fleet.sessions() as s:
        assert Registry(s).device("dev-3").state is DeviceState.REVOKED
    assert fleet.epoch("g1") == 4
    assert {d.groups["g1"].data_key() for n, d in fleet.devices.items() if n != "dev-3"} != {
        old_key
    }
    assert len({fleet.devices[n].groups["g1"].epoch_authenticator for n in ("dev-1", "dev-2")}) == 1

    # From now on the revoked device is refused, and each refusal is audited.
    before = fleet.service.rejections.count("ds.device.revoked")
    fleet.send(fleet.devices["dev-3"].report(KeyStateReport(()), fleet.now))
    assert fleet.service.rejections.count("ds.device.revoked") == before + 1
    last = fleet.audit_entries()[-1]
    assert last.actor == "device:dev-3" and last.outcome.value == "refused"
    assert "ds.device.revoked" in last.reason


def test_commit_requests_go_to_an_online_member_and_are_retried(fleet: Fleet) -> None:
    create_g1(fleet)
    epoch = fleet.epoch("g1")
    # Two members never answer commit requests; after the commit request timeout the service
    # asks the next candidate, until dev-3 commits.
    fleet.devices["dev-1"].ignore_commit_requests = True
    fleet.devices["dev-2"].ignore_commit_requests = True
    cid = fleet.command("op-alice", rekey("g1"))
    for _ in range(3):
        if fleet.epoch("g1") == epoch:
            fleet.tick(11)
    assert fleet.epoch("g1") == epoch + 1
    with fleet.sessions() as s:
        committer = s.execute(
            text("SELECT committer FROM commit_log WHERE group_id='g1' AND epoch=:e"), {"e": epoch}
        ).scalar()
    assert committer == "dev-3"
    assert fleet.final(cid).status is ResultStatus.DONE


def test_two_rekeys_at_once_never_fork(fleet: Fleet) -> None:
    create_g1(fleet)
    start = fleet.epoch("g1")
    first, second = rekey("g1"), rekey("g1")
    # Both commands reach the service before any member answers.
    operator = fleet.operators["op-alice"]
    out1 = fleet.service.handle(*operator.command(first, fleet.now), fleet.now)
    out2 = fleet.service.handle(*operator.command(second, fleet.now), fleet.now)
    accepted = [r for r in fleet.deliver(out2) if r] + fleet.deliver(out1)
    second_accept = fleet.results[second.command_id][0]
    assert second_accept.status is ResultStatus.ACCEPTED
    assert "queued behind 1" in second_accept.detail
    fleet.send(*accepted)
    assert fleet.final(first.command_id).status is ResultStatus.DONE
    assert fleet.final(second.command_id).status is ResultStatus.DONE
    assert fleet.epoch("g1") == start + 2
    assert len(agreed(fleet, "g1")) == 1
    with fleet.sessions() as s:
        rows = s.execute(
            text("SELECT epoch, COUNT(*) FROM commit_log WHERE group_id='g1' GROUP BY epoch")
        ).all()
    assert all(count == 1 for _, count in rows)


def test_a_revoke_with_nothing_else_running_is_queued_behind_nothing(fleet: Fleet) -> None:
    create_g1(fleet)
    cid = fleet.command("op-admin", revoke("dev-3"))
    accepted = fleet.results[cid][0]
    assert accepted.status is ResultStatus.ACCEPTED
    assert accepted.detail == "1 group change(s)"
    assert fleet.final(cid).status is ResultStatus.DONE


def test_a_revoke_behind_a_rekey_counts_only_the_rekey(fleet: Fleet) -> None:
    create_g1(fleet)
    operator, admin = fleet.operators["op-alice"], fleet.operators["op-admin"]
    first, second = rekey("g1"), revoke("dev-3")
    out1 = fleet.service.handle(*operator.command(first, fleet.now), fleet.now)
    out2 = fleet.service.handle(*admin.command(second, fleet.now), fleet.now)
    replies = fleet.deliver(out1) + fleet.deliver(out2)
    assert fleet.results[second.command_id][0].detail == (
        "1 group change(s); queued behind 1 earlier change(s)"
    )
    fleet.send(*replies)
    assert fleet.results[second.command_id][-1].status is not ResultStatus.REJECTED


def test_racing_committers_first_valid_commit_wins(tmp_path: Path) -> None:
    # Member-initiated updates allowed ([groups] member_updates; off by default, when an
    # unasked commit is refused: tests/pure/test_wedge.py).
    fleet = next(make_fleet(tmp_path, member_updates=True, member_update_min_interval=0))
    create_g1(fleet)
    epoch = fleet.epoch("g1")
    a, b = fleet.devices["dev-1"], fleet.devices["dev-2"]
    from cryptography.hazmat.primitives.asymmetric import ec

    # Both members self-update in the same epoch, unasked, at the same moment.
    out_a = a.commit_result(
        "g1",
        a.groups["g1"].update(a.devid, ec.generate_private_key(ec.SECP256R1())),
        None,
        fleet.now,
    )
    out_b = b.commit_result(
        "g1",
        b.groups["g1"].update(b.devid, ec.generate_private_key(ec.SECP256R1())),
        None,
        fleet.now,
    )
    fleet.send(*out_a)
    before = fleet.service.rejections.count("ds.commit.epoch_taken")
    fleet.send(*out_b)
    assert fleet.service.rejections.count("ds.commit.epoch_taken") == before + 1
    assert fleet.epoch("g1") == epoch + 1
    refusal = fleet.audit_entries()[-1]
    assert refusal.actor == "device:dev-2" and "ds.commit.epoch_taken" in refusal.reason
    # The loser dropped nothing yet; the winner's relay moved everyone to the same epoch.
    assert len(agreed(fleet, "g1")) == 1
    assert all(d.groups["g1"].epoch == epoch + 1 for d in fleet.devices.values())


# -- operator refusals ------------------------------------------------------------------------


def snapshot(fleet: Fleet) -> tuple[object, ...]:
    with fleet.sessions() as s:
        groups = s.execute(text("SELECT group_id, epoch, public_tree FROM groups")).all()
        commits = s.execute(text("SELECT COUNT(*) FROM commit_log")).scalar()
        states = s.execute(text("SELECT device_id, state FROM devices")).all()
    return (tuple(groups), commits, tuple(states))


def test_forged_replayed_stale_and_wrong_role_commands_change_nothing(
    fleet: Fleet, tmp_path: Path
) -> None:
    create_g1(fleet)
    alice = fleet.operators["op-alice"]
    state = snapshot(fleet)
    audit_before = len(fleet.audit_entries())

    def refused(topic_payload: Outgoing, check: str) -> None:
        count = fleet.service.rejections.count(check)
        publishes = fleet.service.handle(*topic_payload, fleet.now)
        assert fleet.service.rejections.count(check) == count + 1, check
        # Nothing reaches a device: at most a "rejected" result to the operator.
        assert all(p.topic.startswith("kf/v1/ops/") for p in publishes)
        last = fleet.audit_entries()[-1]
        assert last.outcome.value == "refused" and check in last.reason

    # Forged: a key the service does not know signs as op-alice.
    mallory = SoftOperator("op-alice", pki.generate_key(), alice.cert)
    refused(mallory.command(rekey("g1"), fleet.now), "cose.kid-unknown")
    # Wrong role: a viewer asks for a rekey; an operator asks for a revoke.
    refused(fleet.operators["op-viewer"].command(rekey("g1"), fleet.now), "op.role")
    refused(alice.command(revoke("dev-2"), fleet.now), "op.role")
    # Stale: signed ten minutes ago.
    refused(alice.command(rekey("g1"), fleet.now - 600), "envelope.stale")
    # Replayed: a command captured and sent again (after it was refused for the role, so the
    # replay guard holds its seq) -- and an accepted one replayed later.
    viewer_cmd = fleet.operators["op-viewer"].command(rekey("g1"), fleet.now)
    fleet.service.handle(*viewer_cmd, fleet.now)
    good = rekey("g1")
    accepted = alice.command(good, fleet.now)
    fleet.send(accepted)
    assert fleet.final(good.command_id).status is ResultStatus.DONE
    state = snapshot(fleet)
    refused(accepted, "replay.duplicate")
    # Same command id, freshly signed with a new seq.
    refused(alice.command(good, fleet.now), "op.command_id.reused")
    # A new command under a seq that already carried another one.
    refused(alice.command(rekey("g1"), fleet.now, seq=1), "replay.seq-reused")
    assert snapshot(fleet) == state
    assert len(fleet.audit_entries()) > audit_before
    with fleet.sessions() as s:
        assert audit.verify_chain(s).ok


def test_unregistered_operator_certificate_from_another_ca_is_refused(fleet: Fleet) -> None:
    other_ca = pki.create_ca("other", now=utc(T0), valid_for=timedelta(days=1))
    stranger = SoftOperator.create("op-eve", "admin", other_ca, utc(T0))
    with pytest.raises(ProtocolError) as refused:
        register_operator(
            fleet.sessions,
            stranger.cert,
            operator_ca=fleet.service._env.operator_ca,
            role=Role.ADMIN,
            actor="local:test",
            now=T0,
        )
    assert refused.value.check == "pki.issuer"
    assert fleet.audit_entries()[-1].outcome.value == "refused"


# -- timeouts, catch-up, re-welcome -----------------------------------------------------------


def test_silent_member_times_out_named(fleet: Fleet) -> None:
    create_g1(fleet)
    fleet.devices["dev-3"].silent = True
    cid = fleet.command("op-alice", rekey("g1"))
    for _ in range(4):
        fleet.tick(10)
    result = fleet.final(cid)
    assert result.status is ResultStatus.TIMEOUT
    assert result.stragglers == ("dev-3",) and result.pending == 1
    assert result.acked == 2
    assert "dev-3" in result.detail


def miss_two_rekeys(fleet: Fleet, device: str) -> None:
    """Take ``device`` offline and rekey g1 twice without it: both rekeys time out on it."""
    fleet.offline.add(device)
    for _ in range(2):
        cid = fleet.command("op-alice", rekey("g1"))
        # past the commit request timeout first: the request goes to another member, which
        # commits (one jump would time the operation out with that request, and a commit
        # answering a withdrawn request is refused as unsolicited: tests/pure/test_wedge.py)
        fleet.tick(15)
        fleet.tick(35)
        assert fleet.final(cid).status is ResultStatus.TIMEOUT


def test_offline_member_catches_up_from_the_commit_log(fleet: Fleet) -> None:
    create_g1(fleet)
    miss_two_rekeys(fleet, "dev-3")
    assert fleet.devices["dev-3"].groups["g1"].epoch == fleet.epoch("g1") - 2
    # The broker lost dev-3's session: nothing queued reaches it. Its next report triggers the
    # replay of the two commits it missed, on its own command topic.
    fleet.come_online("dev-3", lost_session=True)
    fleet.send(fleet.devices["dev-3"].report(KeyStateReport(()), fleet.now))
    assert fleet.devices["dev-3"].groups["g1"].epoch == fleet.epoch("g1")
    assert len(agreed(fleet, "g1")) == 1
    with fleet.sessions() as s:
        assert Registry(s).ack_status("g1").agreed


def test_offline_members_reporting_together_catch_up_in_one_batch(fleet: Fleet) -> None:
    """Reports received together are caught up together (the memberships, the groups' epochs
    and what each member is proven to hold read in one query): each member behind gets the
    commits it missed, the one that is not behind gets none."""
    create_g1(fleet)
    fleet.offline.add("dev-2")
    miss_two_rekeys(fleet, "dev-3")
    assert fleet.devices["dev-2"].groups["g1"].epoch == fleet.epoch("g1") - 2
    assert fleet.devices["dev-3"].groups["g1"].epoch == fleet.epoch("g1") - 2
    fleet.come_online("dev-2", lost_session=True)
    fleet.come_online("dev-3", lost_session=True)
    before = fleet.devices["dev-1"].groups["g1"]
    batch = [
        fleet.devices[n].report(KeyStateReport(()), fleet.now) for n in ("dev-1", "dev-2", "dev-3")
    ]
    while batch:
        batch = fleet.deliver(fleet.service.handle_many(batch, fleet.now))
    assert {n: fleet.devices[n].groups["g1"].epoch for n in fleet.devices} == dict.fromkeys(
        fleet.devices, fleet.epoch("g1")
    )
    assert fleet.devices["dev-1"].groups["g1"] is before
    assert len(agreed(fleet, "g1")) == 1


def test_member_beyond_retention_is_re_added_with_a_fresh_welcome(tmp_path: Path) -> None:
    fleet = next(make_fleet(tmp_path, retention_epochs=1))
    create_g1(fleet)
    miss_two_rekeys(fleet, "dev-3")
    stale = fleet.devices["dev-3"].groups["g1"]
    fleet.come_online("dev-3", lost_session=True)
    fleet.send(fleet.devices["dev-3"].report(KeyStateReport(()), fleet.now))
    rejoined = fleet.devices["dev-3"].groups["g1"]
    assert rejoined is not stale and rejoined.epoch == fleet.epoch("g1")
    assert fleet.members("g1") == sorted(fleet.devices)
    assert len(agreed(fleet, "g1")) == 1
    actions = [e.action for e in fleet.audit_entries()]
    assert "group.readd" in actions


# -- what the service keeps ------------------------------------------------------------------


def test_database_holds_no_group_secret(fleet: Fleet) -> None:
    create_g1(fleet)
    fleet.command("op-alice", rekey("g1"))
    fleet.command("op-admin", revoke("dev-3"))
    secrets = [s for d in fleet.devices.values() for s in d.secrets()]
    assert len(secrets) > 20
    blob = b"".join(
        p.read_bytes() for p in fleet.db_path.parent.iterdir() if p.name.startswith("fleet.db")
    )
    assert len(blob) > 10_000
    for secret in secrets:
        assert secret not in blob
        assert secret.hex().encode() not in blob
    _ = Group  # the members' state type, for readers of this test


def test_editing_one_audit_entry_is_named_by_audit_verify(fleet: Fleet) -> None:
    import subprocess
    import sys

    create_g1(fleet)
    fleet.command("op-viewer", rekey("g1"))  # refused: audited too
    entries = fleet.audit_entries()
    refused = next(e for e in entries if e.outcome.value == "refused")
    with fleet.sessions.begin() as s:
        s.execute(
            text("UPDATE audit_log SET reason = 'nothing happened' WHERE seq = :seq"),
            {"seq": refused.seq},
        )
    verify = subprocess.run(
        [
            sys.executable,
            "-m",
            "provisioning.cli",
            "audit",
            "verify",
            "--db",
            f"sqlite:///{fleet.db_path}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verify.returncode == 1
    assert verify.stdout.startswith(f"audit chain BROKEN at entry {refused.seq}: hash mismatch")


def test_ack_progress_is_throttled_and_a_held_back_view_goes_out_on_tick(tmp_path: Path) -> None:
    """Above 40 members an in-progress ack result goes out per 5% of the members, not per ack
    (all acks here arrive within one second of the injected clock); the final result names every
    member, and the view the throttle held back is sent by the next tick of a later second."""
    names = tuple(f"dev-{i:02}" for i in range(42))
    for fleet in make_fleet(tmp_path, names):
        create_g1(fleet)
        fleet.devices["dev-00"].silent = True
        cid = fleet.command("op-alice", rekey("g1"))
        progress = [
            r for r in fleet.results[cid] if r.status is ResultStatus.IN_PROGRESS and r.epoch
        ]
        counts = [r.acked for r in progress]
        assert counts and counts == sorted(set(counts)), counts
        assert len(progress) <= 42 // 2 + 2 < 41, counts
        assert counts[-1] < 41  # the last ack (41st) falls inside a 5% step: held back
        fleet.tick(1)
        latest = fleet.results[cid][-1]
        assert latest.status is ResultStatus.IN_PROGRESS
        assert latest.acked == 41 and latest.stragglers == ("dev-00",)
        fleet.tick(40)
        result = fleet.final(cid)
        assert result.status is ResultStatus.TIMEOUT and result.stragglers == ("dev-00",)


def test_acks_received_together_are_one_batch_and_each_is_judged_alone(tmp_path: Path) -> None:
    """The MQTT adapter hands the core what arrived together (``handle_many``). A rekey's acks
    taken as one batch that also holds a duplicate of one of them, an ack from a device outside
    the group and members' acks for epochs the group never reached (one the largest the wire
    allows, past any database integer): the good acks count, each
    bad one is refused by its own check, and a refused ack's sequence number is not recorded
    (its effects roll back alone)."""
    names = ("dev-1", "dev-2", "dev-3", "dev-4", "dev-5")
    for fleet in make_fleet(tmp_path, names):
        create_g1(fleet, "dev-1", "dev-2", "dev-3", "dev-4")
        epoch = fleet.epoch("g1")
        with fleet.sessions() as s:
            before = {n: store.load_guard(s, n).highest_seq(n) for n in names}
        body = rekey("g1")
        batch = [fleet.operators["op-alice"].command(body, fleet.now)]
        acks: list[Outgoing] = []
        while batch:
            if all(topic.endswith("/report") for topic, _ in batch) and len(batch) == 4:
                acks = list(batch)
                ahead = fleet.devices["dev-2"].report(
                    AckBody("g1", epoch + 5, bytes(32)), fleet.now
                )
                assert "dev-2" in (topic.split("/")[3] for topic, _ in acks)
                # the largest epoch the wire allows: beyond any database integer too
                far = fleet.devices["dev-3"].report(AckBody("g1", UINT64_MAX, bytes(32)), fleet.now)
                outsider = fleet.devices["dev-5"].report(
                    AckBody("g1", epoch + 1, bytes(32)), fleet.now
                )
                batch = [*acks, acks[0], ahead, far, outsider]
            batch = fleet.deliver(fleet.service.handle_many(batch, fleet.now))
        assert len(acks) == 4, "the four members' acks did not arrive together"
        result = fleet.final(body.command_id)
        assert result.status is ResultStatus.DONE, result.detail
        assert result.epoch == epoch + 1 and len(set(agreed(fleet, "g1"))) == 1
        rejections = fleet.service.rejections
        assert rejections.count("replay.duplicate") == 1
        assert rejections.count("ds.ack.epoch_ahead") == 2
        assert rejections.count("ds.ack.not_member") == 1
        assert fleet.service.metrics.reports.value("group.ack") >= 4
        with fleet.sessions() as s:
            after = {n: store.load_guard(s, n).highest_seq(n) for n in names}
            acked = {
                row.device_id for row in s.scalars(select(AckRow).where(AckRow.epoch == epoch + 1))
            }
        assert acked == {"dev-1", "dev-2", "dev-3", "dev-4"}
        assert after["dev-5"] == before["dev-5"]  # the outsider's refused ack left no trace
        # dev-2's ack for the new epoch was taken; its later ack for epoch + 5 (the device's
        # last seq) was not
        assert after["dev-2"] == fleet.devices["dev-2"].seq - 1


# -- flows return their effects as values -------------------------------------------------------


def test_an_accepted_commit_relays_then_welcomes_then_ends_its_job() -> None:
    job = Job(CommitAction.ADD, "g1", "dev-3", b"\x01" * 16, state=JobState.DONE)
    relay = CommitMessage("g1", 4, b"commit", b"\x02" * 16)
    effects = AcceptedCommit("dev-1", relay, ["dev-3"], [], b"welcome", job, None).effects()
    assert [type(e) for e in effects] == [Count, Log, Send, Send, JobEnded, GroupChanged]
    assert effects[2] == Send(group_commit_topic("g1"), relay, "g1")
    assert effects[3] == Send(
        device_cmd_topic("dev-3"), WelcomeDelivery("g1", 5, b"welcome"), "dev-3"
    )
    assert effects[4] == JobEnded(job) and effects[5] == GroupChanged("g1")


def test_a_commit_that_won_a_requested_epoch_asks_the_head_job_again() -> None:
    relay = CommitMessage("g1", 4, b"self-update")
    requested = Job(CommitAction.UPDATE, "g1", None, b"\x01" * 16, state=JobState.REQUESTED)
    effects = AcceptedCommit("dev-2", relay, [], [], None, None, requested).effects()
    assert [type(e) for e in effects] == [Count, Log, Send, AskAgain, GroupChanged]
    queued = Job(CommitAction.UPDATE, "g1", None, b"\x01" * 16, state=JobState.QUEUED)
    effects = AcceptedCommit("dev-2", relay, [], [], None, None, queued).effects()
    assert [type(e) for e in effects] == [Count, Log, Send, GroupChanged]


def test_a_rotation_request_queues_an_update_and_returns_a_start_for_after_commit(
    fleet: Fleet,
) -> None:
    create_g1(fleet)
    cx = Call(fleet.service._env, Clock.reading(fleet.now))
    with fleet.sessions() as session:
        request = UpdateRequest("g1", fleet.epoch("g1"), "max-messages-per-epoch")
        effects = devices.on_update_request(cx, session, "dev-2", request, fleet.now)
        assert [type(e) for e in effects] == [Log, StartNext]
        assert effects[1] == StartNext("g1")
        assert [j.prefer for j in store.open_jobs(session, "g1")] == ["dev-2"]
        session.rollback()  # the flow wrote in the caller's transaction only
    assert cx.outbox == []  # nothing is sent before the effects run
    assert fleet.service.queue_length("g1") == 0


def test_a_clock_reading_in_ms_must_be_within_its_second(fleet: Fleet) -> None:
    assert Clock.reading(10) == Clock(10, 10_000)
    assert Clock.reading(10, 10_250) == Clock(10, 10_250)
    with pytest.raises(InternalError):
        Clock.reading(10, 11_000)
    with pytest.raises(InternalError):
        fleet.service.tick(fleet.now, now_ms=fleet.now * 1000 - 1)


def test_the_service_flows_import_no_sql() -> None:
    """Every query is in ``provisioning.service.store``: a flow module may name a ``Session``
    (typing) and catch ``SQLAlchemyError``, nothing else of SQLAlchemy."""
    allowed = {("sqlalchemy.orm", "Session"), ("sqlalchemy.orm", "sessionmaker")}
    allowed |= {("sqlalchemy.exc", "SQLAlchemyError")}
    package = Path(devices.__file__).parent
    flows = sorted(package.glob("*.py"))
    assert len(flows) > 10
    for path in flows:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("sqlalchemy") for a in node.names), path.name
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqlalchemy"):
                names = {(node.module, a.name) for a in node.names}
                assert names <= allowed, (path.name, names - allowed)
