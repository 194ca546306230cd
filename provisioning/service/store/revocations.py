"""The revocation feed's rows (``service_revocation_feed``) and how far each device follows it
(``service_revocation_feed_seen``); the flow is ``provisioning.service.feed``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from sqlalchemy import insert, select
from sqlalchemy.orm import Session, make_transient_to_detached
from sqlalchemy.orm.util import identity_key

from provisioning.db.engine import table_of
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
# ones added since) by device (``note_seen_rows``), as ORM rows or, read as plain columns
# (``note_seen_seqs``), as their ``seq`` alone
_BATCH_ROWS = "keyfleet.feed_seen_rows"


def note_seen_rows(
    session: Session, devices: Iterable[str], rows: Iterable[RevocationFeedSeen]
) -> None:
    """``rows`` are every feed row of ``devices`` (loaded by one query for a batch): a device
    without one has none, and ``record_seen`` then adds it without asking the database (a
    device's first report) and without flushing the batch's other rows first."""
    _note(session, devices, {row.device_id: row for row in rows})


def note_seen_seqs(session: Session, devices: Iterable[str], seqs: Mapping[str, int]) -> None:
    """``note_seen_rows`` with every feed row of ``devices`` read as (device, seq) columns: a
    report whose seq is the recorded one then changes nothing and builds no ORM object."""
    _note(session, devices, seqs)


def _note(
    session: Session, devices: Iterable[str], rows: Mapping[str, RevocationFeedSeen | int]
) -> None:
    known: frozenset[str]
    found: dict[str, RevocationFeedSeen | int]
    known, found = session.info.get(_BATCH_ROWS, (frozenset(), {}))
    session.info[_BATCH_ROWS] = (known | frozenset(devices), {**found, **rows})


def load_seen_seqs(session: Session, devices: Sequence[str]) -> None:
    """Read the feed rows of ``devices`` as columns, in one query (``note_seen_seqs``)."""
    if not devices:
        return
    found = session.execute(
        select(RevocationFeedSeen.device_id, RevocationFeedSeen.seq).where(
            RevocationFeedSeen.device_id.in_(devices)
        )
    )
    note_seen_seqs(session, devices, {device: int(seq) for device, seq in found})


# ``session.info`` key: the feed rows ``record_seen`` adds for devices noted without one, kept as
# (seq, reported_at) until ``insert_new_seen`` (``defer_new_seen``)
_NEW_ROWS = "keyfleet.feed_seen_new"


def defer_new_seen(session: Session) -> None:
    """From now on, the feed row ``record_seen`` adds for a device whose rows were noted
    (``note_seen_rows`` / ``note_seen_seqs``) without one (its first report: a burst after a
    fleet-wide reconnect) is kept as plain values and inserted by ``insert_new_seen`` in one Core
    statement, not as an ORM object flushed row by row. Until then no query of this session sees
    those rows: for a caller that reads no feed row meanwhile (no group deletion open, whose
    progress is read from them: ``groupdelete.on_feed_report``) and calls ``insert_new_seen``
    before its transaction ends."""
    session.info[_NEW_ROWS] = {}


def insert_new_seen(session: Session) -> None:
    """Insert the feed rows ``defer_new_seen`` kept (one statement), and stop keeping them."""
    new: dict[str, tuple[int, int]] | None = session.info.pop(_NEW_ROWS, None)
    if new:
        session.connection().execute(
            insert(table_of(RevocationFeedSeen)),
            [
                {"device_id": device, "seq": seq, "reported_at": at}
                for device, (seq, at) in sorted(new.items())
            ],
        )


def record_seen(session: Session, device_id: str, seq: int, *, now: int) -> None:
    batch: tuple[frozenset[str], dict[str, RevocationFeedSeen | int]] | None = session.info.get(
        _BATCH_ROWS
    )
    found: RevocationFeedSeen | int | None
    if batch is not None and device_id in batch[0]:
        found = batch[1].get(device_id)
    else:
        found = session.get(RevocationFeedSeen, device_id)
    if isinstance(found, int):
        if found == seq:
            return
        found = _persistent(session, device_id, found)
        assert batch is not None
        batch[1][device_id] = found
    new: dict[str, tuple[int, int]] | None = session.info.get(_NEW_ROWS)
    if found is None and new is not None and batch is not None and device_id in batch[0]:
        # a first report: its row kept as values (``defer_new_seen``); a later report of the
        # same device in this batch replaces them, as it would update the row
        new[device_id] = (seq, now)
    elif found is None:
        found = RevocationFeedSeen(device_id=device_id, seq=seq, reported_at=now)
        session.add(found)
        if batch is not None and device_id in batch[0]:
            batch[1][device_id] = found
    elif found.seq != seq:
        found.seq, found.reported_at = seq, now


def _persistent(session: Session, device_id: str, seq: int) -> RevocationFeedSeen:
    """The ORM row of a feed row read as columns (its ``seq``), without reading it again: the
    session's own if it holds it, else one made persistent as loaded (``reported_at`` left
    unloaded), so that a change is flushed as an UPDATE like any loaded row's."""
    held = session.identity_map.get(identity_key(RevocationFeedSeen, device_id))
    if isinstance(held, RevocationFeedSeen):
        return held
    row = RevocationFeedSeen(device_id=device_id, seq=seq)
    make_transient_to_detached(row)
    session.add(row)
    return row


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
