"""The rekey policy's check at fleet scale: what one ``rekeypolicy.rekey_tick`` costs with
100,000 devices in groups of 1,000 (docs/bench/README.md, "Fleet scale").

Not a test: prints a JSON list of records to stdout (progress to stderr).
``python -m bench.bench_rekey_tick [N]``: N devices instead of ``DEVICES`` (at least
``FEW * GROUP_SIZE``), for a quicker run.

The real delivery service (``bench_scale.service_on``, the default policy: 7 days, 100 epochs)
on a SQLite file seeded in bulk: ``DEVICES`` devices, ``DEVICES / GROUP_SIZE`` groups at epoch
``EPOCH``, every device a member of one, each with its last self-update one epoch and 100 s
before the first check, stored without its due columns (as a database upgraded to revision 0022
holds it). Timed:

- the first check: it computes every row's due columns (the configured default recorded) and
  looks for members without a row (an anti-join over every member);
- ``TICKS`` checks ``CHECK_SECONDS`` apart with nothing due: the figure the ≤ 10 ms target is
  about;
- ``TICKS`` checks with ``FEW`` members of as many groups made due by age before each (each asks
  them: an aimed job and the row, in its group's transaction);
- 3 checks that also look for members without a row (the anti-join an instance runs at its
  first check and then every ``SWEEP_SECONDS``);
- for comparison, the reads each check made before the due columns: every group's members and
  leaf rows (``rekeypolicy.leaves``), twice per group.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import insert, update

from bench.bench_scale import BATCH, T0, progress, seed_devices, seed_member_rows, service_on
from provisioning.db.runtime import LeafUpdateRow
from provisioning.db.schema import Group
from provisioning.service import rekeypolicy
from provisioning.service.context import Call, Clock
from provisioning.service.core import DeliveryService

DEVICES = 100_000
GROUP_SIZE = 1_000
EPOCH = 20
TICKS = 20
FEW = 5
TARGET_MS = 10.0


def seed_groups(sessions: Any, devices: int, now: int) -> None:
    engine = sessions.kw["bind"]
    groups = devices // GROUP_SIZE
    with engine.begin() as c:
        c.execute(
            insert(Group),
            [
                {
                    "group_id": f"g-{g:03}",
                    "epoch": EPOCH,
                    "public_tree": b"bench",
                    "group_context": b"bench",
                    "created_at": now,
                    "updated_at": now,
                }
                for g in range(groups)
            ],
        )
        members = [
            (f"g-{i // GROUP_SIZE:03}", f"dev-{i:06}", i % GROUP_SIZE) for i in range(devices)
        ]
        seed_member_rows(c, members, epoch=0, now=now)
        for start in range(0, devices, BATCH):
            span = range(start, min(devices, start + BATCH))
            c.execute(
                insert(LeafUpdateRow),
                [
                    {
                        "group_id": f"g-{i // GROUP_SIZE:03}",
                        "device_id": f"dev-{i:06}",
                        "epoch": EPOCH - 1,
                        "updated_at": now - 100,
                        "asked_at": None,
                    }
                    for i in span
                ],
            )


def one_check(service: DeliveryService, now: int) -> tuple[float, int]:
    """(ms, members asked) of one check at ``now``."""
    cx = Call(service._env, Clock.reading(now))
    begin = time.perf_counter()
    grew = rekeypolicy.rekey_tick(cx, now)
    ms = (time.perf_counter() - begin) * 1000
    return ms, len(grew)


def records(directory: Path, devices: int = DEVICES) -> list[dict[str, Any]]:
    groups = devices // GROUP_SIZE
    assert groups >= FEW, f"at least {FEW * GROUP_SIZE} devices"
    size = "100k" if devices == 100_000 else str(devices)
    with service_on(directory) as (url, service):
        sessions = service._env.sessions
        begin = time.monotonic()
        seed_devices(url, devices, now=T0, interval=3600)
        seed_groups(sessions, devices, T0)
        progress(f"seeded {devices} devices and members in {time.monotonic() - begin:.1f} s")
        now = T0
        first_ms, _ = one_check(service, now)
        progress(
            f"first check (due columns computed, members without a row looked for): "
            f"{first_ms:.0f} ms"
        )

        idle = []
        for _ in range(TICKS):
            now += rekeypolicy.CHECK_SECONDS
            ms, grew = one_check(service, now)
            assert grew == 0
            idle.append(ms)
        progress(f"idle checks (ms): {[round(t, 2) for t in idle]}")

        sweeps = []
        for _ in range(3):
            service._env.rekey_swept_at = None  # as at the hourly look for members without a row
            now += rekeypolicy.CHECK_SECONDS
            ms, _ = one_check(service, now)
            sweeps.append(ms)
        progress(
            f"checks with the look for members without a row (ms): {[round(t) for t in sweeps]}"
        )

        busy = []
        week = 7 * 86_400
        for tick in range(TICKS):
            now += rekeypolicy.CHECK_SECONDS
            # the j-th: group j mod groups, leaf 7 + j div groups (distinct, FEW groups per check)
            js = [tick * FEW + k for k in range(FEW)]
            due = [f"dev-{(j % groups) * GROUP_SIZE + 7 + j // groups:06}" for j in js]
            with sessions.begin() as s:
                s.execute(
                    update(LeafUpdateRow)
                    .where(LeafUpdateRow.device_id.in_(due))
                    .values(updated_at=now - week, due_at=now)
                )
            ms, grew = one_check(service, now)
            assert grew == FEW, grew
            busy.append(ms)
        progress(f"checks asking {FEW} (ms): {[round(t, 1) for t in busy]}")

        before = []
        for _ in range(3):
            begin = time.perf_counter()
            with sessions() as s:
                for group_id in [f"g-{g:03}" for g in range(groups)]:
                    rekeypolicy.leaves(s, group_id, now)
                    rekeypolicy.leaves(s, group_id, now)
            before.append((time.perf_counter() - begin) * 1000)
        progress(f"the reads of a check before the due columns (ms): {[round(t) for t in before]}")

    idle_ms = round(statistics.median(idle), 2)
    busy_ms = round(statistics.median(busy), 1)
    return [
        {
            "name": f"rekey_check_idle_ms_{size}",
            "value": idle_ms,
            "unit": f"ms (median of {TICKS} rekey policy checks, {devices} members in groups "
            f"of {GROUP_SIZE}, none due: two reads, the recorded default and the due rows by "
            "the due_at index; no write, the task is claimed only when something is due; "
            "SQLite)",
            "target": TARGET_MS,
            "met": idle_ms <= TARGET_MS,
            "checks_ms": [round(t, 2) for t in idle],
        },
        {
            "name": f"rekey_check_few_due_ms_{size}",
            "value": busy_ms,
            "unit": f"ms (median of {TICKS} checks each asking {FEW} members due by age, "
            "in as many groups: the task claimed and finished, a transaction per group)",
            "target": None,
            "met": None,
            "checks_ms": [round(t, 1) for t in busy],
        },
        {
            "name": f"rekey_check_first_ms_{size}",
            "value": round(first_ms),
            "unit": "ms (an instance's first check after the upgrade: every row's due columns "
            "computed, members without a row looked for)",
            "target": None,
            "met": None,
        },
        {
            "name": f"rekey_check_sweep_ms_{size}",
            "value": round(statistics.median(sweeps)),
            "unit": "ms (median of 3 checks that also look for members without a row: an "
            f"instance's first, then one every {rekeypolicy.SWEEP_SECONDS} s)",
            "target": None,
            "met": None,
        },
        {
            "name": f"rekey_check_reads_before_ms_{size}",
            "value": round(statistics.median(before)),
            "unit": "ms (median of 3: every group's members and leaf rows read twice, what "
            "each check read before the due columns)",
            "target": None,
            "met": None,
        },
    ]


def main() -> None:
    devices = int(sys.argv[1]) if len(sys.argv) > 1 else DEVICES
    with tempfile.TemporaryDirectory(prefix="kf-bench-rekey-tick-") as tmp:
        out = records(Path(tmp), devices)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
