"""The enrollment API over real HTTPS (uvicorn on a free loopback port, mutual TLS) with a real
SQLite registry: station authentication from the TLS client certificate, strict CBOR bodies,
error bodies with check ids and status codes."""

from __future__ import annotations

import http.client
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.protocol.errors import ProtocolError
from agent.protocol.wire import cbor
from provisioning.http import MAX_BODY
from provisioning.station import FleetClient
from tests.fixtures.swtpm import ManufacturerCA
from tests.tpm.test_enroll import EnrollmentService, audit_trail, enrollment_service

pytestmark = pytest.mark.e2e
# the registry on a SQLite file and on PostgreSQL (tests/fixtures/postgres.py)
DATABASE_BACKENDS = ("sqlite", "postgresql")


@pytest.fixture
def service(
    tmp_path: Path, manufacturer_ca: ManufacturerCA, database_url: str
) -> Iterator[EnrollmentService]:
    with enrollment_service(tmp_path / "pki", database_url, manufacturer_ca) as service:
        yield service


def _context(service: EnrollmentService, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(service.pki.server_ca_path))
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def _raw(
    service: EnrollmentService,
    method: str,
    path: str,
    body: bytes | None,
    *,
    content_type: str = "application/cbor",
    cert: Path | None = None,
    key: Path | None = None,
) -> tuple[int, object]:
    cert = cert or service.pki.station_cert_path
    key = key or service.pki.station_key_path
    conn = http.client.HTTPSConnection(
        "127.0.0.1", service.server.port, context=_context(service, cert, key), timeout=10
    )
    try:
        conn.request(method, path, body=body, headers={"Content-Type": content_type})
        response = conn.getresponse()
        return response.status, cbor.decode(response.read())
    finally:
        conn.close()


def test_client_without_certificate_cannot_even_connect(service: EnrollmentService) -> None:
    conn = http.client.HTTPSConnection(
        "127.0.0.1", service.server.port, context=_context(service, None, None), timeout=10
    )
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        conn.request("POST", "/v1/enroll/start", body=b"", headers={})
        conn.getresponse().read()
    conn.close()


def test_certificate_of_an_unregistered_station_is_refused_and_audited(
    service: EnrollmentService,
) -> None:
    cert, key, _ = service.pki.extra_station("line-7")
    status, body = _raw(service, "POST", "/v1/enroll/start", cbor.encode({}), cert=cert, key=key)
    assert status == 403
    assert isinstance(body, dict) and body["check"] == "enroll.station.unknown"
    assert audit_trail(service.sessions)[-1][:2] == ("enroll.station", "refused")


@pytest.mark.parametrize(
    "case",
    [
        ("POST", "/v1/enroll/start", b"{}", "application/json", 415, "http.content-type"),
        ("POST", "/v1/enroll/start", b"\xa1\x61a", "application/cbor", 400, "cbor.truncated"),
        (
            "POST",
            "/v1/enroll/start",
            cbor.encode({"x": 1}),
            "application/cbor",
            400,
            "enroll.request",
        ),
        ("POST", "/v1/enroll/start", bytes(MAX_BODY + 1), "application/cbor", 413, "http.size"),
        (
            "POST",
            "/v1/enroll/finish",
            cbor.encode({"session": "nope", "secret": b"s" * 32}),
            "application/cbor",
            404,
            "enroll.session.unknown",
        ),
        ("DELETE", "/v1/enroll/dev-0000", None, "application/cbor", 404, "enroll.revoke.unknown"),
        ("GET", "/v1/enroll/start", None, "application/cbor", 405, "http.method"),
        ("POST", "/v1/nothing", b"", "application/cbor", 404, "http.route"),
    ],
)
def test_errors_are_cbor_with_check_ids(
    service: EnrollmentService, case: tuple[str, str, bytes | None, str, int, str]
) -> None:
    method, path, body, content_type, status, check = case
    got_status, got = _raw(service, method, path, body, content_type=content_type)
    assert (got_status, isinstance(got, dict) and got["check"]) == (status, check)


def test_fleet_client_turns_error_bodies_into_protocol_errors(service: EnrollmentService) -> None:
    client = FleetClient(
        service.server.url,
        cert=service.pki.station_cert_path,
        key=service.pki.station_key_path,
        ca=service.pki.server_ca_path,
    )
    with pytest.raises(ProtocolError) as err:
        client.finish("unknown-session", b"s" * 32)
    assert err.value.check == "enroll.session.unknown"
    assert "HTTP 404" in err.value.reason
    with pytest.raises(ProtocolError) as err:
        client.revoke("dev-0000", "test")
    assert err.value.check == "enroll.revoke.unknown"
