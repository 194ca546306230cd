"""Factory mode against a real swtpm: identity, key creation, certify, credential activation,
install (the agent's own loader accepts the written config) and lock; served on a real pty."""

from __future__ import annotations

import os
import select
import threading
import tty
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from agent.config import load_config
from agent.factory import FactoryDevice, run_factory_console, serve_factory_on_pty
from agent.protocol.attest import (
    Attestation,
    ek_public_key_from_area,
    public_key_from_area,
    tpm_name,
    verify_certify,
)
from agent.protocol.errors import ProtocolError, TPMError
from agent.serial_link import SerialClient
from agent.tpm.store import TPMStore
from provisioning.makecredential import make_credential
from provisioning.pki import create_ca, generate_key, issue_client_cert
from tests.fixtures.swtpm import Swtpm

pytestmark = pytest.mark.tpm

NOW = datetime.now(UTC)
DER = serialization.Encoding.DER


@pytest.fixture
def store(swtpm: Swtpm) -> Any:
    with TPMStore(swtpm.tcti) as tpm:
        yield tpm


@pytest.fixture
def device(store: TPMStore, tmp_path: Path) -> FactoryDevice:
    return FactoryDevice(store, tmp_path / "state", serial="SN-0001", firmware_versions={"fw": "1"})


def _install_args(device: FactoryDevice, keys: dict[str, Any], device_id: str) -> dict[str, Any]:
    ca = create_ca("fleet-device-ca", now=NOW, valid_for=timedelta(days=30))
    devid_cert = issue_client_cert(
        ca,
        public_key_from_area(keys["devid_public"]),
        identity=device_id,
        role="device",
        now=NOW,
        valid_for=timedelta(days=10),
    )
    tls_cert = issue_client_cert(
        ca,
        serialization.load_der_public_key(keys["tls_public"]),
        identity=device_id,
        role="device",
        now=NOW,
        valid_for=timedelta(days=10),
    )
    broker_ca = create_ca("broker-ca", now=NOW, valid_for=timedelta(days=30))
    operator_ca = create_ca("operator-ca", now=NOW, valid_for=timedelta(days=30))
    service = issue_client_cert(
        ca,
        generate_key().public_key(),
        identity="keyfleet-service",
        now=NOW,
        valid_for=timedelta(days=10),
    )
    return {
        "device_id": device_id,
        "devid_cert": devid_cert.public_bytes(DER),
        "tls_cert": tls_cert.public_bytes(DER),
        "trust_anchors": [ca.certificate.public_bytes(DER)],
        "operator_anchors": [operator_ca.certificate.public_bytes(DER)],
        "min_approvals": 2,
        "broker": {
            "host": "127.0.0.1",
            "port": 8883,
            "ca": [broker_ca.certificate.public_bytes(DER)],
        },
        "service_cert": service.public_bytes(DER),
        "groups": ["sensors"],
    }


def test_identity_reports_ek_certificates_pcrs_and_serial(
    device: FactoryDevice, store: TPMStore, manufacturer_ca: Any
) -> None:
    ident = device.handle("identity", {})
    assert ident["serial"] == "SN-0001" and ident["locked"] is False
    assert set(ident["ek"]) == {"rsa", "ecc"}
    rsa_cert = x509.load_der_x509_certificate(ident["ek"]["rsa"]["cert"])
    assert rsa_cert.issuer == manufacturer_ca.issuer_cert().subject
    ek_key = ek_public_key_from_area(ident["ek"]["rsa"]["public"])
    assert isinstance(ek_key, rsa.RSAPublicKey)
    assert ek_key.public_numbers() == rsa_cert.public_key().public_numbers()  # type: ignore[union-attr]
    assert sorted(ident["pcrs"]) == list(range(8))
    assert ident["pcrs"] == store.pcr_read(range(8))
    assert ident["firmware"] == {"fw": "1"}


def test_create_keys_certify_and_activate(device: FactoryDevice, store: TPMStore) -> None:
    keys = device.handle("create-keys", {})
    assert set(keys) == {"ak_public", "devid_public", "leaf_public", "tls_public"}
    for name in ("ak.tss", "devid.tss", "leaf.tss"):
        path = device.paths.keys / name
        assert path.read_bytes().startswith(b"-----BEGIN TSS2 PRIVATE KEY-----")
        assert path.stat().st_mode & 0o777 == 0o600
    assert device.paths.tls_key.stat().st_mode & 0o777 == 0o600

    nonce = os.urandom(32)
    cert = device.handle("certify", {"qualifying_data": nonce})
    info = verify_certify(
        Attestation(cert["attest"], cert["signature"]),
        public_key_from_area(keys["ak_public"]),
        nonce,
        keys["devid_public"],
    )
    assert info.name == tpm_name(keys["devid_public"])

    ek = ek_public_key_from_area(store.ek_public_area("rsa"))
    secret = os.urandom(32)
    blob, encrypted = make_credential(ek, tpm_name(keys["ak_public"]), secret)
    answer = device.handle(
        "activate-credential", {"credential_blob": blob, "encrypted_secret": encrypted}
    )
    assert answer == {"secret": secret}

    # made for another AK name: the TPM refuses, the device reports it as a refusal
    blob, encrypted = make_credential(ek, tpm_name(keys["devid_public"]), secret)
    with pytest.raises(TPMError, match="credential was not made for this TPM"):
        device.handle(
            "activate-credential", {"credential_blob": blob, "encrypted_secret": encrypted}
        )


def test_install_writes_a_loadable_agent_config_then_lock_refuses_everything(
    device: FactoryDevice,
) -> None:
    with pytest.raises(ProtocolError) as err:
        device.handle("lock", {})
    assert err.value.check == "factory.lock.not-installed"
    keys = device.handle("create-keys", {})
    result = device.handle("install", _install_args(device, keys, "dev-00aa"))
    config = load_config(result["config"], require_provisioned=True)
    assert config.identity is not None and config.identity.device_id == "dev-00aa"
    assert config.broker is not None and config.broker.host == "127.0.0.1"
    assert (device.paths.identity / "groups.json").read_text() == '{"groups": ["sensors"]}'

    assert device.handle("lock", {}) == {"device_id": "dev-00aa"}
    for op, args in (
        ("create-keys", {}),
        ("certify", {"qualifying_data": b"x"}),
        ("activate-credential", {"credential_blob": b"x", "encrypted_secret": b"y"}),
        ("install", {}),
        ("lock", {}),
    ):
        with pytest.raises(ProtocolError) as err:
            device.handle(op, args)
        assert err.value.check == "factory.locked"
    ident = device.handle("identity", {})
    assert ident["locked"] is True and ident["device_id"] == "dev-00aa"
    # the lock survives a restart of the factory code (it is a file in the state dir)
    again = FactoryDevice(device._store, device.paths.state_dir, serial="SN-0001")
    with pytest.raises(ProtocolError, match="locked"):
        again.handle("create-keys", {})


def test_install_writes_the_renewal_url_the_fleet_offers(device: FactoryDevice) -> None:
    keys = device.handle("create-keys", {})
    args = _install_args(device, keys, "dev-00cc")
    for bad in ("http://fleet.example.net:8445", "https://", "x" * 300, 8445):
        with pytest.raises(ProtocolError) as err:
            device.handle("install", {**args, "renewal_url": bad})
        assert err.value.check == "factory.args"
        assert not device.paths.config.exists()
    result = device.handle("install", {**args, "renewal_url": "https://fleet.example.net:8445/"})
    config = load_config(result["config"], require_provisioned=True)
    assert config.renewal.url == "https://fleet.example.net:8445" and config.renewal.ca is None
    # without one (the fleet refuses renewal after expiry), none is written
    device.handle("install", args)
    assert load_config(device.paths.config, require_provisioned=True).renewal.url is None


def test_install_refuses_certificates_for_other_keys(device: FactoryDevice) -> None:
    keys = device.handle("create-keys", {})
    args = _install_args(device, keys, "dev-00bb")
    other = device.handle("create-keys", {})  # new keys: the certificates no longer fit
    assert other["devid_public"] != keys["devid_public"]
    with pytest.raises(ProtocolError) as err:
        device.handle("install", args)
    assert err.value.check == "factory.install.devid"
    assert not device.paths.config.exists()
    args = _install_args(device, other, "dev-00bb")
    args["tls_cert"] = _install_args(device, keys, "dev-00bb")["tls_cert"]
    with pytest.raises(ProtocolError) as err:
        device.handle("install", args)
    assert err.value.check == "factory.install.tls"


@pytest.mark.parametrize(
    ("op", "args", "check"),
    [
        ("reboot", {}, "factory.op"),
        ("identity", {"x": 1}, "factory.args"),
        ("certify", {"qualifying_data": b"x" * 65}, "factory.args"),
        ("certify", {"qualifying_data": b"x"}, "factory.keys.missing"),
        ("activate-credential", {"credential_blob": b"x"}, "factory.args"),
    ],
)
def test_malformed_requests_are_refused(
    device: FactoryDevice, op: str, args: dict[str, Any], check: str
) -> None:
    with pytest.raises(ProtocolError) as err:
        device.handle(op, args)
    assert err.value.check == check


def test_factory_console_on_a_pty(store: TPMStore, tmp_path: Path) -> None:
    path, console = serve_factory_on_pty(store, tmp_path / "state", serial_number="SN-PTY")
    with console:
        assert os.path.exists(path)
        client = SerialClient.open(path, timeout=2.0, retries=1)
        try:
            assert client.call("identity")["serial"] == "SN-PTY"
            keys = client.call("create-keys", timeout=10)
            assert len(keys["ak_public"]) > 80
            with pytest.raises(ProtocolError) as err:
                client.call("lock")
            assert err.value.check == "factory.lock.not-installed"
        finally:
            client.close()


class MasterPort:
    """The station's end of a pty whose slave the device opened: raw reads/writes on the master
    fd with a timeout, shaped like the pyserial calls SerialClient makes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.timeout: float | None = 0.05

    def read(self, size: int = 1) -> bytes:
        ready, _, _ = select.select([self.fd], [], [], self.timeout)
        return os.read(self.fd, size) if ready else b""

    def write(self, data: bytes, /) -> int:
        return os.write(self.fd, data)

    def flush(self) -> None:
        return None


def test_run_factory_console_serves_a_serial_port_path(store: TPMStore, tmp_path: Path) -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    stop = threading.Event()
    thread = threading.Thread(
        target=run_factory_console,
        args=(os.ttyname(slave), store, tmp_path / "state"),
        kwargs={"stop": stop},
        daemon=True,
    )
    thread.start()
    try:
        client = SerialClient(MasterPort(master), timeout=2.0, retries=2)
        ident = client.call("identity")
        # no serial configured: the EK certificate's serial number stands in
        ek = x509.load_der_x509_certificate(ident["ek"]["rsa"]["cert"])
        assert ident["serial"] == f"ek-{ek.serial_number:x}"
    finally:
        stop.set()
        thread.join(timeout=5)
        os.close(master)
        os.close(slave)
    assert not thread.is_alive()
