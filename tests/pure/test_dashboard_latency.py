"""Millisecond ack and commit times (schema revision 0003), from the service core to what the
dashboard computes: a rekey driven through the real sans-I/O core with a millisecond clock the
test controls records each ack's and commit's millisecond, the dashboard's latencies and
durations are exactly the differences of those, and rows from before the revision (NULL
milliseconds) fall back to their seconds. No HTTP here: tests/e2e/test_dashboard.py serves the
same queries over HTTPS, tests/e2e/test_dashboard_browser.py with a real rekey in a browser."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from agent.protocol.errors import InternalError
from agent.protocol.wire.messages.result import ResultStatus
from provisioning.dashboard import queries
from provisioning.dashboard.app import _fmt_ms
from provisioning.db.schema import Ack, CommitLogEntry
from provisioning.registry import Registry, run_in_transaction
from provisioning.service.core import Publish
from tests.pure.test_service_core import T0, Fleet, make_fleet
from tests.service_members import Outgoing, group_create, rekey

pytestmark = pytest.mark.pure

STEP_MS = 37  # the test clock moves this much per message the service handles


class MsClock:
    """The service's wall clock in milliseconds, moved by the test only."""

    def __init__(self, start_ms: int) -> None:
        self.ms = start_ms
        self.readings: list[int] = []

    def advance(self) -> int:
        self.ms += STEP_MS
        self.readings.append(self.ms)
        return self.ms


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    yield from make_fleet(tmp_path)


def send_timed(fleet: Fleet, clock: MsClock, *outgoing: Outgoing) -> None:
    """Like ``Fleet.send``, but each message reaches the service at the next clock reading,
    given to it as ``now_ms`` with its second as ``now`` (what ``keyfleet serve`` does)."""
    queue = list(outgoing)
    while queue:
        topic, payload = queue.pop(0)
        now_ms = clock.advance()
        fleet.now = now_ms // 1000
        publishes: list[Publish] = fleet.service.handle(topic, payload, fleet.now, now_ms=now_ms)
        queue.extend(fleet.deliver(publishes))


def test_a_rekey_records_milliseconds_and_the_dashboard_measures_with_them(
    fleet: Fleet,
) -> None:
    clock = MsClock(T0 * 1000 + 100)
    send_timed(
        fleet,
        clock,
        fleet.operators["op-alice"].command(group_create("g1", *fleet.devices), fleet.now),
    )
    before = fleet.epoch("g1")
    metric = fleet.service.metrics.ack_latency
    counted, summed = metric._count, metric._sum
    body = rekey("g1")
    send_timed(fleet, clock, fleet.operators["op-alice"].command(body, fleet.now))
    assert fleet.final(body.command_id).status is ResultStatus.DONE
    assert fleet.epoch("g1") == before + 1

    with fleet.sessions() as session:
        commit = session.get(CommitLogEntry, ("g1", before))
        assert commit is not None and commit.accepted_at_ms is not None
        acks = list(
            session.scalars(select(Ack).where(Ack.group_id == "g1", Ack.epoch == before + 1))
        )
        detail = queries.group_detail(session, "g1", member_page=1, per_page=50)
        last = queries.last_rekey(session, "g1")
        progress = queries.ack_progress(session, "g1")
    # what was recorded: readings of the clock, each within the second of its seconds column
    assert commit.accepted_at_ms in clock.readings
    assert commit.accepted_at_ms // 1000 == commit.accepted_at
    assert sorted(a.device_id for a in acks) == sorted(fleet.devices)
    latencies: dict[str, int] = {}
    for ack in acks:
        assert ack.received_at_ms in clock.readings
        assert ack.received_at_ms // 1000 == ack.received_at
        latencies[ack.device_id] = ack.received_at_ms - commit.accepted_at_ms
    # each member handles the relayed commit and acks: at least one message later, each at
    # its own reading, so every latency is a positive multiple of the clock's step, all within
    # the same second here (whole seconds would have said 0 for most of them)
    assert all(v > 0 and v % STEP_MS == 0 for v in latencies.values()), latencies
    assert len(set(latencies.values())) == len(latencies)

    # what the dashboard computes from them
    assert detail is not None and last is not None and progress is not None
    assert {m.device_id: m.latency_ms for m in detail.members.rows} == latencies
    assert detail.summary.commit_at_ms == commit.accepted_at_ms
    assert detail.summary.ack_duration_ms == max(latencies.values())
    assert detail.commits[0].epoch == before
    assert detail.commits[0].last_ack_after_ms == max(latencies.values())
    assert progress.commit_at_ms == commit.accepted_at_ms
    recorded = {a.device_id: a.received_at_ms for a in acks}
    assert [(d, ms) for d, _, ms in progress.acks] == sorted(
        recorded.items(), key=lambda item: item[1] or 0
    )
    # the rekey: from its acceptance (at_ms of op.rekey) to its result (at_ms of the result),
    # which came with the last ack, so it is longer than every ack's latency
    entries = {e.action: e for e in fleet.audit_entries() if e.target == "g1"}
    started = entries["op.rekey"].details_dict()["at_ms"]
    finished = entries["op.rekey.result"].details_dict()["at_ms"]
    assert started in clock.readings and finished in clock.readings
    assert last.started_at_ms == started and last.finished_at_ms == finished
    assert last.duration_ms == finished - started
    assert finished == max(ms for ms in recorded.values() if ms is not None)
    assert 0 < max(latencies.values()) < finished - started
    # the ack-latency metric is in seconds with the same precision
    assert metric._count == counted + len(acks)
    assert metric._sum - summed == pytest.approx(sum(latencies.values()) / 1000)
    assert any(
        line.startswith('keyfleet_ack_latency_seconds_bucket{le="0.25"} ')
        and not line.endswith(" 0")
        for line in metric.render()
    )


def test_rows_from_before_revision_0003_fall_back_to_their_seconds(fleet: Fleet) -> None:
    clock = MsClock(T0 * 1000 + 100)
    send_timed(
        fleet,
        clock,
        fleet.operators["op-alice"].command(group_create("g1", *fleet.devices), fleet.now),
    )
    epoch = fleet.epoch("g1")
    fleet.now += 2
    clock.ms = fleet.now * 1000 + 400
    send_timed(fleet, clock, fleet.operators["op-alice"].command(rekey("g1"), fleet.now))
    with fleet.sessions() as session, session.begin():
        commit = session.get(CommitLogEntry, ("g1", epoch))
        assert commit is not None
        rows = list(
            session.scalars(select(Ack).where(Ack.group_id == "g1", Ack.epoch == epoch + 1))
        )
        acks = {a.device_id: a.received_at for a in rows}
        # one ack keeps its milliseconds, the others and the commit lose theirs
        kept = sorted(acks)[0]
        kept_ms = next(a.received_at_ms for a in rows if a.device_id == kept)
        assert kept_ms is not None and kept_ms % 1000 != 0
        session.execute(update(CommitLogEntry).values(accepted_at_ms=None))
        session.execute(update(Ack).where(Ack.device_id != kept).values(received_at_ms=None))
        accepted_at = commit.accepted_at
    with fleet.sessions() as session:
        detail = queries.group_detail(session, "g1", member_page=1, per_page=50)
    assert detail is not None
    expected = {
        device: (kept_ms if device == kept else at * 1000) - accepted_at * 1000
        for device, at in acks.items()
    }
    assert {m.device_id: m.latency_ms for m in detail.members.rows} == expected
    assert detail.summary.commit_at_ms == accepted_at * 1000


def test_the_registry_checks_milliseconds_and_records_seconds_without_them(
    fleet: Fleet,
) -> None:
    send_timed(
        fleet,
        MsClock(T0 * 1000),
        fleet.operators["op-alice"].command(group_create("g1", *fleet.devices), fleet.now),
    )
    epoch = fleet.epoch("g1")

    def ack(now: int, now_ms: int | None) -> None:
        def work(session: Session) -> None:
            Registry(session).record_ack(
                "g1", epoch=epoch, device_id="dev-1", epoch_authenticator=b"a", now=now,
                now_ms=now_ms,
            )  # fmt: skip

        run_in_transaction(fleet.sessions, work)

    with pytest.raises(InternalError, match="not within second"):
        ack(T0 + 5, (T0 + 6) * 1000)
    with fleet.sessions() as session, session.begin():
        session.execute(delete(Ack).where(Ack.device_id == "dev-1"))
    ack(T0 + 9, None)  # a caller whose clock has seconds only
    with fleet.sessions() as session:
        row = session.get(Ack, ("g1", epoch, "dev-1"))
    assert row is not None and (row.received_at, row.received_at_ms) == (T0 + 9, (T0 + 9) * 1000)


def test_the_core_refuses_a_millisecond_reading_from_another_second(fleet: Fleet) -> None:
    with pytest.raises(InternalError, match="not within second"):
        fleet.service.handle_many([], T0, now_ms=T0 * 1000 + 1000)
    with pytest.raises(InternalError, match="not within second"):
        fleet.service.tick(T0, now_ms=T0 * 1000 - 1)
    assert fleet.service.tick(T0, now_ms=T0 * 1000 + 999) == []


def test_rekey_times_come_from_at_ms_only_within_the_entry_second() -> None:
    assert queries._entry_ms(100, '{"at_ms":100250}') == 100250
    assert queries._entry_ms(100, '{"at_ms":101000}') == 100000  # another second: not trusted
    assert queries._entry_ms(100, '{"command_id":"ab"}') == 100000
    assert queries._entry_ms(100, '{"at_ms":"100250"}') == 100000
    assert queries._entry_ms(100, '{"at_ms":true}') == 100000
    assert queries._entry_ms(100, "[]") == 100000


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (None, "—"),
        (0, "0 ms"),
        (38, "38 ms"),
        (999, "999 ms"),
        (1000, "1.0 s"),
        (1249, "1.2 s"),
        (1250, "1.3 s"),
        (59_949, "59.9 s"),
        (125_000, "2 min 5 s"),
        (-38, "-38 ms"),
    ],
)
def test_spans_in_milliseconds_read_as_people_read_them(ms: int | None, text: str) -> None:
    assert _fmt_ms(ms) == text
