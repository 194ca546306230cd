"""A local keyfleet installation for the benchmarks: PKI, Mosquitto (mutual TLS, the product
ACL), ``keyfleet serve`` as a subprocess, one admin operator, and a fleet configuration for
``firmware_sim.fleet``. Everything lives in one temporary directory; processes are stopped by
their PIDs.

The same parts and the same steps as the tests' deployments (docs/service.md "A deployment"),
outside pytest: the service's files, its configuration, ``db init``, ``operator add``, starting
``keyfleet serve`` and stopping it are tests/service_deployment.py's.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from firmware_sim.broker import SERVICE_IDENTITY, Mosquitto
from firmware_sim.fleet import fleet_config_text
from provisioning import pki
from provisioning.operator import OperatorSettings
from tests.fixtures.mosquitto import ClientFiles
from tests.service_deployment import (
    add_operator,
    keyfleet,
    service_config,
    start_serve,
    stop_processes,
    write_pem,
    write_service_pki,
)

OPERATOR = "op-bench"
SERVE_START_TIMEOUT = 30.0


@dataclass
class Deployment:
    workdir: Path
    broker: Mosquitto
    service: subprocess.Popen[bytes]
    service_config: Path
    service_log: Path
    fleet_config: Path
    db_url: str
    operator: OperatorSettings

    def service_rss_kb(self) -> int:
        return _rss_kb(self.service.pid)


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def client_identity(
    ca: pki.CertificateAuthority, identity: str, role: str, *, now: datetime, valid: timedelta
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh key and its client certificate (identity and role in the subject) from ``ca``."""
    key = pki.generate_key()
    cert = pki.issue_client_cert(
        ca, key.public_key(), identity=identity, role=role, now=now, valid_for=valid
    )
    return key, cert


@contextlib.contextmanager
def deployment(
    workdir: Path,
    *,
    ack_timeout: int = 120,
    commit_request_timeout: int = 10,
    tcp_nodelay: bool = False,
    profile: Path | None = None,
    db_url: str | None = None,
) -> Iterator[Deployment]:
    """Start broker and service in ``workdir``; stop both on exit. ``db_url``: another
    database than the SQLite file in ``workdir`` (e.g. PostgreSQL, bench_scaleout)."""
    now = datetime.now(UTC)
    valid = timedelta(days=2)
    files = workdir / "pki"
    files.mkdir(parents=True)
    broker_ca = pki.create_ca("bench broker CA", now=now, valid_for=valid)
    device_ca = pki.create_ca("bench device CA", now=now, valid_for=valid)
    operator_ca = pki.create_ca("bench operator CA", now=now, valid_for=valid)
    server_key = pki.generate_key()
    server_cert = pki.issue_server_cert(
        broker_ca,
        server_key.public_key(),
        common_name="mosquitto",
        dns_names=["localhost"],
        ip_addresses=["127.0.0.1"],
        now=now,
        valid_for=valid,
    )
    service_key, service_cert = client_identity(
        broker_ca, SERVICE_IDENTITY, "service", now=now, valid=valid
    )
    op_key, op_cert = client_identity(operator_ca, OPERATOR, "admin", now=now, valid=valid)
    write_pem(files / "broker-ca.pem", pki.cert_to_pem(broker_ca.certificate))
    write_pem(files / "server.pem", pki.cert_to_pem(server_cert))
    write_pem(files / "server.key", pki.key_to_pem(server_key), private=True)
    write_pem(files / "service.pem", pki.cert_to_pem(service_cert))
    write_pem(files / "service.key", pki.key_to_pem(service_key), private=True)
    write_pem(files / "op.pem", pki.cert_to_pem(op_cert))
    write_pem(files / "op.key", pki.key_to_pem(op_key), private=True)
    write_service_pki(files, device_ca, operator_ca)

    broker = Mosquitto(
        workdir / "mosquitto",
        server_cert=files / "server.pem",
        server_key=files / "server.key",
        ca_file=files / "broker-ca.pem",
        client_ca_certs=(
            broker_ca.certificate,
            device_ca.certificate,
            operator_ca.certificate,
        ),
        log_types=("error", "warning"),
        probe=(files / "service.pem", files / "service.key"),
    )
    if db_url is None:
        db_url = f"sqlite:///{workdir / 'fleet.db'}"
    config = workdir / "keyfleet.toml"
    config.write_text(
        service_config(
            db_url=db_url,
            broker=broker,
            client=ClientFiles(
                SERVICE_IDENTITY,
                files / "broker-ca.pem",
                files / "service.pem",
                files / "service.key",
            ),
            instance="bench",
            groups=f"ack_timeout_seconds = {ack_timeout}\ncommit_log_retention_epochs = 64\n",
            service=f"commit_request_timeout_seconds = {commit_request_timeout}\n",
        )
    )
    fleet_config = workdir / "fleet.toml"
    fleet_config.write_text(
        fleet_config_text(
            id_prefix="dev-sim-",
            service_cert="pki/service.pem",
            broker_host=broker.host,
            broker_port=broker.port,
            broker_ca="pki/broker-ca.pem",
            registry_url=db_url,
            directory="fleet",
        )
    )
    if tcp_nodelay:
        with open(broker.config_file, "a") as conf:
            conf.write("set_tcp_nodelay true\n")
    broker.start()
    service: subprocess.Popen[bytes] | None = None
    log = workdir / "serve.log"
    try:
        initialized = keyfleet("db", "init", "--config", str(config), cwd=workdir, timeout=120)
        if initialized.returncode != 0:
            raise RuntimeError(f"keyfleet db init failed: {initialized.stderr}")
        add_operator(OPERATOR, "pki/op.pem", config=config, cwd=workdir)
        service = start_serve(
            config,
            cwd=workdir,
            log=log,
            timeout=SERVE_START_TIMEOUT,
            python_args=("-m", "cProfile", "-o", str(profile)) if profile is not None else (),
        )
        yield Deployment(
            workdir=workdir,
            broker=broker,
            service=service,
            service_config=config,
            service_log=log,
            fleet_config=fleet_config,
            db_url=db_url,
            operator=OperatorSettings(
                host=broker.host,
                port=broker.port,
                ca=files / "broker-ca.pem",
                cert=files / "op.pem",
                key=files / "op.key",
                service_cert=files / "service.pem",
            ),
        )
    finally:
        if service is not None:
            stop_processes([service])
        broker.stop()
