"""TreeKEM commit cost against the naive baseline, for full groups of N = 2 .. 4096 members.

Not a test: prints a JSON list of records to stdout (progress to stderr).

How the groups are built: not by N sequential adds (that is O(N^2) work), but with
``Group.assemble``: the state a full group reaches once every member has committed (a complete
tree of N leaves, each a signed commit leaf carrying its member's DevID certificate, about 500
bytes, from a test device CA; every parent node keyed, parent-hash valid; no blanks, no unmerged
leaves), all members admitted by one creation Authorization (a stand-in of 2 KiB: the tree
records its hash, the Welcome carries it once).

Measured per N:
- ``remove`` with the committer the delivery service would pick (``committer_for_remove``: the
  removed leaf's nearest member, so the blanked path is re-keyed by the committer's own path),
- ``remove`` with a random committer (the blanked path below the common ancestor widens the
  copath resolutions: more ciphertexts),
- ``update`` (self-update with a new leaf key) by a random member,
- ``add`` of one new device (with its certificate) by a random member, with an Authorization
  of 2 KiB: also the Welcome's size and the joiner's time to check it (every leaf signature,
  every parent hash) and join;
each: CBOR-encoded commit size, creation time, and processing time of the receiver that has the
most to do (the member nearest to the committer: it derives the most path keys). Credential
validation (X.509 path building, the caller's ``LeafCheck``) is not in these times: it is memoized
per certificate on devices and measured with the credentials.
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
from agent.protocol.mls import codec
from agent.protocol.mls import tree_math as tm
from agent.protocol.mls.group import Group
from agent.protocol.mls.messages import Commit, KeyPackage, Welcome
from agent.protocol.mls.public import PublicGroup
from tests.device_certs import devid_cert_der

SIZES = [2**k for k in range(1, 13)]
AUTHORIZATION_BYTES = 2048  # a request and two operator approvals with their certificates


def _device(
    i: int, init_key: ec.EllipticCurvePrivateKey | None = None
) -> tuple[KeyPackage, ec.EllipticCurvePrivateKey, ec.EllipticCurvePrivateKey]:
    """A device's KeyPackage, leaf key and DevID key; ``init_key`` for a joiner (assembled
    members get a throwaway one: no Welcome is sealed to them)."""
    signature_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    init = init_key or ec.generate_private_key(ec.SECP256R1())
    name = f"device-{i:05d}"
    kp = KeyPackage.create(
        name.encode(),
        signature_key,
        leaf_key.public_key(),
        devid_cert_der(name, signature_key),
        init_key=init.public_key(),
    )
    return kp, leaf_key, signature_key


class FullGroup:
    """A full group of ``n`` members, built with ``Group.assemble`` (module docstring)."""

    def __init__(self, n: int) -> None:
        self.n = n
        members = [_device(i) for i in range(n)]
        self.signature_keys = [s for _, _, s in members]
        self.leaf_keys = [leaf for _, leaf, _ in members]
        self.authz = os.urandom(AUTHORIZATION_BYTES)
        self.groups = Group.assemble(b"bench-group", members, epoch=1, authz=self.authz)
        self.public = self.groups[0].public_state

    def member(self, leaf: int) -> Group:
        return self.groups[leaf]


def _nearest(n: int, leaf: int, exclude: set[int]) -> int:
    others = [i for i in range(n) if i not in exclude]
    node = tm.leaf_to_node(leaf)
    return min(others, key=lambda i: tm.level(tm.common_ancestor(tm.leaf_to_node(i), node)))


def _measure(full: FullGroup, op: str, committer: int, target: int | None) -> dict[str, Any]:
    group = full.member(committer)
    sig = full.signature_keys[committer]
    joiner_init = ec.generate_private_key(ec.SECP256R1())
    joiner = _device(full.n, joiner_init) if op == "add" else None
    added = os.urandom(AUTHORIZATION_BYTES)
    start = time.perf_counter()
    if op == "update":
        result = group.update(sig, ec.generate_private_key(ec.SECP256R1()))
    elif joiner is not None:
        result = group.add(sig, [joiner[0]], authz=added)
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
    welcome: dict[str, Any] = {"welcome_bytes": None, "join_ms": None}
    if joiner is not None:
        assert result.welcome is not None
        welcome_bytes = result.welcome.encode()
        start = time.perf_counter()
        # past 256 members the Welcome carries the tree's hash only: the joiner's tree is the
        # one it would fetch in pages (docs/treekem.md, "Joining a large group")
        joined = Group.join(
            Welcome.decode(welcome_bytes),
            joiner[0],
            joiner[1],
            init_key=joiner_init,
            tree=result.group.tree,
            # what the service delivers with the Welcome or the pages (members keep none)
            admissions=[full.authz, added],
        )
        welcome["join_ms"] = round((time.perf_counter() - start) * 1000, 2)
        welcome["welcome_bytes"] = len(welcome_bytes)
        assert joined.epoch_authenticator == result.group.epoch_authenticator
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
        **welcome,
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
        full = FullGroup(n)
        full.public.tree.tree_hash()  # members keep subtree hashes cached between commits
        build_s = time.perf_counter() - t0
        target = rnd.randrange(n)
        near = PublicGroup(full.public).committer_for_remove(target)
        far = rnd.choice([i for i in range(n) if i != target])
        updater = rnd.randrange(n)
        adder = rnd.randrange(n)
        baseline = _baseline(full, near)
        runs = [
            ("remove", "nearest member (service's choice)", near, target),
            ("remove", "random member", far, target),
            ("update", "random member", updater, None),
            ("add", "random member", adder, None),
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
