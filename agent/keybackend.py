"""The local API's real backend: group data keys from the agent core, the DevID key and the TPM's
sealing for app secrets.

Calls come from the local API server's thread while the daemon's worker thread drives the core,
so every call takes the daemon's lock: the core and the one TPM connection are used by one
thread at a time. Encryption counts each message against the epoch's rotation budget; the count
is persisted by the daemon's next tick (``AgentCore.dirty``).

App secrets live in ``<state dir>/app-seal/<uid>/<name>.pem`` as TPM sealed-data blobs, under
the agent's PCR policy or, with a release key and a bundle held, under the fleet's signed
releases (``agent.appseal``); their ledger records are ``app-seal/<uid>/<name>#<n>`` (a new ``n``
per re-seal, by the app or by the agent for a new release generation, the old record destroyed).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent.appseal import AppSeals, Sealer
from agent.core import AgentCore
from agent.fsio import shred
from agent.protocol.errors import ProtocolError
from agent.protocol.lifecycle import KeyKind, KeyRecord, KeyState
from agent.protocol.secret import Secret
from agent.releasestate import HeldReleases
from agent.tpm.blob import KeyBlob


class TpmKeyBackend:
    """``agent.localapi.backend.KeyBackend`` over the agent core and the TPM."""

    def __init__(
        self,
        core: AgentCore,
        lock: threading.RLock,
        *,
        signer: ec.EllipticCurvePrivateKey,
        sealer: Sealer,
        seal_dir: Path,
        pcrs: Sequence[int],
        on_change: Callable[[], None],
        clock: Callable[[], float] = time.time,
        releases: HeldReleases | None = None,
    ) -> None:
        self._core = core
        self._lock = lock
        self._signer = signer
        self._seals = AppSeals(sealer, seal_dir, pcrs, releases)
        self._seal_dir = seal_dir
        self._on_change = on_change
        self._clock = clock

    def __repr__(self) -> str:
        return f"TpmKeyBackend({self._core.device_id!r})"

    def _now(self) -> int:
        return int(self._clock())

    def encrypt(self, group: str, plaintext: bytes) -> bytes:
        with self._lock:
            return self._core.encrypt(group, plaintext, self._now())

    def decrypt(self, group: str, blob: bytes) -> bytes:
        with self._lock:
            return self._core.decrypt(group, blob, self._now())

    def sign(self, message: bytes) -> bytes:
        with self._lock:
            return self._signer.sign(message, ec.ECDSA(hashes.SHA256()))

    def _path(self, name: str, uid: int) -> Path:
        return self._seal_dir / str(uid) / f"{name}.pem"

    def _records(self, name: str, uid: int) -> list[KeyRecord]:
        prefix = f"app-seal/{uid}/{name}#"
        return [r for r in self._core.ledger if r.name.startswith(prefix)]

    def _note_sealed(self, name: str, uid: int) -> None:
        """The ledger's view of a new blob for ``name``: the earlier records destroyed, a new
        ``#n`` active."""
        self._core.set_time(self._now())
        ledger = self._core.ledger
        previous = self._records(name, uid)
        for record in previous:
            if record.state is not KeyState.DESTROYED:
                ledger.transition(record.name, KeyState.DESTROYED)
        number = 1 + max((int(r.name.rsplit("#", 1)[1]) for r in previous), default=0)
        ledger.add(f"app-seal/{uid}/{name}#{number}", KeyKind.APP_SEAL, owner=uid, active=True)

    def seal(self, name: str, secret: bytes, caller_uid: int) -> None:
        with self._lock:
            self._seals.require_approved()
            blob = self._seals.seal(Secret(secret))
            path = self._path(name, caller_uid)
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            blob.save(path)
            self._note_sealed(name, caller_uid)
            self._on_change()

    def unseal(self, name: str, caller_uid: int) -> bytes:
        with self._lock:
            path = self._path(name, caller_uid)
            if not path.exists():
                raise ProtocolError("seal.unknown", f"no secret named {name!r} for this uid")
            return self._seals.unseal(KeyBlob.load(path)).reveal()

    def forget(self, name: str, caller_uid: int) -> None:
        """Destroy an app secret (blob shredded, record destroyed)."""
        with self._lock:
            self._seals.require_approved()
            shred(self._path(name, caller_uid))
            self._core.set_time(self._now())
            for record in self._records(name, caller_uid):
                if record.state is not KeyState.DESTROYED:
                    self._core.ledger.transition(record.name, KeyState.DESTROYED)
            self._on_change()

    def reseal_for_release(self) -> int:
        """Seal every app secret not under the newest held release generation again under it
        (``agent.appseal.AppSeals.reseal``); the ledger gets a new record for each. The daemon
        calls it when a newer bundle is adopted and at start. The number re-sealed."""
        with self._lock:

            def noted(path: Path) -> None:
                self._note_sealed(path.stem, int(path.parent.name))

            count = self._seals.reseal(noted)
            if count:
                self._on_change()
            return count

    def list_keys(self) -> Sequence[KeyRecord]:
        with self._lock:
            return list(self._core.ledger)
