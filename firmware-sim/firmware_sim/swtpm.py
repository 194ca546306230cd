"""swtpm as a simulated device's TPM: a manufacturer CA, a manufactured TPM state, a running
``swtpm socket`` process.

A real TPM comes from its manufacturer with endorsement keys and EK certificates in NV; here
``swtpm_setup`` plays the factory and ``swtpm_localca``, configured from this package's templates
with a directory keyfleet owns (never the system-wide /var/lib/swtpm-localca), plays the
manufacturer's CA. The same launcher serves the simulator (``firmware-sim device``) and the test
fixtures (``tests/fixtures/swtpm.py``), so there is one way to start and stop a TPM.

The running TPM listens either on a Unix socket in its state directory (no port to race for; the
simulator's choice) or on a pair of free loopback TCP ports (the test fixtures' choice: their raw
leak check talks TCP). Either way ``Swtpm.tcti`` is the string ``agent.tpm.TPMStore`` takes, and
the process is stopped by its PID: SIGTERM, wait, SIGKILL.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509

from agent.protocol.errors import ConfigError, StateError
from firmware_sim.ports import free_port
from firmware_sim.processes import stop_child

TEMPLATE_DIR = Path(__file__).parent / "manufacturer"
STATE_FILE = "tpm2-00.permall"
SOCKET_NAME = "swtpm.sock"
PID_FILE = "swtpm.pid"
LOG_FILE = "swtpm.log"
DEFAULT_MANUFACTURER = "keyfleet-sim-manufacturer"

SWTPM = "swtpm"
SWTPM_SETUP = "swtpm_setup"

START_TIMEOUT = 5.0
STOP_TIMEOUT = 5.0
ANSWER_TIMEOUT = 5.0
# sun_path is 108 bytes on Linux; leave room for the ".ctrl" suffix and the terminating NUL
MAX_SOCKET_PATH = 100

Transport = Literal["unix", "tcp"]

_MANUFACTURER_LINE = re.compile(r"^--platform-manufacturer\s+(\S+)\s*$", re.MULTILINE)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def require_binary(name: str) -> str:
    """The path of the swtpm tool ``name``; a missing tool is a configuration problem that says
    which Debian packages to install."""
    path = shutil.which(name)
    if path is None:
        raise ConfigError(
            f"{name} is not installed: install the Debian packages swtpm and swtpm-tools"
        )
    return path


# ---- the manufacturer -----------------------------------------------------------------------


@dataclass
class ManufacturerCA:
    """A local CA standing in for a TPM manufacturer: swtpm_localca's configuration and state in
    ``directory``. The root and the EK-signing intermediate exist once the first TPM has been
    manufactured with it (swtpm_localca makes them on first use, under its own file lock)."""

    name: str
    directory: Path
    setup_config: Path

    @property
    def root_cert_path(self) -> Path:
        return self.directory / "state" / "swtpm-localca-rootca-cert.pem"

    @property
    def issuer_cert_path(self) -> Path:
        return self.directory / "state" / "issuercert.pem"

    def root_cert(self) -> x509.Certificate:
        """The self-signed root a verifier would trust for this manufacturer."""
        return x509.load_pem_x509_certificate(self.root_cert_path.read_bytes())

    def issuer_cert(self) -> x509.Certificate:
        """The intermediate that signs EK certificates (itself signed by the root)."""
        return x509.load_pem_x509_certificate(self.issuer_cert_path.read_bytes())


def _render(template: Path, target: Path, values: dict[str, str]) -> None:
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    if re.search(r"@[A-Z_]+@", text):
        raise ConfigError(f"unreplaced placeholder in {template}")
    target.write_text(text)


def make_manufacturer_ca(directory: Path, name: str = DEFAULT_MANUFACTURER) -> ManufacturerCA:
    """Write a new manufacturer CA's configuration into ``directory`` (created; must not hold a
    CA already). No key is made yet: the first ``provision`` does that."""
    if not _NAME.fullmatch(name):
        raise ConfigError(f"manufacturer name {name!r}: expected [A-Za-z0-9][A-Za-z0-9._-]*")
    directory = directory.resolve()
    if (directory / "swtpm_setup.conf").exists():
        raise ConfigError(f"{directory} already holds a manufacturer CA")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "state").mkdir(exist_ok=True)
    values = {"CA_DIR": str(directory), "MANUFACTURER": name}
    for template in sorted(TEMPLATE_DIR.glob("*.in")):
        _render(template, directory / template.name.removesuffix(".in"), values)
    return ManufacturerCA(
        name=name, directory=directory, setup_config=directory / "swtpm_setup.conf"
    )


def load_manufacturer_ca(directory: Path) -> ManufacturerCA:
    """A manufacturer CA made earlier by ``make_manufacturer_ca`` (its name is read back from
    the platform-certificate options)."""
    directory = directory.resolve()
    setup_config = directory / "swtpm_setup.conf"
    options = directory / "swtpm-localca.options"
    if not setup_config.is_file() or not options.is_file():
        raise ConfigError(
            f"{directory} is not a manufacturer CA directory (no swtpm_setup.conf and "
            "swtpm-localca.options)"
        )
    found = _MANUFACTURER_LINE.search(options.read_text())
    if found is None:
        raise ConfigError(f"{options}: no --platform-manufacturer line")
    return ManufacturerCA(name=found.group(1), directory=directory, setup_config=setup_config)


def ensure_manufacturer_ca(directory: Path, name: str = DEFAULT_MANUFACTURER) -> ManufacturerCA:
    """The manufacturer CA in ``directory``: loaded if it is there, made otherwise."""
    if (directory / "swtpm_setup.conf").exists():
        return load_manufacturer_ca(directory)
    return make_manufacturer_ca(directory, name)


# ---- manufacturing a TPM --------------------------------------------------------------------


def is_provisioned(state_dir: Path) -> bool:
    """Whether ``state_dir`` holds a manufactured TPM (swtpm's permanent state file)."""
    return (state_dir / STATE_FILE).is_file()


def provision(state_dir: Path, ca: ManufacturerCA, *, binary: str | None = None) -> None:
    """Manufacture a TPM in ``state_dir``: EKs (RSA 2048, ECC P-384) with certificates from
    ``ca``, a platform certificate, NV locked, only the sha256 PCR bank. Overwrites any TPM that
    was there (new seeds: a different TPM)."""
    setup = binary or require_binary(SWTPM_SETUP)
    state_dir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [
            setup,
            "--tpm2",
            "--tpmstate",
            str(state_dir),
            "--config",
            str(ca.setup_config),
            "--overwrite",
            "--pcr-banks",
            "sha256",
            "--create-ek-cert",
            "--create-platform-cert",
            "--lock-nvram",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise StateError(
            f"swtpm_setup failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )


# ---- talking to a running swtpm without ESAPI -----------------------------------------------


def free_port_pair() -> int:
    """A port P such that P and P+1 were free a moment ago (swtpm's TCTI wants the control
    channel on P+1). Racy by nature; ``Swtpm.start`` retries if swtpm cannot bind."""
    return free_port(2)


def _connect(address: int | Path, timeout: float) -> socket.socket:
    if isinstance(address, Path):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.settimeout(timeout)
            conn.connect(str(address))
        except OSError:
            conn.close()
            raise
        return conn
    return socket.create_connection(("127.0.0.1", address), timeout=timeout)


def tpm_command(address: int | Path, command: bytes, timeout: float) -> bytes:
    """Send one raw TPM command to swtpm's command channel (a TCP port or a Unix socket path)
    and return the raw response."""
    with _connect(address, timeout) as conn:
        conn.settimeout(timeout)
        conn.sendall(command)
        header = b""
        while len(header) < 10:
            chunk = conn.recv(10 - len(header))
            if not chunk:
                raise ConnectionError("swtpm closed the connection")
            header += chunk
        _tag, size, _rc = struct.unpack(">HII", header)
        body = b""
        while len(body) < size - 10:
            chunk = conn.recv(size - 10 - len(body))
            if not chunk:
                raise ConnectionError("swtpm closed the connection")
            body += chunk
        return header + body


def transient_handles(address: int | Path, timeout: float = ANSWER_TIMEOUT) -> list[int]:
    """TPM2_GetCapability(TPM_CAP_HANDLES, TRANSIENT_FIRST) over a raw socket: independent of
    ESAPI, so a leak check cannot be fooled by the code it checks."""
    body = struct.pack(">III", 0x00000001, 0x80000000, 64)
    command = struct.pack(">HII", 0x8001, 10 + len(body), 0x0000017A) + body
    response = tpm_command(address, command, timeout)
    _tag, _size, rc = struct.unpack(">HII", response[:10])
    if rc != 0:
        raise StateError(f"GetCapability failed with rc 0x{rc:x}")
    capability, count = struct.unpack(">II", response[11:19])
    if capability != 1:
        raise StateError(f"unexpected capability {capability} in answer")
    return list(struct.unpack(f">{count}I", response[19 : 19 + 4 * count]))


# ---- the running TPM ------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = re.search(r"^State:\s+(\S)", status, re.MULTILINE)
    return state is None or state.group(1) != "Z"


@dataclass
class Swtpm:
    """One ``swtpm socket --tpm2`` process on the TPM state in ``state_dir``.

    ``transport="unix"``: command socket ``state_dir/swtpm.sock``, control socket next to it with
    ``.ctrl`` appended (where the swtpm TCTI looks for it); the path must fit in ``sun_path``.
    ``transport="tcp"``: loopback ports P (commands) and P+1 (control); ``port=0`` picks a free
    pair at every start, a given port is kept across restarts (same TCTI string).
    With ``pid_file`` swtpm writes its PID there (removed again at stop).
    """

    state_dir: Path
    log_path: Path
    port: int = 0
    transport: Transport = "tcp"
    pid_file: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def socket_path(self) -> Path:
        return self.state_dir / SOCKET_NAME

    @property
    def tcti(self) -> str:
        if self.transport == "unix":
            return f"swtpm:path={self.socket_path}"
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def address(self) -> int | Path:
        """The command channel: a TCP port or a Unix socket path (for ``tpm_command``)."""
        return self.socket_path if self.transport == "unix" else self.port

    @property
    def pid(self) -> int:
        if self.process is None:
            raise StateError("swtpm is not running")
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def binary(self) -> str:
        """The swtpm executable (a hook: the test fixture turns a missing one into a test
        failure)."""
        return require_binary(SWTPM)

    def _command_line(self, binary: str) -> list[str]:
        if self.transport == "unix":
            sock = str(self.socket_path)
            if len(sock) + len(".ctrl") > MAX_SOCKET_PATH:
                raise ConfigError(
                    f"TPM socket path {sock} is too long for a Unix socket: use a shorter state "
                    "directory or the tcp transport"
                )
            server = f"type=unixio,path={sock}"
            ctrl = f"type=unixio,path={sock}.ctrl"
        else:
            server = f"type=tcp,port={self.port},bindaddr=127.0.0.1"
            ctrl = f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1"
        line = [
            binary,
            "socket",
            "--tpm2",
            "--server",
            server,
            "--ctrl",
            ctrl,
            "--tpmstate",
            f"dir={self.state_dir}",
            "--flags",
            "not-need-init,startup-clear",
            "--log",
            f"file={self.log_path},level=1",
        ]
        if self.pid_file is not None:
            line += ["--pid", f"file={self.pid_file}"]
        return line

    def start(self) -> None:
        """Start swtpm and return once it answers a TPM command; ``StateError`` (with the log's
        tail) if it does not within ``START_TIMEOUT`` after a few attempts."""
        binary = self.binary()
        keep_port = self.transport == "unix" or self.port != 0
        for _attempt in range(5):
            if not keep_port:
                self.port = free_port_pair()
            if self.transport == "unix":
                for stale in (self.socket_path, Path(f"{self.socket_path}.ctrl")):
                    with contextlib.suppress(FileNotFoundError):
                        stale.unlink()  # left by a killed instance; swtpm will not bind over it
            self.process = subprocess.Popen(
                self._command_line(binary),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._wait_until_answering():
                return
            self.stop()
            if keep_port:
                time.sleep(0.2)  # the old instance's socket may linger a moment
        raise StateError(f"swtpm did not start; log:\n{self._log_tail()}")

    def _wait_until_answering(self) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                transient_handles(self.address, timeout=2.0)
            except (OSError, StateError):
                time.sleep(0.005)
                continue
            return True
        return False

    def stop(self) -> None:
        """Stop this instance by its PID: SIGTERM, wait, then SIGKILL (idempotent)."""
        process, self.process = self.process, None
        try:
            if process is not None:
                stop_child(process, STOP_TIMEOUT)
        finally:
            if self.pid_file is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.pid_file.unlink()

    def restart(self) -> None:
        """Stop and start again on the same state and the same address (same TCTI string): what
        a device reboot looks like to the TPM (volatile state lost, NV kept)."""
        self.stop()
        self.start()

    def transient_handles(self) -> list[int]:
        return transient_handles(self.address)

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"
