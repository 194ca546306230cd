"""Groups' public trees stored node by node (provisioning/service/store/trees.py, revision
0018), on SQLite and a real PostgreSQL: a commit rewrites O(log N) rows and the tree read back
is the one written; a group past the old 1 MiB ceiling of the single-row tree is stored and read;
a rollback restores the rows the newest commit rewrote; revision 0018 converts whole-state rows
into node rows (and back on downgrade).

Trees are built directly (no signatures: storing and decoding do not verify them; every key is
a real P-256 point), with commits made as ``verify_commit`` makes them: a copy of the tree with
the committer's path and leaf replaced.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine, func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from agent.protocol.errors import ProtocolError
from agent.protocol.hpke import serialize_public_key
from agent.protocol.mls import codec
from agent.protocol.mls import tree_math as tm
from agent.protocol.mls.public import PublicGroup, PublicState
from agent.protocol.mls.tree import SOURCE_COMMIT, LeafNode, Node, ParentNode, RatchetTree
from provisioning.db import migrations
from provisioning.db.engine import make_engine
from provisioning.db.runtime import GroupPreviousNodeRow
from provisioning.db.schema import Group, GroupTreeNode
from provisioning.registry import session_factory
from provisioning.service.model import MAX_PUBLIC_GROUP
from provisioning.service.store import trees, wedge

pytestmark = pytest.mark.pure

DATABASE_BACKENDS = ("sqlite", "postgresql")
G = "g-store"
POINTS = [
    serialize_public_key(ec.generate_private_key(ec.SECP256R1()).public_key()) for _ in range(64)
]


def _point(i: int) -> bytes:
    return POINTS[i % len(POINTS)]


def _public(members: int, epoch: int = 5) -> PublicGroup:
    """A full group of ``members`` (every parent keyed), DevID-sized credentials."""
    width = 1
    while width < members:
        width *= 2
    nodes: list[Node] = [None] * tm.node_width(width)
    for i in range(members):
        nodes[2 * i] = LeafNode(
            f"dev-{i:06d}".encode(),
            _point(i),
            _point(i + 1),
            os.urandom(500),
            SOURCE_COMMIT,
            os.urandom(32),
            os.urandom(71),
        )
    for x in range(1, len(nodes), 2):
        if any(nodes[2 * u] is not None for u in tm.subtree_leaves(x)):
            nodes[x] = ParentNode(_point(x), os.urandom(32))
    tree = RatchetTree(nodes, {i: os.urandom(32) for i in range(members)})
    return PublicGroup(PublicState(b"g-store", epoch, tree, os.urandom(32), os.urandom(32)))


def _commit(public: PublicGroup, sender: int) -> PublicGroup:
    """The next epoch's state after ``sender`` commits a path (as ``verify_commit`` builds it)."""
    tree = public.tree.copy()
    path = tree.filtered_direct_path(sender)
    tree._apply_path(sender, [(x, _point(x + 7)) for x, _ in path])
    for x, _ in path:
        node = tree.parent_node(x)
        assert node is not None
        tree._set(x, replace(node, parent_hash=os.urandom(32)))
    leaf = tree.leaf(sender)
    assert leaf is not None
    tree._replace_leaf(sender, replace(leaf, encryption_key=_point(sender + 3)))
    state = public.state
    return PublicGroup(
        PublicState(state.group_id, state.epoch + 1, tree, os.urandom(32), os.urandom(32))
    )


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url)
    yield eng
    eng.dispose()


def _store(sessions: sessionmaker[Session], public: PublicGroup) -> None:
    with sessions.begin() as s:
        s.add(
            Group(
                group_id=G,
                epoch=public.epoch,
                public_tree=trees.head(public.state),
                group_context=public.state.group_context(),
                created_at=1,
                updated_at=1,
            )
        )
        s.flush()
        trees.write(s, G, trees.rows_of(public.tree, trees.all_nodes(public.tree)))


def _load(sessions: sessionmaker[Session]) -> PublicGroup:
    with sessions() as s:
        group = s.get(Group, G)
        assert group is not None
        return trees.load(s, G, group.public_tree)


def _same(a: PublicGroup, b: PublicGroup) -> None:
    assert a.tree == b.tree
    assert a.to_state() == b.to_state()
    assert a.tree_hash() == b.tree_hash()


def test_a_commit_rewrites_log_n_rows_of_a_group_past_the_old_ceiling(engine: Engine) -> None:
    migrations.upgrade(engine)
    sessions = session_factory(engine)
    public = _public(5000)  # 8,192 leaves wide: 13 levels of parents above each leaf
    assert len(codec.encode(public.to_state())) > MAX_PUBLIC_GROUP  # refused as one row before
    _store(sessions, public)
    _same(_load(sessions), public)
    following = _commit(public, 1234)
    with sessions.begin() as s:
        rows, _ = trees.plan(s, G, public, following)
        # the committer's leaf and the 13 parents of its path, nothing else
        assert sorted(rows) == sorted([2 * 1234, *tm.direct_path(2 * 1234, 8192)])
        assert sum(len(d or b"") for d in rows.values()) < 4096
        trees.write(s, G, rows)
        s.execute(
            update(Group)
            .where(Group.group_id == G)
            .values(epoch=following.epoch, public_tree=trees.head(following.state))
        )
    _same(_load(sessions), following)
    with sessions() as s:
        count = s.scalar(select(func.count()).select_from(GroupTreeNode))
    assert count == 5000 + sum(1 for x in range(1, 2 * 8192 - 1, 2) if public.tree.node(x))


def test_a_rollback_restores_the_rows_the_newest_commit_rewrote(engine: Engine) -> None:
    """What a rollback writes back is the newest commit's undo rows and its epoch's kept head
    (the commit flow keeps nothing else for it); an older commit is not rolled back (nothing
    changes); after the rollback its epoch's undo rows are gone."""
    migrations.upgrade(engine)
    sessions = session_factory(engine)
    public = _public(37)
    _store(sessions, public)
    removed = public.tree.copy()  # a removal that truncates, then a commit: nodes go and change
    for i in range(32, 37):
        removed._remove_leaf(i)
    removed._truncate()
    assert removed.n_leaves == 32
    state = public.state
    following = _commit(PublicGroup(replace(state, tree=removed)), 3)
    _accept(sessions, public, following)
    newest = _commit(following, 9)
    _accept(sessions, following, newest)
    _same(_load(sessions), newest)
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(GroupPreviousNodeRow)) == 0
    with sessions.begin() as s:
        assert not wedge.roll_back(s, G, public.epoch, now=2)  # not the newest commit
    _same(_load(sessions), newest)
    with sessions.begin() as s:
        assert wedge.roll_back(s, G, following.epoch, now=2)
    _same(_load(sessions), following)
    with sessions() as s:
        assert trees.undo_rows(s, G, following.epoch) == {}
        assert trees.undo_rows(s, G, public.epoch) != {}
    with sessions.begin() as s:  # the commit before is the newest now, its undo rows kept
        assert wedge.roll_back(s, G, public.epoch, now=3)
    _same(_load(sessions), public)


def _accept(sessions: sessionmaker[Session], before: PublicGroup, after: PublicGroup) -> None:
    """What the commit flow writes to the tree's rows for a commit moving ``before`` to
    ``after`` (``commits.accept_commit``)."""
    with sessions.begin() as s:
        rows, previous = trees.plan(s, G, before, after)
        trees.save_undo(s, G, before, previous)
        trees.write(s, G, rows)
        s.execute(
            update(Group)
            .where(Group.group_id == G)
            .values(
                epoch=after.epoch,
                public_tree=trees.head(after.state),
                group_context=after.state.group_context(),
            )
        )


def test_every_kept_epoch_is_rebuilt_exactly_and_a_dropped_or_altered_one_is_not(
    engine: Engine,
) -> None:
    """Commits that update paths, remove members and cut the tree back, then add members
    (the tree grows again): the tree of every epoch the group left is rebuilt from the current
    rows and the kept ones, exactly; retention drops the oldest; a database writer's altered
    kept row makes a tree whose GroupContext is not the kept one, and it is not served."""
    migrations.upgrade(engine)
    sessions = session_factory(engine)
    states = [_public(37)]
    _store(sessions, states[0])
    states.append(_commit(states[-1], 3))
    removed = states[-1].tree.copy()
    for i in range(32, 37):
        removed._remove_leaf(i)
    removed._truncate()
    states.append(_commit(PublicGroup(replace(states[-1].state, tree=removed)), 5))
    grown = states[-1].tree.copy()
    for i in range(3):
        grown._add_leaf(
            LeafNode(
                f"new-{i}".encode(),
                _point(90 + i),
                _point(91 + i),
                os.urandom(500),
                SOURCE_COMMIT,
                os.urandom(32),
                os.urandom(71),
            ),
            os.urandom(32),
        )
    states.append(_commit(PublicGroup(replace(states[-1].state, tree=grown)), 33))
    states.append(_commit(states[-1], 0))
    assert [p.tree.n_leaves for p in states] == [64, 64, 32, 64, 64]
    for before, after in itertools.pairwise(states):
        _accept(sessions, before, after)
    with sessions() as s:
        for public in states[:-1]:
            rebuilt = trees.load_at(s, G, public.epoch)
            assert rebuilt is not None
            _same(rebuilt, public)
        assert trees.load_at(s, G, states[-1].epoch) is None  # current: the row, not a rebuild
    with sessions.begin() as s:
        trees.drop_undo(s, G, below=states[2].epoch)
    with sessions() as s:
        assert [trees.load_at(s, G, p.epoch) is None for p in states[:-1]] == [
            True,
            True,
            False,
            False,
        ]
    # a database writer alters a kept row (the committer's leaf as it was before the newest
    # commit: now its new leaf): the rebuilt tree is not the kept one, not served
    with sessions.begin() as s:
        changed = s.execute(
            text(
                "UPDATE service_group_tree_undo SET data = :d "
                "WHERE group_id = :g AND epoch = :e AND node = 0"
            ),
            {"d": codec.encode(states[-1].tree.node_obj(0)), "g": G, "e": states[-2].epoch},
        )
        assert changed.rowcount == 1  # type: ignore[attr-defined]
    with sessions() as s:
        assert trees.load_at(s, G, states[-2].epoch) is None
        assert trees.load_at(s, G, states[2].epoch) is None  # rebuilt through the same row
        _same(_load(sessions), states[-1])  # the current state is untouched


def test_revision_0018_converts_whole_state_rows_and_back(engine: Engine) -> None:
    migrations.upgrade(engine, "0017")
    previous = _public(20, epoch=8)
    current = _commit(previous, 17)
    whole, whole_before = codec.encode(current.to_state()), codec.encode(previous.to_state())
    with engine.begin() as c:
        c.execute(
            text(
                "INSERT INTO groups (group_id, epoch, public_tree, group_context, created_at, "
                "updated_at) VALUES (:g, 9, :t, :c, 1, 1)"
            ),
            {"g": G, "t": whole, "c": current.state.group_context()},
        )
        c.execute(
            text(
                "INSERT INTO service_group_previous (group_id, epoch, public_tree, group_context) "
                "VALUES (:g, 8, :t, :c)"
            ),
            {"g": G, "t": whole_before, "c": previous.state.group_context()},
        )
    migrations.upgrade(engine)
    sessions = session_factory(engine)
    _same(_load(sessions), current)
    with sessions() as s:
        group = s.get(Group, G)
        assert group is not None and len(group.public_tree) < 200  # the head only
    migrations.downgrade(engine, "0017")
    with engine.connect() as c:
        row = c.execute(text("SELECT public_tree FROM groups")).scalar()
        kept = c.execute(text("SELECT public_tree FROM service_group_previous")).scalar()
    assert (row, kept) == (whole, whole_before)
    migrations.upgrade(engine)
    with sessions.begin() as s:  # the converted previous state is what a rollback restores
        assert wedge.roll_back(s, G, 8, now=2)
    _same(_load(sessions), previous)


def test_a_whole_state_row_is_read_and_the_next_commit_writes_every_node(engine: Engine) -> None:
    """What a seeding tool writes (the whole state in ``public_tree``) is read as it is."""
    migrations.upgrade(engine)
    sessions = session_factory(engine)
    public = _public(9)
    with sessions.begin() as s:
        s.add(
            Group(
                group_id=G,
                epoch=public.epoch,
                public_tree=codec.encode(public.to_state()),
                group_context=public.state.group_context(),
                created_at=1,
                updated_at=1,
            )
        )
    _same(_load(sessions), public)
    following = _commit(public, 2)
    with sessions.begin() as s:
        rows, before = trees.plan(s, G, public, following)
        assert sorted(rows) == sorted(before) == trees.all_nodes(following.tree)
        assert set(before.values()) == {None}
        trees.write(s, G, rows)
        s.execute(
            update(Group).where(Group.group_id == G).values(public_tree=trees.head(following.state))
        )
    _same(_load(sessions), following)


def test_tampered_node_rows_are_refused_when_the_group_is_read(engine: Engine) -> None:
    """The stored tree is decoded as strictly as a tree off the wire: a row past the width, a
    row for a blank node, a leaf in a parent's place or a key that is not a point is refused
    (``mls.decode``), and the service decodes nothing from it."""
    migrations.upgrade(engine)
    sessions = session_factory(engine)
    public = _public(6)
    _store(sessions, public)
    leaf_row = codec.encode(public.tree.node_obj(0))
    bad_point = public.tree.node_obj(1)
    assert isinstance(bad_point, dict)
    for node, data in (
        (15, leaf_row),  # past the width (8 leaves: 15 nodes)
        (14, codec.encode(None)),  # a row for a blank node
        (3, leaf_row),  # a leaf where a parent belongs
        (1, codec.encode({**bad_point, "enc": b"\x04" + bytes(64)})),
    ):
        with sessions.begin() as s:
            s.execute(
                text("DELETE FROM group_tree_nodes WHERE group_id = :g AND node = :n"),
                {"g": G, "n": node},
            )
            s.add(GroupTreeNode(group_id=G, node=node, data=data))
        with pytest.raises(ProtocolError) as exc:
            _load(sessions)
        assert exc.value.check.startswith("mls.decode"), (node, exc.value.check)
        with sessions.begin() as s:  # put the honest row back
            s.execute(
                text("DELETE FROM group_tree_nodes WHERE group_id = :g AND node = :n"),
                {"g": G, "n": node},
            )
            original = public.tree.node_obj(node) if node < 15 else None
            if original is not None:
                s.add(GroupTreeNode(group_id=G, node=node, data=codec.encode(original)))
    _same(_load(sessions), public)
