"""Sealing to PCRs against a real swtpm: unseal works, fails after an extend (policy check), works
again after PCR 16 is reset; the sealed blob survives a TPM restart."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from agent.protocol.errors import TPMError
from agent.protocol.secret import Secret
from agent.tpm import KeyBlob, TPMStore
from tests.fixtures.swtpm import Swtpm

pytestmark = pytest.mark.tpm

STATE_KEY = bytes(range(32))


def test_unseal_then_extend_fails_then_reset_works(swtpm: Swtpm) -> None:
    with TPMStore(swtpm.tcti) as store:
        blob = store.seal(Secret(STATE_KEY), pcrs=(7, 16))
        assert blob.sealed
        assert store.unseal(blob).reveal() == STATE_KEY
        store.pcr_extend(16, hashlib.sha256(b"debugger attached").digest())
        with pytest.raises(TPMError) as refused:
            store.unseal(blob)
        assert refused.value.rc == 0x99D  # TPM_RC_POLICY_FAIL, session 1
        assert "no longer hold the values" in str(refused.value)
        assert "0x99d" in str(refused.value)
        store.pcr_reset(16)
        assert store.unseal(blob).reveal() == STATE_KEY
        assert store.transient_handles() == []


def test_unseal_extend_of_unselected_pcr_does_not_matter(swtpm: Swtpm) -> None:
    with TPMStore(swtpm.tcti) as store:
        blob = store.seal(STATE_KEY, pcrs=(16,))
        store.pcr_extend(7, hashlib.sha256(b"other stage").digest())
        assert store.unseal(blob).reveal() == STATE_KEY


def test_sealed_blob_survives_restart_and_hides_the_secret(swtpm: Swtpm, tmp_path: Path) -> None:
    path = tmp_path / "state-key.pem"
    with TPMStore(swtpm.tcti) as store:
        store.seal(STATE_KEY, pcrs=(0, 7)).save(path)
    assert STATE_KEY not in path.read_bytes()
    assert STATE_KEY not in KeyBlob.load(path).to_der()
    assert path.read_bytes().startswith(b"-----BEGIN TSS2 PRIVATE KEY-----")
    swtpm.restart()
    with TPMStore(swtpm.tcti) as store:
        secret = store.unseal(KeyBlob.load(path))
    assert secret.reveal() == STATE_KEY
    assert "redacted" in repr(secret)


def test_seal_size_limits(swtpm: Swtpm) -> None:
    with TPMStore(swtpm.tcti) as store:
        store.seal(bytes(128), pcrs=(7,))
        with pytest.raises(TPMError, match=r"1\.\.128 bytes"):
            store.seal(bytes(129), pcrs=(7,))
        with pytest.raises(TPMError, match=r"1\.\.128 bytes"):
            store.seal(b"", pcrs=(7,))


def test_pcr_read_extend_reset(swtpm: Swtpm) -> None:
    with TPMStore(swtpm.tcti) as store:
        before = store.pcr_read(range(24))
        assert sorted(before) == list(range(24))
        assert before[16] == bytes(32)
        measurement = hashlib.sha256(b"kernel").digest()
        store.pcr_extend(16, measurement)
        after = store.pcr_read([16])[16]
        assert after == hashlib.sha256(bytes(32) + measurement).digest()
        store.pcr_reset(16)
        assert store.pcr_read([16])[16] == bytes(32)
        with pytest.raises(TPMError, match="pcr-reset"):
            store.pcr_reset(7)  # only the debug PCR is resettable at locality 0
