"""Operators for tests that drive membership changes without a running service: one test
operator CA per test process (``provisioning.pki``, the issuer code the fleet uses), operators
``op-alice``, ``op-bob``, ``op-carol`` (role operator), ``op-root`` and ``op-dora`` (admin),
Authorizations they sign (``authorize``), and a device's ``Membership`` trusting them and
``tests.device_certs``' device CA."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol import authz as az
from agent.protocol.membership import Membership
from provisioning.pki import CertificateAuthority, create_ca, issue_client_cert
from tests.device_certs import device_ca

# valid from 2020 for 20 years: tests run cores at fixed times (T0 = 2023) and at the wall clock
VALID_FROM = datetime(2020, 1, 1, tzinfo=UTC)
VALID_FOR = timedelta(days=20 * 365)
ROLES = {
    "op-alice": "operator",
    "op-bob": "operator",
    "op-carol": "operator",
    "op-root": "admin",
    "op-dora": "admin",
}


@functools.cache
def operator_ca() -> CertificateAuthority:
    return create_ca("keyfleet test operator CA", now=VALID_FROM, valid_for=VALID_FOR)


@functools.cache
def operator(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue_client_cert(
        operator_ca(),
        key.public_key(),
        identity=name,
        role=ROLES[name],
        now=VALID_FROM,
        valid_for=VALID_FOR,
    )
    return key, cert


def authorize(
    op: str,
    group: str | None,
    members: Sequence[tuple[str, bytes]],
    *,
    approvers: Sequence[str] = ("op-alice",),
    now: int | None = None,
    lifetime: int = 3600,
    policy: az.QuorumPolicy | None = None,
    subject: bytes | None = None,
) -> bytes:
    """An Authorization of ``op`` on ``group`` for ``members`` ((device id, DevID point) pairs),
    approved by ``approvers``, valid from ``now`` (the wall clock by default) for ``lifetime``
    (``subject``: a replacement's groups, ``az.replace_subject``)."""
    start = int(datetime.now(UTC).timestamp()) if now is None else now
    request = az.Request(
        id=os.urandom(az.REQUEST_ID_SIZE),
        op=op,
        group=group,
        members=tuple(az.Member.of(d, point) for d, point in members),
        policy=None if policy is None else policy.encode(),
        nbf=start - 60,
        exp=start + lifetime,
        by=approvers[0] if approvers else "op-alice",
        subject=subject,
    ).encode()
    approvals = tuple(az.sign_approval(request, *operator(name)) for name in approvers)
    return az.Authorization(request, approvals).encode()


def membership(*, min_approvals: int = 1, require_tpm: bool = False) -> Membership:
    """A device's trust in the test CAs. ``require_tpm=False`` only where the device's keys are
    software keys that cannot prove TPM residency (pure tests of other things)."""
    return Membership(
        device_cas=(device_ca().certificate,),
        operator_cas=(operator_ca().certificate,),
        min_approvals=min_approvals,
        require_tpm=require_tpm,
    )
