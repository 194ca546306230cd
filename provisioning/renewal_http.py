"""The fleet service's HTTPS renewal listener, for devices whose certificates expired
(``[renewal] expired = "allow"``; docs/attestation.md, "Certificate renewal", after expiry).

    POST /v1/renew/start   {"device": id, "envelope": renew.request} -> {"envelope": challenge}
    POST /v1/renew/finish  {"device": id, "envelope": renew.answer}  -> {"envelope": issued}

The envelopes are the MQTT flow's (signed by the device's DevID key, and by the service's
signing key on the way back); what they are checked against is ``provisioning.service.expired``.
Transport: server TLS only (the device's client certificate has expired: that is why it is
here); the device is identified by the DevID signature of its envelope and proves itself by the
TPM. The HTTP machinery is the enrollment API's (``provisioning.http``): deterministic CBOR
bodies of at most ``MAX_BODY`` bytes (the largest ``renew.answer`` envelope), counted while
they stream in; errors as CBOR maps ``{"check": id, "reason": text}`` with a 4xx status (5xx
for the service's own trouble); every refusal counted by check id and reported to
``on_refusal``. The responses' envelopes are ``renew.challenge`` and ``renew.issued``.

The steps run one at a time (``renew`` is a ``DeliveryService`` of this listener's own, which
is not thread-safe; renewals after expiry are rare).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agent.protocol.errors import ProtocolError, StateError
from agent.protocol.wire.messages.renewal import RenewAnswer
from agent.protocol.wire.rejections import Rejections
from provisioning.http import (
    EnrollmentServer,
    cbor_response,
    error_response,
    read_body,
    start_mtls_server,
)

log = logging.getLogger("keyfleet.http")

START_PATH = "/v1/renew/start"
FINISH_PATH = "/v1/renew/finish"
MAX_DEVICE_ID = 64
# the largest envelope (a renew.answer: its event log is the bulk) and the map around it
MAX_ENVELOPE = RenewAnswer.MAX_MESSAGE_SIZE
MAX_BODY = MAX_ENVELOPE + 256

Renew = Callable[[str, str, bytes, int], bytes]
"""``renew(step, device_id, envelope, now)``: the service's signed answer (bytes), or
``ProtocolError`` (``provisioning.service.expired.renew``)."""


def status_for(check: str) -> int:
    if check == "http.content-type":
        return 415
    if check == "http.size":
        return 413
    if check == "http.route":
        return 404
    if check == "http.method":
        return 405
    if check.startswith(("cbor.", "renew.https.request", "envelope.malformed", "cose.malformed")):
        return 400
    return 403  # a check the request had to pass did not pass


def parse_request(value: object) -> tuple[str, bytes]:
    """``{"device": id, "envelope": bytes}``; raises ``renew.https.request``."""
    if not isinstance(value, dict) or set(value) != {"device", "envelope"}:
        raise ProtocolError(
            "renew.https.request", 'the body must be a map of exactly "device" and "envelope"'
        )
    device, envelope = value["device"], value["envelope"]
    if not isinstance(device, str) or not 0 < len(device) <= MAX_DEVICE_ID:
        raise ProtocolError("renew.https.request", "device must be a device id")
    if not isinstance(envelope, bytes) or not 0 < len(envelope) <= MAX_ENVELOPE:
        raise ProtocolError("renew.https.request", "envelope must be a signed message (bytes)")
    return device, envelope


def build_renewal_app(
    renew: Renew,
    *,
    clock: Callable[[], float] = time.time,
    rejections: Rejections | None = None,
    on_refusal: Callable[[str], None] | None = None,
) -> Starlette:
    """The ASGI application (module docstring). Every refusal is counted in ``rejections``
    (``app.state.rejections``); those of the HTTP layer (body, size, route, method) are also
    reported by check id to ``on_refusal`` (``keyfleet serve``: its metrics), the service's
    own refusals are counted in those metrics by the service."""
    counted = Rejections() if rejections is None else rejections
    lock = threading.Lock()

    def refused(exc: ProtocolError, *, by_service: bool = False) -> Response:
        counted.record(exc)
        if on_refusal is not None and not by_service:
            on_refusal(exc.check)  # the service's own refusals it counts itself
        return error_response(exc.check, exc.reason, status_for(exc.check))

    def run(step: str, device: str, envelope: bytes) -> bytes:
        with lock:
            return renew(step, device, envelope, int(clock()))

    def endpoint(step: str) -> Callable[[Request], object]:
        async def handle(request: Request) -> Response:
            try:
                device, envelope = parse_request(await read_body(request, MAX_BODY))
            except ProtocolError as exc:
                log.info("renewal %s: refused [%s] %s", step, exc.check, exc.reason)
                return refused(exc)
            try:
                answer = await run_in_threadpool(run, step, device, envelope)
                return cbor_response({"envelope": answer})
            except ProtocolError as exc:
                return refused(exc, by_service=True)  # logged by the service
            except (StateError, SQLAlchemyError) as exc:
                log.warning("renewal %s: database trouble: %s", step, exc)
                return error_response("service.unavailable", "the registry is busy; retry", 503)
            except Exception:  # a bug: never a raw traceback
                log.exception("renewal %s: internal error", step)
                return error_response("service.internal", "internal error in the service", 500)

        return handle

    async def not_found(request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException) and exc.status_code == 405:
            return refused(ProtocolError("http.method", "method not allowed here"))
        return refused(ProtocolError("http.route", "no such endpoint"))

    routes = [
        Route(START_PATH, endpoint("start"), methods=["POST"]),
        Route(FINISH_PATH, endpoint("finish"), methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    app.state.rejections = counted
    return app


def start_renewal_server(
    app: Starlette,
    *,
    server_cert: Path,
    server_key: Path,
    host: str = "127.0.0.1",
    port: int = 0,
) -> EnrollmentServer:
    """Serve ``app`` over HTTPS (server TLS only) in a background thread; ``port=0`` picks a
    free port."""
    return start_mtls_server(
        app,
        server_cert=server_cert,
        server_key=server_key,
        client_ca=None,
        host=host,
        port=port,
        what="renewal",
    )


__all__ = ["MAX_BODY", "build_renewal_app", "start_renewal_server", "status_for"]
