"""Engines, schema creation and transactions with retry for the fleet registry.

One database URL selects the backend: a SQLite file by default, PostgreSQL (driver psycopg 3)
for several service instances. The code never relies on transaction isolation for ordering; every
rule that racing writers must obey is a constraint (see schema.py) or a row lock (the audit
chain's head), and a writer that loses a race either gets a clear refusal (a commit for a taken
epoch) or retries its whole unit of work (an audit entry for a taken chain head, a deadlock the
server broke). On SQLite this matches what the Python driver does anyway: statements read the
latest committed data until the first write opens the transaction, as PostgreSQL's READ
COMMITTED (set explicitly on every PostgreSQL engine) does statement by statement.

Schema creation goes through the Alembic migrations (provisioning/db/migrations/):
``create_schema`` brings a database to the newest revision, so every database keyfleet creates
carries its revision and ``keyfleet serve`` can refuse one that is behind.
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, Table, create_engine, event, inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from agent.protocol.errors import ConfigError, StateError
from provisioning.db.schema import Base

T = TypeVar("T")

# How long a SQLite writer waits for another writer's lock before failing; commits and audit
# appends hold it for milliseconds, so a long wait means something is stuck.
SQLITE_BUSY_TIMEOUT_S = 30.0

# The only PostgreSQL driver keyfleet is tested with (psycopg 3); ``postgresql://`` means it.
POSTGRESQL_DRIVER = "postgresql+psycopg"

# SQLSTATEs after which PostgreSQL has rolled the transaction back and running the same unit of
# work again is the documented remedy: serialization_failure, deadlock_detected.
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01"})


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


def normalize_url(url: str | URL) -> URL:
    """The URL keyfleet connects with: ``postgresql://`` becomes ``postgresql+psycopg://``;
    another PostgreSQL driver or another backend is a ``ConfigError`` (no secret in it)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(
            "database.url: could not parse the value as a database URL; "
            "expected e.g. sqlite:////var/lib/keyfleet/fleet.db or postgresql+psycopg://host/db"
        ) from None
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        if parsed.drivername not in ("postgresql", POSTGRESQL_DRIVER):
            raise ConfigError(
                f"database.url: {redact_url(parsed)!r}: driver {parsed.get_driver_name()!r} is "
                "not supported; expected postgresql:// or postgresql+psycopg:// (psycopg 3)"
            )
        return parsed.set(drivername=POSTGRESQL_DRIVER)
    if backend != "sqlite":
        raise ConfigError(
            f"database.url: {redact_url(parsed)!r}: {backend} is not supported; "
            "expected a sqlite:// or postgresql:// URL"
        )
    return parsed


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Foreign keys are off by default in SQLite; WAL lets readers (audit verify, listings) run
    # while one writer commits.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
            _switch_to_wal(cursor)
        cursor.execute("PRAGMA synchronous=FULL")
    finally:
        cursor.close()


def _switch_to_wal(cursor: Any) -> None:
    # Switching needs the database to itself, and SQLite answers "database is locked" at once
    # (without its busy handler) while another connection holds it: first connections to a new
    # file at the same moment (instances or CLI runs starting together) wait and try again.
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def make_engine(url: str | URL, *, echo: bool = False, **options: Any) -> Engine:
    """An engine for ``url``. SQLite gets foreign keys, WAL and a busy timeout on every
    connection; the file's directory must exist (the database file itself is created).
    PostgreSQL goes through psycopg 3 at READ COMMITTED with connections checked before use.
    ``options`` go to ``create_engine`` (e.g. ``poolclass``)."""
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = sqlite_path(parsed)
        if path is not None and not path.parent.is_dir():
            raise ConfigError(
                f"database.url: {redact_url(parsed)!r}: directory {path.parent} does not exist; "
                "expected an existing directory for the SQLite file"
            )
        engine = create_engine(
            parsed, echo=echo, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S}, **options
        )
        event.listen(engine, "connect", _on_sqlite_connect)
        return engine
    return create_engine(
        parsed,
        echo=echo,
        pool_pre_ping=True,
        isolation_level="READ COMMITTED",
        connect_args={"application_name": "keyfleet"},
        **options,
    )


def missing_tables(engine: Engine) -> list[str]:
    """Tables of the keyfleet registry absent from the database (empty when it is ready)."""
    present = set(inspect(engine).get_table_names())
    return sorted(name for name in Base.metadata.tables if name not in present)


def rowcount(result: object) -> int:
    """Rows a conditional UPDATE/DELETE changed: 1 means this instance won the compare-and-set,
    0 that another one got there first (drivers that do not report it count as 0)."""
    count = getattr(result, "rowcount", 0)
    return int(count) if isinstance(count, int) else 0


def table_of(model: type[Any]) -> Table:
    """The Core table of a mapped class. Statements on it, run through a session, skip the ORM's
    per-statement work (no autoflush, no synchronising the identity map, no per-row bulk
    bookkeeping): for hot paths writing rows the session does not hold and never reads back."""
    table = model.__table__
    if not isinstance(table, Table):
        raise TypeError(f"{model.__name__} is not mapped to a table")
    return table


def session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: repository results are plain dataclasses anyway, and nothing should
    # lazily reload after a commit from another thread's point of view.
    return sessionmaker(engine, expire_on_commit=False)


@contextlib.contextmanager
def savepoint(session: Session) -> Iterator[None]:
    """A statement group whose failure (e.g. a unique constraint) undoes only itself.

    On PostgreSQL any error aborts the whole transaction unless it happened inside a SAVEPOINT,
    so the group runs in one (``begin_nested``). On SQLite a failed statement undoes only itself
    anyway, and Python's sqlite3 module mishandles SAVEPOINT outside an explicit transaction (a
    RELEASE can commit everything), so no savepoint is used there. Open the savepoint *before*
    adding the rows it should guard: ``begin_nested`` flushes what is already pending.
    """
    if session.get_bind().dialect.name == "sqlite":
        yield
        return
    with session.begin_nested():
        yield


class RetryableConflict(StateError):
    """A concurrent writer took what this unit of work needed (e.g. the audit chain head);
    running the whole unit again on fresh data is correct and will succeed."""


def is_transient(exc: BaseException) -> bool:
    """A database error after which the server rolled back and a retry is the remedy
    (PostgreSQL serialization failure or deadlock)."""
    if not isinstance(exc, DBAPIError):
        return False
    sqlstate = getattr(exc.orig, "sqlstate", None)
    return sqlstate in TRANSIENT_SQLSTATES


def run_in_transaction(
    sessions: sessionmaker[Session], work: Callable[[Session], T], *, attempts: int = 8
) -> T:
    """Run ``work`` in one transaction and commit it; if it raises ``RetryableConflict`` (or
    PostgreSQL broke a deadlock or a serialization conflict against it) roll back and run it
    again from the start, up to ``attempts`` times. Any other error rolls back and propagates:
    a refusal (e.g. a commit for a taken epoch) is not retried.

    The whole unit is retried, not just the failed statement, because after an integrity error
    the transaction is unusable on PostgreSQL and the unit's earlier reads may be stale.
    """
    last: BaseException | None = None
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
            except DBAPIError as exc:
                if not is_transient(exc):
                    raise
                last = exc
    raise StateError(f"gave up after {attempts} attempts: {_describe(last)}")


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, DBAPIError):
        # the driver's first line names the conflict; the statement and its parameters stay out
        first_line = (str(exc.orig).splitlines() or [""])[0]
        return f"{type(exc.orig).__name__}: {first_line}"
    return str(exc)
