"""TreeKEM commit cost against the naive baseline, for full groups of N = 2 .. 4096 members.

Not a test: prints a JSON list of records to stdout (progress to stderr).

How the groups are built: not by N sequential adds (that is O(N^2) work), but directly as the
state a full group reaches: a complete tree of N leaves (each with its own signature key and leaf
key) whose every parent node holds a key pair derived from a per-node seed, no blanks, no
unmerged leaves; then the ``Group`` objects of the members we need (the committer and one
receiver) are constructed with the parent keys of their direct paths and one shared set of epoch
secrets. That is exactly what every member holds after an UpdatePath has touched every node.

Measured per N:
- ``remove`` with the committer the delivery service would pick (``committer_for_remove``: the
  removed leaf's nearest member, so the blanked path is re-keyed by the committer's own path),
- ``remove`` with a random committer (the blanked path below the common ancestor widens the
  copath resolutions: more ciphertexts),
- ``update`` (self-update with a new leaf key) by a random member;
each: CBOR-encoded commit size, creation time, and processing time of the receiver that has the
most to do (the member nearest to the committer: it derives the most path keys).
Baseline: a new 32-byte group key HPKE-sealed to each of the N-1 other members separately
(enc 65 + ct 48 bytes each), CBOR-framed as a list of [enc, ct] pairs plus an ECDSA signature.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol import hpke
from agent.protocol.hpke import serialize_public_key
from agent.protocol.mls import codec
from agent.protocol.mls import tree_math as tm
from agent.protocol.mls.crypto import derive_key_pair, hash_
from agent.protocol.mls.group import Group
from agent.protocol.mls.key_schedule import epoch_from_joiner
from agent.protocol.mls.messages import Commit
from agent.protocol.mls.public import PublicGroup, PublicState
from agent.protocol.mls.tree import LeafNode, ParentNode, RatchetTree

SIZES = [2**k for k in range(1, 13)]


class FullGroup:
    """A full group of ``n`` members, built directly (module docstring)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.signature_keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(n)]
        self.leaf_keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(n)]
        self.parent_keys = {
            x: derive_key_pair(hash_(seed.to_bytes(8, "big") + x.to_bytes(4, "big")))
            for x in range(1, 2 * n - 1, 2)
        }
        nodes: list[LeafNode | ParentNode | None] = []
        for x in range(2 * n - 1):
            if tm.is_leaf(x):
                i = x // 2
                nodes.append(
                    LeafNode(
                        f"device-{i:05d}".encode(),
                        serialize_public_key(self.signature_keys[i].public_key()),
                        serialize_public_key(self.leaf_keys[i].public_key()),
                    )
                )
            else:
                nodes.append(ParentNode(serialize_public_key(self.parent_keys[x].public_key())))
        tree = RatchetTree(nodes)
        self.public = PublicState(b"bench-group", 1, tree, os.urandom(32), os.urandom(32))
        self.secrets = epoch_from_joiner(os.urandom(32), self.public.group_context())

    def member(self, leaf: int) -> Group:
        path = tm.direct_path(tm.leaf_to_node(leaf), self.n)
        keys = {x: self.parent_keys[x] for x in path}
        return Group(self.public, leaf, self.leaf_keys[leaf], keys, self.secrets)


def _nearest(n: int, leaf: int, exclude: set[int]) -> int:
    others = [i for i in range(n) if i not in exclude]
    node = tm.leaf_to_node(leaf)
    return min(others, key=lambda i: tm.level(tm.common_ancestor(tm.leaf_to_node(i), node)))


def _measure(full: FullGroup, op: str, committer: int, target: int | None) -> dict[str, Any]:
    group = full.member(committer)
    sig = full.signature_keys[committer]
    start = time.perf_counter()
    if op == "update":
        result = group.update(sig, ec.generate_private_key(ec.SECP256R1()))
    else:
        assert target is not None
        result = group.remove(sig, [target])
    create_ms = (time.perf_counter() - start) * 1000
    encoded = result.commit.encode()
    exclude = {committer} | ({target} if target is not None else set())
    process_ms: float | None = None
    if len(exclude) < full.n:  # N=2 remove: nobody is left to process it
        receiver = full.member(_nearest(full.n, committer, exclude))
        start = time.perf_counter()
        processed = receiver.process(Commit.decode(encoded))
        process_ms = round((time.perf_counter() - start) * 1000, 2)
        assert processed.epoch_authenticator == result.group.epoch_authenticator
    start = time.perf_counter()
    PublicGroup(full.public).apply(Commit.decode(encoded))
    service_ms = (time.perf_counter() - start) * 1000
    ciphertexts = sum(len(n.encrypted_path_secret) for n in result.commit.content.path.nodes)
    return {
        "op": op,
        "committer": committer,
        "removed": target,
        "commit_bytes": len(encoded),
        "path_nodes": len(result.commit.content.path.nodes),
        "ciphertexts": ciphertexts,
        "create_ms": round(create_ms, 2),
        "process_ms": process_ms,
        "service_verify_ms": round(service_ms, 2),
    }


def _baseline(full: FullGroup, committer: int) -> dict[str, Any]:
    group_key = os.urandom(32)
    start = time.perf_counter()
    wrapped = [
        list(hpke.seal(full.leaf_keys[i].public_key(), b"keyfleet baseline", b"", group_key))
        for i in range(full.n)
        if i != committer
    ]
    signature = full.signature_keys[committer].sign(
        codec.encode(wrapped), ec.ECDSA(hashes.SHA256())
    )
    encoded = codec.encode({"epoch": 2, "keys": wrapped, "signature": signature})
    return {
        "baseline_bytes": len(encoded),
        "baseline_ciphertexts": len(wrapped),
        "baseline_create_ms": round((time.perf_counter() - start) * 1000, 2),
    }


def main() -> None:
    rnd = random.Random(20240601)  # noqa: S311 - picks tree positions, reproducibly; no secret
    records: list[dict[str, Any]] = []
    for n in SIZES:
        t0 = time.perf_counter()
        full = FullGroup(n, seed=n)
        full.public.tree.tree_hash()  # members keep subtree hashes cached between commits
        build_s = time.perf_counter() - t0
        target = rnd.randrange(n)
        near = PublicGroup(full.public).committer_for_remove(target)
        far = rnd.choice([i for i in range(n) if i != target])
        updater = rnd.randrange(n)
        baseline = _baseline(full, near)
        runs = [
            ("remove", "nearest member (service's choice)", near, target),
            ("remove", "random member", far, target),
            ("update", "random member", updater, None),
        ]
        for op, who, committer, removed in runs:
            if n == 2 and op == "remove" and who == "random member":
                continue  # the only other member is the nearest one
            record = {"n": n, "committer_choice": who, **_measure(full, op, committer, removed)}
            record.update(baseline)
            record["ratio"] = round(baseline["baseline_bytes"] / record["commit_bytes"], 1)
            records.append(record)
        print(f"n={n} built in {build_s:.2f}s", file=sys.stderr)
    json.dump(records, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
