"""The service's side of a full rekey by Update proposals (provisioning/service/fullrekey.py),
with software members over the real wire protocol in one process: a commit carrying Updates is
taken only from the member asked and only with exactly the proposals asked for (a compromised
committer that drops one is refused, and another member commits the batch), Updates nobody
asked to commit are refused even where member-initiated updates are allowed, and proposals are
checked against the public tree."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol.mls.messages import Update
from agent.protocol.wire.messages.group import UpdateProposal
from agent.protocol.wire.messages.result import ResultStatus
from tests.pure.test_rekey_policy import leaf_keys, rekey
from tests.pure.test_service_core import create_g1, make_fleet
from tests.service_members import command_id

pytestmark = pytest.mark.pure

NAMES = ("dev-1", "dev-2", "dev-3", "dev-4", "dev-5")


def test_a_committer_that_drops_an_update_is_refused_and_another_commits(tmp_path: Path) -> None:
    fleet = next(make_fleet(tmp_path, NAMES, rekey_max_age=0, rekey_max_epochs=0))
    create_g1(fleet)
    before = leaf_keys(fleet, "g1")
    start = fleet.epoch("g1")
    for device in fleet.devices.values():
        device.drop_updates = 1  # whoever is asked first commits one Update fewer
    fleet.devices["dev-3"].drop_updates = 0  # ... except this one
    cid = fleet.command("op-alice", rekey("g1", full=True))
    for _ in range(len(NAMES)):
        fleet.tick(fleet.service.settings.commit_request_timeout + 1)
    result = fleet.final(cid)
    assert result.status is ResultStatus.DONE, result.detail
    assert fleet.service.rejections.count("ds.commit.unauthorized") >= 1
    after = leaf_keys(fleet, "g1")
    assert all(after[n] != before[n] for n in NAMES)
    assert fleet.epoch("g1") == start + 1
    assert len({d.groups["g1"].epoch_authenticator for d in fleet.devices.values()}) == 1


def test_updates_nobody_asked_to_commit_are_refused(tmp_path: Path) -> None:
    fleet = next(make_fleet(tmp_path, NAMES, member_updates=1, member_update_min_interval=0))
    create_g1(fleet)
    epoch = fleet.epoch("g1")
    insider, victim = fleet.devices["dev-2"], fleet.devices["dev-4"]
    update = victim.groups["g1"].propose_update(
        victim.devid, ec.generate_private_key(ec.SECP256R1()).public_key()
    )
    result = insider.groups["g1"].commit(
        insider.devid, updates=[update], new_leaf_key=ec.generate_private_key(ec.SECP256R1())
    )
    fleet.send(*insider.commit_result("g1", result, None, fleet.now))
    assert fleet.service.rejections.count("ds.commit.unsolicited") == 1
    assert fleet.epoch("g1") == epoch
    # a plain self-update, unasked, is still allowed here
    plain = insider.groups["g1"].update(insider.devid, ec.generate_private_key(ec.SECP256R1()))
    fleet.send(*insider.commit_result("g1", plain, None, fleet.now))
    assert fleet.epoch("g1") == epoch + 1


def test_proposals_are_checked_against_the_tree(tmp_path: Path) -> None:
    fleet = next(make_fleet(tmp_path, NAMES, rekey_max_age=0, rekey_max_epochs=0))
    create_g1(fleet)
    for device in fleet.devices.values():
        device.ignore_proposal_requests = True  # the proposals below are the only ones
        device.ignore_commit_requests = True
    fleet.record = True
    fleet.command("op-alice", rekey("g1", full=True))
    (request_id,) = {
        body.command_id for _, body in fleet.to_devices if type(body).__name__.startswith("Update")
    }
    epoch = fleet.epoch("g1")
    a, b = fleet.devices["dev-2"], fleet.devices["dev-3"]
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    own_b = b.groups["g1"].propose_update(b.devid, key)

    def send_as(sender: str, update: Update) -> None:
        device = fleet.devices[sender]
        body = UpdateProposal(request_id, "g1", epoch, update.encode())
        fleet.send(device.report(body, fleet.now))

    send_as("dev-2", own_b)  # dev-3's Update sent by dev-2: not the sender's leaf
    assert fleet.service.rejections.count("ds.rekey.proposal") == 1
    forged = Update.create(
        a.devid,
        b.groups["g1"].tree.leaf(own_b.leaf_index),  # type: ignore[arg-type]
        key,
        group_id=b"g1",
        leaf_index=own_b.leaf_index,
    )
    send_as("dev-3", forged)  # dev-3's leaf signed with dev-2's key
    assert fleet.service.rejections.count("mls.leaf.signature") == 1
    other = UpdateProposal(command_id(), "g1", epoch, own_b.encode())
    fleet.send(b.report(other, fleet.now))  # answers no request
    assert fleet.service.rejections.count("ds.rekey.proposal") == 2
    send_as("dev-3", own_b)  # the real one is taken
    assert fleet.service.rejections.count("ds.rekey.proposal") == 2
    assert fleet.service.rejections.count("mls.leaf.signature") == 1
