"""The running keyagent (real swtpm, real Mosquitto) with rotating parents: the device founds a
group, then commits two self-updates on the service's request. A copy of the founding leaf
key's blob taken before (a disk image) loads while its parent is still in the TPM, and the
ledger says so ("eviction pending"); once the next update drains that parent the agent evicts
it, the ledger says "evicted", and the copy is refused by the TPM (``tpm.parent-evicted``),
also after the TPM restarts. The agent's current leaf still loads and works."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.localapi.client import LocalApiClient
from agent.protocol.mls.messages import Commit
from agent.protocol.wire.messages.ack import Ack
from agent.protocol.wire.messages.group import CommitMessage
from agent.protocol.wire.messages.key_state import KeyStateReport
from agent.protocol.wire.messages.service import CommitAction, CommitRequest
from agent.tpm import KeyBlob
from agent.tpm.parents import RING_BASE
from agent.tpm.store import ParentEvicted, TPMStore
from tests.e2e.test_agent_daemon import (
    AgentProcess,
    ServiceHarness,
    SoftwareMember,
    form_group,
    write_agent,
)
from tests.e2e.test_agent_daemon import G as GROUP
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.swtpm import Swtpm

pytestmark = pytest.mark.e2e


@pytest.fixture
def env(
    tmp_path: Path, swtpm: Swtpm, mosquitto: MosquittoBroker
) -> Iterator[tuple[AgentProcess, ServiceHarness]]:
    files = write_agent(tmp_path / "device", swtpm, mosquitto)
    agent = AgentProcess(files)
    harness = ServiceHarness(mosquitto, files)
    try:
        yield agent, harness
    finally:
        if agent.process is not None:
            agent.terminate()
        harness.close()
        print(agent.log_text())


def _self_update(member: SoftwareMember, harness: ServiceHarness, epoch: int) -> int:
    assert member.group is not None
    command_id = os.urandom(16)
    harness.command(CommitRequest(command_id, GROUP, epoch, CommitAction.UPDATE))
    commit = harness.expect(CommitMessage).body
    assert isinstance(commit, CommitMessage) and commit.command_id == command_id
    member.group = member.group.process(Commit.decode(commit.commit))
    harness.relay(epoch, commit.commit)
    ack = harness.expect(Ack, epoch=epoch + 1).body
    assert isinstance(ack, Ack) and ack.command_id == command_id
    return epoch + 1


def _leaf_notes(agent: AgentProcess) -> dict[str, str | None]:
    with LocalApiClient(agent.files.socket) as api:
        return {
            k["name"]: k.get("note")
            for k in api.list_keys()
            if k["name"].startswith("leaf/") and k["state"] == "destroyed"
        }


def test_the_founding_leaf_blob_copied_before_stops_loading_once_its_parent_drains(
    env: tuple[AgentProcess, ServiceHarness], swtpm: Swtpm
) -> None:
    agent, harness = env
    agent.start()
    harness.expect(KeyStateReport)
    member = form_group(agent, harness)
    leaves = agent.files.state_dir / "leaves"
    disk_image = {p.name: p.read_bytes() for p in leaves.glob("*.pem")}
    assert len(disk_image) == 1  # the founding leaf
    (founding,) = disk_image.values()
    assert KeyBlob.from_pem(founding).parent == RING_BASE

    epoch = _self_update(member, harness, 1)
    notes = _leaf_notes(agent)
    assert list(notes.values()) == [
        "flushed, blob shredded; parent 0x81004b40 eviction pending (until then a copy of its "
        "blob taken before still loads)"
    ]

    epoch = _self_update(member, harness, epoch)
    notes = _leaf_notes(agent)
    assert len(notes) == 2
    assert set(notes.values()) == {
        "flushed, blob shredded, parent 0x81004b40 evicted: no copy of its blob loads any more"
    }
    assert agent.terminate() == 0
    current = [KeyBlob.load(p) for p in leaves.glob("*.pem")]
    assert [b.parent for b in current] == [RING_BASE + 1]
    swtpm.restart()
    with TPMStore(swtpm.tcti) as store:
        assert RING_BASE not in store.persistent_handles()
        with pytest.raises(ParentEvicted) as refused:
            store.load_key(KeyBlob.from_pem(founding))
        assert refused.value.check == "tpm.parent-evicted"
        store.load_key(current[0]).close()

    # the agent starts again on the restarted TPM and goes on in its group
    agent.start()
    harness.expect(KeyStateReport)
    epoch = _self_update(member, harness, epoch)
    assert agent.terminate() == 0
    assert agent.status()["groups"][0]["epoch"] == epoch
