"""Stopping the child processes the simulator starts (swtpm, mosquitto, the device agent)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Any


def stop_child(
    process: subprocess.Popen[Any], timeout: float, sig: signal.Signals = signal.SIGTERM
) -> None:
    """Send ``sig`` to ``process`` unless it has already exited and wait up to ``timeout``
    seconds; SIGKILL it if it is still there, and wait again."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)
