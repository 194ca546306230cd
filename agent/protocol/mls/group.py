"""A member's view of a TreeKEM group (RFC 9420 subset, cipher suite 2): create, join from a
Welcome, commit (add / remove / self-update), process others' commits, export data keys.

A ``Group`` is one epoch and never changes: ``commit`` and ``process`` return the next epoch as
a new object (the caller swaps it in once the delivery service has ordered the commit), so a
refused commit cannot leave anything half-applied.

Keys: the member's leaf key is an ``EllipticCurvePrivateKey`` that may live in a TPM; this module
only ever calls ``exchange()`` (through HPKE) and ``public_key()`` on it, and processing a commit
costs at most one ``exchange()``: the path secret is decrypted with the leaf key only when it
was sealed to the leaf itself, otherwise with a software parent-node key. The signature key
(DevID) is passed to ``commit`` and only ``sign()``/``public_key()`` are called on it.

keyfleet deviation from RFC 9420 (docs/treekem.md): the leaf key is never derived from a path
secret (it is born in the TPM); a self-update brings a new leaf key object, and the path secrets
start at the first node of the filtered direct path.

Policy comes in through hooks (``agent.protocol.mls.public``): ``LeafCheck`` on every leaf that
enters a tree, ``CommitCheck`` on every commit made or processed, ``AdmissionCheck`` on every
leaf of a Welcome's tree with the Authorization that admitted it. MLS itself always checks leaf
signatures and parent hashes. The hooks' keyword defaults accept everything (no-ops), for the
pure MLS tests and tools that build groups of their own: a caller that admits devices (the
agent) must pass its real checks to every call.
The group keeps no Authorization: its tree records each leaf's admission hash (SHA-256 of the
Authorization that admitted it), and a joiner gets the Authorizations from the delivery service
(with the Welcome, or with the tree's pages), which need not be trusted with them: each is taken
by its hash only (``join_opened(admissions=...)``; docs/treekem.md, "Admissions delivered by the
service"). So neither a member's state nor a Welcome grows with the number of distinct add
requests.

Update proposals (``propose_update``, ``commit(updates=...)``, ``process(proposed_leaf_keys=...)``)
let one commit renew many members' leaf keys (a full rekey in a few commits instead of one per
member; docs/treekem.md, "Who updates when").

Joining is two steps (``open_welcome``, then ``join_opened`` with the tree) so that a joiner can
fetch a large group's tree in pages between them (``agent.protocol.mls.treepages``); a Welcome
carries its tree only up to ``INLINE_TREE_LEAVES`` leaves.

Why one module of this size (about 950 lines): a member's epoch is one immutable object whose
every transition (create, join, commit, process, persist) touches the same private fields; the
parts that need no secret live in ``agent.protocol.mls.public``, the tree pages in
``agent.protocol.mls.treepages``.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from dataclasses import field as dataclass_field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.protocol.errors import CryptoError, ProtocolError, StateError
from agent.protocol.hpke import Rng, serialize_public_key
from agent.protocol.mls import codec
from agent.protocol.mls import tree_math as tm
from agent.protocol.mls.crypto import (
    NH,
    decrypt_with_label,
    derive_key_pair,
    derive_secret,
    encrypt_with_label,
    extract,
    mac,
    sign_with_label,
    verify_with_label,
)
from agent.protocol.mls.key_schedule import (
    EpochSecrets,
    derive_epoch,
    epoch_from_joiner,
    group_context_bytes,
    mls_exporter,
    welcome_key_nonce,
)
from agent.protocol.mls.messages import (
    MAX_AUTHORIZATION,
    Commit,
    CommitContent,
    EncryptedGroupSecrets,
    GroupInfo,
    GroupSecrets,
    KeyPackage,
    Update,
    UpdatePath,
    UpdatePathNode,
    Welcome,
)
from agent.protocol.mls.public import (
    COMMIT_LABEL,
    UPDATE_PATH_LABEL,
    AdmissionCheck,
    CommitCheck,
    LeafCheck,
    PublicGroup,
    PublicState,
    VerifiedCommit,
    accept_any_admission,
    accept_any_commit,
    accept_any_leaf,
    admission_hash,
    apply_path,
    apply_proposals,
    check_welcome_tree,
    commit_tbs,
    confirmed_transcript_hash,
    copath_resolutions,
    finish_path,
    interim_transcript_hash,
    verify_commit,
)
from agent.protocol.mls.tree import LeafNode, RatchetTree

DATA_KEY_LABEL = b"keyfleet data key"
GROUP_INFO_LABEL = b"GroupInfoTBS"
WELCOME_LABEL = b"Welcome"
STATE_VERSION = 3
"""Version 2 also held the Authorizations the tree names; it is still read (they are dropped)."""
INLINE_TREE_LEAVES = 256

ResolveLeafKey = Callable[[bytes], ec.EllipticCurvePrivateKey]


def inline_tree(tree: RatchetTree) -> bool:
    """Whether a Welcome's GroupInfo carries ``tree`` itself: only up to ``INLINE_TREE_LEAVES``
    leaves (at most about 1.2 MiB with 4 KiB certificates); a larger tree is referenced by its
    hash and fetched in pages (``agent.protocol.mls.treepages``), so a Welcome does not grow
    with the group (docs/treekem.md, "Joining a large group")."""
    return tree.n_leaves <= INLINE_TREE_LEAVES


@dataclass(frozen=True)
class OpenedWelcome:
    """A Welcome opened with the joiner's init key: its GroupInfo (nothing checked yet but its
    encoding) and the joiner's GroupSecrets (never in a repr)."""

    info: GroupInfo
    secrets: GroupSecrets = dataclass_field(repr=False)


def _welcome_secret(joiner_secret: bytes) -> bytes:
    """welcome_secret = DeriveSecret(Extract(joiner_secret, psk_secret = 0), "welcome")
    (RFC 9420 §8). Computed here because a joiner needs it before it knows the GroupContext
    that ``key_schedule.epoch_from_joiner`` takes; it does not depend on it."""
    return derive_secret(extract(joiner_secret, bytes(NH)), b"welcome")


def legacy_admissions(state: object) -> tuple[bytes, ...]:
    """The Authorizations a version-2 group state held (``Group.from_state`` drops them): what
    a member that kept them hands to the delivery service once, for groups made before the
    service kept them (docs/treekem.md, "Admissions delivered by the service"). Empty for any
    other state, or a list that does not decode."""
    if not isinstance(state, dict) or state.get("v") != 2:
        return ()
    try:
        held = codec.as_list(
            state.get("admissions"),
            "group_state.admissions",
            codec.MAX_LEAVES,
            lambda v, w: codec.as_bytes(v, w, 1, MAX_AUTHORIZATION),
        )
    except ProtocolError:
        return ()
    return tuple(dict.fromkeys(held))


def admissions_of(authorizations: Sequence[bytes | None]) -> dict[bytes, bytes]:
    """The Authorizations by their admission hash (what a leaf records)."""
    return {admission_hash(a): a for a in authorizations if a is not None}


def _scalar(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_numbers().private_value.to_bytes(32, "big")


def path_node_keys(
    path_secret: bytes, count: int
) -> tuple[list[ec.EllipticCurvePrivateKey], list[bytes]]:
    """Parent keys for ``count`` consecutive filtered-direct-path nodes starting with
    ``path_secret``: node key = DeriveKeyPair(DeriveSecret(ps, "node")), next ps =
    DeriveSecret(ps, "path"). Returns the keys and the path secrets used (last one + 1 is the
    commit secret: ``derive_secret(secrets[-1], b"path")``)."""
    keys: list[ec.EllipticCurvePrivateKey] = []
    secrets: list[bytes] = []
    ps = path_secret
    for _ in range(count):
        secrets.append(ps)
        keys.append(derive_key_pair(derive_secret(ps, b"node")))
        ps = derive_secret(ps, b"path")
    return keys, secrets


@dataclass(frozen=True)
class CommitResult:
    """What ``Group.commit`` produces: the commit to send, a Welcome if it added members, and
    the committer's next epoch (adopt it only once the service accepted the commit; otherwise
    drop it, and the new leaf key with it)."""

    commit: Commit
    welcome: Welcome | None
    group: Group


class Group:
    """One member's state for one epoch (immutable; see the module docstring)."""

    __slots__ = (
        "_leaf_key",
        "_leaf_public",
        "_node_keys",
        "_own_leaf",
        "_public",
        "_secrets",
    )

    def __init__(
        self,
        public: PublicState,
        own_leaf: int,
        leaf_key: ec.EllipticCurvePrivateKey,
        node_keys: dict[int, ec.EllipticCurvePrivateKey],
        secrets: EpochSecrets,
    ) -> None:
        leaf = public.tree.leaf(own_leaf)
        if leaf is None:
            raise StateError(f"leaf {own_leaf} is blank: not a member")
        self._public = public
        self._own_leaf = own_leaf
        self._leaf_key = leaf_key
        self._leaf_public = leaf.encryption_key
        self._node_keys = node_keys
        self._secrets = secrets

    # -- reading ------------------------------------------------------------------------------

    @property
    def group_id(self) -> bytes:
        return self._public.group_id

    @property
    def epoch(self) -> int:
        return self._public.epoch

    @property
    def own_leaf(self) -> int:
        return self._own_leaf

    @property
    def tree(self) -> RatchetTree:
        return self._public.tree

    @property
    def public_state(self) -> PublicState:
        return self._public

    def public_group(self) -> PublicGroup:
        """The public view of this epoch, e.g. to register a new group with the service."""
        return PublicGroup(self._public)

    def tree_hash(self) -> bytes:
        return self._public.tree.tree_hash()

    def group_context(self) -> bytes:
        return self._public.group_context()

    @property
    def epoch_authenticator(self) -> bytes:
        """RFC 9420 §8.7: equal for every member of the epoch; members ack commits with it."""
        return self._secrets.epoch_authenticator

    def export(self, label: bytes, context: bytes, length: int) -> bytes:
        """MLS-Exporter of this epoch."""
        return mls_exporter(self._secrets.exporter_secret, label, context, length)

    def data_key(self, length: int = 32) -> bytes:
        """This epoch's data key for apps: MLS-Exporter("keyfleet data key", group_id)."""
        return self.export(DATA_KEY_LABEL, self.group_id, length)

    def members(self) -> list[tuple[int, bytes]]:
        """(leaf index, device id) of every member."""
        return [(i, leaf.device_id) for i, leaf in self.tree.members()]

    def __repr__(self) -> str:
        return (
            f"Group(group_id={self.group_id.hex()}, epoch={self.epoch}, "
            f"own_leaf={self._own_leaf}, members={self.tree.member_count()})"
        )

    # -- creating and joining -----------------------------------------------------------------

    @classmethod
    def create(
        cls,
        group_id: bytes,
        own: KeyPackage,
        leaf_key: ec.EllipticCurvePrivateKey,
        rng: Rng = os.urandom,
        *,
        authz: bytes | None = None,
        leaf_check: LeafCheck = accept_any_leaf,
    ) -> Group:
        """A one-member group at epoch 0, from the creator's own KeyPackage (its leaf), admitted
        by ``authz`` (the group's creation Authorization, recorded as the leaf's admission)."""
        own.verify()
        leaf_check(own.leaf)
        if serialize_public_key(leaf_key.public_key()) != own.leaf_key:
            raise ProtocolError("mls.leaf-key", "the leaf key does not match the KeyPackage")
        codec.as_bytes(group_id, "group_id", 1, codec.MAX_GROUP_ID)
        tree = RatchetTree([own.leaf_node()], {0: admission_hash(authz)})
        context = group_context_bytes(group_id, 0, tree.tree_hash(), b"")
        secrets = derive_epoch(rng(NH), bytes(NH), context)
        tag = mac(secrets.confirmation_key, b"")
        public = PublicState(group_id, 0, tree, b"", interim_transcript_hash(b"", tag))
        return cls(public, 0, leaf_key, {}, secrets)

    @classmethod
    def join(
        cls,
        welcome: Welcome,
        own: KeyPackage,
        leaf_key: ec.EllipticCurvePrivateKey,
        *,
        init_key: ec.EllipticCurvePrivateKey,
        tree: RatchetTree | None = None,
        admissions: Sequence[bytes] = (),
        leaf_check: LeafCheck = accept_any_leaf,
        admission_check: AdmissionCheck = accept_any_admission,
    ) -> Group:
        """Join from a Welcome sealed to ``own``'s one-time init key: ``open_welcome`` then
        ``join_opened`` (``tree``: the group's tree when the GroupInfo does not carry it;
        ``admissions``: the Authorizations the delivery service delivered)."""
        opened = cls.open_welcome(welcome, own, leaf_key, init_key=init_key)
        return cls.join_opened(
            opened,
            own,
            leaf_key,
            tree=tree,
            admissions=admissions,
            leaf_check=leaf_check,
            admission_check=admission_check,
        )

    @staticmethod
    def open_welcome(
        welcome: Welcome,
        own: KeyPackage,
        leaf_key: ec.EllipticCurvePrivateKey,
        *,
        init_key: ec.EllipticCurvePrivateKey,
    ) -> OpenedWelcome:
        """Open a Welcome sealed to ``own``'s one-time init key (one ``exchange()`` on it;
        ``mls.init-key`` if ``init_key`` is not the package's, ``mls.leaf-key`` if ``leaf_key``
        is not): the GroupSecrets and the GroupInfo, nothing checked against a tree yet. The
        caller destroys ``init_key`` once it joined or gave up, whatever the outcome."""
        if serialize_public_key(init_key.public_key()) != own.init_key:
            raise ProtocolError("mls.init-key", "that is not the KeyPackage's init key")
        if serialize_public_key(leaf_key.public_key()) != own.leaf_key:
            raise ProtocolError("mls.leaf-key", "the leaf key does not match the KeyPackage")
        ref = own.ref()
        entry = next((s for s in welcome.secrets if s.key_package_ref == ref), None)
        if entry is None:
            raise ProtocolError("mls.welcome.recipient", "the Welcome is not for this KeyPackage")
        try:
            sealed = decrypt_with_label(
                init_key,
                WELCOME_LABEL,
                welcome.encrypted_group_info,
                entry.kem_output,
                entry.ciphertext,
            )
        except CryptoError:
            raise ProtocolError("mls.welcome.decrypt", "GroupSecrets do not decrypt") from None
        secrets_in = GroupSecrets.decode(sealed)
        key, nonce = welcome_key_nonce(_welcome_secret(secrets_in.joiner_secret))
        try:
            info_bytes = AESGCM(key).decrypt(nonce, welcome.encrypted_group_info, b"")
        except InvalidTag:
            raise ProtocolError("mls.welcome.decrypt", "GroupInfo does not decrypt") from None
        return OpenedWelcome(GroupInfo.decode(info_bytes), secrets_in)

    @classmethod
    def join_opened(
        cls,
        opened: OpenedWelcome,
        own: KeyPackage,
        leaf_key: ec.EllipticCurvePrivateKey,
        *,
        tree: RatchetTree | None = None,
        admissions: Sequence[bytes] = (),
        leaf_check: LeafCheck = accept_any_leaf,
        admission_check: AdmissionCheck = accept_any_admission,
    ) -> Group:
        """Join with an opened Welcome and the group's tree: the GroupInfo's own if it carries
        one, else ``tree`` (fetched from the delivery service, which is not trusted:
        ``mls.welcome.tree-missing`` without one, ``mls.welcome.tree-hash`` unless its tree
        hash is the signed GroupInfo's). ``admissions``: the Authorizations the delivery service
        delivered (with the Welcome or the tree's pages; not trusted either: each is looked up
        by the admission hash a leaf records, one no leaf names is ignored). Checks the
        GroupInfo signature, every leaf of the tree (leaf signature, ``leaf_check``, the
        admission: ``mls.welcome.admission`` if no delivered Authorization has the hash a
        leaf records, then ``admission_check``), every parent hash (``mls.parent-hash``), the
        confirmation tag, and the path secret against the tree's public keys."""
        info, secrets_in = opened.info, opened.secrets
        if info.tree is not None:
            tree = info.tree
        if tree is None:
            raise ProtocolError(
                "mls.welcome.tree-missing", "the GroupInfo holds no tree and none was fetched"
            )
        if not hmac.compare_digest(tree.tree_hash(), info.tree_hash):
            raise ProtocolError(
                "mls.welcome.tree-hash", "the tree's hash is not the one the GroupInfo signs"
            )
        own_leaf = next((i for i, leaf in tree.members() if leaf == own.leaf_node()), None)
        if own_leaf is None:
            raise ProtocolError("mls.welcome.tree", "our leaf is not in the Welcome's tree")
        if serialize_public_key(leaf_key.public_key()) != own.leaf_key:
            raise ProtocolError("mls.leaf-key", "the leaf key does not match the KeyPackage")
        signer = tree.leaf(info.signer)
        if signer is None or info.signer == own_leaf:
            raise ProtocolError("mls.welcome.signer", "the GroupInfo signer is not a member")
        try:
            verify_with_label(
                codec.public_key(signer.signature_key),
                GROUP_INFO_LABEL,
                info.tbs(),
                info.signature,
            )
        except CryptoError:
            raise ProtocolError("mls.welcome.signature", "GroupInfo signature invalid") from None
        check_welcome_tree(
            info.group_id,
            tree,
            own_leaf=own_leaf,
            # a committer from before the service delivered them signed them into its GroupInfo
            admissions=admissions_of([*admissions, *(info.legacy_admissions or ())]),
            leaf_check=leaf_check,
            admission_check=admission_check,
        )
        context = group_context_bytes(
            info.group_id, info.epoch, tree.tree_hash(), info.confirmed_transcript_hash
        )
        secrets = epoch_from_joiner(secrets_in.joiner_secret, context)
        expected_tag = mac(secrets.confirmation_key, info.confirmed_transcript_hash)
        if not hmac.compare_digest(expected_tag, info.confirmation_tag):
            raise ProtocolError("mls.welcome.confirmation-tag", "GroupInfo tag does not match")
        path = tree.filtered_direct_path(info.signer)
        own_node = tm.leaf_to_node(own_leaf)
        start = next((k for k, (x, _) in enumerate(path) if tm.is_in_subtree(own_node, x)), None)
        if start is None:
            raise ProtocolError("mls.welcome.tree", "no committer path node above our leaf")
        node_keys = cls._check_path_keys(
            tree, [x for x, _ in path[start:]], secrets_in.path_secret, "mls.welcome.path"
        )[0]
        public = PublicState(
            info.group_id,
            info.epoch,
            tree,
            info.confirmed_transcript_hash,
            interim_transcript_hash(info.confirmed_transcript_hash, info.confirmation_tag),
        )
        return cls(public, own_leaf, leaf_key, node_keys, secrets)

    @classmethod
    def assemble(
        cls,
        group_id: bytes,
        members: Sequence[
            tuple[KeyPackage, ec.EllipticCurvePrivateKey, ec.EllipticCurvePrivateKey]
        ],
        *,
        epoch: int,
        rng: Rng = os.urandom,
        authz: bytes | None = None,
        leaf_check: LeafCheck = accept_any_leaf,
        authorizations: Sequence[bytes | None] | None = None,
    ) -> list[Group]:
        """Every member's state of a group of ``members`` at ``epoch``, built in one step
        instead of by commits: see ``agent.protocol.mls.assemble.assemble``."""
        from agent.protocol.mls.assemble import assemble  # noqa: PLC0415 - it builds Groups

        return assemble(
            group_id,
            members,
            epoch=epoch,
            rng=rng,
            authz=authz,
            leaf_check=leaf_check,
            authorizations=authorizations,
        )

    @staticmethod
    def _check_path_keys(
        tree: RatchetTree, nodes: Sequence[int], path_secret: bytes, check: str
    ) -> tuple[dict[int, ec.EllipticCurvePrivateKey], bytes]:
        """Derive the keys of ``nodes`` from ``path_secret`` and check each against the public
        key in ``tree``. Returns the keys and the commit secret."""
        keys, secrets = path_node_keys(path_secret, len(nodes))
        out: dict[int, ec.EllipticCurvePrivateKey] = {}
        for x, key in zip(nodes, keys, strict=True):
            node = tree.parent_node(x)
            if node is None or serialize_public_key(key.public_key()) != node.encryption_key:
                raise ProtocolError(check, f"node {x}: path secret does not match its public key")
            out[x] = key
        commit_secret = derive_secret(secrets[-1], b"path") if secrets else bytes(NH)
        return out, commit_secret

    # -- committing ---------------------------------------------------------------------------

    def commit(
        self,
        signature_key: ec.EllipticCurvePrivateKey,
        *,
        adds: Sequence[KeyPackage] = (),
        removes: Sequence[int] = (),
        updates: Sequence[Update] = (),
        new_leaf_key: ec.EllipticCurvePrivateKey | None = None,
        rng: Rng = os.urandom,
        authz: bytes | None = None,
        leaf_check: LeafCheck = accept_any_leaf,
        commit_check: CommitCheck = accept_any_commit,
        credential: bytes | None = None,
    ) -> CommitResult:
        """A commit applying other members' ``updates`` (their new leaf keys, from
        ``propose_update``), adding ``adds``, removing the members at leaf indices ``removes``,
        and re-keying this member's whole filtered direct path (every commit carries an
        UpdatePath, whose path secrets then reach the updated members under their new keys
        only). ``new_leaf_key``, if given, replaces this member's leaf key. ``authz`` is
        the Authorization for the change (carried in the commit; added leaves record its hash);
        ``leaf_check`` runs on every added or updated leaf and ``commit_check`` on the content
        before it is signed, as receivers will run them. ``credential``: this member's DevID
        certificate now; when it is not the one in the tree (renewed: same key), the commit
        carries it and the new leaf holds it."""
        state = self._public
        me = self._own_leaf
        tree, added = apply_proposals(
            state, me, removes, adds, authz=authz, leaf_check=leaf_check, updates=updates
        )
        path = tuple(tree.filtered_direct_path(me))
        nodes = [x for x, _ in path]
        first = rng(NH)
        keys, path_secrets = path_node_keys(first, len(path))
        commit_secret = derive_secret(path_secrets[-1] if path_secrets else first, b"path")
        node_publics = [serialize_public_key(k.public_key()) for k in keys]
        leaf_public = (
            serialize_public_key(new_leaf_key.public_key()) if new_leaf_key is not None else None
        )
        resolutions = copath_resolutions(tree, path, added)
        leaf_parent_hash = apply_path(
            tree, me, leaf_key=leaf_public, path=path, node_keys=node_publics
        )
        old_leaf = tree.leaf(me)
        assert old_leaf is not None
        if serialize_public_key(signature_key.public_key()) != old_leaf.signature_key:
            raise ProtocolError("mls.signature-key", "not this member's signature key")
        renewed = None if credential in (None, old_leaf.credential) else credential
        new_leaf = old_leaf.resigned(
            signature_key,
            encryption_key=leaf_public or old_leaf.encryption_key,
            parent_hash=leaf_parent_hash,
            group_id=state.group_id,
            leaf_index=me,
            credential=renewed,
        )
        leaf_check(new_leaf)
        provisional = finish_path(state, tree, me, new_leaf)
        path_nodes = []
        for node_public, secret, resolution in zip(
            node_publics, path_secrets, resolutions, strict=True
        ):
            sealed = []
            for r in resolution:
                target = tree.node(r)
                assert target is not None
                sealed.append(
                    encrypt_with_label(
                        codec.public_key(target.encryption_key),
                        UPDATE_PATH_LABEL,
                        provisional,
                        secret,
                        rng,
                    )
                )
            path_nodes.append(UpdatePathNode(node_public, tuple(sealed)))
        content = CommitContent(
            group_id=state.group_id,
            epoch=state.epoch,
            sender=me,
            removes=tuple(removes),
            adds=tuple(adds),
            path=UpdatePath(
                leaf_public, leaf_parent_hash, new_leaf.signature, tuple(path_nodes), renewed
            ),
            authz=authz,
            updates=tuple(updates),
        )
        commit_check(content, state.tree)
        signature = sign_with_label(
            signature_key, COMMIT_LABEL, commit_tbs(content, state.group_context())
        )
        confirmed = confirmed_transcript_hash(state.interim_transcript_hash, content, signature)
        context = group_context_bytes(state.group_id, state.epoch + 1, tree.tree_hash(), confirmed)
        secrets = derive_epoch(self._secrets.init_secret, commit_secret, context)
        tag = mac(secrets.confirmation_key, confirmed)
        commit = Commit(content, signature, tag)
        public = PublicState(
            state.group_id,
            state.epoch + 1,
            tree,
            confirmed,
            interim_transcript_hash(confirmed, tag),
        )
        leaf_key = new_leaf_key if new_leaf_key is not None else self._leaf_key
        node_keys = self._kept_node_keys(tree)
        node_keys.update(zip(nodes, keys, strict=True))
        group = Group(public, me, leaf_key, node_keys, secrets)
        welcome = None
        if adds:
            welcome = self._welcome(
                group,
                signature_key,
                adds=adds,
                added=added,
                nodes=nodes,
                path_secrets=path_secrets,
                tag=tag,
                rng=rng,
            )
        return CommitResult(commit, welcome, group)

    def add(
        self,
        signature_key: ec.EllipticCurvePrivateKey,
        key_packages: Sequence[KeyPackage],
        rng: Rng = os.urandom,
        *,
        authz: bytes | None = None,
        leaf_check: LeafCheck = accept_any_leaf,
        commit_check: CommitCheck = accept_any_commit,
    ) -> CommitResult:
        return self.commit(
            signature_key,
            adds=key_packages,
            rng=rng,
            authz=authz,
            leaf_check=leaf_check,
            commit_check=commit_check,
        )

    def remove(
        self,
        signature_key: ec.EllipticCurvePrivateKey,
        leaf_indices: Sequence[int],
        rng: Rng = os.urandom,
        *,
        authz: bytes | None = None,
        leaf_check: LeafCheck = accept_any_leaf,
        commit_check: CommitCheck = accept_any_commit,
    ) -> CommitResult:
        return self.commit(
            signature_key,
            removes=leaf_indices,
            rng=rng,
            authz=authz,
            leaf_check=leaf_check,
            commit_check=commit_check,
        )

    def propose_update(
        self, signature_key: ec.EllipticCurvePrivateKey, new_leaf_key: ec.EllipticCurvePublicKey
    ) -> Update:
        """An Update proposal for this member's leaf: ``new_leaf_key`` (a new TPM leaf key)
        replaces the leaf key once another member commits it. Keep the private key until the
        commit carrying it is processed (``process(..., proposed_leaf_keys=...)``); drop it if
        the next commits do not carry it. ``mls.signature-key`` if ``signature_key`` is not
        this member's."""
        old = self.tree.leaf(self._own_leaf)
        assert old is not None
        if serialize_public_key(signature_key.public_key()) != old.signature_key:
            raise ProtocolError("mls.signature-key", "not this member's signature key")
        return Update.create(
            signature_key,
            old,
            new_leaf_key,
            group_id=self.group_id,
            leaf_index=self._own_leaf,
        )

    def update(
        self,
        signature_key: ec.EllipticCurvePrivateKey,
        new_leaf_key: ec.EllipticCurvePrivateKey,
        rng: Rng = os.urandom,
        *,
        leaf_check: LeafCheck = accept_any_leaf,
        commit_check: CommitCheck = accept_any_commit,
        credential: bytes | None = None,
    ) -> CommitResult:
        """Self-update: a new leaf key (from the TPM) and a fresh path: post-compromise
        security for everything this member knew (``credential``: as for ``commit``)."""
        return self.commit(
            signature_key,
            new_leaf_key=new_leaf_key,
            rng=rng,
            leaf_check=leaf_check,
            commit_check=commit_check,
            credential=credential,
        )

    @staticmethod
    def _welcome(
        group: Group,
        signature_key: ec.EllipticCurvePrivateKey,
        *,
        adds: Sequence[KeyPackage],
        added: Sequence[int],
        nodes: Sequence[int],
        path_secrets: Sequence[bytes],
        tag: bytes,
        rng: Rng,
    ) -> Welcome:
        public = group._public
        unsigned = GroupInfo(
            group_id=public.group_id,
            epoch=public.epoch,
            tree=public.tree if inline_tree(public.tree) else None,
            tree_hash=public.tree.tree_hash(),
            confirmed_transcript_hash=public.confirmed_transcript_hash,
            confirmation_tag=tag,
            signer=group._own_leaf,
            signature=b"",
        )
        signature = sign_with_label(signature_key, GROUP_INFO_LABEL, unsigned.tbs())
        info = replace(unsigned, signature=signature)
        joiner_secret = group._secrets.joiner_secret
        key, nonce = welcome_key_nonce(_welcome_secret(joiner_secret))
        encrypted_info = AESGCM(key).encrypt(nonce, info.encode(), b"")
        sealed = []
        for kp, leaf_index in zip(adds, added, strict=True):
            x = tm.leaf_to_node(leaf_index)
            k = next(k for k, node in enumerate(nodes) if tm.is_in_subtree(x, node))
            plaintext = GroupSecrets(joiner_secret, path_secrets[k]).encode()
            kem, ct = encrypt_with_label(
                codec.public_key(kp.init_key), WELCOME_LABEL, encrypted_info, plaintext, rng
            )
            sealed.append(EncryptedGroupSecrets(kp.ref(), kem, ct))
        return Welcome(tuple(sealed), encrypted_info)

    def _kept_node_keys(self, tree: RatchetTree) -> dict[int, ec.EllipticCurvePrivateKey]:
        """The parent keys still valid in ``tree``: on our direct path, same public key."""
        direct = set(tm.direct_path(tm.leaf_to_node(self._own_leaf), tree.n_leaves))
        kept: dict[int, ec.EllipticCurvePrivateKey] = {}
        for x, key in self._node_keys.items():
            if x not in direct or x >= 2 * tree.n_leaves - 1:
                continue
            node = tree.parent_node(x)
            old = self.tree.parent_node(x)
            if node is not None and old is not None and node.encryption_key == old.encryption_key:
                kept[x] = key
        return kept

    # -- processing ---------------------------------------------------------------------------

    def process(
        self,
        commit: Commit,
        *,
        leaf_check: LeafCheck = accept_any_leaf,
        commit_check: CommitCheck = accept_any_commit,
        proposed_leaf_keys: Sequence[ec.EllipticCurvePrivateKey] = (),
    ) -> Group:
        """The next epoch after another member's ``commit``. ``proposed_leaf_keys``: the
        private keys of this member's Update proposals still pending; if the commit carries
        one of them, it becomes the leaf key (one ``public_key()`` call per key to match it).
        Raises ``ProtocolError`` (and this object is unchanged) for any public check
        (``agent.protocol.mls.public``, including the hooks), and for: ``mls.own-commit``
        (adopt ``CommitResult.group`` instead), ``mls.removed`` (the commit removes us),
        ``mls.update.unknown-key`` (it commits an Update of ours whose key we do not hold),
        ``mls.path.decrypt``, ``mls.path.mismatch``, ``mls.confirmation-tag``."""
        verified = verify_commit(
            self._public, commit, leaf_check=leaf_check, commit_check=commit_check
        )
        return self._process_verified(verified, proposed_leaf_keys)

    def updated_leaf_key(
        self, commit: Commit, proposed_leaf_keys: Sequence[ec.EllipticCurvePrivateKey]
    ) -> ec.EllipticCurvePrivateKey | None:
        """The key among ``proposed_leaf_keys`` that ``commit`` makes this member's leaf key
        (it carries our Update), None if it carries none of ours; ``mls.update.unknown-key``
        if it carries an Update for our leaf with a key we do not hold."""
        ours = next((u for u in commit.content.updates if u.leaf_index == self._own_leaf), None)
        if ours is None:
            return None
        for key in proposed_leaf_keys:
            if serialize_public_key(key.public_key()) == ours.encryption_key:
                return key
        raise ProtocolError(
            "mls.update.unknown-key", "the commit carries an Update of our leaf we did not make"
        )

    def _process_verified(
        self,
        verified: VerifiedCommit,
        proposed_leaf_keys: Sequence[ec.EllipticCurvePrivateKey] = (),
    ) -> Group:
        me = self._own_leaf
        if verified.sender == me:
            raise ProtocolError("mls.own-commit", "our own commit: use the group it returned")
        if me in verified.commit.content.removes:
            raise ProtocolError("mls.removed", "this commit removes us from the group")
        new_leaf_key = self.updated_leaf_key(verified.commit, proposed_leaf_keys)
        leaf_key = self._leaf_key if new_leaf_key is None else new_leaf_key
        own_node = tm.leaf_to_node(me)
        k = next(
            (k for k, (_, child) in enumerate(verified.path) if tm.is_in_subtree(own_node, child)),
            None,
        )
        if k is None:
            raise ProtocolError("mls.path.position", "no copath node above our leaf")
        key, j = self._decryption_key(verified.resolutions[k], leaf_key)
        kem, ct = verified.commit.content.path.nodes[k].encrypted_path_secret[j]
        try:
            path_secret = decrypt_with_label(
                key, UPDATE_PATH_LABEL, verified.provisional_context, kem, ct
            )
        except CryptoError:
            raise ProtocolError("mls.path.decrypt", "our path secret does not decrypt") from None
        if len(path_secret) != NH:
            raise ProtocolError("mls.path.decrypt", "path secret has the wrong length")
        derived, commit_secret = self._check_path_keys(
            verified.tree, [x for x, _ in verified.path[k:]], path_secret, "mls.path.mismatch"
        )
        public = verified.next_state()
        context = public.group_context()
        secrets = derive_epoch(self._secrets.init_secret, commit_secret, context)
        tag = mac(secrets.confirmation_key, public.confirmed_transcript_hash)
        if not hmac.compare_digest(tag, verified.commit.confirmation_tag):
            raise ProtocolError("mls.confirmation-tag", "the confirmation tag does not match")
        node_keys = self._kept_node_keys(verified.tree)
        node_keys.update(derived)
        return Group(public, me, leaf_key, node_keys, secrets)

    def _decryption_key(
        self, resolution: Sequence[int], leaf_key: ec.EllipticCurvePrivateKey
    ) -> tuple[ec.EllipticCurvePrivateKey, int]:
        """The one key of ours the path secret was sealed to, and its position: our leaf
        (``leaf_key``: the new one if the commit carries our Update) if it is in the
        resolution itself, else the parent above us whose private key we hold."""
        own_node = tm.leaf_to_node(self._own_leaf)
        for j, r in enumerate(resolution):
            if r == own_node:
                return leaf_key, j
            key = self._node_keys.get(r)
            if key is not None and tm.is_in_subtree(own_node, r):
                return key, j
        raise ProtocolError("mls.path.no-key", "no ciphertext is addressed to a key we hold")

    # -- persistence --------------------------------------------------------------------------

    def to_state(self, *, inline_tree: bool = True) -> dict[str, object]:
        """Everything needed to resume, as a CBOR-able map. It holds secrets (node private keys
        as scalars, epoch secrets): it must only ever be written inside the agent's encrypted
        state file. The leaf key is stored by reference: its public key, which the agent maps
        back to the TPM object. ``inline_tree=False``: the tree as the ``RatchetTree`` (not
        CBOR-able; ``agent.treestore`` saves it apart)."""
        return {
            "v": STATE_VERSION,
            "public": self._public.to_obj(inline_tree=inline_tree),
            "leaf": self._own_leaf,
            "leaf_ref": self._leaf_public,
            "nodes": {x: _scalar(k) for x, k in sorted(self._node_keys.items())},
            "secrets": {f.name: getattr(self._secrets, f.name) for f in fields(EpochSecrets)},
        }

    @classmethod
    def from_state(cls, state: object, resolve_leaf_key: ResolveLeafKey) -> Group:
        """Inverse of ``to_state``; ``resolve_leaf_key(leaf public key bytes)`` returns the leaf
        key object (a TPM key on devices). Raises ``StateError`` if anything is inconsistent.
        A version-2 state's Authorizations are dropped (``STATE_VERSION``)."""
        try:
            version = state.get("v") if isinstance(state, dict) else None
            if version not in (2, STATE_VERSION):
                raise StateError(f"group state version {version!r} unknown")
            m = codec.as_map(
                state,
                "group_state",
                {"v", "public", "leaf", "leaf_ref", "nodes", "secrets"}
                | ({"admissions"} if version == 2 else set()),
            )
            public = PublicState.from_obj(m["public"])
            own_leaf = codec.as_uint(m["leaf"], "group_state.leaf", codec.MAX_LEAVES - 1)
            leaf_ref = codec.as_point(m["leaf_ref"], "group_state.leaf_ref")
            nodes_in = m["nodes"]
            if not isinstance(nodes_in, dict):
                raise StateError("group_state.nodes is not a map")
            node_keys: dict[int, ec.EllipticCurvePrivateKey] = {}
            for x, scalar in nodes_in.items():
                xi = codec.as_uint(x, "group_state.nodes key", 2 * codec.MAX_LEAVES)
                raw = codec.as_bytes(scalar, "group_state.nodes value", 32, 32)
                key = ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
                node = public.tree.parent_node(xi) if xi < 2 * public.tree.n_leaves - 1 else None
                if node is None or serialize_public_key(key.public_key()) != node.encryption_key:
                    raise StateError(f"node key {xi} does not match the tree")
                node_keys[xi] = key
            secrets_in = codec.as_map(
                m["secrets"], "group_state.secrets", {f.name for f in fields(EpochSecrets)}
            )
            secrets = EpochSecrets(
                **{
                    name: codec.as_bytes(value, f"group_state.secrets.{name}", NH, NH)
                    for name, value in secrets_in.items()
                }
            )
        except (ProtocolError, ValueError) as exc:
            raise StateError(f"group state unreadable: {exc}") from None
        leaf = public.tree.leaf(own_leaf)
        if leaf is None or leaf.encryption_key != leaf_ref:
            raise StateError("group state: our leaf is not in its tree")
        leaf_key = resolve_leaf_key(leaf_ref)
        if serialize_public_key(leaf_key.public_key()) != leaf_ref:
            raise StateError("the resolved leaf key is not the one in the tree")
        return cls(public, own_leaf, leaf_key, node_keys, secrets)


__all__ = [
    "DATA_KEY_LABEL",
    "AdmissionCheck",
    "CommitCheck",
    "LeafCheck",
    "CommitResult",
    "Group",
    "KeyPackage",
    "LeafNode",
    "PublicGroup",
    "ResolveLeafKey",
]
