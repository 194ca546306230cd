"""The fleet service's configuration file (TOML), validated at load into a frozen dataclass.

Every problem in the file is collected and reported together in one ``ConfigError``, each naming
the key, the value found and what was expected, so an operator fixes the file in one go. Unknown
keys are errors (a typo must not silently fall back to a default). Relative paths, including a
relative SQLite file, are relative to the directory of the configuration file, so a config and
its certificates can move together.

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
    key = "pki/device-ca.key"

    [operator_ca]
    cert = "pki/operator-ca.pem"

    [attestation]
    manufacturer_cas = "pki/manufacturer-cas.pem"
    golden_measurements = "policy/golden.toml"
    interval_seconds = 3600
    quarantine = true

    [groups]
    commit_log_retention_epochs = 64
    ack_timeout_seconds = 30

    [http]
    listen = "127.0.0.1:8443"
    tls_cert = "pki/enroll-server.pem"
    tls_key = "pki/enroll-server.key"
    station_ca = "pki/station-ca.pem"
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from agent.errors import ConfigError, InternalError
from provisioning.registry.engine import redact_url

DEFAULT_DATABASE_URL = "sqlite:///keyfleet.db"


@dataclass(frozen=True)
class ConfigProblem:
    key: str
    value: str
    expected: str

    def __str__(self) -> str:
        return f"{self.key} = {self.value}: expected {self.expected}"


class InvalidConfig(ConfigError):
    """All the problems of one configuration file; ``problems`` lists them one by one."""

    def __init__(self, path: Path, problems: list[ConfigProblem]) -> None:
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{path}: {len(problems)} problem(s):\n{lines}")
        self.path = path
        self.problems = tuple(problems)


@dataclass(frozen=True)
class BrokerConfig:
    host: str
    port: int
    ca: Path
    client_cert: Path
    client_key: Path


@dataclass(frozen=True)
class DeviceCAConfig:
    cert: Path
    key: Path


@dataclass(frozen=True)
class AttestationConfig:
    manufacturer_cas: Path
    golden_measurements: Path
    interval_seconds: int
    quarantine: bool = False


@dataclass(frozen=True)
class GroupsConfig:
    commit_log_retention_epochs: int
    ack_timeout_seconds: int


@dataclass(frozen=True)
class ServiceRuntimeConfig:
    """[service]: how ``keyfleet serve`` runs. ``signing_key`` signs every service envelope
    (devices verify it with the matching certificate, their ``fleet.service_cert``); by default
    it is the service's MQTT client key. ``instance`` makes the MQTT client id
    ``keyfleet-service-<instance>``."""

    signing_key: Path | None = None
    instance: str = "1"
    commit_request_timeout_seconds: int = 10
    online_window_seconds: int = 300


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

    @property
    def database_url_redacted(self) -> str:
        return redact_url(self.database_url)


# ---- the schema of the file --------------------------------------------------------------------

Checker = Callable[[str, Any, "_Reader"], Any]


@dataclass(frozen=True)
class _Key:
    check: Checker
    required: bool = True
    default: Any = None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Reader:
    """Walks the parsed TOML with the schema below, collecting problems instead of stopping."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.problems: list[ConfigProblem] = []

    def problem(self, key: str, value: str, expected: str) -> None:
        self.problems.append(ConfigProblem(key, value, expected))


def _string(key: str, value: Any, reader: _Reader) -> str | None:
    if not isinstance(value, str) or not value.strip():
        reader.problem(key, _show(value), "a non-empty string")
        return None
    return value


def _integer(low: int, high: int, unit: str = "") -> Checker:
    def check(key: str, value: Any, reader: _Reader) -> int | None:
        # bool is an int in Python; "true" for a port is a mistake, not 1
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            reader.problem(key, _show(value), f"an integer from {low} to {high}{unit}")
            return None
        return value

    return check


def _file(*, private: bool = False) -> Checker:
    def check(key: str, value: Any, reader: _Reader) -> Path | None:
        if not isinstance(value, str) or not value:
            reader.problem(key, _show(value), "a file path (string)")
            return None
        path = Path(value)
        if not path.is_absolute():
            path = reader.base / path
        try:
            info = path.stat()
        except OSError as exc:
            reader.problem(key, _show(value), f"an existing file ({path}: {exc.strerror})")
            return None
        if not stat.S_ISREG(info.st_mode):
            reader.problem(key, _show(value), f"a regular file ({path} is not one)")
            return None
        try:
            with open(path, "rb") as handle:
                handle.read(1)
        except OSError as exc:
            reader.problem(key, _show(value), f"a readable file ({path}: {exc.strerror})")
            return None
        if private and info.st_mode & 0o077:
            reader.problem(
                key,
                _show(value),
                f"a private key file readable only by its owner ({path} has mode "
                f"{stat.S_IMODE(info.st_mode):04o}; chmod 600 it)",
            )
            return None
        return path

    return check


def _database_url(key: str, value: Any, reader: _Reader) -> str | None:
    if not isinstance(value, str) or not value:
        reader.problem(key, "<not a string>", "a database URL string")
        return None
    try:
        url = make_url(value)
    except ArgumentError:
        reader.problem(
            key,
            "<unparsable>",
            "a database URL such as sqlite:///fleet.db or postgresql+psycopg://host/keyfleet",
        )
        return None
    backend = url.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        reader.problem(key, _show(redact_url(url)), "a sqlite:// or postgresql:// URL")
        return None
    if backend == "sqlite":
        if url.database in (None, "", ":memory:"):
            reader.problem(key, _show(value), "a SQLite file (an in-memory database is lost)")
            return None
        path = Path(url.database)
        if not path.is_absolute():
            path = reader.base / path
        if not path.parent.is_dir():
            reader.problem(
                key, _show(value), f"a SQLite file in an existing directory ({path.parent})"
            )
            return None
        return url.set(database=str(path)).render_as_string(hide_password=False)
    return value


def _boolean(key: str, value: Any, reader: _Reader) -> bool | None:
    if not isinstance(value, bool):
        reader.problem(key, _show(value), "true or false")
        return None
    return value


def _listen(key: str, value: Any, reader: _Reader) -> tuple[str, int] | None:
    expected = "HOST:PORT with a port from 1 to 65535, e.g. 127.0.0.1:8443 or [::1]:8443"
    if not isinstance(value, str):
        reader.problem(key, _show(value), expected)
        return None
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        reader.problem(key, _show(value), expected)
        return None
    return host, int(port)


SCHEMA: Mapping[str, Mapping[str, _Key]] = {
    "database": {"url": _Key(_database_url, required=False, default=DEFAULT_DATABASE_URL)},
    "broker": {
        "host": _Key(_string),
        "port": _Key(_integer(1, 65535), required=False, default=8883),
        "ca": _Key(_file()),
        "client_cert": _Key(_file()),
        "client_key": _Key(_file(private=True)),
    },
    "device_ca": {"cert": _Key(_file()), "key": _Key(_file(private=True))},
    "operator_ca": {"cert": _Key(_file())},
    "attestation": {
        "manufacturer_cas": _Key(_file()),
        "golden_measurements": _Key(_file()),
        "interval_seconds": _Key(_integer(10, 7 * 86400, " seconds"), False, 3600),
        "quarantine": _Key(_boolean, False, False),
    },
    "groups": {
        "commit_log_retention_epochs": _Key(_integer(1, 1_000_000, " epochs"), False, 64),
        "ack_timeout_seconds": _Key(_integer(1, 86400, " seconds"), False, 30),
    },
    "http": {
        "listen": _Key(_listen),
        "tls_cert": _Key(_file()),
        "tls_key": _Key(_file(private=True)),
        "station_ca": _Key(_file()),
    },
    "service": {
        "signing_key": _Key(_file(private=True), required=False),
        "instance": _Key(_string, required=False, default="1"),
        "commit_request_timeout_seconds": _Key(_integer(1, 3600, " seconds"), False, 10),
        "online_window_seconds": _Key(_integer(10, 7 * 86400, " seconds"), False, 300),
    },
}
OPTIONAL_SECTIONS = frozenset({"database", "groups", "http", "service"})


def _read_section(name: str, raw: Any, reader: _Reader, *, present: bool) -> dict[str, Any] | None:
    keys = SCHEMA[name]
    if not present:
        if name not in OPTIONAL_SECTIONS:
            reader.problem(f"[{name}]", "<missing>", f"a [{name}] table with {', '.join(keys)}")
            return None
        # An absent optional table means its defaults (its required keys apply only when the
        # table is given, e.g. [http] listen).
        return {
            key: (
                spec.check(f"{name}.{key}", spec.default, reader)
                if spec.check is _database_url
                else spec.default
            )
            for key, spec in keys.items()
        }
    if not isinstance(raw, dict):
        reader.problem(f"[{name}]", _show(raw), f"a table with {', '.join(keys)}")
        return None
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in keys:
            reader.problem(
                f"{name}.{key}", _show(value), f"one of the known keys: {', '.join(keys)}"
            )
    for key, spec in keys.items():
        dotted = f"{name}.{key}"
        if key in raw:
            values[key] = spec.check(dotted, raw[key], reader)
        elif spec.required:
            reader.problem(dotted, "<missing>", "this key to be set")
        elif spec.check is _database_url:
            values[key] = spec.check(dotted, spec.default, reader)
        else:
            values[key] = spec.default
    return values


def parse_config(data: Mapping[str, Any], *, path: Path, base: Path | None = None) -> ServiceConfig:
    """Validate parsed TOML; relative paths are resolved against ``base`` (the file's dir)."""
    reader = _Reader(base if base is not None else path.parent)
    for name, value in data.items():
        if name not in SCHEMA:
            reader.problem(
                f"[{name}]", _show(value), f"one of the known tables: {', '.join(SCHEMA)}"
            )
    sections = {
        name: _read_section(name, data.get(name), reader, present=name in data) for name in SCHEMA
    }
    if reader.problems:
        raise InvalidConfig(path, reader.problems)

    def section(name: str) -> dict[str, Any]:
        values = sections[name]
        if values is None:  # pragma: no cover - a missing table is a problem, raised above
            raise InternalError(f"config table [{name}] vanished after validation")
        return values

    http = section("http") if "http" in data else None
    return ServiceConfig(
        path=path,
        database_url=section("database")["url"],
        broker=BrokerConfig(**section("broker")),
        device_ca=DeviceCAConfig(**section("device_ca")),
        operator_ca_cert=section("operator_ca")["cert"],
        attestation=AttestationConfig(**section("attestation")),
        groups=GroupsConfig(**section("groups")),
        http=None
        if http is None
        else HttpConfig(
            host=http["listen"][0],
            port=http["listen"][1],
            tls_cert=http["tls_cert"],
            tls_key=http["tls_key"],
            station_ca=http["station_ca"],
        ),
        service=ServiceRuntimeConfig(**section("service")),
    )


def load_config(path: str | os.PathLike[str]) -> ServiceConfig:
    """Read and validate the service configuration at ``path``; raises ``ConfigError``
    (``InvalidConfig`` with every problem when the file parses but its content is wrong)."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the configuration file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: not UTF-8 text; expected a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    return parse_config(data, path=file, base=file.resolve().parent)
