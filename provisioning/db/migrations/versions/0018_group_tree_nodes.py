"""Groups' ratchet trees stored node by node: ``group_tree_nodes`` and
``service_group_previous_nodes``.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07

A commit used to rewrite the whole public state of its group in one ``groups.public_tree``
value (O(N) bytes per commit, and refused past 1 MiB, about 4,400 members). From this revision
``public_tree`` holds the head (group id, epoch, tree width, transcript hashes) and each
non-blank node is a row of ``group_tree_nodes``; a commit rewrites O(log N) rows
(``provisioning.service.store.trees``). ``service_group_previous_nodes`` keeps what a rollback
puts back at the nodes the newest commit rewrote.

The upgrade converts every group: its whole-state ``public_tree`` is split into node rows and
a head; a kept previous state (``service_group_previous``) becomes a head plus a previous row
for every node, so a rollback still restores it whole. The downgrade joins them back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from agent.protocol.mls import codec

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_WHOLE = 1 << 30


def _tables() -> tuple[sa.Table, ...]:
    meta = sa.MetaData()
    groups = sa.Table(
        "groups",
        meta,
        sa.Column("group_id", sa.String(64)),
        sa.Column("public_tree", sa.LargeBinary()),
    )
    nodes = sa.Table(
        "group_tree_nodes",
        meta,
        sa.Column("group_id", sa.String(64)),
        sa.Column("node", sa.BigInteger()),
        sa.Column("data", sa.LargeBinary()),
    )
    previous = sa.Table(
        "service_group_previous",
        meta,
        sa.Column("group_id", sa.String(64)),
        sa.Column("public_tree", sa.LargeBinary()),
    )
    previous_nodes = sa.Table(
        "service_group_previous_nodes",
        meta,
        sa.Column("group_id", sa.String(64)),
        sa.Column("node", sa.BigInteger()),
        sa.Column("data", sa.LargeBinary()),
    )
    return groups, nodes, previous, previous_nodes


def _split(whole: bytes) -> tuple[bytes, list[Any]] | None:
    """(head, node objects) of a whole public state; None if it is not one (left as it is)."""
    try:
        state = codec.decode(whole, _WHOLE, "public_tree")
    except Exception:
        return None
    if not isinstance(state, dict) or not isinstance(state.get("tree"), list):
        return None
    items: list[Any] = state["tree"]
    head = {k: v for k, v in state.items() if k != "tree"}
    head["width"] = len(items)
    return codec.encode(head), items


def _join(head: bytes, items: list[Any]) -> bytes:
    state = codec.decode(head, _WHOLE, "public_tree")
    assert isinstance(state, dict)
    width = state.pop("width")
    state["tree"] = (items + [None] * width)[:width]
    return codec.encode(state)


def upgrade() -> None:
    op.create_table(
        "group_tree_nodes",
        sa.Column("group_id", sa.String(length=64), nullable=False),
        sa.Column("node", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["groups.group_id"],
            name=op.f("fk_group_tree_nodes_group_id_groups"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("group_id", "node", name=op.f("pk_group_tree_nodes")),
    )
    op.create_table(
        "service_group_previous_nodes",
        sa.Column("group_id", sa.String(length=64), nullable=False),
        sa.Column("node", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=True),
        sa.PrimaryKeyConstraint("group_id", "node", name=op.f("pk_service_group_previous_nodes")),
    )
    groups, nodes, previous, previous_nodes = _tables()
    bind = op.get_bind()
    for group_id, whole in bind.execute(sa.select(groups.c.group_id, groups.c.public_tree)).all():
        split = _split(whole)
        if split is None:
            continue
        head, items = split
        rows = [
            {"group_id": group_id, "node": x, "data": codec.encode(item)}
            for x, item in enumerate(items)
            if item is not None
        ]
        if rows:
            bind.execute(sa.insert(nodes), rows)
        bind.execute(
            sa.update(groups).where(groups.c.group_id == group_id).values(public_tree=head)
        )
    kept = bind.execute(sa.select(previous.c.group_id, previous.c.public_tree)).all()
    for group_id, whole in kept:
        split = _split(whole)
        if split is None:
            continue
        head, items = split
        current = bind.execute(
            sa.select(sa.func.max(nodes.c.node)).where(nodes.c.group_id == group_id)
        ).scalar()
        width = max(len(items), 0 if current is None else current + 1)
        padded = items + [None] * (width - len(items))
        bind.execute(
            sa.insert(previous_nodes),
            [
                {
                    "group_id": group_id,
                    "node": x,
                    "data": None if item is None else codec.encode(item),
                }
                for x, item in enumerate(padded)
            ],
        )
        bind.execute(
            sa.update(previous).where(previous.c.group_id == group_id).values(public_tree=head)
        )


def _items(bind: sa.Connection, table: sa.Table, group_id: str) -> dict[int, Any]:
    rows = bind.execute(
        sa.select(table.c.node, table.c.data).where(table.c.group_id == group_id)
    ).all()
    return {
        int(x): None if data is None else codec.decode(data, _WHOLE, "node") for x, data in rows
    }


def downgrade() -> None:
    groups, nodes, previous, previous_nodes = _tables()
    bind = op.get_bind()
    for group_id, head in bind.execute(sa.select(groups.c.group_id, groups.c.public_tree)).all():
        state = codec.decode(head, _WHOLE, "public_tree")
        if not isinstance(state, dict) or "width" not in state:
            continue
        by_node = _items(bind, nodes, group_id)
        items = [by_node.get(x) for x in range(int(state["width"]))]
        bind.execute(
            sa.update(groups)
            .where(groups.c.group_id == group_id)
            .values(public_tree=_join(head, items))
        )
        kept = bind.execute(
            sa.select(previous.c.public_tree).where(previous.c.group_id == group_id)
        ).scalar()
        if kept is None:
            continue
        before = codec.decode(kept, _WHOLE, "public_tree")
        if not isinstance(before, dict) or "width" not in before:
            continue
        merged = {**by_node, **_items(bind, previous_nodes, group_id)}
        old = [merged.get(x) for x in range(int(before["width"]))]
        bind.execute(
            sa.update(previous)
            .where(previous.c.group_id == group_id)
            .values(public_tree=_join(kept, old))
        )
    op.drop_table("service_group_previous_nodes")
    op.drop_table("group_tree_nodes")
