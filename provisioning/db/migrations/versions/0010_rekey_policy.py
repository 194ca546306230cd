"""Every member's key moves: ``service_rekey_policies`` and ``service_leaf_updates``.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06

A group's rekey policy set by an operator (``keyfleet group policy``: the longest a member may
go without updating its own leaf, in seconds and in epochs; a group without a row follows the
service's ``[groups]`` default) and, per member, the epoch and time of its last self-update (a
commit it made, or its join) and when the service last asked it for one
(``provisioning.service.rekeypolicy``). Self-contained: an upgrade adds two new tables and
touches nothing else; a downgrade drops them. Members of groups that existed before this
revision have no row until the service's first policy check sees them: it counts them from the
epoch they joined at and, for age, from that check (so an upgrade does not ask every member of
every group at once; docs/operations.md, "Rekey policy").
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "service_rekey_policies",
        sa.Column("group_id", sa.String(length=64), nullable=False),
        sa.Column("max_age", sa.BigInteger(), nullable=False),
        sa.Column("max_epochs", sa.BigInteger(), nullable=False),
        sa.Column("set_by", sa.String(length=64), nullable=False),
        sa.Column("set_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("group_id", name=op.f("pk_service_rekey_policies")),
    )
    op.create_table(
        "service_leaf_updates",
        sa.Column("group_id", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.Column("asked_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("group_id", "device_id", name=op.f("pk_service_leaf_updates")),
    )


def downgrade() -> None:
    op.drop_table("service_leaf_updates")
    op.drop_table("service_rekey_policies")
