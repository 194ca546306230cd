"""The fleet service's HTTPS enrollment API for factory stations (Starlette app, uvicorn server).

    POST   /v1/enroll/start       StartRequest  -> StartResult     (provisioning.enroll)
    POST   /v1/enroll/finish      FinishRequest -> DeviceIdentity
    DELETE /v1/enroll/{device}    undo a registration whose install failed (?reason=...)

Bodies are deterministic CBOR (``application/cbor``), at most ``MAX_BODY`` bytes, counted while they
stream in (before decoding) and decoded by the strict ``agent.protocol.wire.cbor``. Errors are CBOR
maps ``{"check": id, "reason": text}`` with a 4xx status (5xx only for the service's own trouble):
400 malformed, 401 no client certificate, 403 a check failed or not a station, 404/410
unknown/expired session, 409 already enrolled, 413 too large, 415 not CBOR. Every refusal is counted
by check id in ``app.state.rejections`` (``agent.protocol.wire.rejections``, as the MQTT side
counts) and passed to ``on_refusal`` (``keyfleet serve``: its metrics).

Transport: mutual TLS. uvicorn is started with ``ssl_cert_reqs=CERT_REQUIRED`` and the station CA
as ``ssl_ca_certs``, so a client without a station certificate never completes the handshake.
The station's identity is its certificate's CN, which must belong to a registered station with
that exact certificate (``Enrollment.authorize_station``). uvicorn (0.54) does not put the peer
certificate into the ASGI scope, so ``_TLSH11Protocol`` (passed as uvicorn's ``http`` protocol
class) reads it from the TLS transport after the handshake and adds the ASGI TLS extension
(``scope["extensions"]["tls"]["client_cert_chain"]``, PEM) to every request of that connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from cryptography import x509
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from agent.protocol.errors import ConfigError, ProtocolError, StateError
from agent.protocol.wire import cbor
from agent.protocol.wire.rejections import Rejections
from provisioning.config import ServiceConfig
from provisioning.db.engine import make_engine, session_factory
from provisioning.enroll import Enrollment, EnrollmentSettings, FinishRequest, StartRequest

log = logging.getLogger("keyfleet.http")

CBOR_TYPE = "application/cbor"
MAX_BODY = 64 * 1024
_STATUS = {
    "http.content-type": 415,
    "http.size": 413,
    "http.route": 404,
    "http.method": 405,
    "enroll.station.cert": 401,
    "enroll.station.unknown": 403,
    "enroll.session.unknown": 404,
    "enroll.session.expired": 410,
    "enroll.session.station": 403,
    "enroll.session.limit": 503,
    "enroll.ek.registered": 409,
    "enroll.revoked": 403,
    "registry.device.exists": 409,
    "registry.device.ek_taken": 409,
    "enroll.revoke.unknown": 404,
    "enroll.revoke.state": 409,
}
_BAD_REQUEST_PREFIXES = ("cbor.", "enroll.request", "enroll.groups", "registry.device.name")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def status_for(check: str) -> int:
    if check in _STATUS:
        return _STATUS[check]
    if check.startswith(_BAD_REQUEST_PREFIXES):
        return 400
    return 403  # a verification the request had to pass did not pass


def cbor_response(value: object, status: int = 200) -> Response:
    return Response(cbor.encode(value), status_code=status, media_type=CBOR_TYPE)


def error_response(check: str, reason: str, status: int | None = None) -> Response:
    return cbor_response({"check": check, "reason": reason}, status or status_for(check))


async def read_body(request: Request, max_body: int = MAX_BODY) -> object:
    """The request's CBOR body, at most ``max_body`` bytes (counted while it streams in)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != CBOR_TYPE:
        raise ProtocolError("http.content-type", f"the body must be {CBOR_TYPE}")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_body):
        raise ProtocolError("http.size", f"the body must be at most {max_body} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body:
            raise ProtocolError("http.size", f"the body must be at most {max_body} bytes")
    return cbor.decode(bytes(body), max_size=max_body)


def _peer_certificate(request: Request) -> x509.Certificate:
    extensions = request.scope.get("extensions") or {}
    chain = (extensions.get("tls") or {}).get("client_cert_chain") or []
    if not chain:
        raise ProtocolError("enroll.station.cert", "no client certificate on this connection")
    try:
        return x509.load_pem_x509_certificate(str(chain[0]).encode())
    except ValueError:
        raise ProtocolError("enroll.station.cert", "client certificate does not parse") from None


def build_app(
    enrollment: Enrollment,
    *,
    clock: Callable[[], float] = time.time,
    rejections: Rejections | None = None,
    on_refusal: Callable[[str], None] | None = None,
) -> Starlette:
    """The ASGI application. ``clock`` gives the service's time (seconds). Refusals (4xx with a
    check id) are counted in ``rejections`` (a new one if not given; ``app.state.rejections``)
    and reported by check id to ``on_refusal``."""
    counted = Rejections() if rejections is None else rejections

    def refused(exc: ProtocolError) -> Response:
        counted.record(exc)
        if on_refusal is not None:
            on_refusal(exc.check)
        return error_response(exc.check, exc.reason)

    async def station_of(request: Request) -> str:
        cert = _peer_certificate(request)
        now = int(clock())
        name: str = await run_in_threadpool(enrollment.authorize_station, cert, now=now)
        return name

    def endpoint(
        work: Callable[[Request, str], Awaitable[object]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            try:
                station = await station_of(request)
                return cbor_response(await work(request, station))
            except ProtocolError as exc:
                log.info("enroll: refused [%s] %s", exc.check, exc.reason)
                return refused(exc)
            except StateError as exc:
                log.warning("enroll: database trouble: %s", exc)
                return error_response("service.unavailable", "the registry is busy; retry", 503)
            except Exception:  # KeyfleetError (InternalError) or a bug: never a raw traceback
                log.exception("enroll: internal error")
                return error_response("service.internal", "internal error in the service", 500)

        return handle

    async def start(request: Request, station: str) -> object:
        parsed = StartRequest.from_map(await read_body(request))
        result = await run_in_threadpool(enrollment.start, station, parsed, now=int(clock()))
        return result.to_map()

    async def finish(request: Request, station: str) -> object:
        parsed = FinishRequest.from_map(await read_body(request))
        try:
            identity = await run_in_threadpool(enrollment.finish, station, parsed, now=int(clock()))
        finally:
            parsed.secret.wipe()
        return identity.to_map()

    async def revoke(request: Request, station: str) -> object:
        device = request.path_params["device"]
        reason = request.query_params.get("reason", "install on the device failed")
        await run_in_threadpool(enrollment.revoke, station, device, reason=reason, now=int(clock()))
        return {"device_id": device, "revoked": True}

    async def not_found(request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException) and exc.status_code == 405:
            return refused(ProtocolError("http.method", "method not allowed here"))
        return refused(ProtocolError("http.route", "no such endpoint"))

    routes = [
        Route("/v1/enroll/start", endpoint(start), methods=["POST"]),
        Route("/v1/enroll/finish", endpoint(finish), methods=["POST"]),
        Route("/v1/enroll/{device}", endpoint(revoke), methods=["DELETE"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    app.state.rejections = counted
    return app


# ---- uvicorn with the client certificate in the scope ---------------------------------------


class _TLSH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus the ASGI TLS extension carrying the client certificate.

    asyncio calls ``connection_made`` only after the TLS handshake, so the peer certificate (the
    server required one) is known here; it is attached to every request on this connection."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # A response goes out as several small TLS records (head, body): with Nagle on, each
        # response after the first waits for the client's delayed ACK, about 40 ms.
        raw = transport.get_extra_info("socket")
        if raw is not None and raw.family in (socket.AF_INET, socket.AF_INET6):
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        chain = [ssl.DER_cert_to_PEM_cert(der)] if der else []
        version = ssl_object.version() if ssl_object is not None else None
        inner: Any = self.app

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope.get("type") == "http":
                extensions = dict(scope.get("extensions") or {})
                extensions["tls"] = {
                    "client_cert_chain": chain,
                    "tls_version": version,
                    "server_cert": None,
                }
                scope["extensions"] = extensions
            await inner(scope, receive, send)

        self.app = app


@dataclass
class EnrollmentServer:
    """A running HTTPS enrollment server (uvicorn in a thread); ``stop()`` ends it."""

    host: str
    port: int
    _server: uvicorn.Server = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=timeout)

    def __enter__(self) -> EnrollmentServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def uvicorn_config(
    app: ASGIApp,
    *,
    server_cert: Path,
    server_key: Path,
    station_ca: Path | None,
    host: str = "127.0.0.1",
    port: int = 8443,
    log_level: str = "warning",
    graceful_timeout: float | None = None,
) -> uvicorn.Config:
    """uvicorn settings for mutual TLS with the clients ``station_ca`` issues (stations; the
    dashboard passes the operator CA); ``station_ca=None``: server TLS only, no client
    certificate asked for (the renewal listener, ``provisioning.renewal_http``).
    ``graceful_timeout`` bounds how long a stop waits for open responses (the dashboard's event
    streams never end by themselves)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=_TLSH11Protocol,
        ws="none",
        lifespan="off",
        ssl_certfile=str(server_cert),
        ssl_keyfile=str(server_key),
        ssl_ca_certs=None if station_ca is None else str(station_ca),
        ssl_cert_reqs=ssl.CERT_NONE if station_ca is None else ssl.CERT_REQUIRED,
        log_level=log_level,
        access_log=False,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=None if graceful_timeout is None else int(graceful_timeout),
    )


def start_enrollment_server(
    app: Starlette,
    *,
    server_cert: Path,
    server_key: Path,
    station_ca: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout: float = 10.0,
) -> EnrollmentServer:
    """Serve ``app`` over HTTPS with mutual TLS in a background thread. ``port=0`` picks a free
    port (the socket is bound here, so the port is known before uvicorn starts)."""
    return start_mtls_server(
        app,
        server_cert=server_cert,
        server_key=server_key,
        client_ca=station_ca,
        host=host,
        port=port,
        startup_timeout=startup_timeout,
    )


def start_mtls_server(
    app: ASGIApp,
    *,
    server_cert: Path,
    server_key: Path,
    client_ca: Path | None,
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout: float = 10.0,
    what: str = "enrollment",
    graceful_timeout: float | None = None,
) -> EnrollmentServer:
    """``app`` over HTTPS in a background thread; the TLS handshake requires a client
    certificate issued by ``client_ca`` (and nothing else), or none with ``client_ca=None``
    (server TLS only). ``what`` names the server in errors and its thread."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        key = "http.listen" if what == "enrollment" else f"{what}.listen"
        raise ConfigError(f"{key}: cannot bind {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    bound_port = int(sock.getsockname()[1])
    config = uvicorn_config(
        app,
        server_cert=server_cert,
        server_key=server_key,
        station_ca=client_ca,
        host=host,
        port=bound_port,
        graceful_timeout=graceful_timeout,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"{what}-http", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise ConfigError(f"the {what} server did not start on {host}:{bound_port}")
        time.sleep(0.01)
    return EnrollmentServer(host=host, port=bound_port, _server=server, _thread=thread)


def serve_enrollment(
    config: ServiceConfig,
    *,
    server_cert: Path,
    server_key: Path,
    station_ca: Path,
) -> None:
    """Run the enrollment API in the foreground on the configuration's ``[http] listen``
    address (what ``keyfleet serve`` calls). The service configuration has no TLS keys for
    the HTTP endpoint yet, so they are passed in."""
    if config.http is None:
        raise ConfigError(f"{config.path}: [http] listen is not set; the enrollment API needs it")
    engine = make_engine(config.database_url)
    try:
        enrollment = Enrollment(
            EnrollmentSettings.from_service_config(config), session_factory(engine)
        )
        server = uvicorn.Server(
            uvicorn_config(
                build_app(enrollment),
                server_cert=server_cert,
                server_key=server_key,
                station_ca=station_ca,
                host=config.http.host,
                port=config.http.port,
            )
        )
        server.run()
    finally:
        engine.dispose()
