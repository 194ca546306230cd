"""The TSS2 PRIVATE KEY codec on its own: round trips, strictness, Hypothesis on the decoder,
and a cross-check with openssl's ASN.1 parser."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.protocol.errors import StateError
from agent.tpm.blob import OID_LOADABLE_KEY, KeyBlob, PolicyCommand

pytestmark = pytest.mark.pure

PUBLIC = (4).to_bytes(2, "big") + b"\x00\x23\x00\x0b"
PRIVATE = (3).to_bytes(2, "big") + b"abc"


def sample(**overrides: object) -> KeyBlob:
    fields: dict[str, object] = {"public": PUBLIC, "private": PRIVATE}
    fields.update(overrides)
    return KeyBlob(**fields)  # type: ignore[arg-type]


def test_round_trip_pem_and_der() -> None:
    for blob in (
        sample(),
        sample(sealed=True, policy=(PolicyCommand(0x17F, b"\x00\x00xyz"),)),
        sample(empty_auth=False, parent=0x40000001),
    ):
        assert KeyBlob.from_pem(blob.to_pem()) == blob
        assert KeyBlob.from_der(blob.to_der()) == blob


def test_private_bytes_not_in_repr() -> None:
    assert "abc" not in repr(sample())


def test_truncations_are_refused() -> None:
    der = sample().to_der()
    for cut in range(len(der)):
        with pytest.raises(StateError, match="key blob is malformed"):
            KeyBlob.from_der(der[:cut])
    pem = sample().to_pem()
    with pytest.raises(StateError, match="truncated"):
        KeyBlob.from_pem(pem[: len(pem) // 2])


def test_trailing_and_foreign_data_refused() -> None:
    with pytest.raises(StateError, match="trailing"):
        KeyBlob.from_der(sample().to_der() + b"\x00")
    with pytest.raises(StateError, match="BEGIN TSS2 PRIVATE KEY"):
        KeyBlob.from_pem(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(StateError, match="base64"):
        KeyBlob.from_pem(
            b"-----BEGIN TSS2 PRIVATE KEY-----\n!!!!\n-----END TSS2 PRIVATE KEY-----\n"
        )
    with pytest.raises(StateError, match="TPM2B"):
        KeyBlob.from_der(sample(public=b"\x00\x09abc").to_der())


def test_wrong_oid_refused() -> None:
    der = sample().to_der()
    oid_bytes = bytes.fromhex("06066781050a0103")  # 2.23.133.10.1.3
    assert oid_bytes in der
    with pytest.raises(StateError, match="loadable TPM key"):
        KeyBlob.from_der(der.replace(oid_bytes, bytes.fromhex("06066781050a0104")))
    assert OID_LOADABLE_KEY == "2.23.133.10.1.3"


def test_openssl_asn1parse_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    sample(policy=(PolicyCommand(0x17F, b"\x00\x00"),)).save(path)
    out = subprocess.run(
        ["openssl", "asn1parse", "-in", str(path)], capture_output=True, text=True, check=True
    ).stdout
    assert "2.23.133.10.1.3" in out
    assert "BOOLEAN" in out and "INTEGER           :40000001" in out
    assert out.count("OCTET STRING") == 3  # policy parameters, pubkey, privkey


@given(st.binary(max_size=300))
def test_decoder_never_half_parses(data: bytes) -> None:
    try:
        blob = KeyBlob.from_der(data)
    except StateError:
        return
    assert blob.to_der() == data  # anything accepted is canonical DER


@given(
    st.binary(min_size=0, max_size=200),
    st.binary(min_size=0, max_size=200),
    st.integers(min_value=0, max_value=2**32 - 1),
    st.booleans(),
)
def test_round_trip_any_content(pub: bytes, priv: bytes, parent: int, sealed: bool) -> None:
    blob = KeyBlob(
        public=len(pub).to_bytes(2, "big") + pub,
        private=len(priv).to_bytes(2, "big") + priv,
        parent=parent,
        sealed=sealed,
    )
    assert KeyBlob.from_pem(blob.to_pem()) == blob


NAME = b"\x00\x0b" + bytes(range(32))


def test_parent_name_rides_in_the_description_field(tmp_path: Path) -> None:
    blob = sample(parent=0x81004B41, parent_name=NAME)
    assert KeyBlob.from_pem(blob.to_pem()) == blob
    der = blob.to_der()
    text = b"parent-name:" + NAME.hex().encode()
    assert bytes([0xA4, len(text) + 2, 0x0C, len(text)]) + text in der  # [4] UTF8String
    path = tmp_path / "key.pem"
    blob.save(path)
    out = subprocess.run(
        ["openssl", "asn1parse", "-in", str(path)], capture_output=True, text=True, check=True
    ).stdout
    assert "UTF8STRING" in out and NAME.hex() in out and "INTEGER           :81004B41" in out


@pytest.mark.parametrize(
    "text",
    [
        b"a key for the kitchen",  # any other description
        b"parent-name:" + NAME.hex().upper().encode(),  # not canonical
        b"parent-name:" + NAME[:-1].hex().encode(),  # not a SHA-256 Name
        b"parent-name:" + (b"\x00\x04" + NAME[2:22]).hex().encode(),  # SHA-1 Name
        b"parent-name:zz",
    ],
)
def test_other_descriptions_are_refused(text: bytes) -> None:
    der = sample(parent=0x81004B41, parent_name=NAME).to_der()
    good = b"parent-name:" + NAME.hex().encode()
    field = bytes([0xA4, len(good) + 2, 0x0C, len(good)]) + good
    other = bytes([0xA4, len(text) + 2, 0x0C, len(text)]) + text
    body = der[2:].replace(field, other) if der[1] < 0x80 else None
    if body is None:  # long-form outer length: rebuild it
        start = 2 + (der[1] & 0x7F)
        body = der[start:].replace(field, other)
    length = len(body)
    header = bytes([0x30, length]) if length < 0x80 else bytes([0x30, 0x81, length])
    with pytest.raises(StateError, match="key blob is malformed"):
        KeyBlob.from_der(header + body)
