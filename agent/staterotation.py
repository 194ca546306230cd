"""The state key's life: sealed under the TPM state counter, rotated when something is destroyed,
so that an older state file or key blob put back in place is refused (``state.rollback``) and an
old sealed key no longer unseals (the TPM refuses it).

Files in the state directory: ``state-key.pem`` (the key, sealed under PCRs + counter == n) and
``agent.state`` (written under counter n, ``agent.statefile``). During a rotation from n to n+1
the new pair is first written as ``state-key.next.pem`` and ``agent.state.next``.

A rotation, in this order (each step is a fault point for crash tests):

1. ``sealed``: a new key, sealed under counter == n+1, written to ``state-key.next.pem``;
2. ``written``: the state, encrypted under the new key with counter n+1, to ``agent.state.next``;
3. ``incremented``: the TPM counter goes from n to n+1. This is the commit point: one TPM
   command, atomic; from here the old key no longer unseals, the new one does;
4. ``switched-key`` / ``switched``: the next files are renamed over the current ones.

At start the agent reads the counter v and takes the key blob and the state file that were
written under v, whatever their names are (each file says its counter: the blob in its recorded
policy, the state file in its header); files under a later counter are an uncommitted rotation
and are removed, files under an earlier one are dead. So a kill -9 at any point leaves exactly
one usable state: the old one before step 3, the new one after it.

If the files under v are missing but older ones are there, someone put an older state back
(a restored disk image, a copied file): ``state.rollback``, never loaded; they are kept aside
(``*.rollback.<time>``, unusable) and the agent starts with empty group state, which it reports.

The groups' trees are beside the state file, in ``tree/`` (``agent.treestore``): a rotation
rewrites only the state file, which names them; tree files no loaded or saved state names are
removed; a tree file that is not the one named (``state.tree.*``) is refused like an older state,
the state and ``tree/`` kept aside as ``*.rollback.<time>``.

Version 1 state (``state-key.pem`` sealed to PCRs only, a state file without counter) is
migrated once, at the first start with this code: unsealed, read, and written again by a
rotation under the counter; the rotation's renames replace the old files.

NV write endurance: the counter is written once per rotation. Rotations are paced by
``RotationBudget`` (a token bucket, persisted in the state): by default at most 24 a day with a
burst of 8, so at most 8 + 24 x 3,650 = 87,608 writes in ten years, within the 100,000 writes a
TPM's NV is commonly rated for at the low end. Start-ups that must rotate (measurements changed,
rollback refused, migration) also spend a token and are not refused for want of one.
The rotating parents of leaf and init keys (``agent.tpm.parents``) have their own bucket
(``parent_budget``), saved in the same entry of the state; both together stay within the
endurance figure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric import ec

from agent.fsio import shred
from agent.protocol.errors import ProtocolError, StateError, TPMError
from agent.protocol.lifecycle import KeyKind, KeyLedger, KeyState
from agent.protocol.release import ReleaseBundle, match
from agent.protocol.secret import Secret
from agent.protocol.treejournal import TreeRefused
from agent.releasestate import (
    HeldReleases,
    Unapproved,
    choose_entry,
    load_boot,
    release_status,
    save_boot,
)
from agent.statefile import StateFile, StateRollback, peek
from agent.tpm import authorized
from agent.tpm.blob import TPM2_CC_POLICY_PCR, KeyBlob
from agent.tpm.nvcounter import (
    CounterMoved,
    NVCounter,
    bound_counter,
    seal_bound,
    unseal_bound,
)
from agent.tpm.store import MeasurementsChanged, TPMStore
from agent.treestore import TREE_DIR, TreeStore, inline_trees

log = logging.getLogger(__name__)

STATE_FILE: Final = "agent.state"
STATE_KEY_BLOB: Final = "state-key.pem"
NEXT_STATE_FILE: Final = "agent.state.next"
NEXT_KEY_BLOB: Final = "state-key.next.pem"
STEPS: Final = ("sealed", "written", "incremented", "switched-key", "switched")
META: Final = "state-counter"  # the keeper's own entry in the saved map

# NV endurance: the budget this module promises to stay within over a device's life
ENDURANCE_WRITES: Final = 100_000
LIFETIME_DAYS: Final = 3_650
DAY: Final = 86_400


@dataclass
class RotationBudget:
    """A token bucket for counter increments: ``per_day`` tokens a day, at most ``burst``."""

    per_day: float = 24.0
    burst: float = 8.0
    tokens: float = 8.0
    updated: int = 0

    def refill(self, now: int) -> None:
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.per_day / DAY)
        self.updated = max(self.updated, now)

    def available(self, now: int) -> bool:
        self.refill(now)
        return self.tokens >= 1.0

    def spend(self, now: int) -> None:
        self.refill(now)
        self.tokens = max(0.0, self.tokens - 1.0)

    def admit(self, now: int) -> bool:
        """Take a token for a rotation now, if there is one."""
        if not self.available(now):
            return False
        self.spend(now)
        return True

    def lifetime_bound(self, days: int = LIFETIME_DAYS) -> int:
        return int(self.burst + self.per_day * days)


def parent_budget() -> RotationBudget:
    """The rotating parents' budget (``agent.tpm.parents``): a rotation costs two NV writes
    (EvictControl to persist the new parent, later to evict the old one), at most one rotation a
    day with a burst of 2: 2 x (2 + 3,650) = 7,304 writes in ten years. With the state counter's
    87,608 that is 94,912, still within ``ENDURANCE_WRITES``."""
    return RotationBudget(per_day=1.0, burst=2.0, tokens=2.0)


PARENT_NV_WRITES_PER_ROTATION: Final = 2


def destroyed_keys(ledger: KeyLedger) -> frozenset[str]:
    """What a rotation follows: the names of the keys (other than state keys) the ledger holds
    as destroyed. A name not seen at the last rotation means a save is about to drop something
    that must die; names the ledger forgets (old destroyed records) mean nothing."""
    return frozenset(
        r.name for r in ledger if r.state is KeyState.DESTROYED and r.kind is not KeyKind.STATE
    )


def note_rotation(ledger: KeyLedger, counter: int) -> None:
    """The ledger's view of a rotation: the state key records before it are destroyed, a new
    ``state/<n>`` record says how (the counter advanced: the TPM no longer unseals them)."""
    note = (
        f"sealed under state counter {counter}; earlier state keys no longer unseal "
        "(the TPM counter advanced)"
    )
    if any(r.note == note and r.state is not KeyState.DESTROYED for r in ledger):
        return  # noted already (a rotation retried after a failed write)
    for record in list(ledger):
        if record.kind is KeyKind.STATE and record.state is not KeyState.DESTROYED:
            ledger.transition(record.name, KeyState.DESTROYED)
    ledger.add(next_state_name(ledger), KeyKind.STATE, active=True, note=note)


ERASED_PREFIX: Final = "erased from the state"


def note_erased(ledger: KeyLedger, counter: int, *, rotated: bool) -> None:
    """How an epoch secret (a data key and the epoch's secrets, kept only in the state) was
    destroyed: erased from the state, and either the state key rotated under ``counter`` (no
    earlier copy of the state opens any more) or the rotation still pending (a copy taken
    before still holds it). Called before each save with whether that save rotates; a pending
    note becomes a rotated one at the save that rotates."""
    rotated_note = (
        f"{ERASED_PREFIX}; state key rotated (state counter {counter}): no earlier copy of the "
        "state opens"
    )
    pending_note = (
        f"{ERASED_PREFIX}; state key rotation pending (until then a copy of the state taken "
        "before still holds it)"
    )
    for record in list(ledger):
        if record.kind is not KeyKind.EPOCH or record.state is not KeyState.DESTROYED:
            continue
        if record.note is None or (rotated and record.note == pending_note):
            ledger.annotate(record.name, rotated_note if rotated else pending_note)


def next_state_name(ledger: KeyLedger) -> str:
    """``state/<n>`` above every state key record the ledger has (or had: destroyed records
    are forgotten after a while, their numbers are not reused while any later one remains)."""
    numbers = [
        int(r.name.split("/", 1)[1])
        for r in ledger
        if r.kind is KeyKind.STATE and r.name.split("/", 1)[-1].isdigit()
    ]
    return f"state/{max(numbers, default=0) + 1}"


def unseal_state_key(
    store: TPMStore, blob: KeyBlob, releases: HeldReleases | None = None
) -> Secret:
    """Unseal a state key blob of any format (counter-bound, version 1: PCRs only, or sealed
    for signed releases: then with the held bundles' entry matching the live PCRs)."""
    if len(blob.policy) == 1 and blob.policy[0].command_code == TPM2_CC_POLICY_PCR:
        return store.unseal(blob)
    if not authorized.is_authorized(blob):
        return unseal_bound(NVCounter(store), blob)
    if releases is None:
        raise StateError("the state key is sealed for signed releases: the release key is needed")
    generation = authorized.bound_generation(blob)
    try:
        entry = choose_entry(releases, generation, store.pcr_read(releases.pcrs() or (7,)))
    except Unapproved as exc:
        raise StateError(str(exc)) from None
    return authorized.unseal_authorized(NVCounter(store), blob, entry, releases.key, generation)


def read_state(
    store: TPMStore, state_dir: Path, release_key: ec.EllipticCurvePublicKey | None = None
) -> dict[str, Any]:
    """The saved state of a stopped agent (tests and the simulator's inspection); with the
    release key for a state key sealed for signed releases."""
    counter = NVCounter(store)
    releases = None if release_key is None else HeldReleases.load(state_dir, release_key)
    key = unseal_state_key(store, KeyBlob.load(state_dir / STATE_KEY_BLOB), releases)
    trees = TreeStore(state_dir / TREE_DIR)
    state_file = StateFile(state_dir / STATE_FILE, key, counter=counter.read(), trees=trees)
    state = inline_trees(state_file.load())
    state.pop(META, None)
    return state


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _blob_counter(path: Path) -> int | None:
    """The counter a key blob is bound to; None for a version 1 (PCR-only) or unreadable blob."""
    try:
        blob = KeyBlob.load(path)
        if authorized.is_authorized(blob):
            return authorized.bound_counter(blob)
        return bound_counter(blob)
    except (StateError, TPMError):
        return None


def _state_counter(path: Path) -> int | None:
    try:
        return peek(path.read_bytes()[:64])[1]
    except (StateError, OSError):
        return None


class StateKeeper:
    """The state key and file of one agent: open at start, save, rotate."""

    def __init__(
        self,
        store: TPMStore,
        state_dir: Path,
        pcrs: Sequence[int],
        *,
        counter: NVCounter | None = None,
        budget: RotationBudget | None = None,
        fault: Callable[[str], None] = lambda step: None,
        clock: Callable[[], float] = time.time,
        releases: HeldReleases | None = None,
    ) -> None:
        self.store = store
        self.dir = state_dir
        self.pcrs = tuple(pcrs)
        self.counter = counter if counter is not None else NVCounter(store)
        self.budget = budget if budget is not None else RotationBudget()
        # the rotating parents' NV budget (agent.tpm.parents), kept in the same saved entry
        self.parent_budget = parent_budget()
        self._fault = fault
        self._clock = clock
        self.state_file: StateFile | None = None
        # the groups' trees beside the state file (agent.treestore), the same under every key
        self.trees = TreeStore(state_dir / TREE_DIR)
        self.created = False
        self.sealed_elsewhere = False
        self.migrated = False
        self.rollback: str | None = None
        self.rollback_check = "state.rollback"  # or a state.tree.* id (_refuse_trees)
        self.rotations = 0
        self._destroyed: frozenset[str] | None = None
        self._legacy: dict[str, Any] | None = None
        # signed releases (agent.releasestate): the bundles held, the generation the key is
        # sealed under (None: sealed the PolicyPCR way), the release that opened it, and why
        # the state is held (an unapproved image: nothing of it is opened, moved or saved)
        self.releases = releases
        self.sealed_generation: int | None = None
        self.release_version: str | None = None
        self.held: str | None = None
        self._reseal = False

    def __repr__(self) -> str:
        return f"StateKeeper({str(self.dir)!r}, {self.state_file!r})"

    @property
    def pending(self) -> bool:
        """Something was destroyed since the last rotation (waiting for a token)."""
        return self._pending

    _pending = False

    @property
    def counter_value(self) -> int:
        """The counter the current state is written under."""
        assert self.state_file is not None
        return self.state_file.counter

    def will_rotate(self, destroyed: frozenset[str]) -> bool:
        """Whether ``save(state, destroyed)`` would rotate (the caller notes it in the ledger
        before the state is written)."""
        return (
            self.held is None
            and self._destroyed is not None
            and (self._reseal or not destroyed <= self._destroyed)
            and self.budget.available(self._now())
        )

    def rotation_due(self) -> bool:
        """A destruction (or a re-seal for a new release generation) is waiting for a rotation
        and a token is there now (the daemon's tick asks; it saves only then)."""
        return self.held is None and self._pending and self.budget.available(self._now())

    def releases_changed(self) -> bool:
        """A newer release bundle was adopted (``self.releases.adopt``): True if the state key
        must be sealed again under its generation, which the next save then does (a rotation,
        when the budget has a token; ``rotation_due`` says when)."""
        if self.held is not None or self.releases is None or self.releases.generation is None:
            return False
        if self.sealed_generation == self.releases.generation:
            return False
        self._reseal = self._pending = True
        return True

    def adopt_release(self, bundle: ReleaseBundle, raw: bytes) -> None:
        """A newer release bundle (verified by the core): kept on disk; a newer generation
        makes the next save seal the state key again (``releases_changed``)."""
        assert self.releases is not None
        self.releases.adopt(bundle, self.sealed_generation, raw)
        if self.held is None:
            # which release is running, as the new bundle names it (a first bundle, or a
            # version it no longer approves: the status and keys.report say so)
            live = self.store.pcr_read(self.releases.pcrs() or self.pcrs)
            entry = match(bundle, live)
            self.release_version = None if entry is None else entry.version
            if entry is not None:
                save_boot(self.dir, entry.version, {i: live[i] for i in entry.pcrs})
        if self.releases_changed():
            log.info("release generation %d: the state key is sealed again", bundle.generation)

    def newest_release(self) -> ReleaseBundle | None:
        return None if self.releases is None else self.releases.newest

    def release_status(self) -> dict[str, object] | None:
        """The status's ``release`` entry (None without a release key)."""
        return release_status(
            self.releases,
            sealed_generation=self.sealed_generation,
            version=self.release_version,
            held=self.held,
        )

    def _seal(self, key: Secret, value: int) -> tuple[KeyBlob, int | None]:
        """Seal the state key under counter == ``value``: the authorized way under the newest
        held bundle's generation when there is one, else to the PCRs (blob, generation)."""
        generation = None if self.releases is None else self.releases.generation
        if self.releases is None or generation is None:
            return seal_bound(self.counter, key, self.pcrs, value), None
        blob = authorized.seal_authorized(self.counter, key, value, self.releases.key, generation)
        return blob, generation

    def _now(self) -> int:
        return int(self._clock())

    # -- opening -------------------------------------------------------------------------------

    def open(self) -> None:
        """Find the usable state (see the module text), completing or undoing an interrupted
        rotation; migrate a version 1 state; refuse an older state; or start afresh."""
        made = self.counter.ensure()
        value = self.counter.read()
        cur_blob, next_blob = self.dir / STATE_KEY_BLOB, self.dir / NEXT_KEY_BLOB
        cur_state, next_state = self.dir / STATE_FILE, self.dir / NEXT_STATE_FILE
        blobs = {p: _blob_counter(p) for p in (cur_blob, next_blob) if p.exists()}
        states = {p: _state_counter(p) for p in (cur_state, next_state) if p.exists()}
        for path, n in [*blobs.items(), *states.items()]:
            if n is not None and n > value:
                log.info("%s was written for a rotation that did not commit: removed", path.name)
                shred(path)
        blob = next((p for p, n in blobs.items() if n == value), None)
        state = next((p for p, n in states.items() if n == value), None)
        if blob is not None:
            self._adopt(blob, cur_blob)
            if state is not None:
                self._adopt(state, cur_state)
            for path in (next_blob, next_state):
                if path.exists():
                    shred(path)  # dead leftovers of a committed rotation
            self._unseal_current(value, had_state=state is not None)
            return
        legacy_blob = cur_blob.exists() and cur_blob in blobs and blobs[cur_blob] is None
        if legacy_blob and states.get(cur_state) is None:
            self._migrate(value)
            return
        older = [p for p in (cur_blob, cur_state, next_blob, next_state) if p.exists()]
        if older:
            stamp = self._now()
            self.rollback = (
                f"the state on disk ({', '.join(p.name for p in older)}) was written under "
                f"an older state counter than the TPM's ({value}): refused, never loaded"
            )
            log.error(
                "[state.rollback] %s; starting with empty group state, the groups must re-add "
                "this device (kept aside as *.rollback.%d)",
                self.rollback,
                stamp,
            )
            for path in older:
                path.rename(path.with_name(f"{path.name}.rollback.{stamp}"))
        self._fresh(value, rotate=not made or bool(older))

    def _adopt(self, path: Path, target: Path) -> None:
        if path != target:
            os.replace(path, target)
            _fsync_dir(self.dir)

    def _unseal_current(self, value: int, *, had_state: bool) -> None:
        path = self.dir / STATE_KEY_BLOB
        try:
            blob = KeyBlob.load(path)
            if authorized.is_authorized(blob):
                opened = self._unseal_release(blob, value)
                if opened is None:
                    return  # held: nothing opened, nothing moved
                key = opened
            else:
                key = unseal_bound(self.counter, blob)
        except MeasurementsChanged:
            self._aside_sealed_elsewhere()
            self._fresh(value, rotate=True)
            return
        except CounterMoved as exc:  # the blob's recorded counter was forged
            raise StateRollback(f"{path.name}: {exc.detail}") from None
        state_path = self.dir / STATE_FILE
        if not had_state and state_path.exists():
            # the key is the TPM's current one but the file beside it is not: an older state
            # file put back next to the current key
            self._refuse_file(state_path, value)
        self.state_file = StateFile(state_path, key, counter=value, trees=self.trees)
        self.created = not had_state
        self._reseal_if_due()

    def _unseal_release(self, blob: KeyBlob, value: int) -> Secret | None:
        """Open a key sealed for signed releases with the entry matching the live PCRs
        (``agent.releasestate``); None if the state is held instead."""
        generation = authorized.bound_generation(blob)
        self.sealed_generation = generation
        releases = self.releases
        if releases is None:
            self._hold(
                "the state key is sealed for signed releases but no [releases] key is configured",
                value,
            )
            return None
        try:
            live = self.store.pcr_read(releases.pcrs() or self.pcrs)
            entry = choose_entry(releases, generation, live, load_boot(self.dir))
            key = authorized.unseal_authorized(self.counter, blob, entry, releases.key, generation)
        except Unapproved as exc:
            self._hold(exc.reason, value)
            return None
        except (
            MeasurementsChanged,
            authorized.ReleaseStale,
            authorized.ReleaseSignatureRefused,
            ProtocolError,
        ) as exc:
            self._hold(str(exc), value)  # checked at receipt; refused now: still nothing moves
            return None
        self.release_version = entry.version
        save_boot(self.dir, entry.version, {i: live[i] for i in entry.pcrs})
        if generation == releases.generation and releases.sealed is not None:
            releases.resealed()  # a re-seal committed just before a stop: the older bundle goes
        return key

    def _hold(self, reason: str, value: int) -> None:
        self.held = reason
        self.state_file = None
        self.created = False
        log.error(
            "[release.unapproved] %s; the state is held as it is (files untouched, state "
            "counter %d not moved) and opens again on an approved release; running without "
            "group state, saving nothing over it",
            reason,
            value,
        )

    def _reseal_if_due(self) -> None:
        """At start: seal the key again if a newer release generation (or a first bundle, for
        a key sealed the PolicyPCR way) is held. A rotation; it spends a token if there is one
        and is not refused for want of one."""
        releases = self.releases
        if self.state_file is None or releases is None or releases.generation is None:
            return
        if self.sealed_generation == releases.generation:
            return
        log.info(
            "state key sealed %s: sealing it again under release generation %d",
            "to the PCRs"
            if self.sealed_generation is None
            else f"under release generation {self.sealed_generation}",
            releases.generation,
        )
        state = self.load()
        if state is None:
            self._fresh(self.state_file.counter, rotate=True)
            return
        self.budget.spend(self._now())
        self.rotate(state)
        self._legacy = state

    def _refuse_file(self, path: Path, value: int) -> None:
        stamp = self._now()
        self.rollback = (
            f"{path.name} was not written under the TPM's state counter ({value}): refused, "
            "never loaded"
        )
        log.error("[state.rollback] %s (kept aside as %s.rollback.%d)", self.rollback, path, stamp)
        path.rename(path.with_name(f"{path.name}.rollback.{stamp}"))

    def _refuse_trees(self, exc: TreeRefused) -> None:
        """A tree file that is not the one the state file names (``state.tree.*``): like an
        older state put back, never loaded, kept aside (the state file as
        ``agent.state.rollback.<time>``, the tree directory as ``tree.rollback.<time>``); the
        agent starts with empty group state, which it reports."""
        assert self.state_file is not None
        stamp = self._now()
        self.rollback = f"{exc}: the state and its trees refused, never loaded"
        self.rollback_check = exc.check
        log.error("%s (kept aside as *.rollback.%d)", self.rollback, stamp)
        path = self.state_file.path
        path.rename(path.with_name(f"{path.name}.rollback.{stamp}"))
        if self.trees.dir.exists():
            self.trees.dir.rename(self.trees.dir.with_name(f"{TREE_DIR}.rollback.{stamp}"))
        _fsync_dir(self.dir)
        self.trees = TreeStore(self.dir / TREE_DIR)
        self.state_file.trees = self.trees
        self.created = True

    def _aside_sealed_elsewhere(self) -> None:
        self.sealed_elsewhere = True
        stamp = self._now()
        log.error(
            "the state key is sealed to other measurements (PCRs %s changed): the agent's state "
            "cannot be opened; starting with empty group state, the groups must re-add this "
            "device (old state kept as *.sealed-elsewhere.%d; the state counter moves, so it "
            "stays unusable even if the old measurements come back)",
            list(self.pcrs),
            stamp,
        )
        for name in (STATE_KEY_BLOB, STATE_FILE):
            path = self.dir / name
            if path.exists():
                path.rename(path.with_name(f"{name}.sealed-elsewhere.{stamp}"))

    def _fresh(self, value: int, *, rotate: bool) -> None:
        """A new key and no state yet; under the next counter value if anything older exists
        (then the counter moves, and every older blob is dead)."""
        target = value + 1 if rotate else value
        key = Secret(os.urandom(32))
        blob, generation = self._seal(key, target)
        blob.save(self.dir / STATE_KEY_BLOB)
        if rotate:
            self.budget.spend(self._now())
            self.counter.increment()
            self.rotations += 1
        self._sealed_under(generation)
        self.state_file = StateFile(self.dir / STATE_FILE, key, counter=target, trees=self.trees)
        self.created = True

    def _sealed_under(self, generation: int | None) -> None:
        self.sealed_generation = generation
        self._reseal = False
        if self.releases is not None and generation is not None:
            self.releases.resealed()

    def _migrate(self, value: int) -> None:
        path = self.dir / STATE_KEY_BLOB
        try:
            key = self.store.unseal(KeyBlob.load(path))
        except TPMError as exc:
            if exc.rc is None or (0x080 | (exc.rc & 0x3F)) != 0x09D:
                raise
            self._aside_sealed_elsewhere()
            self._fresh(value, rotate=True)
            return
        state_path = self.dir / STATE_FILE
        legacy = StateFile(state_path, key)
        state = legacy.load(legacy=True) if state_path.exists() else None
        self.state_file = StateFile(state_path, key, counter=value, trees=self.trees)
        self.state_file.generation = legacy.generation
        if state is None:
            self._fresh(value, rotate=True)
            return
        log.info("state of version 1 (no state counter): migrating it under the counter, once")
        self.rotate(state)
        self.migrated = True
        self._legacy = state

    # -- loading and saving ----------------------------------------------------------------------

    def load(self) -> dict[str, Any] | None:
        """The saved state (None: none yet). The keeper's own entry is taken out."""
        if self._legacy is not None:
            state, self._legacy = self._legacy, None
        elif self.state_file is None or not self.state_file.exists():
            return None
        else:
            try:
                state = self.state_file.load()
            except TreeRefused as exc:
                self._refuse_trees(exc)
                return None
            # the tree files this state does not name: an older snapshot and journal, or the
            # files of a save that did not commit
            for name in self.trees.collect():
                log.info("tree file %s named by no state: removed", name)
        meta = state.pop(META, None)
        if isinstance(meta, dict):
            with contextlib.suppress(TypeError, ValueError, KeyError):
                self.budget.tokens = float(meta.get("tokens", self.budget.tokens))
                self.budget.updated = int(meta.get("updated", self.budget.updated))
                parents = meta.get("parents")
                if isinstance(parents, dict):
                    self.parent_budget.tokens = float(parents["tokens"])
                    self.parent_budget.updated = int(parents["updated"])
                names = meta.get("destroyed")
                if isinstance(names, list) and all(isinstance(n, str) for n in names):
                    self._destroyed = frozenset(names)
        return state

    def _with_meta(self, state: dict[str, Any], destroyed: frozenset[str] | None) -> dict[str, Any]:
        out = dict(state)
        meta: dict[str, Any] = {
            "tokens": self.budget.tokens,
            "updated": self.budget.updated,
            "parents": {"tokens": self.parent_budget.tokens, "updated": self.parent_budget.updated},
        }
        if destroyed is not None:
            meta["destroyed"] = sorted(destroyed)
        out[META] = meta
        return out

    def save(self, state: dict[str, Any], destroyed: frozenset[str]) -> bool:
        """Save; rotate instead if ``destroyed`` (``destroyed_keys`` of the ledger) names a key
        not destroyed at the last rotation and the budget has a token. True if it rotated."""
        if self.held is not None:
            log.debug("state held (release.unapproved): nothing saved over it")
            return False
        assert self.state_file is not None
        now = self._now()
        if self._destroyed is None:
            self._destroyed = destroyed
        if self._reseal or not destroyed <= self._destroyed:
            if self.budget.admit(now):
                previous, self._destroyed = self._destroyed, destroyed
                try:
                    self.rotate(state)
                except StateError:
                    self._destroyed = previous  # not committed: rotate at the next save
                    self._pending = True
                    raise
                self._pending = False
                self.trees.collect()
                return True
            self._pending = True
        else:
            self._destroyed = self._destroyed & destroyed  # forgotten records drop out
        self.state_file.save(self._with_meta(state, self._destroyed))
        self.trees.collect()
        return False

    def rotate(self, state: dict[str, Any]) -> None:
        """Move the state to a new key under the next counter value (module text, steps 1-4)."""
        assert self.state_file is not None
        value = self.counter.read()
        key = Secret(os.urandom(32))
        blob, generation = self._seal(key, value + 1)
        blob.save(self.dir / NEXT_KEY_BLOB)
        self._fault("sealed")
        following = StateFile(self.dir / NEXT_STATE_FILE, key, counter=value + 1, trees=self.trees)
        following.generation = self.state_file.generation
        following.save(self._with_meta(state, self._destroyed))
        self._fault("written")
        self.counter.increment()
        # committed: from here on every save is under the new key and counter, even if a
        # rename below fails (the start finds the files by their counter, not their names)
        self.state_file = StateFile(self.dir / STATE_FILE, key, counter=value + 1, trees=self.trees)
        self.state_file.generation = following.generation
        self.rotations += 1
        self._sealed_under(generation)
        self._fault("incremented")
        try:
            os.replace(self.dir / NEXT_KEY_BLOB, self.dir / STATE_KEY_BLOB)
            _fsync_dir(self.dir)
            self._fault("switched-key")
            os.replace(self.dir / NEXT_STATE_FILE, self.dir / STATE_FILE)
            _fsync_dir(self.dir)
        except OSError as exc:
            log.warning(
                "state key rotated, but renaming its files failed (the next start "
                "completes it): %s",
                exc,
            )
        self._fault("switched")
        log.info("state key rotated: state counter %d", value + 1)
