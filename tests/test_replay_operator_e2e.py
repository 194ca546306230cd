"""One operator, many CLI runs at once, against two real ``keyfleet serve`` instances sharing a
database and one Mosquitto (shared subscriptions) and a virtual fleet: every command is taken.

An operator's envelope seqs are its CLI's clock in microseconds, one process per command, so its
commands reach the service out of order whenever several run at once. The service's replay
window for operators spans the commands' freshness (``store.operator_replay_window``), not 32 seq
values: nothing here may be refused as ``replay.seq-old``.

The first test makes the reordering certain instead of likely: operator clients (the CLI's own
``OperatorClient``, each with its own broker connection, as separate processes would have) whose
clocks run 2 s apart send in the order of *decreasing* seq, each after the previous command is
done. With the window of 32 every command after the first was refused. The second runs six real
CLI processes of the one operator at once.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.protocol.wire.messages.operator import Rekey
from agent.protocol.wire.messages.result import OperatorResult, ResultStatus
from firmware_sim.fleet import VirtualFleet, fleet_config_text, load_fleet_config
from provisioning import audit
from provisioning.db.schema import Group
from provisioning.operator import FINAL, OperatorClient, OperatorSettings
from provisioning.registry import make_engine, session_factory
from provisioning.service import store
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

DEVICES = 6
INSTANCES = ("a", "b")
OPERATOR = "op-batch"


@dataclass
class Deployment:
    workdir: Path
    db_url: str
    fleet: VirtualFleet
    settings: OperatorSettings
    cli_args: list[str]

    def cli_async(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "provisioning.cli", *args, *self.cli_args],
            cwd=self.workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def epoch(self, group_id: str) -> int:
        engine = make_engine(self.db_url)
        try:
            with session_factory(engine)() as s:
                group = s.get(Group, group_id)
                assert group is not None
                return group.epoch
        finally:
            engine.dispose()

    def operator_seqs(self) -> tuple[int | None, int]:
        """The operator's highest seq and how many seqs its stored guard remembers."""
        engine = make_engine(self.db_url)
        try:
            with session_factory(engine)() as s:
                guard = store.load_guard(s, OPERATOR, window=store.operator_replay_window(300))
                return guard.highest_seq(OPERATOR), guard.remembered(OPERATOR)
        finally:
            engine.dispose()

    def seq_refusals(self) -> list[str]:
        """The refusals the audit chain recorded for a seq (``replay.seq-old``,
        ``replay.seq-reused``): what one operator's concurrent CLIs used to run into."""
        engine = make_engine(self.db_url)
        try:
            with session_factory(engine)() as s:
                return [
                    f"{e.actor} {e.action}: {e.reason}"
                    for e in audit.entries(s)
                    if e.outcome.value == "refused" and "replay.seq-" in e.reason
                ]
        finally:
            engine.dispose()


@pytest.fixture
def deployment(
    tmp_path: Path, database_url: str, broker_pki: BrokerPKI, mosquitto_factory: object
) -> Iterator[Deployment]:
    pki_files = deployment_pki(tmp_path, "replay", broker_pki, mosquitto_factory)
    broker, service, files = pki_files.broker, pki_files.service, pki_files.files
    write_operator(
        files, pki_files.operator_ca, OPERATOR, role="operator", now=pki_files.now, stem="op"
    )
    configs = {}
    for name in INSTANCES:
        configs[name] = tmp_path / f"keyfleet-{name}.toml"
        configs[name].write_text(
            service_config(
                db_url=database_url,
                broker=broker,
                client=service,
                instance=name,
                groups="ack_timeout_seconds = 60\n",
                service="commit_request_timeout_seconds = 3\nsession_expiry_seconds = 0\n",
            )
        )
    fleet_config = tmp_path / "fleet.toml"
    fleet_config.write_text(
        fleet_config_text(
            id_prefix="dev-r",
            service_cert=service.cert_file,
            broker_host=broker.host,
            broker_port=broker.port,
            broker_ca=broker.ca_file,
            registry_url=database_url,
        )
    )
    first = configs[INSTANCES[0]]
    initialized = keyfleet("db", "init", "--config", str(first), cwd=tmp_path, timeout=120)
    assert initialized.returncode == 0, initialized.stderr
    add_operator(OPERATOR, "pki/op.pem", config=first, cwd=tmp_path)
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
        settings = OperatorSettings(
            host=broker.host,
            port=broker.port,
            ca=Path(broker.ca_file),
            cert=files / "op.pem",
            key=files / "op.key",
            service_cert=Path(service.cert_file),
        )
        args = operator_args(
            broker, cert="pki/op.pem", key="pki/op.key", service_cert=service.cert_file
        )
        yield Deployment(tmp_path, database_url, fleet, settings, args)
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


def device_ids(deployment: Deployment, first: int, count: int) -> list[str]:
    return [d.device_id for d in deployment.fleet.devices[first : first + count]]


def final_result(client: OperatorClient, command_id: bytes, timeout: float) -> OperatorResult:
    deadline = time.monotonic() + timeout
    while True:
        result = client.next_result(max(0.0, deadline - time.monotonic()))
        assert result is not None, "no final result in time"
        if result.command_id == command_id and result.status in FINAL:
            return result


def test_commands_arriving_in_decreasing_seq_order_are_all_taken(deployment: Deployment) -> None:
    created = keyfleet(
        "group", "create", "g1", "--members", *device_ids(deployment, 0, 3),
        *deployment.cli_args, cwd=deployment.workdir, timeout=180,
    )  # fmt: skip
    assert created.returncode == 0, created.stdout + created.stderr
    before = deployment.epoch("g1")
    highest, _ = deployment.operator_seqs()
    assert highest is not None
    seqs = []
    for i in range(6):
        lag = 2.0 * i  # this "process" read its clock 2 s before the previous one

        def clock(lag: float = lag) -> float:
            return time.time() - lag

        with OperatorClient(deployment.settings, clock=clock) as client:
            body = Rekey(client.new_command_id(), "g1")
            client.send(body)
            result = final_result(client, body.command_id, timeout=120)
        assert result.status is ResultStatus.DONE, (i, result.status, result.detail)
        seq, remembered = deployment.operator_seqs()
        assert seq is not None
        seqs.append(seq)
        # Each command's seq is about 2 s = 2,000,000 below the first one's, which stays the
        # highest: the window of 32 refused every one of these as replay.seq-old.
        assert remembered == 2 + i  # the group create's seq and each rekey's
    assert seqs[0] > highest and len(set(seqs)) == 1
    assert deployment.epoch("g1") == before + 6
    assert deployment.seq_refusals() == []


def test_six_cli_processes_of_one_operator_at_once_are_all_taken(deployment: Deployment) -> None:
    groups = {f"g{i}": device_ids(deployment, 2 * i, 2) for i in range(3)}
    creates = [
        deployment.cli_async("group", "create", g, "--members", *m) for g, m in groups.items()
    ]
    for process in creates:
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0, out + err
    created = {g: deployment.epoch(g) for g in groups}
    rekeys = [deployment.cli_async("rekey", "--group", g) for g in [*groups, *groups]]
    for process in rekeys:
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0, out + err
        assert "done epoch" in out.splitlines()[-1], out
    for group_id in groups:
        assert deployment.epoch(group_id) == created[group_id] + 2  # both rekeys
    _, remembered = deployment.operator_seqs()
    assert remembered == 9  # every command's seq, none forgotten
    assert deployment.seq_refusals() == []
