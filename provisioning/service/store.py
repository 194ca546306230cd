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

Nothing secret is stored here: certificates, public-key ids, sequence numbers and message ids.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Engine, LargeBinary, MetaData, String, Text, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from agent.errors import StateError
from agent.wire import cbor
from agent.wire.replay import ReplayGuard
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
