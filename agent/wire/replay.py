"""Replay, sequence and epoch-rollback tracking: pure state the adapters persist.

Per sender the guard keeps the highest sequence number accepted and, for the last ``window``
sequence numbers below and including it, the message id accepted with each. Per group it keeps
the highest epoch accepted. Rules (docs/wire.md, "Replay"):

* same sender, same seq, same message id: ``replay.duplicate``. This is what MQTT QoS 1
  redelivery looks like (byte-identical up to the malleable signature). Refused, but benign:
  adapters acknowledge and drop it and do not count it as an attack
  (:data:`agent.wire.rejections.BENIGN_CHECKS`);
* same sender, same seq, different message: ``replay.seq-reused`` (a forgery attempt or a broken
  sender; never benign);
* seq at or below ``highest - window``: ``replay.seq-old``. Within the window, unseen seqs are
  accepted, so messages reordered across topics or service instances are not lost;
* a group message whose epoch is below the group's current epoch: ``replay.epoch-old``
  (rollback); more than one above: ``replay.epoch-future`` (the receiver missed a commit and must
  catch up from the log before it can judge this). Unknown groups accept any epoch (joining).

:meth:`ReplayGuard.check` never changes state; :meth:`ReplayGuard.accept` checks and then records,
so a rejected message leaves no trace. Adapters call ``accept`` only after the message was
processed successfully, and ``advance_epoch`` when a state machine moved a group forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.errors import ProtocolError, StateError
from agent.wire.envelope import VerifiedMessage
from agent.wire.messages.base import ID_PATTERN, UINT64_MAX

STATE_VERSION = 1
DEFAULT_WINDOW = 32
MAX_WINDOW = 1024
_MESSAGE_ID_SIZE = 32


@dataclass
class _SenderWindow:
    highest: int
    recent: dict[int, bytes] = field(default_factory=dict)


class ReplayGuard:
    """Replay state of one receiver. Mutable, but only through :meth:`accept` and
    :meth:`advance_epoch`, both of which leave the state untouched when they raise."""

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        if type(window) is not int or not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"window must be 1..{MAX_WINDOW}")
        self.window = window
        self._senders: dict[str, _SenderWindow] = {}
        self._epochs: dict[str, int] = {}

    def __repr__(self) -> str:
        return (
            f"ReplayGuard(window={self.window}, senders={len(self._senders)}, "
            f"groups={len(self._epochs)})"
        )

    def highest_seq(self, sender: str) -> int | None:
        known = self._senders.get(sender)
        return None if known is None else known.highest

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
        floor = known.highest - self.window
        for seq in [seq for seq in known.recent if seq <= floor]:
            del known.recent[seq]
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

    # -- persistence ------------------------------------------------------------------------

    def to_cbor_map(self) -> dict[str, object]:
        return {
            "v": STATE_VERSION,
            "window": self.window,
            "senders": {
                sender: {
                    "highest": known.highest,
                    "recent": [[seq, mid] for seq, mid in sorted(known.recent.items())],
                }
                for sender, known in self._senders.items()
            },
            "epochs": dict(self._epochs),
        }

    @classmethod
    def from_cbor_map(cls, value: object) -> ReplayGuard:
        """Strict inverse of :meth:`to_cbor_map`; anything else raises ``StateError``."""
        if not isinstance(value, Mapping) or set(value) != {"v", "window", "senders", "epochs"}:
            raise StateError("replay state is not a {v, window, senders, epochs} map")
        if value["v"] != STATE_VERSION or type(value["v"]) is not int:
            raise StateError("replay state version is not supported")
        window = value["window"]
        if type(window) is not int or not 1 <= window <= MAX_WINDOW:
            raise StateError("replay state window is out of range")
        guard = cls(window)
        senders, epochs = value["senders"], value["epochs"]
        if not isinstance(senders, Mapping) or not isinstance(epochs, Mapping):
            raise StateError("replay state senders/epochs are not maps")
        for sender, entry in senders.items():
            _state_id(sender)
            if not isinstance(entry, Mapping) or set(entry) != {"highest", "recent"}:
                raise StateError("replay state sender entry is malformed")
            highest, recent = entry["highest"], entry["recent"]
            _state_uint(highest)
            if not isinstance(recent, list) or len(recent) > window:
                raise StateError("replay state recent list is malformed")
            known = _SenderWindow(highest=highest)
            for item in recent:
                if not isinstance(item, list) or len(item) != 2:
                    raise StateError("replay state recent entry is malformed")
                seq, mid = item
                _state_uint(seq)
                if not highest - window < seq <= highest or seq in known.recent:
                    raise StateError("replay state recent seq is outside the window")
                if type(mid) is not bytes or len(mid) != _MESSAGE_ID_SIZE:
                    raise StateError("replay state message id is malformed")
                known.recent[seq] = mid
            guard._senders[sender] = known
        for group, epoch in epochs.items():
            _state_id(group)
            _state_uint(epoch)
            guard._epochs[group] = epoch
        return guard


def _state_id(value: object) -> None:
    if type(value) is not str or ID_PATTERN.fullmatch(value) is None:
        raise StateError("replay state holds an invalid id")


def _state_uint(value: object) -> None:
    if type(value) is not int or not 0 <= value <= UINT64_MAX:
        raise StateError("replay state holds an invalid integer")
