"""Deleted groups: ``groups.deleted_at``, ``groups.deleted_seq`` and ``group_deleted_members``.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-07

A quorum's ``group.delete`` marks the group deleted (when, and the revocation feed entry that
tells its members) and moves its members from ``group_members`` to ``group_deleted_members``:
nothing plans work for a deleted group any more, and the deletion's operation counts a member
done once its feed reaches ``deleted_seq`` (``provisioning.service.groupdelete``). Existing
groups get NULL (not deleted). A downgrade drops both; it does not bring deleted groups' members
back (their devices destroyed the group's keys).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("groups") as batch:
        batch.add_column(sa.Column("deleted_at", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("deleted_seq", sa.BigInteger(), nullable=True))
    op.create_table(
        "group_deleted_members",
        sa.Column("group_id", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["groups.group_id"],
            name=op.f("fk_group_deleted_members_group_id_groups"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("group_id", "device_id", name=op.f("pk_group_deleted_members")),
    )
    op.create_index(
        op.f("ix_group_deleted_members_device_id"),
        "group_deleted_members",
        ["device_id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_group_deleted_members_device_id"), table_name="group_deleted_members")
    op.drop_table("group_deleted_members")
    with op.batch_alter_table("groups") as batch:
        batch.drop_column("deleted_seq")
        batch.drop_column("deleted_at")
