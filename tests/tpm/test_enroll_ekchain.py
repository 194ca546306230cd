"""EK chains at enrollment on a real swtpm (provisioning.ekchain through provisioning.enroll):
the simulator's own manufacturer chain (root, EK-issuing intermediate) is path-validated to the
root; a vendor PKI with an intermediate certifies the real TPM's EK and enrolls; the same EK on a
CRL the operator imported does not (``ek.revoked``), audited, nothing registered."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy.orm import Session, sessionmaker

from agent.factory import FactoryDevice
from provisioning.ekchain import ManufacturerTrust, crls_to_pem
from provisioning.ekcrls import import_crl
from provisioning.enroll import Enrollment, FinishRequest
from tests.ek_manufacturer import crl, ek_certificate, make_ca
from tests.fixtures.swtpm import ManufacturerCA, SwtpmFactory
from tests.tpm.test_enroll import (
    NOW,
    STATION,
    WHEN,
    FleetPKI,
    _refused,
    activate,
    audit_trail,
    device_start_request,
    devices_in,
    factory_device,
    make_pki,
    make_registry,
    make_settings,
)

pytestmark = pytest.mark.tpm


@pytest.fixture
def pki(tmp_path: Path) -> FleetPKI:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def sessions(tmp_path: Path, pki: FleetPKI) -> sessionmaker[Session]:
    return make_registry(tmp_path / "fleet.db", pki)


@pytest.fixture
def device(swtpm_factory: SwtpmFactory, tmp_path: Path) -> Iterator[FactoryDevice]:
    with factory_device(swtpm_factory, tmp_path / "device", "SN-EK1") as made:
        yield made


def test_the_simulators_ek_chain_validates_through_its_intermediate(
    device: FactoryDevice,
    manufacturer_ca: ManufacturerCA,
    pki: FleetPKI,
    sessions: sessionmaker[Session],
) -> None:
    request, _ = device_start_request(device)
    ek = x509.load_der_x509_certificate(request.ek_cert)
    trust = ManufacturerTrust([manufacturer_ca.root_cert(), manufacturer_ca.issuer_cert()])
    chain = trust.verify(ek, now=WHEN)
    assert [c.subject for c in chain[1:]] == [
        manufacturer_ca.issuer_cert().subject,
        manufacturer_ca.root_cert().subject,
    ]
    # the root alone does not do: the EK is issued by the intermediate
    root_only = Enrollment(
        make_settings(pki, manufacturer_ca, manufacturer_cas=(manufacturer_ca.root_cert(),)),
        sessions,
    )
    _refused("enroll.ek.chain", root_only.start, STATION, request, now=NOW)
    enrollment = Enrollment(make_settings(pki, manufacturer_ca), sessions)
    started = enrollment.start(STATION, request, now=NOW)
    enrollment.finish(STATION, FinishRequest(started.session, activate(device, started)), now=NOW)
    assert devices_in(sessions) == [started.device_id]


def test_an_ek_through_a_vendor_intermediate_enrolls_and_not_once_on_an_imported_crl(
    device: FactoryDevice,
    manufacturer_ca: ManufacturerCA,
    pki: FleetPKI,
    sessions: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    """The real TPM's RSA EK, certified by a vendor's EK-issuing intermediate under its root
    (TCG profile: empty subject, critical SAN, keyEncipherment). Put on that intermediate's CRL
    with ``import_crl`` (what ``keyfleet pki import-crl`` runs), it is refused with
    ``ek.revoked``; without the CRL the same request enrolls."""
    root = make_ca("Vendor EK Root", WHEN)
    issuing = make_ca("Vendor EK Issuing CA 07", WHEN, parent=root)
    request, _ = device_start_request(device)
    tpm_key = x509.load_der_x509_certificate(request.ek_cert).public_key()
    assert isinstance(tpm_key, rsa.RSAPublicKey)
    ek = ek_certificate(issuing, WHEN, public_key=tpm_key)
    request = replace(request, ek_cert=ek.public_bytes(serialization.Encoding.DER))
    bundle = (root.cert, issuing.cert)

    crl_file = tmp_path / "manufacturer-crls.pem"
    revoking = crls_to_pem([crl(issuing, WHEN, revoked=(ek.serial_number,))])
    import_crl(bundle, crl_file, revoking, now=WHEN)
    guarded = Enrollment(
        make_settings(pki, manufacturer_ca, manufacturer_cas=bundle, manufacturer_crls=crl_file),
        sessions,
    )
    refusal = _refused("ek.revoked", guarded.start, STATION, request, now=NOW)
    assert f"{ek.serial_number:x}" in refusal.reason
    assert audit_trail(sessions)[-1][:2] == ("enroll.start", "refused")
    assert devices_in(sessions) == []

    open_enrollment = Enrollment(
        make_settings(pki, manufacturer_ca, manufacturer_cas=bundle), sessions
    )
    started = open_enrollment.start(STATION, request, now=NOW)
    finished = open_enrollment.finish(
        STATION, FinishRequest(started.session, activate(device, started)), now=NOW
    )
    assert devices_in(sessions) == [finished.device_id]
