"""Dual control end to end over a real Mosquitto (mutual TLS, the product ACL): ``keyfleet serve``
as a subprocess with ``[quorum] min_approvals = 2``, two operators running the CLI as
subprocesses, software MLS members on the broker with their own DevID certificates; the database
is a SQLite file and a real PostgreSQL.

Shown: one operator alone leaves a change pending (the direct command exits 4 naming the
request); the second operator's ``keyfleet approve`` runs it; ``keyfleet requests`` lists what is
pending; an expired request cannot be approved and its expiry is audited.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from provisioning import audit, pki
from provisioning.registry import Registry, create_schema, make_engine, session_factory
from tests.broker.test_service_mqtt import MemberThread
from tests.fixtures.mosquitto import DEFAULT_LOG_TYPES, BrokerFactory, BrokerPKI
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

DEVICES = ("dev-a", "dev-b", "dev-c")
OPERATORS = ("op-alice", "op-bob")
TTL = 30
REQUEST_ID = re.compile(r"keyfleet approve ([0-9a-f]{32})")


@dataclass
class QuorumDeployment:
    workdir: Path
    config: Path
    database_url: str
    members: dict[str, MemberThread]
    args: dict[str, list[str]]

    def cli(self, operator: str, *args: str, timeout: float = 90) -> _Run:
        done = keyfleet(*args, *self.args[operator], cwd=self.workdir, timeout=timeout)
        return _Run(done.returncode, done.stdout, done.stderr)

    def members_of(self, group: str) -> list[str]:
        engine = make_engine(self.database_url)
        try:
            with session_factory(engine)() as session:
                return sorted(
                    m.device_id
                    for m in Registry(session).members(group)
                    if m.leaf_index is not None
                )
        finally:
            engine.dispose()

    def audit_actions(self) -> list[tuple[str, str, str]]:
        engine = make_engine(self.database_url)
        try:
            with session_factory(engine)() as session:
                return [(e.action, e.target, e.outcome.value) for e in audit.entries(session)]
        finally:
            engine.dispose()


@dataclass
class _Run:
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"exit {self.returncode}\n{self.stdout}\n{self.stderr}"


@pytest.fixture
def deployment(
    tmp_path: Path, broker_pki: BrokerPKI, mosquitto_factory: BrokerFactory, database_url: str
) -> Iterator[QuorumDeployment]:
    fleet = deployment_pki(
        tmp_path, "quorum", broker_pki, mosquitto_factory, log_types=DEFAULT_LOG_TYPES
    )
    now, device_ca, operator_ca = fleet.now, fleet.device_ca, fleet.operator_ca
    broker, service_files, files = fleet.broker, fleet.service, fleet.files
    config = tmp_path / "keyfleet.toml"
    config.write_text(
        service_config(
            db_url=database_url,
            broker=broker,
            client=service_files,
            instance="quorum",
            groups="ack_timeout_seconds = 6\n",
            service="commit_request_timeout_seconds = 3\n",
            quorum=f"min_approvals = 2\nrequest_ttl_seconds = {TTL}\n",
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
    args = {}
    for name in OPERATORS:
        write_operator(files, operator_ca, name, role="operator", now=now, stem=name)
        add_operator(name, f"pki/{name}.pem", config=config, cwd=tmp_path)
        args[name] = operator_args(
            broker,
            cert=f"pki/{name}.pem",
            key=f"pki/{name}.key",
            service_cert=fleet.signing_cert,
        )
    log = tmp_path / "serve.log"
    service = start_serve(config, cwd=tmp_path, log=log, timeout=20)
    for member in members.values():
        member.start()
    try:
        yield QuorumDeployment(tmp_path, config, database_url, members, args)
    finally:
        for member in members.values():
            member.close()
        if service.poll() is None:
            service.kill()
            service.wait(10)
        print(log.read_text(errors="replace")[-20_000:])


def pending(deployment: QuorumDeployment, operator: str) -> list[dict[str, object]]:
    listed = deployment.cli(operator, "requests", "--json")
    assert listed.returncode == 0, str(listed)
    rows: list[dict[str, object]] = json.loads(listed.stdout)
    return rows


def test_two_operators_approve_one_alone_cannot_an_expired_request_cannot_be_approved(
    deployment: QuorumDeployment,
) -> None:
    # One operator's direct command is a request waiting for a second approval.
    created = deployment.cli("op-alice", "group", "create", "g1", "--members", "dev-a", "dev-b")
    assert created.returncode == 4, str(created)
    match = REQUEST_ID.search(created.stdout)
    assert match is not None, str(created)
    assert all("g1" not in m.device.groups for m in deployment.members.values())
    approved = deployment.cli("op-bob", "approve", match.group(1), "--yes")
    assert approved.returncode == 0, str(approved)
    assert "op:       group.create" in approved.stdout
    assert ": done epoch 1" in approved.stdout.splitlines()[-1], str(approved)
    assert deployment.members_of("g1") == ["dev-a", "dev-b"]

    # A removal nobody else approves: it will expire.
    stale = deployment.cli("op-alice", "propose", "group-remove", "g1", "dev-b")
    assert stale.returncode == 0, str(stale)
    stale_id = REQUEST_ID.search(stale.stdout)
    assert stale_id is not None, str(stale)
    proposed_at = time.monotonic()

    # An add with one approval stays pending: listed, nothing changes.
    add = deployment.cli("op-alice", "propose", "group-add", "g1", "dev-c", "--json")
    assert add.returncode == 0, str(add)
    add_line = json.loads(add.stdout.splitlines()[-1])
    add_id = add_line["request"]["request_id"]
    assert add_line["request"]["state"] == "pending"
    assert add_line["request"]["approvers"] == ["op-alice"]
    rows = {str(r["request_id"]): r for r in pending(deployment, "op-bob")}
    assert set(rows) == {stale_id.group(1), add_id}
    assert rows[add_id]["required"] == 2 and rows[add_id]["members"] == ["dev-c"]
    assert "g1" not in deployment.members["dev-c"].device.groups
    assert deployment.members_of("g1") == ["dev-a", "dev-b"]
    # The same operator again does not make two.
    again = deployment.cli("op-alice", "approve", add_id, "--yes")
    assert again.returncode == 1 and "quorum.duplicate" in again.stderr, str(again)
    assert deployment.members_of("g1") == ["dev-a", "dev-b"]

    # The second operator's approval runs the add.
    added = deployment.cli("op-bob", "approve", add_id, "--yes", "--json")
    assert added.returncode == 0, str(added)
    final = json.loads(added.stdout.splitlines()[-1])
    assert final["status"] == "done", final
    assert final["acked"] == 3 and final["pending"] == 0
    assert deployment.members_of("g1") == ["dev-a", "dev-b", "dev-c"]
    epochs = {m.device.groups["g1"].epoch_authenticator for m in deployment.members.values()}
    assert len(epochs) == 1

    # The removal's window passes: it cannot be approved any more, and its expiry is audited.
    time.sleep(max(0.0, TTL + 2 - (time.monotonic() - proposed_at)))
    late = deployment.cli("op-bob", "approve", stale_id.group(1), "--yes")
    assert late.returncode == 1, str(late)
    assert "expired" in late.stdout + late.stderr
    assert deployment.members_of("g1") == ["dev-a", "dev-b", "dev-c"]
    assert pending(deployment, "op-alice") == []
    actions = deployment.audit_actions()
    assert ("request.expire", stale_id.group(1), "accepted") in actions
    assert ("request.execute", add_id, "accepted") in actions
    assert [a for a in actions if a[0] == "request.approve" and a[1] == add_id] == [
        ("request.approve", add_id, "accepted"),
        ("request.approve", add_id, "accepted"),
    ]


def test_a_group_by_tag_names_the_tagged_devices_and_needs_the_quorum(
    deployment: QuorumDeployment,
) -> None:
    """``keyfleet device tag`` (one operator, at once), ``keyfleet devices --tag``, then ``group
    create --all-in`` and ``group add --all-in``: each a request naming the tagged devices that
    the second operator approves after seeing them."""
    for device in ("dev-a", "dev-b"):
        tagged = deployment.cli("op-alice", "device", "tag", device, "--add", "plant-a")
        assert tagged.returncode == 0 and f"{device}: tags plant-a" in tagged.stdout, str(tagged)
    bad = deployment.cli("op-alice", "device", "tag", "dev-c", "--add", "Plant A")
    assert bad.returncode == 2 and "[tag.invalid]" in bad.stderr, str(bad)
    listed = keyfleet(
        "devices", "--tag", "plant-a", "--json", "--config", str(deployment.config),
        cwd=deployment.workdir,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["device_id"], r["tags"]) for r in rows] == [
        ("dev-a", ["plant-a"]),
        ("dev-b", ["plant-a"]),
    ]

    created = deployment.cli("op-alice", "group", "create", "g1", "--all-in", "plant-a")
    assert created.returncode == 4, str(created)
    assert "  member:   dev-a\n  member:   dev-b\n" in created.stdout, str(created)
    match = REQUEST_ID.search(created.stdout)
    assert match is not None, str(created)
    approved = deployment.cli("op-bob", "approve", match.group(1), "--yes")
    assert approved.returncode == 0, str(approved)
    assert "member:   dev-a (DevID key SHA-256" in approved.stdout
    assert deployment.members_of("g1") == ["dev-a", "dev-b"]

    # tagged later: a new request by the same tag adds only it
    tagged = deployment.cli("op-alice", "device", "tag", "dev-c", "--add", "plant-a")
    assert tagged.returncode == 0, str(tagged)
    add = deployment.cli("op-alice", "group", "add", "g1", "--all-in", "plant-a")
    assert add.returncode == 4 and "  member:   dev-c\n" in add.stdout, str(add)
    match = REQUEST_ID.search(add.stdout)
    assert match is not None, str(add)
    approved = deployment.cli("op-bob", "approve", match.group(1), "--yes")
    assert approved.returncode == 0, str(approved)
    assert deployment.members_of("g1") == ["dev-a", "dev-b", "dev-c"]
    # nothing left to add by that tag
    empty = deployment.cli("op-alice", "group", "add", "g1", "--all-in", "plant-a")
    assert empty.returncode == 1 and "[tag.empty]" in empty.stdout + empty.stderr, str(empty)
    assert ("device.tag", "dev-c", "accepted") in deployment.audit_actions()
