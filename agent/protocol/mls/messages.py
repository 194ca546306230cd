"""The handshake messages of keyfleet's MLS subset, framed as CBOR maps (docs/treekem.md):
KeyPackage, Commit (with its UpdatePath) and Welcome (with GroupSecrets and GroupInfo inside).

Each type has ``to_obj``/``from_obj`` (the CBOR data model) and ``encode``/``decode`` (bytes).
``decode`` is strict: size limit before decoding, deterministic CBOR only, exact key sets, exact
lengths, bounded counts and points on P-256; anything else raises ``ProtocolError`` with a
``mls.decode*`` check id. Signatures and semantics are checked later, by
``agent.protocol.mls.public``
and ``agent.protocol.mls.group``, which are the only ways into a group's state.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol.errors import CryptoError, ProtocolError
from agent.protocol.hpke import serialize_public_key
from agent.protocol.mls import codec
from agent.protocol.mls.crypto import (
    KEY_PACKAGE_REF_LABEL,
    NH,
    ref_hash,
    sign_with_label,
    verify_with_label,
)
from agent.protocol.mls.tree import (
    MAX_CREDENTIAL,
    SOURCE_KEY_PACKAGE,
    SOURCE_UPDATE,
    LeafNode,
    RatchetTree,
)

KEY_PACKAGE_VERSION = 2
"""2: a one-time init key apart from the leaf key, and a lifetime (docs/wire.md)."""
MAX_TIME = (1 << 64) - 1
CIPHER_SUITE = 2  # MLS_128_DHKEMP256_AES128GCM_SHA256_P256
MAX_TPM_PROOF = 4096
MAX_AUTHORIZATION = 64 * 1024
"""Largest Authorization a commit or GroupInfo carries (a request plus k approvals, each with
its operator certificate)."""
MAX_KEY_PACKAGE_BYTES = 16 * 1024
MAX_COMMIT_BYTES = 8 << 20
MAX_WELCOME_BYTES = 32 << 20
MAX_ADDS = 1024
MAX_UPDATES = 1024
"""Most members' updates one commit carries (each about 150 bytes on the wire: leaf index, new
leaf key, leaf signature); the service batches fewer so a commit fits a wire message."""
MAX_UPDATE_BYTES = 256
HPKE_CT_LEN = NH + 16  # a path secret or joiner secret sealed with AES-128-GCM
MAX_CT = 1024  # sealed GroupSecrets are a few dozen bytes


def _hpke_ct(value: object, what: str) -> tuple[bytes, bytes]:
    pair = codec.as_list(value, what, 2, lambda v, w: v, min_len=2)
    return codec.as_point(pair[0], f"{what}.kem_output"), codec.as_bytes(
        pair[1], f"{what}.ciphertext", 16, MAX_CT
    )


def _proof(value: object, what: str) -> bytes | None:
    return None if value is None else codec.as_bytes(value, what, 1, MAX_TPM_PROOF)


# -- KeyPackage -------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPackage:
    """A device's offer to be added to a group (format version 2, cipher suite 2): its leaf
    (device id, DevID public key, leaf HPKE public key, DevID certificate; signed by the DevID
    key), a one-time **init key** the Welcome is sealed to (RFC 9420 §10; it must differ from the
    leaf key), a lifetime ``[not_before, not_after]`` (Unix seconds, inclusive), optional proofs
    that the leaf key and the init key live in the device's TPM (opaque here: the caller's add
    check verifies them), and the DevID signature over all of it.

    The init key opens exactly one Welcome and is then destroyed by its owner, so a Welcome
    kept by anyone can no longer be opened with what stays on the device (docs/treekem.md)."""

    leaf: LeafNode
    init_key: bytes
    not_before: int
    not_after: int
    tpm_proof: bytes | None
    init_tpm_proof: bytes | None
    signature: bytes

    @property
    def device_id(self) -> bytes:
        return self.leaf.device_id

    @property
    def signature_key(self) -> bytes:
        return self.leaf.signature_key

    @property
    def leaf_key(self) -> bytes:
        return self.leaf.encryption_key

    @property
    def credential(self) -> bytes:
        return self.leaf.credential

    def _tbs(self) -> bytes:
        obj = self.to_obj()
        del obj["signature"]
        return codec.encode(obj)

    @classmethod
    def create(
        cls,
        device_id: bytes,
        signature_key: ec.EllipticCurvePrivateKey,
        leaf_key: ec.EllipticCurvePublicKey,
        credential: bytes,
        *,
        init_key: ec.EllipticCurvePublicKey,
        lifetime: tuple[int, int] = (0, MAX_TIME),
        tpm_proof: bytes | None = None,
        init_tpm_proof: bytes | None = None,
    ) -> KeyPackage:
        """Sign a KeyPackage with the device's signature key (only ``sign``/``public_key`` are
        called on it: it may live in a TPM). ``credential`` is the DevID certificate (DER) of
        ``signature_key``; ``init_key`` the one-time key the Welcome will be sealed to;
        ``lifetime`` (not_before, not_after) in Unix seconds (the default never expires: for
        tests and for the creator's own package, which no Welcome is ever sealed to);
        ``tpm_proof``/``init_tpm_proof`` the TPM residency proofs of the two keys, if any."""
        leaf = LeafNode.signed(
            signature_key,
            device_id=device_id,
            encryption_key=serialize_public_key(leaf_key),
            credential=credential,
            source=SOURCE_KEY_PACKAGE,
        )
        unsigned = cls(
            leaf,
            serialize_public_key(init_key),
            lifetime[0],
            lifetime[1],
            tpm_proof,
            init_tpm_proof,
            b"",
        )
        unsigned._check_shape()
        return replace(
            unsigned,
            signature=sign_with_label(signature_key, b"KeyPackageTBS", unsigned._tbs()),
        )

    def _check_shape(self) -> None:
        if self.init_key == self.leaf.encryption_key:
            raise ProtocolError(
                "mls.init-key", "a KeyPackage's init key must differ from its leaf key"
            )
        if self.not_before > self.not_after:
            raise ProtocolError(
                "mls.key-package.lifetime", "a KeyPackage's lifetime ends before it starts"
            )

    def verify(self) -> None:
        """The init key differs from the leaf key (``mls.init-key``), the lifetime is an
        interval (``mls.key-package.lifetime``), the leaf is a KeyPackage leaf
        (``mls.leaf.source``) and its signature verifies (``mls.leaf.signature``); the
        KeyPackage signature verifies under the leaf's signature key
        (``mls.key-package.signature``). Who that key belongs to is for the caller's
        ``LeafCheck``; whether the package is still valid is ``check_lifetime``."""
        self._check_shape()
        if self.leaf.source != SOURCE_KEY_PACKAGE:
            raise ProtocolError("mls.leaf.source", "a KeyPackage leaf must have source 1")
        self.leaf.verify(b"", 0)
        try:
            verify_with_label(
                codec.public_key(self.signature_key), b"KeyPackageTBS", self._tbs(), self.signature
            )
        except CryptoError:
            raise ProtocolError(
                "mls.key-package.signature", "KeyPackage signature does not verify"
            ) from None

    def check_lifetime(self, now: int) -> None:
        """``mls.key-package.expired`` unless ``not_before <= now <= not_after``: checked by the
        member committing the add and by the joiner opening the Welcome."""
        if not self.not_before <= now <= self.not_after:
            raise ProtocolError(
                "mls.key-package.expired",
                f"the KeyPackage is valid from {self.not_before} to {self.not_after}, not at {now}",
            )

    def ref(self) -> bytes:
        """KeyPackageRef = RefHash("MLS 1.0 KeyPackage Reference", encoded KeyPackage)."""
        return ref_hash(KEY_PACKAGE_REF_LABEL, self.encode())

    def leaf_node(self) -> LeafNode:
        return self.leaf

    def to_obj(self) -> dict[str, object]:
        return {
            "v": KEY_PACKAGE_VERSION,
            "suite": CIPHER_SUITE,
            "init": self.init_key,
            "leaf": self.leaf.to_obj(),
            "life": [self.not_before, self.not_after],
            "tpm": self.tpm_proof,
            "itpm": self.init_tpm_proof,
            "signature": self.signature,
        }

    @classmethod
    def from_obj(cls, value: object, what: str = "key_package") -> KeyPackage:
        m = codec.as_map(
            value, what, {"v", "suite", "init", "leaf", "life", "tpm", "itpm", "signature"}
        )
        codec.expect_exact(m["v"], KEY_PACKAGE_VERSION, f"{what}.v", "mls.version")
        codec.expect_exact(m["suite"], CIPHER_SUITE, f"{what}.suite", "mls.suite")
        life = codec.as_list(
            m["life"], f"{what}.life", 2, lambda v, w: codec.as_uint(v, w, MAX_TIME), min_len=2
        )
        return cls(
            leaf=LeafNode.from_obj(m["leaf"], f"{what}.leaf"),
            init_key=codec.as_point(m["init"], f"{what}.init"),
            not_before=life[0],
            not_after=life[1],
            tpm_proof=_proof(m["tpm"], f"{what}.tpm"),
            init_tpm_proof=_proof(m["itpm"], f"{what}.itpm"),
            signature=codec.as_bytes(m["signature"], f"{what}.signature", 8, codec.MAX_SIGNATURE),
        )

    def encode(self) -> bytes:
        return codec.encode(self.to_obj())

    @classmethod
    def decode(cls, data: bytes) -> KeyPackage:
        return cls.from_obj(codec.decode(data, MAX_KEY_PACKAGE_BYTES, "key_package"))


# -- Commit -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpdatePathNode:
    """A new parent public key and its path secret sealed to each node of the resolution of
    the matching copath child, in resolution order: (kem_output, ciphertext) pairs."""

    encryption_key: bytes
    encrypted_path_secret: tuple[tuple[bytes, bytes], ...]

    def to_obj(self) -> dict[str, object]:
        return {
            "enc": self.encryption_key,
            "secrets": [list(p) for p in self.encrypted_path_secret],
        }

    @classmethod
    def from_obj(cls, value: object, what: str) -> UpdatePathNode:
        m = codec.as_map(value, what, {"enc", "secrets"})
        secrets = codec.as_list(m["secrets"], f"{what}.secrets", codec.MAX_LEAVES, _hpke_ct)
        return cls(codec.as_point(m["enc"], f"{what}.enc"), tuple(secrets))


@dataclass(frozen=True)
class UpdatePath:
    """The committer's new leaf key (only when it replaced it), its leaf's new parent hash and
    leaf signature, and one node per element of its filtered direct path, leaf to root.

    The rest of the committer's new leaf (device id, signature key) is the one in the tree
    already; so is its credential, unless ``credential`` carries a renewed DevID certificate
    (same key, same device: receivers' leaf check validates it like any new leaf's). A commit
    otherwise carries no certificate: receivers rebuild the leaf (source 3) and check its
    signature (which covers the credential) and parent hash."""

    leaf_key: bytes | None
    parent_hash: bytes
    leaf_signature: bytes
    nodes: tuple[UpdatePathNode, ...]
    credential: bytes | None = None

    def to_obj(self) -> dict[str, object]:
        out: dict[str, object] = {
            "leaf": self.leaf_key,
            "ph": self.parent_hash,
            "lsig": self.leaf_signature,
            "nodes": [n.to_obj() for n in self.nodes],
        }
        if self.credential is not None:
            out["cred"] = self.credential
        return out

    @classmethod
    def from_obj(cls, value: object, what: str) -> UpdatePath:
        m = codec.as_map(value, what, {"leaf", "ph", "lsig", "nodes"}, {"cred"})
        leaf = None if m["leaf"] is None else codec.as_point(m["leaf"], f"{what}.leaf")
        nodes = codec.as_list(m["nodes"], f"{what}.nodes", codec.MAX_DEPTH, UpdatePathNode.from_obj)
        credential = (
            codec.as_bytes(m["cred"], f"{what}.cred", 1, MAX_CREDENTIAL) if "cred" in m else None
        )
        return cls(
            leaf,
            codec.as_bytes(m["ph"], f"{what}.ph", 0, NH),
            codec.as_bytes(m["lsig"], f"{what}.lsig", 8, codec.MAX_SIGNATURE),
            tuple(nodes),
            credential,
        )


@dataclass(frozen=True)
class Update:
    """A member's Update proposal (RFC 9420 §12.1.2) in the only form keyfleet allows: a new
    leaf HPKE key for the member at ``leaf_index``, nothing else. The member signs its whole
    new leaf (source update, over the group id and its leaf index, like any leaf not from a
    KeyPackage); device id, signature key and credential are those of the leaf in the tree,
    so they cannot change and need not travel: a receiver rebuilds the leaf (``leaf``) and
    checks the signature under the key already in the tree."""

    leaf_index: int
    encryption_key: bytes
    signature: bytes

    @classmethod
    def create(
        cls,
        signature_key: ec.EllipticCurvePrivateKey,
        old: LeafNode,
        new_leaf_key: ec.EllipticCurvePublicKey,
        *,
        group_id: bytes,
        leaf_index: int,
    ) -> Update:
        """The member at ``leaf_index`` (its leaf ``old``) proposes ``new_leaf_key``, signed
        with its own ``signature_key`` (only ``sign``/``public_key`` are called on it)."""
        leaf = LeafNode.signed(
            signature_key,
            device_id=old.device_id,
            encryption_key=serialize_public_key(new_leaf_key),
            credential=old.credential,
            source=SOURCE_UPDATE,
            group_id=group_id,
            leaf_index=leaf_index,
        )
        return cls(leaf_index, leaf.encryption_key, leaf.signature)

    def leaf(self, old: LeafNode) -> LeafNode:
        """The new leaf, rebuilt from the member's current leaf ``old``."""
        return LeafNode(
            device_id=old.device_id,
            signature_key=old.signature_key,
            encryption_key=self.encryption_key,
            credential=old.credential,
            source=SOURCE_UPDATE,
            parent_hash=b"",
            signature=self.signature,
        )

    def to_obj(self) -> list[object]:
        return [self.leaf_index, self.encryption_key, self.signature]

    @classmethod
    def from_obj(cls, value: object, what: str = "update") -> Update:
        items = codec.as_list(value, what, 3, lambda v, w: v, min_len=3)
        return cls(
            codec.as_uint(items[0], f"{what}.leaf", codec.MAX_LEAVES - 1),
            codec.as_point(items[1], f"{what}.enc"),
            codec.as_bytes(items[2], f"{what}.lsig", 8, codec.MAX_SIGNATURE),
        )

    def encode(self) -> bytes:
        return codec.encode(self.to_obj())

    @classmethod
    def decode(cls, data: bytes) -> Update:
        return cls.from_obj(codec.decode(data, MAX_UPDATE_BYTES, "update"))


@dataclass(frozen=True)
class CommitContent:
    """What the committer signs: group, the epoch the commit applies to, its own leaf index,
    the members it removes (leaf indices), the KeyPackages it adds, its UpdatePath, the
    Authorization for the change (opaque to MLS, checked by the caller's ``CommitCheck``; each
    added leaf records SHA-256 of it as its admission) and other members' Updates it commits
    (applied first, RFC 9420 §12.3 order). The ``updates`` key is present only when there are
    some, so a commit without any encodes as it always did."""

    group_id: bytes
    epoch: int
    sender: int
    removes: tuple[int, ...]
    adds: tuple[KeyPackage, ...]
    path: UpdatePath
    authz: bytes | None = None
    updates: tuple[Update, ...] = ()

    def to_obj(self) -> dict[str, object]:
        obj: dict[str, object] = {
            "group": self.group_id,
            "epoch": self.epoch,
            "sender": self.sender,
            "removes": list(self.removes),
            "adds": [kp.to_obj() for kp in self.adds],
            "path": self.path.to_obj(),
            "authz": self.authz,
        }
        if self.updates:
            obj["updates"] = [u.to_obj() for u in self.updates]
        return obj

    @classmethod
    def from_obj(cls, value: object, what: str = "content") -> CommitContent:
        m = codec.as_map(
            value,
            what,
            {"group", "epoch", "sender", "removes", "adds", "path", "authz"},
            {"updates"},
        )
        leaf_index = codec.MAX_LEAVES - 1
        updates: tuple[Update, ...] = ()
        if "updates" in m:
            updates = tuple(
                codec.as_list(
                    m["updates"], f"{what}.updates", MAX_UPDATES, Update.from_obj, min_len=1
                )
            )
        return cls(
            group_id=codec.as_bytes(m["group"], f"{what}.group", 1, codec.MAX_GROUP_ID),
            epoch=codec.as_uint(m["epoch"], f"{what}.epoch", (1 << 64) - 1),
            sender=codec.as_uint(m["sender"], f"{what}.sender", leaf_index),
            removes=tuple(
                codec.as_list(
                    m["removes"],
                    f"{what}.removes",
                    codec.MAX_LEAVES,
                    lambda v, w: codec.as_uint(v, w, leaf_index),
                )
            ),
            adds=tuple(codec.as_list(m["adds"], f"{what}.adds", MAX_ADDS, KeyPackage.from_obj)),
            path=UpdatePath.from_obj(m["path"], f"{what}.path"),
            authz=None
            if m["authz"] is None
            else codec.as_bytes(m["authz"], f"{what}.authz", 1, MAX_AUTHORIZATION),
            updates=updates,
        )


@dataclass(frozen=True)
class Commit:
    """A signed commit with its confirmation tag (MAC under the new epoch's confirmation key
    over the new confirmed transcript hash: only members can check it)."""

    content: CommitContent
    signature: bytes
    confirmation_tag: bytes

    def to_obj(self) -> dict[str, object]:
        return {
            "content": self.content.to_obj(),
            "signature": self.signature,
            "tag": self.confirmation_tag,
        }

    @classmethod
    def from_obj(cls, value: object, what: str = "commit") -> Commit:
        m = codec.as_map(value, what, {"content", "signature", "tag"})
        return cls(
            content=CommitContent.from_obj(m["content"], f"{what}.content"),
            signature=codec.as_bytes(m["signature"], f"{what}.signature", 8, codec.MAX_SIGNATURE),
            confirmation_tag=codec.as_bytes(m["tag"], f"{what}.tag", NH, NH),
        )

    def encode(self) -> bytes:
        return codec.encode(self.to_obj())

    @classmethod
    def decode(cls, data: bytes) -> Commit:
        return cls.from_obj(codec.decode(data, MAX_COMMIT_BYTES, "commit"))


# -- Welcome ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupSecrets:
    """Sealed to one joiner: the new epoch's joiner_secret, and the path secret of the lowest
    node of the committer's filtered direct path above the joiner."""

    joiner_secret: bytes = field(repr=False)
    path_secret: bytes = field(repr=False)

    def encode(self) -> bytes:
        return codec.encode({"joiner": self.joiner_secret, "path": self.path_secret})

    @classmethod
    def decode(cls, data: bytes) -> GroupSecrets:
        m = codec.as_map(
            codec.decode(data, MAX_CT, "group_secrets"),
            "group_secrets",
            {
                "joiner",
                "path",
            },
        )
        return cls(
            codec.as_bytes(m["joiner"], "group_secrets.joiner", NH, NH),
            codec.as_bytes(m["path"], "group_secrets.path", NH, NH),
        )


@dataclass(frozen=True)
class GroupInfo:
    """What a joiner needs, signed by the committer: the epoch, the tree hash of the public
    tree, the tree itself only when it is small (``tree`` None: the joiner fetches it in pages
    from the delivery service, ``agent.protocol.mls.treepages``, and accepts it only if its hash
    is ``tree_hash``), the confirmed transcript hash and the confirmation tag (which the joiner
    checks with the confirmation key it derives from the GroupContext, which holds the tree
    hash, so a GroupInfo cannot be paired with the wrong secrets or the wrong tree). It carries
    no Authorization: the tree records each leaf's admission hash, and the delivery service,
    which need not be trusted with them, delivers the Authorizations those hashes name
    (``admissions_of``; docs/treekem.md, "Admissions delivered by the service").

    ``legacy_admissions``: the Authorizations a GroupInfo made by a committer from before then
    carried (its ``admissions`` key, under its signature); read so that a joiner can join
    through a member not yet upgraded, taken as delivered ones (by hash). None: no such key,
    and a GroupInfo made now never has one."""

    group_id: bytes
    epoch: int
    tree: RatchetTree | None
    tree_hash: bytes
    confirmed_transcript_hash: bytes
    confirmation_tag: bytes
    signer: int
    signature: bytes
    legacy_admissions: tuple[bytes, ...] | None = None

    def tbs(self) -> bytes:
        obj = self.to_obj()
        del obj["signature"]
        return codec.encode(obj)

    def to_obj(self) -> dict[str, object]:
        obj: dict[str, object] = {
            "group": self.group_id,
            "epoch": self.epoch,
            "tree": None if self.tree is None else self.tree.to_obj(),
            "th": self.tree_hash,
            "cth": self.confirmed_transcript_hash,
            "tag": self.confirmation_tag,
            "signer": self.signer,
            "signature": self.signature,
        }
        if self.legacy_admissions is not None:
            obj["admissions"] = list(self.legacy_admissions)
        return obj

    @classmethod
    def from_obj(cls, value: object, what: str = "group_info") -> GroupInfo:
        m = codec.as_map(
            value,
            what,
            {"group", "epoch", "tree", "th", "cth", "tag", "signer", "signature"},
            {"admissions"},
        )
        legacy = None
        if "admissions" in m:
            legacy = tuple(
                codec.as_list(
                    m["admissions"],
                    f"{what}.admissions",
                    codec.MAX_LEAVES,
                    lambda v, w: codec.as_bytes(v, w, 1, MAX_AUTHORIZATION),
                )
            )
        return cls(
            group_id=codec.as_bytes(m["group"], f"{what}.group", 1, codec.MAX_GROUP_ID),
            epoch=codec.as_uint(m["epoch"], f"{what}.epoch", (1 << 64) - 1),
            tree=None if m["tree"] is None else RatchetTree.from_obj(m["tree"], f"{what}.tree"),
            tree_hash=codec.as_bytes(m["th"], f"{what}.th", NH, NH),
            confirmed_transcript_hash=codec.as_bytes(m["cth"], f"{what}.cth", NH, NH),
            confirmation_tag=codec.as_bytes(m["tag"], f"{what}.tag", NH, NH),
            signer=codec.as_uint(m["signer"], f"{what}.signer", codec.MAX_LEAVES - 1),
            signature=codec.as_bytes(m["signature"], f"{what}.signature", 8, codec.MAX_SIGNATURE),
            legacy_admissions=legacy,
        )

    def encode(self) -> bytes:
        return codec.encode(self.to_obj())

    @classmethod
    def decode(cls, data: bytes) -> GroupInfo:
        return cls.from_obj(codec.decode(data, MAX_WELCOME_BYTES, "group_info"))


@dataclass(frozen=True)
class EncryptedGroupSecrets:
    """GroupSecrets sealed (EncryptWithLabel "Welcome") to the init key of the KeyPackage whose
    reference is ``key_package_ref``."""

    key_package_ref: bytes
    kem_output: bytes
    ciphertext: bytes

    def to_obj(self) -> dict[str, object]:
        return {"kp": self.key_package_ref, "kem": self.kem_output, "ct": self.ciphertext}

    @classmethod
    def from_obj(cls, value: object, what: str) -> EncryptedGroupSecrets:
        m = codec.as_map(value, what, {"kp", "kem", "ct"})
        return cls(
            codec.as_bytes(m["kp"], f"{what}.kp", NH, NH),
            codec.as_point(m["kem"], f"{what}.kem"),
            codec.as_bytes(m["ct"], f"{what}.ct", 16, MAX_CT),
        )


@dataclass(frozen=True)
class Welcome:
    """One per commit that adds members: per joiner its sealed GroupSecrets, and the GroupInfo
    encrypted under the welcome key derived from the joiner secret (RFC 9420 §12.4.3.1)."""

    secrets: tuple[EncryptedGroupSecrets, ...]
    encrypted_group_info: bytes

    def to_obj(self) -> dict[str, object]:
        return {"secrets": [s.to_obj() for s in self.secrets], "info": self.encrypted_group_info}

    @classmethod
    def from_obj(cls, value: object, what: str = "welcome") -> Welcome:
        m = codec.as_map(value, what, {"secrets", "info"})
        secrets = codec.as_list(
            m["secrets"], f"{what}.secrets", MAX_ADDS, EncryptedGroupSecrets.from_obj, min_len=1
        )
        return cls(tuple(secrets), codec.as_bytes(m["info"], f"{what}.info", 16, MAX_WELCOME_BYTES))

    def encode(self) -> bytes:
        return codec.encode(self.to_obj())

    @classmethod
    def decode(cls, data: bytes) -> Welcome:
        return cls.from_obj(codec.decode(data, MAX_WELCOME_BYTES, "welcome"))
