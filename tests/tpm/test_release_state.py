"""The agent's state across firmware releases, against a real swtpm: ``StateKeeper`` seals the
state key for the fleet's signed releases, opens it after an approved update, holds it (nothing
moved) on an unapproved image, and seals it again when a revocation bumps the generation. The
release key is a software P-256 key standing for the token's."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from agent.protocol.release import open_bundle, sign_bundle
from agent.releasestate import SEALED_BUNDLE_FILE, HeldReleases
from agent.staterotation import STATE_FILE, STATE_KEY_BLOB, STEPS, RotationBudget, StateKeeper
from agent.tpm import TPMStore
from agent.tpm.authorized import (
    ReleaseStale,
    bound_generation,
    is_authorized,
    tpm_unseal,
    unseal_authorized,
)
from agent.tpm.blob import KeyBlob
from agent.tpm.nvcounter import NVCounter
from tests.fixtures.swtpm import Swtpm
from tests.release_proofs import ReleaseSigner

pytestmark = pytest.mark.tpm

PCRS = (7, 16)
STATE = {"groups": {"g": {"epoch": 3}}}


def boot(store: TPMStore, image: bytes) -> dict[int, bytes]:
    """A reboot into ``image``: PCR 16 reset and measured again (PCR 7 stays)."""
    store.pcr_reset(16)
    store.pcr_extend(16, hashlib.sha256(image).digest())
    return store.pcr_read(PCRS)


def keeper(store: TPMStore, state_dir: Path, releases: HeldReleases) -> StateKeeper:
    k = StateKeeper(store, state_dir, PCRS, releases=releases, clock=lambda: 10_000.0)
    k.open()
    return k


def files(state_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(state_dir.iterdir())}


def test_state_survives_approved_updates_and_holds_on_an_unapproved_image(
    swtpm: Swtpm, tmp_path: Path
) -> None:
    fleet = ReleaseSigner()
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    with TPMStore(swtpm.tcti) as store:
        fleet.images["1.0"] = boot(store, b"image 1.0")
        fleet.images["1.1"] = boot(store, b"image 1.1")
        fleet.images["1.0"] = boot(store, b"image 1.0")
        counter = NVCounter(store)

        # release 1.0 approved (bundle 1, generation 1): the first start seals the new way
        held = HeldReleases(fleet.key.public_key(), newest=fleet.bundle(1, ["1.0"]))
        k = keeper(store, state_dir, held)
        assert k.created and k.held is None and k.sealed_generation == 1
        blob = KeyBlob.load(state_dir / STATE_KEY_BLOB)
        assert is_authorized(blob) and bound_generation(blob) == 1
        k.save(dict(STATE), frozenset())

        # 1.1 approved (bundle 2, same generation: no re-seal), then the reboot into 1.1
        held.adopt(fleet.bundle(1, ["1.0", "1.1"]), k.sealed_generation)
        assert not k.releases_changed()
        boot(store, b"image 1.1")
        k = keeper(store, state_dir, held)
        assert k.held is None and k.release_version == "1.1"
        assert k.load() == STATE

        # an unapproved image: held, and nothing moved
        value, before = counter.read(), files(state_dir)
        boot(store, b"image 1.2-unsigned")
        k = keeper(store, state_dir, held)
        assert k.held is not None and "not an approved release" in k.held
        assert "PCRs [16] differ" in k.held
        assert k.load() is None and k.state_file is None
        assert k.save({"groups": {}}, frozenset()) is False
        assert counter.read() == value
        assert files(state_dir) == before

        # back to 1.1: the same state opens
        boot(store, b"image 1.1")
        k = keeper(store, state_dir, held)
        assert k.held is None and k.load() == STATE

        # 1.0 revoked (bundle 3, generation 2): the running agent seals its key again
        old_bundle = held.newest
        assert old_bundle is not None
        held.adopt(fleet.bundle(2, ["1.1"]), k.sealed_generation)
        assert held.sealed == old_bundle  # kept until the re-seal commits
        assert k.releases_changed() and k.rotation_due()
        assert k.save(dict(STATE), frozenset()) is True  # the rotation
        assert counter.read() == value + 1
        assert k.sealed_generation == 2 and held.sealed is None
        blob = KeyBlob.load(state_dir / STATE_KEY_BLOB)
        assert bound_generation(blob) == 2

        # the old bundle's 1.0 entry no longer opens the state: the agent and the TPM refuse
        boot(store, b"image 1.0")
        old_10 = next(e for e in old_bundle.releases if e.version == "1.0")
        with pytest.raises(ReleaseStale):
            unseal_authorized(counter, blob, old_10, fleet.key.public_key(), 1)
        with pytest.raises(ReleaseStale) as by_tpm:
            tpm_unseal(counter, blob, old_10, fleet.key.public_key(), 1)
        assert by_tpm.value.rc is not None
        k = keeper(store, state_dir, held)
        assert k.held is not None and counter.read() == value + 1
        # even if the old bundle were put back as the newest
        k = keeper(store, state_dir, HeldReleases(fleet.key.public_key(), newest=old_bundle))
        assert k.held is not None and "generation 2" in k.held

        # 1.1 still opens it, under generation 2
        boot(store, b"image 1.1")
        k = keeper(store, state_dir, held)
        assert k.held is None and k.release_version == "1.1" and k.load() == STATE
        assert store.transient_handles() == []


def test_start_reseals_under_a_newer_generation_and_migrates_a_pcr_sealed_key(
    swtpm: Swtpm, tmp_path: Path
) -> None:
    fleet = ReleaseSigner()
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    with TPMStore(swtpm.tcti) as store:
        fleet.images["1.0"] = boot(store, b"image 1.0")
        counter = NVCounter(store)
        # a device from before releases: sealed to the PCRs (and the counter)
        k = StateKeeper(store, state_dir, PCRS)
        k.open()
        k.save(dict(STATE), frozenset())
        assert not is_authorized(KeyBlob.load(state_dir / STATE_KEY_BLOB))

        # the release key and a first bundle: the next start migrates to the authorized seal
        value = counter.read()
        held = HeldReleases(fleet.key.public_key(), newest=fleet.bundle(1, ["1.0"]))
        k = keeper(store, state_dir, held)
        assert k.load() == STATE and k.sealed_generation == 1
        assert counter.read() == value + 1
        assert bound_generation(KeyBlob.load(state_dir / STATE_KEY_BLOB)) == 1

        # 1.0 revoked while the agent was stopped (generation 2 approves only 1.1; the key is
        # still under 1, whose bundle approves 1.0): the TPM would still take generation 1's
        # 1.0 policy, the agent does not use it: held, nothing moved
        gen1 = held.newest
        assert gen1 is not None
        fleet.images["1.1"] = boot(store, b"image 1.1")
        boot(store, b"image 1.0")
        revoked = HeldReleases(fleet.key.public_key(), newest=gen1)
        revoked.adopt(fleet.bundle(2, ["1.1"]), sealed_generation=1)
        k = keeper(store, state_dir, revoked)
        assert k.held is not None and counter.read() == value + 1

        # a bundle of generation 2 that still approves 1.0 (the re-seal after a revocation of
        # another release did not commit before the stop): opened with generation 1's entry,
        # sealed again under 2
        held.adopt(fleet.bundle(2, ["1.0"]), sealed_generation=1)
        assert held.sealed is gen1
        k = keeper(store, state_dir, held)
        assert k.held is None and k.load() == STATE
        assert k.sealed_generation == 2 and held.sealed is None
        assert counter.read() == value + 2
        assert bound_generation(KeyBlob.load(state_dir / STATE_KEY_BLOB)) == 2
        assert (state_dir / STATE_FILE).exists()
        assert store.transient_handles() == []


class Crash(Exception):
    pass


@pytest.mark.parametrize("step", STEPS)
def test_a_stop_at_any_step_of_the_reseal_leaves_one_state_that_opens(
    swtpm: Swtpm, tmp_path: Path, step: str
) -> None:
    """The re-seal after a revocation is a rotation: killed at any of its steps, the next start
    opens the state (with the kept older bundle before the commit, the newest after it) and
    ends sealed under the newest generation, the older bundle file gone."""
    fleet = ReleaseSigner()
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    public = fleet.key.public_key()
    armed: list[str] = []

    def fault(reached: str) -> None:
        if reached in armed:
            raise Crash(reached)

    with TPMStore(swtpm.tcti) as store:
        fleet.images["1.0"] = boot(store, b"image 1.0")
        first = sign_bundle(
            seq=1, generation=1, time=1, releases=[("1.0", fleet.images["1.0"])], key=fleet.key
        )
        second = sign_bundle(
            seq=2, generation=2, time=2, releases=[("1.0", fleet.images["1.0"])], key=fleet.key
        )
        held = HeldReleases.load(state_dir, public)
        held.adopt(open_bundle(first, public), None, first)
        k = StateKeeper(store, state_dir, PCRS, releases=held, fault=fault)
        k.open()
        k.save(dict(STATE), frozenset())
        held.adopt(open_bundle(second, public), k.sealed_generation, second)
        assert (state_dir / SEALED_BUNDLE_FILE).exists()
        assert k.releases_changed()
        armed.append(step)
        with pytest.raises(Crash):
            k.save(dict(STATE), frozenset())

        again = keeper(store, state_dir, HeldReleases.load(state_dir, public))
        assert again.held is None and again.load() == STATE
        assert again.sealed_generation == 2
        assert bound_generation(KeyBlob.load(state_dir / STATE_KEY_BLOB)) == 2
        assert not (state_dir / SEALED_BUNDLE_FILE).exists()
        assert store.transient_handles() == []


def test_a_reseal_waits_for_a_rotation_token(swtpm: Swtpm, tmp_path: Path) -> None:
    """A newer generation at runtime re-seals through the rotation budget (NV endurance): with
    no token the save does not rotate; once one is there the tick's save does."""
    fleet = ReleaseSigner()
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    now = [10_000.0]
    with TPMStore(swtpm.tcti) as store:
        fleet.images["1.0"] = boot(store, b"image 1.0")
        held = HeldReleases(fleet.key.public_key(), newest=fleet.bundle(1, ["1.0"]))
        budget = RotationBudget(tokens=0.0, updated=int(now[0]))
        k = StateKeeper(store, state_dir, PCRS, releases=held, budget=budget, clock=lambda: now[0])
        k.open()
        k.save(dict(STATE), frozenset())
        value = NVCounter(store).read()
        held.adopt(fleet.bundle(2, ["1.0"]), k.sealed_generation)
        assert k.releases_changed() and not k.rotation_due()
        assert k.save(dict(STATE), frozenset()) is False
        assert k.sealed_generation == 1 and NVCounter(store).read() == value
        now[0] += 3600  # a token (24 a day)
        assert k.rotation_due() and k.will_rotate(frozenset())
        assert k.save(dict(STATE), frozenset()) is True
        assert k.sealed_generation == 2 and NVCounter(store).read() == value + 1
        assert not k.rotation_due()
