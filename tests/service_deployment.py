"""The service side of the subprocess tests, written once: the files ``keyfleet serve`` reads
(CAs, golden policy, its TOML config), ``keyfleet operator add``, starting ``keyfleet serve`` and
waiting until it says it is ready, and the operator CLI's broker arguments.

Each test module still owns what differs (its broker, its devices, how it stops the service), so
that what a test asserts stays in the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509

from firmware_sim.boot import default_components
from provisioning import pki
from provisioning.policy import policy_from_components, write_policy
from tests.fixtures.mosquitto import BrokerPKI, ClientFiles, MosquittoBroker


def keyfleet(*args: str, cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """The operator CLI as a subprocess, the way an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "provisioning.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def write_pem(path: Path, data: bytes, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)
    return path


def write_service_pki(
    files: Path,
    device_ca: pki.CertificateAuthority,
    operator_ca: pki.CertificateAuthority,
    manufacturer_cas: Sequence[x509.Certificate] = (),
) -> None:
    """The CA files and golden policy the config below names. Without ``manufacturer_cas`` the
    device CA doubles as the manufacturer CA, for devices with software DevIDs, not EK chains."""
    write_pem(files / "device-ca.pem", pki.cert_to_pem(device_ca.certificate))
    write_pem(files / "device-ca.key", pki.key_to_pem(device_ca.private_key), private=True)
    write_pem(files / "operator-ca.pem", pki.cert_to_pem(operator_ca.certificate))
    write_pem(
        files / "manufacturers.pem", pki.certs_to_pem(manufacturer_cas or [device_ca.certificate])
    )
    write_golden_policy(files / "golden.toml")


@dataclass(frozen=True)
class DeploymentPKI:
    """What the virtual-fleet installations share: the CAs, a broker that trusts them, the
    service's broker identity and the CA files (``files``) the service configuration names."""

    now: datetime
    device_ca: pki.CertificateAuthority
    operator_ca: pki.CertificateAuthority
    broker: MosquittoBroker
    service: ClientFiles
    files: Path


def deployment_pki(
    tmp_path: Path, label: str, broker_pki: BrokerPKI, mosquitto_factory: object
) -> DeploymentPKI:
    """Device and operator CAs named after ``label``, a fresh Mosquitto trusting both, and the
    service's files under ``tmp_path/pki``."""
    now = datetime.now(UTC)
    device_ca = pki.create_ca(f"{label} device CA", now=now, valid_for=timedelta(days=2))
    operator_ca = pki.create_ca(f"{label} operator CA", now=now, valid_for=timedelta(days=2))
    broker: MosquittoBroker = mosquitto_factory(  # type: ignore[operator]
        log_types=("error", "warning"),
        extra_ca_certs=(device_ca.certificate, operator_ca.certificate),
    )
    files = tmp_path / "pki"
    files.mkdir()
    service = broker_pki.client("keyfleet-service", role="service")
    write_service_pki(files, device_ca, operator_ca)
    return DeploymentPKI(now, device_ca, operator_ca, broker, service, files)


def write_golden_policy(path: Path) -> None:
    write_policy(policy_from_components(default_components("1.0")), path)


def write_operator(
    files: Path,
    operator_ca: pki.CertificateAuthority,
    identity: str,
    *,
    role: str,
    now: datetime,
    stem: str,
) -> None:
    """An operator's key and client certificate (a day's validity) as ``stem``.pem/.key."""
    key = pki.generate_key()
    cert = pki.issue_client_cert(
        operator_ca, key.public_key(), identity=identity, role=role, now=now,
        valid_for=timedelta(days=1),
    )  # fmt: skip
    pki.write_certificate(files / f"{stem}.pem", cert)
    pki.write_private_key(files / f"{stem}.key", key)


def service_config(
    *,
    db_url: str,
    broker: MosquittoBroker,
    client: ClientFiles,
    instance: str,
    groups: str,
    service: str = "",
    attestation: str = "",
    extra: str = "",
) -> str:
    """``keyfleet.toml`` with the CA files under ``pki/``; ``groups``, ``service`` and
    ``attestation`` are further lines of those tables, ``extra`` further tables."""
    return f"""
[database]
url = "{db_url}"

[broker]
host = "{broker.host}"
port = {broker.port}
ca = "{broker.ca_file}"
client_cert = "{client.cert_file}"
client_key = "{client.key_file}"

[device_ca]
cert = "pki/device-ca.pem"
key = "pki/device-ca.key"

[operator_ca]
cert = "pki/operator-ca.pem"

[attestation]
manufacturer_cas = "pki/manufacturers.pem"
golden_measurements = "pki/golden.toml"
{attestation}
[groups]
{groups}
[service]
instance = "{instance}"
{service}{extra}"""


def add_operator(
    name: str, cert: str, *, config: Path, cwd: Path
) -> subprocess.CompletedProcess[str]:
    added = keyfleet("operator", "add", name, "--cert", cert, "--config", str(config), cwd=cwd)
    assert added.returncode == 0, added.stderr
    return added


def start_serve(
    config: Path, *, cwd: Path, log: Path, timeout: float, ready: bytes = b"ready"
) -> subprocess.Popen[bytes]:
    """``keyfleet serve`` with its output in ``log``, returned once the log says ``ready``; killed
    here if it exits or is not ready in time, so a failed start leaves no process behind."""
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "provisioning.cli", "serve", "--config", str(config)],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
        )
    deadline = time.monotonic() + timeout
    try:
        while ready not in log.read_bytes():
            assert process.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.05)
    except BaseException:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        raise
    return process


def operator_args(broker: MosquittoBroker, *, cert: str, key: str, service_cert: Path) -> list[str]:
    """The operator CLI's connection arguments: the broker, its CA and the operator's identity."""
    return [
        "--broker", f"{broker.host}:{broker.port}",
        "--ca", str(broker.ca_file),
        "--cert", cert,
        "--key", key,
        "--service-cert", str(service_cert),
    ]  # fmt: skip
