"""The release bundle's carrier (``release.bundle``, service -> devices).

The service keeps it **retained** on ``kf/v1/feed/releases`` (addressed to ``FEED_RECIPIENT``):
the outer envelope is the service's, like every service message; the ``bundle`` inside is a
COSE_Sign1 by the fleet's release-signing key (``agent.protocol.release``), which is what a
device trusts for its sealed state (docs/releases.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from agent.protocol.wire.messages.base import Body, check_bytes

MAX_BUNDLE = 64 * 1024
"""``agent.protocol.release.MAX_BUNDLE`` (repeated: the wire layer does not import the
release module)."""


@dataclass(frozen=True)
class ReleaseBundleMessage(Body):
    """Service -> devices: the signed bundle of approved releases' PCR policies."""

    TYPE: ClassVar[str] = "release.bundle"

    bundle: bytes

    def __post_init__(self) -> None:
        check_bytes(self.bundle, "bundle", min_len=1, max_len=MAX_BUNDLE)
