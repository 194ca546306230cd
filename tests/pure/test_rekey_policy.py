"""Every member's key moves: the rekey policy (pure: due computation, per-group override, a
simulated clock) and the service enforcing it against real software MLS members on a SQLite
file (tests/service_members.py), and ``rekey --full`` updating every leaf.

The adversary the policy answers: root on a device later, with the TPM (which performs the ECDH
for whoever asks) and the commit log. Whatever was sealed to a leaf key can be reopened while
that key exists; a member that never commits keeps its key for ever. The tests assert the
passive member's leaf key is replaced within the policy's bound, asked for by the service.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from agent.protocol.wire.messages.key_state import KeyStateReport
from agent.protocol.wire.messages.operator import GroupPolicy, Rekey
from agent.protocol.wire.messages.result import ResultStatus
from provisioning.service import fullrekey, rekeypolicy, store
from provisioning.service.commits import load_public
from provisioning.service.model import ServiceSettings
from provisioning.service.rekeypolicy import LeafUpdate, RekeyPolicy, due, parse_duration, to_ask
from provisioning.service.store import rekey as rows
from tests.pure.test_service_core import Fleet, create_g1, make_fleet
from tests.service_deployment import keyfleet
from tests.service_members import command_id


def rekey(group_id: str, *, full: bool | None = None) -> Rekey:
    return Rekey(command_id(), group_id, full)


pytestmark = pytest.mark.pure

DAY = 86_400


# -- the policy, pure ---------------------------------------------------------------------------


def test_durations_parse_and_bad_ones_say_what_was_expected() -> None:
    assert [parse_duration(t) for t in ("45", "45s", "30m", "12h", "7d", "2w", "off", "0")] == [
        45,
        45,
        1800,
        43_200,
        7 * DAY,
        14 * DAY,
        0,
        0,
    ]
    for bad in ("", "7 days", "-1d", "1.5h", "d"):
        with pytest.raises(ValueError, match=r"expected e\.g\. 7d"):
            parse_duration(bad)


def test_a_member_is_due_by_age_or_by_epochs_whichever_comes_first() -> None:
    policy = RekeyPolicy(max_age=7 * DAY, max_epochs=100)
    leaf = LeafUpdate("dev-1", epoch=10, updated_at=1000)
    assert due(policy, leaf, epoch=109, now=1000 + 7 * DAY - 1) is None
    assert due(policy, leaf, epoch=110, now=1000) == "epochs"
    assert due(policy, leaf, epoch=11, now=1000 + 7 * DAY) == "age"
    # a bound at 0 is off
    assert due(RekeyPolicy(0, 100), leaf, epoch=11, now=10**9) is None
    assert due(RekeyPolicy(7 * DAY, 0), leaf, epoch=10**6, now=1000) is None


def test_asks_go_to_the_oldest_first_and_are_not_repeated_before_the_repeat_interval() -> None:
    policy = RekeyPolicy(max_age=DAY, max_epochs=0)
    leaves = [
        LeafUpdate("young", 5, updated_at=50_000),
        LeafUpdate("old", 1, updated_at=100),
        LeafUpdate("older", 1, updated_at=10),
        LeafUpdate("asked", 1, updated_at=0, asked_at=DAY + 100),
    ]
    now = DAY + 200
    assert [leaf.device_id for leaf in to_ask(policy, leaves, epoch=6, now=now)] == [
        "older",
        "old",
    ]
    later = DAY + 100 + rekeypolicy.ASK_REPEAT_SECONDS
    assert [leaf.device_id for leaf in to_ask(policy, leaves, epoch=6, now=later)] == [
        "asked",
        "older",
        "old",
    ]


def test_a_looser_policy_is_recognised_and_out_of_range_bounds_are_refused() -> None:
    base = RekeyPolicy(7 * DAY, 100)
    assert RekeyPolicy(8 * DAY, 100).looser_than(base)
    assert RekeyPolicy(0, 100).looser_than(base)  # turned off
    assert RekeyPolicy(7 * DAY, 101).looser_than(base)
    assert not RekeyPolicy(DAY, 10).looser_than(base)
    with pytest.raises(Exception, match="max_age"):
        RekeyPolicy(400 * DAY, 1)


def test_status_names_stragglers_and_members_overdue_past_the_grace() -> None:
    policy = RekeyPolicy(max_age=DAY, max_epochs=0)
    leaves = [
        LeafUpdate("fresh", 3, updated_at=DAY),
        LeafUpdate("silent", 1, updated_at=0, asked_at=DAY + 10),
    ]
    now = DAY + policy.grace() + 20
    by_id = {
        s.device_id: s
        for s in rekeypolicy.status(policy, leaves, epoch=3, now=now, answer_within=10)
    }
    assert by_id["silent"].due == "age" and by_id["silent"].straggler and by_id["silent"].overdue
    assert by_id["fresh"].due is None and not by_id["fresh"].straggler
    oldest = rekeypolicy.status(policy, leaves, epoch=3, now=now, answer_within=10)[0]
    assert oldest.device_id == "silent" and oldest.age == now


def test_bit_reversed_order_spreads_the_committers_over_the_tree() -> None:
    assert rekeypolicy.bit_reversed(8) == [0, 4, 2, 6, 1, 5, 3, 7]
    assert sorted(rekeypolicy.bit_reversed(100)) == list(range(100))
    assert rekeypolicy.bit_reversed(1) == [0]


# -- the service enforcing it ------------------------------------------------------------------


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    yield from make_fleet(
        tmp_path, ("dev-1", "dev-2", "dev-3", "dev-4"), rekey_max_age=0, rekey_max_epochs=3
    )


def leaf_keys(fleet: Fleet, group_id: str) -> dict[str, bytes]:
    """Each member's leaf encryption key in the service's public tree."""
    with fleet.sessions() as s:
        public, _ = load_public(s, group_id)
    out = {}
    for index in range(public.tree.n_leaves):
        leaf = public.tree.leaf(index)
        if leaf is not None:
            out[leaf.device_id.decode()] = leaf.encryption_key
    return out


def heard_from_last(fleet: Fleet, device: str) -> None:
    """``device`` is the member heard from most recently: the one asked to commit."""
    fleet.now += 1
    fleet.send(fleet.devices[device].report(KeyStateReport(()), fleet.now))


def committers(fleet: Fleet, group_id: str) -> list[str]:
    with fleet.sessions() as s:
        rows_ = s.execute(
            text("SELECT committer FROM commit_log WHERE group_id=:g ORDER BY epoch"),
            {"g": group_id},
        )
        return [str(r[0]) for r in rows_]


def test_a_passive_member_is_asked_and_its_leaf_key_changes_within_max_epochs(
    fleet: Fleet,
) -> None:
    create_g1(fleet)
    before = leaf_keys(fleet, "g1")
    # An active group: dev-1 keeps committing; dev-4 never would on its own.
    for device in ("dev-2", "dev-3", "dev-4"):
        fleet.devices[device].ignore_commit_requests = True
    first = len(committers(fleet, "g1"))
    for _ in range(4):
        heard_from_last(fleet, "dev-1")
        cid = fleet.command("op-alice", rekey("g1"))
        assert fleet.final(cid).status is ResultStatus.DONE
    assert leaf_keys(fleet, "g1")["dev-4"] == before["dev-4"]
    assert set(committers(fleet, "g1")[first:]) == {"dev-1"}
    # the passive members answer when asked (as every agent does); they never ask on their own
    for device in ("dev-2", "dev-3", "dev-4"):
        fleet.devices[device].ignore_commit_requests = False
    fleet.tick(rekeypolicy.CHECK_SECONDS)  # the policy tick: each is due (>= 3 epochs)
    after = leaf_keys(fleet, "g1")
    assert all(after[d] != before[d] for d in ("dev-2", "dev-3", "dev-4"))
    assert sorted(committers(fleet, "g1")[-3:]) == ["dev-2", "dev-3", "dev-4"]
    with fleet.sessions() as s:
        ages = {
            a.device_id: a
            for a in rekeypolicy.leaf_ages(
                s, "g1", ServiceSettings(rekey_max_age=0, rekey_max_epochs=3), fleet.now
            )
        }
    assert ages["dev-4"].epochs == 0 and ages["dev-4"].due is None
    assert len({d.groups["g1"].epoch_authenticator for d in fleet.devices.values()}) == 1


def test_a_member_that_does_not_answer_is_a_straggler_and_the_queue_moves_on(fleet: Fleet) -> None:
    create_g1(fleet)
    fleet.devices["dev-4"].ignore_commit_requests = True  # offline for commits
    for _ in range(3):
        heard_from_last(fleet, "dev-1")
        assert fleet.final(fleet.command("op-alice", rekey("g1"))).status is ResultStatus.DONE
    before = leaf_keys(fleet, "g1")
    fleet.tick(rekeypolicy.CHECK_SECONDS)  # dev-2, dev-3, dev-4 due; dev-4 stays silent
    for _ in range(3):
        fleet.tick(fleet.service.settings.commit_request_timeout + 1)
    with fleet.sessions() as s:
        ages = {
            a.device_id: a
            for a in rekeypolicy.leaf_ages(s, "g1", fleet.service.settings, fleet.now)
        }
        open_jobs = store.open_jobs(s, "g1")
    after = leaf_keys(fleet, "g1")
    assert after["dev-2"] != before["dev-2"] and after["dev-3"] != before["dev-3"]
    assert after["dev-4"] == before["dev-4"]
    assert ages["dev-4"].straggler and ages["dev-4"].due == "epochs"
    assert not ages["dev-2"].straggler and ages["dev-2"].due is None
    assert open_jobs == []  # its job failed as a straggler: the queue is free
    failed = [e for e in fleet.audit_entries() if "ds.rekey.straggler" in (e.reason or "")]
    assert failed or ages["dev-4"].straggler
    heard_from_last(fleet, "dev-1")
    assert fleet.final(fleet.command("op-alice", rekey("g1"))).status is ResultStatus.DONE
    # asked again after the repeat interval, and this time it answers
    fleet.devices["dev-4"].ignore_commit_requests = False
    fleet.tick(rekeypolicy.ASK_REPEAT_SECONDS)
    assert leaf_keys(fleet, "g1")["dev-4"] != before["dev-4"]


def test_the_group_policy_overrides_the_default_is_admin_only_and_audited(fleet: Fleet) -> None:
    create_g1(fleet)
    body = GroupPolicy(command_id(), "g1", 3600, 0)
    refused = fleet.command("op-alice", body)
    assert fleet.final(refused).status is ResultStatus.REJECTED
    assert "op.role" in fleet.final(refused).detail
    cid = fleet.command("op-admin", GroupPolicy(command_id(), "g1", 3600, 0))
    assert fleet.final(cid).status is ResultStatus.DONE
    with fleet.sessions() as s:
        assert rows.policy(s, "g1") == (3600, 0)
    entry = [e for e in fleet.audit_entries() if e.action == "group.rekey_policy"][-1]
    details = json.loads(entry.details)
    assert details["looser"] == 1 and details["was_max_epochs"] == 3
    # now epochs don't count, age does: no ask after many epochs, an ask after an hour
    fleet.devices["dev-2"].ignore_commit_requests = True
    fleet.devices["dev-3"].ignore_commit_requests = True
    fleet.devices["dev-4"].ignore_commit_requests = True
    for _ in range(4):
        fleet.command("op-alice", rekey("g1"))
    before = leaf_keys(fleet, "g1")
    fleet.tick(rekeypolicy.CHECK_SECONDS)
    assert leaf_keys(fleet, "g1")["dev-4"] == before["dev-4"]
    fleet.devices["dev-4"].ignore_commit_requests = False
    fleet.tick(3600)  # every member is due by age: aimed self-updates, one after the other
    for _ in range(3):  # dev-2 and dev-3 still do not answer: stragglers, the queue moves on
        fleet.tick(fleet.service.settings.commit_request_timeout + 1)
    assert leaf_keys(fleet, "g1")["dev-4"] != before["dev-4"]
    with pytest.raises(Exception, match="bounds"):
        GroupPolicy(command_id(), "g1", 400 * DAY, 0)


def test_full_rekey_of_eight_changes_every_leaf_key(tmp_path: Path) -> None:
    names = tuple(f"dev-{i}" for i in range(1, 9))
    for fleet in make_fleet(tmp_path, names, rekey_max_age=0, rekey_max_epochs=0):
        create_g1(fleet)
        before = leaf_keys(fleet, "g1")
        start = fleet.epoch("g1")
        cid = fleet.command("op-alice", rekey("g1", full=True))
        result = fleet.final(cid)
        assert result.status is ResultStatus.DONE, result.detail
        after = leaf_keys(fleet, "g1")
        assert set(after) == set(names)
        assert all(after[n] != before[n] for n in names)
        # one proposal round and one commit carrying the other seven members' Updates
        assert fleet.epoch("g1") == start + 1
        assert len({d.groups["g1"].epoch_authenticator for d in fleet.devices.values()}) == 1
        # every member's self-update is recorded at the new epoch
        with fleet.sessions() as s:
            ages = {row.device_id: row.epoch for row in rows.leaf_rows(s, "g1")}
        assert ages == dict.fromkeys(names, start + 1)


def test_full_rekey_in_batches_with_a_straggler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches of three: seven members' proposals need three commits at consecutive epochs; a
    member that sends no proposal is asked for its own self-update afterwards, and one that
    answers neither is named a straggler."""
    monkeypatch.setattr(fullrekey, "BATCH", 3)
    names = tuple(f"dev-{i}" for i in range(1, 10))
    fleet = next(make_fleet(tmp_path, names, rekey_max_age=0, rekey_max_epochs=0))
    create_g1(fleet)
    before = leaf_keys(fleet, "g1")
    start = fleet.epoch("g1")
    fleet.devices["dev-9"].ignore_commit_requests = True
    fleet.devices["dev-9"].ignore_proposal_requests = True
    cid = fleet.command("op-alice", rekey("g1", full=True))
    for _ in range(4):
        fleet.tick(fleet.service.settings.commit_request_timeout + 1)
    result = fleet.final(cid)
    after = leaf_keys(fleet, "g1")
    assert [n for n in names if after[n] == before[n]] == ["dev-9"]
    # 7 proposals (8 answered, minus the committer's own) in batches of 3
    assert fleet.epoch("g1") == start + 3
    assert result.status is ResultStatus.FAILED
    assert "[ds.rekey.straggler] dev-9" in result.detail


def test_group_show_lists_the_oldest_leaf_first_and_names_the_straggler(fleet: Fleet) -> None:
    create_g1(fleet)
    fleet.devices["dev-4"].ignore_commit_requests = True
    for _ in range(3):
        heard_from_last(fleet, "dev-1")
        assert fleet.final(fleet.command("op-alice", rekey("g1"))).status is ResultStatus.DONE
    fleet.tick(rekeypolicy.CHECK_SECONDS)
    for _ in range(3):
        fleet.tick(fleet.service.settings.commit_request_timeout + 1)
    db = f"sqlite:///{fleet.db_path}"
    shown = keyfleet("group", "show", "g1", "--db", db, "--json", cwd=fleet.db_path.parent)
    assert shown.returncode == 0, shown.stderr
    listed = json.loads(shown.stdout)
    assert listed[0]["device"] == "dev-4" and listed[0]["straggler"] is True
    assert {row["device"] for row in listed} == set(fleet.devices)
    table = keyfleet("group", "show", "g1", "--db", db, cwd=fleet.db_path.parent)
    assert table.returncode == 0 and "dev-4" in table.stdout.splitlines()[1], table.stdout
    bad = keyfleet("group", "policy", "g1", "--max-age", "7 days", "--max-epochs", "1",
                   cwd=fleet.db_path.parent)  # fmt: skip
    assert bad.returncode == 2 and "expected e.g. 7d" in bad.stderr
