"""The operators' approval of a release, as a device checks it (docs/releases.md, "The operators'
approval").

The release key signs the bundle, but the release key sits with the service; what makes a
release approved is the operators' quorum request ``release.approve`` (``agent.protocol.authz``),
whose ``subject`` binds the release's version and the SHA-256 of its canonical manifest
(``subject``). Each bundle entry of an operator-approved release carries a **proof**: that
Authorization and the canonical manifest. A device checks (``check_entry``):

- the Authorization verifies with the operator CA and the quorum policy the device holds, as a
  ``release.approve`` (the caller's ``ApprovalCheck``: the same verifier, policy and historical
  time as the revocation feed's entries, ``agent.protocol.membership``);
- its subject names exactly the entry's version and the SHA-256 of the manifest carried;
- the manifest is canonical and its components, replayed from zero in boot order, give exactly
  the entry's PCR selection and ``pcr_digest`` (``approved`` follows from those:
  ``ReleaseEntry.check``).

**Time.** The request's window (``exp``) closes weeks after the approval, a release lives for
years: the Authorization is judged historically (``now=None``: no window check; each operator
certificate must have been valid during the request's window), exactly as the revocation feed's
old entries are. What retires a release is its revocation (a generation bump), not its age.

**Verified once.** An entry whose version, PCRs and proof are those of the same entry in the
bundle the device already holds was verified when that bundle was taken; it is not judged again
(``check_bundle``), so a quorum policy raised later does not retire releases approved before it
(as the feed keeps revocations verified under an older policy).

**Entries without a proof** (releases the service imported from its golden measurements on its
first start; bundles of format version 1) are taken only in the first bundle a device takes,
and later only while the held bundle has the same entry (same version, PCRs and digest). A
release added to a bundle after that must carry a proof.

Every refusal is ``ProtocolError("release.approval", ...)``; the reason names the release and,
for an Authorization that does not verify, its ``authz.*`` check. Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING, Final

from agent.protocol import authz as az
from agent.protocol.errors import ProtocolError
from agent.protocol.eventlog import DIGEST_SIZE, PCR_COUNT, check_version, extend
from agent.protocol.mls import codec

if TYPE_CHECKING:
    from agent.protocol.release import ReleaseBundle, ReleaseEntry

__all__ = [
    "APPROVAL",
    "MAX_MANIFEST",
    "SUBJECT_LABEL",
    "ApprovalCheck",
    "ReleaseProof",
    "check_bundle",
    "check_entry",
    "decode_certs",
    "encode_certs",
    "manifest_pcrs",
    "read_subject",
    "subject",
]

APPROVAL: Final = "release.approval"
SUBJECT_LABEL: Final = "keyfleet release v1"
"""First field of a release request's subject: its bytes mean nothing in another protocol."""
MAX_MANIFEST: Final = 64 * 1024
"""Largest manifest (``provisioning.releases`` refuses a larger one when it is added)."""
MAX_PROOF_AUTHZ: Final = 64 * 1024
"""Largest Authorization a bundle entry carries (a request and a few approvals: ~1.3 KB for two
approvals, of which the certificates go to the bundle's table)."""
MAX_CERTS: Final = 256
"""Distinct operator certificates a bundle's table holds at most."""
_COMPONENT_KEYS: Final = frozenset({"name", "version", "pcr", "sha256"})

ApprovalCheck = Callable[[bytes], az.VerifiedAuthorization]
"""Verify a ``release.approve`` Authorization (fleet-wide, historically) under the device's
quorum policy; raises ``ProtocolError`` (``authz.*``) when it does not verify."""


def _refused(reason: str) -> ProtocolError:
    return ProtocolError(APPROVAL, reason)


def _malformed(reason: str) -> ProtocolError:
    return ProtocolError("release.malformed", reason)


def subject(version: str, manifest_sha256: bytes) -> bytes:
    """What a ``release.approve`` / ``release.revoke`` request binds: the exact release."""
    return codec.encode([SUBJECT_LABEL, version, manifest_sha256])


def read_subject(data: bytes) -> tuple[str, bytes]:
    """(version, manifest SHA-256) of a subject; ``release.subject`` if it is not one."""
    try:
        decoded = codec.decode(data, 1024, "release subject")
    except ProtocolError:
        decoded = None
    if (
        not isinstance(decoded, list)
        or len(decoded) != 3
        or decoded[0] != SUBJECT_LABEL
        or type(decoded[1]) is not str
        or type(decoded[2]) is not bytes
        or len(decoded[2]) != DIGEST_SIZE
    ):
        raise ProtocolError("release.subject", "not a release subject")
    return decoded[1], decoded[2]


@dataclass(frozen=True)
class ReleaseProof:
    """What a bundle entry carries to show the operators approved it: the canonical manifest
    and the ``release.approve`` Authorization (bytes as the service keeps them: deterministic
    CBOR, so they are the same bytes after a trip through a bundle).

    In a bundle the Authorization is split (``to_obj``): its request and, for each approval,
    the signature and the index of the operator's certificate in the bundle's ``certs`` table,
    since the same few operators approve every release (``encode_certs``, ``from_obj``)."""

    manifest: bytes = field(repr=False)
    authz: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if type(self.manifest) is not bytes or not 0 < len(self.manifest) <= MAX_MANIFEST:
            raise _malformed(f"proof.manifest: 1..{MAX_MANIFEST} bytes")
        if type(self.authz) is not bytes or not 0 < len(self.authz) <= MAX_PROOF_AUTHZ:
            raise _malformed(f"proof.authz: 1..{MAX_PROOF_AUTHZ} bytes")
        if self.parts().encode() != self.authz:
            raise _malformed("proof.authz: not a deterministic Authorization")

    def parts(self) -> az.Authorization:
        """The Authorization, decoded (``release.malformed`` if it does not decode)."""
        try:
            return az.Authorization.decode(self.authz)
        except ProtocolError as exc:
            raise _malformed(f"proof.authz: [{exc.check}] {exc.reason}") from None

    def to_obj(self, certs: Sequence[bytes]) -> dict[str, object]:
        """``{"manifest", "req", "approvals": [[index in certs, sig], ...]}``."""
        index = {cert: i for i, cert in enumerate(certs)}
        parts = self.parts()
        return {
            "manifest": self.manifest,
            "req": parts.request,
            "approvals": [[index[a.cert], a.sig] for a in parts.approvals],
        }

    @classmethod
    def from_obj(
        cls, value: object, what: str, certs: Sequence[bytes], used: set[int]
    ) -> ReleaseProof:
        """A proof of a bundle entry whose approvals name certificates of ``certs`` (the
        indices it names are added to ``used``)."""
        try:
            obj = codec.as_map(value, what, frozenset({"manifest", "req", "approvals"}))
            manifest = codec.as_bytes(obj["manifest"], f"{what}.manifest", 1, MAX_MANIFEST)
            request = codec.as_bytes(obj["req"], f"{what}.req", 1, MAX_PROOF_AUTHZ)
            pairs = codec.as_list(
                obj["approvals"],
                f"{what}.approvals",
                az.MAX_APPROVALS,
                lambda v, w: codec.as_list(v, w, 2, lambda x, y: x, min_len=2),
            )
        except ProtocolError as exc:
            raise _malformed(exc.reason) from None
        approvals = []
        for i, (index, sig) in enumerate(pairs):
            if type(index) is not int or not 0 <= index < len(certs) or type(sig) is not bytes:
                raise _malformed(f"{what}.approvals[{i}]: expected [certificate index, sig]")
            used.add(index)
            try:
                approvals.append(az.Approval(certs[index], sig))
            except ProtocolError as exc:
                raise _malformed(f"{what}.approvals[{i}]: {exc.reason}") from None
        try:
            authz = az.Authorization(request, tuple(approvals)).encode()
        except ProtocolError as exc:
            raise _malformed(f"{what}: {exc.reason}") from None
        return cls(manifest, authz)


def encode_certs(proofs: Iterable[ReleaseProof | None]) -> list[bytes]:
    """The bundle's certificate table: every approval certificate of ``proofs``, once,
    ascending (one table per set of proofs)."""
    return sorted({a.cert for p in proofs if p is not None for a in p.parts().approvals})


def decode_certs(value: object, what: str) -> list[bytes]:
    """A certificate table: ascending, no duplicates, at most ``MAX_CERTS``."""
    try:
        certs = codec.as_list(
            value, what, MAX_CERTS, lambda v, w: codec.as_bytes(v, w, 1, az.MAX_CERT)
        )
    except ProtocolError as exc:
        raise _malformed(exc.reason) from None
    if any(a >= b for a, b in pairwise(certs)):
        raise _malformed(f"{what}: certificates must be ascending and listed once")
    return certs


def manifest_pcrs(manifest: bytes) -> tuple[str, dict[int, bytes]]:
    """(version, expected PCR values) of a canonical manifest (``provisioning.releases``:
    sorted keys, no spaces, components in boot order); ``release.approval`` if it is not one."""
    try:
        document = json.loads(manifest.decode("utf-8"))
        canonical = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, an int past the digit limit
        raise _refused("the manifest is not JSON") from None
    if canonical != manifest:
        raise _refused("the manifest is not in its canonical form")
    if not isinstance(document, dict) or set(document) != {"version", "components"}:
        raise _refused("the manifest is not a map {version, components}")
    version, components = document["version"], document["components"]
    try:
        check_version(version)
    except ProtocolError:
        raise _refused("the manifest's version is not a version") from None
    if not isinstance(components, list) or not components:
        raise _refused("the manifest has no components")
    values: dict[int, bytes] = {}
    for i, item in enumerate(components):
        if not isinstance(item, dict) or set(item) != _COMPONENT_KEYS:
            raise _refused(f"manifest component {i} is not {{name, version, pcr, sha256}}")
        pcr, digest_hex = item["pcr"], item["sha256"]
        if type(pcr) is not int or not 0 <= pcr < PCR_COUNT:
            raise _refused(f"manifest component {i}: PCR out of range")
        if (
            type(digest_hex) is not str
            or len(digest_hex) != 2 * DIGEST_SIZE
            or digest_hex != digest_hex.lower()
        ):
            raise _refused(f"manifest component {i}: sha256 is not 64 lowercase hex digits")
        try:
            digest = bytes.fromhex(digest_hex)
        except ValueError:
            raise _refused(f"manifest component {i}: sha256 is not hex") from None
        values[pcr] = extend(values.get(pcr, bytes(DIGEST_SIZE)), digest)
    assert isinstance(version, str)
    return version, dict(sorted(values.items()))


def check_entry(entry: ReleaseEntry, check: ApprovalCheck) -> None:
    """The entry's proof shows a quorum of operators approved exactly this release and these
    PCR values; ``release.approval`` otherwise (no proof included)."""
    proof = entry.proof
    if proof is None:
        raise _refused(f"release {entry.version} carries no operators' approval")
    try:
        verified = check(proof.authz)
    except ProtocolError as exc:
        raise _refused(
            f"release {entry.version}: its approval does not verify ([{exc.check}] {exc.reason})"
        ) from None
    request = verified.request
    if request.op != az.OP_RELEASE_APPROVE or request.subject is None:
        raise _refused(f"release {entry.version}: approved by a {request.op!r} request")
    try:
        approved = read_subject(request.subject)
    except ProtocolError:
        raise _refused(f"release {entry.version}: its approval names no release") from None
    digest = hashlib.sha256(proof.manifest).digest()
    if approved != (entry.version, digest):
        raise _refused(
            f"release {entry.version}: the approval is for release {approved[0]} with manifest "
            f"{approved[1].hex()[:16]}…, not this version and manifest"
        )
    version, values = manifest_pcrs(proof.manifest)
    if version != entry.version:
        raise _refused(f"release {entry.version}: the manifest is of release {version}")
    # PolicyPCR's pcrDigest: the values in ascending PCR order (``release.pcr_digest``)
    replayed = hashlib.sha256(b"".join(values.values())).digest()
    if tuple(values) != entry.pcrs or replayed != entry.pcr_digest:
        raise _refused(
            f"release {entry.version}: its PCR policy is not the one of the approved manifest"
        )


def _same(a: ReleaseEntry, b: ReleaseEntry | None) -> bool:
    return (
        b is not None and a.pcrs == b.pcrs and a.pcr_digest == b.pcr_digest and a.proof == b.proof
    )


def check_bundle(new: ReleaseBundle, held: ReleaseBundle | None, check: ApprovalCheck) -> None:
    """Every entry of ``new`` is approved by the operators: the same entry as in ``held``
    (checked when it was taken), or one whose proof ``check_entry`` accepts; one without a proof
    only in a device's first bundle. ``release.approval`` for the first entry that is not."""
    for entry in new.releases:
        before = None if held is None else held.version(entry.version)
        if _same(entry, before):
            continue
        if entry.proof is None and held is None:
            continue  # the first bundle: the releases the service started with (docs/releases.md)
        check_entry(entry, check)
