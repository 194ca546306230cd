"""Attack: **root on the device later, with its TPM and the service's commit log**, tries to
reopen the device's join and rebuild the epochs before the joiner's first self-update.

The joining device's keys live in a real swtpm behind the agent's key provider
(agent.daemon.TpmKeys), its core is the agent's (agent.core.AgentCore), the rest of the group and
the service are the pure test doubles of tests/pure/test_agent_core.py. After the join and the
joiner's first update the adversary takes everything the device and the service still have: the
TPM (which runs ECDH for whoever asks), every key blob on the device's disk, the agent's state, the
Welcome and every commit. The Welcome is sealed to the one-time init key, flushed from the TPM and
its blob shredded right after the join; the leaf key the Welcome's tree names was replaced by the
first update and destroyed the same way. Nothing the adversary holds opens the Welcome
(``mls.init-key`` from ``Group.join``, a failed HPKE open with every key the TPM still loads), so
no epoch secret or data key from before the update is recovered.

The same steps run before the join show the attack is real: then the init key still loads and
opens the Welcome's GroupSecrets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.daemon import TpmKeys, leaf_file
from agent.protocol.errors import CryptoError, ProtocolError, StateError
from agent.protocol.initkeys import JOIN_UPDATE_REASON, init_key_name
from agent.protocol.lifecycle import KeyState
from agent.protocol.mls.crypto import decrypt_with_label
from agent.protocol.mls.group import WELCOME_LABEL, Group
from agent.protocol.mls.messages import GroupSecrets, KeyPackage, Welcome
from agent.protocol.wire.messages.group import CommitMessage, UpdateRequest, WelcomeMessage
from agent.protocol.wire.messages.service import CommitAction, WelcomeDelivery
from agent.tpm import KeyBlob, KeyKind, TPMStore
from tests.fixtures.swtpm import SwtpmFactory
from tests.pure.test_agent_core import FakeService, G, acks

pytestmark = pytest.mark.tpm


@pytest.fixture
def tpm(swtpm_factory: SwtpmFactory) -> Iterator[TPMStore]:
    with TPMStore(swtpm_factory.start().tcti) as store:
        yield store


def test_root_later_with_the_tpm_and_the_commit_log_cannot_reopen_the_join(
    tpm: TPMStore, tmp_path: Path
) -> None:
    leaf_dir = tmp_path / "leaves"
    devid = tpm.create_and_load(KeyKind.DEVID)
    keys = TpmKeys(tpm, devid, leaf_dir)
    service = FakeService()
    service.core("dev-a")
    b = service.core("dev-b", keys=keys)  # type: ignore[arg-type]  # the TPM key provider
    service.create("dev-a")
    commit_log: list[bytes] = []

    kp = KeyPackage.decode(service.key_package("dev-b"))
    keys.collect(b.leaf_refs())  # the daemon saves the state, then collects
    assert (leaf_dir / leaf_file(kp.init_key)).exists()
    commit, welcome_message = service.request_commit(
        "dev-a", CommitAction.ADD, member="dev-b", key_package=kp.encode()
    )
    assert isinstance(commit, CommitMessage) and isinstance(welcome_message, WelcomeMessage)
    commit_log.append(commit.commit)
    acks(service, service.fan_out(service.order(commit), ["dev-a"]))
    welcome = Welcome.decode(welcome_message.welcome)
    (sealed,) = welcome.secrets

    # Before the join the attack works: the TPM opens the Welcome with the init key's blob.
    with tpm.load_key(KeyBlob.load(leaf_dir / leaf_file(kp.init_key))) as init_copy:
        opened = GroupSecrets.decode(
            decrypt_with_label(
                init_copy,
                WELCOME_LABEL,
                welcome.encrypted_group_info,
                sealed.kem_output,
                sealed.ciphertext,
            )
        )
    assert len(opened.joiner_secret) == 32

    # The join, with the TPM commands it issues recorded by name.
    ops: list[str] = []
    raw_call = tpm._raw_call

    def counting(operation: str, method: str, *args: object, **kwargs: object) -> object:
        ops.append(method)
        return raw_call(operation, method, *args, **kwargs)

    tpm._raw_call = counting  # type: ignore[method-assign]
    before = tpm.commands_issued
    acks(
        service, {"dev-b": service.deliver("dev-b", WelcomeDelivery(G, 1, welcome_message.welcome))}
    )
    join_commands = tpm.commands_issued - before
    del tpm._raw_call
    keys.collect(b.leaf_refs())  # state saved: the init key is flushed and its blob shredded
    assert not (leaf_dir / leaf_file(kp.init_key)).exists()
    assert b.ledger.get(init_key_name(kp.init_key)).state is KeyState.DESTROYED
    epoch1_data = service.devices["dev-a"].encrypt(G, b"epoch-1 reading", service.now)
    assert b.decrypt(G, epoch1_data, service.now) == b"epoch-1 reading"

    # The joiner's first act: a self-update, asked for on its first tick.
    asks = [x for x in service.bodies("dev-b", b.tick(service.now)) if isinstance(x, UpdateRequest)]
    assert [a.reason for a in asks] == [JOIN_UPDATE_REASON]
    (update,) = service.request_commit("dev-b", CommitAction.UPDATE)
    assert isinstance(update, CommitMessage)
    commit_log.append(update.commit)
    acks(service, service.fan_out(service.order(update), ["dev-a", "dev-b"]))
    keys.collect(b.leaf_refs())
    assert not (leaf_dir / leaf_file(kp.leaf_key)).exists()  # the joined leaf is gone too
    # ...and the group goes on with more epochs the adversary also logs
    for _ in range(3):
        (rekey,) = service.request_commit("dev-a", CommitAction.UPDATE)
        assert isinstance(rekey, CommitMessage)
        commit_log.append(rekey.commit)
        acks(service, service.fan_out(service.order(rekey), ["dev-a", "dev-b"]))
        keys.collect(b.leaf_refs())

    # -- the adversary: root on the device now, with its TPM and the service's commit log -----
    attacker = TpmKeys(tpm, devid, leaf_dir)  # what the agent would build from the disk
    refused: dict[str, str] = {}
    for name, public in (("init key", kp.init_key), ("joined leaf key", kp.leaf_key)):
        with pytest.raises(StateError):
            attacker.load_leaf(public)
        refused[name] = "blob gone"
    # every key blob still on the disk, loaded into the TPM, against the Welcome
    blobs = sorted(leaf_dir.glob("*.pem"))
    assert blobs, "the current leaf key's blob is on the disk"
    for path in blobs:
        key = tpm.load_key(KeyBlob.load(path))
        try:
            with pytest.raises(CryptoError):
                decrypt_with_label(
                    key,
                    WELCOME_LABEL,
                    welcome.encrypted_group_info,
                    sealed.kem_output,
                    sealed.ciphertext,
                )
            with pytest.raises(ProtocolError) as err:
                Group.join(welcome, kp, key, init_key=key)
            assert err.value.check == "mls.init-key"
            refused[path.name] = err.value.check
        finally:
            key.close()
    # without the GroupSecrets there is no joiner secret, hence no epoch-1 secret to replay the
    # commit log from: the epoch-1 data stays sealed for whoever holds only what is left
    assert refused["init key"] == refused["joined leaf key"] == "blob gone"
    assert b.epoch(G) == 5 and len(commit_log) == 5
    assert b.ledger.get(init_key_name(kp.init_key)).state is KeyState.DESTROYED
    # the join's TPM work: one ECDH_ZGen (the init key) and one signature (the ack), plus any
    # ContextLoad of a key the store had swapped out
    assert ops.count("ecdh_zgen") == 1 and ops.count("sign") == 1, ops
    assert join_commands == len(ops) <= 3
    # and the device itself destroyed the epoch-1 data key after its grace period
    later = service.now + 2 * 24 * 3600
    b.tick(later)
    with pytest.raises(ProtocolError) as err:
        b.decrypt(G, epoch1_data, later)
    assert err.value.check == "data.epoch-expired"
