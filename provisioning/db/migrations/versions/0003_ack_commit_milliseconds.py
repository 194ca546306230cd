"""Millisecond times of acks and accepted commits (``acks.received_at_ms``,
``commit_log.accepted_at_ms``) and an index on ``audit_log(action, time)``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23

Ack latency (an ack's arrival minus its commit's acceptance) is well under a second in a lab
rekey, which the seconds columns show as 0. The seconds columns stay (other code reads them);
the new columns hold the same instant in milliseconds since the Unix epoch. Both are nullable
with no default: rows written before this revision keep NULL and readers fall back to
``seconds * 1000``, so the upgrade rewrites no row. Adding a nullable column needs no SQLite
table rebuild; dropping one does (batch mode), which the downgrade uses.

Also ``ix_audit_log_action_time`` on ``audit_log(action, time)``: the dashboard finds a group's
last rekey, a device's attestation verdicts and the overview's verdict timeline by action. Measured
in-process on bench_dashboard's registry (10,000 devices, 9,717 audit entries, SQLite, medians):
a group page's queries 4.7 -> 2.6 ms when the group has no rekey in the log (that lookup scanned
the whole log), a device page's 3.4 -> 2.6 ms, the overview's unchanged (38.6 / 38.7 ms).
``audit_log(target, action)`` would bring the device page's to 1.2 ms, but
``target`` is unbounded text: on PostgreSQL an over-long target (B-tree entries are limited to
about 2.7 kB) would make the audit append itself fail, so it is not added.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("acks", sa.Column("received_at_ms", sa.BigInteger(), nullable=True))
    op.add_column("commit_log", sa.Column("accepted_at_ms", sa.BigInteger(), nullable=True))
    op.create_index("ix_audit_log_action_time", "audit_log", ["action", "time"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_audit_log_action_time", table_name="audit_log")
    with op.batch_alter_table("commit_log", schema=None) as batch_op:
        batch_op.drop_column("accepted_at_ms")
    with op.batch_alter_table("acks", schema=None) as batch_op:
        batch_op.drop_column("received_at_ms")
