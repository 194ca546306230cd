"""Many members added by one commit (RFC 9420: a commit may carry many Add proposals): one
UpdatePath, one Welcome with one sealed GroupSecrets per joiner; every joiner and every existing
member reach the same epoch; a duplicated joiner, a joiner already a member or too many adds are
refused by check id with nothing changed, by the committer, the service and every member."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agent.protocol.errors import ProtocolError
from agent.protocol.mls import public as mls_public
from agent.protocol.mls.crypto import sign_with_label
from agent.protocol.mls.group import Group
from agent.protocol.mls.messages import Commit, Welcome
from agent.protocol.mls.public import COMMIT_LABEL, commit_tbs
from tests.pure.test_mls_group import Member, World

pytestmark = pytest.mark.pure


def _grown(existing: int) -> World:
    world = World()
    for _ in range(existing - 1):
        world.add(world.members_any(), 1)
    return world


def test_one_commit_adds_forty_members_and_all_reach_the_same_epoch() -> None:
    world = _grown(5)
    epoch = world.service.epoch
    committer = list(world.members.values())[2]
    joiners = [Member.new() for _ in range(40)]
    result = committer.g.add(committer.signature_key, [j.key_package() for j in joiners])
    assert len(result.commit.content.adds) == 40
    assert result.welcome is not None
    welcome = Welcome.decode(result.welcome.encode())
    # one Welcome, one sealed GroupSecrets per joiner, all from the one commit
    assert sorted(s.key_package_ref for s in welcome.secrets) == sorted(
        j.key_package().ref() for j in joiners
    )
    world.deliver(committer, result)  # the service's public view and every member take it
    world.service.check_welcome(world.history[-1], welcome)
    for j in joiners:
        j.group = Group.join(welcome, j.key_package(), j.leaf_key, init_key=j.init_key)
        world.members[j.device_id] = j
    assert world.service.epoch == epoch + 1
    world.check_agreement()  # same epoch, epoch authenticator, data key, tree hash for all 45
    assert len({m.g.own_leaf for m in world.members.values()}) == 45
    # and the group goes on: a joiner commits, everyone follows
    world.update(joiners[17])
    world.remove(joiners[3], joiners[30])
    world.check_agreement()


def _resigned(world: World, committer: Member, commit: Commit, **changes: object) -> Commit:
    """``commit`` with its content changed and signed again by its committer (a forger with
    the committer's key: only the proposal checks stop it)."""
    content = replace(commit.content, **changes)  # type: ignore[arg-type]
    tbs = commit_tbs(content, world.service.state.group_context())
    return Commit(
        content,
        sign_with_label(committer.signature_key, COMMIT_LABEL, tbs),
        commit.confirmation_tag,
    )


def _refused_everywhere(world: World, commit: Commit, check: str) -> None:
    before_service = world.service.to_state()
    with pytest.raises(ProtocolError) as exc:
        world.service.apply(commit)
    assert exc.value.check == check
    assert world.service.to_state() == before_service
    for m in world.members.values():
        before = m.g.to_state()
        with pytest.raises(ProtocolError) as exc:
            m.g.process(commit)
        assert exc.value.check == check, m.device_id
        assert m.g.to_state() == before


def test_a_duplicated_or_existing_joiner_is_refused_and_nothing_changes() -> None:
    world = _grown(4)
    committer, other = list(world.members.values())[:2]
    joiners = [Member.new() for _ in range(3)]
    kps = [j.key_package() for j in joiners]
    before = committer.g.to_state()
    # the committer refuses to make such a commit
    for adds in ([*kps, kps[1]], [*kps, other.key_package()]):
        with pytest.raises(ProtocolError) as exc:
            committer.g.add(committer.signature_key, adds)
        assert exc.value.check == "mls.add.duplicate"
        assert committer.g.to_state() == before
    # a forged one (signed by the committer's own key) is refused by the service and members
    made = committer.g.add(committer.signature_key, kps).commit
    for adds in ((*kps, kps[0]), (*kps, other.key_package())):
        _refused_everywhere(
            world, _resigned(world, committer, made, adds=adds), "mls.add.duplicate"
        )
    # the honest commit still goes through afterwards
    world.deliver(committer, committer.g.add(committer.signature_key, kps))
    assert world.service.tree.member_count() == 7


def test_more_adds_than_the_bound_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    world = _grown(3)
    committer = world.members_any()
    kps = [Member.new().key_package() for _ in range(5)]
    made = committer.g.add(committer.signature_key, kps).commit
    monkeypatch.setattr(mls_public, "MAX_ADDS", 4)
    before = committer.g.to_state()
    with pytest.raises(ProtocolError) as exc:
        committer.g.add(committer.signature_key, kps)
    assert exc.value.check == "mls.add.count"
    assert committer.g.to_state() == before
    _refused_everywhere(world, made, "mls.add.count")
