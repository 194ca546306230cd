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
rather than the whole tree. Nodes live in copy-on-write chunks (``copy()`` shares them; an edit
copies the few it writes) and the tree keeps indexes of its encryption keys and device ids and
per-chunk member counts, so copying a tree for the next epoch, the duplicate-key and duplicate-
device checks and the member count cost no scan of the tree.

Why one module of this size (about 850 lines): the chunked node store, its indexes and the hash
cache are one invariant (every edit updates all three along one path); split apart, each part
could be edited without the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Generic, Self, TypeVar

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

CHUNK_SHIFT = 8
"""Nodes are stored in chunks of ``2**CHUNK_SHIFT``; ``copy()`` shares every chunk and an edit
copies only the chunks it writes (copy-on-write), so a commit copies O(log N) chunks, not the
tree. Read when a tree is built (tests set it small to cross chunk boundaries)."""
_SHARDS = 1024
"""Shards of the key and device indexes (copy-on-write per shard, like the node chunks): at
least this many, and about one per ``_PER_SHARD`` entries the tree can hold when it is built,
so that a write copies a shard of a few dozen entries whatever the group's size (with a fixed
count, a commit in a group of 100,000 copied about 36 shards of 200 keys each: O(N), not
O(log N))."""
_PER_SHARD = 32
_V = TypeVar("_V")


def _shard_count(entries: int) -> int:
    """A power of two, at least ``_SHARDS``, about ``entries / _PER_SHARD``."""
    return max(_SHARDS, 1 << (entries // _PER_SHARD).bit_length())


class _Shards(Generic[_V]):
    """bytes -> a value, in dicts (``_shard_count``) shared copy-on-write per shard between a
    state and its copies: ``copy`` is O(shards), and a write copies only the shard it
    touches."""

    __slots__ = ("_n", "_owned", "_shards")

    def __init__(self, entries: int = 0) -> None:
        """``entries``: about how many keys it will hold (sets the number of shards)."""
        self._n = _shard_count(entries)
        self._shards: list[dict[bytes, _V]] = [{} for _ in range(self._n)]
        self._owned: set[int] = set(range(self._n))

    def copy(self) -> Self:
        clone = type(self).__new__(type(self))
        clone._n = self._n
        clone._shards = list(self._shards)
        clone._owned = set()
        self._owned = set()
        return clone

    def _shard(self, key: bytes) -> dict[bytes, _V]:
        """The shard holding ``key``, this state's own (copied first if shared)."""
        i = hash(key) % self._n
        if i not in self._owned:
            self._shards[i] = dict(self._shards[i])
            self._owned.add(i)
        return self._shards[i]


class _Index(_Shards[tuple[int, ...]]):
    """bytes -> node positions holding it: the tree's encryption keys (a duplicate-key check
    without scanning the tree) and device ids."""

    __slots__ = ()

    def get(self, key: bytes) -> tuple[int, ...]:
        return self._shards[hash(key) % self._n].get(key, ())

    def add(self, key: bytes, position: int) -> None:
        shard = self._shard(key)
        shard[key] = (*shard.get(key, ()), position)

    def discard(self, key: bytes, position: int) -> None:
        shard = self._shard(key)
        rest = tuple(p for p in shard.get(key, ()) if p != position)
        if rest:
            shard[key] = rest
        else:
            shard.pop(key, None)


class _Counter(_Shards[int]):
    """bytes -> how many leaves record it: the admission hashes in use (which Authorizations a
    member's state must keep) without scanning the leaves."""

    __slots__ = ()

    def get(self, key: bytes) -> int:
        return self._shards[hash(key) % self._n].get(key, 0)

    def keys(self) -> list[bytes]:
        return [key for shard in self._shards for key in shard]

    def add(self, key: bytes, delta: int) -> None:
        shard = self._shard(key)
        count = shard.get(key, 0) + delta
        if count > 0:
            shard[key] = count
        else:
            shard.pop(key, None)


class RatchetTree:
    """A complete left-balanced tree (``n_leaves`` is a power of two): a node array stored in
    copy-on-write chunks, with per-node tree hashes, per-chunk member counts and indexes of
    encryption keys and device ids kept up to date by every edit (module docstring)."""

    __slots__ = (
        "_adm",
        "_adm_used",
        "_cache_owned",
        "_counts",
        "_devices",
        "_fill",
        "_hashes",
        "_keys",
        "_members",
        "_nodes",
        "_owned",
        "_shift",
        "_width",
    )

    def __init__(
        self, nodes: Sequence[Node], admissions: Mapping[int, bytes] | None = None
    ) -> None:
        """``admissions``: leaf index -> admission hash; a member without one gets
        ``NO_ADMISSION``."""
        flat: list[Node] = list(nodes)
        _check_shape(flat)
        self._shift = CHUNK_SHIFT
        size = 1 << self._shift
        self._width = len(flat)
        count = -(-len(flat) // size)
        flat += [None] * (count * size - len(flat))
        self._nodes: list[list[Node]] = [flat[i : i + size] for i in range(0, len(flat), size)]
        self._hashes: list[list[bytes | None]] = [[None] * size for _ in range(count)]
        self._fill: list[list[bool | None]] = [[None] * size for _ in range(count)]
        self._adm: list[list[bytes | None]] = [[None] * size for _ in range(count)]
        self._owned: set[int] = set(range(count))
        self._cache_owned: set[int] = set(range(count))
        self._counts = [0] * count
        self._members = 0
        self._keys = _Index(self._width)  # a key per node at most
        self._devices = _Index((self._width + 1) // 2)
        self._adm_used = _Counter()  # admission hashes change only with membership
        given = dict(admissions or {})
        for x in range(self._width):
            node = flat[x]
            if node is not None:
                self._index(x, node)
                if tm.is_leaf(x):
                    admission = given.pop(tm.node_to_leaf(x), NO_ADMISSION)
                    self._adm[x >> self._shift][x & (size - 1)] = admission
                    self._adm_used.add(admission, 1)
        if given or any(len(a) != NH for _, a in self._admissions()):
            raise ValueError("admission hashes must be 32 bytes, one per member")

    # -- reading -----------------------------------------------------------------------------

    @property
    def n_leaves(self) -> int:
        return (self._width + 1) // 2

    @property
    def root(self) -> int:
        return tm.root(self.n_leaves)

    def node(self, x: int) -> Node:
        if not 0 <= x < self._width:
            raise IndexError(f"node {x} is outside the tree")
        return self._nodes[x >> self._shift][x & ((1 << self._shift) - 1)]

    def leaf(self, leaf_index: int) -> LeafNode | None:
        if not 0 <= leaf_index < self.n_leaves:
            return None
        node = self.node(tm.leaf_to_node(leaf_index))
        assert node is None or isinstance(node, LeafNode)
        return node

    def admission(self, leaf_index: int) -> bytes:
        """The admission hash recorded for the member at ``leaf_index``."""
        x = tm.leaf_to_node(leaf_index)
        value = None
        if 0 <= x < self._width:
            value = self._adm[x >> self._shift][x & ((1 << self._shift) - 1)]
        if value is None:
            raise KeyError(leaf_index)
        return value

    def admission_hashes(self) -> list[bytes]:
        """Every distinct admission hash some member's leaf records, NO_ADMISSION included
        (O(distinct hashes): no scan of the leaves)."""
        return self._adm_used.keys()

    def admission_in_use(self, admission: bytes) -> bool:
        """Whether some member's leaf records the admission hash ``admission`` (no scan)."""
        return self._adm_used.get(admission) > 0

    def parent_node(self, x: int) -> ParentNode | None:
        node = self.node(x)
        assert node is None or isinstance(node, ParentNode)
        return node

    def members(self) -> Iterator[tuple[int, LeafNode]]:
        """(leaf index, leaf) of every non-blank leaf, in leaf order."""
        size = 1 << self._shift
        for ci, count in enumerate(self._counts):
            if not count:
                continue
            chunk = self._nodes[ci]
            base = ci << self._shift
            for off in range(0, min(size, self._width - base), 2):
                node = chunk[off]
                if isinstance(node, LeafNode):
                    yield (base + off) // 2, node

    def member_count(self) -> int:
        return self._members

    def find_device(self, device_id: bytes) -> int | None:
        """The leaf index of ``device_id``, or None if it is not a member."""
        found = self._devices.get(device_id)
        return found[0] if found else None

    def key_positions(self, encryption_key: bytes) -> tuple[int, ...]:
        """The nodes (leaves and parents) whose encryption key is ``encryption_key``."""
        return self._keys.get(encryption_key)

    def resolution(self, x: int, exclude: frozenset[int] = frozenset()) -> list[int]:
        """RFC 9420 §4.1.1: the smallest set of non-blank nodes covering the subtree of x. Leaves
        (by leaf index) in ``exclude`` are left out: a commit does not encrypt to the members it
        adds, they get their path secret in the Welcome."""
        node = self.node(x)
        if node is None:
            if not self._filled(x):
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
            if self._filled(child):  # its resolution is not empty
                out.append((node, child))
            x = node
        return out

    def tree_hash(self) -> bytes:
        return self._hash(self.root)

    def _filled(self, x: int) -> bool:
        """Whether the subtree of x has a non-blank node, cached per node like the hashes (so
        a resolution skips blank subtrees instead of walking them)."""
        chunk = self._fill[x >> self._shift]
        off = x & ((1 << self._shift) - 1)
        cached = chunk[off]
        if cached is not None:
            return cached
        if self.node(x) is not None:
            value = True
        elif tm.is_leaf(x):
            value = False
        else:
            value = self._filled(tm.left(x)) or self._filled(tm.right(x))
        chunk[off] = value  # safe in a shared chunk, as for ``_hash``
        return value

    def _hash(self, x: int) -> bytes:
        chunk = self._hashes[x >> self._shift]
        off = x & ((1 << self._shift) - 1)
        cached = chunk[off]
        if cached is not None:
            return cached
        node = self.node(x)
        if tm.is_leaf(x):
            assert node is None or isinstance(node, LeafNode)
            value = hash_(codec.encode([0, tm.node_to_leaf(x), self._leaf_obj(x)]))
        else:
            assert node is None or isinstance(node, ParentNode)
            parent_obj = None if node is None else node.to_obj()
            value = hash_(
                codec.encode([1, parent_obj, self._hash(tm.left(x)), self._hash(tm.right(x))])
            )
        # Safe in a chunk shared with other trees: an edit below x invalidates x's entry, and
        # invalidating copies the chunk first, so every tree sharing it has x's subtree as here.
        chunk[off] = value
        return value

    def _leaf_obj(self, x: int) -> dict[str, object] | None:
        node = self.node(x)
        if node is None:
            return None
        assert isinstance(node, LeafNode)
        return {"leaf": node.to_obj(), "adm": self.admission(tm.node_to_leaf(x))}

    def original_hash(self, x: int, unmerged: frozenset[int]) -> bytes:
        """The tree hash of the subtree of ``x`` as it was before the leaves in ``unmerged``
        were added (RFC 9420 §7.9.2 "original sibling tree hash"): those leaves blank and gone
        from every unmerged list."""
        below = tm.subtree_leaves(x)
        if not any(u in below for u in unmerged):
            return self._hash(x)
        node = self.node(x)
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
        """A tree equal to this one sharing its chunks: O(N / chunk size), not O(N)."""
        clone = RatchetTree.__new__(RatchetTree)
        clone._shift = self._shift
        clone._width = self._width
        clone._nodes = list(self._nodes)
        clone._hashes = list(self._hashes)
        clone._fill = list(self._fill)
        clone._adm = list(self._adm)
        clone._owned = set()
        self._owned = set()
        clone._cache_owned = set()
        self._cache_owned = set()
        clone._counts = list(self._counts)
        clone._members = self._members
        clone._keys = self._keys.copy()
        clone._devices = self._devices.copy()
        clone._adm_used = self._adm_used.copy()
        return clone

    def _flat(self) -> list[Node]:
        return [n for chunk in self._nodes for n in chunk][: self._width]

    def _admissions(self) -> Iterator[tuple[int, bytes]]:
        for i, _ in self.members():
            yield i, self.admission(i)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, RatchetTree)
            and self._flat() == other._flat()
            and dict(self._admissions()) == dict(other._admissions())
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RatchetTree(n_leaves={self.n_leaves}, members={self.member_count()})"

    # -- encoding ----------------------------------------------------------------------------

    def to_obj(self) -> list[object]:
        return [
            self._leaf_obj(x) if tm.is_leaf(x) else None if n is None else n.to_obj()
            for x, n in enumerate(self._flat())
        ]

    def node_obj(self, x: int) -> object:
        """Node x as ``to_obj`` encodes it (None: blank)."""
        if tm.is_leaf(x):
            return self._leaf_obj(x)
        node = self.parent_node(x)
        return None if node is None else node.to_obj()

    def changed_since(self, base: RatchetTree) -> list[int]:
        """The nodes whose encoding (``node_obj``) may differ between ``base`` and this tree:
        the differing nodes of the chunks the two do not share, and every node of ``base``
        past this tree's width that is not blank. For a tree that is a copy of ``base``
        edited by a commit, O(log N) nodes of O(log N) chunks."""
        if base._shift != self._shift:
            return list(range(max(self._width, base._width)))
        size = 1 << self._shift
        out: list[int] = []
        for ci in range(max(len(self._nodes), len(base._nodes))):
            mine = self._nodes[ci] if ci < len(self._nodes) else None
            theirs = base._nodes[ci] if ci < len(base._nodes) else None
            if mine is theirs and self._adm[ci] is base._adm[ci]:
                continue
            offsets: Iterable[int] = range(size)
            if (
                mine is not None
                and theirs is not None
                and (ci + 1) << self._shift <= min(self._width, base._width)
            ):
                # a chunk inside both widths: only where either side holds another object can
                # the test below find a difference (a copy shares every untouched object)
                offsets = [
                    off
                    for off, (a, b, c, d) in enumerate(
                        zip(mine, theirs, self._adm[ci], base._adm[ci], strict=True)
                    )
                    if a is not b or c is not d
                ]
            for off in offsets:
                x = (ci << self._shift) + off
                a = mine[off] if mine is not None and x < self._width else None
                b = theirs[off] if theirs is not None and x < base._width else None
                if a is b and not isinstance(a, LeafNode):
                    continue
                if (a is not b and a != b) or (
                    isinstance(a, LeafNode)
                    and theirs is not None
                    and self._adm[ci][off] != base._adm[ci][off]
                ):
                    out.append(x)
        return out

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

    # -- editing (only on a fresh copy; see the module docstring) -----------------------------

    def _own(self, ci: int) -> None:
        """Make node chunk ``ci`` this tree's own before writing it (copy-on-write)."""
        if ci not in self._owned:
            self._nodes[ci] = list(self._nodes[ci])
            self._adm[ci] = list(self._adm[ci])
            self._owned.add(ci)

    def _own_cache(self, ci: int) -> None:
        """The same for the cached hashes and fills of chunk ``ci`` (apart: invalidating a
        path copies no node chunk, so ``changed_since`` looks only where nodes were written)."""
        if ci not in self._cache_owned:
            self._hashes[ci] = list(self._hashes[ci])
            self._fill[ci] = list(self._fill[ci])
            self._cache_owned.add(ci)

    def _index(self, x: int, node: LeafNode | ParentNode) -> None:
        self._keys.add(node.encryption_key, x)
        if isinstance(node, LeafNode):
            self._devices.add(node.device_id, tm.node_to_leaf(x))
            self._counts[x >> self._shift] += 1
            self._members += 1

    def _unindex(self, x: int, node: LeafNode | ParentNode) -> None:
        self._keys.discard(node.encryption_key, x)
        if isinstance(node, LeafNode):
            self._devices.discard(node.device_id, tm.node_to_leaf(x))
            self._counts[x >> self._shift] -= 1
            self._members -= 1

    def _invalidate(self, x: int) -> None:
        mask = (1 << self._shift) - 1
        for y in [x, *tm.direct_path(x, self.n_leaves)]:
            self._own_cache(y >> self._shift)
            self._hashes[y >> self._shift][y & mask] = None
            self._fill[y >> self._shift][y & mask] = None

    def _set(
        self, x: int, node: Node, admission: bytes | None = None, *, invalidate: bool = True
    ) -> None:
        """Write node x. ``invalidate=False``: its cached hashes and fills are left for the
        caller to invalidate (``_invalidate``) before anything reads them: a path written node
        by node is invalidated once from its lowest node, not once per node (O(log N), not
        O(log² N))."""
        old = self.node(x)
        ci, off = x >> self._shift, x & ((1 << self._shift) - 1)
        self._own(ci)
        if old is not None:
            self._unindex(x, old)
        self._nodes[ci][off] = node
        if node is not None:
            self._index(x, node)
        if tm.is_leaf(x):
            before = self._adm[ci][off]
            after = None if node is None else before if admission is None else admission
            if after != before:
                self._adm[ci][off] = after
                if before is not None:
                    self._adm_used.add(before, -1)
                if after is not None:
                    self._adm_used.add(after, 1)
        if invalidate:
            self._invalidate(x)

    def _blank_direct_path(self, leaf_index: int) -> None:
        for p in tm.direct_path(tm.leaf_to_node(leaf_index), self.n_leaves):
            self._set(p, None)

    def _remove_leaf(self, leaf_index: int) -> None:
        """RFC 9420 §12.1.3: blank the leaf and its direct path."""
        self._set(tm.leaf_to_node(leaf_index), None)
        self._blank_direct_path(leaf_index)

    def _any_member(self, start: int, stop: int) -> bool:
        """Whether a leaf at a node in [start, stop) is a member (by the chunk counts, scanning
        only the partial chunks at either end)."""
        size = 1 << self._shift
        x = start
        while x < stop:
            ci = x >> self._shift
            end = (ci + 1) << self._shift
            if x == ci << self._shift and end <= stop:
                if self._counts[ci]:
                    return True
            else:
                chunk = self._nodes[ci]
                for y in range(x + (x & 1), min(end, stop), 2):
                    if chunk[y & (size - 1)] is not None:
                        return True
            x = end
        return False

    def _resize(self, width: int) -> None:
        """Grow (blank nodes on the right) or shrink (dropping the nodes past ``width``)."""
        size = 1 << self._shift
        for x in range(width, self._width):
            node = self.node(x)
            if node is not None:
                self._unindex(x, node)
                if tm.is_leaf(x):
                    admission = self._adm[x >> self._shift][x & (size - 1)]
                    if admission is not None:
                        self._adm_used.add(admission, -1)
        count = -(-width // size)
        del self._nodes[count:], self._hashes[count:], self._fill[count:]
        del self._adm[count:], self._counts[count:]
        self._owned = {ci for ci in self._owned if ci < count}
        self._cache_owned = {ci for ci in self._cache_owned if ci < count}
        if width < self._width and width & (size - 1):
            ci = count - 1
            self._own(ci)
            self._own_cache(ci)
            cut = width & (size - 1)
            for chunk in (self._nodes[ci], self._hashes[ci], self._fill[ci], self._adm[ci]):
                chunk[cut:] = [None] * (size - cut)
        while len(self._nodes) < count:
            self._owned.add(len(self._nodes))
            self._cache_owned.add(len(self._nodes))
            self._nodes.append([None] * size)
            self._hashes.append([None] * size)
            self._fill.append([None] * size)
            self._adm.append([None] * size)
            self._counts.append(0)
        self._width = width

    def _truncate(self) -> None:
        """Halve the tree while its right half holds no member (RFC 9420 §7.8)."""
        while self.n_leaves > 1 and not self._any_member(self.n_leaves, self._width):
            self._resize(tm.node_width(self.n_leaves // 2))
            self._invalidate(self.root)

    def _first_blank_leaf(self) -> int | None:
        size = 1 << self._shift
        for ci, count in enumerate(self._counts):
            base = ci << self._shift
            if count < (min(size, self._width - base) + 1) // 2:
                chunk = self._nodes[ci]
                for off in range(0, min(size, self._width - base), 2):
                    if chunk[off] is None:
                        return (base + off) // 2
        return None

    def _add_leaf(self, leaf: LeafNode, admission: bytes) -> int:
        """Put ``leaf`` (admitted by the Authorization hashing to ``admission``) in the leftmost
        blank leaf, doubling the tree if it is full, and record it as unmerged in every non-blank
        parent above it (RFC 9420 §7.7)."""
        index = self._first_blank_leaf()
        if index is None:
            index = self.n_leaves
            self._resize(2 * self._width + 1)
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
        leaf = tm.leaf_to_node(leaf_index)
        for p in tm.direct_path(leaf, self.n_leaves):
            self._set(p, None, invalidate=False)
        for x, key in path:
            self._set(x, ParentNode(key), invalidate=False)
        self._invalidate(leaf)  # every node written above is on the leaf's direct path


def _check_shape(nodes: list[Node]) -> None:
    width = len(nodes)
    n = (width + 1) // 2
    if width < 1 or tm.node_width(n) != width or n & (n - 1):
        raise ValueError(f"{width} nodes is not the width of a complete tree")
    if n > codec.MAX_LEAVES:
        raise ValueError(f"more than {codec.MAX_LEAVES} leaves")
    seen_ids: set[bytes] = set()
    for x, node in enumerate(nodes):
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
                if leaf_index not in tm.subtree_leaves(x) or nodes[2 * leaf_index] is None:
                    raise ValueError(f"node {x}: unmerged leaf {leaf_index} invalid")
    if not seen_ids:
        raise ValueError("a tree without members")
    if n > 1 and all(nodes[2 * i] is None for i in range(n // 2, n)):
        raise ValueError("the right half is blank: the tree should have been truncated")
