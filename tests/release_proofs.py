"""Releases the operators approved, for tests of the device side without a running service: a
release's canonical manifest (``provisioning.releases``, two components: a kernel measured into
PCR 4 whose digest depends on the version, an agent in PCR 9 that does not), its expected PCR
values, and the ``release.approve`` Authorization the test operators (``tests.operator_certs``)
sign for it, bundled as the ``ReleaseProof`` a bundle entry carries."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol import authz as az
from agent.protocol.release import ReleaseBundle, make_entry, sign_bundle
from agent.protocol.releaseproof import ReleaseProof, subject
from provisioning import releases as model
from tests.operator_certs import operator

APPROVED_AT = 1_650_000_000
"""When the test approvals were made (T0 of the core tests is later: they are old requests)."""


def manifest(version: str, *, kernel: str | None = None) -> model.Manifest:
    """Release ``version``: its kernel's digest is SHA-256 of ``kernel`` (the version by
    default), its agent's the same in every release."""
    return model.Manifest(
        version,
        (
            model.Component(
                "kernel", version, 4, hashlib.sha256((kernel or version).encode()).digest()
            ),
            model.Component("agent", "1", 9, hashlib.sha256(b"agent").digest()),
        ),
    )


def pcrs(version: str) -> dict[int, bytes]:
    """The PCR values a device booted into ``version`` shows."""
    return model.expected_pcrs(manifest(version))


def approve(
    version: str,
    manifest_sha256: bytes,
    *,
    approvers: Sequence[str] = ("op-alice",),
    op: str = az.OP_RELEASE_APPROVE,
    nbf: int = APPROVED_AT,
) -> bytes:
    """The operators' Authorization of ``op`` for the release (``version``, manifest digest)."""
    request = az.Request(
        id=os.urandom(az.REQUEST_ID_SIZE),
        op=op,
        group=None,
        members=(),
        policy=None,
        nbf=nbf,
        exp=nbf + 600,
        by=approvers[0] if approvers else "op-alice",
        subject=subject(version, manifest_sha256),
    ).encode()
    approvals = tuple(az.sign_approval(request, *operator(name)) for name in approvers)
    return az.Authorization(request, approvals).encode()


def proof(
    version: str,
    *,
    approvers: Sequence[str] = ("op-alice",),
    of: model.Manifest | None = None,
) -> ReleaseProof:
    """Release ``version``'s manifest (``of``, or ``manifest(version)``) and its approval by
    ``approvers``."""
    found = manifest(version) if of is None else of
    return ReleaseProof(found.canonical, approve(version, found.sha256, approvers=approvers))


class ReleaseSigner:
    """The service side in miniature, for the TPM tests of sealed state: the release key, the
    images (PCR values) it approves by version, and the bundles it would sign (entries without
    operator proofs: the TPM checks only the release key's signature)."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.images: dict[str, dict[int, bytes]] = {}
        self.seq = 0

    def bundle(self, generation: int, versions: Sequence[str]) -> ReleaseBundle:
        self.seq += 1
        entries = tuple(make_entry(v, self.images[v], generation, self.key) for v in versions)
        return ReleaseBundle(
            seq=self.seq, generation=generation, time=1000 + self.seq, releases=entries
        )

    def signed(self, generation: int, versions: Sequence[str]) -> bytes:
        self.seq += 1
        return sign_bundle(
            seq=self.seq,
            generation=generation,
            time=1000 + self.seq,
            releases=[(v, self.images[v]) for v in versions],
            key=self.key,
        )
