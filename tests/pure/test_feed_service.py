"""The service side of the revocation feed (provisioning.service.feed) on a SQLite file: entries
appended in order and chained, the retained head with the newest entries, catch-up pages a
device far behind follows to the head, and the record of who lags. Real operator CA and
approvals (``tests.operator_certs``); the device side is ``Membership.follow_feed``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.orm import Session

from agent.protocol.errors import ProtocolError
from agent.protocol.feed import FeedEntry, entry_hash
from agent.protocol.hpke import serialize_public_key
from agent.protocol.topics import FEED_RECIPIENT, REVOCATION_FEED_TOPIC, device_cmd_topic
from agent.protocol.wire.messages.feed import RevocationFeed
from provisioning.db.runtime import create_service_schema
from provisioning.registry import create_schema, make_engine, session_factory
from provisioning.service import feed
from provisioning.service.effects import Send
from tests.operator_certs import authorize, membership

pytestmark = pytest.mark.pure

T0 = 1_700_000_000
N = 70


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    create_schema(engine)
    create_service_schema(engine)
    with session_factory(engine)() as s:
        yield s
    engine.dispose()


def revoke(i: int) -> bytes:
    point = serialize_public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
    return authorize(
        "device.revoke", None, [(f"dev-{i:04d}", point)], approvers=("op-alice", "op-bob"), now=T0
    )


def sends(effects: list[object]) -> list[Send]:
    return [e for e in effects if isinstance(e, Send)]


def test_appended_entries_chain_and_the_head_carries_the_newest(session: Session) -> None:
    assert feed.head(session, now=T0) is None
    assert feed.publish_head(session, now=T0) == []
    for i in range(1, N + 1):
        effects = feed.on_revoked(session, revoke(i), now=T0 + i)
        (send,) = sends(effects)
        assert send.topic == REVOCATION_FEED_TOPIC and send.to == FEED_RECIPIENT
        assert isinstance(send.body, RevocationFeed) and send.body.seq == i
    head = feed.head(session, now=T0)
    assert head is not None and head.seq == N and len(head.entries) == feed.HEAD_ENTRIES
    seq, digest = feed.newest(session)
    assert (seq, digest) == (N, head.head)
    last = FeedEntry.decode(head.entries[-1])
    assert last.seq == N and entry_hash(head.entries[-1]) == digest
    assert last.prev == entry_hash(head.entries[-2])

    # a device that keeps nothing yet cannot take the head alone (a gap) ...
    device = membership(min_approvals=2)
    with pytest.raises(ProtocolError) as info:
        device.follow_feed(head)
    assert info.value.check == "revocation.gap"
    # ... its keys.report (feed 0) brings pages on its command topic up to the head
    at = 0
    while at < N:
        pages = sends(feed.on_report(session, "dev-x", at, now=T0))
        assert pages and len(pages) <= feed.CATCHUP_PAGES
        for p in pages:
            assert p.topic == device_cmd_topic("dev-x") and p.to == "dev-x"
            assert isinstance(p.body, RevocationFeed)
            assert device.follow_feed(p.body)
        at = device.revocations.seq
    assert device.revocations.seq == N and device.revocations.head == digest
    assert not device.follow_feed(head)  # the retained head is now the one it holds
    assert len(device.revocations.revoked) == N


def test_reports_record_who_lags(session: Session) -> None:
    for i in range(1, 4):
        feed.on_revoked(session, revoke(i), now=T0)
    assert feed.on_report(session, "dev-old", None, now=T0) == []
    feed.on_report(session, "dev-a", 3, now=T0)
    feed.on_report(session, "dev-b", 1, now=T0)
    assert feed.lagging(session) == [("dev-b", 1)]
    # a device ahead of the service: the feed table was rolled back; nothing is sent
    effects = feed.on_report(session, "dev-c", 9, now=T0)
    assert sends(effects) == [] and "rolled back" in str(effects[0])
