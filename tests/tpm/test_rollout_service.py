"""Staged rollouts through the delivery service (sans-I/O core, real SQLite file, real swtpm
quotes): members are software MLS devices whose TPM is power-cycled and re-measured when they
"install" a release (``release.install``), the way firmware-sim's update hook reboots a device.
Waves move in order, an untrusted device or a failed install stops the rollout (``--rollback``
returns the wave), a lost install is sent again, a stuck wave times out, and a new service object
on the same database continues a rollout the old one started (what a kill -9 leaves). On a
SQLite file and on PostgreSQL."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.protocol.wire.envelope import VerifiedMessage
from agent.protocol.wire.messages.group import CommitMessage
from agent.protocol.wire.messages.key_state import KeyStateReport
from agent.protocol.wire.messages.release import (
    InstallResult,
    InstallState,
    ReleaseInstall,
    RolloutAbort,
    RolloutStart,
)
from agent.protocol.wire.messages.result import OperatorResult, ResultStatus
from firmware_sim.boot import default_components, tampered
from provisioning import cli
from provisioning.policy import policy_from_components
from provisioning.registry import DeviceState, Registry
from provisioning.service import rollout
from provisioning.service.core import AttestationSettings, DeliveryService
from tests.fixtures.swtpm import SwtpmFactory
from tests.pure.test_service_core import Fleet, create_g1, make_fleet
from tests.service_members import Outgoing
from tests.tpm.test_attestation_service import AttestingDevice, make_attesting

pytestmark = pytest.mark.tpm
DATABASE_BACKENDS = ("sqlite", "postgresql")

NAMES = ("dev-1", "dev-2", "dev-3", "dev-4")
POLICY = policy_from_components(default_components("1.0")).approve(default_components("1.1"))
WAVE_TIMEOUT = 120


@dataclass
class UpdatingDevice(AttestingDevice):
    """An attesting member with an update hook: ``release.install`` reboots its TPM into the
    release (or a tampered build of it), or fails, or is lost (its agent died before the hook
    ran); its restarted agent's first keys.report carries no install result. It keeps its group
    state (what the PolicyAuthorize seal gives a real device) unless ``lose_state``, and answers
    a relayed commit it already applied with its ack, as keyagent does."""

    release: str = "1.0"
    installs: list[ReleaseInstall] = field(default_factory=list)
    fail_install: str | None = None
    tamper_on: str | None = None
    drop_installs: int = 0
    lose_state: bool = False  # its group state does not survive the update

    def _handle(self, message: VerifiedMessage, now: int) -> list[Outgoing]:
        body = message.body
        if isinstance(body, CommitMessage):
            group = self.groups.get(body.group_id)
            if group is not None and body.epoch < group.epoch:
                # as keyagent answers an already-applied commit: with its ack of where it is
                return [self._ack(body.group_id, now)]
        if not isinstance(body, ReleaseInstall):
            return super()._handle(message, now)
        self.installs.append(body)
        if self.drop_installs:
            self.drop_installs -= 1
            return []
        if self.fail_install is not None:
            result = InstallResult(
                body.rollout, body.version, InstallState.FAILED, self.fail_install
            )
            return [self.report(KeyStateReport((), install=result), now)]
        components = default_components(body.version)
        if body.version == self.tamper_on:
            components = tampered(components, "kernel")
        self.boot(components)
        self.release = body.version
        if self.lose_state:
            self.groups.clear()
        return [self.report(KeyStateReport(()), now)]


def _service(fleet: Fleet, *, instance: str = "1") -> DeliveryService:
    old = fleet.service
    return DeliveryService(
        fleet.sessions,
        signing_key=old._env.key,
        operator_ca=old._env.operator_ca,
        device_ca=old._env.devices.device_ca,
        settings=old.settings,
        attestation=AttestationSettings(policy=POLICY, interval=3600, quarantine=True),
        instance=instance,
    )


@pytest.fixture
def fleet(
    tmp_path: Path, swtpm_factory: SwtpmFactory, database_backend: str, database_url: str
) -> Iterator[Fleet]:
    url = database_url if database_backend == "postgresql" else None
    for fleet in make_fleet(tmp_path, NAMES, url=url, rollout_wave_timeout=WAVE_TIMEOUT):
        fleet.service = _service(fleet)
        make_attesting(fleet, swtpm_factory, UpdatingDevice)
        create_g1(fleet)
        yield fleet


def member(fleet: Fleet, name: str) -> UpdatingDevice:
    device = fleet.devices[name]
    assert isinstance(device, UpdatingDevice)
    return device


def start(fleet: Fleet, *waves: str, version: str = "1.1", rollback: bool = False) -> bytes:
    body = RolloutStart(os.urandom(16), version, "g1", waves, rollback or None)
    return fleet.command("op-alice", body)


def run(fleet: Fleet, command_id: bytes, ticks: int = 40) -> OperatorResult:
    """Tick (one second each) until the rollout's final result."""
    for _ in range(ticks):
        last = fleet.results[command_id][-1]
        if last.status not in (ResultStatus.ACCEPTED, ResultStatus.IN_PROGRESS):
            return last
        fleet.tick(1)
    return fleet.final(command_id)


def status(fleet: Fleet) -> dict[str, object]:
    with fleet.sessions() as session:
        [row] = rollout.status(session)
    return row


def test_waves_install_in_order_then_the_rollout_is_done(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    epoch = fleet.epoch("g1")
    cid = start(fleet, "1", "50%", "100%")
    accepted = fleet.results[cid][0]
    assert accepted.status is ResultStatus.ACCEPTED and "in waves of 1,1,2" in accepted.detail
    # the canary first, alone: the others are not touched before it passed
    assert [len(member(fleet, n).installs) for n in NAMES] == [1, 0, 0, 0]
    fleet.tick(1)  # acked at the group's epoch: the canary passes, wave 2 starts
    assert [len(member(fleet, n).installs) for n in NAMES] == [1, 1, 0, 0]
    final = run(fleet, cid)
    assert final.status is ResultStatus.DONE, final.detail
    assert final.acked == len(NAMES) and final.pending == 0 and final.stragglers == ()
    assert all(member(fleet, n).release == "1.1" for n in NAMES)
    row = status(fleet)
    assert row["state"] == "done" and row["waves"] == [1, 1, 2]
    devices = row["devices"]
    assert isinstance(devices, list)
    assert {(d["device"], d["state"], d["previous"]) for d in devices} == {
        (n, "passed", "1.0") for n in NAMES
    }
    # the group kept its epoch: no device was re-added
    assert fleet.epoch("g1") == epoch
    actions = [e.action for e in fleet.audit_entries()]
    assert "op.rollout.start" in actions and "rollout.done" in actions

    # keyfleet rollout status reads the same from the database
    db = fleet.sessions.kw["bind"].url.render_as_string(hide_password=False)
    assert cli.main(["rollout", "status", "--db", db, "--json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert listed == json.loads(json.dumps(row))
    assert cli.main(["rollout", "status", str(row["rollout"]), "--db", db]) == 0
    shown = capsys.readouterr().out
    assert "done" in shown and "dev-4" in shown and "passed" in shown


def test_an_unapproved_image_stops_the_canary_and_rollback_returns_it(fleet: Fleet) -> None:
    member(fleet, "dev-1").tamper_on = "1.1"
    cid = start(fleet, "1", "100%", rollback=True)
    final = run(fleet, cid)
    assert final.status is ResultStatus.FAILED
    assert "rolled-back" in final.detail and "dev-1 untrusted (kernel)" in final.detail
    canary = member(fleet, "dev-1")
    assert [(i.version) for i in canary.installs] == ["1.1", "1.0"]
    assert canary.release == "1.0"
    # nobody else was touched
    assert all(member(fleet, n).installs == [] for n in NAMES[1:])
    row = status(fleet)
    assert row["state"] == "rolled-back" and row["device"] == "dev-1"
    # quarantined by the untrusted verdict, active again on the approved release
    with fleet.sessions() as session:
        assert Registry(session).device("dev-1").state is DeviceState.ACTIVE
    entries = fleet.audit_entries()
    assert any(e.action == "device.quarantine" and e.target == "dev-1" for e in entries)
    assert any(e.action == "rollout.rollback" for e in entries)


def test_a_failed_install_stops_the_rollout_naming_device_and_check(fleet: Fleet) -> None:
    member(fleet, "dev-1").fail_install = "release.install.failed"
    cid = start(fleet, "1", "100%")
    final = run(fleet, cid)
    assert final.status is ResultStatus.FAILED
    assert "dev-1: install of 1.1 failed [release.install.failed]" in final.detail
    assert status(fleet)["state"] == "failed"
    assert all(member(fleet, n).installs == [] for n in NAMES[1:])


def test_a_wave_that_does_not_pass_in_time_ends_in_timeout(fleet: Fleet) -> None:
    member(fleet, "dev-1").drop_installs = 99  # the hook never runs, the agent never returns
    cid = start(fleet, "1", "100%")
    final = run(fleet, cid, ticks=WAVE_TIMEOUT + 5)
    assert final.status is ResultStatus.TIMEOUT
    assert "wave 1 not passed within" in final.detail and "dev-1 installing" in final.detail
    assert status(fleet)["device"] == "dev-1"


def test_refusals_change_nothing(fleet: Fleet) -> None:
    for version, group, waves, check in (
        ("1.2", "g1", ("1",), "rollout.version.unapproved"),
        ("1.1", "nope", ("1",), "rollout.group.unknown"),
    ):
        cid = fleet.command("op-alice", RolloutStart(os.urandom(16), version, group, waves))
        refused = fleet.final(cid)
        assert refused.status is ResultStatus.REJECTED and check in refused.detail
    viewer = fleet.command("op-viewer", RolloutStart(os.urandom(16), "1.1", "g1", ("1",)))
    assert "op.role" in fleet.final(viewer).detail
    with fleet.sessions() as session:
        assert rollout.status(session) == []
    first = start(fleet, "1", "100%")
    second = start(fleet, "100%")
    busy = fleet.final(second)
    assert busy.status is ResultStatus.REJECTED and "rollout.group.busy" in busy.detail
    rollout_id = status(fleet)["rollout"]
    assert isinstance(rollout_id, str)
    abort = fleet.command("op-alice", RolloutAbort(os.urandom(16), rollout_id))
    assert fleet.final(abort).status is ResultStatus.DONE
    assert fleet.final(first).status is ResultStatus.FAILED
    assert status(fleet)["state"] == "aborted"
    again = fleet.command("op-alice", RolloutAbort(os.urandom(16), rollout_id))
    assert "rollout.over" in fleet.final(again).detail
    # the group is free again
    third = start(fleet, "100%")
    assert run(fleet, third).status is ResultStatus.DONE


def test_a_lost_install_is_sent_again_and_a_new_service_continues(fleet: Fleet) -> None:
    canary = member(fleet, "dev-1")
    canary.drop_installs = 1  # the agent was killed before its hook ran
    cid = start(fleet, "1", "100%")
    assert len(canary.installs) == 1 and canary.release == "1.0"
    # its agent restarts and reconnects: a keys.report without the install
    fleet.send(canary.report(KeyStateReport(()), fleet.now + 1))
    assert [i.version for i in canary.installs] == ["1.1", "1.1"] and canary.release == "1.1"
    fleet.tick(1)
    assert status(fleet)["wave"] == 2
    # the service dies (kill -9: its object is gone, the database file stays); another
    # instance starts on the same file and, once the dead one's task lease ran out, continues
    fleet.service = _service(fleet, instance="2")
    final = run(fleet, cid, ticks=60)
    assert final.status is ResultStatus.DONE, final.detail
    assert all(member(fleet, n).release == "1.1" for n in NAMES)
    devices = status(fleet)["devices"]
    assert isinstance(devices, list)
    assert next(d for d in devices if d["device"] == "dev-1")["attempts"] == 2


def test_a_device_that_lost_its_group_state_does_not_pass(fleet: Fleet) -> None:
    """Trusted on the release is not enough: without an ack of the group's epoch after the
    verdict (its ack from before the update does not count) the wave does not pass."""
    member(fleet, "dev-1").lose_state = True
    cid = start(fleet, "1", "100%")
    final = run(fleet, cid, ticks=WAVE_TIMEOUT + 5)
    assert final.status is ResultStatus.TIMEOUT
    assert "dev-1 attested" in final.detail
    assert all(member(fleet, n).installs == [] for n in NAMES[1:])
