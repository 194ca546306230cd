"""Dashboard page render time with 10,000 registered devices (JSON on stdout).

A registry is filled through the repository (``populate``: devices in every state, attestation
verdicts with their audit entries, key states with transitions, groups with members, commits and
acks; no MQTT, no TPM), then the real dashboard runs on its HTTPS listener with mutual TLS and a
registered viewer certificate, and each page is fetched ``ROUNDS`` times over one kept-alive
connection: overview, device list (first and last page, a filter), a device, the groups list, a
group of 1,000 members, the audit log (first page, a search, an old page by seq). The time is
the whole request as a client sees it (TLS on loopback, the queries, template rendering); the
audit page's chain verification is cached per head, so its first render is reported apart.

``populate`` is also what ``tests/e2e/test_dashboard.py`` uses to check that pages are paged.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import ssl
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from agent.protocol.lifecycle import KeyState
from provisioning import audit, pki
from provisioning.dashboard import DashboardSettings, build_dashboard_app
from provisioning.http import start_mtls_server
from provisioning.registry import (
    AttestationResult,
    DeviceState,
    KeyStateReport,
    Outcome,
    Registry,
    Role,
    cert_fingerprint,
    create_schema,
    make_engine,
    run_in_transaction,
    session_factory,
)

DEVICES = 10_000
GROUPS = 40
BIG_GROUP = 1_000
ROUNDS = 20
TARGET_MS = 500  # a page a person waits for; the issue's "stays responsive"
UNTRUSTED_REASON = (
    "[attest.policy.digest] kernel: digest 3f9a… not in policy (approved versions: 1.0)"
)


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path
    certificate: Any


@dataclass(frozen=True)
class DashboardPKI:
    """A server CA and certificate for the dashboard listener, an operator CA, and viewers."""

    directory: Path
    server_ca: Path
    server: Identity
    operator_ca: pki.CertificateAuthority
    operator_ca_path: Path

    def operator(self, name: str, role: str = "viewer") -> Identity:
        now = datetime.now(UTC)
        key = pki.generate_key()
        cert = pki.issue_client_cert(
            self.operator_ca,
            key.public_key(),
            identity=name,
            role=role,
            now=now,
            valid_for=timedelta(days=1),
        )
        stem = self.directory / f"{name}-{cert.serial_number:x}"
        pki.write_certificate(stem.with_suffix(".pem"), cert)
        pki.write_private_key(stem.with_suffix(".key"), key)
        return Identity(stem.with_suffix(".pem"), stem.with_suffix(".key"), cert)


def make_pki(directory: Path) -> DashboardPKI:
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    valid = timedelta(days=1)
    server_ca = pki.create_ca("dashboard TLS CA", now=now, valid_for=valid)
    operator_ca = pki.create_ca("operator CA", now=now, valid_for=valid)
    key = pki.generate_key()
    cert = pki.issue_server_cert(
        server_ca,
        key.public_key(),
        common_name="keyfleet-dashboard",
        dns_names=["localhost"],
        ip_addresses=["127.0.0.1"],
        now=now,
        valid_for=valid,
    )
    pki.write_certificate(directory / "server-ca.pem", server_ca.certificate)
    pki.write_certificate(directory / "server.pem", cert)
    pki.write_private_key(directory / "server.key", key)
    pki.write_certificate(directory / "operator-ca.pem", operator_ca.certificate)
    return DashboardPKI(
        directory=directory,
        server_ca=directory / "server-ca.pem",
        server=Identity(directory / "server.pem", directory / "server.key", cert),
        operator_ca=operator_ca,
        operator_ca_path=directory / "operator-ca.pem",
    )


def register_operator(
    sessions: sessionmaker[Session], name: str, cert: Any, role: Role, *, now: int
) -> None:
    def work(session: Session) -> None:
        Registry(session).add_operator(
            name, cert_fingerprint=cert_fingerprint(cert), role=role, now=now
        )

    run_in_transaction(sessions, work)


def _devid_pem() -> str:
    """One real (public) DevID certificate shared by the synthetic devices: issuing 10,000
    would time the issuer, not the dashboard."""
    now = datetime.now(UTC)
    ca = pki.create_ca("synthetic device CA", now=now, valid_for=timedelta(days=30))
    key = pki.generate_key()
    cert = pki.issue_client_cert(
        ca, key.public_key(), identity="synthetic", role="device", now=now,
        valid_for=timedelta(days=30),
    )  # fmt: skip
    return pki.cert_to_pem(cert).decode()


def device_id(i: int) -> str:
    return f"dev-{i:05d}"


def populate(
    sessions: sessionmaker[Session],
    *,
    devices: int,
    groups: int = 4,
    group_size: int = 10,
    now: int,
    batch: int = 1000,
) -> dict[str, int]:
    """Fill the registry: ``devices`` devices (mostly active and trusted; every 50th untrusted
    and quarantined, every 97th revoked, every 31st never attested), four keys each with their
    transitions, one ``attest.verdict`` audit entry per attested device, ``groups`` groups of
    ``group_size`` members at epoch 2 (the last commit half acked), and an operator rekey per
    group in the audit log. Returns counts."""
    pem = _devid_pem()
    counts = {"devices": 0, "audit": 0, "keys": 0}

    def fill(start: int, stop: int) -> None:
        def work(session: Session) -> None:
            registry = Registry(session)
            for i in range(start, stop):
                dev = device_id(i)
                at = now - (devices - i) * 30
                registry.register_device(
                    dev,
                    ek_cert_fingerprint=hashlib.sha256(dev.encode()).hexdigest(),
                    devid_cert_pem=pem,
                    now=at,
                )
                registry.record_report(
                    dev,
                    b"\xa0",
                    [
                        KeyStateReport("devid", KeyState.ACTIVE, at, "devid"),
                        KeyStateReport("ak", KeyState.ACTIVE, at, "ak"),
                        KeyStateReport("epoch/g/0", KeyState.ACTIVE, at, "epoch"),
                        KeyStateReport("epoch/g/0", KeyState.DEACTIVATED, at + 60, "epoch"),
                        KeyStateReport("epoch/g/1", KeyState.ACTIVE, at + 60, "epoch"),
                    ],
                    now=at + 60,
                )
                if i % 31 == 0:
                    continue
                untrusted = i % 50 == 0
                result = AttestationResult.UNTRUSTED if untrusted else AttestationResult.TRUSTED
                reason = UNTRUSTED_REASON if untrusted else "[attest.trusted] approved firmware"
                registry.record_attestation(dev, result, reason=reason, now=at + 120)
                state = DeviceState.QUARANTINED if untrusted else DeviceState.ACTIVE
                registry.set_device_state(dev, state, reason=reason[:80], now=at + 120)
                if i % 97 == 0:
                    registry.set_device_state(
                        dev, DeviceState.REVOKED, reason="lost in the field", now=at + 180
                    )
                audit.append(
                    session,
                    now=at + 120,
                    actor=f"device:{dev}",
                    action="attest.verdict",
                    target=dev,
                    outcome=Outcome.ACCEPTED,
                    reason=reason,
                    details={
                        "result": result.value,
                        "check": "attest.policy.digest" if untrusted else "attest.trusted",
                        "component": "kernel" if untrusted else None,
                        "keys": None,
                    },
                )
                counts["audit"] += 1

        run_in_transaction(sessions, work)

    for start in range(0, devices, batch):
        fill(start, min(devices, start + batch))
    counts["devices"] = devices
    counts["keys"] = devices * 4

    members_by_group: list[list[str]] = []
    eligible = [device_id(i) for i in range(devices) if i % 50 and i % 97]
    for g in range(groups):
        chosen = eligible[(g * group_size) % len(eligible) :][:group_size]
        members_by_group.append(chosen)

    for g, members in enumerate(members_by_group):

        def make_group(session: Session, g: int = g, members: list[str] = members) -> None:
            registry = Registry(session)
            group = f"grp-{g:03d}"
            t0 = now - 3600
            registry.create_group(
                group, creator=members[0], public_tree=b"t", group_context=b"c", now=t0
            )
            for dev in members[1:]:
                registry.request_add(group, dev, now=t0)
            registry.append_commit(
                group,
                epoch=0,
                committer=members[0],
                commit=b"commit-0",
                welcome=b"welcome-0",
                public_tree=b"t1",
                group_context=b"c1",
                added={dev: leaf for leaf, dev in enumerate(members[1:], start=1)},
                now=t0 + 5,
            )
            for dev in members:
                registry.record_ack(
                    group, epoch=1, device_id=dev, epoch_authenticator=b"a1", now=t0 + 7
                )
            audit.append(
                session,
                now=now - 100,
                actor="operator:op-ops",
                action="op.rekey",
                target=group,
                outcome=Outcome.ACCEPTED,
                details={"command_id": f"{g:032x}", "jobs": 1},
            )
            registry.append_commit(
                group,
                epoch=1,
                committer=members[1],
                commit=b"commit-1",
                welcome=None,
                public_tree=b"t2",
                group_context=b"c2",
                now=now - 98,
            )
            for k, dev in enumerate(members[: len(members) // 2]):
                registry.record_ack(
                    group,
                    epoch=2,
                    device_id=dev,
                    epoch_authenticator=b"a2",
                    now=now - 98 + k % 5,
                )

        run_in_transaction(sessions, make_group)
    counts["groups"] = groups
    return counts


class Client:
    """One kept-alive HTTPS connection with a client certificate."""

    def __init__(self, port: int, ca: Path, cert: Path | None, key: Path | None) -> None:
        context = ssl.create_default_context(cafile=str(ca))
        if cert is not None and key is not None:
            context.load_cert_chain(str(cert), str(key))
        self.conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=60)

    def get(self, path: str, method: str = "GET") -> tuple[int, dict[str, str], str]:
        self.conn.request(method, path)
        response = self.conn.getresponse()
        body = response.read().decode(errors="replace")
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body

    def close(self) -> None:
        self.conn.close()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        directory = Path(tmp)
        engine = make_engine(f"sqlite:///{directory / 'fleet.db'}")
        create_schema(engine)
        sessions = session_factory(engine)
        now = int(time.time())
        start = time.monotonic()
        counts = populate(
            sessions, devices=DEVICES, groups=GROUPS, group_size=BIG_GROUP // 4, now=now
        )
        big = populate_big_group(sessions, now=now)
        fill_seconds = time.monotonic() - start
        keys = make_pki(directory / "pki")
        viewer = keys.operator("op-view")
        register_operator(sessions, "op-view", viewer.certificate, Role.VIEWER, now=now)
        settings = DashboardSettings(page_size=50)
        app = build_dashboard_app(
            sessions, operator_ca=keys.operator_ca.certificate, settings=settings
        )
        server = start_mtls_server(
            app,
            server_cert=keys.server.cert,
            server_key=keys.server.key,
            client_ca=keys.operator_ca_path,
            what="dashboard",
            graceful_timeout=1,
        )
        client = Client(server.port, keys.server_ca, viewer.cert, viewer.key)
        pages = {
            "overview": "/",
            "devices_first_page": "/devices",
            "devices_last_page": f"/devices?page={DEVICES // 50}",
            "devices_filtered_untrusted": "/devices?attestation=untrusted",
            "device": f"/devices/{device_id(DEVICES // 2)}",
            "groups": "/groups",
            "group_1000_members": f"/groups/{big}",
            "audit_first_page": "/audit",
            "audit_search": "/audit?q=kernel",
            "audit_old_page": "/audit?before=100",
        }
        results: list[dict[str, Any]] = []
        try:
            first_audit = time.perf_counter()
            status, _, _ = client.get("/audit")
            audit_cold = time.perf_counter() - first_audit
            assert status == 200, status
            for name, path in pages.items():
                times = []
                size = 0
                for _ in range(ROUNDS):
                    t = time.perf_counter()
                    status, _, body = client.get(path)
                    times.append(time.perf_counter() - t)
                    assert status == 200, (path, status)
                    size = len(body)
                results.append(
                    {
                        "page": name,
                        "path": path,
                        "median_ms": round(statistics.median(times) * 1000, 1),
                        "max_ms": round(max(times) * 1000, 1),
                        "bytes": size,
                    }
                )
        finally:
            client.close()
            server.stop()
            engine.dispose()
    context = {
        "devices": counts["devices"],
        "audit_entries": counts["audit"] + GROUPS,
        "groups": counts["groups"] + 1,
        "page_size": settings.page_size,
        "rounds": ROUNDS,
        "fill_seconds": round(fill_seconds, 1),
    }
    records: list[dict[str, Any]] = [
        {
            "name": f"dashboard_{row['page']}_ms_10k",
            "value": row["median_ms"],
            "unit": f"ms (median of {ROUNDS}, {DEVICES:,} devices)",
            "target": TARGET_MS,
            "met": row["median_ms"] <= TARGET_MS,
            **row,
            **context,
        }
        for row in results
    ]
    records.append(
        {
            "name": "dashboard_audit_first_render_ms_10k",
            "value": round(audit_cold * 1000, 1),
            "unit": f"ms (whole-chain verification of {context['audit_entries']:,} entries)",
            "target": None,
            "met": None,
            **context,
        }
    )
    json.dump(records, sys.stdout, indent=1)
    print()


def populate_big_group(sessions: sessionmaker[Session], *, now: int) -> str:
    """One group of ``BIG_GROUP`` members, all acked at epoch 1 except the last fifth."""
    group = "grp-big"

    def work(session: Session) -> None:
        registry = Registry(session)
        members = [device_id(i) for i in range(DEVICES) if i % 50 and i % 97][:BIG_GROUP]
        registry.create_group(
            group, creator=members[0], public_tree=b"t", group_context=b"c", now=now - 600
        )
        for dev in members[1:]:
            registry.request_add(group, dev, now=now - 600)
        registry.append_commit(
            group,
            epoch=0,
            committer=members[0],
            commit=b"commit",
            welcome=b"welcome",
            public_tree=b"t1",
            group_context=b"c1",
            added={dev: leaf for leaf, dev in enumerate(members[1:], start=1)},
            now=now - 590,
        )
        for k, dev in enumerate(members[: BIG_GROUP * 4 // 5]):
            registry.record_ack(
                group, epoch=1, device_id=dev, epoch_authenticator=b"a", now=now - 590 + k % 7
            )

    run_in_transaction(sessions, work)
    return group


if __name__ == "__main__":
    main()
