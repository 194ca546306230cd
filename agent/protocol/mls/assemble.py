"""``Group.assemble``: every member's state of a large group built in one step instead of by
commits (N real adds, each processed by every member, cost O(N^2)); for the virtual fleet and the
benchmarks. Its own module because it is long and only those tools need it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol.errors import ProtocolError
from agent.protocol.hpke import Rng, serialize_public_key
from agent.protocol.mls import codec
from agent.protocol.mls import tree_math as tm
from agent.protocol.mls.crypto import NH, derive_secret, mac
from agent.protocol.mls.group import Group, path_node_keys
from agent.protocol.mls.key_schedule import derive_epoch, group_context_bytes
from agent.protocol.mls.messages import KeyPackage
from agent.protocol.mls.parenthash import parent_hash
from agent.protocol.mls.public import (
    LeafCheck,
    PublicState,
    accept_any_leaf,
    admission_hash,
    interim_transcript_hash,
)
from agent.protocol.mls.tree import Node, ParentNode, RatchetTree


def assemble(
    group_id: bytes,
    members: Sequence[tuple[KeyPackage, ec.EllipticCurvePrivateKey, ec.EllipticCurvePrivateKey]],
    *,
    epoch: int,
    rng: Rng = os.urandom,
    authz: bytes | None = None,
    leaf_check: LeafCheck = accept_any_leaf,
    authorizations: Sequence[bytes | None] | None = None,
) -> list[Group]:
    """Every member's state of a group of ``members`` (leaf i = ``members[i]``) at
    ``epoch``, each member given as (KeyPackage, leaf key, signature key), all admitted by
    ``authz`` (the group's creation Authorization), or member i by ``authorizations[i]`` (a
    group grown by one add request per member), built in one step instead of by commits.

    The result is the state real commits reach when the members are added and then each one
    commits once (an UpdatePath), in leaf order, every member processing every commit:

    - the tree is as wide as the next power of two; a parent holds a key exactly when it is
      on some member's filtered direct path (members on both sides of it), with no unmerged
      leaves; each key comes from the path secrets of the last member below it to commit
      (the rightmost), chained up its path as ``commit`` chains them;
    - every leaf is a commit leaf signed by its member, with the parent hashes its commit
      set (the chain up to the first node a later member re-keyed; that last link, to a key
      no longer in the tree, is random): the tree is parent-hash valid;
    - every member holds the private keys of the non-blank parents on its direct path;
    - the epoch secrets come from the last committer's commit secret (the previous epoch's
      init secret is a fresh random value) through the key schedule with this epoch's
      GroupContext, the interim transcript hash from the confirmation tag, as in a commit.

    Only the history is not reproduced: the confirmed transcript hash (a hash over commits
    that never happened) is random. Members therefore agree on every epoch secret, and the
    next real commit, add or remove is processed as after real commits.

    Each KeyPackage is verified, passed to ``leaf_check`` and must match its leaf key and
    signature key (``mls.key-package.signature``, ``mls.leaf-key``, ``mls.signature-key``);
    duplicate devices or leaf keys are refused (``mls.add.duplicate``,
    ``mls.add.duplicate-key``); ``epoch`` must be at least 1 (epoch 0 is ``create``).
    Cost: one signature check and one signature per member and one key derivation per
    parent; no ECDH.
    """
    codec.as_bytes(group_id, "group_id", 1, codec.MAX_GROUP_ID)
    n = len(members)
    if not 1 <= n <= codec.MAX_LEAVES:
        raise ProtocolError("mls.add.full", f"a group has 1 to {codec.MAX_LEAVES} members")
    if epoch < 1:
        raise ValueError("an assembled group starts at epoch 1 or later (0 is create)")
    width = 1
    while width < n:
        width *= 2
    nodes: list[Node] = [None] * tm.node_width(width)
    devices: set[bytes] = set()
    leaf_keys: set[bytes] = set()
    for i, (key_package, leaf_key, signature_key) in enumerate(members):
        key_package.verify()
        leaf_check(key_package.leaf)
        if serialize_public_key(leaf_key.public_key()) != key_package.leaf_key:
            raise ProtocolError("mls.leaf-key", f"member {i}: leaf key and KeyPackage differ")
        if serialize_public_key(signature_key.public_key()) != key_package.signature_key:
            raise ProtocolError(
                "mls.signature-key", f"member {i}: signature key and KeyPackage differ"
            )
        if key_package.device_id in devices:
            raise ProtocolError("mls.add.duplicate", f"member {i}: the device appears twice")
        if key_package.leaf_key in leaf_keys:
            raise ProtocolError("mls.add.duplicate-key", f"member {i}: a leaf key twice")
        devices.add(key_package.device_id)
        leaf_keys.add(key_package.leaf_key)
        nodes[tm.leaf_to_node(i)] = key_package.leaf_node()
    # Members commit in leaf order: the key a parent ends up with is the one set by the
    # rightmost member below it, so walk the members backwards and let each one set the
    # part of its filtered direct path no later member has set (a prefix of it).
    parent_keys: dict[int, ec.EllipticCurvePrivateKey] = {}
    owned_by: list[tuple[list[tuple[int, int]], bool]] = [([], False)] * n
    commit_secret = b""
    for i in reversed(range(n)):
        owned: list[tuple[int, int]] = []  # (node, copath child)
        cut = False  # the rest of the filtered path was re-keyed by a later member
        x = tm.leaf_to_node(i)
        for p in tm.direct_path(x, width):
            if tm.subtree_leaves(tm.sibling(x, width)).start < n:  # copath side has members
                if p in parent_keys:
                    cut = True
                    break
                owned.append((p, tm.sibling(x, width)))
            x = p
        owned_by[i] = (owned, cut)
        first = rng(NH)
        keys, path_secrets = path_node_keys(first, len(owned))
        parent_keys.update(zip((p for p, _ in owned), keys, strict=True))
        if i == n - 1:  # the last commit: its commit secret starts this epoch
            commit_secret = derive_secret(path_secrets[-1] if path_secrets else first, b"path")
    for p, key in parent_keys.items():
        nodes[p] = ParentNode(serialize_public_key(key.public_key()))
    if authorizations is None:
        admissions = dict.fromkeys(range(n), admission_hash(authz))
    elif len(authorizations) != n or authz is not None:
        raise ValueError("authorizations: one per member, and then no authz")
    else:
        admissions = {i: admission_hash(a) for i, a in enumerate(authorizations)}
    tree = RatchetTree(nodes, admissions)
    # Parent hashes in commit order: the copath children of a member's own nodes hold only
    # earlier members, whose leaves and nodes are final by then.
    for i, (owned, cut) in enumerate(owned_by):
        above = rng(NH) if cut else b""
        for p, copath_child in reversed(owned):
            node = tree.parent_node(p)
            assert node is not None
            node = replace(node, parent_hash=above)
            tree._set(p, node)
            above = parent_hash(node, tree.original_hash(copath_child, frozenset()))
        key_package, _, signature_key = members[i]
        leaf = key_package.leaf.resigned(
            signature_key,
            encryption_key=key_package.leaf_key,
            parent_hash=above,
            group_id=group_id,
            leaf_index=i,
        )
        tree._replace_leaf(i, leaf)
    confirmed = rng(NH)
    context = group_context_bytes(group_id, epoch, tree.tree_hash(), confirmed)
    secrets = derive_epoch(rng(NH), commit_secret, context)
    tag = mac(secrets.confirmation_key, confirmed)
    public = PublicState(group_id, epoch, tree, confirmed, interim_transcript_hash(confirmed, tag))
    groups = []
    for i, (_, leaf_key, _) in enumerate(members):
        path = tm.direct_path(tm.leaf_to_node(i), width)
        held = {p: parent_keys[p] for p in path if p in parent_keys}
        groups.append(Group(public, i, leaf_key, held, secrets))
    return groups
