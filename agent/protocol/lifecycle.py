"""Key lifecycle: every key the agent holds has a NIST SP 800-57 Part 1 state.

Pure: no I/O, no clock of its own. The ledger is handed a clock (``Callable[[], int]``, whole
seconds) so tests and the state file see the same timestamps the daemon would.

States and transitions follow SP 800-57 Part 1 Rev. 5, section 7 (transitions 1-15):

- a key is born in pre-activation;
- pre-activation -> active | compromised | destroyed;
- active <-> suspended;
- active | suspended -> deactivated;
- every state but destroyed -> compromised (except compromised itself);
- every state -> destroyed (destroyed is terminal; compromised can only go to destroyed).

What each state allows for a group data key (an "epoch" key) is decided here, not in the local
API, so that every caller applies the same rule:

- active: encrypt and decrypt (only the group's current epoch is active);
- deactivated within the grace period after deactivation: decrypt only;
- deactivated past the grace period: nothing, and the key is due for destruction;
- suspended, compromised, pre-activation, destroyed: nothing. SP 800-57 would let a suspended
  key still process old data "if the recipient accepts the risk"; a device cannot ask its user
  whether they accept it, so keyfleet refuses (suspension is how a suspected compromise is held).
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from agent.protocol.errors import ProtocolError

LEDGER_VERSION = 1

# NIST SP 800-38D section 8.3: with random 96-bit nonces, at most 2**32 encryptions under one key.
# The group data key is shared by every member, so this is a fleet-wide budget per epoch; each
# device's own max_messages_per_epoch must leave room for the others (see docs/agent.md).
AES_GCM_RANDOM_NONCE_LIMIT = 2**32


class KeyState(enum.StrEnum):
    PRE_ACTIVATION = "pre-activation"
    ACTIVE = "active"
    SUSPENDED = "suspended"
    DEACTIVATED = "deactivated"
    COMPROMISED = "compromised"
    DESTROYED = "destroyed"


class KeyKind(enum.StrEnum):
    DEVID = "devid"
    AK = "ak"
    LEAF = "leaf"
    STATE = "state"
    EPOCH = "epoch"
    APP_SEAL = "app-seal"
    INIT = "init"  # a KeyPackage's one-time init key (agent.protocol.initkeys)


_S = KeyState
ALLOWED_TRANSITIONS: Mapping[KeyState, frozenset[KeyState]] = {
    _S.PRE_ACTIVATION: frozenset({_S.ACTIVE, _S.COMPROMISED, _S.DESTROYED}),
    _S.ACTIVE: frozenset({_S.SUSPENDED, _S.DEACTIVATED, _S.COMPROMISED, _S.DESTROYED}),
    _S.SUSPENDED: frozenset({_S.ACTIVE, _S.DEACTIVATED, _S.COMPROMISED, _S.DESTROYED}),
    _S.DEACTIVATED: frozenset({_S.COMPROMISED, _S.DESTROYED}),
    _S.COMPROMISED: frozenset({_S.DESTROYED}),
    _S.DESTROYED: frozenset(),
}


class KeyStateError(ProtocolError):
    """A lifecycle rule was broken: unknown key, duplicate key, or a transition SP 800-57 does not
    allow. Check ids: ``key.unknown``, ``key.exists``, ``key.transition``, ``key.record``."""


class EpochUse(enum.StrEnum):
    """What a group data key may be used for at a given time."""

    ENCRYPT_DECRYPT = "encrypt-decrypt"
    DECRYPT_ONLY = "decrypt-only"
    DUE_FOR_DESTRUCTION = "due-for-destruction"
    UNUSABLE = "unusable"


class RotationReason(enum.StrEnum):
    AGE = "max-epoch-age"
    MESSAGES = "max-messages-per-epoch"


@dataclass(frozen=True)
class RotationPolicy:
    """When a group's epoch should end. ``None`` disables a limit; ``grace_period`` is how long a
    deactivated epoch key still decrypts before it is destroyed (seconds)."""

    max_epoch_age: int | None = 30 * 24 * 3600
    max_messages_per_epoch: int | None = 2**20
    grace_period: int = 24 * 3600


def rotation_due(
    policy: RotationPolicy, epoch_started: int, messages_this_epoch: int, now: int
) -> RotationReason | None:
    """Whether the current epoch has reached its policy limit; the reason, or None.

    The message budget is also capped by the AES-GCM random-nonce limit whatever the policy says,
    so a missing limit in the policy can never let a key run past it."""
    if policy.max_epoch_age is not None and now - epoch_started >= policy.max_epoch_age:
        return RotationReason.AGE
    limit = AES_GCM_RANDOM_NONCE_LIMIT
    if policy.max_messages_per_epoch is not None:
        limit = min(limit, policy.max_messages_per_epoch)
    if messages_this_epoch >= limit:
        return RotationReason.MESSAGES
    return None


def epoch_key_name(group: str, epoch: int) -> str:
    """The ledger name of a group's epoch data key."""
    return f"epoch/{group}/{epoch}"


@dataclass(frozen=True)
class KeyRecord:
    """One key's lifecycle. Immutable: the ledger replaces a record on each transition.

    ``transitions`` is the full history ``((state, time), ...)``, oldest first; the last entry is
    the current state. ``owner`` is the uid an app-sealed secret belongs to."""

    name: str
    kind: KeyKind
    transitions: tuple[tuple[KeyState, int], ...]
    group: str | None = None
    epoch: int | None = None
    owner: int | None = None
    note: str | None = field(default=None, compare=False)

    @property
    def state(self) -> KeyState:
        return self.transitions[-1][0]

    @property
    def since(self) -> int:
        """When the key entered its current state."""
        return self.transitions[-1][1]

    def entered(self, state: KeyState) -> int | None:
        """When the key last entered ``state``, or None if it never did."""
        for seen, when in reversed(self.transitions):
            if seen is state:
                return when
        return None

    def to_cbor_map(self) -> dict[str, Any]:
        """A CBOR-ready map (text keys) for the state file and for key-state reports."""
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind.value,
            "state": self.state.value,
            "transitions": [[s.value, t] for s, t in self.transitions],
        }
        if self.group is not None:
            out["group"] = self.group
        if self.epoch is not None:
            out["epoch"] = self.epoch
        if self.owner is not None:
            out["owner"] = self.owner
        if self.note is not None:
            out["note"] = self.note
        return out

    @classmethod
    def from_cbor_map(cls, obj: object) -> KeyRecord:
        """Strict inverse of ``to_cbor_map``: unknown fields, wrong types, an illegal history or
        a ``state`` that disagrees with the history all raise ``KeyStateError``."""
        if not isinstance(obj, dict):
            raise KeyStateError("key.record", "key record is not a map")
        allowed = {"name", "kind", "state", "transitions", "group", "epoch", "owner", "note"}
        extra = set(obj) - allowed
        if extra:
            raise KeyStateError("key.record", f"unknown fields in key record: {sorted(extra)!r}")
        name = obj.get("name")
        if not isinstance(name, str) or not name:
            raise KeyStateError("key.record", "key record has no name")
        kind_raw, state_raw = obj.get("kind"), obj.get("state")
        try:
            if not isinstance(kind_raw, str) or not isinstance(state_raw, str):
                raise ValueError
            kind = _KINDS.get(kind_raw) or KeyKind(kind_raw)
            state = _STATES.get(state_raw) or KeyState(state_raw)
        except ValueError:
            raise KeyStateError("key.record", f"key {name!r}: unknown kind or state") from None
        raw = obj.get("transitions")
        if not isinstance(raw, list) or not raw:
            raise KeyStateError("key.record", f"key {name!r}: no transitions")
        history: list[tuple[KeyState, int]] = []
        for item in raw:
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not isinstance(item[1], int)
                or isinstance(item[1], bool)
            ):
                raise KeyStateError("key.record", f"key {name!r}: malformed transition")
            seen = _STATES.get(item[0]) if type(item[0]) is str else None
            try:
                history.append((seen or KeyState(item[0]), item[1]))
            except ValueError:
                raise KeyStateError("key.record", f"key {name!r}: unknown state") from None
        _check_history(name, history)
        if history[-1][0] is not state:
            raise KeyStateError("key.record", f"key {name!r}: state disagrees with its history")
        group, epoch, owner, note = (obj.get(k) for k in ("group", "epoch", "owner", "note"))
        if group is not None and not isinstance(group, str):
            raise KeyStateError("key.record", f"key {name!r}: group is not text")
        for label, value in (("epoch", epoch), ("owner", owner)):
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 0
            ):
                raise KeyStateError("key.record", f"key {name!r}: {label} is not an unsigned int")
        if note is not None and not isinstance(note, str):
            raise KeyStateError("key.record", f"key {name!r}: note is not text")
        if kind is KeyKind.EPOCH and (group is None or epoch is None):
            raise KeyStateError("key.record", f"key {name!r}: epoch key without group/epoch")
        return cls(name, kind, tuple(history), group, epoch, owner, note)


# the members by value, looked up without an enum call for every field of every record read
# (what is not found here goes through the enum call, which refuses it)
_KINDS: dict[str, KeyKind] = {kind.value: kind for kind in KeyKind}
_STATES: dict[str, KeyState] = {state.value: state for state in KeyState}


def _check_history(name: str, history: list[tuple[KeyState, int]]) -> None:
    if history[0][0] is not KeyState.PRE_ACTIVATION:
        raise KeyStateError("key.record", f"key {name!r}: history does not start in pre-activation")
    for (before, t0), (after, t1) in itertools.pairwise(history):
        if after not in ALLOWED_TRANSITIONS[before]:
            raise KeyStateError(
                "key.record", f"key {name!r}: history has illegal step {before} -> {after}"
            )
        if t1 < t0:
            raise KeyStateError("key.record", f"key {name!r}: history goes back in time")


class KeyLedger:
    """All keys the agent holds, with their states. Not thread-safe: the daemon owns one ledger
    and serializes access to it (the local API server calls its backend from one thread)."""

    def __init__(self, clock: Callable[[], int], records: Iterable[KeyRecord] = ()) -> None:
        self._clock = clock
        self._records: dict[str, KeyRecord] = {}
        for record in records:
            if record.name in self._records:
                raise KeyStateError("key.exists", f"key {record.name!r} is listed twice")
            self._records[record.name] = record

    def __repr__(self) -> str:
        return f"KeyLedger({len(self._records)} keys)"

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[KeyRecord]:
        return iter(list(self._records.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._records

    def get(self, name: str) -> KeyRecord:
        try:
            return self._records[name]
        except KeyError:
            raise KeyStateError("key.unknown", f"no key named {name!r}") from None

    def add(
        self,
        name: str,
        kind: KeyKind,
        *,
        group: str | None = None,
        epoch: int | None = None,
        owner: int | None = None,
        active: bool = False,
        note: str | None = None,
    ) -> KeyRecord:
        """Record a new key: it enters pre-activation now (transition 1) and, with ``active``,
        becomes active at the same instant (transition 4), both recorded."""
        if name in self._records:
            raise KeyStateError("key.exists", f"key {name!r} already exists")
        if kind is KeyKind.EPOCH and (group is None or epoch is None):
            raise KeyStateError("key.record", f"epoch key {name!r} needs a group and an epoch")
        now = self._clock()
        history: tuple[tuple[KeyState, int], ...] = ((KeyState.PRE_ACTIVATION, now),)
        if active:
            history += ((KeyState.ACTIVE, now),)
        record = KeyRecord(name, kind, history, group, epoch, owner, note)
        self._records[name] = record
        return record

    def transition(self, name: str, to: KeyState) -> KeyRecord:
        """Move ``name`` to state ``to`` now; refuse what SP 800-57 does not allow."""
        record = self.get(name)
        if to not in ALLOWED_TRANSITIONS[record.state]:
            raise KeyStateError(
                "key.transition",
                f"key {name!r} cannot go from {record.state} to {to}"
                + (" (destroyed is final)" if record.state is KeyState.DESTROYED else ""),
            )
        now = max(self._clock(), record.since)  # a clock step back must not reorder history
        updated = replace(record, transitions=(*record.transitions, (to, now)))
        self._records[name] = updated
        return updated

    def annotate(self, name: str, note: str) -> KeyRecord:
        """Replace a record's note (how a destroyed key was destroyed, once that is known)."""
        updated = replace(self.get(name), note=note)
        self._records[name] = updated
        return updated

    def forget_destroyed(self, before: int) -> list[str]:
        """Drop records destroyed before ``before`` (after they were reported), so a long-lived
        device's ledger does not grow with every epoch forever. Returns the names dropped."""
        gone = [
            name
            for name, record in self._records.items()
            if record.state is KeyState.DESTROYED and record.since < before
        ]
        for name in gone:
            del self._records[name]
        return gone

    # -- group epoch keys -------------------------------------------------------------------

    def start_epoch(self, group: str, epoch: int) -> KeyRecord:
        """Record a group's new epoch data key as active and deactivate the group's previous
        active epoch keys (they still decrypt during the grace period)."""
        for record in self._epoch_records(group):
            if record.epoch is not None and record.epoch >= epoch:
                raise KeyStateError(
                    "key.transition",
                    f"group {group!r} already has epoch {record.epoch}, cannot start {epoch}",
                )
        for record in self._epoch_records(group):
            if record.state in (KeyState.ACTIVE, KeyState.SUSPENDED):
                self.transition(record.name, KeyState.DEACTIVATED)
        return self.add(
            epoch_key_name(group, epoch), KeyKind.EPOCH, group=group, epoch=epoch, active=True
        )

    def current_epoch(self, group: str) -> KeyRecord:
        """The group's active epoch key; ``data.epoch-unknown`` if the group has none."""
        for record in self._epoch_records(group):
            if record.state is KeyState.ACTIVE:
                return record
        raise KeyStateError("data.epoch-unknown", f"group {group!r} has no active epoch key")

    def epoch_use(self, group: str, epoch: int, grace_period: int, now: int) -> EpochUse:
        """What the data key of (group, epoch) may do at ``now``."""
        record = self._records.get(epoch_key_name(group, epoch))
        if record is None:
            return EpochUse.UNUSABLE
        return _use_of(record, grace_period, now)

    def check_decrypt(self, group: str, epoch: int, grace_period: int, now: int) -> None:
        """Raise unless (group, epoch) may decrypt now. Check ids: ``data.epoch-unknown`` (never
        held), ``data.epoch-expired`` (destroyed, or past the grace period),
        ``data.epoch-unusable`` (suspended, compromised, not yet active)."""
        record = self._records.get(epoch_key_name(group, epoch))
        if record is None:
            raise KeyStateError(
                "data.epoch-unknown", f"group {group!r} epoch {epoch} is not known here"
            )
        use = _use_of(record, grace_period, now)
        if use in (EpochUse.ENCRYPT_DECRYPT, EpochUse.DECRYPT_ONLY):
            return
        if use is EpochUse.DUE_FOR_DESTRUCTION or record.state is KeyState.DESTROYED:
            raise KeyStateError(
                "data.epoch-expired",
                f"group {group!r} epoch {epoch} is past its grace period; its key is destroyed",
            )
        raise KeyStateError(
            "data.epoch-unusable", f"group {group!r} epoch {epoch} key is {record.state}"
        )

    def decryptable_epochs(self, group: str, grace_period: int, now: int) -> list[int]:
        """Epochs of ``group`` whose data key may decrypt at ``now``, newest first."""
        usable = (EpochUse.ENCRYPT_DECRYPT, EpochUse.DECRYPT_ONLY)
        return sorted(
            (
                r.epoch
                for r in self._epoch_records(group)
                if r.epoch is not None and _use_of(r, grace_period, now) in usable
            ),
            reverse=True,
        )

    def due_for_destruction(self, grace_period: int, now: int) -> list[KeyRecord]:
        """Epoch keys (any group) whose grace period is over: the daemon erases their secrets
        and then records ``transition(name, DESTROYED)``."""
        return [
            r
            for r in self._records.values()
            if r.kind is KeyKind.EPOCH
            and _use_of(r, grace_period, now) is EpochUse.DUE_FOR_DESTRUCTION
        ]

    def _epoch_records(self, group: str) -> list[KeyRecord]:
        return [r for r in self._records.values() if r.kind is KeyKind.EPOCH and r.group == group]

    # -- persistence ----------------------------------------------------------------------------

    def to_cbor(self) -> dict[str, Any]:
        """A CBOR-ready map for the encrypted state file; ``report()`` is the same list."""
        return {"v": LEDGER_VERSION, "keys": self.report()}

    def report(self) -> list[dict[str, Any]]:
        """Key-state report entries (no secrets: names, kinds, states, times)."""
        return [r.to_cbor_map() for r in sorted(self._records.values(), key=lambda r: r.name)]

    @classmethod
    def from_cbor(cls, obj: object, clock: Callable[[], int]) -> KeyLedger:
        if not isinstance(obj, dict) or set(obj) != {"v", "keys"}:
            raise KeyStateError("key.record", "key ledger is not a {v, keys} map")
        if obj["v"] != LEDGER_VERSION:
            raise KeyStateError("key.record", f"key ledger version {obj['v']!r} is not supported")
        if not isinstance(obj["keys"], list):
            raise KeyStateError("key.record", "key ledger keys is not a list")
        return cls(clock, (KeyRecord.from_cbor_map(item) for item in obj["keys"]))


def _use_of(record: KeyRecord, grace_period: int, now: int) -> EpochUse:
    if record.state is KeyState.ACTIVE:
        return EpochUse.ENCRYPT_DECRYPT
    if record.state is KeyState.DEACTIVATED:
        if now - record.since < grace_period:
            return EpochUse.DECRYPT_ONLY
        return EpochUse.DUE_FOR_DESTRUCTION
    return EpochUse.UNUSABLE
