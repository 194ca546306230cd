"""The schema as session 1 made it with ``create_all``: registry, commit log, audit log and the
delivery service's tables.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Written out in full (no import of the models): a revision describes the schema of its time and
must not change when the models do. Each table is created only if it is missing, so that a
database made by ``create_all`` before migrations existed, once its tables are checked against
this revision (``provisioning.db.migrations.legacy_differences``), is adopted by running
this revision: it creates what such a database lacks and records the revision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEY_STATES = ("pre-activation", "active", "suspended", "deactivated", "compromised", "destroyed")


def _enum(name: str, *values: str) -> sa.Enum:
    # VARCHAR(16) + CHECK on every backend, as the models declare (no native PostgreSQL ENUM)
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=16)


def _id(name: str) -> sa.Column[str]:
    return sa.Column(name, sa.String(length=64), nullable=False)


def _time(name: str, *, nullable: bool = False) -> sa.Column[int]:
    return sa.Column(name, sa.BigInteger(), nullable=nullable)


def _fk(
    column: str, target: str, table: str, ondelete: str | None = None
) -> sa.ForeignKeyConstraint:
    referred = target.partition(".")[0]
    return sa.ForeignKeyConstraint(
        [column], [target], name=op.f(f"fk_{table}_{column}_{referred}"), ondelete=ondelete
    )


def _audit_head() -> None:
    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("entry_hash", sa.LargeBinary(length=32), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_audit_head_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_head")),
    )


def _audit_log() -> None:
    op.create_table(
        "audit_log",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        _time("time"),
        sa.Column("actor", sa.String(length=128), nullable=False),
        _id("action"),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("outcome", _enum("audit_outcome", "accepted", "refused"), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("details", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("entry_hash", sa.LargeBinary(length=32), nullable=False),
        sa.CheckConstraint("seq >= 1", name=op.f("ck_audit_log_seq_positive")),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_log")),
        sa.UniqueConstraint("entry_hash", name=op.f("uq_audit_log_entry_hash")),
        sa.UniqueConstraint("prev_hash", name=op.f("uq_audit_log_prev_hash")),
    )


def _devices() -> None:
    states = ("registered", "active", "quarantined", "revoked", "destroyed")
    op.create_table(
        "devices",
        _id("device_id"),
        sa.Column("ek_cert_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("devid_cert_pem", sa.Text(), nullable=False),
        sa.Column("state", _enum("device_state", *states), nullable=False),
        sa.Column("state_reason", sa.Text(), nullable=False),
        _time("registered_at"),
        _time("state_changed_at"),
        sa.Column(
            "attestation_result",
            _enum("attestation_result", "trusted", "untrusted"),
            nullable=True,
        ),
        sa.Column("attestation_reason", sa.Text(), nullable=True),
        _time("attested_at", nullable=True),
        _time("last_seen", nullable=True),
        sa.Column("last_report", sa.LargeBinary(), nullable=True),
        _time("last_report_at", nullable=True),
        sa.Column("ak_public", sa.LargeBinary(), nullable=True),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_devices")),
        sa.UniqueConstraint("ek_cert_fingerprint", name=op.f("uq_devices_ek_cert_fingerprint")),
    )


def _groups() -> None:
    op.create_table(
        "groups",
        _id("group_id"),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("public_tree", sa.LargeBinary(), nullable=False),
        sa.Column("group_context", sa.LargeBinary(), nullable=False),
        _time("created_at"),
        _time("updated_at"),
        sa.CheckConstraint("epoch >= 0", name=op.f("ck_groups_epoch_not_negative")),
        sa.PrimaryKeyConstraint("group_id", name=op.f("pk_groups")),
    )


def _operators() -> None:
    op.create_table(
        "operators",
        _id("name"),
        sa.Column("cert_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("role", _enum("operator_role", "viewer", "operator", "admin"), nullable=False),
        _time("created_at"),
        _time("updated_at"),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_operators")),
        sa.UniqueConstraint("cert_fingerprint", name=op.f("uq_operators_cert_fingerprint")),
    )


def _service_attest_challenges() -> None:
    op.create_table(
        "service_attest_challenges",
        sa.Column("nonce", sa.String(length=128), nullable=False),
        _id("device_id"),
        sa.Column("pcrs", sa.String(length=128), nullable=False),
        _time("issued_at"),
        _time("expires_at"),
        _time("answered_at", nullable=True),
        sa.PrimaryKeyConstraint("nonce", name=op.f("pk_service_attest_challenges")),
    )
    op.create_index(
        op.f("ix_service_attest_challenges_device_id"),
        "service_attest_challenges",
        ["device_id"],
        unique=False,
    )


def _service_commands() -> None:
    op.create_table(
        "service_commands",
        sa.Column("command_id", sa.String(length=64), nullable=False),
        _id("operator"),
        _id("type"),
        _time("received_at"),
        sa.PrimaryKeyConstraint("command_id", name=op.f("pk_service_commands")),
    )


def _service_operator_keys() -> None:
    op.create_table(
        "service_operator_keys",
        _id("name"),
        sa.Column("kid", sa.String(length=64), nullable=False),
        sa.Column("cert_pem", sa.Text(), nullable=False),
        _time("added_at"),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_service_operator_keys")),
        sa.UniqueConstraint("kid", name=op.f("uq_service_operator_keys_kid")),
    )


def _service_replay() -> None:
    op.create_table(
        "service_replay",
        _id("sender"),
        sa.Column("state", sa.LargeBinary(), nullable=False),
        _time("updated_at"),
        sa.PrimaryKeyConstraint("sender", name=op.f("pk_service_replay")),
    )


def _stations() -> None:
    op.create_table(
        "stations",
        _id("name"),
        sa.Column("cert_fingerprint", sa.String(length=64), nullable=False),
        _time("created_at"),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_stations")),
        sa.UniqueConstraint("cert_fingerprint", name=op.f("uq_stations_cert_fingerprint")),
    )


def _acks() -> None:
    op.create_table(
        "acks",
        _id("group_id"),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        _id("device_id"),
        sa.Column("epoch_authenticator", sa.LargeBinary(), nullable=False),
        _time("received_at"),
        _fk("device_id", "devices.device_id", "acks", ondelete="CASCADE"),
        _fk("group_id", "groups.group_id", "acks", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("group_id", "epoch", "device_id", name=op.f("pk_acks")),
    )
    op.create_index("ix_acks_group_epoch", "acks", ["group_id", "epoch"], unique=False)


def _commit_log() -> None:
    op.create_table(
        "commit_log",
        _id("group_id"),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        _id("committer"),
        sa.Column("commit", sa.LargeBinary(), nullable=False),
        sa.Column("welcome", sa.LargeBinary(), nullable=True),
        _time("accepted_at"),
        _fk("committer", "devices.device_id", "commit_log"),
        _fk("group_id", "groups.group_id", "commit_log", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("group_id", "epoch", name=op.f("pk_commit_log")),
    )


def _device_keys() -> None:
    op.create_table(
        "device_keys",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        _id("device_id"),
        sa.Column("key_name", sa.String(length=160), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=True),
        sa.Column("state", _enum("key_state", *KEY_STATES), nullable=False),
        _time("changed_at"),
        _fk("device_id", "devices.device_id", "device_keys", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_keys")),
        sa.UniqueConstraint(
            "device_id", "key_name", name=op.f("uq_device_keys_device_id_key_name")
        ),
    )
    op.create_index(op.f("ix_device_keys_device_id"), "device_keys", ["device_id"], unique=False)


def _group_members() -> None:
    op.create_table(
        "group_members",
        _id("group_id"),
        _id("device_id"),
        sa.Column("leaf_index", sa.Integer(), nullable=True),
        sa.Column("pending", _enum("pending_change", "add", "remove"), nullable=True),
        _time("joined_epoch", nullable=True),
        _time("requested_at"),
        _fk("device_id", "devices.device_id", "group_members", ondelete="CASCADE"),
        _fk("group_id", "groups.group_id", "group_members", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("group_id", "device_id", name=op.f("pk_group_members")),
        sa.UniqueConstraint(
            "group_id", "leaf_index", name=op.f("uq_group_members_group_id_leaf_index")
        ),
    )
    op.create_index(
        op.f("ix_group_members_device_id"), "group_members", ["device_id"], unique=False
    )


def _key_transitions() -> None:
    op.create_table(
        "key_transitions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("device_key_id", sa.Integer(), nullable=False),
        sa.Column("from_state", _enum("key_transition_from", *KEY_STATES), nullable=True),
        sa.Column("to_state", _enum("key_transition_to", *KEY_STATES), nullable=False),
        _time("at"),
        _time("recorded_at"),
        _fk("device_key_id", "device_keys.id", "key_transitions", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_key_transitions")),
        sa.UniqueConstraint(
            "device_key_id",
            "to_state",
            "at",
            name=op.f("uq_key_transitions_device_key_id_to_state_at"),
        ),
    )
    op.create_index(
        op.f("ix_key_transitions_device_key_id"),
        "key_transitions",
        ["device_key_id"],
        unique=False,
    )


# Parents before children (foreign keys); downgrade drops in the reverse order.
TABLES: tuple[tuple[str, Callable[[], None]], ...] = (
    ("audit_head", _audit_head),
    ("audit_log", _audit_log),
    ("devices", _devices),
    ("groups", _groups),
    ("operators", _operators),
    ("service_attest_challenges", _service_attest_challenges),
    ("service_commands", _service_commands),
    ("service_operator_keys", _service_operator_keys),
    ("service_replay", _service_replay),
    ("stations", _stations),
    ("acks", _acks),
    ("commit_log", _commit_log),
    ("device_keys", _device_keys),
    ("group_members", _group_members),
    ("key_transitions", _key_transitions),
)


def upgrade() -> None:
    present = set(sa.inspect(op.get_bind()).get_table_names())
    for name, create in TABLES:
        if name not in present:
            create()


def downgrade() -> None:
    for name, _create in reversed(TABLES):
        op.drop_table(name)
