"""``keyfleet pki import-crl`` as an operator runs it (a subprocess, a service configuration, a
SQLite file): a manufacturer CA's CRL is checked, kept in ``[attestation] manufacturer_crls`` and
audited; refused ones are audited and write nothing."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from provisioning import audit
from provisioning.ekchain import crls_to_pem
from provisioning.ekcrls import read_crls
from provisioning.pki import certs_to_pem
from provisioning.registry import make_engine, session_factory
from tests.ek_manufacturer import crl, make_ca
from tests.service_deployment import keyfleet

pytestmark = pytest.mark.pure

NOW = datetime.now(UTC)


def write_config(tmp_path: Path, bundle: bytes, *, with_crls: bool = True) -> Path:
    for name in ("ca.pem", "svc.pem", "dev-ca.pem", "op-ca.pem", "golden.toml"):
        (tmp_path / name).write_text("x\n")
    for name in ("svc.key", "dev-ca.key"):
        (tmp_path / name).write_text("x\n")
        (tmp_path / name).chmod(0o600)
    (tmp_path / "mfr.pem").write_bytes(bundle)
    config = tmp_path / "keyfleet.toml"
    config.write_text(
        '[database]\nurl = "sqlite:///fleet.db"\n'
        '[broker]\nhost = "localhost"\nca = "ca.pem"\nclient_cert = "svc.pem"\n'
        'client_key = "svc.key"\n'
        '[device_ca]\ncert = "dev-ca.pem"\nkey = "dev-ca.key"\n'
        '[operator_ca]\ncert = "op-ca.pem"\n'
        '[attestation]\nmanufacturer_cas = "mfr.pem"\ngolden_measurements = "golden.toml"\n'
        + ('manufacturer_crls = "mfr-crls.pem"\n' if with_crls else "")
    )
    return config


def test_import_crl_keeps_checks_and_audits(tmp_path: Path) -> None:
    root = make_ca("Vendor Root", NOW)
    issuing = make_ca("Vendor EK CA", NOW, parent=root)
    config = write_config(tmp_path, certs_to_pem([root.cert, issuing.cert]))
    assert keyfleet("db", "init", "--config", str(config), cwd=tmp_path).returncode == 0
    good = tmp_path / "vendor.crl"
    good.write_bytes(crls_to_pem([crl(issuing, NOW, number=3, revoked=(7, 8))]))

    done = keyfleet("pki", "import-crl", str(good), "--config", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "CRL of CN=Vendor EK CA imported" in done.stdout and "number 3, 2 revoked" in done.stdout
    kept = read_crls(tmp_path / "mfr-crls.pem")
    assert [c.issuer for c in kept] == [issuing.cert.subject]

    # an older one and one from a CA outside the bundle: refused, audited, the file unchanged
    before = (tmp_path / "mfr-crls.pem").read_bytes()
    older = tmp_path / "older.crl"
    older.write_bytes(crls_to_pem([crl(issuing, NOW, number=2)]))
    stranger = tmp_path / "stranger.crl"
    stranger.write_bytes(crls_to_pem([crl(make_ca("Vendor EK CA", NOW), NOW)]))
    for path, check in ((older, "ek.crl.rollback"), (stranger, "ek.crl.issuer")):
        refused = keyfleet("pki", "import-crl", str(path), "--config", str(config), cwd=tmp_path)
        assert refused.returncode == 2 and f"[{check}]" in refused.stderr, refused.stderr
    assert (tmp_path / "mfr-crls.pem").read_bytes() == before

    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        with session_factory(engine)() as session:
            entries = [e for e in audit.entries(session) if e.action == "pki.import_crl"]
    finally:
        engine.dispose()
    assert [e.outcome.value for e in entries] == ["accepted", "refused", "refused"]
    assert entries[0].target == "CN=Vendor EK CA" and '"crl_number":3' in entries[0].details
    assert "[ek.crl.rollback]" in entries[1].reason


def test_import_crl_needs_the_file_named_in_the_configuration(tmp_path: Path) -> None:
    root = make_ca("Vendor Root", NOW)
    config = write_config(tmp_path, certs_to_pem([root.cert]), with_crls=False)
    path = tmp_path / "root.crl"
    path.write_bytes(crls_to_pem([crl(root, NOW)]))
    missing = keyfleet("pki", "import-crl", str(path), "--config", str(config), cwd=tmp_path)
    assert missing.returncode == 2 and "manufacturer_crls is not set" in missing.stderr
