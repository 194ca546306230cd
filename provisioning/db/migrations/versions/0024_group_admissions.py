"""The Authorizations that admitted each group's members: ``group_admissions``.

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-07

Members no longer keep the operators' Authorization each leaf's admission hash names, and a
Welcome no longer carries them: the service stores each one it accepts (with a group's creation
or a commit that adds members) under its SHA-256 and delivers them to joiners with the Welcome
or the tree's pages. Existing groups start with no rows; each member's agent hands over the
Authorizations its saved state held when it first runs upgraded (``group.admissions``), and
until one member of a group has, a Welcome into it is refused by its joiner
(``mls.welcome.admission``; docs/operations.md). The downgrade drops the table.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0024"
# The revision this one follows: the only line to change if revisions are put in another order.
down_revision: str | None = "0023"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "group_admissions",
        sa.Column("group_id", sa.String(length=64), nullable=False),
        sa.Column("digest", sa.LargeBinary(), nullable=False),
        sa.Column("authz", sa.LargeBinary(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["groups.group_id"],
            name=op.f("fk_group_admissions_group_id_groups"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("group_id", "digest", name=op.f("pk_group_admissions")),
    )


def downgrade() -> None:
    op.drop_table("group_admissions")
