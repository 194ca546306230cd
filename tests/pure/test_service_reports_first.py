"""Devices' first reports in one batch (a burst after a fleet-wide reconnect): their replay rows
are created in one statement (``store.claim_guards``), their key and transition rows in one
insert each (``store.number_new_key_rows``), and the rows are those the reports taken one by one
make. A replay row another instance creates meanwhile (it took the same device's first message
at the same time) is neither lost nor duplicated: its window keeps both messages' sequence
numbers and each message replayed afterwards is refused (``replay.duplicate``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select

from agent.protocol.lifecycle import KeyKind, KeyRecord, KeyState
from agent.protocol.wire.messages.key_state import KeyStateReport
from provisioning.db.runtime import ReplayState, RevocationFeedSeen
from provisioning.db.schema import Device, DeviceKey, KeyTransition
from provisioning.registry import DeviceState, Registry
from provisioning.service import store
from provisioning.service.core import DeliveryService
from tests.pure.test_service_core import T0, Fleet, make_fleet

pytestmark = pytest.mark.pure

DATABASE_BACKENDS = ("sqlite", "postgresql")

BATCHED = tuple(f"dev-b{i}" for i in range(6))
SINGLE = tuple(f"dev-s{i}" for i in range(6))


def report() -> KeyStateReport:
    history = ((KeyState.PRE_ACTIVATION, T0 - 10), (KeyState.ACTIVE, T0 - 5))
    return KeyStateReport(
        (
            KeyRecord("ak", KeyKind.AK, history),
            KeyRecord("devid", KeyKind.DEVID, history),
        ),
        feed=0,
    )


def rows_of(fleet: Fleet, device_id: str) -> dict[str, Any]:
    """Everything a report writes for ``device_id``, without row ids (the keys' transitions in
    id order)."""
    with fleet.sessions() as s:
        device = s.get(Device, device_id)
        assert device is not None
        keys = s.scalars(
            select(DeviceKey).where(DeviceKey.device_id == device_id).order_by(DeviceKey.id)
        ).all()
        transitions = [
            [
                (t.from_state, t.to_state, t.at, t.recorded_at)
                for t in s.scalars(
                    select(KeyTransition)
                    .where(KeyTransition.device_key_id == key.id)
                    .order_by(KeyTransition.id)
                )
            ]
            for key in keys
        ]
        feed = s.get(RevocationFeedSeen, device_id)
        return {
            "device": (device.last_seen, device.last_report_at, device.attest_due),
            "keys": [(k.key_name, k.kind, k.state, k.changed_at) for k in keys],
            "transitions": transitions,
            "feed": None if feed is None else (feed.seq, feed.reported_at),
            "seq": store.load_guard(s, device_id).highest_seq(device_id),
        }


def statements(fleet: Fleet) -> Iterator[list[int]]:
    engine = fleet.sessions.kw["bind"]
    count = [0]

    def counted(*_args: Any) -> None:
        count[0] += 1

    event.listen(engine, "before_cursor_execute", counted)
    try:
        yield count
    finally:
        event.remove(engine, "before_cursor_execute", counted)


def test_first_reports_in_a_batch_make_the_rows_that_one_by_one_would(
    tmp_path: Path, database_url: str
) -> None:
    for fleet in make_fleet(tmp_path, (*BATCHED, *SINGLE), url=database_url):
        for name in SINGLE:
            fleet.service.handle_many([fleet.devices[name].report(report(), fleet.now)], fleet.now)
        batch = [fleet.devices[name].report(report(), fleet.now) for name in BATCHED]
        counter = statements(fleet)
        count = next(counter)
        fleet.service.handle_many(batch, fleet.now)
        sql = count[0]
        counter.close()
        assert fleet.service.metrics.reports.value("keys.report") == len(BATCHED) + len(SINGLE)
        for batched, single in zip(BATCHED, SINGLE, strict=True):
            assert rows_of(fleet, batched) == rows_of(fleet, single)
        assert rows_of(fleet, BATCHED[0])["seq"] == 1
        # the new rows of the batch: one statement per table, not one per device or key
        # (the figure is the batch's whole transaction, its reads and catch-up included)
        assert sql < 2 * len(BATCHED) + 20, sql
        for topic, payload in batch:  # a replayed first report is refused
            fleet.service.handle_many([(topic, payload)], fleet.now)
        assert fleet.service.rejections.count("replay.duplicate") == len(BATCHED)
        assert rows_of(fleet, BATCHED[0]) == rows_of(fleet, SINGLE[0])


def test_a_refused_first_report_in_a_batch_leaves_no_replay_row(
    tmp_path: Path, database_url: str
) -> None:
    """The batch created the new senders' replay rows before judging the reports: a quarantined
    device's first report is refused and its row is removed again (it changes nothing)."""
    for fleet in make_fleet(tmp_path, BATCHED, url=database_url):
        with fleet.sessions.begin() as s:
            Registry(s).set_device_state(
                BATCHED[1], DeviceState.QUARANTINED, reason="test", now=fleet.now
            )
        fleet.service.handle_many(
            [fleet.devices[name].report(report(), fleet.now) for name in BATCHED], fleet.now
        )
        assert fleet.service.rejections.count("ds.device.quarantined") == 1
        with fleet.sessions() as s:
            assert s.get(ReplayState, BATCHED[1]) is None
            assert s.get(ReplayState, BATCHED[0]) is not None
            assert Registry(s).key_states(BATCHED[1]) == []


def test_a_first_report_with_a_bad_key_name_in_a_batch_is_refused_and_changes_nothing(
    tmp_path: Path, database_url: str
) -> None:
    """A device's first report with a key name the registry refuses (its key rows made as plain
    rows, ``store.FirstKeys``) is refused by ``registry.key.name`` like one taken alone:
    no key row, no replay row, no report kept; the others of the batch are taken with the rows
    one by one would make."""
    for fleet in make_fleet(tmp_path, (*BATCHED, *SINGLE), url=database_url):
        fleet.service.handle_many([fleet.devices[SINGLE[0]].report(report(), fleet.now)], fleet.now)
        history = ((KeyState.PRE_ACTIVATION, T0 - 10),)
        bad = KeyStateReport((*report().keys, KeyRecord("not a name", KeyKind.AK, history)), feed=0)
        batch = [
            fleet.devices[name].report(bad if name == BATCHED[1] else report(), fleet.now)
            for name in BATCHED
        ]
        fleet.service.handle_many(batch, fleet.now)
        assert fleet.service.rejections.count("registry.key.name") == 1
        assert fleet.service.metrics.reports.value("keys.report") == len(BATCHED)
        with fleet.sessions() as s:
            assert s.get(ReplayState, BATCHED[1]) is None
            assert Registry(s).key_states(BATCHED[1]) == []
            row = s.get(Device, BATCHED[1])
            assert row is not None and row.last_report is None and row.last_seen is None
        for name in BATCHED:
            if name != BATCHED[1]:
                assert rows_of(fleet, name) == rows_of(fleet, SINGLE[0])


def test_two_first_reports_of_one_device_in_a_batch_are_both_taken(
    tmp_path: Path, database_url: str
) -> None:
    for fleet in make_fleet(tmp_path, BATCHED, url=database_url):
        device = fleet.devices[BATCHED[0]]
        batch = [device.report(report(), fleet.now), device.report(report(), fleet.now)]
        batch += [fleet.devices[name].report(report(), fleet.now) for name in BATCHED[1:]]
        fleet.service.handle_many(batch, fleet.now)
        assert fleet.service.metrics.reports.value("keys.report") == len(batch)
        assert rows_of(fleet, BATCHED[0])["seq"] == 2
        assert rows_of(fleet, BATCHED[0])["keys"] == rows_of(fleet, BATCHED[1])["keys"]


def test_a_replay_row_created_meanwhile_by_another_instance_is_kept_and_guards(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL, where instances write at once (on SQLite the batch holds the database's
    write lock from its first statement). Instance B takes dev-b2's first report and commits
    while instance A's batch, which holds dev-b2's other first report, is between reading the
    replay rows (none) and creating them: A's insert leaves B's row alone, A locks and reads it
    (B's seq in it) and takes its own report under it. Nothing lost, no second row, no second
    set of key rows, and both messages replayed are refused."""
    for fleet in make_fleet(tmp_path, BATCHED, url=postgres_url):
        race(fleet, monkeypatch)


def race(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    first = fleet.service
    other = DeliveryService(
        fleet.sessions,
        signing_key=first._env.key,
        operator_ca=first._env.operator_ca,
        device_ca=first._env.devices.device_ca,
        settings=first.settings,
        instance="b",
    )
    racer = BATCHED[2]
    at_b = fleet.devices[racer].report(report(), fleet.now)
    batch = [fleet.devices[name].report(report(), fleet.now) for name in BATCHED]
    claim = store.claim_guards
    raced: list[str] = []

    def claim_after_b(*args: Any, **kwargs: Any) -> Any:
        if not raced:
            raced.append(racer)
            other.handle_many([at_b], fleet.now)  # its own connection; it commits
            with fleet.sessions() as s:
                assert s.get(ReplayState, racer) is not None
        return claim(*args, **kwargs)

    monkeypatch.setattr(store, "claim_guards", claim_after_b)
    first.handle_many(batch, fleet.now)
    monkeypatch.setattr(store, "claim_guards", claim)
    assert raced == [racer]
    assert other.metrics.reports.value("keys.report") == 1
    assert first.metrics.reports.value("keys.report") == len(BATCHED)
    with fleet.sessions() as s:
        guard = store.load_guard(s, racer)
        assert guard.highest_seq(racer) == 2  # both seqs: B's 1, A's 2
        assert len(s.scalars(select(ReplayState).where(ReplayState.sender == racer)).all()) == 1
    assert rows_of(fleet, racer)["keys"] == rows_of(fleet, BATCHED[0])["keys"]
    assert rows_of(fleet, racer)["transitions"] == rows_of(fleet, BATCHED[0])["transitions"]
    for topic, payload in (at_b, batch[2]):
        first.handle_many([(topic, payload)], fleet.now)
    assert first.rejections.count("replay.duplicate") == 2
