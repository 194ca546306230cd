"""TPM residency of group leaf keys on a real swtpm: the agent's key provider
(agent.daemon.TpmKeys.prove_leaf) certifies a leaf key with the enrolled AK, the pure check
(agent.protocol.credentials.verify_tpm_residency) accepts it under the AK name a DevID
certificate carries, and refuses each forgery with its check id."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.daemon import TpmKeys
from agent.protocol.attest import Attestation, tpm_name
from agent.protocol.credentials import (
    CredentialVerifier,
    leaf_qualifying_data,
    tpm_proof_from_certify,
    verify_tpm_residency,
)
from agent.protocol.errors import CryptoError, ProtocolError
from agent.protocol.hpke import serialize_public_key
from agent.tpm import KeyBlob, KeyKind, TPMKey, TPMStore
from firmware_sim.fleet.credentials import SimulatedAK, simulated_public_area
from provisioning import pki
from tests.fixtures.swtpm import SwtpmFactory

pytestmark = pytest.mark.tpm

T0 = datetime(2026, 6, 1, tzinfo=UTC)


@dataclass
class Device:
    store: TPMStore
    keys: TpmKeys
    devid: TPMKey
    ak_path: Path

    @property
    def ak_public(self) -> bytes:
        return KeyBlob.load(self.ak_path).public

    @property
    def ak_name(self) -> bytes:
        return tpm_name(self.ak_public)


@pytest.fixture
def devices(swtpm_factory: SwtpmFactory, tmp_path: Path) -> Iterator[list[Device]]:
    """Two devices, each with its own TPM (the second manufactured fresh), an AK blob on disk as
    enrollment leaves it, a DevID key and the agent's TPM key provider."""
    made: list[Device] = []
    try:
        for index, fresh in enumerate((False, True)):
            store = TPMStore(swtpm_factory.start(fresh=fresh).tcti)
            base = tmp_path / f"device{index}"
            base.mkdir()
            ak_blob = store.create_key(KeyKind.AK)
            ak_blob.save(base / "ak.pem")
            devid = store.create_and_load(KeyKind.DEVID)
            keys = TpmKeys(store, devid, base / "leaves", ak_blob=base / "ak.pem")
            made.append(Device(store, keys, devid, base / "ak.pem"))
        yield made
    finally:
        for device in made:
            device.keys.collect(set())
            device.devid.close()
            device.store.close()


def new_leaf(device: Device) -> tuple[bytes, bytes]:
    """A fresh TPM leaf key of ``device``: its SEC1 point and the key provider's proof."""
    leaf = device.keys.new_leaf_key()
    point = serialize_public_key(leaf.public_key())
    proof = device.keys.prove_leaf(point)
    assert proof is not None
    return point, proof


def refused(proof: bytes, point: bytes, ak_name: bytes) -> str:
    with pytest.raises(ProtocolError) as exc:
        verify_tpm_residency(proof, point, ak_name)
    return exc.value.check


def test_tpm_leaf_proof_verifies_under_the_devid_certificates_ak_name(
    devices: list[Device],
) -> None:
    device = devices[0]
    leaf = device.keys.new_leaf_key()
    point = serialize_public_key(leaf.public_key())
    loaded = device.store.transient_handles()
    before = device.store.commands_issued
    proof = device.keys.prove_leaf(point)
    # SRK, load AK, flush SRK, certify, flush AK, plus swaps on a bare TPM's three slots
    assert device.store.commands_issued - before <= 8
    assert proof is not None
    # the AK was loaded for the one TPM2_Certify and flushed right after
    # (to make room the store may have swapped another key out: fewer handles, never more)
    assert len(device.store.transient_handles()) <= len(loaded)
    ca = pki.create_ca("device CA", now=T0, valid_for=timedelta(days=30))
    cert = pki.issue_devid_cert(
        ca,
        device.devid.public_key(),
        device_id="dev-tpm-1",
        hardware_serial="SN-TPM-1",
        now=T0,
        valid_for=timedelta(days=1),
        ak_name=device.ak_name,
    )
    verified = CredentialVerifier([ca.certificate]).verify(
        cert.public_bytes(serialization.Encoding.DER), int(T0.timestamp()) + 60
    )
    assert verified.device_id == "dev-tpm-1"
    assert verified.ak_name == device.ak_name
    assert verified.signature_key == serialize_public_key(device.devid.public_key())
    assert verified.ak_name is not None
    verify_tpm_residency(proof, point, verified.ak_name)


def test_software_key_proofs_are_refused(devices: list[Device]) -> None:
    device = devices[0]
    software_leaf = ec.generate_private_key(ec.SECP256R1())
    point = serialize_public_key(software_leaf.public_key())
    # a software "AK" certifies the software leaf (what the virtual fleet simulates): its AK is
    # not the one the device's certificate names
    fake = SimulatedAK.generate()
    assert refused(fake.prove_leaf(software_leaf.public_key()), point, device.ak_name) == (
        "tpm.proof.ak"
    )
    # the same, presenting the device's real AK public area: the signature is not the AK's
    leaf_area = simulated_public_area(KeyKind.LEAF, software_leaf.public_key())
    attestation = fake.certify(leaf_area, leaf_qualifying_data(point))
    forged = tpm_proof_from_certify(device.ak_public, leaf_area, attestation)
    with pytest.raises(CryptoError) as bad_signature:
        verify_tpm_residency(forged, point, device.ak_name)
    assert bad_signature.value.check == "tpm.proof.signature"
    # the device's own TPM DevID key (unrestricted: it signs anything) signs a hand-made
    # TPMS_ATTEST for the software leaf: not the AK, and not a restricted signing key
    signed_by_devid = Attestation(
        attestation.attest, device.devid.sign(attestation.attest, ec.ECDSA(hashes.SHA256()))
    )
    by_devid = tpm_proof_from_certify(device.devid.public_area, leaf_area, signed_by_devid)
    assert refused(by_devid, point, device.ak_name) == "tpm.proof.ak"


def test_another_devices_ak_is_refused(devices: list[Device]) -> None:
    mine, theirs = devices
    point, proof = new_leaf(theirs)
    verify_tpm_residency(proof, point, theirs.ak_name)
    assert refused(proof, point, mine.ak_name) == "tpm.proof.ak"


def test_proof_for_another_leaf_is_refused(devices: list[Device]) -> None:
    device = devices[0]
    point, proof = new_leaf(device)
    other_point, other_proof = new_leaf(device)
    verify_tpm_residency(other_proof, other_point, device.ak_name)
    assert refused(proof, other_point, device.ak_name) == "tpm.proof.key"
    assert refused(other_proof, point, device.ak_name) == "tpm.proof.key"


def test_signing_key_is_refused(devices: list[Device]) -> None:
    device = devices[0]
    point = serialize_public_key(device.devid.public_key())
    # the enrolled AK certifies the DevID honestly, over SHA-256 of the DevID's own point
    with device.store.load_key(KeyBlob.load(device.ak_path)) as ak:
        attestation = device.store.certify(ak, device.devid, leaf_qualifying_data(point))
    proof = tpm_proof_from_certify(device.ak_public, device.devid.public_area, attestation)
    assert refused(proof, point, device.ak_name) == "tpm.proof.attributes"
