"""firmware_sim.ports: listener ports come from below the kernel's ephemeral range, so no
outgoing connection can take them between the pick and the bind, and no client can connect to
itself on a stopped listener's port."""

from __future__ import annotations

import socket

import pytest

from firmware_sim.ports import HOST, ephemeral_range, free_port

pytestmark = pytest.mark.pure


def test_ports_are_below_the_ephemeral_range_and_bindable() -> None:
    low, high = ephemeral_range()
    assert 1024 <= low <= high <= 65535
    for count in (1, 2, 3):
        port = free_port(count)
        assert port + count - 1 < low, (port, count, low)
        sockets = [socket.socket() for _ in range(count)]
        try:
            for offset, sock in enumerate(sockets):
                sock.bind((HOST, port + offset))
        finally:
            for sock in sockets:
                sock.close()


def test_a_port_in_use_is_not_handed_out() -> None:
    taken = []
    try:
        for _ in range(50):
            port = free_port()
            sock = socket.socket()
            sock.bind((HOST, port))
            sock.listen()
            taken.append(sock)
        ports = [s.getsockname()[1] for s in taken]
        assert len(set(ports)) == len(ports)
    finally:
        for sock in taken:
            sock.close()
