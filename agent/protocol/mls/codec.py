"""CBOR framing helpers of keyfleet's MLS subset: one place that encodes and decodes, and strict
field readers that turn a decoded CBOR value into checked Python values or raise.

Every refusal is a ``ProtocolError``: ``cbor.*`` from the wire decoder (size, malformed or
non-deterministic CBOR), ``mls.decode*`` from the field readers (wrong type, wrong length, a count
over its limit, a point that is not on P-256, an unknown or missing map key).
Nothing is half-parsed: structures are built only from values that passed these readers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol.errors import ProtocolError
from agent.protocol.hpke import N_PK, deserialize_public_key
from agent.protocol.wire import cbor as wire_cbor

T = TypeVar("T")

MAX_LEAVES = 1 << 17
"""Largest group keyfleet decodes: 131,072 members (a tree of depth 17; fleets of 100,000 in
one group)."""

MAX_DEPTH = 18
"""Longest direct path (tree depth) plus one."""

MAX_DEVICE_ID = 255
MAX_SIGNATURE = 80  # DER ECDSA P-256 is at most 72 bytes
MAX_GROUP_ID = 255
_DECODE = "mls.decode"


def encode(value: object) -> bytes:
    """Deterministic CBOR (RFC 8949 §4.2.1) of ``value``: the project's one wire encoder."""
    return wire_cbor.encode(value)


def decode(data: bytes, max_size: int, what: str) -> object:
    """Decode one CBOR item strictly through the project's wire decoder (size limit before
    decoding, deterministic encoding only, bounded nesting); its refusals carry ``cbor.*`` ids."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"{_DECODE}.type", f"{what}: expected bytes")
    return wire_cbor.decode(bytes(data), max_size=max_size)


def fail(what: str, reason: str) -> ProtocolError:
    return ProtocolError(_DECODE, f"{what}: {reason}")


def as_map(
    value: object, what: str, required: AbstractSet[str], optional: AbstractSet[str] = frozenset()
) -> dict[str, object]:
    """A map with exactly the ``required`` keys and some of the ``optional`` ones."""
    if not isinstance(value, Mapping):
        raise fail(what, "expected a map")
    keys = set(value)
    if not all(isinstance(k, str) for k in keys):
        raise fail(what, "map keys must be text")
    missing = required - keys
    unknown = keys - required - optional
    if missing or unknown:
        raise fail(what, f"missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
    return dict(value)


def as_bytes(value: object, what: str, min_len: int, max_len: int) -> bytes:
    if not isinstance(value, bytes):
        raise fail(what, "expected a byte string")
    if not min_len <= len(value) <= max_len:
        raise fail(what, f"length {len(value)} not in [{min_len}, {max_len}]")
    return value


def as_uint(value: object, what: str, max_value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise fail(what, "expected an unsigned integer")
    if not 0 <= value <= max_value:
        raise fail(what, f"{value} not in [0, {max_value}]")
    return value


def as_list(
    value: object, what: str, max_len: int, item: Callable[[object, str], T], min_len: int = 0
) -> list[T]:
    if not isinstance(value, list):
        raise fail(what, "expected an array")
    if not min_len <= len(value) <= max_len:
        raise fail(what, f"{len(value)} items not in [{min_len}, {max_len}]")
    return [item(v, f"{what}[{i}]") for i, v in enumerate(value)]


def as_point(value: object, what: str) -> bytes:
    """A 65-byte uncompressed P-256 point that is on the curve (kept as bytes)."""
    raw = as_bytes(value, what, N_PK, N_PK)
    try:
        public_key(raw)
    except ProtocolError:
        raise fail(what, "not an uncompressed point on P-256") from None
    return raw


@functools.lru_cache(maxsize=16384)
def public_key(raw: bytes) -> ec.EllipticCurvePublicKey:
    """Parse (and cache) a P-256 public key: trees are re-read at every commit, and parsing a
    point costs more than everything else a receiver does per node."""
    return deserialize_public_key(raw)


def expect_exact(value: object, expected: int, what: str, check: str) -> None:
    """A format version or cipher suite field: exactly the integer ``expected`` (``True`` is
    not 1), else ``ProtocolError(check)``."""
    if type(value) is not int or value != expected:
        raise ProtocolError(check, f"{what}: {value!r} unsupported (expected {expected})")
