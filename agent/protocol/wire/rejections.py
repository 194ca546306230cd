"""Counting refused messages by check id (pure; adapters log and export the counts)."""

from __future__ import annotations

from agent.protocol.errors import ProtocolError

BENIGN_CHECKS = frozenset({"replay.duplicate", "revocation.gap"})
"""Refusals that are expected in normal operation (MQTT QoS 1 redelivers after a reconnect; a
revocation feed head that is ahead of a device by more than it carries: the device asks for the
entries it lacks)."""


class Rejections:
    """Counts of refused messages by check id, for logs and metrics. Benign refusals (QoS 1
    redeliveries) are counted apart so that alerting can ignore them."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"Rejections({self._counts!r})"

    def record(self, error: ProtocolError) -> None:
        self._counts[error.check] = self._counts.get(error.check, 0) + 1

    def count(self, check: str) -> int:
        return self._counts.get(check, 0)

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    @property
    def suspicious(self) -> int:
        """Refusals that are not benign redeliveries."""
        return sum(n for check, n in self._counts.items() if check not in BENIGN_CHECKS)

    def snapshot(self) -> dict[str, int]:
        return dict(self._counts)


def is_benign(error: ProtocolError) -> bool:
    """Whether a refusal is an expected redelivery rather than a sign of an attack."""
    return error.check in BENIGN_CHECKS
