"""The service with its keys in a real PKCS#11 token (SoftHSM2): ``keyfleet serve`` signs with a
token key and its enrollment API issues DevID certificates with a token device CA key, a swtpm
device enrolls through a station, an operator's command gets an answer signed in the token, and
an operator's ``audit sync`` checks an audit checkpoint signed by the token's checkpoint key
against its pinned public key; then the acceptance check of the token part: the service's state
directory and its database (the SQLite file with its log, or every value of every PostgreSQL
table) hold no private key of the fleet (the only private keys on disk are the TLS keys that
the TLS stack reads, and the operator's and station's own keys, which are not the service's).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.factory import FactoryDevice
from agent.protocol.wire.cose import key_id
from firmware_sim.softhsm import SoftToken
from provisioning import pki
from provisioning.checkpoint import verify_checkpoint
from provisioning.enroll import DeviceIdentity
from provisioning.station import FleetClient
from tests.fixtures.deployment import DeployFactory
from tests.fixtures.postgres import dump_rows
from tests.fixtures.swtpm import ManufacturerCA, SwtpmFactory
from tests.tpm.test_enroll import (
    STATION,
    activate,
    device_start_request,
    factory_device,
    make_pki,
)

pytestmark = pytest.mark.e2e
DATABASE_BACKENDS = ("sqlite", "postgresql")

HTTPS = """tls_cert = "pki/server.pem"
tls_key = "pki/server.key"
station_ca = "pki/station-ca.pem"
"""
_PEM_PRIVATE = re.compile(
    rb"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.*?-----END \1PRIVATE KEY-----", re.S
)
# DER openings of an EC private key: SEC1 ECPrivateKey (version 1, 32-byte scalar) and PKCS#8
# PrivateKeyInfo (version 0, algorithm id-ecPublicKey): what a key written raw into a file or a
# database column starts with.
_DER_OPENINGS = {
    "sec1": bytes.fromhex("0201010420"),
    "pkcs8": bytes.fromhex("020100301306072a8648ce3d0201"),
}


def key_material(data: bytes) -> list[str]:
    """What in ``data`` looks like private key material: PEM private key blocks, and the DER
    openings above raw, in hex and in base64 (three alignments)."""
    found = [m.group(0).split(b"\n")[0].decode() for m in _PEM_PRIVATE.finditer(data)]
    for name, opening in _DER_OPENINGS.items():
        needles = {
            "raw": opening,
            "hex": opening.hex().encode(),
            "HEX": opening.hex().upper().encode(),
        }
        for shift in range(3):
            text = base64.b64encode(bytes(shift) + opening).rstrip(b"=")
            needles[f"base64+{shift}"] = text[-(-8 * shift // 6) : -2]
        found += [f"{name} ({how})" for how, needle in needles.items() if needle in data]
    return found


@pytest.fixture
def device(swtpm_factory: SwtpmFactory, tmp_path: Path) -> Iterator[FactoryDevice]:
    with factory_device(swtpm_factory, tmp_path / "device", "SN-TOKEN-1") as device:
        yield device


def test_service_keys_in_a_token_and_none_on_disk(  # noqa: PLR0917 - pytest fixtures
    tmp_path: Path,
    deploy: DeployFactory,
    manufacturer_ca: ManufacturerCA,
    softhsm_token: SoftToken,
    device: FactoryDevice,
    database_url: str,
) -> None:
    fleet_pki = make_pki(tmp_path / "pki")
    deployment = deploy(
        "token",
        db_url=database_url,
        operator=("op-admin", "admin"),
        station=(STATION, fleet_pki.station_cert_path),
        http=HTTPS,
        ready=b"keyfleet serve: ready",
        operator_ca=fleet_pki.operator_ca,
        manufacturer_cas=[manufacturer_ca.root_cert(), manufacturer_ca.issuer_cert()],
        token=softhsm_token,
        audit_checkpoint=True,
    )
    assert deployment.pki.checkpoint_pub is not None
    checkpoint_public = serialization.load_pem_public_key(
        deployment.pki.checkpoint_pub.read_bytes()
    )
    assert isinstance(checkpoint_public, ec.EllipticCurvePublicKey)
    log = deployment.logs["a"].read_text()
    assert "service signing kid" in log and f"token '{softhsm_token.label}'" in log
    # the audit checkpoint key: named by its token location, not a file
    (checkpoint_line,) = [line for line in log.splitlines() if "audit checkpoint kid" in line]
    assert key_id(checkpoint_public).hex() in checkpoint_line, checkpoint_line
    assert f"token '{softhsm_token.label}'" in checkpoint_line, checkpoint_line
    assert "key 'audit-checkpoint'" in checkpoint_line, checkpoint_line
    assert "custody.file" not in log  # no fleet key of this service is a file
    device_ca_cert = deployment.pki.device_ca.certificate
    signing_cert = pki.cert_from_pem(deployment.pki.signing_cert.read_bytes())

    # enrollment: the DevID certificate is signed in the token by the device CA key, and the
    # device is told the signing certificate (not the service's TLS certificate)
    client = FleetClient(
        f"https://127.0.0.1:{deployment.http_ports['a']}",
        cert=fleet_pki.station_cert_path,
        key=fleet_pki.station_key_path,
        ca=fleet_pki.server_ca_path,
    )
    request, _ = device_start_request(device, groups=("line",))
    started = client.start(request)
    identity: DeviceIdentity = client.finish(started.session, activate(device, started).reveal())
    identity.devid_cert.verify_directly_issued_by(device_ca_cert)
    identity.tls_cert.verify_directly_issued_by(device_ca_cert)
    assert identity.service_cert == signing_cert
    tls_cert = x509.load_pem_x509_certificate(deployment.pki.service.cert_file.read_bytes())
    assert identity.service_cert.public_key() != tls_cert.public_key()
    device.handle("install", identity.to_map())

    # an operator command: the CLI checks the service's signed answer with the signing cert
    listed = deployment.cli("requests")
    assert listed.returncode == 0, listed.stdout + listed.stderr

    # an operator syncs the audit log: the checkpoint, signed in the token, verifies under the
    # pinned checkpoint public key (and the whole log from the start rehashes to its head)
    synced = deployment.cli(
        "audit", "sync", "--checkpoint-cert", str(deployment.pki.checkpoint_pub),
        "--state-dir", str(tmp_path / "operator-state"), "--json", "--timeout", "60",
    )  # fmt: skip
    assert synced.returncode == 0, synced.stdout + synced.stderr
    record = json.loads(synced.stdout)
    checkpoint = verify_checkpoint(base64.b64decode(record["signed"]), checkpoint_public)
    assert checkpoint.checkpoint.count == record["count"] > 0

    # ---- the acceptance scan: no fleet private key in the service's directory or database ----
    fleet_public = {
        "device CA": device_ca_cert.public_key(),
        "service signing": signing_cert.public_key(),
        "audit checkpoint": checkpoint_public,
    }
    # the private keys that may be files: the service's TLS keys (read by the TLS stack) and
    # the keys of other parties the test keeps in the same directory
    tls_and_others = {
        deployment.pki.service.key_file.resolve(),
        fleet_pki.server_key_path.resolve(),
        fleet_pki.station_key_path.resolve(),
        (deployment.pki.files / "op.key").resolve(),
    }
    token_store = softhsm_token.directory / "tokens"
    scanned = 0
    for path in sorted(tmp_path.rglob("*")):
        if not path.is_file() or path.is_relative_to(tmp_path / "device"):
            continue  # the device's own TPM and state are not the service's
        data = path.read_bytes()
        scanned += 1
        found = key_material(data)
        if path.resolve() in tls_and_others:
            key = serialization.load_pem_private_key(data, None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            assert key.public_key() not in fleet_public.values(), path
            continue
        if path.is_relative_to(token_store):
            # the token's own store: SoftHSM2 keeps private objects encrypted under the PIN
            assert not found, f"{path}: {found}"
            continue
        assert not found, f"private key material in {path.relative_to(tmp_path)}: {found}"
    # the database: the SQLite file as it is on disk, or every value of every PostgreSQL table
    if database_url.startswith("sqlite"):
        # with its write-ahead log, where the latest rows are until a checkpoint
        stored = b"".join(p.read_bytes() for p in sorted(tmp_path.glob("fleet.db*")))
    else:
        stored = dump_rows(database_url)
    assert identity.device_id.encode() in stored  # the scan sees the enrolled device's rows
    assert key_material(stored) == []
    assert scanned > 20  # the scan saw the deployment (configs, logs, database, certificates)

    # the scan is not blind: the same scan finds a fleet key written as a file
    leaked = tmp_path / "leak.bin"
    leaked.write_bytes(
        pki.generate_key().private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    assert key_material(leaked.read_bytes())
    assert key_material(base64.b64encode(b"x" + leaked.read_bytes()))
