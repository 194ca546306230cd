"""RFC 9420 Appendix C: the left-balanced binary tree laid out in an array.

Leaves sit at even node indices (leaf i at node 2i), parents at odd ones, and a node's index
does not depend on the tree's size: growing the tree to the right or truncating its right half
never renumbers a node. As in RFC 9420 the tree is always complete (the number of leaves is a
power of two), so ``n_leaves`` must be one; functions taking it refuse anything else.

Pure integer arithmetic, no I/O; ``ValueError`` on a misuse (these are programming errors of the
caller, never reachable from wire data that was validated first).
"""

from __future__ import annotations


def log2(x: int) -> int:
    """floor(log2(x)), with log2(0) = 0 as in the RFC."""
    if x < 0:
        raise ValueError("log2 of a negative number")
    return max(x.bit_length() - 1, 0)


def level(x: int) -> int:
    """The level of node x: 0 for leaves, the number of trailing 1 bits otherwise."""
    if x & 1 == 0:
        return 0
    k = 0
    while (x >> k) & 1 == 1:
        k += 1
    return k


def _check_n_leaves(n_leaves: int) -> None:
    if n_leaves < 1 or n_leaves & (n_leaves - 1):
        raise ValueError(f"n_leaves must be a power of two, got {n_leaves}")


def node_width(n_leaves: int) -> int:
    """The number of nodes of a tree with ``n_leaves`` leaves."""
    if n_leaves == 0:
        return 0
    return 2 * (n_leaves - 1) + 1


def root(n_leaves: int) -> int:
    _check_n_leaves(n_leaves)
    return (1 << log2(node_width(n_leaves))) - 1


def is_leaf(x: int) -> bool:
    return x & 1 == 0


def left(x: int) -> int:
    k = level(x)
    if k == 0:
        raise ValueError("a leaf has no children")
    return x ^ (0x01 << (k - 1))


def right(x: int) -> int:
    k = level(x)
    if k == 0:
        raise ValueError("a leaf has no children")
    return x ^ (0x03 << (k - 1))


def parent(x: int, n_leaves: int) -> int:
    if x == root(n_leaves):
        raise ValueError("the root has no parent")
    k = level(x)
    b = (x >> (k + 1)) & 0x01
    return (x | (1 << k)) ^ (b << (k + 1))


def sibling(x: int, n_leaves: int) -> int:
    p = parent(x, n_leaves)
    return right(p) if x < p else left(p)


def direct_path(x: int, n_leaves: int) -> list[int]:
    """The parents of x up to and including the root (empty for the root itself)."""
    r = root(n_leaves)
    if x >= node_width(n_leaves):
        raise ValueError(f"node {x} is outside a tree of {n_leaves} leaves")
    path: list[int] = []
    while x != r:
        x = parent(x, n_leaves)
        path.append(x)
    return path


def copath(x: int, n_leaves: int) -> list[int]:
    """The siblings of x and of each node of its direct path except the root."""
    r = root(n_leaves)
    if x == r:
        return []
    chain = [x, *direct_path(x, n_leaves)]
    chain.pop()  # the root has no sibling
    return [sibling(y, n_leaves) for y in chain]


def common_ancestor(x: int, y: int) -> int:
    """The lowest common ancestor of nodes x and y (their common bit prefix, then 0111...)."""
    lx, ly = level(x) + 1, level(y) + 1
    if lx <= ly and x >> ly == y >> ly:
        return y
    if ly <= lx and x >> lx == y >> lx:
        return x
    xn, yn, k = x, y, 0
    while xn != yn:
        xn, yn = xn >> 1, yn >> 1
        k += 1
    return (xn << k) + (1 << (k - 1)) - 1


def leaf_to_node(leaf_index: int) -> int:
    return 2 * leaf_index


def node_to_leaf(x: int) -> int:
    if not is_leaf(x):
        raise ValueError(f"node {x} is not a leaf")
    return x // 2


def subtree_leaves(x: int) -> range:
    """Leaf indices under node x (x itself if it is a leaf)."""
    k = level(x)
    first = (x >> (k + 1)) << k if k else x // 2
    return range(first, first + (1 << k))


def is_in_subtree(x: int, ancestor: int) -> bool:
    """True if node x is ``ancestor`` or below it."""
    k = level(ancestor)
    # the one other index with the same prefix is the all-ones node above the subtree
    return x >> (k + 1) == ancestor >> (k + 1) and level(x) <= k
