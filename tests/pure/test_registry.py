"""The fleet registry on a real SQLite file (SQLite is an in-process library, hence tier pure)."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.schema import CreateTable

from agent.protocol.errors import ConfigError, ProtocolError
from provisioning.db.schema import Base, CommitLogEntry
from provisioning.registry import (
    AttestationResult,
    DeviceState,
    EpochConflict,
    KeyState,
    KeyStateReport,
    PendingChange,
    Registry,
    Role,
    make_engine,
    missing_tables,
    pem_fingerprint,
    run_in_transaction,
    session_factory,
)

pytestmark = pytest.mark.pure

T0 = 1_700_000_000


def fp(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def enroll(reg: Registry, *names: str) -> None:
    for name in names:
        reg.register_device(
            name, ek_cert_fingerprint=fp("ek-" + name), devid_cert_pem="PEM " + name, now=T0
        )


def make_group(
    sessions: sessionmaker[Session], group: str = "g1", members: tuple[str, ...] = ("a", "b", "c")
) -> None:
    """A group created by members[0] whose other members joined by one accepted commit."""

    def work(s: Session) -> None:
        reg = Registry(s)
        enroll(reg, *members)
        reg.create_group(group, creator=members[0], public_tree=b"t0", group_context=b"c0", now=T0)
        for name in members[1:]:
            reg.request_add(group, name, now=T0)
        reg.append_commit(
            group,
            epoch=0,
            committer=members[0],
            commit=b"commit-0",
            welcome=b"welcome-0",
            public_tree=b"t1",
            group_context=b"c1",
            added={name: i for i, name in enumerate(members[1:], start=1)},
            now=T0 + 1,
        )

    run_in_transaction(sessions, work)


# ---- engine and schema -------------------------------------------------------------------------


def test_sqlite_file_has_every_table_wal_and_foreign_keys(engine: Engine, tmp_path: Path) -> None:
    assert missing_tables(engine) == []
    assert (tmp_path / "fleet.db").is_file()
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    expected = {
        "devices",
        "device_keys",
        "key_transitions",
        "groups",
        "group_members",
        "group_tree_nodes",
        "commit_log",
        "acks",
        "operators",
        "stations",
        "audit_log",
        "audit_head",
        "enroll_sessions",
        "device_tags",
        "group_deleted_members",
        "group_admissions",
    }
    assert set(Base.metadata.tables) == expected


def test_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        make_engine(f"sqlite:///{tmp_path / 'nope' / 'fleet.db'}")
    with pytest.raises(ConfigError, match="could not parse"):
        make_engine("not a url")


def test_schema_renders_for_postgresql_with_its_ordering_constraints() -> None:
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    ddl = {
        name: str(CreateTable(table).compile(dialect=dialect))
        for name, table in Base.metadata.tables.items()
    }
    assert "PRIMARY KEY (group_id, epoch)" in ddl["commit_log"]
    assert "PRIMARY KEY (group_id, epoch, device_id)" in ddl["acks"]
    assert "UNIQUE (prev_hash)" in ddl["audit_log"]
    assert "PRIMARY KEY (seq)" in ddl["audit_log"]
    assert "BYTEA" in ddl["groups"]
    assert "DATETIME" not in " ".join(ddl.values())  # times are integer seconds everywhere


def test_no_column_can_hold_private_group_material() -> None:
    forbidden = ("secret", "private", "priv", "path_secret", "epoch_key")
    for table in Base.metadata.tables.values():
        for column in table.columns:
            assert not any(word in column.name for word in forbidden), (table.name, column.name)


def test_foreign_keys_are_enforced(sessions: sessionmaker[Session]) -> None:
    with pytest.raises(IntegrityError), sessions() as s, s.begin():
        s.add(
            CommitLogEntry(
                group_id="ghost", epoch=0, committer="nobody", commit=b"", accepted_at=T0
            )
        )
        s.flush()


# ---- devices and key states ------------------------------------------------------------------


def test_register_device_and_refuse_duplicates(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        reg = Registry(s)
        dev = reg.register_device(
            "pi-0001", ek_cert_fingerprint=fp("ek1"), devid_cert_pem="PEM", now=T0
        )
        assert dev.state is DeviceState.REGISTERED
        assert dev.registered_at == T0 and dev.last_seen is None
    with sessions.begin() as s:
        reg = Registry(s)
        with pytest.raises(ProtocolError) as exists:
            reg.register_device("pi-0001", ek_cert_fingerprint=fp("x"), devid_cert_pem="", now=T0)
        assert exists.value.check == "registry.device.exists"
        with pytest.raises(ProtocolError) as taken:
            reg.register_device("pi-0002", ek_cert_fingerprint=fp("ek1"), devid_cert_pem="", now=T0)
        assert taken.value.check == "registry.device.ek_taken"
        assert "pi-0001" in taken.value.reason
        with pytest.raises(ProtocolError) as bad_fp:
            reg.register_device("pi-0003", ek_cert_fingerprint="ABCD", devid_cert_pem="", now=T0)
        assert bad_fp.value.check == "registry.device.fingerprint"
        with pytest.raises(ProtocolError) as bad_name:
            reg.register_device("../etc", ek_cert_fingerprint=fp("y"), devid_cert_pem="", now=T0)
        assert bad_name.value.check == "registry.device.name"
        found = reg.device_by_ek(fp("ek1"))
        assert found is not None and found.device_id == "pi-0001"
        assert [d.device_id for d in reg.devices()] == ["pi-0001"]


def test_device_state_transitions(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        reg = Registry(s)
        enroll(reg, "d")
        reg.set_device_state("d", DeviceState.ACTIVE, reason="attested", now=T0 + 1)
        again = reg.set_device_state("d", DeviceState.ACTIVE, reason="repeat", now=T0 + 2)
        assert again.state_changed_at == T0 + 1 and again.state_reason == "attested"
        q = reg.set_device_state("d", DeviceState.QUARANTINED, reason="pcr 7", now=T0 + 3)
        assert (q.state, q.state_reason, q.state_changed_at) == (
            DeviceState.QUARANTINED,
            "pcr 7",
            T0 + 3,
        )
        reg.set_device_state("d", DeviceState.REVOKED, reason="op", now=T0 + 4)
        with pytest.raises(ProtocolError) as back:
            reg.set_device_state("d", DeviceState.ACTIVE, reason="", now=T0 + 5)
        assert back.value.check == "registry.device.transition"
        reg.set_device_state("d", DeviceState.DESTROYED, reason="keys gone", now=T0 + 6)
        assert [d.device_id for d in reg.devices(state=DeviceState.DESTROYED)] == ["d"]
        assert reg.devices(state=DeviceState.ACTIVE) == []
        with pytest.raises(ProtocolError) as unknown:
            reg.device("nope")
        assert unknown.value.check == "registry.device.unknown"


def test_attestation_result_is_recorded(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        reg = Registry(s)
        enroll(reg, "d")
        rec = reg.record_attestation(
            "d", AttestationResult.UNTRUSTED, reason="pcr 4 not golden", now=T0 + 9
        )
    assert rec.attestation_result is AttestationResult.UNTRUSTED
    assert (rec.attestation_reason, rec.attested_at, rec.last_seen) == (
        "pcr 4 not golden",
        T0 + 9,
        T0 + 9,
    )
    assert rec.state is DeviceState.REGISTERED  # quarantine is the service's separate decision


def test_report_records_key_transitions_idempotently(sessions: sessionmaker[Session]) -> None:
    history = [
        KeyStateReport("devid", KeyState.PRE_ACTIVATION, T0),
        KeyStateReport("devid", KeyState.ACTIVE, T0 + 1),
        KeyStateReport("epoch/g1/3", KeyState.ACTIVE, T0 + 2),
    ]
    with sessions.begin() as s:
        reg = Registry(s)
        enroll(reg, "d")
        rec = reg.record_report("d", b"\xa1\x01\x02", history, now=T0 + 10)
        assert rec.last_report == b"\xa1\x01\x02" and rec.last_seen == T0 + 10
    with sessions.begin() as s:
        reg = Registry(s)
        # the same history again plus one new step: only the new step is added
        later = [*history, KeyStateReport("epoch/g1/3", KeyState.DEACTIVATED, T0 + 20)]
        reg.record_report("d", b"\xa0", later, now=T0 + 30)
        states = {k.key_name: (k.state, k.changed_at) for k in reg.key_states("d")}
        assert states == {
            "devid": (KeyState.ACTIVE, T0 + 1),
            "epoch/g1/3": (KeyState.DEACTIVATED, T0 + 20),
        }
        steps = reg.key_history("d", "epoch/g1/3")
        assert [(t.from_state, t.to_state, t.at, t.recorded_at) for t in steps] == [
            (None, KeyState.ACTIVE, T0 + 2, T0 + 10),
            (KeyState.ACTIVE, KeyState.DEACTIVATED, T0 + 20, T0 + 30),
        ]
        assert len(reg.key_history("d", "devid")) == 2


def test_impossible_key_transition_refuses_the_whole_report(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as s:
        reg = Registry(s)
        enroll(reg, "d")
        reg.record_report("d", b"r1", [KeyStateReport("ak", KeyState.DESTROYED, T0)], now=T0)
    with sessions.begin() as s:
        reg = Registry(s)
        report = [
            KeyStateReport("devid", KeyState.ACTIVE, T0 + 1),  # fine on its own
            KeyStateReport("ak", KeyState.ACTIVE, T0 + 2),  # destroyed is terminal
        ]
        with pytest.raises(ProtocolError) as refused:
            reg.record_report("d", b"r2", report, now=T0 + 5)
        assert refused.value.check == "registry.key.transition"
        assert "destroyed" in refused.value.reason
        # nothing of the refused report was applied, even inside the same session
        assert [k.key_name for k in reg.key_states("d")] == ["ak"]
        assert reg.device("d").last_report == b"r1"
        with pytest.raises(ProtocolError) as backwards:
            reg.record_report("d", b"r3", [KeyStateReport("ak", KeyState.DESTROYED, T0 - 1)], now=1)
        assert backwards.value.check == "registry.key.transition"


def test_pem_fingerprint_is_sha256_of_der() -> None:
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "op")])
    start = datetime(2025, 1, 1, tzinfo=UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    assert pem_fingerprint(pem) == hashlib.sha256(der).hexdigest()


# ---- groups, commits, acks -------------------------------------------------------------------


def test_group_lifecycle_commits_and_membership(sessions: sessionmaker[Session]) -> None:
    make_group(sessions)
    with sessions.begin() as s:
        reg = Registry(s)
        group = reg.group("g1")
        assert (group.epoch, group.public_tree, group.group_context) == (1, b"t1", b"c1")
        members = reg.members("g1")
        assert [(m.device_id, m.leaf_index, m.pending, m.joined_epoch) for m in members] == [
            ("a", 0, None, 0),
            ("b", 1, None, 1),
            ("c", 2, None, 1),
        ]
        enroll(reg, "d")
        reg.request_add("g1", "d", now=T0 + 2)
        reg.request_remove("g1", "b", now=T0 + 2)
        pending = {m.device_id: m.pending for m in reg.members("g1")}
        assert pending == {"a": None, "b": PendingChange.REMOVE, "c": None, "d": PendingChange.ADD}
        # c commits: removes b and gives b's freed leaf 1 to d in the same commit
        reg.append_commit(
            "g1",
            epoch=1,
            committer="c",
            commit=b"commit-1",
            welcome=b"welcome-1",
            public_tree=b"t2",
            group_context=b"c2",
            added={"d": 1},
            removed=["b"],
            now=T0 + 3,
        )
        assert [(m.device_id, m.leaf_index) for m in reg.members("g1")] == [
            ("a", 0),
            ("d", 1),
            ("c", 2),
        ]
        assert [m.group_id for m in reg.groups_of("d")] == ["g1"]
        assert [c.epoch for c in reg.commits_from("g1", 0)] == [0, 1]
        assert reg.commits_from("g1", 2) == []
        caught_up = reg.commits_from("g1", 1)
        assert [(c.committer, c.commit, c.welcome) for c in caught_up] == [
            ("c", b"commit-1", b"welcome-1")
        ]


def test_commit_refusals(sessions: sessionmaker[Session]) -> None:
    make_group(sessions)
    commit: dict[str, Any] = {
        "commit": b"x",
        "welcome": None,
        "public_tree": b"t",
        "group_context": b"c",
        "now": T0 + 5,
    }
    cases: list[tuple[dict[str, Any], str]] = [
        ({"epoch": 0, "committer": "a"}, "ds.commit.epoch_taken"),
        ({"epoch": 7, "committer": "a"}, "ds.commit.epoch_ahead"),
        ({"epoch": 1, "committer": "stranger"}, "ds.commit.committer"),
        ({"epoch": 1, "committer": "a", "removed": ["zed"]}, "ds.commit.remove_unknown"),
        ({"epoch": 1, "committer": "a", "added": {"b": 5}}, "ds.commit.add_member"),
        ({"epoch": 1, "committer": "a", "added": {"ghost": 5}}, "registry.device.unknown"),
    ]
    for args, check in cases:
        with sessions() as s:
            with pytest.raises(ProtocolError) as refused:
                Registry(s).append_commit("g1", **args, **commit)
            assert refused.value.check == check, args
            s.rollback()
    with sessions() as s:
        reg = Registry(s)
        reg.append_commit("g1", epoch=1, committer="a", **commit)
        enroll(reg, "e")
        with pytest.raises(ProtocolError) as clash:  # leaf 2 is c's
            reg.append_commit("g1", epoch=2, committer="a", added={"e": 2}, **commit)
        assert clash.value.check == "ds.commit.leaf"
        s.rollback()
    with sessions.begin() as s:
        assert Registry(s).group("g1").epoch == 1  # the refused transactions left nothing


def test_revoked_device_cannot_join(sessions: sessionmaker[Session]) -> None:
    make_group(sessions)
    with sessions.begin() as s:
        reg = Registry(s)
        enroll(reg, "r")
        reg.set_device_state("r", DeviceState.REVOKED, reason="stolen", now=T0)
        with pytest.raises(ProtocolError) as refused:
            reg.request_add("g1", "r", now=T0)
        assert refused.value.check == "registry.member.device_state"
        assert reg.request_add("g1", "a", now=T0).leaf_index == 0  # already in: no-op
        enroll(reg, "p")
        reg.request_add("g1", "p", now=T0)
        assert reg.request_remove("g1", "p", now=T0) is None  # withdrawn before any commit
        assert "p" not in {m.device_id for m in reg.members("g1")}


def test_second_commit_for_an_epoch_loses_to_the_database(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    """Two service instances accept commits for the same epoch at once: B passes every check
    in Python before A commits, so only the database's (group_id, epoch) key can stop B."""
    make_group(sessions)
    b_about_to_insert = threading.Event()
    a_committed = threading.Event()
    outcome: dict[str, BaseException | None] = {}
    commit_args: dict[str, Any] = {
        "epoch": 1,
        "welcome": None,
        "public_tree": b"t",
        "group_context": b"c",
        "now": T0 + 7,
    }

    def instance_b() -> None:
        b_engine = make_engine(engine.url)  # a separate engine: a separate service instance

        @event.listens_for(b_engine, "before_cursor_execute")
        def pause(_c: Any, _cur: Any, statement: str, *_rest: Any) -> None:
            if statement.startswith("INSERT INTO commit_log"):
                b_about_to_insert.set()
                assert a_committed.wait(10)

        try:
            with session_factory(b_engine).begin() as s:
                Registry(s).append_commit("g1", committer="b", commit=b"from-b", **commit_args)
            outcome["b"] = None
        except BaseException as exc:
            outcome["b"] = exc
        finally:
            b_engine.dispose()

    with sessions.begin() as s:  # A has read the group at epoch 1 as well
        assert Registry(s).group("g1").epoch == 1
    thread = threading.Thread(target=instance_b)
    thread.start()
    assert b_about_to_insert.wait(10)
    with sessions.begin() as s:
        Registry(s).append_commit("g1", committer="a", commit=b"from-a", **commit_args)
    a_committed.set()
    thread.join(20)
    assert not thread.is_alive()
    assert isinstance(outcome["b"], EpochConflict)
    assert outcome["b"].check == "ds.commit.epoch_taken"
    # B's own check saw epoch 1 free; the refusal came from the constraint, which cannot know
    # the group's new epoch (the pre-check's message would name it)
    assert "the group is at epoch" not in outcome["b"].reason
    with sessions.begin() as s:
        reg = Registry(s)
        assert reg.group("g1").epoch == 2
        assert [(c.epoch, c.commit) for c in reg.commits_from("g1", 1)] == [(1, b"from-a")]


def test_racing_threads_one_commit_per_epoch(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    make_group(sessions, members=("a", "b", "c", "d"))
    rounds = 15
    committers = ["a", "b", "c", "d"]
    wins: list[tuple[int, str]] = []
    conflicts: list[tuple[int, str]] = []
    barrier = threading.Barrier(len(committers))
    lock = threading.Lock()

    def instance(name: str) -> None:
        local = session_factory(make_engine(engine.url))
        for epoch in range(1, rounds + 1):
            barrier.wait(20)

            def work(s: Session, epoch: int = epoch) -> None:
                Registry(s).append_commit(
                    "g1",
                    epoch=epoch,
                    committer=name,
                    commit=f"{name}-{epoch}".encode(),
                    welcome=None,
                    public_tree=b"t",
                    group_context=b"c",
                    now=T0 + epoch,
                )

            try:
                run_in_transaction(local, work)
                with lock:
                    wins.append((epoch, name))
            except EpochConflict:
                with lock:
                    conflicts.append((epoch, name))
            barrier.wait(20)

    threads = [threading.Thread(target=instance, args=(n,)) for n in committers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(e for e, _ in wins) == list(range(1, rounds + 1))  # exactly one per epoch
    assert len(conflicts) == rounds * (len(committers) - 1)
    with sessions.begin() as s:
        reg = Registry(s)
        assert reg.group("g1").epoch == rounds + 1
        log = reg.commits_from("g1", 1)
        assert [(c.epoch, c.committer) for c in log] == sorted(wins)


def test_acks_stragglers_and_disagreement(sessions: sessionmaker[Session]) -> None:
    make_group(sessions)
    with sessions.begin() as s:
        reg = Registry(s)
        status = reg.ack_status("g1")
        assert (status.epoch, status.members, status.stragglers) == (
            1,
            ("a", "b", "c"),
            ("a", "b", "c"),
        )
        reg.record_ack("g1", epoch=1, device_id="a", epoch_authenticator=b"A" * 32, now=T0 + 2)
        reg.record_ack("g1", epoch=1, device_id="b", epoch_authenticator=b"A" * 32, now=T0 + 2)
        reg.record_ack("g1", epoch=1, device_id="b", epoch_authenticator=b"A" * 32, now=T0 + 3)
        assert reg.pending_acks("g1") == ["c"]
        assert not reg.ack_status("g1").agreed
        assert reg.device("a").last_seen == T0 + 2
        reg.record_ack("g1", epoch=1, device_id="c", epoch_authenticator=b"B" * 32, now=T0 + 4)
        status = reg.ack_status("g1")
        assert status.stragglers == ()
        assert dict(status.by_authenticator) == {b"A" * 32: ("a", "b"), b"B" * 32: ("c",)}
        assert not status.agreed  # c derived different epoch secrets: a fork, visible in public
        refusals = [
            ({"epoch": 1, "device_id": "a", "epoch_authenticator": b"C" * 32}, "ds.ack.changed"),
            (
                {"epoch": 2, "device_id": "a", "epoch_authenticator": b"A" * 32},
                "ds.ack.epoch_ahead",
            ),
            ({"epoch": 1, "device_id": "x", "epoch_authenticator": b"A" * 32}, "ds.ack.not_member"),
        ]
        for args, check in refusals:
            with pytest.raises(ProtocolError) as refused:
                reg.record_ack("g1", now=T0 + 5, **args)  # type: ignore[arg-type]
            assert refused.value.check == check


def test_all_members_agreeing(sessions: sessionmaker[Session]) -> None:
    make_group(sessions, members=("a", "b"))
    with sessions.begin() as s:
        reg = Registry(s)
        for name in ("a", "b"):
            reg.record_ack("g1", epoch=1, device_id=name, epoch_authenticator=b"E" * 32, now=T0)
        assert reg.ack_status("g1").agreed


def test_prune_commit_log_and_catch_up(sessions: sessionmaker[Session]) -> None:
    make_group(sessions, members=("a", "b"))
    with sessions.begin() as s:
        reg = Registry(s)
        for epoch in range(1, 6):
            reg.append_commit(
                "g1",
                epoch=epoch,
                committer="a",
                commit=b"c%d" % epoch,
                welcome=None,
                public_tree=b"t",
                group_context=b"c",
                now=T0 + epoch,
            )
            reg.record_ack("g1", epoch=epoch, device_id="b", epoch_authenticator=b"x", now=T0)
        assert reg.oldest_retained_epoch("g1") == 0
        assert reg.prune_commit_log("g1", below_epoch=4) == 4
        assert reg.oldest_retained_epoch("g1") == 4
        assert [c.epoch for c in reg.commits_from("g1", 4)] == [4, 5]
        with pytest.raises(ProtocolError) as behind:
            reg.commits_from("g1", 2)
        assert behind.value.check == "ds.catchup.pruned"
        with pytest.raises(ProtocolError) as ahead:
            reg.commits_from("g1", 9)
        assert ahead.value.check == "ds.catchup.epoch_ahead"
        remaining_acks = s.execute(text("SELECT epoch FROM acks ORDER BY epoch")).scalars().all()
        assert remaining_acks == [4, 5]


# ---- operators and stations ------------------------------------------------------------------


def test_operators_crud_roles_and_last_admin(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        reg = Registry(s)
        reg.add_operator("alice", cert_fingerprint=fp("alice"), role=Role.ADMIN, now=T0)
        reg.add_operator("bob", cert_fingerprint=fp("bob"), role=Role.VIEWER, now=T0)
        with pytest.raises(ProtocolError) as dup:
            reg.add_operator("carol", cert_fingerprint=fp("bob"), role=Role.VIEWER, now=T0)
        assert dup.value.check == "registry.operator.fingerprint_taken"
        with pytest.raises(ProtocolError) as exists:
            reg.add_operator("bob", cert_fingerprint=fp("b2"), role=Role.VIEWER, now=T0)
        assert exists.value.check == "registry.operator.exists"
        by_fp = reg.operator_by_fingerprint(fp("bob"))
        assert by_fp is not None and by_fp.name == "bob"
        with pytest.raises(ProtocolError) as last:
            reg.set_operator_role("alice", Role.OPERATOR, now=T0 + 1)
        assert last.value.check == "registry.operator.last_admin"
        with pytest.raises(ProtocolError) as last_rm:
            reg.remove_operator("alice")
        assert last_rm.value.check == "registry.operator.last_admin"
        promoted = reg.set_operator_role("bob", Role.ADMIN, now=T0 + 2)
        assert (promoted.role, promoted.updated_at) == (Role.ADMIN, T0 + 2)
        reg.set_operator_role("alice", Role.OPERATOR, now=T0 + 3)
        rotated = reg.set_operator_certificate("alice", fp("alice-2"), now=T0 + 4)
        assert rotated.cert_fingerprint == fp("alice-2")
        assert reg.operator_by_fingerprint(fp("alice")) is None
        reg.remove_operator("alice")
        assert [(o.name, o.role) for o in reg.operators()] == [("bob", Role.ADMIN)]
        with pytest.raises(ProtocolError) as unknown:
            reg.operator("alice")
        assert unknown.value.check == "registry.operator.unknown"


def test_role_order() -> None:
    assert Role.ADMIN.allows(Role.OPERATOR) and Role.ADMIN.allows(Role.VIEWER)
    assert Role.OPERATOR.allows(Role.VIEWER) and Role.OPERATOR.allows(Role.OPERATOR)
    assert not Role.OPERATOR.allows(Role.ADMIN)
    assert not Role.VIEWER.allows(Role.OPERATOR)


def test_stations_crud(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        reg = Registry(s)
        reg.add_station("line-1", cert_fingerprint=fp("line-1"), now=T0)
        with pytest.raises(ProtocolError) as dup:
            reg.add_station("line-1", cert_fingerprint=fp("other"), now=T0)
        assert dup.value.check == "registry.station.exists"
        found = reg.station_by_fingerprint(fp("line-1"))
        assert found is not None and found.name == "line-1"
        assert reg.station("line-1").created_at == T0
        reg.remove_station("line-1")
        assert reg.stations() == []
        with pytest.raises(ProtocolError):
            reg.station("line-1")
