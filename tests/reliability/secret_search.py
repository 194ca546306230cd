"""Searching collected material for known secrets in every encoding a careless log line or file
could hold them: raw bytes, hex (lower and upper case), standard base64 and base64url. Base64 of
a secret inside a longer base64 text depends on where it starts modulo 3 bytes, so each of the
three alignments is searched (the characters that mix in neighbouring bytes are left out)."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping

MIN_SECRET = 16
"""Shorter values would match by chance; every secret searched here is 32 bytes or more."""


def encodings(secret: bytes) -> dict[str, bytes]:
    """Needles for ``secret``: name -> bytes to look for."""
    if len(secret) < MIN_SECRET:
        raise ValueError(f"a {len(secret)}-byte value is too short to search for")
    out = {"raw": secret, "hex": secret.hex().encode(), "HEX": secret.hex().upper().encode()}
    for shift in range(3):
        prefixed = bytes(shift) + secret
        first = -(-8 * shift // 6)  # the first character made of the secret's bits only
        for name, encode in (("base64", base64.b64encode), ("base64url", base64.urlsafe_b64encode)):
            text = encode(prefixed).rstrip(b"=")
            out[f"{name}+{shift}"] = text[first:-2]
    return out


def find(
    secrets: Mapping[str, bytes], haystacks: Mapping[str, bytes]
) -> list[tuple[str, str, str]]:
    """Every (secret name, encoding, haystack name) where a secret was found. Text wrapped over
    lines (PEM, hex dumps) is searched with its line breaks removed as well."""
    unwrapped = {
        place: data.replace(b"\r", b"").replace(b"\n", b"") for place, data in haystacks.items()
    }
    found = []
    for secret_name, secret in secrets.items():
        for encoding, needle in encodings(secret).items():
            for place, data in haystacks.items():
                if needle in data or needle in unwrapped[place]:
                    found.append((secret_name, encoding, place))
    return found


def name_all(prefix: str, values: Iterable[bytes]) -> dict[str, bytes]:
    return {f"{prefix}[{i}]": v for i, v in enumerate(dict.fromkeys(values))}


def positive_control(secret: bytes) -> None:
    """The search finds ``secret`` in each encoding inside longer text at every alignment (so
    an empty result means absent, not a blind search)."""
    for before in range(3):
        for after in range(3):
            data = b"\x07" * before + secret + b"\x09" * after
            hay = {
                "raw": b"x" + data,
                "hex": b"k=" + data.hex().encode(),
                "HEX": data.hex().upper().encode() + b";",
                "b64": b"v=" + base64.b64encode(data),
                "b64url": base64.urlsafe_b64encode(data).rstrip(b"="),
                "pem": base64.encodebytes(b"\x01" * before + data),
            }
            places = {place for *_, place in find({"s": secret}, hay)}
            assert places == set(hay), (before, after, places)
