"""Member -> service: "I am in this epoch", with the epoch authenticator (RFC 9420 §8.7) that
proves it without revealing any secret the service should not hold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from agent.protocol.wire.messages.base import (
    COMMAND_ID_MAX,
    COMMAND_ID_MIN,
    Body,
    check_bytes,
    check_epoch,
    check_id,
)

EPOCH_AUTHENTICATOR_SIZE = 32


@dataclass(frozen=True)
class Ack(Body):
    """The sender has processed the group's commit (or welcome) and is now in ``epoch``."""

    TYPE: ClassVar[str] = "group.ack"

    group_id: str
    epoch: int
    epoch_authenticator: bytes
    command_id: bytes | None = None

    def __post_init__(self) -> None:
        check_id(self.group_id, "group_id")
        check_epoch(self.epoch)
        check_bytes(
            self.epoch_authenticator,
            "epoch_authenticator",
            min_len=EPOCH_AUTHENTICATOR_SIZE,
            max_len=EPOCH_AUTHENTICATOR_SIZE,
        )
        if self.command_id is not None:
            check_bytes(
                self.command_id, "command_id", min_len=COMMAND_ID_MIN, max_len=COMMAND_ID_MAX
            )

    def group_epoch(self) -> tuple[str, int]:
        return (self.group_id, self.epoch)
