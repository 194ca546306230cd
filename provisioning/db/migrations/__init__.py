"""Schema migrations (Alembic) of keyfleet's database, on SQLite and on PostgreSQL.

One revision history covers every table keyfleet creates: the registry's (``db/schema.py``)
and the delivery service's own (``db/runtime.py``), so ``keyfleet db init`` and ``keyfleet db
upgrade`` bring both to the same revision. Users never need an ``alembic.ini``: keyfleet runs
Alembic through its API with a connection it opened and locked itself:

- PostgreSQL: ``pg_advisory_xact_lock`` for the whole upgrade, in one transaction (PostgreSQL's
  DDL is transactional), so service instances or operators running ``db init`` at the same time
  queue and the second finds the work done.
- SQLite: ``BEGIN IMMEDIATE`` (the database's write lock) for the same reason, with foreign keys
  switched off for the migration's connection only: a future revision that has to rebuild a table
  (SQLite's "batch" ALTER) would otherwise cascade deletes into the child tables. The foreign keys
  are checked (``PRAGMA foreign_key_check``) before the commit instead.

A database created before migrations existed (session 1's ``create_all``: keyfleet tables, no
``alembic_version``) is compared with revision 0001, table by table (columns, nullability,
primary keys, unique constraints, indexes, foreign keys). If every table it has matches, revision
0001 runs and creates only the tables it lacks, then the later revisions run; otherwise it is
refused with the differences named and nothing changed.

How to add a revision: docs/database.md ("Changing the schema").
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, MetaData, create_engine, inspect
from sqlalchemy.engine.reflection import Inspector
from sqlalchemy.pool import NullPool, StaticPool

from agent.protocol.errors import ConfigError, InternalError, StateError
from provisioning.db.engine import make_engine, redact_url, sqlite_path
from provisioning.db.runtime import ServiceBase
from provisioning.db.schema import NAMING_CONVENTION, Base

SCRIPT_LOCATION = Path(__file__).resolve().parent
# The revision a database made by ``create_all`` before migrations existed corresponds to.
BASE_REVISION = "0001"
VERSION_TABLE = "alembic_version"
# pg_advisory_xact_lock key: "kfmigrat" as a signed 64-bit integer; any fixed value would do.
ADVISORY_LOCK_KEY = int.from_bytes(b"kfmigrat", "big", signed=True)


# ---- what the migrations describe -----------------------------------------------------------


@functools.cache
def target_metadata() -> MetaData:
    """Every keyfleet table in one ``MetaData``: the registry's and the service's. Alembic
    compares the migrated database with it (a model change without a revision fails the tests)
    and autogenerates new revisions from the difference."""
    combined = MetaData(naming_convention=NAMING_CONVENTION)
    for metadata in (Base.metadata, ServiceBase.metadata):
        for table in metadata.tables.values():
            table.to_metadata(combined)
    return combined


def keyfleet_tables() -> frozenset[str]:
    return frozenset(target_metadata().tables)


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic ``Config`` without any ini file; ``connection`` is the one env.py migrates."""
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    config.attributes["connection"] = connection
    return config


@functools.cache
def script_directory() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest revision this keyfleet knows; one line of history, never several heads."""
    heads = script_directory().get_heads()
    if len(heads) != 1:
        raise InternalError(f"keyfleet's migrations have {len(heads)} heads: {sorted(heads)}")
    return heads[0]


def known_revisions() -> frozenset[str]:
    return frozenset(s.revision for s in script_directory().walk_revisions())


# ---- Alembic's environment (env.py calls this) ------------------------------------------------


def _configure(context: Any, connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata(),
        version_table=VERSION_TABLE,
        # SQLite alters a column only by rebuilding its table; autogenerate then writes batch ops.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def run_environment(context: Any) -> None:
    """What env.py runs. keyfleet passes its own locked connection in the config's attributes;
    the plain ``alembic`` command line gives a URL with ``-x url=...`` instead."""
    if context.is_offline_mode():
        raise ConfigError("keyfleet's migrations run against a database, not as an SQL script")
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _configure(context, connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise ConfigError("alembic: give the database as -x url=DATABASE_URL")
    engine = make_engine(url, poolclass=NullPool)
    try:
        with _locked(engine) as locked:
            _configure(context, locked)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


# ---- locking --------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that holds the migration lock; committed at the end of
    the block, rolled back if it raises."""
    with engine.connect() as connection:
        try:
            if connection.dialect.name == "sqlite":
                connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY})")
            yield connection
            if connection.dialect.name == "sqlite":
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise StateError(
                        f"the migration left {len(broken)} rows whose foreign keys point nowhere "
                        f"(first: table {broken[0][0]}); nothing was changed"
                    )
            connection.commit()
        except BaseException:
            connection.rollback()
            raise
        finally:
            if connection.dialect.name == "sqlite" and not connection.invalidated:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()


@contextlib.contextmanager
def _migration_engine(engine: Engine) -> Iterator[Engine]:
    # Its own connection, never returned to the caller's pool: the SQLite one had its foreign
    # keys switched off. An in-memory SQLite database exists only in the caller's engine.
    if engine.dialect.name == "sqlite" and sqlite_path(engine.url) is None:
        yield engine
        return
    own = make_engine(engine.url, poolclass=NullPool)
    try:
        yield own
    finally:
        own.dispose()


# ---- status ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SchemaStatus:
    """Where a database stands. ``state``: ``empty`` (no keyfleet table), ``legacy`` (keyfleet
    tables but no recorded revision: made before migrations), ``behind`` (an older revision),
    ``current`` (the head), ``unknown`` (a revision this keyfleet does not know: a newer one)."""

    revision: str | None
    head: str
    tables: frozenset[str]

    @property
    def state(self) -> str:
        if self.revision is None:
            return "legacy" if self.tables else "empty"
        if self.revision == self.head:
            return "current"
        return "behind" if self.revision in known_revisions() else "unknown"


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(
        connection, opts={"version_table": VERSION_TABLE}
    ).get_current_revision()


def _status(connection: Connection) -> SchemaStatus:
    present = set(inspect(connection).get_table_names())
    return SchemaStatus(
        _current(connection), head_revision(), frozenset(present & keyfleet_tables())
    )


def schema_status(engine: Engine) -> SchemaStatus:
    with engine.connect() as connection:
        return _status(connection)


def require_current(engine: Engine, *, how: str) -> None:
    """Refuse (``ConfigError``) a database that is not at the head revision, naming the
    command that fixes it; ``how`` is how that command names the database (``--config FILE``)."""
    status = schema_status(engine)
    url = redact_url(engine.url)
    state = status.state
    if state == "current":
        return
    if state == "empty":
        raise ConfigError(f"{url} has no keyfleet schema: run `keyfleet db init {how}` first")
    if state == "legacy":
        raise ConfigError(
            f"{url} was created before keyfleet had schema revisions: run `keyfleet db upgrade "
            f"{how}` (it checks the tables against revision {BASE_REVISION} and records it)"
        )
    if state == "behind":
        raise ConfigError(
            f"{url} is at schema revision {status.revision}, this keyfleet needs "
            f"{status.head}: run `keyfleet db upgrade {how}`"
        )
    raise ConfigError(
        f"{url} is at schema revision {status.revision}, which this keyfleet does not know "
        f"(its newest is {status.head}): it was upgraded by a newer keyfleet; run that one"
    )


# ---- legacy databases -----------------------------------------------------------------------


def _shape(inspector: Inspector, table: str) -> dict[str, Any]:
    """What must agree between a legacy table and revision 0001's, in backend-neutral terms
    (names and columns only: SQLite and PostgreSQL reflect types differently)."""
    columns = {c["name"]: bool(c["nullable"]) for c in inspector.get_columns(table)}
    unique = {
        (u["name"], tuple(u["column_names"])) for u in inspector.get_unique_constraints(table)
    }
    indexes = {
        (i["name"], tuple(str(c) for c in i["column_names"]), bool(i["unique"]))
        for i in inspector.get_indexes(table)
        if not i.get("duplicates_constraint")
    }
    foreign = {
        (tuple(f["constrained_columns"]), f["referred_table"], tuple(f["referred_columns"]))
        for f in inspector.get_foreign_keys(table)
    }
    primary = tuple(inspector.get_pk_constraint(table)["constrained_columns"])
    return {
        "columns (name: nullable)": columns,
        "primary key": primary,
        "unique constraints": unique,
        "indexes": indexes,
        "foreign keys": foreign,
    }


@functools.cache
def _base_shapes() -> dict[str, dict[str, Any]]:
    """The tables of revision 0001 as an empty in-memory SQLite database has them after
    upgrading to 0001."""
    scratch = create_engine("sqlite://", poolclass=StaticPool)
    try:
        with _locked(scratch) as connection:
            _run(connection, lambda config: command.upgrade(config, BASE_REVISION))
        with scratch.connect() as connection:
            inspector = inspect(connection)
            names = set(inspector.get_table_names()) - {VERSION_TABLE}
            return {name: _shape(inspector, name) for name in sorted(names)}
    finally:
        scratch.dispose()


def legacy_differences(connection: Connection) -> list[str]:
    """How the keyfleet tables of a database without a recorded revision differ from revision
    0001 (empty: it is a 0001 database, possibly lacking some tables)."""
    expected = _base_shapes()
    inspector = inspect(connection)
    present = set(inspector.get_table_names())
    problems = []
    for table in sorted(present & set(expected)):
        found = _shape(inspector, table)
        for aspect, wanted in expected[table].items():
            if found[aspect] != wanted:
                problems.append(f"{table}: {aspect} are {found[aspect]}, expected {wanted}")
    if not present & set(expected):
        problems.append("none of revision 0001's tables is present")
    return problems


# ---- running --------------------------------------------------------------------------------


def _run(connection: Connection, action: Callable[[Config], None]) -> None:
    action(alembic_config(connection))


def _migrate(
    engine: Engine, action: Callable[[Config], None], *, create: bool
) -> tuple[str | None, str | None]:
    with _migration_engine(engine) as own, _locked(own) as connection:
        before = _status(connection)  # under the lock: a concurrent run has finished
        if before.state == "empty" and not create:
            raise ConfigError(
                f"{redact_url(engine.url)} has no keyfleet schema; `keyfleet db init` creates it"
            )
        if before.state == "unknown":
            raise ConfigError(
                f"{redact_url(engine.url)} is at schema revision {before.revision}, which this "
                "keyfleet does not know: it was upgraded by a newer keyfleet"
            )
        if before.state == "legacy":
            problems = legacy_differences(connection)
            if problems:
                raise ConfigError(
                    f"{redact_url(engine.url)} has keyfleet tables but no schema revision, and "
                    f"they differ from revision {BASE_REVISION}, so it cannot be adopted; "
                    "nothing was changed: " + "; ".join(problems)
                )
        _run(connection, action)
        return before.revision, _current(connection)


def upgrade(
    engine: Engine, revision: str = "head", *, create: bool = True
) -> tuple[str | None, str | None]:
    """Bring the database to ``revision`` (default the newest): creates the schema in an empty
    database (unless ``create`` is false), adopts a legacy one that matches revision 0001,
    does nothing if it is there already. Returns (revision before, revision after)."""
    return _migrate(engine, lambda config: command.upgrade(config, revision), create=create)


def create_schema(engine: Engine) -> None:
    """Bring the database to the newest schema revision (every registry and service table),
    creating it if it is empty (idempotent)."""
    upgrade(engine)


def downgrade(engine: Engine, revision: str) -> tuple[str | None, str | None]:
    """Undo revisions down to ``revision`` (``base``: drop every keyfleet table). For tests and
    for rolling back a failed deployment; data in dropped columns or tables is gone."""
    return _migrate(engine, lambda config: command.downgrade(config, revision), create=False)


# ---- for developers: python -m provisioning.db.migrations revision -m "..." -------------


def _new_revision(message: str, revision_id: str | None) -> None:
    """Autogenerate a revision from the difference between the head revision (migrated into a
    scratch SQLite file) and the models; read and fix it before committing (docs/database.md)."""
    with tempfile.TemporaryDirectory() as scratch_dir:
        engine = make_engine(f"sqlite:///{scratch_dir}/scratch.db", poolclass=NullPool)
        try:
            upgrade(engine)
            with _locked(engine) as connection:
                config = alembic_config(connection)
                command.revision(config, message=message, autogenerate=True, rev_id=revision_id)
        finally:
            engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m provisioning.db.migrations",
        description="keyfleet schema revisions (for developers; users run keyfleet db ...)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    new = sub.add_parser("revision", help="autogenerate a new revision from the models")
    new.add_argument("-m", "--message", required=True)
    new.add_argument("--rev-id", help="the revision id, e.g. 0002 (default: a random one)")
    sub.add_parser("heads", help="print the head revision")
    args = parser.parse_args(argv)
    if args.command == "heads":
        print(head_revision())
        return 0
    _new_revision(args.message, args.rev_id)
    return 0


__all__ = [
    "BASE_REVISION",
    "SchemaStatus",
    "alembic_config",
    "downgrade",
    "head_revision",
    "keyfleet_tables",
    "legacy_differences",
    "require_current",
    "run_environment",
    "schema_status",
    "target_metadata",
    "upgrade",
]
