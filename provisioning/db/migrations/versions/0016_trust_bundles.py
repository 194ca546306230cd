"""The chain of trust bundles (service signing key rollovers): ``service_trust_bundles``.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07

One row per bundle of the chain devices follow (provisioning.service.trustroll): the signed
bundle, the admins' Authorization of it and the name of the key it makes current. Public data
and key references only. Self-contained: an upgrade adds one table; a downgrade drops it (the
service then signs with ``[service] signing_key`` again, which must be the key devices hold).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "service_trust_bundles",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("link", sa.LargeBinary(), nullable=False),
        sa.Column("authz", sa.LargeBinary(), nullable=False),
        sa.Column("key_ref", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_service_trust_bundles")),
    )


def downgrade() -> None:
    op.drop_table("service_trust_bundles")
