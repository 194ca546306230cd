"""Catch-up runs on every verified report: the newest epoch a member acked and the newest commit
it made in a group must each be one index seek, not a scan of the group's kept acks (about
640,000 rows in a 10,000-member group; bench/bench_scale.py). Checked with SQLite's own query
plan of the statements ``store.known_epoch`` runs, on a database the migrations made, and its
answer checked on real rows; so is the one query a batch's catch-up reads
(``store.catch_up_facts``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, insert

from provisioning.db import migrations
from provisioning.db.schema import Ack, CommitLogEntry, Device, DeviceState, Group, GroupMember
from provisioning.registry import make_engine, session_factory
from provisioning.service import store

pytestmark = pytest.mark.pure


def test_the_newest_ack_and_commit_of_a_member_are_read_by_index(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    migrations.upgrade(engine)
    with engine.begin() as c:
        c.execute(
            insert(Device),
            [
                {
                    "device_id": d,
                    "ek_cert_fingerprint": d,
                    "devid_cert_pem": "-",
                    "state": DeviceState.ACTIVE,
                    "registered_at": 0,
                    "state_changed_at": 0,
                }
                for d in ("dev-1", "dev-2")
            ],
        )
        c.execute(
            insert(Group),
            [
                {
                    "group_id": "g",
                    "epoch": 9,
                    "public_tree": b"t",
                    "group_context": b"c",
                    "created_at": 0,
                    "updated_at": 0,
                }
            ],
        )
        c.execute(
            insert(GroupMember),
            [
                {"group_id": "g", "device_id": d, "leaf_index": i, "requested_at": 0}
                for i, d in enumerate(("dev-1", "dev-2"))
            ],
        )
        c.execute(
            insert(Ack),
            [
                {
                    "group_id": "g",
                    "epoch": e,
                    "device_id": d,
                    "epoch_authenticator": b"a",
                    "received_at": 0,
                }
                for e in range(1, 10)
                for d in ("dev-1", "dev-2")
                if d == "dev-2" or e <= 3
            ],
        )
        c.execute(
            insert(CommitLogEntry),
            [
                {
                    "group_id": "g",
                    "epoch": e,
                    "committer": "dev-1",
                    "commit": b"x",
                    "accepted_at": 0,
                }
                for e in (2, 4)
            ]
            + [
                {
                    "group_id": "g",
                    "epoch": e,
                    "committer": "dev-2",
                    "commit": b"x",
                    "accepted_at": 0,
                }
                for e in (1, 3, 5, 6, 7, 8)
            ],
        )

    statements: list[tuple[str, Any]] = []

    def capture(_conn: object, _cursor: object, sql: str, params: Any, *_: object) -> None:
        statements.append((sql, params))

    event.listen(engine, "before_cursor_execute", capture)
    with session_factory(engine)() as session:
        # dev-1: acked up to 3, committed in epoch 4 (so it holds 5); dev-2: acked 9
        assert store.known_epoch(session, "g", "dev-1", 0) == 5
        assert store.known_epoch(session, "g", "dev-2", 0) == 9
    event.remove(engine, "before_cursor_execute", capture)

    reads = [(sql, p) for sql, p in statements if sql.lstrip().upper().startswith("SELECT")]
    assert len(reads) == 4, reads
    plans = []
    with engine.connect() as c:
        for sql, params in reads[:2]:
            plan = c.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params).all()
            plans.append(" | ".join(str(row[-1]) for row in plan))
    acks, commits = plans
    assert "USING COVERING INDEX ix_acks_group_device_epoch" in acks, acks
    assert "USING COVERING INDEX ix_commit_log_group_committer_epoch" in commits, commits

    # the one-query form the catch-up of a batch reads (store.catch_up_facts): the same
    # answers, the groups' epochs, and both subqueries by the same indexes
    statements.clear()
    event.listen(engine, "before_cursor_execute", capture)
    with session_factory(engine)() as session:
        facts = store.catch_up_facts(session, ["dev-2", "dev-1", "dev-3"])
    event.remove(engine, "before_cursor_execute", capture)
    assert facts.proven == {("g", "dev-1"): 5, ("g", "dev-2"): 9}
    assert facts.epochs == {"g": 9}
    assert [(m.device_id, m.leaf_index) for ms in facts.memberships.values() for m in ms] == [
        ("dev-1", 0),
        ("dev-2", 1),
    ]
    reads = [(sql, p) for sql, p in statements if sql.lstrip().upper().startswith("SELECT")]
    assert len(reads) == 1, reads
    with engine.connect() as c:
        sql, params = reads[0]
        plan = " | ".join(
            str(row[-1]) for row in c.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params).all()
        )
    assert "USING COVERING INDEX ix_acks_group_device_epoch" in plan, plan
    assert "USING COVERING INDEX ix_commit_log_group_committer_epoch" in plan, plan
    engine.dispose()
