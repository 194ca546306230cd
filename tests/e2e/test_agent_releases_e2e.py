"""``keyagent run`` with a release key, as a real process against a real swtpm and a real
Mosquitto (the harness of test_agent_daemon plays the service and a software group member; the
release key is a software P-256 key standing for the token's). The agent takes the retained
release bundle, seals its state for the approved releases, keeps its group through an approved
update, holds its state on an unapproved image without moving anything, and after a revocation
no longer opens its state on the revoked release. An app's secret sealed through the local API
follows the same releases (``agent.appseal``)."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.appseal import blob_generation
from agent.localapi.client import LocalApiClient
from agent.protocol.errors import ProtocolError
from agent.protocol.release import sign_bundle
from agent.protocol.topics import FEED_RECIPIENT, RELEASES_TOPIC
from agent.protocol.wire.messages.key_state import KeyStateReport
from agent.protocol.wire.messages.release import ReleaseBundleMessage
from agent.staterotation import read_state
from agent.tpm.blob import KeyBlob
from agent.tpm.nvcounter import NVCounter
from agent.tpm.store import TPMStore
from provisioning import pki
from provisioning import releases as model
from tests.e2e.test_agent_daemon import AgentProcess, ServiceHarness, form_group, write_agent
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.swtpm import Swtpm
from tests.release_proofs import proof

pytestmark = pytest.mark.e2e

PCR = 16


def image_pcrs(image: str) -> dict[int, bytes]:
    """PCR 16 after a boot that measured ``image`` (from the reset state)."""
    digest = hashlib.sha256(image.encode()).digest()
    return {PCR: hashlib.sha256(bytes(32) + digest).digest()}


def image_manifest(image: str) -> model.Manifest:
    """Release ``image``: one component, the image, measured into PCR 16."""
    digest = hashlib.sha256(image.encode()).digest()
    return model.Manifest(image, (model.Component("image", image, PCR, digest),))


def boot(swtpm: Swtpm, image: str) -> None:
    with TPMStore(swtpm.tcti) as store:
        store.pcr_reset(PCR)
        store.pcr_extend(PCR, hashlib.sha256(image.encode()).digest())
        assert store.pcr_read([PCR]) == image_pcrs(image)


def counter(swtpm: Swtpm) -> int:
    with TPMStore(swtpm.tcti) as store:
        return NVCounter(store).read()


def wait_for(agent: AgentProcess, what: str, ok: Callable[[dict[str, Any]], bool]) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            if ok(agent.status()):
                return
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            pass
        assert time.monotonic() < deadline, f"agent status never showed {what}"
        time.sleep(0.1)


class Releases:
    """The service's side of the releases: the release key and the retained bundle."""

    def __init__(self, harness: ServiceHarness, key_file: Path) -> None:
        self.harness = harness
        self.key = ec.generate_private_key(ec.SECP256R1())
        key_file.write_bytes(pki.public_key_to_pem(self.key.public_key()))
        self.seq = 0

    def publish(self, generation: int, versions: tuple[str, ...]) -> None:
        self.seq += 1
        bundle = sign_bundle(
            seq=self.seq,
            generation=generation,
            time=int(time.time()),
            releases=[(v, image_pcrs(v)) for v in versions],
            key=self.key,
            # each approved by an operator of the CA the agent trusts (min_approvals 1)
            proofs={v: proof(v, of=image_manifest(v)) for v in versions},
        )
        payload = self.harness.sign(ReleaseBundleMessage(bundle=bundle), FEED_RECIPIENT)
        self.harness.client.publish(RELEASES_TOPIC, payload, retain=True)


@pytest.fixture
def env(
    tmp_path: Path, swtpm: Swtpm, mosquitto: MosquittoBroker
) -> Iterator[tuple[AgentProcess, ServiceHarness, Releases]]:
    files = write_agent(tmp_path / "device", swtpm, mosquitto, pcrs=(PCR,))
    key_file = tmp_path / "device" / "release-key.pem"
    with open(files.config, "a") as config:
        config.write(f'\n[releases]\nkey = "{key_file}"\n')
    agent = AgentProcess(files)
    harness = ServiceHarness(mosquitto, files)
    releases = Releases(harness, key_file)
    try:
        yield agent, harness, releases
    finally:
        if agent.process is not None:
            agent.terminate()
        harness.close()
        print(agent.log_text())


def state_files(state_dir: Path) -> dict[str, bytes]:
    names = ("state-key.pem", "agent.state", APP_BLOB)
    return {n: (state_dir / n).read_bytes() for n in names}


APP_BLOB = f"app-seal/{os.getuid()}/cloud-token.pem"
TOKEN = b"token-0123456789"


def app_unseal(agent: AgentProcess) -> bytes:
    with LocalApiClient(agent.files.socket) as api:
        return api.unseal("cloud-token")


def app_refused(agent: AgentProcess) -> str:
    with pytest.raises(ProtocolError) as refused:
        app_unseal(agent)
    return refused.value.check


def test_state_survives_an_approved_update_and_is_held_on_an_unapproved_image(
    env: tuple[AgentProcess, ServiceHarness, Releases], swtpm: Swtpm
) -> None:
    agent, harness, releases = env
    state_dir = agent.files.state_dir
    boot(swtpm, "1.0")
    releases.publish(1, ("1.0",))
    agent.start()
    harness.expect(KeyStateReport)
    member = form_group(agent, harness)
    assert member.group is not None
    # the bundle arrived: kept, and the state key sealed for generation 1
    wait_for(agent, "generation 1", lambda s: s["release"]["sealed_generation"] == 1)
    assert (state_dir / "release-bundle.cose").exists()
    with LocalApiClient(agent.files.socket) as api:
        api.seal("cloud-token", TOKEN)
    assert blob_generation(KeyBlob.load(state_dir / APP_BLOB)) == 1

    # 1.1 approved; the device updates and reboots into it: same group, same epoch
    releases.publish(1, ("1.0", "1.1"))
    wait_for(agent, "bundle 2", lambda s: s["release"]["bundle_seq"] == 2)
    assert agent.terminate() == 0
    boot(swtpm, "1.1")
    agent.start()
    report = harness.expect(KeyStateReport).body
    assert isinstance(report, KeyStateReport)
    assert (report.release_seq, report.release_generation, report.release_version) == (
        2,
        1,
        "1.1",
    )
    wait_for(agent, "release 1.1", lambda s: s["release"]["version"] == "1.1")
    status = agent.status()
    assert status["release"]["held"] is None
    assert [(g["group"], g["epoch"]) for g in status["groups"]] == [("g1", 1)]
    assert app_unseal(agent) == TOKEN  # the app's data too

    # an unapproved image: held, nothing moved, the refusal reported
    assert agent.terminate() == 0
    before, value = state_files(state_dir), counter(swtpm)
    boot(swtpm, "1.2-unsigned")
    agent.start()
    report = harness.expect(KeyStateReport).body
    assert isinstance(report, KeyStateReport)
    assert ("release.unapproved", 1) in report.refused
    wait_for(agent, "held", lambda s: s["release"]["held"] is not None)
    status = agent.status()
    assert status["groups"] == [] and "not an approved release" in status["release"]["held"]
    assert "[release.unapproved]" in agent.log_text()
    assert app_refused(agent) == "release.unapproved"
    assert agent.terminate() == 0
    assert state_files(state_dir) == before and counter(swtpm) == value

    # back on 1.1: the same state
    boot(swtpm, "1.1")
    agent.start()
    harness.expect(KeyStateReport)
    wait_for(agent, "group back", lambda s: [g["epoch"] for g in s["groups"]] == [1])
    assert app_unseal(agent) == TOKEN

    # 1.0 revoked (generation 2): the running agent seals its state key again
    releases.publish(2, ("1.1",))
    wait_for(agent, "generation 2", lambda s: s["release"]["sealed_generation"] == 2)
    assert counter(swtpm) == value + 1
    assert blob_generation(KeyBlob.load(state_dir / APP_BLOB)) == 2  # sealed again before it
    assert app_unseal(agent) == TOKEN
    assert agent.terminate() == 0

    # booting the revoked release does not open the state any more
    boot(swtpm, "1.0")
    agent.start()
    harness.expect(KeyStateReport)
    wait_for(agent, "held on 1.0", lambda s: s["release"]["held"] is not None)
    assert agent.status()["groups"] == []
    assert app_refused(agent) == "release.unapproved"
    assert agent.terminate() == 0
    boot(swtpm, "1.1")
    agent.start()
    harness.expect(KeyStateReport)
    wait_for(agent, "group on 1.1", lambda s: [g["epoch"] for g in s["groups"]] == [1])
    assert app_unseal(agent) == TOKEN
    assert agent.terminate() == 0
    # a stopped agent's state, read as the simulator does, with the release key
    with TPMStore(swtpm.tcti) as store:
        saved = read_state(store, state_dir, releases.key.public_key())
    assert list(saved["groups"]) == ["g1"]
