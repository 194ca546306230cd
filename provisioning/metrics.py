"""Prometheus metrics of one ``keyfleet serve`` instance, in the text exposition format (0.0.4).

Written here rather than with ``prometheus_client``: a handful of counters and one histogram,
and no new dependency on every service host. Each instance exposes its own numbers on
``[metrics] listen``; Prometheus sums them over instances (``sum by (type)`` etc.). What is
counted and the alerts to set are in docs/scale-out.md.

Thread-safe: the service loop updates, the HTTP thread reads.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
ACK_LATENCY_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)
EXPIRING_WINDOW_SECONDS: Final = 30 * 86_400


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if float(value).is_integer() else repr(value)


class Counter:
    """A monotonically increasing count, per label values."""

    def __init__(self, name: str, help_: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_
        self.labels = tuple(labels)
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, *values: str, amount: float = 1.0) -> None:
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name}: expected labels {self.labels}")
        if amount < 0:
            raise ValueError("a counter only goes up")
        with self._lock:
            self._values[values] = self._values.get(values, 0.0) + amount

    def value(self, *values: str) -> float:
        with self._lock:
            return self._values.get(values, 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.labels:
            items = [((), 0.0)]
        for values, count in items:
            yield f"{self.name}{_labels(self.labels, values)} {_number(count)}"


class Histogram:
    """Observations in cumulative buckets (seconds), with sum and count."""

    def __init__(self, name: str, help_: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.help = help_
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * len(self.buckets)
        self._sum = 0.0
        self._count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self._counts[i] += 1
            self._sum += value
            self._count += 1

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        with self._lock:
            counts, total, count = list(self._counts), self._sum, self._count
        for bound, cumulative in zip(self.buckets, counts, strict=True):
            yield f'{self.name}_bucket{{le="{_number(bound)}"}} {cumulative}'
        yield f'{self.name}_bucket{{le="+Inf"}} {count}'
        yield f"{self.name}_sum {_number(total)}"
        yield f"{self.name}_count {count}"


class ExpiryGauges:
    """Seconds until the nearest expiry of the fleet's certificates (per kind) and of the devices'
    DevID certificates, and how many device certificates end within 30 days (those already
    past included). The data is a cache that ``set`` replaces (``keyfleet serve`` re-reads the
    certificate files and the registry every ``[metrics] expiry_refresh_seconds``, in a thread
    of its own): a scrape runs no query, it subtracts the scrape's clock from cached not-after
    values (device ones kept sorted, so the count is a bisection). Nothing is rendered before
    the first ``set``; without devices, only the count (0)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fleet: dict[str, int] = {}
        self._devices: list[int] = []
        self._refreshed_at: int | None = None

    def set(self, fleet: Mapping[str, int], devices: Iterable[int], *, now: int) -> None:
        """``fleet``: kind -> nearest not-after; ``devices``: every live device's not-after."""
        ordered = sorted(devices)
        with self._lock:
            self._fleet, self._devices, self._refreshed_at = dict(fleet), ordered, now

    def render(self, now: float) -> Iterable[str]:
        with self._lock:
            fleet, devices, refreshed = dict(self._fleet), self._devices, self._refreshed_at
        if refreshed is None:
            return
        yield (
            "# HELP keyfleet_fleet_cert_expiry_seconds Seconds until the nearest not-after of "
            "the fleet's own certificates, by kind (negative once expired)."
        )
        yield "# TYPE keyfleet_fleet_cert_expiry_seconds gauge"
        for kind, not_after in sorted(fleet.items()):
            yield (
                f"keyfleet_fleet_cert_expiry_seconds{_labels(('kind',), (kind,))} "
                f"{_number(not_after - int(now))}"
            )
        yield (
            "# HELP keyfleet_device_cert_expiry_seconds Seconds until the nearest not-after of "
            "a DevID certificate of a device not revoked or destroyed (negative once expired)."
        )
        yield "# TYPE keyfleet_device_cert_expiry_seconds gauge"
        if devices:
            yield f"keyfleet_device_cert_expiry_seconds {_number(devices[0] - int(now))}"
        yield (
            "# HELP keyfleet_device_certs_expiring DevID certificates of devices not revoked or "
            "destroyed whose not-after is within 30 days (expired ones included)."
        )
        yield "# TYPE keyfleet_device_certs_expiring gauge"
        count = bisect.bisect_right(devices, int(now) + EXPIRING_WINDOW_SECONDS)
        yield f'keyfleet_device_certs_expiring{{within="30d"}} {count}'
        yield (
            "# HELP keyfleet_expiry_refreshed_timestamp_seconds When the expiry gauges' data "
            "was last read (Unix seconds)."
        )
        yield "# TYPE keyfleet_expiry_refreshed_timestamp_seconds gauge"
        yield f"keyfleet_expiry_refreshed_timestamp_seconds {refreshed}"


class ServiceMetrics:
    """Everything one service instance counts. Names follow Prometheus conventions
    (``keyfleet_`` prefix, ``_total`` for counters, base unit seconds)."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.expiry = ExpiryGauges()
        self.reports = Counter(
            "keyfleet_reports_handled_total",
            "Device reports verified and handled, by message type.",
            ("type",),
        )
        self.commands = Counter(
            "keyfleet_operator_commands_total",
            "Operator commands verified and handled, by command type.",
            ("type",),
        )
        self.rejections = Counter(
            "keyfleet_rejections_total", "Refused messages, by check id.", ("check",)
        )
        self.commits = Counter(
            "keyfleet_commits_total",
            "Group commits: accepted, refused (any check, incl. a taken epoch), rolled_back "
            "(members reported it and the service undid it) or reported (reports judged, the "
            "commit stood).",
            ("outcome",),
        )
        self.attestations = Counter(
            "keyfleet_attestation_verdicts_total",
            "Attestation verdicts recorded: trusted or untrusted.",
            ("result",),
        )
        self.challenges = Counter(
            "keyfleet_attestation_challenges_total",
            "Attestation challenges sent, by trigger (schedule or operator).",
            ("trigger",),
        )
        self.attest_backlog_scans = Counter(
            "keyfleet_attestation_scans_capped_total",
            "Attestation scans that challenged their most ([attestation] "
            "max_challenges_per_second) and left devices due for later scans.",
        )
        self.jobs = Counter(
            "keyfleet_jobs_claimed_total",
            "Group jobs this instance moved forward: claimed (fresh or after its own deadline) "
            "or taken_over (another instance's lease had expired).",
            ("how",),
        )
        self.claims_lost = Counter(
            "keyfleet_claims_lost_total",
            "Compare-and-set claims another instance won first (jobs, tasks, results).",
            ("what",),
        )
        self.tasks = Counter(
            "keyfleet_scheduled_tasks_total",
            "Periodic fleet-wide tasks this instance ran.",
            ("task",),
        )
        self.results = Counter(
            "keyfleet_operation_results_total",
            "Final operator results sent, by status.",
            ("status",),
        )
        self.ack_latency = Histogram(
            "keyfleet_ack_latency_seconds",
            "From a commit's acceptance to each member's ack of the epoch it started.",
            ACK_LATENCY_BUCKETS,
        )

    def all(self) -> list[Counter | Histogram]:
        return [
            self.reports,
            self.commands,
            self.rejections,
            self.commits,
            self.attestations,
            self.challenges,
            self.attest_backlog_scans,
            self.jobs,
            self.claims_lost,
            self.tasks,
            self.results,
            self.ack_latency,
        ]

    def exposition(self, *, instance: str | None = None) -> str:
        lines: list[str] = []
        if instance is not None:
            lines += [
                "# HELP keyfleet_instance_info The instance these numbers come from.",
                "# TYPE keyfleet_instance_info gauge",
                f'keyfleet_instance_info{{instance_id="{_escape(instance)}"}} 1',
            ]
        for metric in self.all():
            lines.extend(metric.render())
        lines.extend(self.expiry.render(self._clock()))
        return "\n".join(lines) + "\n"


class MetricsServer:
    """``GET /metrics`` over plain HTTP in a daemon thread (bind it to loopback or a scrape-only
    network: the numbers carry device ids nowhere, but they are not for the public)."""

    def __init__(
        self, metrics: ServiceMetrics, host: str, port: int, *, instance: str | None = None
    ) -> None:
        registry = metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = registry.exposition(instance=instance).encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return  # scrapes every few seconds would flood the service log

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="keyfleet-metrics", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
