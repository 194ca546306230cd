"""Revocation that sticks: ``service_device_certs`` and ``service_device_crls``.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06

The certificates the device CA issued to each device (DevID and MQTT TLS client certificate, by
serial, with when they were revoked) and the device CA's numbered CRLs, which the service writes
to ``[revocation] crl_file`` for the broker (docs/operations.md, "Revocation"). Self-contained:
an upgrade adds two new tables and touches nothing else; a downgrade drops them (the CRL file on
disk stays as it was). Devices enrolled before this revision have no TLS certificate row: their
DevID certificate is recorded when they are revoked, their TLS certificate's serial was never
kept (docs/operations.md says how to re-issue it).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "service_device_certs",
        sa.Column("serial", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("not_after", sa.BigInteger(), nullable=False),
        sa.Column("issued_at", sa.BigInteger(), nullable=False),
        sa.Column("revoked_at", sa.BigInteger(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("serial", name=op.f("pk_service_device_certs")),
    )
    with op.batch_alter_table("service_device_certs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_service_device_certs_device_id"), ["device_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_service_device_certs_revoked_at"), ["revoked_at"], unique=False
        )
    op.create_table(
        "service_device_crls",
        sa.Column("number", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("this_update", sa.BigInteger(), nullable=False),
        sa.Column("next_update", sa.BigInteger(), nullable=False),
        sa.Column("der", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("number", name=op.f("pk_service_device_crls")),
    )


def downgrade() -> None:
    op.drop_table("service_device_crls")
    with op.batch_alter_table("service_device_certs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_service_device_certs_revoked_at"))
        batch_op.drop_index(batch_op.f("ix_service_device_certs_device_id"))
    op.drop_table("service_device_certs")
