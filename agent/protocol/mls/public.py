"""What anyone holding only a group's public state can check and do: the delivery service's view.

``verify_commit`` runs every public check of a commit and returns a ``VerifiedCommit`` holding the
next epoch's public tree and transcript hashes; members (``agent.protocol.mls.group``) run it first
and only then touch private keys, and the delivery service's ``PublicGroup`` advances with it.

Checks, in order (each refusal is ``ProtocolError`` with this id, and changes nothing):
``mls.group-id``, ``mls.epoch-stale`` / ``mls.epoch-future``, ``mls.sender`` (the committer is a
member), ``mls.commit.signature`` (by the committer's signature key, over the content and the
current GroupContext), the caller's ``CommitCheck`` (the agent's authorization check),
``mls.update.*`` / ``mls.leaf.signature`` and the ``LeafCheck`` on each member's Update (applied
first: see ``apply_proposals``), ``mls.remove.*`` / ``mls.add.*`` / ``mls.leaf.source`` /
``mls.leaf.signature`` / ``mls.key-package.signature`` and the caller's ``LeafCheck`` on each
added leaf (proposals valid), ``mls.path.length`` (one UpdatePath node per node of the
committer's filtered direct path), ``mls.path.duplicate-key``, ``mls.parent-hash`` (the
committer's new leaf carries the parent hash its path computes to), ``mls.leaf.signature`` and
the ``LeafCheck`` on the committer's new leaf, ``mls.path.ciphertexts`` (one ciphertext per node
of each copath resolution). Key encodings were checked by the decoder.

The hooks keep MLS free of policy: ``LeafCheck`` decides whether a leaf's credential may be in
the group (it binds certificate, signature key and device id), ``CommitCheck`` whether a commit's
change is authorized. Their defaults here accept everything (no-ops); they exist so that the
pure MLS tests, benchmarks and the delivery service (which checks in public only) need not pass
any. A caller that admits devices (the agent) must pass its real checks to every call.

What it cannot check: the confirmation tag (a MAC under the new epoch's confirmation key) and
that the ciphertexts decrypt to path secrets matching the new public keys: both need secrets.
Nothing here can derive any epoch secret.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from agent.protocol.errors import CryptoError, ProtocolError
from agent.protocol.mls import codec
from agent.protocol.mls import tree_math as tm
from agent.protocol.mls.crypto import NH, hash_, verify_with_label
from agent.protocol.mls.key_schedule import group_context_bytes
from agent.protocol.mls.messages import (
    MAX_ADDS,
    MAX_UPDATES,
    Commit,
    CommitContent,
    KeyPackage,
    Update,
    UpdatePath,
    Welcome,
)
from agent.protocol.mls.parenthash import check_commit_leaf, set_path_parent_hashes, verify_tree
from agent.protocol.mls.tree import NO_ADMISSION, SOURCE_COMMIT, LeafNode, RatchetTree

COMMIT_LABEL = b"CommitTBS"
UPDATE_PATH_LABEL = b"UpdatePathNode"

LeafCheck = Callable[[LeafNode], None]
"""Run on every leaf that enters a tree (adds, a committer's new leaf, every leaf of a Welcome's
tree) after MLS has verified its leaf signature; raises ``ProtocolError`` to refuse it."""
CommitCheck = Callable[[CommitContent, RatchetTree], None]
"""Run on a commit's signed content and the tree it applies to, before anything is applied (and
by a committer before it signs); raises ``ProtocolError`` to refuse the commit."""


def accept_any_leaf(leaf: LeafNode) -> None:
    """The default ``LeafCheck``: accepts every credential (module docstring)."""


def accept_any_commit(content: CommitContent, tree: RatchetTree) -> None:
    """The default ``CommitCheck``: accepts every change (module docstring)."""


def admission_hash(authz: bytes | None) -> bytes:
    """What a tree records for leaves admitted by ``authz``: its SHA-256, or 32 zero bytes."""
    return NO_ADMISSION if authz is None else hash_(authz)


AdmissionCheck = Callable[[LeafNode, bytes | None, bool], None]
"""Run by a joiner on every leaf of the Welcome's tree with the Authorization its admission hash
names (None: the tree records no Authorization for it) and whether the leaf is the joiner's own;
raises ``ProtocolError`` to refuse the Welcome."""


def accept_any_admission(leaf: LeafNode, authz: bytes | None, is_own: bool) -> None:
    """The default ``AdmissionCheck``: accepts every admission (module docstring)."""


def check_welcome_tree(
    group_id: bytes,
    tree: RatchetTree,
    *,
    own_leaf: int,
    admissions: dict[bytes, bytes],
    leaf_check: LeafCheck,
    admission_check: AdmissionCheck,
) -> None:
    """A joiner's checks of every leaf and parent of a Welcome's tree (``Group.join``), none
    of which needs a secret: each leaf's signature, ``leaf_check``, its admission (the
    Authorization its hash names must be among ``admissions``, the delivered ones by hash; then
    ``admission_check``), and the parent-hash validity of every parent node."""
    for i, leaf in tree.members():
        leaf.verify(group_id, i)
        leaf_check(leaf)
        recorded = tree.admission(i)
        authz = admissions.get(recorded)
        if authz is None and recorded != NO_ADMISSION:
            raise ProtocolError(
                "mls.welcome.admission",
                f"leaf {i}: no Authorization delivered with the Welcome or the tree's pages "
                "has the admission hash it records",
            )
        admission_check(leaf, authz, i == own_leaf)
    verify_tree(tree)


@dataclass(frozen=True)
class PublicState:
    """One epoch's public state: what the delivery service stores per group."""

    group_id: bytes
    epoch: int
    tree: RatchetTree
    confirmed_transcript_hash: bytes
    interim_transcript_hash: bytes

    def group_context(self) -> bytes:
        return group_context_bytes(
            self.group_id, self.epoch, self.tree.tree_hash(), self.confirmed_transcript_hash
        )

    def to_obj(self, *, inline_tree: bool = True) -> dict[str, object]:
        """``inline_tree=False``: the tree as the ``RatchetTree`` itself, not encoded (for the
        agent's state, whose trees are saved apart: ``agent.treestore``)."""
        return {
            "group": self.group_id,
            "epoch": self.epoch,
            "tree": self.tree.to_obj() if inline_tree else self.tree,
            "cth": self.confirmed_transcript_hash,
            "ith": self.interim_transcript_hash,
        }

    @classmethod
    def from_obj(cls, value: object, what: str = "public_state") -> PublicState:
        """The tree may be a ``RatchetTree`` already (the agent's state, its trees loaded
        apart and checked: ``agent.treestore``)."""
        m = codec.as_map(value, what, {"group", "epoch", "tree", "cth", "ith"})
        tree = m["tree"]
        return cls(
            group_id=codec.as_bytes(m["group"], f"{what}.group", 1, codec.MAX_GROUP_ID),
            epoch=codec.as_uint(m["epoch"], f"{what}.epoch", (1 << 64) - 1),
            tree=tree
            if isinstance(tree, RatchetTree)
            else RatchetTree.from_obj(tree, f"{what}.tree"),
            confirmed_transcript_hash=codec.as_bytes(m["cth"], f"{what}.cth", 0, NH),
            interim_transcript_hash=codec.as_bytes(m["ith"], f"{what}.ith", NH, NH),
        )


def commit_tbs(content: CommitContent, group_context: bytes) -> bytes:
    """What SignWithLabel("CommitTBS") covers: the content and the GroupContext of the epoch the
    commit applies to (so a signature cannot be replayed into another group or epoch)."""
    return codec.encode(content.to_obj()) + group_context


def confirmed_transcript_hash(
    interim_transcript_hash: bytes, content: CommitContent, signature: bytes
) -> bytes:
    """H(interim_transcript_hash[n-1] || cbor({"content": ..., "signature": ...}))."""
    return hash_(
        interim_transcript_hash
        + codec.encode({"content": content.to_obj(), "signature": signature})
    )


def interim_transcript_hash(confirmed: bytes, confirmation_tag: bytes) -> bytes:
    """H(confirmed_transcript_hash[n] || confirmation_tag)."""
    return hash_(confirmed + confirmation_tag)


def apply_updates(
    state: PublicState,
    tree: RatchetTree,
    sender: int,
    updates: Sequence[Update],
    removes: Sequence[int],
    *,
    leaf_check: LeafCheck,
) -> None:
    """Apply members' Updates to ``tree`` (a copy of ``state.tree``): each replaces its
    member's leaf (rebuilt with the new key: device id, signature key and credential cannot
    change) and blanks the member's direct path (RFC 9420 §12.1.2), so nothing above it keeps
    a key the member's old leaf key could reach. Refuses ``mls.update.self`` (the committer
    renews its own leaf through its UpdatePath), ``mls.update.duplicate`` (two for one leaf),
    ``mls.update.removed`` (the commit also removes that leaf), ``mls.update.blank`` (no
    member there), ``mls.update.duplicate-key`` (the new key is already in the tree or in
    another Update), ``mls.leaf.signature`` (not signed by that member's own signature key),
    and whatever ``leaf_check`` refuses."""
    if len(updates) > MAX_UPDATES:
        raise ProtocolError("mls.update.count", f"at most {MAX_UPDATES} updates per commit")
    if not updates:
        return
    removed = set(removes)
    seen: set[int] = set()
    fresh: set[bytes] = set()  # the new keys of the Updates so far (the tree's: its index)
    for update in updates:
        i = update.leaf_index
        if i == sender:
            raise ProtocolError(
                "mls.update.self", "a committer renews its own leaf by its UpdatePath"
            )
        if i in seen:
            raise ProtocolError("mls.update.duplicate", f"leaf {i} updated twice")
        if i in removed:
            raise ProtocolError("mls.update.removed", f"leaf {i} is both updated and removed")
        old = tree.leaf(i)
        if old is None:
            raise ProtocolError("mls.update.blank", f"leaf {i} is not a member")
        key = update.encryption_key
        if key in fresh or state.tree.key_positions(key):
            raise ProtocolError(
                "mls.update.duplicate-key", f"leaf {i}: the new leaf key is already in use"
            )
        leaf = update.leaf(old)
        leaf.verify(state.group_id, i)
        leaf_check(leaf)
        seen.add(i)
        fresh.add(key)
        tree._replace_leaf(i, leaf)
        tree._blank_direct_path(i)


def apply_proposals(
    state: PublicState,
    sender: int,
    removes: Sequence[int],
    adds: Sequence[KeyPackage],
    *,
    authz: bytes | None = None,
    leaf_check: LeafCheck = accept_any_leaf,
    updates: Sequence[Update] = (),
) -> tuple[RatchetTree, tuple[int, ...]]:
    """A copy of the tree with the updates (``apply_updates``), then the removes, then the
    adds applied (RFC 9420 §12.3 order), and the leaf indices the joiners got; each added
    leaf records ``admission_hash(authz)``. Refuses an invalid proposal or a leaf
    ``leaf_check`` refuses. One commit may add up to ``MAX_ADDS`` members (RFC 9420 lets a
    commit carry many Add proposals): one UpdatePath, one Welcome with a sealed GroupSecrets
    per joiner; a device twice among them, or already a member, is ``mls.add.duplicate``."""
    if len(adds) > MAX_ADDS:
        raise ProtocolError("mls.add.count", f"at most {MAX_ADDS} adds per commit")
    tree = state.tree.copy()
    apply_updates(state, tree, sender, updates, removes, leaf_check=leaf_check)
    seen: set[int] = set()
    for leaf_index in removes:
        if leaf_index == sender:
            raise ProtocolError("mls.remove.self", "a committer cannot remove itself")
        if leaf_index in seen:
            raise ProtocolError("mls.remove.duplicate", f"leaf {leaf_index} removed twice")
        if tree.leaf(leaf_index) is None:
            raise ProtocolError("mls.remove.blank", f"leaf {leaf_index} is not a member")
        seen.add(leaf_index)
        tree._remove_leaf(leaf_index)
    if removes:
        tree._truncate()
    added: list[int] = []
    admission = admission_hash(authz)
    for kp in adds:
        kp.verify()
        leaf_check(kp.leaf)
        if tree.find_device(kp.device_id) is not None:
            raise ProtocolError("mls.add.duplicate", "the device is already a member")
        if any(tm.is_leaf(x) for x in tree.key_positions(kp.leaf_key)):
            raise ProtocolError("mls.add.duplicate-key", "the leaf key is already in the tree")
        if tree.member_count() >= codec.MAX_LEAVES:
            raise ProtocolError("mls.add.full", f"a group has at most {codec.MAX_LEAVES} members")
        added.append(tree._add_leaf(kp.leaf_node(), admission))
    return tree, tuple(added)


def copath_resolutions(
    tree: RatchetTree, path: Sequence[tuple[int, int]], added: Sequence[int]
) -> tuple[tuple[int, ...], ...]:
    """For each (node, copath child) of the filtered direct path: the nodes its path secret is
    sealed to, i.e. the copath child's resolution without this commit's joiners."""
    exclude = frozenset(added)
    return tuple(tuple(tree.resolution(child, exclude)) for _, child in path)


def apply_path(
    tree: RatchetTree,
    sender: int,
    *,
    leaf_key: bytes | None,
    path: Sequence[tuple[int, int]],
    node_keys: Sequence[bytes],
) -> bytes:
    """Put the committer's new parent keys into ``tree`` (a copy from ``apply_proposals``) with
    their parent hashes, and return the parent hash the committer's new leaf must carry (the
    leaf itself is set by ``finish_path``)."""
    if len(node_keys) != len(path):
        raise ProtocolError(
            "mls.path.length",
            f"UpdatePath has {len(node_keys)} nodes, filtered direct path has {len(path)}",
        )
    # in use: every leaf key but the committer's, every parent key but those the path
    # replaces (the tree's key index, so no scan of the tree)
    replaced = {tm.leaf_to_node(sender), *(x for x, _ in path)}
    fresh = [*node_keys, *([leaf_key] if leaf_key is not None else [])]
    if len(set(fresh)) != len(fresh) or any(
        x not in replaced for key in fresh for x in tree.key_positions(key)
    ):
        raise ProtocolError("mls.path.duplicate-key", "the UpdatePath reuses a public key")
    tree._apply_path(sender, zip((x for x, _ in path), node_keys, strict=True))
    return set_path_parent_hashes(tree, path)


def finish_path(state: PublicState, tree: RatchetTree, sender: int, leaf: LeafNode) -> bytes:
    """Set the committer's new leaf and return the provisional GroupContext the path secrets
    are sealed under: next epoch, new tree hash, previous confirmed transcript hash (RFC 9420
    §12.4.2)."""
    tree._replace_leaf(sender, leaf)
    return group_context_bytes(
        state.group_id, state.epoch + 1, tree.tree_hash(), state.confirmed_transcript_hash
    )


def committer_leaf(old: LeafNode, path: UpdatePath) -> LeafNode:
    """The committer's new leaf as a receiver rebuilds it from its old leaf and the UpdatePath."""
    return LeafNode(
        device_id=old.device_id,
        signature_key=old.signature_key,
        encryption_key=old.encryption_key if path.leaf_key is None else path.leaf_key,
        credential=old.credential if path.credential is None else path.credential,
        source=SOURCE_COMMIT,
        parent_hash=path.parent_hash,
        signature=path.leaf_signature,
    )


@dataclass(frozen=True)
class VerifiedCommit:
    """A commit that passed every public check, with the public state it leads to. Members
    still have to decrypt their path secret and check the confirmation tag."""

    commit: Commit
    tree: RatchetTree
    added: tuple[int, ...]
    path: tuple[tuple[int, int], ...]
    resolutions: tuple[tuple[int, ...], ...]
    provisional_context: bytes
    confirmed_transcript_hash: bytes
    interim_transcript_hash: bytes

    @property
    def sender(self) -> int:
        return self.commit.content.sender

    @property
    def updated(self) -> tuple[int, ...]:
        """The leaf indices of the members whose Updates the commit carries."""
        return tuple(u.leaf_index for u in self.commit.content.updates)

    @property
    def epoch(self) -> int:
        """The epoch this commit starts."""
        return self.commit.content.epoch + 1

    def next_state(self) -> PublicState:
        return PublicState(
            self.commit.content.group_id,
            self.epoch,
            self.tree,
            self.confirmed_transcript_hash,
            self.interim_transcript_hash,
        )


def verify_commit(
    state: PublicState,
    commit: Commit,
    *,
    leaf_check: LeafCheck = accept_any_leaf,
    commit_check: CommitCheck = accept_any_commit,
) -> VerifiedCommit:
    """Every check of a commit that needs no secret (module docstring); raises, never returns
    a half-checked result, and never changes ``state``."""
    content = commit.content
    if content.group_id != state.group_id:
        raise ProtocolError("mls.group-id", "the commit is for another group")
    if content.epoch < state.epoch:
        raise ProtocolError(
            "mls.epoch-stale", f"commit for epoch {content.epoch}, group is at {state.epoch}"
        )
    if content.epoch > state.epoch:
        raise ProtocolError(
            "mls.epoch-future", f"commit for epoch {content.epoch}, group is at {state.epoch}"
        )
    committer = state.tree.leaf(content.sender)
    if committer is None:
        raise ProtocolError("mls.sender", f"leaf {content.sender} is not a member")
    try:
        verify_with_label(
            codec.public_key(committer.signature_key),
            COMMIT_LABEL,
            commit_tbs(content, state.group_context()),
            commit.signature,
        )
    except CryptoError:
        raise ProtocolError(
            "mls.commit.signature", "the commit is not signed by its committer"
        ) from None
    commit_check(content, state.tree)
    tree, added = apply_proposals(
        state,
        content.sender,
        content.removes,
        content.adds,
        authz=content.authz,
        leaf_check=leaf_check,
        updates=content.updates,
    )
    path = tuple(tree.filtered_direct_path(content.sender))
    resolutions = copath_resolutions(tree, path, added)
    nodes = content.path.nodes
    leaf_parent_hash = apply_path(
        tree,
        content.sender,
        leaf_key=content.path.leaf_key,
        path=path,
        node_keys=[n.encryption_key for n in nodes],
    )
    new_leaf = committer_leaf(committer, content.path)
    check_commit_leaf(new_leaf, leaf_parent_hash)
    new_leaf.verify(content.group_id, content.sender)
    leaf_check(new_leaf)
    provisional = finish_path(state, tree, content.sender, new_leaf)
    for (x, _), node, resolution in zip(path, nodes, resolutions, strict=True):
        if len(node.encrypted_path_secret) != len(resolution):
            raise ProtocolError(
                "mls.path.ciphertexts",
                f"node {x}: {len(node.encrypted_path_secret)} ciphertexts for a resolution "
                f"of {len(resolution)}",
            )
    confirmed = confirmed_transcript_hash(state.interim_transcript_hash, content, commit.signature)
    return VerifiedCommit(
        commit=commit,
        tree=tree,
        added=added,
        path=path,
        resolutions=resolutions,
        provisional_context=provisional,
        confirmed_transcript_hash=confirmed,
        interim_transcript_hash=interim_transcript_hash(confirmed, commit.confirmation_tag),
    )


class PublicGroup:
    """The delivery service's copy of a group: public tree, epoch, transcript hashes. It orders
    commits (``apply`` accepts only the current epoch's) and checks what can be checked in
    public; it holds no private key and cannot derive any epoch secret."""

    __slots__ = ("_state",)

    def __init__(self, state: PublicState) -> None:
        self._state = state

    @property
    def state(self) -> PublicState:
        return self._state

    @property
    def group_id(self) -> bytes:
        return self._state.group_id

    @property
    def epoch(self) -> int:
        return self._state.epoch

    @property
    def tree(self) -> RatchetTree:
        return self._state.tree

    def tree_hash(self) -> bytes:
        return self._state.tree.tree_hash()

    def verify(
        self,
        commit: Commit,
        *,
        leaf_check: LeafCheck = accept_any_leaf,
        commit_check: CommitCheck = accept_any_commit,
    ) -> VerifiedCommit:
        return verify_commit(self._state, commit, leaf_check=leaf_check, commit_check=commit_check)

    def apply(
        self,
        commit: Commit,
        *,
        leaf_check: LeafCheck = accept_any_leaf,
        commit_check: CommitCheck = accept_any_commit,
    ) -> PublicGroup:
        """The group after ``commit``; raises (and this object stays as it was) if refused."""
        return PublicGroup(
            verify_commit(
                self._state, commit, leaf_check=leaf_check, commit_check=commit_check
            ).next_state()
        )

    def committer_for_remove(self, leaf_index: int, among: Collection[bytes] = ()) -> int:
        """The member the service should ask to commit the removal of ``leaf_index``: the one
        nearest to it in the tree, so the blanked path of the removed leaf is mostly re-keyed by
        the committer's own path and the commit stays small (≈ log2 N ciphertexts). ``among``
        (device ids): the nearest of these members, if any of them is in the tree (after a
        rollback, the members that just reported the junk commit: they are there)."""
        target = tm.leaf_to_node(leaf_index)
        best: tuple[int, int] | None = None
        members = [(i, leaf) for i, leaf in self.tree.members() if i != leaf_index]
        chosen = [(i, leaf) for i, leaf in members if leaf.device_id in among]
        for i, _ in chosen or members:
            height = tm.level(tm.common_ancestor(tm.leaf_to_node(i), target))
            if best is None or height < best[0]:
                best = (height, i)
        if best is None:
            raise ProtocolError("mls.remove.self", "no other member could commit the removal")
        return best[1]

    def check_welcome(self, commit: Commit, welcome: Welcome) -> None:
        """A Welcome must carry exactly one sealed GroupSecrets per KeyPackage the commit added
        (the service cannot open them, only match references)."""
        expected = sorted(kp.ref() for kp in commit.content.adds)
        got = sorted(s.key_package_ref for s in welcome.secrets)
        if expected != got:
            raise ProtocolError("mls.welcome.recipients", "Welcome does not match the adds")

    def to_state(self) -> dict[str, object]:
        return self._state.to_obj()

    @classmethod
    def from_state(cls, state: object) -> PublicGroup:
        return cls(PublicState.from_obj(state))

    def __repr__(self) -> str:
        return (
            f"PublicGroup(group_id={self.group_id.hex()}, epoch={self.epoch}, "
            f"members={self.tree.member_count()})"
        )
