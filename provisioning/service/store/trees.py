"""Groups' public state in the database, stored so that a commit writes O(log N) rows.

The ``groups`` row's ``public_tree`` holds the head, CBOR ``{"group": id, "epoch": e, "width":
node count, "cth": confirmed transcript hash, "ith": interim transcript hash}``, and each
non-blank node of the ratchet tree is a row of ``group_tree_nodes`` (its CBOR as in the tree's
encoding, ``RatchetTree.node_obj``). A commit rewrites the nodes it changed (``plan``, by
``RatchetTree.changed_since``: its path, the leaves it adds, removes or updates, the parents
whose unmerged lists it extends) and the head; the tree is decoded, strictly as ever
(``RatchetTree.from_obj``), only when an instance has no current copy in memory
(``provisioning.service.groupcache``).

A row that holds the whole public state (written before revision 0018, or by a tool seeding a
group) is read as it is; the first commit after writes every node and the head.

What a rollback restores (``store.wedge``): the head kept for the epoch the newest commit was
made in and its undo rows (below), what ``group_tree_nodes`` held at each node the commit wrote.

The trees of older epochs, for joiners whose Welcome names one (``provisioning.service
.treepages``): every accepted commit also keeps, in ``service_group_tree_undo`` under the
epoch it was accepted in, what the rows it rewrote held before (``save_undo``: the same
O(log N) rows as the rollback's). The tree of epoch E is the current rows with the undo rows
of the commits of epochs E, E+1, ... laid over them, each node taking its earliest
(``load_at``), cut to E's width (its head, kept with the undo rows in
``service_group_tree_epochs``); it is used only if its GroupContext is the one kept for E.
They go with the commit log's retention (``drop_undo``): an epoch can be rebuilt while the
commit made in it is kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

from sqlalchemy import Executable, delete, insert, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from agent.protocol.errors import InternalError, ProtocolError
from agent.protocol.mls import codec
from agent.protocol.mls.crypto import NH
from agent.protocol.mls.public import PublicGroup, PublicState
from agent.protocol.mls.tree import RatchetTree
from provisioning.db.engine import table_of
from provisioning.db.runtime import GroupTreeEpochRow, GroupTreeUndoRow
from provisioning.db.schema import Group, GroupTreeNode

MAX_HEAD = 1 << 10
"""A head is about 130 bytes."""
MAX_NODE = 1 << 14
"""A leaf with the largest credential (4 KiB) and its keys and signatures is about 4.5 KiB."""
MAX_WHOLE_STATE = 1 << 30
"""A row holding the whole public state (read only, see the module docstring)."""

NodeRows = dict[int, bytes | None]
"""node -> its row's data, None: no row (a blank node)."""


def head(state: PublicState) -> bytes:
    return codec.encode(
        {
            "group": state.group_id,
            "epoch": state.epoch,
            "width": 2 * state.tree.n_leaves - 1,
            "cth": state.confirmed_transcript_hash,
            "ith": state.interim_transcript_hash,
        }
    )


def _node_data(tree: RatchetTree, x: int) -> bytes | None:
    if x >= 2 * tree.n_leaves - 1:
        return None
    obj = tree.node_obj(x)
    return None if obj is None else codec.encode(obj)


def rows_of(tree: RatchetTree, nodes: Iterable[int]) -> NodeRows:
    return {x: _node_data(tree, x) for x in nodes}


def all_nodes(tree: RatchetTree) -> list[int]:
    return list(range(2 * tree.n_leaves - 1))


def load(session: Session, group_id: str, public_tree: bytes) -> PublicGroup:
    """The group's public state from its head (``public_tree``, the ``groups`` row's) and its
    node rows, decoded strictly."""
    value = codec.decode(public_tree, MAX_WHOLE_STATE, "public_tree")
    if isinstance(value, dict) and "tree" in value:
        if has_nodes(session, group_id):
            raise InternalError(f"group {group_id!r}: a whole-state row beside node rows")
        return PublicGroup.from_state(value)
    if len(public_tree) > MAX_HEAD:
        raise codec.fail("public_tree", "head too large")
    m = codec.as_map(value, "public_tree", {"group", "epoch", "width", "cth", "ith"})
    width = codec.as_uint(m["width"], "public_tree.width", 2 * codec.MAX_LEAVES - 1)
    items: list[object] = [None] * width
    rows = session.execute(
        select(GroupTreeNode.node, GroupTreeNode.data)
        .where(GroupTreeNode.group_id == group_id)
        .order_by(GroupTreeNode.node)
    )
    for x, data in rows:
        if not 0 <= x < width:
            raise codec.fail("public_tree", f"node {x} outside a tree of width {width}")
        item = codec.decode(data, MAX_NODE, f"tree[{x}]")
        if item is None:
            raise codec.fail("public_tree", f"node {x}: a row for a blank node")
        items[x] = item
    codec.as_bytes(m["ith"], "public_tree.ith", NH, NH)
    return PublicGroup.from_state(
        {"group": m["group"], "epoch": m["epoch"], "tree": items, "cth": m["cth"], "ith": m["ith"]}
    )


def has_nodes(session: Session, group_id: str) -> bool:
    return (
        session.execute(
            select(GroupTreeNode.node).where(GroupTreeNode.group_id == group_id).limit(1)
        ).first()
        is not None
    )


def holds_head(public_tree: bytes) -> bool:
    """Whether a ``groups`` row's ``public_tree`` is a head (its tree in node rows: every
    writer of a head writes the node rows with it) rather than the whole state."""
    if len(public_tree) > MAX_HEAD:
        return False
    value = codec.decode(public_tree, MAX_HEAD, "public_tree")
    return not (isinstance(value, dict) and "tree" in value)


def write(session: Session, group_id: str, rows: Mapping[int, bytes | None]) -> None:
    """Set ``group_tree_nodes`` at each node of ``rows`` (None: no row). Core statements on the
    table: the session never holds these rows. The rows a commit writes are one upsert
    (``INSERT ... ON CONFLICT DO UPDATE``); only the nodes it blanks are a DELETE."""
    if not rows:
        return
    table = table_of(GroupTreeNode)
    gone = [x for x, d in rows.items() if d is None]
    if gone:
        session.execute(delete(table).where(table.c.group_id == group_id, table.c.node.in_(gone)))
    kept = [{"group_id": group_id, "node": x, "data": d} for x, d in rows.items() if d is not None]
    if kept:
        session.execute(_upsert(session.get_bind().dialect.name), kept)


_UPSERTS: dict[str, Executable] = {}


def _upsert(dialect: str) -> Executable:
    """``INSERT INTO group_tree_nodes ... ON CONFLICT (group_id, node) DO UPDATE SET data``,
    built once per dialect (SQLite and PostgreSQL both have it)."""
    statement = _UPSERTS.get(dialect)
    if statement is None:
        table = table_of(GroupTreeNode)
        insert_ = sqlite_insert(table) if dialect == "sqlite" else postgresql_insert(table)
        statement = insert_.on_conflict_do_update(
            index_elements=[table.c.group_id, table.c.node], set_={"data": insert_.excluded.data}
        )
        _UPSERTS[dialect] = statement
    return statement


def plan(
    session: Session, group_id: str, before: PublicGroup, after: PublicGroup
) -> tuple[NodeRows, NodeRows]:
    """The node rows that move the stored tree from ``before`` (the state the row holds) to
    ``after`` (the nodes that differ, O(log N) for a commit; every node if the row held the
    whole state), and what those rows hold now (what a rollback puts back; none at all if the
    row held the whole state). Reads the group's row (no query if the session holds it)."""
    group = session.get(Group, group_id)
    if group is not None and holds_head(group.public_tree):
        nodes = after.tree.changed_since(before.tree)
        return rows_of(after.tree, nodes), rows_of(before.tree, nodes)
    nodes = all_nodes(after.tree)
    return rows_of(after.tree, nodes), dict.fromkeys(nodes)


def save_undo(
    session: Session, group_id: str, before: PublicGroup, rows: Mapping[int, bytes | None]
) -> None:
    """Keep what rebuilds ``before`` (the state the group leaves by the commit being accepted):
    its head and GroupContext, and ``rows`` (``plan``'s second half: what the rows the commit
    rewrites hold now) as its epoch's undo rows (module docstring)."""
    epoch = before.epoch
    session.execute(
        _INSERT_EPOCH,
        {
            "group_id": group_id,
            "epoch": epoch,
            "head": head(before.state),
            "group_context": before.state.group_context(),
        },
    )
    if rows:
        session.execute(
            _INSERT_UNDO,
            [{"group_id": group_id, "epoch": epoch, "node": x, "data": d} for x, d in rows.items()],
        )


# Core statements built once (every commit runs them): the session never holds these rows
_INSERT_EPOCH: Final = insert(table_of(GroupTreeEpochRow))
_INSERT_UNDO: Final = insert(table_of(GroupTreeUndoRow))


def drop_undo(session: Session, group_id: str, *, below: int | None = None) -> None:
    """Drop what rebuilds the group's epochs below ``below`` (retention; None: every epoch)."""
    for table in (GroupTreeUndoRow, GroupTreeEpochRow):
        query = delete(table).where(table.group_id == group_id)
        if below is not None:
            query = query.where(table.epoch < below)
        session.execute(query.execution_options(synchronize_session=False))


def drop_undo_of(session: Session, group_id: str, epoch: int) -> None:
    """Drop what rebuilds ``epoch`` (the commit made in it was rolled back: it is current)."""
    for table in (GroupTreeUndoRow, GroupTreeEpochRow):
        session.execute(
            delete(table)
            .where(table.group_id == group_id, table.epoch == epoch)
            .execution_options(synchronize_session=False)
        )


def undo_rows(session: Session, group_id: str, epoch: int) -> NodeRows:
    """What the tree rows held before the commit accepted in ``epoch``, at the nodes it rewrote
    (what a rollback of that commit writes back, ``store.wedge``)."""
    rows = session.execute(
        select(GroupTreeUndoRow.node, GroupTreeUndoRow.data).where(
            GroupTreeUndoRow.group_id == group_id, GroupTreeUndoRow.epoch == epoch
        )
    )
    return {x: d for x, d in rows}


def load_at(session: Session, group_id: str, epoch: int) -> PublicGroup | None:
    """The group's public state at ``epoch``, an epoch it has left, rebuilt from the current
    node rows and the undo rows of the commits since (module docstring; O(N)); None if what
    rebuilds it is no longer kept (retention dropped it, or it was never kept: the epoch is
    from before revision 0021) or the rebuilt state is not the one kept (its GroupContext,
    which holds the tree hash, differs)."""
    kept = session.get(GroupTreeEpochRow, (group_id, epoch))
    if kept is None or len(kept.head) > MAX_HEAD:
        return None
    try:
        public = _rebuild(session, group_id, epoch, kept.head)
    except ProtocolError:
        return None
    if public.epoch != epoch or public.state.group_context() != kept.group_context:
        return None
    return public


def _rebuild(session: Session, group_id: str, epoch: int, head_data: bytes) -> PublicGroup:
    m = codec.as_map(
        codec.decode(head_data, MAX_HEAD, "public_tree"),
        "public_tree",
        {"group", "epoch", "width", "cth", "ith"},
    )
    width = codec.as_uint(m["width"], "public_tree.width", 2 * codec.MAX_LEAVES - 1)
    items: list[object] = [None] * width
    # The current rows first, the undo rows second: under READ COMMITTED a commit accepted
    # between the two reads adds undo rows holding what the first read saw (harmless); a
    # rollback or pruning in between leaves a tree whose GroupContext is not the kept one.
    current = session.execute(
        select(GroupTreeNode.node, GroupTreeNode.data).where(
            GroupTreeNode.group_id == group_id, GroupTreeNode.node < width
        )
    )
    for x, data in current:
        items[x] = codec.decode(data, MAX_NODE, f"tree[{x}]")
    # the latest commits first: a node rewritten by several takes what the earliest saw
    undo = session.execute(
        select(GroupTreeUndoRow.node, GroupTreeUndoRow.data)
        .where(
            GroupTreeUndoRow.group_id == group_id,
            GroupTreeUndoRow.epoch >= epoch,
            GroupTreeUndoRow.node < width,
        )
        .order_by(GroupTreeUndoRow.epoch.desc())
    )
    for x, before in undo:
        items[x] = None if before is None else codec.decode(before, MAX_NODE, f"tree[{x}]")
    return PublicGroup.from_state(
        {"group": m["group"], "epoch": m["epoch"], "tree": items, "cth": m["cth"], "ith": m["ith"]}
    )
