"""A joiner's fetch of a group's tree in pages (docs/treekem.md, "Joining a large group"): the
Welcome of a large group references its tree by the hash in its signed GroupInfo; the device
asks the service for page after page (``group.tree_request``), takes each ``svc.tree_page``
into a ``TreeCollector`` and, once all are in, joins with the tree if its hash is the
GroupInfo's and with the operators' Authorizations the pages carried (each taken by the
admission hash a leaf records). A Welcome whose GroupInfo carries a small tree is fetched the
same way when the service delivered it without every Authorization that tree names (it could
not fit them in the Welcome's frame): the pages bring them.

Pure state, driven by the agent core: ``start`` (a Welcome opened, its tree missing), ``page``
(an answer came), ``due`` (the clock: a request unanswered for ``RETRY`` seconds is sent again,
a fetch not done after ``TIMEOUT`` seconds is dropped). Held in memory only: the opened Welcome
holds the joiner's GroupSecrets (never in a repr, never persisted); after a restart the fetch
is gone and the init key, not destroyed until a join succeeds, opens a re-sent Welcome again.
At most ``MAX_FETCHES`` fetches at once (the oldest is dropped for a new one).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from agent.protocol.errors import ProtocolError
from agent.protocol.mls.group import OpenedWelcome
from agent.protocol.mls.messages import KeyPackage
from agent.protocol.mls.tree import RatchetTree
from agent.protocol.mls.treepages import TreeCollector
from agent.protocol.mls.treepages import TreePage as Page
from agent.protocol.wire.messages.group import TreeRequest
from agent.protocol.wire.messages.service import TreePage

RETRY = 30
"""Seconds without an answer before a page is asked for again."""
TIMEOUT = 900
"""Seconds a fetch may take in all (a 100,000-member tree is about 100 pages of 1 MiB)."""
MAX_FETCHES = 4


@dataclass
class Fetch:
    """One join waiting for its tree: the opened Welcome, our KeyPackage (by its leaf public
    key), the pages so far, when it started and when the last request went out, and the
    Authorizations delivered with the Welcome (none unless its tree was inline)."""

    opened: OpenedWelcome = field(repr=False)
    leaf_public: bytes
    key_package: KeyPackage = field(repr=False)
    collector: TreeCollector = field(repr=False)
    started: int
    asked: int
    delivered: tuple[bytes, ...] = field(default=(), repr=False)

    def admissions(self, tree: RatchetTree) -> tuple[bytes, ...]:
        """The Authorizations to join with: the pages' that ``tree`` names, and those delivered
        with the Welcome."""
        return self.collector.admissions(tree) + self.delivered

    def request(self) -> TreeRequest:
        c = self.collector
        return TreeRequest(group_id=c.group_id, epoch=c.epoch, page=c.next_page)


class TreeFetches:
    """The joins waiting for their trees, by group id."""

    def __init__(self) -> None:
        self._fetches: OrderedDict[str, Fetch] = OrderedDict()

    def __len__(self) -> int:
        return len(self._fetches)

    def __contains__(self, group_id: object) -> bool:
        return group_id in self._fetches

    def get(self, group_id: str) -> Fetch | None:
        return self._fetches.get(group_id)

    def start(
        self,
        group_id: str,
        epoch: int,
        opened: OpenedWelcome,
        *,
        leaf_public: bytes,
        key_package: KeyPackage,
        now: int,
        delivered: tuple[bytes, ...] = (),
    ) -> TreeRequest:
        """Begin fetching the tree the opened Welcome's GroupInfo names (a fetch for the same
        group is replaced); returns the request for page 0."""
        self._fetches.pop(group_id, None)
        collector = TreeCollector(group_id, epoch, opened.info.tree_hash)
        fetch = Fetch(opened, leaf_public, key_package, collector, now, now, delivered)
        self._fetches[group_id] = fetch
        while len(self._fetches) > MAX_FETCHES:
            self._fetches.popitem(last=False)
        return fetch.request()

    def page(
        self, body: TreePage, now: int
    ) -> tuple[Fetch, RatchetTree | None, TreeRequest | None]:
        """Take one page: returns the fetch and either the tree (all pages in and its hash the
        GroupInfo's: the fetch is over) or the request for the next page. Refusals:
        ``agent.tree-page.unasked`` (no fetch for that group), the collector's
        ``mls.tree-page.*`` (the page is not taken; the fetch goes on, so a redelivered or
        stray page costs nothing), ``mls.welcome.tree-hash`` or a ``mls.decode*`` of the whole
        tree (the fetch is dropped: the service gave a tree that is not the signed one)."""
        fetch = self._fetches.get(body.group_id)
        if fetch is None:
            raise ProtocolError(
                "agent.tree-page.unasked", f"no join of group {body.group_id!r} awaits its tree"
            )
        fetch.collector.add(
            body.group_id,
            body.epoch,
            Page(body.page, body.pages, body.width, body.start, body.nodes, body.admissions),
        )
        if not fetch.collector.complete:
            fetch.asked = now
            return fetch, None, fetch.request()
        del self._fetches[body.group_id]
        return fetch, fetch.collector.tree(), None

    def drop(self, group_id: str) -> None:
        self._fetches.pop(group_id, None)

    def due(self, now: int) -> tuple[list[TreeRequest], list[str]]:
        """Requests to send again (unanswered for ``RETRY`` seconds) and the groups whose
        fetch timed out (dropped)."""
        again: list[TreeRequest] = []
        expired: list[str] = []
        for group_id, fetch in list(self._fetches.items()):
            if now - fetch.started >= TIMEOUT:
                del self._fetches[group_id]
                expired.append(group_id)
            elif now - fetch.asked >= RETRY:
                fetch.asked = now
                again.append(fetch.request())
        return again, expired
