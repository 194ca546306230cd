"""The revocation feed at the device cores (pure: software keys, the FakeService of
test_agent_core). Members that hold a revocation refuse the revoked identity even under a valid
quorum for its add; the feed head on the retained topic is refused when it goes back, forks, is
signed by another key or carries an entry no quorum approved; a removed operator's approval
does not count once the feed names the removal. Each attack names its adversary and checks the
check id and that nothing changed."""

from __future__ import annotations

import pytest

from agent.protocol import authz as az
from agent.protocol.feed import GENESIS, FeedEntry, entry_hash, page
from agent.protocol.hpke import serialize_public_key
from agent.protocol.mls.messages import KeyPackage
from agent.protocol.topics import FEED_RECIPIENT, REVOCATION_FEED_TOPIC
from agent.protocol.wire.envelope import encode_message
from agent.protocol.wire.messages.feed import RevocationFeed
from agent.protocol.wire.messages.group import CommitMessage, WelcomeMessage
from agent.protocol.wire.messages.key_state import KeyStateReport
from agent.protocol.wire.messages.service import CommitAction, CommitRequest, WelcomeDelivery
from tests.operator_certs import authorize, membership
from tests.pure.test_agent_core import (
    T0,
    FakeService,
    G,
    acks,
    cmd,
    new_key,
    refused_without_change,
    state_bytes,
)
from tests.pure.test_feed_operators import removal

pytestmark = pytest.mark.pure

QUORUM = ("op-alice", "op-bob")


def devid_point(service: FakeService, device: str) -> bytes:
    return serialize_public_key(service.devices[device]._keys.devid.public_key())


def entries_revoking(
    *targets: tuple[str, bytes], approvers: tuple[str, ...] = QUORUM, start: int = 0
) -> list[bytes]:
    seq, head, out = start, GENESIS, []
    for device, point in targets:
        authz = authorize("device.revoke", None, [(device, point)], approvers=approvers, now=T0)
        entry = FeedEntry.after(seq, head, time=T0, authz=authz).encode()
        out.append(entry)
        seq, head = seq + 1, entry_hash(entry)
    return out


def retained(service: FakeService, body: RevocationFeed, *, key: object = None) -> bytes:
    """The head as the service publishes it on the retained topic."""
    return encode_message(
        body,
        key=service.key if key is None else key,  # type: ignore[arg-type]
        sender="keyfleet-service",
        to=FEED_RECIPIENT,
        seq=next(service.seq),
        time=service.now,
    )


def two_members_and_a_candidate(k: int = 2) -> tuple[FakeService, list[str]]:
    service = FakeService()
    service.approvers = QUORUM
    for name in ("dev-a", "dev-b", "dev-c"):
        service.core(name, membership=membership(min_approvals=k))
    service.create("dev-a")
    kp = service.key_package("dev-b")
    commit, welcome = service.request_commit(
        "dev-a", CommitAction.ADD, member="dev-b", key_package=kp
    )
    assert isinstance(commit, CommitMessage) and isinstance(welcome, WelcomeMessage)
    acks(service, service.fan_out(service.order(commit), ["dev-a"]))
    acks(service, {"dev-b": service.deliver("dev-b", WelcomeDelivery(G, 1, welcome.welcome))})
    return service, ["dev-a", "dev-b", "dev-c"]


def test_members_learn_a_revocation_and_refuse_the_revoked_devices_key_package() -> None:
    """Revoked device (or a service that still relays its KeyPackage): a member that holds the
    revocation refuses the add with cred.revoked even under a valid quorum for it."""
    service, _ = two_members_and_a_candidate()
    a = service.devices["dev-a"]
    head = page(entries_revoking(("dev-c", devid_point(service, "dev-c"))), time=T0)
    out = a.handle(retained(service, head), REVOCATION_FEED_TOPIC, service.now)
    assert out.refused is None and out.changed and out.handled == "revocation.feed"
    assert a.membership.revocations.seq == 1
    assert a.status()["revocation_feed"] == {
        "seq": 1,
        "time": T0,
        "revoked": 1,
        "removed_operators": [],
    }
    # the next keys.report tells the service how far this device's feed is
    (report,) = service.bodies("dev-a", a.report(service.now))
    assert isinstance(report, KeyStateReport) and report.feed == 1

    kp = service.key_package("dev-c")
    authz = authorize(
        "group.add",
        G,
        [("dev-c", KeyPackage.decode(kp).signature_key)],
        approvers=QUORUM,
        now=T0,
    )
    body = CommitRequest(
        cmd(), G, a.epoch(G) or 0, CommitAction.ADD, member="dev-c", key_package=kp, authz=authz
    )
    payload, topic = service.command("dev-a", body)
    assert refused_without_change(a, payload, topic, service.now) == "cred.revoked"
    assert a.rejections.count("cred.revoked") == 1


def test_a_commit_from_a_revoked_member_is_refused() -> None:
    """Revoked device still in a group (its removal not committed yet): its self-update is
    refused by a member that holds the revocation."""
    service, _ = two_members_and_a_candidate()
    a = service.devices["dev-a"]
    (commit,) = service.request_commit("dev-b", CommitAction.UPDATE)
    assert isinstance(commit, CommitMessage)
    head = page(entries_revoking(("dev-b", devid_point(service, "dev-b"))), time=T0)
    a.handle(retained(service, head), REVOCATION_FEED_TOPIC, service.now)
    relay = service.sign(CommitMessage(G, commit.epoch, commit.commit, commit.command_id), G)
    check = refused_without_change(a, relay, f"kf/v1/grp/{G}/commit", service.now)
    assert check == "cred.revoked"


def test_feed_heads_the_device_must_refuse() -> None:
    """Broker tap replaying an older head; anyone publishing a head signed by another key; a
    rogue service with the real service key forging a revocation one operator approved (the
    policy needs two) or re-writing the history the device holds. Each is refused by check id
    and changes nothing (state bytes, sequence number)."""
    service, _ = two_members_and_a_candidate()
    a = service.devices["dev-a"]
    points = [(f"dev-x{i}", serialize_public_key(new_key().public_key())) for i in range(3)]
    entries = entries_revoking(*points)
    older = retained(service, page(entries[:1], time=T0))
    assert a.handle(older, REVOCATION_FEED_TOPIC, T0).changed
    assert a.handle(retained(service, page(entries, time=T0)), REVOCATION_FEED_TOPIC, T0).changed
    before = state_bytes(a)

    # broker tap: the older, validly signed head again
    assert refused_without_change(a, older, REVOCATION_FEED_TOPIC, T0) == "revocation.rollback"
    # another key
    forged = retained(service, page(entries, time=T0), key=new_key())
    assert refused_without_change(a, forged, REVOCATION_FEED_TOPIC, T0) == "revocation.signature"
    # rogue service: entry 4 approved by one operator only
    lone = FeedEntry.after(
        3,
        entry_hash(entries[-1]),
        time=T0,
        authz=authorize("device.revoke", None, [points[0]], approvers=("op-alice",), now=T0),
    ).encode()
    payload = retained(service, page([*entries, lone], time=T0))
    assert refused_without_change(a, payload, REVOCATION_FEED_TOPIC, T0) == "revocation.authz"
    # rogue service: another history at the number we hold
    other = entries_revoking(*points[1:], *points[:1])
    payload = retained(service, page(other, time=T0))
    assert refused_without_change(a, payload, REVOCATION_FEED_TOPIC, T0) == "revocation.fork"
    # something else than a feed head on the feed topic
    payload = service.sign(RevocationFeed(3, entry_hash(entries[-1]), T0), "dev-a")
    assert refused_without_change(a, payload, REVOCATION_FEED_TOPIC, T0) == "revocation.malformed"
    assert state_bytes(a) == before
    # the head we hold, redelivered (a reconnect): no refusal, no change
    same = a.handle(retained(service, page(entries, time=T0)), REVOCATION_FEED_TOPIC, T0)
    assert same.refused is None and not same.changed
    for check in ("revocation.rollback", "revocation.signature", "revocation.authz"):
        assert dict(a.rejections.snapshot()).get(check) == 1


def test_a_device_far_behind_asks_for_the_entries_and_takes_them_on_its_command_topic() -> None:
    """A device that was offline while many revocations happened: the retained head carries
    only the newest entries (a gap), so it sends a keys.report with its feed seq; the service's
    pages on its command topic bring it up to the head, through the replay guard as usual."""
    service, _ = two_members_and_a_candidate()
    b = service.devices["dev-b"]
    points = [(f"dev-y{i}", serialize_public_key(new_key().public_key())) for i in range(5)]
    entries = entries_revoking(*points)
    out = b.handle(retained(service, page(entries[3:], time=T0)), REVOCATION_FEED_TOPIC, T0 + 60)
    assert out.refused is not None and out.refused.check == "revocation.gap"
    (report,) = service.bodies("dev-b", out)
    assert isinstance(report, KeyStateReport) and report.feed == 0
    out = service.deliver("dev-b", page(entries[:3], time=T0))
    assert out.refused is None and out.changed
    out = b.handle(retained(service, page(entries[3:], time=T0)), REVOCATION_FEED_TOPIC, T0 + 61)
    assert out.refused is None and b.membership.revocations.seq == 5


def test_the_kept_feed_survives_a_restart_and_an_old_state_starts_empty() -> None:
    service, _ = two_members_and_a_candidate()
    a = service.devices["dev-a"]
    entries = entries_revoking(("dev-c", devid_point(service, "dev-c")))
    a.handle(retained(service, page(entries, time=T0)), REVOCATION_FEED_TOPIC, T0)
    state = a.to_state()
    again = service.restarted(a)
    again.restore(state)
    assert again.membership.revocations == a.membership.revocations
    assert again.membership.revocations.is_revoked(
        "dev-c", az.member_key(devid_point(service, "dev-c"))
    )
    # a state file written before the feed existed
    legacy = dict(state)
    legacy["membership"] = {k: v for k, v in state["membership"].items() if k != "revocations"}
    fresh = service.restarted(a)
    fresh.restore(legacy)
    assert fresh.membership.revocations.seq == 0


def test_a_removed_operators_approval_no_longer_admits_a_member_at_the_device() -> None:
    """Removed operator (with a service that still relays its approvals): once a member holds
    the feed entry of the operator's removal (admins' quorum), a change that operator approved
    after it is refused with operator.removed and nothing changes; the same change approved by
    operators still in office is committed."""
    service, _ = two_members_and_a_candidate()
    a = service.devices["dev-a"]
    removed_at = service.now
    entry = FeedEntry.after(0, GENESIS, time=removed_at, authz=removal("op-bob", nbf=T0 - 60))
    head = page([entry.encode()], time=removed_at)
    assert a.handle(retained(service, head), REVOCATION_FEED_TOPIC, service.now).changed
    assert a.status()["revocation_feed"]["removed_operators"] == ["op-bob"]  # type: ignore[index]
    kp = service.key_package("dev-c")
    member = [("dev-c", KeyPackage.decode(kp).signature_key)]

    def add(*approvers: str) -> tuple[bytes, str]:
        authz = authorize("group.add", G, member, approvers=approvers, now=removed_at + 60)
        body = CommitRequest(
            cmd(), G, a.epoch(G) or 0, CommitAction.ADD, member="dev-c", key_package=kp, authz=authz
        )
        return service.command("dev-a", body)

    payload, topic = add("op-alice", "op-bob")
    assert refused_without_change(a, payload, topic, service.now) == "operator.removed"
    assert a.rejections.count("operator.removed") == 1
    payload, topic = add("op-alice", "op-carol")
    out = a.handle(payload, topic, service.now)
    assert out.refused is None and out.changed
