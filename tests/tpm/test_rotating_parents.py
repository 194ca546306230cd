"""Rotating parents against a real swtpm (agent.tpm.parents): a leaf or init key blob copied
before its destruction no longer loads once its parent is evicted, keys under the current parent
keep working, and both stay so across a TPM restart (swtpm keeps its NV state).

The agent-level scenario (``test_join_then_first_update_*``) runs the joining device's core over
the TPM key provider the daemon uses (agent.daemon.TpmKeys) with the service and the rest of the
group as the pure test doubles of tests/pure/test_agent_core.py, and does what the daemon does
around every saved state (``note_destroyed``, save, ``collect``, ``settle``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.core import leaf_name
from agent.daemon import TpmKeys, leaf_file
from agent.protocol.errors import TPMError
from agent.protocol.hpke import serialize_public_key
from agent.protocol.initkeys import init_key_name
from agent.protocol.lifecycle import KeyKind as RecordKind
from agent.protocol.lifecycle import KeyLedger, KeyState
from agent.protocol.mls.messages import KeyPackage
from agent.protocol.wire.messages.group import CommitMessage, WelcomeMessage
from agent.protocol.wire.messages.service import CommitAction, WelcomeDelivery
from agent.staterotation import parent_budget
from agent.tpm import KeyBlob, KeyKind, TPMStore
from agent.tpm.blob import PARENT_OWNER
from agent.tpm.parents import RING_BASE, ParentRing, evicted_note, pending_note
from agent.tpm.store import ParentEvicted
from tests.fixtures.swtpm import Swtpm
from tests.pure.test_agent_core import FakeService, G, acks

pytestmark = pytest.mark.tpm

_RC_HANDLE = 0x08B


def _ecdh_works(store: TPMStore, blob: KeyBlob) -> None:
    peer = ec.generate_private_key(ec.SECP256R1())
    with store.load_key(blob) as key:
        assert key.exchange(ec.ECDH(), peer.public_key()) == peer.exchange(
            ec.ECDH(), key.public_key()
        )


def _refused(store: TPMStore, pem: bytes) -> ParentEvicted:
    with pytest.raises(ParentEvicted) as refused:
        store.load_key(KeyBlob.from_pem(pem))
    return refused.value


def test_a_blob_copied_before_destruction_no_longer_loads_once_its_parent_is_evicted(
    swtpm: Swtpm,
) -> None:
    with TPMStore(swtpm.tcti) as store:
        ring = ParentRing(store)
        first = ring.ensure()
        assert first == RING_BASE and ring.ensure() == first
        leaf = store.create_key(KeyKind.LEAF, parent=first)
        init = store.create_key(KeyKind.LEAF, parent=first)
        assert leaf.parent == first and len(leaf.parent_name) == 34
        assert KeyBlob.from_pem(leaf.to_pem()) == leaf
        copies = [leaf.to_pem(), init.to_pem()]  # the disk image, taken before destruction
        _ecdh_works(store, leaf)
        second = ring.rotate()
        assert second == RING_BASE + 1 and ring.current() == second
        fresh = store.create_key(KeyKind.LEAF, parent=second)
        ring.evict(first)
        for pem in copies:
            error = _refused(store, pem)
            assert error.check == "tpm.parent-evicted"
            assert error.rc is not None and 0x080 | (error.rc & 0x3F) == _RC_HANDLE
        _ecdh_works(store, fresh)
        assert store.persistent_handles().count(second) == 1
        assert first not in store.persistent_handles()
        assert store.transient_handles() == []
    swtpm.restart()
    with TPMStore(swtpm.tcti) as store:
        ring = ParentRing(store)
        assert ring.present() == {second} and ring.current() == second
        _ecdh_works(store, fresh)
        for pem in copies:
            _refused(store, pem)
        # the evicted parent cannot be made again: a new parent at the same handle is another
        # key (random unique), and the copy is told apart by the Name it records
        current = second
        while current != first:
            made = ring.rotate()
            assert made is not None
            ring.evict(current)
            current = made
        assert ring.present() == {first}
        for pem in copies:
            error = _refused(store, pem)
            assert "newer parent" in error.detail
        assert store.transient_handles() == []


def test_blobs_under_the_srk_still_load_and_the_ring_is_bounded(swtpm: Swtpm) -> None:
    with TPMStore(swtpm.tcti) as store:
        legacy = store.create_key(KeyKind.LEAF)  # a device's leaf from before rotating parents
        assert legacy.parent == PARENT_OWNER and legacy.parent_name == b""
        ring = ParentRing(store)
        made = [ring.ensure(), ring.rotate(), ring.rotate()]
        assert made == [RING_BASE, RING_BASE + 1, RING_BASE + 2]
        assert ring.rotate() is None  # three persistent parents at most
        _ecdh_works(store, legacy)
        # a damaged blob under a parent that is there is damaged, not "evicted"
        good = store.create_key(KeyKind.LEAF, parent=made[2])
        flipped = bytearray(good.private)
        flipped[-1] ^= 1
        with pytest.raises(TPMError, match="damaged") as damaged:
            store.load_key(replace(good, private=bytes(flipped)))
        assert not isinstance(damaged.value, ParentEvicted)
        _ecdh_works(store, good)
        assert ring.evict_all() == made
        assert ParentRing(store).present() == set()
        _ecdh_works(store, legacy)


def _load_copy(store: TPMStore, pem: bytes) -> None:
    store.load_key(KeyBlob.from_pem(pem)).close()


def test_join_then_first_update_the_copied_init_and_joined_leaf_blobs_are_dead(
    swtpm: Swtpm, tmp_path: Path
) -> None:
    leaf_dir = tmp_path / "leaves"
    store = TPMStore(swtpm.tcti)
    try:
        devid = store.create_and_load(KeyKind.DEVID)
        keys = TpmKeys(store, devid, leaf_dir)
        budget = parent_budget()
        service = FakeService()
        service.core("dev-a")
        b = service.core("dev-b", keys=keys)  # type: ignore[arg-type]  # the TPM key provider
        service.create("dev-a")

        def persist() -> bool:
            """What Daemon._persist does around the state write."""
            live = b.leaf_refs()
            keys.note_destroyed(b.ledger, live)
            keys.collect(live)
            return keys.settle(b.ledger, budget, service.now)

        kp = KeyPackage.decode(service.key_package("dev-b"))
        persist()
        first = keys.parents.current()
        assert first == RING_BASE
        disk_image = {
            "init": (leaf_dir / leaf_file(kp.init_key)).read_bytes(),
            "leaf": (leaf_dir / leaf_file(kp.leaf_key)).read_bytes(),
        }
        commit, welcome_message = service.request_commit(
            "dev-a", CommitAction.ADD, member="dev-b", key_package=kp.encode()
        )
        assert isinstance(commit, CommitMessage) and isinstance(welcome_message, WelcomeMessage)
        acks(service, service.fan_out(service.order(commit), ["dev-a"]))
        acks(
            service,
            {"dev-b": service.deliver("dev-b", WelcomeDelivery(G, 1, welcome_message.welcome))},
        )
        assert persist() is False
        init_record = b.ledger.get(init_key_name(kp.init_key))
        assert init_record.state is KeyState.DESTROYED
        assert init_record.note == pending_note(first)  # honest: the copy still loads
        _load_copy(store, disk_image["init"])
        assert keys.parents.current() == RING_BASE + 1  # rotated: new keys go elsewhere

        (update,) = service.request_commit("dev-b", CommitAction.UPDATE)
        assert isinstance(update, CommitMessage)
        acks(service, service.fan_out(service.order(update), ["dev-a", "dev-b"]))
        assert persist() is True  # the ledger changed: the daemon saves it again
        assert first not in store.persistent_handles()
        for name in ("init", "leaf"):
            assert _refused(store, disk_image[name]).check == "tpm.parent-evicted"
        for record_name in (init_key_name(kp.init_key), leaf_name(kp.leaf_key)):
            record = b.ledger.get(record_name)
            assert record.state is KeyState.DESTROYED
            assert record.note == evicted_note(first)
        # the member's current leaf (under the new parent) still works after a TPM restart
        epoch_data = service.devices["dev-a"].encrypt(G, b"after the update", service.now)
        assert b.decrypt(G, epoch_data, service.now) == b"after the update"
        current_blobs = sorted(leaf_dir.glob("*.pem"))
        assert current_blobs
        assert all(KeyBlob.load(p).parent == RING_BASE + 1 for p in current_blobs)
    finally:
        store.close()
    swtpm.restart()
    with TPMStore(swtpm.tcti) as store:
        for path in current_blobs:
            _ecdh_works(store, KeyBlob.load(path))
        for pem in disk_image.values():
            _refused(store, pem)


def test_an_eviction_whose_ledger_was_not_saved_is_noted_at_the_next_save(
    swtpm: Swtpm, tmp_path: Path
) -> None:
    """kill -9 between the eviction and the second state write: the saved ledger still says
    "eviction pending"; the next settle (any later save) finds the parent gone and says so."""
    with TPMStore(swtpm.tcti) as store:
        devid = store.create_and_load(KeyKind.DEVID)
        keys = TpmKeys(store, devid, tmp_path / "leaves")
        key = keys.new_leaf_key()
        public = serialize_public_key(key.public_key())
        ledger = KeyLedger(lambda: 100)
        ledger.add(leaf_name(public), RecordKind.LEAF, active=True)
        ledger.transition(leaf_name(public), KeyState.DESTROYED)
        keys.note_destroyed(ledger, set())
        saved = KeyLedger(lambda: 100, list(ledger))  # what the state file holds
        keys.collect(set())
        assert keys.settle(ledger, parent_budget(), 100) is True
        assert RING_BASE not in store.persistent_handles()
        # the process died before saving ``ledger``; the next start has ``saved``
        again = TpmKeys(store, devid, tmp_path / "leaves")
        assert saved.get(leaf_name(public)).note == pending_note(RING_BASE)
        assert again.settle(saved, parent_budget(), 200) is True
        assert saved.get(leaf_name(public)).note == evicted_note(RING_BASE)
        assert again.settle(saved, parent_budget(), 300) is False
