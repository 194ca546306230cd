"""Service -> operator (``ops/{operator}/result``): the progress and outcome of a command.

A command may produce several results: ``accepted``, then ``in-progress`` as acks arrive, then
one final ``done``, ``failed``, ``rejected`` or ``timeout``. Each carries counts (acked,
pending, failed) and names at most 64 stragglers, so its size does not grow with the group.

Dual-control commands (``op.propose``, ``op.approve``, ``op.list_requests``) are answered with
``op.requests``: the requests concerned, each with its Request bytes, state and approvers (a
refusal is an ``op.result`` ``rejected`` as for every command). When an approval completes the
quorum, the change it starts is reported under the approval's command id with ``op.result``
messages as a direct command is.

``op.audit_sync`` is answered with ``op.audit_checkpoint``: the signed checkpoint bytes
(``provisioning.checkpoint``; the operator verifies them with the pinned checkpoint key) and a
page of audit entries, each as its sequence number and hash preimage, so the operator rehashes
them from its remembered head instead of trusting any stored hash.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

from agent.protocol.errors import ProtocolError
from agent.protocol.wire.messages.base import (
    Body,
    Record,
    check_bytes,
    check_enum,
    check_epoch,
    check_ids,
    check_text,
    check_tuple,
    check_uint,
)
from agent.protocol.wire.messages.service import MAX_AUTHZ, check_command_id


class ResultStatus(StrEnum):
    ACCEPTED = "accepted"
    IN_PROGRESS = "in-progress"
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"
    TIMEOUT = "timeout"


MAX_STRAGGLERS = 64
"""The most device ids a result names: counts say how many, ``stragglers`` says who for the
first of them, so a result does not grow with the group (a 100,000-member rekey's progress
fits its frame as a 3-member one does)."""


@dataclass(frozen=True)
class OperatorResult(Body):
    """``acked``, ``pending`` and ``failed`` count the members (or devices) in each state;
    ``stragglers`` names at most ``MAX_STRAGGLERS`` of the pending and failed ones, sorted."""

    TYPE: ClassVar[str] = "op.result"
    ENUMS: ClassVar = {"status": ResultStatus}

    command_id: bytes
    status: ResultStatus
    detail: str
    acked: int
    pending: int
    failed: int
    stragglers: tuple[str, ...]
    epoch: int | None = None

    def __post_init__(self) -> None:
        check_command_id(self.command_id)
        check_enum(self.status, "status", ResultStatus)
        check_text(self.detail, "detail")
        check_uint(self.acked, "acked")
        check_uint(self.pending, "pending")
        check_uint(self.failed, "failed")
        check_tuple(self.stragglers, "stragglers", max_len=MAX_STRAGGLERS)
        check_ids(self.stragglers, "stragglers")
        if len(self.stragglers) > self.pending + self.failed:
            raise ProtocolError("body.bounds", "more stragglers than pending and failed members")
        if self.epoch is not None:
            check_epoch(self.epoch)

    @classmethod
    def of(
        cls,
        command_id: bytes,
        status: ResultStatus,
        detail: str,
        *,
        acked: Collection[str] = (),
        pending: Collection[str] = (),
        failed: Collection[str] = (),
        epoch: int | None = None,
    ) -> OperatorResult:
        """The result for these members: their counts, and the first ``MAX_STRAGGLERS`` of
        the pending then the failed ones (each sorted) by name."""
        named = list(dict.fromkeys([*sorted(pending), *sorted(failed)]))[:MAX_STRAGGLERS]
        return cls(
            command_id,
            status,
            detail,
            len(acked),
            len(pending),
            len(failed),
            tuple(named),
            epoch,
        )


class RequestState(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    EXECUTED = "executed"
    EXPIRED = "expired"
    REFUSED = "refused"


MAX_REQUESTS = 256


@dataclass(frozen=True)
class RequestInfo(Record):
    """One dual-control request: ``request`` its Request bytes (``agent.protocol.authz``; the
    operator decodes and shows them before signing), its ``state``, the operators who approved
    it so far, how many approvals the quorum policy needs (``required``) and why it ended
    (``detail``, empty while pending)."""

    ENUMS: ClassVar = {"state": RequestState}

    request: bytes
    state: RequestState
    approvers: tuple[str, ...]
    required: int
    detail: str

    def __post_init__(self) -> None:
        check_bytes(self.request, "request", min_len=1, max_len=MAX_AUTHZ)
        check_enum(self.state, "state", RequestState)
        check_ids(self.approvers, "approvers")
        check_uint(self.required, "required", minimum=1, maximum=255)
        check_text(self.detail, "detail")


@dataclass(frozen=True)
class RequestsResult(Body):
    TYPE: ClassVar[str] = "op.requests"
    NESTED: ClassVar = {"requests": RequestInfo}

    command_id: bytes
    requests: tuple[RequestInfo, ...]

    def __post_init__(self) -> None:
        check_command_id(self.command_id)
        check_tuple(self.requests, "requests", max_len=MAX_REQUESTS)
        for item in self.requests:
            if not isinstance(item, RequestInfo):
                raise ProtocolError("body.type", "requests[] must be request records")


MAX_AUDIT_LINKS = 4096
MAX_PREIMAGE = 64 * 1024
MAX_SIGNED_CHECKPOINT = 1024


@dataclass(frozen=True)
class AuditLink(Record):
    """One audit entry: ``seq`` and the CBOR preimage its hash covers after the previous hash
    (``provisioning.audit.entry_preimage``)."""

    seq: int
    preimage: bytes

    def __post_init__(self) -> None:
        check_uint(self.seq, "seq", minimum=1)
        check_bytes(self.preimage, "preimage", min_len=1, max_len=MAX_PREIMAGE)


@dataclass(frozen=True)
class AuditCheckpointResult(Body):
    TYPE: ClassVar[str] = "op.audit_checkpoint"
    NESTED: ClassVar = {"entries": AuditLink}

    command_id: bytes
    checkpoint: bytes
    entries: tuple[AuditLink, ...]

    def __post_init__(self) -> None:
        check_command_id(self.command_id)
        check_bytes(self.checkpoint, "checkpoint", min_len=1, max_len=MAX_SIGNED_CHECKPOINT)
        check_tuple(self.entries, "entries", max_len=MAX_AUDIT_LINKS)
        for item in self.entries:
            if not isinstance(item, AuditLink):
                raise ProtocolError("body.type", "entries[] must be audit links")
