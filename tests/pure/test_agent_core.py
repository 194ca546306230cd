"""The agent's protocol core with software keys: a test driver plays the fleet service (it signs
with its own software key through agent.protocol.wire, orders commits with
agent.protocol.mls.public.PublicGroup)
and drives several device cores through create, key package, add, welcome, update and remove;
refusals by check id without state change; redelivery; commits that lose the race; restore;
rotation requests; grace-period destruction of old data keys; a group assembled in one step
(``Group.assemble``) installed through ``install_group`` and followed by a real commit."""

from __future__ import annotations

import hashlib
import itertools
import os
from dataclasses import dataclass, field, replace
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent import core as agent_core
from agent.core import (
    KEY_CHANGE_REPORT_DELAY,
    KEY_CHANGE_REPORT_SPREAD,
    SERVICE_ID,
    AgentCore,
    Outcome,
    Publish,
    leaf_name,
)
from agent.protocol.errors import ProtocolError, StateError
from agent.protocol.hpke import serialize_public_key
from agent.protocol.lifecycle import KeyKind, KeyState, RotationPolicy
from agent.protocol.mls import codec
from agent.protocol.mls.group import Group, admissions_of, inline_tree
from agent.protocol.mls.messages import Commit, KeyPackage
from agent.protocol.mls.public import PublicGroup
from agent.protocol.wire import cose
from agent.protocol.wire.envelope import Signer, VerifiedMessage, encode_message, open_message
from agent.protocol.wire.messages.ack import Ack
from agent.protocol.wire.messages.base import Body
from agent.protocol.wire.messages.group import (
    CommitMessage,
    CommitRefused,
    GroupCreated,
    KeyPackageMessage,
    UpdateRequest,
    WelcomeMessage,
)
from agent.protocol.wire.messages.key_state import KeyStateReport
from agent.protocol.wire.messages.service import (
    CommitAction,
    CommitRequest,
    KeyPackageRequest,
    ReportRequest,
    WelcomeDelivery,
)
from agent.protocol.wire.replay import ReplayGuard
from tests.device_certs import devid_cert_der
from tests.operator_certs import authorize, membership

pytestmark = pytest.mark.pure

T0 = 1_700_000_000
G = "g1"


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@dataclass
class FakeSoftwareKeys:
    """KeyProvider with software keys (the daemon's is TPM-backed)."""

    devid: ec.EllipticCurvePrivateKey = field(default_factory=new_key)
    leaves: dict[bytes, ec.EllipticCurvePrivateKey] = field(default_factory=dict)

    def new_leaf_key(self) -> ec.EllipticCurvePrivateKey:
        key = new_key()
        self.leaves[serialize_public_key(key.public_key())] = key
        return key

    def load_leaf(self, public: bytes) -> ec.EllipticCurvePrivateKey:
        try:
            return self.leaves[public]
        except KeyError:
            raise StateError("no such leaf") from None

    def prove_leaf(self, public_point: bytes) -> bytes | None:
        return None  # software keys: no TPM to prove residency with


class FakeService:
    """Plays the fleet service: signs commands, orders commits (first valid per epoch wins) with
    the public view, relays them on the group topic, forwards welcomes with the Authorizations
    it kept (from the founder's ``group.created`` and each ordered commit that adds, as the
    real service does), reads device reports."""

    def __init__(self) -> None:
        self.key = new_key()
        self.seq = itertools.count(1)
        self.now = T0
        self.devices: dict[str, AgentCore] = {}
        self.public: dict[str, PublicGroup] = {}
        # group -> the Authorizations that admitted its members, by hash (members keep none)
        self.authorizations: dict[str, dict[bytes, bytes]] = {}
        self.approvers: tuple[str, ...] = ("op-alice",)  # who approves the changes it drives
        self.create_authz: bytes | None = None  # the operators' Authorization of the creation

    def core(
        self, device_id: str, keys: FakeSoftwareKeys | None = None, **kwargs: Any
    ) -> AgentCore:
        # exact report times in these tests: no per-device spread unless a test asks for one
        kwargs.setdefault("key_report_spread", 0)
        kwargs.setdefault("membership", membership())
        keys = FakeSoftwareKeys() if keys is None else keys
        core = AgentCore(
            device_id,
            self.key.public_key(),
            keys,
            credential=devid_cert_der(device_id, keys.devid),
            now=self.now,
            **kwargs,
        )
        self.devices[device_id] = core
        return core

    def restarted(
        self,
        like: AgentCore,
        *,
        device_id: str | None = None,
        keys: FakeSoftwareKeys | None = None,
        now: int = T0,
    ) -> AgentCore:
        """A fresh core with ``like``'s keys and credential, as the daemon builds one at start
        before it restores the state file (not registered: the caller decides)."""
        return AgentCore(
            like.device_id if device_id is None else device_id,
            self.key.public_key(),
            like._keys if keys is None else keys,
            credential=like._credential,
            membership=membership(),
            now=now,
        )

    def sign(
        self, body: Body, to: str, *, seq: int | None = None, time: int | None = None
    ) -> bytes:
        return encode_message(
            body,
            key=self.key,
            sender=SERVICE_ID,
            to=to,
            seq=next(self.seq) if seq is None else seq,
            time=self.now if time is None else time,
        )

    def command(self, device: str, body: Body) -> tuple[bytes, str]:
        return self.sign(body, device), f"kf/v1/dev/{device}/cmd"

    def deliver(self, device: str, body: Body) -> Outcome:
        """Sign and hand ``body`` to ``device``; a ``svc.welcome`` that carries no
        Authorizations gets every one this service kept for its group when its tree is inline
        (the joiner takes those its tree names; a larger tree's pages carry them)."""
        if (
            isinstance(body, WelcomeDelivery)
            and not body.admissions
            and inline_tree(self.public[body.group_id].tree)
        ):
            kept = self.authorizations.get(body.group_id, {})
            body = replace(body, admissions=tuple(kept.values()))
        payload, topic = self.command(device, body)
        return self.devices[device].handle(payload, topic, self.now)

    def open(self, device: str, publish: Publish) -> VerifiedMessage:
        core = self.devices[device]
        assert publish.topic == f"kf/v1/dev/{device}/report"
        devid = core._keys.devid  # the registry's DevID public key
        return open_message(
            publish.payload,
            lambda kid: Signer(device, devid.public_key()),
            now=self.now,
            recipients={SERVICE_ID},
        )

    def bodies(self, device: str, outcome: Outcome) -> list[Body]:
        return [self.open(device, p).body for p in outcome.publishes]

    # -- flows --------------------------------------------------------------------------------

    def authorize(self, op: str, members: list[tuple[str, bytes]]) -> bytes:
        """The operators' Authorization of a change (one approval: the devices here trust the
        test operator CA with ``min_approvals`` 1)."""
        return authorize(op, G, members, approvers=self.approvers, now=self.now)

    def create(self, device: str) -> None:
        devid = self.devices[device]._keys.devid.public_key()
        authz = self.authorize("group.create", [(device, serialize_public_key(devid))])
        self.create_authz = authz
        out = self.deliver(device, CommitRequest(cmd(), G, 0, CommitAction.CREATE, authz=authz))
        (created,) = self.bodies(device, out)
        assert isinstance(created, GroupCreated) and created.group_id == G
        self.public[G] = PublicGroup.from_state(codec.decode(created.public_group, 1 << 20, "pg"))
        assert created.authz is not None
        self.authorizations[G] = admissions_of([created.authz])

    def key_package(self, device: str) -> bytes:
        out = self.deliver(device, KeyPackageRequest(cmd()))
        (message,) = self.bodies(device, out)
        assert isinstance(message, KeyPackageMessage)
        return message.key_package

    def request_commit(self, committer: str, action: CommitAction, **kw: Any) -> list[Body]:
        epoch = self.public[G].epoch
        if "authz" not in kw and action is CommitAction.ADD:
            kp = KeyPackage.decode(kw["key_package"])
            kw["authz"] = self.authorize("group.add", [(kw["member"], kp.signature_key)])
        elif "authz" not in kw and action is CommitAction.REMOVE:
            tree = self.public[G].tree
            leaf = tree.leaf(tree.find_device(kw["member"].encode()))  # type: ignore[arg-type]
            assert leaf is not None
            kw["authz"] = self.authorize("group.remove", [(kw["member"], leaf.signature_key)])
        out = self.deliver(committer, CommitRequest(cmd(), G, epoch, action, **kw))
        assert out.changed and out.refused is None
        return self.bodies(committer, out)

    def order(self, commit: CommitMessage) -> bytes:
        """Check in public, advance the public view, and sign the relay for the group topic."""
        content = Commit.decode(commit.commit).content
        self.public[G] = self.public[G].apply(Commit.decode(commit.commit))
        if content.adds and content.authz is not None:
            self.authorizations.setdefault(G, {}).update(admissions_of([content.authz]))
        return self.sign(CommitMessage(G, commit.epoch, commit.commit, commit.command_id), G)

    def fan_out(self, relay: bytes, members: list[str]) -> dict[str, Outcome]:
        return {
            m: self.devices[m].handle(relay, f"kf/v1/grp/{G}/commit", self.now) for m in members
        }


def cmd() -> bytes:
    return os.urandom(16)


def acks(service: FakeService, outcomes: dict[str, Outcome]) -> dict[str, Ack]:
    out = {}
    for device, outcome in outcomes.items():
        assert outcome.refused is None, outcome.refused
        assert outcome.changed
        (body,) = service.bodies(device, outcome)
        assert isinstance(body, Ack)
        out[device] = body
    return out


def state_bytes(core: AgentCore) -> bytes:
    return cbor2.dumps(core.to_state(), canonical=True)


def group_of_two() -> tuple[FakeService, AgentCore, AgentCore]:
    service = FakeService()
    a, b = service.core("dev-a"), service.core("dev-b")
    service.create("dev-a")
    kp = service.key_package("dev-b")
    commit, welcome = service.request_commit(
        "dev-a", CommitAction.ADD, member="dev-b", key_package=kp
    )
    assert isinstance(commit, CommitMessage) and isinstance(welcome, WelcomeMessage)
    relay = service.order(commit)
    acks(service, service.fan_out(relay, ["dev-a"]))
    joined = service.deliver("dev-b", WelcomeDelivery(G, welcome.epoch, welcome.welcome))
    acks(service, {"dev-b": joined})
    return service, a, b


# -- the whole flow ---------------------------------------------------------------------------


def test_create_add_join_update_remove_between_cores() -> None:
    service = FakeService()
    a, b, c = service.core("dev-a"), service.core("dev-b"), service.core("dev-c")

    service.create("dev-a")
    assert a.epoch(G) == 0 and service.public[G].epoch == 0

    kp = service.key_package("dev-b")
    commit, welcome = service.request_commit(
        "dev-a", CommitAction.ADD, member="dev-b", key_package=kp
    )
    assert isinstance(commit, CommitMessage) and commit.epoch == 0
    assert isinstance(welcome, WelcomeMessage)
    assert welcome.epoch == 1 and welcome.new_members == ("dev-b",)
    assert commit.command_id is not None
    # the committer waits for the service's order before it moves
    assert a.epoch(G) == 0 and a.pending_commits(G) == 1

    relay = service.order(commit)
    ack_a = acks(service, service.fan_out(relay, ["dev-a"]))["dev-a"]
    assert ack_a.epoch == 1 and ack_a.command_id == commit.command_id
    assert a.epoch(G) == 1 and a.pending_commits(G) == 0

    out = service.deliver("dev-b", WelcomeDelivery(G, 1, welcome.welcome))
    ack_b = acks(service, {"dev-b": out})["dev-b"]
    assert ack_b.epoch == 1
    assert ack_a.epoch_authenticator == ack_b.epoch_authenticator
    assert a.groups()[G].epoch_authenticator == ack_a.epoch_authenticator

    # the data key agrees: what one member's app seals, the other's opens
    blob = a.encrypt(G, b"reading 42", service.now)
    assert b.decrypt(G, blob, service.now) == b"reading 42"

    # self-update by B with a new leaf key
    old_leaf = b.leaf_refs()
    (commit,) = service.request_commit("dev-b", CommitAction.UPDATE)
    assert isinstance(commit, CommitMessage)
    relay = service.order(commit)
    got = acks(service, service.fan_out(relay, ["dev-a", "dev-b"]))
    assert got["dev-a"].epoch == got["dev-b"].epoch == 2
    assert got["dev-a"].epoch_authenticator == got["dev-b"].epoch_authenticator
    assert b.leaf_refs().isdisjoint(old_leaf)  # the old leaf is retired
    (old_ref,) = old_leaf
    assert b.ledger.get(leaf_name(old_ref)).state is KeyState.DESTROYED

    # add C, then remove it again (committed by A)
    kp = service.key_package("dev-c")
    commit, welcome = service.request_commit(
        "dev-a", CommitAction.ADD, member="dev-c", key_package=kp
    )
    assert isinstance(commit, CommitMessage) and isinstance(welcome, WelcomeMessage)
    relay = service.order(commit)
    acks(service, service.fan_out(relay, ["dev-a", "dev-b"]))
    acks(service, {"dev-c": service.deliver("dev-c", WelcomeDelivery(G, 3, welcome.welcome))})
    assert a.status()["groups"][0]["members"] == ["dev-a", "dev-b", "dev-c"]
    assert a.status()["groups"][0]["member_count"] == 3
    with pytest.MonkeyPatch.context() as m:  # past the list's size, the count only
        m.setattr(agent_core, "STATUS_MEMBERS", 2)
        assert a.status()["groups"][0]["members"] is None
        assert a.status()["groups"][0]["member_count"] == 3

    (commit,) = service.request_commit("dev-a", CommitAction.REMOVE, member="dev-c")
    assert isinstance(commit, CommitMessage)
    relay = service.order(commit)
    got = acks(service, service.fan_out(relay, ["dev-a", "dev-b"]))
    assert got["dev-a"].epoch == got["dev-b"].epoch == 4
    assert got["dev-a"].epoch_authenticator == got["dev-b"].epoch_authenticator
    removed = c.handle(relay, f"kf/v1/grp/{G}/commit", service.now)
    assert removed.refused is None and removed.changed
    (report,) = service.bodies("dev-c", removed)
    assert isinstance(report, KeyStateReport)
    assert c.groups() == {}
    # C's epoch 3 key is deactivated (only decrypts in the grace period), never active again
    assert c.ledger.get(f"epoch/{G}/3").state is KeyState.DEACTIVATED
    blob = a.encrypt(G, b"after removal", service.now)
    with pytest.raises(ProtocolError) as err:
        c.decrypt(G, blob, service.now)
    assert err.value.check == "data.epoch-unknown"


def test_report_request_lists_keys_without_secrets() -> None:
    service, _, _ = group_of_two()
    out = service.deliver("dev-a", ReportRequest(cmd()))
    (report,) = service.bodies("dev-a", out)
    assert isinstance(report, KeyStateReport)
    names = {r.name for r in report.keys}
    assert f"epoch/{G}/1" in names and f"epoch/{G}/0" in names
    states = {r.name: r.state for r in report.keys}
    assert states[f"epoch/{G}/1"] is KeyState.ACTIVE
    assert states[f"epoch/{G}/0"] is KeyState.DEACTIVATED
    assert any(r.kind is KeyKind.LEAF and r.state is KeyState.ACTIVE for r in report.keys)


# -- refusals ---------------------------------------------------------------------------------


def refused_without_change(core: AgentCore, payload: bytes, topic: str, now: int) -> str:
    before = state_bytes(core)
    seq = core.next_seq
    out = core.handle(payload, topic, now)
    assert out.refused is not None
    assert not out.changed and out.publishes == []
    assert state_bytes(core) == before and core.next_seq == seq
    return out.refused.check


def test_forged_stale_future_misaddressed_and_reused_commands_are_refused() -> None:
    service, a, _ = group_of_two()
    topic = "kf/v1/dev/dev-a/cmd"
    body = CommitRequest(cmd(), G, 1, CommitAction.UPDATE)

    impostor = new_key()
    forged = encode_message(body, key=impostor, sender=SERVICE_ID, to="dev-a", seq=900, time=T0)
    assert refused_without_change(a, forged, topic, T0) == "cose.kid-unknown"

    good = bytearray(service.sign(body, "dev-a", seq=901))
    good[-5] ^= 0x01  # inside the signature
    assert refused_without_change(a, bytes(good), topic, T0) == "cose.signature"

    stale = service.sign(body, "dev-a", seq=902, time=T0 - a.max_age - 1)
    assert refused_without_change(a, stale, topic, T0) == "envelope.stale"
    future = service.sign(body, "dev-a", seq=903, time=T0 + 3600)
    assert refused_without_change(a, future, topic, T0) == "envelope.future"
    other = service.sign(body, "dev-b", seq=904)
    assert refused_without_change(a, other, topic, T0) == "envelope.recipient"

    # a device's own report signed as the service's is not trusted either
    mine = encode_message(body, key=a._keys.devid, sender=SERVICE_ID, to="dev-a", seq=905, time=T0)
    assert refused_without_change(a, mine, topic, T0) == "cose.kid-unknown"

    accepted = service.sign(ReportRequest(cmd()), "dev-a", seq=950)
    assert a.handle(accepted, topic, T0).refused is None
    reused = service.sign(ReportRequest(cmd()), "dev-a", seq=950)
    assert refused_without_change(a, reused, topic, T0) == "replay.seq-reused"
    # Reordered by more than 32 seq values (two service instances draw seqs from a counter that
    # follows the millisecond clock): still taken, as long as it is unseen and above the floor.
    late = service.sign(ReportRequest(cmd()), "dev-a", seq=950 - 40)
    assert a.handle(late, topic, T0).refused is None
    again = a.handle(late, topic, T0)  # a redelivery: answered again from the reply cache
    assert again.refused is not None and again.refused.check == "replay.duplicate"
    # The guard remembers 32 of the service's seqs; beyond them the floor rises, so a forgotten
    # seq (910) and an unseen one below it (909) are refused as old, never taken (again).
    for seq in range(951, 951 + 32):
        assert (
            a.handle(service.sign(ReportRequest(cmd()), "dev-a", seq=seq), topic, T0).refused
            is None
        )
    assert a._guard.remembered(SERVICE_ID) == 32
    for seq in (910, 909):
        too_old = service.sign(ReportRequest(cmd()), "dev-a", seq=seq)
        assert refused_without_change(a, too_old, topic, T0) == "replay.seq-old"
    assert a.rejections.suspicious == 9


def test_wrong_epoch_and_impossible_requests_are_refused() -> None:
    service, a, _ = group_of_two()
    topic = "kf/v1/dev/dev-a/cmd"
    for body, check in [
        (CommitRequest(cmd(), G, 3, CommitAction.UPDATE), "replay.epoch-future"),
        (CommitRequest(cmd(), G, 2, CommitAction.UPDATE), "mls.epoch-future"),
        (CommitRequest(cmd(), G, 0, CommitAction.UPDATE), "replay.epoch-old"),
        (CommitRequest(cmd(), "g2", 4, CommitAction.UPDATE), "agent.group-unknown"),
        (CommitRequest(cmd(), G, 1, CommitAction.REMOVE, member="dev-a"), "mls.remove.self"),
        (CommitRequest(cmd(), G, 1, CommitAction.REMOVE, member="dev-z"), "agent.member-unknown"),
        (CommitRequest(cmd(), G, 0, CommitAction.CREATE), "replay.epoch-old"),
        (WelcomeDelivery(G, 0, b"\xa0"), "replay.epoch-old"),
    ]:
        payload = service.sign(body, "dev-a")
        before = state_bytes(a)
        out = a.handle(payload, topic, T0)
        assert out.refused is not None and out.refused.check == check, (body, out.refused)
        if check in ("replay.epoch-future", "mls.epoch-future"):
            # a sign of a missed commit: one keys.report asks the service to catch us up
            assert [p.type for p in out.publishes] in (["keys.report"], [])
        elif body.TYPE == "svc.welcome":
            # an old welcome for a group we are in: re-acknowledge where we are
            assert [p.type for p in out.publishes] == ["group.ack"]
        else:
            assert out.publishes == [] and not out.changed and state_bytes(a) == before
    assert a.epoch(G) == 1


def test_key_package_for_another_member_is_refused() -> None:
    service, a, _ = group_of_two()
    service.core("dev-c")
    kp = service.key_package("dev-c")
    payload, topic = service.command(
        "dev-a", CommitRequest(cmd(), G, 1, CommitAction.ADD, member="dev-d", key_package=kp)
    )
    assert refused_without_change(a, payload, topic, T0) == "agent.key-package.member"


def test_forged_commit_on_the_group_topic_changes_nothing() -> None:
    service, a, _ = group_of_two()
    (commit,) = service.request_commit("dev-b", CommitAction.UPDATE)
    assert isinstance(commit, CommitMessage)
    parsed = Commit.decode(commit.commit)
    tag = bytes([parsed.confirmation_tag[0] ^ 0x40]) + parsed.confirmation_tag[1:]
    bad = Commit(parsed.content, parsed.signature, tag).encode()
    service.public[G].apply(Commit.decode(bad))  # only members can tell
    relay = service.sign(CommitMessage(G, 1, bad), G)
    # refused, the group unchanged, and reported to the service (wedge recovery)
    before, epoch = a.groups()[G].epoch_authenticator, a.epoch(G)
    out = a.handle(relay, f"kf/v1/grp/{G}/commit", T0)
    assert out.refused is not None and out.refused.check == "mls.confirmation-tag"
    assert a.groups()[G].epoch_authenticator == before and a.epoch(G) == epoch
    (report,) = service.bodies("dev-a", out)
    assert report == CommitRefused(G, 1, hashlib.sha256(bad).digest(), "mls.confirmation-tag")
    assert out.changed  # the report's seq is persisted before it is sent
    # messages for groups we are not in are dropped unread
    out = a.handle(relay, "kf/v1/grp/other/commit", T0)
    assert out.handled == "ignored" and not out.changed and out.refused is None


# -- redelivery and races ---------------------------------------------------------------------


def test_redelivered_messages_are_answered_again_byte_for_byte() -> None:
    service, a, b = group_of_two()
    request = service.sign(CommitRequest(cmd(), G, 1, CommitAction.UPDATE), "dev-b")
    first = b.handle(request, "kf/v1/dev/dev-b/cmd", T0)
    assert first.changed and [p.type for p in first.publishes] == ["group.commit"]
    before = state_bytes(b)
    again = b.handle(request, "kf/v1/dev/dev-b/cmd", T0 + 1)
    assert again.refused is not None and again.refused.check == "replay.duplicate"
    assert not again.changed and again.publishes == first.publishes
    assert state_bytes(b) == before and b.pending_commits(G) == 1

    (commit,) = service.bodies("dev-b", first)
    assert isinstance(commit, CommitMessage)
    relay = service.order(commit)
    applied = a.handle(relay, f"kf/v1/grp/{G}/commit", T0)
    redelivered = a.handle(relay, f"kf/v1/grp/{G}/commit", T0)
    assert redelivered.publishes == applied.publishes and not redelivered.changed
    assert a.rejections.count("replay.duplicate") == 1 and a.rejections.suspicious == 0

    # the service replays an applied commit (catch-up) in a new envelope: ack where we are
    replay = service.sign(CommitMessage(G, 1, commit.commit), G)
    out = a.handle(replay, f"kf/v1/grp/{G}/commit", T0)
    assert out.refused is not None and out.refused.check == "replay.epoch-old"
    (ack,) = service.bodies("dev-a", out)
    assert isinstance(ack, Ack) and ack.epoch == 2 == a.epoch(G)


def test_a_pending_commit_is_dropped_when_another_wins_the_epoch() -> None:
    service, a, b = group_of_two()
    (commit_a,) = service.request_commit("dev-a", CommitAction.UPDATE)
    (commit_b,) = service.request_commit("dev-b", CommitAction.UPDATE)
    assert isinstance(commit_a, CommitMessage) and isinstance(commit_b, CommitMessage)
    assert a.pending_commits(G) == 1 and b.pending_commits(G) == 1
    a_leaves_pending = a.leaf_refs()
    assert len(a_leaves_pending) == 2  # current leaf + the update's new one

    relay = service.order(commit_b)  # B's commit wins epoch 1
    with pytest.raises(ProtocolError) as err:
        service.public[G].apply(Commit.decode(commit_a.commit))
    assert err.value.check == "mls.epoch-stale"  # A's commit loses at the service

    got = acks(service, service.fan_out(relay, ["dev-a", "dev-b"]))
    assert got["dev-a"].epoch_authenticator == got["dev-b"].epoch_authenticator
    assert a.pending_commits(G) == 0 and b.pending_commits(G) == 0
    assert len(a.leaf_refs()) == 1  # the losing update's leaf is retired
    blob = b.encrypt(G, b"x", T0)
    assert a.decrypt(G, blob, T0) == b"x"


def test_create_is_idempotent_for_a_resent_request() -> None:
    service = FakeService()
    a = service.core("dev-a")
    service.create("dev-a")
    again = service.deliver("dev-a", CommitRequest(cmd(), G, 0, CommitAction.CREATE))
    (created,) = service.bodies("dev-a", again)
    assert isinstance(created, GroupCreated)
    assert PublicGroup.from_state(
        codec.decode(created.public_group, 1 << 20, "pg")
    ).tree_hash() == (service.public[G].tree_hash())
    assert a.epoch(G) == 0
    # without the request's Authorization it cannot name the one its leaf records: none
    assert created.authz is None
    # with it (the same request sent again), the creation Authorization as the first time
    again = service.deliver(
        "dev-a", CommitRequest(cmd(), G, 0, CommitAction.CREATE, authz=service.create_authz)
    )
    (created,) = service.bodies("dev-a", again)
    assert isinstance(created, GroupCreated) and created.authz is not None
    assert set(service.authorizations[G].values()) == {created.authz}


# -- persistence ------------------------------------------------------------------------------


def test_restore_resumes_exactly() -> None:
    service, a, _ = group_of_two()
    (commit,) = service.request_commit("dev-a", CommitAction.UPDATE)  # pending across restart
    assert isinstance(commit, CommitMessage)
    saved = cbor2.loads(cbor2.dumps(a.to_state(), canonical=True))
    resumed = service.restarted(a)
    resumed.restore(saved)
    service.devices["dev-a"] = resumed
    assert resumed.epoch(G) == 1 and resumed.pending_commits(G) == 1
    assert resumed.next_seq == a.next_seq
    assert state_bytes(resumed) == state_bytes(a)

    relay = service.order(commit)
    got = acks(service, service.fan_out(relay, ["dev-a", "dev-b"]))
    assert got["dev-a"].epoch_authenticator == got["dev-b"].epoch_authenticator
    # the envelope continues the sequence
    out = service.deliver("dev-a", ReportRequest(cmd()))
    assert service.open("dev-a", out.publishes[0]).seq == resumed.next_seq - 1


def test_state_written_with_the_old_window_of_32_is_widened_without_reopening_a_seq() -> None:
    service, a, _ = group_of_two()
    topic = "kf/v1/dev/dev-a/cmd"
    for seq in (5000, 5040):
        assert (
            a.handle(service.sign(ReportRequest(cmd()), "dev-a", seq=seq), topic, T0).refused
            is None
        )
    saved = cbor2.loads(cbor2.dumps(a.to_state(), canonical=True))
    old = ReplayGuard.from_cbor_map(saved["replay"]).resized(32)  # as an older agent saved it
    saved["replay"] = old.to_cbor_map()
    assert old.lowest_seq(SERVICE_ID) == 5040 - 31
    resumed = service.restarted(a)
    resumed.restore(saved)
    assert (resumed._guard.window, resumed._guard.capacity) == (1 << 32, 32)
    # 5000 was forgotten by the old window: it stays refused; above the old floor, unseen: taken
    for seq, check in ((5000, "replay.seq-old"), (5008, "replay.seq-old"), (5009, None)):
        out = resumed.handle(service.sign(ReportRequest(cmd()), "dev-a", seq=seq), topic, T0)
        assert (None if out.refused is None else out.refused.check) == check, seq


def test_restore_refuses_another_devices_state_and_missing_leaves() -> None:
    service, a, _ = group_of_two()
    saved = a.to_state()
    other = service.restarted(a, device_id="dev-x")
    with pytest.raises(StateError):
        other.restore(saved)
    no_leaves = service.restarted(a, keys=FakeSoftwareKeys())
    with pytest.raises(StateError):
        no_leaves.restore(saved)
    assert no_leaves.groups() == {}


# -- rotation and grace period ----------------------------------------------------------------


def test_rotation_asks_once_per_epoch_and_grace_period_destroys_old_keys() -> None:
    policy = RotationPolicy(max_epoch_age=1000, max_messages_per_epoch=3, grace_period=50)
    service = FakeService()
    a = service.core("dev-a", policy_for=lambda group: policy)
    service.create("dev-a")
    (report,) = service.bodies("dev-a", a.tick(T0 + 10))  # the new group's keys, reported
    assert isinstance(report, KeyStateReport)
    assert a.tick(T0 + 10).publishes == []
    for _ in range(3):
        a.encrypt(G, b"m", T0 + 10)
    assert a.dirty
    out = a.tick(T0 + 11)
    (request,) = service.bodies("dev-a", out)
    assert isinstance(request, UpdateRequest)
    assert (request.group_id, request.epoch, request.reason) == (G, 0, "max-messages-per-epoch")
    assert a.tick(T0 + 12).publishes == []  # asked already

    old_blob = a.encrypt(G, b"old", T0 + 12)
    (commit,) = service.request_commit("dev-a", CommitAction.UPDATE)
    assert isinstance(commit, CommitMessage)
    service.now = T0 + 20
    acks(service, service.fan_out(service.order(commit), ["dev-a"]))
    assert a.epoch(G) == 1
    assert a.decrypt(G, old_blob, T0 + 60) == b"old"  # within 50 s of deactivation at T0+20
    (report,) = service.bodies("dev-a", a.tick(T0 + 60))  # the new epoch's keys
    assert isinstance(report, KeyStateReport)
    a.mark_clean()  # the daemon persisted the message count
    assert a.tick(T0 + 69).changed is False
    out = a.tick(T0 + 70)
    assert out.changed
    assert a.ledger.get(f"epoch/{G}/0").state is KeyState.DESTROYED
    # the destruction is reported too, once its short delay has passed
    assert a.tick(T0 + 71).publishes == []
    (report,) = service.bodies("dev-a", a.tick(T0 + 72))
    assert isinstance(report, KeyStateReport)
    assert {r.name: r.state for r in report.keys}[f"epoch/{G}/0"] is KeyState.DESTROYED
    with pytest.raises(ProtocolError) as err:
        a.decrypt(G, old_blob, T0 + 70)
    assert err.value.check == "data.epoch-expired"
    assert 0 not in a.to_state()["data_keys"][G]

    service.now = T0 + 20 + 1000
    out = a.tick(service.now)
    (request,) = service.bodies("dev-a", out)
    assert isinstance(request, UpdateRequest) and request.reason == "max-epoch-age"


# -- key-state reports after epoch changes ------------------------------------------------------


def rekey(service: FakeService, committer: str, members: list[str]) -> dict[str, Outcome]:
    (commit,) = service.request_commit(committer, CommitAction.UPDATE)
    assert isinstance(commit, CommitMessage)
    return service.fan_out(service.order(commit), members)


def test_two_epoch_changes_in_quick_succession_give_one_report_after_the_acks() -> None:
    service, a, b = group_of_two()
    for core in (a, b):  # the create and the join are reported first
        core.tick(T0 + KEY_CHANGE_REPORT_DELAY)
    start = T0 + 100
    ack_seqs: dict[str, list[int]] = {"dev-a": [], "dev-b": []}
    for step in range(2):  # two rekeys one second apart
        service.now = start + step
        for device, outcome in rekey(service, "dev-b", ["dev-a", "dev-b"]).items():
            # the ack goes out at once, alone: the report never holds it back
            (ack,) = [service.open(device, p) for p in outcome.publishes]
            assert isinstance(ack.body, Ack)
            ack_seqs[device].append(ack.seq)
            assert service.devices[device].tick(service.now).publishes == []
    assert a.epoch(G) == b.epoch(G) == 3
    for device, core in (("dev-a", a), ("dev-b", b)):
        service.now = start + KEY_CHANGE_REPORT_DELAY
        out = core.tick(service.now)
        assert out.changed  # the report spends a sequence number: persisted before it is sent
        (message,) = [service.open(device, p) for p in out.publishes]
        assert isinstance(message.body, KeyStateReport)
        # sent after both acks, and carrying both epoch changes
        assert message.seq > max(ack_seqs[device])
        states = {r.name: r.state for r in message.body.keys}
        assert states[f"epoch/{G}/3"] is KeyState.ACTIVE
        assert states[f"epoch/{G}/2"] is KeyState.DEACTIVATED
        assert core.tick(service.now + 1).publishes == []  # nothing more to say
        assert core.tick(service.now + 60).publishes == []


def test_a_report_sent_meanwhile_cancels_the_delayed_one() -> None:
    service, a, _ = group_of_two()
    a.tick(T0 + KEY_CHANGE_REPORT_DELAY)
    service.now = T0 + 100
    rekey(service, "dev-a", ["dev-a", "dev-b"])
    assert a.report_due == service.now + KEY_CHANGE_REPORT_DELAY
    (report,) = service.bodies("dev-a", a.report(service.now + 1))  # e.g. after a reconnect
    assert isinstance(report, KeyStateReport)
    assert a.report_due is None
    assert a.tick(service.now + KEY_CHANGE_REPORT_DELAY).publishes == []


def test_status_has_no_secrets_and_names_groups_and_keys() -> None:
    service, a, _ = group_of_two()
    status = a.status()
    assert status["device_id"] == "dev-a"
    (group,) = status["groups"]
    assert group["group"] == G and group["epoch"] == 1 and group["members"] == ["dev-a", "dev-b"]
    assert group["last_ack"]["epoch"] == 1
    text = repr(status).encode()
    secrets = a.to_state()["groups"][G]["group"]["secrets"]
    for value in secrets.values():
        if value != a.groups()[G].epoch_authenticator:
            assert value.hex() not in repr(status) and value not in text
    assert cose.key_id(service.key.public_key()).hex() not in repr(status)


def test_an_assembled_group_installed_in_cores_follows_real_commits() -> None:
    service = FakeService()
    cores = [service.core(f"dev-{i}") for i in range(3)]
    members = []
    for core in cores:
        keys = core._keys
        assert isinstance(keys, FakeSoftwareKeys)
        leaf = keys.new_leaf_key()
        kp = KeyPackage.create(
            core.device_id.encode(),
            keys.devid,
            leaf.public_key(),
            core._credential,
            init_key=keys.new_leaf_key().public_key(),
        )
        members.append((kp, leaf, keys.devid))
    groups = Group.assemble(G.encode(), members, epoch=1)
    # refused, nothing changed: a leaf key the provider does not hold, a group held already
    stranger = service.core("dev-x")
    before = state_bytes(stranger)
    with pytest.raises(StateError):
        stranger.install_group(groups[0], T0)
    assert state_bytes(stranger) == before and not stranger.dirty
    for core, group in zip(cores, groups, strict=True):
        core.install_group(group, T0)
        assert core.dirty and core.epoch(G) == 1
        assert core.ledger.current_epoch(G).epoch == 1
    before = state_bytes(cores[0])
    with pytest.raises(StateError, match="already"):
        cores[0].install_group(groups[0], T0)
    assert state_bytes(cores[0]) == before
    service.public[G] = groups[0].public_group()
    (commit,) = service.request_commit("dev-2", CommitAction.UPDATE)
    assert isinstance(commit, CommitMessage)
    relay = service.order(commit)
    got = acks(service, service.fan_out(relay, [c.device_id for c in cores]))
    assert {a.epoch for a in got.values()} == {2}
    assert len({a.epoch_authenticator for a in got.values()}) == 1
    key = cores[0].encrypt(G, b"hello", T0)
    assert cores[1].decrypt(G, key, T0) == b"hello"


def test_key_state_reports_of_a_fleet_are_spread_by_device() -> None:
    """A rekey changes every member's keys at once: each device reports after its own fixed
    delay within [KEY_CHANGE_REPORT_DELAY, + KEY_CHANGE_REPORT_SPREAD], not all in one second."""
    service = FakeService()
    delays = []
    for i in range(200):
        core = service.core(f"dev-{i}", key_report_spread=KEY_CHANGE_REPORT_SPREAD)
        again = service.restarted(core, keys=FakeSoftwareKeys(), now=service.now)
        assert again._key_report_delay == core._key_report_delay  # fixed per device id
        delays.append(core._key_report_delay)
    low, high = KEY_CHANGE_REPORT_DELAY, KEY_CHANGE_REPORT_DELAY + KEY_CHANGE_REPORT_SPREAD
    assert all(low <= d <= high for d in delays)
    # spread over the window: no second holds more than a tenth of the fleet
    assert max(delays.count(d) for d in set(delays)) <= 20
    assert len(set(delays)) >= KEY_CHANGE_REPORT_SPREAD // 2
