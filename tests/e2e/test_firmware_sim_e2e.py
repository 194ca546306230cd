"""A ``firmware-sim device`` subprocess provisioned by the station (``keyprovision``'s Station
over the device's pty) against the enrollment service over real HTTPS: afterwards the console is
locked (identity only), the device runs its agent (``keyagent run``) with a config that points at
the device's own TPM, a reboot comes back provisioned, a reboot into a patched kernel leaves the
agent's state sealed to the old measurements, and SIGTERM stops agent and swtpm."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.daemon import read_status
from agent.protocol.errors import ProtocolError, StateError
from agent.serial_link import SerialClient
from firmware_sim.boot import PCR_MAP
from firmware_sim.swtpm import pid_alive
from provisioning.station import Station
from tests.e2e.test_provisioning_e2e import FAST_TIMEOUTS
from tests.fixtures.swtpm import ManufacturerCA
from tests.fixtures.wedge import wait_for
from tests.tpm.test_enroll import EnrollmentService, devices_in, enrollment_service
from tests.tpm.test_firmware_sim import DeviceProcess, identity

pytestmark = pytest.mark.e2e

PCRS = sorted(set(PCR_MAP.values()))


@pytest.fixture
def fleet_service(tmp_path: Path, manufacturer_ca: ManufacturerCA) -> Iterator[EnrollmentService]:
    with enrollment_service(tmp_path / "pki", tmp_path / "fleet.db", manufacturer_ca) as service:
        yield service


@pytest.fixture
def devices(tmp_path: Path) -> Iterator[list[DeviceProcess]]:
    started: list[DeviceProcess] = []
    yield started
    for process in started:
        process.kill()


def _start(
    devices: list[DeviceProcess], state: Path, ca: ManufacturerCA, *extra: str
) -> DeviceProcess:
    process = DeviceProcess(state, *extra, manufacturer_ca=ca.directory)
    devices.append(process)
    return process


def _wait_agent_status(state: Path, pid: int, timeout: float = 30.0) -> dict[str, Any]:
    """The status the agent with ``pid`` wrote once its state was loaded (state key unsealed,
    or found sealed elsewhere). It saves its state, and so this status, before it opens its
    local API socket."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(StateError):
            status = read_status(str(state / "agent.toml"))
            if status.get("pid") == pid:
                return status
        assert pid_alive(pid), _agent_log(state)
        time.sleep(0.05)
    raise AssertionError(f"agent {pid} wrote no status in {timeout} s: {_agent_log(state)}")


def _agent_log(state: Path) -> str:
    try:
        return (state / "agent.log").read_text(errors="replace")[-3000:]
    except OSError:
        return "(no agent log)"


def test_station_provisions_a_firmware_sim_device_then_its_console_is_locked(
    fleet_service: EnrollmentService,
    devices: list[DeviceProcess],
    tmp_path: Path,
    manufacturer_ca: ManufacturerCA,
) -> None:
    state = tmp_path / "fleet" / "dev1"
    device = _start(devices, state, manufacturer_ca)
    ready = device.wait_event("ready")
    console = ready["console"]

    link = SerialClient.open(console, timeout=3.0, retries=2)
    try:
        report = Station(
            link, fleet_service.client(), groups=("sensors",), device_timeouts=FAST_TIMEOUTS
        ).provision()
    finally:
        link.close()
    assert report.ok, report.to_json()
    assert devices_in(fleet_service.sessions) == [report.device_id]

    provisioned = device.wait_event("provisioned")
    assert provisioned["mode"] == "run" and provisioned["device_id"] == report.device_id
    assert provisioned["console"] == console  # the same serial port keeps answering
    agent = device.wait_event("agent")
    agent_pid = agent["agent_pid"]
    assert isinstance(agent_pid, int) and pid_alive(agent_pid), _agent_log(state)
    status = _wait_agent_status(state, agent_pid)
    assert status["device_id"] == report.device_id and not status["sealed_elsewhere"]
    wait_for("the agent's local API socket", (state / "api.sock").is_socket, timeout=10.0)

    # the installed agent config points at this device's TPM, seals to the measured PCRs and
    # keeps the local API in the device's directory
    config = load_config(state / "agent.toml", require_provisioned=True)
    assert config.tpm.tcti == ready["tcti"]
    assert list(config.tpm.pcrs) == PCRS
    assert config.api.socket == state / "api.sock"
    assert config.identity is not None and config.identity.device_id == report.device_id

    # locked: identity only, from the run-mode console
    ident = identity(console)
    assert ident["locked"] is True and ident["device_id"] == report.device_id
    assert {str(i): v.hex() for i, v in ident["pcrs"].items()} == ready["pcrs"]
    link = SerialClient.open(console, timeout=3.0, retries=0)
    try:
        for op in ("create-keys", "lock"):
            with pytest.raises(ProtocolError) as err:
                link.call(op)
            assert err.value.check == "factory.locked"
            assert report.device_id in err.value.reason
    finally:
        link.close()
    # the agent is still running (it retries the broker; the device does not give up)
    assert pid_alive(agent_pid), _agent_log(state)

    assert device.terminate() == 0
    assert not pid_alive(agent_pid)
    assert not pid_alive(ready["swtpm_pid"])

    # a reboot: still provisioned, straight into run mode, the same identity
    again = _start(devices, state, manufacturer_ca)
    rebooted = again.wait_event("ready")
    assert rebooted["mode"] == "run" and rebooted["device_id"] == report.device_id
    restarted_agent = again.wait_event("agent")["agent_pid"]
    # same firmware, same PCRs: the agent unseals the state key it sealed on the first boot
    status = _wait_agent_status(state, restarted_agent)
    assert status["device_id"] == report.device_id and not status["sealed_elsewhere"]
    ident = identity(rebooted["console"])
    assert ident["locked"] is True and ident["device_id"] == report.device_id
    assert again.terminate() == 0
    assert not pid_alive(restarted_agent) and not pid_alive(rebooted["swtpm_pid"])

    # a patched kernel: PCR 4 differs, so the agent cannot unseal its state key and says so
    evil = _start(devices, state, manufacturer_ca, "--tamper", "kernel")
    evil_agent = evil.wait_event("agent")["agent_pid"]
    status = _wait_agent_status(state, evil_agent)
    assert status["sealed_elsewhere"] is True
    assert evil.terminate() == 0

    # whoever restores an old disk image: the good firmware boots again (the old measurements
    # are back) with the state from before put back. The agent moved the TPM state counter when
    # it started afresh under the patched kernel, so the old key no longer unseals: refused as
    # state.rollback, nothing of it loaded.
    agent_state_dir = load_config(str(state / "agent.toml")).state.dir
    restored = sorted(agent_state_dir.glob("*.sealed-elsewhere.*"))
    assert len(restored) == 2
    for aside in restored:
        aside.rename(aside.with_name(aside.name.split(".sealed-elsewhere.")[0]))
    good = _start(devices, state, manufacturer_ca)
    good_agent = good.wait_event("agent")["agent_pid"]
    status = _wait_agent_status(state, good_agent)
    assert not status["sealed_elsewhere"]
    assert status["state_rollback"] and "older state counter" in status["state_rollback"]
    assert good.terminate() == 0


def test_station_refuses_a_provisioned_firmware_sim_device(
    fleet_service: EnrollmentService,
    devices: list[DeviceProcess],
    tmp_path: Path,
    manufacturer_ca: ManufacturerCA,
) -> None:
    state = tmp_path / "dev"
    device = _start(devices, state, manufacturer_ca)
    console = device.wait_event("ready")["console"]
    for attempt in range(2):
        link = SerialClient.open(console, timeout=3.0, retries=1)
        try:
            report = Station(
                link, fleet_service.client(), device_timeouts=FAST_TIMEOUTS
            ).provision()
        finally:
            link.close()
        if attempt == 0:
            assert report.ok, report.to_json()
            device.wait_event("provisioned")
        else:
            assert not report.ok and report.error is not None
            assert report.error["check"] == "factory.locked"
    assert len(devices_in(fleet_service.sessions)) == 1
    assert device.terminate() == 0
