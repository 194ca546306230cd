"""The burst of first reports through the broker (``python -m bench.bench_device_messages
burst-broker [N]``, docs/bench/README.md "Device messages"): N registered devices (default
100,000) each send one signed ``keys.report``, their first to this service instance, through a
real Mosquitto (mutual TLS, the product ACL) to ``keyfleet serve`` (a subprocess, SQLite file,
as bench/deployment.py starts them); timed from the first publish until the service has
committed the last report.

How the virtual fleet sends: every report is signed with its own device's DevID key, sender
and topic (``kf/v1/dev/<id>/report``), exactly what the device would send, in chunks of
``CHUNK`` just before the chunk is published (a burst longer than the envelope's maximum age,
300 s, would otherwise be refused as stale; the signing is the bench process's CPU, reported
apart). They are published over ``CONNECTIONS`` shared MQTT connections of one bench client,
``bench-burst`` (a certificate of the broker CA), which the ACL lets write every device's
report topic (``ACL_EXTRA``: ``user bench-burst`` / ``topic write kf/v1/dev/+/report``; a real
device can write only its own). The service cannot tell: it checks the envelope's signature,
sender and topic, not the connection. The publishers keep at most ``WINDOW`` reports published
and not yet taken, because the broker queues at most ``max_queued_messages`` (10,000, the
product configuration) for the service and drops QoS 1 messages past that.

The service-side count is the database's: the number of replay rows (one per device, written
in the same transaction as its report's effects), polled every ``POLL_S``. The devices are
seeded as heard from just now with their next attestation an hour away, and the service's
online window is 2 hours instead of 300 s (a report of a device not heard from within the
window brings its attestation forward: with 300 s, every device reporting more than 300 s after
the seeding counts as back from an outage), so that the service's periodic attestation scan
does not challenge 100,000 devices during the burst (a run with 300 s slowed from about 270 to
about 50 reports a second once the burst was past 300 s: the scan's challenges), and in no group:
with 100,000 group members the rekey policy's periodic check (every 10 s it reads every
group's members and their last self-updates) takes most of the service's time and the burst
crawls (about 5 reports a second measured on the loaded machine). Neither is a report's cost.

What 100,000 real devices would add, which this bench does not pay: 100,000 mutual-TLS
connections at the broker. ``device_tls`` measures it apart: ``TLS_SAMPLES`` real devices
(their DevID certificate and key) connect, are accepted (CONNACK) and disconnect one after the
other; the figure is the broker's CPU time (its /proc stat) per connection, and the wall time
of one connection seen from the device.

Environment: ``BURST_TLS_SAMPLES`` (default 300) devices for that measurement;
``BURST_BROKER_CONF`` further Mosquitto configuration lines (``\\n`` between them), e.g.
``max_inflight_messages 200`` to let the broker hand the service bigger batches;
``BURST_PROFILE`` a file for ``keyfleet serve``'s cProfile statistics (written when it stops).
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from sqlalchemy import delete, update

from agent.mqtt import MqttClient
from bench.bench_device_messages import (
    BURST_TARGET_S,
    VERIFY_ROUNDS,
    Device_,
    Signer,
    _ecdsa_verify_ms,
    make_fleet,
    report_body,
)
from bench.bench_device_messages import seed as seed_fleet
from bench.bench_scale import progress
from bench.deployment import Deployment, deployment
from provisioning.db.schema import Device, Group, GroupMember
from provisioning.registry import make_engine
from tests.device_certs import device_ca as test_device_ca

BENCH_CLIENT = "bench-burst"
ACL_EXTRA = (
    f"\n# bench: the burst's publisher\nuser {BENCH_CLIENT}\ntopic write kf/v1/dev/+/report\n"
)
CONNECTIONS = 4
CHUNK = 250  # reports per publish_all (then the PUBACKs of the chunk)
WINDOW = 8_000  # reports published and not yet taken (the broker queues 10,000 for the service)
POLL_S = 0.1
TLS_SAMPLES = int(os.environ.get("BURST_TLS_SAMPLES", "300"))
TIMEOUT_S = 3_600.0
ONLINE_WINDOW_S = 7_200  # the service's online window during the burst (the product's: 300 s)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _thread_cpu_s(pid: int) -> dict[int, float]:
    """Each thread's CPU seconds (its /proc task stat), by thread id (the main thread's is
    ``pid``)."""
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def _taken(path: Path) -> int:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
        return int(db.execute("SELECT count(*) FROM service_replay").fetchone()[0])


def device_tls(
    site: Deployment, fleet: list[Device_], pems: list[str], count: int
) -> dict[str, Any]:
    """``count`` real devices connect one after the other with their DevID certificate (mutual
    TLS, CONNACK), then disconnect: the broker's CPU per connection and the device's wall time."""
    files = site.workdir / "devices"
    files.mkdir(exist_ok=True)
    clients: list[tuple[str, Path, Path]] = []
    for i in range(count):
        device_id, key = fleet[i]
        cert = files / f"{device_id}.pem"
        key_file = files / f"{device_id}.key"
        cert.write_text(pems[i])
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_file.chmod(0o600)
        clients.append((device_id, cert, key_file))
    broker_pid = site.broker.pid
    walls: list[float] = []
    cpu = _cpu_s(broker_pid)
    begin = time.perf_counter()
    for device_id, cert, key_file in clients:
        client = MqttClient(
            host=site.broker.host,
            port=site.broker.port,
            ca_file=site.broker.ca_file,
            cert_file=cert,
            key_file=key_file,
            client_id=device_id,
            clean_start=True,
            session_expiry=0,
        )
        started = time.perf_counter()
        client.connect(timeout=30)
        walls.append(time.perf_counter() - started)
        client.close()
    spent = time.perf_counter() - begin
    broker_cpu = _cpu_s(broker_pid) - cpu
    walls.sort()
    return {
        "connections": count,
        "broker_cpu_ms_per_connection": round(broker_cpu * 1000 / count, 3),
        "device_connect_ms_median": round(walls[len(walls) // 2] * 1000, 2),
        "wall_s": round(spent, 2),
    }


def publish(site: Deployment, signer: Signer, n: int, db_path: Path) -> dict[str, Any]:
    """Every device's report over ``CONNECTIONS`` connections of the bench client, at most
    ``WINDOW`` ahead of the service; returns once the service took them all. A chunk is signed
    when it may be sent (the envelope's ``time`` then, so that a burst longer than the
    envelope's maximum age is not refused as stale): the signing is the bench process's, on the
    same cores as the service (its CPU is returned)."""
    files = site.broker.pki.client(BENCH_CLIENT, role="bench")
    clients = [
        MqttClient(
            host=site.broker.host,
            port=site.broker.port,
            ca_file=files.ca_file,
            cert_file=files.cert_file,
            key_file=files.key_file,
            client_id=f"{BENCH_CLIENT}-{c}",
            clean_start=True,
            session_expiry=0,
            max_inflight=CHUNK,
            timeout=600,
        )
        for c in range(CONNECTIONS)
    ]
    for client in clients:
        client.connect(timeout=30)
    base = _taken(db_path)
    state = {"taken": 0, "published": 0}
    lock = threading.Condition()
    errors: list[BaseException] = []

    def sender(c: int) -> None:
        mine = range(c, n, CONNECTIONS)
        try:
            for start in range(0, len(mine), CHUNK):
                indices = mine[start : start + CHUNK]
                with lock:
                    while state["published"] - state["taken"] > WINDOW - len(indices):
                        lock.wait(1.0)
                    state["published"] += len(indices)
                now = int(time.time())
                clients[c].publish_all([signer.sign(i, report_body(), now) for i in indices])
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    server_pid = site.service.pid
    cpu = {
        "service": _cpu_s(server_pid),
        "broker": _cpu_s(site.broker.pid),
        "bench": time.process_time(),
    }
    threads = [threading.Thread(target=sender, args=(c,), daemon=True) for c in range(CONNECTIONS)]
    per_thread = _thread_cpu_s(server_pid)
    spy = None
    if os.environ.get("BURST_PYSPY"):  # "<py-spy executable> <output file>"
        command, output = os.environ["BURST_PYSPY"].split()
        spy = subprocess.Popen(
            [
                command,
                "record",
                "--pid",
                str(server_pid),
                "--threads",
                "--rate",
                "200",
                "--format",
                "raw",
                "--output",
                output,
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
        )
    begin = time.perf_counter()
    for thread in threads:
        thread.start()
    deadline = begin + TIMEOUT_S
    last_note = begin
    while True:
        taken = _taken(db_path) - base
        with lock:
            state["taken"] = taken
            lock.notify_all()
        now = time.perf_counter()
        if taken >= n:
            break
        if errors:
            raise RuntimeError(f"publishing failed: {errors[0]}")
        if now > deadline:
            raise RuntimeError(f"only {taken} of {n} reports taken in {TIMEOUT_S:g} s")
        if now - last_note > 30:
            last_note = now
            progress(f"  {taken} of {n} taken after {now - begin:.0f} s, load {os.getloadavg()}")
        time.sleep(POLL_S)
    spent = time.perf_counter() - begin
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
    threads_used = _thread_cpu_s(server_pid)
    main_thread = threads_used.get(server_pid, 0.0) - per_thread.get(server_pid, 0.0)
    used = {
        "service_main_thread": main_thread,
        "service_other_threads": sum(threads_used.values())
        - sum(per_thread.values())
        - main_thread,
        "service": _cpu_s(server_pid) - cpu["service"],
        "broker": _cpu_s(site.broker.pid) - cpu["broker"],
        "bench": time.process_time() - cpu["bench"],
    }
    for thread in threads:
        thread.join(60)
    for client in clients:
        client.close()
    return {"s": spent} | {f"{k}_cpu_ms_per_report": v * 1000 / n for k, v in used.items()}


def burst_broker(n: int) -> dict[str, Any]:
    begin = time.monotonic()
    fleet, pems = make_fleet(n)
    progress(f"burst-broker: {n} devices made in {time.monotonic() - begin:.0f} s")
    with (
        tempfile.TemporaryDirectory() as tmp,
        deployment(
            Path(tmp) / "site",
            device_ca=test_device_ca(),
            acl_extra=ACL_EXTRA,
            tcp_nodelay=True,
            broker_conf=os.environ.get("BURST_BROKER_CONF", "").replace("\\n", "\n"),
            profile=Path(os.environ["BURST_PROFILE"]) if os.environ.get("BURST_PROFILE") else None,
            # the seeded devices stay "heard from" for the whole burst (see the docstring)
            service_conf=f"online_window_seconds = {ONLINE_WINDOW_S}\n",
        ) as site,
    ):
        assert site.db_url.startswith("sqlite:///")
        db_path = Path(site.db_url.removeprefix("sqlite:///"))
        now = int(time.time())
        engine = make_engine(site.db_url)
        seed_fleet(engine, fleet, pems, now=now)
        with engine.begin() as connection:
            # heard from just now, attested: the periodic scan leaves them alone meanwhile
            connection.execute(update(Device).values(attest_due=now + 3600))
            # not group members: with 100,000 members in groups, the rekey policy's check
            # (every 10 s, it reads every group's members and leaf rows) takes most of the
            # service's time during the burst (docs/bench/README.md); that is not a report's
            connection.execute(delete(GroupMember))
            connection.execute(delete(Group))
        engine.dispose()
        progress(f"burst-broker: seeded after {time.monotonic() - begin:.0f} s")
        tls = device_tls(site, fleet, pems, min(TLS_SAMPLES, n))
        progress(f"burst-broker: device TLS {tls}")
        signer = Signer(fleet)
        gc.collect()
        gc.freeze()  # the fleet's keys: see bench_device_messages.take
        load = os.getloadavg()
        verify_before = _ecdsa_verify_ms(VERIFY_ROUNDS)
        figures = publish(site, signer, n, db_path)
        verify_ms = (verify_before + _ecdsa_verify_ms(VERIFY_ROUNDS)) / 2
        load_after = os.getloadavg()
    spent = figures["s"]
    return {
        "name": f"device_report_burst_broker_n{n}_s",
        "value": round(spent, 1),
        "unit": "s",
        "target": BURST_TARGET_S,
        "met": spent <= BURST_TARGET_S if n >= 100_000 else None,
        "reports": n,
        "ms_per_report": round(spent * 1000 / n, 3),
        "extrapolated_100k_s": round(spent * 100_000 / n, 1),
        "service_cpu_ms_per_report": round(figures["service_cpu_ms_per_report"], 3),
        "service_main_thread_cpu_ms_per_report": round(
            figures["service_main_thread_cpu_ms_per_report"], 3
        ),
        "service_other_threads_cpu_ms_per_report": round(
            figures["service_other_threads_cpu_ms_per_report"], 3
        ),
        # the service's CPU per report in ECDSA P-256 verifies timed just before and after
        "service_cpu_verifies_per_report": round(
            figures["service_cpu_ms_per_report"] / verify_ms, 2
        ),
        "verify_ms": round(verify_ms, 4),
        "one_core_100k_s": round(figures["service_cpu_ms_per_report"] * 100, 1),
        "broker_cpu_ms_per_report": round(figures["broker_cpu_ms_per_report"], 3),
        "bench_cpu_ms_per_report": round(figures["bench_cpu_ms_per_report"], 3),
        "device_tls": tls,
        "load_average_before_after": [round(load[0], 1), round(load_after[0], 1)],
        "how": (
            f"keyfleet serve (subprocess, SQLite file) behind Mosquitto (mutual TLS, product ACL);"
            " reports signed as they may be sent, published over"
            f" {CONNECTIONS} connections of one bench client"
            f" (ACL: topic write kf/v1/dev/+/report), at most {WINDOW} ahead of the service;"
            " time from first publish to the last report committed (replay rows counted)"
        ),
    }
