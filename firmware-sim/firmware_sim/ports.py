"""Free loopback ports for the processes the simulator and the tests start.

A port is picked below the kernel's ephemeral range (``net.ipv4.ip_local_port_range``), not by
binding port 0, which hands out a port from inside that range. Two reasons, both seen as rare
test failures on busy machines:

- between picking a port and the broker (or swtpm, PostgreSQL, ...) binding it, any outgoing
  connection of the same machine may be given that very port as its local end;
- a client connecting to a stopped listener's port can be given that port as its own local
  port and "connect" to itself (TCP simultaneous open); TLS then fails mid-handshake, and the
  socket paho opened for it is only closed by the garbage collector.

Ports outside the ephemeral range are never handed out to outgoing connections.
"""

from __future__ import annotations

import contextlib
import random
import socket
from pathlib import Path

from agent.protocol.errors import StateError

HOST = "127.0.0.1"
_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_DEFAULT_EPHEMERAL = (32768, 60999)
_LOWEST = 10000  # below: well-known and registered services people run on developer machines
_TRIES = 200


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range of local ports for outgoing connections (Linux default if unknown)."""
    try:
        low, high = (int(part) for part in _RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return _DEFAULT_EPHEMERAL
    return low, high


def free_port(count: int = 1) -> int:
    """A port P such that P .. P + count - 1 were free on the loopback a moment ago, below the
    ephemeral range where it has room (else from the kernel, inside it). Racy by nature against
    other programs binding ports: starters retry or fail loudly if they cannot bind."""
    low, _ = ephemeral_range()
    rng = random.SystemRandom()  # not the (possibly seeded) global generator of a test
    if low - count > _LOWEST:
        for _ in range(_TRIES):
            port = rng.randrange(_LOWEST, low - count + 1)
            if _all_free(port, count):
                return port
    for _ in range(_TRIES):
        with socket.socket() as first:
            first.bind((HOST, 0))
            port = int(first.getsockname()[1])
        if port + count - 1 <= 65535 and _all_free(port, count):
            return port
    raise StateError(f"no {count} free consecutive loopback port(s)")


def _all_free(port: int, count: int) -> bool:
    with contextlib.ExitStack() as stack:
        for candidate in range(port, port + count):
            sock = stack.enter_context(socket.socket())
            try:
                sock.bind((HOST, candidate))
            except OSError:
                return False
    return True
