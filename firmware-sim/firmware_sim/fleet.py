"""The virtual fleet: N device agents in one process, against the real broker and service.

What is real: every device runs the agent's protocol core (``agent.core.AgentCore``, the very
state machine ``keyagent run`` drives), configured by its own agent configuration file loaded by
the agent's own loader (``agent.config.load_config``); it has its own DevID certificate from the
fleet device CA, its own MQTT connection with mutual TLS (client certificate CN = device id, so
the broker's ACL confines it exactly as it confines a real device), and it speaks the real wire
protocol to the real ``keyfleet serve``.

What is simulated, and why it is INSECURE: there is no TPM. The DevID key, the leaf keys and the
group's private state are software keys in this process's memory (``SimulatedSoftwareKeys``).
That is what makes a thousand devices fit on one machine (one swtpm and one keyagent per device
would not), and it is exactly what a real device must never do. So the agent's own gate decides:
each device's configuration must say ``[simulation] insecure_software_keys = true`` (otherwise
``load_config`` refuses the software DevID key) and the caller must pass the explicit flag
(``--allow-insecure-software-keys``; ``agent.daemon.load_devid`` refuses otherwise, the same
check ``keyagent run`` makes). A fleet that starts logs an ``INSECURE`` warning.

SIMULATION BYPASSES, on purpose (never in a real installation):

- **Registration without factory enrollment.** ``prepare_identities`` writes each device's
  registry row directly through ``provisioning.registry`` (with a synthetic EK fingerprint: a
  virtual device has no EK), so there is no EK chain check, no credential activation and no AK.
  One audit entry (action ``device.register.simulated``) records every such batch.
- **Groups built directly** (``VirtualFleet.seed_group``, benchmarks only): a full group of every
  fleet device is constructed in memory and written to the registry (group row, members, one ack
  each), instead of N-1 sequential adds, each of which every member must process (O(N^2) work:
  hours at N = 1000). Audited as ``group.seed.simulated``. Rekeys, removals and adds after that
  go through the real service as usual.

State lives in memory only: a restarted fleet has lost its groups (the service then sees members
that never ack; re-add them, or start a fresh group).

MQTT: one paho client per device, all driven from ONE selector thread (paho's ``loop_read``,
``loop_write`` and ``loop_misc`` on each client's socket), not one thread per client: 1,000
threads each polling its socket would spend the GIL on wake-ups. Message handling (verification,
``Group.process``, the signed ack) runs on that thread too; it is CPU-bound Python and one
thread per process is what the GIL allows anyway. TLS handshakes at start run in a small thread
pool (OpenSSL releases the GIL during the handshake).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as paho
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from sqlalchemy.orm import Session, sessionmaker

from agent.config import AgentConfig, load_config
from agent.configschema import (
    Bool,
    ConfigProblems,
    Field,
    Int,
    Predicate,
    Problems,
    ReadableFile,
    Str,
    Table,
    pem_certificates_problem,
    read_toml,
)
from agent.core import AgentCore, Publish
from agent.daemon import load_devid
from agent.fsio import atomic_write
from agent.protocol.errors import ConfigError, KeyfleetError, StateError
from agent.protocol.hpke import serialize_public_key
from agent.protocol.lifecycle import KeyKind
from agent.protocol.mls import codec
from agent.protocol.mls import tree_math as tm
from agent.protocol.mls.crypto import derive_key_pair
from agent.protocol.mls.group import Group
from agent.protocol.mls.key_schedule import epoch_from_joiner
from agent.protocol.mls.public import PublicState
from agent.protocol.mls.tree import LeafNode, Node, ParentNode, RatchetTree
from agent.protocol.topics import ALL_GROUP_COMMITS
from agent.protocol.wire.envelope import DEFAULT_MAX_AGE
from agent.protocol.wire.messages.ack import Ack
from provisioning import audit, pki
from provisioning.db import schema as registry_schema
from provisioning.registry import (
    Outcome,
    Registry,
    make_engine,
    run_in_transaction,
    session_factory,
)

log = logging.getLogger("firmware_sim.fleet")

DEVICE_ROLE: Final = "device"
CERT_VALIDITY: Final = timedelta(days=365)
CONNECT_WORKERS: Final = 8
TICK_SECONDS: Final = 5.0
SELECT_SECONDS: Final = 0.05
MISC_SECONDS: Final = 1.0
RECONNECT_MIN: Final = 1.0
RECONNECT_MAX: Final = 30.0
_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
_INSECURE_TEXT = "INSECURE: simulation.insecure_software_keys"
_DEVID_INSECURE_TEXT = "INSECURE: the DevID key is a SOFTWARE key"


# -- configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetConfig:
    """``firmware-sim fleet --config FILE``: where the broker, the service and the device CA are.

    ``dir`` holds one directory per virtual device (software DevID key, DevID certificate, agent
    configuration); ``registry_url`` is the service's database (devices are registered there
    directly: a simulation bypass, see the module docstring).
    """

    source: Path
    dir: Path
    id_prefix: str
    service_cert: Path
    broker_host: str
    broker_port: int
    broker_ca: Path
    device_ca_cert: Path
    device_ca_key: Path = field(repr=False)
    registry_url: str = field(repr=False)
    insecure_software_keys: bool = False
    keepalive: int = 60

    def device_id(self, index: int) -> str:
        return f"{self.id_prefix}{index:05d}"


def _prefix_problem(value: str) -> str | None:
    if not value or not value[0].isalnum() or not set(value) <= _ID_CHARS or len(value) > 40:
        return "1-40 characters [A-Za-z0-9._-] starting with a letter or digit"
    return None


def _key_problem(data: bytes) -> str | None:
    try:
        pki.key_from_pem(data)
    except KeyfleetError:
        return "not a PEM P-256 private key"
    return None


def _service_cert_problem(data: bytes) -> str | None:
    return pem_certificates_problem(data)


_FILE = "a readable file"
FLEET_SCHEMA: Final = Table(
    {
        "fleet": Field(
            Table(
                {
                    "dir": Field(Str("a directory path"), required=True),
                    "id_prefix": Field(
                        Predicate(Str(), _prefix_problem, "a device id prefix"), default="dev-sim-"
                    ),
                    "service_cert": Field(
                        ReadableFile(
                            "the service's signing certificate (PEM)", parse=_service_cert_problem
                        ),
                        required=True,
                    ),
                }
            ),
            required=True,
        ),
        "broker": Field(
            Table(
                {
                    "host": Field(Str("a host name or address"), required=True),
                    "port": Field(Int(1, 65535), default=8883),
                    "ca": Field(
                        ReadableFile("a PEM CA certificate", parse=pem_certificates_problem),
                        required=True,
                    ),
                    "keepalive": Field(Int(5, 3600, "s"), default=60),
                }
            ),
            required=True,
        ),
        "device_ca": Field(
            Table(
                {
                    "cert": Field(
                        ReadableFile("a PEM CA certificate", parse=pem_certificates_problem),
                        required=True,
                    ),
                    "key": Field(
                        ReadableFile(
                            "a PEM private key, mode 0600", private=True, parse=_key_problem
                        ),
                        required=True,
                    ),
                }
            ),
            required=True,
        ),
        "registry": Field(
            Table({"url": Field(Str("a database URL (sqlite:///FILE)"), required=True)}),
            required=True,
        ),
        "simulation": Field(
            Table({"insecure_software_keys": Field(Bool(), default=False)}), default={}
        ),
    }
)

_PATH_KEYS: Final = (
    ("fleet", "dir"),
    ("fleet", "service_cert"),
    ("broker", "ca"),
    ("device_ca", "cert"),
    ("device_ca", "key"),
)


def load_fleet_config(path: str | os.PathLike[str]) -> FleetConfig:
    """Read and check a fleet configuration; relative paths (and a relative SQLite file) are
    taken from the configuration file's directory. Every problem is reported at once."""
    source = Path(path).resolve()
    document = read_toml(source)
    base = source.parent
    for table, key in _PATH_KEYS:
        section = document.get(table)
        if isinstance(section, dict) and isinstance(section.get(key), str) and section[key]:
            section[key] = str(base / section[key])
    registry = document.get("registry")
    if isinstance(registry, dict) and isinstance(registry.get("url"), str):
        url = registry["url"]
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            registry["url"] = f"sqlite:///{base / url.removeprefix('sqlite:///')}"
    problems = Problems()
    checked = FLEET_SCHEMA.check("", dict(document), problems)
    if problems.lines or not isinstance(checked, dict):
        raise ConfigProblems(str(source), problems.lines or ["not a table"])
    fleet, broker, ca = checked["fleet"], checked["broker"], checked["device_ca"]
    return FleetConfig(
        source=source,
        dir=Path(fleet["dir"]),
        id_prefix=fleet["id_prefix"],
        service_cert=fleet["service_cert"],
        broker_host=broker["host"],
        broker_port=broker["port"],
        broker_ca=broker["ca"],
        device_ca_cert=ca["cert"],
        device_ca_key=ca["key"],
        registry_url=checked["registry"]["url"],
        insecure_software_keys=checked["simulation"]["insecure_software_keys"],
        keepalive=broker["keepalive"],
    )


def fleet_config_text(
    *,
    id_prefix: str,
    service_cert: str | os.PathLike[str],
    broker_host: str,
    broker_port: int,
    broker_ca: str | os.PathLike[str],
    registry_url: str,
    directory: str = "virtual",
    device_ca_cert: str = "pki/device-ca.pem",
    device_ca_key: str = "pki/device-ca.key",
) -> str:
    """The text of a fleet configuration that runs with software keys (the flag the CLI also
    wants is the caller's business): what tests, benchmarks and docs/firmware-sim.md write.
    Relative paths are taken from the file's directory by :func:`load_fleet_config`."""
    return f"""[fleet]
dir = "{directory}"
id_prefix = "{id_prefix}"
service_cert = "{service_cert}"

[broker]
host = "{broker_host}"
port = {broker_port}
ca = "{broker_ca}"

[device_ca]
cert = "{device_ca_cert}"
key = "{device_ca_key}"

[registry]
url = "{registry_url}"

[simulation]
insecure_software_keys = true
"""


# -- identities ---------------------------------------------------------------------------------


def synthetic_ek_fingerprint(device_id: str, devid_cert_pem: str) -> str:
    """The registry wants an EK fingerprint per device; a virtual device has no EK, so this is a
    hash that names the simulation and cannot collide with a real certificate's."""
    data = b"keyfleet virtual fleet: no EK\0" + device_id.encode() + b"\0" + devid_cert_pem.encode()
    return hashlib.sha256(data).hexdigest()


def _agent_toml(config: FleetConfig, device_id: str, directory: Path) -> str:
    def q(value: object) -> str:
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    insecure = "true" if config.insecure_software_keys else "false"
    return f"""# Agent configuration of virtual device {device_id} (written by firmware-sim fleet).
[state]
dir = {q(directory / "state")}

[identity]
device_id = {q(device_id)}
devid_cert = {q(directory / "devid.pem")}
devid_key = {q(directory / "devid.key")}
tls_cert = {q(directory / "devid.pem")}
tls_key = {q(directory / "devid.key")}

[fleet]
service_cert = {q(config.service_cert)}
trust_anchors = [{q(config.device_ca_cert)}]

[broker]
host = {q(config.broker_host)}
port = {config.broker_port}
ca = {q(config.broker_ca)}
keepalive = {config.keepalive}
session_expiry = 0

[api]
socket = {q(directory / "api.sock")}

[simulation]
insecure_software_keys = {insecure}
"""


def prepare_identities(
    config: FleetConfig, count: int, *, now: datetime | None = None
) -> list[Path]:
    """Make (or reuse) ``count`` virtual devices under ``config.dir``: a software DevID key, a
    DevID certificate from the device CA (CN = device id, OU ``device``: also its MQTT client
    certificate) and an agent configuration each; register the new ones in the registry.
    Returns the agent configuration paths, in device order.

    SIMULATION BYPASS: the registry rows are written directly (no factory enrollment); one audit
    entry per call records it."""
    if count < 1:
        raise ConfigError("a virtual fleet needs at least one device")
    issued_at = now if now is not None else datetime.now(UTC)
    ca = pki.CertificateAuthority(
        pki.cert_from_pem(config.device_ca_cert.read_bytes()),
        pki.key_from_pem(config.device_ca_key.read_bytes()),
    )
    config.dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    certs: dict[str, str] = {}
    for index in range(1, count + 1):
        device_id = config.device_id(index)
        directory = config.dir / device_id
        cert_path = directory / "devid.pem"
        key_path = directory / "devid.key"
        if not (cert_path.exists() and key_path.exists()):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            key = pki.generate_key()
            cert = pki.issue_client_cert(
                ca,
                key.public_key(),
                identity=device_id,
                role=DEVICE_ROLE,
                now=issued_at,
                valid_for=CERT_VALIDITY,
            )
            pki.write_private_key(key_path, key)
            pki.write_certificate(cert_path, cert)
        config_path = directory / "agent.toml"
        atomic_write(config_path, _agent_toml(config, device_id, directory).encode(), mode=0o644)
        certs[device_id] = cert_path.read_text()
        paths.append(config_path)
    _register(config, certs, int(issued_at.timestamp()))
    return paths


def _register(config: FleetConfig, certs: dict[str, str], now: int) -> None:
    engine = make_engine(config.registry_url)
    try:
        registry_schema.Base.metadata.create_all(engine)
        sessions = session_factory(engine)

        def work(session: Session) -> int:
            registry = Registry(session)
            added = 0
            for device_id, cert_pem in certs.items():
                row = session.get(registry_schema.Device, device_id)
                if row is not None:
                    if row.devid_cert_pem != cert_pem:
                        raise ConfigError(
                            f"the registry already has a device {device_id!r} with another DevID "
                            f"certificate: use another fleet.id_prefix or the original fleet.dir"
                        )
                    continue
                registry.register_device(
                    device_id,
                    ek_cert_fingerprint=synthetic_ek_fingerprint(device_id, cert_pem),
                    devid_cert_pem=cert_pem,
                    now=now,
                )
                added += 1
            if added:
                audit.append(
                    session,
                    now=now,
                    actor="local:firmware-sim-fleet",
                    action="device.register.simulated",
                    target=config.id_prefix,
                    outcome=Outcome.ACCEPTED,
                    reason=(
                        "virtual fleet: registered WITHOUT factory enrollment (software keys, "
                        "simulation only)"
                    ),
                    details={"count": added},
                )
            return added

        added = run_in_transaction(sessions, work)
        if added:
            log.warning(
                "registered %d virtual devices directly in the registry (no factory enrollment: "
                "simulation only)",
                added,
            )
    finally:
        engine.dispose()


# -- keys -----------------------------------------------------------------------------------------


class SimulatedSoftwareKeys:
    """``agent.core.KeyProvider`` for the virtual fleet: the DevID key and every leaf key are
    software keys in this process's memory. INSECURE, simulation only: nothing here is protected
    the way a TPM protects a device's keys. Built through ``from_config``, which applies the
    agent's own gate (``agent.daemon.load_devid``)."""

    def __init__(self, devid: ec.EllipticCurvePrivateKey) -> None:
        self._devid = devid
        self._leaves: dict[bytes, ec.EllipticCurvePrivateKey] = {}

    @classmethod
    def from_config(cls, config: AgentConfig, *, allow_insecure: bool) -> SimulatedSoftwareKeys:
        """The device's DevID key as its agent configuration names it. Refused (``ConfigError``)
        unless the configuration says ``simulation.insecure_software_keys = true`` and the caller
        passes ``allow_insecure`` (the explicit command-line flag)."""
        return cls(load_devid(None, config, allow_insecure))

    def __repr__(self) -> str:
        return f"SimulatedSoftwareKeys({len(self._leaves)} leaves)"

    @property
    def devid(self) -> ec.EllipticCurvePrivateKey:
        return self._devid

    def new_leaf_key(self) -> ec.EllipticCurvePrivateKey:
        key = ec.generate_private_key(ec.SECP256R1())
        self._leaves[serialize_public_key(key.public_key())] = key
        return key

    def adopt_leaf(self, key: ec.EllipticCurvePrivateKey) -> None:
        """A leaf key made outside (``VirtualFleet.seed_group`` builds whole groups at once)."""
        self._leaves[serialize_public_key(key.public_key())] = key

    def load_leaf(self, public: bytes) -> ec.EllipticCurvePrivateKey:
        key = self._leaves.get(public)
        if key is None:
            raise StateError("this virtual device does not hold that leaf key")
        return key

    def retain(self, live: set[bytes]) -> None:
        """Forget every leaf key the core no longer refers to (the TPM version shreds blobs)."""
        for public in [p for p in self._leaves if p not in live]:
            del self._leaves[public]


# -- one device ----------------------------------------------------------------------------------


@dataclass
class _Link:
    """A device's MQTT connection, driven by the fleet's selector loop."""

    device: VirtualDevice
    client: paho.Client
    sock: socket.socket | None = None
    connected: bool = False
    subscribed: bool = False
    reported: bool = False
    started: bool = False
    failures: int = 0
    retry_at: float = 0.0
    last_error: str = ""
    offline: bool = False  # held off the network by set_offline: no reconnect


class VirtualDevice:
    """One virtual device: its agent configuration, simulated keys and protocol core."""

    def __init__(self, config: AgentConfig, keys: SimulatedSoftwareKeys, *, now: int) -> None:
        assert config.identity is not None and config.fleet is not None
        assert config.broker is not None
        self.config = config
        self.device_id = config.identity.device_id
        self.keys = keys
        self.core = AgentCore(
            self.device_id,
            config.fleet.service_key,
            keys,
            now=now,
            policy_for=config.rotation.for_group,
            max_age=max(DEFAULT_MAX_AGE, config.broker.session_expiry),
        )
        self.core.ledger.add("devid", KeyKind.DEVID, active=True)
        self.acks: dict[tuple[str, int], float] = {}  # (group, epoch) -> monotonic time acked
        self.errors = 0

    def __repr__(self) -> str:
        return f"VirtualDevice({self.device_id!r})"

    def handle(self, topic: str, payload: bytes, now: int) -> list[Publish]:
        """One inbound message through the core; returns what to publish. The core's own
        contract (persist before publishing) holds trivially: the state is memory."""
        before = dict(self.core.last_acks)
        try:
            outcome = self.core.handle(payload, topic, now)
        except KeyfleetError as exc:
            self.errors += 1
            log.error("%s: message on %s failed: %s", self.device_id, topic, exc)
            return []
        self._note_acks(before, outcome.publishes)
        self.keys.retain(self.core.leaf_refs())
        return outcome.publishes

    def report(self, now: int) -> list[Publish]:
        return self.core.report(now).publishes

    def tick(self, now: int) -> list[Publish]:
        return self.core.tick(now).publishes

    def _note_acks(self, before: dict[str, tuple[int, int]], publishes: Sequence[Publish]) -> None:
        if not any(p.type == Ack.TYPE for p in publishes):
            return
        stamp = time.monotonic()
        for group, (epoch, _) in self.core.last_acks.items():
            if before.get(group, (None, None))[0] != epoch or (group, epoch) not in self.acks:
                self.acks.setdefault((group, epoch), stamp)


# -- the fleet -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetStatus:
    devices: int
    connected: int
    ready: int
    errors: int


class _InsecureOnce(logging.Filter):
    """The agent logs its INSECURE warnings once per loaded configuration; a fleet loads
    thousands. The first goes through, the rest are counted (the fleet says how many)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        for marker in (_INSECURE_TEXT, _DEVID_INSECURE_TEXT):
            if text.startswith(marker):
                self.seen[marker] = self.seen.get(marker, 0) + 1
                return self.seen[marker] == 1
        return True


@contextlib.contextmanager
def _insecure_warnings_once() -> Iterator[_InsecureOnce]:
    gate = _InsecureOnce()
    loggers = [logging.getLogger("keyagent.config"), logging.getLogger("keyagent.daemon")]
    for logger in loggers:
        logger.addFilter(gate)
    try:
        yield gate
    finally:
        for logger in loggers:
            logger.removeFilter(gate)


def load_devices(
    config_paths: Sequence[Path], *, allow_insecure: bool, now: int | None = None
) -> list[VirtualDevice]:
    """Load every device's agent configuration with the agent's loader and its DevID key through
    the agent's gate. The first refusal stops everything (``ConfigError`` naming the file)."""
    stamp = int(time.time()) if now is None else now
    devices = []
    with _insecure_warnings_once() as gate:
        for path in config_paths:
            config = load_config(path, require_provisioned=True)
            keys = SimulatedSoftwareKeys.from_config(config, allow_insecure=allow_insecure)
            devices.append(VirtualDevice(config, keys, now=stamp))
    log.warning(
        "INSECURE: virtual fleet of %d devices with SOFTWARE keys (simulation only; the agent's "
        "INSECURE warnings above were repeated for each device: %s)",
        len(devices),
        ", ".join(f"{count}x {marker!r}" for marker, count in gate.seen.items()) or "none",
    )
    return devices


class VirtualFleet:
    """N virtual devices and one selector thread driving their MQTT connections.

    Thread safety: the loop thread handles every message while holding ``lock``; the reading
    methods (``epochs``, ``authenticators``, ``status``) take it too.
    """

    def __init__(self, devices: Sequence[VirtualDevice], *, clock: Callable[[], float] = time.time):
        if not devices:
            raise ConfigError("a virtual fleet needs at least one device")
        self.devices = list(devices)
        self.by_id = {d.device_id: d for d in self.devices}
        self.lock = threading.RLock()
        self._clock = clock
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._links = [self._make_link(d) for d in self.devices]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop_ident: int | None = None
        self._calls: list[Callable[[], None]] = []
        self._calls_lock = threading.Lock()
        self.messages = 0

    @classmethod
    def from_config(cls, config: FleetConfig, count: int, *, allow_insecure: bool) -> VirtualFleet:
        """Prepare identities (register new ones) and load them as the agent would."""
        if not (config.insecure_software_keys and allow_insecure):
            # Checked here too only to fail before minting a thousand certificates: the
            # authoritative refusal is the agent's own, per device, in load_devices.
            raise ConfigError(
                "the virtual fleet runs on SOFTWARE keys: refused unless the fleet configuration "
                "says [simulation] insecure_software_keys = true AND --allow-insecure-software-"
                "keys is given (simulation only; never on real devices)"
            )
        paths = prepare_identities(config, count)
        return cls(load_devices(paths, allow_insecure=allow_insecure))

    def now(self) -> int:
        return int(self._clock())

    # -- MQTT plumbing (loop thread) ----------------------------------------------------------

    def _make_link(self, device: VirtualDevice) -> _Link:
        config = device.config
        assert config.identity is not None and config.broker is not None
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=device.device_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            reconnect_on_failure=False,
        )
        client.tls_set(
            ca_certs=os.fspath(config.broker.ca.path),
            certfile=os.fspath(config.identity.tls_cert.path),
            keyfile=os.fspath(config.identity.tls_key),
        )
        client.max_inflight_messages_set(20)
        client.max_queued_messages_set(10_000)
        client.connect_timeout = 10.0
        link = _Link(device, client)
        client.user_data_set(link)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return link

    def _attach(self, link: _Link) -> None:
        """After a (re)connect: watch the socket from the selector; writes go through it too."""
        client = link.client
        sock = client.socket()
        if sock is None:
            return
        assert isinstance(sock, socket.socket)
        # Nagle would hold the ack behind the PUBACK just written until the broker's delayed
        # ACK (~40 ms): MQTT packets are whole messages, send them at once.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link.sock = sock
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)
        with contextlib.suppress(KeyError):
            self._selector.unregister(sock)
        self._selector.register(sock, events, link)
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._done_writing
        client.on_socket_close = self._closed

    def _want_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        link: _Link = userdata
        if link.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.modify(link.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, link)

    def _done_writing(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        link: _Link = userdata
        if link.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.modify(link.sock, selectors.EVENT_READ, link)

    def _closed(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        link: _Link = userdata
        if link.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(link.sock)
        link.sock = None

    def _connect(self, link: _Link) -> bool:
        """Blocking TCP + TLS handshake + CONNECT (runs in the start pool or the loop)."""
        config = link.device.config
        assert config.broker is not None
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 0
        try:
            if not link.started:
                link.started = True
                link.client.connect(
                    config.broker.host,
                    config.broker.port,
                    keepalive=config.broker.keepalive,
                    clean_start=True,
                    properties=properties,
                )
            else:
                link.client.reconnect()
        except (OSError, ValueError) as exc:
            link.failures += 1
            link.last_error = f"{type(exc).__name__}: {exc}"
            delay = min(RECONNECT_MAX, RECONNECT_MIN * 2 ** min(link.failures, 8))
            link.retry_at = time.monotonic() + random.uniform(delay / 2, delay)  # noqa: S311
            return False
        return True

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        link: _Link = userdata
        if reason.is_failure:
            link.last_error = f"CONNACK {reason}"
            return
        link.connected = True
        link.failures = 0
        device = link.device
        client.subscribe([(device.core.command_topic, 1), (ALL_GROUP_COMMITS, 1)])

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        link: _Link = userdata
        if any(r.is_failure for r in reasons):
            link.last_error = f"SUBACK {reasons}"
            return
        link.subscribed = True
        # after every (re)connect: our epochs to the service, as keyagent run does (catch-up)
        with self.lock:
            publishes = link.device.report(self.now())
        self._publish(link, publishes)
        link.reported = True

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        link: _Link = userdata
        link.connected = link.subscribed = False
        if not self._stop.is_set():
            link.failures += 1
            link.last_error = f"disconnected: {reason}"
            delay = min(RECONNECT_MAX, RECONNECT_MIN * 2 ** min(link.failures, 8))
            link.retry_at = time.monotonic() + random.uniform(delay / 2, delay)  # noqa: S311

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        link: _Link = userdata
        with self.lock:
            self.messages += 1
            publishes = link.device.handle(message.topic, bytes(message.payload), self.now())
        self._publish(link, publishes)

    def _publish(self, link: _Link, publishes: Iterable[Publish]) -> None:
        for item in publishes:
            info = link.client.publish(item.topic, item.payload, qos=1)
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                log.warning(
                    "%s: publish of %s failed: rc %s", link.device.device_id, item.type, info.rc
                )

    # -- the loop ------------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> None:
        """Connect every device (TLS handshakes in a small pool), start the loop thread and wait
        until every device is subscribed and has sent its keys.report."""
        if self._thread is not None:
            raise StateError("the fleet is already running")
        with ThreadPoolExecutor(CONNECT_WORKERS, thread_name_prefix="fleet-connect") as pool:
            list(pool.map(self._connect, self._links))
        for link in self._links:
            self._attach(link)
        self._thread = threading.Thread(target=self._run, name="virtual-fleet", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if status.ready == status.devices:
                return
            if time.monotonic() > deadline or not self._thread.is_alive():
                waiting = [k for k in self._links if not k.reported][:5]
                detail = "; ".join(
                    f"{k.device.device_id}: {k.last_error or 'no CONNACK'}" for k in waiting
                )
                raise StateError(
                    f"virtual fleet: {status.ready}/{status.devices} devices ready after "
                    f"{timeout:g}s (e.g. {detail})"
                )
            time.sleep(0.05)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread (paho clients are only touched there)."""
        with self._calls_lock:
            self._calls.append(fn)
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"\0")

    def set_offline(self, device_id: str, offline: bool) -> None:
        """Take a device off the network (it disconnects and does not reconnect; its session
        expires at once, so what it misses meanwhile is lost to it) or let it come back (it
        reconnects within a second, reports its epochs and is caught up by the service): a
        device losing its network or power, for load and fault tests."""
        link = next(k for k in self._links if k.device.device_id == device_id)

        def change() -> None:
            link.offline = offline
            if offline and link.sock is not None:
                with contextlib.suppress(Exception):
                    link.client.disconnect()
                    link.client.loop_write()
            elif not offline:
                link.retry_at = 0.0

        self.call_soon(change)

    def _run(self) -> None:
        self._loop_ident = threading.get_ident()
        next_misc = time.monotonic() + MISC_SECONDS
        next_tick = time.monotonic() + TICK_SECONDS
        try:
            while not self._stop.is_set():
                for key, events in self._selector.select(SELECT_SECONDS):
                    link = key.data
                    if link is None:
                        with contextlib.suppress(BlockingIOError):
                            self._wake_r.recv(4096)
                        continue
                    self._service(link, events)
                with self._calls_lock:
                    calls, self._calls = self._calls, []
                for call in calls:
                    call()
                now = time.monotonic()
                if now >= next_misc:
                    next_misc = now + MISC_SECONDS
                    self._misc(now)
                if now >= next_tick:
                    next_tick = now + TICK_SECONDS
                    self._tick()
        except Exception:
            log.exception("virtual fleet loop failed")
            raise
        finally:
            self._disconnect_all()

    def _service(self, link: _Link, events: int) -> None:
        client = link.client
        if events & selectors.EVENT_READ:
            rc = client.loop_read(max_packets=64)
            sock = link.sock
            # TLS may hold whole records already decrypted: read them before select() again.
            while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and sock is not None and _pending(sock):
                rc = client.loop_read(max_packets=64)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return
        if link.sock is not None and (events & selectors.EVENT_WRITE or client.want_write()):
            client.loop_write()

    def _misc(self, now: float) -> None:
        for link in self._links:
            if link.sock is not None:
                link.client.loop_misc()
                if link.client.want_write():
                    link.client.loop_write()
            elif (
                not link.offline
                and now >= link.retry_at
                and not self._stop.is_set()
                and self._connect(link)
            ):
                self._attach(link)

    def _tick(self) -> None:
        stamp = self.now()
        for link in self._links:
            with self.lock:
                publishes = link.device.tick(stamp)
            if publishes:
                self._publish(link, publishes)

    def _disconnect_all(self) -> None:
        for link in self._links:
            if link.sock is None:
                continue
            with contextlib.suppress(Exception):
                link.client.disconnect()
                link.client.loop_write()
        for link in self._links:
            with contextlib.suppress(Exception):
                if link.client.socket() is not None:
                    link.client.loop_read()
            if link.sock is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(link.sock)
                link.sock = None

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> VirtualFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- reading ---------------------------------------------------------------------------------

    def status(self) -> FleetStatus:
        return FleetStatus(
            devices=len(self._links),
            connected=sum(1 for k in self._links if k.connected),
            ready=sum(1 for k in self._links if k.reported and k.connected),
            errors=sum(d.errors for d in self.devices),
        )

    def epochs(self, group: str) -> dict[str, int | None]:
        with self.lock:
            return {d.device_id: d.core.epoch(group) for d in self.devices}

    def authenticators(self, group: str) -> dict[str, tuple[int, bytes] | None]:
        """Per device: (epoch, epoch authenticator) of ``group``, or None if it is no member.
        Epoch authenticators are public by design (they derive nothing)."""
        with self.lock:
            out: dict[str, tuple[int, bytes] | None] = {}
            for d in self.devices:
                g = d.core.groups().get(group)
                out[d.device_id] = None if g is None else (g.epoch, g.epoch_authenticator)
            return out

    def wait_epoch(self, group: str, epoch: int, timeout: float) -> float:
        """Wait until every device is at ``epoch`` of ``group``; returns the monotonic time the
        last one acked it. ``StateError`` naming the stragglers on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            epochs = self.epochs(group)
            behind = [d for d, e in epochs.items() if e is None or e < epoch]
            if not behind:
                with self.lock:
                    stamps = [d.acks.get((group, epoch)) for d in self.devices]
                return max(s for s in stamps if s is not None) if any(stamps) else time.monotonic()
            if time.monotonic() > deadline:
                raise StateError(
                    f"{len(behind)} devices not at epoch {epoch} of {group} after {timeout:g}s: "
                    + " ".join(behind[:10])
                )
            time.sleep(0.01)

    # -- simulation shortcut: a full group built directly --------------------------------------

    def seed_group(self, group_id: str, sessions: sessionmaker[Session], *, now: int) -> None:
        """SIMULATION BYPASS (benchmarks): make every fleet device a member of a new group
        ``group_id`` at epoch 1, built directly rather than by N-1 adds, and record it in the
        registry (group row with the public tree, members, one ack per member so that every
        member counts as holding the current epoch), audited as ``group.seed.simulated``.

        The group is what a full group looks like after commits have touched every node: a
        complete tree (width the next power of two), every parent above a member holding a key
        pair, all members sharing one set of epoch secrets. Call before ``start``."""
        if self._thread is not None:
            raise StateError("seed groups before the fleet starts")
        n = len(self.devices)
        width = 1
        while width < n:
            width *= 2
        leaf_keys = [d.keys.new_leaf_key() for d in self.devices]
        nodes: list[Node] = []
        parent_keys: dict[int, ec.EllipticCurvePrivateKey] = {}
        for x in range(2 * width - 1):
            if tm.is_leaf(x):
                i = x // 2
                if i < n:
                    device = self.devices[i]
                    nodes.append(
                        LeafNode(
                            device.device_id.encode(),
                            serialize_public_key(device.keys.devid.public_key()),
                            serialize_public_key(leaf_keys[i].public_key()),
                        )
                    )
                else:
                    nodes.append(None)
                continue
            # a parent is blank unless a member sits below it (its leftmost leaf is a member)
            left_leaf = _leftmost_leaf(x)
            if left_leaf >= n:
                nodes.append(None)
                continue
            key = derive_key_pair(os.urandom(32))
            parent_keys[x] = key
            nodes.append(ParentNode(serialize_public_key(key.public_key())))
        tree = RatchetTree(nodes)
        tree.tree_hash()  # cached once, shared by every member's copy
        public = PublicState(group_id.encode(), 1, tree, os.urandom(32), os.urandom(32))
        secrets = epoch_from_joiner(os.urandom(32), public.group_context())
        groups: list[Group] = []
        for i, device in enumerate(self.devices):
            path = tm.direct_path(tm.leaf_to_node(i), width)
            keys = {x: parent_keys[x] for x in path if x in parent_keys}
            group = Group(public, i, leaf_keys[i], keys, secrets)
            device.core.set_time(now)
            # No public AgentCore call installs a group without a welcome; this is the one
            # place that does, for the simulation shortcut only.
            device.core._install(group_id, group)
            groups.append(group)
        authenticator = groups[0].epoch_authenticator
        public_tree = codec.encode(groups[0].public_group().to_state())
        group_context = public.group_context()

        def work(session: Session) -> None:
            session.add(
                registry_schema.Group(
                    group_id=group_id,
                    epoch=1,
                    public_tree=public_tree,
                    group_context=group_context,
                    created_at=now,
                    updated_at=now,
                )
            )
            for i, device in enumerate(self.devices):
                session.add(
                    registry_schema.GroupMember(
                        group_id=group_id,
                        device_id=device.device_id,
                        leaf_index=i,
                        pending=None,
                        joined_epoch=1,
                        requested_at=now,
                    )
                )
            session.flush()
            registry = Registry(session)
            for device in self.devices:
                registry.record_ack(
                    group_id,
                    epoch=1,
                    device_id=device.device_id,
                    epoch_authenticator=authenticator,
                    now=now,
                )
            audit.append(
                session,
                now=now,
                actor="local:firmware-sim-fleet",
                action="group.seed.simulated",
                target=group_id,
                outcome=Outcome.ACCEPTED,
                reason="virtual fleet: group built directly, not by adds (simulation only)",
                details={"members": n},
            )

        run_in_transaction(sessions, work)
        log.warning(
            "seeded group %s with %d virtual members directly (simulation only)", group_id, n
        )


def _leftmost_leaf(x: int) -> int:
    """Index of the leftmost leaf below node ``x`` of the array tree."""
    level = tm.level(x)
    return (x >> (level + 1)) << level


def _pending(sock: socket.socket) -> int:
    pending = getattr(sock, "pending", None)
    return int(pending()) if callable(pending) else 0


def open_registry(url: str) -> tuple[Any, sessionmaker[Session]]:
    """Engine and session factory for the fleet's registry (caller disposes the engine)."""
    engine = make_engine(url)
    return engine, session_factory(engine)
