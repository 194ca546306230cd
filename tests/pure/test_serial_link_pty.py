"""The serial link over real pseudo-terminals (os.openpty, raw mode) with pyserial on the
station's side: line noise in both directions, bit flips, half frames and a device that goes
silent and comes back never wedge either end."""

from __future__ import annotations

import os
import random
import select
import threading
import tty
from collections.abc import Iterator
from typing import Any

import pytest

from agent.protocol.errors import TransportError
from agent.serial_link import DeviceLink, SerialClient, encode_frame

pytestmark = pytest.mark.pure


class PtyDevice:
    """A DeviceLink served on the master side of a pty by a thread. ``corrupt`` is the chance
    that a chunk crossing the line (either way) gets a flipped bit; ``garbage`` the chance that
    random bytes are added to it. ``mute`` makes the device read and drop everything."""

    def __init__(self, *, corrupt: float = 0.0, garbage: float = 0.0, seed: int = 1) -> None:
        self.calls = 0
        self.link = DeviceLink(self._handle)
        self.corrupt = corrupt
        self.garbage = garbage
        self.mute = False
        self._random = random.Random(seed)
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _handle(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        return {"n": self.calls, "echo": args.get("blob", b"")}

    def _noisy(self, data: bytes) -> bytes:
        out = bytearray(data)
        if out and self._random.random() < self.corrupt:
            out[self._random.randrange(len(out))] ^= 1 << self._random.randrange(8)
        if self._random.random() < self.garbage:
            noise = self._random.randbytes(self._random.randrange(1, 40))
            at = self._random.randrange(len(out) + 1)
            out[at:at] = noise
        return bytes(out)

    def _serve(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.02)
            if not ready:
                continue
            try:
                data = os.read(self.master, 4096)
            except OSError:
                return
            if self.mute:
                continue
            out = self.link.receive(self._noisy(data))
            if out:
                os.write(self.master, self._noisy(out))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def noisy() -> Iterator[PtyDevice]:
    device = PtyDevice(corrupt=0.15, garbage=0.15, seed=7)
    yield device
    device.close()


def test_clean_line_round_trip_with_large_payload() -> None:
    device = PtyDevice()
    client = SerialClient.open(device.path, timeout=2.0, retries=0)
    try:
        blob = os.urandom(20_000)
        assert client.call("echo", {"blob": blob}) == {"n": 1, "echo": blob}
    finally:
        client.close()
        device.close()


def test_every_call_completes_over_a_noisy_line(noisy: PtyDevice) -> None:
    client = SerialClient.open(noisy.path, timeout=0.15, retries=30)
    try:
        for i in range(30):
            blob = os.urandom(64)
            result = client.call("echo", {"blob": blob})
            assert result["echo"] == blob
            assert result["n"] <= i + 1 + noisy.link.replayed  # never ran ahead
        # retries happened and were answered from the cache, not executed again
        assert noisy.calls == 30
        assert client.attempts > 30
        dropped = sum(noisy.link.errors.values()) + sum(client.errors.values())
        assert dropped > 0
    finally:
        client.close()


def test_station_garbage_and_half_frames_do_not_wedge_the_device() -> None:
    device = PtyDevice()
    client = SerialClient.open(device.path, timeout=1.0, retries=0)
    try:
        half = encode_frame(b"\xa0" * 50)[:20]
        client.port.write(b"\xff\xfe\x00\x01garbage" + half)
        client.port.write(os.urandom(5000).replace(b"\x00", b""))  # no delimiter at all
        assert client.call("echo", {"blob": b"after"})["echo"] == b"after"
        assert device.calls == 1
    finally:
        client.close()
        device.close()


def test_silent_device_times_out_then_recovers() -> None:
    device = PtyDevice()
    device.mute = True
    client = SerialClient.open(device.path, timeout=0.1, retries=1)
    try:
        with pytest.raises(TransportError, match=r"serial\.timeout"):
            client.call("echo", {"blob": b"x"})
        device.mute = False
        assert client.call("echo", {"blob": b"y"})["echo"] == b"y"
    finally:
        client.close()
        device.close()
