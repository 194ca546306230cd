"""Issue 8, hostile input at the enrollment HTTPS API (``provisioning.http.build_app`` over
``provisioning.enroll.Enrollment``, a real SQLite registry, two swtpm devices through factory
mode): 10,000 malformed request bodies through the ASGI application, and a sample of 300 of them
over the real server (uvicorn, mutual TLS) to show the transport adds nothing.

Seeds are genuine bodies: device 1's ``/v1/enroll/start`` body, with which it was really
enrolled (start, credential activated in its TPM, finish), so every mutant walks all of start's
checks before ``enroll.ek.registered`` could stop it; and device 2's genuine ``/v1/enroll/finish``
body for its open session (its secret activated in its TPM), so mutants reach the constant-time
secret comparison. The mutations are the seeded fuzzer of tests/reliability/test_fuzz_messages.py
(``malform``: bit flips, truncation, insertion, huge lengths, splices, oversize, deep nesting,
values of other types); on top of the body, some inputs go to the other endpoint, carry another
or no content type, lie in their Content-Length header, or arrive in many small chunks.

Station identity on the ASGI path: the request scope carries the ASGI TLS extension
(``scope["extensions"]["tls"]["client_cert_chain"]``, the station certificate's PEM) exactly as
``provisioning.http._TLSH11Protocol`` sets it from the TLS handshake; nothing else is bypassed.
A few inputs come with no certificate (401 ``enroll.station.cert``) or with a certificate of the
station CA that is not a registered station (403 ``enroll.station.unknown``).

For every input: an answer with a documented 4xx status and a CBOR body ``{check, reason}``
whose check id is in docs/ and maps to that status (``status_for``), never a 5xx; done in bounded
time (``PER_INPUT_LIMIT``); no state change (every registry table but the audit log, row for row,
and the set of pending enrollment sessions; the one designed exception: a finish with the wrong
secret ends the session it names, ``enroll.credential``, one try; the test then opens a new one
for device 2 with its genuine start body and activates it, outside the measured input); the app's
rejection counter (``app.state.rejections``) grows by exactly one per input, by check id, and
refusals inside ``Enrollment`` (not the HTTP layer's parsing) add exactly one audit record.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import random
import ssl
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from sqlalchemy import inspect, text
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette

from agent.factory import FactoryDevice
from agent.protocol.secret import Secret
from agent.protocol.wire import cbor
from agent.tpm.store import TPMStore
from provisioning.enroll import Enrollment, FinishRequest, StartResult
from provisioning.http import MAX_BODY, build_app, start_enrollment_server, status_for
from tests.fixtures.swtpm import ManufacturerCA, SwtpmFactory
from tests.reliability.test_fuzz_messages import Tally, malform
from tests.tpm.test_enroll import (
    NOW,
    FleetPKI,
    device_start_request,
    make_pki,
    make_registry,
    make_settings,
)

pytestmark = [pytest.mark.tpm, pytest.mark.long]

INPUTS = 10_000
OVER_TLS = 300
START = "/v1/enroll/start"
FINISH = "/v1/enroll/finish"
DOCUMENTED_STATUS = frozenset({400, 401, 403, 404, 405, 409, 410, 413, 415})
PARSING = ("cbor.", "http.", "enroll.request", "enroll.groups", "enroll.station.cert")
"""Refusals of the HTTP layer itself (before ``Enrollment`` is asked): not audited; everything
else is a refusal by ``Enrollment``, audited once."""
DOCS = "\n".join(p.read_text() for p in (Path(__file__).parents[2] / "docs").glob("*.md"))


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[bytes, bytes] = field(default_factory=dict)


async def asgi_call(
    app: Starlette,
    method: str,
    path: str,
    body: bytes,
    *,
    headers: list[tuple[bytes, bytes]],
    cert_pem: str | None,
    chunks: int = 1,
) -> Answer:
    """One HTTP request through the ASGI interface, the body in ``chunks`` pieces; the client
    certificate in the ASGI TLS extension (what uvicorn + ``_TLSH11Protocol`` pass)."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8443),
        "extensions": {
            "tls": {
                "client_cert_chain": [] if cert_pem is None else [cert_pem],
                "tls_version": 0x0304,
                "server_cert": None,
            }
        },
    }
    size = max(1, -(-len(body) // chunks))
    pieces = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if pieces:
            piece = pieces.pop(0)
            return {"type": "http.request", "body": piece, "more_body": bool(pieces)}
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return Answer(int(start["status"]), data, dict(start.get("headers", [])))


# ---- the service under fire -------------------------------------------------------------------


@dataclass
class Target:
    pki: FleetPKI
    sessions: sessionmaker[Session]
    enrollment: Enrollment
    app: Starlette
    station_pem: str
    stranger_pem: str
    start_body: bytes
    device1: FactoryDevice
    device2: FactoryDevice
    start2_body: bytes
    reported: list[str] = field(default_factory=list)
    finish_body: bytes = b""
    session2: str = ""
    reopened: int = 0

    def seeds(self) -> list[tuple[str, bytes]]:
        return [(START, self.start_body), (FINISH, self.finish_body)]

    def open_session(self) -> None:
        """A fresh enrollment session for device 2 (genuine start, credential activated in its
        TPM): the genuine finish seed."""
        answer = asyncio.run(self.post(START, self.start2_body))
        assert answer.status == 200, cbor.decode(answer.body)
        started = StartResult.from_map(cbor.decode(answer.body))
        secret = self.device2.handle(
            "activate-credential",
            {
                "credential_blob": started.credential_blob,
                "encrypted_secret": started.encrypted_secret,
            },
        )["secret"]
        self.session2 = started.session
        self.finish_body = cbor.encode({"session": started.session, "secret": secret})

    async def post(self, path: str, body: bytes) -> Answer:
        headers = [(b"content-type", b"application/cbor"), (b"content-length", b"%d" % len(body))]
        return await asgi_call(
            self.app, "POST", path, body, headers=headers, cert_pem=self.station_pem
        )


def registry_view(sessions: sessionmaker[Session], *, ended: str = "") -> tuple[bytes, int]:
    """Every table but the audit log, row for row (digest), and the audit log's length; the
    pending enrollment session ``ended`` (if given) left out of ``enroll_sessions``."""
    digest = hashlib.sha256()
    with sessions() as session:
        for name in sorted(inspect(session.connection()).get_table_names()):
            if name in ("audit_log", "audit_head"):
                continue
            rows = session.execute(text(f"SELECT * FROM {name}")).all()
            if name == "enroll_sessions":
                rows = [r for r in rows if r.session_id != ended]
            digest.update(name.encode() + repr(sorted(map(repr, rows))).encode())
        audit_rows = session.execute(text("SELECT COUNT(*) FROM audit_log")).scalar_one()
    return digest.digest(), int(audit_rows)


@pytest.fixture
def target(
    tmp_path: Path, manufacturer_ca: ManufacturerCA, swtpm_factory: SwtpmFactory
) -> Iterator[Target]:
    pki = make_pki(tmp_path / "pki")
    sessions = make_registry(tmp_path / "fleet.db", pki)
    enrollment = Enrollment(make_settings(pki, manufacturer_ca), sessions)
    reported: list[str] = []
    app = build_app(enrollment, clock=lambda: NOW, on_refusal=reported.append)
    _, _, stranger = pki.extra_station("line-unregistered")
    pem = serialization.Encoding.PEM
    with (
        TPMStore(swtpm_factory.start().tcti) as store1,
        TPMStore(swtpm_factory.start(fresh=True).tcti) as store2,
    ):
        device1 = FactoryDevice(store1, tmp_path / "device1", serial="SN-FUZZ-1")
        device2 = FactoryDevice(store2, tmp_path / "device2", serial="SN-FUZZ-2")
        start1, _ = device_start_request(device1, groups=("sensors",))
        start2, _ = device_start_request(device2)
        yield Target(
            pki=pki,
            sessions=sessions,
            enrollment=enrollment,
            app=app,
            station_pem=pki.station_cert.public_bytes(pem).decode(),
            stranger_pem=stranger.public_bytes(pem).decode(),
            start_body=cbor.encode(start1.to_map()),
            device1=device1,
            device2=device2,
            start2_body=cbor.encode(start2.to_map()),
            reported=reported,
        )


def enroll_device1(target: Target) -> None:
    """Device 1 enrolls for real with the start seed (which stays a genuine body)."""
    answer = asyncio.run(target.post(START, target.start_body))
    assert answer.status == 200
    started = StartResult.from_map(cbor.decode(answer.body))
    secret = target.device1.handle(
        "activate-credential",
        {"credential_blob": started.credential_blob, "encrypted_secret": started.encrypted_secret},
    )["secret"]
    body = cbor.encode(FinishRequest(started.session, Secret(secret)).to_map())
    answer = asyncio.run(target.post(FINISH, body))
    assert answer.status == 200, cbor.decode(answer.body)


@dataclass
class HostileRequest:
    method: str
    path: str
    body: bytes
    headers: list[tuple[bytes, bytes]]
    cert: str | None
    chunks: int


def hostile_request(target: Target, n: int) -> HostileRequest:
    """Input ``n`` (seeded by ``n``): a malformed body, and now and then hostile headers."""
    rng = random.Random(n)
    seeds = target.seeds()
    path, _ = rng.choice(seeds)
    body = malform([s for _, s in seeds], rng, limit=MAX_BODY)
    if rng.randrange(10) == 0:  # to the other endpoint
        path = START if path == FINISH else FINISH
    content_type = b"application/cbor"
    if rng.randrange(40) == 0:
        content_type = rng.choice((b"application/json", b"", b"text/plain", b"application/cbo"))
    headers = [(b"content-type", content_type)]
    length = rng.randrange(20)
    if length == 0:
        pass  # no Content-Length
    elif length == 1:
        headers.append((b"content-length", rng.choice((b"-1", b"x", b"99999999", b"1e3"))))
    else:
        headers.append((b"content-length", b"%d" % len(body)))
    cert: str | None = target.station_pem
    roll = rng.randrange(100)
    if roll == 0:
        cert = None
    elif roll == 1:
        cert = target.stranger_pem
    chunks = rng.choice((1, 1, 1, 2, 7, 64))
    return HostileRequest("POST", path, body, headers, cert, chunks)


def check_answer(n: int, answer: Answer) -> str:
    """A documented refusal: 4xx, CBOR ``{check, reason}``, check id in docs, matching status."""
    assert answer.status in DOCUMENTED_STATUS, (n, answer.status, answer.body[:200])
    decoded = cbor.decode(answer.body)
    assert isinstance(decoded, dict) and set(decoded) == {"check", "reason"}, (n, decoded)
    check = decoded["check"]
    assert isinstance(check, str) and f"`{check}`" in DOCS, (n, check)
    assert status_for(check) == answer.status, (n, check, answer.status)
    return check


def test_enrollment_api_meets_10000_malformed_bodies(
    target: Target, swtpm_factory: SwtpmFactory, summary: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    loop = asyncio.new_event_loop()
    try:
        _fuzz(target, loop, summary, capsys)
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def _fuzz(
    target: Target,
    loop: asyncio.AbstractEventLoop,
    summary: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    enroll_device1(target)
    target.open_session()
    rejections = target.app.state.rejections
    tally = Tally()
    audited: Counter[str] = Counter()
    view, audit_rows = registry_view(target.sessions)
    view_ended, _ = registry_view(target.sessions, ended=target.session2)
    pending = target.enrollment.pending_session_ids()
    for n in range(INPUTS):
        request = hostile_request(target, n)
        total = rejections.total
        answer: Any = tally.timed(
            lambda: loop.run_until_complete(
                asgi_call(
                    target.app,
                    request.method,  # noqa: B023
                    request.path,  # noqa: B023
                    request.body,  # noqa: B023
                    headers=request.headers,  # noqa: B023
                    cert_pem=request.cert,  # noqa: B023
                    chunks=request.chunks,  # noqa: B023
                )
            )
        )
        check = check_answer(n, answer)
        tally.refused[check] += 1
        assert rejections.total == total + 1, n
        ended = target.session2 if check == "enroll.credential" else ""
        after, after_audit = registry_view(target.sessions, ended=ended)
        assert after == (view_ended if ended else view), f"input {n} [{check}] changed the registry"
        expected = 0 if check.startswith(PARSING) else 1
        assert after_audit - audit_rows == expected, (n, check)
        audited[check] += expected
        if check == "enroll.credential":  # one try: the session it named is over
            assert target.enrollment.pending_session_ids() == pending - {target.session2}, n
            target.open_session()  # outside the measured input
            target.reopened += 1
            view, after_audit = registry_view(target.sessions)
            view_ended, _ = registry_view(target.sessions, ended=target.session2)
            pending = target.enrollment.pending_session_ids()
        else:
            sessions = target.enrollment.pending_session_ids()
            assert sessions == pending, f"input {n} [{check}]: sessions"
        audit_rows = after_audit
    counted = Counter(rejections.snapshot())
    assert counted == tally.refused == Counter(target.reported)  # app counter, metrics hook
    assert tally.inputs == INPUTS == tally.total_refused
    # the fuzzer reached the deep checks, not only the parser
    for deep in ("enroll.ek.registered", "enroll.credential", "enroll.session.unknown"):
        assert tally.refused[deep] > 0, (deep, tally.refused)
    assert any(c.startswith("enroll.ek.") or c.startswith("tpm.") for c in tally.refused)
    summary.record(
        "fuzz_http_asgi",
        {
            "inputs": tally.inputs,
            "refused": tally.total_refused,
            "accepted": 0,
            "audited": sum(audited.values()),
            "sessions_reopened": target.reopened,
            "slowest_ms": round(tally.slowest * 1e3, 1),
            "by_check": dict(tally.refused.most_common()),
        },
    )
    with capsys.disabled():
        print(f"\nenrollment API (ASGI): {tally.summary()}")


def test_a_sample_over_the_real_mutual_tls_server_is_refused_the_same_way(
    target: Target, summary: Any
) -> None:
    """The first ``OVER_TLS`` inputs' bodies (honest headers: uvicorn's HTTP parser answers a
    lying Content-Length itself, before the app) over HTTPS with the station's certificate."""
    enroll_device1(target)
    target.open_session()
    pki = target.pki
    server = start_enrollment_server(
        target.app,
        server_cert=pki.server_cert_path,
        server_key=pki.server_key_path,
        station_ca=pki.station_ca_path,
    )
    context = ssl.create_default_context(cafile=str(pki.server_ca_path))
    context.load_cert_chain(str(pki.station_cert_path), str(pki.station_key_path))
    rejections = target.app.state.rejections
    before = rejections.total
    view, _ = registry_view(target.sessions)
    tally = Tally()
    try:
        for n in range(OVER_TLS):
            request = hostile_request(target, n)

            def post(request: HostileRequest = request) -> Answer:
                conn = http.client.HTTPSConnection(
                    "127.0.0.1", server.port, context=context, timeout=30
                )
                try:
                    conn.request(
                        "POST",
                        request.path,
                        body=request.body,
                        headers={"Content-Type": "application/cbor"},
                    )
                    response = conn.getresponse()
                    return Answer(response.status, response.read())
                finally:
                    conn.close()

            answer: Any = tally.timed(post)
            check = check_answer(n, answer)
            tally.refused[check] += 1
            if check == "enroll.credential":
                target.open_session()
                view, _ = registry_view(target.sessions)
    finally:
        server.stop()
    assert registry_view(target.sessions)[0] == view
    assert tally.total_refused == OVER_TLS
    assert rejections.total - before == OVER_TLS
    summary.record(
        "fuzz_http_tls",
        {
            "inputs": tally.inputs,
            "refused": tally.total_refused,
            "accepted": 0,
            "slowest_ms": round(tally.slowest * 1e3, 1),
            "by_check": dict(tally.refused.most_common()),
        },
    )
