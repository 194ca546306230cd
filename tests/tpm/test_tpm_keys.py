"""TPM keys against a real swtpm: ECDH and signatures agree with pyca, HPKE opens with a TPM leaf
key, private parts refuse export, the command counter counts."""

from __future__ import annotations

import re

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol import hpke
from agent.protocol.errors import TPMError
from agent.tpm import KeyKind, TPMStore
from tests.fixtures.swtpm import Swtpm

pytestmark = pytest.mark.tpm


def test_ecdh_equals_pyca(swtpm: Swtpm) -> None:
    with TPMStore(swtpm.tcti) as store, store.create_and_load(KeyKind.LEAF) as leaf:
        for _ in range(3):
            peer = ec.generate_private_key(ec.SECP256R1())
            shared = leaf.exchange(ec.ECDH(), peer.public_key())
            assert len(shared) == 32
            assert shared == peer.exchange(ec.ECDH(), leaf.public_key())


def test_signature_verifies_with_pyca(swtpm: Swtpm) -> None:
    with TPMStore(swtpm.tcti) as store, store.create_and_load(KeyKind.DEVID) as devid:
        signature = devid.sign(b"message", ec.ECDSA(hashes.SHA256()))
        devid.public_key().verify(signature, b"message", ec.ECDSA(hashes.SHA256()))
        with pytest.raises(InvalidSignature):
            devid.public_key().verify(signature, b"other", ec.ECDSA(hashes.SHA256()))


def test_hpke_opens_with_tpm_leaf_key(swtpm: Swtpm) -> None:
    with TPMStore(swtpm.tcti) as store, store.create_and_load(KeyKind.LEAF) as leaf:
        enc, ciphertext = hpke.seal(leaf.public_key(), b"info", b"aad", b"group secret")
        before = store.commands_issued
        assert hpke.open_(enc, leaf, b"info", b"aad", ciphertext) == b"group secret"
        assert store.commands_issued - before == 1  # exactly one ECDH_ZGen


def test_key_interface_and_refusals(swtpm: Swtpm) -> None:
    with TPMStore(swtpm.tcti) as store, store.create_and_load(KeyKind.LEAF) as leaf:
        assert isinstance(leaf, ec.EllipticCurvePrivateKey)
        assert isinstance(leaf.curve, ec.SECP256R1)
        assert leaf.key_size == 256
        with pytest.raises(TPMError, match="cannot be exported"):
            leaf.private_numbers()
        with pytest.raises(TPMError, match="a leaf key does not sign"):
            leaf.sign(b"x", ec.ECDSA(hashes.SHA256()))
        wrong_curve = ec.generate_private_key(ec.SECP384R1()).public_key()
        with pytest.raises(TPMError, match="P-256"):
            leaf.exchange(ec.ECDH(), wrong_curve)
        assert "TPMKey(kind=leaf" in repr(leaf)


def test_counter_counts_every_command(swtpm: Swtpm) -> None:
    with TPMStore(swtpm.tcti) as store:
        start = store.commands_issued
        blob = store.create_key(KeyKind.DEVID)
        assert store.commands_issued - start == 3  # create SRK, create, flush SRK
        with store.load_key(blob) as devid:
            mark = store.commands_issued
            devid.sign(b"a", ec.ECDSA(hashes.SHA256()))
            assert store.commands_issued - mark == 1


def test_wrong_tcti_is_a_clear_error(swtpm: Swtpm) -> None:
    dead = f"swtpm:host=127.0.0.1,port={swtpm.port + 2}"
    with pytest.raises(TPMError, match=re.escape(f"TCTI '{dead}'")):
        TPMStore(dead)
    with pytest.raises(TPMError, match="nosuchtcti"):
        TPMStore("nosuchtcti:foo")


def test_closing_the_store_flushes_its_keys(swtpm: Swtpm) -> None:
    store = TPMStore(swtpm.tcti)
    keys = [store.create_and_load(kind) for kind in KeyKind]
    keys.append(store.create_and_load(KeyKind.LEAF))  # four keys: one is swapped out
    assert not all(k.loaded for k in keys)
    store.close()
    assert all(k.closed for k in keys)
    assert swtpm.transient_handles() == []
    with pytest.raises(TPMError, match="already closed"):
        keys[0].sign(b"x", ec.ECDSA(hashes.SHA256()))
