"""DevID certificates for tests that build MLS KeyPackages without an enrolled device: one test
device CA per test process (``provisioning.pki``, the same issuer code the fleet uses) and a
DevID certificate for any device id and key, so every leaf carries a real credential."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning.pki import CertificateAuthority, create_ca, issue_devid_cert

# valid from 2020 for 20 years: tests run cores at fixed times (T0 = 2023) and at the wall clock
VALID_FROM = datetime(2020, 1, 1, tzinfo=UTC)
VALID_FOR = timedelta(days=20 * 365)


@functools.cache
def device_ca() -> CertificateAuthority:
    return create_ca("keyfleet test device CA", now=VALID_FROM, valid_for=VALID_FOR)


def devid_cert_der(
    device_id: bytes | str,
    key: ec.EllipticCurvePrivateKey,
    *,
    ak_name: bytes | None = None,
    ca: CertificateAuthority | None = None,
) -> bytes:
    """A DER DevID certificate from ``ca`` (default ``device_ca()``) for ``device_id`` and
    ``key``'s public key (only ``public_key()`` is called: ``key`` may be a TPM key), naming the
    AK ``ak_name`` if given."""
    name = device_id.decode() if isinstance(device_id, bytes) else device_id
    cert = issue_devid_cert(
        device_ca() if ca is None else ca,
        key.public_key(),
        device_id=name,
        hardware_serial=f"SN-{name}",
        now=VALID_FROM,
        valid_for=VALID_FOR,
        ak_name=ak_name,
    )
    return cert.public_bytes(serialization.Encoding.DER)
