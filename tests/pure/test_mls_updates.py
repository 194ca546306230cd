"""Update proposals committed by another member (RFC 9420 §12.1.2, keyfleet's form): a full
rekey in one commit. Every member follows it (updated or not, and the committer), the old leaf
keys of the updated members open nothing of the commit, forged / duplicate / self updates are
refused by check id with nothing changed, the updated leaves' paths are blank, ordinary commits
work afterwards, and the decoder bounds what a commit may carry. Software keys."""

from __future__ import annotations

from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol.errors import CryptoError, ProtocolError
from agent.protocol.mls import codec
from agent.protocol.mls.crypto import decrypt_with_label
from agent.protocol.mls.group import CommitResult, Group
from agent.protocol.mls.messages import (
    MAX_UPDATES,
    Commit,
    Update,
)
from agent.protocol.mls.public import UPDATE_PATH_LABEL, PublicGroup
from agent.protocol.mls.tree import SOURCE_UPDATE
from agent.protocol.wire.messages.base import DEFAULT_MAX_MESSAGE_SIZE
from provisioning.service.fullrekey import BATCH
from tests.pure.test_mls_group import (
    FakeCountingKey,
    Member,
    World,
    _resign,
    _world_of,
    new_key,
)

pytestmark = pytest.mark.pure


def _world(size: int) -> World:
    world = World()
    world.add(world.members_any(), size - 1)
    return world


def _propose(world: World, members: list[Member]) -> dict[bytes, FakeCountingKey]:
    """Each of ``members`` makes a new leaf key and its Update; returns the pending keys."""
    return {m.device_id: FakeCountingKey() for m in members}


def _updates(pending: dict[bytes, FakeCountingKey], world: World) -> list[Update]:
    return [
        world.members[d].g.propose_update(world.members[d].signature_key, k.public_key())
        for d, k in pending.items()
    ]


def _deliver_with_updates(
    world: World,
    committer: Member,
    result: CommitResult,
    pending: dict[bytes, FakeCountingKey],
) -> None:
    """The service's check and fan-out, with each member passing its pending proposal keys."""
    commit = Commit.decode(result.commit.encode())
    verified = world.service.verify(commit)
    world.service = PublicGroup(verified.next_state())
    world.history.append(commit)
    world.contexts.append(verified.provisional_context)
    carried = {u.leaf_index for u in commit.content.updates}
    for m in world.members.values():
        if m is committer:
            m.group = result.group
            continue
        key = pending.get(m.device_id)
        own = [key] if key is not None else []
        m.leaf_key.exchanges = 0
        if key is not None:
            key.exchanges = 0
        m.group = m.g.process(commit, proposed_leaf_keys=own)
        if m.g.own_leaf in carried:
            assert key is not None
            m.leaf_key = key
        assert m.leaf_key.exchanges <= 1


def _try_every_key(keys: list[ec.EllipticCurvePrivateKey], commit: Commit, context: bytes) -> None:
    for node in commit.content.path.nodes:
        for kem, ct in node.encrypted_path_secret:
            for key in keys:
                with pytest.raises(CryptoError):
                    decrypt_with_label(key, UPDATE_PATH_LABEL, context, kem, ct)


def test_one_commit_rekeys_every_leaf_and_everyone_follows() -> None:
    world = _world(13)
    committer = world.by_leaf(5)
    others = [m for m in world.members.values() if m is not committer]
    old_keys: list[ec.EllipticCurvePrivateKey] = [m.leaf_key for m in others]
    pending = _propose(world, others)
    updates = _updates(pending, world)
    result = committer.g.commit(committer.signature_key, updates=updates)
    _deliver_with_updates(world, committer, result, pending)
    world.check_agreement()
    commit = world.history[-1]
    tree = world.service.tree
    for m in others:
        leaf = tree.leaf(m.g.own_leaf)
        assert leaf is not None and leaf.source == SOURCE_UPDATE
        assert m.g._leaf_key is pending[m.device_id]
    # forward secrecy: no old leaf key of an updated member opens any path secret of the commit
    _try_every_key(old_keys, commit, world.contexts[-1])
    # every parent not on the committer's filtered direct path is blank now
    on_path = {x for x, _ in tree.filtered_direct_path(committer.g.own_leaf)}
    for x in range(1, 2 * tree.n_leaves - 1, 2):
        assert (tree.parent_node(x) is not None) == (x in on_path)
    # ordinary commits follow, by an updated member too
    world.update(others[3])
    world.check_agreement()
    world.remove(others[0], others[1])
    world.add(others[2], 2)
    world.check_agreement()


def test_a_partial_batch_leaves_the_others_with_their_old_keys() -> None:
    world = _world(9)
    committer = world.by_leaf(0)
    members = sorted(world.members.values(), key=lambda m: m.g.own_leaf)
    proposers = members[1:6]
    pending = _propose(world, proposers)
    updates = _updates(pending, world)
    # the committer takes only three; the other two proposals are not committed
    result = committer.g.commit(committer.signature_key, updates=updates[:3])
    _deliver_with_updates(world, committer, result, pending)
    world.check_agreement()
    for m in proposers[:3]:
        assert m.leaf_key is pending[m.device_id]
    for m in proposers[3:]:
        assert m.leaf_key is not pending[m.device_id]
        assert m.g._leaf_key is m.leaf_key
    # the next commit carries the rest: their proposals were made at the previous epoch, and a
    # leaf signature names the group and the leaf index only, so they still verify
    rest = updates[3:]
    result = committer.g.commit(committer.signature_key, updates=rest)
    _deliver_with_updates(
        world, committer, result, {m.device_id: pending[m.device_id] for m in proposers[3:]}
    )
    world.check_agreement()


def _expect_refused(world: World, receiver: Member, commit: Commit, check: str) -> None:
    before = receiver.g.to_state()
    with pytest.raises(ProtocolError) as exc:
        receiver.g.process(commit)
    assert exc.value.check == check
    assert receiver.g.to_state() == before
    with pytest.raises(ProtocolError) as exc:
        world.service.verify(commit)
    assert exc.value.check == check


def _forge(committer: Member, commit: Commit, updates: list[Update]) -> Commit:
    """The commit with other updates, re-signed by its committer (so only the updates are
    wrong)."""
    content = replace(commit.content, updates=tuple(updates))
    return _resign(committer, replace(commit, content=content))


def test_invalid_updates_are_refused_by_check_id() -> None:
    world = _world(6)
    committer, a, b, receiver = (world.by_leaf(i) for i in (0, 1, 2, 3))
    good = a.g.propose_update(a.signature_key, new_key().public_key())
    # signed by another member's key: the leaf signature does not verify under a's key
    forged = Update.create(
        b.signature_key,
        a.g.tree.leaf(1),  # type: ignore[arg-type]
        new_key().public_key(),
        group_id=a.g.group_id,
        leaf_index=1,
    )
    self_update = committer.g.propose_update(committer.signature_key, new_key().public_key())
    second = a.g.propose_update(a.signature_key, new_key().public_key())
    reused = replace(good, leaf_index=2)
    same_key = b.g.propose_update(b.signature_key, receiver.leaf_key.public_key())
    blank = Update.create(
        a.signature_key,
        a.g.tree.leaf(1),  # type: ignore[arg-type]
        new_key().public_key(),
        group_id=a.g.group_id,
        leaf_index=9,
    )
    cases = [
        ([forged], "mls.leaf.signature"),
        ([reused], "mls.leaf.signature"),  # a's update moved to b's leaf
        ([self_update], "mls.update.self"),
        ([good, second], "mls.update.duplicate"),
        ([same_key], "mls.update.duplicate-key"),
        ([blank], "mls.update.blank"),
    ]
    for updates, check in cases:
        with pytest.raises(ProtocolError) as exc:
            committer.g.commit(committer.signature_key, updates=updates)
        assert exc.value.check == check
        honest = committer.g.commit(committer.signature_key, updates=[good]).commit
        _expect_refused(world, receiver, _forge(committer, honest, updates), check)
    # updating a leaf the same commit removes
    with pytest.raises(ProtocolError) as exc:
        committer.g.commit(committer.signature_key, updates=[good], removes=[1])
    assert exc.value.check == "mls.update.removed"


def test_a_commit_of_our_update_with_a_key_we_do_not_hold_is_refused() -> None:
    world = _world(4)
    committer, a = world.by_leaf(0), world.by_leaf(1)
    mine = FakeCountingKey()
    update = a.g.propose_update(a.signature_key, mine.public_key())
    commit = committer.g.commit(committer.signature_key, updates=[update]).commit
    before = a.g.to_state()
    with pytest.raises(ProtocolError) as exc:
        a.g.process(commit, proposed_leaf_keys=[FakeCountingKey()])
    assert exc.value.check == "mls.update.unknown-key"
    assert a.g.to_state() == before
    a.g.process(commit, proposed_leaf_keys=[FakeCountingKey(), mine])


def test_the_old_leaf_key_of_an_updated_member_cannot_follow() -> None:
    world = _world(8)
    committer, victim = world.by_leaf(2), world.by_leaf(6)
    stolen = victim.g  # its state and old leaf key, taken before the rekey
    pending = _propose(world, [victim])
    result = committer.g.commit(committer.signature_key, updates=_updates(pending, world))
    _deliver_with_updates(world, committer, result, pending)
    world.check_agreement()
    commit = world.history[-1]
    with pytest.raises(ProtocolError) as exc:
        stolen.process(commit)
    assert exc.value.check == "mls.update.unknown-key"
    keys: list[ec.EllipticCurvePrivateKey] = [stolen._leaf_key, *stolen._node_keys.values()]
    _try_every_key(keys, commit, world.contexts[-1])


def test_commits_without_updates_encode_as_before_and_the_decoder_is_strict() -> None:
    world = _world(3)
    committer, a = world.by_leaf(0), world.by_leaf(1)
    plain = committer.g.update(committer.signature_key, FakeCountingKey()).commit
    assert "updates" not in plain.content.to_obj()
    update = a.g.propose_update(a.signature_key, new_key().public_key())
    carried = committer.g.commit(committer.signature_key, updates=[update]).commit
    assert Commit.decode(carried.encode()) == carried
    assert Update.decode(update.encode()) == update
    obj = carried.to_obj()
    content = dict(obj["content"])  # type: ignore[call-overload]
    for bad in (
        [],  # an empty list: absent is the only encoding of none
        [update.to_obj()] * (MAX_UPDATES + 1),
        [[1, update.encryption_key]],
        [[1, b"\x04" + bytes(64), update.signature]],
        [[codec.MAX_LEAVES, update.encryption_key, update.signature]],
    ):
        content["updates"] = bad
        data = codec.encode({**obj, "content": content})
        with pytest.raises(ProtocolError) as exc:
            Commit.decode(data)
        assert exc.value.check.startswith("mls.decode")
    with pytest.raises(ProtocolError) as exc:
        Update.decode(bytes(300))
    assert exc.value.check.startswith("cbor")


def test_a_thousand_members_rekeyed_in_a_few_commits_that_fit_the_wire() -> None:
    """The service's batch (``provisioning.service.fullrekey.BATCH``) at N = 1000, in a group
    made in one step: each commit fits a group.commit message, and sampled members (one of
    each batch, followed through every commit) stay in agreement with the committer."""

    members = [Member.new() for _ in range(1000)]
    states = Group.assemble(
        b"big", [(m.key_package(), m.leaf_key, m.signature_key) for m in members], epoch=1
    )
    for m, g in zip(members, states, strict=True):
        m.group = g
    world = _world_of(members)
    committer, others = members[0], members[1:]
    batches = [others[i : i + BATCH] for i in range(0, len(others), BATCH)]
    assert len(batches) <= 3
    sampled = [b[len(b) // 2] for b in batches]
    for batch in batches:
        pending = _propose(world, batch)
        result = committer.g.commit(committer.signature_key, updates=_updates(pending, world))
        data = result.commit.encode()
        assert len(data) < DEFAULT_MAX_MESSAGE_SIZE - 4096  # room for the envelope
        world.service = PublicGroup(world.service.verify(Commit.decode(data)).next_state())
        committer.group = result.group
        for m in sampled:
            key = pending.get(m.device_id)
            m.group = m.g.process(result.commit, proposed_leaf_keys=[key] if key else [])
            assert m.g.data_key() == committer.g.data_key()
    tree = world.service.tree
    assert all(
        leaf.source == SOURCE_UPDATE for i, leaf in tree.members() if i != committer.g.own_leaf
    )
