"""Rotating parents for leaf and init keys: destruction the TPM enforces.

A key blob is the private key wrapped by its parent. Under the SRK, which the TPM re-creates
from the owner seed whenever asked, a copy of a blob taken before its destruction (a disk image,
a backup) loads again later: shredding the file would be all "destroyed" meant. Leaf and init
keys are therefore made under a **rotating parent**: a storage primary in the owner hierarchy
whose template carries 32 random bytes in ``unique`` (``templates.parent_template``), made
persistent with EvictControl and never written down anywhere. Nobody can re-derive it from the
owner seed; once it is evicted, every blob wrapped under it is unloadable in this TPM and in
any other (TPM2_Load answers ``TPM_RC_HANDLE`` for the missing parent; the store raises
``ParentEvicted``, check id ``tpm.parent-evicted``). Persistent objects survive reboots, so a
parent is made once, not at every start.

Handles: a ring of 16 persistent handles, 0x81004B40-0x81004B4F, of which at most
``MAX_PARENTS`` (3) are in use at a time. A new parent goes into the slot after the current one,
and a rotation is refused while it would make the occupied slots span more than ``MAX_SPAN``
(8) of the ring: then there is always a run of at least 8 free slots after the current parent,
which is how the current one is told from the TPM alone (``current_of``), with no file to lose
or roll back. A handle comes round again only after 16 rotations; blobs record their parent's
Name as well as its handle, so a blob under an evicted parent is told apart from a blob that
does not match the newer parent at a reused handle.

The rules (``agent.daemon.TpmKeys`` applies them after each saved state):

- new leaf and init keys are created under the current parent;
- when a key under the current parent is destroyed, the parent is due for rotation: a new one
  becomes current (paced by an NV budget, ``agent.staterotation.RotationBudget``);
- a parent other than the current one is evicted as soon as no key blob on the disk is under it
  (blobs are written before a state refers to them and shredded only after a state without
  them was saved, so "no blob" implies "no live key": a kill -9 never leaves a live key whose
  parent was evicted).

DevID, AK and the sealed state key stay under the SRK; leaf blobs made under the SRK before
rotating parents existed keep loading until the rekey policy replaces them.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable
from typing import Final

from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import ESYS_TR

from agent.protocol.errors import TPMError
from agent.protocol.lifecycle import KeyLedger, KeyState
from agent.tpm.store import TPMStore
from agent.tpm.templates import parent_template

RING_BASE: Final = 0x81004B40
RING_SIZE: Final = 16
MAX_PARENTS: Final = 3
MAX_SPAN: Final = 8
RING: Final = tuple(RING_BASE + i for i in range(RING_SIZE))

# ledger notes for a destroyed leaf or init key: how it was destroyed (agent.protocol.lifecycle)
DESTROYED_PREFIX: Final = "flushed, blob shredded"
_PENDING = re.compile(r"parent (0x[0-9a-f]{8}) eviction pending")


def _slot(handle: int) -> int:
    if handle not in RING:
        raise ValueError(f"0x{handle:08x} is not a parent handle of the agent's ring")
    return handle - RING_BASE


def current_of(occupied: Iterable[int]) -> int | None:
    """The current parent among the occupied ring handles: the one followed by at least
    ``RING_SIZE - MAX_SPAN`` free slots (unique while the occupied span is at most MAX_SPAN).
    None when no parent exists."""
    slots = {_slot(h) for h in occupied}
    for slot in slots:
        if not any((slot + k) % RING_SIZE in slots for k in range(1, RING_SIZE - MAX_SPAN + 1)):
            return RING_BASE + slot
    if slots:
        raise ValueError(f"parent handles {sorted(slots)} span more than {MAX_SPAN} slots")
    return None


def next_parent(occupied: Iterable[int]) -> int | None:
    """Where the next parent goes: the slot after the current one (the ring's first slot when
    there is none). None while a rotation must wait: MAX_PARENTS exist already, or the oldest
    one would fall out of the MAX_SPAN window."""
    handles = set(occupied)
    current = current_of(handles)
    if current is None:
        return RING_BASE
    if len(handles) >= MAX_PARENTS:
        return None
    nxt = (_slot(current) + 1) % RING_SIZE
    span = max((nxt - _slot(h)) % RING_SIZE for h in handles) + 1
    return None if span > MAX_SPAN else RING_BASE + nxt


def drained(occupied: Iterable[int], in_use: Iterable[int]) -> list[int]:
    """The parents to evict: every one but the current with no key blob under it."""
    handles = set(occupied)
    current = current_of(handles)
    busy = set(in_use)
    return sorted(h for h in handles if h != current and h not in busy)


# -- the ledger's view ---------------------------------------------------------------------------


def srk_note() -> str:
    return (
        f"{DESTROYED_PREFIX}; made under the SRK (before rotating parents): a copy of its blob "
        "taken before still loads in this TPM"
    )


def pending_note(handle: int) -> str:
    return (
        f"{DESTROYED_PREFIX}; parent 0x{handle:08x} eviction pending (until then a copy of its "
        "blob taken before still loads)"
    )


def evicted_note(handle: int) -> str:
    return f"{DESTROYED_PREFIX}, parent 0x{handle:08x} evicted: no copy of its blob loads any more"


def destruction_note(parent: int) -> str:
    """The note for a key destroyed now whose blob named ``parent``."""
    return pending_note(parent) if parent in RING else srk_note()


def pending_parents(ledger: KeyLedger) -> dict[str, int]:
    """Destroyed keys whose parent eviction is still pending: name -> parent handle."""
    out: dict[str, int] = {}
    for record in ledger:
        if record.state is KeyState.DESTROYED and record.note:
            match = _PENDING.search(record.note)
            if match:
                out[record.name] = int(match.group(1), 16)
    return out


def note_evictions(ledger: KeyLedger, present: Iterable[int]) -> bool:
    """Rewrite the pending notes of keys whose parent is no longer in the TPM. True if any
    changed. A parent at a reused handle keeps the note pending (never claims too much)."""
    there = set(present)
    changed = False
    for name, handle in pending_parents(ledger).items():
        if handle not in there:
            ledger.annotate(name, evicted_note(handle))
            changed = True
    return changed


# -- the TPM side --------------------------------------------------------------------------------


class ParentRing:
    """The agent's rotating parents in one TPM. The occupied handles are read once (one
    GetCapability) and then tracked through this object's own rotations and evictions."""

    def __init__(self, store: TPMStore) -> None:
        self.store = store
        self._occupied: set[int] | None = None
        self.rotations = 0
        self.evictions = 0

    def __repr__(self) -> str:
        held = (
            "unread" if self._occupied is None else [f"0x{h:08x}" for h in sorted(self._occupied)]
        )
        return f"ParentRing({held})"

    def present(self) -> set[int]:
        if self._occupied is None:
            self._occupied = {h for h in self.store.persistent_handles() if h in RING}
        return set(self._occupied)

    def current(self) -> int | None:
        return current_of(self.present())

    def ensure(self) -> int:
        """The current parent, made first if there is none (a device's first leaf key)."""
        current = self.current()
        return current if current is not None else self._make(RING_BASE)

    def rotate(self) -> int | None:
        """Make a new current parent; None if the ring has no room now (see ``next_parent``)."""
        slot = next_parent(self.present())
        if slot is None:
            return None
        self._make(slot)
        self.rotations += 1
        return slot

    def _make(self, handle: int) -> int:
        store = self.store
        transient, *_ = store._call(
            "create-parent", "create_primary", None, parent_template(os.urandom(32)), ESYS_TR.OWNER
        )
        try:
            persistent = store._call(
                "persist-parent", "evict_control", ESYS_TR.OWNER, transient, handle
            )
            if store._esys is not None:
                with contextlib.suppress(TSS2_Exception):
                    store._esys.tr_close(persistent)
        finally:
            store._flush(transient)
        self.present()
        assert self._occupied is not None
        self._occupied.add(handle)
        return handle

    def evict(self, handle: int) -> None:
        """EvictControl the parent at ``handle`` out of the TPM (idempotent: a parent already
        gone is not an error)."""
        if handle not in RING:
            raise TPMError(
                "evict-parent", None, f"0x{handle:08x} is not one of the agent's parents"
            )
        store = self.store
        try:
            tr = store._call("evict-parent", "tr_from_tpmpublic", handle)
        except TPMError as exc:
            if exc.rc is not None and (0x080 | (exc.rc & 0x3F)) == 0x08B:
                self._forget(handle)
                return
            raise
        try:
            store._call("evict-parent", "evict_control", ESYS_TR.OWNER, tr, handle)
        except TPMError:
            if store._esys is not None:
                with contextlib.suppress(TSS2_Exception):
                    store._esys.tr_close(tr)
            raise
        # ESYS drops its object for an evicted persistent handle itself
        self.evictions += 1
        self._forget(handle)

    def _forget(self, handle: int) -> None:
        if self._occupied is not None:
            self._occupied.discard(handle)

    def evict_all(self) -> list[int]:
        """Evict every parent of the ring (factory reset): no leaf or init blob loads after."""
        self._occupied = None
        gone = sorted(self.present())
        for handle in gone:
            self.evict(handle)
        return gone
