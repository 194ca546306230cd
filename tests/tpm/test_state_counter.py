"""The state counter against a real swtpm: a TPM NV counter, and data sealed under PolicyPCR +
PolicyNV (counter == value at sealing). Once the counter moves, the TPM refuses the old blob."""

from __future__ import annotations

import hashlib

import pytest

from agent.protocol.secret import Secret
from agent.tpm import TPMStore
from agent.tpm.nvcounter import (
    CounterMoved,
    NVCounter,
    bound_counter,
    seal_bound,
    unseal_bound,
)
from agent.tpm.store import MeasurementsChanged
from tests.fixtures.swtpm import Swtpm

pytestmark = pytest.mark.tpm

KEY = bytes(range(32))


def test_counter_is_defined_once_and_only_grows(swtpm: Swtpm) -> None:
    with TPMStore(swtpm.tcti) as store:
        counter = NVCounter(store)
        assert not counter.exists()
        assert counter.ensure() is True
        first = counter.read()
        assert counter.ensure() is False
        assert counter.increment() == first + 1
    swtpm.restart()
    with TPMStore(swtpm.tcti) as store:
        assert NVCounter(store).read() == first + 1
        assert store.transient_handles() == []


def test_old_sealed_blob_no_longer_unseals_once_the_counter_moved(swtpm: Swtpm) -> None:
    with TPMStore(swtpm.tcti) as store:
        counter = NVCounter(store)
        counter.ensure()
        now = counter.read()
        old = seal_bound(counter, Secret(KEY), (7, 16), now)
        ahead = seal_bound(counter, Secret(KEY[::-1]), (7, 16), now + 1)
        assert bound_counter(old) == now and bound_counter(ahead) == now + 1
        assert unseal_bound(counter, old).reveal() == KEY
        with pytest.raises(CounterMoved):
            unseal_bound(counter, ahead)  # sealed for the next value: not usable yet
        counter.increment()
        with pytest.raises(CounterMoved) as refused:
            unseal_bound(counter, old)
        assert refused.value.rc == 0x126  # TPM_RC_POLICY: the TPM's own refusal
        assert unseal_bound(counter, ahead).reveal() == KEY[::-1]
        assert store.transient_handles() == []


def test_pcr_change_is_still_refused_and_counter_wins_after_return(swtpm: Swtpm) -> None:
    """Measurements change, the counter moves, the old measurements come back: the blob sealed
    under the old counter stays dead."""
    with TPMStore(swtpm.tcti) as store:
        counter = NVCounter(store)
        counter.ensure()
        blob = seal_bound(counter, Secret(KEY), (16,), counter.read())
        store.pcr_extend(16, hashlib.sha256(b"other firmware").digest())
        with pytest.raises(MeasurementsChanged):
            unseal_bound(counter, blob)
        counter.increment()
        store.pcr_reset(16)
        with pytest.raises(CounterMoved):
            unseal_bound(counter, blob)
