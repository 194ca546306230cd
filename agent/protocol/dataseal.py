"""The data format apps get from the local API's encrypt: AES-128-GCM under a group's epoch key.

Pure: the caller supplies randomness and a ``data_key(group, epoch)`` lookup. Layout:

    magic "KFD" | version (1) | group length (1) | group (UTF-8) | epoch (8, big endian)
    | nonce (12) | ciphertext || tag (16)

Everything before the ciphertext is the AEAD's associated data, so the group and epoch a blob
names are authenticated: a blob cannot be relabelled to another group or epoch. The group is in
the header because the local API decides access by group: decrypting a blob for group "g1"
refuses a header that names another group (``data.group-mismatch``) before any key is touched.

Check ids: ``data.truncated``, ``data.magic``, ``data.version``, ``data.group``,
``data.group-mismatch``, ``data.epoch-unknown``, ``data.epoch-expired``, ``data.epoch-unusable``
(raised by the key lookup), ``data.key`` (a lookup returned a key of the wrong size),
``data.auth`` (the tag did not verify), ``data.too-large``.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.protocol.errors import CryptoError, ProtocolError
from agent.protocol.secret import Secret

MAGIC = b"KFD"
VERSION = 1
KEY_SIZE = 16
NONCE_SIZE = 12
TAG_SIZE = 16
MAX_PLAINTEXT = 1024 * 1024
GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_EPOCH = struct.Struct(">Q")

DataKeyLookup = Callable[[str, int], "bytes | Secret"]
"""``data_key(group, epoch)``: the 16-byte epoch data key, or raise ``ProtocolError`` with
``data.epoch-unknown`` / ``data.epoch-expired`` / ``data.epoch-unusable``."""


def check_group_name(group: object) -> str:
    """Group names are also MQTT topic levels and ledger names: letters, digits, '.', '_', '-',
    1..64 characters, starting with a letter or digit."""
    if not isinstance(group, str) or not GROUP_NAME.fullmatch(group):
        raise ProtocolError("data.group", "group name must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}")
    return group


@dataclass(frozen=True)
class DataHeader:
    group: str
    epoch: int
    nonce: bytes

    def encode(self) -> bytes:
        name = self.group.encode()
        return MAGIC + bytes([VERSION, len(name)]) + name + _EPOCH.pack(self.epoch) + self.nonce


def parse_header(blob: bytes) -> tuple[DataHeader, int]:
    """Strictly decode the header; returns it and its length (the ciphertext starts there)."""
    if len(blob) < len(MAGIC) + 2:
        raise ProtocolError("data.truncated", f"sealed data is {len(blob)} bytes, too short")
    if blob[: len(MAGIC)] != MAGIC:
        raise ProtocolError("data.magic", "not keyfleet sealed data (bad magic)")
    version = blob[len(MAGIC)]
    if version != VERSION:
        raise ProtocolError("data.version", f"sealed data version {version} is not supported")
    name_len = blob[len(MAGIC) + 1]
    start = len(MAGIC) + 2
    end = start + name_len + _EPOCH.size + NONCE_SIZE
    if len(blob) < end + TAG_SIZE:
        raise ProtocolError("data.truncated", f"sealed data is {len(blob)} bytes, too short")
    try:
        group = blob[start : start + name_len].decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise ProtocolError("data.group", "group name in header is not UTF-8") from None
    check_group_name(group)
    (epoch,) = _EPOCH.unpack_from(blob, start + name_len)
    nonce = bytes(blob[end - NONCE_SIZE : end])
    return DataHeader(group, epoch, nonce), end


def _key_bytes(key: bytes | Secret) -> bytes:
    raw = key.reveal() if isinstance(key, Secret) else bytes(key)
    if len(raw) != KEY_SIZE:
        raise ProtocolError("data.key", f"data key is {len(raw)} bytes, expected {KEY_SIZE}")
    return raw


def seal(
    group: str,
    epoch: int,
    key: bytes | Secret,
    plaintext: bytes,
    rng: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """Encrypt ``plaintext`` for ``group`` under its ``epoch`` data key (a fresh random nonce)."""
    check_group_name(group)
    if not 0 <= epoch < 2**64:
        raise ProtocolError("data.epoch-unknown", f"epoch {epoch} is out of range")
    if len(plaintext) > MAX_PLAINTEXT:
        raise ProtocolError("data.too-large", f"plaintext is over {MAX_PLAINTEXT} bytes")
    nonce = rng(NONCE_SIZE)
    if len(nonce) != NONCE_SIZE:
        raise ProtocolError("data.nonce", "random source returned a short nonce")
    header = DataHeader(group, epoch, nonce).encode()
    return header + AESGCM(_key_bytes(key)).encrypt(nonce, plaintext, header)


def open_sealed(blob: bytes, data_key: DataKeyLookup, expected_group: str | None = None) -> bytes:
    """Decrypt a blob made by ``seal``. With ``expected_group``, a blob for another group is
    refused before its key is looked up. Errors from ``data_key`` propagate unchanged."""
    header, end = parse_header(blob)
    if expected_group is not None and header.group != expected_group:
        raise ProtocolError(
            "data.group-mismatch",
            f"data was sealed for group {header.group!r}, not {expected_group!r}",
        )
    key = _key_bytes(data_key(header.group, header.epoch))
    try:
        return AESGCM(key).decrypt(header.nonce, blob[end:], blob[:end])
    except InvalidTag:
        raise CryptoError(
            "data.auth", f"sealed data for {header.group!r} epoch {header.epoch} does not verify"
        ) from None
