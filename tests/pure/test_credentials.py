"""DevID credentials (agent.protocol.credentials.CredentialVerifier) and the TPM-residency proof
check (verify_tpm_residency), pure: software keys, certificates from provisioning.pki or built
here, and proofs from the virtual fleet's SIMULATED software AK (firmware_sim.fleet.credentials;
tests/tpm/test_tpm_residency.py checks proofs a real swtpm makes)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from agent.protocol.credentials import (
    AK_NAME_OID,
    CredentialVerifier,
    _ak_name_of,
    _oid_der,
    ak_name_extension,
    leaf_qualifying_data,
    tpm_proof_from_certify,
    verify_tpm_residency,
)
from agent.protocol.errors import CryptoError, ProtocolError
from agent.protocol.wire import cbor
from agent.protocol.x509der import load_certificate
from agent.tpm.templates import KeyKind
from firmware_sim.fleet.credentials import SimulatedAK, simulated_public_area
from provisioning import pki

pytestmark = pytest.mark.pure

T0 = datetime(2026, 6, 1, tzinfo=UTC)
NOW = int((T0 + timedelta(hours=1)).timestamp())
DAY = timedelta(days=1)


def point(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def check_of(call: object, *args: object) -> str:
    assert callable(call)
    with pytest.raises(ProtocolError) as refused:
        call(*args)
    return refused.value.check


@pytest.fixture(scope="module")
def ca() -> pki.CertificateAuthority:
    return pki.create_ca("keyfleet device CA", now=T0, valid_for=timedelta(days=365))


def devid(
    ca: pki.CertificateAuthority,
    device_id: str = "dev-0001",
    *,
    ak_name: bytes | None = None,
    valid_for: timedelta = DAY,
) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = pki.generate_key()
    cert = pki.issue_devid_cert(
        ca,
        key.public_key(),
        device_id=device_id,
        hardware_serial="SN-1",
        now=T0,
        valid_for=valid_for,
        ak_name=ak_name,
    )
    return key, cert.public_bytes(serialization.Encoding.DER)


def hand_made(
    issuer: pki.CertificateAuthority,
    public_key: object,
    *,
    sans: list[x509.GeneralName] | None,
    eku: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
    extra: x509.ExtensionType | None = None,
    signs: bool | None = True,
) -> bytes:
    """An end-entity certificate built here, for shapes provisioning.pki refuses to make.
    ``signs``: keyUsage digitalSignature (True), keyAgreement only (False), none at all (None)."""
    assert isinstance(public_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey))
    issuer_ski = issuer.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-x")]))
        .issuer_name(issuer.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(T0 - timedelta(minutes=5))
        .not_valid_after(T0 + DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski.value),
            critical=False,
        )
    )
    if signs is not None:
        usage = x509.KeyUsage(
            digital_signature=signs,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=not signs,
            key_cert_sign=False,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        )
        builder = builder.add_extension(usage, critical=True)
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if extra is not None:
        builder = builder.add_extension(extra, critical=False)
    return builder.sign(issuer.private_key, hashes.SHA256()).public_bytes(
        serialization.Encoding.DER
    )


def urn(device_id: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(f"urn:keyfleet:device:{device_id}")


# -- CredentialVerifier -------------------------------------------------------------------------


def test_valid_devid_gives_device_id_key_and_ak_name(ca: pki.CertificateAuthority) -> None:
    ak = SimulatedAK.generate()
    key, der = devid(ca, "dev-00ab", ak_name=ak.name)
    device = CredentialVerifier([ca.certificate]).verify(der, NOW)
    assert device.device_id == "dev-00ab"
    assert device.signature_key == point(key)
    assert len(device.signature_key) == 65
    assert device.ak_name == ak.name
    extension = x509.load_der_x509_certificate(der).extensions.get_extension_for_oid(AK_NAME_OID)
    assert not extension.critical


def test_devid_without_ak_extension_has_no_ak_name(ca: pki.CertificateAuthority) -> None:
    _, der = devid(ca)
    assert CredentialVerifier([ca.certificate]).verify(der, NOW).ak_name is None


def test_wrong_ca_is_refused(ca: pki.CertificateAuthority) -> None:
    other = pki.create_ca("another CA", now=T0, valid_for=timedelta(days=365))
    _, der = devid(other)
    assert check_of(CredentialVerifier([ca.certificate]).verify, der, NOW) == "cred.chain"


def test_expired_and_not_yet_valid_are_refused(ca: pki.CertificateAuthority) -> None:
    _, der = devid(ca, valid_for=DAY)
    verifier = CredentialVerifier([ca.certificate])
    later = int((T0 + 2 * DAY).timestamp())
    earlier = int((T0 - DAY).timestamp())
    assert check_of(verifier.verify, der, later) == "cred.chain"
    assert check_of(verifier.verify, der, earlier) == "cred.chain"


def test_intermediate_ca_is_accepted(ca: pki.CertificateAuthority) -> None:
    root_key = pki.generate_key()
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "offline root")])
    root_ski = x509.SubjectKeyIdentifier.from_public_key(root_key.public_key())
    ca_usage = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(T0 - DAY)
        .not_valid_after(T0 + 400 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(ca_usage, critical=True)
        .add_extension(root_ski, critical=False)
        .sign(root_key, hashes.SHA256())
    )
    inter_key = pki.generate_key()
    inter_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device issuing CA")])
    inter = (
        x509.CertificateBuilder()
        .subject_name(inter_name)
        .issuer_name(root_name)
        .public_key(inter_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(T0 - DAY)
        .not_valid_after(T0 + 300 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(ca_usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(inter_key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski), False
        )
        .sign(root_key, hashes.SHA256())
    )
    issuing = pki.CertificateAuthority(certificate=inter, private_key=inter_key)
    _, der = devid(issuing, "dev-inter")
    verified = CredentialVerifier([root], intermediates=[inter]).verify(der, NOW)
    assert verified.device_id == "dev-inter"
    # the intermediate must be known: the leaf alone does not chain to the root
    assert check_of(CredentialVerifier([root]).verify, der, NOW) == "cred.chain"
    # and the device CA of another hierarchy does not accept it
    assert check_of(CredentialVerifier([ca.certificate]).verify, der, NOW) == "cred.chain"


def test_missing_or_invalid_device_urn_is_refused(ca: pki.CertificateAuthority) -> None:
    verifier = CredentialVerifier([ca.certificate])
    key = pki.generate_key().public_key()
    # an MQTT client certificate from the same CA: clientAuth, but no SAN at all
    client = pki.issue_client_cert(ca, key, identity="dev-1", role="device", now=T0, valid_for=DAY)
    no_san = client.public_bytes(serialization.Encoding.DER)
    assert check_of(verifier.verify, no_san, NOW) == "cred.device-id"
    cases: list[list[x509.GeneralName]] = [
        [x509.UniformResourceIdentifier("urn:example:device:dev-1")],
        [urn("dev-1"), urn("dev-2")],
        [urn("")],
        [urn("-starts-with-dash")],
        [urn("dev/1")],
        [urn("x" * 65)],
    ]
    for sans in cases:
        der = hand_made(ca, key, sans=sans)
        assert check_of(verifier.verify, der, NOW) == "cred.device-id", sans
    # other SAN entries beside exactly one device URN are fine
    mixed = hand_made(ca, key, sans=[x509.DNSName("dev-1.example"), urn("dev-1")])
    assert verifier.verify(mixed, NOW).device_id == "dev-1"


def test_wrong_key_type_is_refused(ca: pki.CertificateAuthority) -> None:
    verifier = CredentialVerifier([ca.certificate])
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    for key in (p384, rsa_key):
        der = hand_made(ca, key, sans=[urn("dev-1")])
        assert check_of(verifier.verify, der, NOW) == "cred.key"


def test_not_a_client_signing_certificate_is_refused(ca: pki.CertificateAuthority) -> None:
    verifier = CredentialVerifier([ca.certificate])
    key = pki.generate_key().public_key()
    assert verifier.verify(hand_made(ca, key, sans=[urn("dev-1")]), NOW).device_id == "dev-1"
    server = hand_made(ca, key, sans=[urn("dev-1")], eku=ExtendedKeyUsageOID.SERVER_AUTH)
    no_usage = hand_made(ca, key, sans=[urn("dev-1")], signs=None)
    agreement_only = hand_made(ca, key, sans=[urn("dev-1")], signs=False)
    for der in (server, no_usage, agreement_only):
        assert check_of(verifier.verify, der, NOW) == "cred.chain"


def test_undecodable_certificate_or_ak_extension_is_refused(
    ca: pki.CertificateAuthority,
) -> None:
    verifier = CredentialVerifier([ca.certificate])
    _, der = devid(ca)
    for bad in (b"", b"\x30\x03abc", der[:-1], b"\x00" * (16 * 1024 + 1), bytearray(der)):
        assert check_of(verifier.verify, bad, NOW) == "cred.decode"
    key = pki.generate_key().public_key()
    not_octets = x509.UnrecognizedExtension(AK_NAME_OID, b"\x05\x00")
    wrong_alg = x509.UnrecognizedExtension(AK_NAME_OID, b"\x04\x22" + b"\x00\x04" + bytes(32))
    for extension in (not_octets, wrong_alg):
        der = hand_made(ca, key, sans=[urn("dev-1")], extra=extension)
        assert check_of(verifier.verify, der, NOW) == "cred.decode"
    with pytest.raises(ProtocolError):
        ak_name_extension(b"\x00\x0b" + bytes(31))


def test_memo_hits_and_still_checks_time(ca: pki.CertificateAuthority) -> None:
    _, der = devid(ca, valid_for=DAY)
    _, other = devid(ca, "dev-0002")
    verifier = CredentialVerifier([ca.certificate], memo_size=1)
    first = verifier.verify(der, NOW)
    assert verifier.memo_hits == 0
    assert verifier.verify(der, NOW + 60) is first
    assert verifier.memo_hits == 1
    # a remembered certificate is refused once its chain has expired
    assert check_of(verifier.verify, der, int((T0 + 2 * DAY).timestamp())) == "cred.chain"
    assert verifier.verify(der, NOW) == first
    assert verifier.memo_hits == 2
    # LRU of one: another certificate evicts the first, which is then validated again
    verifier.verify(other, NOW)
    verifier.verify(der, NOW)
    assert verifier.memo_hits == 2
    # a refused certificate is not remembered: it is refused every time
    outsider = devid(pki.create_ca("x", now=T0, valid_for=DAY))[1]
    for _ in range(2):
        assert check_of(verifier.verify, outsider, NOW) == "cred.chain"
    assert verifier.memo_hits == 2


def test_the_validator_kept_for_one_time_still_refuses_foreign_and_ended_chains(
    ca: pki.CertificateAuthority,
) -> None:
    """The verifier keeps its path validator for one ``now`` and each anchor's end by its
    certificate: leaves checked one after the other at the same second (a batch of first
    reports) are each validated. A leaf of a CA that only copies the device CA's name, or of
    an unknown CA, is refused (``cred.chain``) right after a good one; a leaf of a CA accepted
    until a time is refused after it, though a leaf of it passed just before."""
    old = pki.create_ca("retiring device CA", now=T0, valid_for=timedelta(days=365))
    until = NOW + 10
    verifier = CredentialVerifier(
        [ca.certificate, old.certificate],
        ends={old.certificate.public_bytes(serialization.Encoding.DER): until},
    )
    impostor = pki.create_ca("keyfleet device CA", now=T0, valid_for=timedelta(days=365))
    stranger = pki.create_ca("unknown CA", now=T0, valid_for=timedelta(days=365))
    assert verifier.verify(devid(ca)[1], NOW).device_id == "dev-0001"
    assert check_of(verifier.verify, devid(impostor, "dev-0002")[1], NOW) == "cred.chain"
    assert check_of(verifier.verify, devid(stranger, "dev-0003")[1], NOW) == "cred.chain"
    assert verifier.verify(devid(old, "dev-0004")[1], until).device_id == "dev-0004"
    late = devid(old, "dev-0005")[1]
    assert check_of(verifier.verify, late, until + 1) == "cred.chain"
    assert verifier.verify(devid(ca, "dev-0006")[1], until + 1).device_id == "dev-0006"
    assert check_of(verifier.verify, late, until + 1) == "cred.chain"


# -- verify_tpm_residency (proofs by the simulated software AK) -------------------------------


def leaf_and_proof(ak: SimulatedAK) -> tuple[bytes, bytes]:
    leaf = ec.generate_private_key(ec.SECP256R1())
    return point(leaf), ak.prove_leaf(leaf.public_key())


def proof_fields(proof: bytes) -> dict[str, object]:
    value = cbor.decode(proof)
    assert isinstance(value, dict)
    return dict(value)


def test_proof_verifies_and_has_the_spec_layout() -> None:
    ak = SimulatedAK.generate()
    leaf_point, proof = leaf_and_proof(ak)
    verify_tpm_residency(proof, leaf_point, ak.name)
    fields = proof_fields(proof)
    assert set(fields) == {"v", "ak", "pub", "attest", "sig"}
    assert fields["v"] == 1
    assert fields["ak"] == ak.public_area[2:]  # TPMT_PUBLIC, no TPM2B size


def test_proof_forgeries_are_refused_with_their_check_ids() -> None:
    ak, other_ak = SimulatedAK.generate(), SimulatedAK.generate()
    leaf = ec.generate_private_key(ec.SECP256R1())
    leaf_point = point(leaf)
    proof = ak.prove_leaf(leaf.public_key())
    # another device's AK made it
    assert check_of(verify_tpm_residency, proof, leaf_point, other_ak.name) == "tpm.proof.ak"
    # signed by a key that is not the AK, presented with the real AK's public area
    forged = proof_fields(other_ak.prove_leaf(leaf.public_key()))
    forged["ak"] = ak.public_area[2:]
    with pytest.raises(CryptoError) as bad_sig:
        verify_tpm_residency(cbor.encode(forged), leaf_point, ak.name)
    assert bad_sig.value.check == "tpm.proof.signature"
    # a proof for another leaf key
    other_point = point(ec.generate_private_key(ec.SECP256R1()))
    assert check_of(verify_tpm_residency, proof, other_point, ak.name) == "tpm.proof.key"
    # the certified object is not the public area presented
    swapped = proof_fields(proof)
    swapped["pub"] = simulated_public_area(KeyKind.LEAF, leaf.public_key())[2:][:-1] + b"\x00"
    assert check_of(verify_tpm_residency, cbor.encode(swapped), leaf_point, ak.name) in {
        "tpm.proof.name",
        "tpm.proof.key",
    }
    other_leaf_area = simulated_public_area(
        KeyKind.LEAF, ec.generate_private_key(ec.SECP256R1()).public_key()
    )
    swapped["pub"] = other_leaf_area[2:]
    assert check_of(verify_tpm_residency, cbor.encode(swapped), leaf_point, ak.name) == (
        "tpm.proof.name"
    )
    # a signing key (DevID-shaped), certified honestly over its own point
    signer = ec.generate_private_key(ec.SECP256R1())
    signer_area = simulated_public_area(KeyKind.DEVID, signer.public_key())
    attestation = ak.certify(signer_area, leaf_qualifying_data(point(signer)))
    signing = tpm_proof_from_certify(ak.public_area, signer_area, attestation)
    assert check_of(verify_tpm_residency, signing, point(signer), ak.name) == (
        "tpm.proof.attributes"
    )
    # certified over other qualifying data (e.g. a certify made for another purpose)
    leaf_area = simulated_public_area(KeyKind.LEAF, leaf.public_key())
    replayed = tpm_proof_from_certify(
        ak.public_area, leaf_area, ak.certify(leaf_area, b"\x01" * 32)
    )
    assert check_of(verify_tpm_residency, replayed, leaf_point, ak.name) == "tpm.attest.nonce"


def test_undecodable_proofs_are_refused() -> None:
    ak = SimulatedAK.generate()
    leaf_point, proof = leaf_and_proof(ak)
    fields = proof_fields(proof)
    bad: list[object] = [
        b"",
        b"\xff",
        cbor.encode([1, 2]),
        cbor.encode({**fields, "v": 2}),
        cbor.encode({**fields, "v": True}),
        cbor.encode({**fields, "extra": b""}),
        cbor.encode({k: v for k, v in fields.items() if k != "sig"}),
        cbor.encode({**fields, "attest": "text"}),
        cbor.encode({**fields, "ak": b"\x00\x23"}),
        cbor.encode({**fields, "sig": b"\x00\x18\x00\x0b"}),
        b"\x00" * 5000,
    ]
    for data in bad:
        assert check_of(verify_tpm_residency, data, leaf_point, ak.name) == "tpm.proof.decode"


# -- strict decoders: any input is accepted or refused with a check id, never anything else ----

FUZZ_AK = SimulatedAK.generate()
FUZZ_LEAF = ec.generate_private_key(ec.SECP256R1())
FUZZ_POINT = point(FUZZ_LEAF)
FUZZ_FIELDS = proof_fields(FUZZ_AK.prove_leaf(FUZZ_LEAF.public_key()))
FUZZ_CA = pki.create_ca("fuzz CA", now=T0, valid_for=DAY)
FUZZ_VERIFIER = CredentialVerifier([FUZZ_CA.certificate])


@given(st.binary(max_size=600))
def test_random_bytes_are_refused_as_proofs_and_certificates(data: bytes) -> None:
    with pytest.raises(ProtocolError) as proof:
        verify_tpm_residency(data, FUZZ_POINT, FUZZ_AK.name)
    assert proof.value.check == "tpm.proof.decode"
    with pytest.raises(ProtocolError) as cert:
        FUZZ_VERIFIER.verify(data, NOW)
    assert cert.value.check == "cred.decode"


@given(
    st.sampled_from(["ak", "pub", "attest", "sig"]),
    st.integers(min_value=0, max_value=1000),
    st.integers(min_value=1, max_value=255),
)
def test_any_changed_byte_of_a_proof_is_refused(field_name: str, index: int, xor: int) -> None:
    original = FUZZ_FIELDS[field_name]
    assert isinstance(original, bytes)
    changed = bytearray(original)
    changed[index % len(changed)] ^= xor
    forged = cbor.encode({**FUZZ_FIELDS, field_name: bytes(changed)})
    with pytest.raises(ProtocolError) as refused:
        verify_tpm_residency(forged, FUZZ_POINT, FUZZ_AK.name)
    assert refused.value.check.startswith(("tpm.proof.", "tpm.attest."))


def _negative_serial(der: bytes) -> bytes:
    """``der`` with its serial number's sign bit set (the bytes after the version field)."""
    data = bytearray(der)
    at = data.index(bytes([0xA0, 0x03, 0x02, 0x01, 0x02])) + 5  # [0] { INTEGER 2 }: v3
    assert data[at] == 0x02  # the serial's INTEGER
    data[at + 2] |= 0x80
    return bytes(data)


def test_a_certificate_with_a_negative_serial_is_refused_as_not_parsing(
    ca: pki.CertificateAuthority,
) -> None:
    """cryptography reads such a certificate with a deprecation warning only (a hostile peer's
    flipped bit): keyfleet refuses it as not decoding, whatever the warnings filter is."""
    _, der = devid(ca)
    bad = _negative_serial(der)
    with pytest.raises(ValueError, match="cryptography will refuse"):
        load_certificate(bad)
    assert check_of(CredentialVerifier([ca.certificate]).verify, bad, NOW) == "cred.decode"
    assert load_certificate(der).serial_number > 0  # the untouched certificate reads as before


def _with_extensions(ca: pki.CertificateAuthority, *extensions: x509.ExtensionType) -> bytes:
    """A certificate's DER with ``extensions`` (non-critical) and a subjectAltName."""
    key = pki.generate_key().public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-x")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(T0)
        .not_valid_after(T0 + DAY)
        .add_extension(x509.SubjectAlternativeName([urn("dev-1")]), critical=False)
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(ca.private_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_the_ak_name_read_from_the_der_is_the_one_the_extensions_hold(
    ca: pki.CertificateAuthority,
) -> None:
    """The AK name is read from the certificate's DER alone (the other extensions are not
    decoded): what ``Certificate.extensions`` holds, none when another extension's OID only
    starts like it; the AK-name OID twice in the extensions is refused (``cred.decode``)."""
    name = b"\x00\x0b" + bytes(range(32))
    value = b"\x04\x22" + name
    arcs = AK_NAME_OID.dotted_string.rsplit(".", 1)
    decoys = [x509.ObjectIdentifier(f"{arcs[0]}.{int(arcs[1]) + i}") for i in (1, 2)]
    longer = x509.ObjectIdentifier(AK_NAME_OID.dotted_string + ".1")
    for der, expected in (
        (devid(ca, ak_name=name)[1], name),
        (devid(ca)[1], None),
        (_with_extensions(ca, x509.UnrecognizedExtension(longer, value)), None),
        (_with_extensions(ca, x509.UnrecognizedExtension(decoys[0], value)), None),
    ):
        extensions = x509.load_der_x509_certificate(der).extensions
        held = [e.value for e in extensions if e.oid == AK_NAME_OID]
        assert (held[0].value[2:] if held else None) == expected  # type: ignore[attr-defined]
        assert _ak_name_of(der) == expected
    # the decoys' OIDs replaced by the AK-name OID in the DER (the signature no longer matters:
    # the name is read after path validation)
    twice = _with_extensions(ca, *(x509.UnrecognizedExtension(d, value) for d in decoys))
    for decoy in decoys:
        assert len(_oid_tlv(decoy)) == len(_oid_tlv(AK_NAME_OID))
        twice = twice.replace(_oid_tlv(decoy), _oid_tlv(AK_NAME_OID))
    once = _with_extensions(ca, x509.UnrecognizedExtension(decoys[0], value)).replace(
        _oid_tlv(decoys[0]), _oid_tlv(AK_NAME_OID)
    )
    assert _ak_name_of(once) == name
    assert check_of(_ak_name_of, twice) == "cred.decode"


def _oid_tlv(oid: x509.ObjectIdentifier) -> bytes:
    content = _oid_der(oid)
    return b"\x06" + bytes([len(content)]) + content
