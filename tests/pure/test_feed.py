"""The revocation feed a device keeps (agent.protocol.feed, Membership.follow_feed): numbering,
hash chain, rollback and fork refusals, entries verified as operators' revoke Authorizations,
strict decoding, state that survives a restart. Real operator and device CAs
(``provisioning.pki``), software keys."""

from __future__ import annotations

import random
from collections.abc import Mapping

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol import authz as az
from agent.protocol.errors import ProtocolError
from agent.protocol.feed import (
    GENESIS,
    FeedEntry,
    FeedState,
    advance,
    entry_hash,
    page,
)
from agent.protocol.hpke import serialize_public_key
from agent.protocol.membership import Membership
from agent.protocol.mls import codec
from agent.protocol.wire.messages.feed import MAX_ENTRY, MAX_PAGE, RevocationFeed
from tests.operator_certs import authorize, membership

pytestmark = pytest.mark.pure

T0 = 1_700_000_000
QUORUM = ("op-alice", "op-bob")


def point() -> bytes:
    return serialize_public_key(ec.generate_private_key(ec.SECP256R1()).public_key())


def revoke_authz(device: str, key: bytes, approvers: tuple[str, ...] = QUORUM) -> bytes:
    return authorize("device.revoke", None, [(device, key)], approvers=approvers, now=T0)


def build(
    n: int, approvers: tuple[str, ...] = QUORUM, start: tuple[int, bytes] = (0, GENESIS)
) -> tuple[list[bytes], list[tuple[str, bytes]]]:
    """``n`` chained entries after ``start``, each revoking one new device."""
    seq, head = start
    entries, revoked = [], []
    for _ in range(n):
        device, key = f"dev-{seq + 1:04d}", point()
        entry = FeedEntry.after(
            seq, head, time=T0 + seq, authz=revoke_authz(device, key, approvers)
        ).encode()
        entries.append(entry)
        revoked.append((device, az.member_key(key)))
        seq, head = seq + 1, entry_hash(entry)
    return entries, revoked


def device(k: int = 2) -> Membership:
    return membership(min_approvals=k)


def refused(m: Membership, head: RevocationFeed) -> str:
    before = m.revocations
    with pytest.raises(ProtocolError) as info, m.transaction():
        m.follow_feed(head)
    assert m.revocations == before  # nothing changed
    return info.value.check


def test_a_device_follows_the_feed_and_keeps_revoked_identities() -> None:
    entries, revoked = build(5)
    m = device()
    assert m.follow_feed(page(entries[:2], time=T0))
    assert m.revocations.seq == 2 and m.revocations.head == entry_hash(entries[1])
    assert m.follow_feed(page(entries, time=T0 + 9))  # overlap with what we hold is fine
    assert m.revocations.seq == 5 and m.revocations.time == T0 + 9
    for device_id, key in revoked:
        assert m.revocations.is_revoked(device_id, key)
    # a re-admitted device comes back under a new DevID key: that identity is not revoked
    assert not m.revocations.is_revoked(revoked[0][0], az.member_key(point()))
    assert not m.follow_feed(page(entries, time=T0 + 9))  # the head we hold: no change


def test_rollback_to_an_older_head_is_refused() -> None:
    """Broker tap (or a rogue service) replaying an older, validly signed head."""
    entries, _ = build(3)
    m = device()
    m.follow_feed(page(entries, time=T0))
    assert refused(m, page(entries[:2], time=T0 + 100)) == "revocation.rollback"


def test_a_forked_feed_is_refused() -> None:
    """Rogue service with the real service key: drops entry 2 and re-chains the rest, or shows
    another history at the number we hold."""
    entries, _ = build(3)
    m = device()
    m.follow_feed(page(entries[:2], time=T0))
    other, _ = build(3)
    # the same number, another hash
    assert refused(m, page(other[:2], time=T0)) == "revocation.fork"
    # an entry 3 that chains onto another entry 2
    assert refused(m, page(other, time=T0)) == "revocation.fork"
    # entry 2 dropped after we saw it: entry 3 re-chained onto entry 1 (as number 2, then with
    # one more after it)
    third = FeedEntry.decode(entries[2])
    rechained = FeedEntry(2, entry_hash(entries[0]), third.time, third.authz).encode()
    assert refused(m, page([entries[0], rechained], time=T0)) == "revocation.fork"
    after, _ = build(1, start=(2, entry_hash(rechained)))
    assert refused(m, page([entries[0], rechained, *after], time=T0)) == "revocation.fork"
    # a head whose hash is not the hash of its entries
    head = page(entries, time=T0)
    bad = RevocationFeed(head.seq, bytes(32), head.time, head.entries)
    assert refused(device(), bad) == "revocation.fork"


def test_a_head_far_ahead_without_the_entries_between_is_a_gap() -> None:
    """Rogue service withholding entries: the device cannot skip them; it asks (benign)."""
    entries, _ = build(5)
    m = device()
    m.follow_feed(page(entries[:1], time=T0))
    assert refused(m, page(entries[3:], time=T0)) == "revocation.gap"
    assert refused(m, RevocationFeed(5, entry_hash(entries[4]), T0)) == "revocation.gap"


def test_a_revocation_one_operator_approved_is_refused_where_two_are_needed() -> None:
    """Single operator (or a rogue service that got one approval): not a revocation."""
    entries, _ = build(1, approvers=("op-alice",))
    assert refused(device(2), page(entries, time=T0)) == "revocation.authz"
    assert device(1).follow_feed(page(entries, time=T0))


def test_entries_whose_authorization_is_not_a_revoke_are_refused() -> None:
    """Rogue service with the real service key presenting a group.add Authorization (a real
    quorum's, for something else) as a revocation, or bytes no operator signed."""
    key = point()
    for authz in (
        authorize("group.add", "g1", [("dev-x", key)], approvers=QUORUM, now=T0),
        b"\xa0",
    ):
        entry = FeedEntry.after(0, GENESIS, time=T0, authz=authz).encode()
        assert refused(device(), page([entry], time=T0)) == "revocation.authz"


def test_bit_flips_in_entries_are_refused_and_change_nothing() -> None:
    entries, _ = build(2)
    rng = random.Random(16)
    m = device()
    m.follow_feed(page(entries[:1], time=T0))
    target = entries[1]
    for _ in range(60):
        i = rng.randrange(len(target) * 8)
        flipped = bytearray(target)
        flipped[i // 8] ^= 1 << (i % 8)
        head = RevocationFeed(2, entry_hash(target), T0, (entries[0], bytes(flipped)))
        check = refused(m, head)
        assert check.startswith("revocation."), check
        # a rogue service with the real service key re-signs a head over the flipped entry:
        # only the entry's informational time may change unnoticed, never what was revoked
        rehashed = RevocationFeed(2, entry_hash(bytes(flipped)), T0, (entries[0], bytes(flipped)))
        try:
            with m.transaction():
                m.follow_feed(rehashed)
        except ProtocolError as exc:
            assert exc.check.startswith("revocation."), exc.check
            continue
        got, want = FeedEntry.decode(bytes(flipped)), FeedEntry.decode(target)
        assert (got.seq, got.prev, got.authz) == (want.seq, want.prev, want.authz)
        m = device()
        m.follow_feed(page(entries[:1], time=T0))
    assert m.revocations.seq == 1


def test_malformed_and_oversize_entries_are_refused() -> None:
    entries, _ = build(2)
    m = device()
    with pytest.raises(ProtocolError) as info:
        FeedEntry.decode(b"\x00" * (MAX_ENTRY + 1))
    assert info.value.check == "revocation.malformed"
    for bad in (b"", b"\xff", codec.encode({"v": 2}), codec.encode([1, 2])):
        with pytest.raises(ProtocolError) as info:
            FeedEntry.decode(bad)
        assert info.value.check == "revocation.malformed"
    zero = codec.encode({"v": 1, "seq": 0, "prev": GENESIS, "time": 0, "authz": b"x"})
    with pytest.raises(ProtocolError, match="numbered from 1"):
        FeedEntry.decode(zero)
    # entries out of order, or not ending at the head's number
    swapped = RevocationFeed(2, entry_hash(entries[1]), T0, (entries[1], entries[0]))
    assert refused(m, swapped) == "revocation.malformed"
    short = RevocationFeed(3, entry_hash(entries[1]), T0, tuple(entries))
    assert refused(m, short) == "revocation.malformed"
    # the body refuses more entries than a page holds before anything is decoded
    with pytest.raises(ProtocolError) as info:
        RevocationFeed(MAX_PAGE + 1, bytes(32), T0, (b"x",) * (MAX_PAGE + 1))
    assert info.value.check == "body.bounds"


def test_feed_state_round_trips_and_old_states_start_empty() -> None:
    entries, revoked = build(3)
    m = device()
    m.follow_feed(page(entries, time=T0))
    saved = m.to_state()
    fresh = device()
    fresh.restore(fresh.parse_state(saved))
    assert fresh.revocations == m.revocations
    assert fresh.revocations.is_revoked(*revoked[2])
    # a state written before devices kept a feed
    legacy = {k: v for k, v in saved.items() if k != "revocations"}
    assert fresh.parse_state(legacy).revocations == FeedState()
    # a tampered state (head and seq disagree) is refused
    broken = dict(saved)
    broken["revocations"] = {**m.revocations.to_state(), "head": GENESIS}
    with pytest.raises(ProtocolError):
        fresh.parse_state(broken)


def test_advance_is_pure() -> None:
    entries, _ = build(2)
    state = FeedState()

    def check(
        signed: bytes, op: str, group: str | None, removed: Mapping[bytes, int]
    ) -> az.VerifiedAuthorization:
        assert op == "device.revoke" and group is None and not removed
        return device().approvals.verify(
            signed, policy=az.QuorumPolicy.initial(2), now=None, op=op, group=None
        )

    after = advance(state, page(entries, time=T0), check)
    assert state == FeedState() and after is not None and after.seq == 2


def test_a_replacement_entry_revokes_the_old_identity_never_the_new_one() -> None:
    old, new = point(), point()

    def replacement(approvers: tuple[str, ...]) -> bytes:
        signed = authorize(
            "device.replace",
            None,
            [("dev-old", old), ("dev-new", new)],
            approvers=approvers,
            now=T0,
            subject=az.replace_subject(["g1"]),
        )
        return FeedEntry.after(0, GENESIS, time=T0, authz=signed).encode()

    m = device()
    assert m.follow_feed(page([replacement(QUORUM)], time=T0))
    assert m.revocations.is_revoked("dev-old", az.member_key(old))
    assert not m.revocations.is_revoked("dev-new", az.member_key(new))
    # one operator's replacement is no feed entry where the policy needs two
    assert refused(device(), page([replacement(("op-alice",))], time=T0)) == "revocation.authz"
    # nor is a membership change of another op (an add names its new member)
    add = authorize("group.add", "g1", [("dev-new", new)], approvers=QUORUM, now=T0)
    entry = FeedEntry.after(0, GENESIS, time=T0, authz=add).encode()
    assert refused(device(), page([entry], time=T0)) == "revocation.authz"
