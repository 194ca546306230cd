"""provisioning.pki: CA, leaf certificates and the chain check, each failure by its check id."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.protocol.errors import ProtocolError
from provisioning import pki

pytestmark = pytest.mark.pure

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
YEAR = timedelta(days=365)


@pytest.fixture(scope="module")
def ca() -> pki.CertificateAuthority:
    return pki.create_ca("keyfleet device CA", now=NOW, valid_for=10 * YEAR)


@pytest.fixture(scope="module")
def other_ca() -> pki.CertificateAuthority:
    return pki.create_ca("keyfleet device CA", now=NOW, valid_for=10 * YEAR)


def _client(ca: pki.CertificateAuthority, identity: str = "dev-0001") -> x509.Certificate:
    key = pki.generate_key()
    return pki.issue_client_cert(
        ca, key.public_key(), identity=identity, role="device", now=NOW, valid_for=YEAR
    )


def _check_id(exc: pytest.ExceptionInfo[ProtocolError]) -> str:
    return exc.value.check


def test_ca_has_ca_flags_and_key_ids(ca: pki.CertificateAuthority) -> None:
    cert = ca.certificate
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert ca.name == "keyfleet device CA"
    cert.verify_directly_issued_by(cert)  # self-signed


def test_ca_repr_hides_private_key(ca: pki.CertificateAuthority) -> None:
    text = repr(ca)
    assert "private_key" not in text
    assert pki.key_to_pem(ca.private_key).decode() not in text


def test_client_cert_identity_role_and_eku(ca: pki.CertificateAuthority) -> None:
    cert = _client(ca, "dev-0042")
    assert pki.common_name(cert) == "dev-0042"
    assert pki.role_of(cert) == "device"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    pki.verify_certificate(cert, ca.certificate, now=NOW, purpose="client")
    pki.verify_certificate(cert, ca.certificate, now=NOW, purpose="any")


def test_client_cert_without_role(ca: pki.CertificateAuthority) -> None:
    key = pki.generate_key()
    cert = pki.issue_client_cert(ca, key.public_key(), identity="op-alice", now=NOW, valid_for=DAY)
    assert pki.role_of(cert) is None
    assert pki.common_name(cert) == "op-alice"


@pytest.mark.parametrize("bad", ["dev/1", "dev+", "dev#", "$SYS", ""])
def test_client_identity_must_be_a_topic_level(ca: pki.CertificateAuthority, bad: str) -> None:
    key = pki.generate_key()
    with pytest.raises(ValueError):
        pki.issue_client_cert(ca, key.public_key(), identity=bad, now=NOW, valid_for=DAY)


def test_server_cert_sans_and_eku(ca: pki.CertificateAuthority) -> None:
    key = pki.generate_key()
    cert = pki.issue_server_cert(
        ca,
        key.public_key(),
        common_name="broker",
        dns_names=["localhost"],
        ip_addresses=["127.0.0.1", "::1"],
        now=NOW,
        valid_for=YEAR,
    )
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    pki.verify_certificate(cert, ca.certificate, now=NOW, purpose="server")
    with pytest.raises(ProtocolError) as exc:
        pki.verify_certificate(cert, ca.certificate, now=NOW, purpose="client")
    assert _check_id(exc) == "pki.purpose"


def test_server_cert_needs_a_san(ca: pki.CertificateAuthority) -> None:
    with pytest.raises(ValueError):
        pki.issue_server_cert(
            ca, pki.generate_key().public_key(), common_name="x", now=NOW, valid_for=DAY
        )


def test_client_cert_refused_for_server_use(ca: pki.CertificateAuthority) -> None:
    with pytest.raises(ProtocolError) as exc:
        pki.verify_certificate(_client(ca), ca.certificate, now=NOW, purpose="server")
    assert _check_id(exc) == "pki.purpose"


def test_cert_from_another_ca_with_same_name_is_refused(
    ca: pki.CertificateAuthority, other_ca: pki.CertificateAuthority
) -> None:
    # Same subject name, different key: only the key ids and the signature tell them apart.
    with pytest.raises(ProtocolError) as exc:
        pki.verify_certificate(_client(other_ca), ca.certificate, now=NOW)
    assert _check_id(exc) == "pki.issuer"


def test_cert_from_another_ca_without_aki_fails_on_signature(
    ca: pki.CertificateAuthority, other_ca: pki.CertificateAuthority
) -> None:
    key = pki.generate_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-x")]))
        .issuer_name(other_ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .sign(other_ca.private_key, hashes.SHA256())
    )
    with pytest.raises(ProtocolError) as exc:
        pki.verify_certificate(cert, ca.certificate, now=NOW)
    assert _check_id(exc) == "pki.signature"


def test_issuer_name_mismatch(ca: pki.CertificateAuthority) -> None:
    other = pki.create_ca("operator CA", now=NOW, valid_for=YEAR)
    with pytest.raises(ProtocolError) as exc:
        pki.verify_certificate(_client(other), ca.certificate, now=NOW)
    assert _check_id(exc) == "pki.issuer"


@pytest.mark.parametrize(
    "when",
    [NOW - timedelta(hours=1), NOW + YEAR + DAY],
    ids=["not-yet-valid", "expired"],
)
def test_validity_window(ca: pki.CertificateAuthority, when: datetime) -> None:
    cert = _client(ca)
    with pytest.raises(ProtocolError) as exc:
        pki.verify_certificate(cert, ca.certificate, now=when)
    assert _check_id(exc) == "pki.validity"


def test_small_clock_skew_is_tolerated(ca: pki.CertificateAuthority) -> None:
    pki.verify_certificate(_client(ca), ca.certificate, now=NOW - timedelta(minutes=1))


def test_expired_ca_is_refused() -> None:
    short = pki.create_ca("short CA", now=NOW, valid_for=timedelta(days=2))
    cert = _client(short)
    # The leaf is clamped to the CA's lifetime, so both expire together.
    assert cert.not_valid_after_utc == short.certificate.not_valid_after_utc
    with pytest.raises(ProtocolError) as exc:
        pki.verify_certificate(cert, short.certificate, now=NOW + timedelta(days=3))
    assert _check_id(exc) == "pki.validity"


def test_leaf_used_as_ca_is_refused(ca: pki.CertificateAuthority) -> None:
    leaf_key = pki.generate_key()
    leaf = pki.issue_client_cert(
        ca, leaf_key.public_key(), identity="dev-evil", now=NOW, valid_for=YEAR
    )
    fake_ca = pki.CertificateAuthority(certificate=leaf, private_key=leaf_key)
    victim = pki.generate_key()
    # Build by hand: issue_* would copy the leaf's (missing) SKI, which is exactly what an
    # attacker does not care about.
    forged = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-0002")]))
        .issuer_name(leaf.subject)
        .public_key(victim.public_key())
        .serial_number(9)
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .sign(fake_ca.private_key, hashes.SHA256())
    )
    with pytest.raises(ProtocolError) as exc:
        pki.verify_certificate(forged, leaf, now=NOW)
    assert _check_id(exc) == "pki.ca"


def test_ca_certificate_is_not_an_identity(ca: pki.CertificateAuthority) -> None:
    with pytest.raises(ProtocolError) as exc:
        pki.verify_certificate(ca.certificate, ca.certificate, now=NOW)
    assert _check_id(exc) == "pki.leaf_is_ca"


def test_ca_without_keycertsign_is_refused() -> None:
    key = pki.generate_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weird CA")])
    weird = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(3)
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + YEAR)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    ca = pki.CertificateAuthority(certificate=weird, private_key=key)
    with pytest.raises(ProtocolError) as exc:
        pki.verify_certificate(_client(ca), weird, now=NOW)
    assert _check_id(exc) == "pki.ca"


def test_only_p256_keys_are_certified(ca: pki.CertificateAuthority) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ProtocolError) as exc:
        pki.issue_client_cert(ca, p384.public_key(), identity="dev-1", now=NOW, valid_for=DAY)
    assert _check_id(exc) == "pki.key_type"


def test_naive_datetime_is_rejected(ca: pki.CertificateAuthority) -> None:
    with pytest.raises(ValueError):
        pki.verify_certificate(_client(ca), ca.certificate, now=datetime(2030, 1, 1))


def test_serial_numbers_come_from_rng(ca: pki.CertificateAuthority) -> None:
    key = pki.generate_key()
    cert = pki.issue_client_cert(
        ca, key.public_key(), identity="dev-1", now=NOW, valid_for=DAY, rng=lambda n: b"\xff" * n
    )
    assert cert.serial_number == (1 << 127) - 1


def test_pem_round_trips(ca: pki.CertificateAuthority, tmp_path: Path) -> None:
    cert = _client(ca)
    assert pki.cert_from_pem(pki.cert_to_pem(cert)) == cert
    bundle = pki.certs_to_pem([ca.certificate, cert])
    assert pki.certs_from_pem(bundle) == [ca.certificate, cert]
    with pytest.raises(ProtocolError) as exc:
        pki.cert_from_pem(bundle)
    assert _check_id(exc) == "pki.pem"
    with pytest.raises(ProtocolError) as exc:
        pki.certs_from_pem(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    assert _check_id(exc) == "pki.pem"

    key = pki.generate_key()
    plain = pki.key_to_pem(key)
    assert pki.key_from_pem(plain).private_numbers() == key.private_numbers()
    locked = pki.key_to_pem(key, b"hunter2")
    assert b"ENCRYPTED" in locked
    assert pki.key_from_pem(locked, b"hunter2").private_numbers() == key.private_numbers()
    with pytest.raises(ProtocolError) as exc:
        pki.key_from_pem(locked, b"wrong")
    assert _check_id(exc) == "pki.pem"
    assert "hunter2" not in str(exc.value)

    cert_path, key_path = tmp_path / "c.pem", tmp_path / "k.pem"
    pki.write_certificate(cert_path, cert, ca.certificate)
    pki.write_private_key(key_path, key)
    assert pki.certs_from_pem(cert_path.read_bytes()) == [cert, ca.certificate]
    assert key_path.stat().st_mode & 0o777 == 0o600
    assert pki.key_from_pem(key_path.read_bytes()).private_numbers() == key.private_numbers()
    assert b"BEGIN PUBLIC KEY" in pki.public_key_to_pem(key.public_key())


def test_p384_private_key_is_refused_on_load() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ProtocolError) as exc:
        pki.key_from_pem(pki.key_to_pem(p384))
    assert _check_id(exc) == "pki.key_type"
