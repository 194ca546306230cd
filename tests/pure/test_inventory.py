"""The inventory of keys and certificates (provisioning/inventory.py) with certificates built
here: SP 800-57 states from validity and the holder's state, ordering by expiry, the JSON shape
of ``keyfleet keys list --json`` (file keys, a CA bundle, a key that is not its certificate's, on
a SQLite file), and the expiry gauges computed from cached values (tier pure: SQLite is an
in-process library; the token and the served gauges are in tests/e2e/test_keys_inventory_e2e.py).
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.protocol import trust
from agent.protocol.lifecycle import KeyState
from provisioning import pki
from provisioning.cli import main
from provisioning.db import migrations
from provisioning.inventory import KeyFacts, rows, state_of, trust_facts, with_certificate
from provisioning.metrics import ExpiryGauges, ServiceMetrics
from provisioning.registry import (
    DeviceState,
    Registry,
    Role,
    cert_fingerprint,
    make_engine,
    run_in_transaction,
    session_factory,
)
from provisioning.service.store import trustchain
from tests.service_deployment import write_golden_policy

pytestmark = pytest.mark.pure

NOW = datetime(2026, 12, 7, 8, 0, 0, tzinfo=UTC)
T = int(NOW.timestamp())
DAY = 86_400


def spki_sha256(cert: x509.Certificate) -> str:
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def leaf(
    ca: pki.CertificateAuthority, name: str, *, start: datetime, days: float
) -> x509.Certificate:
    return pki.issue_client_cert(
        ca,
        pki.generate_key().public_key(),
        identity=name,
        now=start,
        valid_for=timedelta(days=days),
    )


@pytest.fixture(scope="module")
def ca() -> pki.CertificateAuthority:
    return pki.create_ca("inventory test CA", now=NOW, valid_for=timedelta(days=365))


def test_certificate_facts_are_its_public_facts(ca: pki.CertificateAuthority) -> None:
    cert = leaf(ca, "svc", start=NOW, days=10)
    facts = with_certificate(KeyFacts("fleet", "service-tls", "x", "file k"), cert)
    assert facts.fingerprint == spki_sha256(cert)
    assert facts.cert_fingerprint == cert_fingerprint(cert)
    assert facts.algorithm == "EC secp256r1"
    assert facts.not_after == T + 10 * DAY
    assert facts.not_before == T - 300  # the issuer back-dates by five minutes
    assert facts.subject is not None and "CN=svc" in facts.subject


@pytest.mark.parametrize(
    ("start_days", "days", "holder", "expected"),
    [
        (1, 10, None, KeyState.PRE_ACTIVATION),
        (0, 10, None, KeyState.ACTIVE),
        (-20, 10, None, KeyState.DEACTIVATED),
        (0, 10, DeviceState.REGISTERED, KeyState.ACTIVE),
        (0, 10, DeviceState.ACTIVE, KeyState.ACTIVE),
        (0, 10, DeviceState.QUARANTINED, KeyState.SUSPENDED),
        (-20, 10, DeviceState.QUARANTINED, KeyState.DEACTIVATED),
        (0, 10, DeviceState.REVOKED, KeyState.COMPROMISED),
        (-20, 10, DeviceState.REVOKED, KeyState.COMPROMISED),
        (0, 10, DeviceState.DESTROYED, KeyState.DESTROYED),
    ],
)
def test_sp800_57_states(
    ca: pki.CertificateAuthority,
    start_days: int,
    days: int,
    holder: DeviceState | None,
    expected: KeyState,
) -> None:
    cert = leaf(ca, "d", start=NOW + timedelta(days=start_days), days=days)
    facts = with_certificate(
        KeyFacts(
            "device", "devid", "d", "TPM", holder_state=None if holder is None else holder.value
        ),
        cert,
    )
    assert state_of(facts, T) is expected


def test_a_key_only_entry_is_active_and_an_unreadable_one_has_no_state() -> None:
    assert state_of(KeyFacts("fleet", "release-signing", "r", "file k"), T) is KeyState.ACTIVE
    broken = KeyFacts("fleet", "audit-checkpoint", "a", "token", problem="no such key")
    assert state_of(broken, T) is None
    (row,) = rows([broken], T)
    assert row["state"] is None and row["problem"] == "no such key"


def test_rows_by_scope_then_nearest_expiry(ca: pki.CertificateAuthority) -> None:
    def entry(scope: str, name: str, days: float | None) -> KeyFacts:
        facts = KeyFacts(scope, "k", name, "-")
        if days is None:
            return facts
        return with_certificate(facts, leaf(ca, name, start=NOW, days=days))

    entries = [
        entry("device", "dev-late", 300),
        entry("fleet", "no-expiry", None),
        entry("device", "dev-soon", 3),
        entry("operator", "op", None),
        entry("fleet", "fleet-late", 200),
        entry("device", "dev-mid", 30),
        entry("fleet", "fleet-soon", 5),
    ]
    listed = rows(entries, T)
    assert [r["name"] for r in listed] == [
        "fleet-soon", "fleet-late", "no-expiry", "op", "dev-soon", "dev-mid", "dev-late",
    ]  # fmt: skip
    assert listed[0]["expires_in"] == 5 * DAY
    assert listed[2]["expires_in"] is None
    assert set(listed[0]) == {
        "scope", "kind", "name", "state", "key", "cert", "algorithm", "fingerprint",
        "cert_fingerprint", "subject", "not_before", "not_after", "expires_in", "token", "slot",
        "label", "key_id", "holder_state", "problem", "accepted_until",
    }  # fmt: skip
    json.dumps(listed)  # plain values only


def test_expiry_gauges_from_cached_values() -> None:
    gauges = ExpiryGauges()
    assert list(gauges.render(T)) == []  # nothing before the first refresh
    devices = [T + 40 * DAY, T - DAY, T + 29 * DAY, T + 30 * DAY, T + 31 * DAY]
    gauges.set({"device-ca": T + 100 * DAY, "broker-ca": T + 7 * DAY}, devices, now=T - 60)
    text = "\n".join(gauges.render(T + 10))
    assert f'keyfleet_fleet_cert_expiry_seconds{{kind="device-ca"}} {100 * DAY - 10}' in text
    assert f'keyfleet_fleet_cert_expiry_seconds{{kind="broker-ca"}} {7 * DAY - 10}' in text
    assert f"keyfleet_device_cert_expiry_seconds {-DAY - 10}\n" in text
    # expired, 29 days, and exactly 30 days at T (29d 23h59m50s at the scrape); not 31 or 40
    assert 'keyfleet_device_certs_expiring{within="30d"} 3' in text
    assert f"keyfleet_expiry_refreshed_timestamp_seconds {T - 60}" in text
    # a later scrape of the same cache: the count follows the scrape's clock
    later = "\n".join(gauges.render(T + 2 * DAY))
    assert 'keyfleet_device_certs_expiring{within="30d"} 4' in later
    gauges.set({}, [], now=T)
    empty = "\n".join(gauges.render(T))
    assert not [line for line in empty.splitlines() if line.startswith("keyfleet_device_cert_ex")]
    assert 'keyfleet_device_certs_expiring{within="30d"} 0' in empty


def test_service_metrics_expose_the_gauges_with_their_clock() -> None:
    metrics = ServiceMetrics(clock=lambda: float(T))
    metrics.expiry.set({"service-signing": T + 3 * DAY}, [T + DAY], now=T)
    text = metrics.exposition(instance="a")
    assert f'keyfleet_fleet_cert_expiry_seconds{{kind="service-signing"}} {3 * DAY}' in text
    assert f"keyfleet_device_cert_expiry_seconds {DAY}" in text


# ---- keyfleet keys list on files and a SQLite registry -------------------------------------------


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)
    return path


def test_keys_list_json_with_file_keys(
    tmp_path: Path, ca: pki.CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    now = datetime.now(UTC)
    device_ca = pki.create_ca("dev CA", now=now, valid_for=timedelta(days=90))
    operator_ca = pki.create_ca("op CA", now=now, valid_for=timedelta(days=60))
    broker_cas = [
        ca.certificate,
        pki.create_ca("old", now=now, valid_for=timedelta(days=9)).certificate,
    ]
    client_key = pki.generate_key()
    client_cert = leaf(ca, "keyfleet-service", start=now, days=20)  # not client_key's
    _write(tmp_path / "device-ca.pem", pki.cert_to_pem(device_ca.certificate))
    _write(tmp_path / "device-ca.key", pki.key_to_pem(device_ca.private_key), private=True)
    _write(tmp_path / "operator-ca.pem", pki.cert_to_pem(operator_ca.certificate))
    _write(tmp_path / "broker-ca.pem", pki.certs_to_pem(broker_cas))
    _write(tmp_path / "client.pem", pki.cert_to_pem(client_cert))
    _write(tmp_path / "client.key", pki.key_to_pem(client_key), private=True)
    release_key = pki.generate_key()
    _write(tmp_path / "release.key", pki.key_to_pem(release_key), private=True)
    write_golden_policy(tmp_path / "golden.toml")
    config = tmp_path / "service.toml"
    config.write_text(
        f"""
[database]
url = "sqlite:///{tmp_path / "fleet.db"}"
[broker]
host = "127.0.0.1"
ca = "broker-ca.pem"
client_cert = "client.pem"
client_key = "client.key"
[device_ca]
cert = "device-ca.pem"
key = "device-ca.key"
[operator_ca]
cert = "operator-ca.pem"
[attestation]
manufacturer_cas = "device-ca.pem"
golden_measurements = "golden.toml"
[releases]
signing_key = "release.key"
"""
    )
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    migrations.upgrade(engine)
    t = int(now.timestamp())
    devids = {
        "dev-b": leaf(device_ca, "dev-b", start=now, days=40),
        "dev-a": leaf(device_ca, "dev-a", start=now, days=10),
        "dev-c": leaf(device_ca, "dev-c", start=now - timedelta(days=30), days=20),
    }

    def populate(session: object) -> None:
        registry = Registry(session)  # type: ignore[arg-type]
        for i, (name, cert) in enumerate(devids.items()):
            registry.register_device(
                name,
                ek_cert_fingerprint=f"{i:064x}",
                devid_cert_pem=pki.cert_to_pem(cert).decode(),
                now=t,
            )
        registry.set_device_state("dev-b", DeviceState.REVOKED, reason="lost", now=t)
        registry.add_operator("op-1", cert_fingerprint="ab" * 32, role=Role.ADMIN, now=t)

    run_in_transaction(session_factory(engine), populate)
    engine.dispose()

    assert main(["keys", "list", "--config", str(config), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in listed}
    device_ca_row = by_name["[device_ca]"]
    assert device_ca_row["kind"] == "device-ca" and device_ca_row["state"] == "active"
    assert device_ca_row["key"] == f"file {tmp_path / 'device-ca.key'}"
    assert device_ca_row["fingerprint"] == spki_sha256(device_ca.certificate)
    assert device_ca_row["not_after"] == int(device_ca.certificate.not_valid_after_utc.timestamp())
    assert by_name["[operator_ca] cert"]["key"] == "not held by the service"
    # a bundle: one entry per certificate
    assert {by_name["[broker] ca #1"]["fingerprint"], by_name["[broker] ca #2"]["fingerprint"]} == {
        spki_sha256(c) for c in broker_cas
    }
    release = by_name["[releases] signing_key"]
    expected_release = hashlib.sha256(
        release_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    ).hexdigest()
    assert release["fingerprint"] == expected_release and release["not_after"] is None
    assert release["state"] == "active"
    # the client key is not the client certificate's: no state, and why
    client = by_name["[broker] client_cert"]
    assert client["state"] is None and "public keys differ" in client["problem"]
    fleet = [r for r in listed if r["scope"] == "fleet"]
    expiries = [r["not_after"] for r in fleet if r["not_after"] is not None]
    assert expiries == sorted(expiries) and fleet[-1]["not_after"] is None
    assert by_name["op-1"]["scope"] == "operator"
    devices = [r for r in listed if r["scope"] == "device"]
    assert [r["name"] for r in devices] == ["dev-c", "dev-a", "dev-b"]
    assert [r["state"] for r in devices] == ["deactivated", "active", "compromised"]
    assert devices[0]["cert_fingerprint"] == cert_fingerprint(devids["dev-c"])
    assert listed.index(fleet[-1]) < listed.index(by_name["op-1"]) < listed.index(devices[0])
    assert "PRIVATE" not in json.dumps(listed)
    # for people: the same entries, fingerprints shortened, times in UTC
    assert main(["keys", "list", "--config", str(config)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == [
        "SCOPE", "KIND", "NAME", "STATE", "NOT_AFTER", "ALGORITHM", "KEY", "FINGERPRINT",
    ]  # fmt: skip
    assert "deactivated" in table and spki_sha256(device_ca.certificate)[:16] + "…" in table


def test_keys_list_shows_what_the_newest_trust_bundle_lists_with_each_end(
    tmp_path: Path, ca: pki.CertificateAuthority
) -> None:
    """During a rollover's overlap the service issues from a device CA the configuration may not
    name yet: the inventory lists the newest bundle's entries, the old ones deactivated once
    devices no longer accept them."""
    now = datetime.now(UTC)
    t = int(now.timestamp())
    old_ca = pki.create_ca("dev CA 1", now=now, valid_for=timedelta(days=90))
    new_ca = pki.create_ca("dev CA 2", now=now, valid_for=timedelta(days=900))
    old_key, new_key = pki.generate_key(), pki.generate_key()
    der = serialization.Encoding.DER
    bundle = trust.TrustBundle(
        seq=2,
        service=(
            trust.ServiceKey(trust.key_der(old_key.public_key()), until=t - 10),
            trust.ServiceKey(trust.key_der(new_key.public_key())),
        ),
        device_ca=(
            trust.DeviceCA(old_ca.certificate.public_bytes(der), until=t + 3600),
            trust.DeviceCA(new_ca.certificate.public_bytes(der)),
        ),
        operator_ca=(
            trust.DeviceCA(old_ca.certificate.public_bytes(der), until=t + 60),
            trust.DeviceCA(ca.certificate.public_bytes(der)),
        ),
    )
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    migrations.upgrade(engine)
    factory = session_factory(engine)
    with factory() as session:
        assert trust_facts(session) == []  # before the first rollover: the configuration's
        trustchain.add(session, 2, trust.sign_link(bundle, old_key), b"authz", "new.key", now=t)
        session.commit()
        facts = trust_facts(session)
    engine.dispose()
    listed = {(r["kind"], r["fingerprint"]): r for r in rows(facts, t)}
    fingerprint = spki_sha256
    old_ca_row = listed[("device-ca", fingerprint(old_ca.certificate))]
    new_ca_row = listed[("device-ca", fingerprint(new_ca.certificate))]
    assert old_ca_row["state"] == "active" and old_ca_row["accepted_until"] == t + 3600
    assert new_ca_row["state"] == "active" and new_ca_row["accepted_until"] is None
    assert new_ca_row["name"] == "trust bundle 2 (current)"
    assert new_ca_row["not_after"] == int(new_ca.certificate.not_valid_after_utc.timestamp())
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    old_fingerprint = hashlib.sha256(old_key.public_key().public_bytes(der, spki)).hexdigest()
    old_service = listed[("service-signing", old_fingerprint)]
    assert old_service["state"] == "deactivated"  # devices stopped accepting it
    # past the old CA's end it is deactivated too
    later = {
        r["fingerprint"]: r for r in rows([f for f in facts if f.kind == "device-ca"], t + 7200)
    }
    assert later[fingerprint(old_ca.certificate)]["state"] == "deactivated"
    assert later[fingerprint(new_ca.certificate)]["state"] == "active"
    # the operator CAs of the bundle likewise, each with its end
    operators = {
        r["fingerprint"]: r for r in rows([f for f in facts if f.kind == "operator-ca"], t)
    }
    assert operators[fingerprint(old_ca.certificate)]["accepted_until"] == t + 60
    assert operators[fingerprint(ca.certificate)]["name"] == "trust bundle 2 (current)"
