"""The delivery service's ledger tables, beside the registry's: operator keys, replay state,
operator command ids.

A separate ``MetaData`` on purpose: the registry schema (provisioning/db/schema.py) is the
fleet's record and ``keyfleet audit verify`` checks that exactly its tables exist; these tables
belong to the running service and are created by ``keyfleet serve`` and ``keyfleet operator add``
(``create_service_schema``, idempotent).

Why each exists:

- ``service_operator_keys``: the registry stores an operator's certificate fingerprint, but an
  operator command carries only a ``kid`` (SHA-256 of the SubjectPublicKeyInfo). The service
  needs the certificate itself to map a kid to a public key and to re-check the certificate
  against the operator CA on every command (expiry).
- ``service_replay``: one ``agent.protocol.wire.replay.ReplayGuard`` per sender in its packed
  form (``ReplayGuard.to_bytes``; rows in the CBOR form written before it are still read), read
  and written in the same transaction as the message's effects, so several instances sharing
  the database would share it too (no per-process replay window to slip a replay through).
  Devices count their seqs (window ``REPLAY_WINDOW``); operators' seqs are clock readings and their
  window spans the envelope's freshness (``operator_replay_window``).
- ``service_commands``: every operator ``command_id`` ever accepted; a second command reusing
  one is refused (``op.command_id.reused``) even if it is freshly signed.
- ``service_attest_challenges``: the attestation nonces the service issued (the nonce book of
  ``provisioning.attestation.NonceBook``, in the database): each is bound to one device, answered
  at most once (``answered_at``), and expires; an answered one is kept until it would have
  expired so that a replayed quote is named ``attest.nonce.replayed``. In the database, so a
  restart or another instance behind the shared subscription still knows every open challenge.

Nothing secret is stored here: certificates, public-key ids, sequence numbers and message ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, NamedTuple

from sqlalchemy import (
    bindparam,
    case,
    delete,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from agent.protocol.errors import ProtocolError, StateError
from agent.protocol.wire.envelope import DEFAULT_MAX_FUTURE
from agent.protocol.wire.replay import DEFAULT_CAPACITY, ReplayGuard
from provisioning.attestation import Challenge
from provisioning.db.engine import RetryableConflict, rowcount, table_of
from provisioning.db.runtime import (
    AttestChallengeRow,
    AttestScheduleRow,
    OperatorCommand,
    OperatorKey,
    ReplayState,
    SequenceRow,
    TaskLease,
)
from provisioning.db.schema import Device, DeviceState

REPLAY_WINDOW = 32


# -- operator keys --------------------------------------------------------------------------------


def put_operator_key(session: Session, *, name: str, kid: bytes, cert_pem: str, now: int) -> None:
    row = session.get(OperatorKey, name)
    if row is None:
        session.add(OperatorKey(name=name, kid=kid.hex(), cert_pem=cert_pem, added_at=now))
    else:
        row.kid = kid.hex()
        row.cert_pem = cert_pem
        row.added_at = now
    session.flush()


def operator_by_kid(session: Session, kid: bytes) -> tuple[str, str] | None:
    """(operator name, certificate PEM) for ``kid``, or None."""
    row = session.scalar(select(OperatorKey).where(OperatorKey.kid == kid.hex()))
    return None if row is None else (row.name, row.cert_pem)


# -- replay state ---------------------------------------------------------------------------------


def operator_replay_window(max_age: int, max_future: int = DEFAULT_MAX_FUTURE) -> int:
    """The replay window of an operator, in seq values. An operator's seqs are its CLI's clock
    in microseconds (provisioning/operator.py), one process per command, so one operator's
    concurrent CLIs (scripts, ``xargs -P``, instances taking them from a shared subscription)
    deliver them out of order. The window spans every seq of a command the envelope still finds
    fresh (``time`` at most ``max_age`` s old, ``max_future`` s ahead, plus the second ``time``
    truncates): ``replay.seq-old`` then refuses only what ``envelope.stale`` would, or what the
    guard's capacity (``replay.DEFAULT_CAPACITY`` seqs) no longer remembers."""
    return max(1, (max_age + max_future + 1) * 1_000_000)


GuardMemo = dict[str, tuple[bytes, int, ReplayGuard]]


def load_guard(
    session: Session,
    sender: str,
    *,
    window: int = REPLAY_WINDOW,
    memo: GuardMemo | None = None,
    stored: Mapping[str, bytes] | None = None,
) -> ReplayGuard:
    """The sender's guard with ``window`` (``REPLAY_WINDOW`` for counting senders,
    ``operator_replay_window`` for operators) and the default capacity for it. A stored guard
    with other bounds (an operator's, stored before operators had their own window; a changed
    ``operator_max_age``) is resized, never re-opening a seq it refused as old.

    ``memo`` (one call's, e.g. ``Call.guards``): the guard decoded from the same stored bytes
    earlier in the call is returned again instead of decoding them a second time (the strict
    decoding is most of a read's cost); the caller must then not change it (copy it first).
    ``stored``: the rows ``lock_guards`` read (a sender without one has no row yet)."""
    data = _guard_data(session, sender) if stored is None else stored.get(sender)
    if data is None:
        return ReplayGuard(window)
    if memo is not None:
        found = memo.get(sender)
        if found is not None and found[0] == data and found[1] == window:
            return found[2]
    try:
        guard = ReplayGuard.from_bytes(data)
    except Exception as exc:  # a corrupt row must not crash the service; it is a StateError
        raise StateError(
            f"replay state of {sender!r} is unreadable: {type(exc).__name__}"
        ) from None
    if (guard.window, guard.capacity) != (window, min(window, DEFAULT_CAPACITY)):
        return guard.resized(window)
    if memo is not None:
        memo[sender] = (data, window, guard)
    return guard


# ``session.info`` key: the stored windows of senders whose replay rows were all read at once
_LOADED_GUARDS = "keyfleet.replay_rows_loaded"


def note_loaded_guards(session: Session, senders: Iterable[str], rows: Mapping[str, bytes]) -> None:
    """Every replay row of ``senders`` was read in ``session`` by one query (a batch's read
    session), as ``rows`` (sender -> stored window): ``load_guard`` then answers from them, and
    takes a sender without a row as having none, instead of asking the database once per
    sender."""
    loaded: dict[str, bytes | None] = session.info.setdefault(_LOADED_GUARDS, {})
    for sender in senders:
        loaded[sender] = rows.get(sender)


def _guard_data(session: Session, sender: str) -> bytes | None:
    loaded: dict[str, bytes | None] | None = session.info.get(_LOADED_GUARDS)
    if loaded is not None and sender in loaded:
        return loaded[sender]
    row = session.get(ReplayState, sender)
    return None if row is None else row.state


def lock_guard(session: Session, sender: str) -> None:
    """Take the sender's replay row for this transaction before reading it: the row lock on
    PostgreSQL, the database's write lock on SQLite. Two instances handling two messages of one
    sender at once would otherwise both read the same window and the second save would drop the
    first's sequence number (a replay of it would then pass). Serializes one sender's messages
    across instances; different senders do not wait for each other on PostgreSQL."""
    session.execute(
        update(ReplayState)
        .where(ReplayState.sender == sender)
        .values(updated_at=ReplayState.updated_at)
        .execution_options(synchronize_session=False)
    )


def lock_guards(session: Session, senders: Iterable[str]) -> dict[str, bytes]:
    """``lock_guard`` for several senders in one statement, in sorted sender order (two
    instances locking overlapping sets of senders take them in the same order, so neither waits
    for the other in a cycle), and their stored states read (Core columns, no objects): pass
    them to ``load_guard`` and ``save_guards`` as ``stored``. Senders without a row yet get
    none (created at save)."""
    ordered = sorted(set(senders))
    if not ordered:
        return {}
    rows = (
        select(ReplayState.sender, ReplayState.state)
        .where(ReplayState.sender.in_(ordered))
        .order_by(ReplayState.sender)
    )
    if session.get_bind().dialect.name == "sqlite":
        # SELECT takes no lock on SQLite; a write takes the database's write lock.
        session.execute(
            update(ReplayState)
            .where(ReplayState.sender.in_(ordered))
            .values(updated_at=ReplayState.updated_at)
            .execution_options(synchronize_session=False)
        )
        return {sender: state for sender, state in session.execute(rows)}
    return {sender: state for sender, state in session.execute(rows.with_for_update())}


def save_guards(
    session: Session,
    guards: dict[str, ReplayGuard],
    *,
    now: int,
    stored: Mapping[str, bytes] | None = None,
) -> None:
    """``save_guard`` for several senders (sorted), the existing rows written in one flush;
    with ``stored`` (``lock_guards``'s), those rows in one Core ``executemany`` and the rows of
    senders that had none (their first messages) inserted in one flush."""
    rewritten: list[dict[str, object]] = []
    created: list[ReplayState] = []
    for sender in sorted(guards):
        if stored is not None and sender in stored:
            rewritten.append({"who": sender, "data": guards[sender].to_bytes(), "at": now})
            continue
        if stored is not None:
            # no row when ``lock_guards`` read them: the senders' first rows, in one flush
            data = guards[sender].to_bytes()
            created.append(ReplayState(sender=sender, state=data, updated_at=now))
            continue
        row = session.get(ReplayState, sender)
        if row is None:
            save_guard(session, sender, guards[sender], now=now)
        else:
            row.state = guards[sender].to_bytes()
            row.updated_at = now
    if rewritten:
        session.connection().execute(
            update(ReplayState)
            .where(ReplayState.sender == bindparam("who"))
            .values(state=bindparam("data"), updated_at=bindparam("at")),
            rewritten,
        )
    if created:
        session.add_all(created)
        # another instance created one of them meanwhile: the unit runs again and finds it
        _flush_or_retry(session, "a replay state was created concurrently")
    session.flush()


def claim_guards(session: Session, senders: Iterable[str], *, now: int) -> dict[str, bytes]:
    """Create the replay rows of the senders that have none yet (first messages: a burst after
    a fleet-wide reconnect), each with an empty window, in one statement, and take and load
    every sender's row as ``lock_guards`` does. Call it after ``lock_guards`` on the same
    senders, in the same transaction (on SQLite that call's UPDATE took the database's write
    lock: the rows made here are returned as written, not locked and read again).
    ``INSERT ... ON CONFLICT DO NOTHING``: a row another instance created meanwhile is left
    alone; on PostgreSQL the insert waits for that instance's transaction, and its
    committed row (with its seqs) is then locked and loaded like any existing one. So the
    senders whose row this call created and those whose row another instance created are
    all held under their lock afterwards, with no retry of the unit. Rows of senders whose
    message is then refused are removed again (``drop_claims``): an empty window equals no
    row, but a refusal changes nothing."""
    ordered = sorted(set(senders))
    if not ordered:
        return {}
    data = ReplayGuard(REPLAY_WINDOW).to_bytes()
    dialect = session.get_bind().dialect.name
    upsert = sqlite_insert if dialect == "sqlite" else postgresql_insert
    # one statement run for every row (its compiled form cached, whatever the batch's size)
    session.connection().execute(
        upsert(table_of(ReplayState)).on_conflict_do_nothing(index_elements=["sender"]),
        [{"sender": s, "state": data, "updated_at": now} for s in ordered],
    )
    if dialect == "sqlite":
        # the transaction holds SQLite's write lock since ``lock_guards``'s UPDATE: no other
        # writer created one of these rows meanwhile, so each holds the empty window just
        # written (no second UPDATE and read of the rows)
        return dict.fromkeys(ordered, data)
    return lock_guards(session, ordered)


def drop_claims(session: Session, senders: Iterable[str]) -> None:
    """Remove the rows ``claim_guards`` created for senders whose messages were all refused
    (only while their window is still the empty one it wrote)."""
    ordered = sorted(set(senders))
    if not ordered:
        return
    empty = ReplayGuard(REPLAY_WINDOW).to_bytes()
    session.execute(
        delete(ReplayState)
        .where(ReplayState.sender.in_(ordered), ReplayState.state == empty)
        .execution_options(synchronize_session=False)
    )


def save_guard(session: Session, sender: str, guard: ReplayGuard, *, now: int) -> None:
    data = guard.to_bytes()
    # one UPDATE (the row read by load_guard may have left the identity map, which holds it
    # only weakly: no second read of it); a sender's first row is inserted
    written = session.execute(
        update(ReplayState).where(ReplayState.sender == sender).values(state=data, updated_at=now)
    )
    if rowcount(written) == 0:
        session.add(ReplayState(sender=sender, state=data, updated_at=now))
        # two instances taking a new sender's first two messages: one insert wins, the other
        # unit runs again and finds the row (and the other message's seq in it)
        _flush_or_retry(session, f"the replay state of {sender!r} was created concurrently")


# -- operator command ids -------------------------------------------------------------------------


def command_seen(session: Session, command_id: bytes) -> bool:
    return session.get(OperatorCommand, command_id.hex()) is not None


def record_command(
    session: Session, command_id: bytes, *, operator: str, type_: str, now: int
) -> None:
    session.add(
        OperatorCommand(command_id=command_id.hex(), operator=operator, type=type_, received_at=now)
    )
    session.flush()


# -- attestation challenges (the nonce book) ------------------------------------------------------


class ChallengeColumns(NamedTuple):
    """A challenge row read as plain columns (``ChallengeBook``)."""

    nonce: str
    device_id: str
    pcrs: str
    issued_at: int
    expires_at: int
    answered_at: int | None


def _challenge(row: AttestChallengeRow | ChallengeColumns) -> Challenge:
    pcrs = tuple(int(p) for p in row.pcrs.split(",")) if row.pcrs else ()
    return Challenge(row.device_id, bytes.fromhex(row.nonce), pcrs, row.issued_at, row.expires_at)


def _check_open(
    device_id: str, row: AttestChallengeRow | ChallengeColumns | None, now: int
) -> None:
    """Whether ``row`` is an open challenge of ``device_id`` an answer at ``now`` may consume:
    ``attest.nonce.unknown`` / ``.replayed`` / ``.expired`` like ``NonceBook.consume``."""
    if row is None or row.device_id != device_id:
        raise ProtocolError("attest.nonce.unknown", "no open challenge with this nonce")
    if row.answered_at is not None:
        raise ProtocolError(
            "attest.nonce.replayed", "this nonce was already answered: replayed quote"
        )
    if now >= row.expires_at:
        raise ProtocolError(
            "attest.nonce.expired",
            f"challenge issued at {row.issued_at} expired at {row.expires_at}",
        )


def issue_challenge(
    session: Session,
    device_id: str,
    nonce: bytes,
    pcrs: tuple[int, ...],
    *,
    now: int,
    ttl: int,
    max_open: int,
) -> Challenge:
    """Record a new open challenge; a device with more than ``max_open`` open ones loses the
    oldest (their answers will be ``attest.nonce.unknown``)."""
    row = AttestChallengeRow(
        nonce=nonce.hex(),
        device_id=device_id,
        pcrs=",".join(str(p) for p in pcrs),
        issued_at=now,
        expires_at=now + ttl,
    )
    session.add(row)
    session.flush()
    open_rows = list(
        session.scalars(
            select(AttestChallengeRow)
            .where(
                AttestChallengeRow.device_id == device_id,
                AttestChallengeRow.answered_at.is_(None),
            )
            .order_by(AttestChallengeRow.issued_at.desc(), AttestChallengeRow.nonce)
        )
    )
    for old in open_rows[max_open:]:
        if old.nonce != row.nonce:
            session.delete(old)
    session.flush()
    return _challenge(row)


def consume_challenge(
    session: Session, device_id: str, nonce: bytes, *, now: int, flush: bool = True
) -> Challenge:
    """The open challenge ``nonce`` answers, marked answered (in the caller's transaction).
    Raises ``attest.nonce.unknown`` / ``.replayed`` / ``.expired`` like ``NonceBook.consume``.
    Without ``flush`` the caller flushes (a batch of answers: their rows in one statement)."""
    row = session.get(AttestChallengeRow, nonce.hex())
    _check_open(device_id, row, now)
    assert row is not None
    row.answered_at = now
    if flush:
        session.flush()
    return _challenge(row)


_CHALLENGE_COLUMNS: Final = select(
    AttestChallengeRow.nonce,
    AttestChallengeRow.device_id,
    AttestChallengeRow.pcrs,
    AttestChallengeRow.issued_at,
    AttestChallengeRow.expires_at,
    AttestChallengeRow.answered_at,
)


class ChallengeBook:
    """The challenges a batch of answers names (those that exist), read as plain columns in
    one query: ``consume`` judges an answer's nonce as ``consume_challenge`` does (same checks,
    same refusals) and marks it answered here, so that a second answer of the batch with that
    nonce is ``attest.nonce.replayed``; ``write`` then marks the consumed ones answered in the
    database in one statement. Nothing is written for a nonce not consumed."""

    def __init__(self, session: Session, nonces: Iterable[bytes]) -> None:
        keys = sorted({nonce.hex() for nonce in nonces})
        self._rows: dict[str, ChallengeColumns] = (
            {
                row.nonce: row
                for row in (
                    ChallengeColumns(*found)
                    for found in session.execute(
                        _CHALLENGE_COLUMNS.where(AttestChallengeRow.nonce.in_(keys))
                    )
                )
            }
            if keys
            else {}
        )
        self._answered: list[str] = []

    def consume(self, device_id: str, nonce: bytes, *, now: int) -> Challenge:
        key = nonce.hex()
        row = self._rows.get(key)
        _check_open(device_id, row, now)
        assert row is not None
        self._rows[key] = row._replace(answered_at=now)
        self._answered.append(key)
        return _challenge(row)

    def write(self, session: Session, *, now: int) -> None:
        if self._answered:
            rows = table_of(AttestChallengeRow)
            session.connection().execute(
                update(rows).where(rows.c.nonce.in_(self._answered)).values(answered_at=now)
            )
            self._answered.clear()


def open_challenges(session: Session, device_id: str, *, now: int) -> int:
    rows = session.scalars(
        select(AttestChallengeRow.nonce).where(
            AttestChallengeRow.device_id == device_id,
            AttestChallengeRow.answered_at.is_(None),
            AttestChallengeRow.expires_at > now,
        )
    )
    return len(list(rows))


def forget_challenges(session: Session, *, now: int) -> None:
    """Drop challenges past their expiry (answered or not): nothing can answer them any more,
    and a replay of one is then refused as ``attest.nonce.unknown``."""
    session.execute(delete(AttestChallengeRow).where(AttestChallengeRow.expires_at <= now))


# -- shared work state (several instances, docs/scale-out.md) -------------------------------------
#
# Everything below is what used to live in one process's memory and must be shared by every
# ``keyfleet serve`` instance behind the shared subscription: any instance may receive the next
# report or command of a flow another one started. Rules they agree on are rows and conditional
# UPDATEs (whoever changes the row wins, the others see rowcount 0 and step back), never a
# leader and never an in-process lock.


def reserve_seqs(session: Session, count: int, *, floor: int) -> int:
    """Reserve ``count`` consecutive sequence numbers above max(last, ``floor``); returns the
    first. The UPDATE takes the row's write lock, so reservations never overlap."""
    if count <= 0:
        raise ValueError("count must be positive")
    table = SequenceRow.__table__
    result = session.execute(
        update(SequenceRow)
        .where(SequenceRow.name == "envelope")
        .values(value=case((table.c.value > floor, table.c.value), else_=floor) + count)
        .execution_options(synchronize_session=False)
    )
    if rowcount(result) == 0:
        session.add(SequenceRow(name="envelope", value=floor + count))
        _flush_or_retry(session, "the sequence row was created concurrently")
        return floor + 1
    value = session.scalar(select(SequenceRow.value).where(SequenceRow.name == "envelope"))
    assert value is not None
    return int(value) - count + 1


def _flush_or_retry(session: Session, conflict: str) -> None:
    # Another instance inserted the same key between our UPDATE and INSERT: run the whole unit
    # again (run_in_transaction), which then finds the row and takes the UPDATE path.
    try:
        session.flush()
    except IntegrityError:
        raise RetryableConflict(conflict) from None


def claim_task(session: Session, name: str, *, instance: str, now: int, lease: int) -> bool:
    """Claim periodic task ``name`` if it is due and nobody holds an unexpired claim. The caller
    runs the task and then calls ``finish_task`` with the next due time."""
    result = session.execute(
        update(TaskLease)
        .where(
            TaskLease.name == name,
            TaskLease.due_at <= now,
            or_(TaskLease.claimed_until <= now, TaskLease.claimed_by == instance),
        )
        .values(claimed_by=instance, claimed_until=now + lease)
        .execution_options(synchronize_session=False)
    )
    if rowcount(result) == 1:
        return True
    if session.get(TaskLease, name) is not None:
        return False
    session.add(TaskLease(name=name, due_at=now, claimed_by=instance, claimed_until=now + lease))
    _flush_or_retry(session, f"task {name!r} was created concurrently")
    return True


def finish_task(session: Session, name: str, *, instance: str, next_due: int) -> None:
    session.execute(
        update(TaskLease)
        .where(TaskLease.name == name, TaskLease.claimed_by == instance)
        .values(due_at=next_due, claimed_until=0)
        .execution_options(synchronize_session=False)
    )


def claim_challenge_slot(
    session: Session, device_id: str, *, now: int, interval: int, force: bool = False
) -> bool:
    """Record that ``device_id`` is challenged now, if it was not within ``interval`` (or
    ``force``: an operator's request), and when the schedule looks at it next
    (``devices.attest_due``). False: another instance challenged it this period."""
    condition = AttestScheduleRow.device_id == device_id
    if not force:
        condition = condition & (AttestScheduleRow.challenged_at <= now - interval)
    result = session.execute(
        update(AttestScheduleRow)
        .where(condition)
        .values(challenged_at=now)
        .execution_options(synchronize_session=False)
    )
    if rowcount(result) == 1:
        defer_attestation(session, device_id, until=now + interval)
        return True
    row = session.get(AttestScheduleRow, device_id)
    if row is not None:
        defer_attestation(session, device_id, until=row.challenged_at + interval)
        return False
    session.add(AttestScheduleRow(device_id=device_id, challenged_at=now))
    _flush_or_retry(session, f"the schedule row of {device_id!r} was created concurrently")
    defer_attestation(session, device_id, until=now + interval)
    return True


def defer_attestation(session: Session, device_id: str, *, until: int) -> None:
    """The attestation schedule looks at ``device_id`` again at ``until``."""
    defer_attestations(session, {device_id: until})


def defer_attestations(session: Session, until: Mapping[str, int]) -> None:
    """``defer_attestation`` for several devices (device -> when), one Core ``executemany``:
    a scan after an outage defers up to a whole batch of offline devices."""
    if not until:
        return
    session.flush()  # as an ORM statement would: a pending change of a row comes first
    session.connection().execute(
        update(Device)
        .where(Device.device_id == bindparam("device"))
        .values(attest_due=bindparam("until")),
        [{"device": device, "until": at} for device, at in sorted(until.items())],
    )


@dataclass(frozen=True)
class AttestCandidate:
    """What the schedule needs of a device that is due: no certificates, no reports."""

    device_id: str
    state: DeviceState
    has_ak: bool
    attested_at: int | None
    last_seen: int | None
    attest_due: int


def attest_due(session: Session, *, now: int, limit: int) -> list[AttestCandidate]:
    """The ``limit`` devices due longest, by the ``devices.attest_due`` index: a scan costs
    what is due, not the size of the fleet."""
    rows = session.execute(
        select(
            Device.device_id,
            Device.state,
            Device.ak_public.is_not(None),
            Device.attested_at,
            Device.last_seen,
            Device.attest_due,
        )
        .where(Device.attest_due <= now)
        .order_by(Device.attest_due)
        .limit(limit)
    )
    return [AttestCandidate(*row) for row in rows]
