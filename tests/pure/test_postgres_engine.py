"""The engine on PostgreSQL (tests/fixtures/postgres.py): which URLs are accepted, that the
password never shows, that a deadlock PostgreSQL breaks is retried, and that a refused commit
leaves the transaction usable (savepoint)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from agent.protocol.errors import ConfigError
from provisioning import audit
from provisioning.db.engine import is_transient, normalize_url, redact_url
from provisioning.registry import (
    EpochConflict,
    Outcome,
    Registry,
    create_schema,
    make_engine,
    run_in_transaction,
    session_factory,
)

pytestmark = pytest.mark.pure

T0 = 1_700_000_000


@pytest.fixture
def engine(postgres_url: str) -> Iterator[Engine]:
    eng = make_engine(postgres_url)
    create_schema(eng)
    yield eng
    eng.dispose()


def test_postgresql_urls_mean_psycopg_3_and_other_drivers_are_refused() -> None:
    url = "postgresql://kf:s3cret-pw@db.example:5432/keyfleet"
    assert normalize_url(url).drivername == "postgresql+psycopg"
    assert normalize_url(url.replace("postgresql", "postgresql+psycopg")).drivername == (
        "postgresql+psycopg"
    )
    for other in ("postgresql+psycopg2", "postgresql+asyncpg", "mysql"):
        with pytest.raises(ConfigError) as refused:
            make_engine(url.replace("postgresql", other, 1))
        assert "s3cret-pw" not in str(refused.value) and "***" in str(refused.value)
    assert redact_url(url) == "postgresql://kf:***@db.example:5432/keyfleet"


def test_engine_repr_and_errors_hide_the_password(engine: Engine, postgres_url: str) -> None:
    password = postgres_url.split(":")[2].partition("@")[0]
    assert password not in repr(engine) and password not in str(engine.url)
    wrong = make_engine(postgres_url.replace(password, "not-the-password"))
    try:
        with pytest.raises(Exception) as failed, wrong.connect():
            pass
        assert "password authentication failed" in str(failed.value)
        assert "not-the-password" not in str(failed.value)
    finally:
        wrong.dispose()
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SHOW transaction_isolation").scalar() == (
            "read committed"
        )


def test_a_deadlock_postgresql_breaks_is_retried(engine: Engine) -> None:
    """Two units lock the same two rows in opposite orders: PostgreSQL aborts one with
    deadlock_detected (40P01); run_in_transaction runs it again and both units land."""
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO service_replay (sender, state, updated_at) VALUES "
                "('a', '\\x00', 0), ('b', '\\x00', 0)"
            )
        )
    sessions = session_factory(engine)
    both_hold_one = threading.Barrier(2)
    attempts: dict[str, int] = {"ab": 0, "ba": 0}
    errors: list[BaseException] = []

    def unit(first: str, second: str) -> None:
        def work(session: Session) -> None:
            attempts[first + second] += 1
            bump = text("UPDATE service_replay SET updated_at = updated_at + 1 WHERE sender = :s")
            session.execute(bump, {"s": first})
            if attempts[first + second] == 1:
                both_hold_one.wait(10)
            session.execute(bump, {"s": second})

        try:
            run_in_transaction(sessions, work)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=unit, args=p) for p in (("a", "b"), ("b", "a"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert sorted(attempts.values()) == [1, 2]  # the victim ran again
    with engine.connect() as connection:
        counts = connection.execute(text("SELECT updated_at FROM service_replay")).scalars()
        assert sorted(counts) == [2, 2]


def test_is_transient_only_for_deadlocks_and_serialization_failures(engine: Engine) -> None:
    with pytest.raises(Exception) as duplicate, engine.begin() as connection:
        connection.execute(text("INSERT INTO audit_head (id, seq, entry_hash) VALUES (2, 0, '')"))
    assert not is_transient(duplicate.value)  # a CHECK violation is a plain error


def test_a_refused_commit_leaves_the_transaction_usable(engine: Engine) -> None:
    """On PostgreSQL an error aborts the whole transaction unless it happened in a savepoint:
    after EpochConflict the same transaction can still audit the refusal and commit."""
    sessions = session_factory(engine)

    def setup(session: Session) -> None:
        registry = Registry(session)
        registry.register_device("d1", ek_cert_fingerprint="ab" * 32, devid_cert_pem="P", now=T0)
        registry.create_group("g1", creator="d1", public_tree=b"t", group_context=b"c", now=T0)

    run_in_transaction(sessions, setup)
    args = {"welcome": None, "public_tree": b"t", "group_context": b"c", "now": T0}
    with sessions.begin() as session:
        Registry(session).append_commit("g1", epoch=0, committer="d1", commit=b"one", **args)
    # a second instance that read epoch 0 before the first committed: only the key can stop it
    with sessions.begin() as session:
        session.execute(text("UPDATE groups SET epoch = 0"))  # its stale view, in its own tx
        with pytest.raises(EpochConflict):
            Registry(session).append_commit("g1", epoch=0, committer="d1", commit=b"two", **args)
        audit.append(
            session,
            now=T0,
            actor="device:d1",
            action="group.commit",
            target="g1",
            outcome=Outcome.REFUSED,
            reason="ds.commit.epoch_taken",
        )
        session.rollback()  # the stale epoch must not stay; the point was: no aborted tx above
