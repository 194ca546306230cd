"""Certificate renewal end to end, every part real: Mosquitto (mutual TLS, the product ACL),
``keyfleet serve`` with ``[enrollment] certificate_validity_seconds = 120``, two
``firmware-sim device`` processes (swtpm, measured boot) whose ``keyagent run`` renew their DevID
and TLS certificates by themselves at two thirds of the lifetime, proving their keys with the
TPM (docs/attestation.md, "Certificate renewal").

A device renews while online, writes its new certificates, reconnects with the new TLS
certificate and keeps working (it acks a rekey); the registry and the audit log show the new
certificates. A device whose agent is down past its renewal point renews as soon as it is back,
before its certificates expire, and keeps working too. The refusals (stale quote, another
device's certify, unapproved release, keys that are not the device's) are shown against a real
TPM in tests/tpm/test_renewal_service.py."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from cryptography import x509

from agent.config import load_config as load_agent_config
from firmware_sim.lab import Lab, LabDevice
from provisioning import pki

pytestmark = pytest.mark.e2e

LIFETIME = 120
LAB_OPTIONS = {"devices": 2, "ack_timeout": 20, "certificate_validity": LIFETIME}
G = "g1"


@pytest.fixture(scope="module")
def lab(fleet_lab: Lab) -> Lab:
    return fleet_lab


def certificates(device: LabDevice) -> tuple[x509.Certificate, x509.Certificate]:
    """The DevID and TLS certificates as the agent's configured files hold them now."""
    config = load_agent_config(device.agent_config, require_provisioned=True)
    assert config.identity is not None
    return (
        x509.load_pem_x509_certificate(config.identity.devid_cert.path.read_bytes()),
        x509.load_pem_x509_certificate(config.identity.tls_cert.path.read_bytes()),
    )


def not_after(device: LabDevice) -> int:
    return int(min(c.not_valid_after_utc for c in certificates(device)).timestamp())


def wait_renewed(device: LabDevice, beyond: int, timeout: float) -> int:
    """Wait until the device's certificate files are valid beyond ``beyond``; their not-after."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            current = not_after(device)
        except (OSError, ValueError):  # a file between its atomic rename and our read: again
            current = beyond
        if current > beyond:
            return current
        time.sleep(0.5)
    raise AssertionError(f"{device.name}: certificates not renewed within {timeout} s")


def rekey_acked_by_all(lab: Lab) -> None:
    result = lab.op("rekey", "--group", G, timeout=120)
    assert result.returncode == 0, str(result)
    assert result.final is not None and result.final["status"] == "done", str(result)
    final = result.final
    assert (final["acked"], final["pending"], final["stragglers"]) == (len(lab.device_ids), 0, [])


def test_devices_renew_online_and_keep_working_on_the_new_certificates(lab: Lab) -> None:
    created = lab.op("group", "create", G, "--members", *lab.device_ids, timeout=120)
    assert created.returncode == 0, str(created)
    device = lab.devices[0]
    enrolled_devid, enrolled_tls = certificates(device)
    enrolled = not_after(device)

    renewed = wait_renewed(device, enrolled, timeout=LIFETIME)
    now = datetime.now(UTC).timestamp()
    assert renewed <= now + LIFETIME + 2
    devid, tls = certificates(device)
    # the same keys, re-certified by the device CA
    assert devid.public_key() == enrolled_devid.public_key()
    assert tls.public_key() == enrolled_tls.public_key()
    assert devid.serial_number != enrolled_devid.serial_number
    assert tls.serial_number != enrolled_tls.serial_number
    # the registry stores what the device holds (the renewal may have run again meanwhile)
    stored = lab.registry(lambda r: r.device(device.id).devid_cert_pem)
    assert pki.cert_from_pem(stored.encode()).public_key() == devid.public_key()
    entries = [e for e in lab.audit() if e.action == "renew.issued"]
    assert any(e.target == device.id for e in entries), entries
    # reconnected on the new TLS certificate: a rekey is acked by every member
    lab.wait_agent(device)
    rekey_acked_by_all(lab)


def test_a_device_down_past_its_renewal_point_renews_once_back(lab: Lab) -> None:
    device = lab.devices[1]
    # start right after a renewal, so the window down is the whole renewal point
    current = wait_renewed(device, not_after(device), timeout=LIFETIME)
    lab.stop_agent(device)
    # the renewal point is at 2/3 of the lifetime (backdated by a tenth for clock skew)
    issued = current - LIFETIME
    point = issued - LIFETIME // 10 + (LIFETIME + LIFETIME // 10) * 2 // 3
    time.sleep(max(0.0, point + 3 - datetime.now(UTC).timestamp()))
    assert not_after(device) == current  # nothing renewed while it was down
    lab.reboot(device)
    renewed = wait_renewed(device, current, timeout=current - datetime.now(UTC).timestamp())
    assert renewed > current
    lab.wait_agent(device)
    rekey_acked_by_all(lab)
