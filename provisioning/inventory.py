"""The inventory of the fleet's own keys and certificates and of the devices' certificates, with
their expiry: what ``keyfleet keys list`` prints, the dashboard's ``/keys`` page shows and the
expiry gauges of ``keyfleet serve`` (``provisioning.metrics.ExpiryGauges``) are made of.

Each entry is a ``KeyFacts``: public facts only (where the key lives, its algorithm, the SHA-256
of its public key's SubjectPublicKeyInfo, its certificate's fingerprint and validity). Nothing
here reads a private key's value: a token key is described from its public-key object
(``custody.token_key_facts``); a file key's public half is derived from the file and only its
fingerprint kept.

The state of each entry is named in NIST SP 800-57 terms (``state_of``; docs/operations.md,
"Inventory and expiry"): the certificate's validity decides between pre-activation, active and
deactivated; a revoked device's certificate is compromised (keyfleet revokes a device it no
longer trusts with its keys: lost, stolen or tampered), a destroyed device's destroyed, a
quarantined device's suspended (it may come back). A key the service cannot reach has no state:
the entry says why (``problem``).

``rows`` orders entries by scope (the fleet's keys, then operators and stations, then devices)
and, within a scope, by not-after, the nearest first; entries without an expiry come last.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.protocol import trust
from agent.protocol.errors import KeyfleetError
from agent.protocol.lifecycle import KeyState
from provisioning import custody, pki
from provisioning.config import ServiceConfig
from provisioning.custody import FileKeyRef, KeyRef, TokenKeyRef
from provisioning.db.schema import Device, DeviceState
from provisioning.registry import Registry
from provisioning.service.store import trustchain

Row = dict[str, object]

SCOPES = ("fleet", "operator", "station", "device")
# A device whose certificate no longer matters to the fleet: left out of the expiry gauges.
RETIRED = frozenset({DeviceState.REVOKED, DeviceState.DESTROYED})


@dataclass(frozen=True)
class KeyFacts:
    """One key or certificate. ``key`` says where the private key lives (``file PATH``,
    ``token 'L' slot N``, ``TPM of DEVICE``, or that the service does not hold it); ``cert`` where
    the certificate is (a file, or ``registry``). ``holder_state`` is the registry state of the
    device that holds it. ``problem``: why the key could not be looked at."""

    scope: str
    kind: str
    name: str
    key: str
    cert: str | None = None
    algorithm: str | None = None
    fingerprint: str | None = None
    cert_fingerprint: str | None = None
    subject: str | None = None
    not_before: int | None = None
    not_after: int | None = None
    token: str | None = None
    slot: int | None = None
    label: str | None = None
    key_id: str | None = None
    holder_state: str | None = None
    problem: str | None = None
    # a trust bundle's entry: until when devices accept it (None: the current one, no end)
    until: int | None = None


# ---- the pure part: facts of a certificate or key, states, ordering --------------------------


def algorithm_of(public: object) -> str:
    if isinstance(public, ec.EllipticCurvePublicKey):
        return f"EC {public.curve.name}"
    if isinstance(public, rsa.RSAPublicKey):
        return f"RSA {public.key_size}"
    if isinstance(public, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(public).__name__


def public_fingerprint(public: PublicKeyTypes) -> str:
    """Lowercase hex SHA-256 of the public key's DER SubjectPublicKeyInfo (the same for a key
    and for every certificate of it)."""
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def with_certificate(facts: KeyFacts, cert: x509.Certificate) -> KeyFacts:
    public = cert.public_key()
    return replace(
        facts,
        algorithm=algorithm_of(public),
        fingerprint=public_fingerprint(public),
        cert_fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
        subject=cert.subject.rfc4514_string(),
        not_before=int(cert.not_valid_before_utc.timestamp()),
        not_after=int(cert.not_valid_after_utc.timestamp()),
    )


_HOLDER_STATES = {
    DeviceState.REVOKED.value: KeyState.COMPROMISED,
    DeviceState.DESTROYED.value: KeyState.DESTROYED,
}


def state_of(facts: KeyFacts, now: int) -> KeyState | None:
    """The entry's SP 800-57 state at ``now`` (None: the key could not be looked at)."""
    if facts.problem is not None:
        return None
    if facts.holder_state in _HOLDER_STATES:
        return _HOLDER_STATES[facts.holder_state]
    if facts.not_before is not None and now < facts.not_before:
        return KeyState.PRE_ACTIVATION
    if facts.not_after is not None and now > facts.not_after:
        return KeyState.DEACTIVATED
    if facts.until is not None and now > facts.until:
        return KeyState.DEACTIVATED  # devices no longer accept it (docs/trust.md)
    if facts.holder_state == DeviceState.QUARANTINED.value:
        return KeyState.SUSPENDED
    return KeyState.ACTIVE


def _order(facts: KeyFacts) -> tuple[int, int, int, str, str]:
    scope = SCOPES.index(facts.scope) if facts.scope in SCOPES else len(SCOPES)
    expiry = facts.not_after
    return (scope, expiry is None, expiry or 0, facts.kind, facts.name)


def rows(entries: Iterable[KeyFacts], now: int) -> list[Row]:
    """The entries as plain rows (``--json``; times in Unix seconds), with ``state`` and
    ``expires_in`` (seconds until not-after, negative once past; None without one), by scope
    and then by not-after, the nearest first."""
    out: list[Row] = []
    for facts in sorted(entries, key=_order):
        state = state_of(facts, now)
        row: Row = {
            "scope": facts.scope,
            "kind": facts.kind,
            "name": facts.name,
            "state": None if state is None else state.value,
            "key": facts.key,
            "cert": facts.cert,
            "algorithm": facts.algorithm,
            "fingerprint": facts.fingerprint,
            "cert_fingerprint": facts.cert_fingerprint,
            "subject": facts.subject,
            "not_before": facts.not_before,
            "not_after": facts.not_after,
            "expires_in": None if facts.not_after is None else facts.not_after - now,
            "token": facts.token,
            "slot": facts.slot,
            "label": facts.label,
            "key_id": facts.key_id,
            "holder_state": facts.holder_state,
            "problem": facts.problem,
            "accepted_until": facts.until,
        }
        out.append(row)
    return out


# ---- where the facts come from: the configuration, the token, the registry -------------------


def _certificates(path: Path) -> list[x509.Certificate]:
    return pki.certs_from_pem(path.read_bytes())


def _file_public_key(path: Path) -> PublicKeyTypes:
    """The public half of a PEM private key file of any type (a TLS key may be RSA); an
    encrypted file is refused rather than prompted for. The private key object is dropped at
    once and nothing of it is kept or shown."""
    try:
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        # the loader's message may quote the input: never echo it
        raise ValueError("not an unencrypted PEM private key") from None
    return private.public_key()


def _key_facts(facts: KeyFacts, ref: KeyRef) -> KeyFacts:
    """``facts`` completed with where ``ref``'s key lives and its public key's fingerprint (a
    mismatch with the certificate's public key is a problem)."""
    try:
        if isinstance(ref, TokenKeyRef):
            found = custody.token_key_facts(ref)
            public: PublicKeyTypes = found.public_key
            facts = replace(
                facts,
                key=f"token {found.token!r} slot {found.slot}",
                token=found.token,
                slot=found.slot,
                label=found.label,
                key_id=found.key_id.hex(),
            )
        else:
            public = _file_public_key(ref.path)
            facts = replace(facts, key=f"file {ref.path}")
    except (KeyfleetError, OSError, ValueError) as exc:
        where = custody.describe(ref) if isinstance(ref, TokenKeyRef) else f"file {ref}"
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        return replace(facts, key=where, problem=f"the key cannot be read: {reason}")
    fingerprint = public_fingerprint(public)
    if facts.fingerprint is not None and facts.fingerprint != fingerprint:
        return replace(facts, problem="the key is not the certificate's (public keys differ)")
    return replace(facts, algorithm=algorithm_of(public), fingerprint=fingerprint)


def _entry(kind: str, name: str, cert: Path | None, key: KeyRef | None) -> list[KeyFacts]:
    held = "not held by the service" if key is None else "-"
    base = KeyFacts(scope="fleet", kind=kind, name=name, key=held)
    if cert is None:
        return [] if key is None else [_key_facts(base, key)]
    try:
        certs = _certificates(cert)
    except (KeyfleetError, OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        return [replace(base, cert=str(cert), problem=f"the certificate cannot be read: {reason}")]
    found = []
    for i, certificate in enumerate(certs):
        facts = with_certificate(replace(base, cert=str(cert)), certificate)
        if len(certs) > 1:
            facts = replace(facts, name=f"{name} #{i + 1}")
        if key is not None:
            facts = _key_facts(facts, key)
        found.append(facts)
    return found


def fleet_facts(config: ServiceConfig, *, with_keys: bool = True) -> list[KeyFacts]:
    """Every key and certificate ``config`` names: the CAs, the service's signing, release and
    audit checkpoint keys, and its TLS identities. The revocation feed is signed with the service
    signing key (no key of its own). Token keys are read through the token (a login);
    ``with_keys=False`` reads the certificate files only."""
    entries: list[tuple[str, str, Path | None, KeyRef | None]] = [
        ("device-ca", "[device_ca]", config.device_ca.cert, config.device_ca.key),
        ("operator-ca", "[operator_ca] cert", config.operator_ca_cert, None),
        ("broker-ca", "[broker] ca", config.broker.ca, None),
        (
            "service-signing",
            "[service] signing_key",
            config.service.signing_cert,
            config.service.signing_key,
        ),
        ("release-signing", "[releases] signing_key", None, config.releases.signing_key),
        ("audit-checkpoint", "[audit] checkpoint_key", None, config.audit.checkpoint_key),
        (
            "service-tls",
            "[broker] client_cert",
            config.broker.client_cert,
            FileKeyRef(config.broker.client_key),
        ),
    ]
    if config.http is not None:
        entries.append(
            ("enroll-tls", "[http] tls_cert", config.http.tls_cert, FileKeyRef(config.http.tls_key))
        )
        entries.append(("station-ca", "[http] station_ca", config.http.station_ca, None))
    if config.dashboard is not None:
        entries.append(
            (
                "dashboard-tls",
                "[dashboard] tls_cert",
                config.dashboard.tls_cert,
                FileKeyRef(config.dashboard.tls_key),
            )
        )
    found: list[KeyFacts] = []
    for kind, name, cert, key in entries:
        if with_keys:
            found += _entry(kind, name, cert, key)
        elif cert is not None:
            found += _entry(kind, name, cert, None)
    return found


def trust_facts(session: Session) -> list[KeyFacts]:
    """What the newest trust bundle of the chain lists (docs/trust.md): the service signing
    keys, device, broker and operator CAs devices accept, each with its end (``until``: past it the
    entry is deactivated). During a rollover's overlap that is the old entry and the new one,
    which the configuration may not name yet (the service issues from the new device CA before
    ``[device_ca]`` names it). Empty before the first rollover: then the configuration's entries
    are what devices trust."""
    row = trustchain.newest(session)
    if row is None:
        return []
    bundle = trust.TrustLink(row.link, row.authz).opened()[1]
    where = f"trust bundle {bundle.seq}"
    key = "not looked at here (the configuration's entry, or the trust chain's key reference)"

    def base(kind: str, until: int | None) -> KeyFacts:
        name = where + (" (current)" if until is None else " (accepted until its end)")
        return KeyFacts(scope="fleet", kind=kind, name=name, key=key, cert=where, until=until)

    found = []
    for entry in bundle.service:
        public = entry.public_key
        found.append(
            replace(
                base("service-signing", entry.until),
                algorithm=algorithm_of(public),
                fingerprint=public_fingerprint(public),
            )
        )
    for kind, cas in (
        ("device-ca", bundle.device_ca),
        ("broker-ca", bundle.broker_ca),
        ("operator-ca", bundle.operator_ca),
    ):
        found += [with_certificate(base(kind, ca.until), ca.certificate) for ca in cas or ()]
    return found


def holder_facts(session: Session) -> list[KeyFacts]:
    """Operators and stations: the registry keeps their certificates' fingerprints only, so
    their entries have no algorithm or expiry."""
    registry = Registry(session)
    found = [
        KeyFacts(
            scope="operator",
            kind=f"operator-{operator.role.value}",
            name=operator.name,
            key="held by the operator",
            cert="registry (fingerprint)",
            cert_fingerprint=operator.cert_fingerprint,
        )
        for operator in registry.operators()
    ]
    found += [
        KeyFacts(
            scope="station",
            kind="station",
            name=station.name,
            key="held by the station",
            cert="registry (fingerprint)",
            cert_fingerprint=station.cert_fingerprint,
        )
        for station in registry.stations()
    ]
    return found


def device_facts(session: Session) -> list[KeyFacts]:
    """Every device's DevID certificate as the registry holds it."""
    found = []
    for device_id, state, pem in session.execute(
        select(Device.device_id, Device.state, Device.devid_cert_pem)
    ):
        facts = KeyFacts(
            scope="device",
            kind="devid",
            name=device_id,
            key=f"TPM of {device_id}",
            cert="registry",
            holder_state=state.value,
        )
        try:
            facts = with_certificate(facts, pki.cert_from_pem(pem.encode()))
        except (KeyfleetError, ValueError):
            facts = replace(facts, problem="the registry's certificate cannot be parsed")
        found.append(facts)
    return found


def device_not_afters(session: Session) -> list[int]:
    """The not-after of every DevID certificate of a device still in the fleet."""
    live = [s for s in DeviceState if s not in RETIRED]
    found = []
    for (pem,) in session.execute(select(Device.devid_cert_pem).where(Device.state.in_(live))):
        try:
            cert = x509.load_pem_x509_certificate(pem.encode())
        except ValueError:
            continue
        found.append(int(cert.not_valid_after_utc.timestamp()))
    return found


def fleet_certificates(config: ServiceConfig) -> list[KeyFacts]:
    """The fleet's certificates with an expiry, read from their files without reaching any key
    (what the gauges need: a refresh must not log in to the token)."""
    return [
        facts
        for facts in fleet_facts(config, with_keys=False)
        if facts.not_after is not None and facts.problem is None
    ]


def expiry_data(config: ServiceConfig, session: Session) -> tuple[dict[str, int], list[int]]:
    """What ``metrics.ExpiryGauges.set`` takes: per kind of fleet certificate its nearest
    not-after, and every live device's not-after."""
    nearest: dict[str, int] = {}
    for facts in fleet_certificates(config):
        assert facts.not_after is not None  # fleet_certificates keeps only those with one
        nearest[facts.kind] = min(nearest.get(facts.kind, facts.not_after), facts.not_after)
    return nearest, device_not_afters(session)
