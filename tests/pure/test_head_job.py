"""The group's head job (``store.head_job``, one query): the slot holder even when older jobs
are queued, else the oldest open job; ended jobs never; on SQLite and a real PostgreSQL."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from agent.protocol.wire.messages.service import CommitAction
from provisioning.db import migrations
from provisioning.db.engine import make_engine
from provisioning.registry import session_factory
from provisioning.service import store
from provisioning.service.model import Job, JobState

pytestmark = pytest.mark.pure

DATABASE_BACKENDS = ("sqlite", "postgresql")
G = "g-head"


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url)
    migrations.upgrade(eng)
    yield eng
    eng.dispose()


def _job(member: str) -> Job:
    return Job(CommitAction.REMOVE, G, member, os.urandom(16), persistent=True)


def test_the_slot_holder_heads_the_queue_else_the_oldest_open_job(engine: Engine) -> None:
    sessions = session_factory(engine)
    with sessions.begin() as s:
        assert store.head_job(s, G) is None
        first, second, third = _job("a"), _job("b"), _job("c")
        for job in (first, second, third):
            store.insert_job(s, job, now=1)
    with sessions.begin() as s:
        head = store.head_job(s, G)
        assert head is not None and head.id == first.id  # no slot yet: the oldest
        assert store.take_slot(s, third)
    with sessions.begin() as s:
        head = store.head_job(s, G)
        assert head is not None and head.id == third.id  # the holder, not the older ones
        assert store.end_job(s, third, JobState.DONE)
    with sessions.begin() as s:
        head = store.head_job(s, G)
        assert head is not None and head.id == first.id  # the slot freed: the oldest again
        assert store.end_job(s, first, JobState.FAILED)
    with sessions.begin() as s:
        head = store.head_job(s, G)
        assert head is not None and head.id == second.id
        assert store.end_job(s, second, JobState.DONE)
    with sessions.begin() as s:
        assert store.head_job(s, G) is None
