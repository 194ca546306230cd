"""The state key and the fleet's releases: which signed PCR policy opens the state at start, and
when the state key must be sealed again (``agent.staterotation.StateKeeper`` asks).

With a release key in the agent configuration (``[releases] key``) and a release bundle held,
the state key is sealed with PolicyAuthorize (``agent.tpm.authorized``) under the bundle's
generation ``g``: it opens on any firmware the bundle approves. At start the agent reads the live
PCRs and takes the entry of the newest held bundle that matches them
(``agent.protocol.release.match``):

- an entry matches and the key is sealed under the newest generation: that entry opens it;
- the key is sealed under an older generation (a revocation arrived, the re-seal has not
  committed yet): the same release's entry of the bundle of that older generation opens it, and
  only if the newest bundle still approves the release (a revoked release never opens the state
  here, even before the TPM stops accepting it); then the key is sealed again under the newest
  generation (a state rotation: the counter moves, the old blob is dead);
- no entry matches (an unapproved image): **held** (``release.unapproved``). Nothing is moved:
  the state files stay as they are, the counter keeps its value, so booting an approved release
  again opens the same state. The agent runs without group state and saves nothing over it.

So two bundles may be needed: the newest, and the one of the generation the key is sealed under
while it is older (``HeldReleases.sealed``). A key sealed the old way (PolicyPCR + PolicyNV) is
sealed again the authorized way once a bundle is held (migration).

The PCRs an unapproved image changed are named against the values of the last approved boot
(``release-boot.json``, public: PCR values and a version), since a bundle entry only holds a
digest over its PCRs.

No TPM command is issued here; the keeper passes the live PCRs in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec

from agent.fsio import atomic_write
from agent.protocol.errors import ProtocolError, StateError
from agent.protocol.release import MAX_BUNDLE, ReleaseBundle, ReleaseEntry, match, open_bundle

log = logging.getLogger(__name__)

BOOT_FILE: Final = "release-boot.json"
BUNDLE_FILE: Final = "release-bundle.cose"
SEALED_BUNDLE_FILE: Final = "release-bundle.sealed.cose"
_MAX_BOOT_FILE = 4096


@dataclass
class HeldReleases:
    """The release key and the bundles the agent holds: ``newest`` (the one in force) and
    ``sealed``, the bundle of the generation the state key is sealed under while that is older
    than the newest (until the re-seal commits)."""

    key: ec.EllipticCurvePublicKey
    newest: ReleaseBundle | None = None
    sealed: ReleaseBundle | None = None
    # where the bundles are kept (BUNDLE_FILE, SEALED_BUNDLE_FILE: the release-signed COSE
    # bytes as received, public data); None keeps them in memory only
    directory: Path | None = None
    # the generations other blobs are sealed under (apps' secrets, ``agent.appseal``): the
    # older bundle stays while one of them still needs it, even after the state key's re-seal
    others: Callable[[], Set[int]] | None = None

    @classmethod
    def load(cls, directory: Path, key: ec.EllipticCurvePublicKey) -> HeldReleases:
        """The bundles kept in ``directory``, each verified again with the release key; one
        that does not open is logged and left out (the retained bundle comes again)."""
        newest = _load_bundle(directory / BUNDLE_FILE, key)
        sealed = _load_bundle(directory / SEALED_BUNDLE_FILE, key)
        if newest is None and sealed is not None:
            newest, sealed = sealed, None  # a stop between the two writes of ``adopt``
        return cls(key, newest=newest, sealed=sealed, directory=directory)

    @property
    def generation(self) -> int | None:
        """The generation a new seal is made under (None: no bundle yet, seal the old way)."""
        return None if self.newest is None else self.newest.generation

    def pcrs(self) -> tuple[int, ...]:
        """Every PCR some entry of the newest bundle names (what to read at start)."""
        if self.newest is None:
            return ()
        return tuple(sorted({i for entry in self.newest.releases for i in entry.pcrs}))

    def adopt(self, bundle: ReleaseBundle, sealed_generation: int | None, raw: bytes = b"") -> None:
        """Take ``bundle`` (opened from ``raw`` and checked newer) as the newest, on disk first;
        keep the bundle of ``sealed_generation`` (the state key's) if the new one is of a later
        generation."""
        previous = self.newest
        keep = (
            previous is not None
            and sealed_generation is not None
            and previous.generation == sealed_generation < bundle.generation
        )
        if self.directory is not None:
            if keep:
                try:
                    os.replace(self.directory / BUNDLE_FILE, self.directory / SEALED_BUNDLE_FILE)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise StateError(f"could not keep the older release bundle: {exc}") from None
            atomic_write(self.directory / BUNDLE_FILE, raw, mode=0o644)
        if keep:
            self.sealed = previous
        self.newest = bundle
        if sealed_generation is not None and bundle.generation == sealed_generation:
            self.resealed()

    def resealed(self) -> None:
        """The state key is now sealed under the newest generation: the older bundle goes, unless
        an app secret is still sealed under its generation (``others``; it goes when the app
        secrets have been sealed again and this is called once more)."""
        older = self.sealed
        if older is not None and self.others is not None and older.generation in self.others():
            return
        self.sealed = None
        if self.directory is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / SEALED_BUNDLE_FILE)


class Unapproved(Exception):
    """The live PCRs match no release the newest bundle approves, or the bundle needed to open
    the state is not held: the agent holds its state (``release.unapproved``)."""

    check = "release.unapproved"

    def __init__(self, reason: str) -> None:
        super().__init__(f"[release.unapproved] {reason}")
        self.reason = reason


def choose_entry(
    releases: HeldReleases,
    sealed_generation: int,
    live: Mapping[int, bytes],
    last_boot: Mapping[int, bytes] | None = None,
) -> ReleaseEntry:
    """The entry that opens a key sealed under ``sealed_generation`` on the firmware whose PCRs
    are ``live`` (module text), or ``Unapproved`` saying why not."""
    newest = releases.newest
    if newest is None:
        raise Unapproved("no release bundle is held: the state key cannot be opened")
    entry = match(newest, live)
    if entry is None:
        raise Unapproved(
            f"the running image is not an approved release (bundle seq {newest.seq}, "
            f"generation {newest.generation}): {changed_pcrs(live, last_boot)}"
        )
    if sealed_generation == newest.generation:
        return entry
    older = releases.sealed
    if sealed_generation > newest.generation or older is None:
        raise Unapproved(
            f"the state key is sealed under release generation {sealed_generation} and no "
            f"bundle of that generation is held (newest: {newest.generation})"
        )
    if older.generation != sealed_generation:
        raise Unapproved(
            f"the held older bundle is of generation {older.generation}, the state key's is "
            f"{sealed_generation}"
        )
    candidate = older.version(entry.version)
    if candidate is not None and candidate.pcr_digest == entry.pcr_digest:
        return candidate
    raise Unapproved(
        f"release {entry.version} was not approved in generation {sealed_generation}, which "
        "the state key is sealed under"
    )


def release_status(
    releases: HeldReleases | None,
    *,
    sealed_generation: int | None,
    version: str | None,
    held: str | None,
) -> dict[str, object] | None:
    """The agent status's ``release`` entry (None without a release key)."""
    if releases is None:
        return None
    newest = releases.newest
    return {
        "bundle_seq": None if newest is None else newest.seq,
        "generation": None if newest is None else newest.generation,
        "sealed_generation": sealed_generation,
        "version": version,
        "held": held,
    }


def _load_bundle(path: Path, key: ec.EllipticCurvePublicKey) -> ReleaseBundle | None:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_BUNDLE + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("release bundle %s does not read (left out): %s", path, exc.strerror)
        return None
    try:
        return open_bundle(data, key)
    except ProtocolError as exc:
        log.warning("release bundle %s refused (left out): [%s] %s", path, exc.check, exc.reason)
        return None


def changed_pcrs(live: Mapping[int, bytes], last_boot: Mapping[int, bytes] | None) -> str:
    """Which PCRs differ from the last approved boot, for people."""
    if not last_boot:
        return f"PCRs {sorted(live)} match no approved release"
    differ = sorted(i for i in live if last_boot.get(i) != live[i])
    if not differ:
        return f"PCRs {sorted(live)} match no approved release"
    return f"PCRs {differ} differ from the last approved boot"


def save_boot(directory: Path, version: str, values: Mapping[int, bytes]) -> None:
    """Record the PCR values of an approved boot (public data)."""
    body = {"version": version, "pcrs": {str(i): values[i].hex() for i in sorted(values)}}
    atomic_write(directory / BOOT_FILE, json.dumps(body, sort_keys=True).encode(), mode=0o644)


def load_boot(directory: Path) -> dict[int, bytes] | None:
    """The PCR values of the last approved boot; None if there is none or it does not read."""
    path = directory / BOOT_FILE
    try:
        with open(path, "rb") as handle:
            data = json.loads(handle.read(_MAX_BOOT_FILE))
        pcrs = data["pcrs"]
        return {int(i): bytes.fromhex(v) for i, v in pcrs.items()}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("%s does not read (ignored): %s", path, exc)
        return None
