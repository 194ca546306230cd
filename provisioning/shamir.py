"""Shamir secret sharing over GF(2^8), byte by byte: any ``threshold`` of ``count`` shares give
the secret back, fewer give no information about it.

Each byte of the secret is the constant term of its own random polynomial of degree
``threshold - 1`` over GF(2^8) (reduction polynomial x^8 + x^4 + x^3 + x + 1, the AES field);
share ``i`` (1..255) holds every polynomial's value at ``x = i``. Recovery is Lagrange
interpolation at ``x = 0``. The randomness comes in through ``random_bytes`` (a seam for tests),
by default ``secrets.token_bytes``.

Shares here carry no integrity of their own: ``provisioning.backup`` puts each share in a file
with the backup's id, its index and a digest the backup file commits to, so a wrong share is
named before it is combined.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping

MAX_SHARES = 255

# exp/log tables of GF(2^8) with generator 3
_EXP = [0] * 510
_LOG = [0] * 256


def _build_tables() -> None:
    value = 1
    for power in range(255):
        _EXP[power] = value
        _LOG[value] = power
        # multiply by 3 = x + 1: value * x (xtime) xor value
        doubled = value << 1
        if doubled & 0x100:
            doubled ^= 0x11B
        value = doubled ^ value
    for power in range(255, 510):
        _EXP[power] = _EXP[power - 255]


_build_tables()


def _mul(a: int, b: int) -> int:
    if a == 0 or b == 0:
        return 0
    return _EXP[_LOG[a] + _LOG[b]]


def _div(a: int, b: int) -> int:
    if b == 0:
        raise ZeroDivisionError("division by zero in GF(2^8)")
    if a == 0:
        return 0
    return _EXP[_LOG[a] - _LOG[b] + 255]


class SharingError(ValueError):
    """Parameters or shares that cannot be used; the message never carries share bytes."""


def split(
    secret: bytes,
    *,
    threshold: int,
    count: int,
    random_bytes: Callable[[int], bytes] = secrets.token_bytes,
) -> dict[int, bytes]:
    """``count`` shares of ``secret`` (index 1..count -> share bytes, as long as the secret), of
    which any ``threshold`` recover it."""
    if not 2 <= threshold <= count <= MAX_SHARES:
        raise SharingError(
            f"need 2 <= threshold <= shares <= {MAX_SHARES} (got {threshold} of {count})"
        )
    if not secret:
        raise SharingError("nothing to share")
    coefficients = [random_bytes(len(secret)) for _ in range(threshold - 1)]
    if any(len(c) != len(secret) for c in coefficients):
        raise SharingError("the randomness source returned the wrong length")
    shares: dict[int, bytes] = {}
    for x in range(1, count + 1):
        out = bytearray(len(secret))
        for position, constant in enumerate(secret):
            # Horner's rule from the highest coefficient down to the secret byte
            acc = 0
            for row in reversed(coefficients):
                acc = _mul(acc, x) ^ row[position]
            out[position] = _mul(acc, x) ^ constant
        shares[x] = bytes(out)
    return shares


def combine(shares: Mapping[int, bytes]) -> bytes:
    """The secret the given shares (index -> bytes) interpolate to at x = 0. The caller checks
    that there are at least ``threshold`` of them: with fewer the result is unrelated to the
    secret, not an error."""
    if len(shares) < 2:
        raise SharingError("at least two shares are needed")
    lengths = {len(v) for v in shares.values()}
    if len(lengths) != 1:
        raise SharingError("the shares are not all the same length")
    if any(not 1 <= x <= MAX_SHARES for x in shares):
        raise SharingError(f"a share index is outside 1..{MAX_SHARES}")
    xs = sorted(shares)
    # Lagrange basis at 0: l_j = prod_{m != j} x_m / (x_m - x_j); subtraction is xor here
    weights: dict[int, int] = {}
    for xj in xs:
        numerator, denominator = 1, 1
        for xm in xs:
            if xm != xj:
                numerator = _mul(numerator, xm)
                denominator = _mul(denominator, xm ^ xj)
        weights[xj] = _div(numerator, denominator)
    out = bytearray(lengths.pop())
    for xj in xs:
        weight, value = weights[xj], shares[xj]
        for position, byte in enumerate(value):
            out[position] ^= _mul(weight, byte)
    return bytes(out)
