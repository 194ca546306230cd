"""RFC 9420 §5.1-5.2 cryptographic primitives for cipher suite 2
(MLS_128_DHKEMP256_AES128GCM_SHA256_P256): SHA-256, HKDF-SHA256, AES-128-GCM, DHKEM(P-256),
ECDSA P-256 with DER signatures.

Labels are passed WITHOUT the ``"MLS 1.0 "`` prefix; the functions add it — except ``ref_hash``,
whose RFC labels already are full strings ("MLS 1.0 KeyPackage Reference"), and which the RFC
(and the crypto-basics vector) hash as given.

Only ``exchange()`` and ``sign()`` are called on private keys, so TPM-resident keys
(tpm2-pytss's pyca-compatible keys) work wherever a software key does.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from agent.protocol import hpke
from agent.protocol.errors import CryptoError
from agent.protocol.hpke import Rng
from agent.protocol.mls.tls import opaque_v, uint16, uint32

NH = 32  # KDF.Nh = Hash length of SHA-256
NK = 16  # AEAD.Nk, AES-128-GCM key
NN = 12  # AEAD.Nn, AES-128-GCM nonce

LABEL_PREFIX = b"MLS 1.0 "
KEY_PACKAGE_REF_LABEL = b"MLS 1.0 KeyPackage Reference"
PROPOSAL_REF_LABEL = b"MLS 1.0 Proposal Reference"

_MAX_EXPAND = 255 * NH


def hash_(data: bytes) -> bytes:
    """Hash (SHA-256)."""
    return hashlib.sha256(data).digest()


def mac(key: bytes, data: bytes) -> bytes:
    """MAC (HMAC-SHA256), e.g. the confirmation tag and membership tag."""
    return hmac.new(key, data, hashlib.sha256).digest()


def extract(salt: bytes, ikm: bytes) -> bytes:
    """KDF.Extract (HKDF-Extract); an empty salt means Nh zero bytes, as in RFC 5869."""
    return hmac.new(salt or bytes(NH), ikm, hashlib.sha256).digest()


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    if not 0 < length <= _MAX_EXPAND:
        raise CryptoError("mls.expand-length", f"expand length {length} out of range")
    return HKDFExpand(hashes.SHA256(), length, info).derive(prk)


def kdf_label(label: bytes, context: bytes, length: int) -> bytes:
    """The TLS encoding of KDFLabel {uint16 length; opaque label<V>; opaque context<V>}."""
    return uint16(length) + opaque_v(LABEL_PREFIX + label) + opaque_v(context)


def expand_with_label(secret: bytes, label: bytes, context: bytes, length: int) -> bytes:
    """ExpandWithLabel(Secret, Label, Context, Length) = KDF.Expand(Secret, KDFLabel, Length)."""
    return _expand(secret, kdf_label(label, context, length), length)


def derive_secret(secret: bytes, label: bytes) -> bytes:
    """DeriveSecret(Secret, Label) = ExpandWithLabel(Secret, Label, "", Nh)."""
    return expand_with_label(secret, label, b"", NH)


def derive_tree_secret(secret: bytes, label: bytes, generation: int, length: int) -> bytes:
    """DeriveTreeSecret (§9.1): the generation is the context, as a uint32."""
    return expand_with_label(secret, label, uint32(generation), length)


def ref_hash(label: bytes, value: bytes) -> bytes:
    """RefHash (§5.2) = Hash(RefHashInput{label<V>, value<V>}). ``label`` is used as given
    (the RFC's reference labels already include "MLS 1.0 ")."""
    return hash_(opaque_v(label) + opaque_v(value))


def _sign_content(label: bytes, content: bytes) -> bytes:
    return opaque_v(LABEL_PREFIX + label) + opaque_v(content)


def sign_with_label(key: ec.EllipticCurvePrivateKey, label: bytes, content: bytes) -> bytes:
    """SignWithLabel (§5.1.2): ECDSA P-256/SHA-256 over SignContent, DER-encoded signature."""
    return key.sign(_sign_content(label, content), ec.ECDSA(hashes.SHA256()))


def verify_with_label(
    key: ec.EllipticCurvePublicKey, label: bytes, content: bytes, signature: bytes
) -> None:
    """VerifyWithLabel: raises ``CryptoError("mls.signature")`` unless the signature verifies."""
    try:
        key.verify(signature, _sign_content(label, content), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise CryptoError("mls.signature", f"signature with label {label!r} invalid") from None


def _encrypt_context(label: bytes, context: bytes) -> bytes:
    return opaque_v(LABEL_PREFIX + label) + opaque_v(context)


def encrypt_with_label(
    key: ec.EllipticCurvePublicKey,
    label: bytes,
    context: bytes,
    plaintext: bytes,
    rng: Rng = os.urandom,
) -> tuple[bytes, bytes]:
    """EncryptWithLabel (§5.1.3): HPKE SealBase with EncryptContext as info and empty aad.
    Returns (kem_output, ciphertext)."""
    return hpke.seal(key, _encrypt_context(label, context), b"", plaintext, rng)


def decrypt_with_label(
    key: ec.EllipticCurvePrivateKey,
    label: bytes,
    context: bytes,
    kem_output: bytes,
    ciphertext: bytes,
) -> bytes:
    """DecryptWithLabel: HPKE OpenBase; the private key is only used through ``exchange()``.
    Raises ``CryptoError`` if the ciphertext or kem_output is refused."""
    return hpke.open_(kem_output, key, _encrypt_context(label, context), b"", ciphertext)


def derive_key_pair(secret: bytes) -> ec.EllipticCurvePrivateKey:
    """DeriveKeyPair of the suite's HPKE KEM (RFC 9180 §7.1.3)."""
    return hpke.derive_key_pair(secret)
