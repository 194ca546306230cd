"""Parent hashes (RFC 9420 §7.9, over CBOR): they chain every parent node a commit sets to the
committer's signed leaf, so a joiner can check that each parent key in a tree it is handed was
put there by a member's commit and not made up by whoever built the tree.

    ParentHash(P, S) = H(cbor({"enc": P.encryption_key, "ph": P.parent_hash,
                               "sth": original tree hash of S}))

where S is the child of P off the committer's path (its copath child) and the original tree hash
is S's tree hash with the leaves added below P since P was set left out (``original_hash``).

A committer (and every receiver, the same way) sets the parent hashes of its filtered direct path
top-down: the highest node gets an empty one, each lower node the ParentHash of the node above
it, and the leaf, which the committer signs, the ParentHash of the lowest node. A joiner checks
that every non-blank parent is parent-hash valid (RFC 9420 §7.9.2, ``verify_tree``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from agent.protocol.errors import ProtocolError
from agent.protocol.mls import codec
from agent.protocol.mls import tree_math as tm
from agent.protocol.mls.crypto import hash_
from agent.protocol.mls.tree import LeafNode, ParentNode, RatchetTree


def parent_hash(node: ParentNode, original_sibling_hash: bytes) -> bytes:
    return hash_(
        codec.encode(
            {"enc": node.encryption_key, "ph": node.parent_hash, "sth": original_sibling_hash}
        )
    )


def set_path_parent_hashes(tree: RatchetTree, path: Sequence[tuple[int, int]]) -> bytes:
    """Set the parent hashes of the filtered direct path ``path`` ((node, copath child), leaf
    to root, nodes just set by the commit, no unmerged leaves) in ``tree`` (a copy being built)
    and return the parent hash the committer's leaf must carry (empty for an empty path)."""
    above = b""
    for x, child in reversed(path):
        node = tree.parent_node(x)
        assert node is not None and not node.unmerged_leaves
        node = replace(node, parent_hash=above)
        # the copath child's subtree (hashed next) holds no node of the path: the path's cached
        # hashes are invalidated once, from its lowest node, below
        tree._set(x, node, invalidate=False)
        above = parent_hash(node, tree.original_hash(child, frozenset()))
    if path:
        tree._invalidate(path[0][0])
    return above


def _parent_hash_of(tree: RatchetTree, x: int) -> bytes:
    node = tree.node(x)
    assert node is not None
    return node.parent_hash


def verify_tree(tree: RatchetTree) -> None:
    """RFC 9420 §7.9.2: every non-blank parent P has a child C and a node D in C's resolution
    such that D's parent hash is ParentHash(P, the other child) and the rest of C's resolution
    is exactly P's unmerged leaves below C. Raises ``mls.parent-hash`` naming the first node
    that is not."""
    for x in range(1, 2 * tree.n_leaves - 1, 2):
        node = tree.parent_node(x)
        if node is None:
            continue
        unmerged = frozenset(node.unmerged_leaves)
        if not _valid_from_either_side(tree, x, node, unmerged):
            raise ProtocolError("mls.parent-hash", f"parent node {x} is not parent-hash valid")


def _valid_from_either_side(
    tree: RatchetTree, x: int, node: ParentNode, unmerged: frozenset[int]
) -> bool:
    for child, sibling in ((tm.left(x), tm.right(x)), (tm.right(x), tm.left(x))):
        resolution = tree.resolution(child)
        below = {tm.leaf_to_node(u) for u in unmerged if u in tm.subtree_leaves(child)}
        candidates = [d for d in resolution if d not in below]
        if len(candidates) != 1 or set(resolution) - {candidates[0]} != below:
            continue
        expected = parent_hash(node, tree.original_hash(sibling, unmerged))
        if _parent_hash_of(tree, candidates[0]) == expected:
            return True
    return False


def check_commit_leaf(leaf: LeafNode, expected_parent_hash: bytes) -> None:
    """The committer's new leaf carries the parent hash its path computes to."""
    if leaf.parent_hash != expected_parent_hash:
        raise ProtocolError("mls.parent-hash", "the committer's leaf parent hash does not match")
