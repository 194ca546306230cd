"""Staged rollouts in the local lab (real swtpm per device, Mosquitto, ``keyfleet serve``, SQLite,
``firmware-sim`` devices whose update hook is ``firmware-sim install --reboot``).

- The lab's update hook: run as the agent would run it, it switches the device's release slot and
  the running simulator reboots itself into the new release (fresh swtpm process, new measured
  boot), and the lab sees the new boot and the restarted agent.
- Six devices move from 1.0 to 1.1 in waves (canary 1, then 50%,
  100%) without losing their group state, every one trusted on 1.1 and app data encrypted
  before the update decrypting after it; an unapproved image on the canary stops the rollout and
  ``--rollback`` returns it. These two run with the fleet's release key (``Lab(releases=True)``):
  signed releases (``keyfleet release``) and the agents' PolicyAuthorize seal.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import load_config
from agent.protocol.eventlog import EventType, MeasurementEvent
from agent.protocol.release import expected_pcrs
from firmware_sim import release
from firmware_sim.lab import Lab, LabDevice
from provisioning.registry import AttestationResult, Registry
from provisioning.service import rollout

pytestmark = pytest.mark.e2e

G = "fleet-a"


def pcrs_of(version: str, document: dict[str, object] | None = None) -> dict[str, str]:
    manifest = document or release.demo_manifest(version)
    components = manifest["components"]
    assert isinstance(components, list)
    events = [
        MeasurementEvent(
            c["pcr"], EventType.IMAGE, c["name"], c["version"], bytes.fromhex(c["sha256"])
        )
        for c in components
    ]
    return {str(pcr): value.hex() for pcr, value in expected_pcrs(events).items()}


def run_hook(device: LabDevice, version: str) -> None:
    """What the agent does for ``release.install``: the configured hook, without a shell."""
    config = load_config(device.agent_config)
    assert config.install is not None, "the lab configures an update hook"
    done = subprocess.run(
        config.install.argv(version), capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr


def test_the_update_hook_reboots_a_lab_device_into_the_release(tmp_path: Path) -> None:
    with Lab(tmp_path / "lab", devices=1) as lab:
        device = lab.devices[0]
        before = device.read_ready()
        assert before is not None and before["pcrs"] == pcrs_of("1.0")
        boots, agent = before["boots"], before["agent_pid"]
        run_hook(device, "1.1")
        status = lab.wait_reboot(device, boots)
        after = device.read_ready()
        assert after is not None
        assert after["pid"] == before["pid"]  # the same simulator, rebooted in place
        assert after["pcrs"] == pcrs_of("1.1") and after["firmware"]["kernel"] == "1.1"
        assert after["agent_pid"] != agent and status["pid"] == after["agent_pid"]
        assert release.installed_version(device.state_dir) == "1.1"


def test_a_rollout_through_the_cli_with_real_agents(tmp_path: Path) -> None:
    """``keyfleet rollout start`` against ``keyfleet serve`` and real agents, to the release the
    devices already run: every device is challenged, trusted on it, relayed its group's commit,
    answers with its ack and passes, wave after wave (nothing to install); ``status`` lists it;
    a release that is not approved is refused."""
    with Lab(tmp_path / "lab", devices=2) as lab:
        created = lab.op("group", "create", G, "--members", *lab.device_ids, timeout=180)
        assert created.returncode == 0, str(created)
        lab.wait_settled(G, timeout=120)
        boots = {d.name: (d.read_ready() or {})["boots"] for d in lab.devices}
        result = lab.op(
            "rollout", "start", "1.0", "--group", G, "--canary", "1", "--then", "100%",
            operator="op-ops", timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, str(result)
        assert result.results[0]["status"] == "accepted"
        assert result.final is not None and result.final["status"] == "done"
        assert result.final["acked"] == len(lab.device_ids)
        assert {d.name: (d.read_ready() or {})["boots"] for d in lab.devices} == boots
        listed = lab.keyfleet("rollout", "status", "--config", str(lab.service_config), "--json")
        [rollout] = listed.json()
        assert rollout["state"] == "done" and rollout["waves"] == [1, 1]
        assert {d["state"] for d in rollout["devices"]} == {"passed"}
        unapproved = lab.op("rollout", "start", "9.9", "--group", G, operator="op-ops")
        assert unapproved.returncode == 1 and "rollout.version.unapproved" in str(unapproved)


def test_a_service_killed_mid_rollout_resumes_it(tmp_path: Path) -> None:
    """kill -9 of ``keyfleet serve`` while the second wave waits (its device's agent is stopped):
    the restarted service continues from the database and the operator's ``rollout start``,
    still following, gets the final result."""
    with Lab(tmp_path / "lab", devices=2) as lab:
        created = lab.op("group", "create", G, "--members", *lab.device_ids, timeout=180)
        assert created.returncode == 0, str(created)
        lab.wait_settled(G, timeout=120)
        second = sorted(lab.devices, key=lambda d: d.id)[1]
        lab.pause_agent(second)
        running = lab.keyfleet_start(
            "rollout", "start", "1.0", "--group", G, "--canary", "1", "--then", "100%",
            "--json", "--timeout", "300", operator="op-ops",
        )  # fmt: skip

        def wave() -> int:
            with lab.session() as session:
                rows = rollout.status(session)
            return int(rows[0]["wave"]) if rows else 0

        deadline = time.monotonic() + 120
        while wave() < 2:
            assert time.monotonic() < deadline, "the canary did not pass"
            time.sleep(0.2)
        lab.stop_service(kill=True)
        lab.start_service()
        lab.resume_agent(second)
        result = running.wait(300)
        assert result.returncode == 0, str(result)
        assert result.final is not None and result.final["status"] == "done"
        with lab.session() as session:
            [row] = rollout.status(session)
        assert row["state"] == "done"


# ---- with the signed releases and the PolicyAuthorize seal (Lab(releases=True)) ------------


def _approve(lab: Lab, version: str, document: dict[str, object]) -> None:
    manifest = lab.workdir / f"release-{version}.json"
    manifest.write_text(json.dumps(document))
    added = lab.op("release", "add", str(manifest), operator="op-admin")
    assert added.returncode == 0, str(added)
    approved = lab.op("release", "approve", version, operator="op-admin")
    assert approved.returncode == 0, str(approved)


@pytest.fixture
def six(tmp_path: Path) -> Iterator[Lab]:
    with Lab(tmp_path / "lab", devices=6, quarantine=True, releases=True) as lab:
        created = lab.op("group", "create", G, "--members", *lab.device_ids, timeout=180)
        assert created.returncode == 0, str(created)
        lab.wait_settled(G, timeout=120)
        yield lab


def test_six_devices_update_in_waves_and_keep_their_group(six: Lab) -> None:
    lab = six
    epochs = {d.name: d.epoch(G) for d in lab.devices}
    with lab.devices[0].api() as api:
        blob = api.encrypt(G, b"written on 1.0")
    boots = {d.name: (d.read_ready() or {})["boots"] for d in lab.devices}
    _approve(lab, "1.1", release.demo_manifest("1.1"))
    result = lab.op(
        "rollout", "start", "1.1", "--group", G, "--canary", "1", "--then", "50%,100%",
        operator="op-ops", timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, str(result)
    assert result.final is not None and result.final["status"] == "done"
    assert result.final["acked"] == len(lab.device_ids)
    status = lab.keyfleet("rollout", "status", "--config", str(lab.service_config), "--json")
    [rollout] = status.json()
    assert rollout["state"] == "done" and rollout["waves"] == [1, 2, 3]
    for device in lab.devices:
        lab.wait_reboot(device, boots[device.name])
        ready = device.read_ready()
        assert ready is not None and ready["pcrs"] == pcrs_of("1.1")
        # the same epoch history: nobody was re-added, nobody lost its group
        assert device.epoch(G) == epochs[device.name]
        with device.api() as api:
            assert api.decrypt(G, blob) == b"written on 1.0"
    with lab.session() as session:
        for device in lab.devices:
            assert (
                Registry(session).device(device.id).attestation_result is AttestationResult.TRUSTED
            )


def test_an_unapproved_image_stops_the_canary_and_rollback_returns_it(six: Lab) -> None:
    lab = six
    canary = sorted(lab.devices, key=lambda d: d.id)[0]
    boots = {d.name: (d.read_ready() or {})["boots"] for d in lab.devices}
    # release 1.2 approved with a kernel other than the one the devices' 1.2 boots
    document = release.demo_manifest("1.2")
    kernel = next(c for c in document["components"] if c["name"] == "kernel")
    kernel["sha256"] = os.urandom(32).hex()
    _approve(lab, "1.2", document)
    result = lab.op(
        "rollout", "start", "1.2", "--group", G, "--canary", "1", "--then", "100%", "--rollback",
        operator="op-ops", timeout=900,
    )  # fmt: skip
    assert result.returncode == 5, str(result)  # rolled back
    assert result.final is not None and "untrusted (kernel)" in result.final["detail"]
    assert release.installed_version(canary.state_dir) == "1.0"
    lab.wait_agent(canary)
    assert (canary.read_ready() or {})["pcrs"] == pcrs_of("1.0")
    for device in lab.devices:
        if device is not canary:
            assert (device.read_ready() or {})["boots"] == boots[device.name]  # not touched
