"""The measured-boot event log format (agent.protocol.eventlog): the documented byte layout, round
trips, the TPM extend rule in replay, and every refusal by check id."""

from __future__ import annotations

import hashlib

import pytest

from agent.protocol.errors import ProtocolError
from agent.protocol.eventlog import (
    MAX_EVENT_LOG_SIZE,
    MAX_EVENTS,
    EventLog,
    EventType,
    MeasurementEvent,
    decode_event_log,
    encode_event_log,
    extend,
    replay,
)
from agent.protocol.wire import cbor

pytestmark = pytest.mark.pure

DIGEST = bytes(range(32))
# The example of docs/attestation.md, byte for byte.
DOC_EXAMPLE = bytes.fromhex(
    "a3"  # map(3)
    "6176"
    "01"  # "v": 1
    "63616c67"
    "66736861323536"  # "alg": "sha256"
    "666576656e7473"
    "81"  # "events": array(1)
    "85"
    "04"
    "01"  # [ pcr 4, type 1 (image),
    "666b65726e656c"
    "63312e30"  # "kernel", "1.0",
    "5820" + DIGEST.hex()  # h'00 01 .. 1f' ]
)


def event(pcr: int = 4, name: str = "kernel", digest: bytes = DIGEST) -> MeasurementEvent:
    return MeasurementEvent(pcr, EventType.IMAGE, name, "1.0", digest)


def refused(data: bytes) -> str:
    with pytest.raises(ProtocolError) as info:
        decode_event_log(data)
    return info.value.check


def test_encoding_is_the_documented_bytes() -> None:
    log = EventLog((event(),))
    assert encode_event_log(log) == DOC_EXAMPLE
    assert decode_event_log(DOC_EXAMPLE) == log


def test_round_trip_of_several_events() -> None:
    log = EventLog(
        (
            MeasurementEvent(0, EventType.IMAGE, "bootloader", "2.1-rc1", b"\x01" * 32),
            MeasurementEvent(1, EventType.CONFIG, "boot-config", "2.1-rc1", b"\x02" * 32),
            MeasurementEvent(4, EventType.IMAGE, "kernel", "6.1.0+kf", b"\x03" * 32),
        )
    )
    assert decode_event_log(log.encode()) == log
    assert decode_event_log(EventLog().encode()) == EventLog()


def test_replay_is_the_tpm_extend_rule_from_zeros() -> None:
    a, b, c = (hashlib.sha256(x).digest() for x in (b"a", b"b", b"c"))
    log = EventLog((event(0, "one", a), event(4, "two", b), event(0, "three", c)))
    values = replay(log, [0, 4, 7])
    zero = bytes(32)
    assert values[0] == hashlib.sha256(hashlib.sha256(zero + a).digest() + c).digest()
    assert values[4] == extend(zero, b) == hashlib.sha256(zero + b).digest()
    assert values[7] == zero  # selected but never extended: still the reset value
    assert set(replay(log, [4])) == {4}  # events of unselected PCRs are not replayed
    # order matters: extend is not commutative
    swapped = EventLog((event(0, "three", c), event(4, "two", b), event(0, "one", a)))
    assert replay(swapped, [0])[0] != values[0]
    with pytest.raises(ProtocolError) as bad:
        replay(log, [24])
    assert bad.value.check == "eventlog.bounds"


def test_structural_refusals() -> None:
    good = cbor.decode(DOC_EXAMPLE)
    assert isinstance(good, dict)

    def variant(**changes: object) -> bytes:
        return cbor.encode({**good, **changes})

    assert refused(variant(v=2)) == "eventlog.version"
    assert refused(variant(v="1")) == "eventlog.malformed"
    assert refused(variant(alg="sha1")) == "eventlog.alg"
    assert refused(variant(alg=b"sha256")) == "eventlog.malformed"
    assert refused(variant(events={})) == "eventlog.malformed"
    assert refused(variant(extra=1)) == "eventlog.malformed"
    assert refused(cbor.encode({"v": 1, "alg": "sha256"})) == "eventlog.malformed"
    assert refused(cbor.encode([1, "sha256", []])) == "eventlog.malformed"

    def one(ev: list[object]) -> bytes:
        return variant(events=[ev])

    ok: list[object] = [4, 1, "kernel", "1.0", DIGEST]
    assert refused(one(ok[:4])) == "eventlog.malformed"
    assert refused(one([*ok, 0])) == "eventlog.malformed"
    assert refused(one([24, 1, "kernel", "1.0", DIGEST])) == "eventlog.bounds"
    assert refused(one([4, 3, "kernel", "1.0", DIGEST])) == "eventlog.bounds"
    assert refused(one([4, 0, "kernel", "1.0", DIGEST])) == "eventlog.bounds"
    assert refused(one([4, 1, "Kernel", "1.0", DIGEST])) == "eventlog.bounds"
    assert refused(one([4, 1, "", "1.0", DIGEST])) == "eventlog.bounds"
    assert refused(one([4, 1, "k" * 33, "1.0", DIGEST])) == "eventlog.bounds"
    assert refused(one([4, 1, "kernel", "1.0 beta", DIGEST])) == "eventlog.bounds"
    assert refused(one([4, 1, "kernel", "", DIGEST])) == "eventlog.bounds"
    assert refused(one([4, 1, "kernel", "1.0", DIGEST[:31]])) == "eventlog.bounds"
    assert refused(one([4, 1, "kernel", "1.0", DIGEST + b"\0"])) == "eventlog.bounds"
    assert refused(one([4, 1, "kernel", "1.0", DIGEST.hex()])) == "eventlog.malformed"
    assert refused(one([-1, 1, "kernel", "1.0", DIGEST])) == "eventlog.bounds"
    assert refused(one(["4", 1, "kernel", "1.0", DIGEST])) == "eventlog.malformed"
    assert refused(one([4, True, "kernel", "1.0", DIGEST])) == "eventlog.malformed"
    assert refused(one([4, 1, b"kernel", "1.0", DIGEST])) == "eventlog.malformed"
    assert refused(variant(events=[[[4]]])) == "eventlog.cbor"  # nesting beyond the format


def test_cbor_strictness_and_size_limit_before_decoding() -> None:
    assert refused(DOC_EXAMPLE + b"\x00") == "eventlog.cbor"  # trailing bytes
    assert refused(DOC_EXAMPLE[:-1]) == "eventlog.cbor"  # truncated
    # "v" written as a one-byte-argument integer (0x18 0x01): not the deterministic encoding
    long_form = DOC_EXAMPLE.replace(b"\x61\x76\x01", b"\x61\x76\x18\x01", 1)
    assert refused(long_form) == "eventlog.cbor"
    assert refused(b"") == "eventlog.cbor"
    oversize = b"\xff" * (MAX_EVENT_LOG_SIZE + 1)
    assert refused(oversize) == "eventlog.size"  # 0xff alone would be eventlog.cbor
    with pytest.raises(ProtocolError) as not_bytes:
        decode_event_log(bytearray(DOC_EXAMPLE))  # type: ignore[arg-type]
    assert not_bytes.value.check == "eventlog.malformed"


def test_event_count_limit() -> None:
    many = [event(4, f"c{i}").to_cbor() for i in range(MAX_EVENTS + 1)]
    data = cbor.encode({"v": 1, "alg": "sha256", "events": many})
    assert len(data) <= MAX_EVENT_LOG_SIZE
    assert refused(data) == "eventlog.bounds"
    with pytest.raises(ProtocolError):
        EventLog(tuple(event(4, f"c{i}") for i in range(MAX_EVENTS + 1)))
    at_limit = cbor.encode({"v": 1, "alg": "sha256", "events": many[:-1]})
    assert len(decode_event_log(at_limit).events) == MAX_EVENTS


def test_events_validate_on_construction() -> None:
    with pytest.raises(ProtocolError):
        MeasurementEvent(4, EventType.IMAGE, "kernel", "1.0", b"short")
    with pytest.raises(ProtocolError):
        MeasurementEvent(4, 1, "kernel", "1.0", DIGEST)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        MeasurementEvent(True, EventType.IMAGE, "kernel", "1.0", DIGEST)
