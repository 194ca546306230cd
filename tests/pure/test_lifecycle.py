from __future__ import annotations

import contextlib
import itertools

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocol.lifecycle import (
    AES_GCM_RANDOM_NONCE_LIMIT,
    ALLOWED_TRANSITIONS,
    EpochUse,
    KeyKind,
    KeyLedger,
    KeyRecord,
    KeyState,
    KeyStateError,
    RotationPolicy,
    RotationReason,
    epoch_key_name,
    rotation_due,
)

pytestmark = pytest.mark.pure

S = KeyState


class Clock:
    def __init__(self, start: int = 1_000) -> None:
        self.now = start

    def __call__(self) -> int:
        return self.now


# SP 800-57 Part 1 Rev. 5 section 7, written out independently of the module's table.
SP800_57 = {
    (S.PRE_ACTIVATION, S.ACTIVE),
    (S.PRE_ACTIVATION, S.COMPROMISED),
    (S.PRE_ACTIVATION, S.DESTROYED),
    (S.ACTIVE, S.SUSPENDED),
    (S.ACTIVE, S.DEACTIVATED),
    (S.ACTIVE, S.COMPROMISED),
    (S.ACTIVE, S.DESTROYED),
    (S.SUSPENDED, S.ACTIVE),
    (S.SUSPENDED, S.DEACTIVATED),
    (S.SUSPENDED, S.COMPROMISED),
    (S.SUSPENDED, S.DESTROYED),
    (S.DEACTIVATED, S.COMPROMISED),
    (S.DEACTIVATED, S.DESTROYED),
    (S.COMPROMISED, S.DESTROYED),
}


def _ledger_in(state: KeyState, clock: Clock) -> KeyLedger:
    """A ledger holding key 'k' in ``state``, reached by a legal path."""
    paths = {
        S.PRE_ACTIVATION: [],
        S.ACTIVE: [S.ACTIVE],
        S.SUSPENDED: [S.ACTIVE, S.SUSPENDED],
        S.DEACTIVATED: [S.ACTIVE, S.DEACTIVATED],
        S.COMPROMISED: [S.COMPROMISED],
        S.DESTROYED: [S.DESTROYED],
    }
    ledger = KeyLedger(clock)
    ledger.add("k", KeyKind.LEAF)
    for step in paths[state]:
        ledger.transition("k", step)
    return ledger


@pytest.mark.parametrize(("before", "after"), list(itertools.product(S, S)))
def test_every_pair_of_states_follows_sp800_57(before: KeyState, after: KeyState) -> None:
    clock = Clock()
    ledger = _ledger_in(before, clock)
    clock.now += 5
    if (before, after) in SP800_57:
        record = ledger.transition("k", after)
        assert record.state is after and record.since == clock.now
    else:
        with pytest.raises(KeyStateError) as info:
            ledger.transition("k", after)
        assert info.value.check == "key.transition"
        assert str(before) in info.value.reason and str(after) in info.value.reason
        assert ledger.get("k").state is before
    assert {(a, b) for a, bs in ALLOWED_TRANSITIONS.items() for b in bs} == SP800_57


def test_destroyed_is_final_and_says_so() -> None:
    ledger = _ledger_in(S.DESTROYED, Clock())
    with pytest.raises(KeyStateError, match="destroyed is final"):
        ledger.transition("k", S.ACTIVE)


def test_unknown_and_duplicate_keys() -> None:
    ledger = KeyLedger(Clock())
    ledger.add("devid", KeyKind.DEVID, active=True)
    with pytest.raises(KeyStateError) as info:
        ledger.add("devid", KeyKind.DEVID)
    assert info.value.check == "key.exists"
    with pytest.raises(KeyStateError) as info:
        ledger.transition("nope", S.ACTIVE)
    assert info.value.check == "key.unknown"
    with pytest.raises(KeyStateError):
        ledger.add("epoch/x", KeyKind.EPOCH)


def test_transitions_are_timestamped_by_the_injected_clock() -> None:
    clock = Clock(100)
    ledger = KeyLedger(clock)
    ledger.add("ak", KeyKind.AK)
    clock.now = 150
    ledger.transition("ak", S.ACTIVE)
    clock.now = 140  # a clock stepping back must not reorder the history
    record = ledger.transition("ak", S.SUSPENDED)
    assert record.transitions == ((S.PRE_ACTIVATION, 100), (S.ACTIVE, 150), (S.SUSPENDED, 150))
    assert record.entered(S.ACTIVE) == 150 and record.entered(S.DESTROYED) is None


def test_epochs_active_then_decrypt_only_then_due_for_destruction() -> None:
    clock = Clock(0)
    ledger = KeyLedger(clock)
    grace = 600
    ledger.start_epoch("g1", 1)
    clock.now = 100
    ledger.start_epoch("g1", 2)  # epoch 1 deactivated at t=100
    assert ledger.current_epoch("g1").epoch == 2
    assert ledger.get(epoch_key_name("g1", 1)).state is S.DEACTIVATED
    assert ledger.epoch_use("g1", 2, grace, 100) is EpochUse.ENCRYPT_DECRYPT
    assert ledger.epoch_use("g1", 1, grace, 699) is EpochUse.DECRYPT_ONLY
    assert ledger.decryptable_epochs("g1", grace, 699) == [2, 1]
    ledger.check_decrypt("g1", 1, grace, 699)
    assert ledger.epoch_use("g1", 1, grace, 700) is EpochUse.DUE_FOR_DESTRUCTION
    assert ledger.decryptable_epochs("g1", grace, 700) == [2]
    with pytest.raises(KeyStateError) as info:
        ledger.check_decrypt("g1", 1, grace, 700)
    assert info.value.check == "data.epoch-expired"
    assert [r.epoch for r in ledger.due_for_destruction(grace, 700)] == [1]
    clock.now = 700
    ledger.transition(epoch_key_name("g1", 1), S.DESTROYED)
    assert ledger.due_for_destruction(grace, 700) == []
    with pytest.raises(KeyStateError) as info:
        ledger.check_decrypt("g1", 1, grace, 701)
    assert info.value.check == "data.epoch-expired"
    with pytest.raises(KeyStateError) as info:
        ledger.check_decrypt("g1", 9, grace, 701)
    assert info.value.check == "data.epoch-unknown"
    with pytest.raises(KeyStateError) as info:
        ledger.current_epoch("g2")
    assert info.value.check == "data.epoch-unknown"
    # forgetting destroyed records keeps the ledger bounded
    assert ledger.forget_destroyed(before=701) == [epoch_key_name("g1", 1)]
    assert epoch_key_name("g1", 1) not in ledger


def test_suspended_epoch_cannot_decrypt_and_epochs_only_move_forward() -> None:
    clock = Clock(0)
    ledger = KeyLedger(clock)
    ledger.start_epoch("g1", 5)
    ledger.transition(epoch_key_name("g1", 5), S.SUSPENDED)
    with pytest.raises(KeyStateError) as info:
        ledger.check_decrypt("g1", 5, 600, 1)
    assert info.value.check == "data.epoch-unusable"
    with pytest.raises(KeyStateError) as info:
        ledger.start_epoch("g1", 5)
    assert info.value.check == "key.transition"
    ledger.start_epoch("g1", 6)  # the suspended epoch 5 is deactivated too
    assert ledger.get(epoch_key_name("g1", 5)).state is S.DEACTIVATED


def test_rotation_due() -> None:
    policy = RotationPolicy(max_epoch_age=3600, max_messages_per_epoch=100, grace_period=60)
    assert rotation_due(policy, epoch_started=0, messages_this_epoch=99, now=3599) is None
    assert rotation_due(policy, 0, 0, 3600) is RotationReason.AGE
    assert rotation_due(policy, 0, 100, 10) is RotationReason.MESSAGES
    unlimited = RotationPolicy(max_epoch_age=None, max_messages_per_epoch=None)
    assert rotation_due(unlimited, 0, AES_GCM_RANDOM_NONCE_LIMIT - 1, 10**9) is None
    assert rotation_due(unlimited, 0, AES_GCM_RANDOM_NONCE_LIMIT, 0) is RotationReason.MESSAGES


def test_cbor_round_trip_and_strict_loading() -> None:
    clock = Clock(10)
    ledger = KeyLedger(clock)
    ledger.add("devid", KeyKind.DEVID, active=True)
    ledger.add("app/1000/token", KeyKind.APP_SEAL, owner=1000, active=True, note="sealed")
    ledger.start_epoch("g1", 1)
    clock.now = 20
    ledger.start_epoch("g1", 2)
    encoded = cbor2.dumps(ledger.to_cbor(), canonical=True)
    again = KeyLedger.from_cbor(cbor2.loads(encoded), clock)
    assert list(again) == sorted(ledger, key=lambda r: r.name)
    assert again.get("app/1000/token").owner == 1000

    good = ledger.get(epoch_key_name("g1", 1)).to_cbor_map()
    bad_cases = [
        {**good, "extra": 1},
        {**good, "state": "active"},  # disagrees with its history
        {**good, "transitions": [["active", 1]]},  # does not start in pre-activation
        {**good, "transitions": [["pre-activation", 5], ["deactivated", 6]]},  # illegal step
        {**good, "transitions": [["pre-activation", 5], ["active", 4], ["deactivated", 6]]},
        {**good, "transitions": [["pre-activation", True]]},
        {**good, "kind": "nope"},
        {**good, "epoch": -1},
        {k: v for k, v in good.items() if k != "group"},
        "not a map",
    ]
    for case in bad_cases:
        with pytest.raises(KeyStateError) as info:
            KeyRecord.from_cbor_map(case)
        assert info.value.check == "key.record"
    with pytest.raises(KeyStateError):
        KeyLedger.from_cbor({"v": 2, "keys": []}, clock)
    with pytest.raises(KeyStateError) as info:
        KeyLedger.from_cbor({"v": 1, "keys": [good, good]}, clock)
    assert info.value.check == "key.exists"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(list(S)), st.integers(0, 50)), max_size=30))
def test_random_walks_keep_a_legal_history_that_round_trips(
    steps: list[tuple[KeyState, int]],
) -> None:
    clock = Clock(0)
    ledger = KeyLedger(clock)
    ledger.add("k", KeyKind.STATE)
    for to, dt in steps:
        clock.now += dt
        before = ledger.get("k").state
        if (before, to) in SP800_57:
            ledger.transition("k", to)
        else:
            with pytest.raises(KeyStateError):
                ledger.transition("k", to)
            assert ledger.get("k").state is before
    record = ledger.get("k")
    assert KeyRecord.from_cbor_map(cbor2.loads(cbor2.dumps(record.to_cbor_map()))) == record


@settings(max_examples=2000, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.binary(max_size=4),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.sampled_from(["name", "kind", "state", "transitions"]), inner)
        ),
        max_leaves=12,
    )
)
def test_record_decoder_raises_only_key_state_errors(obj: object) -> None:
    with contextlib.suppress(KeyStateError):
        KeyRecord.from_cbor_map(obj)
