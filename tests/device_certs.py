"""DevID certificates for tests that build MLS KeyPackages without an enrolled device: one test
device CA per test process (``provisioning.pki``, the same issuer code the fleet uses) and a
DevID certificate for any device id and key, so every leaf carries a real credential."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning.pki import CertificateAuthority, create_ca, issue_devid_cert

VALID_FOR = timedelta(days=3650)


@functools.cache
def device_ca() -> CertificateAuthority:
    return create_ca("keyfleet test device CA", now=datetime.now(UTC), valid_for=VALID_FOR)


def devid_cert_der(device_id: bytes | str, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A DER DevID certificate from ``device_ca()`` for ``device_id`` and ``key``'s public
    key (only ``public_key()`` is called: ``key`` may be a TPM key)."""
    name = device_id.decode() if isinstance(device_id, bytes) else device_id
    cert = issue_devid_cert(
        device_ca(),
        key.public_key(),
        device_id=name,
        hardware_serial=f"SN-{name}",
        now=datetime.now(UTC),
        valid_for=VALID_FOR,
    )
    return cert.public_bytes(serialization.Encoding.DER)
