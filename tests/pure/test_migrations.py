"""Schema migrations on SQLite and on a real PostgreSQL (tests/fixtures/postgres.py): the migrated
schema equals the models (a model change without a revision fails here), upgrade and downgrade
round-trip, a database made before migrations is adopted or refused, and the ``keyfleet db``
commands and ``keyfleet serve`` refuse a database that is not at the newest revision.

Tier pure: SQLite is in-process and PostgreSQL is started once per session like a library's
server, never over the network.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, text

from agent.protocol.errors import ConfigError
from provisioning.db import migrations
from provisioning.db.engine import make_engine
from provisioning.db.migrations import BASE_REVISION, VERSION_TABLE
from tests.service_deployment import keyfleet

pytestmark = pytest.mark.pure

DATABASE_BACKENDS = ("sqlite", "postgresql")


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url)
    yield eng
    eng.dispose()


def schema_diff(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        diff: list[Any] = compare_metadata(context, migrations.target_metadata())
        return diff


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def revision_of(engine: Engine) -> str | None:
    return migrations.schema_status(engine).revision


def test_migrated_schema_equals_the_models(engine: Engine, database_backend: str) -> None:
    """If this fails after a model change: add a revision (docs/database.md, "Changing the
    schema"); the diff below says what the revision must do."""
    before, after = migrations.upgrade(engine)
    assert (before, after) == (None, migrations.head_revision())
    assert engine.dialect.name == ("sqlite" if database_backend == "sqlite" else "postgresql")
    assert schema_diff(engine) == []
    assert tables(engine) == set(migrations.keyfleet_tables()) | {VERSION_TABLE}


def test_upgrade_is_idempotent_and_downgrade_round_trips(engine: Engine) -> None:
    head = migrations.head_revision()
    migrations.upgrade(engine)
    assert migrations.upgrade(engine) == (head, head)
    assert migrations.schema_status(engine).state == "current"
    # every step down and up again, newest first
    history = [s.revision for s in migrations.script_directory().walk_revisions()]
    for revision in history:
        below = migrations.script_directory().get_revision(revision).down_revision
        target = "base" if below is None else str(below)
        migrations.downgrade(engine, target)
        assert revision_of(engine) == (None if below is None else below)
    assert tables(engine) & set(migrations.keyfleet_tables()) == set()
    assert migrations.upgrade(engine) == (None, head)
    assert schema_diff(engine) == []


def test_the_schema_works_after_a_round_trip(engine: Engine) -> None:
    """Data goes in after down-and-up: constraints and foreign keys are really there."""
    from provisioning.registry import Registry, run_in_transaction, session_factory

    migrations.upgrade(engine)
    migrations.downgrade(engine, "base")
    migrations.upgrade(engine)
    sessions = session_factory(engine)

    def work(session: Any) -> None:
        registry = Registry(session)
        registry.register_device(
            "dev-1", ek_cert_fingerprint="ab" * 32, devid_cert_pem="PEM", now=1
        )
        registry.create_group("g1", creator="dev-1", public_tree=b"t", group_context=b"c", now=1)

    run_in_transaction(sessions, work)
    with pytest.raises(Exception, match=r"(?i)foreign key"), engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO group_members (group_id, device_id, requested_at) "
                "VALUES ('g1', 'nobody', 1)"
            )
        )


def make_legacy(engine: Engine) -> None:
    """A database as ``create_all`` made it before migrations: revision 0001's tables and no
    ``alembic_version``."""
    migrations.upgrade(engine, BASE_REVISION)
    with engine.begin() as connection:
        connection.execute(text(f"DROP TABLE {VERSION_TABLE}"))


def test_a_database_made_before_migrations_is_adopted(engine: Engine) -> None:
    make_legacy(engine)
    with engine.begin() as connection:  # it holds data, which must survive
        connection.execute(
            text(
                "INSERT INTO operators (name, cert_fingerprint, role, created_at, updated_at) "
                "VALUES ('op-alice', :fp, 'admin', 1, 1)"
            ),
            {"fp": "cd" * 32},
        )
    status = migrations.schema_status(engine)
    assert (status.state, status.revision) == ("legacy", None)
    with pytest.raises(ConfigError, match=r"keyfleet db upgrade --config x\.toml"):
        migrations.require_current(engine, how="--config x.toml")
    assert migrations.upgrade(engine, create=False) == (None, migrations.head_revision())
    assert schema_diff(engine) == []
    with engine.connect() as connection:
        assert connection.execute(text("SELECT name FROM operators")).scalars().all() == [
            "op-alice"
        ]


def test_a_legacy_database_without_the_service_tables_gets_them(engine: Engine) -> None:
    """A database only ``keyfleet station add`` ever touched (session 1 created just the
    registry tables there): adopted, and revision 0001 adds the service's tables."""
    make_legacy(engine)
    with engine.begin() as connection:
        for table in ("service_replay", "service_commands", "service_operator_keys"):
            connection.execute(text(f"DROP TABLE {table}"))
    migrations.upgrade(engine)
    assert schema_diff(engine) == []


def test_a_legacy_database_that_differs_is_refused_untouched(engine: Engine) -> None:
    """Session 1's early databases lack devices.ak_public: not revision 0001, so refused."""
    make_legacy(engine)
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE devices DROP COLUMN ak_public"))
    with pytest.raises(ConfigError) as refused:
        migrations.upgrade(engine)
    message = str(refused.value)
    assert "differ from revision 0001" in message and "devices: columns" in message
    assert "nothing was changed" in message
    assert VERSION_TABLE not in tables(engine)
    assert "ak_public" not in {c["name"] for c in inspect(engine).get_columns("devices")}


def test_unknown_and_older_revisions_are_named(engine: Engine) -> None:
    migrations.upgrade(engine)
    with engine.begin() as connection:
        connection.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = 'f00d'"))
    with pytest.raises(ConfigError, match="revision f00d, which this keyfleet does not know"):
        migrations.require_current(engine, how="--db URL")
    with pytest.raises(ConfigError, match="upgraded by a newer keyfleet"):
        migrations.upgrade(engine)


def test_empty_database(engine: Engine) -> None:
    assert migrations.schema_status(engine).state == "empty"
    with pytest.raises(ConfigError, match=r"no keyfleet schema: run `keyfleet db init --db URL`"):
        migrations.require_current(engine, how="--db URL")
    with pytest.raises(ConfigError, match="`keyfleet db init` creates it"):
        migrations.upgrade(engine, create=False)
    assert tables(engine) == set()


def test_concurrent_upgrades_queue_on_the_lock(database_url: str) -> None:
    """Several instances running ``db init`` at once: one creates, the others find it done."""
    errors: list[BaseException] = []
    results: list[tuple[str | None, str | None]] = []
    start = threading.Barrier(4)

    def run() -> None:
        own = make_engine(database_url)
        try:
            start.wait(10)
            results.append(migrations.upgrade(own))
        except BaseException as exc:
            errors.append(exc)
        finally:
            own.dispose()

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    head = migrations.head_revision()
    assert sorted(results, key=lambda r: r[0] or "") == [(None, head)] + [(head, head)] * 3


# ---- the command line ---------------------------------------------------------------------------


def write_config(tmp_path: Path, url: str) -> Path:
    """A service configuration whose files exist (their content is never read before the
    schema check)."""
    files = (
        "ca.pem",
        "svc.pem",
        "signing.pem",
        "dev-ca.pem",
        "op-ca.pem",
        "mfr.pem",
        "golden.toml",
    )
    for name in files:
        (tmp_path / name).write_text("x\n")
    for name in ("svc.key", "signing.key", "dev-ca.key"):
        (tmp_path / name).write_text("x\n")
        (tmp_path / name).chmod(0o600)
    config = tmp_path / "keyfleet.toml"
    config.write_text(
        f'[database]\nurl = "{url}"\n'
        '[broker]\nhost = "localhost"\nca = "ca.pem"\nclient_cert = "svc.pem"\n'
        'client_key = "svc.key"\n'
        '[device_ca]\ncert = "dev-ca.pem"\nkey = "dev-ca.key"\n'
        '[operator_ca]\ncert = "op-ca.pem"\n'
        '[attestation]\nmanufacturer_cas = "mfr.pem"\ngolden_measurements = "golden.toml"\n'
        '[service]\nsigning_key = "signing.key"\nsigning_cert = "signing.pem"\n'
    )
    return config


def test_serve_refuses_a_database_not_at_the_newest_revision(
    tmp_path: Path, database_url: str, engine: Engine
) -> None:
    config = write_config(tmp_path, database_url)
    empty = keyfleet("serve", "--config", str(config), cwd=tmp_path)
    assert empty.returncode == 2
    assert f"run `keyfleet db init --config {config}` first" in empty.stderr
    make_legacy(engine)
    legacy = keyfleet("serve", "--config", str(config), cwd=tmp_path)
    assert legacy.returncode == 2
    assert f"run `keyfleet db upgrade --config {config}`" in legacy.stderr
    status = keyfleet("db", "status", "--config", str(config), cwd=tmp_path)
    assert status.returncode == 1 and "legacy (revision None" in status.stdout
    upgraded = keyfleet("db", "upgrade", "--config", str(config), cwd=tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr
    head = migrations.head_revision()
    assert upgraded.stdout.startswith(f"schema revision none (adopted) -> {head}: ")
    again = keyfleet("db", "upgrade", "--config", str(config), cwd=tmp_path)
    assert again.stdout.startswith(f"schema revision {head}, nothing to do: ")
    status = keyfleet("db", "status", "--config", str(config), cwd=tmp_path)
    assert status.returncode == 0 and f"current (revision {head}, head {head})" in status.stdout


def test_db_commands_never_print_the_password(tmp_path: Path, postgres_url: str) -> None:
    password = postgres_url.split(":")[2].partition("@")[0]
    assert len(password) >= 16
    runs = [
        keyfleet("db", "upgrade", "--db", postgres_url, cwd=tmp_path),  # refused: empty
        keyfleet("db", "init", "--db", postgres_url, cwd=tmp_path),
        keyfleet("db", "status", "--db", postgres_url, cwd=tmp_path),
        keyfleet("db", "init", "--db", postgres_url.replace(password, "wrong"), cwd=tmp_path),
    ]
    assert [r.returncode for r in runs] == [2, 0, 0, 2]
    assert "keyfleet:***@" in runs[1].stdout
    assert "password authentication failed" in runs[3].stderr
    for run in runs:
        assert password not in run.stdout + run.stderr


def test_the_developer_command_runs_as_documented() -> None:
    """docs/database.md has developers run ``python -m provisioning.db.migrations``; it
    needs the package's ``__main__`` (a ``__name__ == "__main__"`` block in ``__init__`` is
    never reached by ``-m``)."""
    done = subprocess.run(
        [sys.executable, "-m", "provisioning.db.migrations", "heads"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == migrations.head_revision()
