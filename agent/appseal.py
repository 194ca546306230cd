"""Apps' sealed secrets (the local API's ``seal``/``unseal``, ``agent.keybackend``) across
firmware releases.

Without a release key in the configuration, or before the first release bundle is held, an app
secret is sealed to the agent's PCRs (PolicyPCR, ``TPMStore.seal``): an update that changes the
PCRs makes it unopenable (``seal.measurements``).

With a release key and a bundle held (``agent.releasestate.HeldReleases``), an app secret is
sealed with **PolicyAuthorize(release key, ref(g)) then PolicyNV(app counter == v)**
(``agent.tpm.authorized.seal_authorized`` over the **app counter**, NV counter index
``APP_COUNTER_INDEX``, not the state counter), ``g`` being the newest held bundle's generation.
It opens on any release that bundle approves, with the entry that matches the live PCRs, chosen
exactly as for the state key (``agent.releasestate.choose_entry``).

**Why a counter of its own.** The state counter moves at every state rotation (each destruction
of a key, up to 24 a day); an app secret bound to it would have to be sealed again at each
rotation, every one a crash window for every app. Without any counter, a copy of a blob of
generation ``g`` taken before a revocation would still open on the TPM with an entry signed for
``g`` (public, from an old bundle; such a signature never expires). The app counter moves only
when the generation does (a revocation or an expiry: rare, so within the NV write budget), which
kills every blob of the older generation in the TPM itself. Like the state counter it only grows,
even if root undefines and defines it again (a new counter starts at the highest value any
counter of the TPM had).

What protects a copied blob, then: within one generation, as with PCR-sealed secrets, the
ledger and the file (each re-seal by the app replaces the blob atomically and destroys its
ledger record ``app-seal/<uid>/<name>#<n>``, a new ``#n+1``; ``forget`` shreds it); across a
generation, the agent (``release.stale``) and the TPM (PolicyNV, and the policyRef).

**A newer generation:** every app secret is sealed again (``reseal``), like a state rotation:

1. ``unsealed`` / ``sealed``: each secret opened with the entry of its own generation (the older
   bundle, which ``HeldReleases`` keeps while a blob is sealed under it: ``HeldReleases.others``)
   and sealed under ref(newest) and the counter's next value, written as ``<name>.pem.next``;
2. ``incremented``: the app counter moves. The commit point: the old blobs are dead, the new
   ones open;
3. ``switched``: each ``.next`` renamed over its blob and its ledger record renewed.

A stop before step 2 leaves the old blobs (their bundle still held), after it the new ones; the
next start (``recover``) renames or removes ``.next`` files by the counter value they name. The
daemon re-seals when the bundle arrives and at start, before the state key's own re-seal needs
a rotation token. A secret sealed the PolicyPCR way migrates (sealed again, no counter move) when
a bundle is first held, if the PCRs are still those it was sealed to; otherwise it stays as it
is.

**An unapproved image** (the live PCRs match no entry of the newest bundle): ``unseal``, ``seal``
and ``forget`` are refused (``release.unapproved``) and nothing changes, like the state key.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final, Protocol

from cryptography.hazmat.primitives.asymmetric import ec

from agent.fsio import shred
from agent.protocol.errors import ProtocolError, TPMError
from agent.protocol.release import ReleaseBundle, match
from agent.protocol.secret import Secret
from agent.releasestate import HeldReleases, Unapproved, changed_pcrs, choose_entry, load_boot
from agent.tpm import authorized
from agent.tpm.blob import KeyBlob
from agent.tpm.nvcounter import CounterMoved, NVCounter
from agent.tpm.store import MeasurementsChanged, TPMStore

log = logging.getLogger(__name__)

# Owner-defined NV range, beside the state counter (0x01004B46)
APP_COUNTER_INDEX: Final = 0x01004B47
NEXT_SUFFIX: Final = ".next"
STEPS: Final = ("unsealed", "sealed", "incremented", "switched")  # fault points of a re-seal
_RC_POLICY_FAIL = 0x09D


class Sealer(Protocol):
    """What sealing to PCRs needs from the TPM (``agent.tpm.TPMStore`` has it)."""

    def seal(self, secret: Secret | bytes, pcrs: Sequence[int] = ...) -> KeyBlob: ...

    def unseal(self, blob: KeyBlob) -> Secret: ...


def policy_failed(exc: TPMError) -> bool:
    """Whether a TPM error is "the PCRs no longer hold the sealed values" (TPM_RC_POLICY_FAIL,
    any session number)."""
    rc = exc.rc
    return rc is not None and bool(rc & 0x80) and (0x080 | (rc & 0x3F)) == _RC_POLICY_FAIL


def blob_generation(blob: KeyBlob) -> int | None:
    """The release generation a blob is sealed under; None for a PolicyPCR blob."""
    return authorized.bound_generation(blob) if authorized.is_authorized(blob) else None


def blob_paths(directory: Path) -> Iterator[Path]:
    """Every app secret's blob: ``<directory>/<uid>/<name>.pem``."""
    for uid_dir in _uid_dirs(directory):
        yield from sorted(p for p in uid_dir.glob("*.pem") if p.is_file())


def sealed_generations(directory: Path) -> set[int]:
    """The release generations app secrets in ``directory`` are sealed under (what
    ``HeldReleases.others`` asks: the older bundle stays while one needs it)."""
    out: set[int] = set()
    for path in blob_paths(directory):
        try:
            generation = blob_generation(KeyBlob.load(path))
        except (TPMError, ValueError, OSError):
            continue
        if generation is not None:
            out.add(generation)
    return out


def _next(path: Path) -> Path:
    return path.with_name(path.name + NEXT_SUFFIX)


class AppSeals:
    """Seal, open and re-seal apps' secrets (module text)."""

    def __init__(
        self,
        sealer: Sealer,
        directory: Path,
        pcrs: Sequence[int],
        releases: HeldReleases | None = None,
        *,
        fault: Callable[[str], None] | None = None,
        counter_index: int = APP_COUNTER_INDEX,
    ) -> None:
        self._sealer = sealer
        self.directory = directory
        self._pcrs = tuple(pcrs)
        self.releases = releases
        self._fault = fault or (lambda step: None)
        self._counter_index = counter_index

    def __repr__(self) -> str:
        return f"AppSeals({str(self.directory)!r})"

    def _tpm(self) -> TPMStore:
        if not isinstance(self._sealer, TPMStore):
            raise TPMError("seal", None, "sealing for signed releases needs the TPM")
        return self._sealer

    def counter(self) -> NVCounter:
        """The app counter (defined on first use)."""
        counter = NVCounter(self._tpm(), self._counter_index)
        counter.ensure()
        return counter

    def _key(self) -> ec.EllipticCurvePublicKey:
        assert self.releases is not None
        return self.releases.key

    def _newest(self) -> ReleaseBundle | None:
        return None if self.releases is None else self.releases.newest

    def _live(self) -> dict[int, bytes]:
        assert self.releases is not None
        return self._tpm().pcr_read(self.releases.pcrs())

    def _last_boot(self) -> dict[int, bytes] | None:
        directory = None if self.releases is None else self.releases.directory
        return None if directory is None else load_boot(directory)

    def require_approved(self) -> None:
        """``release.unapproved`` unless the running image is a release the newest held bundle
        approves (nothing to check without a bundle)."""
        newest = self._newest()
        if newest is None:
            return
        live = self._live()
        if match(newest, live) is None:
            raise ProtocolError(
                "release.unapproved",
                "the running image is not an approved release: "
                f"{changed_pcrs(live, self._last_boot())}; app secrets are left as they are",
            )

    def seal(self, secret: Secret, *, value: int | None = None) -> KeyBlob:
        """A new blob: under the newest held generation and the app counter's value (or
        ``value``, the next one during a re-seal), or to the PCRs without a bundle."""
        newest = self._newest()
        if newest is None:
            return self._sealer.seal(secret, self._pcrs)
        counter = self.counter()
        bound = counter.read() if value is None else value
        return authorized.seal_authorized(counter, secret, bound, self._key(), newest.generation)

    def unseal(self, blob: KeyBlob) -> Secret:
        """Open a blob; ``seal.measurements`` (PolicyPCR blob, PCRs changed),
        ``release.unapproved`` (no held entry matches the live PCRs), ``release.stale`` (sealed
        before the app counter moved: a generation a revocation retired), ``release.signature``."""
        generation = blob_generation(blob)
        if generation is None:
            try:
                return self._sealer.unseal(blob)
            except TPMError as exc:
                if policy_failed(exc):
                    raise ProtocolError(
                        "seal.measurements",
                        "the secret is sealed to other measurements (PCRs changed)",
                    ) from None
                raise
        releases = self.releases
        if releases is None or releases.newest is None:
            raise ProtocolError(
                "release.unapproved",
                "the secret is sealed for signed releases and no release bundle is held",
            )
        counter = self.counter()
        value, bound = counter.read(), authorized.bound_counter(blob)
        if bound != value:
            raise ProtocolError(
                "release.stale",
                f"the secret is sealed under release generation {generation} and app counter "
                f"{bound}, not the counter's {value} (a copy from before a revocation)",
            )
        try:
            entry = choose_entry(releases, generation, self._live(), self._last_boot())
        except Unapproved as exc:
            raise ProtocolError("release.unapproved", exc.reason) from None
        try:
            return authorized.unseal_authorized(counter, blob, entry, releases.key, generation)
        except MeasurementsChanged as exc:
            raise ProtocolError("release.unapproved", exc.detail) from None
        except (authorized.ReleaseStale, CounterMoved) as exc:
            raise ProtocolError("release.stale", exc.detail) from None
        except authorized.ReleaseSignatureRefused as exc:
            raise ProtocolError("release.signature", exc.detail) from None

    def recover(self, on_resealed: Callable[[Path], None]) -> None:
        """After a stop during a re-seal: a ``.next`` blob sealed under the counter's value is
        the committed one (renamed over its blob, ``on_resealed``); one under a later value did
        not commit (removed)."""
        leftovers = [
            p for d in _uid_dirs(self.directory) for p in sorted(d.glob(f"*.pem{NEXT_SUFFIX}"))
        ]
        if not leftovers:
            return
        value = self.counter().read()
        for path in leftovers:
            target = path.with_name(path.name[: -len(NEXT_SUFFIX)])
            try:
                bound = authorized.bound_counter(KeyBlob.load(path))
            except (TPMError, ValueError, OSError):
                bound = None
            if bound == value:
                os.replace(path, target)
                on_resealed(target)
                log.info("app secret %s/%s: its re-seal completed", target.parent.name, target.stem)
            else:
                shred(path)
                log.info(
                    "app secret %s/%s: an uncommitted re-seal removed",
                    path.parent.name,
                    target.stem,
                )

    def pending(self) -> list[Path]:
        """Live blobs not sealed under the newest held generation: PolicyPCR ones, and those of
        an older generation still under the app counter's value (none without a bundle). A blob
        under an earlier counter value is dead (a copy put back): left out."""
        newest = self._newest()
        if newest is None:
            return []
        out = []
        value: int | None = None
        for path in blob_paths(self.directory):
            try:
                blob = KeyBlob.load(path)
                generation = blob_generation(blob)
                if generation is not None and generation != newest.generation:
                    if value is None:
                        value = self.counter().read()
                    if authorized.bound_counter(blob) != value:
                        continue
            except (TPMError, ValueError, OSError) as exc:
                log.warning("app secret %s does not read (left as it is): %s", path, exc)
                continue
            if generation != newest.generation:
                out.append(path)
        return out

    def _open_for_reseal(self, path: Path) -> Secret | None:
        try:
            return self.unseal(KeyBlob.load(path))
        except (ProtocolError, TPMError) as exc:
            log.warning("app secret %s/%s not sealed again: %s", path.parent.name, path.stem, exc)
            return None

    def reseal(self, on_resealed: Callable[[Path], None]) -> int:
        """Bring every app secret under the newest generation (module text); ``on_resealed``
        after each blob is replaced. The number re-sealed; a secret that does not open is logged
        and left as it is (under a retired generation it is dead once the counter moves)."""
        self.recover(on_resealed)
        pending = self.pending()
        if not pending:
            return 0
        bump = any(authorized.is_authorized(KeyBlob.load(p)) for p in pending)
        if not bump:  # PolicyPCR blobs only: sealed again one by one, the counter stays
            count = 0
            for path in pending:
                secret = self._open_for_reseal(path)
                if secret is None:
                    continue
                self.seal(secret).save(path)
                on_resealed(path)
                count += 1
            return count
        counter = self.counter()
        value = counter.read()
        written, kept = [], []
        for path in blob_paths(self.directory):  # every blob: the move kills those left out
            blob = KeyBlob.load(path)
            secret = self._open_for_reseal(path)
            if secret is None:
                if authorized.is_authorized(blob) and authorized.bound_counter(blob) == value:
                    kept.append(path)  # would die with the move: no move
                continue
            self._fault("unsealed")
            self.seal(secret, value=value + 1).save(_next(path))
            written.append(path)
            self._fault("sealed")
        if kept:
            for path in written:
                shred(_next(path))
            log.error(
                "app secrets %s do not open now: the app counter is not moved, so that they are "
                "not lost (retried at the next start)",
                [f"{p.parent.name}/{p.stem}" for p in kept],
            )
            return 0
        counter.increment()
        self._fault("incremented")
        for path in written:
            os.replace(_next(path), path)
            on_resealed(path)
            self._fault("switched")
        log.info(
            "%d app secret(s) sealed again under release generation %s (app counter %d)",
            len(written),
            None if self.releases is None else self.releases.generation,
            value + 1,
        )
        return len(written)


def _uid_dirs(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return [d for d in sorted(directory.iterdir()) if d.is_dir() and d.name.isdigit()]
