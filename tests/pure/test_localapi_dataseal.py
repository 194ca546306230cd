"""The app data format (agent/protocol/dataseal.py) behind the local API's encrypt/decrypt."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocol.dataseal import DataHeader, open_sealed, parse_header, seal
from agent.protocol.errors import CryptoError, ProtocolError
from agent.protocol.secret import Secret

pytestmark = pytest.mark.pure

KEY = bytes(range(16))


def lookup(group: str, epoch: int) -> bytes:
    if (group, epoch) == ("g1", 7):
        return KEY
    if (group, epoch) == ("g1", 1):
        raise ProtocolError("data.epoch-expired", "gone")
    raise ProtocolError("data.epoch-unknown", "unknown")


def _check(exc: pytest.ExceptionInfo[ProtocolError]) -> str:
    return exc.value.check


def test_known_answer_layout() -> None:
    nonce = bytes(12)
    blob = seal("g1", 7, KEY, b"hello", rng=lambda n: nonce)
    header = b"KFD" + bytes([1, 2]) + b"g1" + (7).to_bytes(8, "big") + nonce
    assert blob == header + AESGCM(KEY).encrypt(nonce, b"hello", header)
    assert parse_header(blob) == (DataHeader("g1", 7, nonce), len(header))
    assert open_sealed(blob, lookup, expected_group="g1") == b"hello"


def test_secret_keys_and_random_nonces() -> None:
    a = seal("g1", 7, Secret(KEY), b"x")
    b = seal("g1", 7, Secret(KEY), b"x")
    assert a != b
    assert open_sealed(a, lookup) == open_sealed(b, lookup) == b"x"


def test_every_header_byte_and_tag_is_authenticated() -> None:
    blob = seal("g1", 7, KEY, b"payload")
    for i in range(len(blob)):
        tampered = bytearray(blob)
        tampered[i] ^= 0x01
        with pytest.raises(ProtocolError) as info:
            open_sealed(bytes(tampered), lookup)
        assert info.value.check in {
            "data.magic",
            "data.version",
            "data.truncated",
            "data.group",
            "data.epoch-unknown",
            "data.auth",
        }


def test_error_checks() -> None:
    blob = seal("g1", 7, KEY, b"payload")
    with pytest.raises(ProtocolError) as info:
        open_sealed(blob, lookup, expected_group="g2")
    assert _check(info) == "data.group-mismatch"
    with pytest.raises(ProtocolError) as info:
        open_sealed(seal("g1", 1, KEY, b"old"), lookup)
    assert _check(info) == "data.epoch-expired"
    with pytest.raises(ProtocolError) as info:
        open_sealed(seal("g9", 7, KEY, b"?"), lookup)
    assert _check(info) == "data.epoch-unknown"
    with pytest.raises(CryptoError) as cinfo:
        open_sealed(seal("g1", 7, os.urandom(16), b"other key"), lookup)
    assert cinfo.value.check == "data.auth"
    for bad in (b"", b"KF", b"XYZ\x01\x00", b"KFD\x02\x00" + bytes(40), blob[:-1][:30]):
        with pytest.raises(ProtocolError):
            open_sealed(bad, lookup)
    with pytest.raises(ProtocolError) as info:
        seal("bad/group", 7, KEY, b"")
    assert _check(info) == "data.group"
    with pytest.raises(ProtocolError) as info:
        seal("g1", 7, b"short", b"")
    assert _check(info) == "data.key"
    with pytest.raises(ProtocolError) as info:
        seal("g1", 7, KEY, bytes(1024 * 1024 + 1))
    assert _check(info) == "data.too-large"


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=80) | st.binary(max_size=40).map(lambda b: b"KFD\x01" + b))
def test_decoder_raises_only_protocol_errors(blob: bytes) -> None:
    try:
        open_sealed(blob, lookup)
    except ProtocolError:
        pass
    else:
        raise AssertionError("random bytes decrypted")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.from_regex(r"[a-z0-9][a-z0-9._-]{0,10}", fullmatch=True))
def test_round_trip(plaintext: bytes, group: str) -> None:
    blob = seal(group, 7, KEY, plaintext)
    assert open_sealed(blob, lambda g, e: KEY, expected_group=group) == plaintext
