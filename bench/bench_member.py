"""A member's side of a commit at fleet scale: what ``Group.process`` costs a device in a group
of 1,000, 10,000 and 100,000 members, and what saving the agent's state after it costs
(docs/bench/README.md, "A member's commit processing").

Not a test: prints a JSON list of records to stdout (progress to stderr).
``python -m bench.bench_member [N ...]`` (default 1,000, 10,000 and 100,000; building the
100,000-member group takes about five minutes).

For each N, a full group built with ``Group.assemble`` (software keys, every leaf with its DevID
certificate, all admitted by one creation Authorization), then from the same epoch ``COMMITS``
self-update commits (an UpdatePath re-keying the committer's whole filtered direct path, the
commit a rekey asks for), each by another member spread over the tree, and ``COMMITS`` removes
(each by another member, of another leaf, with its Authorization). One member (leaf 0) processes
each of them (``Group.process``: every public check, the path secret's decryption, the key
schedule, the confirmation tag): the figure is the median, against the ≤ 50 ms target at
100,000.

Then what the agent writes after a processed commit, as ``agent.daemon`` does: the group's
``to_state(inline_tree=False)`` in the agent's state map, saved by ``agent.statefile.StateFile``
with its ``agent.treestore.TreeStore`` (the changed nodes appended to the tree journal with
fsync, then the state file: CBOR, AES-256-GCM, temp file, fsync, rename, fsync of the directory)
in a temporary directory. The first save writes the tree's snapshot (timed apart); then the save
after the processed commit and after ``SAVES - 1`` self-updates of the same member, each timed
(``to_state`` and the save; the save's CPU time apart, the rest being its three fsyncs) with
the bytes written (journal record and state file). The rest of
the agent's state (sequence numbers, key records, replay window) is small and left out. Last,
the status file the agent writes after each save (``status.json``: a group's members listed up
to ``agent.core.STATUS_MEMBERS``, its member count past it), its group part alone.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from agent.core import STATUS_MEMBERS
from agent.fsio import atomic_write
from agent.protocol.mls import tree_math as tm
from agent.protocol.mls.group import Group
from agent.protocol.mls.messages import Commit
from agent.protocol.secret import Secret
from agent.statefile import StateFile
from agent.treestore import TreeStore
from bench.bench_scale import _commit_members, progress

SIZES = (1_000, 10_000, 100_000)
COMMITS = 9  # commits of each kind per size
SAVES = 9
TARGET_MS = 50.0
CREATE_AUTHZ = b"bench: creation authorization"


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def _timed_process(member: Group, commits: list[Commit]) -> list[float]:
    times = []
    for commit in commits:
        start = time.perf_counter()
        after = member.process(commit)
        times.append(_ms(start))
        assert after.epoch == member.epoch + 1
    return times


def records(directory: Path, n: int) -> list[dict[str, Any]]:
    begin = time.monotonic()
    members = _commit_members(n)
    groups = Group.assemble(b"g-member", members, epoch=1, authz=CREATE_AUTHZ)
    progress(f"N={n}: group assembled in {time.monotonic() - begin:.0f} s")
    member = groups[0]
    step = max(1, (n - 1) // COMMITS)
    committers = [min(n - 1, 1 + k * step) for k in range(COMMITS)]
    updates = [
        groups[i].update(members[i][2], ec.generate_private_key(ec.SECP256R1())).commit
        for i in committers
    ]
    # each remover removes the leaf just left of it (never leaf 0, the processing member)
    removes = [
        groups[i].remove(members[i][2], [i - 1 if i > 1 else i + 1], authz=b"remove %d" % i).commit
        for i in committers
    ]
    del groups
    update_ms = _timed_process(member, updates)
    remove_ms = _timed_process(member, removes)
    after = member.process(updates[0])
    trees = TreeStore(directory / "tree")
    state = StateFile(directory / "state", Secret(os.urandom(32)), trees=trees)
    start = time.perf_counter()
    state.save({"groups": {"g": {"group": member.to_state(inline_tree=False), "pending": []}}})
    first_ms = _ms(start)
    first_bytes = trees.bytes_written + state.bytes_written
    to_state_ms, save_ms, save_cpu_ms, saved_bytes = [], [], [], []
    signer = members[0][2]
    for k in range(SAVES):
        if k:  # further commits: the member's own self-updates
            after = after.update(signer, ec.generate_private_key(ec.SECP256R1())).group
        written = trees.bytes_written
        start = time.perf_counter()
        agent_state = {"groups": {"g": {"group": after.to_state(inline_tree=False), "pending": []}}}
        to_state_ms.append(_ms(start))
        start, cpu = time.perf_counter(), time.process_time()
        state.save(agent_state)
        save_ms.append(_ms(start))
        save_cpu_ms.append((time.process_time() - cpu) * 1000)
        saved_bytes.append(trees.bytes_written - written + state.bytes_written)
    size = state.path.stat().st_size
    status_ms = []
    for _ in range(SAVES):  # the status file written after each save: members or their count
        start = time.perf_counter()
        count = after.tree.member_count()
        listed = sorted(d.decode() for _, d in after.members()) if count <= STATUS_MEMBERS else None
        status = {"groups": [{"member_count": count, "members": listed}]}
        atomic_write(directory / "status.json", json.dumps(status, indent=2).encode())
        status_ms.append(_ms(start))
    update = statistics.median(update_ms)
    persist = (
        statistics.median(to_state_ms) + statistics.median(save_ms) + statistics.median(status_ms)
    )
    progress(
        f"N={n}: process update {[round(t, 2) for t in update_ms]} ms, remove "
        f"{[round(t, 2) for t in remove_ms]} ms; first save {first_ms:.0f} ms, {first_bytes} "
        f"bytes; to_state {[round(t, 2) for t in to_state_ms]} ms, save "
        f"{[round(t, 2) for t in save_ms]} ms (CPU {[round(t, 2) for t in save_cpu_ms]} ms), "
        f"{saved_bytes} bytes, state file {size} bytes; "
        f"status {[round(t, 2) for t in status_ms]} ms"
    )
    at_target = n == 100_000
    common = {
        "update_ms": [round(t, 2) for t in update_ms],
        "remove_ms": [round(t, 2) for t in remove_ms],
        "remove_median_ms": round(statistics.median(remove_ms), 2),
        "state_to_state_ms": round(statistics.median(to_state_ms), 2),
        "state_save_ms": round(statistics.median(save_ms), 2),
        "state_save_ms_all": [round(t, 2) for t in save_ms],
        "state_save_cpu_ms": round(statistics.median(save_cpu_ms), 2),
        "state_save_bytes": round(statistics.median(saved_bytes)),
        "state_save_bytes_max": max(saved_bytes),
        "state_file_bytes": size,
        "first_save_ms": round(first_ms, 1),
        "first_save_bytes": first_bytes,
        "status_write_ms": round(statistics.median(status_ms), 2),
        "members": n,
        "path_length": tm.log2(n - 1) + 1 if n > 1 else 0,
    }
    return [
        {
            "name": f"member_process_ms_{n // 1000}k",
            "value": round(update, 2),
            "unit": f"ms (median of {COMMITS} self-update commits, each by another member, "
            f"processed by one member of a group of {n} with Group.process; software keys)",
            "target": TARGET_MS if at_target else None,
            "met": update <= TARGET_MS if at_target else None,
            **common,
        },
        {
            "name": f"member_process_and_save_ms_{n // 1000}k",
            "value": round(update + persist, 1),
            "unit": f"ms (the same commit processed, then the agent's state holding the group "
            f"of {n} saved: to_state, the changed nodes appended to the tree journal with fsync, "
            "the state file (CBOR, AES-256-GCM, atomic write with fsync); then the status file)",
            "target": TARGET_MS if at_target else None,
            "met": update + persist <= TARGET_MS if at_target else None,
            **common,
        },
    ]


def main() -> None:
    sizes = tuple(int(a) for a in sys.argv[1:]) or SIZES
    out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kf-bench-member-") as tmp:
        for n in sizes:
            (Path(tmp) / str(n)).mkdir()
            out += records(Path(tmp) / str(n), n)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
