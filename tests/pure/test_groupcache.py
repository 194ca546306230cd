"""The service's in-memory public groups (provisioning/service/groupcache.py): a copy is handed
out only for the state token it was made for, and the cache stays within its bounds (groups and
leaves), least recently used first out."""

from __future__ import annotations

import pytest

from agent.protocol.mls.group import Group
from agent.protocol.mls.public import PublicGroup
from provisioning.service.groupcache import GroupCache
from tests.pure.test_mls_group import Member

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
