"""Verification of TPM attestation structures. None of this issues a TPM command: the fleet
service uses it on what devices send (go-tpm-tools keeps its ``server`` package apart the same
way). tpm2-pytss types are used only to unmarshal, except a quote: the service checks one per
device per attestation interval, and ``agent.protocol.tpmquote`` decodes it in a fraction of
tpm2-pytss's time.

Every refusal is a ``ProtocolError`` (``CryptoError`` for a bad signature) with a stable check id:

    tpm.attest.parse       the TPMS_ATTEST or TPM2B_PUBLIC bytes do not decode
    tpm.attest.magic       magic is not TPM_GENERATED_VALUE (the TPM did not make it)
    tpm.attest.type        not the expected attestation type (quote / certify)
    tpm.attest.signature   the AK signature does not verify
    tpm.attest.nonce       extraData is not the verifier's nonce
    tpm.quote.pcr-select   the quote covers other PCRs than expected
    tpm.quote.pcr-digest   the PCR digest is not SHA-256 of the expected PCR values
    tpm.certify.name       the certified object is not the presented key
    tpm.certify.attributes the certified key is not fixedTPM + fixedParent (could leave the TPM)
    tpm.public.key         the public area is not an ECC P-256 key
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPM2_ST, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_PUBLIC, TPMS_ATTEST, TPMT_PUBLIC

from agent.protocol.errors import CryptoError, ProtocolError, TPMError
from agent.protocol.tpmquote import parse_quote

TPM_GENERATED_VALUE = 0xFF544347
MAX_ATTEST_SIZE = 2048
MAX_PUBLIC_SIZE = 1024
SHA256 = int(TPM2_ALG.SHA256)
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


@dataclass(frozen=True)
class Attestation:
    """What a TPM returns from Quote or Certify: the signed TPMS_ATTEST bytes and the AK's ECDSA
    signature over them, DER-encoded (as pyca produces and verifies)."""

    attest: bytes
    signature: bytes


@dataclass(frozen=True)
class QuoteInfo:
    """A verified quote."""

    nonce: bytes
    pcrs: tuple[int, ...]
    pcr_digest: bytes
    clock: int
    reset_count: int
    restart_count: int
    firmware_version: int


@dataclass(frozen=True)
class CertifyInfo:
    """A verified TPM2_Certify: ``name`` is the TPM Name of the certified key."""

    nonce: bytes
    name: bytes


def _unmarshal_public(public: bytes) -> TPMT_PUBLIC:
    if not 2 < len(public) <= MAX_PUBLIC_SIZE:
        raise ProtocolError("tpm.attest.parse", f"public area of {len(public)} bytes")
    try:
        parsed, consumed = TPM2B_PUBLIC.unmarshal(public)
    except Exception:  # tpm2-pytss raises several types for bad input
        raise ProtocolError("tpm.attest.parse", "TPM2B_PUBLIC does not decode") from None
    if consumed != len(public):
        raise ProtocolError("tpm.attest.parse", "trailing bytes after TPM2B_PUBLIC")
    result: TPMT_PUBLIC = parsed.publicArea
    return result


def tpm_name(public: bytes) -> bytes:
    """The TPM Name of an object from its marshalled TPM2B_PUBLIC: nameAlg || H(TPMT_PUBLIC)."""
    area = _unmarshal_public(public)
    if area.nameAlg != TPM2_ALG.SHA256:
        raise ProtocolError("tpm.attest.parse", f"nameAlg {area.nameAlg} is not sha256")
    return int(TPM2_ALG.SHA256).to_bytes(2, "big") + hashlib.sha256(public[2:]).digest()


def public_key_from_area(public: bytes) -> ec.EllipticCurvePublicKey:
    """The pyca public key of an ECC P-256 TPM2B_PUBLIC."""
    area = _unmarshal_public(public)
    if area.type != TPM2_ALG.ECC or area.parameters.eccDetail.curveID != TPM2_ECC.NIST_P256:
        raise ProtocolError("tpm.public.key", "not an ECC P-256 key")
    x = bytes(area.unique.ecc.x)
    y = bytes(area.unique.ecc.y)
    if len(x) != 32 or len(y) != 32:
        raise ProtocolError("tpm.public.key", "point coordinates are not 32 bytes")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + x + y)
    except ValueError:
        raise ProtocolError("tpm.public.key", "the point is not on P-256") from None


def object_attributes(public: bytes) -> int:
    return int(_unmarshal_public(public).objectAttributes)


def parse_attest(attest: bytes) -> TPMS_ATTEST:
    """Decode TPMS_ATTEST strictly and check its magic."""
    if not 0 < len(attest) <= MAX_ATTEST_SIZE:
        raise ProtocolError("tpm.attest.parse", f"attestation of {len(attest)} bytes")
    try:
        parsed, consumed = TPMS_ATTEST.unmarshal(attest)
    except Exception:  # tpm2-pytss raises several types for bad input
        raise ProtocolError("tpm.attest.parse", "TPMS_ATTEST does not decode") from None
    if consumed != len(attest):
        raise ProtocolError("tpm.attest.parse", "trailing bytes after TPMS_ATTEST")
    if parsed.magic != TPM_GENERATED_VALUE:
        raise ProtocolError("tpm.attest.magic", "magic is not TPM_GENERATED_VALUE")
    return parsed


def _check_signature(attestation: Attestation, ak_public: ec.EllipticCurvePublicKey) -> None:
    try:
        ak_public.verify(attestation.signature, attestation.attest, _ECDSA_SHA256)
    except (InvalidSignature, ValueError):
        raise CryptoError("tpm.attest.signature", "AK signature does not verify") from None


def verify_signature(attestation: Attestation, ak_public: ec.EllipticCurvePublicKey) -> TPMS_ATTEST:
    """Check the AK's ECDSA-SHA256 signature over the attest bytes, then decode them."""
    _check_signature(attestation, ak_public)
    return parse_attest(attestation.attest)


def pcr_digest(pcr_values: Mapping[int, bytes], pcrs: Sequence[int]) -> bytes:
    """SHA-256 over the selected PCR values in ascending PCR order, as TPM2_Quote computes it."""
    h = hashlib.sha256()
    for index in sorted(pcrs):
        h.update(pcr_values[index])
    return h.digest()


def verify_quote(
    attestation: Attestation,
    ak_public: ec.EllipticCurvePublicKey,
    nonce: bytes,
    pcr_values: Mapping[int, bytes],
) -> QuoteInfo:
    """Verify a quote: AK signature, magic, type, nonce, the selection is exactly the PCRs of
    ``pcr_values`` (sha256 bank) and the digest is SHA-256 of those values.

    ``pcr_values`` are what the verifier expects (e.g. replayed from an event log)."""
    _check_signature(attestation, ak_public)
    parsed = parse_quote(attestation.attest)
    if parsed.extra_data != nonce:
        raise ProtocolError("tpm.attest.nonce", "quote does not carry the verifier's nonce")
    selected: list[int] = []
    for alg, bitmap in parsed.selections:
        if alg != SHA256:
            raise ProtocolError("tpm.quote.pcr-select", "quote covers a bank other than sha256")
        for byte_index, byte in enumerate(bitmap):
            if byte:
                selected.extend(byte_index * 8 + bit for bit in range(8) if byte >> bit & 1)
    if sorted(selected) != sorted(pcr_values):
        raise ProtocolError(
            "tpm.quote.pcr-select",
            f"quote covers PCRs {sorted(selected)}, expected {sorted(pcr_values)}",
        )
    digest = pcr_digest(pcr_values, selected)
    if parsed.pcr_digest != digest:
        raise ProtocolError("tpm.quote.pcr-digest", "PCR digest differs from the expected values")
    return QuoteInfo(
        nonce=nonce,
        pcrs=tuple(sorted(selected)),
        pcr_digest=digest,
        clock=parsed.clock,
        reset_count=parsed.reset_count,
        restart_count=parsed.restart_count,
        firmware_version=parsed.firmware_version,
    )


def verify_certify(
    attestation: Attestation,
    ak_public: ec.EllipticCurvePublicKey,
    nonce: bytes,
    certified_public: bytes,
) -> CertifyInfo:
    """Verify that the AK certified ``certified_public`` (a marshalled TPM2B_PUBLIC, e.g. the
    DevID) as a key that cannot leave its TPM: signature, magic, type, nonce, Name, attributes."""
    parsed = verify_signature(attestation, ak_public)
    if parsed.type != TPM2_ST.ATTEST_CERTIFY:
        raise ProtocolError("tpm.attest.type", "not a certify")
    if bytes(parsed.extraData) != nonce:
        raise ProtocolError("tpm.attest.nonce", "certify does not carry the verifier's nonce")
    name = tpm_name(certified_public)
    if bytes(parsed.attested.certify.name) != name:
        raise ProtocolError("tpm.certify.name", "certified object is not the presented key")
    attrs = object_attributes(certified_public)
    needed = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
    if attrs & needed != needed:
        raise ProtocolError("tpm.certify.attributes", "key is not fixedTPM and fixedParent")
    return CertifyInfo(nonce=nonce, name=name)


def ek_public_key_from_area(public: bytes) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    """The pyca public key of an EK's TPM2B_PUBLIC (RSA or ECC P-256/P-384). No TPM command."""
    parsed, _ = TPM2B_PUBLIC.unmarshal(public)
    area: Any = parsed.publicArea
    if area.type == TPM2_ALG.RSA:
        exponent = int(area.parameters.rsaDetail.exponent) or 65537
        modulus = int.from_bytes(bytes(area.unique.rsa), "big")
        return rsa.RSAPublicNumbers(exponent, modulus).public_key()
    if area.type == TPM2_ALG.ECC:
        curves: dict[int, ec.EllipticCurve] = {
            int(TPM2_ECC.NIST_P256): ec.SECP256R1(),
            int(TPM2_ECC.NIST_P384): ec.SECP384R1(),
        }
        curve = curves.get(int(area.parameters.eccDetail.curveID))
        if curve is None:
            raise TPMError("read-ek", None, "EK is on an unsupported curve")
        point = b"\x04" + bytes(area.unique.ecc.x) + bytes(area.unique.ecc.y)
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
    raise TPMError("read-ek", None, "EK is neither RSA nor ECC")
