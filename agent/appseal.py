"""Apps' sealed secrets (the local API's ``seal``/``unseal``, ``agent.keybackend``) across
firmware releases.

Without a release key in the configuration, or before the first release bundle is held, an app
secret is sealed to the agent's PCRs (PolicyPCR, ``TPMStore.seal``): an update that changes the
PCRs makes it unopenable (``seal.measurements``).

With a release key and a bundle held (``agent.releasestate.HeldReleases``), an app secret is
sealed with **PolicyAuthorize(release key, ref(g)) alone** (``agent.tpm.authorized
.seal_released``), ``g`` being the newest held bundle's generation. It opens on any release that
bundle approves, with the entry that matches the live PCRs, chosen exactly as for the state key
(``agent.releasestate.choose_entry``).

**No PolicyNV on the state counter.** The state key carries PolicyNV(state counter == n) and dies
at every state rotation (each destruction of a key, up to 24 a day); an app secret bound the same
way would have to be sealed again at each rotation, every one of them a crash window for every
app. App secrets live longer than the state key by design, so they are bound to the release
generation only. What protects a copied app blob instead:

- each re-seal (by the app, or by the agent for a new generation) replaces the blob atomically
  and destroys its ledger record (``app-seal/<uid>/<name>#<n>``; a new ``#n+1``); ``forget``
  shreds it;
- after a generation bump the agent refuses a blob of an older generation whose bundle it no
  longer holds (``release.stale``) and the TPM refuses it with any entry of a newer generation
  (the policyRef is another);
- **not covered by the TPM:** a copy of a blob of generation ``g`` taken before the re-seal,
  brought to this device's TPM together with an entry signed for ``g`` (public, from an old
  bundle) while the PCRs are that release's, still unseals with raw TPM commands: the signature
  over ``approved || ref(g)`` never expires and no NV state moves with the generation. Closing
  that needs an NV value that moves with the generation (a counter of its own, or an auth value
  kept in the counter-protected state), which this version does not have.

**A newer generation** (a revocation): every app secret is sealed again under the new ref
(``reseal``): unsealed with the entry of its own generation (the older bundle, which
``HeldReleases`` keeps while something is sealed under it, ``HeldReleases.others``), sealed
under the newest, written atomically over the old blob, its ledger record renewed. A stop at any
step leaves either the old blob (its bundle still held) or the new one: each secret opens. The
daemon does it when the bundle arrives and at start, before the state key's own re-seal needs a
token. A secret sealed the PolicyPCR way migrates the same way when a bundle is first held (if
the PCRs are still those it was sealed to; otherwise it stays as it is).

**An unapproved image** (the live PCRs match no entry of the newest bundle): ``unseal``, ``seal``
and ``forget`` are refused (``release.unapproved``) and nothing changes, like the state key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final, Protocol

from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol.errors import ProtocolError, TPMError
from agent.protocol.release import ReleaseBundle, match
from agent.protocol.secret import Secret
from agent.releasestate import HeldReleases, Unapproved, changed_pcrs, choose_entry, load_boot
from agent.tpm import authorized
from agent.tpm.blob import KeyBlob
from agent.tpm.store import MeasurementsChanged, TPMStore

log = logging.getLogger(__name__)

STEPS: Final = ("unsealed", "sealed", "written")  # fault points of one secret's re-seal
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
    if not directory.is_dir():
        return
    for uid_dir in sorted(directory.iterdir()):
        if uid_dir.is_dir() and uid_dir.name.isdigit():
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
    ) -> None:
        self._sealer = sealer
        self.directory = directory
        self._pcrs = tuple(pcrs)
        self.releases = releases
        self._fault = fault or (lambda step: None)

    def __repr__(self) -> str:
        return f"AppSeals({str(self.directory)!r})"

    def _tpm(self) -> TPMStore:
        if not isinstance(self._sealer, TPMStore):
            raise TPMError("seal", None, "sealing for signed releases needs the TPM")
        return self._sealer

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

    def seal(self, secret: Secret) -> KeyBlob:
        """A new blob: under the newest held generation, or to the PCRs without a bundle."""
        newest = self._newest()
        if newest is None:
            return self._sealer.seal(secret, self._pcrs)
        return authorized.seal_released(self._tpm(), secret, self._key(), newest.generation)

    def unseal(self, blob: KeyBlob) -> Secret:
        """Open a blob; ``seal.measurements`` (PolicyPCR blob, PCRs changed),
        ``release.unapproved`` (no held entry matches the live PCRs), ``release.stale`` (a
        generation whose bundle is no longer held), ``release.signature``."""
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
        newest = releases.newest.generation
        older = releases.sealed
        if generation < newest and (older is None or older.generation != generation):
            raise ProtocolError(
                "release.stale",
                f"the secret is sealed under release generation {generation}, retired by "
                f"generation {newest} (a copy from before a revocation)",
            )
        try:
            entry = choose_entry(releases, generation, self._live(), self._last_boot())
        except Unapproved as exc:
            raise ProtocolError("release.unapproved", exc.reason) from None
        try:
            return authorized.unseal_released(self._tpm(), blob, entry, releases.key, generation)
        except MeasurementsChanged as exc:
            raise ProtocolError("release.unapproved", exc.detail) from None
        except authorized.ReleaseStale as exc:
            raise ProtocolError("release.stale", exc.detail) from None
        except authorized.ReleaseSignatureRefused as exc:
            raise ProtocolError("release.signature", exc.detail) from None

    def pending(self) -> list[Path]:
        """Blobs not sealed under the newest held generation (none without a bundle)."""
        newest = self._newest()
        if newest is None:
            return []
        out = []
        for path in blob_paths(self.directory):
            try:
                generation = blob_generation(KeyBlob.load(path))
            except (TPMError, ValueError, OSError) as exc:
                log.warning("app secret %s does not read (left as it is): %s", path, exc)
                continue
            if generation != newest.generation:
                out.append(path)
        return out

    def reseal(self, on_resealed: Callable[[Path], None]) -> int:
        """Seal every pending secret again under the newest generation (module text);
        ``on_resealed(path)`` after each one is written. The number re-sealed; a secret that does
        not open is logged and left as it is."""
        count = 0
        for path in self.pending():
            blob = KeyBlob.load(path)
            try:
                secret = self.unseal(blob)
            except ProtocolError as exc:
                log.warning(
                    "app secret %s/%s not sealed again: [%s] %s",
                    path.parent.name,
                    path.stem,
                    exc.check,
                    exc.reason,
                )
                continue
            self._fault("unsealed")
            new = self.seal(secret)
            self._fault("sealed")
            new.save(path)
            self._fault("written")
            on_resealed(path)
            count += 1
        if count:
            log.info(
                "%d app secret(s) sealed again under release generation %s",
                count,
                None if self.releases is None else self.releases.generation,
            )
        return count
