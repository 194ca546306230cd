"""Issue 4 acceptance, end to end on the local lab (``firmware_sim.lab``): a device that was
offline while its group moved on catches up when it comes back; one that was away longer than
the service's commit-log retention is removed and re-welcomed automatically.

One lab per module, with a short commit-log retention (3 epochs) and a short ack timeout (the
rekeys made while a member is away end in ``timeout`` naming it, which is what an operator
sees). The device goes offline by stopping its agent (SIGTERM: state saved, disconnected) and
the broker's session of the device is dropped, so every commit it missed must come from the
service's catch-up, not from messages the broker queued. The tests build on each other in
file order (group ``g2`` made by the first).
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from firmware_sim.lab import Lab, LabDevice

pytestmark = pytest.mark.e2e
# the whole module once on a SQLite file and once on PostgreSQL (tests/fixtures/postgres.py)
DATABASE_BACKENDS = ("sqlite", "postgresql")

RETENTION = 3
LAB_OPTIONS = {
    "devices": 4,
    "ack_timeout": 4,
    "commit_request_timeout": 2,
    "retention_epochs": RETENTION,
}
G = "g2"


@pytest.fixture(scope="module")
def lab(fleet_lab: Lab) -> Lab:
    return fleet_lab


def group_row(lab: Lab) -> dict[str, Any]:
    return next(row for row in lab.groups() if row["group_id"] == G)


def wait_agreed(lab: Lab, epoch: int | None = None, timeout: float = 60.0) -> int:
    """Until every member acked the current epoch (``epoch`` if given) with one authenticator,
    and every agent's status shows it; returns the epoch."""
    deadline = time.monotonic() + timeout
    while True:
        row = group_row(lab)
        status = lab.ack_status(G)
        if (
            row["agreed"] is True
            and status.agreed
            and len(status.by_authenticator) == 1
            and (epoch is None or row["epoch"] == epoch)
        ):
            break
        assert time.monotonic() < deadline, (row, status)
        time.sleep(0.2)
    current = int(row["epoch"])
    assert sorted(row["members"]) == sorted(lab.device_ids)
    lab.wait_epoch(G, current, timeout=30)
    return current


def cross_decrypt(source: LabDevice, targets: list[LabDevice]) -> None:
    plaintext = os.urandom(32)
    with source.api() as api:
        blob = api.encrypt(G, plaintext)
    for target in targets:
        with target.api() as api:
            assert api.decrypt(G, blob) == plaintext, target.name


def rekeys_while_away(lab: Lab, away: LabDevice, count: int) -> int:
    """``count`` rekeys with ``away`` offline: each commits (the group moves) and then times out
    naming ``away`` as the straggler. Returns the epoch reached."""
    epoch = int(group_row(lab)["epoch"])
    for _ in range(count):
        result = lab.op("rekey", "--group", G, timeout=120)
        assert result.returncode == 3, str(result)
        assert result.final is not None and result.final["status"] == "timeout", str(result)
        assert result.final["stragglers"] == [away.id], str(result)
        assert f"stragglers: {away.id}" in result.stderr
        epoch += 1
        assert int(group_row(lab)["epoch"]) == epoch
    return epoch


def go_offline(lab: Lab, device: LabDevice) -> None:
    lab.stop_agent(device)
    lab.drop_session(device)


def test_offline_device_catches_up_through_three_rekeys_on_reconnect(lab: Lab) -> None:
    created = lab.op("group", "create", G, "--members", *lab.device_ids, timeout=120)
    assert created.returncode == 0, str(created)
    lab.wait_settled(G, timeout=60)  # the joiners' first self-updates (docs/treekem.md)
    start = wait_agreed(lab)
    away = lab.devices[1]
    go_offline(lab, away)
    epoch = rekeys_while_away(lab, away, 3)
    assert epoch == start + 3
    assert away.epoch(G) == start  # its saved state: it missed all three
    # the three commits it needs are still in the log
    assert [c.epoch for c in lab.registry(lambda r: r.commits_from(G, start))] == [
        start,
        start + 1,
        start + 2,
    ]
    offset = lab.service_log.stat().st_size
    lab.reboot(away)  # reconnects, reports its epochs; the service replays what it missed
    assert wait_agreed(lab, epoch) == epoch
    log = lab.service_log.read_bytes()[offset:].decode(errors="replace")
    assert f"catch-up: {away.id} is behind in {G}; replaying 3 commit(s)" in log
    assert not [e for e in lab.audit() if e.action == "group.readd"]
    cross_decrypt(away, [d for d in lab.devices if d is not away])
    cross_decrypt(lab.devices[0], [away])


def test_device_offline_beyond_retention_is_removed_and_rewelcomed(lab: Lab) -> None:
    start = wait_agreed(lab)
    away = lab.devices[2]
    head = lab.audit_head()
    go_offline(lab, away)
    epoch = rekeys_while_away(lab, away, RETENTION + 1)
    assert epoch == start + RETENTION + 1
    # retention dropped the commit it would need first
    oldest = lab.registry(lambda r: r.oldest_retained_epoch(G))
    assert oldest is not None and oldest > start
    lab.reboot(away)
    # removed (one commit by another member), re-added with a fresh welcome (one more), and
    # the re-added device's first self-update (one more: docs/treekem.md "Joining")
    final = wait_agreed(lab, epoch + 3, timeout=90)
    assert final == epoch + 3 and not away.fresh_leaf_pending(G)
    readds = [e for e in lab.audit(head + 1) if e.action == "group.readd"]
    assert len(readds) == 1 and readds[0].actor == "service", readds
    assert readds[0].target == G and away.id in readds[0].details
    cross_decrypt(away, [d for d in lab.devices if d is not away])
    cross_decrypt(lab.devices[3], [away])
    verify = lab.keyfleet("audit", "verify", "--config", str(lab.service_config))
    assert verify.returncode == 0, str(verify)
