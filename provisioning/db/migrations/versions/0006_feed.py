"""The revocation feed: ``service_revocation_feed`` and ``service_revocation_feed_seen``.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

Every executed revocation becomes an entry of a numbered, hash-chained feed that devices verify
and keep (docs/authorization.md, "The revocation feed"); the second table records how far each
device's kept feed is. Self-contained: an upgrade only adds the two tables, a downgrade drops
them (the feed starts again empty, and devices that hold a longer one refuse the new head as a
rollback until the old entries are restored: keep a backup of the table).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "service_revocation_feed",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("entry", sa.LargeBinary(), nullable=False),
        sa.Column("hash", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_service_revocation_feed")),
    )
    op.create_table(
        "service_revocation_feed_seen",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("reported_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_service_revocation_feed_seen")),
    )


def downgrade() -> None:
    op.drop_table("service_revocation_feed_seen")
    op.drop_table("service_revocation_feed")
