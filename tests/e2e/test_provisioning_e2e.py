"""Provisioning end to end: a fresh swtpm per device (its own EK certificate from the test
manufacturer), factory mode served on a real pty, the keyprovision station over pyserial, the
enrollment API over real HTTPS with mutual TLS, and a real SQLite registry file."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import serial
from cryptography.hazmat.primitives.serialization import Encoding

from agent.config import load_config
from agent.factory import FactoryConsole, serve_factory_on_pty
from agent.protocol.errors import ProtocolError
from agent.serial_link import Args, Handler, SerialClient
from agent.tpm.store import TPMStore
from provisioning.enroll import StartRequest, certify_qualifying_data
from provisioning.pki import verify_certificate
from provisioning.registry import DeviceState, Registry, run_in_transaction
from provisioning.station import ProvisionReport, Station
from tests.fixtures.swtpm import ManufacturerCA, Swtpm, SwtpmFactory
from tests.tpm.test_enroll import (
    EnrollmentService,
    audit_trail,
    devices_in,
    enrollment_service,
)

pytestmark = pytest.mark.e2e
# the registry on a SQLite file and on PostgreSQL (tests/fixtures/postgres.py)
DATABASE_BACKENDS = ("sqlite", "postgresql")

ENROLLMENT_TARGET_S = 1.5
FAST_TIMEOUTS = {
    "identity": 2.0,
    "create-keys": 5.0,
    "certify": 2.0,
    "activate-credential": 2.0,
    "install": 2.0,
    "lock": 2.0,
}


@dataclass
class Device:
    swtpm: Swtpm
    store: TPMStore
    console: FactoryConsole
    path: str
    state_dir: Path
    stores: list[TPMStore] = field(default_factory=list)

    def reset(self) -> None:
        """Power cycle: the TPM restarts (volatile state lost), the factory code restarts from
        its state directory on a new TPM connection; a reply being computed is lost."""
        self.swtpm.restart()
        self.store = TPMStore(self.swtpm.tcti)
        self.stores.append(self.store)
        self.console.restart(self.store)


@pytest.fixture
def fleet(
    tmp_path: Path, manufacturer_ca: ManufacturerCA, database_url: str
) -> Iterator[EnrollmentService]:
    with enrollment_service(tmp_path / "pki", database_url, manufacturer_ca) as service:
        yield service


@pytest.fixture
def make_device(swtpm_factory: SwtpmFactory, tmp_path: Path) -> Iterator[Any]:
    made: list[Device] = []

    def make(ca: ManufacturerCA | None = None, *, name: str | None = None) -> Device:
        name = name or f"dev{len(made)}"
        tpm = swtpm_factory.start(ca, fresh=True)
        store = TPMStore(tpm.tcti)
        state_dir = tmp_path / name
        path, console = serve_factory_on_pty(store, state_dir, serial_number=f"SN-{name}")
        device = Device(tpm, store, console, path, state_dir, [store])
        made.append(device)
        return device

    yield make
    for device in made:
        device.console.stop()
        for store in device.stores:
            with contextlib.suppress(Exception):
                store.close()


def _station(
    fleet: EnrollmentService, device: Device, **kwargs: Any
) -> tuple[Station, SerialClient]:
    link = SerialClient.open(device.path, timeout=2.0, retries=kwargs.pop("retries", 2))
    return Station(link, fleet.client(), device_timeouts=FAST_TIMEOUTS, **kwargs), link


def _provision(fleet: EnrollmentService, device: Device, **kwargs: Any) -> ProvisionReport:
    station, link = _station(fleet, device, **kwargs)
    try:
        return station.provision()
    finally:
        link.close()


def _record(fleet: EnrollmentService, device_id: str) -> Any:
    return run_in_transaction(fleet.sessions, lambda s: Registry(s).device(device_id))


def test_three_devices_provisioned_end_to_end(
    fleet: EnrollmentService, make_device: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    devices = [make_device() for _ in range(3)]
    reports = [_provision(fleet, device, groups=("sensors",)) for device in devices]
    ca_cert = fleet.pki.device_ca.certificate
    for device, report in zip(devices, reports, strict=True):
        assert report.ok, report.to_json()
        assert [s.name for s in report.steps] == [
            "identity",
            "create-keys",
            "certify",
            "enroll-start",
            "activate-credential",
            "enroll-finish",
            "install",
            "lock",
        ]
        assert report.device_id is not None and report.device_id.startswith("dev-")
        # the DevID certificate chains to the fleet device CA and is the registry's
        config = load_config(device.state_dir / "agent.toml", require_provisioned=True)
        assert config.identity is not None and config.identity.device_id == report.device_id
        devid = config.identity.devid_cert.certificates[0]
        verify_certificate(devid, ca_cert, now=datetime.now(UTC), purpose="client")
        record = _record(fleet, report.device_id)
        assert record.state is DeviceState.REGISTERED
        assert record.devid_cert_pem.encode() == devid.public_bytes(Encoding.PEM)
        # the factory port now refuses provisioning
        again = _provision(fleet, device)
        assert not again.ok and again.error is not None
        assert again.error["check"] == "factory.locked"
        link = SerialClient.open(device.path, timeout=2.0, retries=0)
        try:
            with pytest.raises(ProtocolError) as err:
                link.call("create-keys")
            assert err.value.check == "factory.locked"
        finally:
            link.close()
    assert len(set(devices_in(fleet.sessions))) == 3
    times = [round(r.enrollment_seconds, 3) for r in reports]
    totals = [round(r.seconds, 3) for r in reports]
    with capsys.disabled():
        print(f"\nenrollment (start..finish) per device: {times} s; whole run: {totals} s")
    assert max(times) <= ENROLLMENT_TARGET_S


def test_unknown_manufacturer_is_refused_nothing_registered(
    fleet: EnrollmentService, make_device: Any, other_manufacturer_ca: ManufacturerCA
) -> None:
    device = make_device(other_manufacturer_ca)
    report = _provision(fleet, device)
    assert not report.ok and report.error is not None
    assert (report.error["step"], report.error["check"]) == ("enroll-start", "enroll.ek.chain")
    assert report.revoked is None and report.device_id is None
    assert devices_in(fleet.sessions) == []
    assert not (device.state_dir / "agent.toml").exists()
    assert ("enroll.start", "refused") in [(a, o) for a, o, _ in audit_trail(fleet.sessions)]


def test_swapped_ak_finish_is_refused(fleet: EnrollmentService, make_device: Any) -> None:
    """The device answers the credential with another AK: the TPM cannot recover the secret; a
    station that then guesses is refused at finish, and nothing is registered."""
    first, second = make_device(), make_device()
    swapped = {"done": False}

    def swap_ak(op: str, args: Args, handle: Handler) -> Mapping[str, Any]:
        if op == "activate-credential" and not swapped["done"]:
            swapped["done"] = True
            handle("create-keys", {})  # the device now holds another AK
        return handle(op, args)

    first.console.intercept = swap_ak
    report = _provision(fleet, first)
    assert not report.ok and report.error is not None
    assert report.error["step"] == "activate-credential"
    assert "credential was not made for this TPM" in report.error["reason"]

    # the station relays device A's credential to device B: B's TPM cannot open it, and a
    # finish with anything but the real secret is refused
    _, link = _station(fleet, second)
    try:
        link.call("identity")
        keys = link.call("create-keys")
        ident = link.call("identity")
        nonce = os.urandom(32)
        cert = link.call(
            "certify", {"qualifying_data": certify_qualifying_data(nonce, keys["tls_public"])}
        )
        started = fleet.client().start(
            StartRequest(
                serial=ident["serial"],
                ek_kind="rsa",
                ek_cert=ident["ek"]["rsa"]["cert"],
                ek_public=ident["ek"]["rsa"]["public"],
                ak_public=keys["ak_public"],
                devid_public=keys["devid_public"],
                tls_public=keys["tls_public"],
                certify_attest=cert["attest"],
                certify_signature=cert["signature"],
                certify_nonce=nonce,
            )
        )
        other = make_device()
        other_link = SerialClient.open(other.path, timeout=2.0, retries=0)
        try:
            other_link.call("create-keys")
            with pytest.raises(ProtocolError, match="credential was not made"):
                other_link.call(
                    "activate-credential",
                    {
                        "credential_blob": started.credential_blob,
                        "encrypted_secret": started.encrypted_secret,
                    },
                )
        finally:
            other_link.close()
        with pytest.raises(ProtocolError) as err:
            fleet.client().finish(started.session, os.urandom(32))
        assert err.value.check == "enroll.credential"
    finally:
        link.close()
    assert devices_in(fleet.sessions) == []
    refusals = [(a, o) for a, o, _ in audit_trail(fleet.sessions) if o == "refused"]
    assert ("enroll.finish", "refused") in refusals


class NoisyPort:
    """The station's pyserial port with a noisy line: bytes it sends and receives get flipped
    bits and stray garbage (including 0x00 delimiters) with the given probabilities."""

    def __init__(self, port: Any, *, rate: float, seed: int) -> None:
        self._port = port
        self._random = random.Random(seed)
        self.rate = rate
        self.injected = 0

    @property
    def timeout(self) -> float | None:
        value: float | None = self._port.timeout
        return value

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._port.timeout = value

    def _noise(self, data: bytes) -> bytes:
        out = bytearray(data)
        if out and self._random.random() < self.rate:
            out[self._random.randrange(len(out))] ^= 1 << self._random.randrange(8)
            self.injected += 1
        if self._random.random() < self.rate:
            at = self._random.randrange(len(out) + 1)
            out[at:at] = self._random.randbytes(self._random.randrange(1, 24))
            self.injected += 1
        return bytes(out)

    def write(self, data: bytes, /) -> int | None:
        written: int | None = self._port.write(self._noise(data))
        return written

    def read(self, size: int = 1) -> bytes:
        data: bytes = self._port.read(size)
        return self._noise(data) if data else data

    def flush(self) -> None:
        self._port.flush()

    def close(self) -> None:
        self._port.close()


def test_noise_on_the_serial_line_is_survived(fleet: EnrollmentService, make_device: Any) -> None:
    device = make_device()
    port = NoisyPort(serial.serial_for_url(device.path, timeout=0.02), rate=0.08, seed=11)
    link = SerialClient(port, timeout=2.0, retries=25)
    timeouts = dict.fromkeys(FAST_TIMEOUTS, 0.4) | {"create-keys": 2.0}
    try:
        report = Station(link, fleet.client(), device_timeouts=timeouts).provision()
    finally:
        link.close()
    assert report.ok, report.to_json()
    assert port.injected > 0
    assert link.attempts > len(report.steps) - 2  # retries happened (2 steps are HTTP)
    assert devices_in(fleet.sessions) == [report.device_id]
    # install checks that the certificates are for the keys the device holds: had a retried
    # create-keys run twice, the certified keys would not be the device's and install would fail
    config = load_config(device.state_dir / "agent.toml", require_provisioned=True)
    assert config.identity is not None and config.identity.device_id == report.device_id


def test_device_reset_mid_provisioning_retries_cleanly(
    fleet: EnrollmentService, make_device: Any
) -> None:
    """Power is lost while the device answers activate-credential: the TPM restarts, the reply
    is gone; the station's retry reaches the rebooted device, which loads its AK blob again and
    answers. Provisioning completes with exactly one registration."""
    device = make_device()
    fired = threading.Event()

    def power_cut(op: str, args: Args, handle: Handler) -> Mapping[str, Any]:
        if op == "activate-credential" and not fired.is_set():
            fired.set()
            result = handle(op, args)  # computed, never sent
            device.reset()
            return result
        return handle(op, args)

    device.console.intercept = power_cut
    report = _provision(fleet, device)
    assert fired.is_set()
    assert report.ok, report.to_json()
    assert devices_in(fleet.sessions) == [report.device_id]
    ident = SerialClient.open(device.path, timeout=2.0, retries=0)
    try:
        assert ident.call("identity")["locked"] is True
    finally:
        ident.close()


def test_device_dead_after_finish_is_undone_then_reprovisioned(
    fleet: EnrollmentService, make_device: Any
) -> None:
    """The device dies for good during install (every reply lost): the station undoes the
    registration it just made, so the registry holds no half-provisioned device; once the
    device works again the same TPM provisions cleanly."""
    device = make_device()

    def dead_on_install(op: str, args: Args, handle: Handler) -> Mapping[str, Any]:
        if op == "install":
            device.console.restart()  # reboots before replying, every time
            return {}
        return handle(op, args)

    device.console.intercept = dead_on_install
    report = _provision(fleet, device, retries=1)
    assert not report.ok and report.error is not None
    assert report.error["step"] == "install"
    assert report.revoked is True and report.device_id is not None
    assert devices_in(fleet.sessions) == []
    trail = audit_trail(fleet.sessions)
    assert ("enroll.revoke", "accepted", f"device:{report.device_id}") in trail

    device.console.intercept = None
    retry = _provision(fleet, device)
    assert retry.ok, retry.to_json()
    assert retry.device_id == report.device_id  # same TPM, same EK, same device id
    assert devices_in(fleet.sessions) == [retry.device_id]


def test_keyprovision_command_line_json(fleet: EnrollmentService, make_device: Any) -> None:
    device = make_device()
    pki = fleet.pki

    def keyprovision(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "provisioning.station",
                "--port",
                device.path,
                "--fleet",
                fleet.server.url,
                "--cert",
                str(pki.station_cert_path),
                "--key",
                str(pki.station_key_path),
                "--ca",
                str(pki.server_ca_path),
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    result = keyprovision("--group", "sensors", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    output = json.loads(result.stdout)
    assert output["ok"] is True and output["device_id"] in devices_in(fleet.sessions)
    assert [s["step"] for s in output["steps"]][-1] == "lock"
    # a second run on the locked device fails with exit status 1 and says why
    human = keyprovision()
    assert human.returncode == 1
    assert "factory.locked" in human.stdout and "nothing was registered" in human.stdout
