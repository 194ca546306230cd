"""A full rekey in a few commits: ``service_update_proposals``.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06

Members' Update proposals collected by ``keyfleet rekey --full`` (provisioning.service.fullrekey)
until a commit carrying them is accepted: public data only (new leaf public keys and the
members' signatures). Self-contained: an upgrade adds one table and touches nothing else; a
downgrade drops it (a full rekey in flight then falls back to its stragglers' self-updates).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "service_update_proposals",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("group_id", sa.String(length=64), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("leaf_index", sa.BigInteger(), nullable=False),
        sa.Column("proposal", sa.LargeBinary(), nullable=False),
        sa.Column("requested_epoch", sa.BigInteger(), nullable=True),
        sa.Column("received_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "request_id", "device_id", name=op.f("pk_service_update_proposals")
        ),
    )
    op.create_index(
        op.f("ix_service_update_proposals_group_id"),
        "service_update_proposals",
        ["group_id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(
        op.f("ix_service_update_proposals_group_id"), table_name="service_update_proposals"
    )
    op.drop_table("service_update_proposals")
