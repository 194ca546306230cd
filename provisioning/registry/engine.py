"""Engines, schema creation and transactions with retry for the fleet registry.

One database URL selects the backend: a SQLite file by default, PostgreSQL for several service
instances. The code never relies on transaction isolation for ordering; every rule that racing
writers must obey is a constraint (see schema.py), and a writer that loses a race either gets a
clear refusal (a commit for a taken epoch) or retries its whole unit of work (an audit entry for a
taken chain head). On SQLite this matches what the Python driver does anyway: statements read the
latest committed data until the first write opens the transaction, as PostgreSQL's default READ
COMMITTED does statement by statement.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from agent.errors import ConfigError, StateError
from provisioning.registry.schema import Base

T = TypeVar("T")

# How long a SQLite writer waits for another writer's lock before failing; commits and audit
# appends hold it for milliseconds, so a long wait means something is stuck.
SQLITE_BUSY_TIMEOUT_S = 30.0


def redact_url(url: str | URL) -> str:
    """The URL as it may appear in logs and errors: a PostgreSQL password is masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable database URL>"


def is_sqlite(url: str | URL) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def sqlite_path(url: str | URL) -> Path | None:
    """The file behind a SQLite URL, or None for an in-memory database or another backend."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Foreign keys are off by default in SQLite; WAL lets readers (audit verify, listings) run
    # while one writer commits.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
    finally:
        cursor.close()


def make_engine(url: str | URL, *, echo: bool = False) -> Engine:
    """An engine for ``url``. SQLite gets foreign keys, WAL and a busy timeout on every
    connection; the file's directory must exist (the database file itself is created)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(
            "database.url: could not parse the value as a database URL; "
            "expected e.g. sqlite:////var/lib/keyfleet/fleet.db or postgresql+psycopg://host/db"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        path = sqlite_path(parsed)
        if path is not None and not path.parent.is_dir():
            raise ConfigError(
                f"database.url: {redact_url(parsed)!r}: directory {path.parent} does not exist; "
                "expected an existing directory for the SQLite file"
            )
        engine = create_engine(parsed, echo=echo, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
        event.listen(engine, "connect", _on_sqlite_connect)
        return engine
    return create_engine(parsed, echo=echo, pool_pre_ping=True)


def create_schema(engine: Engine) -> None:
    """Create every keyfleet table that does not exist yet (idempotent)."""
    Base.metadata.create_all(engine)


def missing_tables(engine: Engine) -> list[str]:
    """Tables of the keyfleet schema absent from the database (empty when it is ready)."""
    present = set(inspect(engine).get_table_names())
    return sorted(name for name in Base.metadata.tables if name not in present)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: repository results are plain dataclasses anyway, and nothing should
    # lazily reload after a commit from another thread's point of view.
    return sessionmaker(engine, expire_on_commit=False)


class RetryableConflict(StateError):
    """A concurrent writer took what this unit of work needed (e.g. the audit chain head);
    running the whole unit again on fresh data is correct and will succeed."""


def run_in_transaction(
    sessions: sessionmaker[Session], work: Callable[[Session], T], *, attempts: int = 8
) -> T:
    """Run ``work`` in one transaction and commit it; if it raises ``RetryableConflict`` roll back
    and run it again from the start, up to ``attempts`` times. Any other error rolls back and
    propagates: a refusal (e.g. a commit for a taken epoch) is not retried.

    The whole unit is retried, not just the failed statement, because after an integrity error
    the transaction is unusable on PostgreSQL and the unit's earlier reads may be stale.
    """
    last: RetryableConflict | None = None
    for attempt in range(attempts):
        if attempt:
            # Jitter so that writers that collided do not collide again in lockstep; this is
            # load spreading, not security, hence the plain PRNG.
            time.sleep(random.uniform(0, 0.002 * 2**attempt))  # noqa: S311
        with sessions() as session:
            try:
                with session.begin():
                    return work(session)
            except RetryableConflict as exc:
                last = exc
    raise StateError(f"gave up after {attempts} attempts: {last}")
