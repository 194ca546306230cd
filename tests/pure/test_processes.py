"""firmware_sim.processes.stop_child: SIGTERM first, SIGKILL for a child that ignores it."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from firmware_sim.processes import stop_child

pytestmark = pytest.mark.pure

IGNORES_TERM = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


def test_a_child_that_obeys_sigterm_ends_by_it() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stop_child(child, 10.0)
    assert child.returncode == -signal.SIGTERM


def test_a_child_that_ignores_sigterm_is_killed_after_the_timeout() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", IGNORES_TERM], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    stop_child(child, 0.5)
    assert child.returncode == -signal.SIGKILL
    child.stdout.close()


def test_the_signal_can_be_chosen_and_an_ended_child_is_left_alone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stop_child(child, 10.0, signal.SIGKILL)
    assert child.returncode == -signal.SIGKILL
    stop_child(child, 10.0)  # already reaped: nothing is signalled, nothing raises
    assert child.returncode == -signal.SIGKILL
