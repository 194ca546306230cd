"""The virtual devices' identities on disk: per device under ``fleet.dir`` a software DevID key,
a software "AK" (SIMULATED: ``firmware_sim.fleet.credentials``), a DevID certificate from the
fleet device CA shaped like an enrolled device's (``provisioning.pki.issue_devid_cert``: CN =
device id, OU ``device``, SAN ``urn:keyfleet:device:<id>``, the AK-name extension naming the
software AK; also its MQTT client certificate) and an agent configuration file the agent's own
loader reads. New devices are registered directly in the registry
(``firmware_sim.fleet.registry``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from agent.fsio import atomic_write
from agent.protocol.errors import ConfigError
from firmware_sim.fleet.config import FleetConfig
from firmware_sim.fleet.credentials import SIMULATED_AK_FILE, SimulatedAK
from firmware_sim.fleet.registry import register_devices
from provisioning import pki

DEVICE_ROLE: Final = "device"
CERT_VALIDITY: Final = timedelta(days=365)


def _agent_toml(config: FleetConfig, device_id: str, directory: Path) -> str:
    def q(value: object) -> str:
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    insecure = "true" if config.insecure_software_keys else "false"
    operator = (
        ""
        if config.operator_ca_cert is None
        else f"operator_anchors = [{q(config.operator_ca_cert)}]\n"
        f"min_approvals = {config.min_approvals}\n"
    )
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
{operator}
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
    software "AK", a DevID certificate from the device CA (``issue_devid_cert`` with the AK's
    name; hardware serial ``sim-<index>``; also the MQTT client certificate) and an agent
    configuration each; register the new ones in the registry. Returns the agent configuration
    paths, in device order. A device made before it had an AK gets a new identity.

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
        ak_path = directory / SIMULATED_AK_FILE
        if not (cert_path.exists() and key_path.exists() and ak_path.exists()):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            key = pki.generate_key()
            ak = SimulatedAK.generate()
            cert = pki.issue_devid_cert(
                ca,
                key.public_key(),
                device_id=device_id,
                hardware_serial=f"sim-{index}",
                now=issued_at,
                valid_for=CERT_VALIDITY,
                ak_name=ak.name,
            )
            pki.write_private_key(key_path, key)
            ak.save(ak_path)
            pki.write_certificate(cert_path, cert)
        config_path = directory / "agent.toml"
        atomic_write(config_path, _agent_toml(config, device_id, directory).encode(), mode=0o644)
        certs[device_id] = cert_path.read_text()
        paths.append(config_path)
    register_devices(config.registry_url, config.id_prefix, certs, now=int(issued_at.timestamp()))
    return paths
