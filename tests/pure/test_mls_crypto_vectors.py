"""RFC 9420 crypto-basics vector for cipher suite 2 through agent.protocol.mls.crypto
(tests/vectors/README.md has the provenance), plus round trips and refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from agent.protocol import hpke
from agent.protocol.errors import CryptoError, ProtocolError
from agent.protocol.mls import crypto, tls

pytestmark = pytest.mark.pure

VECTOR: dict[str, Any] = json.loads(
    (Path(__file__).parents[1] / "vectors" / "mls-crypto-basics-cs2.json").read_text()
)[0]


def _h(value: str) -> bytes:
    return bytes.fromhex(value)


def _private(scalar_hex: str) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int(scalar_hex, 16), ec.SECP256R1())


def test_vector_is_suite_2() -> None:
    assert VECTOR["cipher_suite"] == 2


def test_ref_hash() -> None:
    v = VECTOR["ref_hash"]
    assert crypto.ref_hash(v["label"].encode(), _h(v["value"])) == _h(v["out"])


def test_expand_with_label() -> None:
    v = VECTOR["expand_with_label"]
    out = crypto.expand_with_label(
        _h(v["secret"]), v["label"].encode(), _h(v["context"]), v["length"]
    )
    assert out == _h(v["out"])


def test_derive_secret() -> None:
    v = VECTOR["derive_secret"]
    assert crypto.derive_secret(_h(v["secret"]), v["label"].encode()) == _h(v["out"])


def test_derive_tree_secret() -> None:
    v = VECTOR["derive_tree_secret"]
    out = crypto.derive_tree_secret(
        _h(v["secret"]), v["label"].encode(), v["generation"], v["length"]
    )
    assert out == _h(v["out"])


def test_sign_with_label_given_signature_and_own() -> None:
    v = VECTOR["sign_with_label"]
    label, content = v["label"].encode(), _h(v["content"])
    priv = _private(v["priv"])
    pub = hpke.deserialize_public_key(_h(v["pub"]))
    assert hpke.serialize_public_key(priv.public_key()) == _h(v["pub"])
    crypto.verify_with_label(pub, label, content, _h(v["signature"]))
    own = crypto.sign_with_label(priv, label, content)
    crypto.verify_with_label(pub, label, content, own)
    with pytest.raises(CryptoError, match=r"mls\.signature"):
        crypto.verify_with_label(pub, label + b"x", content, _h(v["signature"]))
    with pytest.raises(CryptoError, match=r"mls\.signature"):
        crypto.verify_with_label(pub, label, content + b"x", own)
    with pytest.raises(CryptoError, match=r"mls\.signature"):
        crypto.verify_with_label(pub, label, content, b"\x30\x00")


def test_encrypt_with_label_given_ciphertext_and_round_trip() -> None:
    v = VECTOR["encrypt_with_label"]
    label, context = v["label"].encode(), _h(v["context"])
    priv = _private(v["priv"])
    assert hpke.serialize_public_key(priv.public_key()) == _h(v["pub"])
    plaintext = crypto.decrypt_with_label(
        priv, label, context, _h(v["kem_output"]), _h(v["ciphertext"])
    )
    assert plaintext == _h(v["plaintext"])
    pub = hpke.deserialize_public_key(_h(v["pub"]))
    kem_output, ciphertext = crypto.encrypt_with_label(pub, label, context, b"round trip")
    assert crypto.decrypt_with_label(priv, label, context, kem_output, ciphertext) == b"round trip"
    with pytest.raises(CryptoError):
        crypto.decrypt_with_label(priv, label, context + b"x", kem_output, ciphertext)
    with pytest.raises(CryptoError):
        crypto.decrypt_with_label(priv, b"Other", context, kem_output, ciphertext)


def test_derive_key_pair_is_hpke_derive_key_pair() -> None:
    secret = bytes(range(32))
    a, b = crypto.derive_key_pair(secret), hpke.derive_key_pair(secret)
    assert a.private_numbers() == b.private_numbers()


def test_extract_mac_hash_basics() -> None:
    # RFC 4231 test case 2 for HMAC-SHA256; RFC 5869 test case 3 (zero-length salt) for Extract.
    assert crypto.mac(b"Jefe", b"what do ya want for nothing?") == _h(
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    )
    assert crypto.extract(b"", bytes([0x0B] * 22)) == _h(
        "19ef24a32c717b167f33a91d6f648bdf96596776afdb6377ac434c1c293ccb04"
    )
    assert crypto.hash_(b"abc") == _h(
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_expand_length_out_of_range() -> None:
    with pytest.raises(CryptoError, match=r"mls\.expand-length"):
        crypto.expand_with_label(bytes(32), b"x", b"", 255 * 32 + 1)


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, "00"),
        (37, "25"),
        (63, "3f"),
        (64, "4040"),
        (15293, "7bbd"),
        (16383, "7fff"),
        (16384, "80004000"),
        (494878333, "9d7f3e7d"),
        ((1 << 30) - 1, "bfffffff"),
    ],
)
def test_varint_encoding(value: int, encoded: str) -> None:
    assert tls.varint(value) == _h(encoded)
    reader = tls.Reader(_h(encoded))
    assert reader.varint() == value
    reader.finish()


@pytest.mark.parametrize(
    "bad", ["", "40", "800000", "c0", "c000000000000000", "4025", "80000025", "80003fff"]
)
def test_varint_decoder_is_strict(bad: str) -> None:
    with pytest.raises(ProtocolError, match=r"tls\.decode"):
        tls.Reader(_h(bad)).varint()


def test_varint_encoder_range() -> None:
    with pytest.raises(ValueError):
        tls.varint(1 << 30)
    with pytest.raises(ValueError):
        tls.varint(-1)


def test_reader_opaque_and_trailing_bytes() -> None:
    encoded = tls.opaque_v(b"abc") + tls.uint16(7) + tls.uint32(8) + tls.uint64(9) + tls.uint8(1)
    reader = tls.Reader(encoded)
    assert (
        reader.opaque_v(),
        reader.uint16(),
        reader.uint32(),
        reader.uint64(),
        reader.uint8(),
    ) == (b"abc", 7, 8, 9, 1)
    reader.finish()
    reader = tls.Reader(tls.opaque_v(b"abc") + b"\x00")
    reader.opaque_v()
    with pytest.raises(ProtocolError, match="trailing"):
        reader.finish()
    with pytest.raises(ProtocolError, match="truncated"):
        tls.Reader(b"\x05abc").opaque_v()
    with pytest.raises(ValueError):
        tls.uint16(1 << 16)


@given(st.integers(min_value=0, max_value=tls.VARINT_MAX))
def test_varint_round_trip(value: int) -> None:
    reader = tls.Reader(tls.varint(value))
    assert reader.varint() == value
    reader.finish()


@given(st.binary(max_size=64))
def test_reader_refuses_garbage_only_with_protocol_error(data: bytes) -> None:
    reader = tls.Reader(data)
    try:
        value = reader.opaque_v()
        reader.finish()
    except ProtocolError as exc:
        assert exc.check == "tls.decode"
    else:
        assert tls.opaque_v(value) == data  # whatever decodes re-encodes to the same bytes
