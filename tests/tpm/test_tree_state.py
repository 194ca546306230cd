"""The groups' trees beside the state file (agent.treestore) with the real state keeper on a
swtpm: a kill -9 at every point of a save (after the journal append, before the state file; at
every step of a state key rotation, which rewrites only the state file), compactions included,
loads the last committed state; a tree file not the one the state names is refused by check id,
kept aside with the state, and the agent starts with empty group state."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any

import pytest

from agent import statefile
from agent.protocol.mls.group import Group
from agent.staterotation import STATE_FILE, STEPS, StateKeeper
from agent.tpm import TPMStore
from agent.treestore import TREE_DIR
from tests.fixtures.swtpm import Swtpm
from tests.pure.test_treestore import Chain, agent_state, loaded_group

pytestmark = pytest.mark.tpm

PCRS = (7, 16)


def _open(store: TPMStore, state_dir: Path) -> StateKeeper:
    keeper = StateKeeper(store, state_dir, PCRS)
    keeper.trees._floor = 0  # compact at a tenth of the snapshot: every few commits here
    keeper.open()
    return keeper


def _marked(group: Group, marker: int) -> dict[str, Any]:
    state = agent_state(group)
    state["marker"] = marker
    return state


def _child(tcti: str, state_dir: Path, group: Group, marker: int, kill_at: str | None) -> None:
    """In a forked child: open, load, save ``group`` (a rotation unless ``kill_at`` is
    "state-write": a plain save killed as it writes the state file), SIGKILL at ``kill_at``."""
    code = 1
    try:

        def fault(step: str) -> None:
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        def killed_write(path: object, data: bytes, mode: int = 0o600) -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        store = TPMStore(tcti)
        keeper = StateKeeper(store, state_dir, PCRS, fault=fault)
        keeper.trees._floor = 0
        keeper.open()
        keeper.load()
        if kill_at == "state-write":
            statefile.atomic_write = killed_write  # type: ignore[assignment]
            keeper.save(_marked(group, marker), destroyed=keeper._destroyed or frozenset())
        else:
            keeper.budget.tokens = keeper.budget.burst  # every run rotates
            keeper.save(_marked(group, marker), destroyed=frozenset({f"epoch/g/{marker}"}))
        store.close()
        code = 0
    finally:
        os._exit(code)


def test_kill9_at_every_point_of_a_save_loads_the_last_committed_trees(
    swtpm: Swtpm, tmp_path: Path
) -> None:
    seed = int(os.environ.get("RELIABILITY_SEED", "1717"))
    runs = int(os.environ.get("RELIABILITY_TREE_RUNS", "40"))
    rng = random.Random(seed)
    chain = Chain(16)
    groups = [chain.group] + [chain.step() for _ in range(runs)]
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    with TPMStore(swtpm.tcti) as store:
        _open(store, state_dir).save(_marked(groups[0], 0), destroyed=frozenset())
    current = 0
    seen: dict[str, int] = {}
    snapshots: set[str] = set()
    for run in range(1, runs + 1):
        kill_at = rng.choice([*STEPS, "state-write", None])
        seen[str(kill_at)] = seen.get(str(kill_at), 0) + 1
        pid = os.fork()
        if pid == 0:
            _child(swtpm.tcti, state_dir, groups[run], run, kill_at)
        _, status = os.waitpid(pid, 0)
        assert (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL) == (
            kill_at is not None
        ), (run, kill_at, status)
        with TPMStore(swtpm.tcti) as store:
            keeper = _open(store, state_dir)
            context = (seed, run, kill_at)
            assert keeper.rollback is None and not keeper.created, context
            state = keeper.load()
            assert state is not None, context
            committed = kill_at is None or (
                kill_at != "state-write" and STEPS.index(kill_at) >= STEPS.index("incremented")
            )
            expected = run if committed else current
            assert state["marker"] == expected, context
            group = loaded_group(state, chain)
            assert group.tree_hash() == groups[expected].tree_hash(), context
            current = expected
            tree_files = sorted(p.name for p in (state_dir / TREE_DIR).iterdir())
            assert len([n for n in tree_files if n.endswith(".snap")]) == 1, context
            assert len(tree_files) <= 2, context  # its journal at most: the rest collected
            snapshots.update(n for n in tree_files if n.endswith(".snap"))
    assert set(seen) == {*STEPS, "state-write", "None"}, seen
    assert len(snapshots) > 3  # compactions happened along the way


def test_a_tampered_journal_refuses_the_state_and_starts_empty(
    swtpm: Swtpm, tmp_path: Path
) -> None:
    chain = Chain(16)
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    with TPMStore(swtpm.tcti) as store:
        keeper = _open(store, state_dir)
        keeper.trees._floor = 1 << 20
        keeper.save(agent_state(chain.group), destroyed=frozenset())
        keeper.save(agent_state(chain.step()), destroyed=frozenset())
    (journal,) = (state_dir / TREE_DIR).glob("*.journal")
    blob = bytearray(journal.read_bytes())
    blob[-1] ^= 1
    journal.write_bytes(bytes(blob))
    with TPMStore(swtpm.tcti) as store:
        keeper = _open(store, state_dir)
        assert keeper.load() is None  # nothing of it loaded
        assert keeper.rollback_check == "state.tree.journal"
        assert keeper.rollback is not None and "state.tree.journal" in keeper.rollback
        aside = sorted(p.name for p in state_dir.iterdir() if ".rollback." in p.name)
        assert [n.split(".rollback.")[0] for n in aside] == [STATE_FILE, TREE_DIR]
        assert not (state_dir / STATE_FILE).exists()
        # the agent goes on with empty group state: its next save is a whole new state
        keeper.save(agent_state(chain.group), destroyed=frozenset())
    with TPMStore(swtpm.tcti) as store:
        state = _open(store, state_dir).load()
        assert state is not None
        assert loaded_group(state, chain).tree_hash() == chain.group.tree_hash()
