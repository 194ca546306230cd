"""Hypothesis on the serial deframer and the message decoders (10,000 inputs each): arbitrary
bytes never raise and never yield a payload without a valid CRC; frames separated by arbitrary
noise all come through, in order; COBS round-trips."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.protocol.errors import ProtocolError
from agent.serial_link import (
    Deframer,
    cobs_decode,
    cobs_encode,
    decode_frame,
    decode_request,
    decode_response,
    encode_frame,
    max_encoded_size,
)

pytestmark = pytest.mark.pure

FUZZ = settings(
    max_examples=10_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(st.binary(max_size=2048))
def test_cobs_round_trip(data: bytes) -> None:
    encoded = cobs_encode(data)
    assert 0 not in encoded
    assert len(encoded) <= len(data) + len(data) // 254 + 1
    assert cobs_decode(encoded) == data


def _reference(stream: bytes, max_payload: int) -> list[bytes]:
    """What a deframer must return: every complete delimiter-ended segment that decodes."""
    expected = []
    for segment in stream.split(b"\x00")[:-1]:
        if not segment:
            continue
        with contextlib.suppress(ProtocolError):
            expected.append(decode_frame(segment, max_payload=max_payload))
    return expected


frame_or_junk = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=120).map(lambda p: encode_frame(p, max_payload=256)),
    st.binary(max_size=120).map(lambda p: encode_frame(p, max_payload=256)[:-3]),
)


@FUZZ
@given(st.lists(frame_or_junk, max_size=10), st.lists(st.integers(1, 64), max_size=20))
def test_deframer_matches_the_reference_on_arbitrary_bytes(
    chunks: list[bytes], cuts: list[int]
) -> None:
    deframer = Deframer(max_payload=256)
    stream = b"".join(chunks)
    received: list[bytes] = []
    position = 0
    for cut in cuts:
        received += deframer.feed(stream[position : position + cut])
        position += cut
        assert len(deframer._buffer) <= max_encoded_size(256)
    received += deframer.feed(stream[position:])
    assert received == _reference(stream, 256)


noise_without_delimiter = st.binary(max_size=40).map(lambda b: b.replace(b"\x00", b"\x5a"))


@FUZZ
@given(
    st.lists(st.tuples(st.binary(max_size=200), noise_without_delimiter), min_size=1, max_size=6),
    st.binary(max_size=40),
    st.integers(1, 97),
)
def test_frames_survive_noise_between_them(
    frames: list[tuple[bytes, bytes]], leading_noise: bytes, chunk: int
) -> None:
    stream = leading_noise + b"".join(encode_frame(p) + noise for p, noise in frames)
    deframer = Deframer()
    received: list[bytes] = []
    for i in range(0, len(stream), chunk):
        received += deframer.feed(stream[i : i + chunk])
    # noise after the last frame has no delimiter yet, so nothing of it is returned; noise
    # could only add a payload if it were valid COBS carrying a matching CRC-32
    assert received == [p for p, _ in frames]


@FUZZ
@given(st.binary(max_size=512))
def test_message_decoders_raise_only_protocol_errors(data: bytes) -> None:
    for decoder in (decode_request, decode_response):
        with contextlib.suppress(ProtocolError):
            decoder(data)
