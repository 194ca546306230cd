"""The service side of the subprocess tests, written once: the files ``keyfleet serve`` reads
(CAs, golden policy, its TOML config), ``keyfleet operator add``, starting ``keyfleet serve`` and
waiting until it says it is ready, stopping a process by its PID, and the operator CLI's broker
arguments.

``service_deployment()`` puts them together: a Mosquitto, N ``keyfleet serve`` instances on one
database (a SQLite file or PostgreSQL), an operator or a station, optionally a started virtual
fleet, all on free loopback ports under one temporary directory, stopped by PID on exit. The
pytest side is ``deploy`` in tests/fixtures/deployment.py. What a test asserts stays in the test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.orm import Session

from agent.protocol import authz
from firmware_sim.boot import default_components
from firmware_sim.broker import Mosquitto
from firmware_sim.fleet import VirtualFleet, fleet_config_text, load_fleet_config
from firmware_sim.ports import free_port
from firmware_sim.softhsm import SoftToken
from provisioning import custody, pki
from provisioning.custody import TokenPrivateKey
from provisioning.operator import OperatorSettings
from provisioning.policy import policy_from_components, write_policy
from provisioning.registry import make_engine, run_in_transaction, session_factory
from tests.fixtures.mosquitto import BrokerFactory, BrokerPKI, ClientFiles, MosquittoBroker

T = TypeVar("T")


def keyfleet(*args: str, cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """The operator CLI as a subprocess, the way an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "provisioning.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def write_pem(path: Path, data: bytes, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)
    return path


SIGNING_IDENTITY = "keyfleet-service-signing"
SIGNING_KEY_LABEL = "service-signing"
DEVICE_CA_KEY_LABEL = "device-ca"
CHECKPOINT_KEY_LABEL = "audit-checkpoint"
CHECKPOINT_INTERVAL = 10  # [audit] checkpoint_interval_seconds of a deployment that signs them


def write_service_pki(
    files: Path,
    device_ca: pki.CertificateAuthority,
    operator_ca: pki.CertificateAuthority,
    manufacturer_cas: Sequence[x509.Certificate] = (),
    *,
    signing_issuer: pki.CertificateAuthority | None = None,
    signing_key: ec.EllipticCurvePrivateKey | None = None,
) -> None:
    """The CA files and golden policy the config below names. Without ``manufacturer_cas`` the
    device CA doubles as the manufacturer CA, for devices with software DevIDs, not EK chains.
    The service's signing certificate (``service-signing.pem``, from ``signing_issuer`` or the
    device CA) certifies ``signing_key``, or a new key written as ``service-signing.key``; a
    device CA key in a token is not written."""
    write_pem(files / "device-ca.pem", pki.cert_to_pem(device_ca.certificate))
    if not isinstance(device_ca.private_key, TokenPrivateKey):
        write_pem(files / "device-ca.key", pki.key_to_pem(device_ca.private_key), private=True)
    if signing_key is None:
        signing_key = pki.generate_key()
        pki.write_private_key(files / "service-signing.key", signing_key)
    signing_cert = pki.issue_client_cert(
        signing_issuer or device_ca, signing_key.public_key(), identity=SIGNING_IDENTITY,
        role="service", now=datetime.now(UTC), valid_for=timedelta(days=2),
    )  # fmt: skip
    pki.write_certificate(files / "service-signing.pem", signing_cert)
    write_pem(files / "operator-ca.pem", pki.cert_to_pem(operator_ca.certificate))
    write_pem(
        files / "manufacturers.pem", pki.certs_to_pem(manufacturer_cas or [device_ca.certificate])
    )
    write_golden_policy(files / "golden.toml")


@dataclass(frozen=True)
class DeploymentPKI:
    """What the virtual-fleet installations share: the CAs, a broker that trusts them, the
    service's broker identity and the CA files (``files``) the service configuration names."""

    now: datetime
    device_ca: pki.CertificateAuthority
    operator_ca: pki.CertificateAuthority
    broker: MosquittoBroker
    service: ClientFiles
    files: Path
    # the [service] signing_key and [device_ca] key references the configuration names
    signing_key_ref: str = "pki/service-signing.key"
    device_ca_key_ref: str = "pki/device-ca.key"
    # [audit] checkpoint_key (None: the service signs no checkpoints) and the PEM file of its
    # public key, what an operator pins (``audit sync --checkpoint-cert``)
    checkpoint_key_ref: str | None = None
    checkpoint_pub: Path | None = None

    @property
    def signing_cert(self) -> Path:
        """The service's signing certificate: what devices and operators verify it with."""
        return self.files / "service-signing.pem"

    def signing_public_key(self) -> ec.EllipticCurvePublicKey:
        public = pki.cert_from_pem(self.signing_cert.read_bytes()).public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        return public


def deployment_pki(
    tmp_path: Path,
    label: str,
    broker_pki: BrokerPKI,
    mosquitto_factory: BrokerFactory,
    *,
    device_ca: pki.CertificateAuthority | None = None,
    operator_ca: pki.CertificateAuthority | None = None,
    manufacturer_cas: Sequence[x509.Certificate] = (),
    log_types: tuple[str, ...] = ("error", "warning"),
    token: SoftToken | None = None,
    audit_checkpoint: bool = False,
) -> DeploymentPKI:
    """Device and operator CAs named after ``label`` (or the ones given), a fresh Mosquitto
    trusting both (logging ``log_types``), and the service's files under ``tmp_path/pki``. With
    ``token`` the service signing key and the device CA key are made in that PKCS#11 token and
    the configuration names them by ``pkcs11:`` URI (no private key file of the service);
    ``audit_checkpoint`` (token only) makes the audit checkpoint key there too, its public key
    written as ``audit-checkpoint.pub``."""
    assert token is not None or not audit_checkpoint, "the checkpoint key is made in a token"
    now = datetime.now(UTC)
    signing_key: ec.EllipticCurvePrivateKey | None = None
    refs: dict[str, str] = {}
    checkpoint_public: ec.EllipticCurvePublicKey | None = None
    if token is not None:
        assert device_ca is None, "a token deployment makes its own device CA in the token"
        keys = {}
        for label_ in (SIGNING_KEY_LABEL, DEVICE_CA_KEY_LABEL):
            refs[label_] = token.uri(label_)
            ref = custody.parse_token_uri(refs[label_])
            custody.generate_token_key(ref)
            keys[label_] = custody.load_private_key(ref)
        if audit_checkpoint:
            refs[CHECKPOINT_KEY_LABEL] = token.uri(CHECKPOINT_KEY_LABEL)
            checkpoint_public = custody.generate_token_key(
                custody.parse_token_uri(refs[CHECKPOINT_KEY_LABEL])
            )
        signing_key = keys[SIGNING_KEY_LABEL]
        device_ca = pki.create_ca(
            f"{label} device CA", now=now, valid_for=timedelta(days=2),
            key=keys[DEVICE_CA_KEY_LABEL],
        )  # fmt: skip
    if device_ca is None:
        device_ca = pki.create_ca(f"{label} device CA", now=now, valid_for=timedelta(days=2))
    if operator_ca is None:
        operator_ca = pki.create_ca(f"{label} operator CA", now=now, valid_for=timedelta(days=2))
    broker = mosquitto_factory(
        log_types=log_types,
        extra_ca_certs=(device_ca.certificate, operator_ca.certificate),
    )
    files = tmp_path / "pki"
    files.mkdir(exist_ok=True)
    service = broker_pki.client("keyfleet-service", role="service")
    write_service_pki(
        files, device_ca, operator_ca, manufacturer_cas,
        signing_issuer=broker_pki.ca, signing_key=signing_key,
    )  # fmt: skip
    deployment = DeploymentPKI(now, device_ca, operator_ca, broker, service, files)
    if token is not None:
        deployment = replace(
            deployment,
            signing_key_ref=refs[SIGNING_KEY_LABEL],
            device_ca_key_ref=refs[DEVICE_CA_KEY_LABEL],
        )
    if checkpoint_public is not None:
        pub = write_pem(files / "audit-checkpoint.pub", pki.public_key_to_pem(checkpoint_public))
        deployment = replace(
            deployment, checkpoint_key_ref=refs[CHECKPOINT_KEY_LABEL], checkpoint_pub=pub
        )
    return deployment


def write_golden_policy(path: Path) -> None:
    write_policy(policy_from_components(default_components("1.0")), path)


def write_operator(
    files: Path,
    operator_ca: pki.CertificateAuthority,
    identity: str,
    *,
    role: str,
    now: datetime,
    stem: str,
) -> None:
    """An operator's key and client certificate (a day's validity) as ``stem``.pem/.key."""
    key = pki.generate_key()
    cert = pki.issue_client_cert(
        operator_ca, key.public_key(), identity=identity, role=role, now=now,
        valid_for=timedelta(days=1),
    )  # fmt: skip
    pki.write_certificate(files / f"{stem}.pem", cert)
    pki.write_private_key(files / f"{stem}.key", key)


def service_config(
    *,
    db_url: str,
    broker: Mosquitto,
    client: ClientFiles,
    instance: str,
    groups: str,
    service: str = "",
    attestation: str = "",
    extra: str = "",
    quorum: str = "min_approvals = 1",
    signing_key: str = "pki/service-signing.key",
    device_ca_key: str = "pki/device-ca.key",
    checkpoint_key: str | None = None,
) -> str:
    """``keyfleet.toml`` with the CA files under ``pki/``; ``groups``, ``service``,
    ``attestation`` and ``quorum`` are further lines of those tables, ``extra`` further tables.
    One operator decides alone by default (the tests' direct commands); dual-control tests ask
    for more with ``quorum``. ``signing_key`` and ``device_ca_key`` are key references (a file
    under ``pki/`` by default, or a ``pkcs11:`` URI: ``DeploymentPKI.signing_key_ref``);
    ``checkpoint_key`` one too, then an ``[audit]`` table signs checkpoints every
    ``CHECKPOINT_INTERVAL`` seconds."""
    if checkpoint_key is not None:
        extra += (
            f'\n[audit]\ncheckpoint_key = "{checkpoint_key}"\n'
            f"checkpoint_interval_seconds = {CHECKPOINT_INTERVAL}\n"
        )
    return f"""
[database]
url = "{db_url}"

[broker]
host = "{broker.host}"
port = {broker.port}
ca = "{broker.ca_file}"
client_cert = "{client.cert_file}"
client_key = "{client.key_file}"

[device_ca]
cert = "pki/device-ca.pem"
key = "{device_ca_key}"

[operator_ca]
cert = "pki/operator-ca.pem"

[attestation]
manufacturer_cas = "pki/manufacturers.pem"
golden_measurements = "pki/golden.toml"
{attestation}
[groups]
{groups}
[quorum]
{quorum}
[service]
instance = "{instance}"
signing_key = "{signing_key}"
signing_cert = "pki/service-signing.pem"
{service}{extra}"""


def add_operator(
    name: str, cert: str, *, config: Path, cwd: Path
) -> subprocess.CompletedProcess[str]:
    added = keyfleet("operator", "add", name, "--cert", cert, "--config", str(config), cwd=cwd)
    assert added.returncode == 0, added.stderr
    return added


def start_serve(
    config: Path,
    *,
    cwd: Path,
    log: Path,
    timeout: float,
    ready: bytes = b"ready",
    python_args: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """``keyfleet serve`` with its output in ``log``, returned once the log says ``ready``; killed
    here if it exits or is not ready in time, so a failed start leaves no process behind.
    ``python_args`` go to the interpreter before ``-m`` (e.g. ``-m cProfile -o FILE``)."""
    command = [sys.executable, *python_args, "-m", "provisioning.cli", "serve"]
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [*command, "--config", str(config)],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
        )
    deadline = time.monotonic() + timeout
    try:
        while ready not in log.read_bytes():
            assert process.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.05)
    except BaseException:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        raise
    return process


def stop_processes(processes: Iterable[subprocess.Popen[Any]], timeout: float = 15) -> None:
    """Stop by PID: SIGTERM to every one still running, then wait for each, SIGKILL after
    ``timeout``. Processes that already exited are only reaped."""
    running = [p for p in processes if p.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    for process in running:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def operator_args(broker: Mosquitto, *, cert: str, key: str, service_cert: Path) -> list[str]:
    """The operator CLI's connection arguments: the broker, its CA and the operator's identity."""
    return [
        "--broker", f"{broker.host}:{broker.port}",
        "--ca", str(broker.ca_file),
        "--cert", cert,
        "--key", key,
        "--service-cert", str(service_cert),
    ]  # fmt: skip


def adopt_standing_policy(
    workdir: Path, admin_args: list[str], *, min_approvals: int = 1, serial: int = 1
) -> None:
    """An admin proposes (and, with ``min_approvals`` 1, approves) a quorum policy that lets the
    service remove quarantined members and re-add members behind the commit log in every group
    on its own: devices take those automatic changes only under such a signed policy."""
    path = workdir / f"policy-{serial}.toml"
    path.write_text(
        f'serial = {serial}\n\n[default]\n"*" = {min_approvals}\n\n'
        '[auto]\nremove = ["*"]\nreadd = ["*"]\n'
    )
    done = keyfleet("propose", "policy", str(path), *admin_args, cwd=workdir, timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr


# ---- a whole deployment: broker + N service instances (+ a virtual fleet) ---------------------

OPERATOR_STEM = "op"  # the operator's certificate and key: pki/op.pem, pki/op.key


@dataclass
class Deployment:
    """A running broker, ``keyfleet serve`` instances by name over one database, and what a
    test needs to talk to them. ``fleet`` is the started virtual fleet (``None`` without one);
    ``fleet_config`` is written either way, for tests that build their own fleet."""

    workdir: Path
    db_url: str
    pki: DeploymentPKI
    configs: dict[str, Path]
    logs: dict[str, Path]
    services: dict[str, subprocess.Popen[bytes]]
    fleet_config: Path
    metrics_ports: dict[str, int] = field(default_factory=dict)
    http_ports: dict[str, int] = field(default_factory=dict)
    operator: OperatorSettings | None = None
    operator_args: list[str] = field(default_factory=list)
    fleet: VirtualFleet | None = None

    @property
    def broker(self) -> MosquittoBroker:
        return self.pki.broker

    @property
    def config(self) -> Path:
        """The first instance's configuration (what ``db init`` and ``operator add`` used)."""
        return next(iter(self.configs.values()))

    def approve(self, request: bytes) -> bytes:
        """An Authorization of ``request`` by the deployment's operator alone (the test
        deployments' quorum is one operator), e.g. for ``VirtualFleet.seed_group``."""
        assert self.operator is not None, "a deployment without an operator approves nothing"
        key = custody.load_private_key(self.operator.key, role="operator")
        cert = pki.cert_from_pem(self.operator.cert.read_bytes())
        return authz.Authorization(request, (authz.sign_approval(request, key, cert),)).encode()

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """The operator CLI as the deployment's operator."""
        return keyfleet(*args, *self.operator_args, cwd=self.workdir, timeout=timeout)

    def cli_async(self, *args: str) -> subprocess.Popen[str]:
        """The same, without waiting: ``communicate()`` it."""
        return subprocess.Popen(
            [sys.executable, "-m", "provisioning.cli", *args, *self.operator_args],
            cwd=self.workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def read(self, work: Callable[[Session], T]) -> T:
        """``work`` in one transaction on the deployment's database, through an engine of its
        own (as another process would see it)."""
        engine = make_engine(self.db_url)
        try:
            return run_in_transaction(session_factory(engine), work)
        finally:
            engine.dispose()

    def virtual_fleet(self, devices: int) -> VirtualFleet:
        """A (not yet started) virtual fleet of ``devices`` from ``fleet_config``."""
        return VirtualFleet.from_config(
            load_fleet_config(self.fleet_config), devices, allow_insecure=True
        )


@contextlib.contextmanager
def service_deployment(
    workdir: Path,
    broker_pki: BrokerPKI,
    mosquitto_factory: BrokerFactory,
    *,
    label: str,
    db_url: str | None = None,
    instances: Sequence[str] = ("a",),
    operator: tuple[str, str] | None = None,
    station: tuple[str, Path] | None = None,
    groups: str = "",
    service: str = "",
    quorum: str = "min_approvals = 1",
    metrics: bool = False,
    expiry_refresh_seconds: int | None = None,
    http: str | None = None,
    device_prefix: str = "dev-",
    fleet_directory: str = "virtual",
    devices: int = 0,
    fleet_timeout: float = 120,
    ready: bytes = b"ready",
    start_timeout: float = 60,
    python_args: Sequence[str] = (),
    log_tail: int = 15_000,
    device_ca: pki.CertificateAuthority | None = None,
    operator_ca: pki.CertificateAuthority | None = None,
    manufacturer_cas: Sequence[x509.Certificate] = (),
    token: SoftToken | None = None,
    audit_checkpoint: bool = False,
) -> Iterator[Deployment]:
    """docs/service.md "A deployment" in ``workdir``: a Mosquitto trusting the fleet's CAs
    (``deployment_pki``), one ``keyfleet.toml`` per name in ``instances`` (``groups`` and
    ``service`` are further lines of those tables), ``db init``, ``operator add`` for
    ``operator`` = (identity, role) and/or ``station add`` for ``station`` = (name, cert), every
    instance started and ready, then ``devices`` virtual devices started. The database is
    ``db_url`` or a SQLite file ``workdir/fleet.db``.

    ``metrics``: each instance serves Prometheus metrics on a free port (``metrics_ports``),
    re-reading its expiry gauges every ``expiry_refresh_seconds`` if given.
    ``http``: each instance serves the enrollment API on a free port (``http_ports``); the text is
    the further lines of its ``[http]`` table (TLS files, station CA).

    On exit the fleet stops, every instance still running is stopped by its PID (SIGTERM, then
    SIGKILL) and the last ``log_tail`` characters of each instance's log are printed (pytest shows
    them for a failed test).

    ``token``: the service's keys in that PKCS#11 token (``deployment_pki``); with
    ``audit_checkpoint`` its audit checkpoint key too, configured as ``[audit] checkpoint_key``.
    """
    files = deployment_pki(
        workdir, label, broker_pki, mosquitto_factory,
        device_ca=device_ca, operator_ca=operator_ca, manufacturer_cas=manufacturer_cas,
        token=token, audit_checkpoint=audit_checkpoint,
    )  # fmt: skip
    broker, client = files.broker, files.service
    url = db_url if db_url is not None else f"sqlite:///{workdir / 'fleet.db'}"
    if operator is not None:
        write_operator(
            files.files, files.operator_ca, operator[0],
            role=operator[1], now=files.now, stem=OPERATOR_STEM,
        )  # fmt: skip
    configs: dict[str, Path] = {}
    metrics_ports: dict[str, int] = {}
    http_ports: dict[str, int] = {}
    for name in instances:
        extra = ""
        if metrics:
            metrics_ports[name] = free_port()
            extra += f'\n[metrics]\nlisten = "127.0.0.1:{metrics_ports[name]}"\n'
            if expiry_refresh_seconds is not None:
                extra += f"expiry_refresh_seconds = {expiry_refresh_seconds}\n"
        if http is not None:
            http_ports[name] = free_port()
            extra += f'\n[http]\nlisten = "127.0.0.1:{http_ports[name]}"\n{http}'
        configs[name] = workdir / f"keyfleet-{name}.toml"
        text = service_config(
            db_url=url, broker=broker, client=client, instance=name,
            groups=groups, service=service, extra=extra, quorum=quorum,
            signing_key=files.signing_key_ref, device_ca_key=files.device_ca_key_ref,
            checkpoint_key=files.checkpoint_key_ref,
        )  # fmt: skip
        configs[name].write_text(text)
    fleet_config = workdir / "fleet.toml"
    fleet_config.write_text(
        fleet_config_text(
            id_prefix=device_prefix,
            service_cert=files.signing_cert,
            broker_host=broker.host,
            broker_port=broker.port,
            broker_ca=broker.ca_file,
            registry_url=url,
            directory=fleet_directory,
        )
    )
    first = configs[instances[0]]
    initialized = keyfleet("db", "init", "--config", str(first), cwd=workdir, timeout=120)
    assert initialized.returncode == 0, initialized.stderr
    deployment = Deployment(
        workdir, url, files, configs, {name: workdir / f"serve-{name}.log" for name in instances},
        {}, fleet_config, metrics_ports, http_ports,
    )  # fmt: skip
    if operator is not None:
        add_operator(operator[0], f"pki/{OPERATOR_STEM}.pem", config=first, cwd=workdir)
        deployment.operator = OperatorSettings(
            host=broker.host,
            port=broker.port,
            ca=Path(broker.ca_file),
            cert=files.files / f"{OPERATOR_STEM}.pem",
            key=files.files / f"{OPERATOR_STEM}.key",
            service_cert=files.signing_cert,
        )
        deployment.operator_args = operator_args(
            broker, cert=f"pki/{OPERATOR_STEM}.pem", key=f"pki/{OPERATOR_STEM}.key",
            service_cert=files.signing_cert,
        )  # fmt: skip
    if station is not None:
        added = keyfleet(
            "station", "add", station[0], "--cert", str(station[1]), "--config", str(first),
            cwd=workdir,
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
    try:
        for name in instances:
            deployment.services[name] = start_serve(
                configs[name], cwd=workdir, log=deployment.logs[name], timeout=start_timeout,
                ready=ready, python_args=python_args,
            )  # fmt: skip
        if devices:
            deployment.fleet = deployment.virtual_fleet(devices)
            deployment.fleet.start(timeout=fleet_timeout)
        yield deployment
    finally:
        if deployment.fleet is not None:
            deployment.fleet.stop()
        stop_processes(deployment.services.values())
        for name, log in deployment.logs.items():
            if log_tail and log.exists():
                print(f"---- serve {name} ----\n{log.read_text(errors='replace')[-log_tail:]}")
