"""The virtual fleet against a real Mosquitto and a real ``keyfleet serve``: 20 virtual devices
(agent cores with software keys, each with its own DevID client certificate), a group created
through the operator CLI from a members file (its 19 joiners in one commit), a rekey: every
device ends in the same epoch with the same epoch authenticator, and the service recorded
exactly those acks. Also ``firmware-sim fleet`` as a subprocess: it refuses without the
insecure flag, and runs and says INSECURE with it."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest
from sqlalchemy import select

from agent.protocol.mls.messages import Commit, Welcome
from provisioning.db.schema import Ack, CommitLogEntry, Device
from tests.fixtures.deployment import DeployFactory
from tests.service_deployment import Deployment, keyfleet

pytestmark = pytest.mark.e2e

DEVICES = 20


@pytest.fixture
def installation(deploy: DeployFactory) -> Deployment:
    return deploy(
        "fleet test",
        instances=("fleet-test",),
        operator=("op-fleet", "admin"),
        groups="ack_timeout_seconds = 30\n",
        device_prefix="dev-v",
        log_tail=20_000,
    )


def test_twenty_virtual_devices_are_grouped_and_rekeyed_through_the_operator_cli(
    installation: Deployment,
) -> None:
    fleet = installation.virtual_fleet(DEVICES)
    ids = [device.device_id for device in fleet.devices]
    assert ids[0] == "dev-v00001" and len(set(ids)) == DEVICES
    fleet.start(timeout=60)
    try:
        members = installation.workdir / "g1-members.txt"
        members.write_text("# founders of g1\n" + "".join(f"{d}\n" for d in ids) + "\n")
        created = installation.cli("group", "create", "g1", "--members", str(members), timeout=240)
        assert created.returncode == 0, created.stdout + created.stderr
        # the approval shows the count and the digest of the sorted ids (sort -u | sha256sum)
        assert f"members:  {DEVICES}, sorted ids SHA-256 " in created.stdout + created.stderr
        # create, then one commit adding the 19 other founders (one Welcome for all); each
        # joiner's first update follows (docs/treekem.md "Joining")
        done = re.search(r"create g1: done epoch (\d+)", created.stdout)
        assert done is not None, created.stdout
        assert int(done.group(1)) >= 1
        settled = fleet.wait_settled("g1", timeout=60)
        assert settled >= int(done.group(1))

        rekeyed = installation.cli("rekey", "--group", "g1", timeout=120)
        assert rekeyed.returncode == 0, rekeyed.stdout + rekeyed.stderr
        final = rekeyed.stdout.splitlines()[-1]
        assert final.startswith(f"rekey g1: done epoch {settled + 1}"), final
        fleet.wait_epoch("g1", settled + 1, timeout=30)

        views = fleet.authenticators("g1")
        assert {view[0] for view in views.values() if view is not None} == {settled + 1}
        authenticators = {view[1] for view in views.values() if view is not None}
        assert len(authenticators) == 1 and all(v is not None for v in views.values())
        keys = {d.core.groups()["g1"].data_key() for d in fleet.devices}
        assert len(keys) == 1
        assert fleet.status().errors == 0
    finally:
        fleet.stop()

    log = installation.read(
        lambda s: s.execute(
            select(CommitLogEntry.epoch, CommitLogEntry.commit, CommitLogEntry.welcome)
            .where(CommitLogEntry.group_id == "g1")
            .order_by(CommitLogEntry.epoch)
        ).all()
    )
    adding = [(e, Commit.decode(c), w) for e, c, w in log if Commit.decode(c).content.adds]
    assert len(adding) == 1, [e for e, _, _ in adding]
    epoch, commit, welcome = adding[0]
    assert epoch == 0 and welcome is not None
    added = {kp.device_id.decode() for kp in commit.content.adds}
    creator = installation.read(
        lambda s: s.scalars(
            select(CommitLogEntry.committer).where(
                CommitLogEntry.group_id == "g1", CommitLogEntry.epoch == 0
            )
        ).one()
    )
    assert len(added) == DEVICES - 1 and added | {creator} == set(ids)
    assert len(Welcome.decode(welcome).secrets) == DEVICES - 1
    acks = installation.read(
        lambda s: s.execute(
            select(Ack.device_id, Ack.epoch_authenticator).where(
                Ack.group_id == "g1", Ack.epoch == settled + 1
            )
        ).all()
    )
    registered = installation.read(lambda s: set(s.scalars(select(Device.device_id))))
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
    installation: Deployment,
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
