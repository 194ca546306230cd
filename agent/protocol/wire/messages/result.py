"""Service -> operator (``ops/{operator}/result``): the progress and outcome of a command.

A command may produce several results: ``accepted``, then ``in-progress`` as acks arrive, then
one final ``done``, ``failed``, ``rejected`` or ``timeout`` (``pending`` then names the
stragglers).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

from agent.protocol.wire.messages.base import Body, check_enum, check_epoch, check_ids, check_text
from agent.protocol.wire.messages.service import check_command_id


class ResultStatus(StrEnum):
    ACCEPTED = "accepted"
    IN_PROGRESS = "in-progress"
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"
    TIMEOUT = "timeout"


@dataclass(frozen=True)
class OperatorResult(Body):
    TYPE: ClassVar[str] = "op.result"
    ENUMS: ClassVar = {"status": ResultStatus}

    command_id: bytes
    status: ResultStatus
    detail: str
    acked: tuple[str, ...]
    pending: tuple[str, ...]
    epoch: int | None = None

    def __post_init__(self) -> None:
        check_command_id(self.command_id)
        check_enum(self.status, "status", ResultStatus)
        check_text(self.detail, "detail")
        check_ids(self.acked, "acked")
        check_ids(self.pending, "pending")
        if self.epoch is not None:
            check_epoch(self.epoch)
