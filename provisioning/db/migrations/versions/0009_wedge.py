"""Wedge recovery: ``service_commit_reports`` and ``service_group_previous``.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06

Members' reports of an accepted commit they cannot process (``group.commit_refused``) and each
group's public state before its newest accepted commit, which a rollback restores
(docs/threat-model.md, "An insider wedging a group"). Self-contained: an upgrade adds two new
tables and touches nothing else (a group whose previous state was never recorded cannot be
rolled back until its next commit); a downgrade drops them.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "service_commit_reports",
        sa.Column("group_id", sa.String(length=64), nullable=False),
        sa.Column("epoch", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("commit_hash", sa.LargeBinary(), nullable=False),
        sa.Column("check_id", sa.String(length=64), nullable=False),
        sa.Column("received_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "group_id", "epoch", "device_id", name=op.f("pk_service_commit_reports")
        ),
    )
    op.create_table(
        "service_group_previous",
        sa.Column("group_id", sa.String(length=64), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("public_tree", sa.LargeBinary(), nullable=False),
        sa.Column("group_context", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("group_id", name=op.f("pk_service_group_previous")),
    )


def downgrade() -> None:
    op.drop_table("service_group_previous")
    op.drop_table("service_commit_reports")
