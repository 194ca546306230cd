"""The fleet service's tables, as SQLAlchemy 2 typed ORM classes.

Portable on purpose: the same schema runs on a SQLite file (one machine) and on PostgreSQL (several
service instances), so only portable types appear: String, Text, LargeBinary, Integer, BigInteger.
Every time is an integer count of seconds since the Unix epoch (UTC), the same ``now: int`` the
rest of keyfleet passes around; no DateTime columns, so no time-zone or driver differences.

Ordering rules that several service instances must agree on are constraints in the database, not
checks in Python: one commit per (group, epoch), one ack per (group, epoch, device), one audit
entry per sequence number and per previous hash. A racing writer gets an integrity error from the
database and is refused or retries; it can never fork a group or the audit chain.

What is deliberately absent: any private group material. Groups hold the public ratchet tree and
the public group context; commits and welcomes are stored as the opaque bytes members sent (their
secrets are HPKE-encrypted to members' leaf keys). No epoch secret, path secret or private key has
a column here, so a stolen database decrypts nothing. Pending enrollments keep only a SHA-256
digest of their one-time credential-activation secret, which checks an answer but cannot make one.
"""

from __future__ import annotations

import enum

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# The NIST SP 800-57 key states are the agent's (it makes the transitions; the service records
# them), so both sides share one enumeration.
from agent.protocol.lifecycle import KeyState

# Stable constraint names: PostgreSQL reports them in errors and migrations refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ID_LENGTH = 64  # device ids, group ids, operator and station names
KEY_NAME_LENGTH = 160  # agent key names such as "epoch/<group id>/<epoch>"
FINGERPRINT_LENGTH = 64  # lowercase hex SHA-256 of a certificate's DER
HASH_LENGTH = 32  # SHA-256 digest in the audit chain


class DeviceState(enum.StrEnum):
    """A device's life in the fleet. ``registered``: enrolled by a factory station, not yet seen
    attesting; ``active``: trusted and in its groups; ``quarantined``: failed attestation, removed
    from its groups, may come back; ``revoked``: never trusted again; ``destroyed``: its keys are
    gone (reported by the device or decided by an operator)."""

    REGISTERED = "registered"
    ACTIVE = "active"
    QUARANTINED = "quarantined"
    REVOKED = "revoked"
    DESTROYED = "destroyed"


class AttestationResult(enum.StrEnum):
    TRUSTED = "trusted"
    UNTRUSTED = "untrusted"


class PendingChange(enum.StrEnum):
    """A membership change the service has been asked for but no accepted commit has made yet."""

    ADD = "add"
    REMOVE = "remove"


class Role(enum.StrEnum):
    """Operator roles, each including the one before: a viewer reads, an operator rekeys and
    quarantines, an admin also revokes, destroys and manages operators."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    def allows(self, required: Role) -> bool:
        order = list(Role)
        return order.index(self) >= order.index(required)


class Outcome(enum.StrEnum):
    ACCEPTED = "accepted"
    REFUSED = "refused"


def _enum_column(kind: type[enum.StrEnum], name: str) -> Enum:
    # VARCHAR + CHECK on every database (no native PostgreSQL ENUM type to migrate later), storing
    # the lowercase values people read in SQL rather than the Python member names.
    return Enum(
        kind,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Device(Base):
    __tablename__ = "devices"

    device_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    ek_cert_fingerprint: Mapped[str] = mapped_column(String(FINGERPRINT_LENGTH), unique=True)
    devid_cert_pem: Mapped[str] = mapped_column(Text)
    state: Mapped[DeviceState] = mapped_column(_enum_column(DeviceState, "device_state"))
    state_reason: Mapped[str] = mapped_column(Text, default="")
    registered_at: Mapped[int] = mapped_column(BigInteger)
    state_changed_at: Mapped[int] = mapped_column(BigInteger)
    attestation_result: Mapped[AttestationResult | None] = mapped_column(
        _enum_column(AttestationResult, "attestation_result"), nullable=True
    )
    attestation_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    attested_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_seen: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_report: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    last_report_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # The digest (``provisioning.registry.key_state_digest``) of a reported key state every
    # transition and kind of which is recorded in ``keys``: a report with the same digest
    # changes no key row, judged without reading them. NULL: none known. Every write that
    # could make such a report change a key row (a learned kind, keys cleared at re-enrolment,
    # ORM writes of keys) sets it to NULL; only the steady report and attestation answer paths
    # set it.
    reported_keys: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    # The AK's public area (marshalled TPM2B_PUBLIC) as enrolled: the attestation verifier checks
    # quotes with it. NULL for devices registered without one (they cannot be attested).
    ak_public: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    # When the attestation schedule next looks at this device (Unix seconds; 0: at once). The
    # scan reads only the rows due, by this index, instead of every device every tick
    # (provisioning.service.tasks.attest_tick).
    attest_due: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0", index=True)

    keys: Mapped[list[DeviceKey]] = relationship(
        back_populates="device", cascade="all, delete-orphan"
    )


TAG_LENGTH = 32  # agent.protocol.wire.messages.operator.TAG_PATTERN


class DeviceTag(Base):
    """One tag on one device (``keyfleet device tag``): tags select devices for a group
    request (``group create --all-in TAG``), which then names the devices themselves. The index
    on ``tag`` finds a tag's devices without reading every device's tags."""

    __tablename__ = "device_tags"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.device_id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(String(TAG_LENGTH), primary_key=True, index=True)
    added_at: Mapped[int] = mapped_column(BigInteger)


class DeviceKey(Base):
    """The current NIST state of one named key on one device (the agent's key names: ``devid``,
    ``ak``, ``epoch/<group>/<epoch>``...); its history is in ``key_transitions``."""

    __tablename__ = "device_keys"
    __table_args__ = (UniqueConstraint("device_id", "key_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.device_id", ondelete="CASCADE"), index=True
    )
    key_name: Mapped[str] = mapped_column(String(KEY_NAME_LENGTH))
    # agent.protocol.lifecycle.KeyKind value (devid, ak, leaf, state, epoch, app-seal) as reported
    kind: Mapped[str | None] = mapped_column(String(16), nullable=True)
    state: Mapped[KeyState] = mapped_column(_enum_column(KeyState, "key_state"))
    changed_at: Mapped[int] = mapped_column(BigInteger)

    device: Mapped[Device] = relationship(back_populates="keys")
    transitions: Mapped[list[KeyTransition]] = relationship(
        back_populates="key", cascade="all, delete-orphan", order_by="KeyTransition.id"
    )


class KeyTransition(Base):
    """One state change of a device key: ``at`` is when the device made it (its clock),
    ``recorded_at`` when the service learnt of it (ours)."""

    __tablename__ = "key_transitions"
    __table_args__ = (UniqueConstraint("device_key_id", "to_state", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_key_id: Mapped[int] = mapped_column(
        ForeignKey("device_keys.id", ondelete="CASCADE"), index=True
    )
    from_state: Mapped[KeyState | None] = mapped_column(
        _enum_column(KeyState, "key_transition_from"), nullable=True
    )
    to_state: Mapped[KeyState] = mapped_column(_enum_column(KeyState, "key_transition_to"))
    at: Mapped[int] = mapped_column(BigInteger)
    recorded_at: Mapped[int] = mapped_column(BigInteger)

    key: Mapped[DeviceKey] = relationship(back_populates="transitions")


class Group(Base):
    """A group's public state at its current epoch: ``public_tree`` is its head (group id,
    epoch, tree width, transcript hashes; CBOR, ``provisioning.service.store.trees``), the
    ratchet tree's nodes are rows of ``group_tree_nodes``, and the GroupContext is the bytes
    the accepted commit produced. (Before revision 0018, and as written by tools seeding a
    group, ``public_tree`` may hold the whole public state, tree included.)"""

    __tablename__ = "groups"
    __table_args__ = (CheckConstraint("epoch >= 0", name="epoch_not_negative"),)

    group_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger)
    public_tree: Mapped[bytes] = mapped_column(LargeBinary)
    group_context: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)
    # Random, new with every write of the public state (create, commit, rollback): a service
    # instance's in-memory copy of the group is current iff it was made for this token.
    state_token: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    # Set when the operators deleted the group (a quorum's ``group.delete``, revision 0019):
    # when, and the revocation feed entry that tells the members. A deleted group's id is never
    # used again; its members at deletion are ``group_deleted_members``.
    deleted_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    deleted_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class GroupDeletedMember(Base):
    """A member of a group when the operators deleted it (its ``group_members`` row is gone):
    the deletion is done at that member once its ``keys.report`` shows a revocation feed at or
    past the group's ``deleted_seq`` (``provisioning.service.groupdelete``)."""

    __tablename__ = "group_deleted_members"

    group_id: Mapped[str] = mapped_column(
        ForeignKey("groups.group_id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, index=True)


class GroupTreeNode(Base):
    """One non-blank node of a group's public ratchet tree at its current epoch: ``node`` is its
    index in the tree's node array (RFC 9420 Appendix C), ``data`` its CBOR as in the tree's
    encoding (a leaf with its admission hash, or a parent). A commit rewrites only the nodes it
    changes, O(log N) rows."""

    __tablename__ = "group_tree_nodes"

    group_id: Mapped[str] = mapped_column(
        ForeignKey("groups.group_id", ondelete="CASCADE"), primary_key=True
    )
    node: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class GroupAdmission(Base):
    """An operators' Authorization that admitted members of a group (revision 0024), by its
    SHA-256 (``digest``: the admission hash the leaves it admitted record): from the group's
    creation (the founder's ``group.created``) and from each accepted commit that adds
    members. The service delivers them to joiners with their Welcome or tree pages; members
    keep none (docs/treekem.md, "Admissions delivered by the service"). ``epoch``: the epoch
    whose commit (or creation: 0) stored it. Kept while the group exists."""

    __tablename__ = "group_admissions"

    group_id: Mapped[str] = mapped_column(
        ForeignKey("groups.group_id", ondelete="CASCADE"), primary_key=True
    )
    digest: Mapped[bytes] = mapped_column(LargeBinary, primary_key=True)
    authz: Mapped[bytes] = mapped_column(LargeBinary)
    epoch: Mapped[int] = mapped_column(BigInteger)


class GroupMember(Base):
    """A device's place in a group. ``leaf_index`` is NULL while an add is pending (no commit has
    given it a leaf yet); two members of one group never share a leaf."""

    __tablename__ = "group_members"
    __table_args__ = (UniqueConstraint("group_id", "leaf_index"),)

    group_id: Mapped[str] = mapped_column(
        ForeignKey("groups.group_id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.device_id", ondelete="CASCADE"), primary_key=True, index=True
    )
    leaf_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pending: Mapped[PendingChange | None] = mapped_column(
        _enum_column(PendingChange, "pending_change"), nullable=True
    )
    joined_epoch: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    requested_at: Mapped[int] = mapped_column(BigInteger)


class CommitLogEntry(Base):
    """An accepted commit. ``epoch`` is the epoch the commit was made in; accepting it moves the
    group to ``epoch + 1``. The primary key (group_id, epoch) is the rule "one commit per epoch,
    the first valid one wins", enforced by the database for every service instance."""

    __tablename__ = "commit_log"
    # the newest commit a member made in a group (catch-up: the epoch it is proven to hold)
    __table_args__ = (
        Index("ix_commit_log_group_committer_epoch", "group_id", "committer", "epoch"),
    )

    group_id: Mapped[str] = mapped_column(
        ForeignKey("groups.group_id", ondelete="CASCADE"), primary_key=True
    )
    epoch: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    committer: Mapped[str] = mapped_column(ForeignKey("devices.device_id"))
    commit: Mapped[bytes] = mapped_column(LargeBinary)
    welcome: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    accepted_at: Mapped[int] = mapped_column(BigInteger)
    # The same instant in milliseconds since the Unix epoch (revision 0003): a lab rekey takes
    # well under a second, which whole seconds show as 0. NULL for commits accepted before 0003;
    # readers fall back to accepted_at * 1000.
    accepted_at_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class Ack(Base):
    """A member's confirmation that it reached ``epoch``, with its epoch authenticator (RFC 9420
    section 8.7): public, yet equal only among members that derived the same epoch secrets."""

    __tablename__ = "acks"
    __table_args__ = (
        Index("ix_acks_group_epoch", "group_id", "epoch"),
        # the newest epoch a member acked (catch-up, on every report): one index seek, where
        # the primary key (group, epoch, device) made it a scan of the group's kept acks
        Index("ix_acks_group_device_epoch", "group_id", "device_id", "epoch"),
    )

    group_id: Mapped[str] = mapped_column(
        ForeignKey("groups.group_id", ondelete="CASCADE"), primary_key=True
    )
    epoch: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.device_id", ondelete="CASCADE"), primary_key=True
    )
    epoch_authenticator: Mapped[bytes] = mapped_column(LargeBinary)
    received_at: Mapped[int] = mapped_column(BigInteger)
    # received_at in milliseconds (revision 0003), for ack latency (received_at_ms minus the
    # commit's accepted_at_ms); NULL for acks received before 0003 (readers use seconds * 1000).
    received_at_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class Operator(Base):
    __tablename__ = "operators"

    name: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    cert_fingerprint: Mapped[str] = mapped_column(String(FINGERPRINT_LENGTH), unique=True)
    role: Mapped[Role] = mapped_column(_enum_column(Role, "operator_role"))
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)


class Station(Base):
    """A factory station allowed to enroll devices (used by the provisioning issue)."""

    __tablename__ = "stations"

    name: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    cert_fingerprint: Mapped[str] = mapped_column(String(FINGERPRINT_LENGTH), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger)


class EnrollSession(Base):
    """A factory enrollment between ``start`` and its expiry (provisioning/enroll.py), shared by
    every service instance: a station may send ``finish`` to another instance than ``start``.

    The credential-activation secret itself is never stored, only ``credential_digest``
    (SHA-256 of 32 random bytes, see ``enroll.secret_digest``): enough to check the device's
    answer, useless for making one. Everything else is public (the device's public areas, the
    certificates issued). ``finished_at`` is set by the one ``finish`` whose conditional UPDATE
    (``WHERE finished_at IS NULL``) changes the row, in the transaction that registers the
    device; the issued certificates stay here until the session expires so that a retried
    ``finish`` (the station lost the answer) returns the same identity on any instance."""

    __tablename__ = "enroll_sessions"

    session_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)  # hex
    station: Mapped[str] = mapped_column(String(ID_LENGTH))
    device_id: Mapped[str] = mapped_column(String(ID_LENGTH), index=True)
    ek_fingerprint: Mapped[str] = mapped_column(String(FINGERPRINT_LENGTH))
    serial: Mapped[str] = mapped_column(String(128))
    ak_public: Mapped[bytes] = mapped_column(LargeBinary)
    devid_public: Mapped[bytes] = mapped_column(LargeBinary)
    tls_public: Mapped[bytes] = mapped_column(LargeBinary)
    groups: Mapped[str] = mapped_column(Text)  # JSON list of group names
    # JSON list of the device tags the station gave (revision 0020), set at finish
    tags: Mapped[str] = mapped_column(Text, default="[]", server_default="[]")
    credential_digest: Mapped[bytes] = mapped_column(LargeBinary(HASH_LENGTH))
    created_at: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int] = mapped_column(BigInteger, index=True)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    devid_cert_pem: Mapped[str | None] = mapped_column(Text, nullable=True)
    tls_cert_pem: Mapped[str | None] = mapped_column(Text, nullable=True)


class AuditEntry(Base):
    """One link of the append-only, hash-chained audit log (format and verification in
    provisioning/audit.py and docs/service.md). UNIQUE(seq) and UNIQUE(prev_hash) make the chain
    head a database constraint: two writers that read the same head cannot both append."""

    __tablename__ = "audit_log"
    __table_args__ = (
        CheckConstraint("seq >= 1", name="seq_positive"),
        UniqueConstraint("prev_hash"),
        UniqueConstraint("entry_hash"),
        # Revision 0003: the dashboard looks entries up by action (a group's last rekey and its
        # result, a device's attestation verdicts, the overview's verdicts by time); without it
        # a group with no rekey in the log costs a scan of the whole log (docs/dashboard.md).
        Index("ix_audit_log_action_time", "action", "time"),
    )

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    time: Mapped[int] = mapped_column(BigInteger)
    actor: Mapped[str] = mapped_column(String(ID_LENGTH * 2))
    action: Mapped[str] = mapped_column(String(ID_LENGTH))
    target: Mapped[str] = mapped_column(Text)
    outcome: Mapped[Outcome] = mapped_column(_enum_column(Outcome, "audit_outcome"))
    reason: Mapped[str] = mapped_column(Text)
    details: Mapped[str] = mapped_column(Text)  # canonical JSON, hashed as stored
    prev_hash: Mapped[bytes] = mapped_column(LargeBinary(HASH_LENGTH))
    entry_hash: Mapped[bytes] = mapped_column(LargeBinary(HASH_LENGTH))


class AuditHead(Base):
    """One row: the chain head (seq and hash of the last entry). Appending starts by updating
    this row, which takes the row lock on PostgreSQL and the write lock on SQLite, so concurrent
    appenders queue instead of racing and retrying; the unique constraints of ``audit_log`` stay
    the guarantee. Verification also checks that the chain ends where this row says."""

    __tablename__ = "audit_head"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    entry_hash: Mapped[bytes] = mapped_column(LargeBinary(HASH_LENGTH))
