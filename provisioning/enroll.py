"""Factory enrollment: the fleet service's side of provisioning a device, in two steps.

``start`` takes what the station read from the device (EK certificate and public area, AK and
DevID public areas, the AK's TPM2_Certify of the DevID, the device's TLS public key) and checks:

    enroll.request         the request does not have the expected shape
    enroll.ek.cert         the EK certificate does not parse
    enroll.ek.chain        it has no valid path to a manufacturer root (provisioning.ekchain:
                           intermediates, path length, validity, CA keyUsage)
    ek.*                   the TCG EK profile (keyUsage, purpose) or revocation by an imported
                           manufacturer CRL (ek.revoked, ek.crl.stale; provisioning.ekchain)
    enroll.ek.public       the EK public area does not decode or is not the certified key
    enroll.ek.registered   this EK is already enrolled with a live identity (re-provisioning
                           needs a factory reset: an EK whose identity is destroyed or revoked
                           enrolls again under the same device id, see ``Registry.reenroll_device``)
    enroll.ak.attributes   the AK is not a restricted, fixedTPM, fixedParent signing key
    tpm.*                  the certify does not verify (agent.protocol.attest.verify_certify: AK
                           signature, nonce, the DevID's Name, fixedTPM + fixedParent)
    enroll.devid.attributes the DevID is not a TPM-generated, unrestricted signing key
    enroll.tls.key         the TLS public key is not ECC P-256
    enroll.groups          a group name is malformed
    tag.invalid            a tag is malformed (``keyprovision --tag``; more than 16 tags)

then runs TPM2_MakeCredential (in software) for (that EK, the AK's Name, a random 32-byte
secret) and keeps a pending session. Only the TPM holding that EK, with an object of exactly
that AK Name loaded, can recover the secret (TPM 2.0 Part 1 §24): so a correct secret in
``finish`` proves that the AK - and through the certify, the DevID - live in a genuine TPM.

``finish`` compares the secret in constant time, issues the DevID certificate and the MQTT TLS
client certificate from the fleet device CA (CN = the device id, which the service allocates:
``dev-`` + the first 16 hex digits of the EK certificate's SHA-256), and registers the device
with its audit entry in one transaction. Nothing is registered before ``finish``; a wrong secret
ends the session (one try), and every accept and refusal is audited. Further check ids:

    enroll.session.unknown  no such session (or it was ended by a failed finish)
    enroll.session.expired  the session outlived ``session_ttl``
    enroll.session.station  another station started this session
    enroll.session.limit    too many sessions pending
    enroll.credential       the secret is not the one MakeCredential protected
    enroll.station.unknown  the client certificate is not a registered station's
    enroll.revoke.unknown / enroll.revoke.state  see ``revoke``
    enroll.revoked          the EK's identity was revoked by operators and there is no approved,
                            unused, valid ``device.reenroll`` request for it (checked at start,
                            verified and used up at finish: ``provisioning.revocation``)
    registry.*              the registry refused the registration

The certify's qualifying data is SHA-256("keyfleet/enroll/certify/v1" 0x00 || nonce || TLS SPKI)
(``certify_qualifying_data``): the AK's signed statement then also covers the TLS public key the
device generated, so nobody between device and service can swap it.

Why the TLS key is a software key: Python's ``ssl`` can use a TPM key only through the
tpm2-openssl provider with tpm2-abrmd, which also slows every hash in the process (STACK.md); the
TLS key authenticates only the transport, every message is signed by the DevID in the TPM.

Pending sessions live in the registry database (``EnrollSession``, table ``enroll_sessions``),
not in a process: any number of ``keyfleet serve`` instances share them, and a station may send
``start`` to one and ``finish`` to another. What the table holds and why it is safe:

- Never the secret: only ``secret_digest(secret)`` (see there why a plain SHA-256 suffices).
  ``finish`` digests the station's answer and compares the digests with
  ``hmac.compare_digest``. The secret exists in the service only during ``start``.
- One try across instances: a wrong answer deletes the row in the transaction that checked it,
  so no instance can be asked again for that session.
- One registration: the ``finish`` that registers the device first sets ``finished_at`` with a
  conditional UPDATE (``WHERE finished_at IS NULL``) in the same transaction as the
  registration and its audit entry. A concurrent ``finish`` of the same session on another
  instance blocks on that row (row lock on PostgreSQL, write lock on SQLite) and then changes
  nothing: it reads the winner's certificates and returns the same identity. Its own freshly
  signed certificates are dropped unseen (never stored, returned or registered).
- Retried finish: the certificates issued (public) stay in the row until the session expires,
  so a station that lost the answer gets the same identity from any instance.
- Expiry and the session limit are rows too: expired rows are deleted by every ``start`` and
  ``finish`` (no instance is in charge of it), and ``start`` counts the rows under a lock that
  serializes starts fleet-wide (SQLite's write lock; a transaction-scoped advisory lock on
  PostgreSQL), so ``max_sessions`` holds for the fleet, not per instance.

Why one module of this size (~1,200 lines): the two steps share one pending-session record, one set
of checks (each with its check id, listed above) and one audited refusal path; both run in one
transaction with the registration they lead to. Credential activation
(``provisioning.makecredential``), the certificates (``provisioning.pki``), EK chains and
manufacturer CRLs (``provisioning.ekchain``, ``provisioning.ekcrls``), the revoked-device and
re-enroll rules (``provisioning.revocation``) and the HTTPS transport (``provisioning.http``) live
apart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session, sessionmaker
from tpm2_pytss.constants import TPMA_OBJECT

from agent.protocol.attest import (
    Attestation,
    ek_public_key_from_area,
    object_attributes,
    public_key_from_area,
    tpm_name,
    verify_certify,
)
from agent.protocol.authz import AuthzVerifier
from agent.protocol.errors import InternalError, KeyfleetError, ProtocolError
from agent.protocol.secret import Secret
from agent.protocol.wire.messages.operator import MAX_TAGS, check_tag
from agent.serial_link import INSTALL_ARGS, OPTIONAL_INSTALL_ARGS
from provisioning import audit, revocation
from provisioning.config import ServiceConfig
from provisioning.custody import load_private_key
from provisioning.db.engine import rowcount, run_in_transaction
from provisioning.db.schema import Device, EnrollSession
from provisioning.ekchain import ManufacturerTrust
from provisioning.ekcrls import ManufacturerTrustFile
from provisioning.makecredential import make_credential
from provisioning.pki import (
    CertificateAuthority,
    cert_from_pem,
    cert_to_pem,
    certs_from_pem,
    common_name,
    issue_client_cert,
    issue_devid_cert,
)
from provisioning.registry import DeviceState, Outcome, Registry, cert_fingerprint
from provisioning.registry import tags as device_tags
from provisioning.registry.repository import REENROLLABLE

Rng = Callable[[int], bytes]

CERTIFY_LABEL = b"keyfleet/enroll/certify/v1\x00"
SECRET_DIGEST_LABEL = b"keyfleet/enroll/secret/v1\x00"
# pg_advisory_xact_lock key serializing session starts fleet-wide: "kfenroll" as a signed 64-bit
# integer (any fixed value other than the migrations' would do).
SESSION_LOCK_KEY = int.from_bytes(b"kfenroll", "big", signed=True)
SECRET_SIZE = 32
MIN_NONCE = 16
MAX_NONCE = 64
MAX_CERT = 16 * 1024
MAX_TPM_BLOB = 4096
MAX_GROUPS = 64
DEVICE_ID_PREFIX = "dev-"
DEVICE_ID_HEX = 16
_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# At most 64: the serial becomes the DevID certificate's subject serialNumber (X.520 bound).
_SERIAL = re.compile(r"[\x21-\x7e]{1,64}")

_AK_REQUIRED = (
    TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
)
_DEVID_REQUIRED = (
    TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
)
_DER = serialization.Encoding.DER
_SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


def certify_qualifying_data(nonce: bytes, tls_public: bytes) -> bytes:
    """The qualifying data the AK signs in the DevID certify: binds the station's nonce and the
    device's TLS public key (SPKI DER) to the TPM's statement."""
    return hashlib.sha256(CERTIFY_LABEL + nonce + tls_public).digest()


def device_id_for(ek_fingerprint: str) -> str:
    return DEVICE_ID_PREFIX + ek_fingerprint[:DEVICE_ID_HEX]


def secret_digest(secret: bytes) -> bytes:
    """What the database keeps of a session's credential-activation secret, and what a station's
    answer is digested to before the constant-time comparison: SHA-256(label || secret).

    Why a plain hash and not an HMAC or a password hash: the secret is 32 bytes from the
    service's CSPRNG, used once, so there is nothing to guess and no dictionary to precompute; a
    preimage costs 2^256 either way. An HMAC key would have to be shared by every instance and
    kept out of the database, one more secret to distribute, and would add nothing against a
    reader of the database, who can check an answer but never make one (only the TPM that owns
    the EK can). The label keeps this digest apart from any other SHA-256 keyfleet computes."""
    return hashlib.sha256(SECRET_DIGEST_LABEL + secret).digest()


# ---- requests -------------------------------------------------------------------------------


def _need_bytes(value: Mapping[str, Any], name: str, *, max_len: int, min_len: int = 1) -> bytes:
    item = value.get(name)
    if not isinstance(item, bytes) or not min_len <= len(item) <= max_len:
        raise ProtocolError("enroll.request", f"{name} must be {min_len}..{max_len} bytes")
    return item


def _exact_keys(
    value: object, keys: frozenset[str], what: str, optional: frozenset[str] = frozenset()
) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError("enroll.request", f"{what} is not a map")
    if set(value) - optional != keys:
        missing = sorted(keys - set(value))
        extra = sorted(str(k) for k in set(value) - keys - optional)
        raise ProtocolError("enroll.request", f"{what}: missing {missing}, unexpected {extra}")
    return value


@dataclass(frozen=True)
class StartRequest:
    serial: str
    ek_kind: str
    ek_cert: bytes = field(repr=False)
    ek_public: bytes = field(repr=False)
    ak_public: bytes = field(repr=False)
    devid_public: bytes = field(repr=False)
    tls_public: bytes = field(repr=False)
    certify_attest: bytes = field(repr=False)
    certify_signature: bytes = field(repr=False)
    certify_nonce: bytes = field(repr=False)
    groups: tuple[str, ...] = ()
    # device tags given at enrollment (``keyprovision --tag``), set when the device registers;
    # optional on the wire: absent, the request is what stations without tags send
    tags: tuple[str, ...] = ()

    OPTIONAL = frozenset({"tags"})
    KEYS = frozenset(
        {
            "serial",
            "ek_kind",
            "ek_cert",
            "ek_public",
            "ak_public",
            "devid_public",
            "tls_public",
            "certify_attest",
            "certify_signature",
            "certify_nonce",
            "groups",
        }
    )

    @classmethod
    def from_map(cls, value: object) -> StartRequest:
        m = _exact_keys(value, cls.KEYS, "enroll/start", cls.OPTIONAL)
        serial = m["serial"]
        if not isinstance(serial, str) or not _SERIAL.fullmatch(serial):
            raise ProtocolError("enroll.request", "serial must be 1..64 printable characters")
        if m["ek_kind"] not in ("rsa", "ecc"):
            raise ProtocolError("enroll.request", "ek_kind must be 'rsa' or 'ecc'")
        groups = m["groups"]
        if not isinstance(groups, list) or len(groups) > MAX_GROUPS:
            raise ProtocolError("enroll.request", f"groups must be a list of at most {MAX_GROUPS}")
        for group in groups:
            if not isinstance(group, str) or not _GROUP.fullmatch(group):
                raise ProtocolError("enroll.groups", f"group name {group!r} is malformed")
        given = m.get("tags", [])
        if not isinstance(given, list) or len(given) > MAX_TAGS:
            raise ProtocolError("tag.invalid", f"tags must be a list of at most {MAX_TAGS}")
        for tag in given:
            check_tag(tag)
        return cls(
            serial=serial,
            ek_kind=m["ek_kind"],
            ek_cert=_need_bytes(m, "ek_cert", max_len=MAX_CERT),
            ek_public=_need_bytes(m, "ek_public", max_len=MAX_TPM_BLOB),
            ak_public=_need_bytes(m, "ak_public", max_len=MAX_TPM_BLOB),
            devid_public=_need_bytes(m, "devid_public", max_len=MAX_TPM_BLOB),
            tls_public=_need_bytes(m, "tls_public", max_len=MAX_TPM_BLOB),
            certify_attest=_need_bytes(m, "certify_attest", max_len=MAX_TPM_BLOB),
            certify_signature=_need_bytes(m, "certify_signature", max_len=MAX_TPM_BLOB),
            certify_nonce=_need_bytes(m, "certify_nonce", min_len=MIN_NONCE, max_len=MAX_NONCE),
            groups=tuple(groups),
            tags=tuple(dict.fromkeys(given)),
        )

    def to_map(self) -> dict[str, Any]:
        return {
            "serial": self.serial,
            "ek_kind": self.ek_kind,
            "ek_cert": self.ek_cert,
            "ek_public": self.ek_public,
            "ak_public": self.ak_public,
            "devid_public": self.devid_public,
            "tls_public": self.tls_public,
            "certify_attest": self.certify_attest,
            "certify_signature": self.certify_signature,
            "certify_nonce": self.certify_nonce,
            "groups": list(self.groups),
        } | ({"tags": list(self.tags)} if self.tags else {})


@dataclass(frozen=True)
class StartResult:
    session: str
    device_id: str
    credential_blob: bytes = field(repr=False)
    encrypted_secret: bytes = field(repr=False)
    expires_at: int

    def to_map(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "device_id": self.device_id,
            "credential_blob": self.credential_blob,
            "encrypted_secret": self.encrypted_secret,
            "expires_at": self.expires_at,
        }

    @classmethod
    def from_map(cls, value: object) -> StartResult:
        m = _exact_keys(
            value,
            frozenset(
                {"session", "device_id", "credential_blob", "encrypted_secret", "expires_at"}
            ),
            "enroll/start result",
        )
        if not isinstance(m["session"], str) or not isinstance(m["device_id"], str):
            raise ProtocolError("enroll.request", "session and device_id must be text")
        if type(m["expires_at"]) is not int:
            raise ProtocolError("enroll.request", "expires_at must be an integer")
        return cls(
            session=m["session"],
            device_id=m["device_id"],
            credential_blob=_need_bytes(m, "credential_blob", max_len=MAX_TPM_BLOB),
            encrypted_secret=_need_bytes(m, "encrypted_secret", max_len=MAX_TPM_BLOB),
            expires_at=m["expires_at"],
        )


@dataclass(frozen=True)
class FinishRequest:
    session: str
    secret: Secret = field(repr=False)

    @classmethod
    def from_map(cls, value: object) -> FinishRequest:
        m = _exact_keys(value, frozenset({"session", "secret"}), "enroll/finish")
        if not isinstance(m["session"], str) or not 0 < len(m["session"]) <= 64:
            raise ProtocolError("enroll.request", "session must be text of 1..64 characters")
        return cls(session=m["session"], secret=Secret(_need_bytes(m, "secret", max_len=64)))

    def to_map(self) -> dict[str, Any]:
        return {"session": self.session, "secret": self.secret.reveal()}


@dataclass(frozen=True)
class DeviceIdentity:
    """What ``finish`` returns: everything the station installs on the device. No secret: the
    device's private keys never left it."""

    device_id: str
    devid_cert: x509.Certificate
    tls_cert: x509.Certificate
    trust_anchors: tuple[x509.Certificate, ...]
    operator_anchors: tuple[x509.Certificate, ...]
    min_approvals: int
    broker_host: str
    broker_port: int
    broker_ca: tuple[x509.Certificate, ...]
    service_cert: x509.Certificate
    groups: tuple[str, ...]
    # the fleet's release-signing public key (SubjectPublicKeyInfo DER), if the fleet has one
    release_key: bytes | None = None
    # the service's HTTPS renewal listener, if the fleet lets expired certificates renew
    renewal_url: str | None = None

    def to_map(self) -> dict[str, Any]:
        optional: dict[str, Any] = {}
        if self.release_key is not None:
            optional["release_key"] = self.release_key
        if self.renewal_url is not None:
            optional["renewal_url"] = self.renewal_url
        return optional | {
            "device_id": self.device_id,
            "devid_cert": self.devid_cert.public_bytes(_DER),
            "tls_cert": self.tls_cert.public_bytes(_DER),
            "trust_anchors": [c.public_bytes(_DER) for c in self.trust_anchors],
            "operator_anchors": [c.public_bytes(_DER) for c in self.operator_anchors],
            "min_approvals": self.min_approvals,
            "broker": {
                "host": self.broker_host,
                "port": self.broker_port,
                "ca": [c.public_bytes(_DER) for c in self.broker_ca],
            },
            "service_cert": self.service_cert.public_bytes(_DER),
            "groups": list(self.groups),
        }

    @classmethod
    def from_map(cls, value: object) -> DeviceIdentity:
        keys = set(value) if isinstance(value, dict) else set()
        present = frozenset(INSTALL_ARGS) | (keys & frozenset(OPTIONAL_INSTALL_ARGS))
        m = _exact_keys(value, present, "enroll/finish result")
        broker = _exact_keys(m["broker"], frozenset({"host", "port", "ca"}), "broker")

        def cert(item: object) -> x509.Certificate:
            if not isinstance(item, bytes):
                raise ProtocolError("enroll.request", "certificate must be DER bytes")
            try:
                return x509.load_der_x509_certificate(item)
            except (
                ValueError,
                x509.InvalidVersion,
            ):  # a version field outside 1..3 raises the latter
                raise ProtocolError("enroll.request", "certificate does not parse") from None

        def certs(item: object) -> tuple[x509.Certificate, ...]:
            if not isinstance(item, list):
                raise ProtocolError("enroll.request", "certificate list expected")
            return tuple(cert(c) for c in item)

        if not isinstance(m["device_id"], str) or not isinstance(broker["host"], str):
            raise ProtocolError("enroll.request", "device_id and broker host must be text")
        if type(broker["port"]) is not int or not isinstance(m["groups"], list):
            raise ProtocolError("enroll.request", "broker port / groups malformed")
        if type(m["min_approvals"]) is not int:
            raise ProtocolError("enroll.request", "min_approvals must be an integer")
        release_key = m.get("release_key")
        if release_key is not None and not isinstance(release_key, bytes):
            raise ProtocolError("enroll.request", "release_key must be DER bytes")
        renewal_url = m.get("renewal_url")
        if renewal_url is not None and (
            not isinstance(renewal_url, str) or not renewal_url.startswith("https://")
        ):
            raise ProtocolError("enroll.request", "renewal_url must be an https URL")
        return cls(
            device_id=m["device_id"],
            devid_cert=cert(m["devid_cert"]),
            tls_cert=cert(m["tls_cert"]),
            trust_anchors=certs(m["trust_anchors"]),
            operator_anchors=certs(m["operator_anchors"]),
            min_approvals=m["min_approvals"],
            broker_host=broker["host"],
            broker_port=broker["port"],
            broker_ca=certs(broker["ca"]),
            service_cert=cert(m["service_cert"]),
            groups=tuple(str(g) for g in m["groups"]),
            release_key=release_key,
            renewal_url=renewal_url,
        )


# ---- settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnrollmentSettings:
    """What enrollment needs from the service configuration."""

    manufacturer_cas: tuple[x509.Certificate, ...]
    device_ca: CertificateAuthority
    broker_host: str
    broker_port: int
    broker_ca: tuple[x509.Certificate, ...]
    service_cert: x509.Certificate
    trust_anchors: tuple[x509.Certificate, ...] = ()
    operator_anchors: tuple[x509.Certificate, ...] = ()
    min_approvals: int = 2
    session_ttl: int = 300
    certificate_validity: timedelta = timedelta(days=365)
    max_sessions: int = 1024
    undo_window: int = 3600
    # the imported manufacturer CRLs (provisioning.ekcrls), re-read when the file changes
    manufacturer_crls: Path | None = None
    # the release-signing public key devices get (SubjectPublicKeyInfo DER); None: no releases
    release_key: bytes | None = None
    # the HTTPS renewal listener devices get ([renewal] url, offered only when expired
    # certificates may renew); None: none
    renewal_url: str | None = None

    def anchors(self) -> tuple[x509.Certificate, ...]:
        return self.trust_anchors or (self.device_ca.certificate,)

    @classmethod
    def from_service_config(cls, config: ServiceConfig) -> EnrollmentSettings:
        """Device CA (cert + key, the key through ``provisioning.custody``: token or file),
        manufacturer CA bundle, broker address and CA; the service certificate is
        ``[service] signing_cert``, whose key signs the service's messages; the device's trust
        anchors are the device CA (for members' credentials) and, apart, the operator CA (for
        the approvals of membership changes)."""
        config.require_signing()
        assert config.service.signing_cert is not None
        device_ca = CertificateAuthority(
            certificate=cert_from_pem(config.device_ca.cert.read_bytes()),
            private_key=load_private_key(config.device_ca.key, role="device CA"),
        )
        return cls(
            manufacturer_cas=tuple(
                certs_from_pem(config.attestation.manufacturer_cas.read_bytes())
            ),
            device_ca=device_ca,
            broker_host=config.broker.host,
            broker_port=config.broker.port,
            broker_ca=tuple(certs_from_pem(config.broker.ca.read_bytes())),
            service_cert=cert_from_pem(config.service.signing_cert.read_bytes()),
            trust_anchors=(device_ca.certificate,),
            operator_anchors=(cert_from_pem(config.operator_ca_cert.read_bytes()),),
            min_approvals=config.quorum.min_approvals,
            manufacturer_crls=config.attestation.manufacturer_crls,
            release_key=_release_public(config),
            certificate_validity=timedelta(seconds=config.enrollment.certificate_validity_seconds),
            renewal_url=config.renewal.url if config.renewal.allows_expired else None,
        )


def _release_public(config: ServiceConfig) -> bytes | None:
    """The release-signing key's public half (SubjectPublicKeyInfo DER), for the devices."""
    if config.releases.signing_key is None:
        return None
    key = load_private_key(config.releases.signing_key, role="release signing")
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# ---- checks ---------------------------------------------------------------------------------


def verify_ek_certificate(
    cert: x509.Certificate, trusted: Sequence[x509.Certificate], *, now: datetime
) -> x509.Certificate:
    """Path-validate EK certificate ``cert`` to a root of the manufacturer bundle ``trusted``
    (roots and intermediates; no CRLs) and return its issuer. See ``provisioning.ekchain``."""
    return ManufacturerTrust(trusted).verify(cert, now=now)[1]


def _check_attributes(public: bytes, required: int, forbidden: int, check: str, what: str) -> None:
    attrs = object_attributes(public)
    if attrs & required != required or attrs & forbidden:
        raise ProtocolError(check, f"{what} attributes 0x{attrs:08x} are not what it must have")


@dataclass(frozen=True)
class _Pending:
    """A session row as ``finish`` needs it, read in the checking transaction (no secret: the
    row has only its digest, which has served once the answer matched)."""

    session_id: str
    station: str
    device_id: str
    ek_fingerprint: str
    serial: str
    devid_public: bytes
    tls_public: bytes
    groups: tuple[str, ...]
    ak_public: bytes
    tags: tuple[str, ...]

    @classmethod
    def of(cls, row: EnrollSession) -> _Pending:
        return cls(
            session_id=row.session_id,
            station=row.station,
            device_id=row.device_id,
            ek_fingerprint=row.ek_fingerprint,
            serial=row.serial,
            devid_public=row.devid_public,
            tls_public=row.tls_public,
            groups=_groups_of(row),
            ak_public=row.ak_public,
            tags=tuple(str(t) for t in json.loads(row.tags)),
        )


def _groups_of(row: EnrollSession) -> tuple[str, ...]:
    return tuple(str(g) for g in json.loads(row.groups))


@dataclass(frozen=True)
class _Checked:
    """What the checking transaction of ``finish`` decided: a refusal (with its audit target),
    the identity of a session already finished, or a session to register."""

    target: str
    error: ProtocolError | None = None
    identity: DeviceIdentity | None = None
    pending: _Pending | None = None


def _unknown_session() -> ProtocolError:
    return ProtocolError("enroll.session.unknown", "no such enrollment session (expired or ended)")


# ---- the service object ---------------------------------------------------------------------


DeviceIssuer = Callable[[int], tuple[CertificateAuthority, tuple[x509.Certificate, ...]]]
"""``issuer(now)``: the device CA to issue from and the device CAs a new device trusts."""


class Enrollment:
    """The enrollment logic over a registry database. Thread-safe (the HTTP layer calls it from
    a thread pool) and stateless: sessions are rows, so several objects over one database (one
    per service instance) act as one."""

    def __init__(
        self,
        settings: EnrollmentSettings,
        sessions: sessionmaker[Session],
        *,
        rng: Rng = os.urandom,
        issuer: DeviceIssuer | None = None,
        broker_cas: Callable[[int], tuple[x509.Certificate, ...]] | None = None,
        operator_cas: Callable[[int], tuple[x509.Certificate, ...]] | None = None,
    ) -> None:
        self.settings = settings
        self._db = sessions
        self._rng = rng
        # the service's current device CA and the CAs a new device trusts (after a device CA
        # rollover: the trust bundle's); None: the configured ones
        self._issuer = issuer
        self._broker_cas = broker_cas  # the CAs of the broker's certificate a new device trusts
        self._operator_cas = operator_cas  # the operator CAs a new device trusts (trust bundle)
        self._manufacturers = ManufacturerTrustFile(
            settings.manufacturer_cas, settings.manufacturer_crls
        )

    # -- stations --

    def authorize_station(self, cert: x509.Certificate, *, now: int) -> str:
        """The station name (its client certificate's CN) if it is a registered station with
        exactly this certificate; the TLS layer already checked the chain to the station CA."""
        try:
            name = common_name(cert)
        except ProtocolError:
            name = "?"
        fingerprint = cert_fingerprint(cert)

        def lookup(session: Session) -> bool:
            station = Registry(session).station_by_fingerprint(fingerprint)
            return station is not None and station.name == name

        if not run_in_transaction(self._db, lookup):
            audit.record(
                self._db,
                now=now,
                actor=f"station?:{name}",
                action="enroll.station",
                target=f"cert:{fingerprint}",
                outcome=Outcome.REFUSED,
                reason="not a registered station certificate",
            )
            raise ProtocolError(
                "enroll.station.unknown",
                f"client certificate CN={name!r} is not a registered factory station",
            )
        return name

    # -- start --

    def start(self, station: str, request: StartRequest, *, now: int) -> StartResult:
        ek_fp = "unknown"
        try:
            ek_fp, result = self._start(station, request, now)
        except KeyfleetError as exc:
            self._refuse(
                now,
                station=station,
                action="enroll.start",
                target=f"ek:{ek_fp}",
                exc=exc,
                details={"serial": request.serial},
            )
            raise
        audit.record(
            self._db,
            now=now,
            actor=f"station:{station}",
            action="enroll.start",
            target=f"ek:{ek_fp}",
            outcome=Outcome.ACCEPTED,
            details={"device_id": result.device_id, "serial": request.serial},
        )
        return result

    def _start(self, station: str, req: StartRequest, now: int) -> tuple[str, StartResult]:
        try:
            ek_cert = x509.load_der_x509_certificate(req.ek_cert)
        except (ValueError, x509.InvalidVersion):  # a version field outside 1..3 raises the latter
            raise ProtocolError("enroll.ek.cert", "EK certificate is not DER X.509") from None
        ek_fp = cert_fingerprint(ek_cert)
        try:
            self._manufacturers.current().verify(ek_cert, now=datetime.fromtimestamp(now, UTC))
        except ProtocolError as exc:
            raise _Tagged(ek_fp, exc) from None
        try:
            ek_key = ek_public_key_from_area(req.ek_public)
        except Exception:
            raise _Tagged(
                ek_fp, ProtocolError("enroll.ek.public", "EK public area does not decode")
            ) from None
        if ek_key.public_bytes(_DER, _SPKI) != ek_cert.public_key().public_bytes(_DER, _SPKI):
            raise _Tagged(
                ek_fp,
                ProtocolError("enroll.ek.public", "EK public area is not the certified key"),
            )
        try:
            self._check_keys(req)
        except ProtocolError as exc:
            raise _Tagged(ek_fp, exc) from None

        def registered(session: Session) -> str | None:
            record = Registry(session).device_by_ek(ek_fp)
            if record is not None and revocation.identity_revoked(session, record):
                if revocation.reenroll_approval(session, record.device_id) is None:
                    raise ProtocolError(
                        "enroll.revoked",
                        f"this TPM's identity {record.device_id} is revoked: it enrolls again "
                        "only with an approved 'keyfleet propose reenroll' request",
                    )
                return None  # the approval is verified and used at finish
            if record is None or record.state in REENROLLABLE:
                return None  # a destroyed or revoked identity is replaced at finish
            return f"{record.device_id} ({record.state.value})"

        try:
            holder = run_in_transaction(self._db, registered)
        except ProtocolError as exc:
            raise _Tagged(ek_fp, exc) from None
        if holder is not None:
            raise _Tagged(
                ek_fp,
                ProtocolError(
                    "enroll.ek.registered",
                    f"this TPM is already enrolled as {holder}; re-provisioning needs a factory "
                    "reset that destroys the old identity",
                ),
            )

        device_id = device_id_for(ek_fp)
        secret = Secret(self._rng(SECRET_SIZE))
        try:
            blob, encrypted = make_credential(
                ek_key, tpm_name(req.ak_public), secret.reveal(), rng=self._rng
            )
            digest = secret_digest(secret.reveal())
        finally:
            secret.wipe()  # from here on only its digest exists, in the session row
        session_id = self._rng(16).hex()
        expires_at = now + self.settings.session_ttl
        values: dict[str, Any] = dict(
            session_id=session_id,
            station=station,
            device_id=device_id,
            ek_fingerprint=ek_fp,
            serial=req.serial,
            ak_public=req.ak_public,
            devid_public=req.devid_public,
            tls_public=req.tls_public,
            groups=json.dumps(list(req.groups)),
            tags=json.dumps(list(req.tags)),
            credential_digest=digest,
            created_at=now,
            expires_at=expires_at,
        )

        def store(session: Session) -> bool:
            _lock_session_starts(session)
            _purge(session, now)
            count = session.scalar(select(func.count()).select_from(EnrollSession)) or 0
            if count >= self.settings.max_sessions:
                return False  # returned, not raised: the purge above still commits
            session.add(EnrollSession(**values))
            return True

        if not run_in_transaction(self._db, store):
            raise _Tagged(
                ek_fp, ProtocolError("enroll.session.limit", "too many enrollments pending")
            )
        return ek_fp, StartResult(
            session=session_id,
            device_id=device_id,
            credential_blob=blob,
            encrypted_secret=encrypted,
            expires_at=expires_at,
        )

    def _check_keys(self, req: StartRequest) -> None:
        _check_attributes(
            req.ak_public,
            _AK_REQUIRED,
            TPMA_OBJECT.DECRYPT,
            "enroll.ak.attributes",
            "the AK must be a restricted fixedTPM fixedParent signing key; its",
        )
        ak_key = public_key_from_area(req.ak_public)
        verify_certify(
            Attestation(attest=req.certify_attest, signature=req.certify_signature),
            ak_key,
            certify_qualifying_data(req.certify_nonce, req.tls_public),
            req.devid_public,
        )
        _check_attributes(
            req.devid_public,
            _DEVID_REQUIRED,
            TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT,
            "enroll.devid.attributes",
            "the DevID must be a TPM-generated unrestricted signing key; its",
        )
        public_key_from_area(req.devid_public)
        try:
            tls = serialization.load_der_public_key(req.tls_public)
        except ValueError:
            raise ProtocolError("enroll.tls.key", "TLS public key is not DER SPKI") from None
        if not isinstance(tls, ec.EllipticCurvePublicKey) or not isinstance(
            tls.curve, ec.SECP256R1
        ):
            raise ProtocolError("enroll.tls.key", "TLS public key is not ECC P-256")

    # -- finish --

    def finish(self, station: str, request: FinishRequest, *, now: int) -> DeviceIdentity:
        answer = secret_digest(request.secret.reveal())
        checked = run_in_transaction(
            self._db, lambda s: self._check_session(s, station, request.session, answer, now)
        )

        def refused(exc: KeyfleetError) -> KeyfleetError:
            self._refuse(
                now,
                station=station,
                action="enroll.finish",
                target=checked.target,
                exc=exc,
                details={},
            )
            return exc

        if checked.error is not None:
            raise refused(checked.error)
        if checked.identity is not None:
            return checked.identity  # a station retrying a finish whose answer it lost
        assert checked.pending is not None
        try:
            identity = self._register(station, checked.pending, now)
        except KeyfleetError as exc:
            run_in_transaction(
                self._db,
                lambda s: s.execute(
                    delete(EnrollSession).where(EnrollSession.session_id == request.session)
                ),
            )
            refused(exc)
            raise
        if identity is None:
            # The session ended between our check and our claim, on this or another instance:
            # a wrong answer, a failed registration, expiry (purged) or an undo removed its row.
            raise refused(_unknown_session())
        return identity

    def _check_session(
        self, session: Session, station: str, session_id: str, answer: bytes, now: int
    ) -> _Checked:
        """Decide on a finish in one transaction whose deletions commit with the verdict (an
        expired session, a session a wrong answer ended); refusals are returned, not raised, so
        that those deletions are not rolled back. Expired sessions of others are purged too."""
        row = session.get(EnrollSession, session_id)
        if row is None:
            checked = _Checked(
                "session:unknown",
                _unknown_session(),
            )
        elif row.expires_at < now:
            session.delete(row)
            checked = _Checked(
                f"device:{row.device_id}",
                ProtocolError("enroll.session.expired", "the enrollment session expired"),
            )
        elif row.station != station:
            checked = _Checked(
                f"device:{row.device_id}",
                ProtocolError("enroll.session.station", "the session belongs to another station"),
            )
        elif not hmac.compare_digest(row.credential_digest, answer):
            # One try: a wrong answer ends the session, so the secret cannot be guessed, and
            # the row is gone for every instance once this transaction commits.
            session.delete(row)
            checked = _Checked(
                f"device:{row.device_id}",
                ProtocolError(
                    "enroll.credential",
                    "the secret is not the one made for this EK and AK: the AK is not in the "
                    "TPM that owns the EK",
                ),
            )
        elif row.finished_at is not None:
            checked = _Checked(f"device:{row.device_id}", identity=self._finished_identity(row))
        else:
            checked = _Checked(f"device:{row.device_id}", pending=_Pending.of(row))
        session.flush()
        _purge(session, now)
        return checked

    def _finished_identity(self, row: EnrollSession) -> DeviceIdentity:
        """The identity a finished session issued, from its row (what a retried finish gets)."""
        if row.devid_cert_pem is None or row.tls_cert_pem is None:
            raise InternalError(f"enrollment session of {row.device_id} finished without certs")
        assert row.finished_at is not None  # the caller's check
        return self._identity(
            row.device_id,
            cert_from_pem(row.devid_cert_pem.encode()),
            cert_from_pem(row.tls_cert_pem.encode()),
            _groups_of(row),
            row.finished_at,
        )

    def _device_ca(self, now: int) -> tuple[CertificateAuthority, tuple[x509.Certificate, ...]]:
        if self._issuer is None:
            return self.settings.device_ca, self.settings.anchors()
        return self._issuer(now)

    def _identity(
        self,
        device_id: str,
        devid_cert: x509.Certificate,
        tls_cert: x509.Certificate,
        groups: tuple[str, ...],
        now: int,
    ) -> DeviceIdentity:
        """What the device gets; its trust anchors and broker CAs as of ``now`` (the finish)."""
        settings = self.settings
        return DeviceIdentity(
            device_id=device_id,
            devid_cert=devid_cert,
            tls_cert=tls_cert,
            trust_anchors=self._device_ca(now)[1],
            operator_anchors=(
                settings.operator_anchors if self._operator_cas is None else self._operator_cas(now)
            ),
            min_approvals=settings.min_approvals,
            broker_host=settings.broker_host,
            broker_port=settings.broker_port,
            broker_ca=settings.broker_ca if self._broker_cas is None else self._broker_cas(now),
            service_cert=settings.service_cert,
            groups=groups,
            release_key=settings.release_key,
            renewal_url=settings.renewal_url,
        )

    def _issue(
        self, pending: _Pending, when: datetime
    ) -> tuple[x509.Certificate, x509.Certificate]:
        settings = self.settings
        device_ca = self._device_ca(int(when.timestamp()))[0]
        devid_cert = issue_devid_cert(
            device_ca,
            public_key_from_area(pending.devid_public),
            device_id=pending.device_id,
            hardware_serial=pending.serial,
            now=when,
            valid_for=settings.certificate_validity,
            ak_name=tpm_name(pending.ak_public),
            rng=self._rng,
        )
        tls_cert = issue_client_cert(
            device_ca,
            serialization.load_der_public_key(pending.tls_public),
            identity=pending.device_id,
            role="device",
            now=when,
            valid_for=settings.certificate_validity,
            rng=self._rng,
        )
        return devid_cert, tls_cert

    def _register(self, station: str, pending: _Pending, now: int) -> DeviceIdentity | None:
        """Claim the session and register its device in one transaction: the identity issued,
        or the identity another finish of the same session registered first (same answer), or
        None if the session is gone."""
        when = datetime.fromtimestamp(now, UTC)
        try:
            devid_cert, tls_cert = self._issue(pending, when)
        except ValueError as exc:
            raise InternalError(f"the device CA cannot issue certificates now: {exc}") from None
        devid_pem = cert_to_pem(devid_cert).decode()
        tls_pem = cert_to_pem(tls_cert).decode()

        def work(session: Session) -> DeviceIdentity | None:
            # The claim: only one finish changes the row (the others wait for its lock, then
            # find finished_at set). It commits or rolls back with the registration below.
            claimed = session.execute(
                update(EnrollSession)
                .where(
                    EnrollSession.session_id == pending.session_id,
                    EnrollSession.finished_at.is_(None),
                )
                .values(finished_at=now, devid_cert_pem=devid_pem, tls_cert_pem=tls_pem)
                .execution_options(synchronize_session=False)
            )
            if rowcount(claimed) != 1:
                row = session.get(EnrollSession, pending.session_id)
                if row is None or row.finished_at is None:
                    return None
                return self._finished_identity(row)
            registry = Registry(session)
            previous = registry.device_by_ek(pending.ek_fingerprint)
            if previous is None:
                registry.register_device(
                    pending.device_id,
                    ek_cert_fingerprint=pending.ek_fingerprint,
                    devid_cert_pem=devid_pem,
                    now=now,
                    ak_public=pending.ak_public,
                )
            else:
                # Re-provisioning after a factory reset (or of a revoked device, with the
                # quorum's approval, used up here): the same TPM gets a new identity under the
                # same device id; the old one's history stays in the audit log; its replay
                # state goes with it (the new agent counts from seq 1).
                if revocation.identity_revoked(session, previous):
                    revocation.consume_reenroll(
                        session,
                        previous.device_id,
                        devid_point=_devid_point(previous.devid_cert_pem),
                        verifier=AuthzVerifier(self.settings.operator_anchors),
                        min_approvals=self.settings.min_approvals,
                        station=station,
                        now=now,
                    )
                registry.reenroll_device(
                    previous.device_id,
                    ek_cert_fingerprint=pending.ek_fingerprint,
                    devid_cert_pem=devid_pem,
                    now=now,
                    ak_public=pending.ak_public,
                )
            if pending.tags:  # kept over a re-enrollment: the same device id
                device_tags.change_tags(session, pending.device_id, add=pending.tags, now=now)
            revocation.record_issued(
                session,
                pending.device_id,
                [(revocation.KIND_DEVID, devid_cert), (revocation.KIND_TLS, tls_cert)],
                now=now,
            )
            audit.append(
                session,
                now=now,
                actor=f"station:{station}",
                action="enroll.finish",
                target=f"device:{pending.device_id}",
                outcome=Outcome.ACCEPTED,
                details={
                    "ek": pending.ek_fingerprint,
                    "replaces": None if previous is None else previous.state.value,
                    "serial": pending.serial,
                    "devid_cert": cert_fingerprint(devid_cert),
                    "tls_cert": cert_fingerprint(tls_cert),
                    "groups": list(pending.groups),
                    "tags": list(pending.tags),
                },
            )
            return self._identity(pending.device_id, devid_cert, tls_cert, pending.groups, now)

        return run_in_transaction(self._db, work)

    # -- undo --

    def revoke(self, station: str, device_id: str, *, reason: str, now: int) -> None:
        """Undo a registration whose install on the device failed: allowed only for a device
        still in state ``registered`` that has never been seen online, within ``undo_window``
        seconds of its registration. The row is deleted (not only marked revoked) so that the
        same TPM can be enrolled again on the retry: the registry keeps one device per EK, and
        this identity never reached the device. The audit entry keeps its certificate's
        fingerprint, so the issued certificate stays on record as withdrawn."""
        reason = reason[:200]

        def work(session: Session) -> str:
            row = session.get(Device, device_id)
            if row is None:
                raise ProtocolError("enroll.revoke.unknown", f"no device {device_id!r}")
            if (
                row.state is not DeviceState.REGISTERED
                or row.last_seen is not None
                or now - row.registered_at > self.settings.undo_window
            ):
                raise ProtocolError(
                    "enroll.revoke.state",
                    f"device {device_id!r} is {row.state.value} or was seen online or enrolled "
                    "too long ago: only a fresh, never used registration can be undone; revoke "
                    "it as an operator instead",
                )
            fingerprint = cert_fingerprint(
                x509.load_pem_x509_certificate(row.devid_cert_pem.encode())
            )
            session.delete(row)
            session.flush()
            audit.append(
                session,
                now=now,
                actor=f"station:{station}",
                action="enroll.revoke",
                target=f"device:{device_id}",
                outcome=Outcome.ACCEPTED,
                reason=reason,
                details={"devid_cert": fingerprint, "ek": row.ek_cert_fingerprint},
            )
            # its pending or finished sessions go too: a retried finish must not hand out the
            # identity just withdrawn
            session.execute(delete(EnrollSession).where(EnrollSession.device_id == device_id))
            return fingerprint

        try:
            run_in_transaction(self._db, work)
        except KeyfleetError as exc:
            self._refuse(
                now,
                station=station,
                action="enroll.revoke",
                target=f"device:{device_id}",
                exc=exc,
                details={},
            )
            raise

    # -- audit --

    def _refuse(
        self,
        now: int,
        *,
        station: str,
        action: str,
        target: str,
        exc: KeyfleetError,
        details: Mapping[str, audit.JsonValue],
    ) -> None:
        if isinstance(exc, _Tagged):
            target = f"ek:{exc.ek_fingerprint}"
        check = exc.check if isinstance(exc, ProtocolError) else type(exc).__name__
        audit.record(
            self._db,
            now=now,
            actor=f"station:{station}",
            action=action,
            target=target,
            outcome=Outcome.REFUSED,
            reason=str(exc)[:500],
            details={**details, "check": check},
        )

    def pending_sessions(self) -> int:
        """Session rows in the database (every instance's), finished ones included until they
        expire and are purged."""
        return len(self.pending_session_ids())

    def pending_session_ids(self) -> frozenset[str]:
        return run_in_transaction(
            self._db, lambda s: frozenset(s.scalars(select(EnrollSession.session_id)))
        )


def _devid_point(devid_cert_pem: str) -> bytes:
    """The uncompressed EC point of a stored DevID certificate (what a re-enroll request names)."""
    public = cert_from_pem(devid_cert_pem.encode()).public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise ProtocolError("enroll.revoked", "the revoked identity's DevID key is not an EC key")
    return public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def _purge(session: Session, now: int) -> None:
    """Delete expired sessions (every start and finish does, on whichever instance)."""
    session.execute(
        delete(EnrollSession)
        .where(EnrollSession.expires_at < now)
        .execution_options(synchronize_session=False)
    )


def _lock_session_starts(session: Session) -> None:
    """Serialize session starts fleet-wide for the rest of the transaction, so that counting the
    rows and adding one cannot interleave with another instance's (``max_sessions`` is a fleet
    limit). PostgreSQL: a transaction-scoped advisory lock, released at commit or rollback.
    SQLite: nothing to do, the purge DELETE that follows takes the database's write lock even
    when it deletes nothing."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SESSION_LOCK_KEY})


class _Tagged(ProtocolError):
    """A refusal that already knows which EK it concerns (for the audit target)."""

    def __init__(self, ek_fingerprint: str, error: ProtocolError) -> None:
        super().__init__(error.check, error.reason)
        self.ek_fingerprint = ek_fingerprint
