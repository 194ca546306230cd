"""``make demo``'s core, end to end in CI: the demo program as a subprocess, every part real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def test_demo_runs_green_and_leaves_nothing_behind(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "firmware_sim.demo", "--json", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout)
    devices = summary["devices"]
    assert len(devices) == 5
    states = sorted(row["state"] for row in devices.values())
    assert states == ["active", "active", "active", "quarantined", "revoked"]
    quarantined = next(row for row in devices.values() if row["state"] == "quarantined")
    assert quarantined["attestation"] == "untrusted"
    assert all(row["enrollment_s"] < 1.5 for row in devices.values())
    # create adds 4 members one commit each, then rekey, revoke, quarantine: 7 epochs; and each
    # joiner's first self-update, unless its first commit was one it was asked for anyway (the
    # rekey, a removal): docs/treekem.md "Joining"
    assert 7 <= summary["final_epoch"] <= 7 + 4
    assert summary["leftover_processes"] == []
    assert [step["step"].split()[0] for step in summary["steps"]][:3] == [
        "broker,",
        "attestation",
        "keyfleet",
    ]
    assert _processes_mentioning(str(workdir)) == []
