"""Dual control end to end on the lab: Mosquitto with TLS, ``keyfleet serve`` with ``[quorum]
min_approvals = 2``, four agents on swtpm, two operators running the CLI: one operator alone
cannot change the group, the second one's approval runs the add, and an expired request cannot
be approved."""

from __future__ import annotations

import time
from typing import Any

import pytest

from firmware_sim.lab import Lab

pytestmark = pytest.mark.e2e

G = "g-quorum"
TTL = 30
LAB_OPTIONS = {"devices": 4, "min_approvals": 2, "request_ttl": TTL}


@pytest.fixture(scope="module")
def lab(fleet_lab: Lab) -> Lab:
    return fleet_lab


def request_of(result: Any) -> dict[str, Any]:
    final = result.final
    assert final is not None and "request" in final, str(result)
    request: dict[str, Any] = final["request"]
    return request


def members(lab: Lab) -> list[str]:
    row = next((row for row in lab.groups() if row["group_id"] == G), None)
    return [] if row is None else sorted(row["members"])


def test_two_operators_approve_one_alone_cannot_an_expired_request_cannot_be_approved(
    lab: Lab,
) -> None:
    d0, d1, d2, d3 = (d.id for d in lab.devices)
    created = lab.op("group", "create", G, "--members", d0, d1, d2, timeout=120)
    assert created.returncode == 4, str(created)  # waiting for a second operator
    pending = request_of(created)
    assert pending["state"] == "pending" and pending["approvers"] == ["op-ops"]
    assert members(lab) == []
    approved = lab.op("approve", pending["request_id"], "--yes", operator="op-admin")
    assert approved.returncode == 0, str(approved)
    assert approved.final is not None and approved.final["status"] == "done", str(approved)
    assert members(lab) == sorted((d0, d1, d2))

    stale = request_of(lab.op("propose", "group-remove", G, d1))
    proposed_at = time.monotonic()
    add = lab.op("propose", "group-add", G, d3)
    assert add.returncode == 0, str(add)
    add_request = request_of(add)
    assert add_request["state"] == "pending" and add_request["required"] == 2
    listed = lab.keyfleet("requests", "--json", operator="op-view")
    assert listed.returncode == 0, str(listed)
    assert {r["request_id"] for r in listed.json()} == {
        stale["request_id"],
        add_request["request_id"],
    }
    time.sleep(2)
    assert members(lab) == sorted((d0, d1, d2))  # one operator alone changed nothing

    added = lab.op("approve", add_request["request_id"], "--yes", operator="op-admin")
    assert added.returncode == 0, str(added)
    final = added.final
    assert final is not None and final["status"] == "done", str(added)
    assert final["acked"] == len((d0, d1, d2, d3)) and final["pending"] == 0
    assert members(lab) == sorted((d0, d1, d2, d3))

    time.sleep(max(0.0, TTL + 2 - (time.monotonic() - proposed_at)))
    late = lab.op("approve", stale["request_id"], "--yes", operator="op-admin")
    assert late.returncode == 1, str(late)
    assert "expired" in late.stderr, str(late)
    assert members(lab) == sorted((d0, d1, d2, d3))
