"""The revocation feed's rows (``service_revocation_feed``) and how far each device follows it
(``service_revocation_feed_seen``); the flow is ``provisioning.service.feed``."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from provisioning.db.runtime import RevocationFeedRow, RevocationFeedSeen


def newest(session: Session) -> tuple[int, bytes] | None:
    """(seq, hash) of the newest entry, None for an empty feed."""
    row = session.scalars(
        select(RevocationFeedRow).order_by(RevocationFeedRow.seq.desc()).limit(1)
    ).first()
    return None if row is None else (row.seq, row.hash)


def add_entry(session: Session, seq: int, entry: bytes, digest: bytes, *, now: int) -> None:
    """Insert entry ``seq`` (a number taken already is a conflict: the primary key refuses it,
    and the transaction retries with the new newest entry)."""
    session.add(RevocationFeedRow(seq=seq, entry=entry, hash=digest, created_at=now))
    session.flush()


def entries(
    session: Session, first: int, last: int, *, limit: int, newest_first: bool
) -> list[bytes]:
    """Entry bytes of ``first..last`` (at most ``limit``), oldest or newest first."""
    order = RevocationFeedRow.seq.desc() if newest_first else RevocationFeedRow.seq
    rows = session.scalars(
        select(RevocationFeedRow.entry)
        .where(RevocationFeedRow.seq >= first, RevocationFeedRow.seq <= last)
        .order_by(order)
        .limit(limit)
    )
    return list(rows)


def record_seen(session: Session, device_id: str, seq: int, *, now: int) -> None:
    seen = session.get(RevocationFeedSeen, device_id)
    if seen is None:
        session.add(RevocationFeedSeen(device_id=device_id, seq=seq, reported_at=now))
    elif seen.seq != seq:
        seen.seq, seen.reported_at = seq, now


def seen(session: Session, device_id: str) -> int | None:
    row = session.get(RevocationFeedSeen, device_id)
    return None if row is None else row.seq


def behind(session: Session, seq: int) -> list[tuple[str, int]]:
    """(device, its feed seq) of every device whose last report was below ``seq``."""
    rows = session.execute(
        select(RevocationFeedSeen.device_id, RevocationFeedSeen.seq)
        .where(RevocationFeedSeen.seq < seq)
        .order_by(RevocationFeedSeen.seq, RevocationFeedSeen.device_id)
    )
    return [(device, at) for device, at in rows]
