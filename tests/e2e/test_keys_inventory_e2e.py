"""``keyfleet keys list --json`` and the expiry gauges against a running deployment: ``keyfleet
serve`` on a SQLite file with its signing, device CA and audit checkpoint keys in a SoftHSM2
token, Mosquitto, and devices registered with DevID certificates of different lifetimes. The
token keys are listed with their token, slot and label, and fingerprints computed here from the
certificates and public keys (not through the inventory's code); device certificates come by
expiry; the metrics endpoint serves the gauges with the values the certificates say.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import urllib.request
from datetime import UTC, datetime, timedelta

import pkcs11
import pytest
from cryptography.hazmat.primitives import serialization
from sqlalchemy.orm import Session

from firmware_sim.softhsm import SoftToken
from provisioning import pki
from provisioning.registry import DeviceState, Registry, cert_fingerprint
from tests.fixtures.deployment import DeployFactory
from tests.service_deployment import (
    CHECKPOINT_KEY_LABEL,
    DEVICE_CA_KEY_LABEL,
    SIGNING_KEY_LABEL,
    keyfleet,
)

pytestmark = pytest.mark.e2e
DAY = 86_400
REFRESH = 5  # [metrics] expiry_refresh_seconds
# device -> (hours of validity, state); dev-lost is revoked: out of the gauges. Within the
# deployment's device CA's two days (a leaf never outlives its issuer).
DEVICES = {
    "dev-40h": (40, DeviceState.ACTIVE),
    "dev-lost": (3, DeviceState.REVOKED),
    "dev-10h": (10, DeviceState.ACTIVE),
    "dev-25h": (25, DeviceState.REGISTERED),
}


def spki_sha256(public: object) -> str:
    assert hasattr(public, "public_bytes")
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def sample(text: str, name: str) -> float | None:
    match = re.search(rf"^{re.escape(name)} (-?[0-9.e+]+)$", text, re.M)
    return None if match is None else float(match.group(1))


def test_keys_list_and_expiry_gauges_with_a_token(
    deploy: DeployFactory, softhsm_token: SoftToken
) -> None:
    deployment = deploy(
        "keys",
        ready=b"keyfleet serve: ready",
        token=softhsm_token,
        audit_checkpoint=True,
        metrics=True,
        expiry_refresh_seconds=REFRESH,
    )
    files = deployment.pki
    now = datetime.now(UTC)
    t = int(now.timestamp())
    certs = {
        name: pki.issue_devid_cert(
            files.device_ca,
            pki.generate_key().public_key(),
            device_id=name,
            hardware_serial=f"SN-{name}",
            now=now,
            valid_for=timedelta(hours=hours),
        )
        for name, (hours, _state) in DEVICES.items()
    }

    def register(session: Session) -> None:
        registry = Registry(session)
        for i, (name, cert) in enumerate(certs.items()):
            registry.register_device(
                name, ek_cert_fingerprint=f"{i + 1:064x}",
                devid_cert_pem=pki.cert_to_pem(cert).decode(), now=t,
            )  # fmt: skip
            state = DEVICES[name][1]
            if state is not DeviceState.REGISTERED:
                registry.set_device_state(name, state, reason="test", now=t)

    deployment.read(register)

    # ---- keyfleet keys list --json -----------------------------------------------------------
    listed = keyfleet("keys", "list", "--config", str(deployment.config), "--json",
                      cwd=deployment.workdir)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    by_kind = {r["kind"]: r for r in rows if r["scope"] == "fleet"}
    lib = pkcs11.lib(str(softhsm_token.module))
    slot = lib.get_token(token_label=softhsm_token.label).slot.slot_id
    signing_cert = pki.cert_from_pem(files.signing_cert.read_bytes())
    assert files.checkpoint_pub is not None
    checkpoint_public = serialization.load_pem_public_key(files.checkpoint_pub.read_bytes())
    expected = {
        "service-signing": (SIGNING_KEY_LABEL, spki_sha256(signing_cert.public_key())),
        "device-ca": (DEVICE_CA_KEY_LABEL, spki_sha256(files.device_ca.certificate.public_key())),
        "audit-checkpoint": (CHECKPOINT_KEY_LABEL, spki_sha256(checkpoint_public)),
    }
    for kind, (label, fingerprint) in expected.items():
        row = by_kind[kind]
        assert row["problem"] is None, row
        assert (row["token"], row["slot"], row["label"]) == (softhsm_token.label, slot, label)
        assert row["key"] == f"token {softhsm_token.label!r} slot {slot}"
        assert row["fingerprint"] == fingerprint, kind
        assert row["algorithm"] == "EC secp256r1" and row["state"] == "active"
    assert by_kind["service-signing"]["cert_fingerprint"] == cert_fingerprint(signing_cert)
    device_ca_not_after = int(files.device_ca.certificate.not_valid_after_utc.timestamp())
    assert by_kind["device-ca"]["not_after"] == device_ca_not_after
    assert by_kind["audit-checkpoint"]["not_after"] is None  # a key without a certificate
    # the service's TLS key is a file
    assert by_kind["service-tls"]["key"].startswith("file ")
    devices = [r for r in rows if r["scope"] == "device"]
    assert [r["name"] for r in devices] == ["dev-lost", "dev-10h", "dev-25h", "dev-40h"]
    assert [r["not_after"] for r in devices] == [
        int(certs[r["name"]].not_valid_after_utc.timestamp()) for r in devices
    ]
    assert devices[0]["state"] == "compromised" and devices[1]["state"] == "active"
    assert "PRIVATE" not in listed.stdout and softhsm_token.pin() not in listed.stdout

    # ---- the gauges, once a refresh has read the new devices -----------------------------------
    port = deployment.metrics_ports["a"]
    deadline = time.monotonic() + 6 * REFRESH + 30
    text = scrape(port)
    while sample(text, 'keyfleet_device_certs_expiring{within="30d"}') != 3:
        assert time.monotonic() < deadline, text
        time.sleep(1)
        text = scrape(port)
    scraped = int(time.time())
    nearest_live = int(certs["dev-10h"].not_valid_after_utc.timestamp())
    device_gauge = sample(text, "keyfleet_device_cert_expiry_seconds")
    assert device_gauge is not None and abs(device_gauge - (nearest_live - scraped)) <= 5
    ca_gauge = sample(text, 'keyfleet_fleet_cert_expiry_seconds{kind="device-ca"}')
    assert ca_gauge is not None and abs(ca_gauge - (device_ca_not_after - scraped)) <= 5
    signing_not_after = int(signing_cert.not_valid_after_utc.timestamp())
    signing_gauge = sample(text, 'keyfleet_fleet_cert_expiry_seconds{kind="service-signing"}')
    assert signing_gauge is not None and abs(signing_gauge - (signing_not_after - scraped)) <= 5
    refreshed = sample(text, "keyfleet_expiry_refreshed_timestamp_seconds")
    assert refreshed is not None and t <= refreshed <= scraped
