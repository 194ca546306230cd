"""A compromised member trying to wedge a group: the service refuses commits it did not ask
for (``ds.commit.unsolicited``), rate-limits member-initiated updates where a group allows them
(``ds.commit.rate``), and decides on a rollback only on enough witnesses
(provisioning/service/recovery.py). Pure: SQLite file, software devices (tests/service_members.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol import dataseal
from agent.protocol.errors import CryptoError
from agent.protocol.mls import group as mls_group
from agent.protocol.wire.messages.group import CommitRefused, UpdateRequest
from agent.protocol.wire.messages.service import CommitAction, CommitRequest
from provisioning.registry import DeviceState, Registry
from provisioning.service.recovery import MIN_WITNESSES, Verdict, commit_hash, decide
from provisioning.service.store import trees
from tests.insider import junk_encrypt
from tests.pure.test_service_core import Fleet, agreed, create_g1, make_fleet, snapshot
from tests.service_members import rekey

pytestmark = pytest.mark.pure

MEMBERS = tuple(f"dev-{i}" for i in range(1, 9))
BAD = b"junk-path-commit"


def self_update(fleet: Fleet, name: str) -> list[tuple[str, bytes]]:
    """A validly signed self-update ``name`` makes without being asked."""
    device = fleet.devices[name]
    commit = device.groups["g1"].update(device.devid, ec.generate_private_key(ec.SECP256R1()))
    return device.commit_result("g1", commit, None, fleet.now)


def test_a_compromised_members_unasked_commit_is_refused_and_changes_nothing(
    tmp_path: Path,
) -> None:
    fleet = next(make_fleet(tmp_path))
    create_g1(fleet)
    before = snapshot(fleet)
    refused = fleet.service.rejections.count("ds.commit.unsolicited")
    fleet.send(*self_update(fleet, "dev-2"))
    assert fleet.service.rejections.count("ds.commit.unsolicited") == refused + 1
    assert snapshot(fleet) == before  # no epoch moved, no commit logged
    entry = fleet.audit_entries()[-1]
    assert entry.actor == "device:dev-2" and "ds.commit.unsolicited" in entry.reason


def test_a_commit_request_to_one_member_is_not_an_invitation_to_another(tmp_path: Path) -> None:
    """A rekey asked of one member (its request still on the way): a compromised member racing
    in with its own update is refused; the asked member's answer is taken."""
    fleet = next(make_fleet(tmp_path))
    create_g1(fleet)
    epoch = fleet.epoch("g1")
    fleet.offline.update(fleet.devices)  # the request waits in the asked member's inbox
    fleet.command("op-alice", rekey("g1"))
    (asked,) = [name for name in fleet.devices if fleet.inbox.get(name)]
    insider = next(name for name in fleet.devices if name != asked)
    fleet.offline.clear()
    fleet.send(*self_update(fleet, insider))
    assert fleet.service.rejections.count("ds.commit.unsolicited") == 1
    assert fleet.epoch("g1") == epoch
    fleet.offline.add(asked)
    fleet.come_online(asked)
    assert fleet.epoch("g1") == epoch + 1


def test_member_updates_allowed_are_rate_limited_per_member(tmp_path: Path) -> None:
    fleet = next(make_fleet(tmp_path, member_updates=True, member_update_min_interval=600))
    create_g1(fleet)
    epoch = fleet.epoch("g1")
    # dev-1 committed the add of the other founders while the group was created: any commit
    # renews its leaf, so the interval counts from it
    fleet.send(*self_update(fleet, "dev-1"))
    assert fleet.service.rejections.count("ds.commit.rate") == 1
    fleet.now += 600
    fleet.send(*self_update(fleet, "dev-1"))
    assert fleet.epoch("g1") == epoch + 1
    before = snapshot(fleet)
    fleet.now += 60
    fleet.send(*self_update(fleet, "dev-1"))
    assert fleet.service.rejections.count("ds.commit.rate") == 2
    assert snapshot(fleet) == before
    # another member is not held back by dev-1's budget; dev-1 again after the interval
    fleet.send(*self_update(fleet, "dev-3"))
    assert fleet.epoch("g1") == epoch + 2
    fleet.now += 600
    fleet.send(*self_update(fleet, "dev-1"))
    assert fleet.epoch("g1") == epoch + 3


# -- the recovery decision (pure) --------------------------------------------------------------


def verdict(reports: dict[str, bytes], acks: set[str], *, now: int = 100) -> Verdict:
    return decide(
        committer="dev-1",
        members=MEMBERS,
        reports=reports,
        acks=acks,
        commit=BAD,
        accepted_at=90,
        now=now,
        wait=10,
    ).verdict


def test_a_junk_commit_nobody_can_process_is_rolled_back() -> None:
    others = {m: commit_hash(BAD) for m in MEMBERS[1:]}
    assert verdict(others, set(), now=91) is Verdict.ROLLBACK  # everyone answered
    two = dict(list(others.items())[:MIN_WITNESSES])
    assert verdict(two, set(), now=91) is Verdict.WAIT  # the rest may still ack
    assert verdict(two, set(), now=100) is Verdict.ROLLBACK


def test_a_single_liar_cannot_roll_back_an_honest_commit() -> None:
    liar = {"dev-5": commit_hash(BAD)}
    assert verdict(liar, set(), now=200) is Verdict.STANDS
    assert verdict(liar, set(MEMBERS[1:]) - {"dev-5"}) is Verdict.STANDS


def test_colluding_liars_are_outnumbered_by_the_members_that_processed_it() -> None:
    liars = {m: commit_hash(BAD) for m in ("dev-5", "dev-6", "dev-7")}
    honest = {"dev-2", "dev-3", "dev-4", "dev-8"}
    assert verdict(liars, honest, now=91) is Verdict.STANDS


def test_reports_by_the_committer_or_naming_another_commit_do_not_count() -> None:
    reports = {
        "dev-1": commit_hash(BAD),  # the committer itself
        "dev-2": commit_hash(BAD),
        "dev-3": commit_hash(b"another commit"),
        "dev-99": commit_hash(BAD),  # not a member
    }
    decision = decide(
        committer="dev-1",
        members=MEMBERS,
        reports=reports,
        acks=set(),
        commit=BAD,
        accepted_at=0,
        now=100,
        wait=10,
    )
    assert decision.witnesses == ("dev-2",) and decision.verdict is Verdict.STANDS


def test_a_repeat_offender_is_refused_unasked_every_time(tmp_path: Path) -> None:
    """A compromised member that keeps committing unasked: every attempt is refused by
    check id, counted and audited; the group never moves."""
    fleet = next(make_fleet(tmp_path))
    create_g1(fleet)
    before = snapshot(fleet)
    for _ in range(3):
        fleet.now += 1
        fleet.send(*self_update(fleet, "dev-3"))
    assert fleet.service.rejections.count("ds.commit.unsolicited") == 3
    assert snapshot(fleet) == before
    refusals = [e for e in fleet.audit_entries() if "ds.commit.unsolicited" in (e.reason or "")]
    assert len(refusals) == 3


# -- recovery from an accepted junk commit -----------------------------------------------------


def junk_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every UpdatePath ciphertext made from now on is junk (a compromised member's commit:
    validly signed, public checks pass, nobody can decrypt its path secrets)."""
    monkeypatch.setattr(mls_group, "encrypt_with_label", junk_encrypt(mls_group.encrypt_with_label))


def test_a_compromised_members_junk_commit_is_rolled_back_and_the_insider_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compromised member (dev-5) asks for a self-update (its epoch is "old") and answers the
    service's commit request with junk path ciphertexts. Every honest member refuses it
    (mls.path.decrypt) and reports it; the service rolls the group back, quarantines dev-5 and
    an honest member removes it; the seven go on, dev-5 decrypts nothing sealed after."""
    fleet = next(make_fleet(tmp_path, MEMBERS))
    create_g1(fleet)
    epoch = fleet.epoch("g1")
    insider = fleet.devices["dev-5"]
    honest = [fleet.devices[m] for m in MEMBERS if m != "dev-5"]
    before = {d.device_id: d.groups["g1"].epoch_authenticator for d in honest}
    tree_before = honest[0].groups["g1"].tree_hash()
    with monkeypatch.context() as patch:
        junk_path(patch)
        fleet.send(insider.report(UpdateRequest("g1", epoch, "max-epoch-age"), fleet.now))
    assert fleet.epoch("g1") == epoch + 1  # accepted: every public check passed
    assert fleet.service.rejections.count("ds.commit.unsolicited") == 0
    # every honest member refused it and stayed where it was
    for device in honest:
        assert device.groups["g1"].epoch == epoch
        assert device.groups["g1"].epoch_authenticator == before[device.device_id]
    reports = [e for e in fleet.audit_entries() if e.action == "group.commit_refused"]
    assert len(reports) == 7 and all("mls.path.decrypt" in (e.reason or "") for e in reports)

    fleet.tick(1)  # everyone answered: judged on the next tick
    actions = [e.action for e in fleet.audit_entries()]
    assert "group.rollback" in actions
    rollback = next(e for e in fleet.audit_entries() if e.action == "group.rollback")
    assert rollback.details_dict()["committer"] == "dev-5"
    with fleet.sessions() as s:
        assert Registry(s).device("dev-5").state is DeviceState.QUARANTINED
        # the bad commit is gone from the commit log: catch-up can no longer replay it
        assert all(c.committer != "dev-5" for c in Registry(s).commits_from("g1", epoch))
    # an honest member's removal commit moved the seven on, together
    assert "dev-5" not in fleet.members("g1")
    assert fleet.epoch("g1") == epoch + 1
    assert all(d.groups["g1"].epoch == epoch + 1 for d in honest)
    assert len({d.groups["g1"].epoch_authenticator for d in honest}) == 1
    assert len(agreed(fleet, "g1")) == 2  # the seven, and the insider's dead branch
    with fleet.sessions() as s:
        # the rollback dropped what rebuilt the junk commit's epoch; the removal's is kept
        kept = trees.load_at(s, "g1", epoch)
        assert kept is not None and kept.tree.tree_hash() == tree_before

    # a late report about the rolled-back commit is not counted against the removal commit
    late = CommitRefused("g1", epoch, commit_hash(b"the rolled-back commit"), "mls.path.decrypt")
    fleet.send(honest[1].report(late, fleet.now))
    assert fleet.service.rejections.count("ds.recovery.commit") == 1

    # data keeps flowing among the honest members; the insider opens none of it
    sealed = dataseal.seal("g1", epoch + 1, honest[0].groups["g1"].data_key(16), b"after recovery")
    assert dataseal.open_sealed(sealed, lambda g, e: honest[5].groups["g1"].data_key(16)) == (
        b"after recovery"
    )
    with pytest.raises(CryptoError) as err:
        dataseal.open_sealed(sealed, lambda g, e: insider.groups["g1"].data_key(16))
    assert err.value.check == "data.auth"


def test_a_single_liar_gets_itself_re_added_and_nothing_else(tmp_path: Path) -> None:
    """A compromised member reports an honest commit as junk: the commit stands (six members
    acked it), the liar gets a fresh welcome, nobody is removed or quarantined."""
    fleet = next(make_fleet(tmp_path, MEMBERS))
    create_g1(fleet)
    epoch = fleet.epoch("g1")
    liar = fleet.devices["dev-4"]
    liar_group = liar.groups["g1"]
    fleet.send(
        fleet.devices["dev-2"].report(UpdateRequest("g1", epoch, "max-epoch-age"), fleet.now)
    )
    assert fleet.epoch("g1") == epoch + 1
    entry_hash = None
    with fleet.sessions() as s:
        entry_hash = commit_hash(Registry(s).commits_from("g1", epoch)[0].commit)
    liar.groups["g1"] = liar_group  # it pretends to be stuck
    fleet.send(liar.report(CommitRefused("g1", epoch, entry_hash, "mls.path.decrypt"), fleet.now))
    fleet.tick(11)
    actions = [e.action for e in fleet.audit_entries()]
    assert "group.rollback" not in actions and "group.commit_reports" in actions
    with fleet.sessions() as s:
        states = {m: Registry(s).device(m).state for m in MEMBERS}
    assert DeviceState.QUARANTINED not in states.values()
    assert sorted(fleet.members("g1")) == sorted(MEMBERS)
    assert len(agreed(fleet, "g1")) == 1  # the liar re-joined the real epoch


def test_the_removal_after_a_rollback_is_asked_of_a_witness_not_a_silent_member(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The insider's nearest neighbour in the tree (the member a removal is usually asked of) is
    offline: the service decides after ``recovery_wait`` and asks a member that reported the
    junk commit (it just showed it is there and at the right epoch), the nearest such; the
    removal does not wait ``commit_request_timeout`` on the silent member first."""
    fleet = next(make_fleet(tmp_path, MEMBERS, recovery_wait=10, commit_request_timeout=30))
    create_g1(fleet)
    epoch = fleet.epoch("g1")
    insider = fleet.devices["dev-5"]
    with fleet.sessions() as s:
        leaves = {m.device_id: m.leaf_index for m in Registry(s).members("g1")}
    assert (leaves["dev-5"], leaves["dev-6"]) == (4, 5)  # siblings in the tree
    fleet.offline.add("dev-6")
    fleet.record = True
    with monkeypatch.context() as patch:
        junk_path(patch)
        fleet.send(insider.report(UpdateRequest("g1", epoch, "max-epoch-age"), fleet.now))
    fleet.tick(1)
    assert "group.rollback" not in [e.action for e in fleet.audit_entries()]  # dev-6 may ack
    fleet.tick(10)
    rollback = next(e for e in fleet.audit_entries() if e.action == "group.rollback")
    assert "dev-6" not in rollback.details_dict()["witnesses"]
    removal = [
        (to, body)
        for to, body in fleet.to_devices
        if isinstance(body, CommitRequest) and body.action is CommitAction.REMOVE
    ]
    assert [to for to, _ in removal] == ["dev-7"]  # a witness, next nearest to leaf 4
    assert "dev-5" not in fleet.members("g1") and fleet.epoch("g1") == epoch + 1
    fleet.come_online("dev-6")  # the junk commit (refused, its report late), then the removal
    assert len(agreed(fleet, "g1")) == 2  # the seven, and the insider's dead branch
    assert fleet.devices["dev-6"].groups["g1"].epoch == epoch + 1
