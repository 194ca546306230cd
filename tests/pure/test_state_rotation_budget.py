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
    PARENT_NV_WRITES_PER_ROTATION,
    RotationBudget,
    destroyed_keys,
    note_erased,
    note_rotation,
    parent_budget,
)
from agent.tpm.parents import (
    MAX_PARENTS,
    MAX_SPAN,
    RING_BASE,
    RING_SIZE,
    current_of,
    destruction_note,
    drained,
    evicted_note,
    next_parent,
    note_evictions,
    pending_note,
    pending_parents,
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


def test_ledger_says_how_an_epoch_secret_was_destroyed_pending_then_rotated() -> None:
    ledger = KeyLedger(lambda: 100)
    ledger.add("g1/epoch/1", KeyKind.EPOCH, group="g1", epoch=1, active=True)
    ledger.add("g1/epoch/2", KeyKind.EPOCH, group="g1", epoch=2, active=True)
    ledger.add("app-seal/0/x#1", KeyKind.APP_SEAL, active=True)
    ledger.transition("g1/epoch/1", KeyState.DESTROYED)
    ledger.transition("app-seal/0/x#1", KeyState.DESTROYED)
    note_erased(ledger, 4, rotated=False)  # the save that drops it could not rotate (no token)
    pending = ledger.get("g1/epoch/1").note or ""
    assert pending.startswith("erased from the state") and "rotation pending" in pending
    assert ledger.get("g1/epoch/2").note is None  # still active: no note
    assert ledger.get("app-seal/0/x#1").note is None  # a TPM-sealed blob: not an epoch secret
    note_erased(ledger, 5, rotated=True)
    rotated = ledger.get("g1/epoch/1").note or ""
    assert "state counter 5" in rotated and "no earlier copy of the state opens" in rotated
    ledger.transition("g1/epoch/2", KeyState.DESTROYED)
    note_erased(ledger, 5, rotated=False)
    assert "rotation pending" in (ledger.get("g1/epoch/2").note or "")
    assert ledger.get("g1/epoch/1").note == rotated  # a rotated note is never taken back


# -- rotating parents of leaf and init keys (agent.tpm.parents) ----------------------------------


def _simulate_parents(groups: int, rng: random.Random, days: int = 365) -> dict[str, int]:
    """A year of leaf keys under rotating parents, by the rules TpmKeys.settle applies (the same
    pure functions and budget): each group's leaf is replaced at least every max_age of the
    default rekey policy (7 days; a day's jitter for when the service's ask lands), the new leaf
    made under the current parent; a destruction under the current parent makes it due for
    rotation; drained parents are evicted. Counts NV writes and the longest time from a
    destruction to its parent's eviction."""
    max_age = 7 * DAY
    budget = parent_budget()
    occupied: set[int] = set()
    writes = 0
    leaf_parent: dict[int, int] = {}  # group -> parent of its current leaf
    pending: dict[int, list[int]] = {}  # parent -> destruction times waiting for its eviction
    due = False
    worst = 0
    next_update = {g: rng.randrange(max_age) for g in range(groups)}
    for now in range(0, days * DAY, 600):
        for group, when in next_update.items():
            if when > now:
                continue
            current = current_of(occupied)
            if current is None:
                current = next_parent(occupied)
                assert current is not None
                occupied.add(current)
                writes += 1
            old = leaf_parent.get(group)
            leaf_parent[group] = current
            if old is not None:
                pending.setdefault(old, []).append(now)
                due = due or old == current
            next_update[group] = now + max_age - rng.randrange(DAY)
        if due and budget.available(now):
            slot = next_parent(occupied)
            if slot is not None:
                budget.spend(now)
                occupied.add(slot)
                writes += 1
                due = False
        for handle in drained(occupied, set(leaf_parent.values())):
            occupied.discard(handle)
            writes += 1
            for destroyed_at in pending.pop(handle, []):
                worst = max(worst, now - destroyed_at)
        assert len(occupied) <= MAX_PARENTS
        assert set(leaf_parent.values()) <= occupied  # no live key under an evicted parent
    return {"writes": writes, "worst_latency": worst}


def test_a_year_of_rotating_parents_stays_within_their_share_of_the_budget() -> None:
    result = _simulate_parents(groups=8, rng=random.Random(17))
    yearly = PARENT_NV_WRITES_PER_ROTATION * parent_budget().lifetime_bound(365) + 1
    assert 0 < result["writes"] <= yearly
    # both NV consumers together, over the device's life, within the endurance figure
    lifetime = RotationBudget().lifetime_bound() + PARENT_NV_WRITES_PER_ROTATION * (
        parent_budget().lifetime_bound()
    )
    assert lifetime == 87_608 + 7_304 <= ENDURANCE_WRITES
    # in practice far below the budget: the ring of 3 paces rotations to how fast parents drain
    assert result["writes"] <= 150, result
    # a destroyed leaf's parent is gone within one rekey period (max_age, 7 days)
    assert result["worst_latency"] <= 7 * DAY, result


def test_one_group_rotates_every_other_weekly_update() -> None:
    """The new leaf is made before the old one is destroyed, so under the same parent: that
    parent rotates then and is evicted at the next update. A rotation and an eviction every two
    weeks; a destroyed leaf's blob stops loading at most one rekey period later."""
    result = _simulate_parents(groups=1, rng=random.Random(3))
    assert 24 <= (result["writes"] - 1) // 2 <= 30
    assert result["worst_latency"] <= 7 * DAY


def test_parent_ring_current_next_and_drained() -> None:
    assert current_of([]) is None and next_parent([]) == RING_BASE
    assert current_of([RING_BASE]) == RING_BASE
    assert next_parent([RING_BASE]) == RING_BASE + 1
    ring_end = RING_BASE + RING_SIZE - 1
    assert current_of([ring_end, RING_BASE]) == RING_BASE  # wrapped round the ring
    assert next_parent([ring_end, RING_BASE]) == RING_BASE + 1
    assert next_parent([RING_BASE, RING_BASE + 1, RING_BASE + 2]) is None  # MAX_PARENTS
    # a stuck oldest parent holds the span: no rotation past MAX_SPAN
    assert next_parent([RING_BASE, RING_BASE + MAX_SPAN - 1]) is None
    assert next_parent([RING_BASE, RING_BASE + MAX_SPAN - 2]) == RING_BASE + MAX_SPAN - 1
    with pytest.raises(ValueError):
        current_of([RING_BASE, RING_BASE + 8])
    with pytest.raises(ValueError):
        current_of([0x81000001])
    occupied = [RING_BASE, RING_BASE + 1, RING_BASE + 2]
    assert drained(occupied, in_use=[RING_BASE + 1]) == [RING_BASE]
    assert drained(occupied, in_use=[]) == [RING_BASE, RING_BASE + 1]  # never the current one


def test_seeded_random_rotations_never_strand_a_live_key() -> None:
    """Random creations, destructions and crashes (settle stopped half-way) over 100 seeds:
    the ring's rules never evict a parent a blob on disk is under, never exceed MAX_PARENTS,
    and the current parent is always found from the handles alone."""
    for seed in range(100):
        rng = random.Random(seed)
        occupied: set[int] = set()
        blobs: dict[int, int] = {}  # key id -> parent
        live: set[int] = set()
        due = False
        for step in range(300):
            op = rng.random()
            if op < 0.4:
                current = current_of(occupied)
                if current is None:
                    current = RING_BASE if not occupied else next_parent(occupied)
                    assert current is not None
                    occupied.add(current)
                blobs[step] = current  # blob written first...
                if rng.random() < 0.9:
                    live.add(step)  # ...then a state that refers to it (or a crash before)
            elif op < 0.7 and live:
                key = rng.choice(sorted(live))
                live.discard(key)  # a state without it saved
                due = due or blobs[key] == current_of(occupied)
                if rng.random() < 0.8:
                    del blobs[key]  # collect (or a crash before: the next save collects)
            else:
                for key in [k for k in blobs if k not in live]:
                    del blobs[key]
                if due and rng.random() < 0.7:
                    slot = next_parent(occupied)
                    if slot is not None:
                        occupied.add(slot)
                        due = False
                for handle in drained(occupied, set(blobs.values())):
                    if rng.random() < 0.2:
                        break  # killed between evictions
                    occupied.discard(handle)
            assert len(occupied) <= MAX_PARENTS
            assert {blobs[k] for k in live} <= occupied, (seed, step)
            assert occupied == set() or current_of(occupied) in occupied


def test_ledger_notes_say_how_a_leaf_was_destroyed_and_are_honest_while_pending() -> None:
    ledger = KeyLedger(lambda: 50)
    for name in ("leaf/a", "init/b", "leaf/old"):
        ledger.add(name, KeyKind.LEAF if name.startswith("leaf") else KeyKind.INIT, active=True)
        ledger.transition(name, KeyState.DESTROYED)
    ledger.annotate("leaf/a", destruction_note(RING_BASE))
    ledger.annotate("init/b", destruction_note(RING_BASE + 1))
    ledger.annotate("leaf/old", destruction_note(0x40000001))  # made under the SRK
    assert "eviction pending" in ledger.get("leaf/a").note  # type: ignore[operator]
    assert "still loads" in ledger.get("leaf/old").note  # type: ignore[operator]
    assert pending_parents(ledger) == {"leaf/a": RING_BASE, "init/b": RING_BASE + 1}
    # the parent at RING_BASE + 1 is still there: its key stays "pending"
    assert note_evictions(ledger, present=[RING_BASE + 1]) is True
    assert ledger.get("leaf/a").note == evicted_note(RING_BASE)
    assert ledger.get("leaf/a").state is KeyState.DESTROYED
    assert ledger.get("init/b").note == pending_note(RING_BASE + 1)
    assert note_evictions(ledger, present=[RING_BASE + 1]) is False
    assert note_evictions(ledger, present=[]) is True
    assert pending_parents(ledger) == {}
