"""EK certificate chains (provisioning.ekchain): path validation through intermediates, the TCG EK
profile (keyUsage by algorithm, purpose, end entity), path length, and revocation by imported
manufacturer CRLs (signature by the issuing CA, cRLSign, freshness, scope, rollback). Pure: the
certificates and CRLs are made with pyca's builders (tests/ek_manufacturer.py); the real swtpm
chains are tests/tpm/test_enroll_ekchain.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol.errors import ConfigError, ProtocolError
from provisioning.ekchain import ManufacturerTrust, crls_to_pem
from provisioning.ekcrls import ManufacturerTrustFile, import_crl, read_crls
from tests.ek_manufacturer import CA, crl, ek_certificate, key_usage, make_ca

pytestmark = pytest.mark.pure

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def root() -> CA:
    return make_ca("TPM Vendor Root CA", NOW)


@pytest.fixture(scope="module")
def inter(root: CA) -> CA:
    return make_ca("TPM Vendor EK CA 01", NOW, parent=root)


def refused(check: str, trust: ManufacturerTrust, cert: x509.Certificate, **kw: object) -> str:
    with pytest.raises(ProtocolError) as refusal:
        trust.verify(cert, now=kw.get("now", NOW))  # type: ignore[arg-type]
    assert refusal.value.check == check, refusal.value
    return refusal.value.reason


# -- paths --------------------------------------------------------------------------------------


def test_an_ek_certificate_through_an_intermediate_validates_to_the_root(
    root: CA, inter: CA
) -> None:
    ek = ek_certificate(inter, NOW)
    chain = ManufacturerTrust([root.cert, inter.cert]).verify(ek, now=NOW)
    assert chain == [ek, inter.cert, root.cert]
    # an ECC EK (keyAgreement), empty subject, critical SAN: the TCG profile, accepted
    ecc = ek_certificate(
        inter, NOW, public_key=ec.generate_private_key(ec.SECP384R1()).public_key()
    )
    assert ManufacturerTrust([root.cert, inter.cert]).verify(ecc, now=NOW)[0] == ecc
    assert ecc.subject == x509.Name([])


def test_an_intermediate_is_not_an_anchor(root: CA, inter: CA) -> None:
    with pytest.raises(ConfigError, match="no root"):
        ManufacturerTrust([inter.cert])
    other_root = make_ca("Other Root", NOW)
    with pytest.raises(ConfigError, match="no issuer in the bundle"):
        ManufacturerTrust([other_root.cert, inter.cert])
    # the root alone: the intermediate is missing from the path
    refused("enroll.ek.chain", ManufacturerTrust([root.cert]), ek_certificate(inter, NOW))


def test_path_length_is_honoured(root: CA) -> None:
    short_root = make_ca("Short Root", NOW, path_length=0)
    below = make_ca("EK CA under a pathLen 0 root", NOW, parent=short_root)
    trust = ManufacturerTrust([short_root.cert, below.cert])
    assert "path length" in refused("enroll.ek.chain", trust, ek_certificate(below, NOW))
    # pathLen 1 allows exactly one intermediate, not two
    one = make_ca("Root pathLen 1", NOW, path_length=1)
    first = make_ca("First", NOW, parent=one)
    second = make_ca("Second", NOW, parent=first)
    trust = ManufacturerTrust([one.cert, first.cert, second.cert])
    trust.verify(ek_certificate(first, NOW), now=NOW)
    refused("enroll.ek.chain", trust, ek_certificate(second, NOW))


def test_an_issuer_that_may_not_sign_certificates_breaks_the_path(root: CA) -> None:
    no_sign = make_ca("EK CA without keyCertSign", NOW, parent=root, cert_sign=False)
    trust = ManufacturerTrust([root.cert, no_sign.cert])
    refused("enroll.ek.chain", trust, ek_certificate(no_sign, NOW))


def test_expired_certificates_break_the_path(root: CA, inter: CA) -> None:
    trust = ManufacturerTrust([root.cert, inter.cert])
    refused(
        "enroll.ek.chain", trust, ek_certificate(inter, NOW, days=1), now=NOW + timedelta(days=3)
    )


# -- the TCG EK profile -------------------------------------------------------------------------


def test_key_usage_follows_the_ek_algorithm(root: CA, inter: CA) -> None:
    trust = ManufacturerTrust([root.cert, inter.cert])
    # an RSA EK that only signs
    refused(
        "ek.key_usage", trust, ek_certificate(inter, NOW, usage=key_usage(digital_signature=True))
    )
    # an RSA EK with keyAgreement (an ECC EK's usage)
    refused("ek.key_usage", trust, ek_certificate(inter, NOW, usage=key_usage(key_agreement=True)))
    # an ECC EK with keyEncipherment (an RSA EK's usage)
    ecc = ec.generate_private_key(ec.SECP384R1()).public_key()
    refused(
        "ek.key_usage",
        trust,
        ek_certificate(inter, NOW, public_key=ecc, usage=key_usage(key_encipherment=True)),
    )
    # no keyUsage at all
    refused("ek.key_usage", trust, ek_certificate(inter, NOW, with_usage=False))


def test_an_ek_certificate_must_be_an_end_entity_for_ek_purposes(root: CA, inter: CA) -> None:
    trust = ManufacturerTrust([root.cert, inter.cert])
    client_auth = x509.ObjectIdentifier("1.3.6.1.5.5.7.3.2")
    refused("ek.profile", trust, ek_certificate(inter, NOW, purposes=[client_auth]))


# -- CRLs ---------------------------------------------------------------------------------------


def test_an_ek_on_its_issuers_crl_is_revoked(root: CA, inter: CA) -> None:
    ek = ek_certificate(inter, NOW)
    other = ek_certificate(inter, NOW)
    trust = ManufacturerTrust(
        [root.cert, inter.cert], [crl(inter, NOW, revoked=(ek.serial_number,))], now=NOW
    )
    assert "the EK certificate" in refused("ek.revoked", trust, ek)
    trust.verify(other, now=NOW)  # not listed: fine


def test_a_revoked_intermediate_revokes_every_ek_below_it(root: CA, inter: CA) -> None:
    trust = ManufacturerTrust(
        [root.cert, inter.cert], [crl(root, NOW, revoked=(inter.cert.serial_number,))], now=NOW
    )
    assert "intermediate" in refused("ek.revoked", trust, ek_certificate(inter, NOW))


def test_an_expired_crl_refuses_its_issuers_eks_until_a_fresh_one_is_imported(
    root: CA, inter: CA
) -> None:
    trust = ManufacturerTrust([root.cert, inter.cert], [crl(inter, NOW)])
    later = NOW + timedelta(days=8)  # past nextUpdate (7 days)
    refused("ek.crl.stale", trust, ek_certificate(inter, later, days=30), now=later)
    with pytest.raises(ProtocolError) as stale:
        trust.merge(crl(inter, NOW, number=2), now=later)  # its nextUpdate passed too
    assert stale.value.check == "ek.crl.stale"
    trust.merge(crl(inter, later, number=3), now=later)
    trust.verify(ek_certificate(inter, later, days=30), now=later)


def test_a_crl_signed_by_another_ca_is_refused(root: CA, inter: CA) -> None:
    # a CA with the same name but another key: the name matches, the signature does not
    impostor = make_ca("TPM Vendor EK CA 01", NOW, parent=make_ca("Impostor Root", NOW))
    trust = ManufacturerTrust([root.cert, inter.cert])
    with pytest.raises(ProtocolError) as refusal:
        trust.merge(crl(impostor, NOW, revoked=(1,)), now=NOW)
    assert refusal.value.check == "ek.crl.issuer"
    with pytest.raises(ProtocolError) as refusal:
        ManufacturerTrust([root.cert, inter.cert], [crl(impostor, NOW)])
    assert refusal.value.check == "ek.crl.issuer"


def test_a_crl_from_a_ca_without_crl_sign_is_refused(root: CA) -> None:
    no_crl = make_ca("EK CA without cRLSign", NOW, parent=root, crl_sign=False)
    trust = ManufacturerTrust([root.cert, no_crl.cert])
    with pytest.raises(ProtocolError) as refusal:
        trust.merge(crl(no_crl, NOW), now=NOW)
    assert refusal.value.check == "ek.crl.issuer"


def test_crl_rollback_and_partial_crls_are_refused(root: CA, inter: CA) -> None:
    trust = ManufacturerTrust([root.cert, inter.cert])
    trust.merge(crl(inter, NOW, number=5, revoked=(42,)), now=NOW)
    with pytest.raises(ProtocolError) as refusal:
        trust.merge(crl(inter, NOW, number=4), now=NOW)  # would drop serial 42
    assert refusal.value.check == "ek.crl.rollback"
    with pytest.raises(ProtocolError) as refusal:
        trust.merge(crl(inter, NOW, number=6, delta=True), now=NOW)
    assert refusal.value.check == "ek.crl.scope"
    with pytest.raises(ProtocolError) as refusal:
        trust.merge(crl(inter, NOW, number=7, this_update=timedelta(hours=1)), now=NOW)
    assert refusal.value.check == "ek.crl.stale"  # dated in the future


# -- the CRL file -------------------------------------------------------------------------------


def test_import_writes_the_file_and_enrollment_sees_it_without_a_restart(
    tmp_path: Path, root: CA, inter: CA
) -> None:
    path = tmp_path / "manufacturer-crls.pem"
    ek = ek_certificate(inter, NOW)
    trusted = ManufacturerTrustFile([root.cert, inter.cert], path)
    trusted.current().verify(ek, now=NOW)  # no file yet: nothing revoked
    first = crls_to_pem([crl(inter, NOW, number=1)])
    import_crl([root.cert, inter.cert], path, first, now=NOW)
    trusted.current().verify(ek, now=NOW)
    second = crls_to_pem([crl(inter, NOW, number=2, revoked=(ek.serial_number,))])
    import_crl([root.cert, inter.cert], path, second, now=NOW)
    assert [
        c.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        for c in read_crls(path)
    ] == [2]  # one CRL per CA: the newer replaced the older
    refused("ek.revoked", trusted.current(), ek)
    # a refused import writes nothing
    before = path.read_bytes()
    with pytest.raises(ProtocolError):
        import_crl([root.cert, inter.cert], path, first, now=NOW)  # number 1 < 2
    assert path.read_bytes() == before
    with pytest.raises(ProtocolError) as refusal:
        import_crl([root.cert, inter.cert], path, b"not a CRL", now=NOW)
    assert refusal.value.check == "ek.crl.decode"
    assert path.read_bytes() == before
