"""``firmware-sim install --reboot``: the update hook of a staged rollout switches the release slot
and makes the running ``firmware-sim device`` reboot itself into the new release (real swtpm,
real measured boot: PCRs reset and re-measured)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent.protocol.eventlog import EventType, MeasurementEvent
from agent.protocol.release import expected_pcrs
from firmware_sim import release
from tests.fixtures.swtpm import ManufacturerCA
from tests.tpm.test_firmware_sim import DeviceProcess

pytestmark = pytest.mark.tpm

TIMEOUT = 30.0


def _pcrs_of(version: str) -> dict[str, str]:
    document = release.demo_manifest(version)
    events = [
        MeasurementEvent(
            c["pcr"], EventType.IMAGE, c["name"], c["version"], bytes.fromhex(c["sha256"])
        )
        for c in document["components"]
    ]
    return {str(pcr): value.hex() for pcr, value in expected_pcrs(events).items()}


def _ready_with(ready_file: Path, boots: int) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            info: dict[str, Any] = json.loads(ready_file.read_bytes())
        except (OSError, ValueError):
            info = {}
        if info.get("boots") == boots and info.get("event") == "ready":
            return info
        time.sleep(0.05)
    raise AssertionError(f"no boot {boots} in {TIMEOUT} s: {ready_file.read_text()}")


def _install(state: Path, version: str, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "firmware_sim.cli", "install", "--state", str(state)]
    return subprocess.run(
        [*command, "--version", version, *extra],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_install_reboot_boots_the_new_release_in_the_running_device(
    tmp_path: Path, manufacturer_ca: ManufacturerCA
) -> None:
    state = tmp_path / "dev"
    ready = tmp_path / "ready.json"
    device = DeviceProcess(
        state,
        "--no-agent",
        "--ready-file",
        str(ready),
        manufacturer_ca=manufacturer_ca.directory,
    )
    try:
        first = _ready_with(ready, 1)
        assert first["pcrs"] == _pcrs_of("1.0")
        assert release.running_simulator(state) == device.process.pid
        done = _install(state, "1.1", "--reboot")
        assert done.returncode == 0, done.stderr
        assert f"rebooting (pid {device.process.pid})" in done.stdout
        second = _ready_with(ready, 2)
        assert second["pid"] == device.process.pid  # the same simulator rebooted in place
        assert second["pcrs"] == _pcrs_of("1.1")
        assert second["firmware"]["kernel"] == "1.1"
        assert second["swtpm_pid"] != first["swtpm_pid"]  # a power cycle: a fresh swtpm
    finally:
        device.kill()
    # the device is off: the install only switches the slot, nobody is asked to reboot
    assert release.running_simulator(state) is None
    off = _install(state, "1.0", "--reboot")
    assert off.returncode == 0 and "it boots next" in off.stdout
    assert release.installed_version(state) == "1.0"
