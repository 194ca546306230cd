"""Joining a large group through tree pages (docs/treekem.md, "Joining a large group"): a
Welcome into a group of more than ``INLINE_TREE_LEAVES`` leaves carries no tree, only its hash
in the signed GroupInfo; the joiner fetches the tree in pages (agent.protocol.mls.treepages) from
the untrusted delivery service and accepts it only if its hash is the GroupInfo's.

Attack tests: a forged, altered, missing, reordered page or a page of another group or epoch is
refused by its check id and changes nothing (the collector is as before; no group is built).
The pages carry the operators' Authorizations the leaves name (members keep none): one withheld
or replaced by another is refused (``mls.welcome.admission``)."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol.errors import ProtocolError
from agent.protocol.mls import codec
from agent.protocol.mls.group import INLINE_TREE_LEAVES, Group, admissions_of
from agent.protocol.mls.messages import KeyPackage, Welcome
from agent.protocol.mls.treepages import MAX_PAGE_BYTES, TreeCollector, TreePage, paginate
from agent.protocol.wire.envelope import encode_message
from agent.protocol.wire.messages.base import MAX_WELCOME_MESSAGE_SIZE
from agent.protocol.wire.messages.service import TreePage as TreePageMessage
from agent.protocol.wire.messages.service import WelcomeDelivery
from tests.device_certs import devid_cert_der

pytestmark = pytest.mark.pure

Software = tuple[KeyPackage, ec.EllipticCurvePrivateKey, ec.EllipticCurvePrivateKey]


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _members(n: int, prefix: str = "dev") -> list[Software]:
    """``n`` software devices sharing one DevID key and certificate (MLS needs distinct devices
    and leaf keys only; the certificate gives every leaf its real size, ~500 bytes)."""
    devid = _key()
    credential = devid_cert_der(b"dev-shared", devid)
    init = _key().public_key()
    out = []
    for i in range(n):
        leaf = _key()
        kp = KeyPackage.create(
            f"{prefix}-{i:06}".encode(), devid, leaf.public_key(), credential, init_key=init
        )
        out.append((kp, leaf, devid))
    return out


class _Joiner:
    def __init__(self) -> None:
        self.devid = _key()
        self.leaf = _key()
        self.init = _key()
        self.kp = KeyPackage.create(
            b"joiner",
            self.devid,
            self.leaf.public_key(),
            devid_cert_der(b"joiner", self.devid),
            init_key=self.init.public_key(),
        )


SEEDED = os.urandom(512)
"""The Authorization every member of ``big`` came in with."""
ADDED = os.urandom(512)
"""The Authorization of ``big``'s add of the joiner."""
STORED = admissions_of([SEEDED, ADDED])
"""What the delivery service keeps for ``big``."""


@pytest.fixture(scope="module")
def big() -> tuple[Group, Welcome, _Joiner, Group]:
    """A group of 300 members (past the inline bound) and a Welcome for one more."""
    members = _members(300)
    groups = Group.assemble(b"big", members, epoch=3, authz=SEEDED)
    joiner = _Joiner()
    result = groups[7].add(members[7][2], [joiner.kp], authz=ADDED)
    assert result.welcome is not None
    return groups[7], Welcome.decode(result.welcome.encode()), joiner, result.group


def _collect(tree_pages: list[TreePage], collector: TreeCollector) -> None:
    for page in tree_pages:
        collector.add(collector.group_id, collector.epoch, page)


def test_a_large_groups_welcome_carries_no_tree_and_joins_through_pages(
    big: tuple[Group, Welcome, _Joiner, Group],
) -> None:
    _, welcome, joiner, committed = big
    assert committed.tree.n_leaves > INLINE_TREE_LEAVES
    assert len(welcome.encode()) < 2048  # no tree, no Authorization: secrets, GroupInfo
    assert SEEDED not in welcome.encode() and ADDED not in welcome.encode()
    opened = Group.open_welcome(welcome, joiner.kp, joiner.leaf, init_key=joiner.init)
    assert opened.info.tree is None
    assert opened.info.tree_hash == committed.tree_hash()
    assert "joiner" not in repr(opened) and opened.secrets.joiner_secret.hex() not in repr(opened)
    # without the tree: refused
    with pytest.raises(ProtocolError) as err:
        Group.join_opened(opened, joiner.kp, joiner.leaf)
    assert err.value.check == "mls.welcome.tree-missing"
    tree_pages = paginate(committed.tree, max_bytes=32 * 1024, admissions=STORED)
    assert len(tree_pages) > 3
    assert all(p.size <= 32 * 1024 for p in tree_pages)
    # each Authorization once, with the first page whose leaves name it
    assert tree_pages[0].admissions == (SEEDED,)
    assert [p.admissions for p in tree_pages[1:]].count((ADDED,)) == 1
    assert sum(len(p.admissions) for p in tree_pages) == 2
    collector = TreeCollector("big", committed.epoch, opened.info.tree_hash)
    for page in tree_pages:
        assert collector.next_page == page.index
        collector.add("big", committed.epoch, page)
    tree = collector.tree()
    assert set(collector.admissions(tree)) == {SEEDED, ADDED}
    with pytest.raises(ProtocolError) as err:  # without the Authorizations: refused
        Group.join_opened(opened, joiner.kp, joiner.leaf, tree=tree)
    assert err.value.check == "mls.welcome.admission"
    joined = Group.join_opened(
        opened, joiner.kp, joiner.leaf, tree=tree, admissions=collector.admissions(tree)
    )
    assert joined.epoch_authenticator == committed.epoch_authenticator
    assert joined.data_key() == committed.data_key()
    assert joined.tree.member_count() == 301


def test_pages_that_withhold_or_replace_an_authorization_are_refused(
    big: tuple[Group, Welcome, _Joiner, Group],
) -> None:
    """Attack: the delivery service cuts the pages without an Authorization a leaf names, or
    with another one in its place, or with one no leaf names added: the first two are refused
    (``mls.welcome.admission``, nothing joins), the last is dropped and the join goes on."""
    _, welcome, joiner, committed = big
    opened = Group.open_welcome(welcome, joiner.kp, joiner.leaf, init_key=joiner.init)
    forged = os.urandom(512)
    for stored in (
        admissions_of([SEEDED]),
        admissions_of([ADDED]),
        {**admissions_of([SEEDED]), next(iter(admissions_of([ADDED]))): forged},
    ):
        collector = TreeCollector("big", committed.epoch, opened.info.tree_hash)
        _collect(paginate(committed.tree, max_bytes=32 * 1024, admissions=stored), collector)
        tree = collector.tree()
        assert forged not in collector.admissions(tree)
        with pytest.raises(ProtocolError) as err:
            Group.join_opened(
                opened, joiner.kp, joiner.leaf, tree=tree, admissions=collector.admissions(tree)
            )
        assert err.value.check == "mls.welcome.admission"
    pages = paginate(committed.tree, max_bytes=32 * 1024, admissions=STORED)
    pages[-1] = replace(pages[-1], admissions=(*pages[-1].admissions, forged))
    collector = TreeCollector("big", committed.epoch, opened.info.tree_hash)
    _collect(pages, collector)
    tree = collector.tree()
    assert set(collector.admissions(tree)) == {SEEDED, ADDED}
    joined = Group.join_opened(
        opened, joiner.kp, joiner.leaf, tree=tree, admissions=collector.admissions(tree)
    )
    assert joined.epoch_authenticator == committed.epoch_authenticator


def test_a_page_over_its_size_with_its_authorizations_is_refused(
    big: tuple[Group, Welcome, _Joiner, Group],
) -> None:
    _, _, _, committed = big
    pages = paginate(committed.tree, admissions=STORED)
    collector = TreeCollector("big", committed.epoch, committed.tree_hash())
    over = replace(pages[0], admissions=(*pages[0].admissions, os.urandom(MAX_PAGE_BYTES)))
    _refused(collector, "big", committed.epoch, over, "mls.tree-page.shape")


def test_small_groups_keep_the_tree_in_the_welcome() -> None:
    members = _members(4, "small")
    groups = Group.assemble(b"small", members, epoch=1)
    joiner = _Joiner()
    result = groups[0].add(members[0][2], [joiner.kp])
    assert result.welcome is not None
    opened = Group.open_welcome(result.welcome, joiner.kp, joiner.leaf, init_key=joiner.init)
    assert opened.info.tree is not None
    joined = Group.join_opened(opened, joiner.kp, joiner.leaf)
    assert joined.epoch_authenticator == result.group.epoch_authenticator


def _refused(collector: TreeCollector, group: str, epoch: int, page: TreePage, check: str) -> None:
    before = (collector.next_page, collector.pages)
    with pytest.raises(ProtocolError) as err:
        collector.add(group, epoch, page)
    assert err.value.check == check
    assert (collector.next_page, collector.pages) == before  # nothing taken


def test_pages_out_of_order_of_another_epoch_or_reshaped_are_refused(
    big: tuple[Group, Welcome, _Joiner, Group],
) -> None:
    _, _, _, committed = big
    tree_pages = paginate(committed.tree, max_bytes=32 * 1024)
    epoch = committed.epoch
    collector = TreeCollector("big", epoch, committed.tree_hash())
    collector.add("big", epoch, tree_pages[0])
    _refused(collector, "big", epoch - 1, tree_pages[1], "mls.tree-page.group")
    _refused(collector, "big", epoch + 1, tree_pages[1], "mls.tree-page.group")
    _refused(collector, "other", epoch, tree_pages[1], "mls.tree-page.group")
    _refused(collector, "big", epoch, tree_pages[2], "mls.tree-page.order")
    _refused(collector, "big", epoch, tree_pages[0], "mls.tree-page.order")
    shifted = replace(tree_pages[1], start=tree_pages[1].start + 1)
    _refused(collector, "big", epoch, shifted, "mls.tree-page.shape")
    fewer = replace(tree_pages[1], count=tree_pages[1].count - 1)
    _refused(collector, "big", epoch, fewer, "mls.tree-page.shape")
    garbage = replace(tree_pages[1], nodes=b"\xff\x00")
    with pytest.raises(ProtocolError) as err:
        collector.add("big", epoch, garbage)
    assert err.value.check.startswith("cbor.")
    assert collector.next_page == 1
    # a last page that stops short of the tree's width
    alone = TreeCollector("big", epoch, committed.tree_hash())
    short = replace(tree_pages[0], count=1)
    _refused(alone, "big", epoch, short, "mls.tree-page.shape")
    with pytest.raises(ProtocolError) as err:
        collector.tree()
    assert err.value.check == "mls.tree-page.missing"


def _altered(tree_pages: list[TreePage], k: int) -> list[TreePage]:
    """Page ``k`` with its first leaf's encryption key replaced by another valid point."""
    items = list(codec.decode(tree_pages[k].nodes, MAX_PAGE_BYTES, "t"))  # type: ignore[arg-type]
    x = next(i for i, item in enumerate(items) if isinstance(item, dict) and "leaf" in item)
    leaf = dict(items[x]["leaf"])  # type: ignore[index]
    from agent.protocol.hpke import serialize_public_key

    leaf["enc"] = serialize_public_key(_key().public_key())
    items[x] = {**items[x], "leaf": leaf}  # type: ignore[dict-item]
    out = list(tree_pages)
    out[k] = replace(tree_pages[k], nodes=codec.encode(items))
    return out


def test_an_altered_page_is_refused_by_the_tree_hash_and_nothing_joins(
    big: tuple[Group, Welcome, _Joiner, Group],
) -> None:
    _, welcome, joiner, committed = big
    opened = Group.open_welcome(welcome, joiner.kp, joiner.leaf, init_key=joiner.init)
    tree_pages = paginate(committed.tree, max_bytes=32 * 1024)
    probe = codec.decode(tree_pages[2].nodes, MAX_PAGE_BYTES, "t")
    assert isinstance(probe, list)
    assert any(isinstance(i, dict) and "leaf" in i for i in probe)
    for forged in (_altered(tree_pages, 2), _altered(tree_pages, len(tree_pages) - 1)):
        collector = TreeCollector("big", committed.epoch, opened.info.tree_hash)
        _collect(forged, collector)
        with pytest.raises(ProtocolError) as err:
            collector.tree()
        assert err.value.check == "mls.welcome.tree-hash"
    # a whole other tree (the service's copy of another epoch) fails the same way, and
    # join_opened itself refuses a tree whose hash is not the GroupInfo's
    collector = TreeCollector("big", committed.epoch, opened.info.tree_hash)
    older = big[0].tree  # the committer's tree before the add
    _collect(paginate(older, max_bytes=32 * 1024), collector)
    with pytest.raises(ProtocolError) as err:
        collector.tree()
    assert err.value.check == "mls.welcome.tree-hash"
    with pytest.raises(ProtocolError) as err:
        Group.join_opened(opened, joiner.kp, joiner.leaf, tree=older)
    assert err.value.check == "mls.welcome.tree-hash"


@pytest.mark.long
def test_a_welcome_and_every_tree_page_of_a_100k_member_group_fit_the_frame() -> None:
    """Size, not time: a Welcome into a group of 100,000 members (every leaf with a DevID
    certificate) stays a few KB, far under the 4 MiB frame, and every ``svc.tree_page`` of its
    tree, signed as the service sends it, is under its message limit."""
    n = 100_000
    members = _members(n, "fleet")
    seeded, added = os.urandom(2048), os.urandom(2048)
    groups = Group.assemble(b"fleet", members, epoch=1, authz=seeded)
    committer = groups[12_345]
    joiner = _Joiner()
    result = committer.add(members[12_345][2], [joiner.kp], authz=added)
    assert result.welcome is not None
    welcome = result.welcome.encode()
    service_key = _key()

    def framed(body: WelcomeDelivery | TreePageMessage) -> bytes:
        return encode_message(
            body, key=service_key, sender="service", to="joiner", seq=1, time=1_700_000_000
        )

    delivery = framed(WelcomeDelivery("fleet", 2, welcome))
    assert len(delivery) < 16 * 1024 < MAX_WELCOME_MESSAGE_SIZE
    tree = result.group.tree
    tree_pages = paginate(tree, admissions=admissions_of([seeded, added]))
    sizes = [
        len(
            framed(
                TreePageMessage(
                    "fleet", 2, p.index, p.count, p.width, p.start, p.nodes, p.admissions
                )
            )
        )
        for p in tree_pages
    ]
    assert max(sizes) <= TreePageMessage.MAX_MESSAGE_SIZE < MAX_WELCOME_MESSAGE_SIZE
    assert 40 <= len(tree_pages) <= 200  # ~100 MB of tree in 1 MiB pages
    opened = Group.open_welcome(
        Welcome.decode(welcome), joiner.kp, joiner.leaf, init_key=joiner.init
    )
    collector = TreeCollector("fleet", 2, opened.info.tree_hash)
    _collect(tree_pages, collector)
    tree = collector.tree()
    joined = Group.join_opened(
        opened, joiner.kp, joiner.leaf, tree=tree, admissions=collector.admissions(tree)
    )
    assert joined.epoch_authenticator == result.group.epoch_authenticator
    assert joined.tree.member_count() == n + 1
