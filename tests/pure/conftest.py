"""Fixtures shared by the pure tests: a registry database in a SQLite file of the test's own
(a module that needs another database, PostgreSQL for one, defines its own ``engine``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from provisioning.registry import create_schema, make_engine, session_factory


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    create_schema(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)
