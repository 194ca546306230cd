"""Quotes, TPM2_Certify and EK material from a real swtpm, verified by the pure helpers in
agent.protocol.attest (which issue no TPM command)."""

from __future__ import annotations

import hashlib
import os

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from agent.protocol.attest import parse_attest, tpm_name, verify_certify, verify_quote
from agent.protocol.errors import CryptoError, ProtocolError
from agent.tpm import Attestation, KeyKind, TPMStore
from tests.fixtures.swtpm import ManufacturerCA, Swtpm

pytestmark = pytest.mark.tpm

PCRS = (0, 1, 2, 3, 7, 16)


def test_quote_verifies_with_nonce_and_pcr_digest(swtpm: Swtpm) -> None:
    nonce = os.urandom(32)
    with TPMStore(swtpm.tcti) as store, store.create_and_load(KeyKind.AK) as ak:
        store.pcr_extend(7, hashlib.sha256(b"bootloader").digest())
        values = store.pcr_read(PCRS)
        quote = store.quote(ak, nonce, PCRS)
    info = verify_quote(quote, ak.public_key(), nonce, values)
    assert info.nonce == nonce
    assert info.pcrs == PCRS
    assert info.pcr_digest == hashlib.sha256(b"".join(values[i] for i in PCRS)).digest()
    assert bytes(parse_attest(quote.attest).extraData) == nonce


def test_quote_refusals(swtpm: Swtpm) -> None:
    nonce = os.urandom(32)
    with TPMStore(swtpm.tcti) as store, store.create_and_load(KeyKind.AK) as ak:
        values = store.pcr_read(PCRS)
        quote = store.quote(ak, nonce, PCRS)
    with pytest.raises(ProtocolError) as wrong_nonce:
        verify_quote(quote, ak.public_key(), os.urandom(32), values)
    assert wrong_nonce.value.check == "tpm.attest.nonce"
    other_values = dict(values)
    other_values[7] = hashlib.sha256(b"evil").digest()
    with pytest.raises(ProtocolError) as wrong_pcrs:
        verify_quote(quote, ak.public_key(), nonce, other_values)
    assert wrong_pcrs.value.check == "tpm.quote.pcr-digest"
    with pytest.raises(ProtocolError) as fewer:
        verify_quote(quote, ak.public_key(), nonce, {i: values[i] for i in PCRS[:-1]})
    assert fewer.value.check == "tpm.quote.pcr-select"
    other_ak = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(CryptoError) as bad_sig:
        verify_quote(quote, other_ak, nonce, values)
    assert bad_sig.value.check == "tpm.attest.signature"
    tampered = Attestation(quote.attest[:-1] + bytes([quote.attest[-1] ^ 1]), quote.signature)
    with pytest.raises(CryptoError):
        verify_quote(tampered, ak.public_key(), nonce, values)


def test_certify_names_the_devid_and_shows_fixed_tpm(swtpm: Swtpm) -> None:
    nonce = os.urandom(16)
    with (
        TPMStore(swtpm.tcti) as store,
        store.create_and_load(KeyKind.AK) as ak,
        store.create_and_load(KeyKind.DEVID) as dev,
    ):
        certify = store.certify(ak, dev, nonce)
        # with two keys loaded, creating a third needs the store to swap one out
        leaf_blob = store.create_key(KeyKind.LEAF)
    info = verify_certify(certify, ak.public_key(), nonce, dev.public_area)
    assert info.name == tpm_name(dev.public_area) == dev.name
    assert len(info.name) == 34 and info.name[:2] == b"\x00\x0b"
    with pytest.raises(ProtocolError) as other_key:
        verify_certify(certify, ak.public_key(), nonce, leaf_blob.public)
    assert other_key.value.check == "tpm.certify.name"
    with pytest.raises(ProtocolError) as wrong_nonce:
        verify_certify(certify, ak.public_key(), b"x" * 16, dev.public_area)
    assert wrong_nonce.value.check == "tpm.attest.nonce"


def test_ek_certificates_match_ek_public_keys(
    swtpm: Swtpm, manufacturer_ca: ManufacturerCA
) -> None:
    with TPMStore(swtpm.tcti) as store:
        rsa_ek = store.ek_public_key("rsa")
        ecc_ek = store.ek_public_key("ecc")
        rsa_cert = store.ek_certificate("rsa")
        ecc_cert = store.ek_certificate("ecc")
    assert isinstance(rsa_ek, rsa.RSAPublicKey) and rsa_ek.key_size == 2048
    assert isinstance(ecc_ek, ec.EllipticCurvePublicKey)
    assert isinstance(ecc_ek.curve, ec.SECP384R1)
    assert rsa_cert.public_key() == rsa_ek
    assert ecc_cert.public_key() == ecc_ek
    issuer = manufacturer_ca.issuer_cert()
    for cert in (rsa_cert, ecc_cert):
        assert cert.issuer == issuer.subject
        issuer_key = issuer.public_key()
        assert isinstance(issuer_key, rsa.RSAPublicKey)
        assert cert.signature_hash_algorithm is not None
        issuer_key.verify(
            cert.signature,
            cert.tbs_certificate_bytes,
            padding.PKCS1v15(),
            cert.signature_hash_algorithm,
        )
