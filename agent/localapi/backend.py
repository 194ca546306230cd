"""What the local API server needs from the agent: the ``KeyBackend`` protocol.

The daemon implements it over the TPM and the group state; tests use an in-memory fake. The server
has already checked the caller's rights and the request's shape before any of these is called;
a backend refuses by raising ``ProtocolError`` with a check id (``data.*`` for group data keys,
``seal.*`` for app secrets), which the server passes to the caller unchanged. Calls come from the
server's one thread, one at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from agent.protocol.lifecycle import KeyRecord


class KeyBackend(Protocol):
    def encrypt(self, group: str, plaintext: bytes) -> bytes:
        """Seal ``plaintext`` under the group's current epoch data key
        (agent.protocol.dataseal.seal) and
        count the message against the epoch's rotation budget."""
        ...

    def decrypt(self, group: str, blob: bytes) -> bytes:
        """Open sealed data of ``group`` (the current epoch, or an older one still within its
        grace period); the blob's header must name ``group`` (``data.group-mismatch``)."""
        ...

    def sign(self, message: bytes) -> bytes:
        """Sign ``message`` with the DevID key: ECDSA P-256 over SHA-256, DER signature. The
        server passes ``protocol.app_signing_input(data)``, never the caller's bytes alone."""
        ...

    def seal(self, name: str, secret: bytes, caller_uid: int) -> None:
        """Seal ``secret`` in the TPM, stored under (caller_uid, name); replaces an older one."""
        ...

    def unseal(self, name: str, caller_uid: int) -> bytes:
        """The secret ``caller_uid`` sealed under ``name``; another uid's secret of the same name
        is not visible (``seal.unknown``)."""
        ...

    def list_keys(self) -> Sequence[KeyRecord]:
        """Every key the agent holds, with its lifecycle state (no secrets)."""
        ...
