"""TPM2_MakeCredential in software (TPM 2.0 Part 1, §24 "Credential Protection"; Part 1 §11.4.9
KDFa/KDFe): the verifier binds a secret to (an EK it trusts, the Name of an AK). Only the TPM
holding that EK *and* a loaded object with that Name can recover it with ActivateCredential.

    seed            RSA EK: random, RSA-OAEP(nameAlg, label "IDENTITY\\0") to the EK
                    ECC EK: KDFe(nameAlg, Z=ECDH(ephemeral, EK).x, "IDENTITY", eph.x, EK.x)
    symKey          KDFa(nameAlg, seed, "STORAGE", Name(AK), "", EK's AES key bits)
    encIdentity     AES-CFB(symKey, IV=0) over TPM2B_DIGEST(credential)
    HMACkey         KDFa(nameAlg, seed, "INTEGRITY", "", "", digest bits)
    outerHMAC       HMAC(nameAlg, HMACkey, encIdentity || Name(AK))
    credentialBlob  TPM2B_ID_OBJECT(TPM2B_DIGEST(outerHMAC) || encIdentity)
    secret          TPM2B_ENCRYPTED_SECRET(OAEP ciphertext | TPMS_ECC_POINT of the ephemeral)

The EK parameters (nameAlg, symmetric key size) are those of the TCG EK templates that swtpm and
real TPMs use: RSA 2048 and ECC P-256 with SHA-256/AES-128, ECC P-384 with SHA-384/AES-256.
Only pyca/cryptography is used: no TPM is involved on the verifier's side.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable

from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from agent.protocol.errors import CryptoError

Rng = Callable[[int], bytes]

MAX_CREDENTIAL_SIZE = 64  # a TPM2B_DIGEST: at most the largest digest the TPM supports
NAME_ALG_SHA256 = 0x000B
NAME_ALG_SHA384 = 0x000C


def _u16(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def kdfa(
    hash_name: str,
    key: bytes,
    *,
    label: bytes,
    context_u: bytes,
    context_v: bytes,
    bits: int,
) -> bytes:
    """KDFa (SP 800-108 counter mode with HMAC), as TPM 2.0 Part 1 §11.4.10.2 defines it."""
    out = b""
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        message = (
            struct.pack(">I", counter)
            + label
            + b"\x00"
            + context_u
            + context_v
            + struct.pack(">I", bits)
        )
        out += hmac.new(key, message, hash_name).digest()
    return out[: (bits + 7) // 8]


def kdfe(
    hash_name: str, z: bytes, *, label: bytes, party_u: bytes, party_v: bytes, bits: int
) -> bytes:
    """KDFe (SP 800-56A concatenation KDF), as TPM 2.0 Part 1 §11.4.10.3 defines it."""
    out = b""
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        out += hashlib.new(
            hash_name, struct.pack(">I", counter) + z + label + b"\x00" + party_u + party_v
        ).digest()
    return out[: (bits + 7) // 8]


def _ek_parameters(ek: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> tuple[str, int]:
    """(hash name, AES key bits) of the TCG EK template for this key type."""
    if isinstance(ek, rsa.RSAPublicKey):
        if ek.key_size != 2048:
            raise CryptoError("makecredential.ek", f"RSA EK of {ek.key_size} bits is not supported")
        return "sha256", 128
    if isinstance(ek.curve, ec.SECP256R1):
        return "sha256", 128
    if isinstance(ek.curve, ec.SECP384R1):
        return "sha384", 256
    raise CryptoError("makecredential.ek", f"EK on curve {ek.curve.name} is not supported")


def _seed_and_secret(
    ek: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, hash_name: str, rng: Rng
) -> tuple[bytes, bytes]:
    digest_size = hashlib.new(hash_name).digest_size
    if isinstance(ek, rsa.RSAPublicKey):
        seed = rng(digest_size)
        algorithm: hashes.HashAlgorithm = hashes.SHA256()
        ciphertext = ek.encrypt(
            seed,
            padding.OAEP(mgf=padding.MGF1(algorithm), algorithm=algorithm, label=b"IDENTITY\x00"),
        )
        return seed, ciphertext
    curve = ek.curve
    scalar = int.from_bytes(rng(curve.key_size // 8 + 8), "big")
    order = _ORDERS[curve.name]
    ephemeral = ec.derive_private_key(scalar % (order - 1) + 1, curve)
    z = ephemeral.exchange(ec.ECDH(), ek)
    size = (curve.key_size + 7) // 8
    eph = ephemeral.public_key().public_numbers()
    ek_numbers = ek.public_numbers()
    eph_x, eph_y = eph.x.to_bytes(size, "big"), eph.y.to_bytes(size, "big")
    seed = kdfe(
        hash_name,
        z,
        label=b"IDENTITY",
        party_u=eph_x,
        party_v=ek_numbers.x.to_bytes(size, "big"),
        bits=digest_size * 8,
    )
    return seed, _u16(eph_x) + _u16(eph_y)  # TPMS_ECC_POINT


_ORDERS = {
    "secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "secp384r1": int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973",
        16,
    ),
}


def make_credential(
    ek: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    ak_name: bytes,
    credential: bytes,
    rng: Rng = os.urandom,
) -> tuple[bytes, bytes]:
    """Returns (credential_blob, encrypted_secret): marshalled TPM2B_ID_OBJECT and
    TPM2B_ENCRYPTED_SECRET, the two inputs of TPM2_ActivateCredential.

    ``ak_name`` is the AK's TPM Name (nameAlg || digest, see agent.protocol.attest.tpm_name)
    computed
    by the verifier from the AK public area it was given, never taken from the device's word."""
    if not 0 < len(credential) <= MAX_CREDENTIAL_SIZE:
        raise CryptoError(
            "makecredential.credential", f"credential must be 1..{MAX_CREDENTIAL_SIZE} bytes"
        )
    if len(ak_name) < 3 or int.from_bytes(ak_name[:2], "big") not in (
        NAME_ALG_SHA256,
        NAME_ALG_SHA384,
    ):
        raise CryptoError("makecredential.name", "AK name is not nameAlg || digest")
    hash_name, sym_bits = _ek_parameters(ek)
    digest_size = hashlib.new(hash_name).digest_size
    seed, secret = _seed_and_secret(ek, hash_name, rng)
    sym_key = kdfa(
        hash_name, seed, label=b"STORAGE", context_u=ak_name, context_v=b"", bits=sym_bits
    )
    # CFB with a zero IV is what the TPM specification fixes here, not a choice of ours
    encryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    enc_identity = encryptor.update(_u16(credential)) + encryptor.finalize()
    hmac_key = kdfa(
        hash_name, seed, label=b"INTEGRITY", context_u=b"", context_v=b"", bits=digest_size * 8
    )
    outer_hmac = hmac.new(hmac_key, enc_identity + ak_name, hash_name).digest()
    return _u16(_u16(outer_hmac) + enc_identity), _u16(secret)
