"""Group creation at scale: ``keyfleet group create`` of N real members (many adds per commit,
``provisioning.service.bulkadd``) against the single-add path, through a real Mosquitto and a
real ``keyfleet serve`` (docs/bench/README.md, "Fleet scale").

Not a test: prints a JSON list of records to stdout (progress to stderr).

Per run, a fresh installation (bench/deployment.py) and a virtual fleet of N devices
(firmware_sim.fleet: agent protocol cores with SOFTWARE keys, one MQTT connection each, all in
this process, as bench/bench_rekey.py); every device's start-up report is processed before the
clock starts. Then, timed from the proposal to the service's final ``done`` (every member acked
the same epoch):

- ``multi``: one ``group.create`` request naming all N founders (propose and approve, the bench
  quorum is one operator): the creator founds the group, the others join many per commit, and
  (16 or more joiners) their first updates come as proposals in one more commit or two;
- ``single``: the same N devices by the single-add path: a ``group.create`` of one founder,
  then one ``group.add`` request per other device, one after the other, each its own commit
  every member processes; the joiners' own first self-updates are left out of the figure
  (they are not needed for ``done``), so it flatters the single-add path.

Recorded: the wall time (the devices' work included: all N cores share this one process and
the machine's 2 cores with the service and the broker) and the service's own CPU time over the
same span (user + system of the ``keyfleet serve`` process, from /proc), which is what the
"≤ 10 s of service time" target is about; the commits the group took and their epoch.

``inproc`` / ``inproc-single``: the same two flows through the sans-I/O service in this
process with software members (``run_inproc``), where the service's handling time is measured
apart from the members' work: what N = 1,000 is measured with, since 1,000 virtual devices
joining and checking every commit's key packages in one process take most of an hour.

Usage: ``python -m bench.bench_bulk_create [multi:N|single:N|inproc:N|inproc-single:N ...]``
(default ``multi:100 single:100 inproc:1000``).
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.protocol import authz
from agent.protocol.wire.messages.operator import Propose
from agent.protocol.wire.messages.result import ResultStatus
from bench.bench_rekey import _await_final, _wait_reports
from bench.deployment import deployment
from bench.servicetime import ServiceTime
from firmware_sim.fleet import VirtualFleet, load_fleet_config
from provisioning.operator import OperatorClient
from provisioning.requests_cli import RequestSession

GROUP = "bulk"
DEFAULT_RUNS = ("multi:100", "single:100", "inproc:1000")
TARGET_N = 1000
TARGET_S = 10.0
BATCH = 200  # messages keyfleet serve hands the service at once (bench_rekey, "ack batches")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def _change(
    client: OperatorClient, op: str, members: tuple[str, ...], timeout: float
) -> tuple[ResultStatus, str, int | None]:
    session = RequestSession(client, out=io.StringIO(), err=sys.stderr, json_lines=True)
    body = Propose(client.new_command_id(), op, members, GROUP)
    request = session.propose(body, f"{op} {GROUP}")
    approved = None if request is None else session.approve(request.encode(), "approve")
    if approved is None:
        raise RuntimeError(f"{op} {GROUP}: not approved (see above)")
    result, _ = _await_final(client, approved[1], timeout=timeout)
    return result.status, result.detail, result.epoch


def run(mode: str, n: int, workdir: Path) -> dict[str, Any]:
    with deployment(workdir, ack_timeout=600) as dep:
        config = load_fleet_config(dep.fleet_config)
        fleet = VirtualFleet.from_config(config, n, allow_insecure=True)
        t = time.perf_counter()
        fleet.start(timeout=600)
        print(f"{mode} n={n}: connected in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        try:
            _wait_reports(dep, fleet, timeout=600)
            ids = tuple(d.device_id for d in fleet.devices)
            pid = dep.service.pid
            with OperatorClient(dep.operator) as client:
                cpu0, t0 = _cpu_s(pid), time.perf_counter()
                if mode == "multi":
                    status, detail, epoch = _change(client, authz.OP_GROUP_CREATE, ids, 3600)
                else:
                    status, detail, epoch = _change(client, authz.OP_GROUP_CREATE, ids[:1], 600)
                    for device_id in ids[1:]:
                        if status is not ResultStatus.DONE:
                            break
                        status, detail, epoch = _change(
                            client, authz.OP_GROUP_ADD, (device_id,), 600
                        )
                wall, cpu = time.perf_counter() - t0, _cpu_s(pid) - cpu0
            if status is not ResultStatus.DONE:
                raise RuntimeError(f"{mode} n={n}: {status}: {detail}")
            views = fleet.authenticators(GROUP)
            if len({v for v in views.values()}) != 1 or None in views.values():
                raise RuntimeError("the fleet does not agree on the epoch authenticator")
        finally:
            fleet.stop()
    record = {
        "mode": mode,
        "n": n,
        "wall_s": round(wall, 2),
        "service_cpu_s": round(cpu, 2),
        "epoch": epoch,
    }
    print(json.dumps(record), file=sys.stderr)
    return record


def run_inproc(mode: str, n: int, workdir: Path) -> dict[str, Any]:
    """The same creation through the sans-I/O service in this process (bench_full_rekey part
    1: ``DeliveryService`` on a SQLite file, N software members from tests/service_members.py
    with real MLS and signed envelopes, the network a loop): the service's handling time is
    measured alone, apart from the members' work: its CPU time (the figure) and the wall time
    inside its calls. No broker, no TLS, no MQTT batching."""
    from tests.pure.test_service_core import make_fleet  # noqa: PLC0415
    from tests.pure.test_service_requests import approve, propose  # noqa: PLC0415

    names = tuple(f"dev-sim-{i:05d}" for i in range(1, n + 1))
    fleet = next(make_fleet(workdir, names, ack_timeout=3600))
    timed = ServiceTime(fleet.service, "handle_many", "tick")
    t0 = time.perf_counter()

    # (wall, service wall, service CPU) at each operation's final result
    finals: list[tuple[float, float, float]] = []

    def send(*outgoing: tuple[str, bytes]) -> None:
        """As ``Fleet.send``, but what the members answer together reaches the service in
        batches of up to ``BATCH`` messages, as ``keyfleet serve`` hands them over; and the
        clocks are read when an operation's final result goes out (the loop goes on with what
        follows it, such as a creation's first updates)."""
        queue = list(outgoing)
        while queue:
            batch, queue = queue[:BATCH], queue[BATCH:]
            seen = sum(len(r) for r in fleet.results.values())
            queue.extend(fleet.deliver(fleet.service.handle_many(batch, fleet.now)))
            new = [r for rs in fleet.results.values() for r in rs][seen:]
            if any(r.status not in (ResultStatus.ACCEPTED, ResultStatus.IN_PROGRESS) for r in new):
                finals.append((time.perf_counter() - t0, timed.total, timed.cpu))

    fleet.send = send  # type: ignore[method-assign]

    def change(op: str, members: tuple[str, ...]) -> Any:
        info = propose(fleet, "op-alice", op, *members, group=GROUP)
        cid, _ = approve(fleet, "op-alice", info.request)
        return fleet.final(cid)

    if mode == "inproc":
        result = change(authz.OP_GROUP_CREATE, names)
    else:
        result = change(authz.OP_GROUP_CREATE, names[:1])
        for device_id in names[1:]:
            if result.status is not ResultStatus.DONE:
                break
            result = change(authz.OP_GROUP_ADD, (device_id,))
    wall, service, service_cpu = (
        finals[-1] if finals else (time.perf_counter() - t0, timed.total, timed.cpu)
    )
    if result.status is not ResultStatus.DONE:
        raise RuntimeError(f"{mode} n={n}: {result.status}: {result.detail}")
    holders = [d.groups[GROUP].epoch_authenticator for d in fleet.devices.values()]
    if len(set(holders)) != 1 or len(holders) != n:
        raise RuntimeError("the members do not agree on the epoch authenticator")
    record = {
        "mode": mode,
        "n": n,
        "wall_s": round(wall, 2),
        "service_handling_s": round(service, 2),
        "service_cpu_s": round(service_cpu, 2),
        "load_average": round(os.getloadavg()[0], 1),
        "epoch": result.epoch,
        # and with what followed the final result before the fleet went quiet (a creation's
        # first updates, detached from it)
        "until_quiet_wall_s": round(time.perf_counter() - t0, 2),
        "until_quiet_service_s": round(timed.total, 2),
        "until_quiet_service_cpu_s": round(timed.cpu, 2),
        "epoch_when_quiet": fleet.epoch(GROUP),
    }
    print(json.dumps(record), file=sys.stderr)
    return record


def main() -> None:
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    runs = []
    for spec in sys.argv[1:] or DEFAULT_RUNS:
        mode, _, size = spec.partition(":")
        if mode not in ("multi", "single", "inproc", "inproc-single"):
            raise SystemExit(
                "usage: bench_bulk_create [multi:N|single:N|inproc:N|inproc-single:N ...], "
                f"not {spec!r}"
            )
        with tempfile.TemporaryDirectory() as tmp:
            if mode.startswith("inproc"):
                runs.append(run_inproc(mode, int(size), Path(tmp)))
            else:
                runs.append(run(mode, int(size), Path(tmp)))
    records: list[dict[str, Any]] = []
    for r in runs:
        service_s = r.get("service_cpu_s", r.get("service_handling_s"))
        record: dict[str, Any] = {
            "name": f"group_create_{r['mode']}_n{r['n']}",
            "value": service_s,
            "unit": "s",
            **r,
        }
        if r["mode"] in ("multi", "inproc") and r["n"] == TARGET_N:
            record["target_s"] = TARGET_S
            record["meets_target"] = service_s <= TARGET_S
        records.append(record)
    print(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
