"""RMA end to end on the lab: Mosquitto with TLS, ``keyfleet serve`` with ``[quorum]
min_approvals = 2``, agents on swtpm, operators running the CLI. A member's TPM fails (the device
is powered off for good); a replacement board is enrolled by the station as a new device;
``keyfleet device replace OLD NEW`` by one admin leaves it pending (an operator may not propose
it, the same admin cannot approve twice: refused by check id, nothing changed); the second
admin's approval runs it: the members remove the old leaf and add the new device under the
admins' Authorization (they verify it themselves), the new device holds the group at the epoch
and epoch authenticator of the others, the old identity is revoked, and a rekey afterwards
includes the new device."""

from __future__ import annotations

from typing import Any

import pytest

from firmware_sim.lab import CliResult, Lab

pytestmark = pytest.mark.e2e

G = "g-rma"
LAB_OPTIONS = {"devices": 3, "min_approvals": 2}


@pytest.fixture(scope="module")
def lab(fleet_lab: Lab) -> Lab:
    return fleet_lab


def request_of(result: CliResult) -> dict[str, Any]:
    final = result.final
    assert final is not None and "request" in final, str(result)
    request: dict[str, Any] = final["request"]
    return request


def members(lab: Lab) -> list[str]:
    row = next((row for row in lab.groups() if row["group_id"] == G), None)
    return [] if row is None else sorted(row["members"])


def state_of(lab: Lab, device_id: str) -> str:
    row = next(r for r in lab.fleet_devices() if r["device_id"] == device_id)
    return str(row["state"])


def test_two_admins_replace_a_failed_device_by_a_new_identity(lab: Lab) -> None:
    d0, d1, old = lab.devices
    created = lab.op("group", "create", G, "--members", d0.id, d1.id, old.id, timeout=120)
    assert created.returncode == 4, str(created)
    done = lab.op("approve", request_of(created)["request_id"], "--yes", operator="op-admin")
    assert done.returncode == 0, str(done)
    assert members(lab) == sorted((d0.id, d1.id, old.id))

    lab.stop_device(old)  # its TPM failed: the board never comes back
    new = lab.add_device("d-rma")  # the replacement, enrolled by the station as a new device
    assert new.id not in (d0.id, d1.id, old.id)

    # One operator alone cannot: an operator may not propose it, the proposing admin's second
    # approval does not count; nothing changes until a second admin approves.
    refused = lab.op("device", "replace", old.id, new.id, operator="op-ops")
    assert refused.returncode == 1 and "op.role" in str(refused), str(refused)
    proposed = lab.op(
        "device", "replace", old.id, new.id, "--reason", "RMA: TPM failed", operator="op-admin"
    )
    assert proposed.returncode == 4, str(proposed)  # waiting for a second admin
    pending = request_of(proposed)
    assert pending["op"] == "device.replace" and pending["members"] == [old.id, new.id]
    assert pending["groups"] == [G] and pending["approvers"] == ["op-admin"]
    again = lab.op("approve", pending["request_id"], "--yes", operator="op-admin")
    assert again.returncode == 1 and "quorum.duplicate" in str(again), str(again)
    assert members(lab) == sorted((d0.id, d1.id, old.id))
    assert state_of(lab, old.id) != "revoked"

    replaced = lab.op("approve", pending["request_id"], "--yes", operator="op-admin2")
    assert replaced.returncode == 0, str(replaced)
    final = replaced.final
    assert final is not None and final["status"] == "done", str(replaced)
    assert members(lab) == sorted((d0.id, d1.id, new.id))
    assert state_of(lab, old.id) == "revoked"

    # The new device holds the group key the others hold: same epoch, same authenticator.
    epoch = lab.wait_settled(G, [d0, d1, new])
    assert new.epoch(G) == d0.epoch(G) == d1.epoch(G) == epoch
    status = lab.ack_status(G)
    assert status.agreed and sorted(status.members) == sorted((d0.id, d1.id, new.id)), status
    (acked,) = status.by_authenticator.values()
    assert sorted(acked) == sorted((d0.id, d1.id, new.id))

    rekey = lab.op("rekey", "--group", G)
    assert rekey.returncode == 0, str(rekey)
    lab.wait_epoch(G, epoch + 1, [d0, d1, new])
