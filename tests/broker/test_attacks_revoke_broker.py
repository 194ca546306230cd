"""Revocation at the broker, over a real Mosquitto 2.0.11 (mutual TLS, the product ACL, ``crlfile``
= the file ``keyfleet serve`` writes from ``[revocation]``, restarted on each change of it as the
systemd path unit does: ``Mosquitto.watch_crl``), ``keyfleet serve`` and the operator CLI as
subprocesses, software members on the broker; the database is a SQLite file and a real
PostgreSQL.

Adversary: a revoked device, which still holds its TLS client certificate and key (valid for
years) and tries to connect as itself or under another device's client id, to read the groups'
commit topics. After ``keyfleet revoke`` it cannot complete a TLS handshake + CONNECT within
``REFUSAL_BOUND`` (docs/operations.md, "Revocation", states ~1 s and shows the measurement);
the other devices and the service reconnect after the broker's restart and keep working.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from provisioning import audit, pki, revocation
from provisioning.registry import DeviceState, Registry, create_schema, make_engine, session_factory
from tests.broker.test_service_mqtt import MemberThread
from tests.fixtures.mosquitto import BrokerFactory, BrokerPKI, MosquittoBroker
from tests.service_deployment import (
    add_operator,
    keyfleet,
    operator_args,
    service_config,
    start_serve,
    write_operator,
    write_pem,
    write_service_pki,
)
from tests.service_members import SoftDevice

pytestmark = pytest.mark.broker
DATABASE_BACKENDS = ("sqlite", "postgresql")

# Generous: the measured time from the CRL file's change to a broker that refuses the device
# is ~0.1-0.2 s (bench/bench_revoke_broker.py); the CLI's own start and the loaded test machine
# account for the rest.
REFUSAL_BOUND = 20.0
DEVICES = ("dev-a", "dev-b")
REVOKED_ALERT = "SSLV3_ALERT_CERTIFICATE_REVOKED"


def mqtt_connect(broker: MosquittoBroker, cert: Path, key: Path, client_id: str) -> str:
    """A TLS handshake and an MQTT 3.1.1 CONNECT with ``cert``: "connack" if the broker
    accepted it, else the TLS alert or error. (With TLS 1.3 the client learns of a refused
    certificate on its first read, so the CONNECT is needed to see the refusal.)"""
    context = ssl.create_default_context(cafile=str(broker.ca_file))
    context.load_cert_chain(str(cert), str(key))
    ident = client_id.encode()
    variable = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(ident).to_bytes(2, "big") + ident
    try:
        with (
            socket.create_connection((broker.host, broker.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=broker.host) as tls,
        ):
            tls.sendall(bytes([0x10, len(variable)]) + variable)
            answer = tls.recv(4)
            return "connack" if answer[:2] == b"\x20\x02" and answer[3:4] == b"\x00" else "closed"
    except ssl.SSLError as exc:
        return str(exc.reason)
    except OSError as exc:
        return type(exc).__name__


def crl_of_file(path: Path) -> x509.CertificateRevocationList:
    data = path.read_bytes()
    end = data.index(b"-----END X509 CRL-----") + len(b"-----END X509 CRL-----")
    return x509.load_pem_x509_crl(data[:end])


@dataclass
class RevokeDeployment:
    workdir: Path
    database_url: str
    broker: MosquittoBroker
    crl_file: Path
    device_ca_file: Path
    members: dict[str, MemberThread]
    files: dict[str, tuple[Path, Path]]
    admin: list[str]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return keyfleet(*args, *self.admin, cwd=self.workdir, timeout=120)

    def device_state(self, device_id: str) -> DeviceState:
        engine = make_engine(self.database_url)
        try:
            with session_factory(engine)() as session:
                return Registry(session).device(device_id).state
        finally:
            engine.dispose()

    def audit_actions(self) -> list[tuple[str, str]]:
        engine = make_engine(self.database_url)
        try:
            with session_factory(engine)() as session:
                return [(e.action, e.target) for e in audit.entries(session)]
        finally:
            engine.dispose()


@pytest.fixture
def deployment(
    tmp_path: Path, broker_pki: BrokerPKI, mosquitto_factory: BrokerFactory, database_url: str
) -> Iterator[RevokeDeployment]:
    now = datetime.now(UTC)
    device_ca = pki.create_ca("revoke device CA", now=now, valid_for=timedelta(days=2))
    operator_ca = pki.create_ca("revoke operator CA", now=now, valid_for=timedelta(days=2))
    files = tmp_path / "pki"
    files.mkdir()
    write_service_pki(files, device_ca, operator_ca)
    # The CRLs of the broker's other client CAs, which the service appends to its own.
    stamp = int(now.timestamp())
    operator_crl = files / "operator-ca.crl"
    operator_crl.write_bytes(
        revocation.build_crl(
            operator_ca, [], number=1, this_update=stamp - 60, next_update=stamp + 86400
        ).public_bytes(serialization.Encoding.PEM)
    )
    broker_crls = [broker_pki.ca_crl_file(), operator_crl]
    # The broker's crlfile exists before it starts: what ``keyfleet crl`` writes (the service's
    # first CRL, then the other client CAs' CRLs).
    crl_file = tmp_path / "broker-crl.pem"
    engine = make_engine(database_url)
    create_schema(engine)
    sessions = session_factory(engine)
    settings = revocation.RevocationSettings(device_ca, crl_file, tuple(broker_crls))
    assert revocation.write_current_crl(settings, sessions, now=stamp) == 1
    broker = mosquitto_factory(
        extra_ca_certs=(device_ca.certificate, operator_ca.certificate), crl_file=crl_file
    )
    broker.watch_crl()
    service_files = broker_pki.client("keyfleet-service", role="service")
    config = tmp_path / "keyfleet.toml"
    config.write_text(
        service_config(
            db_url=database_url,
            broker=broker,
            client=service_files,
            instance="revoke",
            groups="ack_timeout_seconds = 6\n",
            service="commit_request_timeout_seconds = 3\n",
            extra=(
                "\n[revocation]\n"
                f'crl_file = "{crl_file}"\n'
                f"broker_crls = {json.dumps([str(p) for p in broker_crls])}\n"
            ),
        )
    )
    service_key = pki.key_from_pem((files / "service-signing.key").read_bytes())
    members: dict[str, MemberThread] = {}
    device_files: dict[str, tuple[Path, Path]] = {}
    for name in DEVICES:
        device = SoftDevice.create(name, device_ca, service_key.public_key(), now)
        device.register(sessions, int(time.time()))
        key_file = write_pem(files / f"{name}.key", pki.key_to_pem(device.devid), private=True)
        cert_file = write_pem(files / f"{name}.pem", device.cert_pem.encode())
        members[name] = MemberThread(device, broker, key_file, cert_file)
        device_files[name] = (cert_file, key_file)
    engine.dispose()
    write_operator(files, operator_ca, "op-root", role="admin", now=now, stem="op-root")
    add_operator("op-root", "pki/op-root.pem", config=config, cwd=tmp_path)
    admin = operator_args(
        broker,
        cert="pki/op-root.pem",
        key="pki/op-root.key",
        service_cert=files / "service-signing.pem",
    )
    log = tmp_path / "serve.log"
    service = start_serve(config, cwd=tmp_path, log=log, timeout=30)
    # the service found CRL 1 current and in the file: no restart of the broker at its start
    assert broker.crl_restarts == 0
    for member in members.values():
        member.start()
    try:
        yield RevokeDeployment(
            tmp_path,
            database_url,
            broker,
            crl_file,
            files / "device-ca.pem",
            members,
            device_files,
            admin,
        )
    finally:
        for member in members.values():
            member.close()
        if service.poll() is None:
            service.kill()
            service.wait(10)
        print(log.read_text(errors="replace")[-20_000:])


def test_revoked_device_is_refused_by_the_broker_and_others_keep_working(
    deployment: RevokeDeployment,
) -> None:
    """Adversary: revoked device (dev-a) with its still-unexpired TLS certificate and key."""
    cert_a, key_a = deployment.files["dev-a"]
    cert_b, key_b = deployment.files["dev-b"]
    assert mqtt_connect(deployment.broker, cert_a, key_a, "dev-a-probe") == "connack"
    crl_number_before = revocation.crl_number(crl_of_file(deployment.crl_file))
    assert crl_number_before == 1

    began = time.monotonic()
    revoked = deployment.cli("revoke", "dev-a", "--reason", "stolen")
    assert revoked.returncode == 0, f"{revoked.stdout}\n{revoked.stderr}"
    answered = time.monotonic() - began
    while mqtt_connect(deployment.broker, cert_a, key_a, "dev-a-probe") != REVOKED_ALERT:
        assert time.monotonic() - began < REFUSAL_BOUND, "dev-a still connects"
        time.sleep(0.02)
    print(f"revoke answered after {answered:.2f} s, refused after {time.monotonic() - began:.2f} s")

    # Not as itself, nor under another device's client id (no session takeover).
    # (the alert may be lost when the broker closes first: the client then sees only an EOF)
    assert mqtt_connect(deployment.broker, cert_a, key_a, "dev-a") != "connack"
    assert mqtt_connect(deployment.broker, cert_a, key_a, "dev-b") != "connack"
    assert mqtt_connect(deployment.broker, cert_b, key_b, "dev-b-probe") == "connack"

    # The CRL the broker holds: issued by the device CA (openssl verifies it), numbered above
    # the one before, and listing dev-a's certificate.
    crl = crl_of_file(deployment.crl_file)
    assert revocation.crl_number(crl) > crl_number_before
    serial_a = x509.load_pem_x509_certificate(cert_a.read_bytes()).serial_number
    serial_b = x509.load_pem_x509_certificate(cert_b.read_bytes()).serial_number
    assert crl.get_revoked_certificate_by_serial_number(serial_a) is not None
    assert crl.get_revoked_certificate_by_serial_number(serial_b) is None
    single = deployment.workdir / "device-ca.crl"
    single.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    checked = subprocess.run(
        ["openssl", "crl", "-in", str(single), "-CAfile", str(deployment.device_ca_file),
         "-verify", "-noout"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert checked.returncode == 0 and "verify OK" in checked.stdout + checked.stderr, checked

    # The service reconnected after the broker's restart: a group of the remaining device is
    # created over MQTT as usual.
    created = deployment.cli("group", "create", "g1", "--members", "dev-b")
    assert created.returncode == 0, f"{created.stdout}\n{created.stderr}"
    assert "g1" in deployment.members["dev-b"].device.groups
    # Nothing changed for the revoked device: still revoked, in no group.
    assert deployment.device_state("dev-a") is DeviceState.REVOKED
    assert "g1" not in deployment.members["dev-a"].device.groups
    assert ("revocation.certificates", "device:dev-a") in deployment.audit_actions()
    assert deployment.broker.crl_restarts == 1
    # ``keyfleet crl`` finds the newest CRL current and in the file: nothing is re-issued.
    again = keyfleet("crl", "--config", "keyfleet.toml", cwd=deployment.workdir, timeout=60)
    assert again.returncode == 0, again.stderr
    assert f"CRL {revocation.crl_number(crl)} " in again.stdout
