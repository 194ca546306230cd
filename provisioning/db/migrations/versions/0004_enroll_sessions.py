"""Pending factory enrollments in the database: ``enroll_sessions``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23

Until this revision a session between ``enroll/start`` and ``enroll/finish`` lived in the memory
of the instance that ran ``start``, so a station had to finish on the same instance. The table
holds what ``finish`` needs on any instance: the device's public areas, the SHA-256 digest of the
credential-activation secret (never the secret), the expiry and, once finished, the certificates
issued (public) so that a retried finish returns the same identity. A new table only: an upgrade
changes nothing that exists; a downgrade drops it, and sessions open at that moment are lost (the
stations start again).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "enroll_sessions",
        sa.Column("session_id", sa.String(length=64), nullable=False),
        sa.Column("station", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("ek_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("serial", sa.String(length=128), nullable=False),
        sa.Column("ak_public", sa.LargeBinary(), nullable=False),
        sa.Column("devid_public", sa.LargeBinary(), nullable=False),
        sa.Column("tls_public", sa.LargeBinary(), nullable=False),
        sa.Column("groups", sa.Text(), nullable=False),
        sa.Column("credential_digest", sa.LargeBinary(length=32), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.Column("finished_at", sa.BigInteger(), nullable=True),
        sa.Column("devid_cert_pem", sa.Text(), nullable=True),
        sa.Column("tls_cert_pem", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("session_id", name=op.f("pk_enroll_sessions")),
    )
    with op.batch_alter_table("enroll_sessions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_enroll_sessions_device_id"), ["device_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_enroll_sessions_expires_at"), ["expires_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("enroll_sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_enroll_sessions_expires_at"))
        batch_op.drop_index(batch_op.f("ix_enroll_sessions_device_id"))
    op.drop_table("enroll_sessions")
