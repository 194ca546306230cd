"""Issue 17, attack 2, against a real swtpm. The adversary: whoever restores an old disk image
or state file (root on the device later, with the TPM). The state key is sealed under the TPM
state counter and rotated when something is destroyed; an older state file or key blob put back
is refused (``state.rollback``) and never loaded; a kill -9 at any step of a rotation leaves
exactly one usable state."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.protocol.secret import Secret
from agent.statefile import StateFile, StateRollback
from agent.staterotation import (
    NEXT_KEY_BLOB,
    NEXT_STATE_FILE,
    STATE_FILE,
    STATE_KEY_BLOB,
    STEPS,
    StateKeeper,
    read_state,
)
from agent.tpm import KeyBlob, TPMStore
from agent.tpm.nvcounter import CounterMoved, NVCounter, unseal_bound
from tests.fixtures.swtpm import Swtpm

pytestmark = pytest.mark.tpm

PCRS = (7, 16)


def _gone(n: int) -> frozenset[str]:
    """The ledger names of n destroyed keys (what ``destroyed_keys`` gives)."""
    return frozenset(f"epoch/g/{i}" for i in range(n))


def _open(store: TPMStore, state_dir: Path, **kwargs: object) -> StateKeeper:
    keeper = StateKeeper(store, state_dir, PCRS, **kwargs)  # type: ignore[arg-type]
    keeper.open()
    return keeper


def _copy(src: Path, dst: Path) -> None:
    dst.mkdir()
    for name in (STATE_KEY_BLOB, STATE_FILE):
        shutil.copy2(src / name, dst / name)


def _restore(backup: Path, state_dir: Path) -> None:
    for name in (STATE_KEY_BLOB, STATE_FILE):
        shutil.copy2(backup / name, state_dir / name)


def test_state_copied_before_a_destruction_is_refused_afterwards(
    swtpm: Swtpm, tmp_path: Path
) -> None:
    """Whoever restores an old disk image: the state from before a destruction comes back as
    state.rollback, nothing of it is loaded, and the old sealed key no longer unseals."""
    state_dir, backup = tmp_path / "state", tmp_path / "backup"
    state_dir.mkdir()
    with TPMStore(swtpm.tcti) as store:
        keeper = _open(store, state_dir)
        assert keeper.created and keeper.load() is None
        keeper.save({"epoch-secret": b"e1", "groups": ["g"]}, destroyed=_gone(0))
        _copy(state_dir, backup)
        old_blob = KeyBlob.load(backup / STATE_KEY_BLOB)
        assert keeper.save({"epoch-secret": b"e2", "groups": ["g"]}, destroyed=_gone(1)) is True
        assert store.transient_handles() == []
    with TPMStore(swtpm.tcti) as store:  # a restart: the new state opens
        assert _open(store, state_dir).load() == {"epoch-secret": b"e2", "groups": ["g"]}
        with pytest.raises(CounterMoved) as refused:
            unseal_bound(NVCounter(store), old_blob)
        assert refused.value.rc == 0x126  # the TPM itself refuses PolicyNV
    _restore(backup, state_dir)
    with TPMStore(swtpm.tcti) as store:
        keeper = _open(store, state_dir)
        assert keeper.rollback is not None and "older state counter" in keeper.rollback
        assert keeper.created and keeper.load() is None  # nothing of the old state loaded
        aside = sorted(p.name for p in state_dir.iterdir() if ".rollback." in p.name)
        assert len(aside) == 2
        # the old file alone, beside the current key: refused by its header before decryption
        key = unseal_bound(NVCounter(store), KeyBlob.load(state_dir / STATE_KEY_BLOB))
        with pytest.raises(StateRollback) as rollback:
            StateFile(backup / STATE_FILE, key, counter=NVCounter(store).read()).load()
        assert rollback.value.check == "state.rollback"


def test_state_file_alone_put_back_beside_the_current_key_is_refused(
    swtpm: Swtpm, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    with TPMStore(swtpm.tcti) as store:
        keeper = _open(store, state_dir)
        keeper.save({"n": 1}, destroyed=_gone(0))
        old = (state_dir / STATE_FILE).read_bytes()
        keeper.save({"n": 2}, destroyed=_gone(1))
    (state_dir / STATE_FILE).write_bytes(old)
    with TPMStore(swtpm.tcti) as store:
        keeper = _open(store, state_dir)
        assert keeper.rollback is not None and keeper.load() is None


def test_reboot_with_old_measurements_does_not_bring_old_state_back(
    swtpm: Swtpm, tmp_path: Path
) -> None:
    """Measurements change (other firmware: PCR 16 extended), the agent starts afresh and the
    counter moves; the old firmware boots again (PCR 16 reset to the old value) with the old
    files put back: the old key does not unseal (counter), the state is refused."""
    state_dir, backup = tmp_path / "state", tmp_path / "backup"
    state_dir.mkdir()
    with TPMStore(swtpm.tcti) as store:
        _open(store, state_dir).save({"secret": b"old"}, destroyed=_gone(0))
        _copy(state_dir, backup)
        store.pcr_extend(16, hashlib.sha256(b"other firmware").digest())
        keeper = _open(store, state_dir)
        assert keeper.sealed_elsewhere and keeper.created and keeper.rotations == 1
        keeper.save({"secret": b"new"}, destroyed=_gone(0))
        store.pcr_reset(16)  # the old measurements are back
        with pytest.raises(CounterMoved):
            unseal_bound(NVCounter(store), KeyBlob.load(backup / STATE_KEY_BLOB))
    for aside in state_dir.glob("*.sealed-elsewhere.*"):
        aside.unlink()
    _restore(backup, state_dir)
    with TPMStore(swtpm.tcti) as store:
        keeper = _open(store, state_dir)
        assert keeper.rollback is not None and keeper.load() is None


def test_version1_state_is_migrated_once(swtpm: Swtpm, tmp_path: Path) -> None:
    """A state of version 1 (key sealed to PCRs only, file without counter) is read once and
    written again under the counter; the version 1 key blob no longer exists."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    key = Secret(os.urandom(32))
    with TPMStore(swtpm.tcti) as store:
        store.seal(key, PCRS).save(state_dir / STATE_KEY_BLOB)
        legacy = StateFile(state_dir / STATE_FILE, key)
        legacy.save({"groups": ["g"]})
        raw = bytearray((state_dir / STATE_FILE).read_bytes())
        # a version 1 file: the header without the counter field
        v1 = bytes(raw[:4]) + b"\x01" + bytes(raw[5:13]) + bytes(raw[21:])
    header = v1[:25]
    body = AESGCM(key.reveal()).encrypt(header[-12:], cbor2.dumps({"groups": ["g"]}), header)
    (state_dir / STATE_FILE).write_bytes(header + body)
    with TPMStore(swtpm.tcti) as store:
        keeper = _open(store, state_dir)
        assert keeper.migrated and keeper.load() == {"groups": ["g"]}
        assert KeyBlob.load(state_dir / STATE_KEY_BLOB).policy[1].command_code == 0x149
    with TPMStore(swtpm.tcti) as store:
        again = _open(store, state_dir)
        assert not again.migrated and again.rollback is None
        assert again.load() == {"groups": ["g"]}
        assert read_state(store, state_dir) == {"groups": ["g"]}


def _child_rotation(tcti: str, state_dir: Path, marker: int, kill_at: str | None) -> None:
    """In a forked child: open, save a state that destroyed something (a rotation), SIGKILL
    itself at ``kill_at``."""
    code = 1
    try:

        def fault(step: str) -> None:
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        store = TPMStore(tcti)
        keeper = StateKeeper(store, state_dir, PCRS, fault=fault)
        keeper.open()
        keeper.load()
        keeper.budget.tokens = keeper.budget.burst  # every run rotates
        keeper.save({"marker": marker}, destroyed=frozenset({f"epoch/g/{marker}"}))
        store.close()
        code = 0
    finally:
        os._exit(code)


def test_kill9_at_every_step_of_a_rotation_leaves_exactly_one_state(
    swtpm: Swtpm, tmp_path: Path
) -> None:
    """100 seeded runs: a child rotates the state key and is killed (SIGKILL) at a seeded step
    (or completes); the next start finds exactly one usable state, the old one if the kill came
    before the counter moved, the new one after, never none, never both."""
    seed = int(os.environ.get("RELIABILITY_SEED", "1717"))
    runs = int(os.environ.get("RELIABILITY_KILL_RUNS", "100"))
    rng = random.Random(seed)
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    with TPMStore(swtpm.tcti) as store:
        _open(store, state_dir).save({"marker": 0}, destroyed=_gone(0))
    current = 0
    seen: dict[str, int] = {}
    for run in range(1, runs + 1):
        kill_at = rng.choice([*STEPS, None])
        seen[str(kill_at)] = seen.get(str(kill_at), 0) + 1
        pid = os.fork()
        if pid == 0:
            _child_rotation(swtpm.tcti, state_dir, run, kill_at)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert killed == (kill_at is not None), (run, kill_at, status)
        with TPMStore(swtpm.tcti) as store:
            keeper = _open(store, state_dir)
            context = (seed, run, kill_at)
            assert keeper.rollback is None and not keeper.created, context
            state = keeper.load()
            committed = kill_at is None or STEPS.index(kill_at) >= STEPS.index("incremented")
            expected = run if committed else current
            assert state == {"marker": expected}, context
            current = expected
            names = sorted(p.name for p in state_dir.iterdir() if not p.name.startswith("."))
            assert names == [STATE_FILE, STATE_KEY_BLOB], context
            assert NEXT_KEY_BLOB not in names and NEXT_STATE_FILE not in names
            assert keeper.state_file is not None
            assert keeper.state_file.counter == NVCounter(store).read(), context
            assert store.transient_handles() == [], context
    assert set(seen) == {*STEPS, "None"}, seen


def test_a_destruction_without_a_token_is_rotated_once_one_is_there(
    swtpm: Swtpm, tmp_path: Path
) -> None:
    """NV endurance: with the bucket empty, a destroying save only marks the rotation as due;
    it happens at the first save after a token came back (an hour at the default rate)."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    now = [1_000_000.0]
    with TPMStore(swtpm.tcti) as store:
        keeper = _open(store, state_dir, clock=lambda: now[0])
        keeper.save({"n": 0}, destroyed=_gone(0))
        keeper.budget.tokens, keeper.budget.updated = 0.0, int(now[0])
        value = NVCounter(store).read()
        assert keeper.save({"n": 1}, destroyed=_gone(1)) is False
        assert keeper.pending and not keeper.rotation_due()
        assert NVCounter(store).read() == value
        now[0] += 3600
        assert keeper.rotation_due()
        assert keeper.save({"n": 2}, destroyed=_gone(1)) is True
        assert NVCounter(store).read() == value + 1 and not keeper.pending
        assert keeper.save({"n": 3}, destroyed=_gone(1)) is False  # nothing new destroyed
        # the ledger forgets old destroyed records: nothing new died, no NV write
        assert keeper.save({"n": 3}, destroyed=frozenset()) is False
        assert NVCounter(store).read() == value + 1
    with TPMStore(swtpm.tcti) as store:
        again = _open(store, state_dir)
        assert again.load() == {"n": 3}
        assert again.budget.tokens < 1.0  # the bucket is kept in the state across restarts
