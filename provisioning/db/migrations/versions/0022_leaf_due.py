"""The rekey check reads only what is due: ``service_leaf_updates.due_at`` and ``due_epoch``,
indexed, and ``service_rekey_default``.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-07

``due_at``: when the rekey policy's check next looks at a member's last self-update (its
``updated_at`` plus the group's ``max_age``, or once asked ``asked_at`` plus the repeat
interval); ``due_epoch``: the group epoch from which it is due by the epoch bound (its
``epoch`` plus ``max_epochs``); NULL where a bound is off. The check reads ``due_at <= now``
(index ``due_at``); each accepted commit sets ``due_at`` of the rows its epoch makes due by
the epoch bound (index ``group_id, due_epoch``).
``service_rekey_default``: the service default the rows of groups without their own policy were
computed with. The default lives in the service's configuration, which a migration does not
read, so existing rows keep NULL here and the table stays empty: the first check after the
upgrade finds no default recorded and computes every group's rows (one UPDATE per group with
its own policy, one for the rest), then records the default. The downgrade drops both.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0022"
# The revision this one follows: the only line to change if revisions are put in another order.
down_revision: str | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("service_leaf_updates", sa.Column("due_at", sa.BigInteger(), nullable=True))
    op.add_column("service_leaf_updates", sa.Column("due_epoch", sa.BigInteger(), nullable=True))
    op.create_index(
        op.f("ix_service_leaf_updates_due_at"), "service_leaf_updates", ["due_at"], unique=False
    )
    op.create_index(
        "ix_service_leaf_updates_group_due_epoch",
        "service_leaf_updates",
        ["group_id", "due_epoch"],
        unique=False,
    )
    op.create_table(
        "service_rekey_default",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("max_age", sa.BigInteger(), nullable=False),
        sa.Column("max_epochs", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_service_rekey_default")),
    )


def downgrade() -> None:
    op.drop_table("service_rekey_default")
    op.drop_index("ix_service_leaf_updates_group_due_epoch", table_name="service_leaf_updates")
    op.drop_index(op.f("ix_service_leaf_updates_due_at"), table_name="service_leaf_updates")
    with op.batch_alter_table("service_leaf_updates", schema=None) as batch_op:
        batch_op.drop_column("due_epoch")
        batch_op.drop_column("due_at")
