"""The delivery service's part of the key lifecycle (issue 6), sans-I/O against a real SQLite
file and software MLS members (tests/service_members.py): rotation asked by a member
(``group.update_request``) becomes a self-update with no operator; ``device.destroyed`` makes
the device and its keys destroyed, takes it out of its groups and refuses it afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.protocol.lifecycle import KeyKind, KeyRecord, KeyState
from agent.protocol.wire.messages.group import UpdateRequest
from agent.protocol.wire.messages.key_state import DeviceDestroyed, KeyStateReport
from agent.protocol.wire.messages.service import CommitAction, CommitRequest
from provisioning.db.schema import PendingChange
from provisioning.registry import DeviceState, Registry
from tests.pure.test_service_core import T0, Fleet, agreed, create_g1, make_fleet

pytestmark = pytest.mark.pure


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    yield from make_fleet(tmp_path)


def test_update_request_rotates_the_group_with_no_operator(fleet: Fleet) -> None:
    create_g1(fleet, "dev-1", "dev-2", "dev-3")
    epoch = fleet.epoch("g1")
    old_key = fleet.devices["dev-2"].groups["g1"].data_key()
    asked: list[tuple[str, CommitRequest]] = []
    original = fleet.devices["dev-2"]._commit

    def spy(request: CommitRequest, now: int) -> list[tuple[str, bytes]]:
        asked.append(("dev-2", request))
        return original(request, now)

    fleet.devices["dev-2"]._commit = spy  # type: ignore[method-assign]
    fleet.send(
        fleet.devices["dev-2"].report(UpdateRequest("g1", epoch, "max-epoch-age"), fleet.now)
    )
    # the member that asked was asked to self-update, and the group moved on
    assert [(n, r.action, r.epoch) for n, r in asked] == [("dev-2", CommitAction.UPDATE, epoch)]
    assert fleet.epoch("g1") == epoch + 1
    assert len(agreed(fleet, "g1")) == 1
    assert fleet.devices["dev-2"].groups["g1"].data_key() != old_key
    rotate = [e for e in fleet.audit_entries() if e.action == "group.rotate"]
    assert len(rotate) == 1
    assert rotate[0].actor == "device:dev-2" and rotate[0].target == "g1"
    assert rotate[0].reason == "automatic rotation: max-epoch-age"

    # asking about an epoch the group already left changes nothing
    fleet.send(
        fleet.devices["dev-3"].report(UpdateRequest("g1", epoch, "max-epoch-age"), fleet.now)
    )
    assert fleet.epoch("g1") == epoch + 1
    assert len([e for e in fleet.audit_entries() if e.action == "group.rotate"]) == 1


def test_update_requests_of_many_members_give_one_rotation(fleet: Fleet) -> None:
    create_g1(fleet, "dev-1", "dev-2", "dev-3")
    epoch = fleet.epoch("g1")
    fleet.devices["dev-1"].silent = True  # holds the request in flight while the others ask
    fleet.send(
        fleet.devices["dev-1"].report(UpdateRequest("g1", epoch, "max-epoch-age"), fleet.now)
    )
    for name in ("dev-2", "dev-3"):
        fleet.send(
            fleet.devices[name].report(
                UpdateRequest("g1", epoch, "max-messages-per-epoch"), fleet.now
            )
        )
    assert fleet.service.queue_length("g1") == 1
    fleet.devices["dev-1"].silent = False
    fleet.tick(fleet.service.settings.commit_request_timeout)  # handed to the next member
    assert fleet.epoch("g1") == epoch + 1
    assert fleet.service.queue_length("g1") == 0
    assert len(agreed(fleet, "g1")) == 1


def test_update_request_from_a_non_member_is_refused(fleet: Fleet) -> None:
    create_g1(fleet, "dev-1", "dev-2")
    fleet.send(fleet.devices["dev-3"].report(UpdateRequest("g1", 1, "max-epoch-age"), fleet.now))
    assert fleet.service.rejections.count("ds.group.member") == 1
    assert fleet.epoch("g1") == 1


def test_device_destroyed_marks_keys_removes_from_groups_and_refuses_later(
    fleet: Fleet,
) -> None:
    create_g1(fleet, "dev-1", "dev-2", "dev-3")
    records = (
        KeyRecord("devid", KeyKind.DEVID, ((KeyState.PRE_ACTIVATION, T0), (KeyState.ACTIVE, T0))),
        KeyRecord(
            "epoch/g1/2",
            KeyKind.EPOCH,
            ((KeyState.PRE_ACTIVATION, T0), (KeyState.ACTIVE, T0)),
            group="g1",
            epoch=2,
        ),
    )
    fleet.send(fleet.devices["dev-3"].report(KeyStateReport(records), fleet.now))
    epoch = fleet.epoch("g1")
    fleet.now += 5
    fleet.send(fleet.devices["dev-3"].report(DeviceDestroyed("factory reset"), fleet.now))
    with fleet.sessions() as s:
        reg = Registry(s)
        device = reg.device("dev-3")
        assert device.state is DeviceState.DESTROYED
        assert device.state_reason == "factory reset: factory reset"
        keys = reg.key_states("dev-3")
        assert [(k.key_name, k.kind, k.state, k.changed_at) for k in keys] == [
            ("devid", "devid", KeyState.DESTROYED, fleet.now),
            ("epoch/g1/2", "epoch", KeyState.DESTROYED, fleet.now),
        ]
        assert all(m.pending is not PendingChange.REMOVE for m in reg.members("g1"))
    # removed by a commit of another member: the group moved on without it
    assert fleet.members("g1") == ["dev-1", "dev-2"]
    assert fleet.epoch("g1") == epoch + 1
    assert len(agreed(fleet, "g1")) == 1
    entry = next(e for e in fleet.audit_entries() if e.action == "device.destroyed")
    assert entry.actor == "device:dev-3" and entry.outcome.value == "accepted"
    # anything signed by the destroyed identity is refused and audited
    before = fleet.service.rejections.count("ds.device.revoked")
    fleet.send(fleet.devices["dev-3"].report(KeyStateReport(()), fleet.now))
    assert fleet.service.rejections.count("ds.device.revoked") == before + 1
    last = fleet.audit_entries()[-1]
    assert last.outcome.value == "refused" and "destroyed" in last.reason
