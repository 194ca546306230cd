"""Shared pytest setup. Real components (swtpm, Mosquitto) come from the fixture modules below;
every test carries exactly one tier marker (pure, tpm, broker, e2e) so tiers can be selected,
and lives in the folder of its tier (tests/pure, tests/tpm, tests/broker, tests/e2e) or in
tests/reliability."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest
from hypothesis import settings

pytest_plugins = [
    "tests.fixtures.swtpm",
    "tests.fixtures.mosquitto",
    "tests.fixtures.fleet",
    "tests.fixtures.postgres",
    "tests.fixtures.nobody",
    "tests.fixtures.deployment",
    "tests.fixtures.softhsm",
]

TIERS = ("pure", "tpm", "broker", "e2e")

# CI runs the same generated inputs every time (a red run can be replayed exactly) and keeps no
# example database in the clone; developers get fresh random inputs on every run.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test has exactly one tier marker, and its module's folder shows it: tests/<tier>/
    holds the modules whose heaviest test is of that tier (a module's lighter tests stay beside
    its heavier ones; the order is pure < tpm < broker < e2e), tests/reliability/ the fault,
    fuzz and hostile-input runs of any tier."""
    for item in items:
        tiers = [m.name for m in item.iter_markers() if m.name in TIERS]
        if len(tiers) != 1:
            raise pytest.UsageError(
                f"{item.nodeid} needs exactly one tier marker (one of {', '.join(TIERS)})"
            )
        folder = item.path.parent.name
        if folder == "reliability":
            continue
        if folder not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: test modules live in tests/<tier>/")
        if TIERS.index(tiers[0]) > TIERS.index(folder):
            raise pytest.UsageError(f"{item.nodeid} is marked {tiers[0]} but lives in {folder}/")


def _processes_under(directory: str) -> dict[int, str]:
    """Live processes (other than this one) whose command line names a path in ``directory``
    (not a sibling whose name merely starts the same: the suite's two concurrent sessions have
    numbered temporary directories side by side, scripts/run-suite.sh)."""
    directory = directory.rstrip("/") + "/"
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if directory in cmdline:
            found[int(entry.name)] = cmdline.strip()
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Every swtpm, broker, service and agent a test started must be stopped by the end of the
    run: a process still running from the run's temporary directory is a leak. It is reported,
    stopped (so the machine stays clean) and fails the run."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    basetemp = str(factory.getbasetemp())
    deadline = time.monotonic() + 5  # let processes that are shutting down finish
    leaked = _processes_under(basetemp)
    while leaked and time.monotonic() < deadline:
        time.sleep(0.2)
        leaked = _processes_under(basetemp)
    if not leaked:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for pid, cmdline in leaked.items():
        if reporter is not None:
            reporter.write_line(f"LEAKED PROCESS {pid}: {cmdline[:300]}", red=True)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
