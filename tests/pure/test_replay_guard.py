"""The replay guard's time-span window (operators, whose seqs are clock readings) and its
capacity floor: reordered seqs inside the window are accepted, every replay is still refused
(exactness against a record of everything ever accepted), forgotten seqs stay refused, memory is
bounded, state round-trips strictly and version 1 state (stored before the capacity existed)
still loads. Then the service: one operator's commands arriving out of order by seconds are all
taken, and an operator guard stored by the previous version is widened without re-opening a seq
it refused."""

from __future__ import annotations

import copy
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocol.errors import ProtocolError, StateError
from agent.protocol.wire import cbor, cose
from agent.protocol.wire.envelope import Signer, VerifiedMessage, encode_message, open_message
from agent.protocol.wire.messages.operator import Rekey
from agent.protocol.wire.messages.result import ResultStatus
from agent.protocol.wire.replay import (
    DEFAULT_CAPACITY,
    DEFAULT_WINDOW,
    MAX_CAPACITY,
    PACKED_VERSION,
    STATE_VERSION,
    ReplayGuard,
)
from provisioning.db.runtime import ReplayState
from provisioning.service import store
from tests.pure.test_service_core import Fleet, create_g1, make_fleet
from tests.pure.test_wire_envelope import state_refused
from tests.service_members import rekey

pytestmark = pytest.mark.pure

NOW = 1_700_000_000
US = 1_000_000
KEY = ec.derive_private_key(11, ec.SECP256R1())
OTHER_KEY = ec.derive_private_key(22, ec.SECP256R1())
SIGNERS = {
    cose.key_id(KEY.public_key()): Signer("op-a", KEY.public_key()),
    cose.key_id(OTHER_KEY.public_key()): Signer("op-b", OTHER_KEY.public_key()),
}
OPERATOR_WINDOW = store.operator_replay_window(300)

_made: dict[tuple[str, int, int], VerifiedMessage] = {}


def message(seq: int, variant: int = 0, sender: str = "op-a") -> VerifiedMessage:
    """A verified command from ``sender`` under ``seq``; ``variant`` picks which command (other
    variants are other messages under the same seq). Cached: signing is the slow part."""
    found = _made.get((sender, seq, variant))
    if found is None:
        body = Rekey(command_id=variant.to_bytes(16, "big"), group_id="g1")
        key = KEY if sender == "op-a" else OTHER_KEY
        data = encode_message(body, key=key, sender=sender, to="service", seq=seq, time=NOW)
        found = open_message(data, SIGNERS.__getitem__, now=NOW, recipients={"service"})
        _made[(sender, seq, variant)] = found
    return found


def snapshot(guard: ReplayGuard) -> bytes:
    return cbor.encode(guard.to_cbor_map())


def refusal(guard: ReplayGuard, msg: VerifiedMessage) -> str | None:
    """The check id ``accept`` refuses ``msg`` with (``check`` agreeing, neither changing the
    state), or None after accepting it."""
    before = snapshot(guard)
    try:
        guard.check(msg)
    except ProtocolError as err:
        assert snapshot(guard) == before
        with pytest.raises(ProtocolError) as again:
            guard.accept(msg)
        assert again.value.check == err.check
        assert snapshot(guard) == before
        return err.check
    assert snapshot(guard) == before
    guard.accept(msg)
    return None


# -- the operator window ----------------------------------------------------------------------


def test_operator_window_spans_the_envelope_freshness_in_microseconds() -> None:
    # max_age 300 s + max_future 60 s + the second the envelope's time truncates
    assert store.operator_replay_window(300) == 361 * US
    assert store.operator_replay_window(300, 0) == 301 * US
    guard = ReplayGuard(OPERATOR_WINDOW)
    assert guard.capacity == DEFAULT_CAPACITY
    assert ReplayGuard().capacity == DEFAULT_WINDOW == 32


@settings(max_examples=40, deadline=None)
@given(
    offsets=st.lists(
        st.integers(min_value=0, max_value=OPERATOR_WINDOW - 1),
        min_size=2,
        max_size=40,
        unique=True,
    ),
    data=st.data(),
)
def test_reordered_clock_seqs_inside_the_window_are_all_accepted_and_never_twice(
    offsets: list[int], data: st.DataObject
) -> None:
    base = NOW * US
    order = data.draw(st.permutations(offsets))
    guard = ReplayGuard(OPERATOR_WINDOW)
    for offset in order:
        assert refusal(guard, message(base + offset)) is None
    assert guard.highest_seq("op-a") == base + max(offsets)
    assert guard.remembered("op-a") == len(offsets)
    for offset in data.draw(st.permutations(offsets)):
        assert refusal(guard, message(base + offset)) == "replay.duplicate"
        assert refusal(guard, message(base + offset, variant=1)) == "replay.seq-reused"
    assert refusal(guard, message(base + max(offsets) - OPERATOR_WINDOW)) == "replay.seq-old"


def test_counting_senders_keep_the_window_of_32() -> None:
    guard = ReplayGuard()
    assert refusal(guard, message(100)) is None
    assert refusal(guard, message(69)) is None  # 100 - 31: inside
    assert refusal(guard, message(68)) == "replay.seq-old"  # 100 - 32
    assert refusal(guard, message(69)) == "replay.duplicate"


# -- exactness against a record of everything accepted ----------------------------------------

OPS = st.lists(
    st.tuples(st.integers(min_value=0, max_value=60), st.integers(min_value=0, max_value=1)),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(
    window=st.integers(min_value=1, max_value=70),
    capacity=st.integers(min_value=1, max_value=12),
    ops=OPS,
)
def test_no_seq_is_ever_accepted_twice_and_nothing_is_lost_within_capacity(
    window: int, capacity: int, ops: list[tuple[int, int]]
) -> None:
    guard = ReplayGuard(window, capacity)
    accepted: dict[int, int] = {}  # seq -> variant: every seq the guard ever took
    highest: int | None = None
    for seq, variant in ops:
        check = refusal(guard, message(seq, variant))
        if seq in accepted:
            # exact: a replay is refused, named precisely while the guard remembers the seq
            assert check in ("replay.duplicate", "replay.seq-reused", "replay.seq-old")
            if check != "replay.seq-old":
                same = accepted[seq] == variant
                assert check == ("replay.duplicate" if same else "replay.seq-reused")
        elif len(accepted) < capacity and (
            highest is None or seq > highest - window
        ):  # nothing forgotten yet and inside the window: must be taken
            assert check is None, (seq, check)
        else:
            assert check in (None, "replay.seq-old")
        if check is None:
            accepted[seq] = variant
            highest = seq if highest is None else max(highest, seq)
        assert guard.remembered("op-a") <= capacity
        assert guard.highest_seq("op-a") == highest
        # what the state says it holds, it still holds after a round trip
        again = ReplayGuard.from_cbor_map(cbor.decode(snapshot(guard)))
        assert snapshot(again) == snapshot(guard)


@settings(max_examples=100, deadline=None)
@given(
    first=OPS,
    bounds=st.lists(
        st.tuples(st.integers(min_value=1, max_value=70), st.integers(min_value=1, max_value=12)),
        min_size=1,
        max_size=3,
    ),
    then=OPS,
)
def test_resizing_between_messages_never_lets_a_seq_in_twice(
    first: list[tuple[int, int]], bounds: list[tuple[int, int]], then: list[tuple[int, int]]
) -> None:
    """The service resizes stored guards (window 32 to an operator's, a changed max_age):
    whatever the bounds before and after, no seq is taken twice."""
    guard = ReplayGuard(*bounds[0])
    accepted: set[int] = set()
    for step, ops in enumerate([first, then]):
        if step:
            for window, capacity in bounds[1:] or bounds:
                lowest = guard.lowest_seq("op-a")
                guard = guard.resized(window, capacity)
                assert (guard.window, guard.capacity) == (window, capacity)
                after = guard.lowest_seq("op-a")
                # what was refused as old stays refused as old
                assert (lowest, after) == (None, None) or (
                    lowest is not None and after is not None and after >= lowest
                )
        for seq, variant in ops:
            if refusal(guard, message(seq, variant)) is None:
                assert seq not in accepted, seq
                accepted.add(seq)
            assert guard.remembered("op-a") <= guard.capacity


def test_capacity_evicts_the_lowest_and_raises_the_floor_above_it() -> None:
    guard = ReplayGuard(window=1000, capacity=4)
    for seq in (10, 20, 30, 40):
        assert refusal(guard, message(seq)) is None
    assert guard.lowest_seq("op-a") == 0
    assert refusal(guard, message(50)) is None
    assert guard.remembered("op-a") == 4
    assert guard.lowest_seq("op-a") == 11  # 10 was forgotten: it and everything below refused
    assert refusal(guard, message(10)) == "replay.seq-old"
    assert refusal(guard, message(5)) == "replay.seq-old"
    assert refusal(guard, message(20)) == "replay.duplicate"  # still remembered
    # An unseen seq above the floor but below everything remembered is taken, and is the one
    # forgotten at once: the floor rises above it, so it cannot come again.
    assert refusal(guard, message(15)) is None
    assert guard.lowest_seq("op-a") == 16
    assert refusal(guard, message(15)) == "replay.seq-old"
    assert refusal(guard, message(60)) is None
    assert refusal(guard, message(20)) == "replay.seq-old"
    # senders are apart
    assert refusal(guard, message(1, sender="op-b")) is None


def test_memory_is_bounded_by_the_capacity() -> None:
    guard = ReplayGuard(OPERATOR_WINDOW)
    base = NOW * US
    for i in range(3 * DEFAULT_CAPACITY):
        guard.accept(message(base + i * 1000))
    assert guard.remembered("op-a") == DEFAULT_CAPACITY
    state = guard.to_cbor_map()
    senders = state["senders"]
    assert isinstance(senders, dict)
    assert len(senders["op-a"]["recent"]) == DEFAULT_CAPACITY
    # about 45 bytes per remembered seq: the service's row for a busy operator stays small
    assert len(snapshot(guard)) < 50 * DEFAULT_CAPACITY
    highest = base + (3 * DEFAULT_CAPACITY - 1) * 1000
    # the last one forgotten was highest - 1024 * 1000: the floor is just above it
    assert guard.lowest_seq("op-a") == highest - DEFAULT_CAPACITY * 1000 + 1
    with pytest.raises(ValueError):
        ReplayGuard(OPERATOR_WINDOW, MAX_CAPACITY + 1)
    with pytest.raises(ValueError):
        ReplayGuard(0)


# -- state -----------------------------------------------------------------------------------


def busy_guard() -> ReplayGuard:
    guard = ReplayGuard(window=1000, capacity=4)
    for seq in (10, 20, 30, 40, 50, 15):
        guard.accept(message(seq))
    guard.accept(message(7, sender="op-b"))
    guard.advance_epoch("g1", 3)
    return guard


def test_state_round_trips_with_capacity_and_floor() -> None:
    guard = busy_guard()
    state = guard.to_cbor_map()
    assert state["v"] == STATE_VERSION == 2
    again = ReplayGuard.from_cbor_map(cbor.decode(cbor.encode(state)))
    assert snapshot(again) == snapshot(guard)
    assert (again.window, again.capacity) == (1000, 4)
    assert again.lowest_seq("op-a") == 16
    assert again.epoch("g1") == 3
    for seq in (10, 15, 16, 20, 50, 51):
        assert refusal(copy.deepcopy(again), message(seq)) == refusal(
            copy.deepcopy(guard), message(seq)
        )


def test_state_is_strict() -> None:
    state = busy_guard().to_cbor_map()

    def broken(mutate: object) -> None:
        state_refused(state, mutate)

    op_a = ("senders", "op-a")

    def entry(s: dict[str, dict[str, dict[str, object]]]) -> dict[str, object]:
        return s[op_a[0]][op_a[1]]

    broken(lambda s: s.update(v=1))  # version 1 has no capacity
    broken(lambda s: s.update(v=3))
    broken(lambda s: s.update(capacity=0))
    broken(lambda s: s.update(capacity=MAX_CAPACITY + 1))
    broken(lambda s: s.update(capacity=True))
    broken(lambda s: s.update(window=0))
    broken(lambda s: s.update(window=1 << 64))
    broken(lambda s: s.pop("capacity"))
    broken(lambda s: entry(s).pop("min"))
    broken(lambda s: entry(s).update(min=-1))
    broken(lambda s: entry(s).update(min=51))  # above the highest
    broken(lambda s: entry(s).update(min=21))  # a remembered seq below the floor
    broken(lambda s: entry(s).update(highest=1 << 64))
    broken(lambda s: entry(s).update(recent=list(reversed(entry(s)["recent"]))))  # type: ignore[call-overload]
    broken(lambda s: entry(s)["recent"].append([50, bytes(32)]))  # type: ignore[attr-defined]
    broken(lambda s: entry(s)["recent"].insert(0, [12, bytes(32)]))  # type: ignore[attr-defined]
    broken(lambda s: entry(s)["recent"][0].__setitem__(1, b"short"))  # type: ignore[index]
    broken(lambda s: s["epochs"].update({"g/1": 1}))  # type: ignore[attr-defined]
    with pytest.raises(StateError):
        ReplayGuard.from_cbor_map([])
    assert len(entry(state)["recent"]) == 4  # type: ignore[arg-type]
    with pytest.raises(StateError):
        ReplayGuard.from_cbor_map({**state, "capacity": 3})  # more remembered than capacity


def version_1_state() -> dict[str, object]:
    """What the previous version stored for a guard of window 32 (literal, not produced)."""
    return {
        "v": 1,
        "window": 32,
        "senders": {
            "op-a": {
                "highest": 100,
                "recent": [[70, bytes(32)], [90, bytes(32)], [100, b"\1" * 32]],
            }
        },
        "epochs": {"g1": 4},
    }


def test_version_1_state_still_loads_and_keeps_its_refusals() -> None:
    old = ReplayGuard.from_cbor_map(version_1_state())
    assert (old.window, old.capacity) == (32, 32)
    assert old.highest_seq("op-a") == 100 and old.epoch("g1") == 4
    assert refusal(copy.deepcopy(old), message(68)) == "replay.seq-old"
    assert refusal(copy.deepcopy(old), message(69)) is None
    assert old.to_cbor_map()["v"] == STATE_VERSION
    # strict as before
    for bad in (
        {**version_1_state(), "window": 0},
        {**version_1_state(), "window": 1025},
        {**version_1_state(), "capacity": 32},
        {**version_1_state(), "senders": {"op-a": {"highest": 100, "recent": [[68, bytes(32)]]}}},
        {**version_1_state(), "senders": {"op-a": {"highest": 100, "min": 0, "recent": []}}},
    ):
        with pytest.raises(StateError):
            ReplayGuard.from_cbor_map(bad)


def test_widening_never_reopens_a_seq_the_old_window_refused() -> None:
    old = ReplayGuard.from_cbor_map(version_1_state())
    wide = old.resized(OPERATOR_WINDOW)
    assert (wide.window, wide.capacity) == (OPERATOR_WINDOW, DEFAULT_CAPACITY)
    assert wide.lowest_seq("op-a") == old.lowest_seq("op-a") == 69
    assert refusal(wide, message(68)) == "replay.seq-old"
    assert refusal(wide, message(0)) == "replay.seq-old"
    assert refusal(wide, message(75)) is None  # unseen inside the old window: still fine
    assert refusal(wide, message(100 + 5 * US)) is None
    assert refusal(wide, message(100 + 2 * US)) is None  # reordered by 3 s: taken now
    assert wide.epoch("g1") == 4
    # the same bounds: an equal copy
    assert snapshot(wide.resized(OPERATOR_WINDOW)) == snapshot(wide)


def test_narrowing_trims_to_the_new_capacity_and_raises_the_floor() -> None:
    guard = ReplayGuard(1000, 8)
    for seq in range(10, 90, 10):
        guard.accept(message(seq))
    narrow = guard.resized(1000, 3)
    assert narrow.remembered("op-a") == 3
    assert narrow.lowest_seq("op-a") == 51  # 10..50 forgotten
    assert refusal(narrow, message(50)) == "replay.seq-old"
    assert refusal(narrow, message(70)) == "replay.duplicate"
    tight = guard.resized(25)  # capacity follows the window: min(25, 1024)
    assert tight.capacity == 25 and tight.lowest_seq("op-a") == 56
    assert refusal(tight, message(55)) == "replay.seq-old"
    assert refusal(tight, message(60)) == "replay.duplicate"


# -- the service ------------------------------------------------------------------------------


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    yield from make_fleet(tmp_path, ("dev-1", "dev-2"))


def test_one_operators_commands_out_of_order_by_seconds_are_all_taken(fleet: Fleet) -> None:
    create_g1(fleet)
    alice = fleet.operators["op-alice"]
    top = fleet.now * US
    # six CLI processes of one operator: the one that read its clock last arrives first
    bodies = [rekey("g1") for _ in range(6)]
    for i, body in enumerate(bodies):
        fleet.send(alice.command(body, fleet.now, seq=top - i * 7 * US))
    for body in bodies:
        assert fleet.final(body.command_id).status is ResultStatus.DONE
    assert fleet.service.rejections.total == 0
    assert fleet.epoch("g1") == 1 + 6
    with fleet.sessions() as s:
        guard = store.load_guard(s, "op-alice", window=OPERATOR_WINDOW)
    assert guard.highest_seq("op-alice") == top
    # replays are still refused: the first (now lowest) one again, and a reused seq
    count = fleet.service.rejections.count("replay.duplicate")
    first = alice.command(bodies[5], fleet.now, seq=top - 5 * 7 * US)
    fleet.service.handle(*first, fleet.now)
    assert fleet.service.rejections.count("replay.duplicate") == count + 1
    fleet.service.handle(*alice.command(rekey("g1"), fleet.now, seq=top - 7 * US), fleet.now)
    assert fleet.service.rejections.count("replay.seq-reused") == 1
    # and what the envelope would find stale is below the window
    old = alice.command(rekey("g1"), fleet.now, seq=top - OPERATOR_WINDOW)
    fleet.service.handle(*old, fleet.now)
    assert fleet.service.rejections.count("replay.seq-old") == 1
    assert fleet.epoch("g1") == 1 + 6


def test_an_operator_guard_stored_by_the_previous_version_is_widened_exactly(
    fleet: Fleet,
) -> None:
    create_g1(fleet)
    alice = fleet.operators["op-alice"]
    top = fleet.now * 1000  # the previous CLI: milliseconds
    with fleet.sessions.begin() as s:
        row = s.get(ReplayState, "op-alice")
        assert row is not None
        state = version_1_state()
        state["senders"] = {"op-alice": {"highest": top, "recent": [[top, bytes(32)]]}}
        row.state = cbor.encode(state)
    refused = alice.command(rekey("g1"), fleet.now, seq=top - 32)  # the old window refused it
    fleet.service.handle(*refused, fleet.now)
    assert fleet.service.rejections.count("replay.seq-old") == 1
    inside = rekey("g1")
    fleet.send(alice.command(inside, fleet.now, seq=top - 31))
    newer = rekey("g1")  # the new CLI: microseconds, far above
    fleet.send(alice.command(newer, fleet.now, seq=fleet.now * US))
    assert fleet.final(inside.command_id).status is ResultStatus.DONE
    assert fleet.final(newer.command_id).status is ResultStatus.DONE
    with fleet.sessions() as s:
        row = s.get(ReplayState, "op-alice")
        assert row is not None
        stored = ReplayGuard.from_bytes(row.state).to_cbor_map()
    assert stored["v"] == STATE_VERSION and stored["window"] == OPERATOR_WINDOW
    senders = stored["senders"]
    assert isinstance(senders, dict) and senders["op-alice"]["min"] == top - 31


# -- the packed form the service stores ------------------------------------------------------


def test_the_packed_form_round_trips_and_is_one_encoding() -> None:
    guard = busy_guard()
    data = guard.to_bytes()
    assert data[0] == PACKED_VERSION
    again = ReplayGuard.from_bytes(data)
    assert again.to_bytes() == data
    assert snapshot(again) == snapshot(guard)
    assert (again.window, again.capacity) == (1000, 4)
    assert len(data) < len(snapshot(guard))
    for seq in (7, 15, 16, 29, 50, 51):  # the same refusals as the guard it came from
        assert refusal(again.copy(), message(seq)) == refusal(guard.copy(), message(seq))
    empty = ReplayGuard(OPERATOR_WINDOW)
    assert snapshot(ReplayGuard.from_bytes(empty.to_bytes())) == snapshot(empty)


def test_copy_is_independent() -> None:
    guard = busy_guard()
    before = snapshot(guard)
    trial = guard.copy()
    trial.accept(message(60))
    trial.advance_epoch("g1", 9)
    assert snapshot(guard) == before
    assert trial.highest_seq("op-a") == 60 and guard.highest_seq("op-a") == 50


def test_stored_cbor_forms_are_still_read() -> None:
    old = ReplayGuard.from_bytes(cbor.encode(version_1_state()))
    assert snapshot(old) == snapshot(ReplayGuard.from_cbor_map(version_1_state()))
    guard = busy_guard()
    assert snapshot(ReplayGuard.from_bytes(snapshot(guard))) == snapshot(guard)
    # strict as before: a non-canonical encoding of a good state is refused by its check
    noncanonical = b"\xb8\x05" + snapshot(guard)[1:]  # the map's length in a longer head
    with pytest.raises(ProtocolError) as refused:
        ReplayGuard.from_bytes(noncanonical)
    assert refused.value.check == "cbor.noncanonical"


def _packed(
    window: int = 1000,
    capacity: int = 4,
    senders: list[tuple[bytes, int, int, list[tuple[int, bytes]]]] | None = None,
    epochs: list[tuple[bytes, int]] | None = None,
) -> bytes:
    """A packed state written field by field (not by ``to_bytes``)."""
    if senders is None:
        senders = [(b"op-a", 50, 0, [(20, bytes(32)), (50, b"\1" * 32)])]
    out = struct.pack(">BQH", PACKED_VERSION, window, capacity)
    out += struct.pack(">H", len(senders))
    for name, highest, floor, recent in senders:
        out += bytes([len(name)]) + name + struct.pack(">QQH", highest, floor, len(recent))
        out += b"".join(struct.pack(">Q", seq) + mid for seq, mid in recent)
    epochs = [(b"g1", 3)] if epochs is None else epochs
    out += struct.pack(">H", len(epochs))
    out += b"".join(bytes([len(n)]) + n + struct.pack(">Q", e) for n, e in epochs)
    return out


def test_a_malformed_packed_state_is_refused() -> None:
    good = _packed()
    assert ReplayGuard.from_bytes(good).to_bytes() == good
    a = b"op-a"
    bad = [
        *(good[:cut] for cut in range(1, len(good))),  # truncated anywhere
        good + b"\0",  # trailing bytes
        _packed(window=0),
        _packed(capacity=0),
        _packed(capacity=MAX_CAPACITY + 1),
        _packed(senders=[(a, 50, 51, [])]),  # floor above the highest
        _packed(senders=[(a, 50, 30, [(20, bytes(32))])]),  # remembered seq below the floor
        _packed(senders=[(a, 50, 0, [(51, bytes(32))])]),  # above the highest
        _packed(window=10, senders=[(a, 50, 0, [(40, bytes(32))])]),  # below the window
        _packed(senders=[(a, 50, 0, [(50, bytes(32)), (20, bytes(32))])]),  # not ascending
        _packed(senders=[(a, 50, 0, [(50, bytes(32)), (50, bytes(32))])]),  # repeated
        _packed(senders=[(a, 50, 0, [(s, bytes(32)) for s in range(45, 50)])]),  # > capacity
        _packed(senders=[(b"op-b", 5, 0, []), (a, 5, 0, [])]),  # senders not in order
        _packed(senders=[(a, 5, 0, []), (a, 5, 0, [])]),  # a sender twice
        _packed(senders=[(b"op/a", 5, 0, [])]),  # not an id
        _packed(senders=[(b"", 5, 0, [])]),
        _packed(senders=[(b"\xff", 5, 0, [])]),
        _packed(epochs=[(b"g2", 1), (b"g1", 1)]),
        _packed(epochs=[(b"g 1", 1)]),
        b"",
        bytes([PACKED_VERSION + 1]) + good[1:],
    ]
    for data in bad:
        with pytest.raises((StateError, ProtocolError)):
            ReplayGuard.from_bytes(data)
