"""The local API request decoder under Hypothesis: whatever arrives, it returns a well-typed
Request or raises ProtocolError; valid requests round-trip."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.localapi.protocol import (
    LENGTH,
    MAX_SEAL_SECRET,
    Request,
    decode_request,
    decode_response,
    encode_error,
    encode_ok,
    encode_request,
)
from agent.protocol.errors import ProtocolError
from agent.protocol.wire import cbor

pytestmark = pytest.mark.pure

_FIELD_TYPES = {"group": str, "name": str, "data": bytes, "secret": bytes}
_OPS = ["encrypt", "decrypt", "sign", "seal", "unseal", "list-keys"]


def _assert_well_typed(request: Request) -> None:
    assert request.op in _OPS
    for key, kind in _FIELD_TYPES.items():
        value = getattr(request, key)
        assert value is None or type(value) is kind


_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.text(max_size=12)
    | st.binary(max_size=12)
    | st.sampled_from(_OPS)
)
_value = st.recursive(
    _leaf,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=4) | st.integers(-5, 5), inner, max_size=3)
    ),
    max_leaves=10,
)
_request_like = st.dictionaries(
    st.sampled_from(["v", "op", "group", "name", "data", "secret", "x"]),
    _leaf,
    max_size=6,
)


@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=64),
        _value.map(cbor.encode),
        _request_like.map(cbor.encode),
        # deterministic requests with one byte flipped or cut short
        st.tuples(_request_like.map(cbor.encode), st.integers(0, 63), st.integers(1, 255)).map(
            lambda t: (
                t[0][: t[1]] + bytes([t[0][t[1] % max(len(t[0]), 1)] ^ t[2]]) + t[0][t[1] + 1 :]
            )
        ),
    )
)
def test_decoder_returns_a_typed_request_or_raises_protocol_error(payload: bytes) -> None:
    try:
        request = decode_request(payload)
    except ProtocolError as exc:
        assert exc.check.startswith(("cbor.", "api.", "data."))
    else:
        _assert_well_typed(request)


_valid = st.one_of(
    st.builds(
        Request,
        op=st.sampled_from(["encrypt", "decrypt"]),
        group=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True),
        data=st.binary(max_size=300),
    ),
    st.builds(Request, op=st.just("sign"), data=st.binary(max_size=300)),
    st.builds(
        Request,
        op=st.just("seal"),
        name=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True),
        secret=st.binary(min_size=1, max_size=MAX_SEAL_SECRET),
    ),
    st.builds(
        Request,
        op=st.just("unseal"),
        name=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True),
    ),
    st.just(Request("list-keys")),
)


@settings(max_examples=1000, deadline=None)
@given(_valid)
def test_valid_requests_round_trip(request: Request) -> None:
    framed = encode_request(request)
    (length,) = LENGTH.unpack_from(framed)
    assert length == len(framed) - LENGTH.size
    assert decode_request(framed[LENGTH.size :]) == request


@settings(max_examples=500, deadline=None)
@given(_value)
def test_responses_round_trip(result: object) -> None:
    try:
        framed = encode_ok(result)
    except ProtocolError:
        return  # values outside the wire model (e.g. int map keys out of range) are refused
    assert decode_response(framed[LENGTH.size :]) == result


def test_error_responses_raise_with_their_check() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_response(encode_error("data.auth", "tag")[LENGTH.size :])
    assert (info.value.check, info.value.reason) == ("data.auth", "tag")
    for bad in ({"ok": 1}, {"ok": True}, {"ok": False, "error": "x"}, [1]):
        with pytest.raises(ProtocolError) as info:
            decode_response(cbor.encode(bad))
        assert info.value.check == "api.response"
