"""A local keyfleet installation for the benchmarks: PKI, Mosquitto (mutual TLS, the product
ACL), ``keyfleet serve`` as a subprocess, one admin operator, and a fleet configuration for
``firmware_sim.fleet``. Everything lives in one temporary directory; processes are stopped by
their PIDs.

The tests' deployment (tests/service_deployment.py, docs/service.md "A deployment") outside
pytest: the broker's PKI and the broker are made here instead of by the pytest fixtures.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning import pki
from provisioning.operator import OperatorSettings
from tests.fixtures.mosquitto import DEFAULT_ACL, BrokerPKI, ClientFiles, MosquittoBroker
from tests.service_deployment import service_deployment

OPERATOR = "op-bench"
INSTANCE = "bench"
SERVE_START_TIMEOUT = 30.0


@dataclass
class Deployment:
    workdir: Path
    broker: MosquittoBroker
    service: subprocess.Popen[bytes]
    service_config: Path
    service_log: Path
    service_files: ClientFiles
    fleet_config: Path
    db_url: str
    operator: OperatorSettings
    metrics_port: int | None = None

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
    device_ca: pki.CertificateAuthority | None = None,
    acl_extra: str = "",
    metrics: bool = False,
    broker_conf: str = "",
    service_conf: str = "",
) -> Iterator[Deployment]:
    """Start broker and service in ``workdir``; stop both on exit. ``db_url``: another
    database than the SQLite file in ``workdir`` (e.g. PostgreSQL, bench_scaleout).
    ``device_ca``: the fleet's device CA (default: a new one); ``acl_extra``: lines appended to
    the product ACL (a bench client's rights); ``metrics``: the service serves its metrics
    (``Deployment.metrics_port``); ``broker_conf``: lines appended to Mosquitto's
    configuration; ``service_conf``: lines added to the service's ``[service]`` table."""
    workdir.mkdir(parents=True, exist_ok=True)
    broker_pki = BrokerPKI(workdir / "broker-pki")
    brokers: list[MosquittoBroker] = []

    def start_broker(**options: Any) -> MosquittoBroker:
        broker = MosquittoBroker(
            workdir / "mosquitto", broker_pki, acl=DEFAULT_ACL + acl_extra, **options
        )
        brokers.append(broker)
        if tcp_nodelay or broker_conf:
            with open(broker.config_file, "a") as conf:
                conf.write("set_tcp_nodelay true\n" if tcp_nodelay else "")
                conf.write(broker_conf)
        broker.start()
        return broker

    try:
        with service_deployment(
            workdir,
            broker_pki,
            start_broker,
            label="bench",
            db_url=db_url,
            instances=(INSTANCE,),
            operator=(OPERATOR, "admin"),
            groups=f"ack_timeout_seconds = {ack_timeout}\ncommit_log_retention_epochs = 64\n",
            service=f"commit_request_timeout_seconds = {commit_request_timeout}\n{service_conf}",
            device_prefix="dev-sim-",
            fleet_directory="fleet",
            start_timeout=SERVE_START_TIMEOUT,
            python_args=("-m", "cProfile", "-o", str(profile)) if profile is not None else (),
            log_tail=0,  # stdout is the benchmark's JSON
            device_ca=device_ca,
            metrics=metrics,
        ) as site:
            assert site.operator is not None
            yield Deployment(
                workdir=workdir,
                broker=site.broker,
                service=site.services[INSTANCE],
                service_config=site.config,
                service_log=site.logs[INSTANCE],
                service_files=site.pki.service,
                fleet_config=site.fleet_config,
                db_url=site.db_url,
                operator=site.operator,
                metrics_port=site.metrics_ports.get(INSTANCE),
            )
    finally:
        for broker in brokers:
            broker.stop()
