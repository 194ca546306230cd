"""Signed audit checkpoints: ``service_audit_checkpoints``.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06

The service signs checkpoints of the audit chain (count, head hash, time, instance) with the
audit checkpoint key and keeps them here for operators and witnesses to fetch
(docs/operations.md, "Audit checkpoints"). Self-contained: one new table, nothing else touched.
A downgrade drops it; the checkpoints that operators and witnesses copied stay valid, and the
service makes new ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "service_audit_checkpoints",
        sa.Column("count", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("head", sa.LargeBinary(length=32), nullable=False),
        sa.Column("time", sa.BigInteger(), nullable=False),
        sa.Column("instance", sa.String(length=64), nullable=False),
        sa.Column("signed", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("count", name=op.f("pk_service_audit_checkpoints")),
    )


def downgrade() -> None:
    op.drop_table("service_audit_checkpoints")
