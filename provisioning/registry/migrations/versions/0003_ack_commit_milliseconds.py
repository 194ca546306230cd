"""Millisecond times of acks and accepted commits: ``acks.received_at_ms`` and
``commit_log.accepted_at_ms``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23

Ack latency (an ack's arrival minus its commit's acceptance) is well under a second in a lab
rekey, which the seconds columns show as 0. The seconds columns stay (other code reads them);
the new columns hold the same instant in milliseconds since the Unix epoch. Both are nullable
with no default: rows written before this revision keep NULL and readers fall back to
``seconds * 1000``, so the upgrade rewrites no row. Adding a nullable column needs no SQLite
table rebuild; dropping one does (batch mode), which the downgrade uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("acks", sa.Column("received_at_ms", sa.BigInteger(), nullable=True))
    op.add_column("commit_log", sa.Column("accepted_at_ms", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("commit_log", schema=None) as batch_op:
        batch_op.drop_column("accepted_at_ms")
    with op.batch_alter_table("acks", schema=None) as batch_op:
        batch_op.drop_column("received_at_ms")
