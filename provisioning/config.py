"""The fleet service's configuration file (TOML), validated at load into a frozen dataclass.

Every problem in the file is collected and reported together in one ``ConfigError``, each naming
the key, the value found and what was expected, so an operator fixes the file in one go. Unknown
keys are errors (a typo must not silently fall back to a default). The checking is the agent's
(``agent.configschema``), so both configuration files report problems the same way. Relative
paths, including a relative SQLite file, are relative to the directory of the configuration
file, so a config and its certificates can move together.

Example (``docs/service.md`` describes every key):

    [database]
    url = "sqlite:///fleet.db"

    [broker]
    host = "mqtt.example.net"
    port = 8883
    ca = "pki/broker-ca.pem"
    client_cert = "pki/service.pem"
    client_key = "pki/service.key"

    [device_ca]
    cert = "pki/device-ca.pem"
    key = "pkcs11:token=keyfleet;object=device-ca?pin-source=file:token.pin"

    [operator_ca]
    cert = "pki/operator-ca.pem"

    [attestation]
    manufacturer_cas = "pki/manufacturer-cas.pem"
    golden_measurements = "policy/golden.toml"
    interval_seconds = 3600
    quarantine = true
    manufacturer_crls = "pki/manufacturer-crls.pem"

    [groups]
    commit_log_retention_epochs = 64
    ack_timeout_seconds = 30
    rekey_max_age_seconds = 604800
    rekey_max_epochs = 100

    [quorum]
    min_approvals = 2
    request_ttl_seconds = 86400

    [audit]
    checkpoint_key = "pki/audit-checkpoint.key"
    checkpoint_interval_seconds = 300

    [releases]
    signing_key = "pkcs11:token=keyfleet;object=release-signing?pin-source=file:token.pin"
    grace_days = 30

    [enrollment]
    certificate_validity_seconds = 31536000

    [revocation]
    crl_file = "/var/lib/keyfleet/broker/crl.pem"
    broker_crls = ["pki/operator-ca.crl", "pki/tls-ca.crl"]

    [renewal]
    expired = "allow"
    max_expired_seconds = 7776000
    listen = "0.0.0.0:8445"
    url = "https://fleet.example.net:8445"
    tls_cert = "pki/renew-server.pem"
    tls_key = "pki/renew-server.key"

    [http]
    listen = "127.0.0.1:8443"
    tls_cert = "pki/enroll-server.pem"
    tls_key = "pki/enroll-server.key"
    station_ca = "pki/station-ca.pem"

    [dashboard]
    listen = "127.0.0.1:8444"
    tls_cert = "pki/dashboard-server.pem"
    tls_key = "pki/dashboard-server.key"
    page_size = 50

    [service]
    signing_key = "pkcs11:token=keyfleet;object=service-signing?pin-source=file:token.pin"
    signing_cert = "pki/service-signing.pem"
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from agent.configschema import (
    INVALID,
    Bool,
    ConfigProblems,
    Field,
    Int,
    List,
    OneOf,
    Parse,
    Predicate,
    ReadableFile,
    Str,
    Table,
    https_url,
    read_toml,
    validate,
)
from agent.protocol.errors import InternalError
from provisioning.custody import FileKeyRef, KeyRef, KeyReference, same_key
from provisioning.db.engine import redact_url

DEFAULT_DATABASE_URL = "sqlite:///keyfleet.db"
DATABASE_URL_EXPECTED = (
    "a sqlite:// or postgresql:// database URL such as sqlite:///fleet.db or "
    "postgresql+psycopg://host/keyfleet"
)
URL_EXPECTED = "an https:// URL such as https://fleet.example.net:8445"
LISTEN_EXPECTED = "HOST:PORT with a port from 1 to 65535, e.g. 127.0.0.1:8443 or [::1]:8443"
OPTIONAL_SECTIONS = frozenset(
    {
        "database",
        "groups",
        "quorum",
        "revocation",
        "enrollment",
        "http",
        "service",
        "dashboard",
        "metrics",
        "audit",
        "releases",
        "rollout",
        "renewal",
    }
)
# Optional tables whose absence means "not served" rather than "defaults".
ABSENT_MEANS_OFF = frozenset({"http", "dashboard", "metrics"})


class InvalidConfig(ConfigProblems):
    """All the problems of one configuration file; ``problems`` lists them one by one, each a
    ``agent.configschema.Problem`` line that also carries its ``key``, ``value`` and
    ``expected``."""

    def __init__(self, path: Path, problems: Sequence[str]) -> None:
        super().__init__(str(path), problems)
        self.path = path


@dataclass(frozen=True)
class BrokerConfig:
    host: str
    port: int
    ca: Path
    client_cert: Path
    client_key: Path


@dataclass(frozen=True)
class DeviceCAConfig:
    """[device_ca]: ``key`` is a key reference (``provisioning.custody``): a ``pkcs11:`` URI of a
    key in a token, or a PEM file (warned about when loaded)."""

    cert: Path
    key: KeyRef


@dataclass(frozen=True)
class AttestationConfig:
    """[attestation]. ``manufacturer_crls``: the CRLs of the manufacturer CAs the operator
    imported (``keyfleet pki import-crl``, provisioning.ekcrls); None: none are checked."""

    manufacturer_cas: Path
    golden_measurements: Path
    interval_seconds: int
    quarantine: bool = False
    manufacturer_crls: Path | None = None
    max_challenges_per_second: int = 50


@dataclass(frozen=True)
class GroupsConfig:
    """[groups]. ``rekey_max_age_seconds`` / ``rekey_max_epochs``: the default rekey policy of a
    group without its own (``keyfleet group policy``): every member updates its own leaf at least
    this often, in time and in epochs (0: no bound; docs/operations.md, "Rekey policy"), the
    same at every instance (``ds.rekey.default-mismatch``).
    ``tree_requests_per_minute`` / ``tree_request_burst``: each device's budget of tree page
    requests at one instance (docs/service.md). ``tree_pages_kept``: how many trees cut into
    pages for joiners one instance keeps (docs/service.md, "Tree pages")."""

    commit_log_retention_epochs: int
    ack_timeout_seconds: int
    member_updates: bool = False
    member_update_min_interval_seconds: int = 3600
    recovery_wait_seconds: int = 10
    rekey_max_age_seconds: int = 7 * 86_400
    rekey_max_epochs: int = 100
    tree_requests_per_minute: int = 120
    tree_request_burst: int = 256
    tree_pages_kept: int = 2


@dataclass(frozen=True)
class RolloutConfig:
    """[rollout]: staged rollouts (``keyfleet rollout``). ``wave_timeout_seconds``: how long a
    wave may take to install, attest trusted and ack before the rollout stops as ``timeout``."""

    wave_timeout_seconds: int = 600


@dataclass(frozen=True)
class QuorumConfig:
    """[quorum]: dual control. ``min_approvals``: k of the initial quorum policy (every op needs
    k distinct operators until a signed policy is adopted); ``request_ttl_seconds``: how long a
    proposed request can be approved."""

    min_approvals: int = 2
    request_ttl_seconds: int = 86400


@dataclass(frozen=True)
class AuditConfig:
    """[audit]: signed checkpoints of the audit log (docs/operations.md, "Audit checkpoints").
    ``checkpoint_key`` signs them (a key of its own: never ``[service] signing_key`` or a TLS
    key); absent, the service makes none. ``checkpoint_interval_seconds``: how often the head is
    checkpointed when it moved."""

    checkpoint_key: KeyRef | None = None
    checkpoint_interval_seconds: int = 300


@dataclass(frozen=True)
class EnrollmentConfig:
    """[enrollment]: ``certificate_validity_seconds``, how long the DevID and TLS certificates
    issued at enrollment and at each renewal are valid (docs/service.md; devices renew at a
    fraction of it, docs/agent.md [renewal])."""

    certificate_validity_seconds: int = 365 * 86_400


EXPIRED_POLICIES = ("refuse", "allow")
DEFAULT_MAX_EXPIRED = 90 * 86_400


@dataclass(frozen=True)
class RenewalConfig:
    """[renewal]: renewal of a certificate that has already expired (docs/attestation.md,
    "Certificate renewal"). ``expired``: ``"refuse"`` (the default: such a device is enrolled
    again) or ``"allow"``: a device whose certificates expired at most ``max_expired_seconds``
    ago renews by the same TPM proof over the HTTPS renewal listener (``listen``, server TLS
    only with ``tls_cert``/``tls_key``: the device's expired client certificate is refused by
    the broker, so it cannot reach the service over MQTT). ``keyfleet serve`` starts the
    listener only when the policy allows. ``url``: the listener as devices dial it, which
    enrollment then gives them (their agent's ``[renewal] url``); its server certificate must
    chain to the broker CA devices hold."""

    expired: str = "refuse"
    max_expired_seconds: int = DEFAULT_MAX_EXPIRED
    url: str | None = None
    host: str | None = None
    port: int | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @property
    def allows_expired(self) -> bool:
        return self.expired == "allow"


@dataclass(frozen=True)
class RevocationConfig:
    """[revocation]: the device CA's CRL for the broker. ``crl_file``: where the service writes
    it (the broker's ``crlfile``; absent: no file is written, the CRL is still issued and
    stored); ``broker_crls``: the CRLs of the broker's other client CAs (operator CA, the
    service's own CA), appended to the file because Mosquitto refuses a client whose CA has no
    CRL in it; ``crl_validity_seconds``: each CRL's next-update (re-issued at half of it)."""

    crl_file: Path | None = None
    broker_crls: tuple[Path, ...] = ()
    crl_validity_seconds: int = 7 * 86400


@dataclass(frozen=True)
class ReleasesConfig:
    """[releases] (docs/operations.md, "Releases"). ``signing_key`` (a key reference, like
    ``[service] signing_key``: a key of its own, whose public key devices get at enrollment)
    signs the release bundle; absent, no bundle is published (a warning at start).
    ``grace_days``: how long a release superseded by a newer approved one stays approved."""

    signing_key: KeyRef | None = None
    grace_days: int = 30


@dataclass(frozen=True)
class ServiceRuntimeConfig:
    """[service]: how ``keyfleet serve`` runs. ``signing_key`` (a key reference: ``pkcs11:`` URI
    or file) signs every service envelope; ``signing_cert`` is its certificate, which devices get
    at enrollment as ``fleet.service_cert`` and operators pass as ``--service-cert``. Both are
    needed to serve, and the signing key must not be a TLS key of the service
    (``signing_problems``). ``instance`` makes the MQTT client id
    ``keyfleet-service-<instance>``. ``session_expiry_seconds``: how long the broker keeps the
    instance's session (and queues its share of the messages) while it is away; several
    instances want 0, so that a dead one's share goes to the live ones (docs/scale-out.md)."""

    signing_key: KeyRef | None = None
    signing_cert: Path | None = None
    instance: str = "1"
    commit_request_timeout_seconds: int = 10
    online_window_seconds: int = 300
    session_expiry_seconds: int = 7 * 86400


@dataclass(frozen=True)
class HttpConfig:
    """[http]: the enrollment API for factory stations, served by ``keyfleet serve`` (mutual
    TLS: ``tls_cert``/``tls_key`` are the server's, ``station_ca`` issues station certificates)."""

    host: str
    port: int
    tls_cert: Path
    tls_key: Path
    station_ca: Path


@dataclass(frozen=True)
class DashboardConfig:
    """[dashboard]: the read-only operator dashboard (docs/dashboard.md), served by ``keyfleet
    serve`` on its own HTTPS listener whose TLS layer trusts only the operator CA
    (``[operator_ca] cert``); ``tls_cert``/``tls_key`` are the server's. ``page_size`` bounds
    the rows of every table page."""

    host: str
    port: int
    tls_cert: Path
    tls_key: Path
    page_size: int = 50


@dataclass(frozen=True)
class MetricsConfig:
    """[metrics]: where ``keyfleet serve`` serves its Prometheus metrics (plain HTTP
    ``GET /metrics``; docs/scale-out.md). Absent: no metrics listener.
    ``expiry_refresh_seconds``: how often the expiry gauges' data (certificate files, the
    devices' not-after) is re-read; a scrape only reads the cached values."""

    host: str
    port: int
    expiry_refresh_seconds: int = 300


@dataclass(frozen=True)
class ServiceConfig:
    path: Path
    # The URL may carry a PostgreSQL password: kept out of repr; ``database_url_redacted`` is for
    # logs and messages.
    database_url: str = field(repr=False)
    broker: BrokerConfig
    device_ca: DeviceCAConfig
    operator_ca_cert: Path
    attestation: AttestationConfig
    groups: GroupsConfig
    http: HttpConfig | None
    service: ServiceRuntimeConfig = field(default_factory=ServiceRuntimeConfig)
    quorum: QuorumConfig = field(default_factory=QuorumConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    revocation: RevocationConfig = field(default_factory=RevocationConfig)
    enrollment: EnrollmentConfig = field(default_factory=EnrollmentConfig)
    releases: ReleasesConfig = field(default_factory=ReleasesConfig)
    metrics: MetricsConfig | None = None
    dashboard: DashboardConfig | None = None
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    renewal: RenewalConfig = field(default_factory=RenewalConfig)

    @property
    def database_url_redacted(self) -> str:
        return redact_url(self.database_url)

    def signing_problems(self) -> list[str]:
        """Why this configuration cannot sign the service's messages, if it cannot: no
        ``[service] signing_key``/``signing_cert`` (``token.signing_key.absent``), or the
        signing key is one of the service's TLS keys (``token.signing_key.tls``): a key that
        every TLS handshake uses, on disk for the TLS stack, must not also be the key whose
        signature devices obey."""
        problems: list[str] = []
        signing = self.service.signing_key
        if signing is None or self.service.signing_cert is None:
            problems.append(
                "[token.signing_key.absent] [service] signing_key and signing_cert are needed: "
                "the service signs its messages with a key of its own, apart from its TLS key "
                "(docs/operations.md, keys in a token)"
            )
        if signing is not None:
            tls = {"[broker] client_key": self.broker.client_key}
            if self.http is not None:
                tls["[http] tls_key"] = self.http.tls_key
            if self.dashboard is not None:
                tls["[dashboard] tls_key"] = self.dashboard.tls_key
            if self.renewal.tls_key is not None:
                tls["[renewal] tls_key"] = self.renewal.tls_key
            for name, path in tls.items():
                if same_key(signing, FileKeyRef(path)):
                    problems.append(
                        f"[token.signing_key.tls] [service] signing_key is the {name}: the "
                        "signing key must be a key of its own"
                    )
        return problems

    def require_signing(self) -> None:
        """Raise ``InvalidConfig`` with ``signing_problems`` (``keyfleet serve`` calls it)."""
        problems = self.signing_problems()
        if problems:
            raise InvalidConfig(self.path, problems)


# ---- the schema of the file --------------------------------------------------------------------


def _database_url(base: Path) -> Parse:
    def parse(value: str) -> str:
        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError("not parsable as a URL") from None
        backend = url.get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(f"{backend} is not supported")
        if backend == "postgresql":
            return value
        if url.database in (None, "", ":memory:"):
            raise ValueError("a SQLite file is needed: an in-memory database is lost")
        path = Path(url.database)
        if not path.is_absolute():
            path = base / path
        if not path.parent.is_dir():
            raise ValueError(f"no directory {path.parent} for the SQLite file")
        return url.set(database=str(path)).render_as_string(hide_password=False)

    # The URL may carry a PostgreSQL password: problems show it redacted.
    return Parse(
        Str(DATABASE_URL_EXPECTED),
        parse,
        DATABASE_URL_EXPECTED,
        shown=lambda value: f'"{redact_url(value)}"',
    )


def _file_to_write(base: Path) -> Parse:
    """A file that a command writes (it need not exist yet) in an existing directory; relative
    to ``base``."""
    expected = "a file path in an existing directory"

    def parse(value: str) -> Path:
        path = Path(value)
        if not path.is_absolute():
            path = base / path
        if not path.parent.is_dir():
            raise ValueError(f"no directory {path.parent}")
        if path.exists() and not path.is_file():
            raise ValueError("not a regular file")
        return path

    return Parse(Str(expected), parse, expected)


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError
    return host, int(port)


def _schema(base: Path) -> Table:
    """The file's schema; relative paths are resolved against ``base``."""

    def file(*, private: bool = False) -> ReadableFile:
        if private:
            return ReadableFile(
                "a private key file readable only by its owner", private=True, base=base
            )
        return ReadableFile("a readable file", base=base)

    def seconds(low: int, high: int) -> Int:
        return Int(low, high, "seconds")

    name = Predicate(
        Str("a non-empty string"),
        lambda s: None if s.strip() else "not only spaces",
        "a non-empty string",
    )
    sections = {
        "database": {"url": Field(_database_url(base), default=DEFAULT_DATABASE_URL)},
        "broker": {
            "host": Field(name, required=True),
            "port": Field(Int(1, 65535), default=8883),
            "ca": Field(file(), required=True),
            "client_cert": Field(file(), required=True),
            "client_key": Field(file(private=True), required=True),
        },
        "device_ca": {
            "cert": Field(file(), required=True),
            "key": Field(KeyReference(base=base), required=True),
        },
        "operator_ca": {"cert": Field(file(), required=True)},
        "attestation": {
            "manufacturer_cas": Field(file(), required=True),
            "golden_measurements": Field(file(), required=True),
            "interval_seconds": Field(seconds(10, 7 * 86400), default=3600),
            "quarantine": Field(Bool(), default=False),
            "manufacturer_crls": Field(_file_to_write(base)),
            "max_challenges_per_second": Field(Int(1, 100, "challenges"), default=50),
        },
        "groups": {
            "commit_log_retention_epochs": Field(Int(1, 1_000_000, "epochs"), default=64),
            "ack_timeout_seconds": Field(seconds(1, 86400), default=30),
            "member_updates": Field(Bool(), default=False),
            "member_update_min_interval_seconds": Field(seconds(1, 30 * 86400), default=3600),
            "recovery_wait_seconds": Field(seconds(1, 3600), default=10),
            "rekey_max_age_seconds": Field(seconds(0, 366 * 86400), default=7 * 86_400),
            "rekey_max_epochs": Field(Int(0, 1_000_000, "epochs"), default=100),
            "tree_requests_per_minute": Field(Int(1, 60_000, "requests"), default=120),
            "tree_request_burst": Field(Int(1, 100_000, "requests"), default=256),
            "tree_pages_kept": Field(Int(1, 16, "trees"), default=2),
        },
        "rollout": {
            "wave_timeout_seconds": Field(seconds(10, 7 * 86400), default=600),
        },
        "quorum": {
            "min_approvals": Field(Int(1, 16, "operators"), default=2),
            "request_ttl_seconds": Field(seconds(10, 30 * 86400), default=86400),
        },
        "http": {
            "listen": Field(Parse(Str(LISTEN_EXPECTED), _listen, LISTEN_EXPECTED), required=True),
            "tls_cert": Field(file(), required=True),
            "tls_key": Field(file(private=True), required=True),
            "station_ca": Field(file(), required=True),
        },
        "dashboard": {
            "listen": Field(Parse(Str(LISTEN_EXPECTED), _listen, LISTEN_EXPECTED), required=True),
            "tls_cert": Field(file(), required=True),
            "tls_key": Field(file(private=True), required=True),
            "page_size": Field(Int(10, 500, "rows"), default=50),
        },
        "metrics": {
            "listen": Field(Parse(Str(LISTEN_EXPECTED), _listen, LISTEN_EXPECTED), required=True),
            "expiry_refresh_seconds": Field(seconds(5, 86400), default=300),
        },
        "releases": {
            "signing_key": Field(KeyReference(base=base)),
            "grace_days": Field(Int(1, 3650, "days"), default=30),
        },
        "audit": {
            "checkpoint_key": Field(KeyReference(base=base)),
            "checkpoint_interval_seconds": Field(seconds(10, 86400), default=300),
        },
        "renewal": {
            "expired": Field(OneOf(EXPIRED_POLICIES), default="refuse"),
            # at most ten years after expiry
            "max_expired_seconds": Field(seconds(0, 3650 * 86400), default=DEFAULT_MAX_EXPIRED),
            "listen": Field(Parse(Str(LISTEN_EXPECTED), _listen, LISTEN_EXPECTED)),
            "url": Field(Parse(Str(URL_EXPECTED), https_url, URL_EXPECTED)),
            "tls_cert": Field(file()),
            "tls_key": Field(file(private=True)),
        },
        "enrollment": {
            # at least a minute (a lab's short lifetime), at most ten years
            "certificate_validity_seconds": Field(seconds(60, 3650 * 86400), default=365 * 86400),
        },
        "revocation": {
            "crl_file": Field(_file_to_write(base)),
            "broker_crls": Field(List(file(), max_items=16), default=[]),
            "crl_validity_seconds": Field(seconds(3600, 366 * 86400), default=7 * 86400),
        },
        "service": {
            "signing_key": Field(KeyReference(base=base)),
            "signing_cert": Field(file()),
            "instance": Field(name, default="1"),
            "commit_request_timeout_seconds": Field(seconds(1, 3600), default=10),
            "online_window_seconds": Field(seconds(10, 7 * 86400), default=300),
            "session_expiry_seconds": Field(seconds(0, 30 * 86400), default=7 * 86400),
        },
    }
    tables: dict[str, Field] = {}
    for section, fields in sections.items():
        table = Table(fields, f"a table with {', '.join(fields)}")
        # An absent optional table means its defaults (its required keys apply only when the
        # table is given, e.g. [http] listen); an absent [http] means no enrollment API, an
        # absent [dashboard] no dashboard.
        if section not in OPTIONAL_SECTIONS:
            tables[section] = Field(table, required=True)
        elif section in ABSENT_MEANS_OFF:
            tables[section] = Field(table)
        else:
            tables[section] = Field(table, default={})
    return Table(tables)


def parse_config(data: Mapping[str, Any], *, path: Path, base: Path | None = None) -> ServiceConfig:
    """Validate parsed TOML; relative paths are resolved against ``base`` (the file's dir)."""
    result = validate(data, _schema(base if base is not None else path.parent))
    if result.value is INVALID or result.problems:
        raise InvalidConfig(path, result.problems)
    if not isinstance(result.value, dict):  # pragma: no cover - a Table returns a dict
        raise InternalError("validated configuration is not a table")
    sections: dict[str, Any] = result.value
    http = sections["http"]
    metrics = sections["metrics"]
    renewal = _renewal(sections["renewal"], path)
    dashboard = sections["dashboard"]
    return ServiceConfig(
        path=path,
        database_url=sections["database"]["url"],
        broker=BrokerConfig(**sections["broker"]),
        device_ca=DeviceCAConfig(**sections["device_ca"]),
        operator_ca_cert=sections["operator_ca"]["cert"],
        attestation=AttestationConfig(**sections["attestation"]),
        groups=GroupsConfig(**sections["groups"]),
        quorum=QuorumConfig(**sections["quorum"]),
        rollout=RolloutConfig(**sections["rollout"]),
        audit=AuditConfig(**sections["audit"]),
        releases=ReleasesConfig(**sections["releases"]),
        enrollment=EnrollmentConfig(**sections["enrollment"]),
        revocation=RevocationConfig(
            crl_file=sections["revocation"].get("crl_file"),
            broker_crls=tuple(sections["revocation"]["broker_crls"]),
            crl_validity_seconds=sections["revocation"]["crl_validity_seconds"],
        ),
        http=None
        if http is None
        else HttpConfig(
            host=http["listen"][0],
            port=http["listen"][1],
            tls_cert=http["tls_cert"],
            tls_key=http["tls_key"],
            station_ca=http["station_ca"],
        ),
        service=ServiceRuntimeConfig(**sections["service"]),
        renewal=renewal,
        metrics=None
        if metrics is None
        else MetricsConfig(
            host=metrics["listen"][0],
            port=metrics["listen"][1],
            expiry_refresh_seconds=metrics["expiry_refresh_seconds"],
        ),
        dashboard=None
        if dashboard is None
        else DashboardConfig(
            host=dashboard["listen"][0],
            port=dashboard["listen"][1],
            tls_cert=dashboard["tls_cert"],
            tls_key=dashboard["tls_key"],
            page_size=dashboard["page_size"],
        ),
    )


def _renewal(section: Mapping[str, Any], path: Path) -> RenewalConfig:
    """[renewal]; ``expired = "allow"`` needs the listener (``listen``, ``tls_cert``,
    ``tls_key``): the device cannot reach the service over MQTT with an expired certificate."""
    listen = section.get("listen")
    config = RenewalConfig(
        expired=section["expired"],
        max_expired_seconds=section["max_expired_seconds"],
        url=section.get("url"),
        host=None if listen is None else listen[0],
        port=None if listen is None else listen[1],
        tls_cert=section.get("tls_cert"),
        tls_key=section.get("tls_key"),
    )
    if config.allows_expired and None in (listen, config.tls_cert, config.tls_key):
        raise InvalidConfig(
            path,
            [
                'renewal: expired = "allow" needs listen, tls_cert and tls_key (the HTTPS '
                "renewal listener a device with an expired certificate reaches)"
            ],
        )
    return config


def load_config(path: str | os.PathLike[str]) -> ServiceConfig:
    """Read and validate the service configuration at ``path``; raises ``ConfigError``
    (``InvalidConfig`` with every problem when the file parses but its content is wrong)."""
    file = Path(path)
    return parse_config(read_toml(file), path=file, base=file.resolve().parent)
