"""Registering operators with the service (``keyfleet operator add``), done on the service host.

An operator is known by its certificate from the operator CA: subject CN = the operator id
(``op-alice``, also its MQTT user name and topic level), OU = its role (viewer, operator or
admin). Registration checks the chain against the configured operator CA, stores the role and
certificate fingerprint in the registry and the certificate itself in the service's key table
(commands carry only a kid), and writes one audit entry, all in one transaction.
"""

from __future__ import annotations

from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.orm import Session, sessionmaker

from agent.protocol.errors import ProtocolError
from agent.protocol.wire.cose import key_id
from provisioning import audit, pki
from provisioning.registry import (
    OperatorRecord,
    Outcome,
    Registry,
    Role,
    cert_fingerprint,
    run_in_transaction,
)
from provisioning.service import store

OPERATOR_PREFIX = "op-"


def register_operator(
    sessions: sessionmaker[Session],
    cert: x509.Certificate,
    *,
    operator_ca: x509.Certificate,
    role: Role | None,
    actor: str,
    now: int,
) -> OperatorRecord:
    """Add (or re-certify) the operator named by ``cert``'s CN. ``role`` defaults to the
    certificate's OU and, if given, must equal it (the role travels in the certificate the
    broker and every tool show). Raises ``ProtocolError`` (``pki.*``, ``op.name``, ``op.role``,
    ``registry.operator.*``); a refusal is audited too."""
    name = pki.common_name(cert)
    try:
        pki.verify_certificate(
            cert, operator_ca, now=datetime.fromtimestamp(now, UTC), purpose="client"
        )
        if not name.startswith(OPERATOR_PREFIX):
            raise ProtocolError("op.name", f"operator ids start with {OPERATOR_PREFIX!r}: {name!r}")
        ou = pki.role_of(cert)
        try:
            cert_role = Role(ou) if ou is not None else None
        except ValueError:
            raise ProtocolError("op.role", f"certificate OU {ou!r} is not a role") from None
        chosen = role if role is not None else cert_role
        if chosen is None:
            raise ProtocolError("op.role", "the certificate has no OU: give --role")
        if cert_role is not None and chosen is not cert_role:
            raise ProtocolError(
                "op.role", f"--role {chosen.value} differs from the certificate's OU {ou!r}"
            )
        public_key = cert.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)  # pki.key_type checked it

        def work(session: Session) -> OperatorRecord:
            registry = Registry(session)
            fingerprint = cert_fingerprint(cert)
            if any(o.name == name for o in registry.operators()):
                registry.set_operator_certificate(name, fingerprint, now=now)
                record = registry.set_operator_role(name, chosen, now=now)
            else:
                record = registry.add_operator(
                    name, cert_fingerprint=fingerprint, role=chosen, now=now
                )
            store.put_operator_key(
                session,
                name=name,
                kid=key_id(public_key),
                cert_pem=pki.cert_to_pem(cert).decode(),
                now=now,
            )
            audit.append(
                session,
                now=now,
                actor=actor,
                action="operator.add",
                target=name,
                outcome=Outcome.ACCEPTED,
                details={"role": chosen.value, "cert_fingerprint": fingerprint},
            )
            return record

        return run_in_transaction(sessions, work)
    except ProtocolError as err:
        audit.record(
            sessions,
            now=now,
            actor=actor,
            action="operator.add",
            target=name,
            outcome=Outcome.REFUSED,
            reason=f"[{err.check}] {err.reason}",
        )
        raise
