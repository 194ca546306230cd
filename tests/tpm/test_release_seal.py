"""The state key sealed for signed releases (PolicyAuthorize by the release key, then PolicyNV on
the state counter) against a real swtpm. The release key is a software P-256 key here, standing
for the token's key (signing happens off the device; the TPM only verifies)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol.errors import CryptoError
from agent.protocol.release import ReleaseEntry, make_entry
from agent.protocol.secret import Secret
from agent.tpm import TPMStore
from agent.tpm.authorized import (
    ReleaseSignatureRefused,
    ReleaseStale,
    bound_counter,
    bound_generation,
    is_authorized,
    seal_authorized,
    tpm_unseal,
    unseal_authorized,
)
from agent.tpm.blob import KeyBlob
from agent.tpm.nvcounter import CounterMoved, NVCounter
from agent.tpm.store import MeasurementsChanged
from tests.fixtures.swtpm import Swtpm

pytestmark = pytest.mark.tpm

KEY = bytes(range(32))
PCRS = (7, 16)


def boot(store: TPMStore, image: bytes) -> dict[int, bytes]:
    """Stand for a reboot into firmware ``image``: PCR 16 reset and measured again."""
    store.pcr_reset(16)
    store.pcr_extend(16, hashlib.sha256(image).digest())
    return store.pcr_read(PCRS)


def entry_for(
    values: Mapping[int, bytes], version: str, generation: int, key: ec.EllipticCurvePrivateKey
) -> ReleaseEntry:
    return make_entry(version, values, generation, key)


@pytest.fixture
def release_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_unseals_after_an_update_whose_policy_the_release_key_signed(
    swtpm: Swtpm, release_key: ec.EllipticCurvePrivateKey
) -> None:
    public = release_key.public_key()
    with TPMStore(swtpm.tcti) as store:
        counter = NVCounter(store)
        counter.ensure()
        value = counter.read()
        v10 = entry_for(boot(store, b"image 1.0"), "1.0", 1, release_key)
        blob = seal_authorized(counter, Secret(KEY), value, public, 1)
        blob = KeyBlob.from_pem(blob.to_pem())  # the recorded policy survives the file
        assert is_authorized(blob)
        assert bound_generation(blob) == 1 and bound_counter(blob) == value
        assert unseal_authorized(counter, blob, v10, public, 1).reveal() == KEY
        # the update: new measurements, and the entry the release key signed for them
        v11 = entry_for(boot(store, b"image 1.1"), "1.1", 1, release_key)
        with pytest.raises(MeasurementsChanged):
            unseal_authorized(counter, blob, v10, public, 1)
        with pytest.raises(MeasurementsChanged) as by_tpm:
            tpm_unseal(counter, blob, v10, public, 1)
        assert by_tpm.value.rc is not None  # the TPM's own refusal (PolicyAuthorize)
        assert unseal_authorized(counter, blob, v11, public, 1).reveal() == KEY
        assert store.transient_handles() == []


def test_a_policy_signed_by_another_key_is_refused_by_agent_and_tpm(
    swtpm: Swtpm, release_key: ec.EllipticCurvePrivateKey
) -> None:
    public = release_key.public_key()
    intruder = ec.generate_private_key(ec.SECP256R1())
    with TPMStore(swtpm.tcti) as store:
        counter = NVCounter(store)
        counter.ensure()
        values = boot(store, b"image 1.0")
        blob = seal_authorized(counter, Secret(KEY), counter.read(), public, 1)
        forged = entry_for(values, "1.0", 1, intruder)
        before = store.commands_issued
        with pytest.raises(CryptoError) as by_agent:
            unseal_authorized(counter, blob, forged, public, 1)
        assert by_agent.value.check == "release.signature"
        assert store.commands_issued == before  # refused before the TPM was asked
        with pytest.raises(ReleaseSignatureRefused) as by_tpm:
            tpm_unseal(counter, blob, forged, public, 1)
        assert by_tpm.value.check == "release.signature" and by_tpm.value.rc is not None
        # the intruder's own key verifies its own entry, but the blob is not sealed for it
        with pytest.raises(ReleaseStale) as wrong_key:
            tpm_unseal(counter, blob, forged, intruder.public_key(), 1)
        assert wrong_key.value.rc is not None
        assert store.transient_handles() == []


def test_pcrs_matching_no_entry_are_refused(
    swtpm: Swtpm, release_key: ec.EllipticCurvePrivateKey
) -> None:
    public = release_key.public_key()
    with TPMStore(swtpm.tcti) as store:
        counter = NVCounter(store)
        counter.ensure()
        v10 = entry_for(boot(store, b"image 1.0"), "1.0", 1, release_key)
        blob = seal_authorized(counter, Secret(KEY), counter.read(), public, 1)
        boot(store, b"unapproved image")
        with pytest.raises(MeasurementsChanged):
            unseal_authorized(counter, blob, v10, public, 1)
        with pytest.raises(MeasurementsChanged) as by_tpm:
            tpm_unseal(counter, blob, v10, public, 1)
        assert by_tpm.value.rc is not None
        assert store.transient_handles() == []


def test_resealing_under_the_next_generation_kills_old_policies_and_the_old_blob(
    swtpm: Swtpm, release_key: ec.EllipticCurvePrivateKey
) -> None:
    """Revocation is a generation bump: the key is re-sealed under ref(g+1) with the counter
    advanced; the policies of generation g no longer open anything."""
    public = release_key.public_key()
    with TPMStore(swtpm.tcti) as store:
        counter = NVCounter(store)
        counter.ensure()
        value = counter.read()
        values = boot(store, b"image 1.0")
        old_entry = entry_for(values, "1.0", 1, release_key)
        old_blob = seal_authorized(counter, Secret(KEY), value, public, 1)
        new_blob = seal_authorized(counter, Secret(KEY[::-1]), value + 1, public, 2)
        counter.increment()
        new_entry = entry_for(values, "1.0", 2, release_key)
        assert unseal_authorized(counter, new_blob, new_entry, public, 2).reveal() == KEY[::-1]
        # an old policy replayed: the agent says stale, and forced through the TPM says no
        with pytest.raises(ReleaseStale) as by_agent:
            unseal_authorized(counter, new_blob, old_entry, public, 1)
        assert by_agent.value.check == "release.stale" and by_agent.value.rc is None
        with pytest.raises(ReleaseStale) as by_tpm:
            tpm_unseal(counter, new_blob, old_entry, public, 1)
        assert by_tpm.value.rc is not None
        # the blob under ref(g) is dead: the counter moved (the TPM refuses PolicyNV)
        with pytest.raises(CounterMoved) as dead:
            unseal_authorized(counter, old_blob, old_entry, public, 1)
        assert dead.value.rc is not None
        assert store.transient_handles() == []
