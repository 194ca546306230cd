"""The dashboard's view of dual control: the requests waiting for operators' approvals
(docs/operations.md, "Dual control"). Read-only, like the whole dashboard: approving is
``keyfleet approve``, signed with the operator's own key, never a button here."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.protocol import authz
from agent.protocol.errors import ProtocolError
from agent.protocol.releaseproof import read_subject
from provisioning.db.runtime import QuorumRequestRow

MAX_SHOWN = 100
RELEASE_OPS = frozenset({authz.OP_RELEASE_APPROVE, authz.OP_RELEASE_REVOKE})


@dataclass(frozen=True)
class PendingRequest:
    request_id: str
    op: str
    group_id: str | None
    members: tuple[str, ...]
    proposer: str
    approvers: tuple[str, ...]
    created_at: int
    expires_at: int
    readable: bool  # the stored Request bytes decode (a damaged row is shown as such)
    release: str | None = None  # the release version a release request names


def pending_requests(session: Session, *, now: int) -> list[PendingRequest]:
    """Pending requests whose window is still open, oldest first (at most ``MAX_SHOWN``)."""
    rows = session.scalars(
        select(QuorumRequestRow)
        .where(QuorumRequestRow.state == "pending", QuorumRequestRow.expires_at >= now)
        .order_by(QuorumRequestRow.created_at, QuorumRequestRow.request_id)
        .limit(MAX_SHOWN)
    )
    shown = []
    for row in rows:
        release = None
        try:
            request = authz.Request.decode(row.request)
            readable = request.id.hex() == row.request_id
            # only a release op's subject names a release (an operator's or a replacement's
            # subject is theirs: the members column says who)
            if request.subject is not None and request.op in RELEASE_OPS:
                release = read_subject(request.subject)[0]
        except ProtocolError:
            readable = False
        shown.append(
            PendingRequest(
                request_id=row.request_id,
                op=row.op,
                group_id=row.group_id,
                members=tuple(m for m in row.members.split(",") if m),
                proposer=row.proposer,
                approvers=tuple(a for a in row.approvers.split(",") if a),
                created_at=row.created_at,
                expires_at=row.expires_at,
                readable=readable,
                release=release,
            )
        )
    return shown
