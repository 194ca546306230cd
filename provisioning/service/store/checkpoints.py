"""The signed audit checkpoints (``service_audit_checkpoints``): the newest, one by count, all
of them in order, and storing a new one (two instances that checkpoint the same head at once:
the second insert is dropped, both signed the same statement)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from provisioning.db.engine import savepoint
from provisioning.db.runtime import AuditCheckpointRow


def newest_checkpoint(session: Session) -> bytes | None:
    return session.scalars(
        select(AuditCheckpointRow.signed).order_by(AuditCheckpointRow.count.desc()).limit(1)
    ).first()


def newest_checkpoint_count(session: Session) -> int | None:
    return session.scalars(
        select(AuditCheckpointRow.count).order_by(AuditCheckpointRow.count.desc()).limit(1)
    ).first()


def checkpoint_at(session: Session, count: int) -> bytes | None:
    row = session.get(AuditCheckpointRow, count)
    return None if row is None else row.signed


def checkpoint_row(session: Session, count: int) -> tuple[bytes, bytes] | None:
    """(head, signed) of the checkpoint at ``count``."""
    row = session.get(AuditCheckpointRow, count)
    return None if row is None else (row.head, row.signed)


def all_checkpoints(session: Session) -> list[bytes]:
    return list(
        session.scalars(select(AuditCheckpointRow.signed).order_by(AuditCheckpointRow.count))
    )


def store_checkpoint(
    session: Session, *, count: int, head: bytes, time: int, instance: str, signed: bytes
) -> bool:
    """Keep a new checkpoint; False if one of this count exists already (another instance's)."""
    try:
        with savepoint(session):
            session.add(
                AuditCheckpointRow(
                    count=count, head=head, time=time, instance=instance, signed=signed
                )
            )
            session.flush()
    except IntegrityError:
        return False
    return True
