"""The hash-chained audit log on a real SQLite file: tampering by raw SQL is found and named, and
concurrent writers on separate engines produce one valid chain."""

from __future__ import annotations

import hashlib
import itertools
import threading

import cbor2
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from provisioning import audit
from provisioning.audit import ProblemKind
from provisioning.registry import (
    DeviceState,
    Outcome,
    Registry,
    make_engine,
    run_in_transaction,
    session_factory,
)

pytestmark = pytest.mark.pure

T0 = 1_700_000_000


def fill(sessions: sessionmaker[Session], n: int) -> list[audit.AuditRecord]:
    written = []
    for i in range(1, n + 1):
        written.append(
            audit.record(
                sessions,
                now=T0 + i,
                actor="operator:alice",
                action="device.quarantine",
                target=f"pi-{i:04d}",
                outcome=Outcome.ACCEPTED if i % 3 else Outcome.REFUSED,
                reason="" if i % 3 else "role viewer may not quarantine",
                details={"epoch": i, "group": "g1", "members": ["a", "b"], "ok": True},
            )
        )
    return written


def verify(sessions: sessionmaker[Session], **kwargs: object) -> audit.VerifyResult:
    with sessions() as s:
        return audit.verify_chain(s, **kwargs)  # type: ignore[arg-type]


def test_chain_links_and_hashes_as_documented(sessions: sessionmaker[Session]) -> None:
    written = fill(sessions, 5)
    assert [e.seq for e in written] == [1, 2, 3, 4, 5]
    assert written[0].prev_hash == bytes(32)
    for before, after in itertools.pairwise(written):
        assert after.prev_hash == before.entry_hash
    # recompute one entry from the documented format with plain hashlib + cbor2
    e = written[2]
    preimage = cbor2.dumps(
        [1, e.seq, e.time, e.actor, e.action, e.target, e.outcome.value, e.reason, e.details],
        canonical=True,
    )
    assert hashlib.sha256(e.prev_hash + preimage).digest() == e.entry_hash
    assert e.details == '{"epoch":3,"group":"g1","members":["a","b"],"ok":true}'
    assert e.details_dict()["members"] == ["a", "b"]
    result = verify(sessions)
    assert result.ok and result.problem is None
    assert (result.entries, result.head_seq, result.head_hash) == (5, 5, written[-1].entry_hash)
    with sessions() as s:
        assert [r.seq for r in audit.entries(s, from_seq=4)] == [4, 5]
        assert audit.head(s) == (5, written[-1].entry_hash)


def test_empty_chain_is_valid(sessions: sessionmaker[Session]) -> None:
    result = verify(sessions)
    assert result.ok and result.entries == 0 and result.head_hash == bytes(32)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("actor", "'operator:mallory'"),
        ("outcome", "'refused'"),
        ("target", "'pi-9999'"),
        ("time", "'yesterday'"),  # SQLite keeps text in a number column: reported, not a crash
        ("time", "time + 1"),
        ("details", "'{\"epoch\":99}'"),
        ("reason", "'nothing to see'"),
        ("seq", "seq"),  # a no-op control: must stay valid
    ],
)
def test_raw_sql_edit_is_named(
    engine: Engine, sessions: sessionmaker[Session], column: str, value: str
) -> None:
    fill(sessions, 6)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE audit_log SET {column} = {value} WHERE seq = 4")
    result = verify(sessions)
    if column == "seq":
        assert result.ok
        return
    assert result.problem is not None
    assert (result.problem.seq, result.problem.kind) == (4, ProblemKind.HASH_MISMATCH)
    assert result.entries == 3 and result.head_seq == 3


def test_rewritten_entry_with_recomputed_hash_breaks_the_next_link(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    written = fill(sessions, 5)
    e = written[1]
    forged_actor = "operator:mallory"
    preimage = audit.entry_preimage(
        seq=e.seq,
        time=e.time,
        actor=forged_actor,
        action=e.action,
        target=e.target,
        outcome=e.outcome.value,
        reason=e.reason,
        details=e.details,
    )
    forged_hash = audit.compute_hash(e.prev_hash, preimage)
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE audit_log SET actor = :a, entry_hash = :h WHERE seq = 2"),
            {"a": forged_actor, "h": forged_hash},
        )
    result = verify(sessions)
    assert result.problem is not None
    assert (result.problem.seq, result.problem.kind) == (3, ProblemKind.BROKEN_LINK)
    assert "entry 2" in result.problem.reason


@pytest.mark.parametrize(("deleted", "reported"), [(3, 3), (1, 1), ((3, 4), 3)])
def test_deleted_entries_are_named_as_a_gap(
    engine: Engine, sessions: sessionmaker[Session], deleted: int | tuple[int, int], reported: int
) -> None:
    fill(sessions, 6)
    low, high = deleted if isinstance(deleted, tuple) else (deleted, deleted)
    with engine.begin() as conn:
        conn.execute(
            text("DELETE FROM audit_log WHERE seq BETWEEN :l AND :h"), {"l": low, "h": high}
        )
    result = verify(sessions)
    assert result.problem is not None
    assert (result.problem.seq, result.problem.kind) == (reported, ProblemKind.GAP)
    assert "missing" in result.problem.reason


def test_cut_tail_is_found_by_the_head_record(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    fill(sessions, 6)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_log WHERE seq >= 5"))
    result = verify(sessions)
    assert result.problem is not None
    assert (result.problem.seq, result.problem.kind) == (5, ProblemKind.HEAD)
    assert result.entries == 4


def test_cut_tail_with_rewritten_head_is_found_only_with_an_anchor(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    written = fill(sessions, 6)
    anchor = (6, written[-1].entry_hash)
    assert verify(sessions, anchor=anchor).ok
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_log WHERE seq >= 5"))
        conn.execute(
            text("UPDATE audit_head SET seq = 4, entry_hash = :h"), {"h": written[3].entry_hash}
        )
    assert verify(sessions).ok  # the database alone can no longer tell
    result = verify(sessions, anchor=anchor)
    assert result.problem is not None
    assert (result.problem.seq, result.problem.kind) == (6, ProblemKind.ANCHOR)
    wrong = verify(sessions, anchor=(2, bytes(32)))
    assert wrong.problem is not None
    assert (wrong.problem.seq, wrong.problem.kind) == (2, ProblemKind.ANCHOR)


def test_concurrent_writers_make_one_chain(engine: Engine, sessions: sessionmaker[Session]) -> None:
    per_writer = 40
    writers = ["svc-1", "svc-2", "svc-3"]
    start = threading.Barrier(len(writers))
    errors: list[BaseException] = []

    def writer(name: str) -> None:
        own_engine = make_engine(engine.url)  # each writer is its own service instance
        own = session_factory(own_engine)
        try:
            start.wait(10)
            for i in range(per_writer):
                audit.record(
                    own,
                    now=T0 + i,
                    actor=name,
                    action="group.ack",
                    target="g1",
                    outcome=Outcome.ACCEPTED,
                    details={"i": i},
                )
        except BaseException as exc:
            errors.append(exc)
        finally:
            own_engine.dispose()

    threads = [threading.Thread(target=writer, args=(n,)) for n in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    result = verify(sessions)
    assert result.ok, result.problem
    assert result.entries == per_writer * len(writers)
    with sessions() as s:
        rows = audit.entries(s)
    for name in writers:
        mine = [r.details_dict()["i"] for r in rows if r.actor == name]
        assert mine == list(range(per_writer))  # each writer's entries in its own order


def test_state_change_and_its_audit_entry_commit_together(
    sessions: sessionmaker[Session],
) -> None:
    def enroll_and_audit(s: Session) -> None:
        Registry(s).register_device(
            "pi-1", ek_cert_fingerprint="ab" * 32, devid_cert_pem="PEM", now=T0
        )
        Registry(s).set_device_state("pi-1", DeviceState.REVOKED, reason="lost", now=T0)
        audit.append(
            s,
            now=T0,
            actor="station:line-1",
            action="device.register",
            target="pi-1",
            outcome=Outcome.ACCEPTED,
        )

    run_in_transaction(sessions, enroll_and_audit)

    def refused_after_audit(s: Session) -> None:
        audit.append(
            s,
            now=T0 + 1,
            actor="operator:bob",
            action="device.activate",
            target="pi-1",
            outcome=Outcome.ACCEPTED,
        )
        # a revoked identity never becomes active again: the registry refuses after the append
        Registry(s).set_device_state("pi-1", DeviceState.ACTIVE, reason="", now=T0 + 1)

    with pytest.raises(Exception, match="cannot go from revoked to active"):
        run_in_transaction(sessions, refused_after_audit)
    with sessions() as s:
        assert [r.action for r in audit.entries(s)] == ["device.register"]  # rolled back together
    assert verify(sessions).entries == 1


def test_details_must_be_canonical_json_values() -> None:
    assert audit.canonical_json({"b": 1, "a": [True, None, "é"]}) == '{"a":[true,null,"é"],"b":1}'
    with pytest.raises(TypeError, match="float"):
        audit.canonical_json({"x": 1.5})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="bytes"):
        audit.canonical_json({"x": {"y": b"\x00"}})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="key"):
        audit.canonical_json({"x": {1: "y"}})  # type: ignore[dict-item]


def test_database_refuses_a_fork_of_the_chain(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    written = fill(sessions, 3)
    insert = text(
        "INSERT INTO audit_log (seq, time, actor, action, target, outcome, reason, details, "
        "prev_hash, entry_hash) VALUES (:seq, 0, 'x', 'x', 'x', 'accepted', '', '{}', :prev, :h)"
    )
    fork_same_parent = {"seq": 4, "prev": written[1].entry_hash, "h": b"\x01" * 32}
    fork_same_seq = {"seq": 3, "prev": b"\x02" * 32, "h": b"\x03" * 32}
    for params in (fork_same_parent, fork_same_seq):
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(insert, params)
    assert verify(sessions).entries == 3
