"""Device tags: ``device_tags`` and ``enroll_sessions.tags``.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-07

One row per tag on a device (``keyfleet device tag``), with an index on ``tag``: a group request
by tag (``keyfleet group create G --all-in TAG``) finds the tag's devices without reading every
device's tags. The rows go with their device (``ON DELETE CASCADE``). ``enroll_sessions.tags``
(a JSON list, ``'[]'`` for existing rows) keeps the tags a station gave at ``enroll/start``
until ``finish`` registers the device. Nothing converted; the downgrade drops both (the tags
are lost).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0020"
# The revision this one follows: the only line to change if revisions are put in another order.
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "device_tags",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("tag", sa.String(length=32), nullable=False),
        sa.Column("added_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.device_id"],
            name=op.f("fk_device_tags_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", "tag", name=op.f("pk_device_tags")),
    )
    op.create_index(op.f("ix_device_tags_tag"), "device_tags", ["tag"], unique=False)
    with op.batch_alter_table("enroll_sessions") as batch:
        batch.add_column(sa.Column("tags", sa.Text(), server_default="[]", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("enroll_sessions") as batch:
        batch.drop_column("tags")
    op.drop_index(op.f("ix_device_tags_tag"), table_name="device_tags")
    op.drop_table("device_tags")
