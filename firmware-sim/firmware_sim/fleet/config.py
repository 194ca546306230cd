"""The virtual fleet's configuration file (``firmware-sim fleet --config FILE``): its schema,
the loader that checks it and reports every problem at once, and the text tests and benchmarks
write. Where the broker, the service and the device CA are; where the devices live; which
registry they are written to; and whether software keys are allowed at all."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

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
from agent.protocol.errors import KeyfleetError
from provisioning import pki

_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass(frozen=True)
class FleetConfig:
    """``firmware-sim fleet --config FILE``: where the broker, the service and the device CA are.

    ``dir`` holds one directory per virtual device (software DevID key, DevID certificate, agent
    configuration); ``registry_url`` is the service's database (devices are registered there
    directly: a simulation bypass, see ``firmware_sim.fleet``).
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
    # the operator CA the devices trust for approvals of membership changes, and the approvals
    # a change needs before the operators sign a quorum policy (the service's [quorum])
    operator_ca_cert: Path | None = None
    min_approvals: int = 2

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
        "operator_ca": Field(
            Table(
                {
                    "cert": Field(
                        ReadableFile("a PEM CA certificate", parse=pem_certificates_problem),
                        required=True,
                    ),
                    "min_approvals": Field(Int(1, 16, "operators"), default=2),
                }
            ),
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
    ("operator_ca", "cert"),
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
        operator_ca_cert=None if checked["operator_ca"] is None else checked["operator_ca"]["cert"],
        min_approvals=2
        if checked["operator_ca"] is None
        else checked["operator_ca"]["min_approvals"],
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
    operator_ca_cert: str | None = "pki/operator-ca.pem",
    min_approvals: int = 1,
) -> str:
    """The text of a fleet configuration that runs with software keys (the flag the CLI also
    wants is the caller's business): what tests, benchmarks and docs/firmware-sim.md write.
    Relative paths are taken from the file's directory by :func:`load_fleet_config`."""
    operator = (
        ""
        if operator_ca_cert is None
        else f'[operator_ca]\ncert = "{operator_ca_cert}"\nmin_approvals = {min_approvals}\n\n'
    )
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

{operator}[registry]
url = "{registry_url}"

[simulation]
insecure_software_keys = true
"""
