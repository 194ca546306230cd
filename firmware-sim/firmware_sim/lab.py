"""A whole keyfleet installation on one machine, from real parts: the local lab.

``Lab(workdir, devices=N)`` builds, step by step and timing each step:

1. **PKI** (``provisioning.pki``): the fleet TLS CA (broker and enrollment server certificates),
   the device CA, the operator CA with four operators (``op-admin`` and ``op-admin2`` admins,
   ``op-ops`` operator, ``op-view`` viewer), the service certificate (CN ``keyfleet-service``,
   from the TLS CA so the broker accepts it), the station CA with one station certificate, and a
   simulated TPM manufacturer (``firmware_sim.swtpm.ensure_manufacturer_ca``) whose CAs the
   service trusts.
2. **Mosquitto** (``firmware_sim.broker``): mutual TLS, the product ACL of docs/mqtt.md, client
   certificates from the TLS CA, the device CA and the operator CA, on a free loopback port.
3. **The service**: ``service.toml`` (``provisioning.config`` keys) with the golden-measurements
   policy of the simulator's firmware and ``[http]`` for the enrollment API, ``keyfleet db
   init``, ``keyfleet operator add`` for each operator, ``keyfleet station add`` for the station,
   then ``keyfleet serve`` as a subprocess (delivery service and HTTPS enrollment API; ready when
   it logs ``keyfleet serve: ready``).
4. **Devices**: N ``firmware-sim device`` subprocesses (each its own swtpm and measured boot),
   provisioned over their pty by the station (``provisioning.station.Station``), given the
   device's app access rules, rebooted into run mode, and waited for until their agent
   (``keyagent run``) is connected to the broker.
5. **Operators**: ``keyfleet`` CLI runs as one of the operators (``KEYFLEET_*`` environment),
   returning the exit status and the ``--json`` result lines.
6. **Apps**: a local API client (``agent.localapi.client.LocalApiClient``) per device.
7. **Stop**: everything by PID in reverse order; any process still alive afterwards is killed
   and reported as an error (``LabError`` naming it).

Every component logs into its own file under ``workdir/logs`` (the service, the broker, each
device and its agent, each CLI run); a component that does not come up raises ``LabError``
naming it with the tail of its log. ``timings`` and ``summary()`` say what took how long.

The lab is for one machine and for trying things out (tests, ``make demo``): its CA keys are
files in ``workdir``, the devices' TPMs are swtpm, and the agents' local API lets the user who
runs the lab encrypt and decrypt in every group.

Why one module of this size: it is one procedure, the seven steps above in order, each of which
needs the files and processes of the ones before it; split by step, every part would take the
whole lab's state as an argument. The PKI, broker, swtpm, device and station it drives each live
in their own module; what is here is the ordering, waiting and clean-up between them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.orm import Session, sessionmaker

from agent.config import load_config as load_agent_config
from agent.fsio import atomic_write
from agent.localapi.client import LocalApiClient
from agent.mqtt import MqttClient
from agent.protocol.errors import KeyfleetError, StateError
from agent.protocol.secret import Secret
from agent.serial_link import SerialClient
from agent.staterotation import read_state
from agent.tpm.store import TPMStore
from firmware_sim import release
from firmware_sim.boot import default_components
from firmware_sim.broker import SERVICE_IDENTITY, Mosquitto
from firmware_sim.ports import free_port
from firmware_sim.softhsm import CONF_ENV, SoftToken
from firmware_sim.swtpm import ensure_manufacturer_ca, pid_alive, provision, tpm_command
from provisioning import audit as audit_log
from provisioning import custody, pki
from provisioning.config import load_config
from provisioning.custody import refresh_modules
from provisioning.policy import policy_from_components, write_policy
from provisioning.registry import (
    AckStatus,
    Registry,
    make_engine,
    redact_url,
    run_in_transaction,
    session_factory,
)
from provisioning.station import FleetClient, ProvisionReport, Station

log = logging.getLogger("firmware_sim.lab")

T = TypeVar("T")

# two admins: the admins' own quorum decisions (revocations, replacements, operators) can be
# played with dual control (``min_approvals`` 2 or a policy asking two)
OPERATORS: Mapping[str, str] = {
    "op-admin": "admin",
    "op-admin2": "admin",
    "op-ops": "operator",
    "op-view": "viewer",
}
STATION = "lab-station"
CERT_VALIDITY = timedelta(days=30)
SERVICE_READY = b"keyfleet serve: ready"
SERVICE_STOPPED = b"keyfleet serve: stopped"
STOP_TIMEOUT = 15.0
LOG_TAIL = 3000
APP_OPERATIONS = ("encrypt", "decrypt", "sign", "list-keys")


class LabError(StateError):
    """A lab component failed (to start, to answer, or to stop); ``component`` names it and the
    message carries the tail of its log."""

    def __init__(self, component: str, problem: str, log_tail: str = "") -> None:
        text = f"{component}: {problem}"
        if log_tail:
            text += f"\n----- {component} log (tail) -----\n{log_tail}"
        super().__init__(text)
        self.component = component
        self.problem = problem


def tail_of(path: Path, chars: int = LOG_TAIL) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log written)"


def _wait(
    component: str,
    what: str,
    check: Callable[[], T | None],
    timeout: float,
    *,
    log_path: Path | None = None,
    alive: Callable[[], bool] | None = None,
    interval: float = 0.05,
) -> T:
    """Poll ``check`` until it returns something else than None; ``LabError`` on timeout or when
    ``alive`` says the component died."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None:
            return value
        if alive is not None and not alive():
            raise LabError(
                component, f"exited while waiting for {what}", tail_of(log_path) if log_path else ""
            )
        if time.monotonic() >= deadline:
            raise LabError(
                component,
                f"no {what} within {timeout:g} s",
                tail_of(log_path) if log_path else "",
            )
        time.sleep(interval)


def _stop_pid(pid: int, timeout: float = STOP_TIMEOUT, sig: int = signal.SIGTERM) -> bool:
    """Signal ``pid``, wait for it to go; SIGKILL after ``timeout``. True if it went by itself."""
    if not pid_alive(pid):
        return True
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return False


def _reap(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=0.5)


# ---- files -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """A certificate and its key on disk (mode 0600 key)."""

    name: str
    cert: Path
    key: Path
    role: str | None = None


@dataclass(frozen=True)
class LabPKI:
    """Every CA and certificate the lab made (paths under ``workdir/pki``)."""

    directory: Path
    tls_ca: Path
    device_ca: Path
    # the device CA's key file; None when the key is in the token (``device_ca_key_ref``)
    device_ca_key: Path | None
    operator_ca: Path
    station_ca: Path
    manufacturer_cas: Path
    broker: Identity
    enrollment_server: Identity
    service: Identity
    station: Identity
    operators: Mapping[str, Identity]
    station_cert: x509.Certificate = field(repr=False)
    # the service's signing certificate and its key's reference (a file, or a pkcs11: URI)
    signing_cert: Path | None = None
    signing_key_ref: str = ""
    device_ca_key_ref: str = ""
    token: SoftToken | None = None
    # the release-signing key's reference (file or pkcs11: URI) and its public key (PEM), which
    # devices are given at enrollment (docs/releases.md)
    release_key_ref: str = ""
    release_public: Path | None = None


def _write_identity(
    directory: Path, name: str, cert: x509.Certificate, key: Any, role: str | None = None
) -> Identity:
    identity = Identity(name, directory / f"{name}.pem", directory / f"{name}.key", role)
    pki.write_certificate(identity.cert, cert)
    pki.write_private_key(identity.key, key)
    return identity


def make_lab_pki(
    directory: Path, manufacturer_dir: Path, token_dir: Path | None = None, *, backup: bool = False
) -> LabPKI:
    """Step 1: the installation's CAs and certificates. With ``token_dir`` the device CA key and
    the service's signing key are made in a SoftHSM2 token there (``firmware_sim.softhsm``) and
    never exist as files (``backup``: made so that ``keyfleet backup create`` can export them
    wrapped); otherwise they are PEM files (which the service warns about)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    valid = CERT_VALIDITY
    tls_ca = pki.create_ca("keyfleet lab TLS CA", now=now, valid_for=valid)
    token: SoftToken | None = None
    refs: dict[str, str] = {}
    keys: dict[str, ec.EllipticCurvePrivateKey] = {}
    if token_dir is not None:
        token = SoftToken.create(token_dir, label="keyfleet-lab")
        # this process signs the device CA's certificate with the token key: it must see the
        # token too (SoftHSM2 reads SOFTHSM2_CONF when the library initialises)
        os.environ[CONF_ENV] = str(token.conf)
        refresh_modules()
        for label in ("device-ca", "service-signing", "release-signing"):
            refs[label] = token.uri(label)
            custody.generate_token_key(custody.parse_token_uri(refs[label]), backup=backup)
            keys[label] = custody.load_private_key(refs[label])
    device_ca = pki.create_ca(
        "keyfleet lab device CA", now=now, valid_for=valid, key=keys.get("device-ca")
    )
    operator_ca = pki.create_ca("keyfleet lab operator CA", now=now, valid_for=valid)
    station_ca = pki.create_ca("keyfleet lab station CA", now=now, valid_for=valid)
    paths = {
        "tls_ca": directory / "tls-ca.pem",
        "device_ca": directory / "device-ca.pem",
        "operator_ca": directory / "operator-ca.pem",
        "station_ca": directory / "station-ca.pem",
    }
    for name, ca in (
        ("tls_ca", tls_ca),
        ("device_ca", device_ca),
        ("operator_ca", operator_ca),
        ("station_ca", station_ca),
    ):
        pki.write_certificate(paths[name], ca.certificate)
    device_ca_key: Path | None = None
    if token is None:
        device_ca_key = directory / "device-ca.key"
        pki.write_private_key(device_ca_key, device_ca.private_key)
        refs["device-ca"] = str(device_ca_key)
        keys["service-signing"] = pki.generate_key()
        refs["service-signing"] = str(directory / "service-signing.key")
        pki.write_private_key(refs["service-signing"], keys["service-signing"])
        keys["release-signing"] = pki.generate_key()
        refs["release-signing"] = str(directory / "release-signing.key")
        pki.write_private_key(refs["release-signing"], keys["release-signing"])
    release_public = directory / "release-signing.pub.pem"
    atomic_write(
        release_public,
        keys["release-signing"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        mode=0o644,
    )
    signing_cert = directory / "service-signing.pem"
    pki.write_certificate(
        signing_cert,
        pki.issue_client_cert(
            tls_ca,
            keys["service-signing"].public_key(),
            identity="keyfleet-service-signing",
            role="service",
            now=now,
            valid_for=valid,
        ),
    )

    def server(name: str) -> Identity:
        key = pki.generate_key()
        cert = pki.issue_server_cert(
            tls_ca,
            key.public_key(),
            common_name=name,
            dns_names=["localhost"],
            ip_addresses=["127.0.0.1"],
            now=now,
            valid_for=valid,
        )
        return _write_identity(directory, name, cert, key)

    def client(ca: pki.CertificateAuthority, name: str, role: str) -> Identity:
        key = pki.generate_key()
        cert = pki.issue_client_cert(
            ca, key.public_key(), identity=name, role=role, now=now, valid_for=valid
        )
        return _write_identity(directory, name, cert, key, role)

    broker = server("mosquitto")
    enrollment_server = server("keyfleet-enroll")
    service = client(tls_ca, SERVICE_IDENTITY, "service")
    station_key = pki.generate_key()
    station_cert = pki.issue_client_cert(
        station_ca,
        station_key.public_key(),
        identity=STATION,
        role="station",
        now=now,
        valid_for=valid,
    )
    station = _write_identity(directory, STATION, station_cert, station_key, "station")
    operators = {name: client(operator_ca, name, role) for name, role in OPERATORS.items()}
    manufacturer = ensure_manufacturer_ca(manufacturer_dir)
    if not manufacturer.root_cert_path.exists():
        # swtpm_localca makes the CA's keys at the first TPM it certifies: make them now, once
        # (devices booting in parallel would race for it, and the service must trust them first).
        provision(manufacturer_dir / "first-tpm", manufacturer)
    manufacturer_cas = directory / "manufacturer-cas.pem"
    pki.write_certificate(manufacturer_cas, manufacturer.root_cert(), manufacturer.issuer_cert())
    return LabPKI(
        directory=directory,
        tls_ca=paths["tls_ca"],
        device_ca=paths["device_ca"],
        device_ca_key=device_ca_key,
        operator_ca=paths["operator_ca"],
        station_ca=paths["station_ca"],
        manufacturer_cas=manufacturer_cas,
        broker=broker,
        enrollment_server=enrollment_server,
        service=service,
        station=station,
        operators=operators,
        station_cert=station_cert,
        signing_cert=signing_cert,
        signing_key_ref=refs["service-signing"],
        device_ca_key_ref=refs["device-ca"],
        token=token,
        release_key_ref=refs["release-signing"],
        release_public=release_public,
    )


# ---- devices -----------------------------------------------------------------------------------


@dataclass
class LabDevice:
    """One ``firmware-sim device`` process and what the lab knows about it."""

    name: str
    state_dir: Path
    ready_file: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    device_id: str | None = None
    info: dict[str, Any] = field(default_factory=dict, repr=False)
    provision_report: ProvisionReport | None = field(default=None, repr=False)
    boots: int = 0

    @property
    def id(self) -> str:
        """The fleet's device id (``dev-…``); only after provisioning."""
        if self.device_id is None:
            raise LabError(self.name, "not provisioned yet")
        return self.device_id

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def agent_pid(self) -> int | None:
        pid = self.info.get("agent_pid")
        return pid if isinstance(pid, int) else None

    @property
    def swtpm_pid(self) -> int | None:
        pid = self.info.get("swtpm_pid")
        return pid if isinstance(pid, int) else None

    @property
    def tcti(self) -> str:
        return str(self.info["tcti"])

    @property
    def api_socket(self) -> Path:
        return self.state_dir / "api.sock"

    @property
    def agent_config(self) -> Path:
        return self.state_dir / "agent.toml"

    @property
    def agent_log(self) -> Path:
        return self.state_dir / "agent.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def agent_running(self) -> bool:
        pid = self.agent_pid
        return pid is not None and pid_alive(pid)

    def read_ready(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self.ready_file.read_bytes())
        except (OSError, ValueError):
            return None
        return data

    def status(self) -> dict[str, Any] | None:
        """The agent's status file (``keyagent status --json``), or None if absent/partial."""
        try:
            data: dict[str, Any] = json.loads((self.state_dir / "status.json").read_bytes())
        except (OSError, ValueError):
            return None
        return data

    def epoch(self, group: str) -> int | None:
        status = self.status() or {}
        for entry in status.get("groups", []):
            if entry.get("group") == group:
                epoch = entry.get("epoch")
                return epoch if isinstance(epoch, int) else None
        return None

    def fresh_leaf_pending(self, group: str) -> bool:
        """Whether the agent still holds ``group`` with the leaf key it joined with (its status
        file; its first self-update is still to come)."""
        status = self.status() or {}
        return any(
            entry.get("group") == group and entry.get("fresh_leaf_pending") is True
            for entry in status.get("groups", [])
        )

    def api(self, timeout: float = 10.0) -> LocalApiClient:
        """A local API client at this device's socket (use as a context manager)."""
        return LocalApiClient(self.api_socket, timeout=timeout)

    def log_tail(self) -> str:
        return (
            f"{tail_of(self.log_path, LOG_TAIL // 2)}\n----- agent.log -----\n"
            f"{tail_of(self.agent_log, LOG_TAIL)}"
        )


# ---- CLI results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CliResult:
    """One ``keyfleet`` run: exit status, output, and the JSON objects it printed (one a line)."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def results(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for raw in self.stdout.splitlines():
            line = raw.strip()
            if line.startswith(("{", "[")):
                with contextlib.suppress(ValueError):
                    value = json.loads(line)
                    if isinstance(value, dict):
                        out.append(value)
        return out

    @property
    def final(self) -> dict[str, Any] | None:
        results = self.results
        return results[-1] if results else None

    def json(self) -> Any:
        """The whole stdout as one JSON document (``keyfleet groups --json``)."""
        return json.loads(self.stdout)

    def __str__(self) -> str:
        return (
            f"keyfleet {' '.join(self.args)} -> {self.returncode} in {self.seconds:.2f}s\n"
            f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}"
        )


class RunningCli:
    """A ``keyfleet`` process started without waiting (several at once: ``Lab.keyfleet_start``)."""

    def __init__(self, args: Sequence[str], process: subprocess.Popen[str], out: Path) -> None:
        self.args = tuple(args)
        self.process = process
        self.out = out
        self.started = time.monotonic()

    def wait(self, timeout: float = 180.0) -> CliResult:
        try:
            stdout, stderr = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            stdout, stderr = self.process.communicate(timeout=10)
            stderr += f"\n(lab: killed after {timeout:g} s)"
        result = CliResult(
            self.args, self.process.returncode, stdout, stderr, time.monotonic() - self.started
        )
        with self.out.open("a") as sink:
            sink.write(
                f"$ keyfleet {' '.join(self.args)}\n{stdout}{stderr}[exit {result.returncode}]\n"
            )
        return result


# ---- the lab -----------------------------------------------------------------------------------


@dataclass
class _Tracked:
    pid: int
    component: str
    marker: str  # a substring of its command line, so a recycled PID is not mistaken for it


class Lab:
    """A whole keyfleet installation in ``workdir``; ``with Lab(...) as lab:`` starts and stops it.

    Options: ``devices`` (how many), ``ack_timeout`` / ``commit_request_timeout`` /
    ``retention_epochs`` / ``online_window`` (the service's ``[groups]`` and ``[service]``
    settings), ``min_approvals`` (the service's ``[quorum]``: how many operators approve a
    membership change; 1 lets the lab's direct commands run at once) and ``request_ttl`` (how
    long such a request stays approvable, seconds), ``automatic_changes`` (the admin signs a
    quorum policy at start that lets the service remove quarantined members and re-add members
    behind the commit log on its own: ``adopt_policy``; by default where ``min_approvals`` is
    1), ``device_env`` (extra environment for the
    device processes and so their agents), ``start_timeout`` (per component), ``log_level`` (of
    ``keyfleet serve``), ``database_url`` (the service's database, e.g. an empty PostgreSQL
    database; default a SQLite file in ``workdir/service``), ``token`` (the service's signing and
    device CA keys in a SoftHSM2 token in ``workdir/token``, not in files; the demo sets it;
    ``token_backup`` makes them so that ``keyfleet backup create`` can export them wrapped),
    ``releases`` (the service gets ``[releases] signing_key``: it publishes the signed release
    bundle and enrolls devices with the release key, so their state survives approved updates;
    docs/releases.md), ``certificate_validity`` (the service's ``[enrollment]
    certificate_validity_seconds``: a short lifetime makes devices renew their certificates
    within a test; docs/attestation.md, "Certificate renewal"), ``renew_expired`` (the service
    gets ``[renewal] expired = "allow"`` with this ``max_expired_seconds`` and its HTTPS renewal
    listener at ``renewal_url``, which enrollment gives the devices' agents).
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        devices: int = 4,
        ack_timeout: int = 30,
        commit_request_timeout: int = 5,
        retention_epochs: int = 64,
        online_window: int = 300,
        quarantine: bool = False,
        min_approvals: int = 1,
        request_ttl: int = 86400,
        automatic_changes: bool | None = None,
        device_env: Mapping[str, str] | None = None,
        start_timeout: float = 60.0,
        log_level: str = "info",
        database_url: str | None = None,
        token: bool = False,
        token_backup: bool = False,
        releases: bool = False,
        certificate_validity: int | None = None,
        renew_expired: int | None = None,
    ) -> None:
        if devices < 0:
            raise LabError("lab", f"devices must be >= 0, got {devices}")
        self.workdir = Path(workdir).resolve()
        self.device_count = devices
        self.ack_timeout = ack_timeout
        self.commit_request_timeout = commit_request_timeout
        self.retention_epochs = retention_epochs
        self.online_window = online_window
        self.quarantine = quarantine
        self.min_approvals = min_approvals
        self.request_ttl = request_ttl
        # by default only where one admin may sign the policy alone (min_approvals 1)
        self.automatic_changes = (
            min_approvals == 1 if automatic_changes is None else automatic_changes
        )
        self.device_env = dict(device_env or {})
        self.token = token
        self.token_backup = token_backup
        self.releases = releases
        self.certificate_validity = certificate_validity
        self.renew_expired = renew_expired
        self.start_timeout = start_timeout
        self.log_level = log_level
        self.logs = self.workdir / "logs"
        self.timings: dict[str, float] = {}
        self.pki: LabPKI | None = None
        self.broker: Mosquitto | None = None
        self.service_config = self.workdir / "service" / "service.toml"
        self.database = self.workdir / "service" / "fleet.db"
        # kept out of reprs and status output: a PostgreSQL URL may carry a password
        self.database_url = database_url or f"sqlite:///{self.database}"
        self.service_log = self.logs / "service.log"
        self.cli_log = self.logs / "keyfleet-cli.log"
        self.service_process: subprocess.Popen[bytes] | None = None
        self.enrollment_port = free_port()
        self.renewal_port = free_port() if renew_expired is not None else None
        self.devices: list[LabDevice] = []
        self._engine: Any = None
        self._sessions: sessionmaker[Session] | None = None
        self._tracked: list[_Tracked] = []
        self._started_at: float | None = None
        self._stopped = False

    # -- context manager ----------------------------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            self.start()
        except BaseException:
            with contextlib.suppress(KeyfleetError):
                self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(raise_on_leftovers=exc[0] is None)

    @contextlib.contextmanager
    def _step(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        log.info("lab: %s ...", name)
        try:
            yield
        finally:
            self.timings[name] = round(time.monotonic() - start, 3)
            log.info("lab: %s done in %.2f s", name, self.timings[name])

    def _track(self, pid: int, component: str, marker: str) -> None:
        self._tracked.append(_Tracked(pid, component, marker))

    # -- start --------------------------------------------------------------------------------

    def start(self) -> None:
        """Steps 1-4; ``LabError`` naming the component that did not come up."""
        self._started_at = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        with self._step("pki"):
            self.pki = make_lab_pki(
                self.workdir / "pki",
                self.workdir / "manufacturer-ca",
                self.workdir / "token" if self.token else None,
                backup=self.token_backup,
            )
        with self._step("broker"):
            self._start_broker()
        with self._step("service"):
            self._write_service_config()
            self._service_setup()
            self.start_service()
            if self.automatic_changes:
                self.adopt_policy(auto=True)
        with self._step("devices"):
            self._start_devices()
        self.timings["total"] = round(time.monotonic() - self._started_at, 3)

    def _start_broker(self) -> None:
        assert self.pki is not None
        pki_ = self.pki
        certs = [
            pki.cert_from_pem(path.read_bytes())
            for path in (pki_.tls_ca, pki_.device_ca, pki_.operator_ca)
        ]
        self.broker = Mosquitto(
            self.workdir / "broker",
            server_cert=pki_.broker.cert,
            server_key=pki_.broker.key,
            ca_file=pki_.tls_ca,
            client_ca_certs=certs,
            probe=(pki_.service.cert, pki_.service.key),
            log_types=("error", "warning", "notice", "information", "subscribe"),
        )
        try:
            self.broker.start(timeout=self.start_timeout)
        except KeyfleetError as exc:
            raise LabError("mosquitto", "did not start", str(exc)) from None
        self._track(self.broker.pid, "mosquitto", "mosquitto")

    def _write_service_config(self) -> None:
        assert self.pki is not None and self.broker is not None
        pki_ = self.pki
        directory = self.service_config.parent
        directory.mkdir(parents=True, exist_ok=True)
        golden = directory / "golden.toml"
        write_policy(policy_from_components(default_components()), golden)
        text = f"""\
# keyfleet service configuration written by the local lab (firmware_sim.lab)
[database]
url = "{self.database_url}"

[broker]
host = "{self.broker.host}"
port = {self.broker.port}
ca = "{pki_.tls_ca}"
client_cert = "{pki_.service.cert}"
client_key = "{pki_.service.key}"

[device_ca]
cert = "{pki_.device_ca}"
key = "{pki_.device_ca_key_ref}"

[operator_ca]
cert = "{pki_.operator_ca}"

[attestation]
manufacturer_cas = "{pki_.manufacturer_cas}"
golden_measurements = "{golden}"
quarantine = {"true" if self.quarantine else "false"}

[groups]
commit_log_retention_epochs = {self.retention_epochs}
ack_timeout_seconds = {self.ack_timeout}

[quorum]
min_approvals = {self.min_approvals}
request_ttl_seconds = {self.request_ttl}

[http]
listen = "127.0.0.1:{self.enrollment_port}"
tls_cert = "{pki_.enrollment_server.cert}"
tls_key = "{pki_.enrollment_server.key}"
station_ca = "{pki_.station_ca}"

[service]
instance = "lab"
signing_key = "{pki_.signing_key_ref}"
signing_cert = "{pki_.signing_cert}"
commit_request_timeout_seconds = {self.commit_request_timeout}
online_window_seconds = {self.online_window}
"""
        if self.certificate_validity is not None:
            text += f"""
[enrollment]
certificate_validity_seconds = {self.certificate_validity}
"""
        if self.renew_expired is not None:
            # the HTTPS renewal listener for devices whose certificates expired (server TLS
            # with the enrollment API's server certificate: it names 127.0.0.1)
            text += f"""
[renewal]
expired = "allow"
max_expired_seconds = {self.renew_expired}
listen = "127.0.0.1:{self.renewal_port}"
url = "{self.renewal_url}"
tls_cert = "{pki_.enrollment_server.cert}"
tls_key = "{pki_.enrollment_server.key}"
"""
        if self.releases:
            # the release-signing key: devices get its public key at enrollment and seal their
            # state for the releases it approves (docs/releases.md)
            text += f"""
[releases]
signing_key = "{pki_.release_key_ref}"
"""
        self.service_config.write_text(text)
        load_config(self.service_config)  # the service's own loader: every problem at once

    def _service_setup(self) -> None:
        assert self.pki is not None
        result = self.keyfleet("db", "init", "--config", str(self.service_config))
        if result.returncode != 0:
            raise LabError("keyfleet db init", f"exit {result.returncode}", result.stderr)
        # Registrations run side by side (each CLI run is mostly Python start-up); the audit
        # chain's head lock and the writers' retries order their database writes.
        config = str(self.service_config)
        runs = {
            f"keyfleet operator add {name}": self.keyfleet_start(
                "operator", "add", name, "--cert", str(identity.cert), "--config", config
            )
            for name, identity in self.pki.operators.items()
        }
        runs[f"keyfleet station add {STATION}"] = self.keyfleet_start(
            "station", "add", STATION, "--cert", str(self.pki.station.cert), "--config", config
        )
        # wait for every run before judging any, so a failure leaves no CLI process behind
        results = {label: run.wait(self.start_timeout) for label, run in runs.items()}
        for label, done in results.items():
            if done.returncode != 0:
                raise LabError(label, f"exit {done.returncode}", done.stderr)
        self._engine = make_engine(self.database_url)
        self._sessions = session_factory(self._engine)

    def start_service(self) -> None:
        """``keyfleet serve`` as a subprocess; returns once it says it is ready."""
        if self.service_process is not None and self.service_process.poll() is None:
            raise LabError("keyfleet serve", "already running")
        offset = self.service_log.stat().st_size if self.service_log.exists() else 0
        with self.service_log.open("ab") as sink:
            self.service_process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "provisioning.cli",
                    "serve",
                    "--config",
                    str(self.service_config),
                    "--log-level",
                    self.log_level,
                ],
                cwd=self.service_config.parent,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=sink,
                start_new_session=True,
                env=self._token_env(dict(os.environ)),
            )
        self._track(self.service_process.pid, "keyfleet serve", "provisioning.cli")
        process = self.service_process

        def ready() -> bool | None:
            try:
                with self.service_log.open("rb") as handle:
                    handle.seek(offset)
                    return True if SERVICE_READY in handle.read() else None
            except OSError:
                return None

        _wait(
            "keyfleet serve",
            "ready line",
            ready,
            self.start_timeout,
            log_path=self.service_log,
            alive=lambda: process.poll() is None,
        )

    def stop_service(self, *, kill: bool = False) -> int | None:
        """Stop ``keyfleet serve`` by PID (SIGTERM, or SIGKILL with ``kill``); its exit status."""
        process, self.service_process = self.service_process, None
        if process is None:
            return None
        _stop_pid(process.pid, sig=signal.SIGKILL if kill else signal.SIGTERM)
        _reap(process)
        return process.poll()

    @property
    def enrollment_url(self) -> str:
        """The enrollment API that ``keyfleet serve`` runs (``[http]``)."""
        return f"https://127.0.0.1:{self.enrollment_port}"

    @property
    def renewal_url(self) -> str:
        """The HTTPS renewal listener ``keyfleet serve`` runs with ``renew_expired``."""
        if self.renewal_port is None:
            raise LabError("lab", "no renewal listener: start the lab with renew_expired")
        return f"https://127.0.0.1:{self.renewal_port}"

    # -- devices ------------------------------------------------------------------------------

    def _start_devices(self) -> None:
        self.devices = [self._new_device(f"d{i}") for i in range(self.device_count)]
        # Boot all at once (each manufactures its TPM on the first boot), then provision one
        # after the other (one station), then reboot each into run mode with its app rules.
        for device in self.devices:
            self._spawn(device, run_agent=False)
        for device in self.devices:
            self._wait_ready(device)
        with self._step("provisioning"):
            for device in self.devices:
                self.provision(device)
        for device in self.devices:
            self._allow_apps(device)
            self._configure_update_hook(device)
            self.reboot(device, wait=False)
        for device in self.devices:
            self.wait_agent(device)

    def add_device(self, name: str) -> LabDevice:
        """One more device after the start (a replacement board, say): boots with a new TPM, is
        provisioned by the station as a new device and runs its agent, like the first ones."""
        device = self._new_device(name)
        self.devices.append(device)
        self._spawn(device, run_agent=False)
        self._wait_ready(device)
        self.provision(device)
        self._allow_apps(device)
        self._configure_update_hook(device)
        self.reboot(device, wait=False)
        self.wait_agent(device)
        return device

    def _new_device(self, name: str) -> LabDevice:
        directory = self.workdir / "devices"
        directory.mkdir(exist_ok=True)
        return LabDevice(
            name=name,
            state_dir=directory / name,
            ready_file=directory / f"{name}.ready.json",
            log_path=self.logs / f"device-{name}.log",
        )

    def _spawn(
        self,
        device: LabDevice,
        *,
        run_agent: bool = True,
        env: Mapping[str, str] | None = None,
        tamper: Sequence[str] = (),
    ) -> None:
        if device.running:
            raise LabError(device.name, "already running")
        with contextlib.suppress(FileNotFoundError):
            device.ready_file.unlink()
        device.info = {}
        command = [
            sys.executable,
            "-m",
            "firmware_sim.cli",
            "device",
            "--state",
            str(device.state_dir),
            "--manufacturer-ca",
            str(self.workdir / "manufacturer-ca"),
            "--json",
            "--ready-file",
            str(device.ready_file),
            "-v",
        ]
        if not run_agent:
            command.append("--no-agent")
        for component in tamper:
            command += ["--tamper", component]
        environment = {**os.environ, **self.device_env, **(env or {})}
        with device.log_path.open("ab") as sink:
            sink.write(f"---- lab: boot {device.boots} of {device.name} ----\n".encode())
            device.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=sink,
                env=environment,
                start_new_session=True,
            )
        device.boots += 1
        self._track(device.process.pid, f"device {device.name}", "firmware_sim.cli")

    def _wait_ready(self, device: LabDevice, event: str = "ready") -> dict[str, Any]:
        """Wait for the device's ready file to show ``event`` (or a later one)."""
        order = ("ready", "provisioned", "agent")
        wanted = order.index(event)
        process = device.process

        def check() -> dict[str, Any] | None:
            info = device.read_ready()
            if info is None or order.index(str(info.get("event"))) < wanted:
                return None
            if info.get("pid") != (process.pid if process else None):
                return None
            return info

        info = _wait(
            f"device {device.name}",
            f"{event!r} event",
            check,
            self.start_timeout,
            log_path=device.log_path,
            alive=lambda: process is not None and process.poll() is None,
        )
        device.info = info
        for key, label in (("swtpm_pid", "swtpm"), ("agent_pid", "keyagent")):
            pid = info.get(key)
            if isinstance(pid, int) and all(t.pid != pid for t in self._tracked):
                marker = "swtpm" if key == "swtpm_pid" else "agent.cli"
                self._track(pid, f"{label} of {device.name}", marker)
        if isinstance(info.get("device_id"), str):
            device.device_id = info["device_id"]
        return info

    def provision(self, device: LabDevice) -> ProvisionReport:
        """The station provisions ``device`` over its console (pty) through the enrollment API."""
        assert self.pki is not None
        console = str(device.info["console"])
        fleet = FleetClient(
            self.enrollment_url,
            cert=self.pki.station.cert,
            key=self.pki.station.key,
            ca=self.pki.tls_ca,
        )
        link = SerialClient.open(console, timeout=3.0, retries=2)
        try:
            report = Station(link, fleet).provision()
        finally:
            link.close()
        device.provision_report = report
        if not report.ok or report.device_id is None:
            raise LabError(
                f"station ({device.name})",
                f"provisioning failed: {json.dumps(report.to_json(), default=str)}",
                device.log_tail(),
            )
        device.device_id = report.device_id
        self._wait_ready(device, "provisioned")
        return report

    def _allow_apps(self, device: LabDevice) -> None:
        """The device image's app access rules: the user running the lab may use the local API
        on every group (the factory writes no rules: deny by default)."""
        text = device.agent_config.read_text()
        if "[[api.rules]]" in text:
            return
        operations = ", ".join(f'"{op}"' for op in APP_OPERATIONS)
        text += (
            "\n# lab: apps of the user running the lab may use every group\n"
            f'[[api.rules]]\nuid = {os.getuid()}\noperations = [{operations}]\ngroups = ["*"]\n'
        )
        device.agent_config.write_text(text)

    def _configure_update_hook(self, device: LabDevice) -> None:
        """The device image's update hook (``[releases] install_command``): ``firmware-sim
        install --reboot`` switches its release slot and reboots it into the new release."""
        text = device.agent_config.read_text()
        if "install_command" in text:
            return
        argv = [
            sys.executable,
            "-m",
            "firmware_sim.cli",
            "install",
            "--state",
            str(device.state_dir),
            "--version",
            "{version}",
            "--reboot",
        ]
        line = f"install_command = {json.dumps(argv)}\n"
        if "\n[releases]\n" in text:  # another key of the table is there already
            text = text.replace("\n[releases]\n", "\n[releases]\n" + line, 1)
        else:
            text += f"\n# lab: the update hook of staged rollouts\n[releases]\n{line}"
        device.agent_config.write_text(text)

    def wait_reboot(
        self, device: LabDevice, after_boots: int, timeout: float | None = None
    ) -> dict[str, Any]:
        """Wait until ``device`` rebooted itself (an update hook's ``install --reboot``): its
        ready file counts more than ``after_boots`` boots and its new agent is connected."""
        timeout = timeout or self.start_timeout

        def rebooted() -> dict[str, Any] | None:
            info = device.read_ready()
            if info is None or not isinstance(info.get("boots"), int):
                return None
            return info if info["boots"] > after_boots and info.get("event") == "agent" else None

        _wait(
            f"device {device.name}",
            "reboot",
            rebooted,
            timeout,
            log_path=device.log_path,
            alive=lambda: device.running,
        )
        return self.wait_agent(device, timeout)

    def wait_agent(self, device: LabDevice, timeout: float | None = None) -> dict[str, Any]:
        """Wait until the device's agent runs, wrote its status and is connected to the broker;
        returns the status."""
        timeout = timeout or self.start_timeout
        info = self._wait_ready(device, "agent")
        agent_pid = info.get("agent_pid")

        def connected() -> dict[str, Any] | None:
            status = device.status()
            if status and status.get("pid") == agent_pid and status.get("mqtt_connected"):
                return status
            return None

        return _wait(
            f"keyagent of {device.name}",
            "connected status",
            connected,
            timeout,
            log_path=device.agent_log,
            alive=lambda: isinstance(agent_pid, int) and pid_alive(agent_pid),
        )

    def stop_device(self, device: LabDevice) -> None:
        """Power off: SIGTERM the simulator (it stops its agent and swtpm), then make sure the
        agent and swtpm it ran are gone (by PID)."""
        process, device.process = device.process, None
        if process is not None:
            if not _stop_pid(process.pid):
                log.warning("device %s needed SIGKILL", device.name)
            _reap(process)
        for pid in (device.agent_pid, device.swtpm_pid):
            if pid is not None:
                _stop_pid(pid)

    def reboot(
        self,
        device: LabDevice,
        *,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
        tamper: Sequence[str] = (),
    ) -> None:
        """Power cycle: stop the device and boot it again (fresh swtpm process, same TPM state,
        measured boot, agent started). ``env`` is added to this boot's environment (e.g. the
        agent's ``KEYAGENT_TEST_KILL_AT`` fault points); ``tamper`` names firmware components
        to boot modified (firmware-sim ``--tamper``)."""
        self.stop_device(device)
        self._spawn(device, env=env, tamper=tamper)
        if wait:
            self.wait_agent(device)

    def install(self, device: LabDevice, version: str, *, reboot: bool = True) -> None:
        """Install firmware release ``version`` into ``device`` (``firmware_sim.release``) and,
        with ``reboot``, power cycle it so that it boots and measures the new release."""
        release.install(device.state_dir, version)
        if reboot:
            self.reboot(device)

    def stop_agent(self, device: LabDevice, *, kill: bool = False) -> None:
        """Stop only the agent (SIGTERM: it saves its state and disconnects, the broker keeps its
        session; ``kill``: SIGKILL). The device (console, swtpm) keeps running; ``reboot`` brings
        the agent back."""
        pid = device.agent_pid
        if pid is None:
            raise LabError(device.name, "has no agent")
        _stop_pid(pid, sig=signal.SIGKILL if kill else signal.SIGTERM)

    def drop_session(self, device: LabDevice) -> None:
        """Make the broker forget the device's persistent session and the commands queued in it
        (what an expired session or a broker that lost its persistence looks like): connect once
        with the device's own TLS identity and client id, clean start, session expiry 0. The
        agent must not be connected (``stop_agent`` first); anything it missed must then come
        from the service's catch-up."""
        if device.agent_running:
            raise LabError(device.name, "stop its agent before dropping its session")
        assert self.broker is not None
        config = load_agent_config(device.agent_config, require_provisioned=True)
        assert config.identity is not None and config.broker is not None
        client = MqttClient(
            host=self.broker.host,
            port=self.broker.port,
            ca_file=config.broker.ca.path,
            cert_file=config.identity.tls_cert.path,
            key_file=config.identity.tls_key,
            client_id=config.identity.device_id,
            clean_start=True,
            session_expiry=0,
        )
        try:
            client.connect(timeout=self.start_timeout)
        finally:
            client.close()

    def pause_agent(self, device: LabDevice) -> None:
        """SIGSTOP the agent: it neither reads nor answers (the broker still sees it connected
        until its keepalive expires)."""
        if device.agent_pid is not None:
            os.kill(device.agent_pid, signal.SIGSTOP)

    def resume_agent(self, device: LabDevice) -> None:
        if device.agent_pid is not None:
            os.kill(device.agent_pid, signal.SIGCONT)

    def device(self, key: str | int) -> LabDevice:
        """A device by index, lab name (``d0``) or fleet id (``dev-…``)."""
        if isinstance(key, int):
            return self.devices[key]
        for device in self.devices:
            if key in (device.name, device.device_id):
                return device
        raise LabError("lab", f"no device {key!r}")

    @property
    def device_ids(self) -> list[str]:
        return [d.id for d in self.devices]

    def wait_epoch(
        self,
        group: str,
        epoch: int,
        devices: Iterable[LabDevice] | None = None,
        timeout: float = 60.0,
    ) -> None:
        """Wait until every device given (default: all) reports ``epoch`` for ``group`` in its
        status file."""
        members = list(devices if devices is not None else self.devices)

        def done() -> bool | None:
            return True if all(d.epoch(group) == epoch for d in members) else None

        try:
            _wait("agents", f"epoch {epoch} of {group}", done, timeout)
        except LabError:
            seen = {d.name: d.epoch(group) for d in members}
            raise LabError("agents", f"not all at epoch {epoch} of {group}: {seen}") from None

    def wait_settled(
        self, group: str, devices: Iterable[LabDevice] | None = None, timeout: float = 60.0
    ) -> int:
        """Wait until every device given (default: all) reports one common epoch of ``group``
        and none still holds the leaf key it joined with (every joiner's first self-update is
        done, docs/treekem.md "Joining"); return that epoch."""
        members = list(devices if devices is not None else self.devices)

        def done() -> int | None:
            epochs = {d.epoch(group) for d in members}
            if len(epochs) != 1 or any(d.fresh_leaf_pending(group) for d in members):
                return None
            (epoch,) = epochs
            return epoch

        try:
            settled: int = _wait("agents", f"{group} settled", done, timeout)
        except LabError:
            seen = {d.name: (d.epoch(group), d.fresh_leaf_pending(group)) for d in members}
            raise LabError("agents", f"{group} not settled (epoch, pending): {seen}") from None

        def registered() -> bool | None:
            # the service has the acks of that epoch too (the agents ack before they write status)
            row = next((r for r in self.groups() if r["group_id"] == group), None)
            ok = row is not None and row["epoch"] == settled and row["agreed"] is True
            return True if ok else None

        _wait("service", f"acks of {group} epoch {settled}", registered, timeout, interval=0.5)
        return settled

    # -- the agent's state (forensics for the lab) ----------------------------------------------

    def agent_state(self, device: LabDevice) -> dict[str, Any]:
        """The agent's decrypted state file, read the way the agent reads it: the state key
        unsealed by the device's TPM (PCR policy: the device must be booted with its firmware).
        The agent must be stopped (the TPM has one user): ``stop_agent`` first. The result holds
        secrets: for lab checks only, never log it."""
        if device.agent_running:
            raise LabError(device.name, "stop its agent before reading its state")
        self.flush_tpm(device)
        store = TPMStore(device.tcti)
        try:
            return read_state(store, device.state_dir)
        finally:
            store.close()

    def agent_secrets(self, device: LabDevice) -> list[Secret]:
        """Every group secret in the agent's state: epoch secrets (not the public epoch
        authenticator), node private keys, data keys, also of pending commits."""
        state = self.agent_state(device)
        found: list[bytes] = []

        def of_group(group: Mapping[str, Any]) -> None:
            found.extend(v for k, v in group["secrets"].items() if k != "epoch_authenticator")
            found.extend(group["nodes"].values())

        for entry in state["groups"].values():
            of_group(entry["group"])
            for pending in entry["pending"]:
                of_group(pending["group"])
        for keys in state["data_keys"].values():
            found.extend(keys.values())
        return [Secret(bytes(s)) for s in dict.fromkeys(found)]

    def flush_tpm(self, device: LabDevice) -> int:
        """Flush transient objects and sessions left in the device's swtpm by a killed agent
        (what the kernel's resource manager does for a real TPM). Returns how many."""
        match = re.match(r"swtpm:path=(.+)$", device.tcti)
        address: int | Path
        if match:
            address = Path(match.group(1))
        else:
            port = re.search(r"port=(\d+)", device.tcti)
            if port is None:
                raise LabError(device.name, f"unknown TCTI {device.tcti}")
            address = int(port.group(1))
        flushed = 0
        for first in (0x80000000, 0x02000000, 0x03000000):
            body = struct.pack(">III", 1, first, 64)  # TPM_CAP_HANDLES
            answer = tpm_command(
                address, struct.pack(">HII", 0x8001, 10 + len(body), 0x17A) + body, 5.0
            )
            if struct.unpack(">I", answer[6:10])[0] != 0:
                raise LabError(device.name, "the TPM refused GetCapability(handles)")
            (count,) = struct.unpack(">I", answer[15:19])
            for handle in struct.unpack(f">{count}I", answer[19 : 19 + 4 * count]):
                if handle >> 24 != first >> 24:
                    continue
                tpm_command(address, struct.pack(">HIII", 0x8001, 14, 0x165, handle), 5.0)
                flushed += 1
        return flushed

    # -- operators ----------------------------------------------------------------------------

    def operator_env(self, operator: str) -> dict[str, str]:
        """The ``KEYFLEET_*`` environment that makes ``keyfleet`` act as ``operator``."""
        assert self.pki is not None and self.broker is not None
        identity = self.pki.operators.get(operator)
        if identity is None:
            raise LabError("lab", f"no operator {operator!r} (known: {', '.join(OPERATORS)})")
        return {
            "KEYFLEET_BROKER": f"{self.broker.host}:{self.broker.port}",
            "KEYFLEET_CA": str(self.pki.tls_ca),
            "KEYFLEET_CERT": str(identity.cert),
            "KEYFLEET_KEY": str(identity.key),
            "KEYFLEET_SERVICE_CERT": str(self.pki.signing_cert),
        }

    def _token_env(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` plus what reaches the lab's token (its SoftHSM2 configuration), if any."""
        if self.pki is not None and self.pki.token is not None:
            env[CONF_ENV] = str(self.pki.token.conf)
        return env

    def keyfleet_start(self, *args: str, operator: str | None = None) -> RunningCli:
        """Start ``keyfleet ARGS`` (as ``operator`` if given) without waiting."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYFLEET_")}
        if operator is not None:
            env.update(self.operator_env(operator))
        self.logs.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(
            [sys.executable, "-m", "provisioning.cli", *args],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self._token_env(env),
        )
        return RunningCli(args, process, self.cli_log)

    def keyfleet(
        self, *args: str, operator: str | None = None, timeout: float = 180.0
    ) -> CliResult:
        """Run ``keyfleet ARGS`` (as ``operator`` if given) and wait for it."""
        return self.keyfleet_start(*args, operator=operator).wait(timeout)

    def adopt_policy(self, *, auto: bool, serial: int = 1, operator: str = "op-admin") -> None:
        """The admin proposes (and, with ``min_approvals`` 1, approves) a quorum policy: every
        operation needs ``min_approvals`` operators; with ``auto`` the service may remove
        quarantined members and re-add members behind the commit log in every group on its
        own (devices check it: docs/authorization.md)."""
        scopes = '["*"]' if auto else "[]"
        path = self.workdir / "service" / f"policy-{serial}.toml"
        path.write_text(
            f'serial = {serial}\n\n[default]\n"*" = {self.min_approvals}\n\n'
            f"[auto]\nremove = {scopes}\nreadd = {scopes}\n"
        )
        result = self.keyfleet("propose", "policy", str(path), operator=operator)
        if result.returncode != 0:
            raise LabError("keyfleet propose policy", f"exit {result.returncode}", result.stderr)

    def op(self, *args: str, operator: str = "op-ops", timeout: float = 180.0) -> CliResult:
        """An operator command with ``--json`` results, e.g. ``lab.op("rekey", "--group", "g")``."""
        return self.keyfleet(*args, "--json", operator=operator, timeout=timeout)

    def groups(self) -> list[dict[str, Any]]:
        """``keyfleet groups --json`` on the service host."""
        result = self.keyfleet("groups", "--config", str(self.service_config), "--json")
        if result.returncode != 0:
            raise LabError("keyfleet groups", f"exit {result.returncode}", result.stderr)
        rows: list[dict[str, Any]] = result.json()
        return rows

    def fleet_devices(self) -> list[dict[str, Any]]:
        """``keyfleet devices --json`` on the service host."""
        result = self.keyfleet("devices", "--config", str(self.service_config), "--json")
        if result.returncode != 0:
            raise LabError("keyfleet devices", f"exit {result.returncode}", result.stderr)
        rows: list[dict[str, Any]] = result.json()
        return rows

    # -- the registry (read on the service host) ----------------------------------------------

    def registry(self, work: Callable[[Registry], T]) -> T:
        """Run ``work(Registry)`` in one transaction on the service's database."""
        if self._sessions is None:
            raise LabError("lab", "no database yet")
        return run_in_transaction(self._sessions, lambda session: work(Registry(session)))

    def ack_status(self, group: str) -> AckStatus:
        return self.registry(lambda r: r.ack_status(group))

    def audit(self, from_seq: int = 1) -> list[audit_log.AuditRecord]:
        """The service's audit log entries from ``from_seq`` on."""
        if self._sessions is None:
            raise LabError("lab", "no database yet")
        with self._sessions() as session:
            return audit_log.entries(session, from_seq=from_seq)

    def audit_head(self) -> int:
        """The sequence number of the last audit entry (0 if none)."""
        entries = self.audit()
        return entries[-1].seq if entries else 0

    def session(self) -> Session:
        """A plain session on the service database (audit queries); close it after use."""
        if self._sessions is None:
            raise LabError("lab", "no database yet")
        return self._sessions()

    # -- stop ---------------------------------------------------------------------------------

    def leftovers(self) -> list[str]:
        """Processes the lab started (or learned about) that are still alive."""
        alive = []
        for tracked in self._tracked:
            if not pid_alive(tracked.pid):
                continue
            try:
                cmdline = Path(f"/proc/{tracked.pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if tracked.marker.encode() in cmdline:
                alive.append(f"{tracked.component} (pid {tracked.pid})")
        return alive

    def stop(self, *, raise_on_leftovers: bool = True) -> list[str]:
        """Step 7: devices, service (with its enrollment API), broker, each by PID, in that
        order; then every process the lab knew is checked. Leftovers are killed and reported
        (``LabError`` unless ``raise_on_leftovers`` is false). Idempotent."""
        if self._stopped:
            return []
        self._stopped = True
        start = time.monotonic()
        threads = [
            threading.Thread(target=self.stop_device, args=(d,), daemon=True) for d in self.devices
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(STOP_TIMEOUT * 3)
        self.stop_service()
        if self.broker is not None:
            self.broker.stop()
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        leftovers = self.leftovers()
        for tracked in self._tracked:
            if f"{tracked.component} (pid {tracked.pid})" in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(tracked.pid, signal.SIGKILL)
        self.timings["stop"] = round(time.monotonic() - start, 3)
        if leftovers and raise_on_leftovers:
            raise LabError(
                "lab stop", "still running after stop (killed now): " + ", ".join(leftovers)
            )
        return leftovers

    # -- summary ------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """What runs where, and how long each step took (JSON-able; no secrets)."""
        return {
            "workdir": str(self.workdir),
            "broker": None
            if self.broker is None
            else {
                "host": self.broker.host,
                "port": self.broker.port,
                "pid": self.broker.pid if self.broker.running else None,
                "log": str(self.broker.log_path),
                "config": str(self.broker.config_file),
            },
            "service": {
                "config": str(self.service_config),
                "database": (
                    redact_url(self.database_url)
                    if self.database_url != f"sqlite:///{self.database}"
                    else str(self.database)
                ),
                "pid": None if self.service_process is None else self.service_process.pid,
                "log": str(self.service_log),
            },
            "enrollment": self.enrollment_url,
            "operators": dict(OPERATORS),
            "devices": [
                {
                    "name": d.name,
                    "device_id": d.device_id,
                    "state_dir": str(d.state_dir),
                    "pid": d.pid,
                    "agent_pid": d.agent_pid,
                    "swtpm_pid": d.swtpm_pid,
                    "tcti": d.info.get("tcti"),
                    "api_socket": str(d.api_socket),
                    "log": str(d.log_path),
                    "agent_log": str(d.agent_log),
                }
                for d in self.devices
            ],
            "timings": dict(self.timings),
        }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m firmware_sim.lab WORKDIR [--devices N]``: start a lab, print its summary as
    JSON, run until Ctrl-C or SIGTERM, then stop everything."""
    parser = argparse.ArgumentParser(prog="python -m firmware_sim.lab")
    parser.add_argument("workdir", help="directory for everything (made if missing)")
    parser.add_argument("--devices", type=int, default=4)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if Path(args.workdir).exists() and any(Path(args.workdir).iterdir()):
        print(f"{args.workdir} is not empty: use a new directory", file=sys.stderr)
        return 2
    try:
        with Lab(args.workdir, devices=args.devices) as lab:
            print(json.dumps(lab.summary(), indent=2), flush=True)
            stop.wait()
    except KeyfleetError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
