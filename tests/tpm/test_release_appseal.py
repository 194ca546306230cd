"""Apps' secrets across firmware releases, against a real swtpm: sealed through the local API's
backend (``TpmKeyBackend``, ``agent.appseal``) under the fleet's signed releases, they open after
an approved update, are refused on an unapproved image with nothing changed, follow a revocation
(generation bump) and survive a stop at any step of that re-seal. The release key is a software
P-256 key standing for the token's; the agent core is a real one with software keys."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from agent.appseal import APP_COUNTER_INDEX, STEPS, AppSeals, blob_generation, sealed_generations
from agent.core import AgentCore
from agent.keybackend import TpmKeyBackend
from agent.protocol.errors import ProtocolError
from agent.protocol.lifecycle import KeyState
from agent.protocol.release import open_bundle
from agent.protocol.secret import Secret
from agent.releasestate import SEALED_BUNDLE_FILE, HeldReleases
from agent.tpm import TPMStore
from agent.tpm.authorized import ReleaseStale, bound_counter, tpm_unseal, unseal_authorized
from agent.tpm.blob import KeyBlob
from agent.tpm.nvcounter import CounterMoved, NVCounter
from tests.fixtures.swtpm import Swtpm
from tests.release_proofs import ReleaseSigner

pytestmark = pytest.mark.tpm

PCRS = (7, 16)
UID = 1000


def boot(store: TPMStore, image: bytes) -> dict[int, bytes]:
    """A reboot into ``image``: PCR 16 reset and measured again (PCR 7 stays)."""
    store.pcr_reset(16)
    store.pcr_extend(16, hashlib.sha256(image).digest())
    return store.pcr_read(PCRS)


def a_core() -> AgentCore:
    from tests.pure.test_agent_core import group_of_two

    _, core, _ = group_of_two()
    return core


def backend_for(
    store: TPMStore, core: AgentCore, seal_dir: Path, held: HeldReleases | None, changes: list[int]
) -> TpmKeyBackend:
    return TpmKeyBackend(
        core,
        threading.RLock(),
        signer=core._keys.devid,  # type: ignore[attr-defined]
        sealer=store,
        seal_dir=seal_dir,
        pcrs=PCRS,
        on_change=lambda: changes.append(1),
        clock=lambda: 1_700_000_000.0,
        releases=held,
    )


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*.pem")}


def ledger_states(core: AgentCore) -> dict[str, KeyState]:
    return {r.name: r.state for r in core.ledger if r.name.startswith("app-seal/")}


def test_an_app_secret_follows_approved_releases_and_a_revocation(
    swtpm: Swtpm, tmp_path: Path
) -> None:
    fleet = ReleaseSigner()
    seal_dir = tmp_path / "app-seal"
    public = fleet.key.public_key()
    changes: list[int] = []
    core = a_core()
    with TPMStore(swtpm.tcti) as store:
        fleet.images["1.1"] = boot(store, b"image 1.1")
        fleet.images["1.0"] = boot(store, b"image 1.0")
        held = HeldReleases(public, newest=fleet.bundle(1, ["1.0"]))
        held.others = lambda: sealed_generations(seal_dir)
        backend = backend_for(store, core, seal_dir, held, changes)

        # sealed on 1.0 under generation 1 and the app counter (not the state counter), no
        # PCR value
        backend.seal("db", b"s3cret", UID)
        path = seal_dir / str(UID) / "db.pem"
        blob = KeyBlob.load(path)
        app_counter = NVCounter(store, APP_COUNTER_INDEX)
        value = app_counter.read()
        assert blob_generation(blob) == 1 and bound_counter(blob) == value
        assert blob.policy[1].command_policy[:4] == APP_COUNTER_INDEX.to_bytes(4, "big")
        assert backend.unseal("db", UID) == b"s3cret"

        # 1.1 approved, the update: the secret opens on the new PCRs
        held.adopt(fleet.bundle(1, ["1.0", "1.1"]), sealed_generation=1)
        boot(store, b"image 1.1")
        assert backend.unseal("db", UID) == b"s3cret"

        # an unapproved image: unseal, seal and forget refused, nothing changed
        before, records, changed = tree(seal_dir), ledger_states(core), len(changes)
        boot(store, b"image 1.2-unsigned")
        for call in (
            lambda: backend.unseal("db", UID),
            lambda: backend.seal("db", b"overwritten", UID),
            lambda: backend.forget("db", UID),
        ):
            with pytest.raises(ProtocolError) as refused:
                call()
            assert refused.value.check == "release.unapproved"
        assert "PCRs" in refused.value.reason
        assert tree(seal_dir) == before and ledger_states(core) == records
        assert len(changes) == changed

        # back on an approved release: it opens
        boot(store, b"image 1.1")
        assert backend.unseal("db", UID) == b"s3cret"

        # 1.0 revoked (generation 2 approves 1.1 only): sealed again under generation 2
        old_blob = KeyBlob.load(path)
        gen1 = held.newest
        assert gen1 is not None
        held.adopt(fleet.bundle(2, ["1.1"]), sealed_generation=1)
        assert held.sealed is gen1
        held.resealed()  # the state key's re-seal: the app secret still needs generation 1
        assert held.sealed is gen1
        assert backend.reseal_for_release() == 1
        assert blob_generation(KeyBlob.load(path)) == 2
        assert ledger_states(core) == {
            f"app-seal/{UID}/db#1": KeyState.DESTROYED,
            f"app-seal/{UID}/db#2": KeyState.ACTIVE,
        }
        assert len(changes) == changed + 1
        held.resealed()
        assert held.sealed is None
        assert backend.unseal("db", UID) == b"s3cret"
        assert backend.reseal_for_release() == 0

        assert app_counter.read() == value + 1  # the move that kills generation 1's blobs
        assert bound_counter(KeyBlob.load(path)) == value + 1

        # the copy taken before the revocation: the agent refuses it (release.stale) ...
        new_blob = KeyBlob.load(path)
        old_blob.save(path)
        with pytest.raises(ProtocolError) as stale:
            backend.unseal("db", UID)
        assert stale.value.check == "release.stale"
        # ... and forced through, the TPM refuses it with generation 1's own policy of 1.1 and
        # with generation 2's (PolicyNV: the app counter moved)
        gen1_11 = gen1.version("1.1")
        gen2_11 = held.newest.version("1.1") if held.newest is not None else None
        assert gen1_11 is not None and gen2_11 is not None
        for entry, generation in ((gen1_11, 1), (gen2_11, 2)):
            with pytest.raises(CounterMoved) as by_tpm:
                tpm_unseal(app_counter, old_blob, entry, public, generation)
            assert by_tpm.value.rc is not None
        # an old generation's policy on the re-sealed blob: refused by the agent and the TPM
        with pytest.raises(ReleaseStale):
            unseal_authorized(app_counter, new_blob, gen1_11, public, 1)
        with pytest.raises(ReleaseStale) as refused_by_tpm:
            tpm_unseal(app_counter, new_blob, gen1_11, public, 1)
        assert refused_by_tpm.value.rc is not None
        new_blob.save(path)
        assert backend.unseal("db", UID) == b"s3cret"
        assert store.transient_handles() == []


def test_a_pcr_sealed_app_secret_migrates_when_a_first_bundle_is_held(
    swtpm: Swtpm, tmp_path: Path
) -> None:
    fleet = ReleaseSigner()
    seal_dir = tmp_path / "app-seal"
    changes: list[int] = []
    core = a_core()
    with TPMStore(swtpm.tcti) as store:
        fleet.images["1.1"] = boot(store, b"image 1.1")
        fleet.images["1.0"] = boot(store, b"image 1.0")
        held = HeldReleases(fleet.key.public_key())
        backend = backend_for(store, core, seal_dir, held, changes)
        backend.seal("token", b"t0ken", UID)  # no bundle yet: sealed to the PCRs
        path = seal_dir / str(UID) / "token.pem"
        assert blob_generation(KeyBlob.load(path)) is None

        held.adopt(fleet.bundle(1, ["1.0", "1.1"]), sealed_generation=None)
        assert backend.reseal_for_release() == 1
        assert blob_generation(KeyBlob.load(path)) == 1
        boot(store, b"image 1.1")
        assert backend.unseal("token", UID) == b"t0ken"
        assert ledger_states(core)[f"app-seal/{UID}/token#2"] is KeyState.ACTIVE


class Crash(Exception):
    pass


@pytest.mark.parametrize("step", STEPS)
def test_a_stop_at_any_step_of_the_app_reseal_leaves_every_secret_openable(
    swtpm: Swtpm, tmp_path: Path, step: str
) -> None:
    """Killed at the first time the re-seal after a revocation reaches a step, the next start
    finds both secrets openable (the older bundle is kept on disk while one needs it, even once
    the state key is re-sealed; ``.next`` blobs renamed or removed by their counter value) and
    the re-seal completes, having moved the app counter once."""
    fleet = ReleaseSigner()
    state_dir = tmp_path / "state"
    seal_dir = state_dir / "app-seal"
    state_dir.mkdir()
    public = fleet.key.public_key()
    armed: list[str] = []

    def fault(reached: str) -> None:
        if reached in armed:
            raise Crash(reached)

    def load() -> HeldReleases:
        held = HeldReleases.load(state_dir, public)
        held.others = lambda: sealed_generations(seal_dir)
        return held

    with TPMStore(swtpm.tcti) as store:
        fleet.images["1.0"] = boot(store, b"image 1.0")
        first, second = fleet.signed(1, ["1.0"]), fleet.signed(2, ["1.0"])
        held = load()
        held.adopt(open_bundle(first, public), None, first)
        seals = AppSeals(store, seal_dir, PCRS, held, fault=fault)
        secrets = {"a": b"alpha", "b": b"bravo"}
        for name, value in secrets.items():
            path = seal_dir / str(UID) / f"{name}.pem"
            path.parent.mkdir(parents=True, exist_ok=True)
            seals.seal(Secret(value)).save(path)

        held.adopt(open_bundle(second, public), 1, second)
        counter = NVCounter(store, APP_COUNTER_INDEX)
        value = counter.read()
        armed.append(step)
        done: list[Path] = []
        with pytest.raises(Crash):
            seals.reseal(done.append)

        # the next start: the state key's re-seal committed meanwhile (resealed); the older
        # bundle stays while an app secret's blob is under generation 1
        held = load()
        held.resealed()
        assert held.sealed is not None and (state_dir / SEALED_BUNDLE_FILE).exists()
        seals = AppSeals(store, seal_dir, PCRS, held)
        seals.recover(done.append)
        assert not list(seal_dir.rglob("*.next"))
        for name, value_ in secrets.items():
            blob = KeyBlob.load(seal_dir / str(UID) / f"{name}.pem")
            assert seals.unseal(blob).reveal() == value_
        seals.reseal(done.append)
        assert seals.pending() == [] and counter.read() == value + 1
        assert sorted(p.stem for p in done) == ["a", "b"]  # each ledger record renewed once
        held.resealed()
        assert held.sealed is None and not (state_dir / SEALED_BUNDLE_FILE).exists()
        for name, value_ in secrets.items():
            blob = KeyBlob.load(seal_dir / str(UID) / f"{name}.pem")
            assert blob_generation(blob) == 2 and bound_counter(blob) == value + 1
            assert seals.unseal(blob).reveal() == value_
        assert store.transient_handles() == []
