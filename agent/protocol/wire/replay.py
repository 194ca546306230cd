"""Replay, sequence and epoch-rollback tracking: pure state the adapters persist.

Per sender the guard keeps the highest sequence number accepted, a floor (``min_seq``: every seq
below it is refused) and the message id of each accepted seq it still remembers. A guard has two
bounds: ``window``, a span of seq *values* below the highest inside which unseen seqs are still
accepted, and ``capacity``, how many seqs it remembers per sender. Senders that count their
messages (devices, the service's shared counter) get ``window=32``: capacity 32 is then the whole
span. Senders whose seqs are clock readings (operator CLIs: microseconds, one process per
command) get a window as wide as the envelope's freshness span, so commands of one operator's
concurrent CLI processes that arrive out of order are not lost; the capacity bounds the memory.
When more seqs than ``capacity`` are inside the window, the lowest is forgotten and the floor
rises above it, so a forgotten seq can never be accepted again. Rules (docs/wire.md, "Replay"):

* same sender, same seq, same message id: ``replay.duplicate``. This is what MQTT QoS 1
  redelivery looks like (byte-identical up to the malleable signature). Refused, but benign:
  adapters acknowledge and drop it and do not count it as an attack
  (:data:`agent.protocol.wire.rejections.BENIGN_CHECKS`);
* same sender, same seq, different message: ``replay.seq-reused`` (a forgery attempt or a broken
  sender; never benign);
* seq at or below ``highest - window``, or below the floor: ``replay.seq-old``. Above both,
  unseen seqs are accepted, so messages reordered across topics or service instances are not
  lost. Every seq ever accepted is either remembered or below both bounds: replay protection is
  exact, whatever the window;
* a group message whose epoch is below the group's current epoch: ``replay.epoch-old``
  (rollback); more than one above: ``replay.epoch-future`` (the receiver missed a commit and must
  catch up from the log before it can judge this). Unknown groups accept any epoch (joining).

:meth:`ReplayGuard.check` never changes state; :meth:`ReplayGuard.accept` checks and then records,
so a rejected message leaves no trace. Adapters call ``accept`` only after the message was
processed successfully, and ``advance_epoch`` when a state machine moved a group forward.
:meth:`ReplayGuard.resized` moves a stored guard to other bounds without ever re-opening a seq
the old bounds refused.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.protocol.errors import ProtocolError, StateError
from agent.protocol.wire import cbor
from agent.protocol.wire.envelope import VerifiedMessage
from agent.protocol.wire.messages.base import ID_PATTERN, UINT64_MAX

STATE_VERSION = 2
DEFAULT_WINDOW = 32
DEFAULT_CAPACITY = 1024
MAX_CAPACITY = 4096
MAX_WINDOW = UINT64_MAX
_V1_MAX_WINDOW = 1024  # version 1 state: window and capacity were one bound, at most 1024
_MESSAGE_ID_SIZE = 32

PACKED_VERSION = 3
"""The first byte of :meth:`ReplayGuard.to_bytes`. The CBOR forms (versions 1 and 2) start with a
map head (0xA4, 0xA5), so the two never overlap."""
_U8 = struct.Struct(">B")
_HEAD = struct.Struct(">BQH")  # version, window, capacity
_COUNT = struct.Struct(">H")
_SENDER = struct.Struct(">QQH")  # highest, floor, how many recent seqs
_SEQ = struct.Struct(">Q")
_RECENT = struct.Struct(">Q32s")  # seq, message id
_EPOCH = struct.Struct(">Q")
_MAX_PACKED_SIZE = 4 * 1024 * 1024


@dataclass
class _SenderWindow:
    highest: int
    min_seq: int = 0  # the floor: seqs below it are refused
    recent: dict[int, bytes] = field(default_factory=dict)

    def lowest(self, window: int) -> int:
        """The lowest seq that may still be accepted (if unseen)."""
        return max(self.min_seq, self.highest - window + 1)

    def trim(self, window: int, capacity: int) -> None:
        """Forget what is below the window, then the lowest seqs beyond ``capacity``, raising
        the floor above each so that it stays refused."""
        lowest = self.lowest(window)
        for seq in [seq for seq in self.recent if seq < lowest]:
            del self.recent[seq]
        if len(self.recent) > capacity:
            ordered = sorted(self.recent)
            for seq in ordered[: len(ordered) - capacity]:
                del self.recent[seq]
            self.min_seq = max(self.min_seq, ordered[len(ordered) - capacity - 1] + 1)


class ReplayGuard:
    """Replay state of one receiver. Mutable, but only through :meth:`accept` and
    :meth:`advance_epoch`, both of which leave the state untouched when they raise.

    ``window``: how far (in seq values) below the highest an unseen seq is still accepted;
    ``capacity``: how many seqs are remembered per sender (default ``min(window, 1024)``)."""

    def __init__(self, window: int = DEFAULT_WINDOW, capacity: int | None = None) -> None:
        if type(window) is not int or not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"window must be 1..{MAX_WINDOW}")
        if capacity is None:
            capacity = min(window, DEFAULT_CAPACITY)
        if type(capacity) is not int or not 1 <= capacity <= MAX_CAPACITY:
            raise ValueError(f"capacity must be 1..{MAX_CAPACITY}")
        self.window = window
        self.capacity = capacity
        self._senders: dict[str, _SenderWindow] = {}
        self._epochs: dict[str, int] = {}

    def __repr__(self) -> str:
        return (
            f"ReplayGuard(window={self.window}, capacity={self.capacity}, "
            f"senders={len(self._senders)}, groups={len(self._epochs)})"
        )

    def highest_seq(self, sender: str) -> int | None:
        known = self._senders.get(sender)
        return None if known is None else known.highest

    def lowest_seq(self, sender: str) -> int | None:
        """The lowest seq ``sender`` may still use (if unseen); None for an unknown sender."""
        known = self._senders.get(sender)
        return None if known is None else known.lowest(self.window)

    def remembered(self, sender: str) -> int:
        """How many of ``sender``'s seqs the guard holds a message id for."""
        known = self._senders.get(sender)
        return 0 if known is None else len(known.recent)

    def epoch(self, group: str) -> int | None:
        return self._epochs.get(group)

    def check(self, message: VerifiedMessage) -> None:
        """Raise ``ProtocolError`` if ``message`` is a replay, too old, or from a rolled-back or
        too-far-ahead epoch. Never changes state."""
        known = self._senders.get(message.sender)
        if known is not None:
            seen = known.recent.get(message.seq)
            if seen is not None:
                if seen == message.message_id:
                    raise ProtocolError("replay.duplicate", "this message was already accepted")
                raise ProtocolError("replay.seq-reused", "another message had this seq")
            if message.seq <= known.highest - self.window:
                raise ProtocolError(
                    "replay.seq-old", f"seq is {self.window} or more below the highest seen"
                )
            if message.seq < known.min_seq:
                raise ProtocolError(
                    "replay.seq-old", "seq is below the lowest this sender may still use"
                )
        group_epoch = message.body.group_epoch()
        if group_epoch is not None:
            group, epoch = group_epoch
            self._check_epoch(group, epoch)

    def _check_epoch(self, group: str, epoch: int) -> None:
        current = self._epochs.get(group)
        if current is None:
            return
        if epoch < current:
            raise ProtocolError("replay.epoch-old", f"epoch {epoch} is before current {current}")
        if epoch > current + 1:
            raise ProtocolError(
                "replay.epoch-future", f"epoch {epoch} is beyond current {current} + 1"
            )

    def accept(self, message: VerifiedMessage) -> None:
        """Check, then record ``message`` as seen."""
        self.check(message)
        known = self._senders.get(message.sender)
        if known is None:
            known = self._senders[message.sender] = _SenderWindow(highest=message.seq)
        known.highest = max(known.highest, message.seq)
        known.recent[message.seq] = message.message_id
        known.trim(self.window, self.capacity)
        group_epoch = message.body.group_epoch()
        if group_epoch is not None:
            group, epoch = group_epoch
            self._epochs[group] = max(self._epochs.get(group, epoch), epoch)

    def advance_epoch(self, group: str, epoch: int) -> None:
        """Record that ``group`` is now in ``epoch`` (after a commit was applied). Epochs only go
        forward: an older epoch raises ``replay.epoch-old`` and changes nothing."""
        if type(epoch) is not int or not 0 <= epoch <= UINT64_MAX:
            raise ProtocolError("replay.epoch-old", "epoch must be an unsigned integer")
        current = self._epochs.get(group)
        if current is not None and epoch < current:
            raise ProtocolError("replay.epoch-old", f"epoch {epoch} is before current {current}")
        self._epochs[group] = epoch

    def forget_group(self, group: str) -> None:
        """Drop a group the receiver left (a re-join starts from its welcome's epoch)."""
        self._epochs.pop(group, None)

    def resized(self, window: int, capacity: int | None = None) -> ReplayGuard:
        """A copy with other bounds that refuses everything this guard refuses as old: for a
        wider window each sender's floor first rises to this guard's lowest acceptable seq (it
        must not re-open seqs the narrower one forgot), then the new bounds trim what is
        remembered. The same bounds give an equal copy."""
        guard = ReplayGuard(window, capacity)
        widened = guard.window > self.window
        for sender, known in self._senders.items():
            moved = _SenderWindow(
                highest=known.highest,
                min_seq=max(0, known.lowest(self.window)) if widened else known.min_seq,
                recent=dict(known.recent),
            )
            moved.trim(guard.window, guard.capacity)
            guard._senders[sender] = moved
        guard._epochs = dict(self._epochs)
        return guard

    def copy(self) -> ReplayGuard:
        """An independent copy (what ``copy.deepcopy`` gives, without its generic walk)."""
        guard = ReplayGuard.__new__(ReplayGuard)
        guard.window = self.window
        guard.capacity = self.capacity
        guard._senders = {
            sender: _SenderWindow(known.highest, known.min_seq, dict(known.recent))
            for sender, known in self._senders.items()
        }
        guard._epochs = dict(self._epochs)
        return guard

    # -- persistence ------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The packed form (version 3) the service stores: one byte ``PACKED_VERSION``; the
        window (u64) and capacity (u16); the senders (u16 count), each its id (u8 length, ASCII)
        with highest seq, floor (u64 each) and remembered seqs (u16 count, then ascending seq u64
        + 32-byte message id); the groups (u16 count), each its id and epoch (u64). Senders and
        groups in ascending order, all integers big-endian: one encoding per state.
        :meth:`from_bytes` is its strict inverse."""
        out = [_HEAD.pack(PACKED_VERSION, self.window, self.capacity)]
        out.append(_COUNT.pack(len(self._senders)))
        for sender in sorted(self._senders):
            known = self._senders[sender]
            name = sender.encode("ascii")
            out.append(_U8.pack(len(name)) + name)
            out.append(_SENDER.pack(known.highest, known.min_seq, len(known.recent)))
            out.extend(_RECENT.pack(seq, known.recent[seq]) for seq in sorted(known.recent))
        out.append(_COUNT.pack(len(self._epochs)))
        for group in sorted(self._epochs):
            name = group.encode("ascii")
            out.append(_U8.pack(len(name)) + name + _EPOCH.pack(self._epochs[group]))
        return b"".join(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> ReplayGuard:
        """A stored guard: the packed form (:meth:`to_bytes`), or the CBOR forms stored before
        it (versions 1 and 2, :meth:`from_cbor_map`). Anything malformed (a bound out of range,
        a seq outside the window or out of order, ids unsorted or invalid, bytes missing or
        left over) raises ``StateError``; a non-canonical CBOR form raises its ``cbor.*``
        ``ProtocolError``."""
        if type(data) is not bytes:
            raise StateError("replay state is not bytes")
        if len(data) > _MAX_PACKED_SIZE:
            raise StateError("replay state is too large")
        if not data or data[0] != PACKED_VERSION:
            return cls.from_cbor_map(cbor.decode(data, max_size=_MAX_PACKED_SIZE))
        try:
            return cls._unpack(data)
        except struct.error:
            raise StateError("replay state is truncated") from None

    @classmethod
    def _unpack(cls, data: bytes) -> ReplayGuard:
        _, window, capacity = _HEAD.unpack_from(data, 0)
        if not 1 <= window <= MAX_WINDOW:
            raise StateError("replay state window is out of range")
        if not 1 <= capacity <= MAX_CAPACITY:
            raise StateError("replay state capacity is out of range")
        guard = cls(window, capacity)
        pos = _HEAD.size
        (count,) = _COUNT.unpack_from(data, pos)
        pos += _COUNT.size
        previous = ""
        for _ in range(count):
            sender, pos = _packed_id(data, pos)
            if sender <= previous:
                raise StateError("replay state senders are not in ascending order")
            previous = sender
            highest, min_seq, remembered = _SENDER.unpack_from(data, pos)
            pos += _SENDER.size
            if min_seq > highest:
                raise StateError("replay state floor is above the highest seq")
            if remembered > capacity:
                raise StateError("replay state recent list is malformed")
            known = _SenderWindow(highest=highest, min_seq=min_seq)
            lowest = known.lowest(window)
            last = -1
            stop = pos + remembered * _RECENT.size
            if stop > len(data):
                raise StateError("replay state is truncated")
            recent = _RECENT.iter_unpack(data[pos:stop])
            pos = stop
            for seq, mid in recent:
                if not lowest <= seq <= highest:
                    raise StateError("replay state recent seq is outside the window")
                if seq <= last:
                    raise StateError("replay state recent seqs are not in ascending order")
                known.recent[seq] = mid
                last = seq
            guard._senders[sender] = known
        (count,) = _COUNT.unpack_from(data, pos)
        pos += _COUNT.size
        previous = ""
        for _ in range(count):
            group, pos = _packed_id(data, pos)
            if group <= previous:
                raise StateError("replay state groups are not in ascending order")
            previous = group
            (epoch,) = _EPOCH.unpack_from(data, pos)
            pos += _EPOCH.size
            guard._epochs[group] = epoch
        if pos != len(data):
            raise StateError(f"replay state has {len(data) - pos} bytes after its end")
        return guard

    def to_cbor_map(self) -> dict[str, object]:
        return {
            "v": STATE_VERSION,
            "window": self.window,
            "capacity": self.capacity,
            "senders": {
                sender: {
                    "highest": known.highest,
                    "min": known.min_seq,
                    "recent": [[seq, mid] for seq, mid in sorted(known.recent.items())],
                }
                for sender, known in self._senders.items()
            },
            "epochs": dict(self._epochs),
        }

    @classmethod
    def from_cbor_map(cls, value: object) -> ReplayGuard:
        """Strict inverse of :meth:`to_cbor_map`, and the version 1 state stored before the
        capacity and the floor existed (window and capacity were one bound then; its floor is
        ``highest - window + 1``, which the window already gives). Anything else raises
        ``StateError``."""
        if not isinstance(value, Mapping):
            raise StateError("replay state is not a map")
        version = value.get("v")
        if type(version) is not int or version not in (1, STATE_VERSION):
            raise StateError("replay state version is not supported")
        if version == 1:
            keys, entry_keys = {"v", "window", "senders", "epochs"}, {"highest", "recent"}
        else:
            keys = {"v", "window", "capacity", "senders", "epochs"}
            entry_keys = {"highest", "min", "recent"}
        if set(value) != keys:
            raise StateError(f"replay state is not a {{{', '.join(sorted(keys))}}} map")
        window = value["window"]
        max_window = _V1_MAX_WINDOW if version == 1 else MAX_WINDOW
        if type(window) is not int or not 1 <= window <= max_window:
            raise StateError("replay state window is out of range")
        capacity = window if version == 1 else value["capacity"]
        if type(capacity) is not int or not 1 <= capacity <= MAX_CAPACITY:
            raise StateError("replay state capacity is out of range")
        guard = cls(window, capacity)
        senders, epochs = value["senders"], value["epochs"]
        if not isinstance(senders, Mapping) or not isinstance(epochs, Mapping):
            raise StateError("replay state senders/epochs are not maps")
        for sender, entry in senders.items():
            _state_id(sender)
            if not isinstance(entry, Mapping) or set(entry) != entry_keys:
                raise StateError("replay state sender entry is malformed")
            highest, recent = entry["highest"], entry["recent"]
            min_seq = entry.get("min", 0)
            _state_uint(highest)
            _state_uint(min_seq)
            if min_seq > highest:
                raise StateError("replay state floor is above the highest seq")
            if not isinstance(recent, list) or len(recent) > capacity:
                raise StateError("replay state recent list is malformed")
            known = _SenderWindow(highest=highest, min_seq=min_seq)
            lowest = known.lowest(window)
            previous = -1
            for item in recent:
                if not isinstance(item, list) or len(item) != 2:
                    raise StateError("replay state recent entry is malformed")
                seq, mid = item
                _state_uint(seq)
                if not lowest <= seq <= highest or seq in known.recent:
                    raise StateError("replay state recent seq is outside the window")
                if version != 1 and seq <= previous:
                    raise StateError("replay state recent seqs are not in ascending order")
                if type(mid) is not bytes or len(mid) != _MESSAGE_ID_SIZE:
                    raise StateError("replay state message id is malformed")
                known.recent[seq] = mid
                previous = seq
            guard._senders[sender] = known
        for group, epoch in epochs.items():
            _state_id(group)
            _state_uint(epoch)
            guard._epochs[group] = epoch
        return guard


def _packed_id(data: bytes, pos: int) -> tuple[str, int]:
    (size,) = _U8.unpack_from(data, pos)
    pos += _U8.size
    raw = data[pos : pos + size]
    if len(raw) != size:
        raise StateError("replay state is truncated")
    try:
        value = raw.decode("ascii")
    except UnicodeDecodeError:
        raise StateError("replay state holds an invalid id") from None
    _state_id(value)
    return value, pos + size


def _state_id(value: object) -> None:
    if type(value) is not str or ID_PATTERN.fullmatch(value) is None:
        raise StateError("replay state holds an invalid id")


def _state_uint(value: object) -> None:
    if type(value) is not int or not 0 <= value <= UINT64_MAX:
        raise StateError("replay state holds an invalid integer")
