"""HPKE (RFC 9180), base mode, for the one suite keyfleet uses:
DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, AES-128-GCM.

Why not only ``cryptography.hazmat.primitives.hpke``: it needs the recipient's private key as
bytes, and a device's leaf key lives in its TPM. Here the only thing done with a private key is
``exchange()``, which a TPM-backed ``EllipticCurvePrivateKey`` runs as ECDH_ZGen; the rest of the
key schedule is software. Randomness enters through ``rng`` so the RFC's vectors can drive it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from agent.protocol.errors import CryptoError

Rng = Callable[[int], bytes]

KEM_ID = 0x0010  # DHKEM(P-256, HKDF-SHA256)
KDF_ID = 0x0001  # HKDF-SHA256
AEAD_ID = 0x0001  # AES-128-GCM
MODE_BASE = 0x00

N_SECRET = 32
N_ENC = 65
N_PK = 65
N_SK = 32
N_K = 16
N_N = 12
N_H = 32

_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_KEM_SUITE = b"KEM" + struct.pack(">H", KEM_ID)
_HPKE_SUITE = b"HPKE" + struct.pack(">HHH", KEM_ID, KDF_ID, AEAD_ID)


def _extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt or bytes(N_H), ikm, hashlib.sha256).digest()


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    return HKDFExpand(hashes.SHA256(), length, info).derive(prk)


def _labeled_extract(suite: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return _extract(salt, b"HPKE-v1" + suite + label + ikm)


def _labeled_expand(suite: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    labeled_info = struct.pack(">H", length) + b"HPKE-v1" + suite + label + info
    return _expand(prk, labeled_info, length)


def serialize_public_key(key: ec.EllipticCurvePublicKey) -> bytes:
    """SerializePublicKey: the uncompressed SEC1 point, 65 bytes."""
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def deserialize_public_key(data: bytes) -> ec.EllipticCurvePublicKey:
    """DeserializePublicKey, refusing anything that is not an uncompressed point on P-256."""
    if len(data) != N_PK or data[0] != 0x04:
        raise CryptoError(
            "hpke.public-key", f"expected a 65-byte uncompressed P-256 point, got {len(data)} bytes"
        )
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), data)
    except ValueError:
        raise CryptoError("hpke.public-key", "the point is not on P-256") from None


def derive_key_pair(ikm: bytes) -> ec.EllipticCurvePrivateKey:
    """DeriveKeyPair (RFC 9180 §7.1.3): rejection sampling of a scalar from ``ikm``."""
    dkp_prk = _labeled_extract(_KEM_SUITE, b"", b"dkp_prk", ikm)
    for counter in range(256):
        candidate = _labeled_expand(_KEM_SUITE, dkp_prk, b"candidate", bytes([counter]), N_SK)
        scalar = int.from_bytes(candidate, "big")
        if 0 < scalar < _P256_ORDER:
            return ec.derive_private_key(scalar, ec.SECP256R1())
    raise CryptoError("hpke.derive-key-pair", "no valid scalar in 256 candidates")


def generate_key_pair(rng: Rng = os.urandom) -> ec.EllipticCurvePrivateKey:
    return derive_key_pair(rng(N_SK))


def _dh(private_key: ec.EllipticCurvePrivateKey, public_key: ec.EllipticCurvePublicKey) -> bytes:
    return private_key.exchange(ec.ECDH(), public_key)


def _extract_and_expand(dh: bytes, kem_context: bytes) -> bytes:
    eae_prk = _labeled_extract(_KEM_SUITE, b"", b"eae_prk", dh)
    return _labeled_expand(_KEM_SUITE, eae_prk, b"shared_secret", kem_context, N_SECRET)


def encap(pk_r: ec.EllipticCurvePublicKey, rng: Rng = os.urandom) -> tuple[bytes, bytes]:
    """Encap: returns (shared_secret, enc). The ephemeral key comes from ``rng`` (the seam the
    RFC's vectors use: feed it ikmE)."""
    sk_e = generate_key_pair(rng)
    enc = serialize_public_key(sk_e.public_key())
    kem_context = enc + serialize_public_key(pk_r)
    return _extract_and_expand(_dh(sk_e, pk_r), kem_context), enc


def decap(enc: bytes, sk_r: ec.EllipticCurvePrivateKey) -> bytes:
    """Decap: the one private-key operation is ``sk_r.exchange`` (ECDH_ZGen for a TPM key)."""
    pk_e = deserialize_public_key(enc)
    kem_context = enc + serialize_public_key(sk_r.public_key())
    return _extract_and_expand(_dh(sk_r, pk_e), kem_context)


@dataclass
class Context:
    """An HPKE encryption context (RFC 9180 §5.2). ``seq`` counts messages sealed or opened."""

    key: bytes = field(repr=False)
    base_nonce: bytes = field(repr=False)
    exporter_secret: bytes = field(repr=False)
    seq: int = 0

    def _next_nonce(self) -> bytes:
        if self.seq >= 2 ** (8 * N_N) - 1:
            raise CryptoError("hpke.seq", "message limit reached")
        nonce = (self.seq).to_bytes(N_N, "big")
        self.seq += 1
        return bytes(a ^ b for a, b in zip(self.base_nonce, nonce, strict=True))

    def seal(self, aad: bytes, plaintext: bytes) -> bytes:
        return AESGCM(self.key).encrypt(self._next_nonce(), plaintext, aad)

    def open(self, aad: bytes, ciphertext: bytes) -> bytes:
        nonce = (self.seq).to_bytes(N_N, "big")
        nonce = bytes(a ^ b for a, b in zip(self.base_nonce, nonce, strict=True))
        try:
            plaintext = AESGCM(self.key).decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise CryptoError("hpke.open", "ciphertext does not authenticate") from None
        self.seq += 1  # only after success, as the RFC requires
        return plaintext

    def export(self, exporter_context: bytes, length: int) -> bytes:
        if not 0 < length <= 255 * N_H:
            raise CryptoError("hpke.export", f"export length {length} out of range")
        return _labeled_expand(_HPKE_SUITE, self.exporter_secret, b"sec", exporter_context, length)


def key_schedule_base(shared_secret: bytes, info: bytes) -> Context:
    psk_id_hash = _labeled_extract(_HPKE_SUITE, b"", b"psk_id_hash", b"")
    info_hash = _labeled_extract(_HPKE_SUITE, b"", b"info_hash", info)
    context = bytes([MODE_BASE]) + psk_id_hash + info_hash
    secret = _labeled_extract(_HPKE_SUITE, shared_secret, b"secret", b"")
    return Context(
        key=_labeled_expand(_HPKE_SUITE, secret, b"key", context, N_K),
        base_nonce=_labeled_expand(_HPKE_SUITE, secret, b"base_nonce", context, N_N),
        exporter_secret=_labeled_expand(_HPKE_SUITE, secret, b"exp", context, N_H),
    )


def setup_base_s(
    pk_r: ec.EllipticCurvePublicKey, info: bytes, rng: Rng = os.urandom
) -> tuple[bytes, Context]:
    """SetupBaseS: returns (enc, sender context)."""
    shared_secret, enc = encap(pk_r, rng)
    return enc, key_schedule_base(shared_secret, info)


def setup_base_r(enc: bytes, sk_r: ec.EllipticCurvePrivateKey, info: bytes) -> Context:
    """SetupBaseR: the recipient's context; works with a TPM-resident ``sk_r``."""
    return key_schedule_base(decap(enc, sk_r), info)


def seal(
    pk_r: ec.EllipticCurvePublicKey,
    info: bytes,
    aad: bytes,
    plaintext: bytes,
    rng: Rng = os.urandom,
) -> tuple[bytes, bytes]:
    """Single-shot SealBase: returns (enc, ciphertext)."""
    enc, ctx = setup_base_s(pk_r, info, rng)
    return enc, ctx.seal(aad, plaintext)


def open_(
    enc: bytes, sk_r: ec.EllipticCurvePrivateKey, info: bytes, aad: bytes, ciphertext: bytes
) -> bytes:
    """Single-shot OpenBase. Raises ``CryptoError`` if anything does not authenticate."""
    return setup_base_r(enc, sk_r, info).open(aad, ciphertext)
