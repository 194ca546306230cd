"""``keyfleet serve`` as a subprocess against a real Mosquitto (mutual TLS, the product ACL), the
operator CLI as a subprocess, and software MLS members connected with their own DevID client
certificates answering commit requests and acking over the real broker."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.mqtt import MqttClient
from agent.protocol.mls import group as group_module
from agent.protocol.topics import device_cmd_topic
from provisioning import pki
from provisioning.registry import create_schema, make_engine, session_factory
from tests.fixtures.mosquitto import DEFAULT_LOG_TYPES, BrokerFactory, BrokerPKI, MosquittoBroker
from tests.fixtures.postgres import dump_rows
from tests.service_deployment import (
    add_operator,
    deployment_pki,
    keyfleet,
    operator_args,
    service_config,
    start_serve,
    write_operator,
    write_pem,
)
from tests.service_members import SoftDevice

pytestmark = pytest.mark.broker
# the service on a SQLite file and on PostgreSQL (tests/fixtures/postgres.py)
DATABASE_BACKENDS = ("sqlite", "postgresql")

ROOT = Path(__file__).resolve().parents[2]
DEVICES = ("dev-a", "dev-b", "dev-c")


class MemberThread:
    """One software member on the real broker: its own DevID client certificate, its command
    topic and every group's commit topic, answering as a keyagent would."""

    def __init__(
        self, device: SoftDevice, broker: MosquittoBroker, key_file: Path, cert_file: Path
    ):
        self.device = device
        self.client = MqttClient(
            host=broker.host,
            port=broker.port,
            ca_file=broker.ca_file,
            cert_file=cert_file,
            key_file=key_file,
            client_id=device.device_id,
        )
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=device.device_id, daemon=True)

    def start(self) -> None:
        self.client.connect()
        self.client.subscribe(device_cmd_topic(self.device.device_id))
        self.client.subscribe("kf/v1/grp/+/commit")
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            message = self.client.get(timeout=0.1)
            if message is None:
                continue
            for topic, payload in self.device.receive(
                message.topic, message.payload, int(time.time())
            ):
                self.client.publish(topic, payload)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.client.close()


@dataclass
class Deployment:
    workdir: Path
    config: Path
    db: Path
    log: Path
    service: subprocess.Popen[bytes]
    members: dict[str, MemberThread]
    operator_args: list[str]
    database_url: str

    def cli(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return keyfleet(*args, *self.operator_args, cwd=self.workdir, timeout=timeout)


@pytest.fixture
def deployment(
    tmp_path: Path, broker_pki: BrokerPKI, mosquitto_factory: BrokerFactory, database_url: str
) -> Iterator[Deployment]:
    fleet = deployment_pki(
        tmp_path, "test", broker_pki, mosquitto_factory, log_types=DEFAULT_LOG_TYPES
    )
    now, device_ca, operator_ca = fleet.now, fleet.device_ca, fleet.operator_ca
    broker, service_files, files = fleet.broker, fleet.service, fleet.files
    db = tmp_path / "fleet.db"
    config = tmp_path / "keyfleet.toml"
    config.write_text(
        service_config(
            db_url=database_url,
            broker=broker,
            client=service_files,
            instance="test",
            groups="ack_timeout_seconds = 6\ncommit_log_retention_epochs = 16\n",
            service="commit_request_timeout_seconds = 3\n",
        )
    )
    engine = make_engine(database_url)
    create_schema(engine)
    sessions = session_factory(engine)
    service_public = fleet.signing_public_key()
    members: dict[str, MemberThread] = {}
    for name in DEVICES:
        device = SoftDevice.create(name, device_ca, service_public, now)
        device.register(sessions, int(time.time()))
        key_file = write_pem(files / f"{name}.key", pki.key_to_pem(device.devid), private=True)
        cert_file = write_pem(files / f"{name}.pem", device.cert_pem.encode())
        members[name] = MemberThread(device, broker, key_file, cert_file)
    engine.dispose()

    write_operator(files, operator_ca, "op-alice", role="admin", now=now, stem="op-alice")
    added = add_operator("op-alice", "pki/op-alice.pem", config=config, cwd=tmp_path)
    assert added.stdout.strip() == "operator op-alice registered with role admin"

    log = tmp_path / "serve.log"
    service = start_serve(config, cwd=tmp_path, log=log, timeout=20)
    for member in members.values():
        member.start()
    cli_args = operator_args(
        broker,
        cert="pki/op-alice.pem",
        key="pki/op-alice.key",
        service_cert=fleet.signing_cert,
    )
    deployment = Deployment(tmp_path, config, db, log, service, members, cli_args, database_url)
    try:
        yield deployment
    finally:
        for member in members.values():
            member.close()
        if service.poll() is None:
            service.kill()
            service.wait(10)
        print(log.read_text(errors="replace")[-20_000:])


def test_rekey_over_mqtt_shows_acks_and_times_out_naming_a_silent_member(
    deployment: Deployment,
) -> None:
    created = deployment.cli("group", "create", "g1", "--members", *DEVICES)
    assert created.returncode == 0, created.stdout + created.stderr
    # the create, then one commit adding the two other founders
    assert "create g1: done epoch 1" in created.stdout
    groups = {name: m.device.groups["g1"] for name, m in deployment.members.items()}
    assert len({g.epoch_authenticator for g in groups.values()}) == 1

    rekeyed = deployment.cli("rekey", "--group", "g1")
    assert rekeyed.returncode == 0, rekeyed.stdout + rekeyed.stderr
    lines = rekeyed.stdout.splitlines()
    assert lines[0].startswith("rekey g1: accepted")
    assert any("acked epoch 2" in line and "pending" in line for line in lines), lines
    assert lines[-1].startswith("rekey g1: done epoch 2")
    assert "| 3 acked, 0 pending" in lines[-1]
    keys = {m.device.groups["g1"].data_key() for m in deployment.members.values()}
    assert len(keys) == 1

    as_json = deployment.cli("rekey", "--group", "g1", "--json")
    assert as_json.returncode == 0, as_json.stderr
    final = json.loads(as_json.stdout.splitlines()[-1])
    assert final["status"] == "done" and final["epoch"] == 3
    assert final["acked"] == len(DEVICES) and final["pending"] == 0 and final["stragglers"] == []

    # dev-c goes silent: it still receives, never answers. The service asks another member
    # to commit, dev-a and dev-b ack, dev-c does not: the CLI exits 3 naming it.
    deployment.members["dev-c"].device.silent = True
    silent = deployment.cli("rekey", "--group", "g1", "--timeout", "60")
    assert silent.returncode == 3, silent.stdout + silent.stderr
    assert "stragglers: dev-c" in silent.stderr
    assert "timeout" in silent.stdout.splitlines()[-1]

    listing = keyfleet("groups", "--config", str(deployment.config), cwd=deployment.workdir)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.split("\n")[1].split()[:4] == ["g1", "4", "dev-a,dev-b,dev-c", "dev-c"]

    # The service's database and its log hold none of the members' group secrets.
    secrets = [s for m in deployment.members.values() for s in m.device.secrets()]
    assert len(secrets) > 20
    if deployment.database_url.startswith("sqlite"):
        stored = b"".join(
            p.read_bytes() for p in deployment.db.parent.iterdir() if p.name.startswith("fleet.db")
        )
    else:  # every value of every table the service wrote
        stored = dump_rows(deployment.database_url)
    assert b"accepted" in stored
    service_log = deployment.log.read_bytes()
    assert b"accepted the commit" in service_log
    for secret in secrets:
        for blob in (stored, service_log):
            assert secret not in blob
            assert secret.hex().encode() not in blob

    # SIGTERM: a clean exit.
    deployment.service.send_signal(signal.SIGTERM)
    assert deployment.service.wait(15) == 0
    assert b"keyfleet serve: stopped" in deployment.log.read_bytes()

    verify = keyfleet("audit", "verify", "--config", str(deployment.config), cwd=deployment.workdir)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_founders_join_through_tree_pages_served_over_the_broker(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Welcomes without their tree (the inline bound set to 0 for the members in this process,
    who commit: what a group past 256 members does): each joiner asks ``keyfleet serve`` for the
    tree (``group.tree_request`` on its report topic, ``svc.tree_page`` on its command topic,
    through the product ACL), checks its hash against the signed GroupInfo and joins."""
    monkeypatch.setattr(group_module, "INLINE_TREE_LEAVES", 0)
    created = deployment.cli("group", "create", "g1", "--members", *DEVICES)
    assert created.returncode == 0, created.stdout + created.stderr
    assert "create g1: done epoch 1" in created.stdout
    devices = [m.device for m in deployment.members.values()]
    assert len({d.groups["g1"].epoch_authenticator for d in devices}) == 1
    assert sorted(d.tree_pages for d in devices) == [0, 1, 1]  # the founder; two joiners
    assert not any(d.refusals for d in devices), [d.refusals for d in devices]


def test_operator_cli_refusals_and_usage(deployment: Deployment) -> None:
    missing = keyfleet("rekey", "--group", "g1", cwd=deployment.workdir)
    assert missing.returncode == 2 and "--broker" in missing.stderr
    unknown = deployment.cli("rekey", "--group", "nope")
    assert unknown.returncode == 1
    assert "registry.group.unknown" in unknown.stderr
