"""Trees of retained epochs: ``service_group_tree_undo`` and ``service_group_tree_epochs``.

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-07

One row per node a commit rewrote, holding what ``group_tree_nodes`` held there before the
commit (NULL: a blank node), keyed by the epoch the commit was accepted in, and one row per such
epoch with the group's head and GroupContext then: with the current rows they give the tree of
every epoch the commit log still keeps, so any instance, after any restart, can answer a
joiner's tree request for its Welcome's epoch (``provisioning.service.store.trees.load_at``).
Existing groups get no rows: their epochs before the upgrade are not rebuilt (their joiners
fall back to catch-up as before). The downgrade drops both tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0021"
# The revision this one follows: the only line to change if revisions are put in another order.
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "service_group_tree_undo",
        sa.Column("group_id", sa.String(length=64), nullable=False),
        sa.Column("epoch", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("node", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=True),
        sa.PrimaryKeyConstraint(
            "group_id", "epoch", "node", name=op.f("pk_service_group_tree_undo")
        ),
    )
    op.create_table(
        "service_group_tree_epochs",
        sa.Column("group_id", sa.String(length=64), nullable=False),
        sa.Column("epoch", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("head", sa.LargeBinary(), nullable=False),
        sa.Column("group_context", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("group_id", "epoch", name=op.f("pk_service_group_tree_epochs")),
    )


def downgrade() -> None:
    op.drop_table("service_group_tree_epochs")
    op.drop_table("service_group_tree_undo")
