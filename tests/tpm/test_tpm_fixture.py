"""The swtpm fixture itself: it provisions real EK certificates from the session's manufacturer,
restarts on the same state, catches handle leaks, and fails (never skips) without swtpm."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from tpm2_pytss import ESAPI

import tests.fixtures.swtpm as swtpm_fixtures
from agent.tpm import TPMStore
from agent.tpm.templates import srk_template
from tests.fixtures.swtpm import ManufacturerCA, Swtpm, SwtpmFactory

pytestmark = pytest.mark.tpm


def test_restart_keeps_tcti_state_and_endorsement(swtpm: Swtpm) -> None:
    tcti = swtpm.tcti
    with TPMStore(tcti) as store:
        ek_before = store.ek_public_area()
        store.pcr_extend(16, bytes(range(32)))
    swtpm.restart()
    assert swtpm.tcti == tcti
    with TPMStore(tcti) as store:
        assert store.ek_public_area() == ek_before
        assert store.pcr_read([16])[16] == bytes(32)  # PCRs are volatile: a reboot


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    key = issuer.public_key()
    assert isinstance(key, rsa.RSAPublicKey) and cert.signature_hash_algorithm is not None
    try:
        key.verify(
            cert.signature,
            cert.tbs_certificate_bytes,
            padding.PKCS1v15(),
            cert.signature_hash_algorithm,
        )
    except InvalidSignature:
        return False
    return True


def test_two_manufacturers_differ(
    manufacturer_ca: ManufacturerCA, other_manufacturer_ca: ManufacturerCA, tmp_path: Path
) -> None:
    for ca in (manufacturer_ca, other_manufacturer_ca):
        config = (ca.directory / "swtpm-localca.conf").read_text()
        assert "/var/lib/swtpm-localca" not in config
        assert f"statedir = {ca.directory}/state" in config
        assert _signed_by(ca.issuer_cert(), ca.root_cert())
    factory = SwtpmFactory(tmp_path / "tpms", manufacturer_ca)
    try:
        tpm = factory.start(other_manufacturer_ca)
        with TPMStore(tpm.tcti) as store:
            cert = store.ek_certificate()
    finally:
        assert factory.close() == []
    assert _signed_by(cert, other_manufacturer_ca.issuer_cert())
    assert not _signed_by(cert, manufacturer_ca.issuer_cert())


def test_leaked_handle_is_reported(manufacturer_ca: ManufacturerCA, tmp_path: Path) -> None:
    factory = SwtpmFactory(tmp_path / "tpms", manufacturer_ca)
    try:
        tpm = factory.start()
        # raw ESAPI, not TPMStore (which flushes its keys on close): a primary never flushed
        esys = ESAPI(tpm.tcti)
        esys.create_primary(None, srk_template())
        esys.close()
    finally:
        leaks = factory.close()
    assert len(leaks) == 1
    assert "transient handles left loaded: 0x80" in leaks[0]
    assert all(instance.process is None for instance in factory.instances)


def test_missing_swtpm_fails_loudly(
    manufacturer_ca: ManufacturerCA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(swtpm_fixtures, "SWTPM", "swtpm-not-installed-here")
    factory = SwtpmFactory(tmp_path / "tpms", manufacturer_ca)
    with pytest.raises(pytest.fail.Exception, match="swtpm-not-installed-here is not installed"):
        factory.start()
    factory.close()


def test_stop_is_by_pid(swtpm: Swtpm) -> None:
    pid = swtpm.pid
    swtpm.stop()
    with pytest.raises(RuntimeError, match="not running"):
        _ = swtpm.pid
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    swtpm.start()  # the fixture's teardown expects a running TPM to check for leaks
