"""Firmware releases a device may unseal its state under: signed PCR policies and their bundle
(docs/releases.md).

The device's state key is sealed with TPM2_PolicyAuthorize: the TPM accepts any PCR policy that
the fleet's **release-signing key** signed, so an approved firmware update (new kernel, new
agent, new PCR values) keeps the state openable, and an unapproved image does not. For each
approved release the fleet signs one **release policy**:

- ``approved`` = the PolicyPCR digest of the release's expected PCR values (computed here in
  software, from a zero policy digest, exactly as the TPM computes it in a policy session),
- ``sig`` = ECDSA P-256/SHA-256 over ``approved || ref(g)``: what TPM2_VerifySignature checks
  before TPM2_PolicyAuthorize (``authorize_digest`` is the digest the TPM verifies).

``ref(g)`` binds each signature to the fleet's **release generation** ``g``. Revoking a release
(or expiring an old one) moves ``g`` on and re-signs the releases still approved; a device that
learns the new generation re-seals its state key under ``ref(g+1)`` (a state rotation: the
state counter moves, so the blob sealed under ``ref(g)`` is dead). From then on no policy signed
for an earlier generation, the revoked release's included, satisfies the TPM. This needs no NV
index beyond the state counter: an ordinary or bit-field NV index could be undefined and defined
again by anyone with the (empty) owner authorization, the counter cannot go back.

The **bundle** is what devices receive (retained on ``agent.protocol.topics.RELEASES_TOPIC``):
every approved release's policy, the generation, a sequence number that grows with every change,
and the revoked versions, as deterministic CBOR signed as a COSE_Sign1 by the release key::

    {"v": 2, "seq": n, "generation": g, "time": t, "releases": [entry, ...], "revoked": [str],
     "certs": [operator certificate DER, ...]}
    entry = {"version": str, "pcrs": [int, ...], "pcr_digest": 32 B, "approved": 32 B, "sig": 64 B,
             "proof": {"manifest": bytes, "req": bytes, "approvals": [[cert index, sig], ...]}}

``proof`` (format version 2) is the operators' approval of the release: the canonical manifest,
whose replay gives ``pcrs``/``pcr_digest``, and the ``release.approve`` Authorization whose
subject binds the version and the manifest's SHA-256, split into its request bytes and its
approvals, each naming its operator certificate by index in ``certs`` (ascending, each once,
each named by some approval: the same few operators approve every release, so each certificate
travels once). It is absent for a release the service imported from its golden measurements. A
device checks it with ``agent.protocol.releaseproof`` (``release.approval``), since the release
key alone is the service's. Version 1 bundles (no proofs, no ``certs``) are still read; version
2 is written.

``pcr_digest`` is SHA-256 of the expected PCR values in ascending PCR order (TPM2_PolicyPCR's
``pcrDigest``). A device opens a bundle with ``open_bundle`` (signature, strict decoding, every
entry's digest and signature re-checked), refuses an older one with ``check_newer`` and picks the
entry its live PCRs match with ``match``.

Pure: no I/O, no clock. Refusals are ``ProtocolError`` with ``release.*`` check ids:
``release.malformed``, ``release.signature``, ``release.policy``, ``release.stale`` (and
``release.approval`` from ``agent.protocol.releaseproof``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from agent.protocol.errors import CryptoError, ProtocolError
from agent.protocol.eventlog import (
    PCR_COUNT,
    MeasurementEvent,
    check_version,
    extend,
)
from agent.protocol.mls import codec
from agent.protocol.releaseproof import ReleaseProof, decode_certs, encode_certs
from agent.protocol.wire import cose

__all__ = [
    "MAX_BUNDLE",
    "ReleaseBundle",
    "ReleaseEntry",
    "authorize_digest",
    "check_newer",
    "expected_pcrs",
    "key_name",
    "make_entry",
    "match",
    "open_bundle",
    "pcr_digest",
    "policy_authorize",
    "policy_pcr",
    "policy_ref",
    "release_key_public_area",
    "sign_bundle",
]

VERSION: Final = 2
"""Format written; version 1 (entries without proofs) is still read."""
READ_VERSIONS: Final = frozenset({1, VERSION})
REF_LABEL: Final = b"keyfleet release policy v1\x00"
MAX_RELEASES: Final = 64
"""Approved releases a bundle carries at most (a fleet runs a handful at once)."""
MAX_REVOKED: Final = 1024
MAX_BUNDLE: Final = 192 * 1024
"""64 releases with their proofs fit with room: ~76 KB with two approvals each, ~87 KB with four
(docs/releases.md, "Size"); the carrying message's limit is 256 KiB."""
MAX_SEQ: Final = (1 << 63) - 1
DIGEST_SIZE: Final = 32
SIGNATURE_SIZE: Final = 64
_COORD: Final = 32
_P256_ORDER: Final = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

# TPM 2.0 Part 2 constants (command codes, algorithm ids, object attributes).
TPM_CC_POLICY_PCR: Final = 0x0000017F
TPM_CC_POLICY_AUTHORIZE: Final = 0x0000016A
_ALG_ECC: Final = 0x0023
_ALG_SHA256: Final = 0x000B
_ALG_NULL: Final = 0x0010
_ALG_ECDSA: Final = 0x0018
_ECC_NIST_P256: Final = 0x0003
_ATTR_USERWITHAUTH: Final = 0x00000040
_ATTR_SIGN_ENCRYPT: Final = 0x00040000
_PCR_SELECT_BYTES: Final = 3


def _malformed(reason: str) -> ProtocolError:
    return ProtocolError("release.malformed", reason)


# -- TPM policy digests, in software ------------------------------------------------------------


def policy_ref(generation: int) -> bytes:
    """The policyRef every release policy of ``generation`` is signed with."""
    if type(generation) is not int or not 0 <= generation <= MAX_SEQ:
        raise _malformed(f"generation {generation!r} out of range")
    return REF_LABEL + generation.to_bytes(8, "big")


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def _check_pcrs(pcrs: Iterable[int]) -> tuple[int, ...]:
    indices = tuple(pcrs)
    if (
        not indices
        or any(type(i) is not int or not 0 <= i < PCR_COUNT for i in indices)
        or list(indices) != sorted(set(indices))
    ):
        raise _malformed(f"PCR selection {list(indices)} must be ascending, unique, in 0..23")
    return indices


def pcr_selection(pcrs: Iterable[int]) -> bytes:
    """TPML_PCR_SELECTION (one sha256 bank, 3 select bytes) of ``pcrs``, as the TPM marshals it."""
    bitmap = bytearray(_PCR_SELECT_BYTES)
    for index in _check_pcrs(pcrs):
        bitmap[index // 8] |= 1 << (index % 8)
    return _u32(1) + _u16(_ALG_SHA256) + bytes([_PCR_SELECT_BYTES]) + bytes(bitmap)


def pcr_digest(pcrs: Sequence[int], values: Mapping[int, bytes]) -> bytes:
    """SHA-256 of the values of ``pcrs`` in ascending order (PolicyPCR's pcrDigest)."""
    digest = hashlib.sha256()
    for index in _check_pcrs(pcrs):
        value = values.get(index)
        if type(value) is not bytes or len(value) != DIGEST_SIZE:
            raise _malformed(f"no 32-byte value for PCR {index}")
        digest.update(value)
    return digest.digest()


def policy_pcr_from_digest(
    pcrs: Sequence[int], digest: bytes, previous: bytes = bytes(32)
) -> bytes:
    """TPM2_PolicyPCR's update of ``previous`` for ``pcrs`` holding values of SHA-256 ``digest``."""
    return hashlib.sha256(
        previous + _u32(TPM_CC_POLICY_PCR) + pcr_selection(pcrs) + digest
    ).digest()


def policy_pcr(pcrs: Sequence[int], values: Mapping[int, bytes]) -> bytes:
    """The policy digest of PolicyPCR alone (from a zero digest) for ``values``: a release's
    ``approved`` policy."""
    return policy_pcr_from_digest(pcrs, pcr_digest(pcrs, values))


def policy_authorize(name: bytes, ref: bytes) -> bytes:
    """The policy digest TPM2_PolicyAuthorize leaves (from any digest: it resets it): the value a
    sealed object's authPolicy starts from."""
    first = hashlib.sha256(bytes(32) + _u32(TPM_CC_POLICY_AUTHORIZE) + name).digest()
    return hashlib.sha256(first + ref).digest()


def authorize_digest(approved: bytes, generation: int) -> bytes:
    """aHash = SHA-256(approvedPolicy || policyRef): the digest TPM2_VerifySignature checks the
    release signature over."""
    return hashlib.sha256(approved + policy_ref(generation)).digest()


def release_key_public_area(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """The marshalled TPMT_PUBLIC with which a device loads the release key (LoadExternal in
    the owner hierarchy: PolicyAuthorize refuses a ticket of the NULL hierarchy): an
    ECDSA-SHA256 P-256 verification key, no policy. Its name is ``key_name``; the sealed state
    names the key by it, so both sides must build exactly these bytes."""
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise _malformed("the release key must be an EC P-256 public key")
    numbers = public_key.public_numbers()
    x = numbers.x.to_bytes(_COORD, "big")
    y = numbers.y.to_bytes(_COORD, "big")
    return (
        _u16(_ALG_ECC)
        + _u16(_ALG_SHA256)
        + _u32(_ATTR_SIGN_ENCRYPT | _ATTR_USERWITHAUTH)
        + _u16(0)  # authPolicy: empty
        + _u16(_ALG_NULL)  # symmetric: none
        + _u16(_ALG_ECDSA)
        + _u16(_ALG_SHA256)  # scheme: ECDSA with SHA-256
        + _u16(_ECC_NIST_P256)
        + _u16(_ALG_NULL)  # kdf: none
        + _u16(_COORD)
        + x
        + _u16(_COORD)
        + y
    )


def key_name(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """The TPM name of the release key: nameAlg || SHA-256(TPMT_PUBLIC)."""
    area = release_key_public_area(public_key)
    return _u16(_ALG_SHA256) + hashlib.sha256(area).digest()


def expected_pcrs(events: Iterable[MeasurementEvent]) -> dict[int, bytes]:
    """The PCR values a boot that measures ``events`` in order leaves, from the reset state."""
    values: dict[int, bytes] = {}
    for event in events:
        values[event.pcr] = extend(values.get(event.pcr, bytes(DIGEST_SIZE)), event.digest)
    return dict(sorted(values.items()))


# -- signatures ---------------------------------------------------------------------------------


def _raw_signature(der: bytes) -> bytes:
    r, s = decode_dss_signature(der)
    return r.to_bytes(_COORD, "big") + s.to_bytes(_COORD, "big")


def _verify_raw(public_key: ec.EllipticCurvePublicKey, signature: bytes, message: bytes) -> bool:
    r = int.from_bytes(signature[:_COORD], "big")
    s = int.from_bytes(signature[_COORD:], "big")
    if not (0 < r < _P256_ORDER and 0 < s < _P256_ORDER):
        return False
    try:
        public_key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


# -- the bundle ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseEntry:
    """One approved release's signed PCR policy."""

    version: str
    pcrs: tuple[int, ...]
    pcr_digest: bytes
    approved: bytes
    sig: bytes
    proof: ReleaseProof | None = None

    def __post_init__(self) -> None:
        if self.proof is not None and not isinstance(self.proof, ReleaseProof):
            raise _malformed("proof must be a ReleaseProof")
        try:
            check_version(self.version)
        except ProtocolError as exc:
            raise _malformed(f"release version: {exc.reason}") from None
        if type(self.pcrs) is not tuple:
            raise _malformed("pcrs must be a tuple")
        _check_pcrs(self.pcrs)
        for name in ("pcr_digest", "approved"):
            value = getattr(self, name)
            if type(value) is not bytes or len(value) != DIGEST_SIZE:
                raise _malformed(f"{name} must be {DIGEST_SIZE} bytes")
        if type(self.sig) is not bytes or len(self.sig) != SIGNATURE_SIZE:
            raise _malformed(f"sig must be {SIGNATURE_SIZE} bytes (r || s)")

    def to_obj(self, certs: Sequence[bytes] = ()) -> dict[str, object]:
        """The entry's map; its proof's approvals name certificates of the bundle's ``certs``."""
        obj: dict[str, object] = {
            "version": self.version,
            "pcrs": list(self.pcrs),
            "pcr_digest": self.pcr_digest,
            "approved": self.approved,
            "sig": self.sig,
        }
        if self.proof is not None:  # present only with a value: one entry, one encoding
            obj["proof"] = self.proof.to_obj(certs)
        return obj

    @classmethod
    def from_obj(
        cls,
        value: object,
        what: str,
        *,
        certs: Sequence[bytes] | None = None,
        used: set[int] | None = None,
    ) -> ReleaseEntry:
        """``certs``: the bundle's certificate table (None: a version 1 bundle, no proofs);
        the indices the proof names are added to ``used``."""
        keys = {"version", "pcrs", "pcr_digest", "approved", "sig"}
        if certs is not None and isinstance(value, dict) and "proof" in value:
            keys.add("proof")
        obj = _map(value, what, keys)
        pcrs = obj["pcrs"]
        if type(pcrs) is not list or len(pcrs) > PCR_COUNT:
            raise _malformed(f"{what}.pcrs: expected an array of at most {PCR_COUNT} PCRs")
        if type(obj["version"]) is not str:
            raise _malformed(f"{what}.version: expected text")
        proof = None
        if "proof" in obj:
            assert certs is not None
            proof = ReleaseProof.from_obj(
                obj["proof"], f"{what}.proof", certs, set() if used is None else used
            )
        return cls(
            obj["version"],
            tuple(pcrs),
            obj["pcr_digest"],  # type: ignore[arg-type]
            obj["approved"],  # type: ignore[arg-type]
            obj["sig"],  # type: ignore[arg-type]
            proof,
        )

    def check(self, public_key: ec.EllipticCurvePublicKey, generation: int) -> None:
        """``approved`` really is the PolicyPCR digest of ``pcrs``/``pcr_digest``
        (``release.policy``) and ``sig`` is the release key's over it and ``ref(generation)``
        (``release.signature``): what the TPM will check, checked first in software."""
        if policy_pcr_from_digest(self.pcrs, self.pcr_digest) != self.approved:
            raise ProtocolError(
                "release.policy",
                f"release {self.version}: its approved policy is not the PolicyPCR digest of "
                "its PCRs",
            )
        message = self.approved + policy_ref(generation)
        if not _verify_raw(public_key, self.sig, message):
            raise CryptoError(
                "release.signature",
                f"release {self.version}: its policy is not signed by the release key for "
                f"generation {generation}",
            )


def make_entry(
    version: str,
    values: Mapping[int, bytes],
    generation: int,
    key: ec.EllipticCurvePrivateKey,
    proof: ReleaseProof | None = None,
) -> ReleaseEntry:
    """Sign the PCR policy of a release whose boot leaves ``values`` (``expected_pcrs``);
    ``proof``: the operators' approval it carries (``agent.protocol.releaseproof``)."""
    pcrs = tuple(sorted(values))
    digest = pcr_digest(pcrs, values)
    approved = policy_pcr_from_digest(pcrs, digest)
    der = key.sign(approved + policy_ref(generation), ec.ECDSA(hashes.SHA256()))
    return ReleaseEntry(version, pcrs, digest, approved, _raw_signature(der), proof)


@dataclass(frozen=True)
class ReleaseBundle:
    """Every approved release's signed policy, at one sequence number and generation."""

    seq: int
    generation: int
    time: int
    releases: tuple[ReleaseEntry, ...]
    revoked: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("seq", "generation", "time"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= MAX_SEQ:
                raise _malformed(f"{name} out of range")
        if type(self.releases) is not tuple or len(self.releases) > MAX_RELEASES:
            raise _malformed(f"at most {MAX_RELEASES} releases")
        versions = [r.version for r in self.releases]
        if len(set(versions)) != len(versions):
            raise _malformed("a release version is listed twice")
        if type(self.revoked) is not tuple or len(self.revoked) > MAX_REVOKED:
            raise _malformed(f"at most {MAX_REVOKED} revoked versions")
        for version in self.revoked:
            if type(version) is not str:
                raise _malformed("revoked versions must be text")
            check_version(version)
        if set(self.revoked) & set(versions):
            raise _malformed("a release is both approved and revoked")

    def to_obj(self) -> dict[str, object]:
        certs = encode_certs(r.proof for r in self.releases)
        return {
            "v": VERSION,
            "seq": self.seq,
            "generation": self.generation,
            "time": self.time,
            "releases": [r.to_obj(certs) for r in self.releases],
            "revoked": list(self.revoked),
            "certs": certs,
        }

    def encode(self) -> bytes:
        return codec.encode(self.to_obj())

    @classmethod
    def decode(cls, data: bytes) -> ReleaseBundle:
        try:
            value = codec.decode(data, MAX_BUNDLE, "release bundle")
        except ProtocolError as exc:
            raise _malformed(f"release bundle is not deterministic CBOR ({exc.check})") from None
        keys = {"v", "seq", "generation", "time", "releases", "revoked"}
        version = value.get("v") if isinstance(value, dict) else None
        obj = _map(value, "bundle", keys | {"certs"} if version == VERSION else keys)
        if type(obj["v"]) is not int or obj["v"] not in READ_VERSIONS:
            raise _malformed(f"bundle version {obj['v']!r} is not one of {sorted(READ_VERSIONS)}")
        certs = decode_certs(obj["certs"], "certs") if "certs" in obj else None
        used: set[int] = set()
        releases = obj["releases"]
        revoked = obj["revoked"]
        if type(releases) is not list or len(releases) > MAX_RELEASES:
            raise _malformed(f"releases: expected an array of at most {MAX_RELEASES}")
        if type(revoked) is not list or len(revoked) > MAX_REVOKED:
            raise _malformed(f"revoked: expected an array of at most {MAX_REVOKED}")
        entries = tuple(
            ReleaseEntry.from_obj(item, f"releases[{i}]", certs=certs, used=used)
            for i, item in enumerate(releases)
        )
        if certs is not None and len(used) != len(certs):
            raise _malformed("certs: a certificate no approval names")
        return cls(obj["seq"], obj["generation"], obj["time"], entries, tuple(revoked))  # type: ignore[arg-type]

    def version(self, name: str) -> ReleaseEntry | None:
        return next((r for r in self.releases if r.version == name), None)


def _map(value: object, what: str, keys: set[str]) -> dict[str, object]:
    try:
        return codec.as_map(value, what, frozenset(keys))
    except ProtocolError as exc:
        raise _malformed(exc.reason) from None


def sign_bundle(
    *,
    seq: int,
    generation: int,
    time: int,
    releases: Iterable[tuple[str, Mapping[int, bytes]]],
    revoked: Iterable[str] = (),
    key: ec.EllipticCurvePrivateKey,
    proofs: Mapping[str, ReleaseProof] | None = None,
) -> bytes:
    """The COSE_Sign1 bundle of ``releases`` (version, expected PCR values), each policy signed
    for ``generation``, the whole signed by ``key`` (the release-signing key); ``proofs``: the
    operators' approval of each release by version (a release without one carries none)."""
    found = proofs or {}
    entries = tuple(make_entry(v, values, generation, key, found.get(v)) for v, values in releases)
    bundle = ReleaseBundle(seq, generation, time, entries, tuple(revoked))
    return cose.sign1(bundle.encode(), key)


def open_bundle(data: bytes, public_key: ec.EllipticCurvePublicKey) -> ReleaseBundle:
    """Verify and decode a bundle: the release key's COSE signature over the whole
    (``release.signature``), strict decoding (``release.malformed``) and each entry's policy and
    signature (``release.policy``, ``release.signature``)."""
    try:
        message = cose.decode_sign1(data, max_size=MAX_BUNDLE)
    except ProtocolError as exc:
        raise _malformed(f"release bundle is not a COSE_Sign1 ({exc.check})") from None
    try:
        cose.verify_sign1(message, public_key)
    except ProtocolError as exc:
        raise CryptoError(
            "release.signature", f"the bundle is not signed by the release key ({exc.check})"
        ) from None
    bundle = ReleaseBundle.decode(message.payload)
    for entry in bundle.releases:
        entry.check(public_key, bundle.generation)
    return bundle


def check_newer(held: ReleaseBundle | None, new: ReleaseBundle) -> None:
    """Refuse a bundle that is not newer than the one held (``release.stale``): an older or the
    same sequence number (a replay), or an older generation (policies a revocation retired)."""
    if held is None:
        return
    if new.generation < held.generation or new.seq <= held.seq:
        raise ProtocolError(
            "release.stale",
            f"bundle seq {new.seq} generation {new.generation} is not newer than the held "
            f"seq {held.seq} generation {held.generation}",
        )


def match(bundle: ReleaseBundle, live: Mapping[int, bytes]) -> ReleaseEntry | None:
    """The release whose expected PCR values the ``live`` PCRs hold (None: an unapproved image).
    ``live`` must hold every PCR an entry selects; one missing is no match."""
    for entry in bundle.releases:
        if all(i in live for i in entry.pcrs) and pcr_digest(entry.pcrs, live) == entry.pcr_digest:
            return entry
    return None
