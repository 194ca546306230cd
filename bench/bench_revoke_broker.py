"""Time until the broker refuses a revoked device, and what the restart costs the others.

Not a test: prints a JSON list of records to stdout (progress to stderr).

The parts are the product's: Mosquitto 2.0.11 (``firmware_sim.broker.Mosquitto``, mutual TLS,
persistence, ``crlfile``) restarted on each change of its CRL file as the systemd path unit
does (``Mosquitto.watch_crl``), the device CA's CRL built and written by
``provisioning.revocation`` (``build_crl``, ``write_broker_crl``), and ``CLIENTS`` devices
connected with persistent sessions through ``agent.mqtt.MqttClient`` (the agent's client, with
its reconnect backoff). Timed, ``ROUNDS`` times: from the CRL file's write to the first refused
TLS handshake + CONNECT of the revoked certificate (``time_to_refusal``), and from the write to
the moment every other client is connected again (``reconnect_all``).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from agent.mqtt import MqttClient
from firmware_sim.broker import Mosquitto
from provisioning import pki, revocation
from tests.broker.test_attacks_revoke_broker import REVOKED_ALERT, mqtt_connect

CLIENTS = 20
ROUNDS = 5


def _issue(ca: pki.CertificateAuthority, name: str, role: str, d: Path) -> tuple[Path, Path, int]:
    key = pki.generate_key()
    cert = pki.issue_client_cert(
        ca, key.public_key(), identity=name, role=role, now=datetime.now(UTC),
        valid_for=timedelta(days=1),
    )  # fmt: skip
    pki.write_certificate(d / f"{name}.pem", cert)
    pki.write_private_key(d / f"{name}.key", key)
    return d / f"{name}.pem", d / f"{name}.key", cert.serial_number


def run(directory: Path) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    stamp = int(now.timestamp())
    broker_ca = pki.create_ca("bench broker CA", now=now, valid_for=timedelta(days=1))
    device_ca = pki.create_ca("bench device CA", now=now, valid_for=timedelta(days=1))
    pki.write_certificate(directory / "ca.pem", broker_ca.certificate)
    server_key = pki.generate_key()
    pki.write_certificate(
        directory / "server.pem",
        pki.issue_server_cert(
            broker_ca, server_key.public_key(), common_name="mosquitto",
            dns_names=["localhost"], ip_addresses=["127.0.0.1"], now=now,
            valid_for=timedelta(days=1),
        ),
    )  # fmt: skip
    pki.write_private_key(directory / "server.key", server_key)
    broker_crl = directory / "broker-ca.crl"
    broker_crl.write_bytes(
        revocation.build_crl(
            broker_ca, [], number=1, this_update=stamp - 60, next_update=stamp + 86400
        ).public_bytes(serialization.Encoding.PEM)
    )
    settings = revocation.RevocationSettings(device_ca, directory / "crl.pem", (broker_crl,))
    revoked: list[tuple[int, int]] = []

    def publish(number: int) -> None:
        crl = revocation.build_crl(
            device_ca, revoked, number=number, this_update=stamp, next_update=stamp + 86400
        )
        revocation.write_broker_crl(settings, crl)

    publish(1)
    probe = _issue(broker_ca, "keyfleet-probe", "service", directory)
    broker = Mosquitto(
        directory / "broker",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        ca_file=directory / "ca.pem",
        client_ca_certs=(broker_ca.certificate, device_ca.certificate),
        log_types=("error", "warning"),
        probe=(probe[0], probe[1]),
        crl_file=settings.crl_file,
    )
    broker.start()
    broker.watch_crl()
    clients = []
    try:
        for i in range(CLIENTS):
            cert, key, _ = _issue(device_ca, f"dev-{i:04d}", "device", directory)
            client = MqttClient(
                host=broker.host, port=broker.port, ca_file=directory / "ca.pem",
                cert_file=cert, key_file=key, client_id=f"dev-{i:04d}",
            )  # fmt: skip
            client.connect()
            clients.append(client)
        refusal, reconnect = [], []
        for round_ in range(ROUNDS):
            cert, key, serial = _issue(device_ca, f"dev-victim-{round_}", "device", directory)
            assert mqtt_connect(broker, cert, key, "victim") == "connack"
            revoked.append((serial, stamp))
            began = time.monotonic()
            publish(2 + round_)
            while mqtt_connect(broker, cert, key, "victim") != REVOKED_ALERT:
                time.sleep(0.005)
            refusal.append(time.monotonic() - began)
            while not all(c.connected for c in clients) or broker.crl_restarts <= round_:
                time.sleep(0.005)
            reconnect.append(time.monotonic() - began)
            print(f"round {round_}: {refusal[-1]:.3f} s, {reconnect[-1]:.3f} s", file=sys.stderr)
            time.sleep(1.0)
    finally:
        for client in clients:
            client.close()
        broker.stop()
    return [
        {"name": "revoke_time_to_refusal_median", "value": statistics.median(refusal), "unit": "s"},
        {"name": "revoke_time_to_refusal_max", "value": max(refusal), "unit": "s"},
        {"name": "revoke_reconnect_all_median", "value": statistics.median(reconnect), "unit": "s",
         "clients": CLIENTS},
        {"name": "revoke_reconnect_all_max", "value": max(reconnect), "unit": "s",
         "clients": CLIENTS},
    ]  # fmt: skip


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="kf-bench-revoke-") as tmp:
        print(json.dumps(run(Path(tmp)), indent=1))


if __name__ == "__main__":
    main()
