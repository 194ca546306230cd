"""The ratchet tree's copy-on-write chunks, per-node hash cache and key/device indexes: after any
sequence of edits the cached tree hash equals one computed from scratch (by an independent
recursion over the encoded tree, and by a freshly decoded tree with an empty cache), the indexes
equal a scan of the tree, and the tree an edit was copied from is unchanged. Chunks are made
tiny (4 nodes) so that edits cross chunk boundaries.

keyfleet's tree hash is over CBOR (docs/treekem.md), so the RFC 9420 tree-hash vectors do not
apply to it; the from-scratch recursion below is the reference."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.protocol.errors import ProtocolError
from agent.protocol.hpke import serialize_public_key
from agent.protocol.mls import codec
from agent.protocol.mls import tree as tree_mod
from agent.protocol.mls import tree_math as tm
from agent.protocol.mls.parenthash import set_path_parent_hashes
from agent.protocol.mls.tree import SOURCE_KEY_PACKAGE, LeafNode, ParentNode, RatchetTree
from tests.pure.test_mls_group import World

pytestmark = pytest.mark.pure


@contextmanager
def small_chunks(shift: int = 2) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tree_mod, "CHUNK_SHIFT", shift)
        yield


def _reference_hash(obj: list[object], x: int) -> bytes:
    """The tree hash (docs/treekem.md) of node x of an encoded tree, from scratch."""
    if tm.is_leaf(x):
        return hashlib.sha256(codec.encode([0, x // 2, obj[x]])).digest()
    return hashlib.sha256(
        codec.encode(
            [1, obj[x], _reference_hash(obj, tm.left(x)), _reference_hash(obj, tm.right(x))]
        )
    ).digest()


def _point() -> bytes:
    return serialize_public_key(ec.generate_private_key(ec.SECP256R1()).public_key())


def _reference_resolution(tree: RatchetTree, x: int) -> list[int]:
    """RFC 9420 §4.1.1 resolution, walking every node (no cache)."""
    node = tree.node(x)
    if node is None:
        if tm.is_leaf(x):
            return []
        return _reference_resolution(tree, tm.left(x)) + _reference_resolution(tree, tm.right(x))
    if isinstance(node, LeafNode):
        return [x]
    return [x] + [2 * u for u in node.unmerged_leaves]


def _leaf(i: int) -> LeafNode:
    return LeafNode(f"d{i}".encode(), _point(), _point(), b"c", SOURCE_KEY_PACKAGE, b"", b"s" * 8)


ADMISSIONS = [bytes([k]) * 32 for k in range(1, 4)]


def _check_admissions(tree: RatchetTree) -> None:
    """The tree's count of leaves per admission hash agrees with a scan of its leaves."""
    used = {tree.admission(i) for i, _ in tree.members()}
    for h in ADMISSIONS:
        assert tree.admission_in_use(h) == (h in used)


def _check(tree: RatchetTree) -> None:
    _check_admissions(tree)
    obj = tree.to_obj()
    expected = _reference_hash(obj, tree.root)
    assert tree.tree_hash() == expected
    assert RatchetTree.from_obj(obj).tree_hash() == expected
    keys: dict[bytes, set[int]] = {}
    for x in range(2 * tree.n_leaves - 1):
        node = tree.node(x)
        if node is not None:
            keys.setdefault(node.encryption_key, set()).add(x)
    for key, positions in keys.items():
        assert set(tree.key_positions(key)) == positions
    members = [(i, leaf) for i in range(tree.n_leaves) if (leaf := tree.leaf(i)) is not None]
    assert list(tree.members()) == members
    assert tree.member_count() == len(members)
    for i, leaf in members:
        assert tree.find_device(leaf.device_id) == i
    width = 2 * tree.n_leaves - 1
    for x in range(width):
        assert tree.resolution(x) == _reference_resolution(tree, x)
    for i, _ in members:
        expected = []
        y = 2 * i
        for p in tm.direct_path(y, tree.n_leaves):
            if _reference_resolution(tree, tm.sibling(y, tree.n_leaves)):
                expected.append((p, tm.sibling(y, tree.n_leaves)))
            y = p
        assert tree.filtered_direct_path(i) == expected


EDITS = st.lists(
    st.tuples(st.sampled_from(["add", "add", "remove", "update", "path"]), st.integers(0, 1 << 16)),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(EDITS, st.integers(1, 4))
def test_cached_hash_equals_from_scratch_after_random_edits(
    edits: list[tuple[str, int]], shift: int
) -> None:
    with small_chunks(shift):
        tree = RatchetTree([_leaf(0)], {0: ADMISSIONS[0]})
        serial = 1
        for op, a in edits:
            before_obj, before_hash = tree.to_obj(), tree.tree_hash()
            nxt = tree.copy()
            members = [i for i, _ in nxt.members()]
            if op == "add" or len(members) == 1:
                nxt._add_leaf(_leaf(serial), ADMISSIONS[a % len(ADMISSIONS)])
                serial += 1
            elif op == "remove":
                nxt._remove_leaf(members[a % len(members)])
                nxt._truncate()
            elif op == "update":
                i = members[a % len(members)]
                old = nxt.leaf(i)
                assert old is not None
                nxt._replace_leaf(
                    i,
                    LeafNode(old.device_id, old.signature_key, _point(), b"c", 2, b"", b"s" * 8),
                )
                nxt._blank_direct_path(i)
            else:
                i = members[a % len(members)]
                path = nxt.filtered_direct_path(i)
                nxt._apply_path(i, [(x, _point()) for x, _ in path])
                if a % 2:  # as a commit sets them: invalidated once, from the path's lowest node
                    set_path_parent_hashes(nxt, path)
                else:
                    for x, _ in path:
                        node = nxt.parent_node(x)
                        assert node is not None
                        nxt._set(x, ParentNode(node.encryption_key, os.urandom(32)))
            _check(nxt)
            # the nodes a commit's store rewrites (store.trees.plan): exactly those whose
            # encoding differs, a node past a tree's width counting as blank
            width = max(len(before_obj), len(nxt.to_obj()))
            old_obj = before_obj + [None] * (width - len(before_obj))
            new_obj = nxt.to_obj() + [None] * (width - len(nxt.to_obj()))
            differ = [x for x in range(width) if old_obj[x] != new_obj[x]]
            assert sorted(nxt.changed_since(tree)) == differ
            # the tree it was copied from did not change, and its cache is still right
            assert tree.to_obj() == before_obj
            assert tree.tree_hash() == before_hash == _reference_hash(before_obj, tree.root)
            _check_admissions(tree)
            tree = nxt


def test_a_commit_rehashes_only_its_path() -> None:
    """After a commit, computing the new tree hash hashes O(log N) nodes, not N."""
    with small_chunks(3):
        tree = RatchetTree(
            [
                _leaf(i) if x % 2 == 0 else None
                for x, i in ((x, x // 2) for x in range(2 * 1024 - 1))
            ]
        )
        tree.tree_hash()
        nxt = tree.copy()
        path = nxt.filtered_direct_path(5)
        nxt._apply_path(5, [(x, _point()) for x, _ in path])
        old = nxt.leaf(5)
        assert old is not None
        nxt._replace_leaf(5, replace(old, encryption_key=_point()))
        calls = 0
        real = tree_mod.hash_

        def counting(data: bytes) -> bytes:
            nonlocal calls
            calls += 1
            return real(data)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(tree_mod, "hash_", counting)
            nxt.tree_hash()
        assert calls == 1 + 10  # the committer's leaf and its 10 ancestors, of 2,047 nodes
        assert nxt.tree_hash() == _reference_hash(nxt.to_obj(), nxt.root)


def test_commits_across_chunk_boundaries_keep_members_in_agreement() -> None:
    """Real commits (adds, removes, updates) through the public checks with 4-node chunks:
    every member and the service agree on the tree hash; a reused key is still refused."""
    with small_chunks(2):
        world = World()
        creator = world.members_any()
        world.add(creator, 9)
        members = sorted(world.members.values(), key=lambda m: m.g.own_leaf)
        world.remove(members[3], members[7])
        world.update(members[8])
        world.add(members[1], 2)
        world.check_agreement()
        _check(world.service.tree)
        # a self-update whose new leaf key is another member's is refused (the committer runs
        # the same public checks as the service before it signs), nothing changes
        members = sorted(world.members.values(), key=lambda m: m.g.own_leaf)
        committer, other = members[0], members[-1]
        before = committer.g.to_state()
        with pytest.raises(ProtocolError) as exc:
            committer.g.update(committer.signature_key, other.leaf_key)
        assert exc.value.check == "mls.path.duplicate-key"
        assert committer.g.to_state() == before
