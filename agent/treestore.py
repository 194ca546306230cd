"""The groups' ratchet trees on disk beside the state file: snapshots and journals in
``<state dir>/tree/`` (encoding in ``agent.protocol.treejournal``; docs/agent.md, "Incremental
state"), so that a save after a commit writes the nodes it changed, not the whole tree.

``externalize`` takes the state map ``AgentCore.to_state(inline_trees=False)`` gives (each
group's tree a ``RatchetTree``; a tree as a node list, from an older state file, is taken too)
and returns the map to write into the state file, each tree replaced by a tree reference; before
returning, it has appended (and fsynced) one journal record per changed tree, or written a new
snapshot for a tree seen the first time or whose journal outgrew a tenth of its snapshot. The
state file written after it is the commit point: ``committed`` then makes what it names the base
of the next save. A pending commit's tree is kept in the state file itself, as its changes
against its group's tree (a few nodes).

``resolve`` is the inverse at load: every tree reference of a decrypted state map is replaced by
its tree (snapshot, replayed journal, checked: ``TreeRefused``), all or nothing.
``collect`` removes the files no committed state names (after a save, and at start).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.fsio import atomic_write
from agent.protocol import treejournal as tj
from agent.protocol.errors import StateError
from agent.protocol.mls.tree import RatchetTree
from agent.protocol.secret import Secret

TREE_DIR = "tree"
COMPACT_FLOOR = 64 * 1024
"""A journal is compacted into a new snapshot once it is over a tenth of the snapshot and over
this many bytes (so that a small group does not write a snapshot at every commit)."""
MAX_FILE = 512 * 1024 * 1024
"""The largest snapshot or journal read (a snapshot of 131,072 members is about 130 MB)."""
TREE_KEY = "tree_key"
"""The state map's entry holding the tree key (32 bytes, made with the first snapshot)."""


@dataclass(frozen=True)
class _Slot:
    ref: tj.TreeRef
    base: RatchetTree
    snapshot_size: int


def _public_maps(state: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(group name, its entry) of each group of a state map that holds a tree (a map that does
    not have the shape is left as it is: the core refuses it)."""
    groups = state.get("groups")
    if isinstance(groups, dict):
        for name, entry in groups.items():
            if isinstance(name, str) and _has_tree(entry):
                yield name, entry


def _with_pending(
    entry: dict[str, Any], group: object, each: Callable[[dict[str, Any]], object]
) -> dict[str, Any]:
    """``entry`` with its group's tree ``group`` and each pending commit's tree ``each(p)``."""
    out = {**entry, "group": _with_tree(entry["group"], group)}
    if isinstance(entry.get("pending"), list):
        out["pending"] = [
            {**p, "group": _with_tree(p["group"], each(p))} if _has_tree(p) else p
            for p in entry["pending"]
        ]
    return out


def _has_tree(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("group"), dict)
        and isinstance(entry["group"].get("public"), dict)
        and "tree" in entry["group"]["public"]
    )


def _tree_of(value: object) -> RatchetTree:
    if isinstance(value, RatchetTree):
        return value
    return RatchetTree.from_obj(value, "group_state.public.tree")


def _with_tree(group_state: dict[str, Any], tree: object) -> dict[str, Any]:
    public = dict(group_state["public"])
    public["tree"] = tree
    return {**group_state, "public": public}


class TreeStore:
    """The tree files of one state directory, and the trees the last committed state names."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        rng: Callable[[int], bytes] = os.urandom,
        *,
        compact_floor: int = COMPACT_FLOOR,
    ) -> None:
        self.dir = Path(directory)
        self._rng = rng
        self._floor = compact_floor
        self._key: Secret | None = None
        self._slots: dict[str, _Slot] = {}
        self._staged: dict[str, _Slot] | None = None
        self.bytes_written = 0  # tree bytes written since start (journal records, snapshots)

    def __repr__(self) -> str:
        return f"TreeStore({str(self.dir)!r}, trees={len(self._slots)})"

    # -- saving --------------------------------------------------------------------------------

    def externalize(self, state: dict[str, Any]) -> dict[str, Any]:
        """The state map to write, its trees replaced by references (module text)."""
        groups = state.get("groups")
        if not isinstance(groups, dict) or not _any_tree(state):
            self._staged = {}
            return state
        if self._key is None:
            self._key = Secret(self._rng(32))
        self.dir.mkdir(mode=0o700, exist_ok=True)
        staged: dict[str, _Slot] = {}
        out_groups: dict[str, Any] = dict(groups)
        for name, entry in _public_maps(state):
            tree = _tree_of(entry["group"]["public"]["tree"])
            slot = self._save_tree(name, tree)
            staged[name] = slot

            def changes(p: dict[str, Any], tree: RatchetTree = tree) -> object:
                ptree = _tree_of(p["group"]["public"]["tree"])
                width, nodes = tj.diff(ptree, tree)
                return {"w": width, "n": nodes, "th": ptree.tree_hash()}

            out_groups[name] = _with_pending(entry, slot.ref.to_obj(), changes)
        self._staged = staged
        return {**state, "groups": out_groups, TREE_KEY: self._key.reveal()}

    def committed(self) -> None:
        """The state file ``externalize``'s map went into is on disk: its trees are the base."""
        if self._staged is not None:
            self._slots, self._staged = self._staged, None

    def discard(self) -> None:
        """That state file was not written: the base stays the last committed one."""
        self._staged = None

    def _save_tree(self, name: str, tree: RatchetTree) -> _Slot:
        assert self._key is not None
        slot = self._slots.get(name)
        if slot is None:
            return self._snapshot(name, tree)
        change = tj.diff(tree, slot.base)
        if not change[1] and change[0] == 2 * slot.base.n_leaves - 1:
            return _Slot(slot.ref, tree.copy(), slot.snapshot_size)
        if len(change[1]) > max(64, change[0] // 10):
            # not a commit's few paths (a group of that name made again, a commit adding many
            # members): a new snapshot, not a record of a tenth of the tree or more
            return self._snapshot(name, tree)
        ref = slot.ref
        frame = tj.seal_record(
            self._key.reveal(), ref.snapshot, ref.records, name, change, nonce=self._rng(tj.NONCE)
        )
        limit = max(slot.snapshot_size // 10, self._floor)
        if ref.length + len(frame) > limit or len(frame) > tj.MAX_RECORD:
            return self._snapshot(name, tree)
        self._append(self._journal(ref.snapshot), ref.length, frame)
        new = tj.TreeRef(
            ref.snapshot,
            ref.records + 1,
            ref.length + len(frame),
            tj.chain(ref.head, frame),
            tree.tree_hash(),
        )
        return _Slot(new, tree.copy(), slot.snapshot_size)

    def _snapshot(self, name: str, tree: RatchetTree) -> _Slot:
        assert self._key is not None
        blob = tj.seal_snapshot(self._key.reveal(), name, tree.to_obj(), self._rng(tj.NONCE))
        digest = tj.sha256(blob)
        atomic_write(self._snap(digest), blob)
        self.bytes_written += len(blob)
        ref = tj.TreeRef(digest, 0, 0, digest, tree.tree_hash())
        return _Slot(ref, tree.copy(), len(blob))

    def _append(self, path: Path, at: int, frame: bytes) -> None:
        """Write ``frame`` at ``at`` (cutting what an uncommitted save left past it), fsync."""
        created = not path.exists()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.ftruncate(fd, at)
                os.lseek(fd, at, os.SEEK_SET)
                view = memoryview(frame)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError as exc:
            raise StateError(f"could not write {path}: {exc.strerror or exc}") from None
        self.bytes_written += len(frame)

    def _snap(self, digest: bytes) -> Path:
        return self.dir / f"{digest.hex()}.snap"

    def _journal(self, digest: bytes) -> Path:
        return self.dir / f"{digest.hex()}.journal"

    # -- loading -------------------------------------------------------------------------------

    def resolve(self, state: dict[str, Any]) -> dict[str, Any]:
        """The state map with every tree reference replaced by its tree (``TreeRefused`` if a
        file is not the one named: then nothing changes here). A map without references (an
        older state file, trees inline) is returned as it is."""
        raw_key = state.get(TREE_KEY)
        if raw_key is None:
            return state
        if not isinstance(raw_key, bytes) or len(raw_key) != 32:
            raise StateError("agent state: the tree key is malformed")
        key = raw_key
        slots: dict[str, _Slot] = {}
        out_groups: dict[str, Any] = dict(state.get("groups") or {})
        for name, entry in _public_maps(state):
            ref = tj.TreeRef.from_obj(entry["group"]["public"]["tree"])
            snapshot = self._read(self._snap(ref.snapshot), "state.tree.snapshot", name)
            items = tj.open_snapshot(key, name, snapshot, ref.snapshot)
            if ref.length:
                journal = self._read(self._journal(ref.snapshot), "state.tree.journal", name)
                tj.replay(key, name, items, journal, ref)
            tree = tj.build(name, list(items), ref.tree_hash)

            def pending_tree(
                p: dict[str, Any], items: list[object] = items, name: str = name
            ) -> object:
                inline = p["group"]["public"]["tree"]
                if not isinstance(inline, dict) or set(inline) != {"w", "n", "th"}:
                    raise StateError(f"agent state: group {name!r}: a pending tree is malformed")
                pitems = list(items)
                try:
                    tj.apply(pitems, int(inline["w"]), list(inline["n"]))
                except (TypeError, ValueError) as exc:
                    raise StateError(f"agent state: a pending tree is malformed: {exc}") from None
                return tj.build(name, pitems, bytes(inline["th"]))

            out_groups[name] = _with_pending(entry, tree, pending_tree)
            slots[name] = _Slot(ref, tree.copy(), len(snapshot))
        out = {k: v for k, v in state.items() if k != TREE_KEY}
        out["groups"] = out_groups
        self._key, self._slots, self._staged = Secret(key), slots, None
        return out

    def _read(self, path: Path, check: str, group: str) -> bytes:
        try:
            if path.stat().st_size > MAX_FILE:
                raise tj.TreeRefused(check, f"group {group!r}: {path.name} is over the limit")
            return path.read_bytes()
        except FileNotFoundError:
            raise tj.TreeRefused(
                check, f"group {group!r}: {path.name}, which the state file names, is missing"
            ) from None
        except OSError as exc:
            raise StateError(f"cannot read {path}: {exc.strerror or exc}") from None

    # -- collecting ----------------------------------------------------------------------------

    def collect(self) -> list[str]:
        """Remove the tree files the committed state does not name (a replaced snapshot and
        its journal, files of a save that did not commit); their names."""
        if not self.dir.is_dir():
            return []
        live = set()
        for slot in self._slots.values():
            live.add(self._snap(slot.ref.snapshot).name)
            live.add(self._journal(slot.ref.snapshot).name)
        removed = []
        for path in self.dir.iterdir():
            if path.name not in live:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                removed.append(path.name)
        return sorted(removed)


def inline_trees(state: dict[str, Any]) -> dict[str, Any]:
    """A resolved state map with each tree as a node list again (``to_obj``), as an older state
    file held it (inspection and tests; O(N))."""
    if not _any_tree(state):
        return state
    groups = dict(state["groups"])
    for name, entry in _public_maps(state):
        groups[name] = _with_pending(
            entry,
            _tree_of(entry["group"]["public"]["tree"]).to_obj(),
            lambda p: _tree_of(p["group"]["public"]["tree"]).to_obj(),
        )
    return {**state, "groups": groups}


def _any_tree(state: dict[str, Any]) -> bool:
    return any(True for _ in _public_maps(state))
