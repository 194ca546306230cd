"""The revocation feed, service side (docs/authorization.md, "The revocation feed").

When operators' approvals of a ``device.revoke`` request, or admins' approvals of an
``operator.remove`` request, meet the quorum, the service appends the request's Authorization
to the feed (``on_revoked``, in the transaction that executes the request) and publishes the
feed's head, signed like every service message and **retained** on ``kf/v1/feed/revocations``,
with the newest entries. A device whose ``keys.report`` shows an
older feed gets the entries it lacks as pages on its command topic (``on_report``); how far each
device is, is recorded for the dashboard and operators (``lagging``).

The service cannot make an entry up (devices verify each Authorization against the operator CA
and quorum) nor drop one unnoticed (the chain and the device's kept head). The feed table is
append-only: numbering is the primary key, so two instances appending at once conflict and
one transaction retries.
"""

from __future__ import annotations

import logging
from typing import Final

from sqlalchemy.orm import Session

from agent.protocol.feed import GENESIS, MAX_PAGE, FeedEntry, entry_hash, page
from agent.protocol.topics import FEED_RECIPIENT, REVOCATION_FEED_TOPIC, device_cmd_topic
from agent.protocol.wire.messages.feed import RevocationFeed
from provisioning.service.effects import Effects, Log, Send
from provisioning.service.store import revocations as rows

log = logging.getLogger("keyfleet.service")

HEAD_ENTRIES: Final = 16
"""Entries the retained head carries: a device at most this far behind needs nothing else."""
PAGE_BYTES: Final = 160 * 1024
"""Entry bytes per message at most (the message limit is 256 KiB)."""
CATCHUP_PAGES: Final = 4
"""Pages sent for one keys.report (the device reports again once it moved: the next pages)."""


def newest(session: Session) -> tuple[int, bytes]:
    """(seq, hash) of the newest entry; (0, GENESIS) for an empty feed."""
    found = rows.newest(session)
    return (0, GENESIS) if found is None else found


def append(session: Session, authz: bytes, *, now: int) -> int:
    """Append the Authorization of an executed revocation; returns its number."""
    seq, head = newest(session)
    entry = FeedEntry.after(seq, head, time=now, authz=authz).encode()
    rows.add_entry(session, seq + 1, entry, entry_hash(entry), now=now)
    return seq + 1


def _page(
    session: Session, first: int, last: int, *, now: int, newest_first: bool
) -> RevocationFeed:
    """Entries of ``first..last`` that fit one message: the oldest ones (a catch-up page) or,
    ``newest_first``, the newest ones (the retained head)."""
    picked: list[bytes] = []
    size = 0
    for entry in rows.entries(session, first, last, limit=MAX_PAGE, newest_first=newest_first):
        size += len(entry)
        if picked and size > PAGE_BYTES:
            break
        picked.append(entry)
    if newest_first:
        picked.reverse()
    return page(picked, time=now)


def head(session: Session, *, now: int) -> RevocationFeed | None:
    """The retained head: the newest entry's number and hash with the newest entries."""
    seq, _ = newest(session)
    if seq == 0:
        return None
    return _page(session, max(1, seq - HEAD_ENTRIES + 1), seq, now=now, newest_first=True)


def publish_head(session: Session, *, now: int) -> Effects:
    body = head(session, now=now)
    if body is None:
        return []
    return [Send(REVOCATION_FEED_TOPIC, body, FEED_RECIPIENT)]


def on_revoked(session: Session, authz: bytes, *, now: int) -> Effects:
    """A revocation (of devices or of an operator) was executed under ``authz``: append it and
    publish the new head."""
    seq = append(session, authz, now=now)
    return [
        Log(logging.INFO, "revocation feed entry %d appended", (seq,)),
        *publish_head(session, now=now),
    ]


def on_report(
    session: Session, device_id: str, seq: int | None, *, now: int, ours: int | None = None
) -> Effects:
    """A device's keys.report says how far its kept feed is (None: an agent without a feed):
    record it; send the entries it lacks. ``ours``: the newest entry's number, if the caller
    read it already in this transaction (a batch of reports reads it once)."""
    if seq is None:
        return []
    rows.record_seen(session, device_id, seq, now=now)
    if ours is None:
        ours, _ = newest(session)
    if seq > ours:
        return [
            Log(
                logging.ERROR,
                "device %s holds revocation feed entry %d, the service only %d: the feed "
                "table was rolled back (restore it from a backup)",
                (device_id, seq, ours),
            )
        ]
    effects: Effects = []
    first = seq + 1
    while first <= ours and len(effects) < CATCHUP_PAGES:
        body = _page(session, first, ours, now=now, newest_first=False)
        effects.append(Send(device_cmd_topic(device_id), body, device_id))
        first = body.seq + 1
    return effects


def lagging(session: Session) -> list[tuple[str, int]]:
    """(device, its feed seq) of every device behind the newest entry, most behind first."""
    ours, _ = newest(session)
    return rows.behind(session, ours)
