"""Two ``keyfleet serve`` processes against one database and one Mosquitto (shared
subscriptions), a virtual fleet (agent cores with software keys, one MQTT connection each) and
the operator CLI as subprocesses: concurrent rekeys of several groups end with one valid chain per
group, an instance killed with SIGKILL in the middle of a rekey leaves it to the other, the audit
chain verifies, and each instance serves Prometheus metrics that show the split.

Runs on SQLite (one file in WAL mode, both processes writing) and, when the PostgreSQL fixture
is available, on PostgreSQL.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from firmware_sim.fleet import VirtualFleet, fleet_config_text, load_fleet_config
from firmware_sim.ports import free_port
from provisioning.db.runtime import OperationRow
from provisioning.db.schema import CommitLogEntry, Group
from provisioning.registry import make_engine, session_factory
from tests.fixtures.mosquitto import BrokerPKI
from tests.service_deployment import (
    add_operator,
    deployment_pki,
    keyfleet,
    operator_args,
    service_config,
    start_serve,
    write_operator,
)

pytestmark = pytest.mark.e2e
# tests/fixtures/postgres.py: every test runs on a SQLite file and on a fresh PostgreSQL database
DATABASE_BACKENDS = ("sqlite", "postgresql")

DEVICES = 12
INSTANCES = ("a", "b")


@dataclass
class Cluster:
    workdir: Path
    db_url: str
    configs: dict[str, Path]
    logs: dict[str, Path]
    services: dict[str, subprocess.Popen[bytes]]
    metrics_ports: dict[str, int]
    fleet: VirtualFleet
    operator_args: list[str]

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return keyfleet(*args, *self.operator_args, cwd=self.workdir, timeout=timeout)

    def cli_async(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "provisioning.cli", *args, *self.operator_args],
            cwd=self.workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def scrape(self, name: str) -> dict[str, float]:
        """The instance's /metrics as {sample line name+labels: value}."""
        url = f"http://127.0.0.1:{self.metrics_ports[name]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = response.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                samples[key] = float(value)
        return samples

    def chain(self, group_id: str) -> tuple[list[int], int]:
        engine = make_engine(self.db_url)
        try:
            with session_factory(engine)() as s:
                epochs = list(
                    s.scalars(
                        select(CommitLogEntry.epoch)
                        .where(CommitLogEntry.group_id == group_id)
                        .order_by(CommitLogEntry.epoch)
                    )
                )
                group = s.get(Group, group_id)
                assert group is not None
                return epochs, group.epoch
        finally:
            engine.dispose()

    def members_agree(self, group_id: str, epoch: int) -> None:
        views = {d: v for d, v in self.fleet.authenticators(group_id).items() if v is not None}
        assert views and {v[0] for v in views.values()} == {epoch}, views
        assert len({v[1] for v in views.values()}) == 1, views


@pytest.fixture
def cluster(
    tmp_path: Path, database_url: str, broker_pki: BrokerPKI, mosquitto_factory: object
) -> Iterator[Cluster]:
    db_url = database_url
    deployment = deployment_pki(tmp_path, "scale-out", broker_pki, mosquitto_factory)
    now, operator_ca, broker = deployment.now, deployment.operator_ca, deployment.broker
    files, service = deployment.files, deployment.service
    # One operator for every concurrent CLI: its commands arrive out of order, inside the
    # operator replay window (tests/test_replay_operator_e2e.py).
    write_operator(files, operator_ca, "op-scale", role="admin", now=now, stem="op")
    configs: dict[str, Path] = {}
    ports: dict[str, int] = {}
    for name in INSTANCES:
        ports[name] = free_port()
        configs[name] = tmp_path / f"keyfleet-{name}.toml"
        configs[name].write_text(
            service_config(
                db_url=db_url,
                broker=broker,
                client=service,
                instance=name,
                groups="ack_timeout_seconds = 60\n",
                service="commit_request_timeout_seconds = 3\nsession_expiry_seconds = 0\n",
                extra=f'\n[metrics]\nlisten = "127.0.0.1:{ports[name]}"\n',
            )
        )
    fleet_config = tmp_path / "fleet.toml"
    fleet_config.write_text(
        fleet_config_text(
            id_prefix="dev-s",
            service_cert=service.cert_file,
            broker_host=broker.host,
            broker_port=broker.port,
            broker_ca=broker.ca_file,
            registry_url=db_url,
        )
    )
    first = configs[INSTANCES[0]]
    initialized = keyfleet("db", "init", "--config", str(first), cwd=tmp_path, timeout=120)
    assert initialized.returncode == 0, initialized.stderr
    add_operator("op-scale", "pki/op.pem", config=first, cwd=tmp_path)
    logs = {name: tmp_path / f"serve-{name}.log" for name in INSTANCES}
    services: dict[str, subprocess.Popen[bytes]] = {}
    fleet: VirtualFleet | None = None
    try:
        for name in INSTANCES:
            services[name] = start_serve(configs[name], cwd=tmp_path, log=logs[name], timeout=60)
        fleet = VirtualFleet.from_config(
            load_fleet_config(fleet_config), DEVICES, allow_insecure=True
        )
        fleet.start(timeout=120)
        args = operator_args(
            broker, cert="pki/op.pem", key="pki/op.key", service_cert=service.cert_file
        )
        yield Cluster(tmp_path, db_url, configs, logs, services, ports, fleet, args)
    finally:
        if fleet is not None:
            fleet.stop()
        for process in services.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
        for name, log in logs.items():
            if log.exists():
                print(f"---- serve {name} ----\n{log.read_text(errors='replace')[-15_000:]}")


def ids(cluster: Cluster, first: int, count: int) -> list[str]:
    return [d.device_id for d in cluster.fleet.devices[first : first + count]]


def test_concurrent_rekeys_of_several_groups_keep_one_chain_each(cluster: Cluster) -> None:
    groups = {f"g{i}": ids(cluster, 4 * i, 4) for i in range(3)}
    creates = [cluster.cli_async("group", "create", g, "--members", *m) for g, m in groups.items()]
    for process in creates:
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0, out + err
    # two rekeys per group, all six at once, all from one operator
    rekeys = [cluster.cli_async("rekey", "--group", g) for g in [*groups, *groups]]
    for process in rekeys:
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0, out + err
        assert "done epoch" in out.splitlines()[-1], out
    for group_id in groups:
        epochs, current = cluster.chain(group_id)
        # create (epoch 0), 3 adds, 2 rekeys: commits 0..4, no gap, no duplicate
        assert epochs == list(range(5)) and current == 5, (group_id, epochs, current)
        deadline = time.monotonic() + 30
        while True:
            try:
                cluster.members_agree(group_id, current)
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    scraped = {name: cluster.scrape(name) for name in INSTANCES}
    for name, samples in scraped.items():
        # the shared subscription gave each instance a share of the device reports
        handled = sum(v for k, v in samples.items() if k.startswith("keyfleet_reports_handled"))
        assert handled > 0, (name, samples)
        assert f'keyfleet_instance_info{{instance_id="{name}"}}' in samples
    accepted = sum(s.get('keyfleet_commits_total{outcome="accepted"}', 0) for s in scraped.values())
    assert accepted == 15
    acks = sum(s.get("keyfleet_ack_latency_seconds_count", 0) for s in scraped.values())
    assert acks >= 3 * 4 * 2  # at least every member's ack of both rekeys
    verify = keyfleet("audit", "verify", "--db", cluster.db_url, cwd=cluster.workdir, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_an_instance_killed_mid_rekey_leaves_the_rekey_to_the_other(cluster: Cluster) -> None:
    members = ids(cluster, 0, 6)
    created = cluster.cli("group", "create", "g1", "--members", *members)
    assert created.returncode == 0, created.stdout + created.stderr
    _, before = cluster.chain("g1")

    rekey = cluster.cli_async("rekey", "--group", "g1")
    engine = make_engine(cluster.db_url)
    victim = None
    try:
        deadline = time.monotonic() + 60
        while victim is None:
            assert time.monotonic() < deadline, "the rekey never reached the database"
            with session_factory(engine)() as s:
                victim = s.scalar(
                    select(OperationRow.accepted_by).where(OperationRow.type == "op.rekey")
                )
            if victim is None:
                time.sleep(0.005)
    finally:
        engine.dispose()
    # SIGKILL: no goodbye, no flushing; whatever it had in flight is in the database only.
    cluster.services[victim].send_signal(signal.SIGKILL)
    cluster.services[victim].wait(10)
    survivor = next(name for name in INSTANCES if name != victim)

    out, err = rekey.communicate(timeout=240)
    assert rekey.returncode == 0, out + err
    assert out.splitlines()[-1].startswith(f"rekey g1: done epoch {before + 1}"), out
    epochs, current = cluster.chain("g1")
    assert epochs == list(range(before + 1)) and current == before + 1
    cluster.members_agree("g1", current)
    # the survivor still works for the next change, alone
    again = cluster.cli("rekey", "--group", "g1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert cluster.chain("g1")[1] == before + 2
    assert cluster.services[survivor].poll() is None
    listing = keyfleet("groups", "--db", cluster.db_url, cwd=cluster.workdir)
    assert listing.returncode == 0 and "g1" in listing.stdout
    verify = keyfleet("audit", "verify", "--db", cluster.db_url, cwd=cluster.workdir, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
