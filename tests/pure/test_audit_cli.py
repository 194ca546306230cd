"""``keyfleet db init`` and ``keyfleet audit verify`` run as real subprocesses on a real SQLite
file (tier pure: SQLite is an in-process library)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from sqlalchemy import text

from provisioning import audit
from provisioning.registry import Outcome, make_engine, session_factory
from tests.service_deployment import keyfleet

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parents[2]


def init_db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    done = keyfleet("db", "init", "--db", url, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"database ready: {url}\n"
    return url


def add_entries(url: str, n: int) -> list[audit.AuditRecord]:
    engine = make_engine(url)
    sessions = session_factory(engine)
    try:
        return [
            audit.record(
                sessions,
                now=1_700_000_000 + i,
                actor="operator:alice",
                action="group.rekey",
                target="g1",
                outcome=Outcome.ACCEPTED,
            )
            for i in range(n)
        ]
    finally:
        engine.dispose()


def test_console_script_is_declared() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["keyfleet"] == "provisioning.cli:main"


def test_only_real_subcommands_exist(tmp_path: Path) -> None:
    helped = keyfleet("--help", cwd=tmp_path)
    assert helped.returncode == 0
    # The service commands arrived with the delivery service (issue 4).
    for command in ("serve", "rekey", "revoke", "group", "devices", "groups", "operator"):
        assert command in helped.stdout.split()
    refused = keyfleet("frobnicate", cwd=tmp_path)
    assert refused.returncode == 2
    assert "invalid choice" in refused.stderr


def test_init_then_verify_ok(tmp_path: Path) -> None:
    url = init_db(tmp_path)
    assert init_db(tmp_path) == url  # idempotent
    empty = keyfleet("audit", "verify", "--db", url, cwd=tmp_path)
    assert (empty.returncode, empty.stdout.splitlines()[0]) == (0, "audit chain OK: 0 entries")
    written = add_entries(url, 7)
    ok = keyfleet("audit", "verify", "--db", url, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == [
        "audit chain OK: 7 entries",
        f"head: 7:{written[-1].entry_hash.hex()}",
    ]


def test_verify_names_the_edited_and_the_deleted_entry(tmp_path: Path) -> None:
    url = init_db(tmp_path)
    add_entries(url, 6)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE audit_log SET target = 'g2' WHERE seq = 5"))
    edited = keyfleet("audit", "verify", "--db", url, cwd=tmp_path)
    assert edited.returncode == 1
    assert edited.stdout.startswith("audit chain BROKEN at entry 5: hash mismatch: ")
    assert "entries 1..4 verified" in edited.stdout
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_log WHERE seq = 2"))
    engine.dispose()
    gap = keyfleet("audit", "verify", "--db", url, cwd=tmp_path)
    assert gap.returncode == 1
    assert gap.stdout.startswith(
        "audit chain BROKEN at entry 2: gap: entry 2 is missing: entry 1 is followed by 3"
    )


def test_anchor_catches_a_cut_end(tmp_path: Path) -> None:
    url = init_db(tmp_path)
    written = add_entries(url, 4)
    head = f"4:{written[-1].entry_hash.hex()}"
    assert keyfleet("audit", "verify", "--db", url, "--anchor", head, cwd=tmp_path).returncode == 0
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_log WHERE seq = 4"))
        conn.execute(
            text("UPDATE audit_head SET seq = 3, entry_hash = :h"), {"h": written[2].entry_hash}
        )
    engine.dispose()
    assert keyfleet("audit", "verify", "--db", url, cwd=tmp_path).returncode == 0
    cut = keyfleet("audit", "verify", "--db", url, "--anchor", head, cwd=tmp_path)
    assert cut.returncode == 1
    assert cut.stdout.startswith("audit chain BROKEN at entry 4: anchor mismatch: ")
    bad = keyfleet("audit", "verify", "--db", url, "--anchor", "4:xyz", cwd=tmp_path)
    assert bad.returncode == 2 and "is not SEQ:HASH" in bad.stderr


def test_verify_through_the_service_config(tmp_path: Path) -> None:
    for name in ("ca.pem", "svc.pem", "dev-ca.pem", "op-ca.pem", "mfr.pem", "golden.toml"):
        (tmp_path / name).write_text("x\n")
    for name in ("svc.key", "dev-ca.key"):
        (tmp_path / name).write_text("x\n")
        (tmp_path / name).chmod(0o600)
    config = tmp_path / "keyfleet.toml"
    config.write_text(
        '[database]\nurl = "sqlite:///fleet.db"\n'
        '[broker]\nhost = "localhost"\nca = "ca.pem"\nclient_cert = "svc.pem"\n'
        'client_key = "svc.key"\n'
        '[device_ca]\ncert = "dev-ca.pem"\nkey = "dev-ca.key"\n'
        '[operator_ca]\ncert = "op-ca.pem"\n'
        '[attestation]\nmanufacturer_cas = "mfr.pem"\ngolden_measurements = "golden.toml"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()  # relative paths follow the config file, not the working directory
    init = keyfleet("db", "init", "--config", str(config), cwd=elsewhere)
    assert init.returncode == 0, init.stderr
    assert (tmp_path / "fleet.db").is_file()
    add_entries(f"sqlite:///{tmp_path / 'fleet.db'}", 2)
    ok = keyfleet("audit", "verify", "--config", str(config), cwd=elsewhere)
    assert (ok.returncode, ok.stdout.splitlines()[0]) == (0, "audit chain OK: 2 entries")
    (tmp_path / "svc.key").chmod(0o644)
    bad = keyfleet("audit", "verify", "--config", str(config), cwd=elsewhere)
    assert bad.returncode == 2
    assert 'broker.client_key: got "svc.key" (string), expected a private key file' in bad.stderr


def test_verify_refuses_to_invent_a_database(tmp_path: Path) -> None:
    absent = tmp_path / "absent.db"
    missing = keyfleet("audit", "verify", "--db", f"sqlite:///{absent}", cwd=tmp_path)
    assert missing.returncode == 2
    assert f"no database file at {absent}" in missing.stderr
    assert not absent.exists()
    make_engine(f"sqlite:///{tmp_path / 'other.db'}").dispose()
    (tmp_path / "other.db").touch()
    bare = keyfleet("audit", "verify", "--db", f"sqlite:///{tmp_path / 'other.db'}", cwd=tmp_path)
    assert bare.returncode == 2
    assert "has no keyfleet schema" in bare.stderr and "keyfleet db init" in bare.stderr
    usage = keyfleet("audit", "verify", cwd=tmp_path)
    assert usage.returncode == 2 and "--config" in usage.stderr
