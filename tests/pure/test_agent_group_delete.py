"""Deleting a group at the device cores (pure: software keys, the FakeService of
test_agent_core): a ``group.delete`` entry of the revocation feed, approved by a quorum of
operators, makes every member destroy the group's epoch secrets, leaf key and data keys (the
key ledger shows them destroyed, the local API refuses the group with ``data.group-deleted``),
and nothing brings the group back (a Welcome or a create for it: ``agent.group-deleted``, also
after a restart). A service alone cannot make a device delete a group: an entry short of the
quorum, or another op's Authorization, is refused with nothing changed."""

from __future__ import annotations

import pytest

from agent.protocol.errors import ProtocolError
from agent.protocol.feed import GENESIS, FeedEntry, entry_hash, page
from agent.protocol.lifecycle import KeyKind, KeyState
from agent.protocol.topics import REVOCATION_FEED_TOPIC
from agent.protocol.wire.messages.group import CommitMessage
from agent.protocol.wire.messages.key_state import KeyStateReport
from agent.protocol.wire.messages.service import CommitAction, CommitRequest, WelcomeDelivery
from tests.operator_certs import authorize
from tests.pure.test_agent_core import (
    T0,
    FakeService,
    G,
    acks,
    cmd,
    refused_without_change,
)
from tests.pure.test_attacks_feed import QUORUM, devid_point, retained, two_members_and_a_candidate

pytestmark = pytest.mark.pure

ADMINS = ("op-root", "op-dora")  # a group's deletion is approved by admins


def deletion(
    group: str = G, approvers: tuple[str, ...] = ADMINS, op: str = "group.delete"
) -> bytes:
    """The feed's first entry: the operators' Authorization of ``op`` on ``group``."""
    authz = authorize(op, group, [], approvers=approvers, now=T0)
    return FeedEntry.after(0, GENESIS, time=T0, authz=authz).encode()


def feed_payload(service: FakeService, entry: bytes) -> bytes:
    return retained(service, page([entry], time=T0))


def test_every_member_destroys_a_deleted_groups_keys_and_nothing_brings_it_back() -> None:
    service, _ = two_members_and_a_candidate()
    a, b = service.devices["dev-a"], service.devices["dev-b"]
    blob = a.encrypt(G, b"sealed before the deletion", service.now)
    assert b.decrypt(G, blob, service.now) == b"sealed before the deletion"
    leaves = {name: core.leaf_refs() for name, core in (("dev-a", a), ("dev-b", b))}
    payload = feed_payload(service, deletion())

    for name, core in (("dev-a", a), ("dev-b", b)):
        out = core.handle(payload, REVOCATION_FEED_TOPIC, service.now)
        assert out.refused is None and out.changed and out.epochs_changed
        assert core.groups() == {} and core.epoch(G) is None
        assert core.membership.revocations.is_deleted(G)
        assert G not in core._data_keys
        records = [r for r in core.ledger if r.group == G]
        assert records and all(r.state is KeyState.DESTROYED for r in records)
        assert {r.kind for r in records} == {KeyKind.EPOCH}
        # the leaf key it held in the group is destroyed too (its blob is shredded once saved)
        assert leaves[name] and core.leaf_refs().isdisjoint(leaves[name])
        leaf_records = [r for r in core.ledger if r.kind is KeyKind.LEAF]
        assert all(r.state is KeyState.DESTROYED for r in leaf_records)
        # the local API refuses the group's data keys
        for use in (
            lambda c=core: c.encrypt(G, b"x", service.now),
            lambda c=core: c.decrypt(G, blob, service.now),
        ):
            with pytest.raises(ProtocolError) as err:
                use()
            assert err.value.check == "data.group-deleted"
        # the service learns it: the report names the destroyed keys and the feed it follows
        (report,) = service.bodies(name, core.report(service.now))
        assert isinstance(report, KeyStateReport) and report.feed == 1
        reported = {r.name: r.state for r in report.keys if r.group == G}
        assert reported and set(reported.values()) == {KeyState.DESTROYED}

    # a create for the deleted id (even under a valid quorum) is refused
    founder = devid_point(service, "dev-a")
    create = authorize("group.create", G, [("dev-a", founder)], approvers=QUORUM, now=T0)
    payload, topic = service.command(
        "dev-a", CommitRequest(cmd(), G, 0, CommitAction.CREATE, authz=create)
    )
    assert refused_without_change(a, payload, topic, service.now) == "agent.group-deleted"

    # and after a restart, a Welcome to the deleted id is refused
    restarted = service.restarted(b)
    restarted.restore(b.to_state())
    service.devices["dev-b"] = restarted
    assert restarted.membership.revocations.is_deleted(G)
    payload, topic = service.command("dev-b", WelcomeDelivery(G, 1, b"\x00" * 64))
    assert refused_without_change(restarted, payload, topic, service.now) == "agent.group-deleted"


def test_a_removed_member_destroys_the_keys_it_still_held_for_its_grace_period() -> None:
    service, _ = two_members_and_a_candidate()
    b = service.devices["dev-b"]
    (commit,) = service.request_commit("dev-a", CommitAction.REMOVE, member="dev-b")
    assert isinstance(commit, CommitMessage)
    relay = service.order(commit)
    acks(service, service.fan_out(relay, ["dev-a"]))
    b.handle(relay, f"kf/v1/grp/{G}/commit", service.now)
    assert b.groups() == {}
    assert b.ledger.get(f"epoch/{G}/1").state is KeyState.DEACTIVATED  # in its grace period

    out = b.handle(feed_payload(service, deletion()), REVOCATION_FEED_TOPIC, service.now)
    assert out.refused is None and out.changed
    assert b.ledger.get(f"epoch/{G}/1").state is KeyState.DESTROYED
    assert G not in b._data_keys


@pytest.mark.parametrize(
    "forged",
    ["one approval", "operators, not admins", "group.remove", "group.create"],
)
def test_a_service_alone_cannot_make_devices_delete_a_group(forged: str) -> None:
    """Rogue service (it signs feed heads and holds past Authorizations, but no operator's
    key): a feed entry that is not an admin quorum's group.delete of the group (one admin's
    approval where the quorum is 2; a quorum of operators who are not admins; a quorum's
    removal or creation in that group) is refused with revocation.authz, nothing changed."""
    service, _ = two_members_and_a_candidate()
    a = service.devices["dev-a"]
    if forged == "one approval":
        entry = deletion(approvers=("op-root",))
    elif forged == "operators, not admins":
        entry = deletion(approvers=QUORUM)
    else:
        member = [("dev-b", devid_point(service, "dev-b"))]
        authz = authorize(forged, G, member, approvers=QUORUM, now=T0)
        entry = FeedEntry.after(0, GENESIS, time=T0, authz=authz).encode()
    payload = feed_payload(service, entry)
    check = refused_without_change(a, payload, REVOCATION_FEED_TOPIC, service.now)
    assert check == "revocation.authz"
    assert a.epoch(G) == 1 and not a.membership.revocations.is_deleted(G)
    assert a.encrypt(G, b"still usable", service.now)


def test_a_deletion_of_another_group_leaves_this_one_alone() -> None:
    service, _ = two_members_and_a_candidate()
    a = service.devices["dev-a"]
    entry = deletion(group="g-other")
    out = a.handle(feed_payload(service, entry), REVOCATION_FEED_TOPIC, service.now)
    assert out.refused is None and out.changed and not out.epochs_changed
    assert a.membership.revocations.is_deleted("g-other") and a.epoch(G) == 1
    assert a.membership.revocations.head == entry_hash(entry)
