"""TreeKEM members whose DevID and leaf keys live in a real swtpm: they create, join, commit and
process exactly like software members, and processing a commit costs at most one TPM command."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from agent.protocol.errors import ProtocolError
from agent.protocol.mls.group import Group
from agent.protocol.mls.messages import Commit, KeyPackage, Welcome
from agent.tpm import KeyKind, TPMKey, TPMStore
from tests.device_certs import devid_cert_der
from tests.fixtures.swtpm import SwtpmFactory

pytestmark = pytest.mark.tpm


class TpmMember:
    def __init__(self, name: str, store: TPMStore) -> None:
        self.device_id = name.encode()
        self.store = store
        self.devid: TPMKey = store.create_and_load(KeyKind.DEVID)
        self.leaf: TPMKey = store.create_and_load(KeyKind.LEAF)
        self.init: TPMKey = store.create_and_load(KeyKind.LEAF)
        self.key_package = KeyPackage.create(
            self.device_id,
            self.devid,
            self.leaf.public_key(),
            devid_cert_der(self.device_id, self.devid),
            init_key=self.init.public_key(),
        )
        self.group: Group | None = None

    @property
    def g(self) -> Group:
        assert self.group is not None
        return self.group

    def counted(self) -> int:
        return self.store.commands_issued


@pytest.fixture
def members(swtpm_factory: SwtpmFactory) -> Iterator[list[TpmMember]]:
    with ExitStack() as stack:
        out = []
        for i in range(4):
            store = stack.enter_context(TPMStore(swtpm_factory.start().tcti))
            out.append(TpmMember(f"dev-{i}", store))
        yield out


def _process_everywhere(members: list[TpmMember], committer: TpmMember, commit: bytes) -> int:
    """Deliver a commit to every other member; return the most TPM commands one of them spent."""
    worst = 0
    for m in members:
        if m is committer or m.group is None:
            continue
        before = m.counted()
        m.group = m.g.process(Commit.decode(commit))
        worst = max(worst, m.counted() - before)
    return worst


def test_tpm_members_agree_and_spend_at_most_one_command_per_commit(
    members: list[TpmMember],
) -> None:
    a, b, c, d = members
    a.group = Group.create(b"grp-tpm", a.key_package, a.leaf)
    service = a.g.public_group()

    result = a.g.add(a.devid, [b.key_package, c.key_package, d.key_package])
    assert result.welcome is not None
    service = service.apply(result.commit)
    a.group = result.group
    welcome = result.welcome.encode()
    for joiner in (b, c, d):
        before = joiner.counted()
        joiner.group = Group.join(
            Welcome.decode(welcome), joiner.key_package, joiner.leaf, init_key=joiner.init
        )
        assert joiner.counted() - before == 1  # one ECDH_ZGen, with the TPM init key

    worst = []
    # b self-updates with a fresh TPM leaf key; then c removes d; then a updates.
    new_leaf = b.store.create_and_load(KeyKind.LEAF)
    result = b.g.update(b.devid, new_leaf)
    service = service.apply(result.commit)
    b.group = result.group
    b.leaf.close()
    b.leaf = new_leaf
    worst.append(_process_everywhere(members, b, result.commit.encode()))

    leaf_d = d.g.own_leaf
    result = c.g.remove(c.devid, [leaf_d])
    service = service.apply(result.commit)
    c.group = result.group
    with pytest.raises(ProtocolError):
        d.g.process(Commit.decode(result.commit.encode()))
    d.group = None
    worst.append(_process_everywhere(members, c, result.commit.encode()))

    new_leaf = a.store.create_and_load(KeyKind.LEAF)
    result = a.g.update(a.devid, new_leaf)
    service = service.apply(result.commit)
    a.group = result.group
    a.leaf.close()
    a.leaf = new_leaf
    worst.append(_process_everywhere(members, a, result.commit.encode()))

    print("TPM commands per processed commit (worst member):", worst)
    assert max(worst) <= 1, worst
    assert sum(worst) >= 1  # some commit really was opened with a TPM leaf key
    live = [a, b, c]
    assert len({m.g.epoch for m in live}) == 1 and a.g.epoch == service.epoch == 4
    assert len({m.g.epoch_authenticator for m in live}) == 1
    assert len({m.g.data_key() for m in live}) == 1
    assert service.tree_hash() == a.g.tree_hash()
