"""Hypothesis: the event log decoder meets 12,000 malformed inputs (random bytes, bit flips,
truncations and insertions in valid logs, random CBOR structures shaped almost like a log) and
answers every one with a clean ProtocolError (eventlog.*) or, when the input happens to be a
valid log, a result that re-encodes to exactly the input."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.protocol.errors import ProtocolError
from agent.protocol.eventlog import EventLog, EventType, MeasurementEvent, decode_event_log
from agent.protocol.wire import cbor

pytestmark = pytest.mark.pure

FUZZ = settings(
    max_examples=4_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def check(data: bytes) -> None:
    try:
        log = decode_event_log(data)
    except ProtocolError as exc:
        assert exc.check.startswith("eventlog."), exc.check
        return
    assert log.encode() == data


names = st.from_regex(r"[a-z][a-z0-9-]{0,31}", fullmatch=True)
versions = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,15}", fullmatch=True)
events = st.builds(
    MeasurementEvent,
    pcr=st.integers(0, 23),
    event_type=st.sampled_from(EventType),
    component=names,
    version=versions,
    digest=st.binary(min_size=32, max_size=32),
)
valid_logs = st.lists(events, max_size=8).map(lambda evs: EventLog(tuple(evs)).encode())


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(valid_logs))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        if action == "cut":
            data = data[: draw(st.integers(0, len(data)))]
        elif action == "insert":
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif data:
            at = draw(st.integers(0, len(data) - 1))
            if action == "flip":
                data[at] ^= 1 << draw(st.integers(0, 7))
            else:
                del data[at]
    return bytes(data)


leaves = (
    st.integers(-(2**64), 2**64 - 1)
    | st.binary(max_size=40)
    | st.text(max_size=40)
    | st.booleans()
    | st.none()
)
cbor_values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5), inner, max_size=5)
    ),
    max_leaves=20,
)
event_like = st.lists(
    st.integers(-2, 30) | names | versions | st.binary(min_size=30, max_size=34) | cbor_values,
    min_size=3,
    max_size=6,
)
log_like = st.fixed_dictionaries(
    {
        "v": st.sampled_from([1, 1, 1, 0, 2, "1"]),
        "alg": st.sampled_from(["sha256", "sha256", "sha1", "SHA256"]),
        "events": st.lists(event_like, max_size=4) | cbor_values,
    },
    optional={"x": cbor_values},
)


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    check(data)


@FUZZ
@given(mutated())
def test_mutated_valid_logs(data: bytes) -> None:
    check(data)


@FUZZ
@given(log_like | cbor_values)
def test_structures_almost_like_a_log(value: object) -> None:
    check(cbor.encode(value))
