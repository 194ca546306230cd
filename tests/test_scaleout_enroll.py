"""Factory enrollment across two ``keyfleet serve`` processes over one database (a SQLite file and
a real PostgreSQL, tests/fixtures/postgres.py), each serving the enrollment API on its own port
(mutual TLS), as behind a load balancer without affinity: a station starts a session on one
instance and finishes it on the other; a retried finish returns the same identity from either;
two finishes of one session sent to both instances at once register one device and both answer
with its identity; a wrong answer on one instance ends the session on the other. The device is a
swtpm answering the credential challenge through factory mode, the station is
``provisioning.station.FleetClient`` over HTTPS.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.factory import FactoryDevice
from agent.protocol.errors import ProtocolError
from agent.tpm.store import TPMStore
from firmware_sim.ports import free_port
from provisioning import audit
from provisioning.enroll import DeviceIdentity, StartResult
from provisioning.registry import Registry, make_engine, run_in_transaction, session_factory
from provisioning.station import FleetClient
from tests.fixtures.mosquitto import BrokerPKI, MosquittoBroker
from tests.fixtures.swtpm import ManufacturerCA, SwtpmFactory
from tests.service_deployment import keyfleet, service_config, start_serve, write_service_pki
from tests.test_enroll import STATION, device_start_request, make_pki

pytestmark = pytest.mark.e2e
DATABASE_BACKENDS = ("sqlite", "postgresql")

INSTANCES = ("a", "b")
JOIN_TIMEOUT = 120.0


@dataclass
class Pair:
    """Two instances sharing one database, and a station client for each one's API."""

    db_url: str
    clients: dict[str, FleetClient]
    logs: dict[str, Path]

    def devices(self) -> list[str]:
        return self._read(lambda s: [d.device_id for d in Registry(s).devices()])

    def finishes(self) -> list[tuple[str, str]]:
        """(outcome, target) of every enroll.finish audit entry, oldest first."""
        return self._read(
            lambda s: [
                (e.outcome.value, e.target) for e in audit.entries(s) if e.action == "enroll.finish"
            ]
        )

    def _read(self, work: Any) -> Any:
        engine = make_engine(self.db_url)
        try:
            return run_in_transaction(session_factory(engine), work)
        finally:
            engine.dispose()


@pytest.fixture
def pair(
    tmp_path: Path,
    broker_pki: BrokerPKI,
    mosquitto_factory: Any,
    manufacturer_ca: ManufacturerCA,
    database_url: str,
) -> Iterator[Pair]:
    fleet_pki = make_pki(tmp_path / "pki")
    files = fleet_pki.directory
    broker: MosquittoBroker = mosquitto_factory(
        extra_ca_certs=(fleet_pki.device_ca.certificate, fleet_pki.operator_ca.certificate)
    )
    service_files = broker_pki.client("keyfleet-service", role="service")
    write_service_pki(
        files,
        fleet_pki.device_ca,
        fleet_pki.operator_ca,
        manufacturer_cas=[manufacturer_ca.root_cert(), manufacturer_ca.issuer_cert()],
    )
    configs: dict[str, Path] = {}
    clients: dict[str, FleetClient] = {}
    for name in INSTANCES:
        port = free_port()
        configs[name] = tmp_path / f"keyfleet-{name}.toml"
        configs[name].write_text(
            service_config(
                db_url=database_url,
                broker=broker,
                client=service_files,
                instance=name,
                groups="ack_timeout_seconds = 30\n",
                extra=f"""
[http]
listen = "127.0.0.1:{port}"
tls_cert = "pki/server.pem"
tls_key = "pki/server.key"
station_ca = "pki/station-ca.pem"
""",
            )
        )
        clients[name] = FleetClient(
            f"https://127.0.0.1:{port}",
            cert=fleet_pki.station_cert_path,
            key=fleet_pki.station_key_path,
            ca=fleet_pki.server_ca_path,
            retries=0,  # a retry here would hide which instance answered
        )
    first = str(configs[INSTANCES[0]])
    initialized = keyfleet("db", "init", "--config", first, cwd=tmp_path, timeout=120)
    assert initialized.returncode == 0, initialized.stderr
    added = keyfleet(
        "station", "add", STATION, "--cert", str(fleet_pki.station_cert_path),
        "--config", first, cwd=tmp_path,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    logs = {name: tmp_path / f"serve-{name}.log" for name in INSTANCES}
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in INSTANCES:
            processes[name] = start_serve(
                configs[name], cwd=tmp_path, log=logs[name], timeout=60,
                ready=b"keyfleet serve: ready",
            )  # fmt: skip
            assert b"enrollment API on https://127.0.0.1" in logs[name].read_bytes()
        yield Pair(database_url, clients, logs)
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
        for name, process in processes.items():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
            print(f"---- serve {name} ----\n{logs[name].read_text(errors='replace')[-8000:]}")


@pytest.fixture
def device(swtpm_factory: SwtpmFactory, tmp_path: Path) -> Iterator[FactoryDevice]:
    tpm = swtpm_factory.start()
    with TPMStore(tpm.tcti) as store:
        yield FactoryDevice(store, tmp_path / "device", serial="SN-SCALE-1")


def activate(device: FactoryDevice, started: StartResult) -> bytes:
    answer: bytes = device.handle(
        "activate-credential",
        {"credential_blob": started.credential_blob, "encrypted_secret": started.encrypted_secret},
    )["secret"]
    return answer


def finish_on_both(pair: Pair, session: str, secret: bytes) -> list[DeviceIdentity | Exception]:
    """The same finish sent to both instances at once (one thread each)."""
    results: list[DeviceIdentity | Exception] = []
    lock = threading.Lock()
    gate = threading.Barrier(len(INSTANCES))

    def finish(name: str) -> None:
        gate.wait(timeout=JOIN_TIMEOUT)
        try:
            result: DeviceIdentity | Exception = pair.clients[name].finish(session, secret)
        except Exception as exc:  # reported by the caller, whatever it is
            result = exc
        with lock:
            results.append(result)

    threads = [threading.Thread(target=finish, args=(name,)) for name in INSTANCES]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT)
        assert not thread.is_alive(), "a finish is stuck"
    return results


def test_a_station_finishes_on_another_instance_than_it_started(
    pair: Pair, device: FactoryDevice
) -> None:
    a, b = pair.clients["a"], pair.clients["b"]
    request, _ = device_start_request(device, groups=("line",))
    started = a.start(request)
    secret = activate(device, started)
    identity = b.finish(started.session, secret)
    assert identity.device_id == started.device_id and identity.groups == ("line",)
    device.handle("install", identity.to_map())
    # the answer was lost: a retry on either instance returns the same identity
    assert a.finish(started.session, secret).to_map() == identity.to_map()
    assert b.finish(started.session, secret).to_map() == identity.to_map()
    assert pair.devices() == [started.device_id]
    assert pair.finishes() == [("accepted", f"device:{started.device_id}")]

    # undone on instance b (the install "failed"), enrolled again: both instances at once
    b.revoke(identity.device_id, "install failed")
    assert pair.devices() == []
    request, _ = device_start_request(device)
    started = b.start(request)
    secret = activate(device, started)
    results = finish_on_both(pair, started.session, secret)
    identities = [r for r in results if isinstance(r, DeviceIdentity)]
    assert len(identities) == 2, results
    assert identities[0].to_map() == identities[1].to_map()
    assert identities[0].devid_cert != identity.devid_cert  # a new identity, registered once
    assert pair.devices() == [started.device_id]
    assert pair.finishes()[1:] == [("accepted", f"device:{started.device_id}")]


def test_a_wrong_answer_on_one_instance_ends_the_session_on_the_other(
    pair: Pair, device: FactoryDevice
) -> None:
    a, b = pair.clients["a"], pair.clients["b"]
    request, _ = device_start_request(device)
    started = a.start(request)
    secret = activate(device, started)
    wrong = bytes(x ^ 1 for x in secret)
    with pytest.raises(ProtocolError) as err:
        b.finish(started.session, wrong)
    assert err.value.check == "enroll.credential"
    with pytest.raises(ProtocolError) as err:
        a.finish(started.session, secret)
    assert err.value.check == "enroll.session.unknown"
    assert pair.devices() == []
    assert [o for o, _ in pair.finishes()] == ["refused", "refused"]
