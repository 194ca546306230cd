"""Deleting a group, service side (provisioning/service/groupdelete.py): only a quorum of admins
deletes a group; the deletion becomes a revocation feed entry that verifies as devices verify
it; the group is marked deleted and everything about it is refused from then on
(``ds.group.deleted``) with nothing changed; the operation counts the members whose feed
reports reach the deletion, and names the stragglers at its timeout.

The fleet is test_service_requests': a real SQLite file, software MLS members, operators with
certificates from a real operator CA, ``min_approvals = 2``. The device side (members destroying
the keys, a rogue service's entry refused) is tests/pure/test_agent_group_delete.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from sqlalchemy import text

from agent.protocol import authz
from agent.protocol import feed as revocation_feed
from agent.protocol.errors import ProtocolError
from agent.protocol.feed import FeedEntry, FeedState
from agent.protocol.wire.messages.group import UpdateRequest, WelcomeMessage
from agent.protocol.wire.messages.key_state import KeyStateReport
from agent.protocol.wire.messages.operator import Propose, Rekey
from agent.protocol.wire.messages.result import RequestState, ResultStatus
from agent.protocol.wire.messages.service import CommitAction, CommitRequest
from provisioning import audit
from provisioning.dashboard import queries
from provisioning.dashboard.app import make_environment
from provisioning.listings import list_groups
from provisioning.registry import Registry, Role
from provisioning.service import feed, groupdelete
from provisioning.service.store import rekey as rekey_rows
from tests.pure.test_service_core import Fleet, make_fleet
from tests.pure.test_service_requests import (
    TTL,
    add_operator,
    approve,
    create_by_quorum,
    propose,
    refusal,
)
from tests.service_members import command_id

pytestmark = pytest.mark.pure

MEMBERS = ("dev-1", "dev-2", "dev-3")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    for made in make_fleet(
        tmp_path, ("dev-1", "dev-2", "dev-3", "dev-4"), min_approvals=2, request_ttl=TTL
    ):
        made.record = True
        add_operator(made, "op-bob", "admin")
        create_by_quorum(made, "g1", *MEMBERS)
        yield made


def snapshot(fleet: Fleet) -> tuple[object, ...]:
    """What a refused change must leave as it was: groups, members, commits, feed, jobs."""
    with fleet.sessions() as s:
        return tuple(
            tuple(s.execute(text(query)).all())
            for query in (
                "SELECT group_id, epoch, public_tree, deleted_at, deleted_seq FROM groups",
                "SELECT group_id, device_id, leaf_index, pending FROM group_members",
                "SELECT group_id, device_id FROM group_deleted_members",
                "SELECT COUNT(*) FROM commit_log",
                "SELECT seq, hash FROM service_revocation_feed",
                "SELECT id, state FROM service_jobs",
            )
        )


def delete_by_quorum(fleet: Fleet, group: str = "g1") -> bytes:
    """op-admin proposes and approves, op-bob approves: the command id of the deletion."""
    info = propose(fleet, "op-admin", "group.delete", group=group)
    approve(fleet, "op-admin", info.request)
    cid, done = approve(fleet, "op-bob", info.request)
    assert done is not None and done.state is RequestState.EXECUTED, done
    return cid


def feed_report(fleet: Fleet, device: str, seq: int) -> None:
    fleet.send(fleet.devices[device].report(KeyStateReport(keys=(), feed=seq), fleet.now))


def device_check(fleet: Fleet) -> revocation_feed.AuthzCheck:
    """What a device of this fleet checks each feed entry with (``Membership.follow_feed``)."""
    verifier = authz.AuthzVerifier([fleet.service._env.operator_ca])

    def check(
        signed: bytes, op: str, group: str | None, removed: Mapping[bytes, int]
    ) -> authz.VerifiedAuthorization:
        return verifier.verify(
            signed,
            policy=authz.QuorumPolicy.initial(2),
            now=None,
            op=op,
            group=group,
            removed=removed,
        )

    return check


# -- the quorum ---------------------------------------------------------------------------------


def test_one_admin_cannot_delete_a_group_and_an_operator_cannot_take_part(fleet: Fleet) -> None:
    before = snapshot(fleet)
    # an operator (not an admin) can neither propose nor approve a deletion
    body = Propose(command_id(), "group.delete", (), "g1")
    fleet.send(fleet.operators["op-alice"].command(body, fleet.now))
    assert "[op.role]" in refusal(fleet, body.command_id)

    info = propose(fleet, "op-admin", "group.delete", group="g1")
    assert info.required == 2
    first, pending = approve(fleet, "op-admin", info.request)
    assert pending is not None and pending.state is RequestState.PENDING
    assert first not in fleet.results  # no operation started
    refused, answer = approve(fleet, "op-alice", info.request)
    assert answer is None and "[op.role]" in refusal(fleet, refused)
    # nothing deleted: no feed entry, the group and its members as they were, still usable
    assert snapshot(fleet) == before
    with fleet.sessions() as s:
        assert feed.newest(s)[0] == 0
    cid = fleet.command("op-alice", Rekey(command_id(), "g1"))
    assert fleet.final(cid).status is ResultStatus.DONE


def test_a_quorum_deletes_the_group_through_a_feed_entry_devices_verify(fleet: Fleet) -> None:
    epoch = fleet.epoch("g1")
    cid = delete_by_quorum(fleet)
    with fleet.sessions() as s:
        group = Registry(s).group("g1")
        assert group.deleted_at == fleet.now and group.deleted_seq == 1
        assert group.epoch == epoch  # nothing committed: the members learn it from the feed
        assert Registry(s).members("g1") == []
        # the rekey policy's check never reads the group's records again (no due times)
        records = [(r.due_at, r.due_epoch) for r in rekey_rows.leaf_rows(s, "g1")]
        assert len(records) == 3 and set(records) == {(None, None)}
        head = feed.head(s, now=fleet.now)
    assert head is not None and head.seq == 1
    # the entry is the quorum's Authorization, and a device of this fleet takes it
    (entry,) = head.entries
    signed = FeedEntry.decode(entry).authz
    request = authz.Request.decode(authz.Authorization.decode(signed).request)
    assert (request.op, request.group, request.members) == ("group.delete", "g1", ())
    state = revocation_feed.advance(FeedState(), head, device_check(fleet))
    assert state.is_deleted("g1") and state.seq == 1
    # the operator was told: accepted, then 0 of 3 members done
    statuses = [(r.status, r.detail) for r in fleet.results[cid]]
    assert statuses[0][0] is ResultStatus.ACCEPTED and "feed entry 1" in statuses[0][1]
    assert statuses[-1] == (
        ResultStatus.IN_PROGRESS,
        "0/3 members destroyed the group's keys (feed entry 1)",
    )
    actions = [(e.action, e.target) for e in fleet.audit_entries()[-4:]]
    assert ("op.group_delete", "g1") in actions and ("request.execute", actions[-1][1]) in actions
    # the group is no longer among the active ones
    with fleet.sessions() as s:
        assert "g1" not in [row["group_id"] for row in list_groups(s)]
        listed = queries.group_list(s, page=1, per_page=50)
        assert listed.rows == [] and listed.total == 0
        assert audit.verify_chain(s).ok


def test_progress_counts_the_members_feed_reports_then_done(fleet: Fleet) -> None:
    cid = delete_by_quorum(fleet)
    feed_report(fleet, "dev-1", 1)
    feed_report(fleet, "dev-4", 1)  # not a member: no progress of its own
    feed_report(fleet, "dev-2", 0)  # behind: not done (it gets the entry it lacks)
    last = fleet.results[cid][-1]
    assert last.status is ResultStatus.IN_PROGRESS
    assert last.detail == "1/3 members destroyed the group's keys (feed entry 1)"
    assert (last.acked, last.pending, last.stragglers) == (1, 2, ("dev-2", "dev-3"))
    feed_report(fleet, "dev-2", 1)
    feed_report(fleet, "dev-3", 1)
    final = fleet.final(cid)
    assert final.status is ResultStatus.DONE
    assert final.detail == "every member (3) destroyed the group's keys (feed entry 1)"
    assert (final.acked, final.pending) == (len(MEMBERS), 0)


def test_a_silent_member_is_named_at_the_timeout(fleet: Fleet) -> None:
    cid = delete_by_quorum(fleet)
    feed_report(fleet, "dev-1", 1)
    feed_report(fleet, "dev-2", 1)
    fleet.tick(fleet.service._env.settings.ack_timeout + 1)
    final = fleet.final(cid)
    assert final.status is ResultStatus.TIMEOUT
    assert final.stragglers == ("dev-3",) and final.acked == 2
    assert "no feed report past the deletion from dev-3" in final.detail


def test_the_groups_pending_work_ends_failed_with_the_deletion(fleet: Fleet) -> None:
    for device in fleet.devices.values():
        device.ignore_commit_requests = True  # the rekey's commit request stays unanswered
    rekey = fleet.command("op-alice", Rekey(command_id(), "g1"))
    assert fleet.results[rekey][-1].status is ResultStatus.IN_PROGRESS
    delete_by_quorum(fleet)
    final = fleet.final(rekey)
    assert final.status is ResultStatus.FAILED and "[ds.group.deleted]" in final.detail
    with fleet.sessions() as s:
        assert s.execute(text("SELECT state FROM service_jobs WHERE group_id = 'g1'")).all()
        assert fleet.service.queue_length("g1") == 0


def test_after_the_deletion_every_change_of_the_group_is_refused(fleet: Fleet) -> None:
    """Attack: commits, Welcomes, rotation requests, adds, removals, rekeys, a new creation
    under the deleted id or a second deletion: each refused with ds.group.deleted, nothing
    changed."""
    member = fleet.devices["dev-1"]
    group = member.groups["g1"]  # the member's copy, as a member that missed the feed holds it
    delete_by_quorum(fleet)
    before = snapshot(fleet)

    def refused_report(outgoing: tuple[str, bytes]) -> None:
        count = fleet.service.rejections.count("ds.group.deleted")
        fleet.send(outgoing)
        assert fleet.service.rejections.count("ds.group.deleted") == count + 1
        last = fleet.audit_entries()[-1]
        assert last.outcome.value == "refused" and "ds.group.deleted" in last.reason

    commit, *_ = member._commit(
        CommitRequest(command_id(), "g1", group.epoch, CommitAction.UPDATE), fleet.now
    )
    refused_report(commit)
    welcome = WelcomeMessage("g1", group.epoch + 1, b"\x00" * 32, ("dev-4",))
    refused_report(member.report(welcome, fleet.now))
    refused_report(member.report(UpdateRequest("g1", group.epoch, "max-epoch-age"), fleet.now))

    rekey = fleet.command("op-alice", Rekey(command_id(), "g1"))
    assert "[ds.group.deleted]" in refusal(fleet, rekey)
    for op, members, who in (
        ("group.add", ("dev-4",), "op-alice"),
        ("group.remove", ("dev-2",), "op-alice"),
        ("group.create", ("dev-4",), "op-alice"),
        ("group.delete", (), "op-admin"),
    ):
        body = Propose(command_id(), op, members, "g1")
        fleet.send(fleet.operators[who].command(body, fleet.now))
        assert "[ds.group.deleted]" in refusal(fleet, body.command_id), op
    assert snapshot(fleet) == before


def test_a_request_approved_before_the_group_was_deleted_is_refused_at_its_quorum(
    fleet: Fleet,
) -> None:
    add = propose(fleet, "op-alice", "group.add", "dev-4", group="g1")
    approve(fleet, "op-alice", add.request)
    delete_by_quorum(fleet)
    before = snapshot(fleet)
    _, done = approve(fleet, "op-admin", add.request)
    assert done is not None and done.state is RequestState.REFUSED
    assert "[ds.group.deleted]" in done.detail
    assert snapshot(fleet) == before


def test_check_live_names_the_feed_entry(fleet: Fleet) -> None:
    delete_by_quorum(fleet)
    with fleet.sessions() as s:
        with pytest.raises(ProtocolError) as err:
            groupdelete.check_live(s, "g1")
        assert err.value.check == "ds.group.deleted" and "entry 1" in err.value.reason
        groupdelete.check_live(s, "g-unknown")  # not deleted (unknown is another check)


# -- the dashboard ------------------------------------------------------------------------------


def render_group(fleet: Fleet, group: str) -> tuple[queries.GroupDetail, str]:
    """The dashboard's group page as its template renders it (autoescaping on)."""
    with fleet.sessions() as s:
        detail = queries.group_detail(s, group, member_page=1, per_page=50)
    assert detail is not None
    html = (
        make_environment()
        .get_template("group.html")
        .render(
            viewer=queries.Viewer("op-view", Role.VIEWER),
            now=fleet.now,
            ago=str,
            link=lambda path, **_: path,
            path=f"/groups/{group}",
            group=detail,
        )
    )
    return detail, html


def test_a_deleted_groups_page_says_when_and_by_whom_and_keeps_its_history(
    fleet: Fleet,
) -> None:
    """The dashboard's page of a deleted group opens (its history stays readable, as in the
    audit log) and says it was deleted: when, proposed and approved by whom, the feed entry,
    and how many of its members destroyed the keys; it follows no live acks any more."""
    _, live = render_group(fleet, "g1")
    assert 'id="live"' in live and 'id="deleted"' not in live
    with fleet.sessions() as s:
        assert queries.ack_progress(s, "g1") is not None
    commits_before = len(render_group(fleet, "g1")[0].commits)
    delete_by_quorum(fleet)
    feed_report(fleet, "dev-1", 1)
    detail, html = render_group(fleet, "g1")
    deletion = detail.deletion
    assert deletion is not None
    (entry,) = [e for e in fleet.audit_entries() if e.action == "op.group_delete"]
    with fleet.sessions() as s:
        request_id = (
            s.execute(text("SELECT request_id FROM service_quorum_requests")).scalars().all()
        )
    assert deletion.request_id in request_id
    assert (deletion.deleted_at, deletion.feed_seq, deletion.audit_seq) == (
        fleet.now,
        1,
        entry.seq,
    )
    assert (deletion.proposer, deletion.approvers) == ("op-admin", ["op-admin", "op-bob"])
    assert (deletion.members, deletion.destroyed, deletion.not_yet) == (3, 1, ["dev-2", "dev-3"])
    assert 'id="deleted"' in html and "proposed by op-admin" in html
    assert "approved by op-admin, op-bob" in html
    assert 'id="deleted-destroyed">1 of 3 members' in html
    assert 'data-device="dev-2"' in html and 'data-device="dev-1"' not in html
    assert f'href="/audit?before={entry.seq + 1}"' in html and 'href="/audit?q=g1"' in html
    assert 'id="live"' not in html and "data-events" not in html  # no ack stream to follow
    with fleet.sessions() as s:  # and a page left open on it: its stream ends ("gone")
        assert queries.ack_progress(s, "g1") is None
    assert len(detail.commits) == commits_before and 'id="commits"' in html  # history kept
