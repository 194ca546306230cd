"""Full rekey (``keyfleet rekey --full``): every member's leaf key replaced, by Update proposals
that one member commits in batches (provisioning/service/fullrekey.py). Time per forced full
rekey, with the old way (one self-update commit per member, N commits) measured in the same run
as the baseline.

Not a test: prints a JSON list of records to stdout (progress to stderr).

Two parts:

1. **Through the service** (``FLEET_SIZES``): the sans-I/O delivery service
   (``DeliveryService``) on a SQLite file and N software members (tests/service_members.py: real
   MLS groups, signed envelopes, software leaf and DevID keys), the network a loop
   (tests/pure/test_service_core.py's ``Fleet``). Every member proposes, processes and acks
   serially in this one process. Recorded: wall time, commits (= epochs), the service's share,
   and one plain rekey in the same run.
2. **MLS at N = 1000** (``MLS_SIZES``), where building the group by N adds through the service
   (O(N^2) commit receptions in one process) is out of reach: the group is made in one step
   (``Group.assemble``, the state real adds reach) with software keys, and each step of a full
   rekey is timed where it runs: each member's proposal, the service's check of every proposal
   and of each commit (``PublicGroup.verify``), the committer's commit, and a member's
   processing of each commit (sampled members, one per batch and a few others, follow every
   commit). Members work in parallel in a fleet, so the time of a full rekey is the critical
   path: proposal round (one member's proposal + the service's checks of all N) + per commit
   (committer + service + one member). The old way is measured on the same group the same way:
   N self-update commits in bit-reversed order, each made by its member and processed by the
   sampled members, so its critical path is the sum of N rounds. Network and database time are
   not in part 2: part 1 and the fleet rekey latency bench (bench_rekey) carry them.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol.hpke import generate_key_pair
from agent.protocol.mls.group import Group
from agent.protocol.mls.messages import Commit, KeyPackage, Update
from agent.protocol.mls.public import PublicGroup
from agent.protocol.wire.messages.operator import Rekey
from agent.protocol.wire.messages.result import ResultStatus
from bench.servicetime import ServiceTime
from provisioning.service.fullrekey import BATCH
from provisioning.service.rekeypolicy import bit_reversed
from tests.device_certs import devid_cert_der
from tests.pure.test_service_core import Fleet, create_g1, make_fleet
from tests.service_members import command_id

FLEET_SIZES = (8, 32, 100)
MLS_SIZES = (100, 1000)
SAMPLED = 6  # members that follow every commit besides one per batch
OLD_WAY_ROUNDS = 100  # rounds of the old way measured; beyond, the median round is extrapolated


def _run(fleet: Fleet, timed: ServiceTime, *, full: bool) -> dict[str, float]:
    epoch = fleet.epoch("g1")
    timed.total = 0.0
    start = time.perf_counter()
    cid = fleet.command("op-alice", Rekey(command_id(), "g1", True if full else None))
    wall = time.perf_counter() - start
    result = fleet.final(cid)
    if result.status is not ResultStatus.DONE:
        raise RuntimeError(f"rekey ended {result.status}: {result.detail}")
    commits = fleet.epoch("g1") - epoch
    return {"wall_s": wall, "service_s": timed.total, "commits": commits}


def run(tmp: Path) -> list[dict[str, Any]]:
    rows = []
    for n in FLEET_SIZES:
        names = tuple(f"dev-{i:04d}" for i in range(n))
        (tmp / str(n)).mkdir()
        for fleet in make_fleet(tmp / str(n), names, rekey_max_age=0, rekey_max_epochs=0):
            print(f"N={n}: creating the group", file=sys.stderr, flush=True)
            create_g1(fleet)
            timed = ServiceTime(fleet.service, "handle", "tick")
            plain = [_run(fleet, timed, full=False) for _ in range(3)]
            full = _run(fleet, timed, full=True)
            one = statistics.median(p["wall_s"] for p in plain)
            print(f"N={n}: full {full['wall_s']:.2f}s for {full['commits']:.0f} commits, "
                  f"plain rekey {one * 1000:.0f} ms", file=sys.stderr, flush=True)  # fmt: skip
            rows.append({"n": n, "plain": plain, "full": full})
    return _records(rows)


def _records(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for row in rows:
        n, full = row["n"], row["full"]
        plain_s = statistics.median(p["wall_s"] for p in row["plain"])
        rounds = -(-(n - 1) // BATCH)
        out += [
            {"name": f"full_rekey_s_n{n}", "value": round(full["wall_s"], 3),
             "unit": "s, one process, every member serial", "target": None, "met": None},
            {"name": f"full_rekey_commits_n{n}", "value": int(full["commits"]),
             "unit": "commits (= epochs), after one proposal round",
             "target": rounds, "met": full["commits"] <= rounds},
            {"name": f"full_rekey_service_s_n{n}", "value": round(full["service_s"], 3),
             "unit": "s of service work (N proposals, the commits, N acks each)",
             "target": None, "met": None},
            {"name": f"full_rekey_vs_plain_rekey_n{n}", "value": round(full["wall_s"] / plain_s, 2),
             "unit": "x one plain rekey in the same run (the old way: about N x)",
             "target": None, "met": None},
        ]  # fmt: skip
    return out


# -- part 2: MLS at N = 1000 ------------------------------------------------------------------


class _Member:
    """A device with software keys: DevID, leaf key, its group state."""

    def __init__(self, i: int) -> None:
        self.device_id = f"dev-{i:04d}".encode()
        self.devid = ec.generate_private_key(ec.SECP256R1())
        self.leaf = ec.generate_private_key(ec.SECP256R1())
        self.kp = KeyPackage.create(
            self.device_id,
            self.devid,
            self.leaf.public_key(),
            devid_cert_der(self.device_id, self.devid),
            init_key=generate_key_pair().public_key(),
        )
        self.group: Group | None = None

    @property
    def g(self) -> Group:
        assert self.group is not None
        return self.group


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def _assemble(n: int) -> tuple[list[_Member], PublicGroup]:
    members = [_Member(i) for i in range(n)]
    states = Group.assemble(b"bench-full", [(m.kp, m.leaf, m.devid) for m in members], epoch=1)
    for m, g in zip(members, states, strict=True):
        m.group = g
    return members, members[0].g.public_group()


def _deliver(
    public: PublicGroup, commit: Commit, followers: list[_Member], keys: dict[bytes, Any]
) -> tuple[PublicGroup, float, list[float]]:
    """The service's check and the sampled members' processing of one commit."""
    data = commit.encode()
    start = time.perf_counter()
    verified = public.verify(Commit.decode(data))
    service_ms = _ms(start)
    process = []
    for m in followers:
        own = keys.get(m.device_id)
        start = time.perf_counter()
        m.group = m.g.process(commit, proposed_leaf_keys=[own] if own is not None else [])
        process.append(_ms(start))
    return PublicGroup(verified.next_state()), service_ms, process


def _by_updates(n: int) -> dict[str, Any]:
    members, public = _assemble(n)
    committer, others = members[0], members[1:]
    batches = [others[i : i + BATCH] for i in range(0, len(others), BATCH)]
    followers = [b[len(b) // 2] for b in batches]
    followers += [m for m in others[:: max(1, len(others) // SAMPLED)] if m not in followers]
    # proposal round: every member makes a key and signs its Update; the service checks each
    propose_ms, keys, updates = [], {}, []
    for m in others:
        start = time.perf_counter()
        key = ec.generate_private_key(ec.SECP256R1())
        updates.append(m.g.propose_update(m.devid, key.public_key()))
        propose_ms.append(_ms(start))
        keys[m.device_id] = key
    start = time.perf_counter()
    for update in updates:
        old = public.tree.leaf(update.leaf_index)
        assert old is not None
        Update.decode(update.encode()).leaf(old).verify(public.group_id, update.leaf_index)
    check_all_ms = _ms(start)
    rounds = []
    for i in range(0, len(updates), BATCH):
        start = time.perf_counter()
        result = committer.g.commit(
            committer.devid,
            updates=updates[i : i + BATCH],
            new_leaf_key=ec.generate_private_key(ec.SECP256R1()),
        )
        commit_ms = _ms(start)
        committer.group = result.group
        public, service_ms, process = _deliver(public, result.commit, followers, keys)
        rounds.append(
            {
                "commit_ms": commit_ms,
                "service_ms": service_ms,
                "process_ms": max(process),
                "bytes": len(result.commit.encode()),
            }
        )
    authenticators = {m.g.epoch_authenticator for m in [committer, *followers]}
    if len(authenticators) != 1:
        raise RuntimeError("the sampled members do not agree")
    # the next ordinary commits: the Updates blanked the parents off the committer's path
    after = []
    for m in followers[:3]:
        result = m.g.update(m.devid, ec.generate_private_key(ec.SECP256R1()))
        m.group = result.group
        rest = [f for f in [committer, *followers] if f is not m]
        public, _, _ = _deliver(public, result.commit, rest, {})
        after.append(len(result.commit.encode()))
    critical = (
        max(propose_ms)
        + check_all_ms
        + sum(r["commit_ms"] + r["service_ms"] + r["process_ms"] for r in rounds)
    )
    return {
        "critical_ms": critical,
        "propose_ms": statistics.median(propose_ms),
        "check_all_ms": check_all_ms,
        "rounds": rounds,
        "after_bytes": after,
    }


def _one_commit_each(n: int) -> dict[str, Any]:
    """The old way: N self-update commits, bit-reversed order, each by its own member. Only
    the committer of each round and the sampled followers hold a current state, so each
    committer is brought to the current epoch first (untimed: in a fleet it did that while
    the previous rounds ran). That catching up is O(rounds^2) here, so at most
    ``OLD_WAY_ROUNDS`` rounds are run and the rest counted at the median round (a round's cost
    hardly depends on how many came before: every commit re-keys one full-length path)."""
    members, public = _assemble(n)
    followers = members[:: max(1, n // SAMPLED)][:SAMPLED]
    log: list[Commit] = []
    rounds = []
    for index in bit_reversed(n)[:OLD_WAY_ROUNDS]:
        m = members[index]
        for commit in log[m.g.epoch - 1 :]:
            if commit.content.sender != m.g.own_leaf:
                m.group = m.g.process(commit)
        start = time.perf_counter()
        result = m.g.update(m.devid, ec.generate_private_key(ec.SECP256R1()))
        commit_ms = _ms(start)
        m.group = result.group
        log.append(result.commit)
        rest = [f for f in followers if f is not m]
        public, service_ms, process = _deliver(public, result.commit, rest, {})
        rounds.append(commit_ms + service_ms + max(process))
    median = statistics.median(rounds)
    return {
        "critical_ms": sum(rounds) + (n - len(rounds)) * median,
        "round_ms": median,
        "measured": len(rounds),
    }


def mls_records() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for n in MLS_SIZES:
        print(f"MLS N={n}: full rekey by Update proposals", file=sys.stderr, flush=True)
        new = _by_updates(n)
        print(f"MLS N={n}: the old way, {n} self-update commits", file=sys.stderr, flush=True)
        old = _one_commit_each(n)
        rounds = new["rounds"]
        out += [
            {"name": f"full_rekey_mls_critical_s_n{n}",
             "value": round(new["critical_ms"] / 1000, 2),
             "unit": "s critical path (software keys; members in parallel)",
             "target": None, "met": None,
             "detail": f"proposal round: one member {new['propose_ms']:.1f} ms, the service's "
                       f"checks of {n - 1} proposals {new['check_all_ms']:.0f} ms; "
                       + "; ".join(f"commit {i + 1}: committer {r['commit_ms']:.0f} ms, service "
                                   f"{r['service_ms']:.0f} ms, a member {r['process_ms']:.0f} ms,"
                                   f" {r['bytes']} bytes" for i, r in enumerate(rounds))},
            {"name": f"full_rekey_mls_commits_n{n}", "value": len(rounds),
             "unit": f"commits (batches of {BATCH}) + 1 proposal round",
             "target": None, "met": None},
            {"name": f"full_rekey_mls_max_commit_bytes_n{n}",
             "value": max(r["bytes"] for r in rounds), "unit": "bytes",
             "target": 256 * 1024, "met": max(r["bytes"] for r in rounds) <= 256 * 1024},
            {"name": f"full_rekey_mls_next_commit_bytes_n{n}", "value": new["after_bytes"][0],
             "unit": "bytes, first ordinary commit after the rekey",
             "target": None, "met": None,
             "detail": "the next three ordinary self-updates: "
                       + ", ".join(str(b) for b in new["after_bytes"])},
            {"name": f"full_rekey_mls_old_way_critical_s_n{n}",
             "value": round(old["critical_ms"] / 1000, 2),
             "unit": f"s critical path of {n} self-update commits (baseline, same run)",
             "target": None, "met": None,
             "detail": f"median round {old['round_ms']:.1f} ms (committer + service + a "
                       f"member), {old['measured']} of {n} rounds measured, the rest counted at "
                       "the median"},
            {"name": f"full_rekey_mls_speedup_n{n}",
             "value": round(old["critical_ms"] / new["critical_ms"], 1),
             "unit": "x (old way / Update proposals), critical path", "target": None,
             "met": None},
        ]  # fmt: skip
    return out


def main() -> int:
    records = mls_records()
    with tempfile.TemporaryDirectory(prefix="kf-bench-full-rekey-") as tmp:
        records += run(Path(tmp))
    print(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
