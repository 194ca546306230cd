"""Member credentials: who a group leaf is, and proof that its key lives in that device's TPM.

A leaf carries its device's DevID certificate. ``CredentialVerifier`` validates it against the
device CA(s) the device trusts since enrollment, with pyca's X.509 path validation
(``cryptography.x509.verification``, RFC 5280 and CA/B web-PKI profile), and reads from it the
device id (subjectAltName URI ``urn:keyfleet:device:<id>``), the DevID public key (the key that
signs the leaf) and the TPM Name of the device's enrolled AK (a keyfleet certificate extension).

``verify_tpm_residency`` checks a TPM2_Certify of a leaf key by that AK: the leaf's private key
was made in the TPM and cannot leave it, and it is an ECDH (decrypt) key, not a signing key.
Nothing here issues a TPM command or reads a clock: time is passed in as ``now``.

Check ids (docs/checks.md):

    cred.decode            the certificate does not decode, is too large, or its AK-name
                           extension is malformed
    cred.chain             path validation failed: unknown issuer, bad signature, expired or not
                           yet valid, not a clientAuth end-entity certificate, ...
    cred.device-id         no, several or an invalid urn:keyfleet:device:<id> in the SAN
    cred.key               the certified key is not an ECDSA P-256 key
    tpm.proof.decode       the proof is not the CBOR map {"v":1, "ak", "pub", "attest", "sig"},
                           or a TPM structure in it does not decode
    tpm.proof.ak           the AK public area does not hash to the AK name the certificate names,
                           or is not a restricted fixedTPM/fixedParent signing key
    tpm.proof.signature    the AK signature over the TPMS_ATTEST does not verify (CryptoError)
    tpm.proof.name         the certified object is not the presented leaf public area
    tpm.proof.attributes   the leaf key is not fixedTPM|fixedParent|sensitiveDataOrigin, or is
                           not a decrypt-only (ECDH) key
    tpm.proof.key          the leaf public area is not the leaf key presented
    tpm.attest.magic       the TPMS_ATTEST was not made by a TPM (agent.protocol.attest)
    tpm.attest.type        the TPMS_ATTEST is not a certify
    tpm.attest.nonce       the qualifying data is not SHA-256 of the leaf key's point
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.verification import (
    ClientVerifier,
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)
from tpm2_pytss.constants import TPM2_ALG, TPM2_ST, TPMA_OBJECT
from tpm2_pytss.types import TPMS_SIGNATURE_ECC, TPMT_SIGNATURE, TPMU_SIGNATURE

from agent.protocol.attest import (
    Attestation,
    object_attributes,
    parse_attest,
    public_key_from_area,
    tpm_name,
)
from agent.protocol.errors import CryptoError, ProtocolError
from agent.protocol.wire import cbor
from agent.protocol.wire.messages.base import ID_PATTERN
from agent.protocol.x509der import load_certificate

AK_NAME_OID: Final = x509.ObjectIdentifier("2.25.308915406327458383052327716211547434305")
"""The keyfleet AK-name certificate extension (non-critical). Its value is a DER OCTET STRING
holding the enrolled AK's TPM Name (nameAlg || SHA-256 of its TPMT_PUBLIC). The OID is under
2.25 (ITU-T X.667: an arc derived from a random UUID), which needs no registration."""

DEVICE_URN_PREFIX: Final = "urn:keyfleet:device:"
PROOF_VERSION: Final = 1
MAX_CERT_SIZE: Final = 16 * 1024
MAX_PROOF_SIZE: Final = 4 * 1024
MEMO_SIZE: Final = 4096
SHA256_NAME_SIZE: Final = 2 + 32
_MAX_CHAIN_DEPTH: Final = 4

LEAF_ATTRIBUTES: Final = int(
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.DECRYPT
)
AK_ATTRIBUTES: Final = int(
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
)
_PROOF_FIELDS: Final = frozenset({"v", "ak", "pub", "attest", "sig"})


# -- the AK-name extension ----------------------------------------------------------------------


def ak_name_extension(name: bytes) -> x509.UnrecognizedExtension:
    """The AK-name extension for a certificate builder (``add_extension(ext, critical=False)``)."""
    _check_ak_name(name, "cred.decode")
    return x509.UnrecognizedExtension(AK_NAME_OID, b"\x04" + bytes([len(name)]) + name)


def _check_ak_name(name: bytes, check: str) -> None:
    if len(name) != SHA256_NAME_SIZE or int.from_bytes(name[:2], "big") != TPM2_ALG.SHA256:
        raise ProtocolError(check, "an AK name is a 34-byte SHA-256 TPM Name")


_EXTENSIONS_TAG: Final = 0xA3  # tbsCertificate's [3] EXPLICIT Extensions


def _der_header(der: bytes, at: int, end: int) -> tuple[int, int, int]:
    """The (tag, content start, content end) of the DER element at ``der[at]``, which must end
    by ``end`` (single-byte tags, definite lengths); ``ValueError`` otherwise."""
    if at + 2 > end:
        raise ValueError("truncated DER element")
    tag, size = der[at], der[at + 1]
    at += 2
    if size & 0x80:
        count = size & 0x7F
        if not 0 < count <= 4 or at + count > end:
            raise ValueError("bad DER length")
        size = int.from_bytes(der[at : at + count], "big")
        at += count
    if at + size > end:
        raise ValueError("DER element past its end")
    return tag, at, at + size


def _der_items(der: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """The (tag, content start, content end) of each DER element in ``der[start:end]``;
    ``ValueError`` if they do not tile it exactly."""
    items = []
    at = start
    while at < end:
        item = _der_header(der, at, end)
        items.append(item)
        at = item[2]
    return items


def _oid_der(oid: x509.ObjectIdentifier) -> bytes:
    """The content octets of an OBJECT IDENTIFIER (X.690 8.19)."""
    arcs = [int(a) for a in oid.dotted_string.split(".")]
    out = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        rest = arc >> 7
        chunk = [arc & 0x7F]
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        out += bytes(reversed(chunk))
    return bytes(out)


_AK_NAME_OID_TLV: Final = b"\x06" + bytes([len(_oid_der(AK_NAME_OID))]) + _oid_der(AK_NAME_OID)


def _ak_name_of(cert_der: bytes) -> bytes | None:
    """The AK name the AK-name extension of a certificate (DER that ``cryptography`` parsed
    already) carries, None if it has none. Only that extension is read: the others are not
    decoded into objects (``Certificate.extensions`` decodes every extension, about 15 µs)."""
    try:
        _, cert_start, cert_end = _der_header(cert_der, 0, len(cert_der))
        _, tbs_start, tbs_end = _der_header(cert_der, cert_start, cert_end)
        found: list[bytes] = []
        oid = _AK_NAME_OID_TLV
        for tag, start, end in _der_items(cert_der, tbs_start, tbs_end):
            if tag != _EXTENSIONS_TAG:
                continue
            ((_, list_start, list_end),) = _der_items(cert_der, start, end)
            for _, ext_start, ext_end in _der_items(cert_der, list_start, list_end):
                if cert_der[ext_start : ext_start + len(oid)] != oid:
                    continue  # another extension (its OID first, by the DER that parsed)
                fields = _der_items(cert_der, ext_start, ext_end)
                value_tag, value_start, value_end = fields[-1]
                if value_tag != 0x04 or len(fields) not in (2, 3):
                    raise ValueError("not an extension")
                found.append(cert_der[value_start:value_end])
    except ValueError:
        raise ProtocolError("cred.decode", "the certificate's extensions do not decode") from None
    if not found:
        return None
    if len(found) > 1:
        raise ProtocolError("cred.decode", "several AK-name extensions")
    der = found[0]
    if len(der) < 2 or der[0] != 0x04 or der[1] != len(der) - 2:
        raise ProtocolError("cred.decode", "AK-name extension is not a DER OCTET STRING")
    name = der[2:]
    _check_ak_name(name, "cred.decode")
    return name


# -- DevID certificates -------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifiedDevice:
    """What a validated DevID certificate says: the device id, its DevID public key as a 65-byte
    SEC1 uncompressed point, and its enrolled AK's TPM Name (None if the certificate has none)."""

    device_id: str
    signature_key: bytes
    ak_name: bytes | None


@dataclass(frozen=True)
class CheckedCertificate:
    """A validated DevID certificate (``CredentialVerifier.check``): what it says, its public key
    as an object, and the times between which its whole path validates (its certificates'
    validity and an anchor's end of acceptance)."""

    device: VerifiedDevice
    key: ec.EllipticCurvePublicKey
    not_before: int
    not_after: int


def device_id_from_subjects(subjects: Sequence[x509.GeneralName] | None) -> str:
    """The device id of exactly one ``urn:keyfleet:device:<id>`` URI among the SAN entries."""
    urns = [
        s.value
        for s in subjects or ()
        if isinstance(s, x509.UniformResourceIdentifier) and s.value.startswith(DEVICE_URN_PREFIX)
    ]
    if len(urns) != 1:
        raise ProtocolError(
            "cred.device-id", f"{len(urns)} keyfleet device URNs in the subjectAltName, need 1"
        )
    device_id = urns[0][len(DEVICE_URN_PREFIX) :]
    if ID_PATTERN.fullmatch(device_id) is None:
        raise ProtocolError("cred.device-id", "the device URN does not hold a valid device id")
    return device_id


def _devid_key_usage(_policy: Policy, _cert: x509.Certificate, usage: x509.KeyUsage) -> None:
    if not usage.digital_signature or usage.key_cert_sign:
        raise ValueError("a DevID key usage is digitalSignature and never keyCertSign")


def _ee_policy() -> ExtensionPolicy:
    # The web-PKI end-entity profile (clientAuth EKU, checked by the client verifier; not a CA)
    # with two changes: keyUsage must be present with digitalSignature (a DevID key signs
    # leaves and key packages), and the subjectAltName may be absent for path validation, so that
    # a certificate without the device URN is refused as such (``cred.device-id``) rather than
    # as an anonymous path failure.
    return (
        ExtensionPolicy.webpki_defaults_ee()
        .require_present(x509.KeyUsage, Criticality.AGNOSTIC, _devid_key_usage)
        .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
    )


class CredentialVerifier:
    """Validates DevID certificates against the device CA(s) ``anchors`` (trust anchors, as the
    device got them at enrollment). ``intermediates``: CA certificates between an anchor and the
    devices' issuing CA, if the device CA is not itself an anchor. ``ends``: anchor DER -> the
    last second (unix) a path to that anchor is accepted (a device CA that a trust bundle keeps
    only until a time, ``agent.protocol.trust``); later such a path fails with ``cred.chain``.

    ``verify`` remembers up to ``memo_size`` certificates it accepted (LRU, keyed by the DER), so
    a tree of N leaves costs N path validations once; a remembered certificate is still checked
    against ``now`` (the validity window of its whole chain) on every call."""

    def __init__(
        self,
        anchors: Sequence[x509.Certificate],
        *,
        intermediates: Sequence[x509.Certificate] = (),
        ends: Mapping[bytes, int] | None = None,
        memo_size: int = MEMO_SIZE,
    ) -> None:
        if not anchors:
            raise ValueError("a credential verifier needs at least one trust anchor")
        self._store = Store(list(anchors))
        self._ends = dict(ends or {})
        self._intermediates = list(intermediates)
        self._memo: OrderedDict[bytes, CheckedCertificate] = OrderedDict()
        self._memo_size = memo_size
        self.memo_hits = 0
        # the anchors' ends by certificate (not by its DER, encoded again per leaf), and the
        # last path validator built (for one ``now``: a batch's leaves share it)
        self._anchor_ends = {
            a: self._ends[a.public_bytes(serialization.Encoding.DER)]
            for a in anchors
            if a.public_bytes(serialization.Encoding.DER) in self._ends
        }
        self._built: tuple[int, ClientVerifier] | None = None

    def __repr__(self) -> str:
        return f"CredentialVerifier({len(self._memo)} remembered)"

    def verify(self, cert_der: bytes, now: int) -> VerifiedDevice:
        """The device a DevID certificate names, once its path validates at ``now`` (unix
        seconds). Raises ``ProtocolError`` (``cred.*``)."""
        return self.check(cert_der, now).device

    def check(self, cert_der: bytes, now: int) -> CheckedCertificate:
        """``verify``, with the certificate's key object and the validity window of its path (for
        a caller that remembers the result itself)."""
        if type(cert_der) is not bytes or not 0 < len(cert_der) <= MAX_CERT_SIZE:
            raise ProtocolError("cred.decode", "a DevID certificate is 1 to 16 KiB of DER")
        memo = self._memo.get(cert_der)
        if memo is not None and memo.not_before <= now <= memo.not_after:
            self._memo.move_to_end(cert_der)
            self.memo_hits += 1
            return memo
        entry = self._verify_uncached(cert_der, now)
        self._memo[cert_der] = entry
        self._memo.move_to_end(cert_der)
        while len(self._memo) > self._memo_size:
            self._memo.popitem(last=False)
        return entry

    def _verifier_at(self, now: int) -> ClientVerifier:
        """The path validator at ``now`` (the same store, depth and policies at every time)."""
        if self._built is None or self._built[0] != now:
            verifier = (
                PolicyBuilder()
                .store(self._store)
                .time(datetime.fromtimestamp(now, UTC))
                .max_chain_depth(_MAX_CHAIN_DEPTH)
                .extension_policies(
                    ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=_ee_policy()
                )
                .build_client_verifier()
            )
            self._built = (now, verifier)
        return self._built[1]

    def _verify_uncached(self, cert_der: bytes, now: int) -> CheckedCertificate:
        try:
            cert = load_certificate(cert_der)
        except (ValueError, x509.InvalidVersion):  # a version field outside 1..3 raises the latter
            raise ProtocolError("cred.decode", "the DevID certificate does not decode") from None
        try:
            verified = self._verifier_at(now).verify(cert, self._intermediates)
        except VerificationError as exc:
            raise ProtocolError("cred.chain", f"DevID certificate path: {exc}") from None
        end = self._anchor_ends.get(verified.chain[-1])  # a path ends at one of the anchors
        if end is not None and now > end:
            raise ProtocolError(
                "cred.chain", f"DevID certificate path: its device CA is accepted only until {end}"
            )
        device_id = device_id_from_subjects(verified.subjects)
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise ProtocolError("cred.key", "the DevID key is not an ECDSA P-256 key")
        point = key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        device = VerifiedDevice(
            device_id=device_id, signature_key=point, ak_name=_ak_name_of(cert_der)
        )
        return CheckedCertificate(
            device=device,
            key=key,
            not_before=max(int(c.not_valid_before_utc.timestamp()) for c in verified.chain),
            not_after=min(
                [int(c.not_valid_after_utc.timestamp()) for c in verified.chain]
                + ([] if end is None else [end])
            ),
        )


# -- TPM residency of a leaf key ---------------------------------------------------------------


def _tpm2b(area: bytes) -> bytes:
    return len(area).to_bytes(2, "big") + area


def _tpmt(public: bytes) -> bytes:
    """The TPMT_PUBLIC inside a marshalled TPM2B_PUBLIC."""
    if len(public) < 2 or int.from_bytes(public[:2], "big") != len(public) - 2:
        raise ProtocolError("tpm.proof.decode", "not a marshalled TPM2B_PUBLIC")
    return public[2:]


def signature_to_tpmt(der: bytes) -> bytes:
    """A DER ECDSA-SHA256 signature (what ``TPMStore.certify`` and pyca return) as the marshalled
    TPMT_SIGNATURE the TPM produced."""
    r, s = decode_dss_signature(der)
    ecdsa = TPMS_SIGNATURE_ECC(
        hash=TPM2_ALG.SHA256,
        signatureR=r.to_bytes(32, "big"),
        signatureS=s.to_bytes(32, "big"),
    )
    sig = TPMT_SIGNATURE(sigAlg=TPM2_ALG.ECDSA, signature=TPMU_SIGNATURE(ecdsa=ecdsa))
    return bytes(sig.marshal())


def _signature_from_tpmt(data: bytes) -> bytes:
    try:
        parsed, consumed = TPMT_SIGNATURE.unmarshal(data)
    except Exception:  # tpm2-pytss raises several types for bad input
        raise ProtocolError("tpm.proof.decode", "TPMT_SIGNATURE does not decode") from None
    if consumed != len(data):
        raise ProtocolError("tpm.proof.decode", "trailing bytes after TPMT_SIGNATURE")
    if parsed.sigAlg != TPM2_ALG.ECDSA or parsed.signature.ecdsa.hash != TPM2_ALG.SHA256:
        raise ProtocolError("tpm.proof.signature", "the signature is not ECDSA-SHA256")
    r = bytes(parsed.signature.ecdsa.signatureR)
    s = bytes(parsed.signature.ecdsa.signatureS)
    if not (0 < len(r) <= 32 and 0 < len(s) <= 32):
        raise ProtocolError("tpm.proof.decode", "ECDSA r or s of a wrong size")
    return encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big"))


def tpm_proof_from_certify(ak_public: bytes, leaf_public: bytes, attestation: Attestation) -> bytes:
    """The TPM-residency proof (CBOR ``{"v":1, "ak", "pub", "attest", "sig"}``) of a TPM2_Certify
    of a leaf key by the AK, made with qualifying data ``SHA-256(leaf point)``.
    ``ak_public`` and ``leaf_public`` are marshalled TPM2B_PUBLIC (``TPMKey.public_area``); the
    proof holds their TPMT_PUBLIC, the TPMS_ATTEST and the TPMT_SIGNATURE."""
    return cbor.encode(
        {
            "v": PROOF_VERSION,
            "ak": _tpmt(ak_public),
            "pub": _tpmt(leaf_public),
            "attest": attestation.attest,
            "sig": signature_to_tpmt(attestation.signature),
        }
    )


def leaf_qualifying_data(leaf_point: bytes) -> bytes:
    """The qualifying data of a leaf's certify: SHA-256 of its 65-byte SEC1 point."""
    return hashlib.sha256(leaf_point).digest()


def _decode_proof(proof: bytes) -> Mapping[str, bytes]:
    if type(proof) is not bytes or len(proof) > MAX_PROOF_SIZE:
        raise ProtocolError("tpm.proof.decode", "a TPM proof is at most 4 KiB of bytes")
    try:
        value = cbor.decode(proof, max_size=MAX_PROOF_SIZE)
    except ProtocolError as exc:
        raise ProtocolError("tpm.proof.decode", f"not CBOR ({exc.check})") from None
    if not isinstance(value, dict) or set(value) != _PROOF_FIELDS:
        raise ProtocolError("tpm.proof.decode", "not a map of v, ak, pub, attest, sig")
    if value["v"] != PROOF_VERSION or type(value["v"]) is not int:
        raise ProtocolError("tpm.proof.decode", f"unknown proof version {value['v']!r}")
    fields = {k: v for k, v in value.items() if k != "v"}
    if any(type(v) is not bytes for v in fields.values()):
        raise ProtocolError("tpm.proof.decode", "ak, pub, attest and sig are byte strings")
    return fields


def _reraise_parse(exc: ProtocolError) -> ProtocolError:
    if exc.check == "tpm.attest.parse":
        return ProtocolError("tpm.proof.decode", exc.reason)
    return exc


def verify_tpm_residency(proof: bytes, leaf_point: bytes, ak_name: bytes) -> None:
    """Check that ``proof`` shows the leaf key ``leaf_point`` (65-byte SEC1) resident in the TPM
    of the AK named ``ak_name`` (from the device's DevID certificate): a TPM2_Certify by that AK,
    over SHA-256(leaf point), of a fixedTPM/fixedParent/sensitiveDataOrigin decrypt-only P-256
    key whose point is ``leaf_point``. Raises ``ProtocolError`` (``tpm.proof.*``,
    ``tpm.attest.magic``/``type``/``nonce``); returns nothing."""
    fields = _decode_proof(proof)
    ak_public, leaf_public = _tpm2b(fields["ak"]), _tpm2b(fields["pub"])
    try:
        if tpm_name(ak_public) != ak_name:
            raise ProtocolError("tpm.proof.ak", "the AK is not the one the certificate names")
        if object_attributes(ak_public) & AK_ATTRIBUTES != AK_ATTRIBUTES:
            raise ProtocolError("tpm.proof.ak", "the AK is not a restricted fixedTPM signing key")
        ak_key = public_key_from_area(ak_public)
    except ProtocolError as exc:
        if exc.check == "tpm.public.key":
            raise ProtocolError("tpm.proof.ak", "the AK is not an ECC P-256 key") from None
        raise _reraise_parse(exc) from None
    signature = _signature_from_tpmt(fields["sig"])
    try:
        ak_key.verify(signature, fields["attest"], ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise CryptoError("tpm.proof.signature", "the AK signature does not verify") from None
    try:
        attest = parse_attest(fields["attest"])
        if attest.type != TPM2_ST.ATTEST_CERTIFY:
            raise ProtocolError("tpm.attest.type", "the attestation is not a certify")
        leaf_name = tpm_name(leaf_public)
        attributes = object_attributes(leaf_public)
        leaf_key = public_key_from_area(leaf_public)
    except ProtocolError as exc:
        if exc.check == "tpm.public.key":
            raise ProtocolError("tpm.proof.key", "the leaf is not an ECC P-256 key") from None
        raise _reraise_parse(exc) from None
    if bytes(attest.attested.certify.name) != leaf_name:
        raise ProtocolError("tpm.proof.name", "the certified object is not this leaf public area")
    if attributes & LEAF_ATTRIBUTES != LEAF_ATTRIBUTES or attributes & (
        TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.RESTRICTED
    ):
        raise ProtocolError(
            "tpm.proof.attributes",
            "the leaf is not a fixedTPM, fixedParent, TPM-generated decrypt-only key",
        )
    point = leaf_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    if point != leaf_point:
        raise ProtocolError("tpm.proof.key", "the certified key is not the leaf key")
    if bytes(attest.extraData) != leaf_qualifying_data(leaf_point):
        raise ProtocolError("tpm.attest.nonce", "the certify is not over SHA-256 of the leaf key")
