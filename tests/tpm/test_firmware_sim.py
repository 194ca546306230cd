"""``firmware-sim device`` as a subprocess against real swtpm and real ptys: the console answers
the station's identity request with EK certificates from the manufacturer, the measured PCRs
(equal to the event log's replay) and the firmware versions; a tampered kernel moves only PCR 4;
a reboot of the same state directory keeps the TPM (same EK certificate) and measures again;
SIGTERM leaves no process behind. ``DeviceProcess`` is reused by tests/e2e/test_firmware_sim_e2e.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from agent.protocol.errors import ProtocolError, StateError
from agent.protocol.eventlog import decode_event_log, replay
from agent.serial_link import Args, SerialClient
from firmware_sim.boot import PCR_MAP, default_components
from firmware_sim.device import SimulatedDevice
from firmware_sim.swtpm import DEFAULT_MANUFACTURER, load_manufacturer_ca, pid_alive
from tests.fixtures.swtpm import ManufacturerCA

pytestmark = pytest.mark.tpm

PCRS = sorted(set(PCR_MAP.values()))

DEFAULT_TIMEOUT = 30.0


class DeviceProcess:
    """One ``firmware-sim device`` process; ``events`` get every JSON line it printed."""

    def __init__(self, state_dir: Path, *extra: str, manufacturer_ca: Path | None = None) -> None:
        self.state_dir = state_dir
        command = [sys.executable, "-m", "firmware_sim.cli", "device", "--state", str(state_dir)]
        if manufacturer_ca is not None:
            command += ["--manufacturer-ca", str(manufacturer_ca)]
        command += ["--json", *extra]
        state_dir.parent.mkdir(parents=True, exist_ok=True)
        self.stderr_path = state_dir.parent / f"{state_dir.name}.stderr"
        self._stderr = self.stderr_path.open("ab")
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL
        )
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self._lines.put(json.loads(raw))
        self._lines.put(None)

    def wait_event(self, name: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """The next event called ``name`` (earlier ones of other names are kept in ``events``);
        fails with the process's stderr if it ends or stays silent."""
        for event in self.events:
            if event["event"] == name:
                return event
        while True:
            try:
                item = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {name!r} event in {timeout} s: {self.stderr()}") from None
            if item is None:
                raise AssertionError(
                    f"firmware-sim ended (rc {self.process.wait()}) before {name!r}: "
                    f"{self.stderr()}"
                )
            self.events.append(item)
            if item["event"] == name:
                return item

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def terminate(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """SIGTERM by PID and wait; returns the exit status."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self._close()

    def kill(self) -> None:
        """Teardown: SIGTERM first, so the simulator stops its agent and swtpm by PID (a SIGKILL
        would orphan them); SIGKILL only if it does not exit in time."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._close()

    def _close(self) -> None:
        self._reader.join(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._stderr.close()


@pytest.fixture
def run_device(tmp_path: Path, manufacturer_ca: ManufacturerCA) -> Iterator[Any]:
    """Start ``firmware-sim device`` processes (made by ``manufacturer_ca`` on first boot);
    whatever a test leaves running is killed at teardown."""
    started: list[DeviceProcess] = []

    def run(name: str = "dev", *extra: str) -> DeviceProcess:
        process = DeviceProcess(tmp_path / name, *extra, manufacturer_ca=manufacturer_ca.directory)
        started.append(process)
        return process

    yield run
    for process in started:
        process.kill()


def identity(console: str) -> Args:
    link = SerialClient.open(console, timeout=3.0, retries=1)
    try:
        return link.call("identity")
    finally:
        link.close()


def test_device_console_identity_and_clean_stop(
    run_device: Any, manufacturer_ca: ManufacturerCA
) -> None:
    device = run_device("dev", "--serial", "SN-0001")
    ready = device.wait_event("ready")
    assert ready["mode"] == "factory" and ready["provisioned"] is False
    assert ready["console"].startswith("/dev/pts/")
    assert ready["tcti"] == f"swtpm:path={device.state_dir}/tpm/swtpm.sock"
    assert ready["pid"] == device.process.pid
    swtpm_pid = ready["swtpm_pid"]
    assert pid_alive(swtpm_pid)
    assert (device.state_dir / "tpm" / "swtpm.pid").read_text().strip() == str(swtpm_pid)

    ident = identity(ready["console"])
    assert ident["serial"] == "SN-0001" and ident["locked"] is False and ident["keys"] is False
    # EK certificates (RSA and ECC) issued by the manufacturer's CA
    issuer = manufacturer_ca.issuer_cert()
    for kind in ("rsa", "ecc"):
        cert = x509.load_der_x509_certificate(ident["ek"][kind]["cert"])
        cert.verify_directly_issued_by(issuer)
    # the PCRs are what the event log replays to, and what the process reported
    log = decode_event_log(ident["event_log"])
    assert log == decode_event_log((device.state_dir / "eventlog.cbor").read_bytes())
    assert sorted(ident["pcrs"]) == PCRS
    assert replay(log, PCRS) == ident["pcrs"]
    assert ready["pcrs"] == {str(i): v.hex() for i, v in ident["pcrs"].items()}
    assert ident["firmware"] == {c.name: "1.0" for c in default_components()}
    assert [e.component for e in log.events] == [c.name for c in default_components()]
    # not provisioned: the factory requests are served
    link = SerialClient.open(ready["console"], timeout=3.0, retries=1)
    try:
        with pytest.raises(ProtocolError) as err:
            link.call("lock")
        assert err.value.check == "factory.lock.not-installed"
    finally:
        link.close()

    assert device.terminate() == 0
    assert not pid_alive(swtpm_pid)
    assert not (device.state_dir / "tpm" / "swtpm.pid").exists()


def test_tampered_kernel_changes_only_pcr_4(run_device: Any) -> None:
    good = run_device("good")
    bad = run_device("bad", "--tamper", "kernel")
    good_ident = identity(good.wait_event("ready")["console"])
    bad_ident = identity(bad.wait_event("ready")["console"])
    assert bad_ident["pcrs"][4] != good_ident["pcrs"][4]
    assert {i: v for i, v in bad_ident["pcrs"].items() if i != 4} == {
        i: v for i, v in good_ident["pcrs"].items() if i != 4
    }
    # the version label is unchanged: only the measurement tells
    assert bad_ident["firmware"] == good_ident["firmware"]
    bad_log = decode_event_log(bad_ident["event_log"])
    assert replay(bad_log, PCRS) == bad_ident["pcrs"]
    assert good.terminate() == 0 and bad.terminate() == 0


def test_reboot_keeps_the_tpm_and_measures_again(run_device: Any, tmp_path: Path) -> None:
    first = run_device("dev")
    ready = first.wait_event("ready")
    before = identity(ready["console"])
    assert first.terminate() == 0
    assert not pid_alive(ready["swtpm_pid"])

    # same state dir, a new release: same TPM (EK certificate), PCRs measured from zero again
    second = run_device("dev", "--version", "1.1")
    again = second.wait_event("ready")
    after = identity(again["console"])
    assert again["swtpm_pid"] != ready["swtpm_pid"]
    for kind in ("rsa", "ecc"):
        assert after["ek"][kind]["cert"] == before["ek"][kind]["cert"]
        assert after["ek"][kind]["public"] == before["ek"][kind]["public"]
    assert after["serial"] == before["serial"]
    assert after["firmware"]["kernel"] == "1.1"
    log = decode_event_log(after["event_log"])
    assert replay(log, PCRS) == after["pcrs"]  # not extended on top of the first boot
    assert after["pcrs"] != before["pcrs"]
    assert second.terminate() == 0

    # the old release again gives exactly the first boot's PCRs
    third = run_device("dev")
    assert identity(third.wait_event("ready")["console"])["pcrs"] == before["pcrs"]
    assert third.terminate() == 0


def test_second_simulator_on_the_same_device_is_refused(run_device: Any) -> None:
    first = run_device("dev")
    first.wait_event("ready")
    second = run_device("dev")
    assert second.process.wait(timeout=30) == 1
    assert "already running" in second.stderr()
    assert first.terminate() == 0


def test_images_from_files_and_versions(run_device: Any, tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"a kernel image of our own" * 100)
    device = run_device(
        "dev", "--image", f"kernel={kernel}", "--component-version", "kernel=6.1.0-kf"
    )
    ident = identity(device.wait_event("ready")["console"])
    log = decode_event_log(ident["event_log"])
    event = next(e for e in log.events if e.component == "kernel")
    assert event.digest == hashlib.sha256(kernel.read_bytes()).digest()
    assert event.version == "6.1.0-kf" and ident["firmware"]["kernel"] == "6.1.0-kf"
    assert device.terminate() == 0


def test_bad_arguments_fail_before_anything_starts(run_device: Any) -> None:
    device = run_device("dev", "--tamper", "initrd")
    assert device.process.wait(timeout=30) == 1
    assert "initrd" in device.stderr()
    assert not (device.state_dir / "tpm").exists()


def test_in_process_device_with_its_own_manufacturer_over_tcp(tmp_path: Path) -> None:
    """The Python API: no CA given, so one is made next to the device (shared by devices under
    the same parent); the TPM on loopback TCP; the listener hears "ready"; stop() ends swtpm."""
    events: list[tuple[str, dict[str, Any]]] = []
    device = SimulatedDevice(
        tmp_path / "fleet" / "dev1",
        transport="tcp",
        serial="SN-7",
        listener=lambda event, info: events.append((event, dict(info))),
    )
    with device:
        assert device.tcti.startswith("swtpm:host=127.0.0.1,port=")
        assert [e for e, _ in events] == ["ready"] and events[0][1][
            "console"
        ] == device.console_path
        ident = identity(device.console_path)
        assert ident["serial"] == "SN-7"
        ca = load_manufacturer_ca(tmp_path / "fleet" / "manufacturer-ca")
        assert ca.name == DEFAULT_MANUFACTURER
        cert = x509.load_der_x509_certificate(ident["ek"]["rsa"]["cert"])
        cert.verify_directly_issued_by(ca.issuer_cert())
        assert device.pcrs == ident["pcrs"] == replay(device.event_log, PCRS)
        assert device.mode == "factory" and not device.provisioned
        swtpm_pid = device.swtpm_pid
        # a second device under the same parent uses the same manufacturer
        with SimulatedDevice(tmp_path / "fleet" / "dev2") as other:
            other_cert = x509.load_der_x509_certificate(
                identity(other.console_path)["ek"]["rsa"]["cert"]
            )
            other_cert.verify_directly_issued_by(ca.issuer_cert())
            assert other_cert.serial_number != cert.serial_number
    assert not pid_alive(swtpm_pid)
    with pytest.raises(StateError, match="not running"):
        _ = device.console_path
