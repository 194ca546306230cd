"""TreeKEM groups with software keys: agreement over random add/remove/update sequences, the
delivery service's public view following every commit, removed members locked out,
post-compromise security of a self-update, rejections by check id without state change, at most
one leaf-key exchange per processed commit, state round trips."""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.protocol.errors import CryptoError, ProtocolError, StateError
from agent.protocol.mls import codec
from agent.protocol.mls import tree_math as tm
from agent.protocol.mls.crypto import decrypt_with_label
from agent.protocol.mls.group import Group, admissions_of, legacy_admissions
from agent.protocol.mls.messages import (
    Commit,
    CommitContent,
    GroupInfo,
    KeyPackage,
    UpdatePathNode,
    Welcome,
)
from agent.protocol.mls.parenthash import verify_tree
from agent.protocol.mls.public import UPDATE_PATH_LABEL, PublicGroup
from agent.protocol.mls.tree import LeafNode, ParentNode, RatchetTree
from tests.device_certs import devid_cert_der
from tests.pure.test_wire_cose import FakeResidentKey

pytestmark = pytest.mark.pure

_ids = itertools.count()


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


class FakeCountingKey(FakeResidentKey):
    """Stands in for a TPM leaf key: only ``exchange`` and ``public_key`` work, and ``exchange``
    calls are counted (each would be one ECDH_ZGen on a device)."""

    misuse = "a TPM leaf key cannot be used for this"

    def __init__(self, inner: ec.EllipticCurvePrivateKey | None = None) -> None:
        super().__init__(inner or new_key())
        self.exchanges = 0

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        self.exchanges += 1
        return self._inner.exchange(algorithm, peer_public_key)

    sign = FakeResidentKey._refuse


@dataclass
class Member:
    """A device: DevID signature key, TPM-like leaf key, and its current group state."""

    device_id: bytes
    signature_key: ec.EllipticCurvePrivateKey = field(default_factory=new_key)
    leaf_key: FakeCountingKey = field(default_factory=FakeCountingKey)
    init_key: FakeCountingKey = field(default_factory=FakeCountingKey)
    group: Group | None = None
    _kp: KeyPackage | None = None
    _cred: bytes | None = None

    @classmethod
    def new(cls) -> Member:
        return cls(f"dev-{next(_ids)}".encode())

    def key_package(self) -> KeyPackage:
        # one per device (ECDSA is randomized: a second one would have another reference)
        if self._kp is None:
            self._kp = KeyPackage.create(
                self.device_id,
                self.signature_key,
                self.leaf_key.public_key(),
                self.credential(),
                init_key=self.init_key.public_key(),
            )
        return self._kp

    def credential(self) -> bytes:
        if self._cred is None:
            self._cred = devid_cert_der(self.device_id, self.signature_key)
        return self._cred

    @property
    def g(self) -> Group:
        assert self.group is not None
        return self.group


class World:
    """Members, the delivery service's public view, and helpers to run commits through all of
    them the way the service would (one commit per epoch, fanned out to every member)."""

    def __init__(self) -> None:
        creator = Member.new()
        creator.group = Group.create(b"group-1", creator.key_package(), creator.leaf_key)
        self.members: dict[bytes, Member] = {creator.device_id: creator}
        self.service = creator.g.public_group()
        self.removed: list[Member] = []
        self.history: list[Commit] = []
        self.contexts: list[bytes] = []  # each commit's provisional GroupContext
        self.saw_unmerged = False

    def by_leaf(self, leaf: int) -> Member:
        return next(m for m in self.members.values() if m.g.own_leaf == leaf)

    def deliver(self, committer: Member, result: Any) -> None:
        commit = Commit.decode(result.commit.encode())
        verified = self.service.verify(commit)
        self.service = PublicGroup(verified.next_state())
        self.history.append(commit)
        self.contexts.append(verified.provisional_context)
        tree = verified.tree
        verify_tree(tree)
        self.saw_unmerged |= any(
            isinstance(tree.node(x), ParentNode) and tree.parent_node(x).unmerged_leaves  # type: ignore[union-attr]
            for x in range(1, 2 * tree.n_leaves - 1, 2)
        )
        for m in list(self.members.values()):
            if m is committer:
                m.group = result.group
            elif m.g.own_leaf in commit.content.removes:
                before = m.g.to_state()
                with pytest.raises(ProtocolError) as exc:
                    m.g.process(commit)
                assert exc.value.check == "mls.removed"
                assert m.g.to_state() == before
                assert_cannot_decrypt(m.g, commit, self.contexts[-1])
                del self.members[m.device_id]
                self.removed.append(m)
            else:
                m.leaf_key.exchanges = 0
                m.group = m.g.process(commit)
                assert m.leaf_key.exchanges <= 1
        for gone in self.removed:
            before = gone.g.to_state()
            with pytest.raises(ProtocolError):
                gone.g.process(commit)
            assert gone.g.to_state() == before

    def add(self, committer: Member, count: int) -> None:
        joiners = [Member.new() for _ in range(count)]
        result = committer.g.add(committer.signature_key, [j.key_package() for j in joiners])
        self.deliver(committer, result)
        assert result.welcome is not None
        welcome = Welcome.decode(result.welcome.encode())
        self.service.check_welcome(self.history[-1], welcome)
        for j in joiners:
            j.leaf_key.exchanges = j.init_key.exchanges = 0
            j.group = Group.join(welcome, j.key_package(), j.leaf_key, init_key=j.init_key)
            # joining costs exactly one ECDH, on the one-time init key, none on the leaf key
            assert (j.init_key.exchanges, j.leaf_key.exchanges) == (1, 0)
            self.members[j.device_id] = j

    def members_any(self) -> Member:
        return next(iter(self.members.values()))

    def remove(self, committer: Member, target: Member) -> None:
        self.deliver(committer, committer.g.remove(committer.signature_key, [target.g.own_leaf]))

    def update(self, committer: Member) -> None:
        new_leaf = FakeCountingKey()
        self.deliver(committer, committer.g.update(committer.signature_key, new_leaf))
        committer.leaf_key = new_leaf

    def check_agreement(self) -> None:
        groups = [m.g for m in self.members.values()]
        assert len({g.epoch for g in groups}) == 1
        assert groups[0].epoch == self.service.epoch
        assert len({g.epoch_authenticator for g in groups}) == 1
        assert len({g.data_key() for g in groups}) == 1
        assert len({g.export(b"other", b"ctx", 16) for g in groups}) == 1
        assert {g.tree_hash() for g in groups} == {self.service.tree_hash()}
        assert {g.group_context() for g in groups} == {self.service.state.group_context()}
        assert sorted(d for _, d in groups[0].members()) == sorted(self.members)


def assert_cannot_decrypt(group: Group, commit: Commit, context: bytes) -> None:
    """No key this state holds (leaf or parent) opens any path secret in ``commit``, even with
    the right provisional ``context`` (so a failure is the key's)."""
    keys: list[ec.EllipticCurvePrivateKey] = [group._leaf_key, *group._node_keys.values()]
    assert keys
    for node in commit.content.path.nodes:
        for kem, ct in node.encrypted_path_secret:
            for key in keys:
                with pytest.raises(CryptoError):
                    decrypt_with_label(key, UPDATE_PATH_LABEL, context, kem, ct)


OPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "add", "remove", "update"]),
        st.integers(0, 1 << 16),
        st.integers(0, 1 << 16),
        st.integers(1, 12),
    ),
    min_size=1,
    max_size=14,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_random_operations_keep_every_member_in_agreement(
    ops: list[tuple[str, int, int, int]],
) -> None:
    world = World()
    for op, a, b, n in ops:
        members = sorted(world.members.values(), key=lambda m: m.g.own_leaf)
        committer = members[a % len(members)]
        if (op == "add" and len(members) < 64) or len(members) == 1:
            world.add(committer, min(n, 64 - len(members)))
        elif op == "remove":
            others = [m for m in members if m is not committer]
            world.remove(committer, others[b % len(others)])
        else:
            world.update(committer)
        world.check_agreement()
        assert len(world.members) <= 64


def test_sixty_four_members_with_blanks_and_unmerged_leaves() -> None:
    world = World()
    world.add(world.members_any(), 20)
    members = list(world.members.values())
    for target in members[3:9]:
        world.remove(members[12], target)
        world.check_agreement()
    world.add(members[1], 30)
    world.update(members[2])
    world.add(members[15], 64 - len(world.members))
    world.check_agreement()
    assert len(world.members) == 64
    for m in list(world.members.values())[::7]:
        world.update(m)
        world.check_agreement()
    # some parent nodes carried unmerged leaves along the way, and some are blank now
    tree = world.service.tree
    assert any(tree.node(x) is None for x in range(1, 2 * tree.n_leaves - 1, 2))
    assert world.saw_unmerged


def test_post_compromise_security_of_a_self_update() -> None:
    world = World()
    world.add(world.members_any(), 11)
    victim = list(world.members.values())[5]
    stolen_state = victim.g.to_state()
    stolen_leaf = victim.leaf_key
    stolen = Group.from_state(stolen_state, lambda ref: stolen_leaf)
    world.update(victim)
    world.check_agreement()
    commit = world.history[-1]
    assert_cannot_decrypt(stolen, commit, world.contexts[-1])
    with pytest.raises(ProtocolError):
        stolen.process(commit)
    # the thief also cannot follow a later commit by someone else
    world.update(next(iter(world.members.values())))
    with pytest.raises(ProtocolError) as exc:
        stolen.process(world.history[-1])
    assert exc.value.check == "mls.epoch-future"
    assert_cannot_decrypt(stolen, world.history[-1], world.contexts[-1])


def test_a_removed_member_cannot_follow_later_commits() -> None:
    world = World()
    world.add(world.members_any(), 7)
    members = list(world.members.values())
    world.remove(members[0], members[1])
    assert world.removed == [members[1]]
    for committer in members[2:5]:
        world.update(committer)
        world.check_agreement()
        assert_cannot_decrypt(members[1].g, world.history[-1], world.contexts[-1])


# -- rejections ------------------------------------------------------------------------------


def _three() -> tuple[World, Member, Member]:
    world = World()
    world.add(world.members_any(), 3)
    ms = list(world.members.values())
    return world, ms[0], ms[2]


def _expect(receiver: Member, commit: Commit, check: str) -> None:
    before = receiver.g.to_state()
    with pytest.raises(ProtocolError) as exc:
        receiver.g.process(commit)
    assert exc.value.check == check
    assert receiver.g.to_state() == before


def test_stale_and_future_epochs_are_refused() -> None:
    world, committer, receiver = _three()
    old = committer.g.update(committer.signature_key, FakeCountingKey()).commit
    world.update(committer)
    _expect(receiver, old, "mls.epoch-stale")
    with pytest.raises(ProtocolError) as exc:
        world.service.apply(old)
    assert exc.value.check == "mls.epoch-stale"
    ahead = committer.g.update(committer.signature_key, FakeCountingKey())
    future = ahead.group.update(committer.signature_key, FakeCountingKey()).commit
    _expect(receiver, future, "mls.epoch-future")
    # the receiver still follows the real next commit
    world.update(committer)
    world.check_agreement()


def test_forged_signature_is_refused() -> None:
    world, committer, receiver = _three()
    commit = committer.g.update(committer.signature_key, FakeCountingKey()).commit
    forger = new_key()
    forged = replace(commit, signature=forger.sign(b"x", ec.ECDSA(hashes.SHA256())))
    _expect(receiver, forged, "mls.commit.signature")
    with pytest.raises(ProtocolError) as exc:
        world.service.apply(forged)
    assert exc.value.check == "mls.commit.signature"
    # a different sender index with the same signature does not pass either
    content = replace(commit.content, sender=receiver.g.own_leaf)
    _expect(
        list(world.members.values())[1], replace(commit, content=content), "mls.commit.signature"
    )


def _tamper_ciphertexts(commit: Commit) -> Commit:
    nodes = tuple(
        UpdatePathNode(
            n.encryption_key,
            tuple((kem, ct[:-1] + bytes([ct[-1] ^ 1])) for kem, ct in n.encrypted_path_secret),
        )
        for n in commit.content.path.nodes
    )
    path = replace(commit.content.path, nodes=nodes)
    return replace(commit, content=replace(commit.content, path=path))


def test_tampered_ciphertext_is_refused() -> None:
    _world, committer, receiver = _three()
    commit = committer.g.update(committer.signature_key, FakeCountingKey()).commit
    # re-signed by the committer, so only the ciphertext is wrong
    tampered = _tamper_ciphertexts(commit)
    resigned = _resign(committer, tampered)
    _expect(receiver, resigned, "mls.path.decrypt")
    # without re-signing the signature check catches it first
    _expect(receiver, tampered, "mls.commit.signature")


def _resign(committer: Member, commit: Commit) -> Commit:
    from agent.protocol.mls.crypto import sign_with_label
    from agent.protocol.mls.public import COMMIT_LABEL, commit_tbs

    signature = sign_with_label(
        committer.signature_key,
        COMMIT_LABEL,
        commit_tbs(commit.content, committer.g.group_context()),
    )
    return replace(commit, signature=signature)


def test_wrong_confirmation_tag_is_refused_and_the_service_cannot_tell() -> None:
    world, committer, receiver = _three()
    commit = committer.g.update(committer.signature_key, FakeCountingKey()).commit
    bad = replace(commit, confirmation_tag=bytes(32))
    _expect(receiver, bad, "mls.confirmation-tag")
    world.service.apply(bad)  # public checks pass: the tag needs the confirmation key


def test_path_keys_not_matching_the_secret_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    world, committer, receiver = _three()
    from agent.protocol.mls import group as group_module

    honest = group_module.path_node_keys

    def lying(path_secret: bytes, count: int) -> Any:
        _, secrets = honest(path_secret, count)
        keys, _ = honest(os.urandom(32), count)
        return keys, secrets

    # a malicious committer: advertises keys that its (correctly sealed) path secrets do not give
    monkeypatch.setattr(group_module, "path_node_keys", lying)
    commit = committer.g.update(committer.signature_key, FakeCountingKey()).commit
    monkeypatch.undo()
    _expect(receiver, commit, "mls.path.mismatch")
    world.service.apply(commit)  # invisible in public


def test_a_changed_public_key_breaks_the_parent_hash_chain() -> None:
    world, committer, receiver = _three()
    commit = committer.g.update(committer.signature_key, FakeCountingKey()).commit
    nodes = list(commit.content.path.nodes)
    nodes[-1] = UpdatePathNode(_point(), nodes[-1].encrypted_path_secret)
    path = replace(commit.content.path, nodes=tuple(nodes))
    bad = _resign(committer, replace(commit, content=replace(commit.content, path=path)))
    _expect(receiver, bad, "mls.parent-hash")  # the leaf's parent hash no longer matches
    with pytest.raises(ProtocolError) as exc:
        world.service.apply(bad)
    assert exc.value.check == "mls.parent-hash"


def _point() -> bytes:
    from agent.protocol.hpke import serialize_public_key

    return serialize_public_key(new_key().public_key())


def test_service_checks_the_tree_shape() -> None:
    world, committer, _ = _three()
    commit = committer.g.update(committer.signature_key, FakeCountingKey()).commit
    short = replace(commit.content.path, nodes=commit.content.path.nodes[:-1])
    bad = _resign(committer, replace(commit, content=replace(commit.content, path=short)))
    with pytest.raises(ProtocolError) as exc:
        world.service.apply(bad)
    assert exc.value.check == "mls.path.length"
    node = commit.content.path.nodes[0]
    extra = UpdatePathNode(node.encryption_key, node.encrypted_path_secret * 2)
    more = replace(commit.content.path, nodes=(extra, *commit.content.path.nodes[1:]))
    bad = _resign(committer, replace(commit, content=replace(commit.content, path=more)))
    with pytest.raises(ProtocolError) as exc:
        world.service.apply(bad)
    assert exc.value.check == "mls.path.ciphertexts"


def test_invalid_proposals_are_refused() -> None:
    _world, committer, receiver = _three()
    g = committer.g
    with pytest.raises(ProtocolError) as exc:
        g.remove(committer.signature_key, [g.own_leaf])
    assert exc.value.check == "mls.remove.self"
    with pytest.raises(ProtocolError) as exc:
        g.remove(committer.signature_key, [40])
    assert exc.value.check == "mls.remove.blank"
    with pytest.raises(ProtocolError) as exc:
        g.add(committer.signature_key, [receiver.key_package()])
    assert exc.value.check == "mls.add.duplicate"
    kp = Member.new().key_package()
    with pytest.raises(ProtocolError) as exc:
        g.add(committer.signature_key, [replace(kp, tpm_proof=b"another proof")])
    assert exc.value.check == "mls.key-package.signature"
    with pytest.raises(ProtocolError) as exc:
        g.add(committer.signature_key, [replace(kp, leaf=replace(kp.leaf, device_id=b"other"))])
    assert exc.value.check == "mls.leaf.signature"


def test_commits_for_another_group_and_from_non_members_are_refused() -> None:
    _world, committer, receiver = _three()
    commit = committer.g.update(committer.signature_key, FakeCountingKey()).commit
    _expect(
        receiver,
        replace(commit, content=replace(commit.content, group_id=b"other")),
        "mls.group-id",
    )
    _expect(receiver, replace(commit, content=replace(commit.content, sender=9)), "mls.sender")


def test_own_commit_is_not_processed_twice() -> None:
    _world, committer, _ = _three()
    result = committer.g.update(committer.signature_key, FakeCountingKey())
    with pytest.raises(ProtocolError) as exc:
        committer.g.process(result.commit)
    assert exc.value.check == "mls.own-commit"


# -- the TPM budget --------------------------------------------------------------------------


def test_processing_any_commit_costs_at_most_one_leaf_exchange() -> None:
    world = World()
    world.add(world.members_any(), 15)
    members = list(world.members.values())
    world.remove(members[3], members[9])
    world.add(members[0], 5)
    for m in list(world.members.values())[:6]:
        world.update(m)
    # World.deliver asserts <= 1 per member and commit; here also that the leaf is really used
    # when the path secret is sealed to it, and that creating commits never touches it
    committer = members[0]
    committer.leaf_key.exchanges = 0
    result = committer.g.update(committer.signature_key, FakeCountingKey())
    assert committer.leaf_key.exchanges == 0
    verified = world.service.verify(result.commit)
    outcomes = set()
    for m in world.members.values():
        if m is committer:
            continue
        own = 2 * m.g.own_leaf
        k = next(k for k, (_, child) in enumerate(verified.path) if tm.is_in_subtree(own, child))
        sealed_to_leaf = own in verified.resolutions[k]
        m.leaf_key.exchanges = 0
        m.g.process(result.commit)
        assert m.leaf_key.exchanges == int(sealed_to_leaf)
        outcomes.add(sealed_to_leaf)
    assert outcomes == {True, False}


# -- persistence and hygiene -----------------------------------------------------------------


def test_state_round_trip_through_cbor() -> None:
    world, committer, receiver = _three()
    state = codec.encode(receiver.g.to_state())
    restored = Group.from_state(
        codec.decode(state, 1 << 20, "state"), lambda ref: receiver.leaf_key
    )
    assert restored.epoch_authenticator == receiver.g.epoch_authenticator
    assert restored.to_state() == receiver.g.to_state()
    result = committer.g.update(committer.signature_key, FakeCountingKey())
    assert restored.process(result.commit).data_key() == result.group.data_key()
    with pytest.raises(StateError):
        Group.from_state(codec.decode(state, 1 << 20, "state"), lambda ref: FakeCountingKey())
    broken = receiver.g.to_state()
    broken["nodes"] = {1: os.urandom(32)}
    with pytest.raises(StateError):
        Group.from_state(broken, lambda ref: receiver.leaf_key)
    service = PublicGroup.from_state(
        codec.decode(codec.encode(world.service.to_state()), 1 << 20, "s")
    )
    assert service.apply(result.commit).tree_hash() == result.group.tree_hash()


def test_reprs_show_no_secrets() -> None:
    world, _committer, receiver = _three()
    g = receiver.g
    text = repr(g) + repr(g._secrets) + repr(world.service)
    for secret in [
        g.epoch_authenticator,
        g.data_key(),
        g._secrets.init_secret,
        g._secrets.exporter_secret,
        *(k.private_numbers().private_value.to_bytes(32, "big") for k in g._node_keys.values()),
    ]:
        assert secret.hex() not in text
        assert repr(secret) not in text
    assert "epoch=" in repr(g)


def test_welcome_for_someone_else_is_refused() -> None:
    _world, committer, _ = _three()
    joiner, stranger = Member.new(), Member.new()
    result = committer.g.add(committer.signature_key, [joiner.key_package()])
    assert result.welcome is not None
    with pytest.raises(ProtocolError) as exc:
        Group.join(
            result.welcome, stranger.key_package(), stranger.leaf_key, init_key=stranger.init_key
        )
    assert exc.value.check == "mls.welcome.recipient"
    tampered = replace(
        result.welcome, encrypted_group_info=result.welcome.encrypted_group_info[:-1] + b"\0"
    )
    with pytest.raises(ProtocolError) as exc:
        Group.join(tampered, joiner.key_package(), joiner.leaf_key, init_key=joiner.init_key)
    assert exc.value.check == "mls.welcome.decrypt"


def test_service_picks_the_nearest_committer_and_matches_welcomes() -> None:
    world = World()
    world.add(world.members_any(), 7)
    service = world.service
    assert service.committer_for_remove(5) == 4
    assert service.committer_for_remove(0) == 1
    # the nearest among the given members (after a rollback: the witnesses); unknown ones are
    # ignored, and with none of them in the tree it is the nearest of all
    ids = {i: leaf.device_id for i, leaf in service.tree.members()}
    assert service.committer_for_remove(5, [ids[0], ids[6], ids[7]]) == 6
    assert service.committer_for_remove(5, [ids[0], ids[3], ids[7]]) == 7
    assert service.committer_for_remove(5, [ids[3], ids[1]]) == 1  # a tie: leaf order
    assert service.committer_for_remove(5, [ids[5], b"dev-elsewhere"]) == 4
    assert service.committer_for_remove(5, ()) == 4
    committer = world.by_leaf(4)
    small = committer.g.remove(committer.signature_key, [5]).commit
    far = world.by_leaf(0).g.remove(world.by_leaf(0).signature_key, [5]).commit
    assert len(small.encode()) < len(far.encode())
    joiner = Member.new()
    result = committer.g.add(committer.signature_key, [joiner.key_package()])
    assert result.welcome is not None
    service.check_welcome(result.commit, result.welcome)
    with pytest.raises(ProtocolError) as exc:
        service.check_welcome(small, result.welcome)
    assert exc.value.check == "mls.welcome.recipients"


def _world_of(members: list[Member]) -> World:
    """A World around members whose groups were made some other way (``Group.assemble``)."""
    world = World.__new__(World)
    world.members = {m.device_id: m for m in members}
    world.service = members[0].g.public_group()
    world.removed = []
    world.history = []
    world.contexts = []
    world.saw_unmerged = False
    return world


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8, 11])
def test_an_assembled_group_is_the_state_real_commits_reach(count: int) -> None:
    # real: created, everyone else added, then every member commits once, in leaf order
    real = World()
    if count > 1:
        real.add(real.members_any(), count - 1)
    in_order = sorted(real.members.values(), key=lambda m: m.g.own_leaf)
    for m in in_order:
        real.update(m)
    real.check_agreement()
    # assembled in one step from the same devices and (final) leaf keys
    twins = [
        Member(m.device_id, m.signature_key, m.leaf_key, _cred=m.credential()) for m in in_order
    ]
    groups = Group.assemble(
        b"group-1",
        [(Member.key_package(t), t.leaf_key, t.signature_key) for t in twins],
        epoch=real.service.epoch,
    )
    for twin, group in zip(twins, groups, strict=True):
        twin.group = group
    built = _world_of(twins)
    built.check_agreement()  # one epoch authenticator, data key and exporter for every member
    real_tree, built_tree = real.service.tree, built.service.tree
    assert built_tree.n_leaves == real_tree.n_leaves
    for x in range(2 * real_tree.n_leaves - 1):
        a, b = real_tree.node(x), built_tree.node(x)
        assert (a is None) == (b is None), f"node {x}"
        if tm.is_leaf(x):
            if a is None:
                continue
            assert isinstance(a, LeafNode) and isinstance(b, LeafNode)
            # the same member, as its commit left it (signatures and parent hashes differ)
            same = ("device_id", "signature_key", "encryption_key", "credential", "source")
            assert [getattr(a, f) for f in same] == [getattr(b, f) for f in same]
        elif a is not None:
            assert isinstance(b, ParentNode) and a.unmerged_leaves == b.unmerged_leaves == ()  # type: ignore[union-attr]
    verify_tree(built_tree)
    verify_tree(real_tree)
    for i, leaf in built_tree.members():
        leaf.verify(b"group-1", i)
    for m, twin in zip(in_order, twins, strict=True):
        assert twin.g.own_leaf == m.g.own_leaf
        assert sorted(twin.g.to_state()["nodes"]) == sorted(m.g.to_state()["nodes"])  # type: ignore[call-overload]
        restored = Group.from_state(twin.g.to_state(), lambda ref, t=twin: t.leaf_key)
        assert restored.epoch_authenticator == twin.g.epoch_authenticator
    # and it goes on like a real group: update, add (a Welcome from it), remove
    built.update(twins[-1])
    built.check_agreement()
    built.add(twins[0], 2)
    built.check_agreement()
    if count > 1:
        built.remove(twins[1], twins[0])
        built.check_agreement()
    built.update(built.members_any())
    built.check_agreement()


def test_assemble_refuses_what_adds_refuse() -> None:
    a, b = Member.new(), Member.new()
    good = [
        (a.key_package(), a.leaf_key, a.signature_key),
        (b.key_package(), b.leaf_key, b.signature_key),
    ]
    assert [g.own_leaf for g in Group.assemble(b"g", good, epoch=3)] == [0, 1]
    with pytest.raises(ProtocolError) as exc:
        Group.assemble(b"g", [(a.key_package(), b.leaf_key, a.signature_key)], epoch=1)
    assert exc.value.check == "mls.leaf-key"
    with pytest.raises(ProtocolError) as exc:
        Group.assemble(b"g", [(a.key_package(), a.leaf_key, b.signature_key)], epoch=1)
    assert exc.value.check == "mls.signature-key"
    with pytest.raises(ProtocolError) as exc:
        Group.assemble(b"g", [good[0], good[0]], epoch=1)
    assert exc.value.check == "mls.add.duplicate"
    forged = replace(b.key_package(), signature=a.key_package().signature)
    with pytest.raises(ProtocolError) as exc:
        Group.assemble(b"g", [good[0], (forged, b.leaf_key, b.signature_key)], epoch=1)
    assert exc.value.check == "mls.key-package.signature"
    with pytest.raises(ProtocolError) as exc:
        Group.assemble(b"g", [], epoch=1)
    assert exc.value.check == "mls.add.full"
    with pytest.raises(ValueError, match="epoch"):
        Group.assemble(b"g", good, epoch=0)


# -- credentials, leaf signatures and parent hashes ------------------------------------------


def test_every_tree_along_the_way_is_parent_hash_valid_with_signed_leaves() -> None:
    world = World()
    group_id = world.service.group_id
    trees = [world.service.tree]
    world.add(world.members_any(), 6)
    trees.append(world.service.tree)
    members = sorted(world.members.values(), key=lambda m: m.g.own_leaf)
    world.remove(members[2], members[5])
    trees.append(world.service.tree)
    world.update(members[3])
    trees.append(world.service.tree)
    world.add(members[0], 3)  # leaves land under parents that keep them as unmerged
    trees.append(world.service.tree)
    everyone = {**world.members, **{m.device_id: m for m in world.removed}}
    for tree in trees:
        verify_tree(tree)
        for i, leaf in tree.members():
            leaf.verify(group_id, i)
            assert leaf.credential == everyone[leaf.device_id].credential()
    committer_leaf = world.service.tree.leaf(members[0].g.own_leaf)
    assert committer_leaf is not None and committer_leaf.source == 3


def _welcome_with(
    monkeypatch: pytest.MonkeyPatch, tamper: Callable[[RatchetTree], RatchetTree]
) -> tuple[Member, Welcome]:
    """A Welcome from a real member whose GroupInfo tree went through ``tamper`` before the
    member signed it: what a committer-turned-attacker (or a forged signer) could send."""
    from agent.protocol.mls import group as group_module

    world = World()
    world.add(world.members_any(), 4)
    committer = world.by_leaf(1)
    joiner = Member.new()
    real_info = group_module.GroupInfo

    def info(**kwargs: Any) -> GroupInfo:
        tree = tamper(kwargs["tree"])
        return real_info(**{**kwargs, "tree": tree, "tree_hash": tree.tree_hash()})

    monkeypatch.setattr(group_module, "GroupInfo", info)
    result = committer.g.add(committer.signature_key, [joiner.key_package()])
    monkeypatch.undo()
    assert result.welcome is not None
    return joiner, result.welcome


def _with_tree(kwargs: dict[str, Any], tree: RatchetTree) -> dict[str, Any]:
    """GroupInfo arguments with ``tree`` and its hash in place of the real tree's."""
    return {**kwargs, "tree": tree, "tree_hash": tree.tree_hash()}


def _join_refused(joiner: Member, welcome: Welcome, check: str, **hooks: Any) -> None:
    with pytest.raises(ProtocolError) as exc:
        Group.join(
            welcome, joiner.key_package(), joiner.leaf_key, init_key=joiner.init_key, **hooks
        )
    assert exc.value.check == check


def _first_parent(tree: RatchetTree) -> int:
    return next(x for x in range(1, 2 * tree.n_leaves - 1, 2) if tree.node(x) is not None)


def test_a_welcome_with_a_made_up_parent_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def swap_parent_key(tree: RatchetTree) -> RatchetTree:
        bad = tree.copy()
        x = _first_parent(bad)
        node = bad.parent_node(x)
        assert node is not None
        bad._set(x, replace(node, encryption_key=_point()))
        return bad

    joiner, welcome = _welcome_with(monkeypatch, swap_parent_key)
    _join_refused(joiner, welcome, "mls.parent-hash")


def test_a_welcome_with_a_forged_leaf_signature_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def flip_leaf_signature(tree: RatchetTree) -> RatchetTree:
        bad = tree.copy()
        leaf = bad.leaf(0)
        assert leaf is not None
        sig = leaf.signature
        bad._set(0, replace(leaf, signature=sig[:-1] + bytes([sig[-1] ^ 1])))
        return bad

    joiner, welcome = _welcome_with(monkeypatch, flip_leaf_signature)
    _join_refused(joiner, welcome, "mls.leaf.signature")


def test_a_welcome_with_a_swapped_credential_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    other = Member.new()

    def swap_credential(tree: RatchetTree) -> RatchetTree:
        bad = tree.copy()
        leaf = bad.leaf(0)
        assert leaf is not None
        bad._set(0, replace(leaf, credential=other.credential()))
        return bad

    joiner, welcome = _welcome_with(monkeypatch, swap_credential)
    _join_refused(joiner, welcome, "mls.leaf.signature")  # the leaf signature covers it

    # re-signed by the leaf's own key (the member lies about its certificate): MLS cannot tell,
    # the caller's LeafCheck can
    def resign_with_other_credential(tree: RatchetTree) -> RatchetTree:
        bad = tree.copy()
        leaf = bad.leaf(2)
        assert leaf is not None
        owner = next(m for m in members if m.device_id == leaf.device_id)
        forged = LeafNode.signed(
            owner.signature_key,
            device_id=leaf.device_id,
            encryption_key=leaf.encryption_key,
            credential=other.credential(),
            source=leaf.source,
            parent_hash=leaf.parent_hash,
            group_id=b"group-1",
            leaf_index=2,
        )
        bad._set(4, forged)
        return bad

    members: list[Member] = []
    joiner, welcome = _welcome_with(monkeypatch, lambda t: t)
    Group.join(
        welcome,
        joiner.key_package(),
        joiner.leaf_key,
        init_key=joiner.init_key,
        leaf_check=fake_leaf_check,
    )

    world = World()
    world.add(world.members_any(), 4)
    members.extend(world.members.values())
    committer = world.by_leaf(1)
    joiner = Member.new()
    from agent.protocol.mls import group as group_module

    real_info = group_module.GroupInfo
    monkeypatch.setattr(
        group_module,
        "GroupInfo",
        lambda **kw: real_info(**_with_tree(kw, resign_with_other_credential(kw["tree"]))),
    )
    result = committer.g.add(committer.signature_key, [joiner.key_package()])
    monkeypatch.undo()
    assert result.welcome is not None
    _join_refused(joiner, result.welcome, "cred.key", leaf_check=fake_leaf_check)


def fake_leaf_check(leaf: LeafNode) -> None:
    """A test fake of the agent's credential check (the real one chains to the device CA): the
    certificate's key is the leaf's signature key and its SAN names the leaf's device."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_der_x509_certificate(leaf.credential)
    point = cert.public_key().public_bytes(  # type: ignore[union-attr]
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    if point != leaf.signature_key:
        raise ProtocolError("cred.key", "the certificate is not for the leaf's signature key")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    if f"urn:keyfleet:device:{leaf.device_id.decode()}" not in san.get_values_for_type(
        x509.UniformResourceIdentifier
    ):
        raise ProtocolError("cred.device-id", "the certificate names another device")


def test_commits_with_a_forged_leaf_or_a_foreign_credential_are_refused() -> None:
    world, committer, receiver = _three()
    commit = committer.g.update(committer.signature_key, FakeCountingKey()).commit
    sig = commit.content.path.leaf_signature
    path = replace(commit.content.path, leaf_signature=sig[:-1] + bytes([sig[-1] ^ 1]))
    bad = _resign(committer, replace(commit, content=replace(commit.content, path=path)))
    _expect(receiver, bad, "mls.leaf.signature")
    with pytest.raises(ProtocolError) as exc:
        world.service.apply(bad)
    assert exc.value.check == "mls.leaf.signature"
    # an add whose KeyPackage carries someone else's certificate: the leaf signature breaks...
    joiner, other = Member.new(), Member.new()
    kp = joiner.key_package()
    swapped = replace(kp, leaf=replace(kp.leaf, credential=other.credential()))
    with pytest.raises(ProtocolError) as exc:
        committer.g.add(committer.signature_key, [swapped])
    assert exc.value.check == "mls.leaf.signature"
    # ...and a KeyPackage honestly signed over a foreign certificate is the LeafCheck's to refuse
    lying = KeyPackage.create(
        joiner.device_id,
        joiner.signature_key,
        joiner.leaf_key.public_key(),
        other.credential(),
        init_key=joiner.init_key.public_key(),
    )
    with pytest.raises(ProtocolError) as exc:
        committer.g.add(committer.signature_key, [lying], leaf_check=fake_leaf_check)
    assert exc.value.check == "cred.key"
    add = committer.g.add(committer.signature_key, [lying]).commit
    _expect_with(receiver, add, "cred.key", leaf_check=fake_leaf_check)
    # with honest credentials the same check passes everywhere
    result = committer.g.add(
        committer.signature_key, [joiner.key_package()], leaf_check=fake_leaf_check
    )
    receiver.g.process(result.commit, leaf_check=fake_leaf_check)
    assert result.welcome is not None
    Group.join(
        result.welcome,
        joiner.key_package(),
        joiner.leaf_key,
        init_key=joiner.init_key,
        leaf_check=fake_leaf_check,
    )


def _expect_with(receiver: Member, commit: Commit, check: str, **hooks: Any) -> None:
    before = receiver.g.to_state()
    with pytest.raises(ProtocolError) as exc:
        receiver.g.process(commit, **hooks)
    assert exc.value.check == check
    assert receiver.g.to_state() == before


def test_admissions_are_recorded_delivered_and_checked() -> None:
    """Each leaf records the hash of the Authorization that admitted it; the joiner gets the
    Authorizations delivered apart from the Welcome (which carries none) and takes each by the
    hash a leaf records: one no leaf names is ignored. A member's state keeps none."""
    creator = Member.new()
    group = Group.create(
        b"g-adm", creator.key_package(), creator.leaf_key, authz=b"create authorization"
    )
    assert group.tree.admission(0) == hashlib.sha256(b"create authorization").digest()
    joiners = [Member.new(), Member.new()]
    result = group.add(
        creator.signature_key, [j.key_package() for j in joiners], authz=b"add authorization"
    )
    assert result.commit.content.authz == b"add authorization"
    assert result.welcome is not None
    assert b"authorization" not in result.welcome.encode()
    seen: list[tuple[bytes, bytes | None, bool]] = []

    def record(leaf: LeafNode, authz: bytes | None, is_own: bool) -> None:
        seen.append((leaf.device_id, authz, is_own))

    delivered = [b"add authorization", b"create authorization", b"named by no leaf"]
    joined = Group.join(
        result.welcome,
        joiners[0].key_package(),
        joiners[0].leaf_key,
        init_key=joiners[0].init_key,
        admissions=delivered,
        admission_check=record,
    )
    assert sorted(seen) == sorted(
        [
            (creator.device_id, b"create authorization", False),
            (joiners[0].device_id, b"add authorization", True),
            (joiners[1].device_id, b"add authorization", False),
        ]
    )
    # the admission hash is in the tree hash: nobody can swap it unnoticed
    assert joined.tree.admission(1) == hashlib.sha256(b"add authorization").digest()
    # the member keeps no Authorization: its state does not grow with them
    assert "admissions" not in joined.to_state()
    assert b"authorization" not in codec.encode(joined.to_state())

    def refuse(leaf: LeafNode, authz: bytes | None, is_own: bool) -> None:
        if is_own:
            raise ProtocolError("authz.expired", "too late")

    with pytest.raises(ProtocolError) as exc:
        Group.join(
            result.welcome,
            joiners[1].key_package(),
            joiners[1].leaf_key,
            init_key=joiners[1].init_key,
            admissions=delivered,
            admission_check=refuse,
        )
    assert exc.value.check == "authz.expired"

    # a commit check sees the content before anything is applied, on both sides
    def no_removes(content: CommitContent, tree: RatchetTree) -> None:
        if content.removes:
            raise ProtocolError("authz.members", "no authorization for this remove")

    with pytest.raises(ProtocolError) as exc:
        joined.remove(joiners[0].signature_key, [0], commit_check=no_removes)
    assert exc.value.check == "authz.members"
    remove = joined.remove(joiners[0].signature_key, [0]).commit
    other = Group.join(
        result.welcome,
        joiners[1].key_package(),
        joiners[1].leaf_key,
        init_key=joiners[1].init_key,
        admissions=delivered,
    )
    before = other.to_state()
    with pytest.raises(ProtocolError) as exc:
        other.process(remove, commit_check=no_removes)
    assert exc.value.check == "authz.members"
    assert other.to_state() == before
    after = other.process(remove)
    restored = Group.from_state(after.to_state(), lambda ref: joiners[1].leaf_key)
    assert restored.to_state() == after.to_state()


def test_a_version_2_state_is_read_and_its_authorizations_dropped() -> None:
    """A state saved before members stopped keeping Authorizations (version 2, with its
    ``admissions`` list) is read; they are dropped and the next save is version 3."""
    creator = Member.new()
    group = Group.create(b"g-v2", creator.key_package(), creator.leaf_key, authz=b"create")
    state = group.to_state()
    assert state["v"] == 3
    old = {**state, "v": 2, "admissions": [b"create"]}
    restored = Group.from_state(old, lambda ref: creator.leaf_key)
    assert restored.to_state() == state
    # what a member hands the service once (group.admissions); nothing from a version 3
    assert legacy_admissions(old) == (b"create",)
    assert legacy_admissions(state) == ()
    assert legacy_admissions({**old, "admissions": [b""]}) == ()
    with pytest.raises(StateError):
        Group.from_state({**state, "admissions": [b"create"]}, lambda ref: creator.leaf_key)
    with pytest.raises(StateError):
        Group.from_state({**state, "v": 1}, lambda ref: creator.leaf_key)


def test_processing_a_commit_walks_no_leaf(monkeypatch: pytest.MonkeyPatch) -> None:
    """A member's processing is O(log N): neither a remove nor a self-update lists the tree's
    members or scans its leaves."""
    creator = Member.new()
    group = Group.create(b"g-scan", creator.key_package(), creator.leaf_key, authz=b"create")
    joiners = [Member.new(), Member.new(), Member.new()]
    added = group.add(
        creator.signature_key, [j.key_package() for j in joiners[:2]], authz=b"first add"
    )
    assert added.welcome is not None
    member = Group.join(
        added.welcome,
        joiners[0].key_package(),
        joiners[0].leaf_key,
        init_key=joiners[0].init_key,
        admissions=[b"create", b"first add"],
    )
    last = added.group.add(creator.signature_key, [joiners[2].key_package()], authz=b"second add")
    member = member.process(last.commit)
    group = last.group

    def no_scan(self: RatchetTree) -> Any:
        raise AssertionError("a commit's processing walked every leaf")

    monkeypatch.setattr(RatchetTree, "members", no_scan)
    removed = group.remove(creator.signature_key, [3], authz=b"remove")
    member = member.process(removed.commit)
    assert not member.tree.admission_in_use(hashlib.sha256(b"second add").digest())
    assert member.tree.tree_hash() == removed.group.tree.tree_hash()
    update = removed.group.update(creator.signature_key, ec.generate_private_key(ec.SECP256R1()))
    member = member.process(update.commit)
    assert member.epoch_authenticator == update.group.epoch_authenticator


def test_a_welcome_without_the_authorization_a_leaf_names_is_refused() -> None:
    """Attack: the delivery service withholds an Authorization a leaf names, or sends another
    one in its place: ``mls.welcome.admission``, and the joiner holds no group."""
    creator, joiner = Member.new(), Member.new()
    group = Group.create(b"g-adm", creator.key_package(), creator.leaf_key, authz=b"create")
    result = group.add(creator.signature_key, [joiner.key_package()], authz=b"add")
    assert result.welcome is not None
    for delivered in ([b"create"], [b"add"], [b"create", b"add, altered"], []):
        _join_refused(joiner, result.welcome, "mls.welcome.admission", admissions=delivered)
    joined = Group.join(
        result.welcome,
        joiner.key_package(),
        joiner.leaf_key,
        init_key=joiner.init_key,
        admissions=[b"add", b"create"],
    )
    assert joined.epoch_authenticator == result.group.epoch_authenticator


def test_a_welcome_from_a_committer_that_still_signs_authorizations_into_it_is_joined(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A committer from before the service delivered them carries the Authorizations in its
    GroupInfo (``admissions``, under its signature): a joiner now reads them as delivered ones;
    one missing there (and not delivered) is still ``mls.welcome.admission``, and one altered
    breaks the signature."""
    from agent.protocol.mls import group as group_module

    creator = Member.new()
    group = Group.create(b"g-old", creator.key_package(), creator.leaf_key, authz=b"create")
    real_info = group_module.GroupInfo
    for carried, check in (((b"create", b"add"), None), ((b"add",), "mls.welcome.admission")):
        joiner = Member.new()
        monkeypatch.setattr(
            group_module,
            "GroupInfo",
            lambda carried=carried, **kw: real_info(**kw, legacy_admissions=carried),
        )
        result = group.add(creator.signature_key, [joiner.key_package()], authz=b"add")
        monkeypatch.undo()
        assert result.welcome is not None
        if check is not None:
            _join_refused(joiner, result.welcome, check)
            continue
        joined = Group.join(
            result.welcome, joiner.key_package(), joiner.leaf_key, init_key=joiner.init_key
        )
        assert joined.epoch_authenticator == result.group.epoch_authenticator
        opened = Group.open_welcome(
            result.welcome, joiner.key_package(), joiner.leaf_key, init_key=joiner.init_key
        )
        assert opened.info.legacy_admissions == (b"create", b"add")
        altered = replace(opened, info=replace(opened.info, legacy_admissions=(b"create", b"x")))
        with pytest.raises(ProtocolError) as exc:
            Group.join_opened(altered, joiner.key_package(), joiner.leaf_key, admissions=[b"add"])
        assert exc.value.check == "mls.welcome.signature"


def test_a_welcome_into_1024_members_with_certificates_passes_the_wire() -> None:
    """The size budget end to end in one process: a Welcome for the 1,024th member of a group
    whose every leaf carries a DevID certificate, sealed as the service forwards it
    (``svc.welcome``), carries no tree (a few KB); the tree comes in ``svc.tree_page``s, each
    opened under its message limit, and the joiner joins with it."""
    from agent.protocol.mls.treepages import TreeCollector, paginate
    from agent.protocol.mls.treepages import TreePage as Page
    from agent.protocol.wire.envelope import Signer, encode_message, open_message
    from agent.protocol.wire.messages.base import Body
    from agent.protocol.wire.messages.service import TreePage, WelcomeDelivery

    members = [Member.new() for _ in range(1023)]
    groups = Group.assemble(
        b"big",
        [(m.key_package(), m.leaf_key, m.signature_key) for m in members],
        epoch=1,
        authz=(seeded := os.urandom(2048)),
    )
    joiner = Member.new()
    added = os.urandom(2048)
    result = groups[5].add(members[5].signature_key, [joiner.key_package()], authz=added)
    assert result.welcome is not None
    welcome = result.welcome.encode()
    assert len(welcome) < 8_000  # the tree travels apart: ~1 KB per member, most of it a cert
    service_key = new_key()

    def wire(body: Body) -> Body:
        data = encode_message(
            body, key=service_key, sender="service", to="dev-joiner", seq=1, time=1_700_000_000
        )
        return open_message(
            data,
            lambda kid: Signer("service", service_key.public_key()),
            now=1_700_000_000,
            recipients={"dev-joiner"},
        ).body

    delivered = wire(WelcomeDelivery("big", 2, welcome))
    assert isinstance(delivered, WelcomeDelivery)
    opened = Group.open_welcome(
        Welcome.decode(delivered.welcome),
        joiner.key_package(),
        joiner.leaf_key,
        init_key=joiner.init_key,
    )
    collector = TreeCollector("big", 2, opened.info.tree_hash)
    stored = admissions_of([seeded, added])  # what the service keeps
    for p in paginate(result.group.tree, admissions=stored):
        page = wire(TreePage("big", 2, p.index, p.count, p.width, p.start, p.nodes, p.admissions))
        assert isinstance(page, TreePage)
        collector.add(
            page.group_id,
            page.epoch,
            Page(page.page, page.pages, page.width, page.start, page.nodes, page.admissions),
        )
    tree = collector.tree()
    joined = Group.join_opened(
        opened,
        joiner.key_package(),
        joiner.leaf_key,
        tree=tree,
        admissions=collector.admissions(tree),
    )
    assert joined.epoch_authenticator == result.group.epoch_authenticator
    assert joined.tree.member_count() == 1024


def test_a_commit_carries_the_committers_renewed_credential_to_every_member() -> None:
    """Certificate renewal (agent.protocol.renewal): the same DevID key gets a new certificate;
    the member's next commit carries it in its UpdatePath, receivers rebuild the leaf with it
    and run their leaf check on it; a commit with the credential unchanged carries none."""
    world, committer, receiver = _three()
    plain = committer.g.update(committer.signature_key, FakeCountingKey())
    assert plain.commit.content.path.credential is None
    assert "cred" not in plain.commit.content.path.to_obj()  # old encodings unchanged

    renewed = devid_cert_der(committer.device_id, committer.signature_key)
    assert renewed != committer.credential()  # a new serial for the same key
    checked: list[bytes] = []
    result = committer.g.update(
        committer.signature_key,
        FakeCountingKey(),
        leaf_check=lambda leaf: checked.append(leaf.credential),
        credential=renewed,
    )
    commit = Commit.decode(result.commit.encode())
    assert commit.content.path.credential == renewed and checked == [renewed]
    seen: list[bytes] = []
    following = receiver.g.process(commit, leaf_check=lambda leaf: seen.append(leaf.credential))
    assert seen == [renewed]
    assert following.tree.leaf(committer.g.own_leaf).credential == renewed  # type: ignore[union-attr]
    # a credential swapped in transit is refused (the commit's and the leaf's signatures
    # cover it), before anything changed
    other = devid_cert_der(committer.device_id, committer.signature_key)
    forged = replace(
        commit, content=replace(commit.content, path=replace(commit.content.path, credential=other))
    )
    with pytest.raises(ProtocolError) as caught:
        world.service.verify(Commit.decode(forged.encode()))
    assert caught.value.check == "mls.commit.signature"
    _expect(receiver, Commit.decode(forged.encode()), "mls.commit.signature")
    world.deliver(committer, result)
    world.check_agreement()
    assert {m.g.tree.leaf(committer.g.own_leaf).credential for m in world.members.values()} == {  # type: ignore[union-attr]
        renewed
    }
