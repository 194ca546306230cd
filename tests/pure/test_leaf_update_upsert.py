"""The leaf-update rows a commit writes (``store.rekey.put_updates``, one upsert): a new member's
row is inserted, a row from an older epoch moves (and an open ask is answered), a row already
past the commit's epoch is left as it is; with the due columns of the policy given. On SQLite and
a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, select

from provisioning.db import migrations
from provisioning.db.engine import make_engine
from provisioning.db.runtime import LeafUpdateRow
from provisioning.registry import session_factory
from provisioning.service.store import rekey as rows

pytestmark = pytest.mark.pure

DATABASE_BACKENDS = ("sqlite", "postgresql")
G = "g-leaves"
BOUNDS = (3_600, 10)  # an hour, ten epochs


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url)
    migrations.upgrade(eng)
    yield eng
    eng.dispose()


def _rows(engine: Engine) -> dict[str, tuple[int, int, int | None, int | None, int | None]]:
    with session_factory(engine)() as s:
        return {
            r.device_id: (r.epoch, r.updated_at, r.asked_at, r.due_at, r.due_epoch)
            for r in s.scalars(select(LeafUpdateRow).where(LeafUpdateRow.group_id == G))
        }


def test_a_commit_s_rows_insert_move_older_ones_and_leave_newer_ones(engine: Engine) -> None:
    sessions = session_factory(engine)
    with sessions.begin() as s:
        rows.put_updates(s, G, ["old", "newer"], epoch=3, now=100, bounds=BOUNDS, group_epoch=3)
        rows.mark_asked(s, G, "old", epoch=3, updated_at=100, now=150, repeat=60)
        rows.put_updates(s, G, ["newer"], epoch=9, now=200, bounds=BOUNDS, group_epoch=9)
    assert _rows(engine) == {
        "old": (3, 100, 150, 210, None),  # asked at 150: looked at again 60 s later
        "newer": (9, 200, None, 3_800, 19),
    }
    with sessions.begin() as s:  # a commit of epoch 5 (a late writer): "newer" stays at 9
        rows.put_updates(
            s, G, ["old", "newer", "joiner", "old"], epoch=5, now=300, bounds=BOUNDS, group_epoch=5
        )
    assert _rows(engine) == {
        "old": (5, 300, None, 3_900, 15),  # moved, its ask answered
        "newer": (9, 200, None, 3_800, 19),
        "joiner": (5, 300, None, 3_900, 15),
    }
    with sessions.begin() as s:  # the same epoch again (another instance, the same commit)
        rows.put_updates(s, G, ["newer"], epoch=9, now=400, bounds=BOUNDS, group_epoch=20)
    assert _rows(engine)["newer"] == (9, 400, None, 400, 19)  # due by epochs: due now
