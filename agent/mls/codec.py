"""CBOR framing helpers of keyfleet's MLS subset: one place that encodes and decodes, and strict
field readers that turn a decoded CBOR value into checked Python values or raise.

Every refusal is a ``ProtocolError`` whose check id starts with ``mls.decode``: wrong type, wrong
length, a count over its limit, a point that is not on P-256, an unknown or missing map key.
Nothing is half-parsed: structures are built only from values that passed these readers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from typing import TypeVar

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import ProtocolError
from agent.hpke import N_PK, deserialize_public_key

T = TypeVar("T")

MAX_LEAVES = 1 << 16
"""Largest group keyfleet decodes: 65,536 members (a tree of depth 16)."""

MAX_DEPTH = 17
"""Longest direct path (tree depth) plus one."""

MAX_DEVICE_ID = 255
MAX_SIGNATURE = 80  # DER ECDSA P-256 is at most 72 bytes
MAX_GROUP_ID = 255
_DECODE = "mls.decode"


def encode(value: object) -> bytes:
    """Deterministic CBOR of ``value`` (maps keyed by text or by non-negative ints only, so
    length-first and bytewise key order agree)."""
    return bytes(cbor2.dumps(value, canonical=True))


def decode(data: bytes, max_size: int, what: str) -> object:
    """Decode one CBOR item strictly: size limit first, then only the deterministic encoding is
    accepted (decode, re-encode, compare), so every accepted message has one encoding."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"{_DECODE}.type", f"{what}: expected bytes")
    data = bytes(data)
    if len(data) > max_size:
        raise ProtocolError(f"{_DECODE}.size", f"{what}: {len(data)} bytes > limit {max_size}")
    try:
        value = cbor2.loads(data, max_depth=24, allow_indefinite=False, allow_duplicate_keys=False)
        canonical = encode(value)
    except Exception:  # cbor2 raises several families; all mean "malformed" here
        raise ProtocolError(f"{_DECODE}.cbor", f"{what}: not well-formed CBOR") from None
    if canonical != data:
        raise ProtocolError(f"{_DECODE}.noncanonical", f"{what}: not deterministic CBOR")
    return value


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
