"""The agent's one state file, encrypted under a state key that only the TPM can give back.

Envelope encryption: the state key (32 random bytes) is sealed to the TPM under the PCR policy
and unsealed once at start; the file itself is AES-256-GCM under that key. Layout:

    magic "KFST" | version (1 byte) | generation (8 bytes, big endian) | nonce (12) | ciphertext

The header is the AEAD's associated data, so a flipped header byte fails like a flipped
ciphertext byte. ``generation`` grows by one at every save; a loader that remembers the last
generation it saw can refuse an older file put back in place (rollback), and operators can see
how often state was written. Writes go through ``atomic_write``: a crash leaves the old or the
new file, never a mix.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.fsio import atomic_write
from agent.protocol.errors import StateError
from agent.protocol.secret import Secret

MAGIC = b"KFST"
VERSION = 1
_HEADER = struct.Struct(">4sBQ12s")
MAX_STATE_BYTES = 64 * 1024 * 1024


class StateFile:
    """Load and save a CBOR-able dict, encrypted; never writes plaintext anywhere."""

    def __init__(
        self, path: str | os.PathLike[str], key: Secret, rng: Callable[[int], bytes] = os.urandom
    ) -> None:
        if len(key) != 32:
            raise StateError(f"state key must be 32 bytes, got {len(key)}")
        self.path = Path(path)
        self._key = key
        self._rng = rng
        self.generation = 0

    def __repr__(self) -> str:
        return f"StateFile({str(self.path)!r}, generation={self.generation})"

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> dict[str, Any]:
        try:
            blob = self.path.read_bytes()
        except FileNotFoundError:
            raise StateError(f"no state file at {self.path}") from None
        except OSError as exc:
            raise StateError(f"cannot read state file {self.path}: {exc.strerror}") from None
        if len(blob) > MAX_STATE_BYTES:
            raise StateError(f"state file {self.path} is {len(blob)} bytes, over the limit")
        if len(blob) < _HEADER.size + 16:
            raise StateError(f"state file {self.path} is truncated ({len(blob)} bytes)")
        magic, version, generation, nonce = _HEADER.unpack_from(blob)
        if magic != MAGIC:
            raise StateError(f"{self.path} is not a keyagent state file")
        if version != VERSION:
            raise StateError(f"state file {self.path} has version {version}, expected {VERSION}")
        header = blob[: _HEADER.size]
        try:
            plaintext = AESGCM(self._key.reveal()).decrypt(nonce, blob[_HEADER.size :], header)
        except InvalidTag:
            raise StateError(
                f"state file {self.path} does not authenticate: corrupt, or under another key"
            ) from None
        try:
            state = cbor2.loads(plaintext)
        except Exception:
            raise StateError(f"state file {self.path} decrypts but does not decode") from None
        if not isinstance(state, dict):
            raise StateError(f"state file {self.path} does not hold a map")
        self.generation = generation
        return state

    def save(self, state: dict[str, Any]) -> None:
        plaintext = cbor2.dumps(state, canonical=True)
        generation = self.generation + 1
        header = _HEADER.pack(MAGIC, VERSION, generation, self._rng(12))
        nonce = header[-12:]
        ciphertext = AESGCM(self._key.reveal()).encrypt(nonce, plaintext, header)
        atomic_write(self.path, header + ciphertext)
        self.generation = generation
