"""Key blobs against a real swtpm: they survive a TPM restart; a corrupt, truncated or foreign
blob and a wrong TCTI are each a clear error, and nothing is written when loading fails."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol.errors import StateError, TPMError
from agent.tpm import KeyBlob, KeyKind, TPMStore
from tests.fixtures.swtpm import Swtpm, SwtpmFactory

pytestmark = pytest.mark.tpm


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_blobs_survive_a_restart(swtpm: Swtpm, tmp_path: Path) -> None:
    with TPMStore(swtpm.tcti) as store:
        store.create_key(KeyKind.DEVID).save(tmp_path / "devid.pem")
        store.create_key(KeyKind.LEAF).save(tmp_path / "leaf.pem")
        with store.load_key(KeyBlob.load(tmp_path / "devid.pem")) as devid:
            devid_public = devid.public_key()
    old_pid = swtpm.pid
    swtpm.restart()
    assert swtpm.pid != old_pid
    peer = ec.generate_private_key(ec.SECP256R1())
    with (
        TPMStore(swtpm.tcti) as store,
        store.load_key(KeyBlob.load(tmp_path / "devid.pem")) as devid,
        store.load_key(KeyBlob.load(tmp_path / "leaf.pem")) as leaf,
    ):
        assert devid.public_key() == devid_public
        signature = devid.sign(b"after reboot", ec.ECDSA(hashes.SHA256()))
        devid_public.verify(signature, b"after reboot", ec.ECDSA(hashes.SHA256()))
        assert leaf.exchange(ec.ECDH(), peer.public_key()) == peer.exchange(
            ec.ECDH(), leaf.public_key()
        )


def test_blob_is_a_tss2_private_key(swtpm: Swtpm, tmp_path: Path) -> None:
    path = tmp_path / "leaf.pem"
    with TPMStore(swtpm.tcti) as store:
        store.create_key(KeyKind.LEAF).save(path)
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    # tpm2-tools' own reader understands the format
    out = subprocess.run(
        ["tpm2_print", "-t", "TSSPRIVKEY_OBJ", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "ecc" in out.stdout.lower() or "value" in out.stdout.lower()


def test_corrupt_blob_is_refused_and_nothing_written(swtpm: Swtpm, tmp_path: Path) -> None:
    tmp_path = tmp_path / "keys"
    tmp_path.mkdir()
    path = tmp_path / "devid.pem"
    with TPMStore(swtpm.tcti) as store:
        blob = store.create_key(KeyKind.DEVID)
        blob.save(path)
        before = snapshot(tmp_path)
        private = bytearray(blob.private)
        private[-1] ^= 0x01  # damage the wrapped sensitive area
        damaged = KeyBlob(public=blob.public, private=bytes(private))
        with pytest.raises(TPMError, match="not made under this TPM's SRK or is damaged"):
            store.load_key(damaged)
        text = path.read_bytes()
        (tmp_path / "cut.pem").write_bytes(text[: len(text) - 40])
        before = snapshot(tmp_path)
        with pytest.raises(StateError, match=r"cut\.pem.*truncated"):
            KeyBlob.load(tmp_path / "cut.pem")
        with pytest.raises(StateError, match="could not read"):
            KeyBlob.load(tmp_path / "missing.pem")
        assert snapshot(tmp_path) == before
        assert store.transient_handles() == []


def test_blob_from_another_tpm_is_refused(swtpm_factory: SwtpmFactory, tmp_path: Path) -> None:
    device = swtpm_factory.start()
    other = swtpm_factory.start(fresh=True)
    tmp_path = tmp_path / "keys"
    tmp_path.mkdir()
    with TPMStore(other.tcti) as other_store:
        other_store.create_key(KeyKind.LEAF).save(tmp_path / "foreign.pem")
    before = snapshot(tmp_path)
    with TPMStore(device.tcti) as store:
        with pytest.raises(TPMError, match="not made under this TPM's SRK"):
            store.load_key(KeyBlob.load(tmp_path / "foreign.pem"))
        blob = KeyBlob.load(tmp_path / "foreign.pem")
        other_parent = KeyBlob(public=blob.public, private=blob.private, parent=0x81000001)
        with pytest.raises(TPMError, match="parent 0x81000001"):
            store.load_key(other_parent)
    assert snapshot(tmp_path) == before


def test_sealed_blob_is_not_a_key_and_vice_versa(swtpm: Swtpm) -> None:
    with TPMStore(swtpm.tcti) as store:
        sealed = store.seal(b"x" * 32, pcrs=(7,))
        with pytest.raises(TPMError, match="sealed data, not a key"):
            store.load_key(sealed)
        with pytest.raises(TPMError, match="a key, not sealed data"):
            store.unseal(store.create_key(KeyKind.LEAF))


def test_wrong_tcti_names_it(tmp_path: Path) -> None:
    """No fixture TPM here: ``tmp_path`` stays empty, so nothing was written anywhere in it."""
    for tcti in ("swtpm:host=127.0.0.1,port=1", "device:/dev/nonexistent-tpm", "bogus:x"):
        with pytest.raises(TPMError) as refused:
            TPMStore(tcti)
        assert tcti in str(refused.value)
        assert refused.value.operation == "connect"
    assert list(tmp_path.iterdir()) == []


def test_many_keys_swap_through_three_slots(swtpm: Swtpm) -> None:
    peer = ec.generate_private_key(ec.SECP256R1())
    with TPMStore(swtpm.tcti) as store:
        keys = [store.create_and_load(KeyKind.LEAF) for _ in range(5)]
        try:
            for _ in range(2):
                for key in keys:
                    expected = peer.exchange(ec.ECDH(), key.public_key())
                    assert key.exchange(ec.ECDH(), peer.public_key()) == expected
            assert sum(k.loaded for k in keys) < 5  # some had to be swapped out
            resident = keys[-1]
            mark = store.commands_issued
            resident.exchange(ec.ECDH(), peer.public_key())
            assert store.commands_issued - mark == 1  # a resident key costs one command
        finally:
            for key in keys:
                key.close()
        assert store.transient_handles() == []
