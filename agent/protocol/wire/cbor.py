"""Deterministic CBOR (RFC 8949 §4.2.1) and a strict decoder for the wire protocol.

The wire data model is deliberately small: unsigned and negative integers (64-bit CBOR range),
byte strings, text strings, arrays, maps keyed by integers or text, ``true``/``false``/``null``.
No floats, no tags, no indefinite lengths, no undefined or other simple values.

Encoding: map keys are sorted bytewise by their encoded form ("core deterministic encoding",
RFC 8949 §4.2.1). cbor2 6.x's ``canonical=True`` sorts keys length-first (the RFC 7049 §3.9 rule,
RFC 8949 §4.2.3), which differs when one map mixes negative and positive integer keys or integer
and text keys; so we sort ourselves and let cbor2 encode with ``canonical=False`` (it keeps dict
order, and always writes integers and lengths in their shortest form).

Decoding runs in three steps, each able to refuse:

1. the size limit, before anything reads the bytes;
2. a structural scan of the item heads (no values built; one call per container, so no deeper
   than the nesting limit) that enforces the data model, the nesting limit, exact consumption of
   the input, and that every announced length fits in the bytes that are actually there (so a
   head claiming 2**64 bytes costs nothing);
3. cbor2 builds the Python value (refusing duplicate keys), and anything that is not byte-for-byte
   the deterministic encoding is refused, so every accepted message has exactly one encoding and
   its digest identifies it. The scan of step 2 notes that while it reads the heads: every
   integer and length in its shortest form, every map's keys in strictly ascending bytewise
   order of their encodings. Given the data model, that is exactly "re-encoding the value gives
   the same bytes" (test_wire_cbor checks the two agree), without building the encoding again;
   it is refused after step 3, so a structural or duplicate-key problem keeps its own check id.

Every refusal is a :class:`agent.protocol.errors.ProtocolError` with a ``cbor.*`` check id.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import cbor2

from agent.protocol.errors import ProtocolError

DEFAULT_MAX_SIZE = 256 * 1024
"""Default size limit for one decoded item (bytes)."""

MAX_DEPTH = 16
"""Deepest nesting of arrays/maps accepted (the top-level container counts as 1)."""

_UINT_MAX = (1 << 64) - 1
_NINT_MIN = -(1 << 64)

_MAJOR_UINT, _MAJOR_NINT, _MAJOR_BYTES, _MAJOR_TEXT = 0, 1, 2, 3
_MAJOR_ARRAY, _MAJOR_MAP, _MAJOR_TAG, _MAJOR_SIMPLE = 4, 5, 6, 7
_SIMPLE_FALSE, _SIMPLE_TRUE, _SIMPLE_NULL = 20, 21, 22
_AI_INDEFINITE = 31


def encode(value: object) -> bytes:
    """Deterministic CBOR of ``value`` (RFC 8949 §4.2.1).

    Accepts exactly the wire data model: ``int`` (64-bit CBOR range), ``bytes``, ``str``,
    ``bool``, ``None``, ``list``/``tuple``, and ``Mapping`` with ``int`` or ``str`` keys. Anything
    else raises ``ProtocolError("cbor.type")`` rather than being silently converted (a float or a
    datetime in a message is a bug in the caller, and cbor2 would happily encode it with a tag).
    """
    if type(value) is list and all(type(item) in _FLAT for item in value):
        # an array of strings only (a COSE Sig_structure, a message id's input): no map to
        # order and no integer to range-check, so cbor2's encoding of it is the deterministic one
        prepared: object = value
    else:
        prepared = _prepare(value, 0)
    try:
        return bytes(cbor2.dumps(prepared))
    except Exception as exc:  # cbor2 refusing an already-checked value would be a surprise
        raise ProtocolError(
            "cbor.encode", f"cbor2 refused the value: {type(exc).__name__}"
        ) from None


_FLAT = frozenset({bytes, str})


def _prepare(value: object, depth: int) -> object:
    """Check ``value`` against the data model and return it with maps in deterministic order."""
    if value is None or type(value) is bool:
        return value
    if type(value) is int:
        if not _NINT_MIN <= value <= _UINT_MAX:
            raise ProtocolError("cbor.type", "integer outside the 64-bit CBOR range")
        return value
    if type(value) is bytes:
        return value
    if type(value) is str:
        return value
    if isinstance(value, list | tuple):
        if depth >= MAX_DEPTH:
            raise ProtocolError("cbor.depth", f"nesting deeper than {MAX_DEPTH}")
        return [_prepare(item, depth + 1) for item in value]
    if isinstance(value, Mapping):
        if depth >= MAX_DEPTH:
            raise ProtocolError("cbor.depth", f"nesting deeper than {MAX_DEPTH}")
        entries: list[tuple[bytes, object, object]] = []
        for key, item in value.items():
            if type(key) not in (int, str):
                raise ProtocolError("cbor.key-type", "map keys must be integers or text")
            entries.append((_encode_key(key), key, _prepare(item, depth + 1)))
        entries.sort(key=lambda entry: entry[0])
        return {key: item for _, key, item in entries}
    raise ProtocolError("cbor.type", f"{type(value).__name__} is not in the wire data model")


def _encode_key(key: object) -> bytes:
    if type(key) is int and not _NINT_MIN <= key <= _UINT_MAX:
        raise ProtocolError("cbor.type", "integer key outside the 64-bit CBOR range")
    if type(key) is str and len(key) > _MEMO_KEY_LENGTH:
        return bytes(cbor2.dumps(key))
    return _key_bytes(key)


_MEMO_KEY_LENGTH = 64
"""Longest text key whose encoding is remembered: the memo stays small whatever a peer sends."""


@functools.lru_cache(maxsize=4096, typed=True)
def _key_bytes(key: object) -> bytes:
    """A map key's encoding: the same few keys recur in every message (a bounded memo of short
    keys: at most 4,096 of at most 64 characters)."""
    return bytes(cbor2.dumps(key))


def decode(data: bytes, *, max_size: int = DEFAULT_MAX_SIZE, max_depth: int = MAX_DEPTH) -> object:
    """Strictly decode one deterministic CBOR item that fills ``data`` exactly.

    Returns ``int``, ``bytes``, ``str``, ``bool``, ``None``, ``list`` or ``dict`` (nested).
    """
    if type(data) is not bytes:
        raise ProtocolError("cbor.type", "input must be bytes")
    if len(data) > max_size:
        raise ProtocolError("cbor.size", f"{len(data)} bytes exceed the limit of {max_size}")
    canonical = _scan(data, max_depth)
    try:
        value = cbor2.loads(
            data,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            str_errors="strict",
            max_depth=max_depth + 2,
        )
    except Exception as exc:
        # After the scan only semantic problems remain (duplicate keys); any exception type
        # cbor2 raises on hostile input becomes one check id.
        raise ProtocolError("cbor.malformed", f"cbor2: {type(exc).__name__}") from None
    if not canonical:
        raise ProtocolError("cbor.noncanonical", "not the deterministic encoding of its value")
    return value


def scan(data: bytes, *, max_depth: int = MAX_DEPTH) -> None:
    """Walk the item heads of ``data`` without building values; raise on anything outside the
    wire data model. Public so that tests can prove it runs before cbor2 does."""
    _scan(data, max_depth)


# the smallest argument each long head form may carry (shorter forms hold anything below)
_SHORTEST = {24: 24, 25: 0x100, 26: 0x10000, 27: 0x100000000}


def _scan(data: bytes, max_depth: int) -> bool:
    """``scan``, returning whether ``data`` is in the deterministic encoding: every head in its
    shortest form and every map's keys in strictly ascending bytewise order."""
    end = len(data)
    pos, canonical = _items(data, 0, end, 1, is_map=False, depth=0, max_depth=max_depth)
    if pos != end:
        raise ProtocolError("cbor.trailing", f"{end - pos} bytes after the item")
    return canonical


def _items(
    data: bytes, pos: int, end: int, count: int, *, is_map: bool, depth: int, max_depth: int
) -> tuple[int, bool]:
    """Scan ``count`` items from ``pos`` (a map's keys and values, alternating, if ``is_map``)
    inside ``depth`` enclosing containers: (where they end, whether they are deterministic).

    It runs over every head of every message, so the commonest heads (small integers, short
    text) take a short way; every other head, and every refusal, goes through :func:`_head`.
    Either way the heads are read in order and the first problem is the one refused, with the
    checks of one head in a fixed order, so the check id depends only on the input."""
    canonical = True
    key = is_map  # the next item is a map key
    previous = b""  # the previous key's encoding (every encoding is longer than this)
    for _ in range(count):
        if pos >= end:
            raise ProtocolError("cbor.truncated", "input ends inside an item")
        start = pos
        initial = data[pos]
        pos += 1
        if initial < 0x18 or 0x20 <= initial < 0x38:
            pass  # an integer below 24 or above -25: one byte, a valid key
        elif 0x60 <= initial < 0x78:
            # text of fewer than 24 bytes, a valid key
            length = initial - 0x60
            if length > end - pos:
                raise ProtocolError("cbor.truncated", "string longer than the remaining input")
            if length:
                text = data[pos : pos + length]
                if not text.isascii():  # ASCII is UTF-8: the common case, without decoding
                    try:
                        text.decode("utf-8", "strict")
                    except UnicodeDecodeError:
                        raise ProtocolError("cbor.utf8", "text string is not valid UTF-8") from None
                pos += length
        elif 0x80 <= initial < 0xB8 and not key and (initial < 0x98 or initial >= 0xA0):
            # an array or a map of fewer than 24 items (as a value: a key is refused in _head)
            inner = initial & 0x1F
            if initial >= 0xA0:
                inner *= 2
            if inner > end - pos:
                raise ProtocolError("cbor.truncated", "container announces more items than bytes")
            if depth >= max_depth:
                raise ProtocolError("cbor.depth", f"nesting deeper than {max_depth}")
            if inner:
                pos, deterministic = _items(
                    data,
                    pos,
                    end,
                    inner,
                    is_map=initial >= 0xA0,
                    depth=depth + 1,
                    max_depth=max_depth,
                )
                if not deterministic:
                    canonical = False
        else:
            pos, deterministic = _head(data, start, end, key=key, depth=depth, max_depth=max_depth)
            if not deterministic:
                canonical = False
        if key:
            # keys must ascend strictly (an equal one is a duplicate: cbor2 refuses it as
            # cbor.malformed)
            encoded = data[start:pos]
            if encoded <= previous:
                canonical = False
            previous = encoded
            key = False
        elif is_map:
            key = True
    return pos, canonical


def _head(
    data: bytes, start: int, end: int, *, key: bool, depth: int, max_depth: int
) -> tuple[int, bool]:
    """The item whose head starts at ``start``, whole (a container's items too): where it ends,
    whether it is deterministic."""
    initial = data[start]
    pos = start + 1
    canonical = True
    major = initial >> 5
    info = initial & 0x1F
    if major == _MAJOR_SIMPLE:
        if info not in (_SIMPLE_FALSE, _SIMPLE_TRUE, _SIMPLE_NULL):
            kind = "indefinite-length break" if info == _AI_INDEFINITE else "float/simple value"
            raise ProtocolError("cbor.type", f"{kind} is not in the wire data model")
        argument = 0
    elif info < 24:
        argument = info
    elif info <= 27:
        width = 1 << (info - 24)
        if pos + width > end:
            raise ProtocolError("cbor.truncated", "input ends inside an item head")
        argument = int.from_bytes(data[pos : pos + width], "big")
        pos += width
        if argument < _SHORTEST[info]:
            canonical = False
    elif info == _AI_INDEFINITE:
        raise ProtocolError("cbor.indefinite", "indefinite lengths are not accepted")
    else:
        raise ProtocolError("cbor.malformed", f"reserved additional information {info}")

    if key and major not in (_MAJOR_UINT, _MAJOR_NINT, _MAJOR_TEXT):
        raise ProtocolError("cbor.key-type", "map keys must be integers or text")
    if major == _MAJOR_TAG:
        raise ProtocolError("cbor.tag", f"tag {argument} is not accepted")
    if major in (_MAJOR_BYTES, _MAJOR_TEXT):
        if argument > end - pos:
            raise ProtocolError("cbor.truncated", "string longer than the remaining input")
        if major == _MAJOR_TEXT:
            try:
                data[pos : pos + argument].decode("utf-8", "strict")
            except UnicodeDecodeError:
                raise ProtocolError("cbor.utf8", "text string is not valid UTF-8") from None
        pos += argument
    elif major in (_MAJOR_ARRAY, _MAJOR_MAP):
        is_map = major == _MAJOR_MAP
        count = argument * 2 if is_map else argument
        # Every item takes at least one byte: a count beyond the remaining bytes is a lie,
        # refused here so that no decoder pre-allocates for it.
        if count > end - pos:
            raise ProtocolError("cbor.truncated", "container announces more items than bytes")
        if depth >= max_depth:
            raise ProtocolError("cbor.depth", f"nesting deeper than {max_depth}")
        if count:
            pos, inner = _items(
                data, pos, end, count, is_map=is_map, depth=depth + 1, max_depth=max_depth
            )
            if not inner:
                canonical = False
    return pos, canonical
