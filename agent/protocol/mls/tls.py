"""The small part of TLS presentation language (RFC 8446 §3, RFC 9420 §2.1.2) that MLS needs:
fixed-width big-endian integers and ``opaque x<V>`` vectors with QUIC-style varint lengths.

Encoders are plain functions; ``Reader`` decodes strictly: truncated input, the invalid ``11``
varint prefix, non-minimal varints and trailing bytes all raise ``ProtocolError("tls.decode")``,
and nothing is half-parsed into a caller's state because the caller only gets values after each
read succeeds.
"""

from __future__ import annotations

from agent.protocol.errors import ProtocolError

VARINT_MAX = (1 << 30) - 1

_CHECK = "tls.decode"


def uint8(value: int) -> bytes:
    return _uint(value, 1)


def uint16(value: int) -> bytes:
    return _uint(value, 2)


def uint32(value: int) -> bytes:
    return _uint(value, 4)


def uint64(value: int) -> bytes:
    return _uint(value, 8)


def _uint(value: int, width: int) -> bytes:
    if not 0 <= value < 1 << (8 * width):
        raise ValueError(f"{value} does not fit in uint{8 * width}")
    return value.to_bytes(width, "big")


def varint(value: int) -> bytes:
    """RFC 9420 §2.1.2: the shortest of the 1-, 2- or 4-byte forms (6, 14 or 30 bits)."""
    if value < 0:
        raise ValueError("varint cannot encode a negative number")
    if value < 1 << 6:
        return value.to_bytes(1, "big")
    if value < 1 << 14:
        return (value | 0x4000).to_bytes(2, "big")
    if value <= VARINT_MAX:
        return (value | 0x8000_0000).to_bytes(4, "big")
    raise ValueError(f"{value} does not fit in an MLS varint (30 bits)")


def opaque_v(data: bytes) -> bytes:
    """``opaque data<V>``: varint length, then the bytes."""
    return varint(len(data)) + data


class Reader:
    """A strict cursor over one encoded value. Call ``finish()`` to refuse trailing bytes."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def _take(self, n: int) -> bytes:
        if n > self.remaining:
            raise ProtocolError(
                _CHECK, f"truncated: need {n} bytes at offset {self._pos}, have {self.remaining}"
            )
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def uint8(self) -> int:
        return self._take(1)[0]

    def uint16(self) -> int:
        return int.from_bytes(self._take(2), "big")

    def uint32(self) -> int:
        return int.from_bytes(self._take(4), "big")

    def uint64(self) -> int:
        return int.from_bytes(self._take(8), "big")

    def varint(self) -> int:
        start = self._pos
        first = self._take(1)[0]
        prefix = first >> 6
        if prefix == 0b11:
            raise ProtocolError(_CHECK, f"invalid varint prefix 0b11 at offset {start}")
        width = 1 << prefix
        value = int.from_bytes(bytes([first & 0x3F]) + self._take(width - 1), "big")
        if len(varint(value)) != width:
            raise ProtocolError(_CHECK, f"non-minimal varint at offset {start}")
        return value

    def opaque_v(self) -> bytes:
        return self._take(self.varint())

    def finish(self) -> None:
        if self.remaining:
            raise ProtocolError(_CHECK, f"{self.remaining} trailing bytes")
