"""``devices.attest_due``: when the attestation schedule next looks at a device, indexed.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07

The schedule reads only the devices due (``WHERE attest_due <= now ORDER BY attest_due LIMIT
k``) instead of every device every tick (provisioning.service.tasks.attest_tick). Existing rows
get 0: each is looked at once at the first scan after the upgrade, which sets its real due time
from its last challenge and verdict. The downgrade drops the index and the column (a table
rebuild on SQLite).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "devices",
        sa.Column("attest_due", sa.BigInteger(), server_default="0", nullable=False),
    )
    op.create_index(op.f("ix_devices_attest_due"), "devices", ["attest_due"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_devices_attest_due"), table_name="devices")
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("attest_due")
