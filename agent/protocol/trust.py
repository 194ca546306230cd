"""The trust bundle: which service signing keys a device accepts, and how that set rolls over
(docs/trust.md).

At enrollment a device gets one service signing key (``[fleet] service_cert``); that is its
implicit **bundle 0**. A later bundle replaces it only through a **link** of the chain the
service publishes retained (``TRUST_TOPIC``): the bundle's canonical bytes signed (COSE_Sign1)
by a service signing key of the bundle the device holds, and the operators' ``trust.rotate``
Authorization whose subject names exactly those bytes. A device takes a link (``check_link``)
only if

- its bundle decodes canonically (``trust.malformed``);
- its ``seq`` is exactly the held one's + 1 (``trust.seq``): no replay of an old bundle, no
  skipped one; a device that was offline applies the missed links in order (``advance``);
- it is signed by a key of the **held** bundle (``trust.signer``): any key the held bundle
  lists, whatever its end, so a device back after the overlap still catches up (the signature
  only ties the link to the chain; the quorum below is what allows the change);
- its Authorization verifies as a fleet-wide ``trust.rotate`` under the device's operator CA and
  quorum policy, historically (a device may come back after the request's window closed), and
  its subject is ``subject(bundle bytes)``: the bundle itself, which approvers' tools show
  (``trust.approval``).

A device enrolled after a rollover got the key a later bundle made current (its enrollment
configuration names the service's current certificate): it starts from the newest bundle whose
current key is its enrollment key, once that bundle's approval verifies and it is signed by its
enrollment key or by a key it lists with an end (``_anchor``).

So the service host, even holding the real signing key, cannot change what a device trusts: it
would need the private keys of a quorum of admins. An old key stays accepted until the ``until``
the new bundle gives it (the overlap), then only the keys without an end are.

**Bundle format** (deterministic CBOR): ``{"v": 1, "seq": n, "service": [{"key": P-256
SubjectPublicKeyInfo DER, "until": unix seconds | null}, ...]}``, 1 to ``MAX_SERVICE_KEYS``
keys, each once, exactly one of them without an end (the key the service signs with from then
on). Version 2 adds ``"device_ca": [{"cert": X.509 CA certificate DER, "until": ...}, ...]``, 1
to ``MAX_DEVICE_CAS`` certificates, each once, exactly one without an end (the CA the service
issues device certificates from): members' DevID certificates (``cred.chain``) and renewed
certificates must chain to a device CA it accepts at ``now`` (``device_cas``). A version 1
bundle (no section) leaves the device CAs of the device's configuration (``[fleet]
trust_anchors``) in force. Version 2 may also carry ``"broker_ca"`` (same form): the CAs the
agent accepts for the broker's TLS certificate at ``now`` (``broker_cas``; the agent writes them
to a file its MQTT client loads at its next connect); without it ``[broker] ca`` stays in force.
Version 2 may also carry ``"operator_ca"`` (same form): the CAs operator
certificates chain to (``operator_cas``, ``operator_ca_ends``): an approval verifies only with an
operator certificate of a CA the bundle lists, made while that CA was accepted (a CA with an
``until`` refuses approvals judged after it, ``authz.chain``); without it the operator CAs of the
configuration (``[fleet] operator_anchors``) stay in force. A version 2 bundle has at least one
of the three sections.

A link's approval is verified under the operator CAs of the bundle **before** it (the one a
device holds when it checks the link): a bundle cannot bring the CA of its own approvers.

**Chain format**: ``{"v": 1, "links": [{"bundle": COSE_Sign1, "authz": Authorization}, ...]}``,
oldest first, consecutive seqs. Links a device holds already are skipped; a refused link refuses
the whole chain and the held bundle stays (nothing half-applied).

Pure: no I/O, no clock (``now`` from the caller).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol import authz as az
from agent.protocol.errors import ProtocolError
from agent.protocol.mls import codec
from agent.protocol.wire import cose
from agent.protocol.x509der import load_certificate

__all__ = [
    "MAX_CHAIN",
    "MAX_DEVICE_CAS",
    "MAX_LINKS",
    "MAX_SERVICE_KEYS",
    "SECTIONS",
    "SUBJECT_LABEL",
    "ApprovalCheck",
    "DeviceCA",
    "ServiceKey",
    "TrustBundle",
    "TrustChain",
    "TrustLink",
    "advance",
    "check_link",
    "key_der",
    "read_subject",
    "sign_link",
    "subject",
]

VERSION: Final = 1
"""The chain's version, and a bundle's without a device CA section."""
VERSION_DEVICE_CA: Final = 2
"""A bundle with a device CA section (``TrustBundle.device_ca``)."""
SUBJECT_LABEL: Final = "keyfleet trust v1"
"""First field of a ``trust.rotate`` request's subject: its bytes mean nothing elsewhere."""
MAX_SERVICE_KEYS: Final = 4
MAX_KEY_DER: Final = 256
"""A P-256 SubjectPublicKeyInfo is 91 bytes."""
MAX_DEVICE_CAS: Final = 4
MAX_CA_DER: Final = 1024
"""A device CA certificate (a P-256 CA certificate is about 500 bytes)."""
MAX_BUNDLE: Final = 6 * 1024
MAX_LINK: Final = MAX_BUNDLE + 256 + az.MAX_AUTHORIZATION
MAX_LINKS: Final = 32
"""Links the retained chain carries: a device offline through more rollovers than this is
re-provisioned (at one rollover a year, decades)."""
MAX_CHAIN: Final = 256 * 1024
"""Largest retained chain (each link ~1.5 KB with two approvals)."""

ApprovalCheck = Callable[[bytes, "TrustBundle"], az.VerifiedAuthorization]
"""Verify a ``trust.rotate`` Authorization (fleet-wide, historically) under the quorum policy and
the operator CAs of the given bundle (the one before the link: ``TrustBundle.operator_cas``, or
the configuration's when it has no operator CA section); raises ``ProtocolError`` (``authz.*``)
when it does not verify."""

SECTIONS: Final = ("device_ca", "broker_ca", "operator_ca")
"""The CA sections of a version 2 bundle, in their order."""


def _malformed(reason: str) -> ProtocolError:
    return ProtocolError("trust.malformed", reason)


def _public_key(der: bytes, what: str) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_der_public_key(der)
    except ValueError:
        raise _malformed(f"{what}: not a DER SubjectPublicKeyInfo") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise _malformed(f"{what}: a service signing key is ECC P-256 (ES256)")
    canonical = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if canonical != der:
        raise _malformed(f"{what}: not the canonical SubjectPublicKeyInfo (uncompressed point)")
    return key


def key_der(key: ec.EllipticCurvePublicKey) -> bytes:
    """The bundle's form of a service signing key: its SubjectPublicKeyInfo DER."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True)
class ServiceKey:
    """One service signing key a bundle accepts, until ``until`` (None: no end)."""

    key: bytes = field(repr=False)
    until: int | None = None

    def __post_init__(self) -> None:
        if type(self.key) is not bytes or not 0 < len(self.key) <= MAX_KEY_DER:
            raise _malformed(f"service key: 1..{MAX_KEY_DER} bytes")
        if self.until is not None and (type(self.until) is not int or self.until < 0):
            raise _malformed("service key until: unix seconds or null")
        _public_key(self.key, "service key")

    @cached_property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return _public_key(self.key, "service key")

    @cached_property
    def kid(self) -> bytes:
        return cose.key_id(self.public_key)

    def accepted_at(self, now: int) -> bool:
        return self.until is None or now <= self.until


@dataclass(frozen=True)
class DeviceCA:
    """One CA certificate a bundle accepts, until ``until`` (None: no end): a device CA
    (members' and renewed certificates chain to it; without an end, the CA the service issues
    from) or a broker CA (the MQTT TLS server certificate chains to it)."""

    cert: bytes = field(repr=False)
    until: int | None = None

    def __post_init__(self) -> None:
        if type(self.cert) is not bytes or not 0 < len(self.cert) <= MAX_CA_DER:
            raise _malformed(f"device CA: 1..{MAX_CA_DER} bytes")
        if self.until is not None and (type(self.until) is not int or self.until < 0):
            raise _malformed("device CA until: unix seconds or null")
        _ca_certificate(self.cert)

    @cached_property
    def certificate(self) -> x509.Certificate:
        return _ca_certificate(self.cert)

    @cached_property
    def fingerprint(self) -> bytes:
        """SHA-256 of the certificate's DER (``openssl x509 -fingerprint -sha256``)."""
        return hashlib.sha256(self.cert).digest()

    def accepted_at(self, now: int) -> bool:
        return self.until is None or now <= self.until


def _ca_certificate(der: bytes) -> x509.Certificate:
    try:
        cert = load_certificate(der)
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (ValueError, x509.ExtensionNotFound, x509.InvalidVersion):
        raise _malformed("device CA: not a DER X.509 CA certificate") from None
    if not constraints.ca:
        raise _malformed("device CA: the certificate is not a CA's")
    if cert.public_bytes(serialization.Encoding.DER) != der:
        raise _malformed("device CA: not the certificate's DER")
    return cert


@dataclass(frozen=True)
class TrustBundle:
    """A version of what a device trusts to sign service messages (see the module docstring)."""

    seq: int
    service: tuple[ServiceKey, ...]
    # None: the device CAs of the device's configuration stay in force (always in version 1)
    device_ca: tuple[DeviceCA, ...] | None = None
    # None: the broker CA of the device's configuration stays in force (always in version 1)
    broker_ca: tuple[DeviceCA, ...] | None = None
    # None: the operator CAs of the device's configuration stay in force (always in version 1)
    operator_ca: tuple[DeviceCA, ...] | None = None

    def __post_init__(self) -> None:
        if type(self.seq) is not int or not 0 <= self.seq <= az.MAX_TIME:
            raise _malformed("seq: an unsigned integer")
        if type(self.service) is not tuple or not 1 <= len(self.service) <= MAX_SERVICE_KEYS:
            raise _malformed(f"service: 1..{MAX_SERVICE_KEYS} keys")
        if len({k.key for k in self.service}) != len(self.service):
            raise _malformed("service: a key is listed twice")
        if sum(k.until is None for k in self.service) != 1:
            raise _malformed("service: exactly one key has no end (the one the service signs with)")
        for section, cas in self.sections():
            if cas is None:
                continue
            if type(cas) is not tuple or not 1 <= len(cas) <= MAX_DEVICE_CAS:
                raise _malformed(f"{section}: 1..{MAX_DEVICE_CAS} certificates")
            if len({c.cert for c in cas}) != len(cas):
                raise _malformed(f"{section}: a certificate is listed twice")
            if sum(c.until is None for c in cas) != 1:
                raise _malformed(f"{section}: exactly one CA has no end (the current one)")

    def sections(self) -> tuple[tuple[str, tuple[DeviceCA, ...] | None], ...]:
        """(name, entries) of each CA section (None: absent), in ``SECTIONS`` order."""
        return (
            ("device_ca", self.device_ca),
            ("broker_ca", self.broker_ca),
            ("operator_ca", self.operator_ca),
        )

    @classmethod
    def initial(cls, key: ec.EllipticCurvePublicKey) -> TrustBundle:
        """Bundle 0: the one service signing key a device got at enrollment."""
        return cls(0, (ServiceKey(key_der(key)),))

    @property
    def current(self) -> ServiceKey:
        """The key without an end: the one the service signs with from this bundle on."""
        return next(k for k in self.service if k.until is None)

    def accepted(self, now: int) -> dict[bytes, ec.EllipticCurvePublicKey]:
        """kid -> key of every service signing key accepted at ``now``."""
        return {k.kid: k.public_key for k in self.service if k.accepted_at(now)}

    def signer(self, kid: bytes) -> ServiceKey | None:
        """The listed key with ``kid``, whatever its end (a link's signer: ``check_link``)."""
        return next((k for k in self.service if k.kid == kid), None)

    @property
    def current_ca(self) -> DeviceCA | None:
        """The device CA without an end (the service issues from it); None in version 1."""
        if self.device_ca is None:
            return None
        return next(c for c in self.device_ca if c.until is None)

    def device_cas(self, now: int) -> tuple[x509.Certificate, ...] | None:
        """The device CAs accepted at ``now``; None: the bundle leaves the configuration's."""
        if self.device_ca is None:
            return None
        return tuple(c.certificate for c in self.device_ca if c.accepted_at(now))

    def device_ca_ends(self) -> dict[bytes, int]:
        """Certificate DER -> end of every device CA accepted until a time (the verifier's
        ``ends``: a path to it fails after that time)."""
        return {c.cert: c.until for c in self.device_ca or () if c.until is not None}

    def broker_cas(self, now: int) -> tuple[x509.Certificate, ...] | None:
        """The broker CAs accepted at ``now`` (the MQTT TLS server's issuers); None: the bundle
        leaves the configuration's (``[broker] ca``)."""
        if self.broker_ca is None:
            return None
        return tuple(c.certificate for c in self.broker_ca if c.accepted_at(now))

    def operator_cas(self, now: int) -> tuple[x509.Certificate, ...] | None:
        """The operator CAs accepted at ``now`` (approvals made now chain to one of them);
        None: the bundle leaves the configuration's (``[fleet] operator_anchors``)."""
        if self.operator_ca is None:
            return None
        return tuple(c.certificate for c in self.operator_ca if c.accepted_at(now))

    def operator_ca_ends(self) -> dict[bytes, int]:
        """Certificate DER -> end of every operator CA accepted until a time (the approvals
        verifier's ``ends``: an approval judged after it with a certificate of that CA fails)."""
        return {c.cert: c.until for c in self.operator_ca or () if c.until is not None}

    def to_obj(self) -> dict[str, object]:
        v2 = any(cas is not None for _, cas in self.sections())
        obj: dict[str, object] = {
            "v": VERSION_DEVICE_CA if v2 else VERSION,
            "seq": self.seq,
            "service": [{"key": k.key, "until": k.until} for k in self.service],
        }
        for section, cas in self.sections():
            if cas is not None:
                obj[section] = [{"cert": c.cert, "until": c.until} for c in cas]
        return obj

    def encode(self) -> bytes:
        return codec.encode(self.to_obj())

    @classmethod
    def decode(cls, data: bytes) -> TrustBundle:
        """Strict: canonical bytes only (one bundle, one encoding), ``trust.malformed``."""
        try:
            obj = codec.as_map(
                codec.decode(data, MAX_BUNDLE, "trust bundle"),
                "trust bundle",
                {"v", "seq", "service"},
                set(SECTIONS),
            )
            version = obj["v"]
            if type(version) is not int or version not in (VERSION, VERSION_DEVICE_CA):
                raise _malformed(f"trust bundle version {version!r} (this agent reads 1 and 2)")
            sections = any(name in obj for name in SECTIONS)
            if sections != (version == VERSION_DEVICE_CA):
                raise _malformed(
                    "a version 2 trust bundle, and only it, has a device_ca, broker_ca or "
                    "operator_ca section"
                )
            seq = codec.as_uint(obj["seq"], "trust bundle.seq", az.MAX_TIME)
            keys = [
                ServiceKey(der, until)
                for der, until in _decode_entries(
                    obj["service"], "service", "key", MAX_SERVICE_KEYS, MAX_KEY_DER
                )
            ]
            cas = [None if name not in obj else _decode_cas(obj[name], name) for name in SECTIONS]
        except ProtocolError as exc:
            if exc.check == "trust.malformed":
                raise
            raise _malformed(exc.reason) from None
        bundle = cls(seq, tuple(keys), *cas)
        if bundle.encode() != data:
            raise _malformed("the trust bundle is not in its canonical encoding")
        return bundle


def _decode_cas(value: object, section: str) -> tuple[DeviceCA, ...]:
    entries = _decode_entries(value, section, "cert", MAX_DEVICE_CAS, MAX_CA_DER)
    return tuple(DeviceCA(der, until) for der, until in entries)


def _decode_entries(
    value: object, section: str, field: str, max_entries: int, max_der: int
) -> list[tuple[bytes, int | None]]:
    """A section's list of ``{field: DER, "until": unix seconds | null}`` maps, 1 to
    ``max_entries``, each DER 1 to ``max_der`` bytes: (DER, until) pairs, in order."""
    entries = codec.as_list(
        value,
        f"trust bundle.{section}",
        max_entries,
        lambda v, w: codec.as_map(v, w, {field, "until"}),
        min_len=1,
    )
    out: list[tuple[bytes, int | None]] = []
    for i, entry in enumerate(entries):
        until = entry["until"]
        if until is not None:
            until = codec.as_uint(until, f"trust bundle.{section}[{i}].until", az.MAX_TIME)
        der = codec.as_bytes(entry[field], f"trust bundle.{section}[{i}].{field}", 1, max_der)
        out.append((der, until))
    return out


def subject(bundle: bytes) -> bytes:
    """What a ``trust.rotate`` request binds: the exact bundle, its bytes in full, so that an
    approver's tool shows the keys and their ends it signs for (a digest would show nothing)."""
    TrustBundle.decode(bundle)
    data = codec.encode([SUBJECT_LABEL, bundle])
    if len(data) > az.MAX_TRUST_SUBJECT:
        raise _malformed(
            f"the bundle does not fit a request's subject ({az.MAX_TRUST_SUBJECT} bytes)"
        )
    return data


def read_subject(data: bytes) -> TrustBundle:
    """The bundle a ``trust.rotate`` subject names; ``trust.approval`` if it names none."""
    try:
        decoded = codec.decode(data, az.MAX_TRUST_SUBJECT, "trust subject")
    except ProtocolError:
        decoded = None
    if (
        not isinstance(decoded, list)
        or len(decoded) != 2
        or decoded[0] != SUBJECT_LABEL
        or type(decoded[1]) is not bytes
    ):
        raise ProtocolError("trust.approval", "the request's subject names no trust bundle")
    try:
        return TrustBundle.decode(decoded[1])
    except ProtocolError:
        raise ProtocolError(
            "trust.approval", "the request's subject names no trust bundle"
        ) from None


@dataclass(frozen=True)
class TrustLink:
    """One step of the chain: the signed bundle and the operators' Authorization of it."""

    bundle: bytes = field(repr=False)  # COSE_Sign1 over TrustBundle.encode()
    authz: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if type(self.bundle) is not bytes or not 0 < len(self.bundle) <= MAX_BUNDLE + 256:
            raise _malformed("link.bundle: a COSE_Sign1 of at most a bundle's size")
        if type(self.authz) is not bytes or not 0 < len(self.authz) <= az.MAX_AUTHORIZATION:
            raise _malformed("link.authz: an Authorization")

    def opened(self) -> tuple[cose.Sign1, TrustBundle]:
        """The COSE_Sign1 and the bundle it carries (decoded, NOT verified)."""
        try:
            sign1 = cose.decode_sign1(self.bundle, max_size=MAX_BUNDLE + 256)
        except ProtocolError as exc:
            raise _malformed(f"link.bundle: [{exc.check}] {exc.reason}") from None
        return sign1, TrustBundle.decode(sign1.payload)


@dataclass(frozen=True)
class TrustChain:
    """The retained chain of links, oldest first."""

    links: tuple[TrustLink, ...]

    def __post_init__(self) -> None:
        if type(self.links) is not tuple or not 1 <= len(self.links) <= MAX_LINKS:
            raise _malformed(f"chain: 1..{MAX_LINKS} links")

    def encode(self) -> bytes:
        return codec.encode(
            {
                "v": VERSION,
                "links": [{"bundle": k.bundle, "authz": k.authz} for k in self.links],
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> TrustChain:
        try:
            obj = codec.as_map(
                codec.decode(data, MAX_CHAIN, "trust chain"), "trust chain", {"v", "links"}
            )
            if obj["v"] != VERSION or type(obj["v"]) is not int:
                raise _malformed(f"trust chain version {obj['v']!r} (this agent reads 1)")
            links = codec.as_list(
                obj["links"],
                "trust chain.links",
                MAX_LINKS,
                lambda v, w: codec.as_map(v, w, {"bundle", "authz"}),
                min_len=1,
            )
            pairs = [
                (
                    codec.as_bytes(m["bundle"], f"link[{i}].bundle", 1, MAX_BUNDLE + 256),
                    codec.as_bytes(m["authz"], f"link[{i}].authz", 1, az.MAX_AUTHORIZATION),
                )
                for i, m in enumerate(links)
            ]
        except ProtocolError as exc:
            if exc.check == "trust.malformed":
                raise
            raise _malformed(exc.reason) from None
        return cls(tuple(TrustLink(b, a) for b, a in pairs))


def sign_link(
    bundle: TrustBundle, key: ec.EllipticCurvePrivateKey
) -> bytes:  # the service's side of a link
    """``bundle`` signed (COSE_Sign1) by ``key``: a service signing key of the bundle before."""
    return cose.sign1(bundle.encode(), key)


def _check_approval(
    under: TrustBundle, bundle: TrustBundle, payload: bytes, authz: bytes, approval: ApprovalCheck
) -> None:
    """``bundle``'s approval, verified under the operator CAs of ``under`` (the bundle held
    before it): never under the CAs ``bundle`` itself brings."""
    try:
        verified = approval(authz, under)
    except ProtocolError as exc:
        raise ProtocolError(
            "trust.approval",
            f"trust bundle {bundle.seq}: its approval does not verify ([{exc.check}] {exc.reason})",
        ) from None
    request = verified.request
    if request.op != az.OP_TRUST_ROTATE or request.subject is None:
        raise ProtocolError(
            "trust.approval", f"trust bundle {bundle.seq}: approved by a {request.op!r} request"
        )
    if read_subject(request.subject).encode() != payload:
        raise ProtocolError(
            "trust.approval", f"trust bundle {bundle.seq}: the approval is for another bundle"
        )


def check_link(held: TrustBundle, link: TrustLink, approval: ApprovalCheck) -> TrustBundle:
    """The bundle ``link`` carries, if a device holding ``held`` may take it (see the module
    docstring); ``trust.*`` otherwise."""
    sign1, bundle = link.opened()
    if bundle.seq != held.seq + 1:
        raise ProtocolError(
            "trust.seq", f"trust bundle {bundle.seq} does not follow the one held ({held.seq})"
        )
    signer = held.signer(sign1.kid)
    if signer is None:
        raise ProtocolError(
            "trust.signer",
            f"trust bundle {bundle.seq} is signed by a key that bundle {held.seq} does not list",
        )
    try:
        cose.verify_sign1(sign1, signer.public_key)
    except ProtocolError as exc:
        raise ProtocolError(
            "trust.signer", f"trust bundle {bundle.seq}: [{exc.check}] {exc.reason}"
        ) from None
    _check_approval(held, bundle, sign1.payload, link.authz, approval)
    return bundle


def _anchor(held: TrustBundle, chain: TrustChain, approval: ApprovalCheck) -> TrustBundle:
    """Where a device still at bundle 0 stands in the chain. A device enrolled after a rollover
    got the key a later bundle made current: the newest bundle whose current key is its
    enrollment key is its place (its approval is checked; its signer, a key the device never
    knew, cannot be). A device enrolled before any rollover holds bundle 0 of the chain."""
    if held.seq != 0:
        return held
    for link in reversed(chain.links):
        sign1, bundle = link.opened()
        if bundle.seq > 0 and bundle.current.key == held.current.key:
            _check_anchor_signer(held, bundle, sign1)
            # under the operator CAs the device got at enrollment (bundle 0: its configuration)
            _check_approval(held, bundle, sign1.payload, link.authz, approval)
            return bundle
    return held


def _check_anchor_signer(held: TrustBundle, bundle: TrustBundle, sign1: cose.Sign1) -> None:
    """The signer of the bundle a device at bundle 0 starts from: its own enrollment key (a
    device CA rollover that kept the service key), or the key the bundle replaced, which the
    service lists with an end in the bundle that made the enrollment key current. Any other
    signer is refused (``trust.signer``)."""
    signer = held.signer(sign1.kid) or bundle.signer(sign1.kid)
    if signer is None or (signer.until is None and signer.key != held.current.key):
        raise ProtocolError(
            "trust.signer",
            f"trust bundle {bundle.seq} is signed by a key neither it nor bundle 0 lists",
        )
    try:
        cose.verify_sign1(sign1, signer.public_key)
    except ProtocolError as exc:
        raise ProtocolError(
            "trust.signer", f"trust bundle {bundle.seq}: [{exc.check}] {exc.reason}"
        ) from None


def advance(held: TrustBundle, chain: TrustChain, approval: ApprovalCheck) -> TrustBundle | None:
    """The newest bundle of ``chain`` reached from ``held`` link by link (None: the chain has
    nothing newer). The first refused link refuses the chain (``trust.*``); ``held`` is not
    changed by this function in any case."""
    current = _anchor(held, chain, approval)
    for link in chain.links:
        _, bundle = link.opened()
        if bundle.seq <= current.seq:
            continue  # taken already (a device holds the chain up to its seq)
        current = check_link(current, link, approval)
    return None if current is held else current
