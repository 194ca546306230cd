"""The device CA's CRL (provisioning/revocation.py) over a real SQLite file: numbered and growing,
verified by openssl, written for the broker with the other client CAs' CRLs and never replaced
by an older one, re-issued at half its validity by the service's tick."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy.orm import Session, sessionmaker

from provisioning import pki, revocation
from provisioning.db.engine import make_engine
from provisioning.db.runtime import create_service_schema
from provisioning.registry import (
    DeviceState,
    Registry,
    create_schema,
    run_in_transaction,
    session_factory,
)
from provisioning.service.core import DeliveryService

pytestmark = pytest.mark.pure

T0 = int(datetime.now(UTC).timestamp())


def database(tmp_path: Path) -> sessionmaker[Session]:
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    create_schema(engine)
    create_service_schema(engine)
    return session_factory(engine)


def device_ca() -> pki.CertificateAuthority:
    return pki.create_ca("test device CA", now=datetime.now(UTC), valid_for=timedelta(days=2))


def enroll(
    sessions: sessionmaker[Session], ca: pki.CertificateAuthority, device_id: str
) -> set[int]:
    """A registered device with a DevID and a TLS certificate recorded as enrollment does."""
    now = datetime.now(UTC)
    devid = pki.issue_client_cert(
        ca, pki.generate_key().public_key(), identity=device_id, role="device", now=now,
        valid_for=timedelta(days=1),
    )  # fmt: skip
    tls = pki.issue_client_cert(
        ca, pki.generate_key().public_key(), identity=device_id, role="device", now=now,
        valid_for=timedelta(days=1),
    )  # fmt: skip

    def work(session: Session) -> None:
        Registry(session).register_device(
            device_id,
            ek_cert_fingerprint=f"ek-{device_id}".encode().hex().ljust(64, "0"),
            devid_cert_pem=pki.cert_to_pem(devid).decode(),
            now=T0,
        )
        revocation.record_issued(session, device_id, [("devid", devid), ("tls", tls)], now=T0)

    run_in_transaction(sessions, work)
    return {devid.serial_number, tls.serial_number}


def revoke(
    sessions: sessionmaker[Session], settings: revocation.RevocationSettings, device_id: str
) -> x509.CertificateRevocationList:
    def work(session: Session) -> x509.CertificateRevocationList | None:
        Registry(session).set_device_state(device_id, DeviceState.REVOKED, reason="t", now=T0)
        return revocation.revoke_device(session, settings, device_id, reason="t", now=T0 + 1)

    crl = run_in_transaction(sessions, work)
    assert crl is not None
    return crl


def openssl_verifies(tmp_path: Path, crl: x509.CertificateRevocationList, ca: x509.Certificate):
    crl_file, ca_file = tmp_path / "one.crl", tmp_path / "ca.pem"
    crl_file.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    checked = subprocess.run(
        ["openssl", "crl", "-in", str(crl_file), "-CAfile", str(ca_file), "-verify", "-noout"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert checked.returncode == 0 and "verify OK" in checked.stdout + checked.stderr, checked


def test_each_revocation_issues_the_next_crl_listing_every_revoked_certificate(
    tmp_path: Path,
) -> None:
    sessions = database(tmp_path)
    ca = device_ca()
    settings = revocation.RevocationSettings(ca)
    first = enroll(sessions, ca, "dev-1")
    second = enroll(sessions, ca, "dev-2")
    kept = enroll(sessions, ca, "dev-3")
    crl1 = revoke(sessions, settings, "dev-1")
    crl2 = revoke(sessions, settings, "dev-2")
    assert [revocation.crl_number(c) for c in (crl1, crl2)] == [1, 2]
    assert {e.serial_number for e in crl1} == first
    assert {e.serial_number for e in crl2} == first | second
    assert not kept & {e.serial_number for e in crl2}
    for crl in (crl1, crl2):
        openssl_verifies(tmp_path, crl, ca.certificate)
        assert crl.next_update_utc == crl.last_update_utc + timedelta(
            seconds=revocation.DEFAULT_CRL_VALIDITY
        )


def test_the_broker_file_holds_the_other_cas_crls_and_never_goes_back(tmp_path: Path) -> None:
    ca, other = device_ca(), device_ca()
    other_crl = tmp_path / "other.crl"
    other_crl.write_bytes(
        revocation.build_crl(other, [], number=7, this_update=T0, next_update=T0 + 60)
        .public_bytes(serialization.Encoding.PEM)
    )  # fmt: skip
    settings = revocation.RevocationSettings(ca, tmp_path / "crl.pem", (other_crl,))
    newer = revocation.build_crl(ca, [(5, T0)], number=2, this_update=T0, next_update=T0 + 60)
    older = revocation.build_crl(ca, [], number=1, this_update=T0, next_update=T0 + 60)
    assert revocation.write_broker_crl(settings, newer)
    written = settings.crl_file.read_bytes() if settings.crl_file else b""
    assert written.count(b"BEGIN X509 CRL") == 2 and written.endswith(other_crl.read_bytes())
    assert (tmp_path / "crl.pem").stat().st_mode & 0o777 == 0o644  # the broker's user reads it
    assert not revocation.write_broker_crl(settings, older)
    assert (tmp_path / "crl.pem").read_bytes() == written
    # the same bytes again: not rewritten (the broker restarts on every change)
    assert not revocation.write_broker_crl(settings, newer)
    # another CA's CRL re-issued: the file is rewritten with the same device CA CRL
    other_crl.write_bytes(
        revocation.build_crl(other, [], number=8, this_update=T0, next_update=T0 + 600)
        .public_bytes(serialization.Encoding.PEM)
    )  # fmt: skip
    assert revocation.write_broker_crl(settings, newer)
    assert (tmp_path / "crl.pem").read_bytes().endswith(other_crl.read_bytes())


def test_the_service_issues_the_first_crl_at_start_and_again_at_half_its_validity(
    tmp_path: Path,
) -> None:
    sessions = database(tmp_path)
    ca = device_ca()
    settings = revocation.RevocationSettings(ca, tmp_path / "crl.pem", crl_validity=3600)
    service = DeliveryService(
        sessions,
        signing_key=pki.generate_key(),
        operator_ca=ca.certificate,
        device_ca=ca.certificate,
        revocation=settings,
    )
    service.ensure_crl(T0)
    assert revocation.file_crl_number(tmp_path / "crl.pem") == 1
    service.tick(T0 + 60)  # not due yet
    assert revocation.file_crl_number(tmp_path / "crl.pem") == 1
    service.tick(T0 + 1800)
    assert revocation.file_crl_number(tmp_path / "crl.pem") == 2
    # a lost file is written again from the database
    (tmp_path / "crl.pem").unlink()
    service.tick(T0 + 1840)
    assert revocation.file_crl_number(tmp_path / "crl.pem") == 2
