"""Giving memory back after start-up (agent/heap.py; docs/bench/README.md, "keyagent memory and
start"): which mappings the agent gives back, and that the agent still runs after it has."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.heap import clean_library_ranges

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parents[2]


def _mapping(span: str, perms: str, path: str, rss: int, anonymous: int) -> str:
    return (
        f"{span} {perms} 00000000 08:01 1234                       {path}\n"
        f"Size:                 64 kB\nRss:                 {rss} kB\n"
        f"Private_Clean:         0 kB\nAnonymous:           {anonymous} kB\n"
        "VmFlags: rd mr mw me\n"
    )


def test_only_clean_private_read_only_file_mappings_are_given_back() -> None:
    lib = "/usr/lib/libexample.so.3"
    smaps = (
        _mapping("7f0000000000-7f0000010000", "r--p", lib, 64, 0)  # headers: given back
        + _mapping("7f0000010000-7f0000030000", "r-xp", lib, 120, 0)  # code: given back
        + _mapping("7f0000030000-7f0000034000", "r--p", lib, 16, 16)  # relocated: kept
        + _mapping("7f0000034000-7f0000036000", "rw-p", lib, 8, 0)  # writable data: kept
        + _mapping("7f0000036000-7f0000038000", "r--s", "/dev/shm/x", 8, 0)  # shared: kept
        + _mapping("7f0000040000-7f0000050000", "r-xp", "/usr/lib/untouched.so", 0, 0)  # none
        + _mapping("7f0000050000-7f0000060000", "r--p", "", 64, 0)  # anonymous: kept
        + _mapping("7ffd00000000-7ffd00002000", "r-xp", "[vdso]", 8, 0)  # kernel's: kept
        + _mapping("7f0000060000-7f0000070000", "r-xp", "/opt/a b/lib.so (deleted)", 4, 0)
    )
    assert clean_library_ranges(smaps) == [
        (0x7F0000000000, 0x10000, 64 * 1024),
        (0x7F0000010000, 0x20000, 120 * 1024),
        (0x7F0000060000, 0x10000, 4 * 1024),
    ]
    assert clean_library_ranges("") == []


RUN_AFTER_RELEASE = """
import hashlib, json, ssl, sys
import agent.cli, agent.daemon
from agent import heap
from agent.selftest import run_builtin_selftests, run_builtin_selftests_apart

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

assert run_builtin_selftests_apart() == (True, 0)
heap.release_free_pages()
before = rss()
released = heap.release_library_pages()
after = rss()
# everything the agent runs still runs: the self-test's crypto, TLS set-up, the TPM binding
report = run_builtin_selftests()
ssl.create_default_context().load_default_certs()
import tpm2_pytss
tpm2_pytss.TPM2B_DIGEST(hashlib.sha256(b"x").digest()).marshal()
print(json.dumps({"before": before, "after": after, "released": released, "ok": report.ok,
                  "passed": report.passed}))
"""


def test_the_agent_gives_back_start_up_pages_and_still_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-c", RUN_AFTER_RELEASE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    result = json.loads(done.stdout)
    assert result["released"] > 4 * 2**20, result
    assert result["before"] - result["after"] > 4 * 2**20, result  # VmRSS fell by it
    assert result["ok"] and result["passed"] > 0, result
