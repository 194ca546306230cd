"""The broker CA rolled over with every part real (``firmware_sim.lab``: ``keyagent run`` on
swtpm, Mosquitto with mutual TLS, ``keyfleet serve`` on SQLite).

``keyfleet keys rotate broker-ca --new-ca`` by an admin (no key: the broker's PKI keeps it): the
agents take the bundle, write the broker CAs it accepts to ``broker-cas.pem`` in their state
directory and reconnect with it. Then the operator's steps (docs/operations.md, "Rolling over the
broker CA"): the service's and the operators' CA file gets the new CA, the broker a server
certificate of the new CA and a restart. The agents reconnect to it (their configured ``[broker]
ca`` alone would refuse it) and ack a rekey; an agent restarted meanwhile uses the file too.

Then the operator CA (docs/operations.md, "Rolling over the operator CA"): the broker's client
``cafile`` gets the new operator CA, ``keyfleet keys rotate operator-ca`` by an admin of the old
CA hands the agents bundle 2, an operator of the new CA is added through the quorum and creates
a group: each agent checks that Authorization under the bundle's operator CAs (its configured
``operator_anchors`` alone would refuse it) and joins."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from firmware_sim.lab import Identity, Lab, LabDevice
from provisioning import pki

pytestmark = pytest.mark.e2e

LAB_OPTIONS = {"devices": 2, "ack_timeout": 15}
G = "gbr"


@pytest.fixture(scope="module")
def lab(fleet_lab: Lab) -> Lab:
    return fleet_lab


def _wait(what: str, done: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def _trust_seq(device: LabDevice) -> int | None:
    trust = (device.status() or {}).get("trust")
    return trust.get("seq") if isinstance(trust, dict) else None


def _rekey_acked_by_all(lab: Lab) -> None:
    result = lab.op("rekey", "--group", G, timeout=120)
    assert result.returncode == 0, str(result)
    final = result.final
    assert final is not None and final["status"] == "done", str(result)
    assert (final["acked"], final["pending"]) == (len(lab.devices), 0), str(result)


def test_agents_follow_a_broker_ca_rollover_to_a_broker_of_the_new_ca(lab: Lab) -> None:
    assert lab.pki is not None and lab.broker is not None
    created = lab.op("group", "create", G, "--members", *lab.device_ids, timeout=120)
    assert created.returncode == 0, str(created)
    lab.wait_settled(G, timeout=60)

    now = datetime.now(UTC) - timedelta(minutes=5)
    new_ca = pki.create_ca("keyfleet lab TLS CA 2", now=now, valid_for=timedelta(days=30))
    cert_file = lab.service_config.parent / "broker-ca-2.pem"
    pki.write_certificate(cert_file, new_ca.certificate)
    rotated = lab.keyfleet(
        "keys", "rotate", "broker-ca", "--new-ca", str(cert_file), "--overlap", "3600",
        operator="op-admin", timeout=120,
    )  # fmt: skip
    out = rotated.stdout + rotated.stderr
    assert rotated.returncode == 0, out
    assert "broker CA: CN=keyfleet lab TLS CA 2" in out and "trust bundle: 1" in out, out
    old_pem = lab.pki.tls_ca.read_bytes()
    new_pem = pki.cert_to_pem(new_ca.certificate)
    for device in lab.devices:
        _wait(f"{device.name} to take bundle 1", lambda d=device: _trust_seq(d) == 1, 60)
        path = device.state_dir / "broker-cas.pem"  # the agent's state directory
        _wait(f"{device.name}'s broker CA file", path.exists, 30)
        data = path.read_bytes()
        assert old_pem.strip() in data and new_pem.strip() in data
        # its configured [broker] ca (identity/broker-ca.pem) is the old CA alone
        assert new_pem.strip() not in (device.state_dir / "identity" / "broker-ca.pem").read_bytes()
        log = device.agent_log.read_text(errors="replace")
        assert "the trust bundle changed the broker CAs: reconnecting with them" in log
        lab.wait_agent(device)

    # the operator's steps: the service and the operators trust the new CA too (the service
    # reads its [broker] ca at start), then the broker gets a certificate of the new CA
    with lab.pki.tls_ca.open("ab") as ca_file:
        ca_file.write(new_pem)
    lab.stop_service()
    lab.start_service()
    key = pki.generate_key()
    server = pki.issue_server_cert(
        new_ca, key.public_key(), common_name="mosquitto", dns_names=["localhost"],
        ip_addresses=["127.0.0.1"], now=now, valid_for=timedelta(days=30),
    )  # fmt: skip
    pki.write_certificate(lab.broker.server_cert_file, server)
    pki.write_private_key(lab.broker.server_key_file, key)
    lab.broker.restart()

    # the agents reconnect to a broker their configured [broker] ca alone would refuse
    restarted = lab.devices[1]
    lab.reboot(restarted)  # a fresh agent builds its client from the state's bundle
    for device in lab.devices:
        lab.wait_agent(device, timeout=90)
    _rekey_acked_by_all(lab)
    for device in lab.devices:
        status = device.status() or {}
        assert not any(k.startswith("trust.") for k in status.get("rejections", {})), status

    _operator_ca_rollover(lab)


def _operator_ca_rollover(lab: Lab) -> None:
    """Bundle 2 after the broker CA's bundle 1: the operator CA, then a group created by an
    operator of the new CA only."""
    assert lab.pki is not None and lab.broker is not None
    now = datetime.now(UTC) - timedelta(minutes=5)
    new_ca = pki.create_ca("keyfleet lab operator CA 2", now=now, valid_for=timedelta(days=30))
    cert_file = lab.service_config.parent / "operator-ca-2.pem"
    pki.write_certificate(cert_file, new_ca.certificate)
    # the broker accepts operators of the new CA before anything else (its client cafile)
    with lab.broker.client_ca_file.open("ab") as ca_file:
        ca_file.write(pki.cert_to_pem(new_ca.certificate))
    lab.broker.restart()
    for device in lab.devices:
        lab.wait_agent(device, timeout=90)
    rotated = lab.keyfleet(
        "keys", "rotate", "operator-ca", "--new-ca", str(cert_file), "--overlap", "3600",
        operator="op-admin", timeout=120,
    )  # fmt: skip
    out = rotated.stdout + rotated.stderr
    assert rotated.returncode == 0, out
    assert "operator CA: CN=keyfleet lab operator CA 2" in out and "trust bundle: 2" in out, out
    for device in lab.devices:
        _wait(f"{device.name} to take bundle 2", lambda d=device: _trust_seq(d) == 2, 60)

    # an operator of the new CA, added through the quorum (the admin's certificate is of the
    # old CA, accepted during the overlap)
    key = pki.generate_key()
    cert = pki.issue_client_cert(
        new_ca, key.public_key(), identity="op-newops", role="operator", now=now,
        valid_for=timedelta(days=30),
    )  # fmt: skip
    directory = lab.service_config.parent
    identity = Identity("op-newops", directory / "op-newops.pem", directory / "op-newops.key")
    pki.write_certificate(identity.cert, cert)
    pki.write_private_key(identity.key, key)
    added = lab.keyfleet(
        "operator", "add", "op-newops", "--operator-cert", str(identity.cert),
        operator="op-admin", timeout=120,
    )  # fmt: skip
    assert added.returncode == 0, added.stdout + added.stderr
    operators = lab.pki.operators
    assert isinstance(operators, dict)
    operators["op-newops"] = identity
    # its group creation: every agent verifies the approval under the new CA and joins
    created = lab.op(
        "group", "create", "gop2", "--members", *lab.device_ids, operator="op-newops", timeout=120
    )
    assert created.returncode == 0, str(created)
    lab.wait_settled("gop2", timeout=60)
    for device in lab.devices:
        status = device.status() or {}
        assert not any(k.startswith(("trust.", "authz.")) for k in status.get("rejections", {})), (
            status
        )
