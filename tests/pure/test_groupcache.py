"""The service's in-memory public groups (provisioning/service/groupcache.py): a copy is handed
out only for the state token it was made for, and the cache stays within its bounds (groups and
leaves), least recently used first out."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agent.protocol.mls.group import Group
from agent.protocol.mls.public import PublicGroup
from provisioning.service.groupcache import GroupCache, replay
from provisioning.service.store import trees
from tests.pure.test_mls_group import Member, World

pytestmark = pytest.mark.pure


def _public(name: bytes) -> PublicGroup:
    creator = Member.new()
    return Group.create(name, creator.key_package(), creator.leaf_key).public_group()


def test_a_copy_is_used_only_for_its_token() -> None:
    cache = GroupCache()
    g = _public(b"g1")
    cache.put("g1", b"t1", g)
    assert cache.get("g1", b"t1") is g
    assert cache.get("g1", b"t2") is None  # another instance wrote the row since
    assert cache.get("g1", None) is None  # a row from before state tokens
    assert cache.get("g2", b"t1") is None
    cache.put("g1", None, g)  # no token: nothing kept, the old copy goes too
    assert cache.get("g1", b"t1") is None and len(cache) == 0


def test_bounded_by_groups_and_leaves_least_recently_used_first() -> None:
    cache = GroupCache(max_groups=2, max_leaves=10)
    a, b, c = (_public(n) for n in (b"a", b"b", b"c"))
    cache.put("a", b"t", a)
    cache.put("b", b"t", b)
    assert cache.get("a", b"t") is a  # a is now the most recently used
    cache.put("c", b"t", c)
    assert cache.get("b", b"t") is None and len(cache) == 2
    assert cache.get("a", b"t") is a and cache.get("c", b"t") is c
    small = GroupCache(max_groups=10, max_leaves=1)
    small.put("a", b"t", a)
    small.put("b", b"t", b)  # two one-leaf groups exceed one leaf: a goes
    assert small.get("a", b"t") is None and small.get("b", b"t") is b


def test_a_copy_behind_is_replayed_only_to_the_row_s_exact_state() -> None:
    world = World()
    world.add(world.members_any(), 3)
    before = world.service
    committer = sorted(world.members.values(), key=lambda m: m.g.own_leaf)[1]
    world.update(committer)
    after = world.service
    commit = world.history[-1].encode()
    head, context = trees.head(after.state), after.state.group_context()
    caught_up = replay(before, [commit], head=head, group_context=context)
    assert caught_up is not None and caught_up.to_state() == after.to_state()
    # not the row's state: another head (e.g. the same commit with another confirmation
    # tag, which changes only the interim transcript hash), another context, a refused commit
    other = trees.head(replace(after.state, interim_transcript_hash=bytes(32)))
    assert replay(before, [commit], head=other, group_context=context) is None
    assert replay(before, [commit], head=head, group_context=b"x") is None
    assert replay(after, [commit], head=head, group_context=context) is None  # stale epoch
