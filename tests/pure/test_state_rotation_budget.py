"""Pure tests of the state counter's bookkeeping: the NV endurance budget over a simulated year
of the default policy, and the state file format (version 2 carries the counter; version 1 is
read only for the one-time migration). No TPM here: the TPM side is tests/tpm/test_state_*.py."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest

from agent.protocol.errors import StateError
from agent.protocol.lifecycle import KeyKind, KeyLedger, KeyState, RotationPolicy
from agent.protocol.secret import Secret
from agent.statefile import StateFile, StateRollback, peek
from agent.staterotation import (
    DAY,
    ENDURANCE_WRITES,
    LIFETIME_DAYS,
    RotationBudget,
    destroyed_keys,
    note_rotation,
)

pytestmark = pytest.mark.pure

YEAR = 365 * DAY


def _simulate(destructions: list[int], budget: RotationBudget, tick: int = 60) -> int:
    """Counter increments in a year: the decision StateKeeper.save and the daemon's tick make
    (rotate when something was destroyed and a token is there, else retry at the next tick)."""
    increments = 0
    pending = False
    events = iter(sorted(destructions))
    upcoming = next(events, None)
    for now in range(0, YEAR, tick):
        while upcoming is not None and upcoming <= now:
            pending = True
            upcoming = next(events, None)
        if pending and budget.admit(now):
            increments += 1
            pending = False
    return increments


def _default_policy_destructions(groups: int, rng: random.Random) -> list[int]:
    """Destructions a device sees in a year under the default rotation policy: in each group
    an epoch ends at the latest every max_epoch_age (plus operator rekeys and member changes,
    drawn here as one every ~6 hours), and its key is destroyed grace_period later."""
    policy = RotationPolicy()
    assert policy.max_epoch_age is not None
    times: list[int] = []
    for _ in range(groups):
        now = rng.randrange(policy.max_epoch_age)
        while now < YEAR:
            step = min(policy.max_epoch_age, int(rng.expovariate(1 / (6 * 3600))) + 1)
            now += step
            times.append(now + policy.grace_period)
    return [t for t in times if t < YEAR]


def test_a_year_of_the_default_policy_stays_within_the_endurance_budget() -> None:
    rng = random.Random(17)
    budget = RotationBudget()
    increments = _simulate(_default_policy_destructions(groups=8, rng=rng), budget)
    yearly_bound = RotationBudget().lifetime_bound(365)
    assert 0 < increments <= yearly_bound == 8 + 24 * 365
    assert increments * LIFETIME_DAYS / 365 <= ENDURANCE_WRITES
    assert RotationBudget().lifetime_bound() <= ENDURANCE_WRITES


def test_the_default_epoch_age_alone_rotates_at_every_destruction() -> None:
    """Groups that only end epochs at the default max_epoch_age (30 days): every destruction
    gets its rotation at once, about one per group a month."""
    policy = RotationPolicy()
    assert policy.max_epoch_age is not None
    destructions = [
        start + k * policy.max_epoch_age + policy.grace_period
        for start in range(0, 8 * 3600, 3600)
        for k in range(1, 13)
    ]
    destructions = [t for t in destructions if t < YEAR]
    increments = _simulate(destructions, RotationBudget())
    assert increments == len(destructions) == 96


def test_a_destruction_every_minute_is_paced_not_followed() -> None:
    """Worst case: something destroyed every minute all year. The bucket holds the counter to
    24 writes a day plus the burst; every destruction is still covered by a rotation within an
    hour."""
    every_minute = list(range(30, YEAR, 60))
    increments = _simulate(every_minute, RotationBudget())
    assert increments <= RotationBudget().lifetime_bound(365)
    assert increments >= 24 * 365 - 1
    assert RotationBudget().lifetime_bound() * 1 <= ENDURANCE_WRITES


def test_budget_bucket_refills_and_caps() -> None:
    budget = RotationBudget(per_day=24, burst=2, tokens=2, updated=0)
    assert budget.admit(0) and budget.admit(0) and not budget.admit(0)
    assert not budget.admit(3599) and budget.admit(3600)
    budget.refill(10 * DAY)
    assert budget.tokens == 2


def _key() -> Secret:
    return Secret(os.urandom(32))


def test_state_file_carries_its_counter_and_refuses_another(tmp_path: Path) -> None:
    key = _key()
    StateFile(tmp_path / "s", key, counter=5).save({"a": 1})
    blob = (tmp_path / "s").read_bytes()
    assert peek(blob) == (2, 5)
    assert StateFile(tmp_path / "s", key, counter=5).load() == {"a": 1}
    with pytest.raises(StateRollback) as refused:
        StateFile(tmp_path / "s", key, counter=6).load()
    assert refused.value.check == "state.rollback"
    assert "counter 5" in str(refused.value) and "TPM's is 6" in str(refused.value)
    # a forged header counter does not authenticate
    forged = bytearray(blob)
    forged[20] ^= 0x03  # counter 5 -> 6
    (tmp_path / "s").write_bytes(bytes(forged))
    with pytest.raises(StateError, match="does not authenticate"):
        StateFile(tmp_path / "s", key, counter=6).load()


def test_version1_is_read_only_for_migration(tmp_path: Path) -> None:
    import cbor2
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = _key()
    header = struct.pack(">4sBQ12s", b"KFST", 1, 7, os.urandom(12))
    body = AESGCM(key.reveal()).encrypt(header[-12:], cbor2.dumps({"v": 1}), header)
    (tmp_path / "old").write_bytes(header + body)
    assert peek(header + body) == (1, None)
    with pytest.raises(StateError, match="version 1, expected 2"):
        StateFile(tmp_path / "old", key).load()
    legacy = StateFile(tmp_path / "old", key)
    assert legacy.load(legacy=True) == {"v": 1} and legacy.generation == 7
    with pytest.raises(StateError, match="not a keyagent state file"):
        peek(b"XXXX" + bytes(40))


def test_ledger_says_how_the_state_key_was_destroyed() -> None:
    ledger = KeyLedger(lambda: 100)
    ledger.add("state/1", KeyKind.STATE, active=True)
    ledger.add("app-seal/0/x#1", KeyKind.APP_SEAL, active=True)
    assert destroyed_keys(ledger) == frozenset()
    ledger.transition("app-seal/0/x#1", KeyState.DESTROYED)
    assert destroyed_keys(ledger) == {"app-seal/0/x#1"}
    note_rotation(ledger, 7)
    note_rotation(ledger, 7)  # a retried rotation is noted once
    assert ledger.get("state/1").state is KeyState.DESTROYED
    new = ledger.get("state/2")
    assert new.state is KeyState.ACTIVE and "state counter 7" in (new.note or "")
    assert "counter advanced" in (new.note or "")
    assert "state/3" not in ledger
    # state keys do not count: no rotation loop
    assert destroyed_keys(ledger) == {"app-seal/0/x#1"}
