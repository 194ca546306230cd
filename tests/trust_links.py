"""Trust bundles and their links for tests without a running service: the service signing keys
(software keys), the ``trust.rotate`` Authorization signed by test admins of the real test
operator CA (``tests.operator_certs``: ``op-root``, and ``op-root2`` issued here), and the link
that a service signs with a key of the bundle before."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol import authz as az
from agent.protocol import trust
from provisioning.pki import issue_client_cert
from tests.operator_certs import VALID_FOR, VALID_FROM, operator, operator_ca

APPROVED_AT = 1_650_000_000
"""When the test approvals were made: before the core tests' T0, so their windows are closed
(a device judges a link historically)."""


@functools.cache
def second_admin() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """``op-root2``, a second admin of the test operator CA (a quorum of two admins)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue_client_cert(
        operator_ca(),
        key.public_key(),
        identity="op-root2",
        role="admin",
        now=VALID_FROM,
        valid_for=VALID_FOR,
    )
    return key, cert


def signer(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    return second_admin() if name == "op-root2" else operator(name)


def rotate_authz(
    bundle: bytes,
    *,
    approvers: Sequence[str] = ("op-root",),
    op: str = az.OP_TRUST_ROTATE,
    subject: bytes | None = None,
    nbf: int = APPROVED_AT,
) -> bytes:
    """The operators' ``op`` Authorization of ``bundle`` (its canonical bytes)."""
    request = az.Request(
        id=os.urandom(az.REQUEST_ID_SIZE),
        op=op,
        group=None,
        members=(),
        policy=None,
        nbf=nbf,
        exp=nbf + 600,
        by=approvers[0],
        subject=trust.subject(bundle) if subject is None else subject,
    ).encode()
    approvals = tuple(az.sign_approval(request, *signer(name)) for name in approvers)
    return az.Authorization(request, approvals).encode()


def rollover(
    held: trust.TrustBundle,
    new_key: ec.EllipticCurvePublicKey,
    signing_key: ec.EllipticCurvePrivateKey,
    *,
    until: int,
    approvers: Sequence[str] = ("op-root",),
) -> tuple[trust.TrustBundle, trust.TrustLink]:
    """The next bundle: ``new_key`` without an end, the held bundle's current key until
    ``until``; signed by ``signing_key`` and approved by ``approvers``."""
    bundle = trust.TrustBundle(
        held.seq + 1,
        (
            trust.ServiceKey(held.current.key, until),
            trust.ServiceKey(trust.key_der(new_key)),
        ),
    )
    data = bundle.encode()
    return bundle, trust.TrustLink(
        trust.sign_link(bundle, signing_key), rotate_authz(data, approvers=approvers)
    )


def other_subject(bundle: bytes) -> bytes:
    """A well-formed subject naming another bundle of the same seq (its current key another)."""
    held = trust.TrustBundle.decode(bundle)
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    keys = tuple(
        trust.ServiceKey(trust.key_der(other)) if k.until is None else k for k in held.service
    )
    return trust.subject(trust.TrustBundle(held.seq, keys).encode())
