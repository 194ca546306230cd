"""The public ratchet tree (RFC 9420 §4, §7): leaves are devices, parents carry HPKE public keys.

Only public data lives here; private keys belong to ``agent.protocol.mls.group.Group``. A
``RatchetTree`` that has been handed out is never changed: code that builds the next epoch's tree
calls ``copy()`` and edits the copy (the ``_``-prefixed editing methods are for that code only), so
a refused commit can never leave a half-applied tree behind.

Tree hash (keyfleet's, over CBOR instead of the RFC's TLS structs; see docs/treekem.md)::

    leaf x:   H(cbor([0, leaf_index, leaf_map or null]))
    parent x: H(cbor([1, parent_map or null, treehash(left(x)), treehash(right(x))]))
    tree hash = treehash(root)

with ``leaf_map = {"id": device_id, "sig": signature key, "enc": encryption key}`` and
``parent_map = {"enc": encryption key, "unmerged": [leaf indices, ascending]}``. Subtree hashes
are cached per node and invalidated along the path of every edit, so a commit rehashes
O(log N) nodes rather than the whole tree.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from agent.protocol.errors import ProtocolError
from agent.protocol.mls import codec
from agent.protocol.mls import tree_math as tm
from agent.protocol.mls.crypto import hash_


@dataclass(frozen=True, slots=True)
class LeafNode:
    """A member: its device id, its signature key (the DevID key that signs its commits) and its
    HPKE encryption key (the leaf key, held in the device's TPM). Keys are 65-byte SEC1 points."""

    device_id: bytes
    signature_key: bytes
    encryption_key: bytes

    def to_obj(self) -> dict[str, object]:
        return {"id": self.device_id, "sig": self.signature_key, "enc": self.encryption_key}

    @classmethod
    def from_obj(cls, value: object, what: str = "leaf") -> LeafNode:
        m = codec.as_map(value, what, {"id", "sig", "enc"})
        return cls(
            device_id=codec.as_bytes(m["id"], f"{what}.id", 1, codec.MAX_DEVICE_ID),
            signature_key=codec.as_point(m["sig"], f"{what}.sig"),
            encryption_key=codec.as_point(m["enc"], f"{what}.enc"),
        )


@dataclass(frozen=True, slots=True)
class ParentNode:
    """An inner node: its HPKE public key and the leaves added below it since it was last set
    (they do not know its private key; RFC 9420 §7.2)."""

    encryption_key: bytes
    unmerged_leaves: tuple[int, ...] = ()

    def to_obj(self) -> dict[str, object]:
        return {"enc": self.encryption_key, "unmerged": list(self.unmerged_leaves)}

    @classmethod
    def from_obj(cls, value: object, what: str = "parent") -> ParentNode:
        m = codec.as_map(value, what, {"enc", "unmerged"})
        unmerged = codec.as_list(
            m["unmerged"],
            f"{what}.unmerged",
            codec.MAX_LEAVES,
            lambda v, w: codec.as_uint(v, w, codec.MAX_LEAVES - 1),
        )
        return cls(codec.as_point(m["enc"], f"{what}.enc"), tuple(unmerged))


Node = LeafNode | ParentNode | None


class RatchetTree:
    """A complete left-balanced tree (``n_leaves`` is a power of two) stored as a node array."""

    __slots__ = ("_hashes", "_nodes")

    def __init__(self, nodes: Sequence[Node]) -> None:
        self._nodes: list[Node] = list(nodes)
        self._hashes: dict[int, bytes] = {}
        self._check_shape()

    # -- reading -----------------------------------------------------------------------------

    @property
    def n_leaves(self) -> int:
        return (len(self._nodes) + 1) // 2

    @property
    def root(self) -> int:
        return tm.root(self.n_leaves)

    def node(self, x: int) -> Node:
        return self._nodes[x]

    def leaf(self, leaf_index: int) -> LeafNode | None:
        if not 0 <= leaf_index < self.n_leaves:
            return None
        node = self._nodes[tm.leaf_to_node(leaf_index)]
        assert node is None or isinstance(node, LeafNode)
        return node

    def parent_node(self, x: int) -> ParentNode | None:
        node = self._nodes[x]
        assert node is None or isinstance(node, ParentNode)
        return node

    def members(self) -> Iterator[tuple[int, LeafNode]]:
        """(leaf index, leaf) of every non-blank leaf, in leaf order."""
        for i in range(self.n_leaves):
            node = self._nodes[2 * i]
            if isinstance(node, LeafNode):
                yield i, node

    def member_count(self) -> int:
        return sum(1 for _ in self.members())

    def find_device(self, device_id: bytes) -> int | None:
        """The leaf index of ``device_id``, or None if it is not a member."""
        for i, leaf in self.members():
            if leaf.device_id == device_id:
                return i
        return None

    def resolution(self, x: int, exclude: frozenset[int] = frozenset()) -> list[int]:
        """RFC 9420 §4.1.1: the smallest set of non-blank nodes covering the subtree of x. Leaves
        (by leaf index) in ``exclude`` are left out: a commit does not encrypt to the members it
        adds, they get their path secret in the Welcome."""
        node = self._nodes[x]
        if node is None:
            if tm.is_leaf(x):
                return []
            return self.resolution(tm.left(x), exclude) + self.resolution(tm.right(x), exclude)
        if isinstance(node, LeafNode):
            return [] if tm.node_to_leaf(x) in exclude else [x]
        return [x] + [tm.leaf_to_node(u) for u in node.unmerged_leaves if u not in exclude]

    def filtered_direct_path(self, leaf_index: int) -> list[tuple[int, int]]:
        """RFC 9420 §4.1.2: (node, copath child) for each node of the leaf's direct path whose
        child on the copath has a non-empty resolution."""
        x = tm.leaf_to_node(leaf_index)
        out: list[tuple[int, int]] = []
        for node in tm.direct_path(x, self.n_leaves):
            child = tm.sibling(x, self.n_leaves)
            if self.resolution(child):
                out.append((node, child))
            x = node
        return out

    def tree_hash(self) -> bytes:
        return self._hash(self.root)

    def _hash(self, x: int) -> bytes:
        cached = self._hashes.get(x)
        if cached is not None:
            return cached
        node = self._nodes[x]
        if tm.is_leaf(x):
            assert node is None or isinstance(node, LeafNode)
            leaf_obj = None if node is None else node.to_obj()
            value = hash_(codec.encode([0, tm.node_to_leaf(x), leaf_obj]))
        else:
            assert node is None or isinstance(node, ParentNode)
            parent_obj = None if node is None else node.to_obj()
            value = hash_(
                codec.encode([1, parent_obj, self._hash(tm.left(x)), self._hash(tm.right(x))])
            )
        self._hashes[x] = value
        return value

    def copy(self) -> RatchetTree:
        clone = RatchetTree.__new__(RatchetTree)
        clone._nodes = list(self._nodes)
        clone._hashes = dict(self._hashes)
        return clone

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RatchetTree) and self._nodes == other._nodes

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RatchetTree(n_leaves={self.n_leaves}, members={self.member_count()})"

    # -- encoding ----------------------------------------------------------------------------

    def to_obj(self) -> list[object]:
        return [None if n is None else n.to_obj() for n in self._nodes]

    @classmethod
    def from_obj(cls, value: object, what: str = "tree") -> RatchetTree:
        """Strict: array length a full tree's width, leaves at even and parents at odd indices,
        unmerged leaves ascending, inside the node's subtree and non-blank, no trailing blank
        right half, no device id twice."""
        items = codec.as_list(value, what, 2 * codec.MAX_LEAVES - 1, lambda v, w: v, min_len=1)
        nodes: list[Node] = []
        for x, item in enumerate(items):
            if item is None:
                nodes.append(None)
            elif tm.is_leaf(x):
                nodes.append(LeafNode.from_obj(item, f"{what}[{x}]"))
            else:
                nodes.append(ParentNode.from_obj(item, f"{what}[{x}]"))
        try:
            return cls(nodes)
        except ValueError as exc:
            raise ProtocolError("mls.decode.tree", f"{what}: {exc}") from None

    def _check_shape(self) -> None:
        width = len(self._nodes)
        n = (width + 1) // 2
        if width < 1 or tm.node_width(n) != width or n & (n - 1):
            raise ValueError(f"{width} nodes is not the width of a complete tree")
        if n > codec.MAX_LEAVES:
            raise ValueError(f"more than {codec.MAX_LEAVES} leaves")
        seen_ids: set[bytes] = set()
        for x, node in enumerate(self._nodes):
            if node is None:
                continue
            if tm.is_leaf(x) != isinstance(node, LeafNode):
                raise ValueError(f"node {x} has the wrong kind")
            if isinstance(node, LeafNode):
                if node.device_id in seen_ids:
                    raise ValueError("a device id appears twice")
                seen_ids.add(node.device_id)
            else:
                u = node.unmerged_leaves
                if list(u) != sorted(set(u)):
                    raise ValueError(f"node {x}: unmerged leaves not strictly ascending")
                for leaf_index in u:
                    if leaf_index not in tm.subtree_leaves(x) or self.leaf(leaf_index) is None:
                        raise ValueError(f"node {x}: unmerged leaf {leaf_index} invalid")
        if not seen_ids:
            raise ValueError("a tree without members")
        if n > 1 and not any(self.leaf(i) is not None for i in range(n // 2, n)):
            raise ValueError("the right half is blank: the tree should have been truncated")

    # -- editing (only on a fresh copy; see the module docstring) -----------------------------

    def _set(self, x: int, node: Node) -> None:
        self._nodes[x] = node
        self._hashes.pop(x, None)
        if x != self.root:
            for p in tm.direct_path(x, self.n_leaves):
                self._hashes.pop(p, None)

    def _blank_direct_path(self, leaf_index: int) -> None:
        for p in tm.direct_path(tm.leaf_to_node(leaf_index), self.n_leaves):
            self._set(p, None)

    def _remove_leaf(self, leaf_index: int) -> None:
        """RFC 9420 §12.1.3: blank the leaf and its direct path."""
        self._set(tm.leaf_to_node(leaf_index), None)
        self._blank_direct_path(leaf_index)

    def _truncate(self) -> None:
        """Halve the tree while its right half holds no member (RFC 9420 §7.8)."""
        while self.n_leaves > 1 and not any(
            self._nodes[2 * i] is not None for i in range(self.n_leaves // 2, self.n_leaves)
        ):
            half = self.n_leaves // 2
            del self._nodes[tm.node_width(half) :]
            self._hashes = {x: h for x, h in self._hashes.items() if x < len(self._nodes)}
            self._hashes.pop(self.root, None)

    def _add_leaf(self, leaf: LeafNode) -> int:
        """Put ``leaf`` in the leftmost blank leaf, doubling the tree if it is full, and record it
        as unmerged in every non-blank parent above it (RFC 9420 §7.7)."""
        index = next((i for i in range(self.n_leaves) if self.leaf(i) is None), None)
        if index is None:
            index = self.n_leaves
            self._nodes.extend([None] * len(self._nodes) + [None])
        self._set(tm.leaf_to_node(index), leaf)
        for p in tm.direct_path(tm.leaf_to_node(index), self.n_leaves):
            parent = self.parent_node(p)
            if parent is not None:
                merged = tuple(sorted({*parent.unmerged_leaves, index}))
                self._set(p, ParentNode(parent.encryption_key, merged))
        return index

    def _replace_leaf_key(self, leaf_index: int, encryption_key: bytes) -> None:
        leaf = self.leaf(leaf_index)
        assert leaf is not None
        self._set(
            tm.leaf_to_node(leaf_index),
            LeafNode(leaf.device_id, leaf.signature_key, encryption_key),
        )

    def _apply_path(self, leaf_index: int, path: Iterable[tuple[int, bytes]]) -> None:
        """Blank the sender's direct path, then set each (node, public key) of its filtered
        direct path with no unmerged leaves: nodes the filter skipped stay blank."""
        self._blank_direct_path(leaf_index)
        for x, key in path:
            self._set(x, ParentNode(key, ()))
