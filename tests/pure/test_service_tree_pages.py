"""The delivery service answering joiners' tree requests (provisioning.service.treepages) in
process, on a real SQLite registry, with software members that join the way a keyagent does
(tests/service_members.py: open the Welcome, fetch the pages, check the tree hash). The inline
bound is set to 0 and pages are cut small, so a three-member group joins through several pages
(what a group past 256 members does with 1 MiB pages).

Refusals: a device that is not a member, an epoch the group is not at, a page past the last:
refused by check id, nothing sent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.protocol.mls import group as group_module
from agent.protocol.mls.tree import RatchetTree
from agent.protocol.mls.treepages import TreeCollector, TreePage, paginate
from agent.protocol.wire.messages.group import TreeRequest
from agent.protocol.wire.messages.result import ResultStatus
from agent.protocol.wire.messages.service import TreePage as TreePageMessage
from provisioning.service import groupcache
from provisioning.service.groupcache import TreePageCache
from tests.pure.test_service_core import Fleet, agreed, create_g1, make_fleet
from tests.service_members import group_add, rekey

pytestmark = pytest.mark.pure


def _small_pages(tree: RatchetTree) -> list[TreePage]:
    return paginate(tree, max_bytes=1200)


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
        ("dev-2", TreeRequest("g1", epoch - 1, 0), "ds.tree.epoch"),
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


def test_a_joiner_gets_the_tree_of_its_welcomes_epoch_after_the_group_moved_on(
    fleet: Fleet,
) -> None:
    """The epochs whose commits added members keep their trees at the instance that accepted
    them (a chunk's joiners fetch while the next chunks commit); another instance, without
    them, refuses (``ds.tree.epoch``) and the joiner's next retry may reach the first."""
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
    for k in range(page.pages):
        fleet.to_devices.clear()
        fleet.send(fleet.devices["dev-2"].report(TreeRequest("g1", welcome_epoch, k), fleet.now))
        (got,) = [b for _, b in fleet.to_devices if isinstance(b, TreePageMessage)]
        collector.add("g1", welcome_epoch, TreePage(k, got.pages, got.width, got.start, got.nodes))
    assert collector.tree().tree_hash() == signed_hash
    fleet.service._env.tree_pages = TreePageCache()  # another instance: nothing kept
    fleet.to_devices.clear()
    before = fleet.service.rejections.count("ds.tree.epoch")
    fleet.send(fleet.devices["dev-2"].report(TreeRequest("g1", welcome_epoch, 0), fleet.now))
    assert fleet.service.rejections.count("ds.tree.epoch") == before + 1
    assert not any(isinstance(b, TreePageMessage) for _, b in fleet.to_devices)
