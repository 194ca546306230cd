"""What a database writer does to the audit log to hide something (for the audit checkpoint
attack tests): delete one entry and recompute the chain after it so that ``verify_chain`` is
happy again, or cut entries off the end and move ``audit_head`` back. Optionally the stored
checkpoints go too, so the service signs fresh ones of the rewritten log. Plain SQL through the
ORM tables, no service code: as anyone with write access to the database could."""

from __future__ import annotations

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from provisioning import audit
from provisioning.db.runtime import AuditCheckpointRow
from provisioning.db.schema import AuditEntry, AuditHead


def _rows_from(session: Session, seq: int) -> list[AuditEntry]:
    return list(
        session.scalars(select(AuditEntry).where(AuditEntry.seq >= seq).order_by(AuditEntry.seq))
    )


def delete_and_recompute(session: Session, seq: int, *, forget_checkpoints: bool = True) -> None:
    """Remove entry ``seq``, renumber the later ones down by one and recompute every hash from
    there, and move ``audit_head``: the chain verifies again, one entry shorter."""
    later = [
        (row.time, row.actor, row.action, row.target, row.outcome, row.reason, row.details)
        for row in _rows_from(session, seq + 1)
    ]
    session.execute(delete(AuditEntry).where(AuditEntry.seq >= seq))
    session.flush()
    prev = session.scalars(select(AuditEntry.entry_hash).where(AuditEntry.seq == seq - 1)).first()
    prev_hash = audit.GENESIS_PREV_HASH if prev is None else bytes(prev)
    number = seq
    for time, actor, action, target, outcome, reason, details in later:
        preimage = audit.entry_preimage(
            seq=number, time=time, actor=actor, action=action, target=target,
            outcome=outcome.value, reason=reason, details=details,
        )  # fmt: skip
        entry_hash = audit.compute_hash(prev_hash, preimage)
        session.add(
            AuditEntry(
                seq=number, time=time, actor=actor, action=action, target=target,
                outcome=outcome, reason=reason, details=details, prev_hash=prev_hash,
                entry_hash=entry_hash,
            )
        )  # fmt: skip
        session.flush()
        prev_hash = entry_hash
        number += 1
    _set_head(session, number - 1, prev_hash, forget_checkpoints)


def truncate(session: Session, count: int, *, forget_checkpoints: bool = True) -> None:
    """Cut the last ``count`` entries off and move ``audit_head`` to the new last one."""
    last, _ = audit.head(session)
    keep = last - count
    session.execute(delete(AuditEntry).where(AuditEntry.seq > keep))
    session.flush()
    new_last, new_hash = audit.head(session)
    _set_head(session, new_last, new_hash, forget_checkpoints)


def _set_head(session: Session, seq: int, entry_hash: bytes, forget_checkpoints: bool) -> None:
    session.execute(
        update(AuditHead).where(AuditHead.id == 1).values(seq=seq, entry_hash=entry_hash)
    )
    if forget_checkpoints:
        session.execute(delete(AuditCheckpointRow))
