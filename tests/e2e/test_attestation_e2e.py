"""Runtime attestation end to end, every part real and in its own process: Mosquitto (mutual TLS,
the product ACL), ``keyfleet serve`` (MQTT delivery service and, in the same process, the HTTPS
enrollment API), two ``firmware-sim device`` processes (swtpm, measured boot, factory console on
a pty) provisioned by the ``keyprovision`` command against that HTTPS API, whose agents then run
(``keyagent run``), and the operator CLI.

A device that booted the approved release is trusted (scheduled attestation makes a fresh device
active); after a reboot into a kernel with one byte flipped ``keyfleet attest`` reports it
untrusted naming ``kernel`` (exit 1), ``keyfleet devices`` shows it quarantined, and the
quarantine removes it from its group through a commit by the other member, which acks the new
epoch."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agent.daemon import read_status
from agent.protocol.errors import StateError
from firmware_sim.swtpm import pid_alive
from tests.fixtures.mosquitto import (
    DEFAULT_LOG_TYPES,
    BrokerPKI,
    free_port,
)
from tests.fixtures.swtpm import ManufacturerCA
from tests.service_deployment import (
    add_operator,
    adopt_standing_policy,
    deployment_pki,
    keyfleet,
    operator_args,
    service_config,
    start_serve,
    write_operator,
)
from tests.tpm.test_enroll import STATION, make_pki
from tests.tpm.test_firmware_sim import DeviceProcess

pytestmark = pytest.mark.e2e
# the service on a SQLite file and on PostgreSQL (tests/fixtures/postgres.py)
DATABASE_BACKENDS = ("sqlite", "postgresql")

T = TypeVar("T")


def eventually(probe: Callable[[], T | None], what: str, timeout: float = 40.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found is not None:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s")


@dataclass
class Service:
    workdir: Path
    config: Path
    log: Path
    process: subprocess.Popen[bytes]
    url: str
    station: list[str]
    operator: list[str]

    def cli(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return keyfleet(*args, cwd=self.workdir, timeout=timeout)

    def op(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.cli(*args, *self.operator)

    def listing(self, what: str) -> list[dict[str, Any]]:
        done = self.cli(what, "--config", str(self.config), "--json")
        assert done.returncode == 0, done.stderr
        rows: list[dict[str, Any]] = json.loads(done.stdout)
        return rows

    def device(self, device_id: str) -> dict[str, Any]:
        return next(r for r in self.listing("devices") if r["device_id"] == device_id)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


@pytest.fixture
def service(
    tmp_path: Path,
    broker_pki: BrokerPKI,
    mosquitto_factory: Any,
    manufacturer_ca: ManufacturerCA,
    database_url: str,
) -> Iterator[Service]:
    fleet_pki = make_pki(tmp_path / "pki")
    fleet = deployment_pki(
        tmp_path, "e2e", broker_pki, mosquitto_factory,
        device_ca=fleet_pki.device_ca, operator_ca=fleet_pki.operator_ca,
        manufacturer_cas=[manufacturer_ca.root_cert(), manufacturer_ca.issuer_cert()],
        log_types=DEFAULT_LOG_TYPES,
    )  # fmt: skip
    d, broker, service_files = fleet.files, fleet.broker, fleet.service
    port = free_port()
    config = tmp_path / "keyfleet.toml"
    config.write_text(
        service_config(
            db_url=database_url,
            broker=broker,
            client=service_files,
            instance="e2e",
            attestation="interval_seconds = 3600\nquarantine = true\n",
            groups="ack_timeout_seconds = 30\n",
            service="commit_request_timeout_seconds = 5\n",
            extra=f"""
[http]
listen = "127.0.0.1:{port}"
tls_cert = "pki/server.pem"
tls_key = "pki/server.key"
station_ca = "pki/station-ca.pem"
""",
        )
    )
    now = datetime.now(UTC)
    write_operator(d, fleet_pki.operator_ca, "op-alice", role="operator", now=now, stem="op-alice")
    add_operator("op-alice", "pki/op-alice.pem", config=config, cwd=tmp_path)
    write_operator(d, fleet_pki.operator_ca, "op-root", role="admin", now=now, stem="op-root")
    add_operator("op-root", "pki/op-root.pem", config=config, cwd=tmp_path)
    station = keyfleet(
        "station",
        "add",
        STATION,
        "--cert",
        str(fleet_pki.station_cert_path),
        "--config",
        str(config),
        cwd=tmp_path,
    )
    assert station.returncode == 0, station.stderr
    assert station.stdout.startswith(f"station {STATION} registered")

    log = tmp_path / "serve.log"
    process = start_serve(config, cwd=tmp_path, log=log, timeout=30, ready=b"keyfleet serve: ready")
    running = Service(
        workdir=tmp_path,
        config=config,
        log=log,
        process=process,
        url=f"https://127.0.0.1:{port}",
        station=[
            "--fleet", f"https://127.0.0.1:{port}",
            "--cert", str(fleet_pki.station_cert_path),
            "--key", str(fleet_pki.station_key_path),
            "--ca", str(d / "server-ca.pem"),
        ],
        operator=[
            *operator_args(
                broker,
                cert=str(d / "op-alice.pem"),
                key=str(d / "op-alice.key"),
                service_cert=fleet.signing_cert,
            ),
            "--timeout", "60",
        ],
    )  # fmt: skip
    try:
        assert "enrollment API on https://127.0.0.1" in running.log_text()
        # quarantine removes an untrusted member on the service's own: under a signed policy
        admin = operator_args(
            broker,
            cert=str(d / "op-root.pem"),
            key=str(d / "op-root.key"),
            service_cert=fleet.signing_cert,
        )
        adopt_standing_policy(tmp_path, admin)
        yield running
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
        try:
            assert process.wait(timeout=20) == 0, running.log_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert "Traceback" not in running.log_text(), running.log_text()


@pytest.fixture
def devices() -> Iterator[list[DeviceProcess]]:
    started: list[DeviceProcess] = []
    yield started
    for process in started:
        process.kill()


def boot(
    devices: list[DeviceProcess], state: Path, ca: ManufacturerCA, *extra: str
) -> DeviceProcess:
    process = DeviceProcess(state, *extra, manufacturer_ca=ca.directory)
    devices.append(process)
    return process


def agent_up(state: Path, pid: int) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        with contextlib.suppress(StateError):
            status = read_status(str(state / "agent.toml"))
            if status.get("pid") == pid and status.get("mqtt_connected"):
                return status
        assert pid_alive(pid), (state / "agent.log").read_text(errors="replace")[-3000:]
        return None

    return eventually(probe, f"agent {pid} connected")


def provision(service: Service, device: DeviceProcess) -> str:
    console = device.wait_event("ready")["console"]
    done = subprocess.run(
        [sys.executable, "-m", "provisioning.station", "--port", console, *service.station,
         "--retries", "2", "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr + service.log_text()
    report = json.loads(done.stdout)
    assert report["ok"], report
    device_id: str = report["device_id"]
    return device_id


def test_tampered_kernel_is_untrusted_named_and_quarantined_out_of_its_group(
    service: Service,
    devices: list[DeviceProcess],
    tmp_path: Path,
    manufacturer_ca: ManufacturerCA,
) -> None:
    states = [tmp_path / "lab" / "dev1", tmp_path / "lab" / "dev2"]
    processes = [boot(devices, state, manufacturer_ca) for state in states]
    ids = [provision(service, p) for p in processes]
    for state, process in zip(states, processes, strict=True):
        agent_up(state, process.wait_event("agent")["agent_pid"])
    good, evil = ids

    # never attested and online: the schedule challenges both at once; approved firmware
    for device_id in ids:

        def attested(device: str = device_id) -> dict[str, Any] | None:
            found = service.device(device)
            return found if found["attestation"] else None

        row = eventually(attested, f"scheduled attestation of {device_id}")
        assert row["attestation"] == "trusted", row
        assert row["state"] == "active"
        assert str(row["attestation_reason"]).startswith("[attest.trusted] approved firmware")

    # on demand: trusted, exit 0
    done = service.op("attest", good)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{good} trusted: [attest.trusted]" in done.stdout

    created = service.op("group", "create", "g1", "--members", good, evil)
    assert created.returncode == 0, created.stdout + created.stderr + service.log_text()

    def settled() -> dict[str, Any] | None:  # the joiner's first self-update is epoch 2
        group = next(g for g in service.listing("groups") if g["group_id"] == "g1")
        return group if group["epoch"] == 2 and group["agreed"] and not group["pending"] else None

    eventually(settled, f"g1 settled at epoch 2: {service.log_text()}")

    # the second device reboots into a kernel with one byte flipped
    assert processes[1].terminate() == 0
    rebooted = boot(devices, states[1], manufacturer_ca, "--tamper", "kernel")
    status = agent_up(states[1], rebooted.wait_event("agent")["agent_pid"])
    assert status["sealed_elsewhere"] is True  # its state key was sealed to the good kernel

    done = service.op("attest", evil)
    assert done.returncode == 1, done.stdout + done.stderr + service.log_text()
    assert f"{evil} untrusted: [attest.policy.digest] kernel: digest" in done.stdout
    assert "quarantined; removal from g1 queued" in done.stdout
    row = service.device(evil)
    assert row["attestation"] == "untrusted" and row["state"] == "quarantined"
    assert "kernel" in str(row["attestation_reason"])

    # the quarantine takes it out of g1 by a commit of the other member, which acks
    def removed() -> dict[str, Any] | None:
        group = next(g for g in service.listing("groups") if g["group_id"] == "g1")
        return group if group["members"] == [good] and group["agreed"] else None

    group = eventually(removed, f"g1 without {evil}: {service.log_text()}")
    assert group["epoch"] == 3 and group["pending"] == []
    assert service.device(evil)["groups"] == []
    assert service.device(good)["groups"] == ["g1"]
    audit = service.cli("audit", "verify", "--config", str(service.config))
    assert audit.returncode == 0, audit.stdout
