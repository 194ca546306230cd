"""The revocation feed on the lab: Mosquitto with TLS (the product ACL), ``keyfleet serve`` on a
SQLite file and on PostgreSQL, three agents on swtpm.

An admin revokes a device (through a request, as every revocation): the service appends the
revoke's Authorization to the feed and publishes the head retained; every other agent holds the
entry in its kept feed within ``FEED_BOUND`` seconds, and the service records how far each one
is. Then a broker tap (the service's TLS identity, as a wire tap at the broker sees and sends)
replays the older retained head, and publishes a head signed by a key of its own: each agent
refuses it by check id and its feed stays where it was. Then an admin removes an operator: the
agents take the removal from the feed and hold that operator as removed. Last, an admin deletes
a group: its member destroys the group's keys from the feed entry, and the id is refused after.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from agent.core import KEY_CHANGE_REPORT_DELAY, KEY_CHANGE_REPORT_SPREAD
from agent.protocol.errors import ProtocolError
from agent.protocol.feed import page
from agent.protocol.topics import FEED_RECIPIENT, REVOCATION_FEED_TOPIC, SERVICE_ID
from agent.protocol.wire.envelope import encode_message
from agent.protocol.wire.messages.feed import RevocationFeed
from firmware_sim.lab import Lab, LabDevice
from provisioning import pki
from provisioning.db.runtime import RevocationFeedRow, RevocationFeedSeen
from tests.fixtures.fleet import service_tap

pytestmark = pytest.mark.e2e
DATABASE_BACKENDS = ("sqlite", "postgresql")
LAB_OPTIONS = {"devices": 3}
FEED_BOUND = 30.0
"""Seconds from the revocation's result to every other agent holding the entry (measured on
this 2-core machine under load: a few seconds; the retained head reaches connected agents at
once, the bound leaves room for a loaded machine)."""
REPORTED_WITHIN = KEY_CHANGE_REPORT_DELAY + KEY_CHANGE_REPORT_SPREAD + 10
"""Seconds from an agent's change of feed to the service holding its keys.report (its delay
plus its own offset within the spread, and a loaded machine's margin)."""


def feed_seq(device: LabDevice) -> int | None:
    status = device.status() or {}
    feed = status.get("revocation_feed")
    return None if feed is None else int(feed["seq"])


def wait_feed(devices: list[LabDevice], seq: int, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if all(feed_seq(d) == seq for d in devices):
            return time.monotonic() - start
        time.sleep(0.2)
    raise AssertionError(f"feeds {[(d.id, feed_seq(d)) for d in devices]}, expected {seq}")


def refused(device: LabDevice, check: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = device.status() or {}
        if status.get("rejections", {}).get(check, 0) >= 1 and f"[{check}]" in device.log_tail():
            return
        time.sleep(0.2)
    raise AssertionError(f"{device.id} did not refuse with {check}: {device.log_tail()[-2000:]}")


def revoke(lab: Lab, device: LabDevice) -> None:
    result = lab.op("revoke", device.id, "--reason", "lab: feed test", operator="op-admin")
    assert result.returncode == 0, str(result)


def retained_head(lab: Lab) -> bytes:
    """What the broker keeps on the feed topic (a fresh subscriber gets it at once)."""
    tap = service_tap(lab, "feed-reader")
    try:
        tap.subscribe(REVOCATION_FEED_TOPIC)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            message = tap.get(timeout=1)
            if message is None:
                continue
            tap.ack(message)
            if message.topic == REVOCATION_FEED_TOPIC:
                return message.payload
        raise AssertionError("no retained feed head")
    finally:
        tap.close()


def test_peers_learn_a_revocation_and_refuse_replayed_and_forged_heads(fleet_lab: Lab) -> None:
    """Broker tap replaying an older, validly signed head; anyone (a broker tap) publishing a
    head under a key that is not the service's. Refused by check id, feed unchanged."""
    lab = fleet_lab
    d0, d1, d2 = lab.devices
    wait_feed([d0, d1, d2], 0, timeout=60)  # every agent keeps a feed, empty at first

    started = time.monotonic()
    revoke(lab, d2)
    took = wait_feed([d0, d1], 1, timeout=FEED_BOUND)
    print(f"peers held revocation 1 {took:.1f} s after the command returned "
          f"({time.monotonic() - started:.1f} s after it started)")  # fmt: skip
    first_head = retained_head(lab)

    revoke(lab, d1)
    wait_feed([d0], 2, timeout=FEED_BOUND)
    with lab.session() as session:
        rows = session.scalars(select(RevocationFeedRow).order_by(RevocationFeedRow.seq)).all()
        assert [r.seq for r in rows] == [1, 2]
    # the service learns how far d0's feed is from its keys.report (who lags). That report
    # leaves KEY_CHANGE_REPORT_DELAY plus d0's own offset within KEY_CHANGE_REPORT_SPREAD (from
    # its id, so up to 32 s) after d0 took entry 1; entry 2 joins the report already due.
    deadline = time.monotonic() + REPORTED_WITHIN
    seen = None
    while time.monotonic() < deadline:
        with lab.session() as session:
            seen = session.get(RevocationFeedSeen, d0.id)
            if seen is not None and seen.seq == 2:
                break
        time.sleep(0.5)
    assert seen is not None and seen.seq == 2
    (row,) = [r for r in lab.fleet_devices() if r["device_id"] == d0.id]
    assert (row["feed"], row["feed_behind"]) == (2, 0)  # keyfleet devices shows who lags

    # broker tap: the older head again, retained, as the broker would keep it
    before = (d0.status() or {})["revocation_feed"]
    tap = service_tap(lab, "feed-tap")
    try:
        tap.publish(REVOCATION_FEED_TOPIC, first_head, retain=True)
        refused(d0, "revocation.rollback")
        assert (d0.status() or {})["revocation_feed"] == before

        # a head under another key (the entries are the real ones; the signature is not)
        stranger = pki.generate_key()
        with lab.session() as session:
            entries = [r.entry for r in session.scalars(select(RevocationFeedRow))]
        body: RevocationFeed = page(entries, time=int(time.time()))
        forged = encode_message(
            body,
            key=stranger,
            sender=SERVICE_ID,
            to=FEED_RECIPIENT,
            seq=int(time.time() * 1000),
            time=int(time.time()),
        )
        tap.publish(REVOCATION_FEED_TOPIC, forged, retain=True)
        refused(d0, "revocation.signature")
        assert (d0.status() or {})["revocation_feed"] == before
    finally:
        tap.close()


def test_agents_learn_an_operator_removal_from_the_feed(fleet_lab: Lab) -> None:
    """An admin removes an operator (``keyfleet operator remove``, the lab's quorum of one admin):
    the removal's Authorization becomes the next feed entry, and the agent on swtpm verifies it
    and holds the operator as removed (its status names it), so it no longer counts that
    operator's approvals of later requests (docs/authorization.md, "Removed operators")."""
    lab = fleet_lab
    d0 = lab.devices[0]
    before = feed_seq(d0)
    assert before is not None
    result = lab.op("operator", "remove", "op-ops", operator="op-admin")
    assert result.returncode == 0, str(result)
    took = wait_feed([d0], before + 1, timeout=FEED_BOUND)
    print(f"{d0.id} held the removal {took:.1f} s after the command returned")
    feed = (d0.status() or {})["revocation_feed"]
    assert feed["removed_operators"] == ["op-ops"], feed
    with lab.session() as session:
        newest = session.scalars(
            select(RevocationFeedRow).order_by(RevocationFeedRow.seq.desc()).limit(1)
        ).one()
        assert newest.seq == before + 1


def test_a_deleted_group_is_destroyed_on_its_member_and_never_comes_back(fleet_lab: Lab) -> None:
    """An admin deletes a group (``keyfleet group delete``, the lab's quorum of one admin): the
    deletion is the next feed entry; the agent on swtpm verifies it, forgets the group and
    reports its epoch keys destroyed, and the command ends ``done`` once its feed report reached
    the entry. Then the group's id is refused: by the service (``ds.group.deleted``) and by the
    agent's local API (``data.group-deleted``)."""
    lab = fleet_lab
    d0 = lab.devices[0]  # the others were revoked above
    created = lab.op("group", "create", "g-del", "--members", d0.id, operator="op-admin")
    assert created.returncode == 0, str(created)
    with d0.api() as api:
        api.encrypt("g-del", b"sealed before the deletion")
    before = feed_seq(d0)
    assert before is not None and d0.epoch("g-del") is not None

    started = time.monotonic()
    deleted = lab.op("group", "delete", "g-del", operator="op-admin")
    took = time.monotonic() - started
    assert deleted.returncode == 0, str(deleted)
    assert deleted.final is not None and deleted.final["status"] == "done", str(deleted)
    assert f"feed entry {before + 1}" in deleted.final["detail"]
    print(f"group delete done (member's feed report in) {took:.1f} s after it started")
    assert feed_seq(d0) == before + 1 and d0.epoch("g-del") is None
    with d0.api() as api, pytest.raises(ProtocolError) as refused_data:
        api.encrypt("g-del", b"after")
    assert refused_data.value.check == "data.group-deleted"
    # the service holds the keys the agent reported destroyed, and the group as deleted
    keys = lab.registry(lambda r: r.key_states(d0.id))
    epochs = [k for k in keys if k.key_name.startswith("epoch/g-del/")]
    assert epochs and {k.state.value for k in epochs} == {"destroyed"}
    assert lab.registry(lambda r: r.group("g-del").deleted_seq) == before + 1
    assert "g-del" not in [g["group_id"] for g in lab.groups()]

    again = lab.op("group", "create", "g-del", "--members", d0.id, operator="op-admin")
    assert again.returncode != 0 and "ds.group.deleted" in str(again), str(again)
