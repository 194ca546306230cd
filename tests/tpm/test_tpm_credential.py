"""MakeCredential in software (provisioning.makecredential) against ActivateCredential in a real
swtpm: the secret comes back only for the right EK and the right AK Name."""

from __future__ import annotations

import os

import pytest

from agent.protocol.errors import CryptoError, TPMError
from agent.tpm import KeyKind, TPMStore
from agent.tpm.store import EKKind
from provisioning.makecredential import kdfa, make_credential
from tests.fixtures.swtpm import SwtpmFactory

pytestmark = pytest.mark.tpm


@pytest.mark.parametrize("ek_kind", ["rsa", "ecc"])
def test_round_trip_recovers_the_secret(swtpm_factory: SwtpmFactory, ek_kind: EKKind) -> None:
    swtpm = swtpm_factory.start()
    secret = os.urandom(32)
    with TPMStore(swtpm.tcti) as store, store.create_and_load(KeyKind.AK) as ak:
        blob, encrypted = make_credential(store.ek_public_key(ek_kind), ak.name, secret)
        recovered = store.activate_credential(ak, blob, encrypted, ek=ek_kind)
    assert recovered.reveal() == secret
    assert secret.hex() not in repr(recovered)


def test_fails_for_another_ak_name(swtpm_factory: SwtpmFactory) -> None:
    swtpm = swtpm_factory.start()
    with (
        TPMStore(swtpm.tcti) as store,
        store.create_and_load(KeyKind.AK) as ak,
        store.create_and_load(KeyKind.AK) as other_ak,
    ):
        blob, encrypted = make_credential(store.ek_public_key(), other_ak.name, os.urandom(32))
        with pytest.raises(TPMError, match="not made for this TPM's EK and this AK") as refused:
            store.activate_credential(ak, blob, encrypted)
        assert refused.value.rc is not None
        assert store.activate_credential(other_ak, blob, encrypted)  # the named AK works


def test_fails_for_another_tpms_ek(swtpm_factory: SwtpmFactory) -> None:
    device = swtpm_factory.start()
    other_tpm = swtpm_factory.start(fresh=True)  # newly manufactured: other seeds, other EK
    with TPMStore(other_tpm.tcti) as other:
        other_ek = other.ek_public_key()
    with TPMStore(device.tcti) as store, store.create_and_load(KeyKind.AK) as ak:
        assert store.ek_public_key() != other_ek
        blob, encrypted = make_credential(other_ek, ak.name, os.urandom(32))
        with pytest.raises(TPMError, match="not made for this TPM's EK") as refused:
            store.activate_credential(ak, blob, encrypted)
        assert refused.value.rc is not None


def test_tampered_blob_is_refused(swtpm_factory: SwtpmFactory) -> None:
    swtpm = swtpm_factory.start()
    with TPMStore(swtpm.tcti) as store, store.create_and_load(KeyKind.AK) as ak:
        blob, encrypted = make_credential(store.ek_public_key(), ak.name, os.urandom(32))
        flipped = blob[:-1] + bytes([blob[-1] ^ 1])
        with pytest.raises(TPMError, match="activate-credential"):
            store.activate_credential(ak, flipped, encrypted)
        with pytest.raises(TPMError, match="trailing bytes"):
            store.activate_credential(ak, blob + b"\x00", encrypted)


def test_input_checks() -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    ek = rsa.generate_private_key(65537, 2048).public_key()
    name = b"\x00\x0b" + bytes(32)
    with pytest.raises(CryptoError):
        make_credential(ek, name, b"")
    with pytest.raises(CryptoError):
        make_credential(ek, b"\x00\x01" + bytes(32), b"secret")
    blob, secret = make_credential(ek, name, b"secret", rng=bytes)
    assert len(secret) == 2 + 256
    assert int.from_bytes(blob[:2], "big") == len(blob) - 2


def test_kdfa_length_and_determinism() -> None:
    one = kdfa("sha256", b"k" * 32, label=b"STORAGE", context_u=b"ctx", context_v=b"", bits=128)
    assert len(one) == 16
    assert one == kdfa(
        "sha256", b"k" * 32, label=b"STORAGE", context_u=b"ctx", context_v=b"", bits=128
    )
    assert one != kdfa(
        "sha256", b"k" * 32, label=b"INTEGRITY", context_u=b"ctx", context_v=b"", bits=128
    )
    assert len(kdfa("sha256", b"k", label=b"X", context_u=b"", context_v=b"", bits=384)) == 48
