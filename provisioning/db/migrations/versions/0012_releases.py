"""Firmware releases approved under the quorum: ``service_releases`` and its companions.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06

Each release's manifest, expected PCR values, state and the Authorization bytes that approved or
revoked it (provisioning.service.releases), the one-row release state (seq, generation, signed
bundle) and the release each device's latest trusted attestation matched. Public data only.
Self-contained: an upgrade adds three tables and touches nothing else; a downgrade drops them
(the service then imports ``[attestation] golden_measurements`` again at its next start).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "service_releases",
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("manifest", sa.LargeBinary(), nullable=False),
        sa.Column("manifest_sha256", sa.String(length=64), nullable=False),
        sa.Column("pcrs", sa.LargeBinary(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("proposed_by", sa.String(length=64), nullable=False),
        sa.Column("proposed_at", sa.BigInteger(), nullable=False),
        sa.Column("approved_by", sa.Text(), nullable=True),
        sa.Column("approved_at", sa.BigInteger(), nullable=True),
        sa.Column("approval", sa.LargeBinary(), nullable=True),
        sa.Column("approval_serial", sa.BigInteger(), nullable=True),
        sa.Column("superseded_at", sa.BigInteger(), nullable=True),
        sa.Column("ended_by", sa.Text(), nullable=True),
        sa.Column("ended_at", sa.BigInteger(), nullable=True),
        sa.Column("revocation", sa.LargeBinary(), nullable=True),
        sa.Column("revocation_serial", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_service_releases")),
    )
    op.create_index(op.f("ix_service_releases_state"), "service_releases", ["state"], unique=False)
    op.create_table(
        "service_release_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("bundle", sa.LargeBinary(), nullable=True),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_service_release_state")),
    )
    op.create_table(
        "service_device_releases",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=True),
        sa.Column("attested_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_service_device_releases")),
    )


def downgrade() -> None:
    op.drop_table("service_device_releases")
    op.drop_table("service_release_state")
    op.drop_index(op.f("ix_service_releases_state"), table_name="service_releases")
    op.drop_table("service_releases")
