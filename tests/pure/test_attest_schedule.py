"""The attestation schedule reads only what is due (``devices.attest_due``, indexed): a scan
challenges the devices due longest first, at most ``ATTEST_SCAN_BATCH`` of them; a challenge
sets when the device is due next; a device that cannot be challenged (offline, not attestable)
is looked at again later instead of at every scan. The real service on a SQLite file with the
software members of tests/service_members.py (the challenges are read back from its signed
publishes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, update

from agent.protocol.wire.envelope import open_message
from agent.protocol.wire.messages.attestation import AttestChallenge
from agent.protocol.wire.messages.key_state import KeyStateReport
from firmware_sim.boot import default_components
from provisioning.db.schema import Device, DeviceState
from provisioning.policy import policy_from_components
from provisioning.service import tasks
from provisioning.service.core import AttestationSettings, DeliveryService, Publish
from tests.pure.test_service_core import Fleet, make_fleet

pytestmark = pytest.mark.pure

INTERVAL = 600
NAMES = ("dev-1", "dev-2", "dev-3", "dev-4")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    for fleet in make_fleet(tmp_path, NAMES):
        first = fleet.service
        fleet.service = DeliveryService(
            fleet.sessions,
            signing_key=first._env.key,
            operator_ca=first._env.operator_ca,
            device_ca=first._env.devices.device_ca,
            settings=first.settings,
            attestation=AttestationSettings(
                policy=policy_from_components(default_components("1.0")), interval=INTERVAL
            ),
        )
        with fleet.sessions.begin() as s:  # attestable (an AK registered), heard from now
            s.execute(update(Device).values(ak_public=b"ak-public-area", last_seen=fleet.now))
        yield fleet


def scan(fleet: Fleet, now: int) -> list[str]:
    """One scan at ``now``: the devices challenged, in order."""
    found = []
    publishes: list[Publish] = fleet.service.tick(now)
    for p in publishes:
        device = p.topic.split("/")[3]
        body = open_message(p.payload, fleet._service_signer, now=now, recipients={device}).body
        if isinstance(body, AttestChallenge):
            found.append(device)
    return found


def due(fleet: Fleet) -> dict[str, int]:
    with fleet.sessions() as s:
        return {d: at for d, at in s.execute(select(Device.device_id, Device.attest_due))}


def test_a_scan_takes_the_longest_due_first_a_batch_at_a_time(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tasks, "ATTEST_SCAN_BATCH", 3)
    t = fleet.now
    with fleet.sessions.begin() as s:  # dev-4 due longest, dev-1 next; all due
        for device, at in (("dev-4", t - 50), ("dev-1", t - 40), ("dev-3", t - 30)):
            s.execute(update(Device).where(Device.device_id == device).values(attest_due=at))
        s.execute(update(Device).where(Device.device_id == "dev-2").values(attest_due=t - 20))
    assert scan(fleet, t) == ["dev-4", "dev-1", "dev-3"]  # the batch: dev-2 waits
    after = due(fleet)
    assert after["dev-4"] == after["dev-1"] == after["dev-3"] == t + INTERVAL
    assert after["dev-2"] == t - 20
    nxt = t + tasks.ATTEST_SCAN_SECONDS
    assert scan(fleet, nxt) == ["dev-2"]
    assert due(fleet)["dev-2"] == nxt + INTERVAL
    # nothing due again before the interval is over; each device once it is
    assert scan(fleet, nxt + 2 * tasks.ATTEST_SCAN_SECONDS) == []
    with fleet.sessions.begin() as s:
        s.execute(update(Device).values(last_seen=t + 2 * INTERVAL))
    late = t + INTERVAL + 3 * tasks.ATTEST_SCAN_SECONDS
    first = scan(fleet, late)  # a batch of three, then the fourth
    assert sorted(first + scan(fleet, late + tasks.ATTEST_SCAN_SECONDS)) == sorted(NAMES)
    assert len(first) == 3


def test_devices_that_cannot_be_challenged_wait_instead_of_being_read_every_scan(
    fleet: Fleet,
) -> None:
    t = fleet.now
    with fleet.sessions.begin() as s:
        s.execute(
            update(Device).where(Device.device_id == "dev-1").values(state=DeviceState.REVOKED)
        )
        s.execute(update(Device).where(Device.device_id == "dev-2").values(ak_public=None))
        s.execute(update(Device).where(Device.device_id == "dev-3").values(last_seen=t - 3600))
        s.execute(update(Device).where(Device.device_id == "dev-4").values(attested_at=t - 100))
    assert scan(fleet, t) == []
    after = due(fleet)
    assert after["dev-1"] == after["dev-2"] == t + INTERVAL  # not attestable
    assert after["dev-3"] == t + tasks.OFFLINE_RECHECK_SECONDS  # offline: looked at again soon
    assert after["dev-4"] == t - 100 + INTERVAL  # a verdict already within the interval
    # the offline device is challenged once it was heard from and its recheck came
    with fleet.sessions.begin() as s:
        s.execute(update(Device).where(Device.device_id == "dev-3").values(last_seen=t + 30))
    assert scan(fleet, t + 30) == []
    assert scan(fleet, t + tasks.OFFLINE_RECHECK_SECONDS) == ["dev-3"]


def test_a_device_put_off_while_away_is_challenged_at_the_next_scan_once_it_reports(
    fleet: Fleet,
) -> None:
    """A device the schedule put off because it was away (a fresh device not connected yet, or
    one that was offline) is due again as soon as it reports: its keys.report after connecting
    moves it, in the same row write as ``last_seen``, so it does not wait for the recheck."""
    t = fleet.now
    with fleet.sessions.begin() as s:
        s.execute(update(Device).where(Device.device_id == "dev-3").values(last_seen=None))
    assert "dev-3" not in scan(fleet, t)
    assert due(fleet)["dev-3"] == t + tasks.OFFLINE_RECHECK_SECONDS
    back = t + 2
    fleet.now = back
    fleet.send(fleet.devices["dev-3"].report(KeyStateReport(()), back))
    assert due(fleet)["dev-3"] == back
    assert scan(fleet, back + tasks.ATTEST_SCAN_SECONDS) == ["dev-3"]
    # a device that was online already does not move: its report is not a return
    before = due(fleet)["dev-1"]
    fleet.send(fleet.devices["dev-1"].report(KeyStateReport(()), back + 10))
    assert due(fleet)["dev-1"] == before
