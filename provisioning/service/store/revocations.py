"""The revocation feed's rows (``service_revocation_feed``) and how far each device follows it
(``service_revocation_feed_seen``); the flow is ``provisioning.service.feed``."""

from __future__ import annotations

from collections.abc import Iterable

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


# ``session.info`` key: the devices whose feed rows a batch loaded, and those rows (and the
# ones added since) by device (``note_seen_rows``)
_BATCH_ROWS = "keyfleet.feed_seen_rows"


def note_seen_rows(
    session: Session, devices: Iterable[str], rows: Iterable[RevocationFeedSeen]
) -> None:
    """``rows`` are every feed row of ``devices`` (loaded by one query for a batch): a device
    without one has none, and ``record_seen`` then adds it without asking the database (a
    device's first report) and without flushing the batch's other rows first."""
    known: frozenset[str]
    known, found = session.info.get(_BATCH_ROWS, (frozenset(), {}))
    found = {**found, **{row.device_id: row for row in rows}}
    session.info[_BATCH_ROWS] = (known | frozenset(devices), found)


def record_seen(session: Session, device_id: str, seq: int, *, now: int) -> None:
    batch: tuple[frozenset[str], dict[str, RevocationFeedSeen]] | None = session.info.get(
        _BATCH_ROWS
    )
    if batch is not None and device_id in batch[0]:
        seen = batch[1].get(device_id)
    else:
        seen = session.get(RevocationFeedSeen, device_id)
    if seen is None:
        seen = RevocationFeedSeen(device_id=device_id, seq=seq, reported_at=now)
        session.add(seen)
        if batch is not None and device_id in batch[0]:
            batch[1][device_id] = seen
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
