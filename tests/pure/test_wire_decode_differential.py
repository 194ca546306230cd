"""The strict decoders against an independent one (cbor2 with its strictest options) and against
each other, on random valid inputs and on their mutations; and a list of malformed inputs aimed
at the short ways the decoders take (the common heads of the scan, the fixed layout of a
COSE_Sign1 of the profile), each refused with the check id of the general way.

- CBOR: whatever ``cbor.decode`` accepts, cbor2 decodes to the same value, and it is the
  deterministic encoding of that value; whatever cbor2 refuses or reads as something else,
  ``cbor.decode`` refuses.
- COSE: ``decode_sign1`` (the fixed layout read in place, else the general parse) and the
  general parse alone give the same result or the same check id, and an accepted message is
  what cbor2 reads in it.
"""

from __future__ import annotations

import contextlib

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.protocol.errors import ProtocolError
from agent.protocol.wire import cbor, cose

pytestmark = pytest.mark.pure

KEY = ec.derive_private_key(0x5EED, ec.SECP256R1())
KID = cose.key_id(KEY.public_key())
PROTECTED = cose.protected_header(KID)

SETTINGS = settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_scalars = (
    st.integers(min_value=-(1 << 64), max_value=(1 << 64) - 1)
    | st.binary(max_size=40)
    | st.text(max_size=30)
    | st.booleans()
    | st.none()
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.integers(-300, 300) | st.text(max_size=4), inner, max_size=5)
    ),
    max_leaves=30,
)


@st.composite
def _mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` with a few bytes changed, removed, inserted, or cut short (or unchanged)."""
    data = bytearray(base)
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["set", "flip", "delete", "insert", "cut"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "insert" or not data:
            data.insert(at, draw(st.integers(0, 255)))
        elif kind == "set":
            data[at] = draw(st.integers(0, 255))
        elif kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "delete":
            del data[at]
        else:
            del data[at:]
    return bytes(data)


def _cbor2(data: bytes) -> tuple[bool, object]:
    """cbor2's strictest reading: (accepted, value)."""
    try:
        return True, cbor2.loads(
            data, allow_indefinite=False, allow_duplicate_keys=False, str_errors="strict"
        )
    except Exception:
        return False, None


def _same_cbor_value(a: object, b: object) -> bool:
    """Equal, and of the same types all the way down (cbor2 would make a tag an object, an
    undefined value a singleton: neither equals anything the wire decoder returns)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        assert isinstance(b, list)
        return len(a) == len(b) and all(_same_cbor_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        assert isinstance(b, dict)
        return list(a) == list(b) and all(_same_cbor_value(a[k], b[k]) for k in a)
    return a == b


def _check_cbor(data: bytes) -> None:
    accepted, theirs = _cbor2(data)
    try:
        ours = cbor.decode(data)
    except ProtocolError:
        if accepted:
            # cbor2 may accept what is outside the wire model or not deterministic: then the
            # deterministic encoding of what it read is not these bytes (or cannot be made)
            with contextlib.suppress(ProtocolError):
                assert cbor.encode(theirs) != data
        return
    assert accepted, "the wire decoder accepted what cbor2 refuses"
    assert _same_cbor_value(ours, theirs)
    assert cbor.encode(ours) == data


@given(st.data())
@SETTINGS
def test_cbor_decode_accepts_what_cbor2_reads_as_its_deterministic_encoding(
    data: st.DataObject,
) -> None:
    encoded = cbor.encode(data.draw(_values))
    _check_cbor(encoded)
    _check_cbor(data.draw(_mutated(encoded)))


@given(st.binary(max_size=24))
@SETTINGS
def test_cbor_decode_on_random_bytes(data: bytes) -> None:
    _check_cbor(data)


def _outcome(parse: object, data: bytes) -> tuple[str, object]:
    assert callable(parse)
    try:
        found = parse(data)
    except ProtocolError as err:
        return "refused", err.check
    assert isinstance(found, cose.Sign1)
    return "accepted", found


def _general(data: bytes) -> cose.Sign1:
    """The general parse alone (``decode_sign1`` without the fixed layout read in place)."""
    if len(data) > cbor.DEFAULT_MAX_SIZE:
        raise ProtocolError("cbor.size", "over the limit")
    return cose._parse(data, cbor.DEFAULT_MAX_SIZE)


# payload sizes at every boundary of a byte-string head (one byte, +1, +2, +4)
_PAYLOAD_SIZES = st.sampled_from([0, 1, 23, 24, 25, 255, 256, 257, 65535, 65536, 65537]) | (
    st.integers(0, 600)
)


@given(st.data())
@SETTINGS
def test_decode_sign1_and_the_general_parse_agree(data: st.DataObject) -> None:
    size = data.draw(_PAYLOAD_SIZES)
    payload = data.draw(st.binary(min_size=min(size, 64), max_size=min(size, 64)))
    payload = (payload * (size // max(len(payload), 1) + 1))[:size] if payload else bytes(size)
    signature = data.draw(st.binary(min_size=64, max_size=64))
    valid = b"\xd2" + cbor.encode([PROTECTED, {}, payload, signature])
    for message in (valid, data.draw(_mutated(valid))):
        ours = _outcome(cose.decode_sign1, message)
        assert ours == _outcome(_general, message)
        if ours[0] == "accepted":
            read = cbor2.loads(message)
            assert isinstance(read, cbor2.CBORTag)
            assert read.tag == cose.COSE_SIGN1_TAG
            protected, unprotected, body, sig = read.value
            assert unprotected == {}
            header = cbor2.loads(protected)
            assert list(header) == [cose.HEADER_ALG, cose.HEADER_KID]
            assert header[cose.HEADER_ALG] == cose.ALG_ES256
            assert ours[1] == cose.Sign1(protected, header[cose.HEADER_KID], body, sig)
    if size <= 600:
        assert _outcome(cose.decode_sign1, valid) == (
            "accepted",
            cose.Sign1(PROTECTED, KID, payload, signature),
        )


def test_a_signed_message_is_read_in_place_and_verifies() -> None:
    data = cose.sign1(b"\x01" * 300, KEY)
    found = cose._profile_form(data)
    assert found is not None
    assert found == cose._parse(data, cbor.DEFAULT_MAX_SIZE)
    cose.verify_sign1(found, KEY.public_key())
    cose.verify_sign1(found, KEY.public_key(), kid=KID)


def test_a_kid_given_for_another_key_is_refused() -> None:
    found = cose.decode_sign1(cose.sign1(b"x", KEY))
    other = ec.derive_private_key(0x0DD, ec.SECP256R1()).public_key()
    with pytest.raises(ProtocolError) as err:
        cose.verify_sign1(found, KEY.public_key(), kid=cose.key_id(other))
    assert err.value.check == "cose.kid-mismatch"


# -- malformed inputs aimed at the short ways -----------------------------------------------

SIG = bytes(range(64))


def _layout(payload_head: bytes, payload: bytes, *, tail: bytes = b"\x58\x40" + SIG) -> bytes:
    return b"\xd2\x84\x58\x26" + PROTECTED + b"\xa0" + payload_head + payload + tail


CBOR_REFUSALS = [
    # small containers as values: announced items beyond the bytes, nesting past the limit
    ("83", "cbor.truncated"),
    ("8301", "cbor.truncated"),
    ("a2", "cbor.truncated"),
    ("a201", "cbor.truncated"),
    ("81" * 16 + "a0", "cbor.depth"),
    ("a16161" * 16 + "80", "cbor.depth"),
    ("a16161" * 16 + "a1616101", "cbor.depth"),
    # containers, byte strings and simple values as keys
    ("a18000", "cbor.key-type"),
    ("a1a000", "cbor.key-type"),
    ("a14000", "cbor.key-type"),
    ("a1f400", "cbor.key-type"),
    ("a1f900", "cbor.type"),
    # short text: truncated, invalid UTF-8 (as key and as value, before a later problem)
    ("636161", "cbor.truncated"),
    ("6261", "cbor.truncated"),
    ("a162c3280001", "cbor.utf8"),
    ("8261c3c0", "cbor.utf8"),
    ("82ff61c3", "cbor.type"),
    ("a16161c000", "cbor.tag"),
    # key order and duplicates after the short ways
    ("a2616201616101", "cbor.noncanonical"),
    ("a2026161010000", "cbor.trailing"),
    ("a2616101616102", "cbor.malformed"),
    ("a220000100", "cbor.noncanonical"),
    ("a20020", "cbor.truncated"),
    ("820102ff", "cbor.trailing"),
]


@pytest.mark.parametrize(("hexed", "check"), CBOR_REFUSALS)
def test_cbor_refusals_on_the_short_ways(hexed: str, check: str) -> None:
    data = bytes.fromhex(hexed)
    with pytest.raises(ProtocolError) as err:
        cbor.decode(data)
    assert err.value.check == check
    _check_cbor(data)


def test_valid_utf8_beyond_ascii_is_accepted() -> None:
    value = {"ключ": ["é", "中文", "😀" * 10], "a": "ascii"}
    assert cbor.decode(cbor.encode(value)) == value


COSE_REFUSALS = [
    (_layout(b"\x58\x05", b"12345"), "cbor.noncanonical"),
    (_layout(b"\x59\x00\x05", b"12345"), "cbor.noncanonical"),
    (_layout(b"\x5a\x00\x00\x00\x05", b"12345"), "cbor.noncanonical"),
    (_layout(b"\x5b" + (5).to_bytes(8, "big"), b"12345"), "cbor.noncanonical"),
    (_layout(b"\x45", b"1234"), "cbor.trailing"),
    (_layout(b"\x45", b"123456"), "cbor.trailing"),
    (_layout(b"\x45", b"12345", tail=b"\x58\x40" + SIG[:63]), "cbor.truncated"),
    (_layout(b"\x45", b"12345", tail=b"\x58\x40" + SIG + b"\x00"), "cbor.trailing"),
    (_layout(b"\x45", b"12345", tail=b"\x58\x3f" + SIG[:63]), "cose.signature"),
    (_layout(b"\x45", b"12345", tail=b"\x59\x00\x40" + SIG), "cbor.noncanonical"),
    (_layout(b"\x65", b"12345"), "cose.malformed"),
    (_layout(b"\x5f", b"12345"), "cbor.indefinite"),
    (_layout(b"\x59\x00", b""), "cbor.truncated"),
    (_layout(b"\x45", b"12345", tail=b""), "cbor.truncated"),
    (_layout(b"", b""), "cbor.truncated"),
    (_layout(b"\x45", b"12345").replace(b"\xa0", b"\xa1\x04\x00", 1), "cose.header"),
    (_layout(b"\x45", b"12345").replace(b"\xa0", b"\x80", 1), "cose.header"),
]


@pytest.mark.parametrize(("data", "check"), COSE_REFUSALS)
def test_cose_refusals_on_the_fixed_layout(data: bytes, check: str) -> None:
    assert cose._profile_form(data) is None
    with pytest.raises(ProtocolError) as err:
        cose.decode_sign1(data)
    assert err.value.check == check
