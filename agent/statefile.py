"""The agent's one state file, encrypted under a state key that only the TPM can give back.

Envelope encryption: the state key (32 random bytes) is sealed to the TPM under the PCR policy
and the state counter (``agent.tpm.nvcounter``) and unsealed once at start; the file itself is
AES-256-GCM under that key. Layout (version 2):

    magic "KFST" | version (1) | generation (8, big endian) | counter (8) | nonce (12) | ciphertext

The header is the AEAD's associated data, so a flipped header byte fails like a flipped
ciphertext byte. ``counter`` is the TPM state counter the file was written under: a file whose
counter is not the one the loader expects (the TPM's current value) is refused as
``state.rollback`` before anything is decrypted. ``generation`` grows by one at every save (how
often state was written). Version 1 files (no counter, from before the state counter) are read
only when the caller says so (``legacy=True``: the one-time migration in
``agent.staterotation``). With a ``TreeStore`` (the agent's), the groups' trees are saved beside
the file (``agent.treestore``) and the file holds references to them. Writes go through
``atomic_write``: a crash leaves the old or the new file, never a mix.
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
from agent.treestore import TreeStore


class StateRollback(StateError):
    """A state file written under an older state counter than the TPM's: ``state.rollback``."""

    check = "state.rollback"

    def __init__(self, reason: str) -> None:
        super().__init__(f"[state.rollback] {reason}")
        self.reason = reason


def peek(blob: bytes) -> tuple[int, int | None]:
    """(version, counter) of a state file's header, without the key (None: version 1 has no
    counter). StateError if it is not a state file."""
    if len(blob) < _PREFIX.size:
        raise StateError(f"state file is truncated ({len(blob)} bytes)")
    magic, version, _generation = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise StateError("not a keyagent state file")
    if version == LEGACY_VERSION:
        return version, None
    if version != VERSION or len(blob) < _HEADER.size:
        raise StateError(f"state file has version {version}, expected {VERSION}")
    return version, _HEADER.unpack_from(blob)[3]


MAGIC = b"KFST"
VERSION = 2
LEGACY_VERSION = 1
_HEADER = struct.Struct(">4sBQQ12s")
_LEGACY_HEADER = struct.Struct(">4sBQ12s")
_PREFIX = struct.Struct(">4sBQ")
# The largest state file loaded, and so the largest saved: a group's public tree takes about 1 KB
# a member in the state (a DevID certificate of 500 bytes), so 256 MiB holds a group of the
# largest size (131,072 members) with room to spare. A state over it is refused by ``save``
# rather than written: a device must never leave a state on disk it cannot load at its next
# start.
MAX_STATE_BYTES = 256 * 1024 * 1024


class StateFile:
    """Load and save a CBOR-able dict, encrypted; never writes plaintext anywhere."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        key: Secret,
        rng: Callable[[int], bytes] = os.urandom,
        *,
        counter: int = 0,
        trees: TreeStore | None = None,
    ) -> None:
        if len(key) != 32:
            raise StateError(f"state key must be 32 bytes, got {len(key)}")
        self.path = Path(path)
        self._key = key
        self._rng = rng
        self.generation = 0
        self.counter = counter
        # the groups' trees, kept beside this file (None: inline, as version 2 files first did)
        self.trees = trees
        self.bytes_written = 0  # this file's bytes at the last save

    def __repr__(self) -> str:
        return (
            f"StateFile({str(self.path)!r}, counter={self.counter}, generation={self.generation})"
        )

    def exists(self) -> bool:
        return self.path.exists()

    def load(self, *, legacy: bool = False) -> dict[str, Any]:
        """The state. ``StateRollback`` if the file was written under another counter;
        ``legacy``: read a version 1 file (no counter) instead (migration only)."""
        try:
            blob = self.path.read_bytes()
        except FileNotFoundError:
            raise StateError(f"no state file at {self.path}") from None
        except OSError as exc:
            raise StateError(f"cannot read state file {self.path}: {exc.strerror}") from None
        if len(blob) > MAX_STATE_BYTES:
            raise StateError(f"state file {self.path} is {len(blob)} bytes, over the limit")
        layout = _LEGACY_HEADER if legacy else _HEADER
        if len(blob) < _PREFIX.size:
            raise StateError(f"state file {self.path} is truncated ({len(blob)} bytes)")
        magic, version, generation = _PREFIX.unpack_from(blob)
        if magic != MAGIC:
            raise StateError(f"{self.path} is not a keyagent state file")
        expected = LEGACY_VERSION if legacy else VERSION
        if version != expected:
            raise StateError(f"state file {self.path} has version {version}, expected {expected}")
        if len(blob) < layout.size + 16:
            raise StateError(f"state file {self.path} is truncated ({len(blob)} bytes)")
        if legacy:
            nonce = _LEGACY_HEADER.unpack_from(blob)[3]
        else:
            counter, nonce = _HEADER.unpack_from(blob)[3:]
            if counter != self.counter:
                raise StateRollback(
                    f"state file {self.path} was written under state counter {counter}, the "
                    f"TPM's is {self.counter}: an older state put back in place is never loaded"
                )
        header = blob[: layout.size]
        try:
            plaintext = AESGCM(self._key.reveal()).decrypt(nonce, blob[layout.size :], header)
        except InvalidTag:
            raise StateError(
                f"state file {self.path} does not authenticate: corrupt, or under another key"
            ) from None
        try:
            state: object = cbor2.loads(plaintext)
        except Exception:
            raise StateError(f"state file {self.path} decrypts but does not decode") from None
        if not isinstance(state, dict):
            raise StateError(f"state file {self.path} does not hold a map")
        if self.trees is not None:
            state = self.trees.resolve(state)
        self.generation = generation
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Encrypt and write ``state`` atomically. ``StateError`` (nothing written, the state
        on disk still the last one saved) if it would be over ``MAX_STATE_BYTES``.

        With a ``TreeStore``, the groups' trees go to their journals (or new snapshots) first,
        and this file, which names them, is the commit point."""
        if self.trees is not None:
            try:
                state = self.trees.externalize(state)
                self._write(state)
            except BaseException:
                self.trees.discard()
                raise
            self.trees.committed()
        else:
            self._write(state)

    def _write(self, state: dict[str, Any]) -> None:
        plaintext = cbor2.dumps(state, canonical=True)
        if _HEADER.size + len(plaintext) + 16 > MAX_STATE_BYTES:
            raise StateError(
                f"state of {len(plaintext)} bytes is over the {MAX_STATE_BYTES}-byte limit of a "
                f"state file that can be loaded: not saved ({self.path} keeps the last state)"
            )
        generation = self.generation + 1
        header = _HEADER.pack(MAGIC, VERSION, generation, self.counter, self._rng(12))
        nonce = header[-12:]
        ciphertext = AESGCM(self._key.reveal()).encrypt(nonce, plaintext, header)
        atomic_write(self.path, header + ciphertext)
        self.bytes_written = len(header) + len(ciphertext)
        self.generation = generation
