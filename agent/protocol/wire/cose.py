"""COSE_Sign1 (RFC 9052 §4.2-4.4) with one profile: ES256, kid in the protected header.

Profile (see docs/wire.md):

* the message is tag 18 around ``[protected: bstr, unprotected: {}, payload: bstr, signature]``;
* the protected header is exactly ``{1: -7, 4: kid}`` (alg ES256, kid), deterministically encoded;
  the unprotected header is an empty map; the payload is embedded (never detached);
* ``kid`` is :func:`key_id` of the signer's public key. It sits in the *protected* header so the
  signature covers it: the receiver binds kid to a sender, and that binding must not rest on a
  field an attacker can rewrite in transit (RFC 9052 §3.1 leaves the choice to the profile);
* the signature is ES256 as COSE wants it: raw ``r || s``, 32 bytes each (RFC 9053 §2.1), not the
  DER that pyca (and a TPM) produce.

Signing only calls ``key.sign(data, ec.ECDSA(hashes.SHA256()))``, so a TPM-resident key exposed
as a pyca ``EllipticCurvePrivateKey`` signs exactly like a software key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from agent.protocol.errors import CryptoError, ProtocolError
from agent.protocol.wire import cbor

ALG_ES256 = -7
HEADER_ALG = 1
HEADER_KID = 4
COSE_SIGN1_TAG = 18
KID_SIZE = 32
SIGNATURE_SIZE = 64

# Tag 18 in its only deterministic form: one head byte, major type 6, value 18.
_TAG18 = bytes([0xC0 | COSE_SIGN1_TAG])
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_COORD = 32
_ES256 = ec.ECDSA(hashes.SHA256())

# Every message of the profile starts with these bytes: tag 18, an array of four, the protected
# header as a 38-byte string holding {1: -7, 4: <32 bytes>}; then come the kid, the empty
# unprotected map, the payload (a byte string) and the 64-byte signature (a byte string).
_PREFIX = bytes.fromhex("d2845826a201260458") + bytes([KID_SIZE])
_PROTECTED = slice(4, 4 + 6 + KID_SIZE)
_KID = slice(len(_PREFIX), len(_PREFIX) + KID_SIZE)
_UNPROTECTED_AT = _PROTECTED.stop
_PAYLOAD_AT = _UNPROTECTED_AT + 1
_SIGNATURE_HEAD = bytes([0x58, SIGNATURE_SIZE])
_EMPTY_MAP = 0xA0
_SIG_STRUCTURE_HEAD = b"\x84\x6aSignature1"


def key_id(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """The key id of a public key: SHA-256 of its SubjectPublicKeyInfo DER, all 32 bytes.

    Not truncated: a shorter id would be safe (the signature, not the kid, authenticates), but
    the full digest costs 16 bytes per message and spares every registry a collision check.
    """
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


@dataclass(frozen=True)
class Sign1:
    """A parsed, NOT verified COSE_Sign1. ``protected`` is the header bstr exactly as received
    (the signature covers those bytes, not a re-encoding)."""

    protected: bytes
    kid: bytes
    payload: bytes
    signature: bytes

    def to_be_signed(self, external_aad: bytes = b"") -> bytes:
        return sig_structure(self.protected, self.payload, external_aad)


def protected_header(kid: bytes) -> bytes:
    """The serialized protected header of our profile."""
    return cbor.encode({HEADER_ALG: ALG_ES256, HEADER_KID: kid})


def sig_structure(protected: bytes, payload: bytes, external_aad: bytes = b"") -> bytes:
    """RFC 9052 §4.4 Sig_structure for COSE_Sign1: the deterministic CBOR of
    ``["Signature1", protected, external_aad, payload]``, written directly (an array of four
    whose items are one fixed text and three byte strings needs no encoder)."""
    return b"".join(
        (
            _SIG_STRUCTURE_HEAD,
            byte_string(protected),
            byte_string(external_aad),
            byte_string(payload),
        )
    )


def byte_string(value: bytes) -> bytes:
    """The deterministic CBOR of the byte string ``value`` (its head in the shortest form)."""
    length = len(value)
    if length < 24:
        return bytes([0x40 | length]) + value
    if length < 0x100:
        return bytes([0x58, length]) + value
    if length < 0x10000:
        return b"\x59" + length.to_bytes(2, "big") + value
    if length < 0x100000000:
        return b"\x5a" + length.to_bytes(4, "big") + value
    return b"\x5b" + length.to_bytes(8, "big") + value


def sign1(payload: bytes, key: ec.EllipticCurvePrivateKey, *, external_aad: bytes = b"") -> bytes:
    """Sign ``payload`` and return the tagged COSE_Sign1 bytes."""
    if not isinstance(key.curve, ec.SECP256R1):
        raise ProtocolError("cose.alg", f"ES256 needs a P-256 key, not {key.curve.name}")
    protected = protected_header(key_id(key.public_key()))
    der = key.sign(sig_structure(protected, payload, external_aad), _ES256)
    r, s = decode_dss_signature(der)
    signature = r.to_bytes(_COORD, "big") + s.to_bytes(_COORD, "big")
    return _TAG18 + cbor.encode([protected, {}, payload, signature])


def decode_sign1(data: bytes, *, max_size: int = cbor.DEFAULT_MAX_SIZE) -> Sign1:
    """Parse tagged COSE_Sign1 bytes of our profile. Does not verify anything cryptographic."""
    if type(data) is not bytes:
        raise ProtocolError("cose.malformed", "input must be bytes")
    if len(data) > max_size:
        raise ProtocolError("cbor.size", f"{len(data)} bytes exceed the limit of {max_size}")
    found = _profile_form(data)
    return found if found is not None else _parse(data, max_size)


def _parse(data: bytes, max_size: int) -> Sign1:
    """``decode_sign1`` of any input (after its type and size checks) by decoding it: what
    :func:`_profile_form` leaves, every refusal among it."""
    if not data.startswith(_TAG18):
        raise ProtocolError("cose.malformed", "not a tag-18 COSE_Sign1")
    # The general decoder refuses all tags; the one tag we allow is peeled off here.
    outer = cbor.decode(data[1:], max_size=max_size)
    if not isinstance(outer, list) or len(outer) != 4:
        raise ProtocolError("cose.malformed", "COSE_Sign1 must be an array of four items")
    protected, unprotected, payload, signature = outer
    if not isinstance(protected, bytes) or not isinstance(payload, bytes):
        raise ProtocolError("cose.malformed", "protected header and payload must be byte strings")
    if not isinstance(signature, bytes):
        raise ProtocolError("cose.malformed", "signature must be a byte string")
    if unprotected != {}:
        raise ProtocolError("cose.header", "the unprotected header must be empty")
    header = cbor.decode(protected, max_size=max_size)
    if not isinstance(header, dict):
        raise ProtocolError("cose.header", "protected header must be a map")
    if set(header) != {HEADER_ALG, HEADER_KID}:
        raise ProtocolError("cose.header", "protected header must hold exactly alg and kid")
    if header[HEADER_ALG] != ALG_ES256 or type(header[HEADER_ALG]) is not int:
        raise ProtocolError("cose.alg", "only ES256 (-7) is accepted")
    kid = header[HEADER_KID]
    if not isinstance(kid, bytes) or len(kid) != KID_SIZE:
        raise ProtocolError("cose.header", f"kid must be {KID_SIZE} bytes")
    if len(signature) != SIGNATURE_SIZE:
        raise CryptoError("cose.signature", f"ES256 signature must be {SIGNATURE_SIZE} bytes")
    return Sign1(protected=protected, kid=kid, payload=payload, signature=signature)


def _profile_form(data: bytes) -> Sign1 | None:
    """``data`` parsed if it is a COSE_Sign1 of the profile in its deterministic encoding, laid
    out as every signer of the profile writes it; None for anything else, which :func:`_parse`
    then takes. ``_parse`` accepts nothing but this form (within any size limit) and gives the
    same result for it, so only the time differs (test_wire_decode_differential compares the
    two). Reads the few heads at their fixed places instead of decoding."""
    if (
        not data.startswith(_PREFIX)
        or len(data) <= _PAYLOAD_AT
        or data[_UNPROTECTED_AT] != _EMPTY_MAP
    ):
        return None
    head = data[_PAYLOAD_AT]
    at = _PAYLOAD_AT + 1
    if head < 0x58:
        if head < 0x40:
            return None
        length = head - 0x40
    elif head <= 0x5A:
        width = 1 << (head - 0x58)
        length = int.from_bytes(data[at : at + width], "big")
        at += width
        if length < _SHORTEST_BYTES[head] or len(data) < at:
            return None  # not the shortest head (the general parse refuses it), or truncated
    else:
        return None
    stop = at + length
    if len(data) != stop + 2 + SIGNATURE_SIZE or data[stop : stop + 2] != _SIGNATURE_HEAD:
        return None
    return Sign1(
        protected=data[_PROTECTED],
        kid=data[_KID],
        payload=data[at:stop],
        signature=data[stop + 2 :],
    )


# the smallest length each long byte-string head (one, two, four bytes of length) holds
_SHORTEST_BYTES = {0x58: 24, 0x59: 0x100, 0x5A: 0x10000}


def verify_sign1(
    message: Sign1,
    public_key: ec.EllipticCurvePublicKey,
    *,
    external_aad: bytes = b"",
    kid: bytes | None = None,
) -> None:
    """Raise unless ``message`` carries a valid ES256 signature by ``public_key`` whose key id is
    the message's kid. ``kid``: :func:`key_id` of ``public_key``, if the caller has it already
    (computed once where the key was loaded); otherwise it is computed here."""
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise ProtocolError("cose.alg", "ES256 needs a P-256 public key")
    if (key_id(public_key) if kid is None else kid) != message.kid:
        raise CryptoError("cose.kid-mismatch", "the key resolved does not have the message's kid")
    if len(message.signature) != SIGNATURE_SIZE:
        raise CryptoError("cose.signature", f"ES256 signature must be {SIGNATURE_SIZE} bytes")
    r = int.from_bytes(message.signature[:_COORD], "big")
    s = int.from_bytes(message.signature[_COORD:], "big")
    if not (0 < r < _P256_ORDER and 0 < s < _P256_ORDER):
        raise CryptoError("cose.signature", "signature values out of range")
    try:
        public_key.verify(
            encode_dss_signature(r, s),
            message.to_be_signed(external_aad),
            _ES256,
        )
    except InvalidSignature:
        raise CryptoError("cose.signature", "ES256 signature does not verify") from None
