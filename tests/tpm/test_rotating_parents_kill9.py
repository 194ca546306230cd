"""kill -9 during the rotating parents' steps (agent.daemon.TpmKeys.settle), against a real
swtpm: a child process runs the agent's save cycle (new leaf blob, "state" saved, collect,
settle) and SIGKILLs itself right after a parent was persisted (``rotated``) or evicted
(``evicted``), or while writing the state. After every crash: no live key's parent was evicted
(every blob the saved state refers to loads), at most 3 parents exist, the current one is found
from the TPM alone, and the next cycle notes every eviction the crash left unnoted. 20 seeded
runs of 6 cycles each.

The "state" here is a JSON file holding the live leaf points and the key ledger, written
atomically: what the encrypted state file holds for these steps."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from agent.daemon import TpmKeys, leaf_file
from agent.protocol.lifecycle import KeyLedger, KeyState
from agent.tpm import KeyBlob, KeyKind, TPMStore
from agent.tpm.parents import RING, current_of, pending_parents
from tests.fixtures.swtpm import Swtpm

pytestmark = pytest.mark.tpm

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, os, random, signal, sys
from pathlib import Path
from agent.core import leaf_name
from agent.daemon import TpmKeys
from agent.fsio import atomic_write
from agent.protocol.hpke import serialize_public_key
from agent.protocol.lifecycle import KeyKind as RecordKind, KeyLedger, KeyState
from agent.staterotation import RotationBudget
from agent.tpm import KeyKind, TPMStore

tcti, base, seed, kill_at, cycle = sys.argv[1:6]
base, rng = Path(base), random.Random(int(seed) * 1000 + int(cycle))
state_path = base / "state.json"
empty = {"live": [], "ledger": None, "t": 0}
saved = json.loads(state_path.read_text()) if state_path.exists() else empty
now = saved["t"] + 3600
ledger = KeyLedger(lambda: now)
if saved["ledger"] is not None:
    ledger = KeyLedger.from_cbor(saved["ledger"], lambda: now)
live = {bytes.fromhex(h) for h in saved["live"]}

def die(step):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

def save():
    die("saving")
    state = {"live": sorted(p.hex() for p in live), "ledger": ledger.to_cbor(), "t": now}
    atomic_write(state_path, json.dumps(state).encode())

store = TPMStore(tcti)
store.flush_transients()  # a killed run's objects (no resource manager on swtpm)
devid = store.create_and_load(KeyKind.DEVID)
keys = TpmKeys(store, devid, base / "leaves")
budget = RotationBudget(per_day=1000, burst=1000, tokens=1000)
# one self-update: a new leaf (blob first), the oldest leaf replaced by it
new = serialize_public_key(keys.new_leaf_key().public_key())
live.add(new)
ledger.add(leaf_name(new), RecordKind.LEAF, active=True)
if len(live) > 2 or rng.random() < 0.5:
    old = min(live - {new})  if len(live) > 1 else None
    if old is not None:
        live.discard(old)
        ledger.transition(leaf_name(old), KeyState.DESTROYED)
keys.note_destroyed(ledger, live)
save()
keys.collect(live)
if keys.settle(ledger, budget, now, fault=die):
    save()
store.close()
"""


def _cycle(swtpm: Swtpm, base: Path, seed: int, kill_at: str, cycle: int) -> int:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, swtpm.tcti, str(base), str(seed), kill_at, str(cycle)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode in (0, -9), result.stderr
    return result.returncode


def _check(swtpm: Swtpm, base: Path) -> None:
    state_path = base / "state.json"
    with TPMStore(swtpm.tcti) as store:
        store.flush_transients()  # what a killed process left loaded
        if not state_path.exists():
            return
        saved = json.loads(state_path.read_text())
        present = {h for h in store.persistent_handles() if h in RING}
        assert len(present) <= 3
        assert current_of(present) in present
        for point in saved["live"]:
            blob = KeyBlob.load(base / "leaves" / leaf_file(bytes.fromhex(point)))
            store.load_key(blob).close()  # never ParentEvicted: the live key's parent is there


def test_kill9_at_every_step_of_parent_rotation_never_strands_a_live_key(
    swtpm: Swtpm, tmp_path: Path
) -> None:
    steps = ("rotated", "evicted", "saving", "none")
    kills: dict[str, int] = dict.fromkeys(steps, 0)
    for seed in range(20):
        base = tmp_path / f"run{seed}"
        base.mkdir()
        rng = random.Random(seed)
        for cycle in range(6):
            kill_at = rng.choice(steps)
            kills[kill_at] += _cycle(swtpm, base, seed, kill_at, cycle) == -9
            _check(swtpm, base)
        # a clean cycle afterwards: every eviction is noted, nothing pending on a gone parent
        _cycle(swtpm, base, seed, "none", 99)
        _check(swtpm, base)
        saved = json.loads((base / "state.json").read_text())
        ledger = KeyLedger.from_cbor(saved["ledger"], lambda: 0)
        with TPMStore(swtpm.tcti) as store:
            present = set(store.persistent_handles())
            for handle in pending_parents(ledger).values():
                assert handle in present
            for record in ledger:
                if record.state is KeyState.DESTROYED:
                    assert record.note is not None and record.note.startswith("flushed")
            ring = [h for h in present if h in RING]
            for handle in ring:  # leave the TPM empty of parents for the next seed
                TpmKeys(store, store.create_and_load(KeyKind.DEVID), base / "x").parents.evict(
                    handle
                )
            store.flush_transients()
        os.sync()
    # each step was really crashed at, several times
    assert kills["none"] == 0 and min(kills["rotated"], kills["evicted"], kills["saving"]) >= 3, (
        kills
    )
