"""The delivery service answering joiners' tree requests (provisioning.service.treepages) in
process, on a real SQLite registry, with software members that join the way a keyagent does
(tests/service_members.py: open the Welcome, fetch the pages, check the tree hash). The inline
bound is set to 0 and pages are cut small, so a three-member group joins through several pages
(what a group past 256 members does with 1 MiB pages).

Refusals: a device that is not a member, an epoch the group has not reached or whose commit
retention dropped, a page past the last, a device asking faster than its budget: refused by
check id, nothing sent."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import event, select

from agent.protocol.mls import group as group_module
from agent.protocol.mls.group import Group
from agent.protocol.mls.messages import KeyPackage
from agent.protocol.mls.tree import RatchetTree
from agent.protocol.mls.treepages import TreeCollector, TreePage, paginate
from agent.protocol.wire.messages.group import TreeRequest
from agent.protocol.wire.messages.result import ResultStatus
from agent.protocol.wire.messages.service import TreePage as TreePageMessage
from provisioning.db.runtime import GroupTreeEpochRow, GroupTreeUndoRow
from provisioning.service import groupcache, store
from provisioning.service.core import DeliveryService
from provisioning.service.groupcache import RequestBuckets, TreePageCache
from tests.device_certs import devid_cert_der
from tests.pure.test_service_core import Fleet, agreed, another_instance, create_g1, make_fleet
from tests.service_members import group_add, rekey, revoke

DATABASE_BACKENDS = ("sqlite", "postgresql")
DONE = ResultStatus.DONE

pytestmark = pytest.mark.pure


def _small_pages(
    tree: RatchetTree, *, admissions: Mapping[bytes, bytes] | None = None
) -> list[TreePage]:
    return paginate(tree, max_bytes=1200, admissions=admissions)


def _none(digests: Sequence[bytes]) -> dict[bytes, bytes]:
    """No Authorization stored (the cache's tests are about trees)."""
    return {}


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    monkeypatch.setattr(group_module, "INLINE_TREE_LEAVES", 0)
    monkeypatch.setattr(groupcache, "paginate", _small_pages)
    yield from make_fleet(tmp_path)


def test_members_join_through_tree_pages_the_service_answers(fleet: Fleet) -> None:
    fleet.record = True
    create_g1(fleet, "dev-1", "dev-2")
    cid = fleet.command("op-alice", group_add("g1", "dev-3"))
    done = fleet.final(cid)
    assert done.status is ResultStatus.DONE and done.epoch == 2
    assert (done.acked, done.pending, done.failed) == (3, 0, 0)
    assert len(agreed(fleet, "g1")) == 1
    assert len({d.groups["g1"].data_key() for d in fleet.devices.values()}) == 1
    sent = [(to, b) for to, b in fleet.to_devices if isinstance(b, TreePageMessage)]
    to_dev3 = [b for to, b in sent if to == "dev-3"]
    assert len(to_dev3) >= 3 and fleet.devices["dev-3"].tree_pages == len(to_dev3)
    assert [b.page for b in to_dev3] == list(range(to_dev3[0].pages))
    assert all(b.epoch == 2 for b in to_dev3)
    # the pages carry the Authorizations of the creation and of the adds of dev-2 and dev-3,
    # each once; no member keeps them, the service does (store.admissions)
    carried = [a for b in to_dev3 for a in b.admissions]
    assert len(carried) == len(set(carried)) == 3
    assert set(carried) == set(fleet.admissions("g1").values())
    assert fleet.devices["dev-2"].tree_pages > 1  # joined at the creation, through pages too
    assert not any(d.refusals for d in fleet.devices.values())


def test_tree_requests_from_strangers_for_other_epochs_or_past_the_end_are_refused(
    fleet: Fleet,
) -> None:
    create_g1(fleet, "dev-1", "dev-2")
    epoch = fleet.epoch("g1")
    fleet.record = True
    for device, request, check in (
        ("dev-3", TreeRequest("g1", epoch, 0), "ds.group.member"),
        ("dev-2", TreeRequest("g1", epoch + 1, 0), "ds.tree.epoch"),
        ("dev-2", TreeRequest("g1", epoch, 4095), "ds.tree.page"),
    ):
        before = fleet.service.rejections.count(check)
        fleet.send(fleet.devices[device].report(request, fleet.now))
        assert fleet.service.rejections.count(check) == before + 1
        assert not any(isinstance(b, TreePageMessage) for _, b in fleet.to_devices)
    # a member asking for its group's current tree gets the page
    fleet.send(fleet.devices["dev-2"].report(TreeRequest("g1", epoch, 1), fleet.now))
    (page,) = [b for _, b in fleet.to_devices if isinstance(b, TreePageMessage)]
    assert (page.group_id, page.epoch, page.page) == ("g1", epoch, 1)
    # a stray page is refused by the device (no fetch awaits it), and changes nothing
    assert fleet.devices["dev-2"].refusals == ["agent.tree-page.unasked"]


def _ask(fleet: Fleet, service: DeliveryService, device: str, request: TreeRequest) -> list[Any]:
    """``device``'s request handled by ``service``; the tree pages it sent back."""
    fleet.to_devices.clear()
    payload = fleet.devices[device].report(request, fleet.now)
    fleet.deliver(service.handle(*payload, fleet.now))
    return [b for _, b in fleet.to_devices if isinstance(b, TreePageMessage)]


def _fetch(
    fleet: Fleet, service: DeliveryService, device: str, epoch: int, tree_hash: bytes
) -> RatchetTree:
    """Every page of g1's tree at ``epoch`` from ``service``, taken as a joiner takes them: the
    tree they hold if its hash is ``tree_hash`` (else ``mls.welcome.tree-hash``)."""
    collector = TreeCollector("g1", epoch, tree_hash)
    while not collector.complete:
        (got,) = _ask(fleet, service, device, TreeRequest("g1", epoch, collector.next_page))
        collector.add("g1", epoch, TreePage(got.page, got.pages, got.width, got.start, got.nodes))
    assert (collector.pages or 0) >= 2
    return collector.tree()


@pytest.fixture
def fleet4(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database_url: str) -> Iterator[Fleet]:
    """Four devices, six epochs kept, on SQLite and on PostgreSQL."""
    monkeypatch.setattr(group_module, "INLINE_TREE_LEAVES", 0)
    monkeypatch.setattr(groupcache, "paginate", _small_pages)
    url = None if database_url.startswith("sqlite") else database_url
    names = ("dev-1", "dev-2", "dev-3", "dev-4")
    yield from make_fleet(tmp_path, names, url=url, retention_epochs=6)


def test_any_instance_serves_a_left_epochs_tree_from_the_database_until_retention_drops_it(
    fleet4: Fleet,
) -> None:
    """A joiner's epoch the group has left: another instance on the same database, and the
    first one restarted (nothing in memory), rebuild its tree from the stored rows and serve
    the tree the Welcome signed, to the members that joined at it; once retention drops the
    epoch it is refused (``ds.tree.epoch``), nothing sent."""
    fleet = fleet4
    create_g1(fleet, "dev-1", "dev-2")
    welcome_epoch = fleet.epoch("g1")
    signed_hash = fleet.devices["dev-2"].groups["g1"].tree_hash()
    # the group moves on: it grows, shrinks (its tree is cut back), and every leaf is updated
    assert fleet.final(fleet.command("op-alice", group_add("g1", "dev-3"))).status is DONE
    dev3_epoch = fleet.epoch("g1")
    dev3_hash = fleet.devices["dev-3"].groups["g1"].tree_hash()
    assert fleet.final(fleet.command("op-alice", group_add("g1", "dev-4"))).status is DONE
    assert fleet.final(fleet.command("op-admin", revoke("dev-4"))).status is DONE
    assert fleet.final(fleet.command("op-alice", rekey("g1"))).status is DONE
    assert fleet.epoch("g1") == welcome_epoch + 4
    fleet.record = True
    other = another_instance(fleet, "b")
    assert _fetch(fleet, other, "dev-2", welcome_epoch, signed_hash).member_count() == 2
    assert _fetch(fleet, other, "dev-3", dev3_epoch, dev3_hash).member_count() == 3
    assert other._env.metrics.rejections.value("ds.tree.epoch") == 0
    # a restart: nothing in memory anywhere; still served
    fleet.service = another_instance(fleet, "a")
    _fetch(fleet, fleet.service, "dev-2", welcome_epoch, signed_hash)
    # the group moves on past retention (6 epochs): the welcome epoch's commit is dropped
    for _ in range(3):
        assert fleet.final(fleet.command("op-alice", rekey("g1"))).status is DONE
    assert fleet.epoch("g1") - 6 > welcome_epoch
    for service in (fleet.service, another_instance(fleet, "c")):
        before = service.rejections.count("ds.tree.epoch")
        assert _ask(fleet, service, "dev-2", TreeRequest("g1", welcome_epoch, 0)) == []
        assert service.rejections.count("ds.tree.epoch") == before + 1
    with fleet.sessions() as s:
        kept = s.scalars(
            select(GroupTreeEpochRow.epoch).where(GroupTreeEpochRow.group_id == "g1")
        ).all()
        undo = s.scalars(
            select(GroupTreeUndoRow.epoch).where(GroupTreeUndoRow.group_id == "g1")
        ).all()
    below = fleet.epoch("g1") - 6
    assert kept and min(kept) >= below and min(undo) >= below
    # the oldest retained epoch, dev-3's, is still served by a fresh instance
    assert below == dev3_epoch
    _fetch(fleet, another_instance(fleet, "d"), "dev-3", dev3_epoch, dev3_hash)
    # but only to its joiners: a member cannot have instances rebuild epochs it did not join at
    fresh = another_instance(fleet, "e")
    assert _ask(fleet, fresh, "dev-2", TreeRequest("g1", dev3_epoch, 0)) == []
    assert _ask(fleet, fresh, "dev-1", TreeRequest("g1", dev3_epoch, 0)) == []
    assert fresh.rejections.count("ds.tree.epoch") == 2


def test_a_joiner_gets_the_tree_of_its_welcomes_epoch_after_the_group_moved_on(
    fleet: Fleet,
) -> None:
    """The epochs whose commits added members keep their trees at the instance that accepted
    them (a chunk's joiners fetch while the next chunks commit, without a rebuild); without
    them, the same pages are rebuilt from the database."""
    create_g1(fleet, "dev-1", "dev-2")
    welcome_epoch = fleet.epoch("g1")
    signed_hash = fleet.devices["dev-2"].groups["g1"].tree_hash()
    assert fleet.final(fleet.command("op-alice", rekey("g1"))).status is ResultStatus.DONE
    assert fleet.epoch("g1") == welcome_epoch + 1
    fleet.record = True
    fleet.send(fleet.devices["dev-2"].report(TreeRequest("g1", welcome_epoch, 0), fleet.now))
    (page,) = [b for _, b in fleet.to_devices if isinstance(b, TreePageMessage)]
    assert (page.epoch, page.page) == (welcome_epoch, 0)
    # the kept tree is the one the Welcome's GroupInfo signed (dev-2 joined with it)
    collector = TreeCollector("g1", welcome_epoch, signed_hash)
    sent: list[bytes] = []
    for k in range(page.pages):
        fleet.to_devices.clear()
        fleet.send(fleet.devices["dev-2"].report(TreeRequest("g1", welcome_epoch, k), fleet.now))
        (got,) = [b for _, b in fleet.to_devices if isinstance(b, TreePageMessage)]
        collector.add("g1", welcome_epoch, TreePage(k, got.pages, got.width, got.start, got.nodes))
        sent.append(got.nodes)
    assert collector.tree().tree_hash() == signed_hash
    fleet.service._env.tree_pages = TreePageCache()  # nothing kept: rebuilt from the database
    fleet.to_devices.clear()
    fleet.send(fleet.devices["dev-2"].report(TreeRequest("g1", welcome_epoch, 1), fleet.now))
    (again,) = [b for _, b in fleet.to_devices if isinstance(b, TreePageMessage)]
    assert (again.epoch, again.page, again.nodes) == (welcome_epoch, 1, sent[1])


def test_a_device_asking_faster_than_its_budget_is_refused_until_its_bucket_refills(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``[groups] tree_request_burst`` requests at once, then ``tree_requests_per_minute``: past
    that ``ds.tree.rate`` (counted, logged, audited), nothing sent, nothing read; a stranger's
    requests spend its own budget, not a member's."""
    monkeypatch.setattr(group_module, "INLINE_TREE_LEAVES", 0)
    monkeypatch.setattr(groupcache, "paginate", _small_pages)
    fleets = make_fleet(tmp_path, tree_request_burst=3, tree_requests_per_minute=30)
    fleet = next(fleets)
    create_g1(fleet, "dev-1", "dev-2")
    epoch = fleet.epoch("g1")
    fleet.record = True
    service = fleet.service
    metrics = service._env.metrics
    service._env.tree_requests = RequestBuckets()  # dev-2's own join spent some: start full
    before = service.rejections.count("ds.tree.rate")
    for k in range(3):
        (page,) = _ask(fleet, service, "dev-2", TreeRequest("g1", epoch, k % 2))
        assert page.page == k % 2
    for _ in range(2):  # a stranger (refused: ds.group.member) spends its own budget
        _ask(fleet, service, "dev-3", TreeRequest("g1", epoch, 0))
    for _ in range(2):
        assert _ask(fleet, service, "dev-2", TreeRequest("g1", epoch, 0)) == []
    assert service.rejections.count("ds.tree.rate") == before + 2
    assert metrics.rejections.value("ds.tree.rate") == before + 2
    assert "refused group.tree_request from device:dev-2 on g1: [ds.tree.rate]" in caplog.text
    refused = [e for e in fleet.audit_entries() if "ds.tree.rate" in (e.reason or "")]
    assert len(refused) == before + 2 and {e.actor for e in refused} == {"device:dev-2"}
    fleet.now += 1  # half a token at 30 a minute
    assert _ask(fleet, service, "dev-2", TreeRequest("g1", epoch, 0)) == []
    fleet.now += 1  # one token
    (page,) = _ask(fleet, service, "dev-2", TreeRequest("g1", epoch, 0))
    assert page.page == 0
    assert _ask(fleet, service, "dev-2", TreeRequest("g1", epoch, 0)) == []
    # another instance keeps its own budget
    (page,) = _ask(fleet, another_instance(fleet, "b"), "dev-2", TreeRequest("g1", epoch, 0))
    assert page.page == 0
    fleets.close()


def test_request_buckets_hold_a_burst_refill_by_the_minute_and_stay_bounded() -> None:
    buckets = RequestBuckets(max_devices=2)
    assert [buckets.take("d1", 100, per_minute=60, burst=2) for _ in range(3)] == [
        True,
        True,
        False,
    ]
    assert buckets.take("d1", 101, per_minute=60, burst=2)
    assert not buckets.take("d1", 101, per_minute=60, burst=2)
    # a clock going back gives nothing
    assert not buckets.take("d1", 50, per_minute=60, burst=2)
    # never more than the burst, however long the wait
    assert [buckets.take("d1", 10_000, per_minute=60, burst=2) for _ in range(3)] == [
        True,
        True,
        False,
    ]
    buckets.take("d2", 10_000, per_minute=60, burst=2)
    buckets.take("d3", 10_000, per_minute=60, burst=2)
    assert len(buckets._buckets) == 2 and "d1" not in buckets._buckets


def test_concurrent_requests_for_one_rebuilt_tree_rebuild_it_once() -> None:
    """Joiners asking one instance for the same epoch at once: one rebuild (O(N)), the others
    wait for its pages; a rebuild that finds nothing keeps nothing."""
    cache = TreePageCache()
    calls: list[int] = []
    gate = threading.Event()
    devid, leaf, init = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    kp = KeyPackage.create(
        b"d1", devid, leaf.public_key(), devid_cert_der(b"d1", devid), init_key=init.public_key()
    )
    source = Group.create(b"g1", kp, leaf).public_group().tree

    def rebuild() -> RatchetTree | None:
        calls.append(1)
        gate.wait(5)
        return source

    results: list[object] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(cache.rebuilt_pages("g1", 3, b"ctx", rebuild, _none))
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join(5)
    assert len(calls) == 1 and len(results) == 4
    assert all(r == results[0] and r is not None for r in results)
    assert cache.rebuilt_pages("g1", 4, b"ctx", lambda: None, _none) is None
    assert cache.rebuilt_pages("g1", 4, b"ctx", rebuild, _none) is not None and len(calls) == 2


def test_joiners_of_more_epochs_than_the_trees_kept_make_it_cut_them_again(
    tmp_path: Path,
) -> None:
    """Joiners of three epochs asking one instance by turns: with two trees kept (the default)
    each turn cuts (or rebuilds, O(N)) a tree again; with ``[groups] tree_pages_kept = 3``
    each is made once. Fewer than one tree kept is refused."""
    devid, leaf, init = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    kp = KeyPackage.create(
        b"d1", devid, leaf.public_key(), devid_cert_der(b"d1", devid), init_key=init.public_key()
    )
    source = Group.create(b"g1", kp, leaf).public_group().tree
    calls: list[int] = []

    def rebuild(epoch: int) -> RatchetTree:
        calls.append(epoch)
        return source

    def by_turns(cache: TreePageCache) -> list[int]:
        calls.clear()
        for _ in range(3):
            for epoch in (3, 4, 5):
                cache.rebuilt_pages(
                    "g1", epoch, b"ctx%d" % epoch, lambda e=epoch: rebuild(e), _none
                )
        return list(calls)

    assert by_turns(TreePageCache()) == [3, 4, 5] * 3
    assert by_turns(TreePageCache(max_paged=3)) == [3, 4, 5]
    with pytest.raises(ValueError):
        TreePageCache(max_paged=0)
    # the setting reaches the instance's cache
    fleets = make_fleet(tmp_path, (), tree_pages_kept=3)
    fleet = next(fleets)
    try:
        assert fleet.service._env.tree_pages.max_paged == 3
    finally:
        fleets.close()


def _statements(fleet: Fleet, work: Any) -> int:
    """How many SQL statements ``work()`` runs on the fleet's database."""
    engine = fleet.sessions.kw["bind"]
    count = [0]

    def counted(*_args: Any) -> None:
        count[0] += 1

    event.listen(engine, "before_cursor_execute", counted)
    try:
        work()
    finally:
        event.remove(engine, "before_cursor_execute", counted)
    return count[0]


def test_tree_requests_received_together_take_one_transaction_and_are_refused_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    """Tree requests handed over together (``handle_many``) are answered in one transaction
    (``treepages.on_tree_requests``): a batch of ten costs fewer statements than two requests
    taken alone. A replayed request (``replay.duplicate``) and one past its sender's budget
    (``ds.tree.rate``) are refused by check id alone, the others answered; the refused one's
    replay window is left as it was (the same request is taken once the budget refills)."""
    monkeypatch.setattr(group_module, "INLINE_TREE_LEAVES", 0)
    monkeypatch.setattr(groupcache, "paginate", _small_pages)
    names = ("dev-1", "dev-2", "dev-3", "dev-4", "dev-5")
    url = None if database_url.startswith("sqlite") else database_url
    fleets = make_fleet(tmp_path, names, url=url)
    fleet = next(fleets)
    create_g1(fleet, *names)
    epoch = fleet.epoch("g1")
    service = fleet.service
    env = service._env
    env.settings = replace(env.settings, tree_request_burst=2, tree_requests_per_minute=30)
    env.tree_requests = RequestBuckets()  # the joins spent some: start full
    fleet.record = True

    def handle(*payloads: tuple[str, bytes]) -> list[tuple[str, TreePageMessage]]:
        fleet.to_devices.clear()
        fleet.deliver(service.handle_many(list(payloads), fleet.now))
        return [(to, b) for to, b in fleet.to_devices if isinstance(b, TreePageMessage)]

    def seqs() -> dict[str, int | None]:
        with fleet.sessions() as s:
            return {n: store.load_guard(s, n).highest_seq(n) for n in names}

    earlier = fleet.devices["dev-2"].report(TreeRequest("g1", epoch, 0), fleet.now)
    alone = _statements(fleet, lambda: handle(earlier))  # one request on its own
    assert [to for to, _ in fleet.to_devices] == ["dev-2"]
    # dev-2 has one request of its burst of two left
    batch = [earlier] + [
        fleet.devices[n].report(TreeRequest("g1", epoch, k), fleet.now)
        for n in names[1:]
        for k in (0, 1)
    ]
    over = batch[2]  # dev-2's second: past its budget
    replays, rates = (service.rejections.count(c) for c in ("replay.duplicate", "ds.tree.rate"))
    before = seqs()
    sent: list[tuple[str, TreePageMessage]] = []
    together = _statements(fleet, lambda: sent.extend(handle(*batch)))
    assert service.rejections.count("replay.duplicate") == replays + 1
    assert service.rejections.count("ds.tree.rate") == rates + 1
    assert sorted((to, b.page) for to, b in sent) == [
        ("dev-2", 0),
        *((n, k) for n in names[2:] for k in (0, 1)),
    ]
    assert all(b.epoch == epoch for _, b in sent)
    after = seqs()
    assert after["dev-2"] == before["dev-2"] + 1 == fleet.devices["dev-2"].seq - 1
    assert after["dev-1"] == before["dev-1"]
    assert all(after[n] == fleet.devices[n].seq for n in names[2:])
    assert together < 2 * alone, (together, alone)
    # the refused request changed nothing: once the budget refills, the same request is taken
    fleet.now += 2
    assert [(to, b.page) for to, b in handle(over)] == [("dev-2", 1)]
    assert seqs()["dev-2"] == fleet.devices["dev-2"].seq
    next(fleets, None)  # the engine disposed
