"""Dual control: ``service_quorum_requests``, ``service_quorum_policies`` and
``service_operations.authz``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06

Membership changes and revocations go through operator requests that k distinct operators
approve (docs/operations.md, "Dual control"). The new tables hold the requests (the Request
bytes the service built, the approvals, the state) and the signed quorum policies adopted; the
new nullable column holds the Authorization an operation runs under, so its commit requests and
welcomes carry it to the members. An upgrade adds only new tables and a nullable column; a
downgrade drops them, and requests pending at that moment are lost (operators propose again).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "service_quorum_policies",
        sa.Column("serial", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("authz", sa.LargeBinary(), nullable=False),
        sa.Column("adopted_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("serial", name=op.f("pk_service_quorum_policies")),
    )
    op.create_table(
        "service_quorum_requests",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("op", sa.String(length=64), nullable=False),
        sa.Column("group_id", sa.String(length=64), nullable=True),
        sa.Column("members", sa.Text(), nullable=False),
        sa.Column("request", sa.LargeBinary(), nullable=False),
        sa.Column("approvals", sa.LargeBinary(), nullable=False),
        sa.Column("approvers", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("proposer", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("command_id", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_service_quorum_requests")),
    )
    with op.batch_alter_table("service_quorum_requests", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_service_quorum_requests_expires_at"), ["expires_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_service_quorum_requests_state"), ["state"], unique=False
        )

    with op.batch_alter_table("service_operations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("authz", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("service_operations", schema=None) as batch_op:
        batch_op.drop_column("authz")

    with op.batch_alter_table("service_quorum_requests", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_service_quorum_requests_state"))
        batch_op.drop_index(batch_op.f("ix_service_quorum_requests_expires_at"))

    op.drop_table("service_quorum_requests")
    op.drop_table("service_quorum_policies")
