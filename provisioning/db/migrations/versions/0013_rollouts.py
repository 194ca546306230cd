"""Staged rollouts of firmware releases: ``service_rollouts`` and ``service_rollout_devices``.

Revision ID: 0013
Revises: 0011
Create Date: 2026-12-06

Each rollout's waves (computed once at start), state and reason, and each device's step in it
(provisioning.service.rollout): public data only. Self-contained: an upgrade adds two tables and
touches nothing else; a downgrade drops them (rollouts in progress are forgotten; devices stay on
whatever release they run).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "service_rollouts",
        sa.Column("rollout_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("group_id", sa.String(length=64), nullable=False),
        sa.Column("active_group", sa.String(length=64), nullable=True),
        sa.Column("operator", sa.String(length=64), nullable=False),
        sa.Column("command_id", sa.LargeBinary(), nullable=False),
        sa.Column("rollback", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("waves", sa.Text(), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("wave_started_at", sa.BigInteger(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("device", sa.String(length=64), nullable=True),
        sa.Column("started_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.Column("finished_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("rollout_id", name=op.f("pk_service_rollouts")),
        sa.UniqueConstraint("active_group", name=op.f("uq_service_rollouts_active_group")),
    )
    op.create_index(op.f("ix_service_rollouts_state"), "service_rollouts", ["state"], unique=False)
    op.create_table(
        "service_rollout_devices",
        sa.Column("rollout_id", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("previous", sa.String(length=64), nullable=True),
        sa.Column("sent_at", sa.BigInteger(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("asked_at", sa.BigInteger(), nullable=True),
        sa.Column("lost", sa.Boolean(), nullable=False),
        sa.Column("acked_at", sa.BigInteger(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("rollout_id", "device_id", name=op.f("pk_service_rollout_devices")),
    )
    op.create_index(
        op.f("ix_service_rollout_devices_device_id"),
        "service_rollout_devices",
        ["device_id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(
        op.f("ix_service_rollout_devices_device_id"), table_name="service_rollout_devices"
    )
    op.drop_table("service_rollout_devices")
    op.drop_index(op.f("ix_service_rollouts_state"), table_name="service_rollouts")
    op.drop_table("service_rollouts")
