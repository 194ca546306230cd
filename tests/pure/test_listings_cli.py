"""The CLI reads back what the service stores: ``keyfleet audit show`` with its filters,
``operator list``, ``station list`` and ``devices`` on a real SQLite file, times in ISO-8601 UTC
for people and Unix seconds in ``--json``; a closed output pipe ends every command quietly; every
command prints its version (tier pure: SQLite is an in-process library)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from provisioning import audit
from provisioning.cli import EXIT_PIPE_CLOSED, main
from provisioning.db.schema import Outcome, Role
from provisioning.listings import human_time, parse_time
from provisioning.registry import KeyState, KeyStateReport, Registry, make_engine, session_factory

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_796_540_774  # 2026-12-06 07:06:14Z


def fp(label: str) -> str:
    return label.encode().hex().ljust(64, "0")[:64]


@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    """A database with five audit entries, two operators, a station and a device with keys."""
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    assert main(["db", "init", "--db", url]) == 0
    engine = make_engine(url)
    sessions = session_factory(engine)
    entries = [
        ("operator:alice", "group.create", "g1", Outcome.ACCEPTED, ""),
        ("device:pi-1", "ack", "g1", Outcome.ACCEPTED, ""),
        ("operator:bob", "group.rekey", "g1", Outcome.REFUSED, "role viewer may not rekey"),
        ("operator:alice", "device.revoke", "pi-2", Outcome.ACCEPTED, ""),
        ("operator:a_b", "group.rekey", "g2", Outcome.ACCEPTED, ""),
    ]
    for i, (actor, action, target, outcome, reason) in enumerate(entries):
        audit.record(
            sessions,
            now=T0 + 60 * i,
            actor=actor,
            action=action,
            target=target,
            outcome=outcome,
            reason=reason,
            details={"n": i},
        )
    with sessions.begin() as session:
        registry = Registry(session)
        registry.add_operator("op-bob", cert_fingerprint=fp("bob"), role=Role.VIEWER, now=T0)
        registry.add_operator("op-alice", cert_fingerprint=fp("alice"), role=Role.ADMIN, now=T0)
        registry.set_operator_role("op-bob", Role.OPERATOR, now=T0 + 3600)
        registry.add_station("line-1", cert_fingerprint=fp("line-1"), now=T0 + 1)
        registry.register_device("pi-1", ek_cert_fingerprint=fp("ek"), devid_cert_pem="P", now=T0)
        registry.record_report(
            "pi-1",
            b"r",
            [
                KeyStateReport("epoch/g1/0", KeyState.PRE_ACTIVATION, T0 + 5, "epoch"),
                KeyStateReport("epoch/g1/0", KeyState.ACTIVE, T0 + 5, "epoch"),
            ],
            now=T0 + 6,
        )
    engine.dispose()
    yield url


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    status = main(list(args))
    return status, capsys.readouterr().out


def table(text: str) -> list[list[str]]:
    """Rows of a human table: columns are apart by two spaces or more, a time has one inside."""
    return [re.split(r"\s{2,}", line) for line in text.splitlines()]


# -- times ------------------------------------------------------------------------------------


def test_times_for_people_and_from_people() -> None:
    assert human_time(T0) == "2026-12-06 07:06:14Z"
    assert human_time(T0, sep="T") == "2026-12-06T07:06:14Z"
    assert human_time(None) == "-"
    now = T0
    assert parse_time(str(T0 - 5), now=now) == T0 - 5
    assert parse_time("90s", now=now) == T0 - 90
    assert parse_time("30m", now=now) == T0 - 1800
    assert parse_time("2h", now=now) == T0 - 7200
    assert parse_time("7d", now=now) == T0 - 7 * 86400
    assert parse_time("1w", now=now) == T0 - 7 * 86400
    assert parse_time("2026-12-06T07:06:14Z", now=now) == T0
    assert parse_time("2026-12-06 07:06:14", now=now) == T0  # no zone: UTC
    assert parse_time("2026-12-06T08:06:14+01:00", now=now) == T0
    assert parse_time("2026-12-06", now=now) == T0 - (7 * 3600 + 6 * 60 + 14)
    for bad in ("yesterday", "2h ago", "-5", "", "12x"):
        with pytest.raises(ValueError, match="is not a time"):
            parse_time(bad, now=now)


# -- audit show -------------------------------------------------------------------------------


def test_audit_show_prints_every_entry_oldest_first_with_human_times(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out = run(capsys, "audit", "show", "--db", url)
    assert status == 0
    rows = table(out)
    assert rows[0] == ["SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "OUTCOME", "REASON", "DETAILS"]
    assert rows[1] == [
        "1",
        "2026-12-06 07:06:14Z",
        "operator:alice",
        "group.create",
        "g1",
        "accepted",
        "-",
        '{"n":0}',
    ]
    assert rows[3][6] == "role viewer may not rekey"
    assert [r[0] for r in rows[1:]] == ["1", "2", "3", "4", "5"]
    assert str(T0) not in out  # no raw Unix seconds for people


@pytest.mark.parametrize(
    ("filters", "seqs"),
    [
        (["--actor", "operator:alice"], [1, 4]),
        (["--actor", "operator:*"], [1, 3, 4, 5]),
        (["--actor", "operator:a_*"], [5]),  # LIKE's _ is a plain character here
        (["--action", "group.rekey"], [3, 5]),
        (["--action", "group.*"], [1, 3, 5]),
        (["--target", "g1"], [1, 2, 3]),
        (["--outcome", "refused"], [3]),
        (["--since", str(T0 + 120)], [3, 4, 5]),
        (["--until", "2026-12-06T07:08:14Z"], [1, 2, 3]),
        (["--since", "2026-12-06 07:07:14Z", "--until", str(T0 + 180)], [2, 3, 4]),
        (["--limit", "2"], [4, 5]),
        (["--actor", "operator:*", "--limit", "3"], [3, 4, 5]),
        (["--action", "group.*", "--target", "g1", "--outcome", "accepted"], [1]),
        (["--actor", "nobody"], []),
    ],
)
def test_audit_show_filters_combine(
    url: str, capsys: pytest.CaptureFixture[str], filters: list[str], seqs: list[int]
) -> None:
    status, out = run(capsys, "audit", "show", "--db", url, "--json", *filters)
    assert status == 0
    assert [entry["seq"] for entry in json.loads(out)] == seqs


def test_audit_show_json_keeps_unix_seconds_and_the_chain_hashes(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out = run(capsys, "audit", "show", "--db", url, "--json", "--limit", "1")
    assert status == 0
    (entry,) = json.loads(out)
    engine = make_engine(url)
    try:
        with session_factory(engine)() as session:
            stored = audit.entries(session, from_seq=5)[0]
    finally:
        engine.dispose()
    assert entry == {
        "seq": 5,
        "time": T0 + 240,
        "actor": "operator:a_b",
        "action": "group.rekey",
        "target": "g2",
        "outcome": "accepted",
        "reason": "",
        "details": {"n": 4},
        "prev_hash": stored.prev_hash.hex(),
        "entry_hash": stored.entry_hash.hex(),
    }


def test_audit_show_refuses_bad_filters_clearly(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for bad in (["--since", "yesterday"], ["--limit", "0"], ["--outcome", "maybe"]):
        with pytest.raises(SystemExit) as usage:
            main(["audit", "show", "--db", url, *bad])
        assert usage.value.code == 2
        assert bad[0] in capsys.readouterr().err
    status = main(["audit", "show", "--db", url, "--since", "1h", "--until", "2h"])
    assert status == 2
    assert "--since is later than --until" in capsys.readouterr().err


def test_audit_show_refuses_to_invent_a_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "none.db"
    assert main(["audit", "show", "--db", f"sqlite:///{missing}"]) == 2
    assert "no database file" in capsys.readouterr().err
    assert not missing.exists()


# -- registry listings ------------------------------------------------------------------------


def test_operator_list(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out = run(capsys, "operator", "list", "--db", url)
    assert status == 0
    assert table(out) == [
        ["NAME", "STATE", "ROLE", "CERT_FINGERPRINT", "APPROVED_BY", "CREATED_AT", "UPDATED_AT"],
        [
            "op-alice",
            "active",
            "admin",
            fp("alice")[:16] + "…",
            "bootstrap",
            "2026-12-06 07:06:14Z",
            "2026-12-06 07:06:14Z",
        ],
        [
            "op-bob",
            "active",
            "operator",
            fp("bob")[:16] + "…",
            "bootstrap",
            "2026-12-06 07:06:14Z",
            "2026-12-06 08:06:14Z",
        ],
    ]
    status, out = run(capsys, "operator", "list", "--db", url, "--json")
    assert status == 0
    assert json.loads(out)[1] == {
        "name": "op-bob",
        "state": "active",
        "role": "operator",
        "cert_fingerprint": fp("bob"),
        "approved_by": "bootstrap",
        "removed_by": None,
        "created_at": T0,
        "updated_at": T0 + 3600,
    }


def test_station_list(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out = run(capsys, "station", "list", "--db", url)
    assert status == 0
    assert table(out) == [
        ["NAME", "CERT_FINGERPRINT", "CREATED_AT"],
        ["line-1", fp("line-1")[:16] + "…", "2026-12-06 07:06:15Z"],
    ]
    status, out = run(capsys, "station", "list", "--db", url, "--json")
    assert json.loads(out) == [
        {"name": "line-1", "cert_fingerprint": fp("line-1"), "created_at": T0 + 1}
    ]


def test_devices_print_last_seen_for_people_and_raw_in_json(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out = run(capsys, "devices", "--db", url)
    assert status == 0
    header, row = table(out)
    assert header[:4] == ["DEVICE_ID", "STATE", "ATTESTATION", "LAST_SEEN"]
    assert row[:4] == ["pi-1", "registered", "-", "2026-12-06 07:06:20Z"]
    status, out = run(capsys, "devices", "--db", url, "--json")
    assert json.loads(out)[0]["last_seen"] == T0 + 6
    status, out = run(capsys, "devices", "--keys", "--db", url)
    assert table(out)[1] == [
        "pi-1",
        "epoch/g1/0",
        "epoch",
        "active",
        "2026-12-06 07:06:19Z",
        "pre-activation@2026-12-06T07:06:19Z active@2026-12-06T07:06:19Z",
    ]


# -- pipes and versions -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["audit", "show"],
        ["audit", "verify"],
        ["devices", "--keys"],
        ["groups"],
        ["operator", "list", "--json"],
        ["db", "status"],
    ],
)
def test_a_closed_output_pipe_ends_the_command_quietly(url: str, command: list[str]) -> None:
    """``keyfleet audit verify | head -1`` without a BrokenPipeError traceback: the reader is
    gone before the command writes (its end of the pipe closed first), as with ``head``."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "provisioning.cli", *command, "--db", url],
            cwd=ROOT,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert done.stderr == ""
    assert done.returncode == EXIT_PIPE_CLOSED == 141


@pytest.mark.parametrize(
    ("module", "prog"),
    [
        ("provisioning.cli", "keyfleet"),
        ("agent.cli", "keyagent"),
        ("provisioning.station", "keyprovision"),
        ("firmware_sim.cli", "firmware-sim"),
    ],
)
def test_every_command_prints_the_installed_version(module: str, prog: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{prog} {metadata.version('keyfleet')}\n"
