"""The delivery service's own tables, beside the registry's: operator keys, replay state,
operator command ids.

A separate ``MetaData`` on purpose: the registry schema (provisioning/registry/schema.py) is the
fleet's record and ``keyfleet audit verify`` checks that exactly its tables exist; these tables
belong to the running service and are created by ``keyfleet serve`` and ``keyfleet operator add``
(``create_service_schema``, idempotent).

Why each exists:

- ``service_operator_keys``: the registry stores an operator's certificate fingerprint, but an
  operator command carries only a ``kid`` (SHA-256 of the SubjectPublicKeyInfo). The service
  needs the certificate itself to map a kid to a public key and to re-check the certificate
  against the operator CA on every command (expiry).
- ``service_replay``: one ``agent.protocol.wire.replay.ReplayGuard`` per sender, CBOR-encoded, read
and
  written in the same transaction as the message's effects, so several instances sharing the
  database would share it too (no per-process replay window to slip a replay through). Devices
  count their seqs (window ``REPLAY_WINDOW``); operators' seqs are clock readings and their
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

from collections.abc import Iterable

from sqlalchemy import (
    BigInteger,
    Boolean,
    Engine,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    case,
    delete,
    inspect,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from agent.protocol.errors import ProtocolError, StateError
from agent.protocol.wire import cbor
from agent.protocol.wire.envelope import DEFAULT_MAX_FUTURE
from agent.protocol.wire.replay import DEFAULT_CAPACITY, ReplayGuard
from provisioning.attestation import Challenge
from provisioning.registry.engine import RetryableConflict
from provisioning.registry.schema import ID_LENGTH, NAMING_CONVENTION

REPLAY_WINDOW = 32


class ServiceBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class OperatorKey(ServiceBase):
    __tablename__ = "service_operator_keys"

    name: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    kid: Mapped[str] = mapped_column(String(64), unique=True)  # hex
    cert_pem: Mapped[str] = mapped_column(Text)
    added_at: Mapped[int] = mapped_column(BigInteger)


class ReplayState(ServiceBase):
    __tablename__ = "service_replay"

    sender: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    state: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[int] = mapped_column(BigInteger)


class OperatorCommand(ServiceBase):
    __tablename__ = "service_commands"

    command_id: Mapped[str] = mapped_column(String(64), primary_key=True)  # hex
    operator: Mapped[str] = mapped_column(String(ID_LENGTH))
    type: Mapped[str] = mapped_column(String(ID_LENGTH))
    received_at: Mapped[int] = mapped_column(BigInteger)


class AttestChallengeRow(ServiceBase):
    __tablename__ = "service_attest_challenges"

    nonce: Mapped[str] = mapped_column(String(128), primary_key=True)  # hex
    device_id: Mapped[str] = mapped_column(String(ID_LENGTH), index=True)
    pcrs: Mapped[str] = mapped_column(String(128))  # "0,1,4,8,9"
    issued_at: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int] = mapped_column(BigInteger)
    answered_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


def create_service_schema(engine: Engine) -> None:
    ServiceBase.metadata.create_all(engine)


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


def load_guard(session: Session, sender: str, *, window: int = REPLAY_WINDOW) -> ReplayGuard:
    """The sender's guard with ``window`` (``REPLAY_WINDOW`` for counting senders,
    ``operator_replay_window`` for operators) and the default capacity for it. A stored guard
    with other bounds (an operator's, stored before operators had their own window; a changed
    ``operator_max_age``) is resized, never re-opening a seq it refused as old."""
    row = session.get(ReplayState, sender)
    if row is None:
        return ReplayGuard(window)
    try:
        guard = ReplayGuard.from_cbor_map(cbor.decode(row.state))
    except Exception as exc:  # a corrupt row must not crash the service; it is a StateError
        raise StateError(
            f"replay state of {sender!r} is unreadable: {type(exc).__name__}"
        ) from None
    if (guard.window, guard.capacity) != (window, min(window, DEFAULT_CAPACITY)):
        return guard.resized(window)
    return guard


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


def lock_guards(session: Session, senders: Iterable[str]) -> list[ReplayState]:
    """``lock_guard`` for several senders in one statement, in sorted sender order (two
    instances locking overlapping sets of senders take them in the same order, so neither waits
    for the other in a cycle), and their rows loaded: ``load_guard`` and ``save_guard`` then read
    them from the session without a query. Keep the returned list while using them (the session
    holds loaded rows only weakly). Senders without a row yet get none (created at save)."""
    ordered = sorted(set(senders))
    if not ordered:
        return []
    rows = select(ReplayState).where(ReplayState.sender.in_(ordered)).order_by(ReplayState.sender)
    if session.get_bind().dialect.name == "sqlite":
        # SELECT takes no lock on SQLite; a write takes the database's write lock.
        session.execute(
            update(ReplayState)
            .where(ReplayState.sender.in_(ordered))
            .values(updated_at=ReplayState.updated_at)
            .execution_options(synchronize_session=False)
        )
        return list(session.scalars(rows))
    return list(session.scalars(rows.with_for_update()))


def save_guard(session: Session, sender: str, guard: ReplayGuard, *, now: int) -> None:
    data = cbor.encode(guard.to_cbor_map())
    row = session.get(ReplayState, sender)
    if row is None:
        session.add(ReplayState(sender=sender, state=data, updated_at=now))
        # two instances taking a new sender's first two messages: one insert wins, the other
        # unit runs again and finds the row (and the other message's seq in it)
        _flush_or_retry(session, f"the replay state of {sender!r} was created concurrently")
        return
    row.state = data
    row.updated_at = now
    session.flush()


def forget_sender(session: Session, sender: str) -> None:
    """Drop a sender's replay state: a re-enrolled device's new agent counts from seq 1 again.
    A database without the service's tables (enrollment before the first ``serve``) has none."""
    if not inspect(session.connection()).has_table(ReplayState.__tablename__):
        return
    session.execute(delete(ReplayState).where(ReplayState.sender == sender))
    session.flush()


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


def _challenge(row: AttestChallengeRow) -> Challenge:
    pcrs = tuple(int(p) for p in row.pcrs.split(",")) if row.pcrs else ()
    return Challenge(row.device_id, bytes.fromhex(row.nonce), pcrs, row.issued_at, row.expires_at)


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


def consume_challenge(session: Session, device_id: str, nonce: bytes, *, now: int) -> Challenge:
    """The open challenge ``nonce`` answers, marked answered (in the caller's transaction).
    Raises ``attest.nonce.unknown`` / ``.replayed`` / ``.expired`` like ``NonceBook.consume``."""
    row = session.get(AttestChallengeRow, nonce.hex())
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
    row.answered_at = now
    session.flush()
    return _challenge(row)


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


class JobRow(ServiceBase):
    """One group change (create, add, remove, update) of a group's FIFO queue. ``version`` makes
    every change a compare-and-set; ``deadline`` is the lease of the instance that last moved it
    (``claimed_by``): when it passes with nothing answered, any instance takes the job over."""

    __tablename__ = "service_jobs"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), unique=True)  # hex
    group_id: Mapped[str] = mapped_column(String(ID_LENGTH), index=True)
    action: Mapped[str] = mapped_column(String(16))
    member: Mapped[str | None] = mapped_column(String(ID_LENGTH), nullable=True)
    command_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    persistent: Mapped[bool] = mapped_column(Boolean, default=False)
    candidates: Mapped[str] = mapped_column(Text, default="")  # comma-separated device ids
    prefer: Mapped[str | None] = mapped_column(String(ID_LENGTH), nullable=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    key_package: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # public
    committer: Mapped[str | None] = mapped_column(String(ID_LENGTH), nullable=True)
    tried: Mapped[str] = mapped_column(Text, default="")
    request_epoch: Mapped[int] = mapped_column(BigInteger, default=0)
    deadline: Mapped[int] = mapped_column(BigInteger, default=0)
    detail: Mapped[str] = mapped_column(Text, default="")
    claimed_by: Mapped[str | None] = mapped_column(String(ID_LENGTH), nullable=True)
    version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[int] = mapped_column(BigInteger)


class GroupSlot(ServiceBase):
    """The per-group "one outstanding change" claim: ``job_id`` is the job in flight. A job is
    started only by the instance whose conditional UPDATE takes the empty slot, so two instances
    can never have two commit requests out for one group."""

    __tablename__ = "service_group_slots"

    group_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    job_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class OperationRow(ServiceBase):
    """An operator command in flight, whoever accepted it: any instance that sees its last ack
    sends the operator the result. ``finished_at`` is set by exactly one instance (conditional
    UPDATE), which then sends the final result and audits it."""

    __tablename__ = "service_operations"

    command_id: Mapped[str] = mapped_column(String(64), primary_key=True)  # hex
    operator: Mapped[str] = mapped_column(String(ID_LENGTH))
    type: Mapped[str] = mapped_column(String(ID_LENGTH))
    target: Mapped[str] = mapped_column(String(ID_LENGTH))
    groups: Mapped[str] = mapped_column(Text)  # ",g1,g2," (LIKE-searchable)
    last_progress: Mapped[int] = mapped_column(BigInteger)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True, index=True)
    accepted_by: Mapped[str] = mapped_column(String(ID_LENGTH), default="")  # instance
    nudged_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_sent: Mapped[str] = mapped_column(Text, default="")
    throttle: Mapped[str] = mapped_column(Text, default="")  # the ack throttle, as JSON
    created_at: Mapped[int] = mapped_column(BigInteger)


class HeldMessage(ServiceBase):
    """A commit that adds members waiting for its Welcome, or a Welcome that came first. The two
    may reach different instances; whichever instance deletes the held half (rowcount 1) owns the
    acceptance."""

    __tablename__ = "service_held"

    group_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # the commit's epoch
    sender: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)  # commit | welcome
    data: Mapped[bytes] = mapped_column(LargeBinary)  # commit or welcome bytes (public, sealed)
    extra: Mapped[str] = mapped_column(Text, default="")  # command id hex | new members
    received_at: Mapped[int] = mapped_column(BigInteger)


class AttestOperationRow(ServiceBase):
    """An operator's ``op.attest`` waiting for the device's report (keyed by the nonce)."""

    __tablename__ = "service_attest_ops"

    nonce: Mapped[str] = mapped_column(String(128), primary_key=True)
    command_id: Mapped[str] = mapped_column(String(64))
    operator: Mapped[str] = mapped_column(String(ID_LENGTH))
    device_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    deadline: Mapped[int] = mapped_column(BigInteger, index=True)


class AttestScheduleRow(ServiceBase):
    """When each device was last challenged by the schedule or an operator: the claim that makes
    a scheduled challenge once per interval fleet-wide."""

    __tablename__ = "service_attest_schedule"

    device_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    challenged_at: Mapped[int] = mapped_column(BigInteger)


class TaskLease(ServiceBase):
    """Periodic fleet-wide work (attestation scan, pruning): due at ``due_at``; an instance runs
    it after claiming it until ``claimed_until``. A dead instance's claim simply expires."""

    __tablename__ = "service_tasks"

    name: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    due_at: Mapped[int] = mapped_column(BigInteger)
    claimed_by: Mapped[str | None] = mapped_column(String(ID_LENGTH), nullable=True)
    claimed_until: Mapped[int] = mapped_column(BigInteger, default=0)


class SequenceRow(ServiceBase):
    """The service's envelope sequence number, shared: all instances sign as one sender, and a
    device's replay window (32) would refuse two instances' interleaved private counters."""

    __tablename__ = "service_sequence"

    name: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


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
    if _rowcount(result) == 0:
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


def _rowcount(result: object) -> int:
    count = getattr(result, "rowcount", 0)
    return int(count) if isinstance(count, int) else 0


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
    if _rowcount(result) == 1:
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
    ``force``: an operator's request). False: another instance challenged it this period."""
    condition = AttestScheduleRow.device_id == device_id
    if not force:
        condition = condition & (AttestScheduleRow.challenged_at <= now - interval)
    result = session.execute(
        update(AttestScheduleRow)
        .where(condition)
        .values(challenged_at=now)
        .execution_options(synchronize_session=False)
    )
    if _rowcount(result) == 1:
        return True
    if session.get(AttestScheduleRow, device_id) is not None:
        return False
    session.add(AttestScheduleRow(device_id=device_id, challenged_at=now))
    _flush_or_retry(session, f"the schedule row of {device_id!r} was created concurrently")
    return True


def last_challenged(session: Session) -> dict[str, int]:
    return {row.device_id: row.challenged_at for row in session.scalars(select(AttestScheduleRow))}
