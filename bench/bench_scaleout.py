"""Several ``keyfleet serve`` instances on this machine: device reports handled per second with 1
and with 2 instances, and fleet rekey latency at N = 1000 virtual devices with 1 and then 2
instances in the same run (same broker, same database, same fleet).

Not a test: prints a JSON list of records to stdout (progress to stderr).

Setup: bench/deployment.py (Mosquitto with mutual TLS and the product ACL, ``keyfleet serve``
with its SQLite registry, one admin operator); the second instance is another ``keyfleet serve``
process with the same configuration but ``instance = "bench-2"``.

Reports/s: a virtual fleet of ``REPORT_DEVICES`` devices (agent cores with software keys, one
MQTT connection each, all in this process) publishes ``REPORTS_PER_DEVICE`` signed
``keys.report`` messages each, as fast as paho sends them; the figure is reports / (time from
the first publish until the service's replay state shows every device's last sequence number).
Every report is verified (COSE signature), replay-checked and written (replay state, key
states, last_seen) in its own transaction.

Both on SQLite (the default file) and on PostgreSQL (Debian's server started from its binaries
on a free port with a temporary data directory, tests/fixtures/postgres.py).

Rekey: as bench_rekey.py at N = 1000 (the group seeded by the fleet, the rekeys through the real
service): ``ROUNDS`` rekeys with one instance, then the second instance starts and ``ROUNDS``
more run with both.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.bench_rekey import _timed_rekey, _wait_reports
from bench.deployment import Deployment, deployment
from firmware_sim.fleet import VirtualFleet, load_fleet_config, open_registry
from provisioning.operator import OperatorClient
from tests.fixtures.postgres import PostgresServer
from tests.service_deployment import start_serve, stop_processes

REPORT_DEVICES = 200
REPORTS_PER_DEVICE = 10
REKEY_N = 1000
ROUNDS = 3
GROUP = "bench"
READY_TIMEOUT = 60.0


@contextmanager
def _instance(dep: Deployment, name: str) -> Iterator[subprocess.Popen[bytes]]:
    """Another ``keyfleet serve`` on the deployment's database and broker."""
    text = dep.service_config.read_text().replace('instance = "bench"', f'instance = "{name}"')
    config = dep.workdir / f"keyfleet-{name}.toml"
    config.write_text(text)
    log = dep.workdir / f"serve-{name}.log"
    process = start_serve(config, cwd=dep.workdir, log=log, timeout=READY_TIMEOUT)
    try:
        yield process
    finally:
        stop_processes([process])


def _highest_seqs(dep: Deployment, ids: list[str]) -> dict[str, int]:
    from provisioning.service import store  # noqa: PLC0415

    engine, sessions = open_registry(dep.db_url)
    try:
        with sessions() as session:
            found = {}
            for device_id in ids:
                seq = store.load_guard(session, device_id).highest_seq(device_id)
                found[device_id] = -1 if seq is None else seq
            return found
    finally:
        engine.dispose()


def _reports_per_second(dep: Deployment, fleet: VirtualFleet) -> dict[str, Any]:
    """Publish REPORTS_PER_DEVICE keys.reports from every device; time until all are handled."""
    now = int(time.time())
    batches = {}
    targets: dict[str, int] = {}
    with fleet.lock:
        for device in fleet.devices:
            batches[device.device_id] = [
                p for _ in range(REPORTS_PER_DEVICE) for p in device.report(now)
            ]
            # the last seq spent: next_seq is the one the next envelope will carry
            targets[device.device_id] = device.core.next_seq - 1
    start = time.perf_counter()
    for device_id, publishes in batches.items():
        fleet.send(device_id, publishes)
    total = sum(len(b) for b in batches.values())
    deadline = time.monotonic() + 600
    ids = list(batches)
    while True:
        seen = _highest_seqs(dep, ids)
        done = sum(1 for d in ids if seen[d] >= targets[d])
        if done == len(ids):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {done}/{len(ids)} devices' reports handled in 600 s")
        time.sleep(0.1)
    elapsed = time.perf_counter() - start
    return {"reports": total, "seconds": round(elapsed, 2), "per_second": round(total / elapsed, 1)}


def run_reports(workdir: Path, db_url: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with deployment(workdir, db_url=db_url) as dep:
        fleet = VirtualFleet.from_config(
            load_fleet_config(dep.fleet_config), REPORT_DEVICES, allow_insecure=True
        )
        fleet.start(timeout=300)
        try:
            _wait_reports(dep, fleet, timeout=300)
            out["one"] = _reports_per_second(dep, fleet)
            print(f"reports, 1 instance: {out['one']}", file=sys.stderr)
            with _instance(dep, "bench-2"):
                time.sleep(1.0)  # the broker now splits the shared subscription
                out["two"] = _reports_per_second(dep, fleet)
                print(f"reports, 2 instances: {out['two']}", file=sys.stderr)
        finally:
            fleet.stop()
    return out


def _rekeys(dep: Deployment, fleet: VirtualFleet, epoch: int) -> tuple[list[float], int]:
    latencies = []
    with OperatorClient(dep.operator) as client:
        for _ in range(ROUNDS):
            start, _, end = _timed_rekey(client)
            epoch += 1
            fleet.wait_epoch(GROUP, epoch, timeout=120)
            latencies.append(round(end - start, 3))
            print(f"rekey n={REKEY_N}: {latencies[-1]} s", file=sys.stderr)
    return latencies, epoch


def run_rekey(workdir: Path, db_url: str | None) -> dict[str, Any]:
    with deployment(workdir, ack_timeout=300, db_url=db_url) as dep:
        fleet = VirtualFleet.from_config(
            load_fleet_config(dep.fleet_config), REKEY_N, allow_insecure=True
        )
        engine, sessions = open_registry(dep.db_url)
        fleet.seed_group(GROUP, sessions, now=int(time.time()))
        engine.dispose()
        fleet.start(timeout=600)
        try:
            _wait_reports(dep, fleet, timeout=600)
            one, epoch = _rekeys(dep, fleet, 1)
            with _instance(dep, "bench-2"):
                time.sleep(1.0)
                two, epoch = _rekeys(dep, fleet, epoch)
        finally:
            fleet.stop()
    return {"one": one, "two": two}


@contextmanager
def _workdir() -> Iterator[Path]:
    """A temporary directory, or a kept one under $BENCH_KEEP_DIR (to read the logs after)."""
    keep = os.environ.get("BENCH_KEEP_DIR")
    if keep:
        path = Path(tempfile.mkdtemp(dir=keep))
        print(f"workdir kept: {path}", file=sys.stderr)
        yield path
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


def main() -> None:
    """``python -m bench.bench_scaleout [REPORT_DEVICES [REKEY_N]]`` (smaller for a quick look)."""
    global REPORT_DEVICES, REKEY_N  # noqa: PLW0603 - command-line override of the sizes
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    if len(sys.argv) > 1:
        REPORT_DEVICES = int(sys.argv[1])
    if len(sys.argv) > 2:
        REKEY_N = int(sys.argv[2])
    cores = os.cpu_count()
    results: dict[str, dict[str, Any]] = {}
    postgres = PostgresServer()
    postgres.start()
    try:
        for backend in ("sqlite", "postgresql"):
            with _workdir() as tmp:
                url = postgres.create_database() if backend == "postgresql" else None
                print(f"== {backend}: reports", file=sys.stderr)
                reports = run_reports(tmp, url)
            with _workdir() as tmp:
                url = postgres.create_database() if backend == "postgresql" else None
                print(f"== {backend}: rekey n={REKEY_N}", file=sys.stderr)
                rekey = run_rekey(tmp, url)
            results[backend] = {"reports": reports, "rekey": rekey}
    finally:
        postgres.stop()
    records = []
    for backend, found in results.items():
        reports, rekey = found["reports"], found["rekey"]
        one, two = reports["one"]["per_second"], reports["two"]["per_second"]
        suffix = "" if backend == "sqlite" else "_postgresql"
        records += [
            {
                "name": f"reports_per_second_1_instance{suffix}",
                "value": one,
                "unit": "device reports/s (keys.report, verified and written)",
                "target": None,
                "met": None,
                "detail": f"{reports['one']['reports']} reports from {REPORT_DEVICES} devices; "
                f"{cores} CPU cores shared with broker, fleet and database; {backend}",
                "run": reports["one"],
            },
            {
                "name": f"reports_per_second_2_instances{suffix}",
                "value": two,
                "unit": "device reports/s (keys.report, verified and written)",
                "target": None,
                "met": None,
                "detail": f"x{two / one:.2f} of one instance; same machine ({cores} cores); "
                f"{backend}",
                "run": reports["two"],
            },
            {
                "name": f"rekey_latency_n{REKEY_N}_1_instance{suffix}",
                "value": statistics.median(rekey["one"]),
                "unit": "s (median, command to every ack)",
                "target": None,
                "met": None,
                "detail": f"{ROUNDS} rekeys: {rekey['one']}; {backend}",
            },
            {
                "name": f"rekey_latency_n{REKEY_N}_2_instances{suffix}",
                "value": statistics.median(rekey["two"]),
                "unit": "s (median, command to every ack)",
                "target": None,
                "met": None,
                "detail": f"{ROUNDS} rekeys in the same run after the second instance joined: "
                f"{rekey['two']}; {backend}",
            },
        ]
    print(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
