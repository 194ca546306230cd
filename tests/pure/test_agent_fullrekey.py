"""The agent's side of a full rekey by Update proposals (software keys): a member proposes a new
leaf key when asked (kept across a restart, the same proposal when asked again), the committer
commits other members' proposals with its own self-update, every member follows, an updated
member's old leaf key is destroyed in its ledger, and a proposal never committed is destroyed
after ``PROPOSAL_EPOCHS``."""

from __future__ import annotations

import cbor2
import pytest

from agent.core import PROPOSAL_EPOCHS, AgentCore, leaf_name
from agent.protocol.lifecycle import KeyState
from agent.protocol.mls.messages import Update
from agent.protocol.wire.messages.group import (
    REFUSAL_CHECKS,
    CommitMessage,
    CommitRefused,
    UpdateProposal,
    WelcomeMessage,
)
from agent.protocol.wire.messages.service import (
    CommitAction,
    CommitRequest,
    UpdateProposalRequest,
    WelcomeDelivery,
)
from tests.pure.test_agent_core import FakeService, G, acks, cmd

pytestmark = pytest.mark.pure


def group_of(names: list[str]) -> FakeService:
    service = FakeService()
    for name in names:
        service.core(name)
    service.create(names[0])
    for name in names[1:]:
        kp = service.key_package(name)
        commit, welcome = service.request_commit(
            names[0], CommitAction.ADD, member=name, key_package=kp
        )
        assert isinstance(commit, CommitMessage) and isinstance(welcome, WelcomeMessage)
        relay = service.order(commit)
        members = [n for n in names if n != name and G in service.devices[n].groups()]
        acks(service, service.fan_out(relay, members))
        joined = service.deliver(name, WelcomeDelivery(G, welcome.epoch, welcome.welcome))
        acks(service, {name: joined})
    # every joiner's first update (their leaf keys from the KeyPackages are replaced)
    for name in names[1:]:
        (commit,) = service.request_commit(name, CommitAction.UPDATE)
        assert isinstance(commit, CommitMessage)
        acks(service, service.fan_out(service.order(commit), names))
    return service


def propose(service: FakeService, device: str, command_id: bytes | None = None) -> UpdateProposal:
    epoch = service.public[G].epoch
    out = service.deliver(device, UpdateProposalRequest(command_id or cmd(), G, epoch))
    assert out.refused is None and out.changed
    (body,) = service.bodies(device, out)
    assert isinstance(body, UpdateProposal) and body.epoch == epoch
    return body


def leaf_key(core: AgentCore) -> bytes:
    group = core.groups()[G]
    leaf = group.tree.leaf(group.own_leaf)
    assert leaf is not None
    return leaf.encryption_key


def test_proposals_are_committed_by_another_member_and_everyone_follows() -> None:
    names = ["dev-a", "dev-b", "dev-c", "dev-d"]
    service = group_of(names)
    a, b, c, d = (service.devices[n] for n in names)
    old = {n: leaf_key(service.devices[n]) for n in names}
    request_id = cmd()
    proposals = {n: propose(service, n, request_id) for n in ("dev-b", "dev-c", "dev-d")}
    # asked again at the same epoch (a lost answer): the same proposal, no second key
    again = propose(service, "dev-b", cmd())
    assert again.update == proposals["dev-b"].update
    assert b.status()["groups"][0]["update_proposals_pending"] == 1
    # the pending key survives a restart
    restarted = service.restarted(b)
    restarted.restore(cbor2.loads(cbor2.dumps(b.to_state(), canonical=True)))
    service.devices["dev-b"] = b = restarted
    new_b = Update.decode(proposals["dev-b"].update).encryption_key
    assert new_b in b.leaf_refs()

    (commit,) = service.request_commit(
        "dev-a", CommitAction.UPDATE, updates=tuple(p.update for p in proposals.values())
    )
    assert isinstance(commit, CommitMessage)
    got = acks(service, service.fan_out(service.order(commit), names))
    assert len({ack.epoch_authenticator for ack in got.values()}) == 1
    for name in names:
        core = service.devices[name]
        assert leaf_key(core) != old[name]
        # the old leaf key is destroyed, the new one active
        assert core.ledger.get(leaf_name(old[name])).state is KeyState.DESTROYED
        assert core.ledger.get(leaf_name(leaf_key(core))).state is KeyState.ACTIVE
        assert core.status()["groups"][0]["update_proposals_pending"] == 0
    assert leaf_key(b) == new_b
    blob = c.encrypt(G, b"after the full rekey", service.now)
    assert d.decrypt(G, blob, service.now) == b"after the full rekey"
    assert a.decrypt(G, blob, service.now) == b"after the full rekey"


def test_a_proposal_not_committed_is_destroyed_after_a_few_epochs() -> None:
    names = ["dev-a", "dev-b", "dev-c"]
    service = group_of(names)
    b, c = service.devices["dev-b"], service.devices["dev-c"]
    old_c = leaf_key(c)
    p_b, p_c = propose(service, "dev-b"), propose(service, "dev-c")
    pending_c = Update.decode(p_c.update).encryption_key
    (commit,) = service.request_commit("dev-a", CommitAction.UPDATE, updates=(p_b.update,))
    assert isinstance(commit, CommitMessage)
    acks(service, service.fan_out(service.order(commit), names))
    assert leaf_key(c) == old_c and pending_c in c.leaf_refs()
    for _ in range(PROPOSAL_EPOCHS):
        (commit,) = service.request_commit("dev-a", CommitAction.UPDATE)
        assert isinstance(commit, CommitMessage)
        acks(service, service.fan_out(service.order(commit), names))
    assert pending_c not in c.leaf_refs()
    assert c.ledger.get(leaf_name(pending_c)).state is KeyState.DESTROYED
    assert leaf_key(c) == old_c
    assert leaf_key(b) == Update.decode(p_b.update).encryption_key


def test_a_commit_of_an_update_we_did_not_propose_is_reported() -> None:
    names = ["dev-a", "dev-b", "dev-c"]
    service = group_of(names)
    b = service.devices["dev-b"]
    p_b = propose(service, "dev-b")
    # b restarts from a state saved before it proposed: it no longer holds the key
    before = cbor2.loads(cbor2.dumps(b.to_state(), canonical=True))
    before["groups"][G]["proposed"] = []
    restarted = service.restarted(b)
    restarted.restore(before)
    service.devices["dev-b"] = restarted
    (commit,) = service.request_commit("dev-a", CommitAction.UPDATE, updates=(p_b.update,))
    assert isinstance(commit, CommitMessage)
    relay = service.order(commit)
    out = restarted.handle(relay, f"kf/v1/grp/{G}/commit", service.now)
    assert out.refused is not None and out.refused.check == "mls.update.unknown-key"
    assert "mls.update.unknown-key" in REFUSAL_CHECKS
    reports = [b for b in service.bodies("dev-b", out) if isinstance(b, CommitRefused)]
    assert [r.check for r in reports] == ["mls.update.unknown-key"]


def test_the_committer_refuses_its_own_proposal() -> None:
    names = ["dev-a", "dev-b"]
    service = group_of(names)
    own = propose(service, "dev-a")
    epoch = service.public[G].epoch
    request = CommitRequest(cmd(), G, epoch, CommitAction.UPDATE, updates=(own.update,))
    out = service.deliver("dev-a", request)
    assert out.refused is not None and out.refused.check == "mls.update.self"
