"""A group's public ratchet tree in pages, for a joiner whose Welcome references the tree by
its hash only (``GroupInfo.tree`` None: docs/treekem.md, "Joining a large group").

The delivery service cuts the tree it holds into pages (``paginate``): consecutive node ranges
``[start, start + count)`` in the tree's encoding (``RatchetTree.node_obj``, blank nodes as
null), each page's encoded node list at most ``MAX_PAGE_BYTES``, so every page fits a wire
message whatever the group's size. The joiner asks for them one by one and feeds them to a
``TreeCollector``, which checks their shape as they come (same width and page count on every
page, ranges adjacent and in order, bounded sizes) and, once all are in, decodes the tree
strictly (``RatchetTree.from_obj``) and accepts it only if its tree hash is the one the signed
GroupInfo names (``mls.welcome.tree-hash``). The delivery service is not trusted: a missing,
altered, reordered or foreign page is refused by a check id and the collector keeps nothing of
it (a refused page leaves the collector as it was; the caller drops the whole join).

Each page also carries the operators' Authorizations its leaves' admission hashes name that no
earlier page carried (``paginate(admissions=...)``), nodes and Authorizations together at most
``MAX_PAGE_BYTES``: a joiner gets each distinct Authorization once, and neither the Welcome nor
any member's state has to hold them. The collector keeps those the finished tree names (by
hash: one under another hash is never taken for it) and the join checks them
(``Group.join_opened(admissions=...)``, ``mls.welcome.admission`` for one missing).

Pure: no I/O, no clock; the caller (the agent) sends requests and times them out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent.protocol.errors import ProtocolError
from agent.protocol.mls import codec
from agent.protocol.mls import tree_math as tm
from agent.protocol.mls.messages import MAX_AUTHORIZATION
from agent.protocol.mls.public import admission_hash
from agent.protocol.mls.tree import NO_ADMISSION, RatchetTree

MAX_PAGE_BYTES = 1 << 20
"""Largest encoded node list of one page with its Authorizations (a node is at most about
5 KiB, an Authorization at most 64 KiB)."""
MAX_PAGE_ADMISSIONS = 4096
MAX_WIDTH = 2 * codec.MAX_LEAVES - 1
MAX_PAGES = 4096
"""A tree of ``codec.MAX_LEAVES`` leaves with 4 KiB certificates is about 650 pages."""


@dataclass(frozen=True)
class TreePage:
    """Nodes ``[start, start + len(nodes))`` of a tree ``width`` nodes wide: page ``index`` of
    ``count``. ``nodes`` is the encoded CBOR array of the nodes' encodings; ``admissions`` the
    Authorizations its leaves name that no earlier page carries."""

    index: int
    count: int
    width: int
    start: int
    nodes: bytes
    admissions: tuple[bytes, ...] = ()

    @property
    def size(self) -> int:
        """Bytes of nodes and Authorizations (at most ``MAX_PAGE_BYTES``)."""
        return len(self.nodes) + sum(len(a) for a in self.admissions)


def paginate(
    tree: RatchetTree,
    max_bytes: int = MAX_PAGE_BYTES,
    *,
    admissions: Mapping[bytes, bytes] | None = None,
) -> list[TreePage]:
    """``tree`` cut into pages of at most ``max_bytes`` each: encoded nodes plus the
    Authorizations (from ``admissions``, by admission hash) that the page's leaves name and no
    earlier page carries; one the mapping lacks is not carried (the joiner then refuses the
    tree: ``mls.welcome.admission``). O(N): the delivery service computes it once per group
    epoch and keeps it."""
    known = admissions or {}
    width = 2 * tree.n_leaves - 1
    ranges: list[tuple[int, list[bytes], list[bytes]]] = []
    current: list[bytes] = []
    carried: list[bytes] = []
    sent: set[bytes] = set()
    size = 0
    start = 0
    for x in range(width):
        item = codec.encode(tree.node_obj(x))
        authz = digest = None
        if x % 2 == 0 and known and tree.leaf(tm.node_to_leaf(x)) is not None:
            digest = tree.admission(tm.node_to_leaf(x))
            authz = None if digest in sent else known.get(digest)
        cost = len(item) + (0 if authz is None else len(authz))
        # the array header is at most 5 bytes
        if current and size + cost + 5 > max_bytes:
            ranges.append((start, current, carried))
            start, current, carried, size = x, [], [], 0
        current.append(item)
        if authz is not None and digest is not None:
            carried.append(authz)
            sent.add(digest)
        size += cost
    ranges.append((start, current, carried))
    count = len(ranges)
    return [
        TreePage(i, count, width, first, _array(items), tuple(authz))
        for i, (first, items, authz) in enumerate(ranges)
    ]


def admissions_missing(tree: RatchetTree, delivered: Sequence[bytes]) -> bool:
    """Whether some leaf of ``tree`` records an admission hash that no ``delivered``
    Authorization has: a joiner whose Welcome carries its (small) tree then fetches the pages,
    which carry them (the service could not fit them in the Welcome's frame)."""
    have = {admission_hash(a) for a in delivered}
    return any(h != NO_ADMISSION and h not in have for h in tree.admission_hashes())


def _array(items: Sequence[bytes]) -> bytes:
    """The CBOR array of already-encoded items (deterministic: the header is minimal)."""
    n = len(items)
    if n < 24:
        head = bytes([0x80 | n])
    elif n < 1 << 8:
        head = bytes([0x98, n])
    elif n < 1 << 16:
        head = b"\x99" + n.to_bytes(2, "big")
    else:
        head = b"\x9a" + n.to_bytes(4, "big")
    return head + b"".join(items)


class TreeCollector:
    """A joiner's pages of the tree of ``group_id`` at ``epoch`` whose hash must be
    ``tree_hash`` (the signed GroupInfo's). ``add`` takes the pages in order; ``tree`` once
    ``complete``. Holds public data only."""

    __slots__ = (
        "_admissions",
        "_count",
        "_items",
        "_pages",
        "_width",
        "epoch",
        "group_id",
        "tree_hash",
    )

    def __init__(self, group_id: str, epoch: int, tree_hash: bytes) -> None:
        self.group_id = group_id
        self.epoch = epoch
        self.tree_hash = tree_hash
        self._items: list[object] = []
        self._admissions: dict[bytes, bytes] = {}
        self._count: int | None = None
        self._width: int | None = None
        self._pages = 0

    @property
    def next_page(self) -> int:
        """The page to ask for next."""
        return self._pages

    @property
    def pages(self) -> int | None:
        """How many pages the tree has (None before the first)."""
        return self._count

    @property
    def complete(self) -> bool:
        return self._count is not None and self._pages == self._count

    def add(self, group_id: str, epoch: int, page: TreePage) -> None:
        """Take the next page: ``mls.tree-page.group`` if it is of another group or epoch,
        ``mls.tree-page.order`` if it is not the page asked for next, ``mls.tree-page.shape``
        if its count, width or node range disagrees with the pages before or its nodes do not
        decode (``mls.decode*``). A refused page changes nothing."""
        if group_id != self.group_id or epoch != self.epoch:
            raise ProtocolError(
                "mls.tree-page.group",
                f"a page of {group_id!r} epoch {epoch}, not {self.group_id!r} epoch {self.epoch}",
            )
        if page.index != self._pages or self.complete:
            raise ProtocolError(
                "mls.tree-page.order", f"page {page.index}, not the next one ({self._pages})"
            )
        if self._count is not None and (page.count, page.width) != (self._count, self._width):
            raise ProtocolError(
                "mls.tree-page.shape", "the page count or tree width changed between pages"
            )
        if not (
            1 <= page.count <= MAX_PAGES
            and 1 <= page.width <= MAX_WIDTH
            and page.width % 2 == 1
            and page.index < page.count
        ):
            raise ProtocolError("mls.tree-page.shape", "page count or tree width out of bounds")
        if (
            page.start != len(self._items)
            or page.size > MAX_PAGE_BYTES
            or len(page.admissions) > MAX_PAGE_ADMISSIONS
            or not all(0 < len(a) <= MAX_AUTHORIZATION for a in page.admissions)
        ):
            raise ProtocolError(
                "mls.tree-page.shape",
                f"page {page.index} does not start at node {len(self._items)}",
            )
        items = codec.as_list(
            codec.decode(page.nodes, MAX_PAGE_BYTES, "tree_page"),
            "tree_page.nodes",
            page.width - page.start,
            lambda v, w: v,
            min_len=1,
        )
        last = page.index == page.count - 1
        if last != (page.start + len(items) == page.width):
            raise ProtocolError(
                "mls.tree-page.shape", "the pages' node ranges do not end with the tree"
            )
        self._count, self._width = page.count, page.width
        self._items.extend(items)
        for authz in page.admissions:
            self._admissions.setdefault(admission_hash(authz), authz)
        self._pages += 1

    def tree(self) -> RatchetTree:
        """The tree the pages hold, decoded strictly, if its hash is the GroupInfo's
        (``mls.welcome.tree-hash``); ``mls.tree-page.missing`` before the last page."""
        if not self.complete:
            raise ProtocolError("mls.tree-page.missing", "not every page of the tree is in")
        tree = RatchetTree.from_obj(self._items, "tree")
        if tree.tree_hash() != self.tree_hash:
            raise ProtocolError(
                "mls.welcome.tree-hash", "the pages' tree hash is not the one the GroupInfo signs"
            )
        return tree

    def admissions(self, tree: RatchetTree) -> tuple[bytes, ...]:
        """The Authorizations the pages carried that ``tree`` (``self.tree()``) names, each
        once; any other the service sent is dropped here."""
        return tuple(a for h, a in self._admissions.items() if tree.admission_in_use(h))
