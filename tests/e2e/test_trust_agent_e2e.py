"""The service signing key's rollover with real agents (``firmware_sim.lab``: ``keyagent run`` on
swtpm, Mosquitto with TLS, ``keyfleet serve`` on SQLite, the lab's key files): the daemon takes
the retained chain, keeps the bundle in its encrypted state file across a power cycle, and follows
a rekey whose commands the service signs with the new key. A restarted service (its
configuration still naming the old key) signs with the chain's newest key."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.protocol.wire.cose import key_id
from firmware_sim.lab import Lab, LabDevice
from provisioning import pki

pytestmark = pytest.mark.e2e

LAB_OPTIONS = {"devices": 2, "ack_timeout": 10}
G = "gt"


@pytest.fixture(scope="module")
def lab(fleet_lab: Lab) -> Lab:
    return fleet_lab


def _trust_seq(device: LabDevice) -> int | None:
    status = device.status() or {}
    trust = status.get("trust")
    return trust.get("seq") if isinstance(trust, dict) else None


def _wait_seq(device: LabDevice, seq: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _trust_seq(device) != seq:
        assert time.monotonic() < deadline, (device.name, device.status())
        time.sleep(0.2)


def _new_key(lab: Lab) -> tuple[bytes, Path, Path]:
    directory = lab.service_config.parent
    key = pki.generate_key()
    now = datetime.now(UTC) - timedelta(minutes=5)
    ca = pki.create_ca("lab signing 2 CA", now=now, valid_for=timedelta(days=30))
    cert = pki.issue_client_cert(
        ca, key.public_key(), identity="keyfleet-service-signing", role="service",
        now=now, valid_for=timedelta(days=30),
    )  # fmt: skip
    pki.write_private_key(directory / "signing-2.key", key)
    pki.write_certificate(directory / "signing-2.pem", cert)
    return key_id(key.public_key()), directory / "signing-2.key", directory / "signing-2.pem"


def test_agents_follow_the_rollover_and_keep_it_across_a_power_cycle(lab: Lab) -> None:
    created = lab.op("group", "create", G, "--members", *lab.device_ids, timeout=120)
    assert created.returncode == 0, str(created)
    start = lab.wait_settled(G, timeout=60)
    kid, key_file, cert_file = _new_key(lab)
    rotated = lab.keyfleet(
        "keys", "rotate", "service-signing", "--new-cert", str(cert_file),
        "--new-key", key_file.name, "--overlap", "600", operator="op-admin", timeout=120,
    )  # fmt: skip
    assert rotated.returncode == 0, str(rotated)
    assert kid.hex() in rotated.stdout + rotated.stderr
    for device in lab.devices:
        _wait_seq(device, 1)

    # a power cycle: the bundle comes back from the encrypted state file
    away = lab.devices[1]
    lab.reboot(away)
    assert _trust_seq(away) == 1

    # the service restarted with [service] signing_key still naming the old key
    lab.stop_service()
    lab.start_service()
    log = lab.service_log.read_text(errors="replace")
    assert "signing with trust bundle 1's key" in log

    rekeyed = lab.op("rekey", "--group", G, "--service-cert", str(cert_file), timeout=120)
    assert rekeyed.returncode == 0, str(rekeyed)
    lab.wait_epoch(G, start + 1, timeout=60)
    for device in lab.devices:
        status = device.status() or {}
        assert not any(k.startswith("trust.") for k in status.get("rejections", {})), status
