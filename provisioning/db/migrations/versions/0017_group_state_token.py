"""A token naming each version of a group's public state: ``groups.state_token``.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07

Random bytes, new with every write of the group's public state (creation, an accepted commit,
a rollback): a service instance keeps decoded public groups in memory and uses one only while
the row still carries the token it was made for (docs/scale-out.md). Existing rows get NULL,
which no copy matches: the first commit after the upgrade writes a token. A downgrade drops it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("groups") as batch:
        batch.add_column(sa.Column("state_token", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("groups") as batch:
        batch.drop_column("state_token")
