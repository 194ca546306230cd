"""The encoding of the agent's tree files: a group's ratchet tree kept beside the state file as an
encrypted snapshot and an append-only journal of the nodes each commit changed, so that a save
after a commit writes O(log N) bytes instead of the whole tree (docs/agent.md, "Incremental
state"). Pure: bytes in, bytes out; the files are read and written by ``agent.treestore``.

- A *snapshot* holds a whole tree as ``RatchetTree.to_obj`` encodes it: ``"KFTS" | nonce (12) |
  AES-256-GCM(tree key, CBOR list)``, with ``"KFTS" | group name`` as associated data. It is
  named by the SHA-256 of its bytes (``<hex>.snap``), which the state file records.
- A *journal* (``<snapshot hex>.journal``) is a sequence of records, each ``length (4, big
  endian) | nonce (12) | AES-256-GCM(tree key, CBOR {"w": width, "n": [[node, obj], ...]})``
  with ``"KFTJ" | snapshot sha256 | seq (8) | group name`` as associated data: a record is bound
  to its snapshot, its place and its group. The running hash starts at the snapshot's SHA-256 and
  takes in each record's bytes (``chain``).
- A *tree reference* (``TreeRef``), in the state file in place of the tree, names the snapshot,
  how many records and bytes of the journal belong to the state, the running hash over them and
  the tree hash the replay must come out at. The state file is authenticated under the state
  key, so a snapshot, journal or record that is not the one it names is refused.

Refusals are ``TreeRefused`` (a ``StateError``) with a check id: ``state.tree.snapshot`` (the
snapshot named is missing, another one, or does not decrypt), ``state.tree.journal`` (shorter
than named, its running hash is not the one named, a record that does not decrypt or decode
in its place), ``state.tree.hash`` (the tree replayed is not a valid tree or not the one named).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import cbor2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.protocol.errors import ProtocolError, StateError
from agent.protocol.mls import codec
from agent.protocol.mls.tree import RatchetTree

SNAP_MAGIC = b"KFTS"
RECORD_MAGIC = b"KFTJ"
_LEN = struct.Struct(">I")
_SEQ = struct.Struct(">Q")
NONCE = 12
MAX_RECORD = 1 << 22
"""A record holds O(log N) nodes (about 3 KB at 100,000 members); a commit adding many members
at once holds their leaves (4.5 KB each at most): 4 MiB is far above any commit's."""
MAX_NODE_INDEX = 2 * codec.MAX_LEAVES - 1


class TreeRefused(StateError):
    """A tree file that is not the one the state file names: refused, nothing of it loaded."""

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(f"[{check}] {reason}")
        self.check = check
        self.reason = reason


@dataclass(frozen=True)
class TreeRef:
    """What the state file records of a group's tree (module text)."""

    snapshot: bytes
    records: int
    length: int
    head: bytes
    tree_hash: bytes

    def to_obj(self) -> dict[str, object]:
        return {
            "snap": self.snapshot,
            "records": self.records,
            "len": self.length,
            "head": self.head,
            "th": self.tree_hash,
        }

    @classmethod
    def from_obj(cls, value: object) -> TreeRef:
        try:
            m = codec.as_map(value, "tree_ref", {"snap", "records", "len", "head", "th"})
            return cls(
                snapshot=codec.as_bytes(m["snap"], "tree_ref.snap", 32, 32),
                records=codec.as_uint(m["records"], "tree_ref.records", (1 << 63) - 1),
                length=codec.as_uint(m["len"], "tree_ref.len", (1 << 63) - 1),
                head=codec.as_bytes(m["head"], "tree_ref.head", 32, 32),
                tree_hash=codec.as_bytes(m["th"], "tree_ref.th", 32, 32),
            )
        except ProtocolError as exc:
            raise StateError(f"agent state: a tree reference is malformed: {exc}") from None

    @staticmethod
    def is_ref(value: object) -> bool:
        return isinstance(value, dict) and "snap" in value


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def chain(head: bytes, frame: bytes) -> bytes:
    """The running hash after ``frame`` (a record's bytes, its length prefix included)."""
    return hashlib.sha256(head + frame).digest()


def _aesgcm(key: bytes) -> AESGCM:
    if len(key) != 32:
        raise StateError("the tree key must be 32 bytes")
    return AESGCM(key)


def seal_snapshot(key: bytes, group: str, items: list[object], nonce: bytes) -> bytes:
    plaintext = cbor2.dumps(items, canonical=True)
    ad = SNAP_MAGIC + group.encode()
    return SNAP_MAGIC + nonce + _aesgcm(key).encrypt(nonce, plaintext, ad)


def open_snapshot(key: bytes, group: str, blob: bytes, expected: bytes) -> list[object]:
    """The node list of a snapshot whose SHA-256 must be ``expected``."""
    if sha256(blob) != expected:
        raise TreeRefused(
            "state.tree.snapshot",
            f"group {group!r}: the tree snapshot is not the one the state file names "
            "(replaced, rolled back or corrupt)",
        )
    head = len(SNAP_MAGIC) + NONCE
    if len(blob) < head + 16 or not blob.startswith(SNAP_MAGIC):
        raise TreeRefused("state.tree.snapshot", f"group {group!r}: not a tree snapshot")
    try:
        plaintext = _aesgcm(key).decrypt(
            blob[len(SNAP_MAGIC) : head], blob[head:], SNAP_MAGIC + group.encode()
        )
        items = cbor2.loads(plaintext)
    except InvalidTag:
        raise TreeRefused(
            "state.tree.snapshot", f"group {group!r}: the tree snapshot does not authenticate"
        ) from None
    except Exception:
        raise TreeRefused(
            "state.tree.snapshot", f"group {group!r}: the tree snapshot does not decode"
        ) from None
    if not isinstance(items, list):
        raise TreeRefused("state.tree.snapshot", f"group {group!r}: the snapshot holds no tree")
    return items


def diff(tree: RatchetTree, base: RatchetTree) -> tuple[int, list[list[object]]]:
    """(width, [[node, its encoding], ...]): what turns ``base``'s node list into ``tree``'s
    (``RatchetTree.changed_since``: O(log N) for a commit's tree against its parent's)."""
    width = 2 * tree.n_leaves - 1
    return width, [[x, tree.node_obj(x) if x < width else None] for x in tree.changed_since(base)]


def apply(items: list[object], width: int, nodes: list[list[object]]) -> None:
    """Apply a ``diff`` to a node list, in place."""
    if not 0 < width <= MAX_NODE_INDEX:
        raise StateError("a tree change has no tree width")
    if width < len(items):
        del items[width:]
    else:
        items.extend([None] * (width - len(items)))
    for x, obj in nodes:
        if type(x) is not int or not 0 <= x < MAX_NODE_INDEX:
            raise StateError("a tree change names no node")
        if x < width:
            items[x] = obj


def _record_ad(snapshot: bytes, seq: int, group: str) -> bytes:
    return RECORD_MAGIC + snapshot + _SEQ.pack(seq) + group.encode()


def seal_record(
    key: bytes,
    snapshot: bytes,
    seq: int,
    group: str,
    change: tuple[int, list[list[object]]],
    *,
    nonce: bytes,
) -> bytes:
    """One journal record's bytes (length prefix included): record ``seq`` (0 the first) of
    the journal of ``snapshot``; ``change``: a ``diff``. One over ``MAX_RECORD`` is not
    appended: the caller writes a snapshot instead."""
    width, nodes = change
    plaintext = cbor2.dumps({"w": width, "n": nodes}, canonical=True)
    body = nonce + _aesgcm(key).encrypt(nonce, plaintext, _record_ad(snapshot, seq, group))
    return _LEN.pack(len(body)) + body


def replay(key: bytes, group: str, items: list[object], journal: bytes, ref: TreeRef) -> None:
    """Apply the journal's records named by ``ref`` to ``items`` (the snapshot's node list), in
    place, after checking the running hash over all of them (so nothing is applied from a
    journal that is not the one named)."""
    if len(journal) < ref.length:
        raise TreeRefused(
            "state.tree.journal",
            f"group {group!r}: the tree journal holds {len(journal)} bytes, the state names "
            f"{ref.length} (truncated or rolled back)",
        )
    frames: list[bytes] = []
    head, at = ref.snapshot, 0
    while at < ref.length and len(frames) < ref.records:
        if at + _LEN.size > ref.length:
            break
        (size,) = _LEN.unpack_from(journal, at)
        end = at + _LEN.size + size
        if size > MAX_RECORD or end > ref.length:
            break
        frame = journal[at:end]
        head = chain(head, frame)
        frames.append(frame[_LEN.size :])
        at = end
    if at != ref.length or len(frames) != ref.records or head != ref.head:
        raise TreeRefused(
            "state.tree.journal",
            f"group {group!r}: the tree journal is not the one the state file names (a record "
            "replaced, reordered, truncated or from elsewhere)",
        )
    aead = _aesgcm(key)
    for seq, body in enumerate(frames):
        try:
            plaintext = aead.decrypt(
                body[:NONCE], body[NONCE:], _record_ad(ref.snapshot, seq, group)
            )
            record = cbor2.loads(plaintext)
            m = codec.as_map(record, "tree_record", {"w", "n"})
            width = codec.as_uint(m["w"], "tree_record.w", MAX_NODE_INDEX)
            nodes = codec.as_list(
                m["n"],
                "tree_record.n",
                MAX_NODE_INDEX,
                lambda v, w: codec.as_list(v, w, 2, lambda e, _: e, min_len=2),
            )
            apply(items, width, nodes)
        except (InvalidTag, ProtocolError, StateError, ValueError, TypeError):
            raise TreeRefused(
                "state.tree.journal",
                f"group {group!r}: tree journal record {seq} does not authenticate or decode",
            ) from None


def build(group: str, items: list[object], tree_hash: bytes) -> RatchetTree:
    """The tree of a replayed node list, decoded strictly; its hash must be ``tree_hash``."""
    try:
        tree = RatchetTree.from_obj(items, f"tree of {group}")
    except ProtocolError as exc:
        raise TreeRefused(
            "state.tree.hash", f"group {group!r}: the replayed tree is not a valid tree: {exc}"
        ) from None
    if tree.tree_hash() != tree_hash:
        raise TreeRefused(
            "state.tree.hash",
            f"group {group!r}: the replayed tree's hash is not the one the state file names",
        )
    return tree
