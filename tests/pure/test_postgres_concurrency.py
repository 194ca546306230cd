"""Several processes writing one database at the same time, as several ``keyfleet serve``
instances do, on SQLite and on a real PostgreSQL: the audit log stays one valid chain, each
(group, epoch) gets exactly one commit, a racing enrollment is refused cleanly, and the schema
is the one migrations make.

Each writer is its own process (multiprocessing, spawn: no connection is inherited), with its own
engine and pool. The throughput printed (audit appends per second with N writers) is a
measurement for docs/database.md, not an assertion.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from multiprocessing.synchronize import Barrier, Event
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from agent.protocol.errors import ProtocolError
from provisioning import audit
from provisioning.db.schema import CommitLogEntry
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

DATABASE_BACKENDS = ("sqlite", "postgresql")
WRITERS = 4
APPENDS_PER_WRITER = 60
ROUNDS = 12
T0 = 1_700_000_000
MEASURED: dict[str, float] = {}

SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url)
    create_schema(eng)
    yield eng
    eng.dispose()


def run_workers(target: Any, args: list[tuple[Any, ...]], timeout: float = 180) -> list[Any]:
    """Start one spawned process per argument tuple, each given a result queue as its last
    argument; return what each put there (an exception text fails the test)."""
    results = SPAWN.Queue()
    processes = [SPAWN.Process(target=target, args=(*a, results)) for a in args]
    for process in processes:
        process.start()
    collected = []
    try:
        for _ in processes:
            collected.append(results.get(timeout=timeout))
    finally:
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join(10)
    failures = [c for c in collected if isinstance(c, str) and c.startswith("ERROR")]
    assert failures == []
    return collected


# ---- audit chain ----------------------------------------------------------------------------


def append_worker(url: str, name: str, count: int, go: Event, results: Any) -> None:
    engine = make_engine(url)
    sessions = session_factory(engine)
    try:
        go.wait(60)
        started = time.monotonic()
        for i in range(count):
            audit.record(
                sessions,
                now=T0 + i,
                actor=f"service:{name}",
                action="group.ack",
                target="g1",
                outcome=Outcome.ACCEPTED,
                details={"i": i},
            )
        results.put((name, started, time.monotonic()))
    except BaseException as exc:
        results.put(f"ERROR {name}: {type(exc).__name__}: {exc}")
    finally:
        engine.dispose()


def test_concurrent_audit_writers_make_one_valid_chain(
    engine: Engine, database_url: str, database_backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    go = SPAWN.Event()
    names = [f"i{n}" for n in range(WRITERS)]
    results = SPAWN.Queue()
    processes = [
        SPAWN.Process(
            target=append_worker, args=(database_url, name, APPENDS_PER_WRITER, go, results)
        )
        for name in names
    ]
    for process in processes:
        process.start()
    time.sleep(0.5)  # let them import and connect; then all start at once
    go.set()
    done = []
    try:
        for _ in processes:
            done.append(results.get(timeout=180))
    finally:
        for process in processes:
            process.join(30)
    assert [d for d in done if isinstance(d, str)] == []
    elapsed = max(d[2] for d in done) - min(d[1] for d in done)
    sessions = session_factory(engine)
    with sessions() as session:
        result = audit.verify_chain(session)
        rows = audit.entries(session)
    assert result.ok, result.problem
    assert result.entries == WRITERS * APPENDS_PER_WRITER
    for name in names:  # each writer's entries in its own order, none lost
        mine = [r.details_dict()["i"] for r in rows if r.actor == f"service:{name}"]
        assert mine == list(range(APPENDS_PER_WRITER))
    rate = WRITERS * APPENDS_PER_WRITER / elapsed
    MEASURED[f"audit_appends_per_s_{database_backend}_{WRITERS}_writers"] = round(rate)
    with capsys.disabled():
        print(
            f"\naudit appends, {WRITERS} processes x {APPENDS_PER_WRITER} on {database_backend}: "
            f"{rate:.0f}/s ({elapsed:.2f} s)"
        )


# ---- one commit per epoch -------------------------------------------------------------------


def make_group(engine: Engine, members: list[str]) -> None:
    def work(session: Session) -> None:
        registry = Registry(session)
        for member in members:
            registry.register_device(
                member,
                ek_cert_fingerprint=(member.encode().hex() * 32)[:64],
                devid_cert_pem="PEM",
                now=T0,
            )
        registry.create_group(
            "g1", creator=members[0], public_tree=b"t", group_context=b"c", now=T0
        )
        for leaf, member in enumerate(members[1:], start=1):
            registry.request_add("g1", member, now=T0)
            registry.append_commit(
                "g1",
                epoch=leaf - 1,
                committer=members[0],
                commit=b"add",
                welcome=None,
                public_tree=b"t",
                group_context=b"c",
                added={member: leaf},
                now=T0,
            )

    run_in_transaction(session_factory(engine), work)


def commit_worker(url: str, name: str, first_epoch: int, barrier: Barrier, results: Any) -> None:
    """Every round, all workers commit the same epoch at once, with the audit entry in the same
    transaction as the service does; the winners and the refused are reported."""
    engine = make_engine(url)
    sessions = session_factory(engine)
    won: list[int] = []
    refused: list[int] = []
    try:
        for epoch in range(first_epoch, first_epoch + ROUNDS):
            barrier.wait(60)

            def work(session: Session, epoch: int = epoch) -> None:
                Registry(session).append_commit(
                    "g1",
                    epoch=epoch,
                    committer=name,
                    commit=f"{name}@{epoch}".encode(),
                    welcome=None,
                    public_tree=f"tree {epoch + 1}".encode(),
                    group_context=b"c",
                    now=T0 + epoch,
                )
                audit.append(
                    session,
                    now=T0 + epoch,
                    actor=f"device:{name}",
                    action="group.commit",
                    target="g1",
                    outcome=Outcome.ACCEPTED,
                    details={"epoch": epoch},
                )

            try:
                run_in_transaction(sessions, work)
                won.append(epoch)
            except EpochConflict:
                refused.append(epoch)
            barrier.wait(60)
        results.put((name, won, refused))
    except BaseException as exc:
        barrier.abort()
        results.put(f"ERROR {name}: {type(exc).__name__}: {exc}")
    finally:
        engine.dispose()


def test_concurrent_commits_for_one_epoch_exactly_one_wins(
    engine: Engine, database_url: str
) -> None:
    members = [f"dev-{n}" for n in range(WRITERS)]
    make_group(engine, members)
    first = WRITERS - 1  # epoch after the adds
    barrier = SPAWN.Barrier(WRITERS)
    done = run_workers(commit_worker, [(database_url, m, first, barrier) for m in members])
    winners: dict[int, list[str]] = {}
    for name, won, refused in done:
        assert sorted(won + refused) == list(range(first, first + ROUNDS))
        for epoch in won:
            winners.setdefault(epoch, []).append(name)
    assert {e: len(w) for e, w in winners.items()} == {e: 1 for e in range(first, first + ROUNDS)}
    sessions = session_factory(engine)
    with sessions() as session:
        registry = Registry(session)
        assert registry.group("g1").epoch == first + ROUNDS
        assert registry.group("g1").public_tree == f"tree {first + ROUNDS}".encode()
        commits = registry.commits_from("g1", first)
        assert [(c.epoch, c.committer) for c in commits] == [
            (e, winners[e][0]) for e in range(first, first + ROUNDS)
        ]
        per_epoch = session.execute(
            select(CommitLogEntry.epoch, func.count()).group_by(CommitLogEntry.epoch)
        ).all()
        assert all(count == 1 for _epoch, count in per_epoch)
        result = audit.verify_chain(session)
        assert result.ok, result.problem
        assert result.entries == ROUNDS  # only the winners' transactions committed an entry


# ---- racing inserts retried in a savepoint ---------------------------------------------------


def enroll_worker(url: str, name: str, barrier: Barrier, results: Any) -> None:
    engine = make_engine(url)
    sessions = session_factory(engine)
    outcomes = []
    try:
        for round_ in range(ROUNDS):
            barrier.wait(60)
            device = f"race-{round_}"

            def work(session: Session, device: str = device) -> None:
                Registry(session).register_device(
                    device,
                    ek_cert_fingerprint=(device.encode().hex() * 32)[:64],
                    devid_cert_pem=f"PEM from {name}",
                    now=T0,
                )
                audit.append(
                    session,
                    now=T0,
                    actor=f"station:{name}",
                    action="device.register",
                    target=device,
                    outcome=Outcome.ACCEPTED,
                )

            try:
                run_in_transaction(sessions, work)
                outcomes.append("won")
            except ProtocolError as err:
                outcomes.append(err.check)
        results.put((name, outcomes))
    except BaseException as exc:
        barrier.abort()
        results.put(f"ERROR {name}: {type(exc).__name__}: {exc}")
    finally:
        engine.dispose()


def test_racing_enrollments_one_wins_the_others_are_refused(
    engine: Engine, database_url: str
) -> None:
    barrier = SPAWN.Barrier(WRITERS)
    done = run_workers(enroll_worker, [(database_url, f"st{n}", barrier) for n in range(WRITERS)])
    # A loser is refused by whichever check first sees the winner's committed row: the id
    # (``exists``) or, at READ COMMITTED, a statement later, the EK (``ek_taken``).
    refusals = {"registry.device.exists", "registry.device.ek_taken"}
    for round_ in range(ROUNDS):
        outcomes = [outcome[round_] for _name, outcome in done]
        assert outcomes.count("won") == 1
        assert set(outcomes) - {"won"} <= refusals
    with session_factory(engine)() as session:
        assert len(Registry(session).devices()) == ROUNDS
        result = audit.verify_chain(session)
        assert result.ok and result.entries == ROUNDS
