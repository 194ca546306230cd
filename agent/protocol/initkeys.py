"""Forward secrecy of joins: the rules for one-time init keys, KeyPackage lifetimes and the
joiner's first self-update (docs/treekem.md "Joining"). Pure: the agent core (agent/core.py)
calls these with its clock; the keys themselves live in the TPM (agent/daemon.py ``TpmKeys``).

- Every KeyPackage carries an init key apart from its leaf key. The init key opens exactly one
  Welcome and is destroyed right after (the state no longer refers to it, so the daemon flushes
  it from the TPM and shreds its blob once that state is saved). A Welcome to a package whose init
  key was used already is refused with ``mls.init-key``: its key is gone.
- A KeyPackage is valid for ``KEY_PACKAGE_LIFETIME`` from its creation. Outstanding packages that
  come within ``KEY_PACKAGE_REFRESH`` of their end are dropped (their keys destroyed), so the
  service's next request gets a fresh one rather than one that expires under it.
- Until a joiner has committed a new leaf key, its leaf key is the one that was in the KeyPackage
  (and so in the Welcome's tree, which anyone with the commit log holds): the group entry stays
  *pending a fresh leaf* and the agent asks the service for a self-update (reason
  ``first-update-after-join``), again every ``UPDATE_REQUEST_RETRY`` of the core while pending.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Final

KEY_PACKAGE_LIFETIME: Final = 7 * 24 * 3600
"""A week: long enough for an operator's add request to collect its quorum and for the device to
be offline over a weekend; short enough that a package (and its init key) does not sit around."""
KEY_PACKAGE_REFRESH: Final = 24 * 3600
"""Outstanding packages are dropped this long before they expire: the service asks for a package
just in time (one per add), so the one it gets has at least this much life left."""
MAX_USED_INIT_KEYS: Final = 64
"""How many used KeyPackage references the agent remembers, to name a replayed Welcome's refusal
``mls.init-key`` rather than ``mls.welcome.recipient`` (either way it cannot be opened)."""
JOIN_UPDATE_REASON: Final = "first-update-after-join"


def key_package_lifetime(now: int) -> tuple[int, int]:
    """(not_before, not_after) for a KeyPackage made at ``now``."""
    return (now, now + KEY_PACKAGE_LIFETIME)


def needs_refresh(not_after: int, now: int) -> bool:
    """Whether an outstanding package should be dropped (and its keys destroyed) at ``now``."""
    return now >= not_after - KEY_PACKAGE_REFRESH


def init_key_name(public: bytes) -> str:
    """The key ledger name of an init key, from its public key (never secret)."""
    return "init/" + hashlib.sha256(public).hexdigest()[:16]


class UsedInitKeys:
    """References of KeyPackages whose init key opened a Welcome and was destroyed, newest
    last, bounded."""

    def __init__(self, refs: list[bytes] | None = None) -> None:
        self._refs: OrderedDict[bytes, None] = OrderedDict((r, None) for r in refs or [])

    def add(self, ref: bytes) -> None:
        self._refs[ref] = None
        self._refs.move_to_end(ref)
        while len(self._refs) > MAX_USED_INIT_KEYS:
            self._refs.popitem(last=False)

    def __contains__(self, ref: object) -> bool:
        return ref in self._refs

    def to_list(self) -> list[bytes]:
        return list(self._refs)


def fresh_leaf_pending(own_leaf_key: bytes, joined_leaf_key: bytes | None) -> bool:
    """Whether a member still uses the leaf key it joined with (``joined_leaf_key``, None for a
    group it created or a pre-existing state)."""
    return joined_leaf_key is not None and own_leaf_key == joined_leaf_key
