"""Serial link: COBS, frames, message strictness, the device's reply cache and the station's
retries, in process (a fake line joins a SerialClient to a DeviceLink)."""

from __future__ import annotations

import struct
import zlib
from typing import Any

import pytest

from agent.protocol.errors import ProtocolError, TransportError
from agent.protocol.wire import cbor
from agent.serial_link import (
    MAX_PAYLOAD,
    Deframer,
    DeviceLink,
    Request,
    Response,
    SerialClient,
    cobs_decode,
    cobs_encode,
    decode_frame,
    decode_request,
    decode_response,
    encode_frame,
    encode_request,
    encode_response,
    max_encoded_size,
)

pytestmark = pytest.mark.pure


# ---- COBS -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "encoded"),
    [
        # examples from the COBS paper / Wikipedia's table
        (b"", b"\x01"),
        (b"\x00", b"\x01\x01"),
        (b"\x00\x00", b"\x01\x01\x01"),
        (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
        (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
        (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
        (bytes(range(1, 255)), b"\xff" + bytes(range(1, 255)) + b"\x01"),
        (bytes(range(0, 255)), b"\x01\xff" + bytes(range(1, 255)) + b"\x01"),
        (bytes(range(1, 256)), b"\xff" + bytes(range(1, 255)) + b"\x02\xff"),
    ],
)
def test_cobs_known_encodings(raw: bytes, encoded: bytes) -> None:
    assert cobs_encode(raw) == encoded
    assert cobs_decode(encoded) == raw


@pytest.mark.parametrize("bad", [b"\x00", b"\x03\x11", b"\x02\x00", b"\x05\x11\x00\x33\x44"])
def test_cobs_refuses_malformed(bad: bytes) -> None:
    with pytest.raises(ProtocolError) as err:
        cobs_decode(bad)
    assert err.value.check == "serial.frame.cobs"


# ---- frames -----------------------------------------------------------------------------------


def test_frame_round_trip_and_layout() -> None:
    payload = b"\x00hello\x00world" * 40
    frame = encode_frame(payload)
    assert frame[0] == 0 and frame[-1] == 0 and 0 not in frame[1:-1]
    raw = cobs_decode(frame[1:-1])
    assert raw[:-4] == payload
    assert struct.unpack(">I", raw[-4:])[0] == zlib.crc32(payload)
    assert decode_frame(frame[1:-1]) == payload


def test_frame_crc_mismatch_is_refused() -> None:
    body = bytearray(encode_frame(b"abc")[1:-1])
    body[2] ^= 0x40
    with pytest.raises(ProtocolError) as err:
        decode_frame(bytes(body))
    assert err.value.check == "serial.frame.crc"


def test_frame_size_limit_applies_before_decoding() -> None:
    with pytest.raises(ProtocolError) as err:
        encode_frame(bytes(101), max_payload=100)
    assert err.value.check == "serial.frame.size"
    # a body that is not even COBS is refused for its size, not its content
    with pytest.raises(ProtocolError) as err:
        decode_frame(b"\x00" * (max_encoded_size(100) + 1), max_payload=100)
    assert err.value.check == "serial.frame.size"
    assert decode_frame(encode_frame(bytes(100), max_payload=100)[1:-1], max_payload=100)


def test_deframer_resyncs_after_garbage_half_frames_and_crc_errors() -> None:
    deframer = Deframer()
    good = [encode_frame(b"one"), encode_frame(b"two"), encode_frame(b"three")]
    corrupt = bytearray(encode_frame(b"lost"))
    corrupt[3] ^= 0x01
    stream = (
        b"\xde\xad\xbe\xef"  # line noise
        + good[0]
        + good[1][: len(good[1]) // 2]  # a half frame: the device reset mid-write
        + bytes(corrupt)
        + b"\x00\x00\x00"
        + good[2]
    )
    payloads: list[bytes] = []
    for i in range(0, len(stream), 3):  # arbitrary chunking
        payloads += deframer.feed(stream[i : i + 3])
    assert payloads == [b"one", b"three"]
    assert deframer.errors["serial.frame.crc"] >= 1
    assert sum(deframer.errors.values()) >= 2


def test_deframer_bounds_its_buffer_on_a_stream_without_delimiters() -> None:
    deframer = Deframer(max_payload=64)
    for _ in range(100):
        assert deframer.feed(b"\x01" * 1000) == []
    assert len(deframer._buffer) <= max_encoded_size(64)
    assert deframer.errors["serial.frame.size"] == 1
    # the first delimiter ends the oversized junk; the next frame is read normally
    assert deframer.feed(b"\x00" + encode_frame(b"ok", max_payload=64)) == [b"ok"]


# ---- messages ---------------------------------------------------------------------------------


def test_request_and_response_round_trip() -> None:
    request = Request(id=7, op="identity", args={"nonce": b"\x01" * 16})
    assert decode_request(encode_request(request)) == request
    ok = Response(id=7, ok=True, result={"serial": "abc"})
    assert decode_response(encode_response(ok)) == ok
    refused = Response(id=7, ok=False, check="factory.locked", reason="locked")
    assert decode_response(encode_response(refused)) == refused
    with pytest.raises(ProtocolError) as err:
        decode_response(encode_response(refused)).raise_for_refusal()
    assert err.value.check == "factory.locked"


@pytest.mark.parametrize(
    "value",
    [
        {"v": 1, "id": 1, "op": "x"},  # missing args
        {"v": 1, "id": 1, "op": "x", "args": {}, "extra": 0},
        {"v": 2, "id": 1, "op": "x", "args": {}},
        {"v": 1, "id": -1, "op": "x", "args": {}},
        {"v": 1, "id": 1 << 63, "op": "x", "args": {}},
        {"v": 1, "id": 1, "op": "", "args": {}},
        {"v": 1, "id": 1, "op": "x" * 65, "args": {}},
        {"v": 1, "id": 1, "op": "x", "args": {1: 2}},
        {"v": 1, "id": 1, "op": "x", "args": []},
        [1, 2, 3],
    ],
)
def test_request_decoder_is_strict(value: Any) -> None:
    with pytest.raises(ProtocolError) as err:
        decode_request(cbor.encode(value))
    assert err.value.check == "serial.message"


def test_request_decoder_refuses_noncanonical_cbor() -> None:
    # {"v": 1, ...} with the integer 1 written in two bytes (0x18 0x01)
    good = encode_request(Request(id=1, op="x", args={}))
    bad = good.replace(b"\x61v\x01", b"\x61v\x18\x01", 1)
    assert bad != good
    with pytest.raises(ProtocolError) as err:
        decode_request(bad)
    assert err.value.check.startswith("cbor.")


@pytest.mark.parametrize(
    "value",
    [
        {"v": 1, "id": 1, "ok": 1, "result": {}},
        {"v": 1, "id": 1, "ok": True},
        {"v": 1, "id": 1, "ok": True, "result": {}, "check": "x"},
        {"v": 1, "id": 1, "ok": False, "check": "x"},
        {"v": 1, "id": 1, "ok": False, "check": "", "reason": "r"},
        {"v": 1, "ok": True, "result": {}},
    ],
)
def test_response_decoder_is_strict(value: Any) -> None:
    with pytest.raises(ProtocolError) as err:
        decode_response(cbor.encode(value))
    assert err.value.check == "serial.message"


# ---- device link and station client over a fake line ------------------------------------------


class FakeLine:
    """A serial port for the station whose far end is a DeviceLink run in the same thread.
    ``drop_replies`` loses that many replies (the device executed, the answer never arrived);
    ``noise`` is prepended to every chunk the device sends."""

    def __init__(self, link: DeviceLink, *, drop_replies: int = 0, noise: bytes = b"") -> None:
        self.link = link
        self.timeout: float | None = None
        self.drop_replies = drop_replies
        self.noise = noise
        self._pending = b""
        self.written: list[bytes] = []

    def write(self, data: bytes, /) -> int:
        self.written.append(data)
        reply = self.link.receive(data)
        if reply and self.drop_replies:
            self.drop_replies -= 1
            return len(data)
        self._pending += self.noise + reply
        return len(data)

    def flush(self) -> None:
        return None

    def read(self, size: int = 1) -> bytes:
        data, self._pending = self._pending[:size], self._pending[size:]
        return data


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == "fail":
            raise ProtocolError("factory.test", "refused on purpose")
        if op == "boom":
            raise RuntimeError("secret-ish internal detail")
        self.calls += 1
        return {"calls": self.calls, "echo": args.get("x", b"")}


def test_call_returns_result_and_refusals_keep_their_check_id() -> None:
    handler = Counter()
    client = SerialClient(FakeLine(DeviceLink(handler)), timeout=0.2, retries=0)
    assert client.call("count", {"x": b"\x00\x01"}) == {"calls": 1, "echo": b"\x00\x01"}
    with pytest.raises(ProtocolError) as err:
        client.call("fail")
    assert err.value.check == "factory.test"
    with pytest.raises(ProtocolError) as err:
        client.call("boom")
    assert err.value.check == "factory.internal"
    assert "secret-ish" not in err.value.reason


def test_lost_reply_is_retried_and_answered_from_the_cache_without_running_twice() -> None:
    handler = Counter()
    link = DeviceLink(handler)
    line = FakeLine(link, drop_replies=1)
    client = SerialClient(line, timeout=0.05, retries=2)
    assert client.call("count") == {"calls": 1, "echo": b""}
    assert handler.calls == 1  # executed once although sent twice
    assert link.executed == 1 and link.replayed == 1
    assert len(line.written) == 2 and line.written[0] == line.written[1]  # same id, same bytes


def test_same_id_with_different_content_is_a_new_request() -> None:
    handler = Counter()
    link = DeviceLink(handler)
    first = encode_frame(encode_request(Request(id=5, op="count", args={"x": b"a"})))
    second = encode_frame(encode_request(Request(id=5, op="count", args={"x": b"b"})))
    link.receive(first)
    link.receive(second)
    assert handler.calls == 2


def test_silence_is_a_transport_error_after_every_retry() -> None:
    class DeadLine(FakeLine):
        def write(self, data: bytes, /) -> int:
            self.written.append(data)
            return len(data)

    line = DeadLine(DeviceLink(Counter()))
    client = SerialClient(line, timeout=0.03, retries=2)
    with pytest.raises(TransportError, match=r"serial\.timeout"):
        client.call("count")
    assert len(line.written) == 3


def test_stale_and_noisy_replies_are_skipped() -> None:
    handler = Counter()
    line = FakeLine(DeviceLink(handler), noise=b"\x13\x37\x00garbage")
    stale = encode_frame(encode_response(Response(id=12345, ok=True, result={"calls": 99})))
    line._pending = stale
    client = SerialClient(line, timeout=0.2, retries=0)
    assert client.call("count")["calls"] == 1
    assert client.stale_responses == 1


def test_undecodable_request_is_dropped_not_answered() -> None:
    link = DeviceLink(Counter())
    assert link.receive(encode_frame(b"\xff\xff")) == b""
    assert link.receive(encode_frame(cbor.encode({"v": 1}))) == b""
    assert link.refused_messages == 2
    assert link.executed == 0


def test_reply_cache_is_bounded() -> None:
    handler = Counter()
    link = DeviceLink(handler, cache_size=2)
    frames = [encode_frame(encode_request(Request(id=i, op="count", args={}))) for i in range(3)]
    for frame in frames:
        link.receive(frame)
    link.receive(frames[0])  # evicted: runs again
    link.receive(frames[2])  # still cached
    assert handler.calls == 4


def test_max_payload_constant_is_sane() -> None:
    assert max_encoded_size() > MAX_PAYLOAD
