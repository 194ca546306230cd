"""The groups' trees saved beside the state file (agent.treestore, agent.protocol.treejournal):
a save after a commit writes the nodes it changed, a crash at any point loads the last committed
state, and a snapshot or journal that is not the one the state file names is refused by check id
with nothing loaded."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent import statefile
from agent.protocol import treejournal as tj
from agent.protocol.errors import StateError
from agent.protocol.hpke import serialize_public_key
from agent.protocol.mls.group import Group
from agent.protocol.secret import Secret
from agent.protocol.treejournal import TreeRef, TreeRefused
from agent.protocol.wire.messages.group import CommitMessage
from agent.protocol.wire.messages.service import CommitAction
from agent.statefile import StateFile
from agent.treestore import TREE_KEY, TreeStore, inline_trees
from tests.pure.test_agent_core import G, group_of_two, state_bytes
from tests.pure.test_mls_group import Member, new_key

pytestmark = pytest.mark.pure

N = 1000


class Chain:
    """Member 0 of an N-member group, self-updating (one commit per ``step``), with the leaf
    keys its states refer to."""

    def __init__(self, n: int, name: bytes = b"g") -> None:
        members = [Member.new() for _ in range(n)]
        self.signer = members[0].signature_key
        self.group = Group.assemble(
            name, [(m.key_package(), m.leaf_key, m.signature_key) for m in members], epoch=1
        )[0]
        self.keys: dict[bytes, ec.EllipticCurvePrivateKey] = {
            serialize_public_key(members[0].leaf_key.public_key()): members[0].leaf_key
        }

    def step(self) -> Group:
        leaf = new_key()
        self.keys[serialize_public_key(leaf.public_key())] = leaf
        self.group = self.group.update(self.signer, leaf).group
        return self.group

    def resolve(self, public: bytes) -> ec.EllipticCurvePrivateKey:
        return self.keys[public]


@pytest.fixture(scope="module")
def big() -> Chain:
    return Chain(N)


def agent_state(group: Group, *pending: Group, name: str = "g") -> dict[str, Any]:
    """The part of ``AgentCore.to_state(inline_trees=False)`` the tree store looks at."""
    return {
        "v": 1,
        "seq": group.epoch,
        "groups": {
            name: {
                "group": group.to_state(inline_tree=False),
                "pending": [
                    {"commit": b"c", "group": p.to_state(inline_tree=False), "command_id": None}
                    for p in pending
                ],
            }
        },
    }


def loaded_group(state: dict[str, Any], chain: Chain, name: str = "g") -> Group:
    return Group.from_state(state["groups"][name]["group"], chain.resolve)


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


class Disk:
    def __init__(self, root: Path, **store: int) -> None:
        self.root = root
        self.key = Secret(os.urandom(32))
        self.store = store
        self.file = self.open()

    def open(self) -> StateFile:
        trees = TreeStore(self.root / "tree", **self.store)
        return StateFile(self.root / "agent.state", self.key, trees=trees)

    def load(self) -> dict[str, Any]:
        """A fresh start's load (and its collection of unnamed tree files)."""
        self.file = self.open()
        state = self.file.load()
        assert self.file.trees is not None
        self.file.trees.collect()
        return state

    def journal_size(self) -> int:
        return sum(p.stat().st_size for p in (self.root / "tree").glob("*.journal"))


def _fail_state_write(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(path: object, data: bytes, mode: int = 0o600) -> None:
        raise StateError("disk full (test)")

    monkeypatch.setattr(statefile, "atomic_write", fail)


def test_a_save_after_a_commit_writes_the_changed_nodes_only(tmp_path: Path, big: Chain) -> None:
    disk = Disk(tmp_path)
    disk.file.save(agent_state(big.group))
    trees = disk.file.trees
    assert trees is not None
    first = trees.bytes_written
    assert first > 500 * N  # the snapshot: the whole tree once
    state_sizes = []
    for _ in range(4):
        before_tree, before_journal = trees.bytes_written, disk.journal_size()
        disk.file.save(agent_state(big.step()))
        record = disk.journal_size() - before_journal
        assert trees.bytes_written - before_tree == record  # no snapshot, one record
        assert 0 < record < 10_000
        state_sizes.append(disk.file.bytes_written)
    assert max(state_sizes) < 4_000  # the state file holds no node of the tree
    small = Disk(tmp_path / "small")
    (tmp_path / "small").mkdir()
    small.file.save(agent_state(Chain(4).step()))
    # what grows is the node private keys of our direct path: O(log N), 10 nodes at 1,000
    assert small.file.bytes_written < state_sizes[-1] < small.file.bytes_written + 10 * 40
    state = disk.load()
    group = loaded_group(state, big)
    assert group.epoch == big.group.epoch
    assert group.tree_hash() == big.group.tree_hash()
    assert group.to_state() == big.group.to_state()


def test_a_pending_commits_tree_is_saved_as_its_changes(tmp_path: Path) -> None:
    chain = Chain(16)
    base = chain.group
    pending = base.update(chain.signer, new_key()).group
    disk = Disk(tmp_path)
    disk.file.save(agent_state(base, pending))
    state = disk.load()
    saved = state["groups"]["g"]["pending"][0]["group"]["public"]["tree"]
    assert saved.tree_hash() == pending.tree.tree_hash()
    assert loaded_group(state, chain).tree_hash() == base.tree_hash()


def test_a_crash_after_the_journal_append_loads_the_last_committed_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain = Chain(64)
    disk = Disk(tmp_path)
    disk.file.save(agent_state(chain.group))
    disk.file.save(agent_state(chain.step()))
    committed = chain.group
    journal = disk.journal_size()
    with monkeypatch.context() as m:
        _fail_state_write(m)
        with pytest.raises(StateError, match="disk full"):
            disk.file.save(agent_state(chain.step()))
    assert disk.journal_size() > journal  # the record is there, past what the state names
    assert loaded_group(disk.load(), chain).tree_hash() == committed.tree_hash()
    # the next save cuts the uncommitted record and appends its own
    disk.file.save(agent_state(chain.step()))
    assert loaded_group(disk.load(), chain).tree_hash() == chain.group.tree_hash()
    # the same in the process that failed: its base stayed the committed state
    again = Disk(tmp_path / "b")
    (tmp_path / "b").mkdir()
    again.file.save(agent_state(chain.group))
    with monkeypatch.context() as m:
        _fail_state_write(m)
        with pytest.raises(StateError):
            again.file.save(agent_state(chain.step()))
    again.file.save(agent_state(chain.step()))
    assert loaded_group(again.load(), chain).tree_hash() == chain.group.tree_hash()


def test_compaction_and_a_crash_on_either_side_of_its_state_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain = Chain(16)
    disk = Disk(tmp_path, compact_floor=2_500)  # a record of a 16-member tree is ~1 KB
    disk.file.save(agent_state(chain.group))
    snapshots = {p.name for p in (tmp_path / "tree").glob("*.snap")}
    while {p.name for p in (tmp_path / "tree").glob("*.snap")} == snapshots:
        disk.file.save(agent_state(chain.step()))
    # compacted: a new snapshot; the old one and its journal went after the state file
    tree_dir = tmp_path / "tree"
    assert len(list(tree_dir.glob("*.snap"))) == 2  # the old one is removed by collect
    assert loaded_group(disk.load(), chain).tree_hash() == chain.group.tree_hash()
    assert len(list(tree_dir.glob("*.snap"))) == 1
    assert not list(tree_dir.glob("*.journal"))  # the new snapshot's journal is still empty
    # a crash after the new snapshot, before the state file that names it
    committed = chain.group
    while True:
        names = set(files(tree_dir))
        with monkeypatch.context() as m:
            _fail_state_write(m)
            with pytest.raises(StateError):
                disk.file.save(agent_state(chain.step()))
        if len(list(tree_dir.glob("*.snap"))) == 2:
            break
        disk.file.save(agent_state(chain.group))
        committed = chain.group
    orphan = (set(files(tree_dir)) - names) - {p.name for p in tree_dir.glob("*.journal")}
    assert len(orphan) == 1
    assert loaded_group(disk.load(), chain).tree_hash() == committed.tree_hash()
    assert not (set(files(tree_dir)) & orphan)  # the uncommitted snapshot removed at start
    disk.file.save(agent_state(chain.group))
    assert loaded_group(disk.load(), chain).tree_hash() == chain.group.tree_hash()


def test_stray_files_are_removed_at_start(tmp_path: Path) -> None:
    chain = Chain(4)
    disk = Disk(tmp_path)
    disk.file.save(agent_state(chain.group))
    tree_dir = tmp_path / "tree"
    named = set(files(tree_dir))
    (tree_dir / f"{'ab' * 32}.snap").write_bytes(b"old")
    (tree_dir / f"{'ab' * 32}.journal").write_bytes(b"old")
    (tree_dir / ".x.snap.tmp").write_bytes(b"half")
    disk.load()
    assert set(files(tree_dir)) == named


def test_an_older_state_file_with_inline_trees_loads_and_is_migrated(tmp_path: Path) -> None:
    chain = Chain(16)
    key = Secret(os.urandom(32))
    old = StateFile(tmp_path / "agent.state", key)
    inline = {"groups": {"g": {"group": chain.group.to_state(), "pending": []}}}
    old.save(inline)
    size = (tmp_path / "agent.state").stat().st_size
    trees = TreeStore(tmp_path / "tree")
    new = StateFile(tmp_path / "agent.state", key, trees=trees)
    state = new.load()
    assert state == inline  # as it was: the core decodes the tree
    new.save(state)
    assert (tmp_path / "agent.state").stat().st_size < size / 2
    assert len(list((tmp_path / "tree").glob("*.snap"))) == 1
    loaded = StateFile(tmp_path / "agent.state", key, trees=TreeStore(tmp_path / "tree")).load()
    assert loaded_group(loaded, chain).to_state() == chain.group.to_state()
    assert inline_trees(loaded) == inline


def test_a_new_state_key_rewrites_only_the_state_file(tmp_path: Path) -> None:
    chain = Chain(16)
    disk = Disk(tmp_path)
    disk.file.save(agent_state(chain.group))
    disk.file.save(agent_state(chain.step()))
    trees = disk.file.trees
    assert trees is not None
    before = files(tmp_path / "tree")
    key = Secret(os.urandom(32))
    rotated = StateFile(tmp_path / "agent.state.next", key, counter=1, trees=trees)
    rotated.save(agent_state(chain.group))
    assert files(tmp_path / "tree") == before
    fresh = StateFile(
        tmp_path / "agent.state.next", key, counter=1, trees=TreeStore(tmp_path / "tree")
    )
    assert loaded_group(fresh.load(), chain).tree_hash() == chain.group.tree_hash()


# -- attacks -------------------------------------------------------------------------------------


def _journal(tmp: Path) -> Path:
    (journal,) = (tmp / "tree").glob("*.journal")
    return journal


def _snapshot(tmp: Path) -> Path:
    (snap,) = (tmp / "tree").glob("*.snap")
    return snap


def _records(blob: bytes) -> list[bytes]:
    out, at = [], 0
    while at < len(blob):
        size = int.from_bytes(blob[at : at + 4], "big")
        out.append(blob[at : at + 4 + size])
        at += 4 + size
    return out


def _flip(path: Path, at: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[at] ^= 1
    path.write_bytes(bytes(blob))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def _swap_records(path: Path) -> None:
    records = _records(path.read_bytes())
    records[0], records[1] = records[1], records[0]
    path.write_bytes(b"".join(records))


def _drop_last_record(path: Path) -> None:
    path.write_bytes(b"".join(_records(path.read_bytes())[:-1]))


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Disk, Chain]:
    chain = Chain(16)
    disk = Disk(tmp_path)
    disk.file.save(agent_state(chain.group))
    for _ in range(3):
        disk.file.save(agent_state(chain.step()))
    return disk, chain


def _refused(disk: Disk, check: str) -> None:
    tree_dir = disk.root / "tree"
    before = files(tree_dir)
    file = disk.open()
    with pytest.raises(TreeRefused) as refused:
        file.load()
    assert refused.value.check == check
    assert file.generation == 0  # nothing of the state taken
    assert file.trees is not None
    assert file.trees._slots == {} and file.trees._key is None
    assert files(tree_dir) == before  # and nothing on disk touched


@pytest.mark.parametrize(
    ("attack", "check"),
    [
        (lambda t: _flip(_journal(t), 40), "state.tree.journal"),
        (lambda t: _truncate(_journal(t)), "state.tree.journal"),
        (lambda t: _swap_records(_journal(t)), "state.tree.journal"),
        (lambda t: _drop_last_record(_journal(t)), "state.tree.journal"),
        (lambda t: _journal(t).unlink(), "state.tree.journal"),
        (lambda t: _flip(_snapshot(t), 100), "state.tree.snapshot"),
        (lambda t: _snapshot(t).unlink(), "state.tree.snapshot"),
    ],
    ids=["tampered-record", "truncated", "swapped", "rolled-back", "journal-gone", "snap", "gone"],
)
def test_a_tree_file_not_the_one_named_is_refused(
    saved: tuple[Disk, Chain], attack: Callable[[Path], None], check: str
) -> None:
    disk, _ = saved
    attack(disk.root)
    _refused(disk, check)


def test_a_rolled_back_snapshot_is_refused(tmp_path: Path) -> None:
    """An older snapshot of the same group put in place of the current one (same name)."""
    chain = Chain(16)
    disk = Disk(tmp_path, compact_floor=1)  # compacted at a tenth of the snapshot
    disk.file.save(agent_state(chain.group))
    older = _snapshot(tmp_path).read_bytes()
    while _snapshot(tmp_path).read_bytes() == older:
        disk.file.save(agent_state(chain.step()))
        disk.load()  # collects the replaced snapshot
    _snapshot(tmp_path).write_bytes(older)
    _refused(disk, "state.tree.snapshot")


def test_a_journal_of_another_group_is_refused(tmp_path: Path) -> None:
    """Another group's journal, or one of its records, in place of this group's."""
    ours, theirs = Chain(16, b"g"), Chain(16, b"h")
    a, b = Disk(tmp_path / "a"), Disk(tmp_path / "b")
    for disk, chain, name in ((a, ours, "g"), (b, theirs, "h")):
        disk.root.mkdir()
        disk.file.save(agent_state(chain.group, name=name))
        disk.file.save(agent_state(chain.step(), name=name))
    _journal(a.root).write_bytes(_journal(b.root).read_bytes())
    _refused(a, "state.tree.journal")


def test_a_tree_not_the_one_named_is_refused_after_replay(saved: tuple[Disk, Chain]) -> None:
    """The state file names the tree hash the replay must reach (the journal itself consistent)."""
    disk, _ = saved
    state = disk.file.load()
    plain = StateFile(disk.root / "agent.state", disk.key)
    inner = plain.load()
    inner["groups"]["g"]["group"]["public"]["tree"]["th"] = bytes(32)
    plain.generation = disk.file.generation
    plain.save(inner)
    assert state["groups"]["g"]["group"]["public"]["tree"].tree_hash() != bytes(32)
    _refused(disk, "state.tree.hash")


def test_the_tree_key_is_in_the_state_file_only(saved: tuple[Disk, Chain]) -> None:
    disk, _ = saved
    key = StateFile(disk.root / "agent.state", disk.key).load()[TREE_KEY]
    for blob in files(disk.root / "tree").values():
        assert key not in blob


def test_an_agents_state_resumes_exactly_through_the_tree_files(tmp_path: Path) -> None:
    """``AgentCore.to_state(inline_trees=False)`` saved, loaded and restored (a pending commit
    across the restart, as in test_agent_core's resume test)."""
    service, a, _ = group_of_two()
    (commit,) = service.request_commit("dev-a", CommitAction.UPDATE)
    assert isinstance(commit, CommitMessage)
    disk = Disk(tmp_path)
    disk.file.save(a.to_state(inline_trees=False))
    raw = StateFile(tmp_path / "agent.state", disk.key).load()
    assert TreeRef.is_ref(raw["groups"][G]["group"]["public"]["tree"])
    resumed = service.restarted(a)
    resumed.restore(disk.load())
    assert resumed.epoch(G) == 1 and resumed.pending_commits(G) == 1
    assert state_bytes(resumed) == state_bytes(a)


def test_a_group_made_again_under_its_name_gets_a_new_snapshot(tmp_path: Path) -> None:
    """A tree unrelated to the last one saved (a group of that name left and joined again):
    a new snapshot, not a journal record of the whole tree."""
    disk = Disk(tmp_path)
    disk.file.save(agent_state(Chain(64).group))
    other = Chain(64)
    disk.file.save(agent_state(other.group))
    assert not list((tmp_path / "tree").glob("*.journal"))
    assert loaded_group(disk.load(), other).tree_hash() == other.group.tree_hash()
    assert len(list((tmp_path / "tree").glob("*.snap"))) == 1


def test_a_record_is_bound_to_its_group_place_and_snapshot() -> None:
    """Below the running hash (which the state file authenticates): a record sealed for another
    group, another sequence number or another snapshot does not decrypt, even in a journal
    whose running hash were named."""
    key, snap = os.urandom(32), tj.sha256(b"snapshot")
    change = (3, [[0, None]])

    def ref_of(frame: bytes) -> TreeRef:
        return TreeRef(snap, 1, len(frame), tj.chain(snap, frame), bytes(32))

    good = tj.seal_record(key, snap, 0, "g", change, nonce=os.urandom(12))
    items: list[object] = [1, 2, 3]
    tj.replay(key, "g", items, good, ref_of(good))
    assert items == [None, 2, 3]
    for frame in (
        tj.seal_record(key, snap, 0, "h", change, nonce=os.urandom(12)),
        tj.seal_record(key, snap, 1, "g", change, nonce=os.urandom(12)),
        tj.seal_record(key, tj.sha256(b"other"), 0, "g", change, nonce=os.urandom(12)),
    ):
        with pytest.raises(TreeRefused) as refused:
            tj.replay(key, "g", [1, 2, 3], frame, ref_of(frame))
        assert refused.value.check == "state.tree.journal"
        assert "does not authenticate" in str(refused.value)
