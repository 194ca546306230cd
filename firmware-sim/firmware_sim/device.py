"""A simulated keyfleet device: its own TPM (swtpm), a measured boot, a factory serial console on
a pty, and, once the factory station has locked it, the agent daemon.

One state directory is one device. The first start manufactures its TPM (EK certificates from a
simulated manufacturer CA); every later start reuses it, so the device keeps its identity across
reboots. Every start is a reboot: a fresh swtpm process (PCRs back to zero), a measured boot of
the firmware given (the demo release, or images from files, or a tampered component), the event
log written into the state directory.

Two modes, decided by the factory lock file (``agent.factory``):

- **factory**: the console is served by the agent's factory mode (``serve_factory_on_pty``), which
  answers the station's requests (identity with EK certificates, PCR values, firmware versions and
  event log; create-keys; certify; activate-credential; install; lock).
- **run**: after ``lock`` (or at boot when the device is already locked) the console keeps
  answering ``identity`` only, from what it read at the moment it entered run mode, and every other
  request with ``factory.locked``; the TPM is handed to the agent (``keyagent run --config
  DIR/agent.toml``, a child process). swtpm has no resource manager, so like a device without
  ``/dev/tpmrm0`` the TPM has one user once the agent runs.

State directory::

    device.json        what the simulator remembers: manufacturer CA, serial (no secrets)
    device.lock        held (flock) while a simulator runs this device: one at a time; holds
                       the simulator's pid (``firmware-sim install --reboot`` signals it)
    tpm/               swtpm state (tpm2-00.permall), swtpm.sock(.ctrl), swtpm.pid, swtpm.log
    eventlog.cbor      the measured boot's event log (agent.protocol.eventlog), rewritten each boot
    agent.log          the agent daemon's output in run mode
    api.sock           the agent's local API socket
    keys/ identity/ agent.toml factory.lock   written by factory mode (agent.factory)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.factory import LOCK_FILE, FactoryConsole, serve_factory_on_pty
from agent.fsio import atomic_write
from agent.protocol.errors import ConfigError, ProtocolError, StateError
from agent.protocol.eventlog import EventLog
from agent.serial_link import Args, Handler
from agent.tpm.store import TPMStore
from firmware_sim.boot import FirmwareComponent, default_components, measured_boot, tampered
from firmware_sim.processes import stop_child
from firmware_sim.swtpm import (
    MAX_SOCKET_PATH,
    SOCKET_NAME,
    ManufacturerCA,
    Swtpm,
    Transport,
    ensure_manufacturer_ca,
    is_provisioned,
    load_manufacturer_ca,
    provision,
)

log = logging.getLogger("firmware_sim.device")

DEVICE_FILE = "device.json"
DEVICE_LOCK = "device.lock"
TPM_DIR = "tpm"
EVENT_LOG_FILE = "eventlog.cbor"
AGENT_CONFIG = "agent.toml"
AGENT_LOG = "agent.log"
API_SOCKET = "api.sock"
DEFAULT_CA_DIR_NAME = "manufacturer-ca"
AGENT_STOP_TIMEOUT = 10.0

Listener = Callable[[str, Mapping[str, Any]], None]


def firmware_components(
    version: str = "1.0",
    *,
    images: Mapping[str, str | os.PathLike[str]] | None = None,
    versions: Mapping[str, str] | None = None,
    tamper: Sequence[str] = (),
) -> tuple[FirmwareComponent, ...]:
    """The firmware a simulated device boots: the demo release ``version``, with the images named
    in ``images`` read from files instead, per-component ``versions`` overriding the release, and
    each component in ``tamper`` with one byte flipped (its version label unchanged)."""
    components = list(default_components(version))
    names = [c.name for c in components]
    for name in [*(images or {}), *(versions or {})]:
        if name not in names:
            raise ConfigError(f"no firmware component {name!r} (components: {', '.join(names)})")
    for i, component in enumerate(components):
        changes: dict[str, Any] = {}
        if images and component.name in images:
            changes["image"] = Path(images[component.name])
        if versions and component.name in versions:
            changes["version"] = versions[component.name]
        components[i] = replace(component, **changes)
    result = tuple(components)
    for name in tamper:
        result = tampered(result, name)
    return result


def start_agent(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """Run mode's hook: start the device's agent daemon (``keyagent run``) as a child process,
    with the Python running the simulator, its output appended to ``log_path``. systemd's
    notification variables are not passed on: the supervisor of the simulator did not ask the
    agent for READY."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
    with log_path.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a Ctrl-C at the simulator's terminal goes to us, not it
        )


class SimulatedDevice:
    """One simulated device on ``state_dir``.

    ``start()`` boots it and returns once the console is up (``console_path``, ``tcti``,
    ``pcrs``, ``info()``); ``stop()`` stops the agent, the console and swtpm (also on errors,
    idempotent). ``listener(event, info)`` is called with ``"ready"``, ``"provisioned"`` and
    ``"agent"`` (from the device's own thread) so a front end can report them.

    ``manufacturer_ca`` matters only on the first start, when the TPM is manufactured: default
    ``<state_dir>/../manufacturer-ca`` (made if missing), so devices under one parent directory
    share one manufacturer that a fleet can trust. ``transport`` of the TPM: ``"unix"`` (a socket
    in the state directory) when its path fits, else ``"tcp"`` on free loopback ports.
    ``run_agent=False`` stays in run mode without starting the agent (the console answers
    identity only).
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        manufacturer_ca: str | os.PathLike[str] | None = None,
        components: Sequence[FirmwareComponent] | None = None,
        serial: str | None = None,
        transport: Transport | None = None,
        run_agent: bool = True,
        listener: Listener | None = None,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self._ca_dir = Path(manufacturer_ca).resolve() if manufacturer_ca is not None else None
        self.components = tuple(components) if components is not None else default_components()
        self._serial = serial
        self._transport = transport
        self._run_agent = run_agent
        self._listener = listener
        self._lock_fd: int | None = None
        self._swtpm: Swtpm | None = None
        self._store: TPMStore | None = None
        self._console: FactoryConsole | None = None
        self._agent: subprocess.Popen[bytes] | None = None
        self._event_log: EventLog | None = None
        self._pcrs: dict[int, bytes] = {}
        self._mode_lock = threading.Lock()
        self._snapshot: Args | None = None  # identity as answered in run mode
        self._locked = threading.Event()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._manufacturer: ManufacturerCA | None = None
        self.boots = 0  # boots by this simulator (``reboot`` adds one)

    # -- properties -----------------------------------------------------------------------

    @property
    def console_path(self) -> str:
        if self._console is None:
            raise StateError("the device is not running")
        return self._console.path

    @property
    def tcti(self) -> str:
        if self._swtpm is None:
            raise StateError("the device is not running")
        return self._swtpm.tcti

    @property
    def swtpm_pid(self) -> int:
        if self._swtpm is None:
            raise StateError("the device is not running")
        return self._swtpm.pid

    @property
    def agent_pid(self) -> int | None:
        return self._agent.pid if self._agent is not None else None

    @property
    def event_log(self) -> EventLog:
        if self._event_log is None:
            raise StateError("the device has not booted")
        return self._event_log

    @property
    def pcrs(self) -> dict[int, bytes]:
        """The PCR values right after the measured boot."""
        return dict(self._pcrs)

    @property
    def firmware_versions(self) -> dict[str, str]:
        return {c.name: c.version for c in self.components}

    @property
    def provisioned(self) -> bool:
        return (self.state_dir / LOCK_FILE).exists()

    @property
    def mode(self) -> str:
        return "run" if self._snapshot is not None else "factory"

    @property
    def event_log_path(self) -> Path:
        return self.state_dir / EVENT_LOG_FILE

    @property
    def agent_config_path(self) -> Path:
        return self.state_dir / AGENT_CONFIG

    def info(self) -> dict[str, Any]:
        """What a test or a demo needs to drive the device (the JSON the CLI prints)."""
        snapshot = self._snapshot or {}
        return {
            "console": self.console_path,
            "tcti": self.tcti,
            "state_dir": str(self.state_dir),
            "mode": self.mode,
            "provisioned": self.provisioned,
            "device_id": snapshot.get("device_id"),
            "pcrs": {str(i): v.hex() for i, v in sorted(self._pcrs.items())},
            "firmware": self.firmware_versions,
            "event_log": str(self.event_log_path),
            "manufacturer_ca": str(self._manufacturer.directory) if self._manufacturer else None,
            "pid": os.getpid(),
            "swtpm_pid": self.swtpm_pid,
            "agent_pid": self.agent_pid,
            "agent_config": str(self.agent_config_path),
            "boots": self.boots,
        }

    # -- start ----------------------------------------------------------------------------

    def start(self) -> None:
        """Boot: manufacture the TPM on the first start, start swtpm, measure the firmware,
        serve the console; enter run mode at once if the device is already provisioned."""
        if self._swtpm is not None:
            raise StateError("the device is already running")
        self._stopping.clear()
        self.boots += 1
        try:
            self._take_device_lock()
            self._load_or_create()
            self._boot()
            self._serve_console()
        except BaseException:
            self.stop()
            raise
        self._notify("ready")
        self._supervisor = threading.Thread(
            target=self._supervise, name="device-supervisor", daemon=True
        )
        self._supervisor.start()

    def _take_device_lock(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.state_dir / DEVICE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateError(
                f"device {self.state_dir} is already running (another firmware-sim holds "
                f"{DEVICE_LOCK})"
            ) from None
        self._lock_fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def _load_or_create(self) -> None:
        record_path = self.state_dir / DEVICE_FILE
        tpm_dir = self.state_dir / TPM_DIR
        record: dict[str, Any] = {}
        if record_path.exists():
            try:
                loaded = json.loads(record_path.read_text())
            except (OSError, ValueError) as exc:
                raise StateError(f"{record_path} is damaged: {exc}") from None
            if not isinstance(loaded, dict):
                raise StateError(f"{record_path} is damaged: not a JSON object")
            record = loaded
        if not is_provisioned(tpm_dir):
            ca_dir = self._ca_dir or self.state_dir.parent / DEFAULT_CA_DIR_NAME
            self._manufacturer = ensure_manufacturer_ca(ca_dir)
            log.info("manufacturing the TPM in %s (CA %s)", tpm_dir, ca_dir)
            provision(tpm_dir, self._manufacturer)
            record = {
                "manufacturer_ca": str(self._manufacturer.directory),
                "created": int(time.time()),
            }
        elif "manufacturer_ca" in record:
            with contextlib.suppress(ConfigError):
                self._manufacturer = load_manufacturer_ca(Path(record["manufacturer_ca"]))
        if self._serial is not None:
            record["serial"] = self._serial
        elif isinstance(record.get("serial"), str):
            self._serial = record["serial"]
        atomic_write(record_path, json.dumps(record, sort_keys=True).encode(), mode=0o644)

    def _boot(self) -> None:
        tpm_dir = self.state_dir / TPM_DIR
        transport = self._transport
        if transport is None:
            fits = len(str(tpm_dir / SOCKET_NAME)) + len(".ctrl") <= MAX_SOCKET_PATH
            transport = "unix" if fits else "tcp"
        self._swtpm = Swtpm(
            state_dir=tpm_dir,
            log_path=tpm_dir / "swtpm.log",
            transport=transport,
            pid_file=tpm_dir / "swtpm.pid",
        )
        self._swtpm.start()
        self._store = TPMStore(self._swtpm.tcti)
        self._event_log = measured_boot(self._store, self.components, log_path=self.event_log_path)
        self._pcrs = self._store.pcr_read(sorted(self._event_log.pcrs()))

    def _serve_console(self) -> None:
        assert self._store is not None and self._event_log is not None
        measured = sorted(self._event_log.pcrs())
        _path, console = serve_factory_on_pty(
            self._store,
            self.state_dir,
            serial_number=self._serial,
            pcrs=measured,
            firmware_versions=self.firmware_versions,
            event_log=self._event_log.encode(),
            seal_pcrs=measured,
            api_socket=self.state_dir / API_SOCKET,
            event_log_path=self.event_log_path,
        )
        console.intercept = self._intercept
        self._console = console
        if self.provisioned:
            # locked before this boot: run mode from the start, so "ready" already says so
            with self._mode_lock:
                self._snapshot = dict(console.device.handle("identity", {}))
            self._locked.set()

    # -- the console in both modes --------------------------------------------------------

    def _intercept(self, op: str, args: Args, handle: Handler) -> Mapping[str, Any]:
        with self._mode_lock:
            if self._snapshot is not None:
                return self._answer_locked(op, args)
            result = handle(op, args)
            if op == "lock":
                self._snapshot = dict(handle("identity", {}))
                self._locked.set()
            return result

    def _answer_locked(self, op: str, args: Args) -> Mapping[str, Any]:
        if op not in ("identity", "hello"):
            raise ProtocolError(
                "factory.locked",
                f"locked: this device is provisioned (as {self._snapshot_device_id()}); "
                "a factory reset is needed before it can be provisioned again",
            )
        if args:
            raise ProtocolError("factory.args", f"unexpected arguments {sorted(args)}")
        return dict(self._snapshot or {})

    def _snapshot_device_id(self) -> str:
        device_id = (self._snapshot or {}).get("device_id")
        return device_id if isinstance(device_id, str) else "unknown"

    # -- run mode -------------------------------------------------------------------------

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            if self._locked.wait(timeout=0.1):
                break
        if self._stopping.is_set():
            return
        try:
            self._enter_run_mode()
        except Exception:
            log.exception("could not enter run mode")

    def _enter_run_mode(self) -> None:
        console = self._console
        assert console is not None
        with self._mode_lock:
            if self._snapshot is None:  # pragma: no cover - both paths to the lock set it
                self._snapshot = dict(console.device.handle("identity", {}))
            store, self._store = self._store, None
        if store is not None:
            store.close()  # the TPM is the agent's from now on
        log.info("provisioned as %s: run mode", self._snapshot_device_id())
        self._notify("provisioned")
        if not self._run_agent or self._stopping.is_set():
            return
        with self._mode_lock:
            if self._stopping.is_set():
                return
            self._agent = start_agent(self.agent_config_path, self.state_dir / AGENT_LOG)
        self._notify("agent")

    def wait_provisioned(self, timeout: float) -> bool:
        """Wait until the device is in run mode (and its agent started, if it runs one)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._snapshot is not None and (
                not self._run_agent or self._agent is not None or self._stopping.is_set()
            ):
                return True
            time.sleep(0.02)
        return False

    def _notify(self, event: str) -> None:
        if self._listener is None:
            return
        try:
            self._listener(event, self.info())
        except Exception:
            log.exception("listener failed on %s", event)

    # -- stop -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the agent (SIGTERM, then SIGKILL), the console, the TPM connection and swtpm;
        release the state directory. Safe to call more than once and after a failed start."""
        self._stopping.set()
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join(timeout=AGENT_STOP_TIMEOUT)
        with self._mode_lock:
            agent, self._agent = self._agent, None
        if agent is not None:
            stop_child(agent, AGENT_STOP_TIMEOUT)
        console, self._console = self._console, None
        if console is not None:
            console.stop()
        store, self._store = self._store, None
        if store is not None:
            with contextlib.suppress(Exception):
                store.close()
        swtpm, self._swtpm = self._swtpm, None
        if swtpm is not None:
            swtpm.stop()
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)
        self._snapshot = None
        self._locked.clear()

    def reboot(self, components: Sequence[FirmwareComponent] | None = None) -> None:
        """Reboot in place (what an installed update asks for): stop the agent, the console
        and swtpm (power off: PCRs reset at the next start), then boot ``components`` (default:
        the same firmware again) with a measured boot and start the agent; ``boots`` counts it
        and the listener hears ``ready`` (and ``provisioned``, ``agent``) again."""
        self.stop()
        if components is not None:
            self.components = tuple(components)
        self.start()

    def __enter__(self) -> SimulatedDevice:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
