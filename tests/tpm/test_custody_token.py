"""Fleet keys in a real PKCS#11 token (SoftHSM2): a token key signs a COSE envelope, a
certificate and a CRL that verify with its public key; its private half cannot be read out of the
token; references, PINs and the file option behave as docs/operations.md says."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol.wire import cose
from firmware_sim.softhsm import SoftToken
from provisioning import custody, pki
from provisioning.custody import CustodyError, FileKeyRef, TokenPrivateKey

pytestmark = pytest.mark.tpm

NOW = datetime.now(UTC)


def token_key(token: SoftToken, label: str = "fleet-signing") -> TokenPrivateKey:
    ref = custody.parse_token_uri(token.uri(label))
    custody.generate_token_key(ref)
    key = custody.load_private_key(ref)
    assert isinstance(key, TokenPrivateKey)
    return key


def test_token_key_signs_cose_certificate_and_crl(softhsm_token: SoftToken) -> None:
    key = token_key(softhsm_token)
    public = key.public_key()
    envelope = cose.sign1(b"payload", key)
    cose.verify_sign1(cose.decode_sign1(envelope), public)

    ca = pki.create_ca("token CA", now=NOW, valid_for=timedelta(days=1), key=key)
    ca.certificate.verify_directly_issued_by(ca.certificate)
    leaf = pki.issue_client_cert(
        ca, pki.generate_key().public_key(), identity="op", role="admin",
        now=NOW, valid_for=timedelta(days=1),
    )  # fmt: skip
    leaf.verify_directly_issued_by(ca.certificate)

    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(NOW)
        .next_update(NOW + timedelta(days=1))
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(leaf.serial_number)
            .revocation_date(NOW)
            .build()
        )
        .sign(key, hashes.SHA256())
    )
    assert crl.is_signature_valid(public)
    # and the signature check is real: another key's public half does not verify it
    assert not crl.is_signature_valid(pki.generate_key().public_key())


def test_private_key_cannot_leave_the_token(softhsm_token: SoftToken) -> None:
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    key = token_key(softhsm_token)
    with pytest.raises(CustodyError, match=r"token\.export"):
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    with pytest.raises(CustodyError, match=r"token\.export"):
        key.private_numbers()
    # straight at the token, with the user's PIN: the attributes say so and CKA_VALUE is refused
    ref = custody.parse_token_uri(softhsm_token.uri("fleet-signing"))
    session = custody.open_session(ref)
    try:
        private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="fleet-signing")
        assert private[Attribute.SENSITIVE] is True
        assert private[Attribute.EXTRACTABLE] is False
        assert private[Attribute.NEVER_EXTRACTABLE] is True
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            private[Attribute.VALUE]
    finally:
        session.close()
    assert "PIN" not in repr(key) and softhsm_token.pin() not in repr(key)
    assert softhsm_token.pin() not in repr(ref)


def test_signing_from_many_threads(softhsm_token: SoftToken) -> None:
    key = token_key(softhsm_token)
    public = key.public_key()

    def sign(i: int) -> None:
        data = i.to_bytes(4, "big")
        public.verify(key.sign(data, ec.ECDSA(hashes.SHA256())), data, ec.ECDSA(hashes.SHA256()))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(sign, range(400)))


def test_generate_refuses_an_existing_label(softhsm_token: SoftToken) -> None:
    ref = custody.parse_token_uri(softhsm_token.uri("k"))
    custody.generate_token_key(ref)
    with pytest.raises(CustodyError, match=r"token\.exists"):
        custody.generate_token_key(ref)
    assert "slot" in custody.describe(ref) and "'k'" in custody.describe(ref)


def test_wrong_pin_and_missing_key_are_refused(softhsm_token: SoftToken, tmp_path: Path) -> None:
    token_key(softhsm_token, "present")
    wrong = tmp_path / "wrong.pin"
    wrong.write_text("000000\n")
    wrong.chmod(0o600)
    uri = softhsm_token.uri("present").replace(str(softhsm_token.pin_file), str(wrong))
    with pytest.raises(CustodyError, match=r"token\.login") as refused:
        custody.load_private_key(uri)
    assert "000000" not in str(refused.value)
    with pytest.raises(CustodyError, match=r"token\.not_found"):
        custody.load_private_key(softhsm_token.uri("absent"))
    with pytest.raises(CustodyError, match=r"token\.not_found"):
        custody.load_private_key(softhsm_token.uri("present").replace("token=", "token=x"))


def test_pin_sources(softhsm_token: SoftToken, monkeypatch: pytest.MonkeyPatch) -> None:
    token_key(softhsm_token, "envkey")
    uri = f"pkcs11:token={softhsm_token.label};object=envkey?pin-source=env:KF_TEST_PIN"
    with pytest.raises(CustodyError, match=r"token\.pin"):
        custody.load_private_key(uri)
    monkeypatch.setenv("KF_TEST_PIN", softhsm_token.pin())
    assert isinstance(custody.load_private_key(uri), TokenPrivateKey)
    # a PIN file others can read is refused before the token is asked
    os.chmod(softhsm_token.pin_file, 0o644)
    with pytest.raises(CustodyError, match=r"token\.pin"):
        custody.load_private_key(softhsm_token.uri("envkey"))


@pytest.mark.parametrize(
    ("uri", "check"),
    [
        ("pkcs11:token=t;object=k?pin-value=1234", "token.pin"),
        ("pkcs11:object=k?pin-source=env:X", "token.uri"),
        ("pkcs11:token=t?pin-source=env:X", "token.uri"),
        ("pkcs11:token=t;object=k;object=j?pin-source=env:X", "token.uri"),
        ("pkcs11:token=t;object=k?pin-sauce=1234", "token.uri"),
        ("pkcs11:token=t;object=k?pin-source=http://x", "token.uri"),
        ("pkcs11:token=t;object=k;type=public?pin-source=env:X", "token.uri"),
    ],
)
def test_malformed_references(uri: str, check: str) -> None:
    with pytest.raises(CustodyError, match=re.escape(check)) as refused:
        custody.parse_token_uri(uri)
    assert "1234" not in str(refused.value)


def test_uri_fields_are_percent_decoded() -> None:
    ref = custody.parse_token_uri(
        "pkcs11:token=my%20token;object=a%3Bb;id=%01%02?pin-source=env:P&module-path=/x.so"
    )
    assert (ref.token, ref.label, ref.key_id) == ("my token", "a;b", b"\x01\x02")
    assert ref.module == Path("/x.so") and str(ref.pin) == "env:P"


def test_file_key_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key = pki.generate_key()
    path = tmp_path / "fleet.key"
    pki.write_private_key(path, key)
    with caplog.at_level(logging.WARNING, logger="keyfleet.custody"):
        loaded = custody.load_private_key(FileKeyRef(path), role="device CA")
    assert loaded.public_key() == key.public_key()
    assert any("custody.file" in r.getMessage() and "device CA" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    assert custody.describe(FileKeyRef(path)) == f"file {path}"


def test_token_key_facts_are_the_public_facts_of_the_key(softhsm_token: SoftToken) -> None:
    """What ``keyfleet keys list`` reads of a token key: token, slot, label, CKA_ID and the
    public key, the one the token made; a missing key is ``token.not_found``."""
    ref = custody.parse_token_uri(softhsm_token.uri("inventory-key"))
    public = custody.generate_token_key(ref)
    facts = custody.token_key_facts(ref)
    assert facts.public_key == public
    assert (facts.token, facts.label, facts.key_id) == (
        softhsm_token.label, "inventory-key", b"inventory-key",
    )  # fmt: skip
    slots = [s.slot_id for s in custody._library(ref.module).get_slots(token_present=True)]
    assert facts.slot in slots
    with pytest.raises(CustodyError) as missing:
        custody.token_key_facts(custody.parse_token_uri(softhsm_token.uri("no-such-key")))
    assert missing.value.check == "token.not_found"
