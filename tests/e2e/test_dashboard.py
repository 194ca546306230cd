"""The dashboard over real HTTPS (uvicorn on a loopback port, mutual TLS against the operator
CA) on a real SQLite registry: who gets a page and who does not, that every page shows what the
registry holds, that tables are paged, that values are HTML-escaped, the security headers, and
the live ack stream."""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from bench.bench_dashboard import (
    UNTRUSTED_REASON,
    Client,
    DashboardPKI,
    device_id,
    make_pki,
    populate,
    register_operator,
)
from firmware_sim.ports import free_port
from provisioning import audit, pki
from provisioning.config import load_config
from provisioning.dashboard import CSP, DashboardServer, DashboardSettings, queries, start_dashboard
from provisioning.db.runtime import create_service_schema
from provisioning.db.schema import Ack as AckRow
from provisioning.db.schema import CommitLogEntry, DeviceTag
from provisioning.registry import (
    DeviceState,
    Outcome,
    Registry,
    Role,
    create_schema,
    make_engine,
    run_in_transaction,
    session_factory,
    tags,
)
from provisioning.service.store import rollouts
from tests.service_deployment import write_golden_policy

pytestmark = pytest.mark.e2e
# the registry on a SQLite file and on PostgreSQL (tests/fixtures/postgres.py)
DATABASE_BACKENDS = ("sqlite", "postgresql")

DEVICES = 1200
PAGE = 50
PAGES = (
    "/",
    "/devices",
    f"/devices/{device_id(7)}",
    "/groups",
    "/groups/grp-000",
    "/rollouts",
    "/keys",
    "/audit",
)


@dataclass
class Dashboard:
    keys: DashboardPKI
    sessions: sessionmaker[Session]
    server: DashboardServer
    now: int

    def client(self, name: str | None = "op-view") -> Client:
        if name is None:
            return Client(self.server.port, self.keys.server_ca, None, None)
        cert, key = self.keys.directory / f"{name}.pem", self.keys.directory / f"{name}.key"
        return Client(self.server.port, self.keys.server_ca, cert, key)

    def get(
        self, path: str, name: str = "op-view", method: str = "GET"
    ) -> tuple[int, dict[str, str], str]:
        client = self.client(name)
        try:
            return client.get(path, method)
        finally:
            client.close()


def _config(directory: Path, keys: DashboardPKI, db_url: str) -> Path:
    """A real service configuration with [dashboard]: start_dashboard reads what serve reads."""
    for name in ("device-ca", "broker-client"):
        key = pki.generate_key()
        pki.write_private_key(directory / f"{name}.key", key)
        (directory / f"{name}.pem").write_bytes(pki.cert_to_pem(keys.server.certificate))
    write_golden_policy(directory / "golden.toml")
    path = directory / "service.toml"
    path.write_text(
        f"""
[database]
url = "{db_url}"
[broker]
host = "127.0.0.1"
ca = "{keys.server_ca}"
client_cert = "broker-client.pem"
client_key = "broker-client.key"
[device_ca]
cert = "device-ca.pem"
key = "device-ca.key"
[operator_ca]
cert = "{keys.operator_ca_path}"
[attestation]
manufacturer_cas = "{keys.server_ca}"
golden_measurements = "golden.toml"
[dashboard]
listen = "127.0.0.1:{free_port()}"
tls_cert = "{keys.server.cert}"
tls_key = "{keys.server.key}"
page_size = {PAGE}
"""
    )
    return path


def _copy_identity(keys: DashboardPKI, name: str, role: str) -> x509.Certificate:
    identity = keys.operator(name, role)
    (keys.directory / f"{name}.pem").write_bytes(identity.cert.read_bytes())
    (keys.directory / f"{name}.key").write_bytes(identity.key.read_bytes())
    (keys.directory / f"{name}.key").chmod(0o600)
    return identity.certificate


@pytest.fixture(scope="module")
def dashboard(
    tmp_path_factory: pytest.TempPathFactory, module_database_url: str | None
) -> Iterator[Dashboard]:
    directory = tmp_path_factory.mktemp("dashboard")
    keys = make_pki(directory / "pki")
    db_url = module_database_url or f"sqlite:///{directory / 'fleet.db'}"
    engine = make_engine(db_url)
    create_schema(engine)
    create_service_schema(engine)
    sessions = session_factory(engine)
    now = int(time.time())
    populate(sessions, devices=DEVICES, groups=3, group_size=120, now=now)
    for name, role in (("op-view", Role.VIEWER), ("op-admin", Role.ADMIN)):
        cert = _copy_identity(keys, name, role.value)
        register_operator(sessions, name, cert, role, now=now)
    _copy_identity(keys, "op-unknown", "viewer")  # from the operator CA, never registered
    # a registered name presenting another certificate than the registered one
    reissued = keys.operator("op-view", "viewer")
    (keys.directory / "op-view-reissued.pem").write_bytes(reissued.cert.read_bytes())
    (keys.directory / "op-view-reissued.key").write_bytes(reissued.key.read_bytes())
    (keys.directory / "op-view-reissued.key").chmod(0o600)
    config = load_config(_config(directory, keys, db_url))
    server = start_dashboard(config, settings=DashboardSettings(page_size=PAGE, poll_seconds=0.1))
    try:
        yield Dashboard(keys, sessions, server, now)
    finally:
        server.stop()
        engine.dispose()


# ---- who gets a page ---------------------------------------------------------------------------


def test_no_client_certificate_is_refused_in_the_handshake(dashboard: Dashboard) -> None:
    client = dashboard.client(None)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        client.get("/")
    client.close()


def test_a_station_certificate_is_refused_in_the_handshake(
    dashboard: Dashboard, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    station_ca = pki.create_ca("station CA", now=now, valid_for=timedelta(days=1))
    key = pki.generate_key()
    cert = pki.issue_client_cert(
        station_ca, key.public_key(), identity="op-view", role="station", now=now,
        valid_for=timedelta(days=1),
    )  # fmt: skip
    pki.write_certificate(tmp_path / "station.pem", cert)
    pki.write_private_key(tmp_path / "station.key", key)
    client = Client(
        dashboard.server.port, dashboard.keys.server_ca, tmp_path / "station.pem",
        tmp_path / "station.key",
    )  # fmt: skip
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        client.get("/")
    client.close()


@pytest.mark.parametrize("name", ["op-unknown", "op-view-reissued"])
@pytest.mark.parametrize("path", ["/", "/devices", "/audit", "/static/dashboard.css"])
def test_an_unregistered_operator_certificate_gets_no_page(
    dashboard: Dashboard, name: str, path: str
) -> None:
    status, headers, body = dashboard.get(path, name)
    assert status == 403
    assert "registered operator" in body
    assert device_id(7) not in body and "<table" not in body
    assert headers["content-security-policy"] == CSP


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("name", ["op-view", "op-admin"])
def test_nothing_but_reads(dashboard: Dashboard, method: str, name: str) -> None:
    for path in ("/", f"/devices/{device_id(7)}", "/groups/grp-000", "/nowhere"):
        status, headers, body = dashboard.get(path, name, method)
        assert status == 405, (method, path)
        assert headers["allow"] == "GET, HEAD"
        assert "read-only" in body


def test_viewer_reads_every_page_with_the_security_headers(dashboard: Dashboard) -> None:
    for path in (*PAGES, "/static/dashboard.css", "/static/dashboard.js"):
        status, headers, body = dashboard.get(path)
        assert status == 200, (path, body[:300])
        assert headers["content-security-policy"] == CSP
        assert headers["x-frame-options"] == "DENY"
        assert headers["cache-control"] == "no-store"
        if path.startswith("/static"):
            continue
        assert 'id="viewer">op-view' in body
        # every asset and link the page names is the dashboard's own
        for url in re.findall(r'(?:src|href|action)="([^"]*)"', body):
            assert url.startswith(("/", "?", "#")) and not url.startswith("//"), url
    assert "http:" not in CSP and "https:" not in CSP and "unsafe" not in CSP


def test_unknown_ids_are_404(dashboard: Dashboard) -> None:
    assert dashboard.get("/devices/dev-nope")[0] == 404
    assert dashboard.get("/groups/nope")[0] == 404
    assert dashboard.get("/groups/nope/events")[0] == 404
    assert dashboard.get("/etc/passwd")[0] == 404


# ---- content against the registry --------------------------------------------------------------


def _cells(body: str, table_id: str) -> list[str]:
    table = body.split(f'id="{table_id}"', 1)[1].split("</table>", 1)[0]
    return re.findall(r"<tr[^>]*data-(?:device|group|seq)=\"([^\"]+)\"", table)


def test_overview_counts_are_the_registry_counts(dashboard: Dashboard) -> None:
    _, _, body = dashboard.get("/")

    def count(state: DeviceState) -> int:
        def work(session: Session) -> int:
            return len(Registry(session).devices(state=state))

        return run_in_transaction(dashboard.sessions, work)

    assert f'id="total-devices">{DEVICES}<' in body
    for state in DeviceState:
        assert f'data-state="{state.value}">{count(state)}<' in body
    untrusted = sum(1 for i in range(DEVICES) if i % 50 == 0 and i % 31)
    assert f'data-attestation="untrusted">{untrusted}<' in body
    assert f'id="untrusted-devices">{untrusted}<' in body


def test_device_list_is_paged_and_filtered(dashboard: Dashboard) -> None:
    _, _, first = dashboard.get("/devices")
    rows = _cells(first, "devices")
    assert rows == [device_id(i) for i in range(PAGE)]
    assert f"page 1 of {-(-DEVICES // PAGE)}" in first
    pages = -(-DEVICES // PAGE)
    _, _, last = dashboard.get(f"/devices?page={pages}")
    assert _cells(last, "devices") == [device_id(i) for i in range((pages - 1) * PAGE, DEVICES)]
    _, _, revoked = dashboard.get("/devices?state=revoked")
    expected = [device_id(i) for i in range(DEVICES) if i % 97 == 0 and i % 31]
    assert _cells(revoked, "devices") == expected[:PAGE]
    _, _, search = dashboard.get("/devices?q=dev-0011")
    assert _cells(search, "devices") == [device_id(i) for i in range(110, 120)]
    # a nonsense filter value is ignored, not passed to SQL
    status, _, body = dashboard.get("/devices?state=%27%3B+drop+table+devices")
    assert status == 200 and len(_cells(body, "devices")) == PAGE


def test_every_table_is_bounded_by_the_page_size(dashboard: Dashboard) -> None:
    for path, table in (
        ("/devices", "devices"),
        ("/devices?page=3", "devices"),
        ("/groups/grp-000", "members-table"),
        ("/audit", "audit"),
        ("/audit?q=kernel", "audit"),
        ("/keys", "device-certs"),
    ):
        _, _, body = dashboard.get(path)
        rows = _cells(body, table)
        assert 0 < len(rows) <= PAGE, (path, len(rows))
    with dashboard.sessions() as session:
        page = queries.device_list(session, page=1, per_page=PAGE)
        assert page.total == DEVICES and len(page.rows) == PAGE


def test_the_keys_page_shows_the_inventory(dashboard: Dashboard) -> None:
    """/keys: the configuration's keys and certificates with their public-key fingerprints (a
    key that is not its certificate's shown as a problem, without a state), the operators, and
    one page of device certificates by expiry with their SP 800-57 states."""
    status, _, body = dashboard.get("/keys")
    assert status == 200
    assert '<a href="/keys" aria-current="page">Keys</a>' in body
    fleet = body.split('id="fleet-keys"', 1)[1].split("</table>", 1)[0]
    kinds = re.findall(r'data-kind="([^"]+)"', fleet)
    assert {"device-ca", "operator-ca", "broker-ca", "service-tls", "dashboard-tls"} <= set(kinds)
    assert {"operator-viewer", "operator-admin"} <= set(kinds)
    operator_ca = dashboard.keys.operator_ca.certificate
    spki = operator_ca.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    operator_row = fleet.split('data-kind="operator-ca"', 1)[1].split("</tr>", 1)[0]
    assert hashlib.sha256(spki).hexdigest()[:16] in operator_row
    assert "not held by the service" in operator_row and "k-active" in operator_row
    # this configuration's device-ca.key is not the key of its device-ca.pem
    device_ca_row = fleet.split('data-kind="device-ca"', 1)[1].split("</tr>", 1)[0]
    assert "public keys differ" in device_ca_row and "k-unknown" in device_ca_row
    rows = _cells(body, "device-certs")
    assert len(rows) == PAGE and f"of {DEVICES}" in body
    # every synthetic device has the same certificate: equal expiry, then by name
    assert rows == sorted(rows)

    def states(session: Session) -> dict[str, DeviceState]:
        return {d.device_id: d.state for d in Registry(session).devices()}

    known = run_in_transaction(dashboard.sessions, states)
    table = body.split('id="device-certs"', 1)[1].split("</table>", 1)[0]
    for row in table.split("<tr data-device=")[1:]:
        device = row.split('"', 2)[1]
        expected = {
            DeviceState.REVOKED: "compromised",
            DeviceState.DESTROYED: "destroyed",
            DeviceState.QUARANTINED: "suspended",
        }.get(known[device], "active")
        assert f"k-{expected}" in row, (device, known[device])
    # the first page holds never-attested (registered) and active devices
    assert {known[d] for d in rows} == {DeviceState.REGISTERED, DeviceState.ACTIVE}
    assert "PRIVATE KEY" not in body


def test_device_page_shows_certificate_keys_attestation_and_groups(dashboard: Dashboard) -> None:
    dev = device_id(100)  # every 50th is untrusted and quarantined
    _, _, body = dashboard.get(f"/devices/{dev}")

    def work(session: Session) -> tuple[object, list[object], list[object]]:
        registry = Registry(session)
        return registry.device(dev), registry.key_states(dev), registry.groups_of(dev)

    record, keys, groups = run_in_transaction(dashboard.sessions, work)
    assert 'class="badge s-quarantined"' in body
    assert "kernel" in body.split('id="attestations"', 1)[1]
    assert 'class="component">kernel<' in body
    assert UNTRUSTED_REASON.split(":", 1)[0] in body
    for key in keys:
        assert f'data-key="{key.key_name}"' in body  # type: ignore[attr-defined]
    assert "active → deactivated" in body  # epoch/g/0's transition
    for member in groups:
        assert f'data-group="{member.group_id}"' in body  # type: ignore[attr-defined]
    fingerprint = queries.certificate_info(record.devid_cert_pem)  # type: ignore[attr-defined]
    assert fingerprint is not None and fingerprint.fingerprint_sha256 in body
    assert "PRIVATE KEY" not in body


def test_group_pages_show_epoch_acks_and_last_rekey(dashboard: Dashboard) -> None:
    _, _, listing = dashboard.get("/groups")
    assert _cells(listing, "groups") == ["grp-000", "grp-001", "grp-002"]
    _, _, body = dashboard.get("/groups/grp-000")
    status = run_in_transaction(dashboard.sessions, lambda s: Registry(s).ack_status("grp-000"))
    assert f'id="epoch">{status.epoch}<' in body
    assert f'id="members">{len(status.members)}<' in body
    assert f'id="pending">{len(status.stragglers)}<' in body
    assert f'id="acked">{len(status.members) - len(status.stragglers)}<' in body
    assert "op-ops" in body.split('id="last-rekey"', 1)[1]
    rows = _cells(body, "members-table")
    assert rows == sorted(status.members)[:PAGE]
    # latency per member in ms: populate() recorded seconds only (as rows from before schema
    # revision 0003), so each is its whole seconds * 1000, printed as the page prints spans
    with dashboard.sessions() as session:
        accepted = session.scalar(
            select(CommitLogEntry.accepted_at).where(
                CommitLogEntry.group_id == "grp-000", CommitLogEntry.epoch == status.epoch - 1
            )
        )
        acked = dict(
            session.execute(
                select(AckRow.device_id, AckRow.received_at).where(
                    AckRow.group_id == "grp-000", AckRow.epoch == status.epoch
                )
            ).all()
        )
    assert accepted is not None and len(acked) >= 2
    shown = dict(
        re.findall(r'<tr id="member-([^"]+)".*?<td class="num latency"([^>]*)>', body, re.S)
    )
    expected = {
        device: f' data-ms="{(acked[device] - accepted) * 1000}"' if device in acked else ""
        for device in rows
    }
    assert shown == expected
    assert {v for v in expected.values() if v} != {' data-ms="0"'}  # not all zero


def test_audit_log_search_paging_and_chain_status(dashboard: Dashboard) -> None:
    _, _, body = dashboard.get("/audit")
    with dashboard.sessions() as session:
        head, _ = queries.audit_head(session)
    seqs = [int(s) for s in _cells(body, "audit")]
    assert seqs == list(range(head, head - PAGE, -1))
    assert "Hash chain verified" in body and f"{head} entries" in body
    older = re.search(r'href="(/audit\?before=\d+)"', body)
    assert older is not None
    _, _, page2 = dashboard.get(older.group(1).replace("&amp;", "&"))
    assert [int(s) for s in _cells(page2, "audit")] == list(range(head - PAGE, head - 2 * PAGE, -1))
    _, _, found = dashboard.get("/audit?q=op.rekey")
    assert len(_cells(found, "audit")) == 3 and "3 matching entries" in found


def test_values_are_html_escaped(dashboard: Dashboard) -> None:
    dev = device_id(3)
    evil = '<script>alert("x")</script><img src=x onerror=1>'

    def work(session: Session) -> None:
        Registry(session).set_device_state(
            dev, DeviceState.QUARANTINED, reason=evil, now=dashboard.now
        )

    run_in_transaction(dashboard.sessions, work)
    _, _, body = dashboard.get(f"/devices/{dev}")
    assert evil not in body
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&lt;img src=x onerror=1&gt;" in body
    _, _, audit = dashboard.get("/audit?q=%3Cscript%3E")
    assert "<script>" not in audit.replace('<script src="/static/dashboard.js" defer></script>', "")


def test_device_tags_are_shown_filtered_and_escaped(dashboard: Dashboard) -> None:
    """Tags (``keyfleet device tag``) on the device list, as a filter, and on the device page.
    A tag row holding HTML (the registry refuses such a tag, ``tag.invalid``; a row written
    past it, by hand or by an older version, must still print as text) is escaped."""
    tagged, other, odd = device_id(5), device_id(8), device_id(9)
    evil = '"><img src=x onerror=1>'

    def work(session: Session) -> None:
        tags.change_tags(session, tagged, add=["line-3", "eu"], now=dashboard.now)
        tags.change_tags(session, other, add=["line-3"], now=dashboard.now)
        session.add(DeviceTag(device_id=odd, tag=evil, added_at=dashboard.now))

    run_in_transaction(dashboard.sessions, work)
    _, _, listing = dashboard.get("/devices")
    row = listing.split(f'data-device="{tagged}"', 1)[1].split("</tr>", 1)[0]
    assert '<a class="tag" data-tag="eu" href="/devices?tag=eu">eu</a>' in row
    assert 'href="/devices?tag=line-3">line-3</a>' in row
    _, _, filtered = dashboard.get("/devices?tag=line-3")
    assert _cells(filtered, "devices") == [tagged, other]
    assert 'name="tag" value="line-3"' in filtered and "2 rows" in filtered
    _, _, none = dashboard.get("/devices?tag=nowhere")
    assert _cells(none, "devices") == [] and "no device matches" in none
    _, _, page = dashboard.get(f"/devices/{tagged}")
    shown = page.split('id="device-tags"', 1)[1].split("</div>", 1)[0]
    assert re.findall(r'data-tag="([^"]+)"', shown) == ["eu", "line-3"]
    _, _, untagged = dashboard.get(f"/devices/{device_id(6)}")
    assert 'class="muted">none<' in untagged.split('id="device-tags"', 1)[1]
    escaped = "&#34;&gt;&lt;img src=x onerror=1&gt;"
    for body in (
        dashboard.get("/devices")[2],
        dashboard.get(f"/devices/{odd}")[2],
        dashboard.get("/devices?tag=" + quote(evil))[2],
    ):
        assert evil not in body and "<img" not in body and escaped in body
    _, _, by_evil = dashboard.get("/devices?tag=" + quote(evil))
    assert _cells(by_evil, "devices") == [odd]
    assert f'href="/devices?tag={quote(evil, safe="")}"' in by_evil


# ---- live acks ----------------------------------------------------------------------------------


def _events(response: http.client.HTTPResponse, deadline: float) -> Iterator[dict[str, object]]:
    event: str | None = None
    while time.monotonic() < deadline:
        line = response.fp.readline().decode()
        if not line:
            return
        line = line.rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: ") and event == "progress":
            yield json.loads(line[6:])


def test_the_event_stream_carries_acks_as_they_are_recorded(dashboard: Dashboard) -> None:
    group = "grp-002"
    status = run_in_transaction(dashboard.sessions, lambda s: Registry(s).ack_status(group))
    waiting = list(status.stragglers)
    assert len(waiting) >= 3
    keys = dashboard.keys
    context = ssl.create_default_context(cafile=str(keys.server_ca))
    context.load_cert_chain(
        str(keys.directory / "op-view.pem"), str(keys.directory / "op-view.key")
    )
    conn = http.client.HTTPSConnection(
        "127.0.0.1", dashboard.server.port, context=context, timeout=30
    )
    try:
        conn.request("GET", f"/groups/{group}/events")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("content-type", "").startswith("text/event-stream")
        stream = _events(response, time.monotonic() + 30)
        first = next(stream)
        assert first["reset"] is True and first["epoch"] == status.epoch
        assert first["pending"] == len(waiting)
        sent_before = {a["device"] for a in first["acks"]}  # type: ignore[union-attr]
        assert sent_before.isdisjoint(waiting)
        for k, dev in enumerate(waiting[:3]):
            # within one second, as a lab's acks are: only milliseconds tell them apart
            at_ms = (dashboard.now + 1) * 1000 + 120 + 45 * k

            def ack(session: Session, dev: str = dev, at_ms: int = at_ms) -> None:
                Registry(session).record_ack(
                    group, epoch=status.epoch, device_id=dev, epoch_authenticator=b"a2",
                    now=dashboard.now + 1, now_ms=at_ms,
                )  # fmt: skip

            run_in_transaction(dashboard.sessions, ack)
            update = next(stream)
            assert update["reset"] is False
            assert [a["device"] for a in update["acks"]] == [dev]  # type: ignore[index]
            assert update["pending"] == len(waiting) - k - 1
            commit_ms = update["commit_at_ms"]
            # populate() recorded the commit in seconds only: it counts from its second
            assert commit_ms == first["commit_at_ms"] == 1000 * update["commit_at"]  # type: ignore[operator]
            assert isinstance(commit_ms, int)
            sent = update["acks"][0]  # type: ignore[index]
            assert (sent["at_ms"], sent["latency_ms"]) == (at_ms, at_ms - commit_ms)
    finally:
        conn.close()


# ---- last: breaks the module's audit chain on purpose --------------------------------------------


def test_a_tampered_audit_entry_shows_as_a_broken_chain(dashboard: Dashboard) -> None:
    with dashboard.sessions() as session, session.begin():
        session.execute(text("UPDATE audit_log SET reason = 'rewritten' WHERE seq = 5"))

    def append(session: Session) -> None:  # a new head: the cached verification is stale
        audit.append(
            session, now=dashboard.now, actor="service", action="test.entry", target="t",
            outcome=Outcome.ACCEPTED,
        )  # fmt: skip

    run_in_transaction(dashboard.sessions, append)
    _, _, body = dashboard.get("/audit")
    assert "Hash chain BROKEN at entry 5: hash mismatch" in body
    assert "Hash chain verified" not in body


def test_the_rollouts_page_shows_each_rollout_and_the_running_ones_devices(
    dashboard: Dashboard,
) -> None:
    _, _, empty = dashboard.get("/rollouts")
    assert "no rollout" in empty or 'data-rollout="' in empty
    waves = ((device_id(1),), (device_id(2), device_id(3)))

    def start(session: Session) -> None:
        rollouts.insert_rollout(
            session,
            rollouts.NewRollout("ro-dash", "1.1", "grp-000", "op-admin", bytes(16), True, waves),
            now=dashboard.now,
        )
        [first, *_] = rollouts.devices(session, "ro-dash", 0)
        first.state, first.previous, first.detail = "installing", "1.0", "<b>x</b>"

    with dashboard.sessions.begin() as session:
        start(session)
    status, _, body = dashboard.get("/rollouts")
    assert status == 200
    assert 'data-rollout="ro-dash"' in body and "running" in body and "1 + 2" in body
    # the running rollout's devices of the waves so far, escaped
    table = body.split('id="rollout-ro-dash"', 1)[1].split("</table>", 1)[0]
    assert re.findall(r'data-device="([^"]+)"', table) == [device_id(1)]
    assert "installing" in table and "&lt;b&gt;x&lt;/b&gt;" in table and "<b>x</b>" not in table
