"""The append-only, hash-chained audit log of the fleet service.

Every accepted or refused command and every state change is one entry. Entry ``n`` stores the
hash of entry ``n - 1`` and its own hash over that link and its content:

    entry_hash = SHA-256(prev_hash || CBOR([1, seq, time, actor, action, target, outcome,
                                            reason, details]))

CBOR is deterministic (RFC 8949 section 4.2) and ``details`` is the canonical JSON text exactly as
stored (sorted keys, no spaces, UTF-8, integers only), so anyone can recompute a hash from the row
with any CBOR library. The first entry links to 32 zero bytes.

Concurrency: an append first locks the single ``audit_head`` row (``SELECT ... FOR UPDATE`` on
PostgreSQL; on SQLite, which has no row locks, a no-op UPDATE that takes the database's write
lock), so appenders queue there and each reads the head its predecessor committed: at READ
COMMITTED every statement after the lock sees the newest committed entry. The guarantee itself
is the database's: UNIQUE seq and UNIQUE prev_hash. Two writers that somehow
read the same head both try to insert the same ``seq``; one gets an integrity error, which
becomes ``AuditConflict``, and its whole unit of work runs again on the new head
(``run_in_transaction``). The chain never forks, on SQLite or with several service instances on
PostgreSQL.

What the chain proves: any edit of a stored entry, any deletion inside the chain and any
reordering is found by ``verify_chain`` and named by sequence number. What it cannot prove alone:
that nobody cut entries off the end and also rewrote ``audit_head``, or rewrote a whole suffix and
recomputed its hashes. Against that, record the head (seq and hash, printed by ``keyfleet audit
verify``) somewhere else and pass it back as ``anchor``.

``verify_from`` verifies incrementally from such a remembered head (the dashboard's check: its
cost follows the entries appended since, not the log), and ``recheck`` re-verifies a window of
old entries, so that repeated checks still sweep the whole log for entries edited in place.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import cbor2
from sqlalchemy import ColumnElement, String, bindparam, insert, select, type_coerce, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

from provisioning.db.engine import (
    RetryableConflict,
    rowcount,
    run_in_transaction,
    savepoint,
    table_of,
)
from provisioning.db.schema import HASH_LENGTH, AuditEntry, AuditHead, Outcome

FORMAT_VERSION = 1
GENESIS_PREV_HASH = bytes(HASH_LENGTH)

JsonValue = None | bool | int | str | Sequence["JsonValue"] | Mapping[str, "JsonValue"]


class AuditConflict(RetryableConflict):
    """Another writer appended at the same chain head first; retry the unit of work."""


class ProblemKind(enum.StrEnum):
    HASH_MISMATCH = "hash mismatch"
    BROKEN_LINK = "broken link"
    GAP = "gap"
    ANCHOR = "anchor mismatch"
    HEAD = "head mismatch"
    VERIFIED = "verified entry changed"


CHECKS: dict[ProblemKind, str] = {
    ProblemKind.HASH_MISMATCH: "audit.chain.hash",
    ProblemKind.BROKEN_LINK: "audit.chain.link",
    ProblemKind.GAP: "audit.chain.gap",
    ProblemKind.ANCHOR: "audit.chain.anchor",
    ProblemKind.HEAD: "audit.chain.head",
    ProblemKind.VERIFIED: "audit.chain.verified",
}


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    time: int
    actor: str
    action: str
    target: str
    outcome: Outcome
    reason: str
    details: str
    prev_hash: bytes
    entry_hash: bytes

    def details_dict(self) -> dict[str, Any]:
        decoded: dict[str, Any] = json.loads(self.details)
        return decoded


@dataclass(frozen=True)
class ChainProblem:
    """The first bad entry: its sequence number, what is wrong, and a sentence for people."""

    seq: int
    kind: ProblemKind
    reason: str

    @property
    def check(self) -> str:
        """The check id (docs/checks.md) logs and alerts key on."""
        return CHECKS[self.kind]


@dataclass(frozen=True)
class VerifyResult:
    """``entries`` good entries were checked up to ``head_seq``/``head_hash`` (the last good
    one, or 0 / the genesis hash); ``problem`` is the first bad entry, None if all are good."""

    entries: int
    head_seq: int
    head_hash: bytes
    problem: ChainProblem | None

    @property
    def ok(self) -> bool:
        return self.problem is None


def _check_json(value: object, where: str) -> None:
    # Floats are refused: their text form differs between languages, and a verifier written in
    # another one must be able to reproduce the exact bytes that were hashed.
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"audit details{where}: key {key!r} is not a string")
            _check_json(item, f"{where}.{key}")
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_json(item, f"{where}[{index}]")
        return
    raise TypeError(
        f"audit details{where}: {type(value).__name__} is not allowed "
        "(use str, int, bool, None, lists and objects; hex-encode bytes)"
    )


def canonical_json(details: Mapping[str, JsonValue]) -> str:
    """The one text form of ``details`` that is stored and hashed."""
    _check_json(details, "")
    return json.dumps(details, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def entry_preimage(
    *,
    seq: object,
    time: object,
    actor: object,
    action: object,
    target: object,
    outcome: object,
    reason: object,
    details: object,
) -> bytes:
    """The deterministic CBOR array hashed after ``prev_hash``. Takes whatever the row holds, so
    a verifier also hashes values someone wrote with the wrong type (they then mismatch)."""
    return bytes(
        cbor2.dumps(
            [FORMAT_VERSION, seq, time, actor, action, target, outcome, reason, details],
            canonical=True,
        )
    )


def compute_hash(prev_hash: bytes, preimage: bytes) -> bytes:
    return hashlib.sha256(prev_hash + preimage).digest()


def record_of(row: AuditEntry) -> AuditRecord:
    """The plain record of a stored entry (also what the dashboard shows)."""
    return AuditRecord(
        seq=row.seq,
        time=row.time,
        actor=row.actor,
        action=row.action,
        target=row.target,
        outcome=row.outcome,
        reason=row.reason,
        details=row.details,
        prev_hash=row.prev_hash,
        entry_hash=row.entry_hash,
    )


def head(session: Session) -> tuple[int, bytes]:
    """(seq, hash) of the last entry, or (0, genesis) for an empty log."""
    last = session.execute(_HEAD).first()
    if last is None:
        return 0, GENESIS_PREV_HASH
    return int(last[0]), bytes(last[1])


def append(
    session: Session,
    *,
    now: int,
    actor: str,
    action: str,
    target: str,
    outcome: Outcome,
    reason: str = "",
    details: Mapping[str, JsonValue] | None = None,
) -> AuditRecord:
    """Append one entry in the caller's transaction, linked to the current head.

    ``actor`` is who asked (``operator:alice``, ``device:pi-0042``, ``service``), ``action`` what
    (``device.revoke``), ``target`` on what, ``reason`` why it was refused (or a note). Never put
    secrets in any field: the log is meant to be read. Raises ``AuditConflict`` if another writer
    took the head first; the caller's unit of work must then be retried (``run_in_transaction``
    does it).
    """
    if not isinstance(outcome, Outcome):
        raise TypeError(f"outcome must be an Outcome, not {outcome!r}")
    details_text = canonical_json(details or {})
    _lock_head(session)
    prev_seq, prev_hash = head(session)
    seq = prev_seq + 1
    preimage = entry_preimage(
        seq=seq,
        time=now,
        actor=actor,
        action=action,
        target=target,
        outcome=outcome.value,
        reason=reason,
        details=details_text,
    )
    entry = AuditRecord(
        seq=seq,
        time=now,
        actor=actor,
        action=action,
        target=target,
        outcome=outcome,
        reason=reason,
        details=details_text,
        prev_hash=prev_hash,
        entry_hash=compute_hash(prev_hash, preimage),
    )
    # Core statements on the tables (the session holds neither row): the entry and the head
    try:
        with savepoint(session):
            session.execute(_INSERT_ENTRY, _values(entry))
            session.execute(_MOVE_HEAD, {"new_seq": seq, "new_hash": entry.entry_hash})
    except IntegrityError:
        raise AuditConflict(f"audit entry {seq} was appended concurrently") from None
    return entry


@dataclass(frozen=True)
class Pending:
    """One entry for ``append_many``: what ``append`` takes, as data."""

    actor: str
    action: str
    target: str
    outcome: Outcome
    reason: str = ""
    details: Mapping[str, JsonValue] | None = None


def append_many(session: Session, pending: Sequence[Pending], *, now: int) -> list[AuditRecord]:
    """``append`` for several entries in their order, in the caller's transaction: the head is
    locked and read once, the entries inserted in one statement and the head written once (a
    batch of device messages taken together). Same chain, same ``AuditConflict``."""
    if not pending:
        return []
    for one in pending:
        if not isinstance(one.outcome, Outcome):
            raise TypeError(f"outcome must be an Outcome, not {one.outcome!r}")
    texts = [canonical_json(one.details or {}) for one in pending]
    _lock_head(session)
    seq, prev_hash = head(session)
    out: list[AuditRecord] = []
    for one, details_text in zip(pending, texts, strict=True):
        seq += 1
        preimage = entry_preimage(
            seq=seq,
            time=now,
            actor=one.actor,
            action=one.action,
            target=one.target,
            outcome=one.outcome.value,
            reason=one.reason,
            details=details_text,
        )
        entry = AuditRecord(
            seq=seq,
            time=now,
            actor=one.actor,
            action=one.action,
            target=one.target,
            outcome=one.outcome,
            reason=one.reason,
            details=details_text,
            prev_hash=prev_hash,
            entry_hash=compute_hash(prev_hash, preimage),
        )
        out.append(entry)
        prev_hash = entry.entry_hash
    entries, heads = table_of(AuditEntry), table_of(AuditHead)
    try:
        with savepoint(session):
            session.execute(insert(entries), [_values(entry) for entry in out])
            session.execute(
                update(heads).where(heads.c.id == 1).values(seq=seq, entry_hash=prev_hash)
            )
    except IntegrityError:
        raise AuditConflict(f"audit entries up to {seq} were appended concurrently") from None
    return out


def _values(entry: AuditRecord) -> dict[str, Any]:
    """The entry's columns, for an insert (``asdict`` without its deep copy: every field is
    immutable)."""
    return dict(vars(entry))


def _lock_head(session: Session) -> None:
    """Lock the head row until the caller's transaction ends: other appenders wait here,
    before they read the head, rather than fail later at the unique constraint."""
    heads = _HEADS
    if session.get_bind().dialect.name == "sqlite":
        # SQLite ignores FOR UPDATE; a no-op UPDATE is still a write and takes the write lock.
        locked = session.execute(_TOUCH_HEAD)
        if rowcount(locked) == 1:
            return
    elif session.execute(_LOCK_HEAD).first():
        return
    # The first append ever: two writers may both get here; the loser's insert fails on the
    # primary key (in a savepoint, so PostgreSQL's transaction stays usable) and it retries.
    try:
        with savepoint(session):
            session.execute(insert(heads).values(id=1, seq=0, entry_hash=GENESIS_PREV_HASH))
    except IntegrityError:
        raise AuditConflict("the audit head row was created concurrently") from None


# The statements of every append, built once: their cache keys are computed once, not per append.
_ENTRIES, _HEADS = table_of(AuditEntry), table_of(AuditHead)
_HEAD: Final = (
    select(AuditEntry.seq, AuditEntry.entry_hash).order_by(AuditEntry.seq.desc()).limit(1)
)
_INSERT_ENTRY: Final = insert(_ENTRIES)
_MOVE_HEAD: Final = (
    update(_HEADS)
    .where(_HEADS.c.id == 1)
    .values(seq=bindparam("new_seq"), entry_hash=bindparam("new_hash"))
)
_TOUCH_HEAD: Final = update(_HEADS).where(_HEADS.c.id == 1).values(seq=_HEADS.c.seq)
_LOCK_HEAD: Final = select(_HEADS.c.id).where(_HEADS.c.id == 1).with_for_update()


def record(
    sessions: sessionmaker[Session],
    *,
    now: int,
    actor: str,
    action: str,
    target: str,
    outcome: Outcome,
    reason: str = "",
    details: Mapping[str, JsonValue] | None = None,
) -> AuditRecord:
    """Append one entry in its own transaction, retrying on a concurrent append: for events
    that change nothing else (a refused command)."""
    return run_in_transaction(
        sessions,
        lambda session: append(
            session,
            now=now,
            actor=actor,
            action=action,
            target=target,
            outcome=outcome,
            reason=reason,
            details=details,
        ),
    )


def entries(session: Session, *, from_seq: int = 1, limit: int | None = None) -> list[AuditRecord]:
    query = select(AuditEntry).where(AuditEntry.seq >= from_seq).order_by(AuditEntry.seq)
    if limit is not None:
        query = query.limit(limit)
    return [record_of(row) for row in session.scalars(query)]


def _text_match(column: InstrumentedAttribute[str], pattern: str) -> ColumnElement[bool]:
    # a trailing * asks for a prefix; LIKE's own wildcards in the prefix are escaped
    if pattern.endswith("*"):
        return column.startswith(pattern[:-1], autoescape=True)
    return column == pattern


def find_entries(
    session: Session,
    *,
    since: int | None = None,
    until: int | None = None,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    outcome: Outcome | None = None,
    limit: int | None = None,
) -> list[AuditRecord]:
    """The entries that match every filter given, oldest first: ``since <= time <= until``;
    ``actor``, ``action`` and ``target`` equal the value, or start with it when it ends in
    ``*``; ``limit`` keeps the newest matches. Reads only; the chain is ``verify_chain``'s job."""
    query = select(AuditEntry)
    if since is not None:
        query = query.where(AuditEntry.time >= since)
    if until is not None:
        query = query.where(AuditEntry.time <= until)
    for column, pattern in (
        (AuditEntry.actor, actor),
        (AuditEntry.action, action),
        (AuditEntry.target, target),
    ):
        if pattern is not None:
            query = query.where(_text_match(column, pattern))
    if outcome is not None:
        query = query.where(AuditEntry.outcome == outcome)
    if limit is None:
        return [record_of(row) for row in session.scalars(query.order_by(AuditEntry.seq))]
    newest = session.scalars(query.order_by(AuditEntry.seq.desc()).limit(limit))
    return [record_of(row) for row in reversed(list(newest))]


def _raw_rows(
    session: Session, batch: int, *, after: int = 0, upto: int | None = None
) -> Iterator[tuple[Any, ...]]:
    # Raw column values: a tampered row (an unknown outcome, a text in a number column) must be
    # reported by the verifier, not crash the ORM's type conversion.
    query = select(
        AuditEntry.seq,
        AuditEntry.time,
        AuditEntry.actor,
        AuditEntry.action,
        AuditEntry.target,
        type_coerce(AuditEntry.outcome, String),
        AuditEntry.reason,
        AuditEntry.details,
        AuditEntry.prev_hash,
        AuditEntry.entry_hash,
    ).order_by(AuditEntry.seq)
    if after:
        query = query.where(AuditEntry.seq > after)
    if upto is not None:
        query = query.where(AuditEntry.seq <= upto)
    # closed when the walk stops early too (a bad entry): on PostgreSQL yield_per is a server-side
    # cursor, which must not be left to the garbage collector
    with session.execute(query.execution_options(yield_per=batch)) as result:
        for row in result:
            yield tuple(row)


def verify_chain(
    session: Session, *, anchor: tuple[int, bytes] | None = None, batch: int = 1000
) -> VerifyResult:
    """Walk the whole chain in order and report the first bad entry.

    Per entry, in this order: its seq follows the previous one (``gap`` names the missing seq),
    its stored hash matches its content (``hash mismatch``: this entry was edited), its
    prev_hash equals the previous entry's hash (``broken link``: this entry or the previous one
    was rewritten with a recomputed hash). With ``anchor`` (seq, hash) recorded earlier, the
    chain must still contain that entry with that hash (``anchor mismatch`` otherwise: the log
    was cut or rewritten from there).
    """
    return _walk(session, start=(0, GENESIS_PREV_HASH), anchor=anchor, batch=batch)


def verify_from(
    session: Session, verified: tuple[int, bytes], *, batch: int = 1000
) -> VerifyResult:
    """Verify only what was appended since an earlier good verification that ended at
    ``verified`` (its head seq and hash): the cost follows the new entries, not the log.

    The remembered entry must still be there, hash to its stored hash from its content and its
    stored link, and that hash must be the remembered one (``verified entry changed``
    otherwise: the log was cut back past it, or history up to it was rewritten and its hashes
    recomputed, which changes every later hash). Then every later entry is checked as
    ``verify_chain`` does, starting from the remembered hash, and ``audit_head`` must match the
    end. An older entry edited in place without recomputing hashes is not read here:
    ``recheck`` (a window of old entries at a time) and ``verify_chain`` (all of them, as
    ``keyfleet audit verify`` runs) find it."""
    seq, expected = verified
    if seq == 0:
        return verify_chain(session, batch=batch)
    row = next(_raw_rows(session, 1, after=seq - 1, upto=seq), None)
    stored = _stored_hash(row)
    if row is None or stored is None or stored != expected:
        found = "is gone" if row is None else "no longer has the hash it had"
        problem = ChainProblem(
            seq,
            ProblemKind.VERIFIED,
            f"entry {seq}, verified earlier as the head, {found}: the log was cut back or "
            "rewritten up to it",
        )
        return VerifyResult(entries=0, head_seq=0, head_hash=GENESIS_PREV_HASH, problem=problem)
    walked = _walk(session, start=(seq, expected), batch=batch)
    return replace(walked, entries=seq + walked.entries)


def recheck(session: Session, first: int, last: int, *, batch: int = 1000) -> VerifyResult:
    """Check entries ``first``..``last`` again (each one's hash from its content and link,
    each link to the stored hash of the entry before), without the rest of the log: run over
    successive windows it finds an old entry edited in place, which ``verify_from`` does not
    read. ``entries`` counts the entries of the window found good."""
    before: bytes | None = GENESIS_PREV_HASH
    if first > 1:
        # the link to the entry before as stored (that entry's own content is checked in
        # the window that holds it)
        raw = session.scalar(select(AuditEntry.entry_hash).where(AuditEntry.seq == first - 1))
        before = bytes(raw) if isinstance(raw, bytes | memoryview) else None
    if before is None:
        problem = ChainProblem(first - 1, ProblemKind.GAP, f"entry {first - 1} is missing")
        return VerifyResult(entries=0, head_seq=0, head_hash=GENESIS_PREV_HASH, problem=problem)
    return _walk(session, start=(first - 1, before), upto=last, batch=batch)


def _stored_hash(row: tuple[Any, ...] | None) -> bytes | None:
    """The stored hash of a raw row, if its content still hashes to it from its stored link."""
    if row is None:
        return None
    seq, time, actor, action, target, outcome, reason, details, raw_prev, raw_hash = row
    if not isinstance(raw_prev, bytes | memoryview) or not isinstance(raw_hash, bytes | memoryview):
        return None
    preimage = entry_preimage(
        seq=seq,
        time=time,
        actor=actor,
        action=action,
        target=target,
        outcome=outcome,
        reason=reason,
        details=details,
    )
    stored = bytes(raw_hash)
    return stored if compute_hash(bytes(raw_prev), preimage) == stored else None


def _walk(
    session: Session,
    *,
    start: tuple[int, bytes],
    anchor: tuple[int, bytes] | None = None,
    upto: int | None = None,
    batch: int,
) -> VerifyResult:
    """Check the entries after ``start`` (a seq and the hash the next must link to), up to
    ``upto`` (then without the end's ``audit_head`` check) or to the end."""
    count = 0
    expected_seq = start[0] + 1
    prev_hash = start[1]
    anchor_seen = False

    def result(problem: ChainProblem | None) -> VerifyResult:
        return VerifyResult(
            entries=count, head_seq=expected_seq - 1, head_hash=prev_hash, problem=problem
        )

    for row in _raw_rows(session, batch, after=start[0], upto=upto):
        seq, raw_prev = row[0], row[8]
        if not isinstance(seq, int) or seq != expected_seq:
            if isinstance(seq, int) and seq > expected_seq:
                missing = (
                    f"entry {expected_seq} is missing"
                    if seq == expected_seq + 1
                    else f"entries {expected_seq}..{seq - 1} are missing"
                )
                after = f"entry {expected_seq - 1}" if expected_seq > 1 else "the start"
                return result(
                    ChainProblem(
                        expected_seq, ProblemKind.GAP, f"{missing}: {after} is followed by {seq}"
                    )
                )
            return result(
                ChainProblem(
                    expected_seq,
                    ProblemKind.GAP,
                    f"found seq {seq!r} where {expected_seq} was expected",
                )
            )
        stored = _stored_hash(row)  # None: unreadable, or not its content's hash
        if stored is None:
            return result(
                ChainProblem(
                    seq,
                    ProblemKind.HASH_MISMATCH,
                    f"entry {seq} does not match its stored hash: it was changed after it "
                    "was written",
                )
            )
        if bytes(raw_prev) != prev_hash:
            before = f"entry {seq - 1}'s hash" if seq > 1 else "the genesis hash (32 zero bytes)"
            return result(
                ChainProblem(
                    seq,
                    ProblemKind.BROKEN_LINK,
                    f"entry {seq} does not link to {before}: one of them was rewritten",
                )
            )
        if anchor is not None and seq == anchor[0]:
            if stored != anchor[1]:
                return result(
                    ChainProblem(
                        seq,
                        ProblemKind.ANCHOR,
                        f"entry {seq} has hash {stored.hex()}, the anchor says {anchor[1].hex()}",
                    )
                )
            anchor_seen = True
        count += 1
        expected_seq = seq + 1
        prev_hash = stored
    if upto is not None:
        if expected_seq <= upto:
            return result(
                ChainProblem(expected_seq, ProblemKind.GAP, f"entry {expected_seq} is missing")
            )
        return result(None)
    recorded = session.execute(select(AuditHead.seq, AuditHead.entry_hash)).first()
    recorded_seq, recorded_hash = (0, GENESIS_PREV_HASH) if recorded is None else recorded
    if recorded_seq != expected_seq - 1 or bytes(recorded_hash) != prev_hash:
        return result(
            ChainProblem(
                expected_seq,
                ProblemKind.HEAD,
                f"the chain ends at entry {expected_seq - 1} but audit_head records entry "
                f"{recorded_seq}: entries were cut off the end (or audit_head was edited)",
            )
        )
    if anchor is not None and not anchor_seen:
        return result(
            ChainProblem(
                anchor[0],
                ProblemKind.ANCHOR,
                f"anchored entry {anchor[0]} is not in the log (it ends at {expected_seq - 1}): "
                "entries were cut off the end",
            )
        )
    return result(None)
