"""The public ratchet tree (RFC 9420 §4, §7): leaves are devices, parents carry HPKE public keys.

Only public data lives here; private keys belong to ``agent.protocol.mls.group.Group``. A
``RatchetTree`` that has been handed out is never changed: code that builds the next epoch's tree
calls ``copy()`` and edits the copy (the ``_``-prefixed editing methods are for that code only), so
a refused commit can never leave a half-applied tree behind.

Tree hash (keyfleet's, over CBOR instead of the RFC's TLS structs; see docs/treekem.md)::

    leaf x:   H(cbor([0, leaf_index, {"leaf": leaf_map, "adm": admission} or null]))
    parent x: H(cbor([1, parent_map or null, treehash(left(x)), treehash(right(x))]))
    tree hash = treehash(root)

with ``leaf_map`` the signed LeafNode (``LeafNode.to_obj``), ``admission`` the 32-byte SHA-256 of
the Authorization that let the leaf in (32 zero bytes: none), and ``parent_map = {"enc":
encryption key, "ph": parent hash, "unmerged": [leaf indices, ascending]}``. Subtree hashes are
cached per node and invalidated along the path of every edit, so a commit rehashes O(log N) nodes
rather than the whole tree.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol.errors import CryptoError, ProtocolError
from agent.protocol.hpke import serialize_public_key
from agent.protocol.mls import codec
from agent.protocol.mls import tree_math as tm
from agent.protocol.mls.crypto import NH, hash_, sign_with_label, verify_with_label

LEAF_VERSION = 1
SOURCE_KEY_PACKAGE = 1
SOURCE_UPDATE = 2
SOURCE_COMMIT = 3
LEAF_NODE_LABEL = b"LeafNodeTBS"
MAX_CREDENTIAL = 4096
"""Largest DevID certificate (DER) a leaf may carry; keyfleet's are about 500 bytes."""
NO_ADMISSION = bytes(NH)
"""The admission hash of a leaf that came in without an Authorization (only where the caller's
commit check allowed that)."""


@dataclass(frozen=True, slots=True)
class LeafNode:
    """A member (RFC 9420 §7.2): its device id, its signature key (the DevID key that signs its
    commits and this leaf), its HPKE encryption key (the leaf key, held in the device's TPM), its
    credential (the DevID certificate, DER), where the leaf comes from (``source``: 1 KeyPackage,
    2 update, 3 commit), the parent hash (empty unless source is commit) and the leaf signature.

    MLS only checks that the signature verifies under ``signature_key``; whether the credential
    names ``device_id`` and certifies ``signature_key`` is the caller's ``LeafCheck``."""

    device_id: bytes
    signature_key: bytes
    encryption_key: bytes
    credential: bytes
    source: int
    parent_hash: bytes
    signature: bytes

    def _tbs_obj(self) -> dict[str, object]:
        return {
            "v": LEAF_VERSION,
            "id": self.device_id,
            "sig": self.signature_key,
            "enc": self.encryption_key,
            "cred": self.credential,
            "src": self.source,
            "ph": self.parent_hash,
        }

    def tbs(self, group_id: bytes, leaf_index: int) -> bytes:
        """LeafNodeTBS: the leaf without its signature; for an update or commit leaf also the
        group and the leaf's position, so it cannot be moved to another group or slot."""
        data = codec.encode(self._tbs_obj())
        if self.source != SOURCE_KEY_PACKAGE:
            data += codec.encode([group_id, leaf_index])
        return data

    @classmethod
    def signed(
        cls,
        key: ec.EllipticCurvePrivateKey,
        *,
        device_id: bytes,
        encryption_key: bytes,
        credential: bytes,
        source: int,
        parent_hash: bytes = b"",
        group_id: bytes = b"",
        leaf_index: int = 0,
    ) -> LeafNode:
        """A leaf signed by ``key`` (its own signature key)."""
        unsigned = cls(
            device_id,
            serialize_public_key(key.public_key()),
            encryption_key,
            credential,
            source,
            parent_hash,
            b"",
        )
        tbs = unsigned.tbs(group_id, leaf_index)
        return replace(unsigned, signature=sign_with_label(key, LEAF_NODE_LABEL, tbs))

    def resigned(
        self,
        key: ec.EllipticCurvePrivateKey,
        *,
        encryption_key: bytes,
        parent_hash: bytes,
        group_id: bytes,
        leaf_index: int,
        credential: bytes | None = None,
    ) -> LeafNode:
        """This member's leaf as its commit sets it: new key and parent hash, source commit;
        ``credential``: a renewed DevID certificate for the same key, else the one it has."""
        return LeafNode.signed(
            key,
            device_id=self.device_id,
            encryption_key=encryption_key,
            credential=self.credential if credential is None else credential,
            source=SOURCE_COMMIT,
            parent_hash=parent_hash,
            group_id=group_id,
            leaf_index=leaf_index,
        )

    def verify(self, group_id: bytes, leaf_index: int) -> None:
        """The leaf signature verifies under the leaf's own signature key
        (``mls.leaf.signature``); a KeyPackage leaf has no parent hash (``mls.leaf.source``)."""
        if self.source == SOURCE_KEY_PACKAGE and self.parent_hash:
            raise ProtocolError("mls.leaf.source", "a KeyPackage leaf carries a parent hash")
        try:
            verify_with_label(
                codec.public_key(self.signature_key),
                LEAF_NODE_LABEL,
                self.tbs(group_id, leaf_index),
                self.signature,
            )
        except CryptoError:
            raise ProtocolError("mls.leaf.signature", "the leaf signature is invalid") from None

    def to_obj(self) -> dict[str, object]:
        return {**self._tbs_obj(), "lsig": self.signature}

    @classmethod
    def from_obj(cls, value: object, what: str = "leaf") -> LeafNode:
        m = codec.as_map(value, what, {"v", "id", "sig", "enc", "cred", "src", "ph", "lsig"})
        codec.expect_exact(m["v"], LEAF_VERSION, f"{what}.v", "mls.version")
        return cls(
            device_id=codec.as_bytes(m["id"], f"{what}.id", 1, codec.MAX_DEVICE_ID),
            signature_key=codec.as_point(m["sig"], f"{what}.sig"),
            encryption_key=codec.as_point(m["enc"], f"{what}.enc"),
            credential=codec.as_bytes(m["cred"], f"{what}.cred", 1, MAX_CREDENTIAL),
            source=_as_source(m["src"], f"{what}.src"),
            parent_hash=codec.as_bytes(m["ph"], f"{what}.ph", 0, NH),
            signature=codec.as_bytes(m["lsig"], f"{what}.lsig", 8, codec.MAX_SIGNATURE),
        )


def _as_source(value: object, what: str) -> int:
    source = codec.as_uint(value, what, SOURCE_COMMIT)
    if source < SOURCE_KEY_PACKAGE:
        raise codec.fail(what, f"leaf source {source} unknown")
    return source


@dataclass(frozen=True, slots=True)
class ParentNode:
    """An inner node: its HPKE public key, its parent hash (RFC 9420 §7.9: links it to the
    parent set by the same commit) and the leaves added below it since it was last set (they do
    not know its private key; RFC 9420 §7.2)."""

    encryption_key: bytes
    parent_hash: bytes = b""
    unmerged_leaves: tuple[int, ...] = ()

    def to_obj(self) -> dict[str, object]:
        return {
            "enc": self.encryption_key,
            "ph": self.parent_hash,
            "unmerged": list(self.unmerged_leaves),
        }

    @classmethod
    def from_obj(cls, value: object, what: str = "parent") -> ParentNode:
        m = codec.as_map(value, what, {"enc", "ph", "unmerged"})
        unmerged = codec.as_list(
            m["unmerged"],
            f"{what}.unmerged",
            codec.MAX_LEAVES,
            lambda v, w: codec.as_uint(v, w, codec.MAX_LEAVES - 1),
        )
        return cls(
            codec.as_point(m["enc"], f"{what}.enc"),
            codec.as_bytes(m["ph"], f"{what}.ph", 0, NH),
            tuple(unmerged),
        )


Node = LeafNode | ParentNode | None


class RatchetTree:
    """A complete left-balanced tree (``n_leaves`` is a power of two) stored as a node array."""

    __slots__ = ("_adm", "_hashes", "_nodes")

    def __init__(
        self, nodes: Sequence[Node], admissions: Mapping[int, bytes] | None = None
    ) -> None:
        """``admissions``: leaf index -> admission hash; a member without one gets
        ``NO_ADMISSION``."""
        self._nodes: list[Node] = list(nodes)
        self._hashes: dict[int, bytes] = {}
        self._check_shape()
        given = dict(admissions or {})
        self._adm: dict[int, bytes] = {
            i: given.pop(i, NO_ADMISSION) for i, _ in list(self.members())
        }
        if given or any(len(a) != NH for a in self._adm.values()):
            raise ValueError("admission hashes must be 32 bytes, one per member")

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

    def admission(self, leaf_index: int) -> bytes:
        """The admission hash recorded for the member at ``leaf_index``."""
        return self._adm[leaf_index]

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
            value = hash_(codec.encode([0, tm.node_to_leaf(x), self._leaf_obj(x)]))
        else:
            assert node is None or isinstance(node, ParentNode)
            parent_obj = None if node is None else node.to_obj()
            value = hash_(
                codec.encode([1, parent_obj, self._hash(tm.left(x)), self._hash(tm.right(x))])
            )
        self._hashes[x] = value
        return value

    def _leaf_obj(self, x: int) -> dict[str, object] | None:
        node = self._nodes[x]
        if node is None:
            return None
        assert isinstance(node, LeafNode)
        return {"leaf": node.to_obj(), "adm": self._adm[tm.node_to_leaf(x)]}

    def original_hash(self, x: int, unmerged: frozenset[int]) -> bytes:
        """The tree hash of the subtree of ``x`` as it was before the leaves in ``unmerged``
        were added (RFC 9420 §7.9.2 "original sibling tree hash"): those leaves blank and gone
        from every unmerged list."""
        if not unmerged.intersection(tm.subtree_leaves(x)):
            return self._hash(x)
        node = self._nodes[x]
        if tm.is_leaf(x):
            return hash_(codec.encode([0, tm.node_to_leaf(x), None]))
        assert node is None or isinstance(node, ParentNode)
        obj = None
        if node is not None:
            kept = tuple(u for u in node.unmerged_leaves if u not in unmerged)
            obj = replace(node, unmerged_leaves=kept).to_obj()
        return hash_(
            codec.encode(
                [
                    1,
                    obj,
                    self.original_hash(tm.left(x), unmerged),
                    self.original_hash(tm.right(x), unmerged),
                ]
            )
        )

    def copy(self) -> RatchetTree:
        clone = RatchetTree.__new__(RatchetTree)
        clone._nodes = list(self._nodes)
        clone._hashes = dict(self._hashes)
        clone._adm = dict(self._adm)
        return clone

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, RatchetTree)
            and self._nodes == other._nodes
            and self._adm == other._adm
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RatchetTree(n_leaves={self.n_leaves}, members={self.member_count()})"

    # -- encoding ----------------------------------------------------------------------------

    def to_obj(self) -> list[object]:
        return [
            self._leaf_obj(x) if tm.is_leaf(x) else None if n is None else n.to_obj()
            for x, n in enumerate(self._nodes)
        ]

    @classmethod
    def from_obj(cls, value: object, what: str = "tree") -> RatchetTree:
        """Strict: array length a full tree's width, leaves at even and parents at odd indices,
        unmerged leaves ascending, inside the node's subtree and non-blank, no trailing blank
        right half, no device id twice."""
        items = codec.as_list(value, what, 2 * codec.MAX_LEAVES - 1, lambda v, w: v, min_len=1)
        nodes: list[Node] = []
        admissions: dict[int, bytes] = {}
        for x, item in enumerate(items):
            if item is None:
                nodes.append(None)
            elif tm.is_leaf(x):
                slot = codec.as_map(item, f"{what}[{x}]", {"leaf", "adm"})
                nodes.append(LeafNode.from_obj(slot["leaf"], f"{what}[{x}].leaf"))
                admissions[tm.node_to_leaf(x)] = codec.as_bytes(
                    slot["adm"], f"{what}[{x}].adm", NH, NH
                )
            else:
                nodes.append(ParentNode.from_obj(item, f"{what}[{x}]"))
        try:
            return cls(nodes, admissions)
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

    def _set(self, x: int, node: Node, admission: bytes | None = None) -> None:
        self._nodes[x] = node
        if tm.is_leaf(x):
            if node is None:
                self._adm.pop(tm.node_to_leaf(x), None)
            elif admission is not None:
                self._adm[tm.node_to_leaf(x)] = admission
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

    def _add_leaf(self, leaf: LeafNode, admission: bytes) -> int:
        """Put ``leaf`` (admitted by the Authorization hashing to ``admission``) in the leftmost
        blank leaf, doubling the tree if it is full, and record it as unmerged in every non-blank
        parent above it (RFC 9420 §7.7)."""
        index = next((i for i in range(self.n_leaves) if self.leaf(i) is None), None)
        if index is None:
            index = self.n_leaves
            self._nodes.extend([None] * len(self._nodes) + [None])
        self._set(tm.leaf_to_node(index), leaf, admission)
        for p in tm.direct_path(tm.leaf_to_node(index), self.n_leaves):
            parent = self.parent_node(p)
            if parent is not None:
                merged = tuple(sorted({*parent.unmerged_leaves, index}))
                self._set(p, replace(parent, unmerged_leaves=merged))
        return index

    def _replace_leaf(self, leaf_index: int, leaf: LeafNode) -> None:
        """A member's new leaf (its commit's); its admission stays."""
        assert self.leaf(leaf_index) is not None
        self._set(tm.leaf_to_node(leaf_index), leaf)

    def _apply_path(self, leaf_index: int, path: Iterable[tuple[int, bytes]]) -> None:
        """Blank the sender's direct path, then set each (node, public key) of its filtered
        direct path with no unmerged leaves: nodes the filter skipped stay blank. Parent hashes
        are set afterwards (``agent.protocol.mls.parenthash.set_path_parent_hashes``)."""
        self._blank_direct_path(leaf_index)
        for x, key in path:
            self._set(x, ParentNode(key))
