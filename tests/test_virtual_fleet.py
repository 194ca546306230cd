"""The virtual fleet against a real Mosquitto and a real ``keyfleet serve``: 20 virtual devices
(agent cores with software keys, each with its own DevID client certificate), a group created
and grown through the operator CLI, a rekey: every device ends in the same epoch with the same
epoch authenticator, and the service recorded exactly those acks. Also ``firmware-sim fleet`` as
a subprocess: it refuses without the insecure flag, and runs and says INSECURE with it."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from firmware_sim.fleet import VirtualFleet, fleet_config_text, load_fleet_config
from provisioning.db.schema import Ack, Device
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

DEVICES = 20


@dataclass
class Installation:
    workdir: Path
    config: Path
    fleet_config: Path
    db: Path
    log: Path
    service: subprocess.Popen[bytes]
    operator_args: list[str]

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return keyfleet(*args, *self.operator_args, cwd=self.workdir, timeout=timeout)


@pytest.fixture
def installation(
    tmp_path: Path, broker_pki: BrokerPKI, mosquitto_factory: object
) -> Iterator[Installation]:
    deployment = deployment_pki(tmp_path, "fleet test", broker_pki, mosquitto_factory)
    now, operator_ca, broker = deployment.now, deployment.operator_ca, deployment.broker
    files, service = deployment.files, deployment.service
    write_operator(files, operator_ca, "op-fleet", role="admin", now=now, stem="op")
    db = tmp_path / "fleet.db"
    config = tmp_path / "keyfleet.toml"
    config.write_text(
        service_config(
            db_url=f"sqlite:///{db}",
            broker=broker,
            client=service,
            instance="fleet-test",
            groups="ack_timeout_seconds = 30\n",
        )
    )
    fleet_config = tmp_path / "fleet.toml"
    fleet_config.write_text(
        fleet_config_text(
            id_prefix="dev-v",
            service_cert=service.cert_file,
            broker_host=broker.host,
            broker_port=broker.port,
            broker_ca=broker.ca_file,
            registry_url="sqlite:///fleet.db",
        )
    )
    initialized = keyfleet("db", "init", "--config", str(config), cwd=tmp_path, timeout=120)
    assert initialized.returncode == 0, initialized.stderr
    add_operator("op-fleet", "pki/op.pem", config=config, cwd=tmp_path)
    log = tmp_path / "serve.log"
    process = start_serve(config, cwd=tmp_path, log=log, timeout=30)
    cli_args = operator_args(
        broker, cert="pki/op.pem", key="pki/op.key", service_cert=service.cert_file
    )
    try:
        yield Installation(tmp_path, config, fleet_config, db, log, process, cli_args)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        print(log.read_text(errors="replace")[-20_000:])


def test_twenty_virtual_devices_are_grouped_and_rekeyed_through_the_operator_cli(
    installation: Installation,
) -> None:
    config = load_fleet_config(installation.fleet_config)
    fleet = VirtualFleet.from_config(config, DEVICES, allow_insecure=True)
    ids = [device.device_id for device in fleet.devices]
    assert ids[0] == "dev-v00001" and len(set(ids)) == DEVICES
    fleet.start(timeout=60)
    try:
        created = installation.cli("group", "create", "g1", "--members", *ids, timeout=240)
        assert created.returncode == 0, created.stdout + created.stderr
        assert f"create g1: done epoch {DEVICES - 1}" in created.stdout
        fleet.wait_epoch("g1", DEVICES - 1, timeout=30)

        rekeyed = installation.cli("rekey", "--group", "g1")
        assert rekeyed.returncode == 0, rekeyed.stdout + rekeyed.stderr
        final = rekeyed.stdout.splitlines()[-1]
        assert final.startswith(f"rekey g1: done epoch {DEVICES}"), final
        fleet.wait_epoch("g1", DEVICES, timeout=30)

        views = fleet.authenticators("g1")
        assert {view[0] for view in views.values() if view is not None} == {DEVICES}
        authenticators = {view[1] for view in views.values() if view is not None}
        assert len(authenticators) == 1 and all(v is not None for v in views.values())
        keys = {d.core.groups()["g1"].data_key() for d in fleet.devices}
        assert len(keys) == 1
        assert fleet.status().errors == 0
    finally:
        fleet.stop()

    engine = make_engine(f"sqlite:///{installation.db}")
    try:
        with session_factory(engine)() as session:
            acks = session.execute(
                select(Ack.device_id, Ack.epoch_authenticator).where(
                    Ack.group_id == "g1", Ack.epoch == DEVICES
                )
            ).all()
            registered = set(session.scalars(select(Device.device_id)))
    finally:
        engine.dispose()
    assert sorted(device for device, _ in acks) == sorted(ids)
    assert {auth for _, auth in acks} == authenticators
    assert set(ids) <= registered
    verify = keyfleet(
        "audit",
        "verify",
        "--config",
        str(installation.config),
        cwd=installation.workdir,
        timeout=120,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_firmware_sim_fleet_refuses_software_keys_without_the_flag_and_warns_with_it(
    installation: Installation,
) -> None:
    command = [
        sys.executable,
        "-m",
        "firmware_sim.cli",
        "fleet",
        "--config",
        str(installation.fleet_config),
        "--devices",
        "3",
    ]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 1
    assert "--allow-insecure-software-keys" in refused.stderr
    assert "SOFTWARE keys" in refused.stderr
    assert not (installation.workdir / "virtual").exists()  # refused before minting anything

    process = subprocess.Popen(
        [*command, "--allow-insecure-software-keys"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.strip() == "fleet: 3/3 virtual devices ready", line
    finally:
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "INSECURE: virtual fleet of 3 devices with SOFTWARE keys" in err
    assert "registered 3 virtual devices directly in the registry" in err
