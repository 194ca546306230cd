"""Dual control's shared state: the requests operators propose and approve
(``service_quorum_requests``) and the signed quorum policies the service adopted
(``service_quorum_policies``).

A request moves only by ``save_request``, a compare-and-set on its version: two instances that
take two approvals of one request at once cannot both write, the loser's transaction is retried
(``RetryableConflict``) and then sees the other's approval. Nothing here is secret: requests,
approvals and authorizations are public signed data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from agent.protocol.errors import ProtocolError
from agent.protocol.wire import cbor as codec
from agent.protocol.wire.messages.result import RequestState
from provisioning.db.engine import RetryableConflict, rowcount
from provisioning.db.runtime import OperationRow, QuorumPolicyRow, QuorumRequestRow

OPEN_STATES = frozenset({RequestState.PENDING, RequestState.APPROVED})


@dataclass(eq=False)
class StoredRequest:
    """A snapshot of one request row; written back with ``save_request``."""

    request_id: bytes
    op: str
    group_id: str | None
    members: tuple[str, ...]
    request: bytes = field(repr=False)
    approvals: list[bytes] = field(repr=False)
    approvers: list[str]
    state: RequestState
    proposer: str
    created_at: int
    expires_at: int
    command_id: bytes | None = field(default=None, repr=False)
    detail: str = ""
    version: int = 0
    reason: str = ""


def _from_row(row: QuorumRequestRow) -> StoredRequest:
    approvals = codec.decode(row.approvals)
    if not isinstance(approvals, list) or not all(type(a) is bytes for a in approvals):
        raise ProtocolError("quorum.stored", f"request {row.request_id}: approvals unreadable")
    return StoredRequest(
        request_id=bytes.fromhex(row.request_id),
        op=row.op,
        group_id=row.group_id,
        members=tuple(m for m in row.members.split(",") if m),
        request=row.request,
        approvals=list(approvals),
        approvers=[a for a in row.approvers.split(",") if a],
        state=RequestState(row.state),
        proposer=row.proposer,
        created_at=row.created_at,
        expires_at=row.expires_at,
        command_id=None if row.command_id is None else bytes.fromhex(row.command_id),
        detail=row.detail,
        version=row.version,
        reason=row.reason,
    )


def insert_request(session: Session, stored: StoredRequest, *, now: int) -> None:
    session.add(
        QuorumRequestRow(
            request_id=stored.request_id.hex(),
            op=stored.op,
            group_id=stored.group_id,
            members=",".join(stored.members),
            request=stored.request,
            approvals=codec.encode(list(stored.approvals)),
            approvers=",".join(stored.approvers),
            state=stored.state.value,
            proposer=stored.proposer,
            reason=stored.reason,
            command_id=None,
            detail=stored.detail,
            version=0,
            created_at=stored.created_at,
            expires_at=stored.expires_at,
            updated_at=now,
        )
    )
    session.flush()


def load_request(session: Session, request_id: bytes) -> StoredRequest | None:
    row = session.get(QuorumRequestRow, request_id.hex())
    return None if row is None else _from_row(row)


def save_request(session: Session, stored: StoredRequest, *, now: int) -> None:
    """Write ``stored`` back if nobody changed the row since it was read; otherwise raise
    ``RetryableConflict`` (the transaction is retried and reads the other's change)."""
    result = session.execute(
        update(QuorumRequestRow)
        .where(
            QuorumRequestRow.request_id == stored.request_id.hex(),
            QuorumRequestRow.version == stored.version,
        )
        .values(
            approvals=codec.encode(list(stored.approvals)),
            approvers=",".join(stored.approvers),
            state=stored.state.value,
            command_id=None if stored.command_id is None else stored.command_id.hex(),
            detail=stored.detail,
            version=stored.version + 1,
            updated_at=now,
        )
    )
    if rowcount(result) != 1:
        raise RetryableConflict(f"request {stored.request_id.hex()} changed meanwhile")
    stored.version += 1


def open_requests(session: Session) -> list[StoredRequest]:
    """Pending (and approved, not yet started) requests, oldest first."""
    rows = session.scalars(
        select(QuorumRequestRow)
        .where(QuorumRequestRow.state.in_([s.value for s in OPEN_STATES]))
        .order_by(QuorumRequestRow.created_at, QuorumRequestRow.request_id)
    )
    return [_from_row(row) for row in rows]


def requests_of_op(session: Session, op: str) -> list[StoredRequest]:
    """Every request of ``op`` in any state, oldest first (e.g. the operator removals, whose
    kept approvals are the authority of an operator's removed state)."""
    rows = session.scalars(
        select(QuorumRequestRow)
        .where(QuorumRequestRow.op == op)
        .order_by(QuorumRequestRow.created_at, QuorumRequestRow.request_id)
    )
    return [_from_row(row) for row in rows]


def recent_requests(session: Session, *, limit: int) -> list[StoredRequest]:
    """The newest ``limit`` requests in any state, newest first (the dashboard)."""
    rows = session.scalars(
        select(QuorumRequestRow)
        .order_by(QuorumRequestRow.created_at.desc(), QuorumRequestRow.request_id)
        .limit(limit)
    )
    return [_from_row(row) for row in rows]


def expired_requests(session: Session, now: int) -> list[StoredRequest]:
    """Pending requests whose window ended before ``now``."""
    rows = session.scalars(
        select(QuorumRequestRow).where(
            QuorumRequestRow.state == RequestState.PENDING.value,
            QuorumRequestRow.expires_at < now,
        )
    )
    return [_from_row(row) for row in rows]


# -- the quorum policy in force ---------------------------------------------------------------


def adopted_policies(session: Session) -> list[tuple[int, bytes]]:
    """(serial, Authorization bytes) of every adopted policy, oldest first (each was approved
    under the one before it; the reader verifies the chain again)."""
    rows = session.scalars(select(QuorumPolicyRow).order_by(QuorumPolicyRow.serial))
    return [(row.serial, row.authz) for row in rows]


def adopt_policy(session: Session, serial: int, authz: bytes, *, now: int) -> None:
    """Record the policy ``serial`` approved by ``authz`` (an existing serial is a conflict:
    the primary key refuses it)."""
    session.add(QuorumPolicyRow(serial=serial, authz=authz, adopted_at=now))
    session.flush()


# -- the Authorization an operation runs under ------------------------------------------------


def set_operation_authz(session: Session, command_id: bytes, authz: bytes) -> None:
    session.execute(
        update(OperationRow).where(OperationRow.command_id == command_id.hex()).values(authz=authz)
    )


def operation_authz(session: Session, command_id: bytes) -> bytes | None:
    row = session.get(OperationRow, command_id.hex())
    return None if row is None else row.authz
