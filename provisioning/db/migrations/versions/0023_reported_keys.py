"""A steady key-state report is judged by one column: ``devices.reported_keys``.

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-07

``reported_keys``: the digest of a reported key state every transition and kind of which is
recorded in the device's key rows (NULL: none known). Existing rows keep NULL: their next
report is judged on the key rows, as before, and sets it. The downgrade drops the column.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0023"
# The revision this one follows: the only line to change if revisions are put in another order.
down_revision: str | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("devices", sa.Column("reported_keys", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("reported_keys")
