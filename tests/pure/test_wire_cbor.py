"""Deterministic CBOR encoding and the strict decoder: RFC 8949 examples, one test per refusal,
and proof that the size limit and the structural scan run before cbor2 sees the bytes."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocol.errors import ProtocolError
from agent.protocol.wire import cbor

pytestmark = pytest.mark.pure

# RFC 8949 Appendix A (the examples inside the wire data model).
RFC8949_EXAMPLES: list[tuple[object, str]] = [
    (0, "00"),
    (1, "01"),
    (10, "0a"),
    (23, "17"),
    (24, "1818"),
    (25, "1819"),
    (100, "1864"),
    (1000, "1903e8"),
    (1000000, "1a000f4240"),
    (1000000000000, "1b000000e8d4a51000"),
    (18446744073709551615, "1bffffffffffffffff"),
    (-18446744073709551616, "3bffffffffffffffff"),
    (-1, "20"),
    (-10, "29"),
    (-100, "3863"),
    (-1000, "3903e7"),
    (False, "f4"),
    (True, "f5"),
    (None, "f6"),
    (b"", "40"),
    (b"\x01\x02\x03\x04", "4401020304"),
    ("", "60"),
    ("a", "6161"),
    ("IETF", "6449455446"),
    ('"\\', "62225c"),
    ("\u00fc", "62c3bc"),
    ("\u6c34", "63e6b0b4"),
    ("\U00010151", "64f0908591"),
    ([], "80"),
    ([1, 2, 3], "83010203"),
    ([1, [2, 3], [4, 5]], "8301820203820405"),
    (list(range(1, 26)), "98190102030405060708090a0b0c0d0e0f101112131415161718181819"),
    ({}, "a0"),
    ({1: 2, 3: 4}, "a201020304"),
    ({"a": 1, "b": [2, 3]}, "a26161016162820203"),
    (["a", {"b": "c"}], "826161a161626163"),
    (
        {"a": "A", "b": "B", "c": "C", "d": "D", "e": "E"},
        "a56161614161626142616361436164614461656145",
    ),
]


@pytest.mark.parametrize(("value", "hexed"), RFC8949_EXAMPLES)
def test_rfc8949_examples_round_trip(value: object, hexed: str) -> None:
    assert cbor.encode(value).hex() == hexed
    assert cbor.decode(bytes.fromhex(hexed)) == value


def test_map_keys_sorted_bytewise_not_length_first() -> None:
    # RFC 8949 §4.2.1's own example order (restricted to keys our data model allows).
    value = {"aa": 0, "z": 0, -1: 0, 100: 0, 10: 0}
    encoded = cbor.encode(value)
    assert encoded.hex() == "a5" + "0a00" + "186400" + "2000" + "617a00" + "62616100"
    # cbor2's canonical=True orders these length-first (-1 before 100): that form is refused.
    import cbor2

    length_first = cbor2.dumps(value, canonical=True)
    assert length_first != encoded
    with pytest.raises(ProtocolError) as err:
        cbor.decode(length_first)
    assert err.value.check == "cbor.noncanonical"


def test_tuple_encodes_as_array_and_insertion_order_does_not_matter() -> None:
    assert cbor.encode((1, 2)) == cbor.encode([1, 2])
    assert cbor.encode({"b": 1, "a": 2}) == cbor.encode({"a": 2, "b": 1})


@pytest.mark.parametrize(
    "value",
    [1.0, float("nan"), {1, 2}, 1 << 64, -(1 << 64) - 1, bytearray(b"x"), object(), 1j],
    ids=repr,
)
def test_encoder_refuses_values_outside_the_data_model(value: object) -> None:
    with pytest.raises(ProtocolError) as err:
        cbor.encode(value)
    assert err.value.check == "cbor.type"


@pytest.mark.parametrize("key", [b"k", True, None, (1,), 1 << 64], ids=repr)
def test_encoder_refuses_bad_map_keys(key: object) -> None:
    with pytest.raises(ProtocolError) as err:
        cbor.encode({key: 1})
    assert err.value.check in {"cbor.key-type", "cbor.type"}


def test_encoder_refuses_too_deep_nesting() -> None:
    value: object = []
    for _ in range(cbor.MAX_DEPTH):
        value = [value]
    with pytest.raises(ProtocolError) as err:
        cbor.encode(value)
    assert err.value.check == "cbor.depth"


REFUSALS: list[tuple[str, str]] = [
    ("", "cbor.truncated"),
    ("18", "cbor.truncated"),
    ("1b0000", "cbor.truncated"),
    ("6261", "cbor.truncated"),
    ("8201", "cbor.truncated"),
    ("a101", "cbor.truncated"),
    ("0102", "cbor.trailing"),
    ("a0a0", "cbor.trailing"),
    ("5f4101ff", "cbor.indefinite"),
    ("7f6161ff", "cbor.indefinite"),
    ("9f01ff", "cbor.indefinite"),
    ("bf0101ff", "cbor.indefinite"),
    ("1f", "cbor.indefinite"),
    ("ff", "cbor.type"),
    ("f93c00", "cbor.type"),
    ("fa47c35000", "cbor.type"),
    ("fb3ff199999999999a", "cbor.type"),
    ("f7", "cbor.type"),
    ("e0", "cbor.type"),
    ("f820", "cbor.type"),
    ("c11a514b67b0", "cbor.tag"),
    ("d28440a0f640", "cbor.tag"),
    ("c249010000000000000000", "cbor.tag"),
    ("d9010280", "cbor.tag"),
    ("81c0", "cbor.tag"),
    ("a14000", "cbor.key-type"),
    ("a18000", "cbor.key-type"),
    ("a1a000", "cbor.key-type"),
    ("a1f500", "cbor.key-type"),
    ("a1f600", "cbor.key-type"),
    ("62ff00", "cbor.utf8"),
    ("61c3", "cbor.utf8"),
    ("1c", "cbor.malformed"),
    ("3d", "cbor.malformed"),
    ("1817", "cbor.noncanonical"),
    ("190001", "cbor.noncanonical"),
    ("3800", "cbor.noncanonical"),
    ("5800", "cbor.noncanonical"),
    ("780161", "cbor.noncanonical"),
    ("980101", "cbor.noncanonical"),
    ("a202000100", "cbor.noncanonical"),
    ("a26161011903e802", "cbor.noncanonical"),
    ("a201000100", "cbor.malformed"),
    # Huge announced lengths: refused by the scan without allocating anything.
    ("5bffffffffffffffff", "cbor.truncated"),
    ("7b7fffffffffffffff00", "cbor.truncated"),
    ("9bffffffffffffffff", "cbor.truncated"),
    ("bbffffffffffffffff", "cbor.truncated"),
    ("9a7fffffff01", "cbor.truncated"),
    ("81" * 17 + "00", "cbor.depth"),
]


@pytest.mark.parametrize(("hexed", "check"), REFUSALS)
def test_decoder_refusals(hexed: str, check: str) -> None:
    with pytest.raises(ProtocolError) as err:
        cbor.decode(bytes.fromhex(hexed))
    assert err.value.check == check


def test_sixteen_levels_are_accepted() -> None:
    data = bytes.fromhex("81" * 15 + "80")
    value = cbor.decode(data)
    assert cbor.encode(value) == data


def test_decoder_refuses_non_bytes() -> None:
    for value in (bytearray(b"\x01"), memoryview(b"\x01"), "01"):
        with pytest.raises(ProtocolError) as err:
            cbor.decode(value)  # type: ignore[arg-type]
        assert err.value.check == "cbor.type"


def test_oversize_is_refused_before_any_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_run(*args: object, **kwargs: object) -> object:
        raise AssertionError("decoder ran on oversize input")

    monkeypatch.setattr(cbor, "scan", must_not_run)
    monkeypatch.setattr(cbor.cbor2, "loads", must_not_run)
    data = cbor.encode(b"x" * 100)
    with pytest.raises(ProtocolError) as err:
        cbor.decode(data, max_size=len(data) - 1)
    assert err.value.check == "cbor.size"


def test_structural_refusals_happen_before_cbor2(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_run(*args: object, **kwargs: object) -> object:
        raise AssertionError("cbor2 ran on input the scan must refuse")

    monkeypatch.setattr(cbor.cbor2, "loads", must_not_run)
    for hexed, check in REFUSALS:
        if check in {"cbor.noncanonical", "cbor.malformed"} and hexed not in {"1c", "3d"}:
            continue
        with pytest.raises(ProtocolError) as err:
            cbor.decode(bytes.fromhex(hexed))
        assert err.value.check == check


def test_decoded_values_re_encode_identically() -> None:
    value = {"body": {"n": [1, -1, b"\x00", "t", None, True, False, {}]}, 7: []}
    data = cbor.encode(value)
    assert cbor.decode(data) == value
    assert cbor.encode(cbor.decode(data)) == data


# -- the scan's canonical checks agree with re-encoding -----------------------------------------

_scalars = (
    st.integers(min_value=-(1 << 64), max_value=(1 << 64) - 1)
    | st.binary(max_size=300)
    | st.text(max_size=30)
    | st.booleans()
    | st.none()
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.integers(-300, 300) | st.text(max_size=3), inner, max_size=5)
    ),
    max_leaves=20,
)


def _head(major: int, argument: int, longer: int) -> bytes:
    """A head for ``argument``, ``longer`` forms wider than the shortest when one fits."""
    forms = [(24, 1), (25, 2), (26, 4), (27, 8)]
    fitting = [(info, width) for info, width in forms if argument < 1 << (8 * width)]
    if argument < 24 and longer == 0:
        return bytes([major << 5 | argument])
    shortest = 0 if argument >= 24 else -1
    info, width = fitting[min(len(fitting) - 1, shortest + longer)]
    return bytes([major << 5 | info]) + argument.to_bytes(width, "big")


def _loose(value: object, draw: st.DrawFn) -> bytes:
    """An encoding of ``value`` that may use long heads and any map order."""

    def head(major: int, argument: int) -> bytes:
        return _head(major, argument, draw(st.sampled_from([0, 0, 0, 1])))

    if value is None or type(value) is bool:
        return cbor.encode(value)
    if type(value) is int:
        return head(0, value) if value >= 0 else head(1, -1 - value)
    if type(value) is bytes:
        return head(2, len(value)) + value
    if type(value) is str:
        raw = value.encode()
        return head(3, len(raw)) + raw
    if type(value) is list:
        return head(4, len(value)) + b"".join(_loose(v, draw) for v in value)
    assert type(value) is dict
    items = list(value.items())
    items = draw(st.permutations(items)) if draw(st.booleans()) else items
    items.sort(key=lambda kv: cbor.encode(kv[0])) if draw(st.booleans()) else None
    return head(5, len(items)) + b"".join(_loose(k, draw) + _loose(v, draw) for k, v in items)


@given(st.data())
@settings(max_examples=400, deadline=None)
def test_the_scan_refuses_exactly_what_re_encoding_would(data: st.DataObject) -> None:
    value = data.draw(_values)
    encoded = _loose(value, data.draw)
    again = cbor.encode(cbor2.loads(encoded))
    if again == encoded:
        assert cbor.encode(cbor.decode(encoded)) == encoded
    else:
        with pytest.raises(ProtocolError) as err:
            cbor.decode(encoded)
        assert err.value.check == "cbor.noncanonical"
