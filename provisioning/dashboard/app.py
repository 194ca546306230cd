"""The operator dashboard's ASGI application: read-only pages, an event stream, static assets.

Every request passes ``OperatorGuard`` first, whatever its path (assets too):

1. the connection must carry a client certificate (the TLS layer of the dashboard's own
   listener already refuses a handshake without one chaining to the operator CA; checked again
   here so the app is safe behind any server);
2. that certificate must chain to the operator CA now, and its CN must be a registered operator
   whose registered certificate fingerprint is this certificate's (any role: a viewer reads
   everything the pages show);
3. only GET and HEAD are served: there is nothing to change here, every action stays a signed
   operator command from the CLI.

Refusals are plain text without any fleet data: 401 no certificate, 403 not a registered
operator (or an invalid certificate), 405 any other method. Every response carries a
Content-Security-Policy that allows the dashboard's own origin only (no inline script, no inline
style, nothing from elsewhere) and headers against framing, sniffing and caching.

Pages are Jinja2 templates with autoescaping on (every value is HTML-escaped); the little
JavaScript (``static/dashboard.js``) only fills text nodes and SVG elements from the event
stream's JSON, never HTML strings.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

from cryptography import x509
from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from agent.protocol import authz
from agent.protocol.errors import ProtocolError
from provisioning import audit, inventory, pki
from provisioning.dashboard import pending, queries
from provisioning.dashboard.queries import Viewer
from provisioning.http import ASGIApp, Receive, Scope, Send
from provisioning.registry import AttestationResult, DeviceState, cert_fingerprint
from provisioning.service import operatorops, rollout
from provisioning.service.credentials import operator_role

log = logging.getLogger("keyfleet.dashboard")


CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"strict-transport-security", b"max-age=31536000"),
)
READ_METHODS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True)
class DashboardSettings:
    """``page_size``: rows per table page; ``poll_seconds``: how often an event stream reads
    the database (acks may be written by another service instance, so the database is the only
    place to watch); ``stream_seconds``: an event stream ends after this and the browser
    reconnects (EventSource does it by itself), so a stream never outlives its certificate
    check by long; ``chain_ttl_seconds``: how long an audit-chain verification is reused while
    the head has not moved."""

    page_size: int = 50
    poll_seconds: float = 0.5
    stream_seconds: float = 300.0
    keepalive_seconds: float = 15.0
    chain_ttl_seconds: float = 30.0


# ---- authentication ---------------------------------------------------------------------------


def peer_certificate(scope: Mapping[str, Any]) -> x509.Certificate | None:
    """The client certificate of this connection (ASGI TLS extension, set by
    ``provisioning.http``'s protocol class), or None."""
    extensions = scope.get("extensions") or {}
    chain = (extensions.get("tls") or {}).get("client_cert_chain") or []
    if not chain:
        return None
    try:
        return x509.load_pem_x509_certificate(str(chain[0]).encode())
    except ValueError:
        return None


class OperatorGuard:
    """ASGI middleware: the operator check and the security headers (see the module doc)."""

    def __init__(
        self, app: ASGIApp, authorize: Callable[[x509.Certificate], Viewer | None]
    ) -> None:
        self.app = app
        self.authorize = authorize

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no websockets, no lifespan: nothing but HTTP requests is served

        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.lower() not in {name for name, _ in SECURITY_HEADERS}
                ]
                message = {**message, "headers": headers + list(SECURITY_HEADERS)}
            await send(message)

        async def refuse(status: int, text: str, extra: Mapping[str, str] | None = None) -> None:
            response = PlainTextResponse(text + "\n", status_code=status, headers=extra)
            await response(scope, receive, send_with_headers)

        cert = peer_certificate(scope)
        if cert is None:
            await refuse(401, "an operator client certificate is required")
            return
        viewer = await run_in_threadpool(self.authorize, cert)
        if viewer is None:
            await refuse(403, "this certificate is not the one of a registered operator")
            return
        if scope.get("method") not in READ_METHODS:
            await refuse(
                405, "the dashboard is read-only: use the keyfleet CLI", {"Allow": "GET, HEAD"}
            )
            return
        state = scope.setdefault("state", {})
        state["viewer"] = viewer
        await self.app(scope, receive, send_with_headers)


def operator_authorizer(
    sessions: sessionmaker[Session],
    operator_ca: x509.Certificate,
    clock: Callable[[], float],
    min_approvals: int = 2,
) -> Callable[[x509.Certificate], Viewer | None]:
    verifier = authz.AuthzVerifier([operator_ca])

    def authorize(cert: x509.Certificate) -> Viewer | None:
        try:
            name = pki.common_name(cert)
            pki.verify_certificate(
                cert,
                operator_ca,
                now=datetime.fromtimestamp(clock(), UTC),
                purpose="client",
            )
        except ProtocolError as exc:
            log.info("dashboard: refused a certificate: [%s] %s", exc.check, exc.reason)
            return None
        with sessions() as session:
            viewer = queries.operator_for(session, name, cert_fingerprint(cert))
            # A removed operator (docs/operations.md, "Operator management") sees nothing.
            removed = {
                r.cert_fingerprint
                for r in operatorops.verified_removals(session, verifier, min_approvals)
            }
        if viewer is not None and cert_fingerprint(cert) in removed:
            log.info("dashboard: refused %r: [operator.removed] removed by the quorum", name)
            return None
        if viewer is None:
            log.info("dashboard: refused %r: not a registered operator certificate", name)
            return None
        try:
            # the role shown is the certificate's, narrowed by the registry row (never wider)
            return replace(viewer, role=operator_role(cert, viewer.role))
        except ProtocolError as exc:
            log.info("dashboard: refused %r: [%s] %s", name, exc.check, exc.reason)
            return None

    return authorize


# ---- the audit chain's status -------------------------------------------------------------------


@dataclass(frozen=True)
class ChainStatus:
    ok: bool
    entries: int
    head_seq: int
    head_hash: str
    problem: str | None
    checked_at: int


RECHECK_ENTRIES = 10_000
"""Old entries checked again per verification (about 0.15 s), in successive windows."""


class ChainCache:
    """The audit chain's status, verified incrementally: the first check walks the whole log
    (``audit.verify_chain``); later ones remember the last good head and check only what was
    appended since (``audit.verify_from``, which also re-hashes the remembered entry, so a
    rewrite up to it is found), plus the next window of ``recheck`` old entries, so an old
    entry edited in place is found within a sweep of the log (at once while the log has at
    most ``recheck`` entries). The result is reused while the head is the same and younger
    than ``ttl`` seconds; one verification runs at a time. ``keyfleet audit verify`` always
    walks the whole log."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        ttl: float,
        clock: Callable[[], float],
        recheck: int = RECHECK_ENTRIES,
    ) -> None:
        self._sessions = sessions
        self._ttl = ttl
        self._clock = clock
        self._recheck = recheck
        self._lock = threading.Lock()
        self._cached: tuple[tuple[int, bytes], float, ChainStatus] | None = None
        self._verified: tuple[int, bytes] | None = None  # the last good head
        self._cursor = 1  # the first old entry the next recheck window holds

    def _verify(self, session: Session) -> audit.VerifyResult:
        if self._verified is None:
            result = audit.verify_chain(session)
        else:
            result = audit.verify_from(session, self._verified)
            old = self._verified[0]
            if result.ok and old > 0:
                first = self._cursor if self._cursor <= old else 1
                last = min(old, first + self._recheck - 1)
                window = audit.recheck(session, first, last)
                self._cursor = last + 1 if last < old else 1  # swept to the head: again
                if not window.ok:
                    problem = window.problem
                    assert problem is not None
                    result = audit.VerifyResult(
                        entries=problem.seq - 1,
                        head_seq=problem.seq - 1,
                        head_hash=window.head_hash,
                        problem=problem,
                    )
        self._verified = (result.head_seq, result.head_hash) if result.ok else None
        return result

    def status(self) -> ChainStatus:
        with self._lock, self._sessions() as session:
            head = queries.audit_head(session)
            if self._cached is not None:
                cached_head, at, status = self._cached
                if cached_head == head and time.monotonic() - at < self._ttl:
                    return status
            result = self._verify(session)
            problem = None
            if result.problem is not None:
                p = result.problem
                problem = f"entry {p.seq}: {p.kind.value} [{p.check}]: {p.reason}"
            status = ChainStatus(
                ok=result.ok,
                entries=result.entries,
                head_seq=result.head_seq,
                head_hash=result.head_hash.hex(),
                problem=problem,
                checked_at=int(self._clock()),
            )
            self._cached = (head, time.monotonic(), status)
            return status


# ---- templates -----------------------------------------------------------------------------------


def _fmt_time(value: int | None) -> str:
    if value is None:
        return "—"
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _fmt_ago(value: int | None, now: int) -> str:
    if value is None:
        return "never"
    delta = now - value
    if delta < 0:
        return "in the future"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if delta >= size:
            return f"{delta // size} {unit} ago"
    return f"{delta} s ago"


def _fmt_duration(value: int | None) -> str:
    if value is None:
        return "—"
    if value < 120:
        return f"{value} s"
    return f"{value // 60} min {value % 60} s"


def _fmt_ms(value: int | None) -> str:
    """A span measured in milliseconds as people read it: "38 ms", "1.2 s", "2 min 5 s"."""
    if value is None:
        return "—"
    # integer rounding, half up, as static/dashboard.js does it (the live updates must print
    # what a reload would)
    sign, size = ("-" if value < 0 else ""), abs(value)
    if size < 1000:
        return f"{sign}{size} ms"
    if size < 60_000:
        tenths = (size + 50) // 100
        return f"{sign}{tenths // 10}.{tenths % 10} s"
    return sign + _fmt_duration(size // 1000)


def make_environment() -> Environment:
    env = Environment(
        loader=PackageLoader("provisioning.dashboard", "templates"),
        autoescape=select_autoescape(["html"], default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["ts"] = _fmt_time
    env.filters["duration"] = _fmt_duration
    env.filters["ms"] = _fmt_ms
    env.filters["q"] = lambda value: quote(str(value), safe="")
    env.globals["device_states"] = [s.value for s in DeviceState]
    env.globals["attestation_results"] = [r.value for r in AttestationResult] + [queries.NEVER]
    return env


def _int_param(request: Request, name: str, default: int | None = None) -> int | None:
    value = request.query_params.get(name, "")
    if value.isdigit() and len(value) < 19:
        return int(value)
    return default


def _text_param(request: Request, name: str, allowed: frozenset[str] | None = None) -> str | None:
    value = request.query_params.get(name, "").strip()[:100]
    if not value or (allowed is not None and value not in allowed):
        return None
    return value


def build_dashboard_app(
    sessions: sessionmaker[Session],
    *,
    operator_ca: x509.Certificate,
    settings: DashboardSettings | None = None,
    clock: Callable[[], float] = time.time,
    stop: threading.Event | None = None,
    fleet_keys: Sequence[inventory.KeyFacts] = (),
    min_approvals: int = 2,
) -> OperatorGuard:
    """The dashboard as an ASGI app. ``sessions`` is only read from; ``stop`` ends open event
    streams (set it before stopping the server). ``fleet_keys``: the fleet's own keys and
    certificates for ``/keys`` (``inventory.fleet_facts`` of the configuration, read once when
    the dashboard starts: the configuration does not change under a running service).
    ``min_approvals``: ``[quorum] min_approvals``, to judge operator removals as the service
    does."""
    settings = settings or DashboardSettings()
    stopping = stop or threading.Event()
    env = make_environment()
    chain = ChainCache(sessions, ttl=settings.chain_ttl_seconds, clock=clock)
    per_page = settings.page_size

    def read(work: Callable[[Session], Any]) -> Any:
        with sessions() as session:
            return work(session)

    async def render(
        request: Request, template: str, status: int = 200, **context: Any
    ) -> HTMLResponse:
        now = int(clock())

        def link(path: str, **changes: Any) -> str:
            params = dict(request.query_params)
            params.update({k: v for k, v in changes.items()})
            kept = {k: v for k, v in params.items() if v not in (None, "")}
            return path + ("?" + urlencode(kept) if kept else "")

        html = env.get_template(template).render(
            viewer=request.state.viewer,
            now=now,
            ago=lambda value: _fmt_ago(value, now),
            link=link,
            path=request.url.path,
            **context,
        )
        return HTMLResponse(html, status_code=status)

    async def overview(request: Request) -> Response:
        now = int(clock())
        summary = await run_in_threadpool(read, lambda s: queries.fleet_summary(s, now=now))
        waiting = await run_in_threadpool(read, lambda s: pending.pending_requests(s, now=now))
        return await render(request, "overview.html", summary=summary, pending=waiting)

    async def devices(request: Request) -> Response:
        state = _text_param(request, "state", frozenset(s.value for s in DeviceState))
        attestation = _text_param(
            request,
            "attestation",
            frozenset([*(r.value for r in AttestationResult), queries.NEVER]),
        )
        query = _text_param(request, "q")
        tag = _text_param(request, "tag")
        page = _int_param(request, "page", 1) or 1
        result = await run_in_threadpool(
            read,
            lambda s: queries.device_list(
                s,
                page=page,
                per_page=per_page,
                state=state,
                attestation=attestation,
                query=query,
                tag=tag,
            ),
        )
        return await render(
            request,
            "devices.html",
            devices=result,
            state=state,
            attestation=attestation,
            query=query or "",
            tag=tag or "",
        )

    async def device(request: Request) -> Response:
        device_id = request.path_params["device_id"]
        key_page = _int_param(request, "page", 1) or 1
        detail = await run_in_threadpool(
            read,
            lambda s: queries.device_detail(s, device_id, key_page=key_page, per_page=per_page),
        )
        if detail is None:
            return await render(request, "error.html", 404, message=f"no device {device_id}")
        return await render(request, "device.html", device=detail)

    async def groups(request: Request) -> Response:
        page = _int_param(request, "page", 1) or 1
        query = _text_param(request, "q")
        result = await run_in_threadpool(
            read, lambda s: queries.group_list(s, page=page, per_page=per_page, query=query)
        )
        return await render(request, "groups.html", groups=result, query=query or "")

    async def group(request: Request) -> Response:
        group_id = request.path_params["group_id"]
        page = _int_param(request, "page", 1) or 1
        detail = await run_in_threadpool(
            read,
            lambda s: queries.group_detail(s, group_id, member_page=page, per_page=per_page),
        )
        if detail is None:
            return await render(request, "error.html", 404, message=f"no group {group_id}")
        return await render(request, "group.html", group=detail)

    async def rollouts(request: Request) -> Response:
        rows = await run_in_threadpool(read, rollout.status)
        # the newest first, one page of them: a fleet has few rollouts, each with its devices
        return await render(request, "rollouts.html", rollouts=list(reversed(rows))[:per_page])

    async def keys(request: Request) -> Response:
        """The inventory of ``keyfleet keys list``: the fleet's keys (with what the newest trust
        bundle lists), then operators and stations, then the nearest ``per_page`` device
        certificates to expire."""
        now = int(clock())

        def work(session: Session) -> tuple[list[inventory.KeyFacts], list[inventory.KeyFacts]]:
            holders = inventory.trust_facts(session) + inventory.holder_facts(session)
            return holders, inventory.device_facts(session)

        holders, device_certs = await run_in_threadpool(read, work)
        fleet_rows = inventory.rows([*fleet_keys, *holders], now)
        device_rows = inventory.rows(device_certs, now)
        return await render(
            request,
            "keys.html",
            fleet=fleet_rows,
            devices=device_rows[:per_page],
            device_total=len(device_rows),
        )

    async def audit_log(request: Request) -> Response:
        query = _text_param(request, "q")
        outcome = _text_param(request, "outcome", frozenset({"accepted", "refused"}))
        before = _int_param(request, "before")
        after = _int_param(request, "after")
        result = await run_in_threadpool(
            read,
            lambda s: queries.audit_list(
                s, per_page=per_page, query=query, outcome=outcome, before=before, after=after
            ),
        )
        status = await run_in_threadpool(chain.status)
        return await render(
            request,
            "audit.html",
            entries=result,
            chain=status,
            query=query or "",
            outcome=outcome,
        )

    def read_progress(group_id: str, since: int | None) -> queries.AckProgress | None:
        with sessions() as session:
            return queries.ack_progress(session, group_id, since=since)

    def read_details(
        group_id: str,
    ) -> tuple[queries.RekeyInfo | None, queries.CommitRow | None]:
        # read only when an event is sent: the audit lookup is the stream's costliest query
        with sessions() as session:
            return queries.last_rekey(session, group_id), queries.current_commit(session, group_id)

    async def group_events(request: Request) -> Response:
        group_id = request.path_params["group_id"]
        first = await run_in_threadpool(read_progress, group_id, None)
        if first is None:
            return PlainTextResponse("no such group\n", status_code=404)
        return StreamingResponse(
            _ack_stream(group_id, first),
            media_type="text/event-stream",
            headers={"X-Accel-Buffering": "no"},
        )

    async def _ack_stream(group_id: str, first: queries.AckProgress) -> AsyncIterator[str]:
        """Server-sent events: ``progress`` with every ack not sent yet (all of them, with
        ``reset``, when the epoch changed). The database is polled, not an in-process signal:
        the ack may have been recorded by another service instance."""
        details = await run_in_threadpool(read_details, group_id)
        first_event = _event(first, first.acks, details, reset=True, now=int(clock()))
        yield f"retry: 2000\n\n{first_event}"
        epoch, sent = first.epoch, {device for device, _, _ in first.acks}
        counts = (first.members, first.acked)
        since = max((at for _, at, _ in first.acks), default=None)
        deadline = time.monotonic() + settings.stream_seconds
        quiet_since = time.monotonic()
        while not stopping.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(settings.poll_seconds)
            progress = await run_in_threadpool(read_progress, group_id, since)
            if progress is None:
                yield "event: gone\ndata: {}\n\n"
                return
            reset = progress.epoch != epoch
            if reset:
                progress = await run_in_threadpool(read_progress, group_id, None)
                if progress is None:
                    return
                epoch, sent = progress.epoch, set()
            new = [(d, at, ms) for d, at, ms in progress.acks if d not in sent]
            if reset or new or (progress.members, progress.acked) != counts:
                sent.update(d for d, _, _ in new)
                counts = (progress.members, progress.acked)
                if reset:
                    since = None
                if new:
                    since = max([at for _, at, _ in new] + ([] if since is None else [since]))
                details = await run_in_threadpool(read_details, group_id)
                yield _event(progress, new, details, reset=reset, now=int(clock()))
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > settings.keepalive_seconds:
                yield ": keepalive\n\n"
                quiet_since = time.monotonic()

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        return PlainTextResponse(f"{status}\n", status_code=status)

    routes = [
        Route("/", overview, methods=["GET"]),
        Route("/devices", devices, methods=["GET"]),
        Route("/devices/{device_id}", device, methods=["GET"]),
        Route("/groups", groups, methods=["GET"]),
        Route("/groups/{group_id}", group, methods=["GET"]),
        Route("/groups/{group_id}/events", group_events, methods=["GET"]),
        Route("/rollouts", rollouts, methods=["GET"]),
        Route("/keys", keys, methods=["GET"]),
        Route("/audit", audit_log, methods=["GET"]),
        Mount("/static", StaticFiles(packages=[("provisioning.dashboard", "static")])),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    return OperatorGuard(app, operator_authorizer(sessions, operator_ca, clock, min_approvals))


def _event(
    progress: queries.AckProgress,
    acks: list[tuple[str, int, int]],
    details: tuple[queries.RekeyInfo | None, queries.CommitRow | None],
    *,
    reset: bool,
    now: int,
) -> str:
    """One ``progress`` event: counts, the acks not sent yet, the last rekey and the commit
    that made the current epoch (all public values; the page fills them in as text). Spans
    are milliseconds (``latency_ms``, ``duration_ms``) with their text next to them."""
    commit_ms = progress.commit_at_ms
    rekey, commit = details
    data = {
        "group": progress.group_id,
        "epoch": progress.epoch,
        "members": progress.members,
        "acked": progress.acked,
        "pending": progress.members - progress.acked,
        "commit_at": progress.commit_at,
        "commit_at_ms": commit_ms,
        "now": now,
        "reset": reset,
        "rekey": None
        if rekey is None
        else {
            "operator": rekey.operator,
            "started": _fmt_time(rekey.started_at),
            "result": rekey.result or "in progress",
            "duration_ms": rekey.duration_ms,
            "duration": _fmt_ms(rekey.duration_ms),
        },
        "commit": None
        if commit is None
        else {
            "epoch": commit.epoch,
            "committer": commit.committer,
            "accepted": _fmt_time(commit.accepted_at),
            "acks": commit.acks,
            "last_ack_after": None
            if commit.last_ack_after_ms is None
            else _fmt_ms(commit.last_ack_after_ms),
            "all_acked_in": None
            if commit.last_ack_after_ms is None or progress.acked < progress.members
            else _fmt_ms(commit.last_ack_after_ms),
        },
        "acks": [
            {
                "device": device,
                "at": at,
                "at_ms": at_ms,
                "time": _fmt_time(at),
                "latency_ms": None if commit_ms is None else at_ms - commit_ms,
            }
            for device, at, at_ms in acks
        ],
    }
    return f"event: progress\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
