"""Fleet-wide scans at scale: what one tick of the attestation schedule costs with 100,000
registered devices, what the catch-up check costs in a group of 10,000, and what accepting a
commit costs in groups of up to 100,000 (docs/bench/README.md, "Fleet scale").

Not a test: prints a JSON list of records to stdout (progress to stderr).

The real delivery service (``DeliveryService``, attestation on, interval one hour) on a SQLite
file seeded in bulk (Core ``executemany`` inserts; the rows are bench data: placeholder
certificates and AKs, which the schedule never parses): ``DEVICES`` active devices, all heard
from, their last attestation spread evenly over the interval, so a 5-second scan finds about
``DEVICES / 720`` due. Timed, each over ``TICKS`` ticks of the service, one scan each:

- a tick with nothing due (the schedule's own read, by the ``devices.attest_due`` index): the
  figure the ≤ 10 ms target is about;
- a steady-state tick: the same, plus challenging the devices due in it (each challenge is its
  own transaction and a signed message, work proportional to what is due, not to the fleet);
- for comparison, one read of every device as the schedule did before the index.

Catch-up: a group of ``GROUP_N`` members at epoch ``EPOCH`` with the commit log's retention
(64 epochs) of commits and every member's acks for them (about 650,000 ack rows), seeded the
same way. Timed over ``REPEATS`` runs of the service's catch-up (``catchup.catch_up``: the
device's memberships, the newest epoch it is proven to hold, the commits it lacks, queued):
for a device back after ``BEHIND`` epochs (its last ack the oldest kept), and for an up-to-date
member, the check every report of every member runs.

Audit chain: ``AUDIT_ENTRIES`` entries seeded with their real hashes (one hour of hourly
attestation at 100,000 devices, which adds 2.4 million a day), then the dashboard's checks
timed: the first, which walks the whole log, and the incremental ones after one new entry each
(``audit.verify_from`` plus the ``recheck`` window of old entries).

Commit acceptance (``python -m bench.bench_scale commit``, not run by default: building the
groups takes about ten minutes): for N = 1,000, 10,000 and 100,000, a full group built with
``Group.assemble`` (software keys, every leaf with its DevID certificate) and stored as the
service stores it (head, node rows, member rows; the committers registered with their real
DevID certificates), then ``COMMITS + 1`` self-update commits, each by another member, through
the service's commit flow (``commits.on_commit`` in its own transaction). The first decodes the
stored group (``cold_ms``); the others find it in memory, and their median is the figure, with
the flow's CPU time (``cpu_ms``, this thread's: other processes' load inflates it less than the
wall time), the same-run cost of one ECDSA P-256 verify for scale, and the tree rows and bytes
each commit writes against the size of the whole tree.

A rekey at fleet scale (``python -m bench.bench_scale rekey [N...]``, not run by default: about
half an hour at 100,000 on a shared machine): an operator's rekey of a seeded group of N members
(tests/big_groups.py) through the delivery service to ``done``, the service's time (choosing the
committer, accepting the commit, the N acks) apart from the members'.

One module of about 800 lines, not several: each part is the service at fleet scale, seeded the
same way and run on its own by name, and they share the service set-up and the verify baseline.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Connection, Engine, event, func, insert, select, text, update

from agent.protocol.mls import codec
from agent.protocol.mls import tree_math as tm
from agent.protocol.mls.group import Group as MlsGroup
from agent.protocol.mls.messages import Commit, KeyPackage
from agent.protocol.mls.public import PublicGroup
from agent.protocol.wire.messages.group import CommitMessage
from agent.protocol.wire.messages.operator import Rekey
from agent.protocol.wire.messages.result import ResultStatus
from firmware_sim.boot import default_components
from provisioning import audit, pki
from provisioning.dashboard.app import RECHECK_ENTRIES, ChainCache
from provisioning.db.runtime import GroupTreeUndoRow, create_service_schema
from provisioning.db.schema import (
    Ack,
    AuditEntry,
    AuditHead,
    CommitLogEntry,
    Device,
    DeviceState,
    Group,
    GroupMember,
    GroupTreeNode,
    Outcome,
)
from provisioning.policy import policy_from_components
from provisioning.registry import Registry, create_schema, make_engine, session_factory
from provisioning.service import catchup, commits, intake, tasks
from provisioning.service.context import Call, Clock
from provisioning.service.core import AttestationSettings, DeliveryService, ServiceSettings
from provisioning.service.store import trees
from provisioning.service.tasks import ATTEST_SCAN_SECONDS
from tests import big_groups
from tests.device_certs import device_ca as test_device_ca
from tests.device_certs import devid_cert_der
from tests.service_members import command_id

DEVICES = 100_000
GROUP_N = 10_000
EPOCH = 100
BEHIND = 64
REPEATS = 20
G = "g-bench"
AUDIT_ENTRIES = 100_000
INTERVAL = 3600
TICKS = 20
T0 = 1_800_000_000
TICK_TARGET_MS = 10.0
BATCH = 10_000


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def seed_device_rows(
    connection: Connection,
    devices: Sequence[tuple[str, str]],
    *,
    now: int,
    each: Callable[[int], dict[str, Any]] | None = None,
) -> None:
    """Register ``devices`` (id, DevID certificate PEM or a placeholder no measured path
    parses) as active devices with an AK, registered and heard from at ``now``, in statements of
    ``BATCH`` rows: the registered fleet every scale bench starts from. ``each(i)``: the columns
    of device ``i`` that differ (its attestation times, its AK, ...)."""
    for start in range(0, len(devices), BATCH):
        rows = []
        for i in range(start, min(len(devices), start + BATCH)):
            device_id, pem = devices[i]
            row: dict[str, Any] = {
                "device_id": device_id,
                "ek_cert_fingerprint": f"{i:064x}",
                "devid_cert_pem": pem,
                "state": DeviceState.ACTIVE,
                "state_reason": "bench",
                "registered_at": now,
                "state_changed_at": now,
                "last_seen": now,
                "ak_public": b"bench-ak",
            }
            if each is not None:
                row.update(each(i))
            rows.append(row)
        connection.execute(insert(Device), rows)


def seed_member_rows(
    connection: Connection, members: Sequence[tuple[str, str, int]], *, epoch: int, now: int
) -> None:
    """Member rows (group, device, leaf index), joined at ``epoch``, in statements of ``BATCH``
    rows."""
    for start in range(0, len(members), BATCH):
        connection.execute(
            insert(GroupMember),
            [
                {
                    "group_id": group_id,
                    "device_id": device_id,
                    "leaf_index": leaf,
                    "joined_epoch": epoch,
                    "requested_at": now,
                }
                for group_id, device_id, leaf in members[start : start + BATCH]
            ],
        )


def seed_devices(service_url: str, count: int, *, now: int, interval: int) -> None:
    """``count`` active, attestable devices heard from at ``now``, attested at evenly spread
    times of the last ``interval``, so that they fall due evenly over the next one."""

    def attested(i: int) -> dict[str, Any]:
        at = now - interval + (i * interval) // count
        registered = now - interval
        return {
            "registered_at": registered,
            "state_changed_at": registered,
            "attested_at": at,
            "attest_due": at + interval,
        }

    engine = make_engine(service_url)
    with engine.begin() as connection:
        devices = [(f"dev-{i:06}", "bench") for i in range(count)]
        seed_device_rows(connection, devices, now=now, each=attested)
    engine.dispose()


@contextmanager
def service_on(
    directory: Path, device_ca_cert: x509.Certificate | None = None
) -> Iterator[tuple[str, DeliveryService]]:
    url = f"sqlite:///{directory / 'fleet.db'}"
    engine = make_engine(url)
    create_schema(engine)
    create_service_schema(engine)
    now_dt = datetime.fromtimestamp(T0, UTC)
    operator_ca = pki.create_ca("bench operator CA", now=now_dt, valid_for=timedelta(days=2))
    device_ca = pki.create_ca("bench device CA", now=now_dt, valid_for=timedelta(days=2))
    counter = iter(range(1, 1 << 40))
    service = DeliveryService(
        session_factory(engine),
        signing_key=pki.generate_key(),
        operator_ca=operator_ca.certificate,
        device_ca=device_ca.certificate if device_ca_cert is None else device_ca_cert,
        settings=ServiceSettings(min_approvals=1, online_window=10 * INTERVAL),
        attestation=AttestationSettings(
            policy=policy_from_components(default_components("1.0")), interval=INTERVAL
        ),
        rng=lambda n: next(counter).to_bytes(n, "big"),
    )
    try:
        yield url, service
    finally:
        engine.dispose()


def timed_ticks(service: DeliveryService, start: int) -> tuple[list[float], list[float], int]:
    """``TICKS`` rounds ``ATTEST_SCAN_SECONDS`` apart from ``start``, each the schedule's scan
    alone (``attest_tick``, what a service tick runs for attestation, its challenges signed)
    and then a whole service tick one second later: (scan ms, tick ms, challenges sent)."""
    scans, ticks, sent, now = [], [], 0, start
    for _ in range(TICKS):
        begin = time.perf_counter()
        cx = Call(service._env, Clock.reading(now))  # one step of the service
        tasks.attest_tick(cx, now)
        sent += len(intake.sign(cx))
        scans.append((time.perf_counter() - begin) * 1000)
        begin = time.perf_counter()
        service.tick(now + 1)
        ticks.append((time.perf_counter() - begin) * 1000)
        now += ATTEST_SCAN_SECONDS
    return scans, ticks, sent


def attestation_records(directory: Path) -> list[dict[str, Any]]:
    with service_on(directory) as (url, service):
        begin = time.monotonic()
        seed_devices(url, DEVICES, now=T0, interval=INTERVAL)
        progress(f"seeded {DEVICES} devices in {time.monotonic() - begin:.1f} s")
        service.tick(T0 - 1)  # first tick: starts the service's own work, nothing due yet
        sessions = service._env.sessions  # the bench reads its database

        # nothing due: every device's next attestation after the measured window
        with sessions.begin() as s:
            s.execute(update(Device).values(attest_due=Device.attest_due + INTERVAL))
        idle, idle_ticks, idle_sent = timed_ticks(service, T0)
        # steady state: due evenly over the hour from the next scan on, DEVICES / 720 a scan
        after = T0 + TICKS * ATTEST_SCAN_SECONDS
        with sessions.begin() as s:
            s.execute(update(Device).values(attest_due=Device.attest_due - T0 - INTERVAL + after))
        busy, _, busy_sent = timed_ticks(service, after)
        progress(f"idle scans (ms): {[round(t, 2) for t in idle]} ({idle_sent} challenges)")
        progress(f"idle service ticks (ms): {[round(t, 2) for t in idle_ticks]}")
        progress(f"steady scans (ms): {[round(t, 1) for t in busy]} ({busy_sent} challenges)")

        begin = time.perf_counter()
        with sessions() as s:
            everything = len(Registry(s).devices())
        full_ms = (time.perf_counter() - begin) * 1000
        progress(f"reading all {everything} devices: {full_ms:.0f} ms")

    idle_ms = round(statistics.median(idle), 2)
    tick_ms = round(statistics.median(idle_ticks), 2)
    busy_ms = round(statistics.median(busy), 1)
    per_scan = busy_sent / TICKS
    return [
        {
            "name": "attest_scan_tick_ms_100k",
            "value": idle_ms,
            "unit": f"ms (median of {TICKS} scans of the attestation schedule, {DEVICES} "
            "registered devices, none due: its read by the attest_due index and its task "
            "claim; SQLite)",
            "target": TICK_TARGET_MS,
            "met": idle_ms <= TICK_TARGET_MS,
            "scans_ms": [round(t, 2) for t in idle],
        },
        {
            "name": "service_idle_tick_ms_100k",
            "value": tick_ms,
            "unit": f"ms (median of {TICKS} whole service ticks between scans, {DEVICES} "
            "devices: operations, pruning, attestation timeouts)",
            "target": None,
            "met": None,
            "ticks_ms": [round(t, 2) for t in idle_ticks],
        },
        {
            "name": "attest_scan_steady_tick_ms_100k",
            "value": busy_ms,
            "unit": f"ms (median of {TICKS} scans each challenging the ~{per_scan:.0f} devices "
            f"due per {ATTEST_SCAN_SECONDS} s at a {INTERVAL} s interval, "
            f"{round(busy_ms / max(per_scan, 1), 2)} ms per challenge: a transaction and a "
            "signed message each)",
            "target": None,
            "met": None,
            "scans_ms": [round(t, 1) for t in busy],
        },
        {
            "name": "attest_full_device_read_ms_100k",
            "value": round(full_ms),
            "unit": "ms (one read of every device, what each scan did before the index)",
            "target": None,
            "met": None,
        },
    ]


def seed_group(url: str, *, now: int) -> None:
    """``GROUP_N`` members of ``G`` at ``EPOCH``, the last 64 commits kept, every member's
    acks of the kept epochs, but ``dev-000000``'s: its last ack is the oldest kept epoch."""
    engine = make_engine(url)
    first_kept = EPOCH - BEHIND
    commit = bytes(range(256)) * 12  # about a commit's size in a group this large
    with engine.begin() as connection:
        connection.execute(
            insert(Group),
            [
                {
                    "group_id": G,
                    "epoch": EPOCH,
                    "public_tree": b"bench",
                    "group_context": b"bench",
                    "created_at": now,
                    "updated_at": now,
                }
            ],
        )
        members = [(G, f"dev-{i:06}", i) for i in range(GROUP_N)]
        seed_member_rows(connection, members, epoch=0, now=now)
        connection.execute(
            insert(CommitLogEntry),
            [
                {
                    "group_id": G,
                    "epoch": epoch,
                    "committer": f"dev-{1 + epoch % (GROUP_N - 1):06}",
                    "commit": commit,
                    "accepted_at": now - 3600,
                    "accepted_at_ms": (now - 3600) * 1000,
                }
                for epoch in range(first_kept, EPOCH)
            ],
        )
        for epoch in range(first_kept, EPOCH + 1):
            members = range(GROUP_N) if epoch == first_kept else range(1, GROUP_N)
            connection.execute(
                insert(Ack),
                [
                    {
                        "group_id": G,
                        "epoch": epoch,
                        "device_id": f"dev-{i:06}",
                        "epoch_authenticator": epoch.to_bytes(32, "big"),
                        "received_at": now - 3600,
                        "received_at_ms": (now - 3600) * 1000,
                    }
                    for i in members
                ],
            )
    engine.dispose()


def timed_catch_up(service: DeliveryService, device_id: str, now: int) -> tuple[list[float], int]:
    """(ms per run, commits queued by the last run)."""
    times, queued = [], 0
    for _ in range(REPEATS):
        service._env.catchup_sent.clear()  # each run plans afresh, as another instance would
        cx = Call(service._env, Clock.reading(now))
        begin = time.perf_counter()
        catchup.catch_up(cx, device_id, now)
        times.append((time.perf_counter() - begin) * 1000)
        queued = len(cx.outbox)
    return times, queued


def catch_up_records(directory: Path) -> list[dict[str, Any]]:
    with service_on(directory) as (url, service):
        begin = time.monotonic()
        seed_devices(url, GROUP_N, now=T0, interval=INTERVAL)
        seed_group(url, now=T0)
        progress(
            f"seeded a group of {GROUP_N} at epoch {EPOCH} in {time.monotonic() - begin:.1f} s"
        )
        behind, queued = timed_catch_up(service, "dev-000000", T0)
        current, none = timed_catch_up(service, f"dev-{GROUP_N - 1:06}", T0)
        # the same without the two indexes of revision 0015, as before it
        with service._env.sessions.begin() as s:
            s.execute(text("DROP INDEX ix_acks_group_device_epoch"))
            s.execute(text("DROP INDEX ix_commit_log_group_committer_epoch"))
        unindexed, _ = timed_catch_up(service, "dev-000000", T0)
    if queued != BEHIND or none != 0:
        raise RuntimeError(f"catch-up queued {queued} and {none} commits, not {BEHIND} and 0")
    progress(f"behind (ms): {[round(t, 2) for t in behind]}")
    progress(f"up to date (ms): {[round(t, 2) for t in current]}")
    progress(f"behind, without the indexes (ms): {[round(t, 2) for t in unindexed]}")
    behind_ms = round(statistics.median(behind), 2)
    current_ms = round(statistics.median(current), 2)
    unindexed_ms = round(statistics.median(unindexed), 2)
    return [
        {
            "name": f"catchup_ms_behind{BEHIND}_n{GROUP_N}",
            "value": behind_ms,
            "unit": f"ms (median of {REPEATS}: a member back after {BEHIND} epochs in a group of "
            f"{GROUP_N}: its epoch found, the {BEHIND} commits read and queued; SQLite)",
            "target": None,
            "met": None,
            "runs_ms": [round(t, 2) for t in behind],
        },
        {
            "name": f"catchup_unindexed_ms_behind{BEHIND}_n{GROUP_N}",
            "value": unindexed_ms,
            "unit": f"ms (the same, same run, without the catch-up indexes: "
            f"{round(unindexed_ms / behind_ms, 1)}x)",
            "target": None,
            "met": None,
            "runs_ms": [round(t, 2) for t in unindexed],
        },
        {
            "name": f"catchup_check_ms_current_n{GROUP_N}",
            "value": current_ms,
            "unit": f"ms (median of {REPEATS}: the same check for an up-to-date member, run on "
            "each of its reports)",
            "target": None,
            "met": None,
            "runs_ms": [round(t, 2) for t in current],
        },
    ]


def seed_audit(url: str, count: int, *, now: int) -> None:
    """``count`` chained entries, hashed as ``audit.append`` hashes them, and the head row."""
    engine = make_engine(url)
    prev = audit.GENESIS_PREV_HASH
    with engine.begin() as connection:
        for start in range(1, count + 1, BATCH):
            rows = []
            for seq in range(start, min(count, start + BATCH - 1) + 1):
                fields = {
                    "seq": seq,
                    "time": now + seq,
                    "actor": "service",
                    "action": "device.attest",
                    "target": f"dev-{seq % DEVICES:06}",
                    "outcome": Outcome.ACCEPTED.value,
                    "reason": "trusted: every PCR as expected",
                    "details": audit.canonical_json({"nonce": f"{seq:032x}"}),
                }
                entry_hash = audit.compute_hash(prev, audit.entry_preimage(**fields))
                rows.append({**fields, "outcome": Outcome.ACCEPTED, "prev_hash": prev,
                             "entry_hash": entry_hash})  # fmt: skip
                prev = entry_hash
            connection.execute(insert(AuditEntry), rows)
        connection.execute(insert(AuditHead), [{"id": 1, "seq": count, "entry_hash": prev}])
    engine.dispose()


def audit_records(directory: Path) -> list[dict[str, Any]]:
    with service_on(directory) as (url, service):
        begin = time.monotonic()
        seed_audit(url, AUDIT_ENTRIES, now=T0)
        progress(f"seeded {AUDIT_ENTRIES} audit entries in {time.monotonic() - begin:.1f} s")
        sessions = service._env.sessions
        cache = ChainCache(sessions, ttl=0, clock=time.time)
        begin = time.perf_counter()
        first = cache.status()
        full_ms = (time.perf_counter() - begin) * 1000
        if not first.ok or first.entries != AUDIT_ENTRIES:
            raise RuntimeError(f"the seeded chain does not verify: {first}")
        checks = []
        for i in range(REPEATS):
            audit.record(
                sessions, now=T0 + AUDIT_ENTRIES + 1 + i, actor="service",
                action="device.attest", target="dev-000001", outcome=Outcome.ACCEPTED,
            )  # fmt: skip
            begin = time.perf_counter()
            status = cache.status()
            checks.append((time.perf_counter() - begin) * 1000)
            if not status.ok:
                raise RuntimeError(f"the chain broke: {status}")
    progress(
        f"first (full) check: {full_ms:.0f} ms; incremental (ms): {[round(t) for t in checks]}"
    )
    incremental_ms = round(statistics.median(checks), 1)
    return [
        {
            "name": "audit_full_verify_ms_100k",
            "value": round(full_ms),
            "unit": f"ms (the dashboard's first check: every one of {AUDIT_ENTRIES} entries; "
            f"{round(full_ms * 1000 / AUDIT_ENTRIES, 1)} us per entry)",
            "target": None,
            "met": None,
        },
        {
            "name": "audit_incremental_verify_ms_100k",
            "value": incremental_ms,
            "unit": f"ms (median of {REPEATS} later checks, one new entry each: the new entry, "
            f"the remembered head again and a recheck window of {RECHECK_ENTRIES} old entries)",
            "target": None,
            "met": None,
            "checks_ms": [round(t, 1) for t in checks],
        },
    ]


# -- commit acceptance -------------------------------------------------------------------------

COMMIT_SIZES = (1_000, 10_000, 100_000)
COMMITS = 10  # timed commits per size, each by another member (after one cold commit)
COMMIT_TARGET_MS = 10.0
COMMIT_GROUP = "g-commit"


def _commit_members(
    n: int,
) -> list[tuple[KeyPackage, ec.EllipticCurvePrivateKey, ec.EllipticCurvePrivateKey]]:
    """``n`` software devices: (KeyPackage with a DevID certificate, leaf key, DevID key)."""
    out = []
    for i in range(n):
        device_id = f"dev-{i:06}".encode()
        devid = ec.generate_private_key(ec.SECP256R1())
        leaf = ec.generate_private_key(ec.SECP256R1())
        kp = KeyPackage.create(
            device_id,
            devid,
            leaf.public_key(),
            devid_cert_der(device_id, devid),
            init_key=ec.generate_private_key(ec.SECP256R1()).public_key(),
        )
        out.append((kp, leaf, devid))
        if i and i % 20_000 == 0:
            progress(f"  {i} members made")
    return out


def seed_commit_group(url: str, public: PublicGroup, certs: dict[int, str], *, now: int) -> None:
    """The group as the service stores it (head, every node row, every member row) and its
    members as registered devices: the committers with their real DevID certificates (the
    service checks the committer's), the rest with placeholders no measured path parses."""
    engine = make_engine(url)
    tree = public.tree
    with engine.begin() as connection:
        members = list(tree.members())
        devices = [(leaf.device_id.decode(), certs.get(i, "bench")) for i, leaf in members]
        seed_device_rows(connection, devices, now=now)
        connection.execute(
            insert(Group),
            [
                {
                    "group_id": COMMIT_GROUP,
                    "epoch": public.epoch,
                    "public_tree": trees.head(public.state),
                    "group_context": public.state.group_context(),
                    "created_at": now,
                    "updated_at": now,
                    "state_token": b"bench-seeded",
                }
            ],
        )
        rows = trees.rows_of(tree, trees.all_nodes(tree))
        present = [(x, d) for x, d in rows.items() if d is not None]
        for start in range(0, len(present), BATCH):
            connection.execute(
                insert(GroupTreeNode),
                [
                    {"group_id": COMMIT_GROUP, "node": x, "data": d}
                    for x, d in present[start : start + BATCH]
                ],
            )
        seed_member_rows(
            connection,
            [(COMMIT_GROUP, leaf.device_id.decode(), i) for i, leaf in members],
            epoch=public.epoch,
            now=now,
        )
    engine.dispose()


def _ecdsa_verify_ms(rounds: int = 200) -> float:
    key = ec.generate_private_key(ec.SECP256R1())
    signature = key.sign(b"x" * 200, ec.ECDSA(hashes.SHA256()))
    public = key.public_key()
    begin = time.perf_counter()
    for _ in range(rounds):
        public.verify(signature, b"x" * 200, ec.ECDSA(hashes.SHA256()))
    return (time.perf_counter() - begin) * 1000 / rounds


def commit_record(directory: Path, n: int) -> dict[str, Any]:
    """Self-update commits (an UpdatePath re-keying the committer's whole path, the commit a
    rekey asks for) accepted by the service's commit flow (``commits.on_commit`` in its own
    transaction: every public check, the committer's DevID, the solicitation rules, the
    commit log, the O(log N) tree rows, the audit entry), in a full group of ``n``."""
    begin = time.monotonic()
    members = _commit_members(n)
    groups = MlsGroup.assemble(b"g-commit", members, epoch=1)
    progress(f"N={n}: group assembled in {time.monotonic() - begin:.0f} s")
    step = max(1, n // (COMMITS + 1))
    committers = [i * step for i in range(COMMITS + 1)]
    certs = {
        i: x509.load_der_x509_certificate(members[i][0].credential)
        .public_bytes(serialization.Encoding.PEM)
        .decode()
        for i in committers
    }
    public = groups[0].public_group()
    with service_on(directory, test_device_ca().certificate) as (url, service):
        service._env.settings = replace(
            service._env.settings, member_updates=True, member_update_min_interval=1
        )
        seed_commit_group(url, public, certs, now=T0)
        states = {i: groups[i] for i in committers}
        del groups
        times: list[float] = []
        flows: list[float] = []
        flows_cpu: list[float] = []  # the same flows' CPU time (this thread's): less load-bound
        checks: list[float] = []  # the MLS public checks of each commit (verify_commit) alone
        written: list[tuple[int, int]] = []  # tree rows and bytes each commit writes
        cold = (0.0, 0.0)
        log: list[Commit] = []
        statements: list[int] = []  # SQL statements each flow ran, counted at the driver
        counting = [False, 0]

        def count(*_: Any) -> None:
            if counting[0]:
                counting[1] += 1

        event.listen(Engine, "before_cursor_execute", count)
        collector: list[float] = [0.0, 0.0]  # the garbage collector's time in the flow, its start

        def collecting(phase: str, _: dict[str, int]) -> None:
            if counting[0] and phase == "start":
                collector[1] = time.perf_counter()
            elif counting[0] and phase == "stop":
                collector[0] += time.perf_counter() - collector[1]

        gc.callbacks.append(collecting)
        paused: list[float] = []  # the collector's time in each timed flow, ms
        for k, index in enumerate(committers):
            mine = states[index]
            for commit in log[mine.epoch - 1 :]:
                mine = mine.process(commit)
            result = mine.update(members[index][2], ec.generate_private_key(ec.SECP256R1()))
            states[index] = result.group
            after = result.group.public_group().tree
            changed = trees.rows_of(after, after.changed_since(mine.public_group().tree))
            written.append((len(changed), sum(len(d or b"") for d in changed.values())))
            log.append(result.commit)
            body = CommitMessage(COMMIT_GROUP, result.group.epoch - 1, result.commit.encode(), None)
            sender = members[index][0].device_id.decode()
            now = T0 + 10 * (k + 1)
            cx = Call(service._env, Clock.reading(now))
            flow: list[float] = []

            def work(
                s: Any, cx: Call = cx, sender: str = sender, body: Any = body, flow: Any = flow
            ) -> Any:
                counting[:] = [True, 0]
                collector[0] = 0.0
                begin, cpu = time.perf_counter(), time.thread_time()
                out = commits.on_commit(cx, s, sender, body, cx.clock.seconds)
                flow.append((time.perf_counter() - begin) * 1000)
                flow.append((time.thread_time() - cpu) * 1000)
                counting[0] = False
                flow.append(counting[1])
                return out

            copy = service._env.groups.peek(COMMIT_GROUP)  # the state the commit applies to
            start = time.perf_counter()
            service._env.tx(work)
            ms = (time.perf_counter() - start) * 1000
            if k == 0:
                cold = (ms, flow[-3])  # decodes the stored group: no copy in memory yet
            else:
                times.append(ms)
                flows.append(flow[-3])
                flows_cpu.append(flow[-2])
                statements.append(int(flow[-1]))
                paused.append(collector[0] * 1000)
                assert copy is not None and copy.epoch == body.epoch
                start = time.perf_counter()
                copy.verify(Commit.decode(body.commit))  # the MLS checks alone, once more
                checks.append((time.perf_counter() - start) * 1000)
        with service._env.sessions() as s:
            epoch = Registry(s).group(COMMIT_GROUP).epoch
            # a joiner's tree at the first epoch, rebuilt under all the commits since, as an
            # instance without it in memory does (treepages: once per instance and epoch)
            start = time.perf_counter()
            rebuilt = trees.load_at(s, COMMIT_GROUP, public.epoch)
            rebuild_ms = (time.perf_counter() - start) * 1000
            assert rebuilt is not None and rebuilt.tree.tree_hash() == public.tree.tree_hash()
            undo_rows = s.scalar(
                select(func.count())
                .select_from(GroupTreeUndoRow)
                .where(GroupTreeUndoRow.group_id == COMMIT_GROUP)
            )
        assert epoch == 1 + len(committers), epoch  # every commit accepted
        event.remove(Engine, "before_cursor_execute", count)
        gc.callbacks.remove(collecting)
    median = round(statistics.median(flows), 2)
    baseline = round(_ecdsa_verify_ms(), 3)
    progress(
        f"N={n}: cold {cold[0]:.0f} ms, flow {[round(t, 2) for t in flows]} ms, its CPU time "
        f"{[round(t, 2) for t in flows_cpu]} ms, MLS checks "
        f"{[round(t, 2) for t in checks]} ms, "
        f"with the transaction's commit {[round(t, 2) for t in times]} ms, rebuilding epoch "
        f"{public.epoch} under {len(committers)} commits {rebuild_ms:.0f} ms ({undo_rows} rows)"
    )
    return {
        "name": f"commit_accept_ms_{n // 1000}k",
        "value": median,
        "unit": f"ms (median of {COMMITS} self-update commits, each by another member, accepted "
        f"by the service's commit flow in a full group of {n}: the work in the transaction, "
        "before its commit; SQLite)",
        "target": COMMIT_TARGET_MS if n == 100_000 else None,
        "met": median <= COMMIT_TARGET_MS if n == 100_000 else None,
        "commits_ms": [round(t, 2) for t in flows],
        "cpu_ms": round(statistics.median(flows_cpu), 2),
        "cpu_in_ecdsa_verifies": round(statistics.median(flows_cpu) / baseline, 1),
        "statements": statistics.median(statements),
        "gc_ms": [round(t, 2) for t in paused],
        "commits_cpu_ms": [round(t, 2) for t in flows_cpu],
        "with_db_commit_ms": round(statistics.median(times), 2),
        "mls_verify_ms": round(statistics.median(checks), 2),
        "with_db_commit_all_ms": [round(t, 2) for t in times],
        "cold_ms": round(cold[0], 1),
        "cold_flow_ms": round(cold[1], 1),
        "ecdsa_verify_ms": baseline,
        "in_ecdsa_verifies": round(median / baseline, 1),
        "members": n,
        "path_length": tm.log2(n - 1) + 1 if n > 1 else 0,
        "tree_rows_per_commit": statistics.median(r for r, _ in written),
        "tree_bytes_per_commit": statistics.median(b for _, b in written),
        "whole_tree_bytes": len(codec.encode(public.to_state())),
        "rebuild_ms": round(rebuild_ms, 1),
        "undo_rows": undo_rows,
    }


def commit_records(directory: Path, sizes: tuple[int, ...] = COMMIT_SIZES) -> list[dict[str, Any]]:
    out = []
    for n in sizes:
        (directory / str(n)).mkdir()
        out.append(commit_record(directory / str(n), n))
    return out


# -- a rekey at fleet scale --------------------------------------------------------------------

REKEY_SIZES = (1_000, 10_000, 100_000)
REKEY_PROCESSING = 8  # members that process the commit with MLS; the rest ack (big_groups)
REKEY_GROUP = "g-rekey"
REKEY_ONCE_FROM = 100_000  # one rekey only (the first after the start) from this size on: on the
# shared 2-core machine one rekey of 100,000 takes most of half an hour (the acks, ~2 ms each)


def _one_rekey(fleet: Any, n: int) -> tuple[big_groups.Clocks, float]:
    clocks = big_groups.Clocks()
    epoch = fleet.epoch(REKEY_GROUP)
    start = time.perf_counter()
    cid = big_groups.command(fleet, "op-alice", Rekey(command_id(), REKEY_GROUP), clocks)
    wall = time.perf_counter() - start
    final = fleet.final(cid)
    if final.status is not ResultStatus.DONE or final.acked != n or final.epoch != epoch + 1:
        raise RuntimeError(f"N={n}: the rekey ended {final.status}: {final.detail}")
    return clocks, wall


def rekey_record(directory: Path, n: int) -> dict[str, Any]:
    """Operator rekeys of a seeded group of ``n`` (tests/big_groups.py) through the real
    delivery service until ``done``, the members' acks handed over ``big_groups.BATCH`` at a
    time: the time spent inside the service, apart from the members' work. The first after the
    service's start decodes the stored group; below ``REKEY_ONCE_FROM`` members a second one,
    the figure, finds it in memory."""
    begin = time.monotonic()
    for fleet in big_groups.big_fleet(directory):
        group = big_groups.build(fleet, REKEY_GROUP, n, processing=REKEY_PROCESSING,
                                 progress=progress)  # fmt: skip
        built_s = time.monotonic() - begin
        progress(f"N={n}: group built and seeded in {built_s:.0f} s")
        first = clocks = _one_rekey(fleet, n)
        progress(f"N={n}: first rekey: service {first[0].service:.2f} s, wall {first[1]:.1f} s")
        if n < REKEY_ONCE_FROM:
            fleet.now += 1
            clocks = _one_rekey(fleet, n)
        agreed = {d.groups[REKEY_GROUP].epoch_authenticator for d in group.processing}
        if len(agreed) != 1 or fleet.service.rejections.total:
            raise RuntimeError(f"N={n}: the processing members do not agree, or refusals")
    cold = first[0]
    return _rekey_figures(n, *clocks, cold=cold, built_s=built_s, warm=n < REKEY_ONCE_FROM)


def _rekey_figures(
    n: int, clocks: big_groups.Clocks, wall: float, *, cold: big_groups.Clocks, built_s: float,
    warm: bool,
) -> dict[str, Any]:  # fmt: skip
    # the calls in order: the command (committer chosen, commit requested), the committer's
    # commit (accepted, relayed), then the acks in batches
    (start_s, _), (commit_s, _), *acks = clocks.calls
    acks_s = sum(t for t, _ in acks)
    acked = sum(k for _, k in acks)
    baseline = _ecdsa_verify_ms()
    service = clocks.service
    progress(
        f"N={n}: done in {wall:.1f} s, service {service:.2f} s (start {start_s * 1000:.0f} ms, "
        f"commit {commit_s * 1000:.0f} ms, {acked} acks {acks_s:.2f} s), "
        f"members {clocks.members:.1f} s"
    )
    where = "in memory" if warm else "decoded from the store (the first rekey after a start)"
    return {
        "name": f"rekey_service_s_{n // 1000}k",
        "value": round(service, 2),
        "unit": f"s inside the delivery service from the operator's rekey to done, a seeded "
        f"group of {n} {where} (SQLite; acks handed over {big_groups.BATCH} at a time)",
        "target": None,
        "met": None,
        "members": n,
        "start_ms": round(start_s * 1000, 1),
        "commit_ms": round(commit_s * 1000, 1),
        "acks_s": round(acks_s, 2),
        "acks": acked,
        "ack_batches": len(acks),
        "ms_per_ack": round(acks_s * 1000 / max(1, acked), 3),
        "members_s": round(clocks.members, 1),
        "wall_s": round(wall, 1),
        "first_after_start_service_s": round(cold.service, 2),
        "first_after_start_commit_ms": round(cold.calls[1][0] * 1000, 1),
        "first_after_start_start_ms": round(cold.calls[0][0] * 1000, 1),
        "build_s": round(built_s, 1),
        "largest_result_bytes": max(clocks.largest_result, cold.largest_result),
        "ecdsa_verify_ms": round(baseline, 3),
        "per_ack_in_ecdsa_verifies": round(acks_s * 1000 / max(1, acked) / baseline, 1),
    }


def rekey_records(directory: Path, sizes: tuple[int, ...] = REKEY_SIZES) -> list[dict[str, Any]]:
    out = []
    for n in sizes:
        (directory / str(n)).mkdir()
        out.append(rekey_record(directory / str(n), n))
    return out


def main() -> None:
    # "commit" (commit acceptance up to 100,000 members) only when named: building the groups
    # takes about ten minutes
    which = [a for a in sys.argv[1:] if not a.isdigit()] or ["attestation", "catchup", "audit"]
    sizes = tuple(int(a) for a in sys.argv[1:] if a.isdigit())
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kf-bench-scale-") as tmp:
        if "attestation" in which:
            (Path(tmp) / "attestation").mkdir()
            records += attestation_records(Path(tmp) / "attestation")
        if "catchup" in which:
            (Path(tmp) / "catchup").mkdir()
            records += catch_up_records(Path(tmp) / "catchup")
        if "audit" in which:
            (Path(tmp) / "audit").mkdir()
            records += audit_records(Path(tmp) / "audit")
        if "commit" in which:
            (Path(tmp) / "commit").mkdir()
            records += commit_records(Path(tmp) / "commit", sizes or COMMIT_SIZES)
        if "rekey" in which:
            (Path(tmp) / "rekey").mkdir()
            records += rekey_records(Path(tmp) / "rekey", sizes or REKEY_SIZES)
    print(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
