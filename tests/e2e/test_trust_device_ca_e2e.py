"""The device CA rolled over with every part real (``firmware_sim.lab``: ``firmware-sim device``
processes with swtpm and ``keyagent run``, Mosquitto with mutual TLS, ``keyfleet serve`` on
SQLite with ``[enrollment] certificate_validity_seconds`` short enough that devices renew within
the test, the HTTPS enrollment API, the lab's key files).

The operator's step first (docs/operations.md, "Rolling over the device CA"): the new CA is
appended to the broker's ``cafile`` and the broker restarted. Then ``keyfleet keys rotate
device-ca --new-ca --new-key`` by an admin: the agents take the version 2 bundle; a rekey is
acked by the members on their old-CA certificates; a device enrolled after the rollover gets
certificates of the new CA and is added to the group by members certified by the old one; an
old device's next renewal gets new-CA certificates, it reconnects with them and keeps acking."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from agent.config import load_config as load_agent_config
from firmware_sim.lab import Lab, LabDevice
from provisioning import pki

pytestmark = pytest.mark.e2e

LIFETIME = 150
LAB_OPTIONS = {"devices": 2, "ack_timeout": 15, "certificate_validity": LIFETIME}
G = "gca"


@pytest.fixture(scope="module")
def lab(fleet_lab: Lab) -> Lab:
    return fleet_lab


def _wait(what: str, done: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _trust_seq(device: LabDevice) -> int | None:
    trust = (device.status() or {}).get("trust")
    return trust.get("seq") if isinstance(trust, dict) else None


def _certificates(device: LabDevice) -> tuple[x509.Certificate, x509.Certificate]:
    """The DevID and TLS certificates the agent's configured files hold now."""
    config = load_agent_config(device.agent_config, require_provisioned=True)
    assert config.identity is not None
    return (
        x509.load_pem_x509_certificate(config.identity.devid_cert.path.read_bytes()),
        x509.load_pem_x509_certificate(config.identity.tls_cert.path.read_bytes()),
    )


def _issued_by(device: LabDevice, ca: x509.Certificate) -> bool:
    try:
        certs = _certificates(device)
    except (OSError, ValueError):  # a file between its atomic rename and our read
        return False
    for cert in certs:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            return False
    return True


def _new_ca(lab: Lab) -> tuple[x509.Certificate, Path, Path]:
    """The custodian's new device CA (``keyfleet pki device-ca``): its key a file on the service
    host, next to the configuration (the reference is relative to it)."""
    out = lab.service_config.parent / "device-ca-2"
    made = lab.keyfleet("pki", "device-ca", str(out), "--org", "lab", "--days", "30")
    assert made.returncode == 0, str(made)
    cert_file, key_file = out.with_name("device-ca-2.pem"), out.with_name("device-ca-2.key")
    return pki.cert_from_pem(cert_file.read_bytes()), key_file, cert_file


def _rekey_acked_by_all(lab: Lab) -> None:
    result = lab.op("rekey", "--group", G, timeout=120)
    assert result.returncode == 0, str(result)
    final = result.final
    assert final is not None and final["status"] == "done", str(result)
    assert (final["acked"], final["pending"]) == (len(lab.devices), 0), str(result)


def test_the_device_ca_rolls_over_old_devices_keep_working_until_they_renew(lab: Lab) -> None:
    assert lab.pki is not None and lab.broker is not None
    old_ca = pki.cert_from_pem(lab.pki.device_ca.read_bytes())
    created = lab.op("group", "create", G, "--members", *lab.device_ids, timeout=120)
    assert created.returncode == 0, str(created)
    lab.wait_settled(G, timeout=60)

    # the operator's step before the rollover: the broker accepts client certificates of both
    new_ca, key_file, cert_file = _new_ca(lab)
    with lab.broker.client_ca_file.open("ab") as cafile:
        cafile.write(pki.cert_to_pem(new_ca))
    lab.broker.restart()
    for device in lab.devices:
        lab.wait_agent(device)

    rotated = lab.keyfleet(
        "keys", "rotate", "device-ca", "--new-ca", str(cert_file), "--new-key", key_file.name,
        operator="op-admin", timeout=120,
    )  # fmt: skip
    out = rotated.stdout + rotated.stderr
    assert rotated.returncode == 0, out
    assert f"device CA: {new_ca.subject.rfc4514_string()}" in out, out
    assert "trust bundle: 1" in out, out
    for device in lab.devices:
        _wait(f"{device.name} to take bundle 1", lambda d=device: _trust_seq(d) == 1, 60)
    # until they renew the devices hold old-CA certificates, and keep working
    assert all(_issued_by(d, old_ca) for d in lab.devices)
    _rekey_acked_by_all(lab)

    # a device enrolled now gets certificates of the new CA; members certified by the old CA
    # take its leaf (cred.chain under the bundle they hold) and it takes theirs
    newcomer = lab.add_device("d-new")
    assert _issued_by(newcomer, new_ca)
    _wait("the newcomer to take bundle 1", lambda: _trust_seq(newcomer) == 1, 60)
    added = lab.op("group", "add", G, newcomer.id, timeout=120)
    assert added.returncode == 0, str(added)
    settled = lab.wait_settled(G, timeout=90)
    assert all(_issued_by(d, old_ca) for d in lab.devices[:2])
    _rekey_acked_by_all(lab)
    lab.wait_epoch(G, settled + 1, timeout=60)

    # an old device's next renewal comes from the new CA; it reconnects with it and acks
    renewing = lab.devices[0]
    _wait(
        f"{renewing.name} to renew from the new CA",
        lambda: _issued_by(renewing, new_ca),
        LIFETIME + 60,
    )
    lab.wait_agent(renewing)
    _rekey_acked_by_all(lab)
    for device in lab.devices:
        status = device.status() or {}
        refused = {
            k: n
            for k, n in status.get("rejections", {}).items()
            if k.startswith(("trust.", "cred."))
        }
        assert not refused, (device.name, refused)
    log = lab.service_log.read_text(errors="replace")
    assert "trust bundle 1: the service uses its new device CA" in log
