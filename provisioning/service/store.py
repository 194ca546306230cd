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
- ``service_replay``: one ``agent.wire.replay.ReplayGuard`` per sender, CBOR-encoded, read and
  written in the same transaction as the message's effects, so several instances sharing the
  database would share it too (no per-process replay window to slip a replay through).
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

from sqlalchemy import (
    BigInteger,
    Engine,
    LargeBinary,
    MetaData,
    String,
    Text,
    delete,
    inspect,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from agent.errors import ProtocolError, StateError
from agent.wire import cbor
from agent.wire.replay import ReplayGuard
from provisioning.attestation import Challenge
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


def load_guard(session: Session, sender: str) -> ReplayGuard:
    row = session.get(ReplayState, sender)
    if row is None:
        return ReplayGuard(REPLAY_WINDOW)
    try:
        return ReplayGuard.from_cbor_map(cbor.decode(row.state))
    except Exception as exc:  # a corrupt row must not crash the service; it is a StateError
        raise StateError(
            f"replay state of {sender!r} is unreadable: {type(exc).__name__}"
        ) from None


def save_guard(session: Session, sender: str, guard: ReplayGuard, *, now: int) -> None:
    data = cbor.encode(guard.to_cbor_map())
    row = session.get(ReplayState, sender)
    if row is None:
        session.add(ReplayState(sender=sender, state=data, updated_at=now))
    else:
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
