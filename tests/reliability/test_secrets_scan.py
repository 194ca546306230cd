"""Issue 8, secrets scan: a whole installation (``firmware_sim.lab``: Mosquitto, ``keyfleet
serve`` on SQLite, three simulated devices with swtpm running ``keyagent``) goes through a
group's life - create, an app sealing a known secret and encrypting known data through the local
API, a rekey, a revocation, refused calls - and then every log, every exception text and every
file the agents, the service and the broker wrote is searched for every secret the test knows, in
raw, hex, HEX, base64 and base64url form (``secret_search``). None may appear.

Secrets known to the test: each agent's epoch secrets of every epoch it was snapshotted in (every
EpochSecrets field but the public epoch authenticator: init, joiner, welcome, epoch, exporter,
... secrets), its node private keys and data keys (MLS-Exporter outputs), also of pending
commits (``Lab.agent_secrets``), each agent's state-file key (unsealed through its TPM), the
app's sealed secret and its plaintext data, and every private key the test can read: each
device's MQTT TLS key, the service's key, the operators' keys and the device CA key.

Searched: everything under the lab's directory except what neither agents nor service write:
``pki/`` and ``manufacturer-ca/`` (the installer's CAs and the keys it hands out) and each
device's ``tpm/`` (the swtpm's own non-volatile memory: the inside of the TPM chip). The device
MQTT TLS client keys are software keys on disk on purpose (Python's ``ssl`` cannot use a TPM key
without tpm2-openssl and tpm2-abrmd, docs/provisioning.md; the TLS key only authenticates the
transport): exactly those files are left out, and the test checks they are the only files
holding a software private key (TPM key blobs, ``TSS2 PRIVATE KEY``, hold theirs wrapped by the
TPM). Plus the CLI's output of every operator command, and the texts of the errors the test
provoked (refused API calls, refused commands).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from agent.protocol.errors import ProtocolError
from agent.protocol.secret import Secret
from agent.staterotation import unseal_state_key
from agent.tpm.blob import KeyBlob
from agent.tpm.store import TPMStore
from firmware_sim.lab import CliResult, Lab, LabDevice
from provisioning import pki
from tests.reliability.secret_search import find, positive_control

pytestmark = [pytest.mark.e2e, pytest.mark.long]

LAB_OPTIONS = {
    "devices": 3,
    "ack_timeout": 20,
    "commit_request_timeout": 3,
    "log_level": "debug",  # the service at its most talkative (agents log at info)
}
G = "gs"
SOFTWARE_KEY = b"-----BEGIN PRIVATE KEY-----"
TPM_BLOB = b"-----BEGIN TSS2 PRIVATE KEY-----"


@pytest.fixture(scope="module")
def lab(fleet_lab: Lab) -> Lab:
    return fleet_lab


class Collected:
    """Secrets the test learns and texts it saw, as the run goes."""

    def __init__(self) -> None:
        self.secrets: dict[str, bytes] = {}
        self.texts: dict[str, bytes] = {}

    def secret(self, name: str, value: bytes) -> None:
        self.secrets.setdefault(name, bytes(value))

    def cli(self, label: str, result: CliResult) -> CliResult:
        self.texts[f"cli:{label}:stdout"] = result.stdout.encode()
        self.texts[f"cli:{label}:stderr"] = result.stderr.encode()
        return result

    def error(self, label: str, exc: BaseException) -> None:
        self.texts[f"exception:{label}"] = f"{type(exc).__name__}: {exc}".encode()

    def snapshot(self, lab: Lab, device: LabDevice, label: str, *, reboot: bool = True) -> None:
        """Stop the agent, take every group secret of its state and its state key (both through
        its TPM), boot it again."""
        lab.stop_agent(device)
        try:
            for n, secret in enumerate(lab.agent_secrets(device)):
                self.secret(f"{device.name}.{label}.agent[{n}]", secret.reveal())
            lab.flush_tpm(device)
            with TPMStore(device.tcti) as store:
                key: Secret = unseal_state_key(
                    store, KeyBlob.load(device.state_dir / "state-key.pem")
                )
            self.secret(f"{device.name}.state-key", key.reveal())
        finally:
            if reboot:
                lab.reboot(device)


def op(lab: Lab, seen: Collected, *args: str, operator: str = "op-ops") -> dict[str, Any]:
    result = seen.cli(" ".join(args), lab.op(*args, operator=operator, timeout=120))
    assert result.returncode == 0 and result.final is not None, str(result)
    assert result.final["status"] == "done", str(result)
    return result.final


def allow_sealing(lab: Lab, device: LabDevice) -> None:
    """The device image lets the lab's user seal and unseal (the lab allows data only)."""
    text = device.agent_config.read_text()
    text += f'\n[[api.rules]]\nuid = {os.getuid()}\noperations = ["seal", "unseal"]\n'
    device.agent_config.write_text(text)
    lab.reboot(device)


def test_no_known_secret_in_any_log_error_or_file_of_a_whole_run(lab: Lab, summary: Any) -> None:
    seen = Collected()
    d0, d1, d2 = lab.devices[:3]
    allow_sealing(lab, d0)
    op(lab, seen, "group", "create", G, "--members", *lab.device_ids)

    # an app seals a known secret and encrypts known data
    app_secret = os.urandom(32)
    plaintext = os.urandom(48)
    seen.secret("app.sealed-secret", app_secret)
    seen.secret("app.plaintext", plaintext)
    with d0.api() as api:
        api.seal("cloud-token", app_secret)
        assert api.unseal("cloud-token") == app_secret
        blob = api.encrypt(G, plaintext)
    with d1.api() as api:
        assert api.decrypt(G, blob) == plaintext
        with pytest.raises(ProtocolError) as refused:
            api.decrypt(G, blob[:-1] + bytes([blob[-1] ^ 1]))
        seen.error("decrypt tampered", refused.value)
        with pytest.raises(ProtocolError) as refused:
            api.unseal("cloud-token")  # not allowed for apps on d1
        seen.error("unseal on d1", refused.value)
    with d0.api() as api, pytest.raises(ProtocolError) as refused:
        api.unseal("no-such-secret")
    seen.error("unseal unknown", refused.value)

    op(lab, seen, "rekey", "--group", G)
    for device in (d0, d1, d2):
        seen.snapshot(lab, device, "after-rekey")
    viewer = seen.cli("viewer rekey", lab.op("rekey", "--group", G, operator="op-view"))
    assert viewer.returncode == 1, str(viewer)
    op(lab, seen, "revoke", d2.id, "--reason", "secrets scan", operator="op-admin")
    with d1.api() as api:
        blob2 = api.encrypt(G, plaintext)
    with d2.api() as api, pytest.raises(ProtocolError) as refused:
        api.decrypt(G, blob2)
    seen.error("revoked decrypt", refused.value)
    for device in (d0, d1, d2):
        seen.snapshot(lab, device, "final", reboot=False)

    # private keys the test can read
    assert lab.pki is not None
    tls_keys = {}
    for device in (d0, d1, d2):
        path = device.state_dir / "identity" / "tls.key"
        tls_keys[path] = device
        seen.secret(f"{device.name}.tls-key", scalar(path))
    seen.secret("service.key", scalar(lab.pki.service.key))
    assert lab.pki.device_ca_key is not None  # this lab keeps its keys in files
    seen.secret("device-ca.key", scalar(lab.pki.device_ca_key))
    seen.secret("service-signing.key", scalar(Path(lab.pki.signing_key_ref)))
    for name, identity in lab.pki.operators.items():
        seen.secret(f"{name}.key", scalar(identity.key))

    # what agents, service and broker wrote
    haystacks: dict[str, bytes] = {}
    excluded: list[str] = []
    software_keys: set[Path] = set()
    for path in sorted(lab.workdir.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(lab.workdir)
        parts = relative.parts
        if parts[0] in ("pki", "manufacturer-ca") or (parts[0] == "devices" and "tpm" in parts):
            excluded.append(str(relative))
            continue
        data = path.read_bytes()
        if SOFTWARE_KEY in data:
            software_keys.add(path)
        if path in tls_keys:
            excluded.append(str(relative))
            continue
        haystacks[str(relative)] = data
    assert software_keys == set(tls_keys), sorted(map(str, software_keys))
    haystacks.update(seen.texts)
    assert any(TPM_BLOB in data for data in haystacks.values())
    assert b"accepted the commit" in haystacks["logs/service.log"]
    assert any(name.endswith("agent.state") for name in haystacks)
    for log in ("logs/service.log", "logs/keyfleet-cli.log", "broker/mosquitto.log"):
        assert haystacks.get(log), f"{log} is missing or empty"
    for device in (d0, d1, d2):
        assert haystacks.get(str(device.agent_log.relative_to(lab.workdir))), device.name

    for secret in list(seen.secrets.values())[:5]:
        positive_control(secret)
    # control: the TLS keys are found in their own files (the search sees real files)
    own = find(
        {"d0.tls-key": seen.secrets["d0.tls-key"]},
        {"tls.key": (d0.state_dir / "identity" / "tls.key").read_bytes()},
    )
    assert own, "the search does not find a key in its own PEM file"
    found = find(seen.secrets, haystacks)
    assert found == [], found
    summary.record(
        "secrets_scan",
        {
            "secrets": len(seen.secrets),
            "encodings_per_secret": 9,
            "haystacks": len(haystacks),
            "haystack_bytes": sum(len(v) for v in haystacks.values()),
            "excluded_files": len(excluded),
            "software_key_files": len(software_keys),
            "found": len(found),
        },
    )


def scalar(path: Path) -> bytes:
    key = pki.key_from_pem(path.read_bytes())
    return key.private_numbers().private_value.to_bytes(32, "big")
