"""Indexes for catch-up: a member's newest ack and newest commit in a group.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07

Catch-up runs on every verified report (provisioning.service.catchup): it asks for the newest
epoch the device acked in each of its groups and the newest commit it made there. With only the
primary keys ``(group_id, epoch, device_id)`` and ``(group_id, epoch)`` both were scans of the
group's kept rows, the longer the further behind the device was (a 10,000-member group keeps
about 640,000 acks). ``ix_acks_group_device_epoch`` and ``ix_commit_log_group_committer_epoch``
make each one index seek. Only indexes: the downgrade drops them.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_acks_group_device_epoch", "acks", ["group_id", "device_id", "epoch"], unique=False
    )
    op.create_index(
        "ix_commit_log_group_committer_epoch",
        "commit_log",
        ["group_id", "committer", "epoch"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_commit_log_group_committer_epoch", table_name="commit_log")
    op.drop_index("ix_acks_group_device_epoch", table_name="acks")
