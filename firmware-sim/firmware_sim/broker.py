"""Mosquitto as the fleet's MQTT broker on one machine: config writer, start, wait for TLS, stop
by PID.

One way to run the broker for the test fixtures (``tests/fixtures/mosquitto.py``), the local lab
(``firmware_sim.lab``) and the demo: its own configuration file, ACL, persistence directory and
log file in one directory, a free loopback port, mutual TLS with the certificate CN as the user
name (docs/mqtt.md), and the process stopped by its PID (SIGTERM, wait, SIGKILL).

The broker runs as the user who starts it (``user`` in the config): run as root, Mosquitto would
drop to user ``mosquitto``, which cannot read a 0600 key of ours nor write our persistence.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from agent.protocol.errors import ConfigError, StateError
from agent.protocol.topics import SERVICE_ID, TOPIC_ROOT
from firmware_sim.ports import free_port
from firmware_sim.processes import stop_child
from provisioning import pki

SERVICE_IDENTITY = SERVICE_ID

# The product ACL of docs/mqtt.md. The certificate CN is the broker user name
# (use_identity_as_username) and is used verbatim as the topic level: device "dev-0001" owns
# kf/v1/dev/dev-0001/..., operator "op-alice" owns kf/v1/ops/op-alice/...
ACL = f"""\
# keyfleet broker ACL (see docs/mqtt.md)
user {SERVICE_IDENTITY}
topic readwrite {TOPIC_ROOT}/#

# Patterns apply to every authenticated client; %u is the certificate CN.
# Devices (CN = device id, "dev-..."):
pattern write {TOPIC_ROOT}/dev/%u/report
pattern read {TOPIC_ROOT}/dev/%u/cmd
pattern read {TOPIC_ROOT}/grp/+/commit
pattern read {TOPIC_ROOT}/feed/revocations
pattern read {TOPIC_ROOT}/feed/releases
pattern read {TOPIC_ROOT}/feed/trust
# Operators (CN = "op-..."):
pattern write {TOPIC_ROOT}/ops/%u/cmd
pattern read {TOPIC_ROOT}/ops/%u/result
"""

DEFAULT_LOG_TYPES = ("all",)
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
CRL_POLL = 0.05  # how often ``watch_crl`` looks at the CRL file (seconds)
HOST = "127.0.0.1"


def mosquitto_binary() -> str:
    """The mosquitto executable; missing is a configuration problem naming the package."""
    binary = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)),
        None,
    )
    if binary is None:
        raise ConfigError(
            "mosquitto is not installed: install the Debian package 'mosquitto'"
            " (make setup installs it)"
        )
    return binary


class Mosquitto:
    """One Mosquitto process with its own config, ACL, persistence directory and log file.

    ``ca_file`` is the CA of the broker's server certificate (what clients verify);
    ``client_ca_certs`` are the CAs whose client certificates the broker accepts (the broker CA
    itself, the fleet's device CA, the operator CA). ``probe`` is a client certificate and key
    the readiness check presents (without one it checks that the TLS handshake completes).
    ``restart()`` keeps port and persistence, so sessions and queued QoS 1 messages survive it the
    way they survive a real broker restart.

    ``crl_file``: the broker's ``crlfile`` (the fleet service writes it: the device CA's CRL and
    the other client CAs' CRLs; Mosquitto then refuses any client whose certificate is on one,
    and any client whose CA has no CRL in the file). Mosquitto 2.0.11 reads it only at start:
    ``watch_crl()`` restarts the broker whenever the file changes, as the product's systemd
    path unit does (systemd/keyfleet-broker-crl.path).
    """

    def __init__(
        self,
        directory: Path,
        *,
        server_cert: Path,
        server_key: Path,
        ca_file: Path,
        client_ca_certs: Sequence[x509.Certificate],
        acl: str = ACL,
        log_types: tuple[str, ...] = DEFAULT_LOG_TYPES,
        probe: tuple[Path, Path] | None = None,
        port: int | None = None,
        binary: str | None = None,
        crl_file: Path | None = None,
    ) -> None:
        if not client_ca_certs:
            raise ConfigError("the broker needs at least one CA for client certificates")
        self.binary = binary or mosquitto_binary()
        self.directory = directory
        self.host = HOST
        self.port = port if port is not None else free_port()
        self.ca_file = ca_file
        self.server_cert_file = server_cert
        self.server_key_file = server_key
        self.acl = acl
        self.acl_file = directory / "acl"
        self.config_file = directory / "mosquitto.conf"
        self.persistence_dir = directory / "persistence"
        self.log_path = directory / "mosquitto.log"
        self.probe = probe
        self.crl_file = crl_file
        self.crl_restarts = 0
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None
        directory.mkdir(parents=True, exist_ok=True)
        self.persistence_dir.mkdir(parents=True, exist_ok=True)
        self.client_ca_file = directory / "client-cas.pem"
        pki.write_certificate(self.client_ca_file, *client_ca_certs)
        self.acl_file.write_text(acl)
        self.config_file.write_text(self.config_text(log_types))
        self._process: subprocess.Popen[bytes] | None = None

    def config_text(self, log_types: tuple[str, ...] = DEFAULT_LOG_TYPES) -> str:
        """The mosquitto.conf this broker runs with (also what docs/operations.md shows)."""
        lines = [
            "per_listener_settings false",
            f"user {getpass.getuser()}",
            f"listener {self.port} {self.host}",
            "protocol mqtt",
            f"cafile {self.client_ca_file}",
            f"certfile {self.server_cert_file}",
            f"keyfile {self.server_key_file}",
            "require_certificate true",
            "use_identity_as_username true",
            "allow_anonymous false",
            f"acl_file {self.acl_file}",
            *([f"crlfile {self.crl_file}"] if self.crl_file is not None else []),
            "persistence true",
            f"persistence_location {self.persistence_dir}/",
            "persistence_file mosquitto.db",
            "autosave_interval 1",
            "max_queued_messages 10000",
            f"log_dest file {self.log_path}",
            *(f"log_type {t}" for t in log_types),
            "log_timestamp_format %H:%M:%S",
            "connection_messages true",
        ]
        return "\n".join(lines) + "\n"

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        if self._process is None:
            raise StateError("broker is not running")
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start and return once the broker completes a TLS handshake on its port;
        ``StateError`` with the log's tail otherwise (the process is killed then)."""
        if self.running:
            raise StateError("broker already running")
        with open(self.log_path, "ab") as log:
            log.write(f"---- keyfleet: starting mosquitto on {self.port} ----\n".encode())
            # stdout/stderr also go to the log: config errors are printed there before the
            # log file is opened.
            self._process = subprocess.Popen(
                [self.binary, "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self._signal_and_wait(signal.SIGKILL)
            raise

    def _wait_ready(self, timeout: float) -> None:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if self.probe is not None:
            context.load_cert_chain(str(self.probe[0]), str(self.probe[1]))
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise StateError(f"mosquitto exited during start:\n{self.log_tail()}")
            try:
                with (
                    socket.create_connection((self.host, self.port), timeout=1.0) as raw,
                    context.wrap_socket(raw, server_hostname=self.host),
                ):
                    return
            except OSError as exc:
                last_error = exc
                time.sleep(0.02)
        raise StateError(
            f"mosquitto did not accept TLS on {self.port} within {timeout}s "
            f"({last_error}):\n{self.log_tail()}"
        )

    def _signal_and_wait(self, sig: signal.Signals) -> None:
        process = self._process
        if process is None:
            return
        stop_child(process, STOP_TIMEOUT, sig)
        self._process = None

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its persistence file on the way out), SIGKILL if it hangs.
        Stops the CRL watcher too."""
        self._watch_stop.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(STOP_TIMEOUT)
        self._signal_and_wait(signal.SIGTERM)

    def watch_crl(self, interval: float = CRL_POLL) -> None:
        """Restart the broker (same port, same persistence) each time ``crl_file`` changes."""
        path = self.crl_file
        if path is None:
            raise ConfigError("the broker has no crlfile to watch")
        if self._watcher is not None:
            return
        self._watch_stop.clear()

        def seen() -> tuple[int, int, int] | None:
            try:
                st = path.stat()
            except FileNotFoundError:
                return None
            return (st.st_ino, st.st_mtime_ns, st.st_size)

        def run(last: tuple[int, int, int] | None) -> None:
            while not self._watch_stop.wait(interval):
                now = seen()
                if now is None or now == last:
                    continue
                last = now
                self._signal_and_wait(signal.SIGTERM)
                if self._watch_stop.is_set():
                    return
                self.start()
                self.crl_restarts += 1

        self._watcher = threading.Thread(
            target=run, args=(seen(),), name=f"crl-watch-{self.port}", daemon=True
        )
        self._watcher.start()

    def kill(self) -> None:
        """A crash: SIGKILL, nothing saved beyond the last autosave (1 s)."""
        self._signal_and_wait(signal.SIGKILL)

    def restart(self, *, crash: bool = False) -> None:
        """Stop and start again on the same port with the same persistence."""
        self._signal_and_wait(signal.SIGKILL if crash else signal.SIGTERM)
        self.start()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log written)"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_text()[-chars:]
