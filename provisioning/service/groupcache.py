"""Each instance's in-memory copies of active groups' public state (``Env.groups``).

Decoding a group's stored public tree and hashing it is O(N) work; a commit needs only O(log N)
once the decoded tree (with its cached node hashes and key indexes) is at hand. The cache maps a
group id to the ``PublicGroup`` decoded or accepted by this instance together with the group
row's ``state_token`` at that state. A copy is used only while the row, read in the transaction
that uses it, still carries that token (every write of the public state, by any instance,
writes a fresh random token), so an instance whose copy is stale (another instance accepted a
commit or rolled one back) decodes the row again. A copy made in a transaction that then rolls
back carries a token no row ever has: it is never used. ``PublicGroup`` and its tree are
immutable (a commit builds the next epoch's tree as a copy-on-write copy), so a copy can be
shared by concurrent calls.

A copy that is behind (another instance accepted the group's newest commits) is brought up to the
row by replaying those commits from the commit log (``replay``: each verified as when it was
accepted, O(log N) each) rather than decoding the whole tree again, and used only if the state it
reaches is the row's: the same head (epoch, width, both transcript hashes) and GroupContext
(which holds the tree hash). Otherwise (the copy is ahead of the row, a rollback took its epoch
back, the commits are no longer kept) the row is decoded.

``TreePageCache`` keeps groups' recent trees and a few of them cut into pages for joiners, and
``RequestBuckets`` each device's budget of tree requests (``provisioning.service.treepages``).

Bounded two ways, least recently used first out: at most ``max_groups`` groups and
``max_leaves`` leaves in all (a copy's memory grows with its tree: every leaf holds its DevID
certificate).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

from agent.protocol.errors import ProtocolError
from agent.protocol.mls.messages import Commit
from agent.protocol.mls.public import PublicGroup
from agent.protocol.mls.tree import RatchetTree
from agent.protocol.mls.treepages import TreePage as Page
from agent.protocol.mls.treepages import paginate
from provisioning.service.store import trees

MAX_GROUPS = 64
MAX_LEAVES = 400_000
MAX_REPLAY = 64
"""Most commits replayed to bring a copy up to its row (beyond: decode the row)."""


class GroupCache:
    """group id -> (state token, public group), least recently used first out."""

    def __init__(self, max_groups: int = MAX_GROUPS, max_leaves: int = MAX_LEAVES) -> None:
        self.max_groups = max_groups
        self.max_leaves = max_leaves
        self._entries: OrderedDict[str, tuple[bytes, PublicGroup]] = OrderedDict()
        self._leaves = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.replays = 0

    def get(self, group_id: str, token: bytes | None) -> PublicGroup | None:
        """The copy of ``group_id`` made for ``token`` (the row's current token), or None."""
        with self._lock:
            entry = self._entries.get(group_id)
            if token is None or entry is None or entry[0] != token:
                self.misses += 1
                return None
            self._entries.move_to_end(group_id)
            self.hits += 1
            return entry[1]

    def peek(self, group_id: str) -> PublicGroup | None:
        """The copy of ``group_id`` whatever its token (to bring up to date: ``replay``)."""
        with self._lock:
            entry = self._entries.get(group_id)
            return None if entry is None else entry[1]

    def replayed(self) -> None:
        with self._lock:
            self.replays += 1

    def put(self, group_id: str, token: bytes | None, public: PublicGroup) -> None:
        """Keep ``public`` as the state the row with ``token`` holds (None: keep nothing)."""
        with self._lock:
            self._drop(group_id)
            if token is None or public.tree.n_leaves > self.max_leaves:
                return
            self._entries[group_id] = (token, public)
            self._leaves += public.tree.n_leaves
            while len(self._entries) > self.max_groups or self._leaves > self.max_leaves:
                self._drop(next(iter(self._entries)))

    def _drop(self, group_id: str) -> None:
        entry = self._entries.pop(group_id, None)
        if entry is not None:
            self._leaves -= entry[1].tree.n_leaves

    def __len__(self) -> int:
        return len(self._entries)


def replay(
    copy: PublicGroup, commits: Sequence[bytes], *, head: bytes, group_context: bytes
) -> PublicGroup | None:
    """``copy`` with ``commits`` (the commit log's, from ``copy``'s epoch on, encoded) applied
    as the service accepted them, if that is the state the row holds (``head`` and
    ``group_context`` are the row's); None otherwise (the caller decodes the row)."""
    if len(commits) > MAX_REPLAY:
        return None
    public = copy
    try:
        for data in commits:
            public = public.apply(Commit.decode(data))
    except ProtocolError:
        return None
    if trees.head(public.state) != head or public.state.group_context() != group_context:
        return None
    return public


Admissions = Callable[[Sequence[bytes]], dict[bytes, bytes]]
"""Admission hashes -> the stored Authorizations among them, by hash
(``store.admissions.load`` with the session bound): what a tree's pages carry."""
MAX_PAGED = 2
"""Trees whose pages one instance keeps cut, by default (``[groups] tree_pages_kept``; a
100,000-member tree is about 100 MB of pages)."""
MAX_KEPT_EPOCHS = 64
"""Recent trees a group keeps for joiners (epochs whose commits added members)."""
MAX_KEPT_GROUPS = 64


class TreePageCache:
    """Trees for joiners (``provisioning.service.treepages``): each group's trees of its recent
    epochs that added members (``keep``, when this instance accepts such a commit: copies of
    the live tree that share all but O(log N) nodes with it, so cheap to keep), and the pages
    of the last few trees asked for, by (group, epoch, tree hash), including trees rebuilt from
    the database for epochs this instance keeps no tree of. Least recently used first out;
    harmless to lose (any instance can rebuild a tree the database keeps)."""

    def __init__(
        self,
        max_paged: int = MAX_PAGED,
        max_epochs: int = MAX_KEPT_EPOCHS,
        max_groups: int = MAX_KEPT_GROUPS,
    ) -> None:
        if max_paged < 1:
            raise ValueError("tree_pages_kept must be at least 1")
        self.max_paged = max_paged
        self.max_epochs = max_epochs
        self.max_groups = max_groups
        self._trees: OrderedDict[str, OrderedDict[int, RatchetTree]] = OrderedDict()
        self._pages: OrderedDict[tuple[str, int, bytes], list[Page]] = OrderedDict()
        self._making: dict[tuple[str, int, bytes], threading.Lock] = {}
        self._lock = threading.Lock()

    def keep(self, group_id: str, epoch: int, tree: RatchetTree) -> None:
        """``tree`` is the group's tree at ``epoch`` (a later commit at the same epoch, after a
        rollback, replaces it)."""
        with self._lock:
            trees = self._trees.pop(group_id, OrderedDict())
            trees.pop(epoch, None)
            trees[epoch] = tree
            while len(trees) > self.max_epochs:
                trees.popitem(last=False)
            self._trees[group_id] = trees
            while len(self._trees) > self.max_groups:
                self._trees.popitem(last=False)

    def tree(self, group_id: str, epoch: int) -> RatchetTree | None:
        with self._lock:
            trees = self._trees.get(group_id)
            return None if trees is None else trees.get(epoch)

    def pages(
        self, group_id: str, epoch: int, tree: RatchetTree, admissions: Admissions
    ) -> list[Page]:
        """``tree`` (the group's at ``epoch``) cut into pages, once per tree, with the
        Authorizations ``admissions`` finds for the admission hashes its leaves record."""
        cut = self._cut((group_id, epoch, tree.tree_hash()), lambda: tree, admissions)
        assert cut is not None
        return cut

    def rebuilt_pages(
        self,
        group_id: str,
        epoch: int,
        group_context: bytes,
        rebuild: Callable[[], RatchetTree | None],
        admissions: Admissions,
    ) -> list[Page] | None:
        """The pages of the group's tree at ``epoch`` whose GroupContext (which holds its tree
        hash) is ``group_context``: cut once from the tree ``rebuild`` gives (from the database:
        ``store.trees.load_at``), None if it gives none."""
        return self._cut((group_id, epoch, b"context:" + group_context), rebuild, admissions)

    def _cut(
        self,
        key: tuple[str, int, bytes],
        tree: Callable[[], RatchetTree | None],
        admissions: Admissions,
    ) -> list[Page] | None:
        """The pages kept under ``key``, or ``tree()`` cut and kept. Concurrent calls for one
        key make it once: the others wait for it (a rebuild is O(N))."""
        with self._lock:
            making = self._making.setdefault(key, threading.Lock())
        with making:
            with self._lock:
                cut = self._pages.get(key)
                if cut is not None:
                    self._pages.move_to_end(key)
                    self._making.pop(key, None)
                    return cut
            made = tree()
            cut = (
                None
                if made is None
                else paginate(made, admissions=admissions(made.admission_hashes()))
            )
            with self._lock:
                self._making.pop(key, None)
                if cut is not None:
                    self._pages[key] = cut
                    while len(self._pages) > self.max_paged:
                        self._pages.popitem(last=False)
            return cut


MAX_BUCKETS = 200_000
"""Devices whose tree-request budget one instance tracks (least recently asking first out: a
device dropped starts again with a full bucket)."""


class RequestBuckets:
    """A token bucket per device (``treepages``: tree requests): ``burst`` requests at once, then
    ``per_minute`` a minute. Per instance, in memory: a device whose requests are spread over n
    instances gets at most n times the budget."""

    def __init__(self, max_devices: int = MAX_BUCKETS) -> None:
        self.max_devices = max_devices
        self._buckets: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, device_id: str, now: int, *, per_minute: int, burst: int) -> bool:
        """Spend one of ``device_id``'s tokens at ``now``; False (nothing spent) if it has none."""
        with self._lock:
            tokens, last = self._buckets.pop(device_id, (float(burst), now))
            tokens = min(float(burst), tokens + max(0, now - last) * per_minute / 60)
            allowed = tokens >= 1
            if allowed:
                tokens -= 1
            self._buckets[device_id] = (tokens, max(now, last))
            while len(self._buckets) > self.max_devices:
                self._buckets.popitem(last=False)
            return allowed
