"""RFC 9180 Appendix A.3.1 vectors (tests/vectors/README.md has the provenance)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hpke as pyca_hpke
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol import hpke
from agent.protocol.errors import CryptoError

pytestmark = pytest.mark.pure

ENTRIES = [
    entry
    for entry in json.loads(
        (
            Path(__file__).resolve().parents[1]
            / "vectors"
            / "rfc9180-dhkem-p256-hkdf-sha256-aes128gcm-base.json"
        ).read_text()
    )
    if (entry["mode"], entry["kem_id"], entry["kdf_id"], entry["aead_id"]) == (0, 0x10, 1, 1)
]
VECTOR = ENTRIES[0]


def h(name: str) -> bytes:
    return bytes.fromhex(VECTOR[name])


def test_the_shipped_file_has_our_suite() -> None:
    assert len(ENTRIES) == 1


def _scalar(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_numbers().private_value.to_bytes(32, "big")


def test_derive_key_pair_from_ikm() -> None:
    assert _scalar(hpke.derive_key_pair(h("ikmE"))) == h("skEm")
    recipient = hpke.derive_key_pair(h("ikmR"))
    assert _scalar(recipient) == h("skRm")
    assert hpke.serialize_public_key(recipient.public_key()) == h("pkRm")


def test_encap_with_fixed_ephemeral_and_decap() -> None:
    pk_r = hpke.deserialize_public_key(h("pkRm"))
    shared_secret, enc = hpke.encap(pk_r, rng=lambda n: h("ikmE"))
    assert enc == h("enc")
    assert shared_secret == h("shared_secret")
    sk_r = hpke.derive_key_pair(h("ikmR"))
    assert hpke.decap(enc, sk_r) == h("shared_secret")


def test_key_schedule_encryptions_and_exports() -> None:
    sk_r = hpke.derive_key_pair(h("ikmR"))
    enc, sender = hpke.setup_base_s(sk_r.public_key(), h("info"), rng=lambda n: h("ikmE"))
    receiver = hpke.setup_base_r(enc, sk_r, h("info"))
    for ctx in (sender, receiver):
        assert ctx.key == h("key")
        assert ctx.base_nonce == h("base_nonce")
        assert ctx.exporter_secret == h("exporter_secret")
    for entry in VECTOR["encryptions"]:
        sender.seq = receiver.seq = entry["seq"]
        aad, pt, ct = (bytes.fromhex(entry[k]) for k in ("aad", "pt", "ct"))
        assert sender.seal(aad, pt) == ct
        assert receiver.open(aad, ct) == pt
    for entry in VECTOR["exports"]:
        out = receiver.export(bytes.fromhex(entry["exporter_context"]), entry["L"])
        assert out == bytes.fromhex(entry["exported_value"])


def test_interoperates_with_cryptography_hpke() -> None:
    """Both directions against pyca's independent implementation of the same suite (empty aad,
    since its single-shot API has none; enc || ct is its wire form)."""
    suite = pyca_hpke.Suite(
        pyca_hpke.KEM.P256, pyca_hpke.KDF.HKDF_SHA256, pyca_hpke.AEAD.AES_128_GCM
    )
    sk_r = ec.generate_private_key(ec.SECP256R1())
    theirs = suite.encrypt(b"from pyca", sk_r.public_key(), info=b"keyfleet")
    enc, ct = theirs[: hpke.N_ENC], theirs[hpke.N_ENC :]
    assert hpke.open_(enc, sk_r, b"keyfleet", b"", ct) == b"from pyca"
    enc, ct = hpke.seal(sk_r.public_key(), b"keyfleet", b"", b"from keyfleet")
    assert suite.decrypt(enc + ct, sk_r, info=b"keyfleet") == b"from keyfleet"


def test_open_refuses_tampering_and_garbage() -> None:
    sk_r = ec.generate_private_key(ec.SECP256R1())
    enc, ct = hpke.seal(sk_r.public_key(), b"info", b"aad", b"hello")
    with pytest.raises(CryptoError, match=r"hpke\.open"):
        hpke.open_(enc, sk_r, b"info", b"aad", ct[:-1] + bytes([ct[-1] ^ 1]))
    with pytest.raises(CryptoError, match=r"hpke\.open"):
        hpke.open_(enc, sk_r, b"other", b"aad", ct)
    with pytest.raises(CryptoError, match=r"hpke\.public-key"):
        hpke.open_(b"\x04" + bytes(64), sk_r, b"info", b"aad", ct)
    with pytest.raises(CryptoError, match=r"hpke\.public-key"):
        hpke.open_(enc[:-1], sk_r, b"info", b"aad", ct)
    pem = sk_r.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert b"PRIVATE" in pem  # the software key is exportable; TPM keys are tested in test_tpm_*
