"""``make bench``: run every benchmark, print each figure beside its target, write
docs/bench/results.json (a list of {"name", "value", "unit", "target", "met"}), each
benchmark's full output under docs/bench/raw/, and the PNG plots (commit_accept.png from the
saved output of ``python -m bench.bench_scale commit``, raw/bench_scale_commit.json, which make
bench does not run).

Each benchmark is its own process (``python -m bench.<name>``, JSON on stdout) so that one
cannot disturb another's timing or memory, and a failing one is reported without losing the
others. Benchmarks are never tests: nothing here asserts a target; a miss is a figure.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "bench"
RAW = OUT / "raw"
BENCHES = (
    "bench_commit",
    "bench_tpm_commit",
    "bench_attestation",
    "bench_enroll",
    "bench_agent",
    "bench_rekey",
    "bench_dashboard",
    "bench_scaleout",
    "bench_revoke_broker",
    "bench_token",
    "bench_full_rekey",
    "bench_wedge",
    "bench_scale",
    "bench_rekey_tick",
    "bench_member",
    "bench_server_wrap",
    "bench_device_messages",
)
AT_LEAST = {
    "attestation_verify_per_core",
    "commit_vs_baseline_ratio_n1024",
    "server_wrap_published_ratio_n1k",
    "server_wrap_published_ratio_n10k",
    "server_wrap_delivered_ratio_n1k",
    "server_wrap_delivered_ratio_n10k",
}
COMMIT_N = 1024
COMMIT_BYTES_TARGET = 2500
COMMIT_RATIO_TARGET = 40.0
WELCOME_BYTES_LIMIT = 4 << 20  # the wire limit of a Welcome message (docs/treekem.md)
REKEY_TARGET_S = 3.0
FIELDS = ("name", "value", "unit", "target", "met")


def run_bench(name: str) -> Any:
    print(f"== {name}", file=sys.stderr, flush=True)
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{name}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    print(f"== {name}: {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} exited with {done.returncode}")
    return json.loads(done.stdout)


def commit_records(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """bench_commit prints one row per (N, operation); the figures the issue names."""
    near = next(
        r
        for r in rows
        if r["n"] == COMMIT_N
        and r["op"] == "remove"
        and r["committer_choice"].startswith("nearest")
    )
    update = next(r for r in rows if r["n"] == COMMIT_N and r["op"] == "update")
    add = next(r for r in rows if r["n"] == COMMIT_N and r["op"] == "add")
    return [
        {
            "name": f"commit_bytes_remove_n{COMMIT_N}",
            "value": near["commit_bytes"],
            "unit": "bytes",
            "target": COMMIT_BYTES_TARGET,
            "met": near["commit_bytes"] <= COMMIT_BYTES_TARGET,
        },
        {
            "name": f"commit_vs_baseline_ratio_n{COMMIT_N}",
            "value": near["ratio"],
            "unit": "x smaller than the pairwise-wrap baseline",
            "target": COMMIT_RATIO_TARGET,
            "met": near["ratio"] >= COMMIT_RATIO_TARGET,
        },
        {
            "name": f"commit_create_ms_remove_n{COMMIT_N}",
            "value": near["create_ms"],
            "unit": "ms",
            "target": None,
            "met": None,
        },
        {
            "name": f"commit_process_ms_remove_n{COMMIT_N}",
            "value": near["process_ms"],
            "unit": "ms",
            "target": None,
            "met": None,
        },
        {
            "name": f"commit_bytes_update_n{COMMIT_N}",
            "value": update["commit_bytes"],
            "unit": "bytes",
            "target": None,
            "met": None,
        },
        {
            "name": f"commit_process_ms_update_n{COMMIT_N}",
            "value": update["process_ms"],
            "unit": "ms",
            "target": None,
            "met": None,
        },
        {
            "name": f"commit_bytes_add_n{COMMIT_N}",
            "value": add["commit_bytes"],
            "unit": "bytes (one KeyPackage with its certificate, a 2 KiB Authorization)",
            "target": None,
            "met": None,
        },
        {
            "name": f"commit_process_ms_add_n{COMMIT_N}",
            "value": add["process_ms"],
            "unit": "ms",
            "target": None,
            "met": None,
        },
        {
            "name": f"welcome_bytes_n{COMMIT_N}",
            "value": add["welcome_bytes"],
            "unit": "bytes (every leaf with its DevID certificate)",
            "target": WELCOME_BYTES_LIMIT,
            "met": add["welcome_bytes"] <= WELCOME_BYTES_LIMIT,
        },
        {
            "name": f"welcome_join_ms_n{COMMIT_N}",
            "value": add["join_ms"],
            "unit": "ms (every leaf signature and parent hash checked)",
            "target": None,
            "met": None,
        },
    ]


def show(record: dict[str, Any]) -> str:
    target = record["target"]
    if target is None:
        goal, verdict = "", ""
    else:
        sign = ">=" if record["name"] in AT_LEAST else "<="
        goal = f"   target {sign} {target}"
        verdict = "   MET" if record["met"] else "   MISSED"
    return f"{record['name']:<46} {record['value']} {record['unit']}{goal}{verdict}"


# -- plots -----------------------------------------------------------------------------------------


def plot_commit(rows: list[dict[str, Any]]) -> None:
    import matplotlib  # noqa: PLC0415 - the bench extra; only make bench needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    def series(op: str, who: str, key: str) -> tuple[list[int], list[float]]:
        picked = [r for r in rows if r["op"] == op and r["committer_choice"].startswith(who)]
        return [r["n"] for r in picked], [r[key] for r in picked]

    fig, ax = plt.subplots(figsize=(8, 5.5))
    ns, size = series("remove", "nearest", "commit_bytes")
    ax.plot(ns, size, "o-", label="TreeKEM remove (service's committer)")
    ns2, size2 = series("remove", "random", "commit_bytes")
    ax.plot(ns2, size2, "s--", label="TreeKEM remove (random committer)")
    ns3, size3 = series("update", "random", "commit_bytes")
    ax.plot(ns3, size3, "^-", label="TreeKEM self-update")
    nb, base = series("remove", "nearest", "baseline_bytes")
    ax.plot(nb, base, "k:", marker="x", label="baseline: group key wrapped to each member")
    ax.plot(
        [COMMIT_N],
        [COMMIT_BYTES_TARGET],
        marker="*",
        color="red",
        markersize=14,
        linestyle="none",
        label=f"target: remove at N={COMMIT_N} <= {COMMIT_BYTES_TARGET} B",
    )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("group size N (members)")
    ax.set_ylabel("commit size (bytes, CBOR)")
    ax.set_title("Commit bytes vs group size, against the pairwise-wrap baseline")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT / "commit_bytes.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for op, who, key, style, label in (
        ("remove", "nearest", "create_ms", "o-", "create: remove (service's committer)"),
        ("remove", "nearest", "process_ms", "o--", "process: remove (nearest receiver)"),
        ("update", "random", "create_ms", "^-", "create: self-update"),
        ("update", "random", "process_ms", "^--", "process: self-update (nearest receiver)"),
        ("remove", "nearest", "baseline_create_ms", "k:", "baseline: wrap the key N-1 times"),
    ):
        ns, values = series(op, who, key)
        pairs = [(n, v) for n, v in zip(ns, values, strict=True) if v is not None]
        ax.plot([p[0] for p in pairs], [p[1] for p in pairs], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("group size N (members)")
    ax.set_ylabel("time (ms, one core, software keys)")
    ax.set_title("Commit create / process time vs group size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT / "commit_time.png", dpi=110)
    plt.close(fig)


def plot_rekey(records: list[dict[str, Any]]) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    runs = sorted((r["run"] for r in records if "run" in r), key=lambda run: run["n"])
    if not runs:
        return
    ns = [run["n"] for run in runs]
    median = [run["median_s"] for run in runs]
    low = [run["median_s"] - run["min_s"] for run in runs]
    high = [run["max_s"] - run["median_s"] for run in runs]
    devices = [run["median_last_device_ack_s"] for run in runs]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.errorbar(
        ns, median, yerr=[low, high], fmt="o-", capsize=4, label="command -> every ack (service)"
    )
    ax.plot(ns, devices, "s--", label="command -> last device sent its ack")
    ax.axhline(
        REKEY_TARGET_S,
        color="red",
        linestyle=":",
        label=f"target: <= {REKEY_TARGET_S} s at N = 1000",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("virtual devices in the group (N)")
    ax.set_ylabel("rekey latency (s, median; bars: min..max)")
    ax.set_title("Fleet rekey latency vs N (Mosquitto + keyfleet serve, 2 cores)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT / "rekey_latency.png", dpi=110)
    plt.close(fig)


SCALE_COMMIT_RAW = "bench_scale_commit.json"
"""``python -m bench.bench_scale commit``'s output, saved by hand (not in ``make bench``: building
the groups of up to 100,000 members takes minutes)."""
BEFORE_NODE_ROWS_MS = {1_000: 170.0, 10_000: 1_850.0, 100_000: 18_400.0}
"""Accepting a commit when every commit decoded, hashed and re-encoded the whole tree (measured
before the node-row store and the in-memory group): O(N)."""
COMMIT_ACCEPT_TARGET = (100_000, 10.0)


def plot_commit_accept(rows: list[dict[str, Any]]) -> None:
    """Service time per commit vs N (``commit_accept.png``) against an O(log N) line: c log2 N
    through the measured time at the smallest N."""
    import math  # noqa: PLC0415

    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = sorted((r for r in rows if "members" in r), key=lambda r: r["members"])
    if not rows:
        return
    ns = [r["members"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    flow = [r["value"] for r in rows]
    ax.plot(ns, flow, "o-", label="service: commit flow, median per commit (SQLite)")
    with_commit = [r["with_db_commit_ms"] for r in rows]
    ax.plot(ns, with_commit, "o:", label="same, with the transaction's commit (fsync)")
    if all("cpu_ms" in r for r in rows):
        cpu = [r["cpu_ms"] for r in rows]
        ax.plot(ns, cpu, "D-", label="same, its CPU time (less bound to the machine's load)")
    checks = [r["mls_verify_ms"] for r in rows]
    ax.plot(ns, checks, "^-", label="of which the MLS public checks")
    line = [ns[0] * 0.8, ns[-1] * 1.25]
    for first, style, what in ((flow[0], "k--", "flow"), (checks[0], "k:", "checks")):
        c = first / math.log2(ns[0])
        ax.plot(line, [c * math.log2(n) for n in line], style, linewidth=1,
                label=f"O(log N): c log2 N through the {what} at N = {ns[0]:,}")  # fmt: skip
    before = sorted(BEFORE_NODE_ROWS_MS.items())
    ax.plot([n for n, _ in before], [v for _, v in before], "s--", color="grey",
            label="before (whole tree decoded and re-encoded per commit): O(N)")  # fmt: skip
    n_target, ms_target = COMMIT_ACCEPT_TARGET
    ax.plot([n_target], [ms_target], marker="*", color="red", markersize=14, linestyle="none",
            label=f"target: <= {ms_target:g} ms at N = {n_target:,}")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(ns, [f"{n:,}" for n in ns])
    ax.set_xlabel("group size N (members)")
    ax.set_ylim(0.5, 4e5)  # room for the legend above the lines
    ax.set_ylabel("service time per accepted commit (ms)")
    ax.set_title("Commit acceptance at the service vs group size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "commit_accept.png", dpi=110)
    plt.close(fig)


def replot() -> int:
    """Redraw the plots from the raw outputs of the last run (``--plots-only``)."""
    plot_commit(json.loads((RAW / "bench_commit.json").read_text()))
    plot_rekey(json.loads((RAW / "bench_rekey.json").read_text()))
    plot_scale_commit()
    return 0


def plot_scale_commit() -> None:
    if (RAW / SCALE_COMMIT_RAW).exists():
        plot_commit_accept(json.loads((RAW / SCALE_COMMIT_RAW).read_text()))


def main() -> int:
    if sys.argv[1:] == ["--plots-only"]:
        return replot()
    only = sys.argv[1:] or list(BENCHES)
    RAW.mkdir(parents=True, exist_ok=True)
    results_path = OUT / "results.json"
    previous: dict[str, dict[str, Any]] = {}
    if only != list(BENCHES) and results_path.exists():
        previous = {r["name"]: r for r in json.loads(results_path.read_text())}
    records: list[dict[str, Any]] = []
    failed = []
    for name in only:
        try:
            output = run_bench(name)
        except (RuntimeError, json.JSONDecodeError) as exc:
            print(f"== {name} FAILED: {exc}", file=sys.stderr)
            failed.append(name)
            continue
        (RAW / f"{name}.json").write_text(json.dumps(output, indent=1) + "\n")
        if name == "bench_commit":
            plot_commit(output)
            records.extend(commit_records(output))
        else:
            if name == "bench_rekey":
                plot_rekey(output)
            if name == "bench_scale":
                plot_scale_commit()
            records.extend(output)
    merged = {**previous, **{r["name"]: r for r in records}}
    results = [{k: r[k] for k in FIELDS} for r in merged.values()]
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    print("\nfigure                                         value   target   verdict")
    for record in results:
        print(show(record))
    print(f"\nwrote {results_path.relative_to(ROOT)} and the plots in {OUT.relative_to(ROOT)}")
    if failed:
        print(f"FAILED benchmarks: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
