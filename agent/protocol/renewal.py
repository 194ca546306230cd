"""Device certificate renewal, the pure rules both ends share (docs/attestation.md,
"Certificate renewal"). No I/O: the clock and randomness come in as arguments.

Device side: *when* to renew (``renewal_point``: a configurable fraction of the certificates'
lifetime, default 2/3), *how often to ask again* while nobody answers (``RenewalSchedule``:
exponential backoff with jitter, reset on reconnect so that a device that was offline past its
renewal point asks as soon as it is back), and *what to accept* (``verify_renewed``: the new
certificates chain to the device's anchors, hold the same public keys and name the same device).

Service side: ``verify_key_proofs`` checks the device's TPM2_Certify of its DevID key by the AK
enrolled for that device (qualified by the service's nonce) and its TLS key's signature over the
same nonce, and that both keys are the keys of its current certificates: renewal re-certifies the
same keys, it never introduces new ones. The quote is checked by the attestation verifier
(``provisioning.attestation.verify_evidence``), not here.

Check ids (docs/checks.md): ``renew.certify``, ``renew.key``, ``renew.issued``.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from math import gcd
from typing import Final, NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol.attest import Attestation, public_key_from_area, verify_certify
from agent.protocol.credentials import CredentialVerifier
from agent.protocol.errors import ProtocolError
from agent.protocol.x509der import load_certificate


class Ratio(NamedTuple):
    """An exact fraction ``num / den`` of integers, in lowest terms with ``den > 0``. The agent
    keeps ``fractions.Fraction`` (and the ``decimal`` module it imports, about 0.5 MB of the
    agent's resident memory) out of its process: the renewal point needs only this."""

    num: int
    den: int

    @classmethod
    def of(cls, num: int, den: int) -> Ratio:
        if den == 0:
            raise ValueError("a fraction with a zero denominator")
        if den < 0:
            num, den = -num, -den
        common = gcd(num, den)
        return cls(num // common, den // common)

    @classmethod
    def parse(cls, text: str) -> Ratio:
        """``"2/3"``, ``"3"`` or a decimal such as ``"0.75"``; ``ValueError`` for anything else."""
        text = text.strip()
        if "/" in text:
            num, _, den = text.partition("/")
            if not (_plain_int(num) and _plain_int(den)):
                raise ValueError("not a fraction")
            return cls.of(int(num), int(den))
        whole, dot, part = text.partition(".")
        if not (_plain_int(whole) or (dot and whole in ("", "-", "+"))) or (
            dot and not part.isdecimal()
        ):
            raise ValueError("not a fraction")
        digits = whole + part if dot else whole
        return cls.of(int(digits), 10 ** len(part) if dot else 1)

    def scale(self, value: int) -> int:
        """``value * self``, rounded toward minus infinity."""
        return value * self.num // self.den

    def __str__(self) -> str:
        return f"{self.num}/{self.den}"

    def within(self, low: Ratio, high: Ratio) -> bool:
        """``low <= self <= high``."""
        above = low.num * self.den <= self.num * low.den
        return above and self.num * high.den <= high.num * self.den

    def strictly_within(self, low: Ratio, high: Ratio) -> bool:
        """``low < self < high``."""
        above = low.num * self.den < self.num * low.den
        return above and self.num * high.den < high.num * self.den


def _plain_int(text: str) -> bool:
    digits = text[1:] if text[:1] in ("-", "+") else text
    return digits.isdecimal() and digits.isascii()


ZERO: Final = Ratio(0, 1)
ONE: Final = Ratio(1, 1)
DEFAULT_FRACTION: Final = Ratio(2, 3)
FIRST_RETRY: Final = 30  # seconds before asking again when a request got no answer
MAX_RETRY: Final = 3600
JITTER: Final = Ratio(1, 4)  # each wait is drawn from [1 - JITTER, 1] of the nominal one
TLS_PROOF_LABEL: Final = b"keyfleet/renew-tls\0"

_POINT = (serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def renewal_point(not_before: int, not_after: int, fraction: Ratio = DEFAULT_FRACTION) -> int:
    """When a certificate valid from ``not_before`` to ``not_after`` is renewed."""
    if not fraction.strictly_within(ZERO, ONE):
        raise ValueError("the renewal fraction is between 0 and 1")
    return not_before + fraction.scale(not_after - not_before)


def validity(der: bytes) -> tuple[int, int]:
    """(not-before, not-after) of a DER certificate, in unix seconds."""
    cert = load_certificate(der)
    return int(cert.not_valid_before_utc.timestamp()), int(cert.not_valid_after_utc.timestamp())


class RenewalSchedule:
    """When the device asks for renewal. ``due``: the renewal point is past and the wait after
    the last unanswered request is over. ``asked``: a request went out; the next wait doubles
    (``FIRST_RETRY`` .. ``MAX_RETRY``) and is jittered by ``rng`` so that a fleet that was cut off
    together does not ask together. ``reconnected``: the device is back online, ask at once.
    ``renewed``: the new certificates were taken; waits start over."""

    def __init__(self, fraction: Ratio = DEFAULT_FRACTION) -> None:
        if not fraction.strictly_within(ZERO, ONE):
            raise ValueError("the renewal fraction is between 0 and 1")
        self.fraction = fraction
        self.attempts = 0
        self.next_try: int | None = None
        self._point: tuple[tuple[bytes, ...], int] | None = None

    def __repr__(self) -> str:
        return f"RenewalSchedule(attempts={self.attempts}, next_try={self.next_try})"

    def point(self, certs: Sequence[bytes]) -> int:
        """The renewal point of the earliest-expiring of ``certs`` (DER); remembered for the
        last certificates asked about (the agent asks at every tick)."""
        key = tuple(certs)
        if self._point is None or self._point[0] != key:
            point = min(renewal_point(*validity(der), self.fraction) for der in certs)
            self._point = (key, point)
        return self._point[1]

    def due(self, now: int, certs: Sequence[bytes]) -> bool:
        if now < self.point(certs):
            return False
        return self.next_try is None or now >= self.next_try

    def asked(self, now: int, rng: bytes) -> int:
        """Record a request sent at ``now``; ``rng``: 4 random bytes for the jitter. Returns when
        the next one may go."""
        nominal = min(MAX_RETRY, FIRST_RETRY << min(self.attempts, 16))
        # nominal * (1 - JITTER * spread), spread = the 4 bytes / 2**32 in [0, 1)
        spread = int.from_bytes(rng[:4], "big")
        den = JITTER.den << 32
        wait = max(1, nominal * (den - JITTER.num * spread) // den)
        self.attempts += 1
        self.next_try = now + wait
        return self.next_try

    def reconnected(self) -> None:
        self.next_try = None

    def renewed(self) -> None:
        self.attempts = 0
        self.next_try = None


def tls_proof_message(device_id: str, nonce: bytes) -> bytes:
    """What the TLS key signs in a renewal answer: bound to the device and the service's nonce."""
    return TLS_PROOF_LABEL + device_id.encode() + b"\0" + nonce


def sign_tls_proof(key: ec.EllipticCurvePrivateKey, device_id: str, nonce: bytes) -> bytes:
    return key.sign(tls_proof_message(device_id, nonce), ec.ECDSA(hashes.SHA256()))


@dataclass(frozen=True)
class ProvenKeys:
    """The keys a renewal answer proved: the DevID key (certified by the device's AK) and the
    TLS key (it signed the nonce), each equal to the key of the device's current certificate."""

    devid: ec.EllipticCurvePublicKey
    tls: ec.EllipticCurvePublicKey


def _point(key: object) -> bytes:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ProtocolError("renew.key", "not an EC key")
    return key.public_bytes(*_POINT)


def verify_key_proofs(
    *,
    device_id: str,
    nonce: bytes,
    ak_public: ec.EllipticCurvePublicKey,
    devid_public: bytes,
    devid_certify: Attestation,
    current_devid: x509.Certificate,
    tls_cert: x509.Certificate,
    tls_proof: bytes,
) -> ProvenKeys:
    """Check a renewal answer's key proofs (see the module docstring). ``ak_public``: the AK
    enrolled for ``device_id`` (the registry's, never one the answer names); ``current_devid``:
    the device's DevID certificate on record; ``tls_cert``: the TLS certificate the device
    presented, which the caller has checked is one the device CA issued to this device.
    Raises ``renew.certify`` (not certified by this device's AK over this nonce, or the key is
    not fixedTPM) or ``renew.key`` (not the keys of the current certificates, or the TLS key
    did not sign the nonce)."""
    try:
        verify_certify(devid_certify, ak_public, nonce, devid_public)
        certified = public_key_from_area(devid_public)
    except ProtocolError as exc:
        raise ProtocolError(
            "renew.certify",
            f"the DevID key is not certified by this device's AK over the nonce: "
            f"[{exc.check}] {exc.reason}",
        ) from None
    if not hmac.compare_digest(_point(certified), _point(current_devid.public_key())):
        raise ProtocolError(
            "renew.key", "the certified key is not the key of the device's DevID certificate"
        )
    tls_key = tls_cert.public_key()
    if not isinstance(tls_key, ec.EllipticCurvePublicKey):
        raise ProtocolError("renew.key", "the TLS certificate does not hold an EC key")
    try:
        tls_key.verify(tls_proof, tls_proof_message(device_id, nonce), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise ProtocolError(
            "renew.key", "the TLS key did not sign this nonce for this device"
        ) from None
    return ProvenKeys(devid=certified, tls=tls_key)


def _common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if len(names) == 1 else None


def verify_renewed(
    *,
    device_id: str,
    devid_der: bytes,
    tls_der: bytes,
    current_devid: bytes,
    current_tls: bytes,
    anchors: Sequence[x509.Certificate],
    now: int,
) -> None:
    """What the device checks before it takes renewed certificates: the DevID certificate
    validates to its anchors (``CredentialVerifier``: the path, the device URN) and names this
    device; the TLS certificate is issued by an anchor, valid now and names this device (CN);
    both hold the same public keys as the current ones. Raises ``renew.issued``."""
    try:
        verified = CredentialVerifier(anchors).verify(devid_der, now)
    except ProtocolError as exc:
        raise ProtocolError(
            "renew.issued", f"new DevID certificate: [{exc.check}] {exc.reason}"
        ) from None
    if verified.device_id != device_id:
        raise ProtocolError("renew.issued", "the new DevID certificate names another device")
    try:
        old_devid = load_certificate(current_devid)
        old_tls = load_certificate(current_tls)
        new_tls = load_certificate(tls_der)
    except ValueError:
        raise ProtocolError("renew.issued", "a certificate does not decode") from None
    if verified.signature_key != _point(old_devid.public_key()):
        raise ProtocolError("renew.issued", "the new DevID certificate is for another key")
    if _point(new_tls.public_key()) != _point(old_tls.public_key()):
        raise ProtocolError("renew.issued", "the new TLS certificate is for another key")
    if _common_name(new_tls) != device_id:
        raise ProtocolError("renew.issued", "the new TLS certificate names another device")
    when = datetime.fromtimestamp(now, UTC)
    if not new_tls.not_valid_before_utc <= when <= new_tls.not_valid_after_utc:
        raise ProtocolError("renew.issued", "the new TLS certificate is not valid now")
    for anchor in anchors:
        try:
            new_tls.verify_directly_issued_by(anchor)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return
    raise ProtocolError("renew.issued", "the new TLS certificate is not issued by a device CA")
