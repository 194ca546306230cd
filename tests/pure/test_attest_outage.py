"""A fleet back from an outage (every device away longer than the online window and overdue for
attestation) is re-attested at ``challenges_per_second``, oldest-due first, not all at the next
scan: each scan challenges at most its share, the rest stay due (shown as such: their last
verdict is the old one) and are taken by later scans, every device is challenged once, a device
that answered is not challenged again, and a scan costs the same few statements however long the
backlog. On SQLite and PostgreSQL, with the real service's schedule (``tasks.attest_tick``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, insert, select, update

from agent.protocol.wire.messages.attestation import AttestChallenge
from agent.protocol.wire.messages.key_state import KeyStateReport
from firmware_sim.boot import default_components
from provisioning.db.schema import Device, DeviceState
from provisioning.policy import policy_from_components
from provisioning.registry import AttestationResult, Registry
from provisioning.service import tasks
from provisioning.service.context import Call, Clock
from provisioning.service.core import AttestationSettings, DeliveryService
from tests.pure.test_service_core import Fleet, make_fleet

pytestmark = pytest.mark.pure

DATABASE_BACKENDS = ("sqlite", "postgresql")

INTERVAL = 3600
RATE = 20  # challenges a second: a scan's share is RATE * ATTEST_SCAN_SECONDS
CAP = RATE * tasks.ATTEST_SCAN_SECONDS
BACK = 2000  # devices back at once (seeded), besides the fleet's two software devices
OUTAGE = 2 * INTERVAL  # longer than the online window and than the interval
NAMES = ("dev-1", "dev-2")


@pytest.fixture
def fleet(tmp_path: Path, database_url: str) -> Iterator[Fleet]:
    for fleet in make_fleet(tmp_path, NAMES, url=database_url):
        first = fleet.service
        fleet.service = DeliveryService(
            fleet.sessions,
            signing_key=first._env.key,
            operator_ca=first._env.operator_ca,
            device_ca=first._env.devices.device_ca,
            settings=first.settings,
            attestation=AttestationSettings(
                policy=policy_from_components(default_components("1.0")),
                interval=INTERVAL,
                challenges_per_second=RATE,
            ),
        )
        yield fleet


def seed_outage(fleet: Fleet) -> int:
    """BACK devices and the fleet's own, all attested before an outage of OUTAGE seconds and
    put off by the schedule while away; then the seeded ones report back as one burst would
    write them (``last_seen`` now, due brought to now at the latest), the software devices
    through the service. The seeded ones were due at distinct times before (b-0000 longest).
    Returns the time they are back."""
    back = fleet.now
    before = back - OUTAGE
    engine = fleet.sessions.kw["bind"]
    with engine.begin() as c:
        c.execute(
            insert(Device),
            [
                {
                    "device_id": f"b-{i:04}",
                    "ek_cert_fingerprint": f"{i:064x}",
                    "devid_cert_pem": "test",
                    "ak_public": b"ak-public-area",
                    "state": DeviceState.ACTIVE,
                    "state_reason": "test",
                    "registered_at": before - INTERVAL,
                    "state_changed_at": before - INTERVAL,
                    "attestation_result": AttestationResult.TRUSTED,
                    "attested_at": before,
                    "last_seen": before,
                    "attest_due": back - BACK + i,
                }
                for i in range(BACK)
            ],
        )
        c.execute(
            update(Device)
            .where(Device.device_id.in_(NAMES))
            .values(
                ak_public=b"ak-public-area",
                state=DeviceState.ACTIVE,
                attestation_result=AttestationResult.TRUSTED,
                attested_at=before,
                last_seen=before,
                attest_due=back + tasks.OFFLINE_RECHECK_SECONDS,  # put off while away
            )
        )
        c.execute(update(Device).where(Device.device_id.like("b-%")).values(last_seen=back))
    for name in NAMES:  # the real report path brings a returning device's attestation forward
        fleet.send(fleet.devices[name].report(KeyStateReport(()), back))
    return back


class Statements:
    def __init__(self, fleet: Fleet) -> None:
        self.engine = fleet.sessions.kw["bind"]
        self.count = 0

    def _statement(self, *_args: Any) -> None:
        self.count += 1

    def __enter__(self) -> Statements:
        event.listen(self.engine, "before_cursor_execute", self._statement)
        return self

    def __exit__(self, *_args: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._statement)


def scan(fleet: Fleet, now: int, statements: Statements | None = None) -> list[str]:
    """One attestation scan at ``now``: the devices challenged, in order."""
    cx = Call(fleet.service._env, Clock.reading(now))
    if statements is None:
        tasks.attest_tick(cx, now)
    else:
        with statements:
            tasks.attest_tick(cx, now)
    return [o.to for o in cx.outbox if isinstance(o.body, AttestChallenge)]


def rows(fleet: Fleet) -> dict[str, tuple[int, int | None]]:
    """Each device's (attest_due, attested_at)."""
    with fleet.sessions() as s:
        return {
            d: (due, at)
            for d, due, at in s.execute(
                select(Device.device_id, Device.attest_due, Device.attested_at)
            )
        }


def answer(fleet: Fleet, devices: list[str], now: int) -> None:
    """The verdicts of the devices' answers, as the answer path records them."""
    with fleet.sessions.begin() as s:
        registry = Registry(s)
        for device in devices:
            registry.record_attestation(
                device, AttestationResult.TRUSTED, reason="quote matches", now=now
            )


def test_a_fleet_back_from_an_outage_is_re_attested_at_the_configured_rate(
    fleet: Fleet,
) -> None:
    back = seed_outage(fleet)
    everyone = {f"b-{i:04}" for i in range(BACK)} | set(NAMES)
    due_back = rows(fleet)
    assert all(due_back[d][0] <= back for d in everyone)  # all due once back
    assert all(due_back[d][1] == back - OUTAGE for d in everyone)  # their last verdict is old

    challenged: list[str] = []
    costs: list[int] = []
    t = back
    scans = 0
    while len(challenged) < len(everyone):
        scans += 1
        assert scans <= -(-len(everyone) // CAP), "the backlog is not worked off"
        statements = Statements(fleet)
        now_challenged = scan(fleet, t, statements)
        costs.append(statements.count)
        assert 0 < len(now_challenged) <= CAP
        assert not set(now_challenged) & set(challenged)  # none twice
        if scans == 1:  # the longest due first
            assert now_challenged == [f"b-{i:04}" for i in range(CAP)]
        challenged += now_challenged
        # the rest stay due and keep their old verdict: shown as due, not as attested
        state = rows(fleet)
        for device in everyone - set(challenged):
            assert state[device][0] <= t and state[device][1] == back - OUTAGE, device
        for device in now_challenged:
            assert state[device][0] == t + INTERVAL
        answer(fleet, now_challenged[::2], t + 1)  # half of them answer at once
        t += tasks.ATTEST_SCAN_SECONDS
    assert sorted(challenged) == sorted(everyone)
    assert len(challenged) == len(everyone)
    assert scans == -(-len(everyone) // CAP)  # 21 scans: 2,002 devices at 100 a scan
    # a full scan costs the same whatever the backlog behind it (1,902 due at the second,
    # 302 at the one before the last); the first only adds the first reads of this instance
    # (its task row, the golden policy)
    assert len(set(costs[1:-1])) == 1, costs
    assert costs[1] <= costs[0] <= costs[1] + 8, costs
    assert costs[-1] < costs[1]  # the last scan's few

    # nothing more within the interval, whether the device answered or not
    for _ in range(3):
        assert scan(fleet, t) == []
        t += tasks.ATTEST_SCAN_SECONDS
    # the next round comes an interval after each one's challenge, at the same rate
    later = back + INTERVAL + tasks.ATTEST_SCAN_SECONDS
    with fleet.sessions.begin() as s:
        s.execute(update(Device).values(last_seen=later))
    assert len(scan(fleet, later)) == CAP


def test_a_scan_below_the_cap_takes_every_due_device(fleet: Fleet) -> None:
    """The cap only spreads a backlog: the usual scan (fewer due than its share) challenges
    every online device due, as before."""
    back = seed_outage(fleet)
    with fleet.sessions.begin() as s:  # all but CAP - 1 devices answered already
        s.execute(
            update(Device)
            .where(Device.device_id.like("b-%"), Device.device_id >= f"b-{CAP - 1 - len(NAMES):04}")
            .values(attest_due=back + INTERVAL, attested_at=back)
        )
    found = scan(fleet, back)
    assert len(found) == CAP - 1
    assert set(NAMES) <= set(found)


def test_the_share_of_a_scan_follows_the_rate_within_the_scan_batch() -> None:
    assert tasks.scan_cap(1) == tasks.ATTEST_SCAN_SECONDS
    assert tasks.scan_cap(50) == 50 * tasks.ATTEST_SCAN_SECONDS
    assert tasks.scan_cap(100) == 100 * tasks.ATTEST_SCAN_SECONDS <= tasks.ATTEST_SCAN_BATCH
    assert tasks.scan_cap(10_000) == tasks.ATTEST_SCAN_BATCH
