"""Full rekey (``keyfleet rekey --full``): every member replaces its own leaf key, one solicited
commit each. Time per forced full rekey for N members, against one plain rekey in the same run.

Not a test: prints a JSON list of records to stdout (progress to stderr).

In one process: the sans-I/O delivery service (``DeliveryService``) on a SQLite file and N
software members (tests/service_members.py: real MLS groups, signed envelopes, software leaf
and DevID keys), the network a loop (tests/pure/test_service_core.py's ``Fleet``). Every member
processes and acks every commit, so the whole run is O(N^2) member work done serially here;
in a real fleet the members work in parallel, so the figure that carries over is the critical
path per round: ``service_ms_per_round`` (the service's own work per commit) plus one member's
commit and one member's processing. Recorded per N: wall time, commits, epochs, the service's
share, and the same for one plain rekey (the baseline: N of them would be the naive way).

N = 1000 is not run here: it is ~10^6 commit receptions in one process (hours); the critical
path per round measured at N = 100 and the commit process time at N = 1024 (bench_commit) give
the estimate written in docs/bench/README.md.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.protocol.wire.messages.operator import Rekey
from agent.protocol.wire.messages.result import ResultStatus
from provisioning.service.core import DeliveryService
from tests.pure.test_service_core import Fleet, create_g1, make_fleet
from tests.service_members import command_id

SIZES = tuple(int(a) for a in sys.argv[1:]) or (8, 32, 100)


class _Timed:
    """Wraps the service's entry points to add up the time spent inside them."""

    def __init__(self, service: DeliveryService) -> None:
        self.total = 0.0
        self._handle = service.handle
        self._tick = service.tick
        service.handle = self.handle  # type: ignore[method-assign]
        service.tick = self.tick  # type: ignore[method-assign]

    def handle(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self._handle(*args, **kwargs)
        finally:
            self.total += time.perf_counter() - start

    def tick(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self._tick(*args, **kwargs)
        finally:
            self.total += time.perf_counter() - start


def _run(fleet: Fleet, timed: _Timed, *, full: bool) -> dict[str, float]:
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
    for n in SIZES:
        names = tuple(f"dev-{i:04d}" for i in range(n))
        (tmp / str(n)).mkdir()
        for fleet in make_fleet(tmp / str(n), names, rekey_max_age=0, rekey_max_epochs=0):
            print(f"N={n}: creating the group", file=sys.stderr, flush=True)
            create_g1(fleet)
            timed = _Timed(fleet.service)
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
        out += [
            {"name": f"full_rekey_s_n{n}", "value": round(full["wall_s"], 3),
             "unit": "s, one process, every member serial", "target": None, "met": None},
            {"name": f"full_rekey_commits_n{n}", "value": int(full["commits"]),
             "unit": "commits (= epochs = rounds)", "target": n, "met": full["commits"] == n},
            {"name": f"full_rekey_service_ms_per_round_n{n}",
             "value": round(full["service_s"] * 1000 / full["commits"], 2),
             "unit": "ms of service work per commit", "target": None, "met": None},
            {"name": f"full_rekey_vs_plain_rekeys_n{n}",
             "value": round(full["wall_s"] / (n * plain_s), 2),
             "unit": "x the time of N plain rekeys in the same run", "target": None,
             "met": None},
        ]  # fmt: skip
    return out


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="kf-bench-full-rekey-") as tmp:
        print(json.dumps(run(Path(tmp)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
