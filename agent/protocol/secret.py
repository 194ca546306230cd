"""A wrapper that keeps secret bytes out of reprs, logs and exception texts."""

from __future__ import annotations

import hmac


class Secret:
    """Secret bytes. ``repr``/``str`` show only the length; compare in constant time.

    Python cannot promise erasure (bytes are immutable and may be copied), so ``wipe`` overwrites
    the one buffer this object owns and drops the reference: the best a pure-Python process can do.
    """

    __slots__ = ("_buf",)

    def __init__(self, value: bytes | bytearray) -> None:
        self._buf: bytearray | None = bytearray(value)

    def reveal(self) -> bytes:
        if self._buf is None:
            raise ValueError("secret was wiped")
        return bytes(self._buf)

    def __len__(self) -> int:
        return 0 if self._buf is None else len(self._buf)

    def wipe(self) -> None:
        if self._buf is not None:
            for i in range(len(self._buf)):
                self._buf[i] = 0
            self._buf = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret) or self._buf is None or other._buf is None:
            return NotImplemented
        return hmac.compare_digest(self._buf, other._buf)

    def __hash__(self) -> int:
        raise TypeError("Secret is not hashable")

    def __repr__(self) -> str:
        return f"Secret(<{len(self)} bytes redacted>)"

    __str__ = __repr__

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("Secret cannot be pickled")
