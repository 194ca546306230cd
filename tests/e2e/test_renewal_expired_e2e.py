"""Certificate renewal after expiry end to end, every part real: Mosquitto (mutual TLS, it refuses
an expired client certificate), ``keyfleet serve`` with ``[enrollment]
certificate_validity_seconds = 60`` and ``[renewal] expired = "allow"`` (its HTTPS renewal
listener, server TLS only), two ``firmware-sim device`` processes (swtpm, measured boot) whose
``keyagent run`` got ``[renewal] url`` at enrollment (the station writes what the service
offers; docs/attestation.md, "Certificate renewal").

Both agents are down until their certificates expire. One comes back within
``max_expired_seconds``: the broker refuses its certificate, it renews over HTTPS by the same TPM
proofs, writes the new certificates, reconnects to Mosquitto and keeps working (it acks a
rekey); the audit log shows ``renew.expired`` accepted. The other comes back too late: it is
refused ``renew.expired``, the audit log shows the refusal, and its certificates stay expired
(it must be enrolled again). The refusals by check id (policy ``refuse``, forged, replayed,
another device's certify, malformed) are shown against a real TPM and a real listener in
tests/tpm/test_renewal_https.py."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest
from cryptography import x509

from agent.config import load_config as load_agent_config
from firmware_sim.lab import Lab, LabDevice
from provisioning.registry import Outcome

pytestmark = pytest.mark.e2e

LIFETIME = 60
WINDOW = 20  # [renewal] max_expired_seconds
LAB_OPTIONS = {
    "devices": 2,
    "ack_timeout": 20,
    "certificate_validity": LIFETIME,
    "renew_expired": WINDOW,
}
G = "g1"


@pytest.fixture(scope="module")
def lab(fleet_lab: Lab) -> Lab:
    return fleet_lab


def not_after(device: LabDevice) -> int:
    """The earlier not-after of the DevID and TLS certificates the agent's files hold now."""
    config = load_agent_config(device.agent_config, require_provisioned=True)
    assert config.identity is not None
    certs = [
        x509.load_pem_x509_certificate(path.read_bytes())
        for path in (config.identity.devid_cert.path, config.identity.tls_cert.path)
    ]
    return int(min(c.not_valid_after_utc for c in certs).timestamp())


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - datetime.now(UTC).timestamp()))


def expired_entries(lab: Lab, device: LabDevice, outcome: Outcome) -> list[dict[str, object]]:
    return [
        {"reason": e.reason, **json.loads(e.details)}
        for e in lab.audit()
        if e.action == "renew.expired" and e.target == device.id and e.outcome == outcome.value
    ]


def test_an_expired_device_renews_over_https_and_one_expired_too_long_does_not(lab: Lab) -> None:
    back, late = lab.devices
    for device in (back, late):
        lab.stop_agent(device)
        # enrollment gave the agent the listener's URL (the service's [renewal] url)
        config = load_agent_config(device.agent_config, require_provisioned=True)
        assert config.renewal.url == lab.renewal_url
    back_end, late_end = not_after(back), not_after(late)

    # within the window: the broker refuses the expired certificate, HTTPS renews it
    sleep_until(back_end + 3)
    lab.reboot(back, wait=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not_after(back) == back_end:
        time.sleep(0.5)
    renewed = not_after(back)
    assert renewed > datetime.now(UTC).timestamp() + LIFETIME - 15, (renewed, back_end)
    lab.wait_agent(back)  # reconnected to Mosquitto with the renewed TLS certificate
    (entry,) = expired_entries(lab, back, Outcome.ACCEPTED)
    assert entry["expired_at"] == back_end and 0 < int(str(entry["expired_seconds"])) <= WINDOW
    assert not any(e.action == "renew.issued" and e.target == back.id for e in lab.audit())

    # too late: refused by the policy, audited, nothing renewed
    sleep_until(late_end + WINDOW + 2)
    lab.reboot(late, wait=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not expired_entries(lab, late, Outcome.REFUSED):
        time.sleep(0.5)
    (refused, *_) = expired_entries(lab, late, Outcome.REFUSED)
    assert str(refused["reason"]).startswith("[renew.expired]"), refused
    assert "max_expired_seconds" in str(refused["reason"])
    assert not_after(late) == late_end
    assert expired_entries(lab, late, Outcome.ACCEPTED) == []

    # the renewed device keeps working: it acks a rekey of its group
    created = lab.op("group", "create", G, "--members", back.id, timeout=120)
    assert created.returncode == 0, str(created)
    result = lab.op("rekey", "--group", G, timeout=120)
    assert result.returncode == 0, str(result)
    assert result.final is not None and result.final["status"] == "done", str(result)
    assert (result.final["acked"], result.final["pending"]) == (1, 0)
