"""The agent core joining through tree pages (agent.protocol.treefetch; docs/treekem.md,
"Joining a large group"): the Welcome carries no tree, the core asks for page after page, joins
once all are in and their tree hash is the signed GroupInfo's. Groups here are small: the inline
bound is set to 0 so that every Welcome references its tree (what a group past 256 members does).

Attack tests: the service (not trusted for the tree) altering a page, answering for another epoch,
sending pages nobody asked for: refused by check id, no group installed, the key package kept."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

from agent.core import AgentCore, Outcome
from agent.protocol import treefetch
from agent.protocol.hpke import serialize_public_key
from agent.protocol.mls import codec
from agent.protocol.mls import group as group_module
from agent.protocol.mls.treepages import MAX_PAGE_BYTES, TreePage, paginate
from agent.protocol.wire.messages.ack import Ack
from agent.protocol.wire.messages.group import CommitMessage, TreeRequest, WelcomeMessage
from agent.protocol.wire.messages.service import CommitAction, WelcomeDelivery
from agent.protocol.wire.messages.service import TreePage as TreePageMessage
from tests.pure.test_agent_core import FakeService, G, acks, new_key

pytestmark = pytest.mark.pure


@pytest.fixture(autouse=True)
def _never_inline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(group_module, "INLINE_TREE_LEAVES", 0)
    yield


def _welcomed() -> tuple[FakeService, AgentCore, WelcomeDelivery, list[TreePage]]:
    """dev-a and dev-c in the group, dev-b added: its Welcome (no tree) and the tree's pages
    (small pages, so there are several)."""
    service = FakeService()
    service.core("dev-a")
    service.core("dev-c")
    b = service.core("dev-b")
    service.create("dev-a")
    for joiner in ("dev-c", "dev-b"):
        kp = service.key_package(joiner)
        commit, welcome = service.request_commit(
            "dev-a", CommitAction.ADD, member=joiner, key_package=kp
        )
        assert isinstance(commit, CommitMessage) and isinstance(welcome, WelcomeMessage)
        relay = service.order(commit)
        acks(service, service.fan_out(relay, [m for m in ("dev-a", "dev-c") if m != joiner]))
        if joiner == "dev-c":
            joined = _join_all(service, "dev-c", welcome)
            assert isinstance(joined, Ack)
    pages = paginate(service.public[G].tree, max_bytes=1200, admissions=service.authorizations[G])
    assert len(pages) >= 3
    return service, b, WelcomeDelivery(G, welcome.epoch, welcome.welcome), pages


def _page(page: TreePage, epoch: int, group: str = G) -> TreePageMessage:
    return TreePageMessage(
        group, epoch, page.index, page.count, page.width, page.start, page.nodes, page.admissions
    )


def _asked(service: FakeService, device: str, outcome: Outcome) -> TreeRequest:
    assert outcome.refused is None, outcome.refused
    (body,) = service.bodies(device, outcome)
    assert isinstance(body, TreeRequest)
    return body


def _join_all(service: FakeService, device: str, welcome: WelcomeMessage) -> object:
    out = service.deliver(device, WelcomeDelivery(G, welcome.epoch, welcome.welcome))
    request = _asked(service, device, out)
    pages = paginate(service.public[G].tree, admissions=service.authorizations[G])
    while True:
        out = service.deliver(device, _page(pages[request.page], welcome.epoch))
        (body,) = service.bodies(device, out)
        if not isinstance(body, TreeRequest):
            return body
        request = body


def test_a_device_joins_through_tree_pages() -> None:
    service, b, welcome, pages = _welcomed()
    request = _asked(service, "dev-b", service.deliver("dev-b", welcome))
    assert (request.group_id, request.epoch, request.page) == (G, welcome.epoch, 0)
    assert b.epoch(G) is None  # nothing joined before the tree is in
    for page in pages[:-1]:
        request = _asked(service, "dev-b", service.deliver("dev-b", _page(page, welcome.epoch)))
        assert request.page == page.index + 1
        assert b.epoch(G) is None
    out = service.deliver("dev-b", _page(pages[-1], welcome.epoch))
    ((_, ack),) = acks(service, {"dev-b": out}).items()
    assert ack.epoch == welcome.epoch == service.public[G].epoch
    assert b.epoch(G) == welcome.epoch
    a_key = service.devices["dev-a"].encrypt(G, b"to all", service.now)
    assert b.decrypt(G, a_key, service.now) == b"to all"


def _altered(page: TreePage) -> TreePage:
    items = codec.decode(page.nodes, MAX_PAGE_BYTES, "t")
    assert isinstance(items, list)
    x = next(i for i, item in enumerate(items) if isinstance(item, dict) and "leaf" in item)
    leaf = {**items[x]["leaf"], "enc": serialize_public_key(new_key().public_key())}
    items[x] = {**items[x], "leaf": leaf}
    return replace(page, nodes=codec.encode(items))


def test_an_altered_page_is_refused_by_the_tree_hash_and_nothing_joins() -> None:
    service, b, welcome, pages = _welcomed()
    held = dict(b._key_packages)
    _asked(service, "dev-b", service.deliver("dev-b", welcome))
    k = next(i for i, p in enumerate(pages) if b"leaf" in p.nodes)
    forged = [*pages[:k], _altered(pages[k]), *pages[k + 1 :]]
    for page in forged[:-1]:
        _asked(service, "dev-b", service.deliver("dev-b", _page(page, welcome.epoch)))
    out = service.deliver("dev-b", _page(forged[-1], welcome.epoch))
    assert out.refused is not None and out.refused.check == "mls.welcome.tree-hash"
    assert not out.publishes
    assert b.epoch(G) is None and b._key_packages == held  # nothing joined, key package kept
    assert b.rejections.snapshot()["mls.welcome.tree-hash"] == 1
    # the fetch is over: a further page is unasked
    out = service.deliver("dev-b", _page(pages[0], welcome.epoch))
    assert out.refused is not None and out.refused.check == "agent.tree-page.unasked"
    # the Welcome sent again (a fresh message) is opened again and joins with the real pages
    _asked(service, "dev-b", service.deliver("dev-b", welcome))
    for page in pages[:-1]:
        _asked(service, "dev-b", service.deliver("dev-b", _page(page, welcome.epoch)))
    acks(service, {"dev-b": service.deliver("dev-b", _page(pages[-1], welcome.epoch))})
    assert b.epoch(G) == welcome.epoch


def test_pages_of_another_epoch_or_group_out_of_order_or_unasked_are_refused() -> None:
    service, b, welcome, pages = _welcomed()
    out = service.deliver("dev-b", _page(pages[0], welcome.epoch))
    assert out.refused is not None and out.refused.check == "agent.tree-page.unasked"
    _asked(service, "dev-b", service.deliver("dev-b", welcome))
    for bad, check in (
        (_page(pages[0], welcome.epoch - 1), "mls.tree-page.group"),
        (_page(pages[0], welcome.epoch + 1), "mls.tree-page.group"),
        (_page(pages[1], welcome.epoch), "mls.tree-page.order"),
    ):
        out = service.deliver("dev-b", bad)
        assert out.refused is not None and out.refused.check == check
        assert not out.publishes and b.epoch(G) is None
    # the fetch went on: the right pages still join
    for page in pages[:-1]:
        _asked(service, "dev-b", service.deliver("dev-b", _page(page, welcome.epoch)))
    acks(service, {"dev-b": service.deliver("dev-b", _page(pages[-1], welcome.epoch))})
    assert b.epoch(G) == welcome.epoch


def test_an_unanswered_page_is_asked_again_and_a_fetch_times_out() -> None:
    service, b, welcome, pages = _welcomed()
    _asked(service, "dev-b", service.deliver("dev-b", welcome))
    _asked(service, "dev-b", service.deliver("dev-b", _page(pages[0], welcome.epoch)))
    start = service.now
    assert not service.bodies("dev-b", b.tick(start + treefetch.RETRY - 1))
    (again,) = service.bodies("dev-b", b.tick(start + treefetch.RETRY))
    assert isinstance(again, TreeRequest) and again.page == 1
    out = b.tick(start + treefetch.TIMEOUT)
    assert not any(isinstance(x, TreeRequest) for x in service.bodies("dev-b", out))
    assert b.rejections.snapshot()["agent.tree-page.timeout"] == 1
    service.now = start + treefetch.TIMEOUT
    out = service.deliver("dev-b", _page(pages[1], welcome.epoch))
    assert out.refused is not None and out.refused.check == "agent.tree-page.unasked"
    assert b.epoch(G) is None


def test_pages_that_withhold_or_swap_an_authorization_are_refused_and_nothing_joins() -> None:
    """Attack: the service cuts the pages without the Authorization that admitted dev-b (or
    with another one in its place): ``mls.welcome.admission`` once the tree is in, no group,
    the key package kept; the Welcome sent again joins with the real pages."""
    service, b, welcome, pages = _welcomed()
    held = dict(b._key_packages)
    own = service.public[G].tree.admission(service.public[G].tree.find_device(b"dev-b") or 0)
    kept = service.authorizations[G]
    assert own in kept
    for stored in (
        {h: a for h, a in kept.items() if h != own},
        {**kept, own: b"another authorization"},
    ):
        forged = paginate(service.public[G].tree, max_bytes=1200, admissions=stored)
        _asked(service, "dev-b", service.deliver("dev-b", welcome))
        for page in forged[:-1]:
            _asked(service, "dev-b", service.deliver("dev-b", _page(page, welcome.epoch)))
        out = service.deliver("dev-b", _page(forged[-1], welcome.epoch))
        assert out.refused is not None and out.refused.check == "mls.welcome.admission"
        assert not out.publishes
        assert b.epoch(G) is None and b._key_packages == held
    _asked(service, "dev-b", service.deliver("dev-b", welcome))
    for page in pages[:-1]:
        _asked(service, "dev-b", service.deliver("dev-b", _page(page, welcome.epoch)))
    acks(service, {"dev-b": service.deliver("dev-b", _page(pages[-1], welcome.epoch))})
    assert b.epoch(G) == welcome.epoch


def test_an_inline_welcome_without_its_authorizations_makes_the_joiner_fetch_the_pages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Welcome that carries its (small) tree but not every Authorization the tree names (the
    service could not fit them in the frame): the joiner asks for the pages, which carry them,
    and joins; with them all in the ``svc.welcome`` it joins at once."""
    monkeypatch.setattr(group_module, "INLINE_TREE_LEAVES", 256)
    service = FakeService()
    service.core("dev-a")
    b = service.core("dev-b")
    service.create("dev-a")
    kp = service.key_package("dev-b")
    commit, message = service.request_commit(
        "dev-a", CommitAction.ADD, member="dev-b", key_package=kp
    )
    assert isinstance(commit, CommitMessage) and isinstance(message, WelcomeMessage)
    acks(service, service.fan_out(service.order(commit), ["dev-a"]))
    welcome = WelcomeDelivery(G, message.epoch, message.welcome)
    payload, topic = service.command("dev-b", welcome)  # as sent: no Authorizations
    request = _asked(service, "dev-b", b.handle(payload, topic, service.now))
    assert (request.epoch, request.page) == (welcome.epoch, 0)
    assert b.epoch(G) is None
    pages = paginate(service.public[G].tree, admissions=service.authorizations[G])
    assert len(pages) == 1 and pages[0].admissions
    acks(service, {"dev-b": service.deliver("dev-b", _page(pages[0], welcome.epoch))})
    assert b.epoch(G) == welcome.epoch
    # another joiner, this time with every Authorization in its svc.welcome: no fetch
    d = service.core("dev-d")
    kp = service.key_package("dev-d")
    commit, message = service.request_commit(
        "dev-a", CommitAction.ADD, member="dev-d", key_package=kp
    )
    assert isinstance(commit, CommitMessage) and isinstance(message, WelcomeMessage)
    relay = service.order(commit)
    acks(service, service.fan_out(relay, ["dev-a", "dev-b"]))
    joined = service.deliver("dev-d", WelcomeDelivery(G, message.epoch, message.welcome))
    acks(service, {"dev-d": joined})
    assert d.epoch(G) == message.epoch
