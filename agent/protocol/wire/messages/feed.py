"""The revocation feed's signed head (``revocation.feed``, service -> devices).

One body for both ways a device learns revocations (docs/wire.md, "Revocation feed"): the
service keeps the head **retained** on ``kf/v1/feed/revocations`` (addressed to
``FEED_RECIPIENT``), with the newest entries; and it answers a device whose ``keys.report``
shows it behind with pages of the entries it lacks, on the device's command topic (addressed to
the device). ``seq`` and ``head`` are the number and hash of the newest entry the message
vouches for; ``entries`` are consecutive feed entries (``agent.protocol.feed``) ending at
``seq``, oldest first, possibly none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from agent.protocol.errors import ProtocolError
from agent.protocol.wire.messages.base import Body, check_bytes, check_tuple, check_uint

HASH_SIZE = 32
MAX_PAGE = 64
"""Entries per message at most (the 256 KiB message limit bounds their bytes too)."""
MAX_ENTRY = 32 * 1024
"""One entry: a revoke Authorization (one device and up to a quorum of approvals, each with
its operator certificate: a few KiB) and its numbering."""


@dataclass(frozen=True)
class RevocationFeed(Body):
    """Service -> devices: the head of the revocation feed and entries of it."""

    TYPE: ClassVar[str] = "revocation.feed"

    seq: int
    head: bytes
    time: int
    entries: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        check_uint(self.seq, "seq")
        check_bytes(self.head, "head", min_len=HASH_SIZE, max_len=HASH_SIZE)
        check_uint(self.time, "time")
        check_tuple(self.entries, "entries", max_len=MAX_PAGE)
        for entry in self.entries:
            check_bytes(entry, "entries[]", min_len=1, max_len=MAX_ENTRY)
        if len(self.entries) > self.seq:
            raise ProtocolError("body.bounds", "more entries than the feed's sequence number")
