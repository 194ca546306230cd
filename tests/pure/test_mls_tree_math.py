"""RFC 9420 Appendix C tree math against the mls-implementations tree-math vectors
(tests/vectors/README.md has the provenance), plus properties the ratchet tree relies on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.protocol.mls import tree_math as tm

pytestmark = pytest.mark.pure

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "mls-tree-math.json").read_text())


def _or_none(f: object, *args: int) -> int | None:
    try:
        return f(*args)  # type: ignore[operator, no-any-return]
    except ValueError:
        return None


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"n_leaves={v['n_leaves']}")
def test_tree_math_vectors(vector: dict[str, object]) -> None:
    n = vector["n_leaves"]
    assert isinstance(n, int)
    assert tm.node_width(n) == vector["n_nodes"]
    assert tm.root(n) == vector["root"]
    width = tm.node_width(n)
    assert [_or_none(tm.left, x) for x in range(width)] == vector["left"]
    assert [_or_none(tm.right, x) for x in range(width)] == vector["right"]
    assert [_or_none(tm.parent, x, n) for x in range(width)] == vector["parent"]
    assert [_or_none(tm.sibling, x, n) for x in range(width)] == vector["sibling"]


def test_the_vectors_cover_several_sizes() -> None:
    assert sorted(v["n_leaves"] for v in VECTORS) == [1, 4, 16, 64, 256]


def test_non_power_of_two_is_refused() -> None:
    with pytest.raises(ValueError):
        tm.root(3)


@given(st.integers(0, 10), st.data())
def test_paths_and_ancestors(depth: int, data: st.DataObject) -> None:
    n = 1 << depth
    a = data.draw(st.integers(0, n - 1))
    b = data.draw(st.integers(0, n - 1))
    xa, xb = tm.leaf_to_node(a), tm.leaf_to_node(b)
    path = tm.direct_path(xa, n)
    assert len(path) == depth
    assert len(tm.copath(xa, n)) == depth
    assert (path[-1] if path else xa) == tm.root(n)
    for node, sib in zip([xa, *path], tm.copath(xa, n), strict=False):
        assert tm.sibling(node, n) == sib
    anc = tm.common_ancestor(xa, xb)
    assert tm.is_in_subtree(xa, anc) and tm.is_in_subtree(xb, anc)
    assert a in tm.subtree_leaves(anc) and b in tm.subtree_leaves(anc)
    if a != b:
        assert anc in path
        assert not tm.is_in_subtree(xb, tm.left(anc)) or not tm.is_in_subtree(xa, tm.left(anc))
    assert tm.node_to_leaf(xa) == a
    for x in range(tm.node_width(n)):
        expected = x == anc or (
            not tm.is_leaf(anc)
            and tm.subtree_leaves(anc).start * 2 <= x
            and x <= (tm.subtree_leaves(anc).stop - 1) * 2
        )
        assert tm.is_in_subtree(x, anc) == expected
