"""Fleet rekey latency: operator command -> every member acked, for N = 10, 100, 1000 virtual
devices, against a real Mosquitto and a real ``keyfleet serve``.

Not a test: prints a JSON list of records to stdout (progress to stderr).

Per N, a fresh installation (bench/deployment.py: broker with mutual TLS and the product ACL,
``keyfleet serve`` subprocess with its SQLite registry, one admin operator) and a virtual fleet of
N devices (firmware_sim.fleet: N agent protocol cores with SOFTWARE keys, one MQTT connection
each, all in this process). The operator's ``op.rekey`` is sent with the operator CLI's own
client (``provisioning.operator.OperatorClient``, connected before the clock starts); the
latency is the time until the service's final ``done`` result arrives, which the service sends
only once every member acked the new epoch with the same epoch authenticator. Also recorded:
when the last device sent its ack (device side).

Group setup:
- N = 10 and 100: the real flow, ``op.group_create`` with all N members (the first device
  creates the group, then N-1 adds, each its own commit that every member processes and acks).
  Its duration is recorded as the setup figure; the rekeys start once every joiner made its
  first self-update (``joiners_first_updates_s``).
- N = 1000: N-1 sequential adds are O(N^2) member work (about half a million commit
  receptions and acks); the group is instead built directly by the fleet and written to the
  registry (``VirtualFleet.seed_group``, a simulation bypass, audited). The rekeys then run
  through the real service exactly as for the smaller groups.
"""

from __future__ import annotations

import io
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.protocol import authz
from agent.protocol.wire.messages.operator import Propose, Rekey
from agent.protocol.wire.messages.result import ResultStatus
from bench.deployment import Deployment, deployment
from firmware_sim.fleet import VirtualFleet, load_fleet_config, open_registry
from provisioning.operator import OperatorClient
from provisioning.requests_cli import RequestSession

SIZES = (10, 100, 1000)
ROUNDS = {10: 5, 100: 5, 1000: 3}
BUILD_BY_ADDS = (10, 100)
TARGET_N = 1000
TARGET_S = 3.0
GROUP = "bench"
FINAL = (ResultStatus.DONE, ResultStatus.FAILED, ResultStatus.REJECTED, ResultStatus.TIMEOUT)


def _await_final(client: OperatorClient, command_id: bytes, timeout: float) -> tuple[Any, float]:
    deadline = time.monotonic() + timeout
    while True:
        result = client.next_result(max(0.0, deadline - time.monotonic()))
        if result is None:
            raise RuntimeError(f"no final result within {timeout:g}s")
        if result.command_id == command_id and result.status in FINAL:
            return result, time.perf_counter()


def create_group(
    client: OperatorClient, group: str, members: tuple[str, ...], timeout: float
) -> tuple[Any, bytes]:
    """Found ``group`` with ``members`` the way ``keyfleet group create`` does: propose, approve
    (the bench deployments' quorum is one operator), and the final result of the change the
    approval started, with its command id; devices take no membership change without it."""
    session = RequestSession(client, out=io.StringIO(), err=sys.stderr, json_lines=True)
    body = Propose(client.new_command_id(), authz.OP_GROUP_CREATE, members, group)
    request = session.propose(body, f"group create {group}")
    approved = None if request is None else session.approve(request.encode(), "approve")
    if approved is None:
        raise RuntimeError(f"group create {group}: not approved: {session.out.getvalue()}")  # type: ignore[attr-defined]
    _, command_id = approved
    result, _ = _await_final(client, command_id, timeout=timeout)
    return result, command_id


def _timed_rekey(client: OperatorClient) -> tuple[float, float, float]:
    """Send one rekey of the bench group and wait for its final result (``RuntimeError`` unless
    done): when it was sent on ``time.perf_counter`` and on ``time.monotonic``, and when its
    result came on ``time.perf_counter``."""
    body = Rekey(client.new_command_id(), GROUP)
    start_mono = time.monotonic()
    start = time.perf_counter()
    client.send(body)
    result, end = _await_final(client, body.command_id, timeout=600)
    if result.status is not ResultStatus.DONE:
        raise RuntimeError(f"rekey: {result.status}: {result.detail}")
    return start, start_mono, end


def _wait_reports(dep: Deployment, fleet: VirtualFleet, timeout: float) -> None:
    """Until the service has processed every device's start-up keys.report (so that the timed
    rekey does not queue behind a thousand reports)."""
    from sqlalchemy import func, select  # noqa: PLC0415

    from provisioning.db.schema import Device  # noqa: PLC0415

    engine, sessions = open_registry(dep.db_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with sessions() as session:
                done = session.scalar(
                    select(func.count())
                    .select_from(Device)
                    .where(Device.last_report_at.is_not(None))
                )
            if done is not None and done >= len(fleet.devices):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"service processed {done}/{len(fleet.devices)} reports")
            time.sleep(0.2)
    finally:
        engine.dispose()


def run_size(n: int, workdir: Path) -> dict[str, Any]:
    with deployment(workdir, ack_timeout=300) as dep:
        config = load_fleet_config(dep.fleet_config)
        t = time.perf_counter()
        fleet = VirtualFleet.from_config(config, n, allow_insecure=True)
        prepare_s = time.perf_counter() - t
        setup: dict[str, Any] = {"prepare_identities_s": round(prepare_s, 2)}
        if n not in BUILD_BY_ADDS:
            engine, sessions = open_registry(dep.db_url)
            t = time.perf_counter()
            fleet.seed_group(GROUP, sessions, now=int(time.time()))
            setup["seed_group_s"] = round(time.perf_counter() - t, 2)
            engine.dispose()
        t = time.perf_counter()
        fleet.start(timeout=300)
        setup["connect_s"] = round(time.perf_counter() - t, 2)
        print(f"n={n}: {n} devices connected in {setup['connect_s']} s", file=sys.stderr)
        try:
            _wait_reports(dep, fleet, timeout=300)
            with OperatorClient(dep.operator) as client:
                epoch = 1
                if n in BUILD_BY_ADDS:
                    ids = tuple(d.device_id for d in fleet.devices)
                    t = time.perf_counter()
                    result, _ = create_group(client, GROUP, ids, timeout=1800)
                    end = time.perf_counter()
                    if result.status is not ResultStatus.DONE:
                        raise RuntimeError(f"group create: {result.status}: {result.detail}")
                    setup["group_by_adds_s"] = round(end - t, 2)
                    # each joiner's first act is a self-update (docs/treekem.md "Joining"):
                    # the rekeys are timed once those are done
                    epoch = fleet.wait_settled(GROUP, timeout=1800)
                    setup["joiners_first_updates_s"] = round(time.perf_counter() - end, 2)
                    print(
                        f"n={n}: group by adds in {setup['group_by_adds_s']} s, joiners' "
                        f"updates {setup['joiners_first_updates_s']} s",
                        file=sys.stderr,
                    )
                rounds = []
                for _ in range(ROUNDS[n]):
                    start, start_mono, end = _timed_rekey(client)
                    epoch += 1
                    last_ack = fleet.wait_epoch(GROUP, epoch, timeout=60)
                    rounds.append(
                        {
                            "done_s": round(end - start, 3),
                            "last_device_ack_s": round(last_ack - start_mono, 3),
                        }
                    )
                    print(f"n={n}: rekey {rounds[-1]}", file=sys.stderr)
            views = fleet.authenticators(GROUP)
            if len({v for v in views.values()}) != 1:
                raise RuntimeError("the fleet does not agree on the epoch authenticator")
            rss = dep.service_rss_kb()
        finally:
            fleet.stop()
    latencies = [r["done_s"] for r in rounds]
    return {
        "n": n,
        "rounds": rounds,
        "median_s": statistics.median(latencies),
        "min_s": min(latencies),
        "max_s": max(latencies),
        "median_last_device_ack_s": statistics.median(r["last_device_ack_s"] for r in rounds),
        "setup": setup,
        "service_rss_kb": rss,
        "group_built": "adds" if n in BUILD_BY_ADDS else "seeded",
    }


def main() -> None:
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    sizes = [int(a) for a in sys.argv[1:]] or list(SIZES)
    runs = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(run_size(n, Path(tmp)))
    records: list[dict[str, Any]] = []
    for run in runs:
        n = run["n"]
        target = TARGET_S if n == TARGET_N else None
        records.append(
            {
                "name": f"rekey_latency_n{n}",
                "value": run["median_s"],
                "unit": "s (median, command to every ack)",
                "target": target,
                "met": None if target is None else run["median_s"] <= target,
                "detail": (
                    f"{len(run['rounds'])} rekeys of a {n}-member group ({run['group_built']}), "
                    f"min {run['min_s']} s, max {run['max_s']} s; last device ack sent after "
                    f"{run['median_last_device_ack_s']} s (median)"
                ),
                "run": run,
            }
        )
        if "group_by_adds_s" in run["setup"]:
            records.append(
                {
                    "name": f"group_setup_by_adds_n{n}",
                    "value": run["setup"]["group_by_adds_s"],
                    "unit": "s (create + N-1 adds)",
                    "target": None,
                    "met": None,
                }
            )
    print(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
