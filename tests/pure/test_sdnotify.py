from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from agent.sdnotify import Notifier

pytestmark = pytest.mark.pure


def test_messages_reach_a_notify_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(2)
        notifier = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "4000000"})
        assert notifier.enabled
        assert notifier.ping_period() == 2.0
        notifier.ready("3 groups")
        notifier.watchdog()
        notifier.status("rekeying")
        assert server.recv(256) == b"READY=1\nSTATUS=3 groups"
        assert server.recv(256) == b"WATCHDOG=1"
        assert server.recv(256) == b"STATUS=rekeying"


def test_abstract_socket_and_foreign_watchdog_pid() -> None:
    name = f"keyfleet-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(2)
        notifier = Notifier(
            {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}
        )
        assert notifier.watchdog_interval is None
        notifier.ready()
        assert server.recv(64) == b"READY=1"


def test_outside_systemd_everything_is_a_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready()
    notifier.watchdog()
    assert notifier.ping_period() is None
