"""The audit chain verified incrementally from the last good head (``audit.verify_from``, the
dashboard's ``ChainCache``): the work follows what was appended, and tampering with entries
verified earlier is still found and named by check id. The attacker is a database writer
with plain SQL (tests/audit_tamper.py), on a real SQLite file."""

from __future__ import annotations

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from provisioning import audit
from provisioning.dashboard import app as dashboard_app
from provisioning.dashboard.app import ChainCache
from provisioning.db.schema import AuditEntry
from provisioning.registry import Outcome
from tests.audit_tamper import delete_and_recompute, truncate

pytestmark = pytest.mark.pure

T0 = 1_700_000_000


def fill(sessions: sessionmaker[Session], first: int, count: int) -> None:
    for i in range(first, first + count):
        audit.record(
            sessions,
            now=T0 + i,
            actor="service",
            action="device.attest",
            target=f"dev-{i}",
            outcome=Outcome.ACCEPTED,
            reason=f"trusted {i}",
            details={"n": i},
        )


def good_head(sessions: sessionmaker[Session]) -> tuple[int, bytes]:
    with sessions() as s:
        result = audit.verify_chain(s)
    assert result.ok
    return result.head_seq, result.head_hash


def rows(sessions: sessionmaker[Session]) -> list[tuple[object, ...]]:
    with sessions() as s:
        return [tuple(r) for r in s.execute(select(AuditEntry.__table__)).all()]


def test_verify_from_checks_what_was_appended_and_agrees_with_a_full_walk(
    sessions: sessionmaker[Session],
) -> None:
    fill(sessions, 1, 20)
    verified = good_head(sessions)
    fill(sessions, 21, 5)
    with sessions() as s:
        incremental = audit.verify_from(s, verified)
        full = audit.verify_chain(s)
        assert audit.verify_from(s, (0, audit.GENESIS_PREV_HASH)) == full
    assert incremental.ok and full.ok
    assert (
        (incremental.entries, incremental.head_seq, incremental.head_hash)
        == (
            full.entries,
            full.head_seq,
            full.head_hash,
        )
        == (25, 25, full.head_hash)
    )


def test_history_rewritten_behind_the_verified_head_is_found_though_a_full_walk_passes(
    sessions: sessionmaker[Session],
) -> None:
    """The attacker deletes entry 7 and recomputes every later hash and ``audit_head``: a
    full walk finds a consistent chain, but the head verified earlier no longer hashes the
    same."""
    fill(sessions, 1, 20)
    verified = good_head(sessions)
    with sessions.begin() as s:
        delete_and_recompute(s, 7)
    fill(sessions, 21, 3)
    with sessions() as s:
        assert audit.verify_chain(s).ok  # the rewrite is consistent on its own
        result = audit.verify_from(s, verified)
    assert result.problem is not None
    assert (result.problem.seq, result.problem.check) == (20, "audit.chain.verified")
    assert "no longer has the hash" in result.problem.reason


def test_cutting_the_log_back_past_the_verified_head_is_found(
    sessions: sessionmaker[Session],
) -> None:
    fill(sessions, 1, 20)
    verified = good_head(sessions)
    with sessions.begin() as s:
        truncate(s, 4)
    before = rows(sessions)
    with sessions() as s:
        result = audit.verify_from(s, verified)
    assert result.problem is not None
    assert (result.problem.seq, result.problem.check) == (20, "audit.chain.verified")
    assert "is gone" in result.problem.reason
    assert rows(sessions) == before  # verifying changes nothing


def test_an_old_entry_edited_in_place_is_found_by_the_dashboard_after_an_incremental_check(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a good check, an old entry's reason is edited with SQL (its hash left as it
    was): ``verify_from`` does not read it, the rechecked window does; the dashboard names
    the entry and the check id at the next check, and nothing in the log changes."""
    fill(sessions, 1, 30)
    cache = ChainCache(sessions, ttl=0, clock=lambda: T0, recheck=10)
    assert cache.status().ok
    walks: list[int] = []
    real = audit.verify_chain

    def counted(session: Session, **kw: object) -> audit.VerifyResult:
        walks.append(1)
        return real(session, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(dashboard_app.audit, "verify_chain", counted)
    fill(sessions, 31, 2)
    assert cache.status().ok  # incremental: the 2 new entries and entries 1..10 again
    assert cache.status().entries == 32
    assert walks == []  # never the whole log again
    with sessions.begin() as s:
        s.execute(text("UPDATE audit_log SET reason = 'nothing happened' WHERE seq = 25"))
    before = rows(sessions)
    fill(sessions, 33, 1)
    seen = [cache.status() for _ in range(4)]  # within one sweep of the 32 old entries
    broken = [s for s in seen if not s.ok]
    assert broken, seen
    assert broken[0].problem is not None
    assert broken[0].problem.startswith("entry 25: hash mismatch [audit.chain.hash]:")
    assert broken[0].entries == 24
    assert rows(sessions)[:32] == before  # the check changed nothing


def test_the_recheck_sweep_starts_again_once_it_reached_the_head(
    sessions: sessionmaker[Session],
) -> None:
    """Entries keep coming while the windows sweep the log; once a window reaches the head,
    the next starts again at entry 1, so an early entry edited after a full sweep is found."""
    fill(sessions, 1, 25)
    cache = ChainCache(sessions, ttl=0, clock=lambda: T0, recheck=10)
    assert cache.status().ok
    for i in range(26, 36):  # ten checks, one new entry each: the sweep passes the head
        fill(sessions, i, 1)
        assert cache.status().ok
    with sessions.begin() as s:
        s.execute(text("UPDATE audit_log SET target = 'dev-x' WHERE seq = 3"))
    seen = []
    for i in range(36, 41):  # entries still coming: one sweep of about 38 is 4 windows
        fill(sessions, i, 1)
        seen.append(cache.status())
    broken = [s for s in seen if not s.ok]
    assert broken and broken[0].problem is not None, seen
    assert broken[0].problem.startswith("entry 3: hash mismatch [audit.chain.hash]:")
