"""The rekey policy's check reads only what is due (``store.rekey.due_rows``): with many members
not due a check issues the same few statements and loads no member or leaf row, and it still
asks exactly the members due by age, by epochs, asked long enough ago, seen for the first time,
after a group's policy changed and after the service's default changed. On SQLite and
PostgreSQL. The rows are seeded without their due columns, as a database upgraded to revision
0022 has them: the first check computes them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, insert, select, update

from agent.protocol.wire.messages.operator import GroupPolicy
from provisioning.db.runtime import LeafUpdateRow, RekeyDefaultRow
from provisioning.db.schema import Device, DeviceState, Group, GroupMember, PendingChange
from provisioning.service import rekeypolicy, store
from provisioning.service.context import Call, Clock
from provisioning.service.core import DeliveryService
from provisioning.service.store import rekey as rows
from tests.pure.test_service_core import T0, Fleet, another_instance, make_fleet
from tests.service_members import command_id

pytestmark = pytest.mark.pure

DATABASE_BACKENDS = ("sqlite", "postgresql")

DAY = 86_400
NOT_DUE = 300  # members of g1 not due
NOW = T0 + 10 * DAY


def seed(fleet: Fleet) -> None:
    """g1 at epoch 50, g2 at epoch 5, g3 at epoch 5, under the default (7 days, 10 epochs)."""
    names = [f"n-{i:04}" for i in range(NOT_DUE)]
    g1_special = ["age", "epochs", "asked-now", "asked-long-ago", "new-old", "new-recent", "going"]
    g2 = [f"two-{i}" for i in range(5)]
    devices = [*names, *g1_special, *g2, "three-old"]
    engine = fleet.sessions.kw["bind"]
    with engine.begin() as c:
        c.execute(
            insert(Device),
            [
                {
                    "device_id": d,
                    "ek_cert_fingerprint": f"{i:064x}",
                    "devid_cert_pem": "test",
                    "state": DeviceState.ACTIVE,
                    "state_reason": "test",
                    "registered_at": T0,
                    "state_changed_at": T0,
                }
                for i, d in enumerate(devices)
            ],
        )
        c.execute(
            insert(Group),
            [
                {
                    "group_id": g,
                    "epoch": epoch,
                    "public_tree": b"t",
                    "group_context": b"c",
                    "created_at": T0,
                    "updated_at": T0,
                }
                for g, epoch in (("g1", 50), ("g2", 5), ("g3", 5))
            ],
        )
        members = [("g1", d) for d in (*names, *g1_special)]
        members += [("g2", d) for d in g2] + [("g3", "three-old")]
        c.execute(
            insert(GroupMember),
            [
                {
                    "group_id": g,
                    "device_id": d,
                    "leaf_index": i,
                    "pending": PendingChange.REMOVE if d == "going" else None,
                    "joined_epoch": {"new-old": 30, "new-recent": 49}.get(d, 0),
                    "requested_at": T0,
                }
                for i, (g, d) in enumerate(members)
            ],
        )
        recent = NOW - 100
        leaf_rows = [("g1", d, 48, recent, None) for d in names]
        leaf_rows += [
            ("g1", "age", 49, NOW - 7 * DAY, None),
            ("g1", "epochs", 40, recent, None),
            ("g1", "asked-now", 40, recent, NOW - 10),
            ("g1", "asked-long-ago", 40, recent, NOW - 400),
            ("g1", "going", 1, T0, None),
        ]
        leaf_rows += [("g2", d, 5, recent, None) for d in g2]
        leaf_rows += [("g3", "three-old", 5, NOW - 8 * DAY, None)]
        c.execute(
            insert(LeafUpdateRow),
            [
                {"group_id": g, "device_id": d, "epoch": e, "updated_at": u, "asked_at": a}
                for g, d, e, u, a in leaf_rows
            ],
        )


def check(
    fleet: Fleet, now: int, reads: Reads | None = None, service: DeliveryService | None = None
) -> dict[str, set[str]]:
    """One rekey check at ``now`` (its statements and loads counted in ``reads``) by the
    fleet's service, or by ``service``: the members asked, by group."""
    cx = Call((service or fleet.service)._env, Clock.reading(now))
    before = asked(fleet)
    if reads is None:
        rekeypolicy.rekey_tick(cx, now)
    else:
        with reads:
            rekeypolicy.rekey_tick(cx, now)
    after = asked(fleet)
    return {g: after[g] - before.get(g, set()) for g in after if after[g] - before.get(g, set())}


def asked(fleet: Fleet) -> dict[str, set[str]]:
    with fleet.sessions() as s:
        return {
            g: {j.candidates[0] for j in store.open_jobs(s, g) if rekeypolicy.is_aimed(j)}
            for g in ("g1", "g2", "g3")
        }


class Reads:
    """Statements issued and leaf and member rows loaded while counting."""

    def __init__(self, fleet: Fleet) -> None:
        self.engine = fleet.sessions.kw["bind"]
        self.statements = 0
        self.loaded = 0

    def _statement(self, *_args: Any) -> None:
        self.statements += 1

    def _loaded(self, *_args: Any) -> None:
        self.loaded += 1

    def __enter__(self) -> Reads:
        event.listen(self.engine, "before_cursor_execute", self._statement)
        event.listen(LeafUpdateRow, "load", self._loaded)
        event.listen(GroupMember, "load", self._loaded)
        return self

    def __exit__(self, *_args: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._statement)
        event.remove(LeafUpdateRow, "load", self._loaded)
        event.remove(GroupMember, "load", self._loaded)


@pytest.fixture
def fleet(tmp_path: Path, database_url: str) -> Iterator[Fleet]:
    yield from make_fleet(
        tmp_path, (), url=database_url, rekey_max_age=7 * DAY, rekey_max_epochs=10
    )


def test_a_check_reads_only_the_due_members_and_asks_exactly_them(fleet: Fleet) -> None:
    seed(fleet)
    # the first check computes the due columns (none were recorded: an upgraded database),
    # records the members without a row, and asks the due ones
    assert check(fleet, NOW) == {
        "g1": {"age", "epochs", "asked-long-ago", "new-old"},
        "g3": {"three-old"},
    }

    # nothing due: two reads (the recorded default, one indexed read of the due rows), no
    # write, not one leaf or member row loaded, whatever NOT_DUE is
    reads = Reads(fleet)
    assert check(fleet, NOW + 10, reads) == {}
    assert reads.loaded == 0
    assert reads.statements <= 2, reads.statements

    # the epoch bound: a commit by "age" moves g1 to epoch 58, its 300 members (at 48) are 10
    # epochs behind; new-recent (joined at 49) is not yet
    with fleet.sessions.begin() as s:
        s.execute(update(Group).where(Group.group_id == "g1").values(epoch=58))
        rekeypolicy.record_commit(
            s,
            "g1",
            committer="age",
            epoch=57,
            added=(),
            removed=(),
            now=NOW + 15,
            bounds=(7 * DAY, 10),
        )
    due_now = check(fleet, NOW + 20)
    assert due_now == {"g1": {f"n-{i:04}" for i in range(NOT_DUE)}}

    # asked-now (asked 10 s before the first check, and due) again once the repeat interval
    # passed; those asked at the first check not yet
    repeat = NOW - 10 + rekeypolicy.ASK_REPEAT_SECONDS
    assert check(fleet, repeat - 10) == {}
    assert check(fleet, repeat) == {"g1": {"asked-now"}}


def test_policy_changes_recompute_what_is_due(fleet: Fleet) -> None:
    seed(fleet)
    check(fleet, NOW)
    cx = Call(fleet.service._env, Clock.reading(NOW + 5))

    def policy(group_id: str, max_age: int, max_epochs: int) -> None:
        body = GroupPolicy(command_id(), group_id, max_age, max_epochs)
        fleet.service._env.tx(
            lambda s: rekeypolicy.set_group_policy(
                cx, s, body, operator="op-admin", command_id=body.command_id, now=NOW + 5
            )
        )

    # a tighter age bound in g2 makes its members due (updated 100 s before NOW)
    policy("g2", 60, 0)
    assert check(fleet, NOW + 10) == {"g2": {f"two-{i}" for i in range(5)}}
    # a looser one leaves them alone: g2's members answered, then 30 days, no epoch bound
    with fleet.sessions.begin() as s:
        for i in range(5):
            rows.put_update(
                s, "g2", f"two-{i}", epoch=6, now=NOW + 11, bounds=(60, 0), group_epoch=6
            )
    policy("g2", 30 * DAY, 0)
    reads = Reads(fleet)
    assert check(fleet, NOW + 200, reads) == {}
    assert reads.loaded == 0

    # the service restarted with a default of 2 epochs: g1's members at 48 (g1 at 50) are due,
    # g2 keeps its own policy
    env = fleet.service._env
    env.settings = replace(env.settings, rekey_max_epochs=2)
    assert check(fleet, NOW + 210) == {"g1": {f"n-{i:04}" for i in range(NOT_DUE)}}


def _due_state(fleet: Fleet) -> tuple[object, ...]:
    """The recorded default and every row's due columns."""
    with fleet.sessions() as s:
        basis = rows.default_basis(s)
        due = s.execute(
            select(
                LeafUpdateRow.group_id,
                LeafUpdateRow.device_id,
                LeafUpdateRow.due_at,
                LeafUpdateRow.due_epoch,
                LeafUpdateRow.asked_at,
            ).order_by(LeafUpdateRow.group_id, LeafUpdateRow.device_id)
        ).all()
        return basis, tuple(due)


def test_instances_with_another_default_do_not_recompute_by_turns(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    """Two instances of one installation with different ``[groups]`` defaults: the one whose
    first check came last records its default (as after a rolling restart with a new one);
    the other finds a default recorded after its own, computes nothing again, counts and logs
    ``ds.rekey.default-mismatch`` (once per default seen), and asks by the recorded one."""
    seed(fleet)
    a = fleet.service
    check(fleet, NOW)  # a records its default: 7 days, 10 epochs
    b = another_instance(fleet, "b", rekey_max_epochs=2)
    # b's first check: another default recorded, none of its own yet (a restart with a new
    # [groups] default): every row computed again, g1's members at 48 (g1 at 50) due
    assert check(fleet, NOW + 10, service=b) == {"g1": {f"n-{i:04}" for i in range(NOT_DUE)}}
    assert b.metrics.rejections.value(rekeypolicy.DEFAULT_MISMATCH) == 0
    recorded = _due_state(fleet)
    assert recorded[0] == (7 * DAY, 2)

    # a, still configured with 10 epochs: a default recorded after its own; it does not
    # compute the rows back, twice
    caplog.set_level("WARNING", logger="keyfleet.service")
    reads = Reads(fleet)
    assert check(fleet, NOW + 20, reads) == {}
    assert reads.loaded == 0
    assert check(fleet, NOW + 30) == {}
    assert _due_state(fleet) == recorded
    assert a.metrics.rejections.value(rekeypolicy.DEFAULT_MISMATCH) == 2
    warned = [r.getMessage() for r in caplog.records if rekeypolicy.DEFAULT_MISMATCH in r.message]
    assert len(warned) == 1, warned
    assert "same [groups] configuration" in warned[0]

    # a asks by the recorded default: two-0 of g2, 2 epochs behind once g2 is at epoch 7, is
    # due by it (not by a's 10 epochs); its due time set as a commit to epoch 7 sets it
    with fleet.sessions.begin() as s:
        s.execute(update(Group).where(Group.group_id == "g2").values(epoch=7))
        s.execute(
            update(LeafUpdateRow)
            .where(LeafUpdateRow.device_id == "two-0")
            .values(due_at=NOW + 35, due_epoch=None)
        )
    assert check(fleet, NOW + 40) == {"g2": {"two-0"}}
    # b, whose default is the recorded one, neither warns nor computes again
    before = _due_state(fleet)
    assert check(fleet, NOW + 50, service=b) == {}
    assert b.metrics.rejections.value(rekeypolicy.DEFAULT_MISMATCH) == 0
    assert _due_state(fleet) == before
    with fleet.sessions() as s:
        assert len(s.scalars(select(RekeyDefaultRow)).all()) == 1
