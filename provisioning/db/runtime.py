"""The fleet service's runtime tables: what ``keyfleet serve`` instances share while they work.

Operator keys and replay state, command ids, attestation challenges and waits, the job queue and
its per-group slot, operations in flight, held commit/welcome halves, task leases and the shared
envelope sequence counter, dual-control requests and the adopted quorum policies, the
revocation feed and how far each device follows it, the signed audit checkpoints, members'
reports of commits they cannot process, each group's public state before its newest commit and
what its tree rows held at each retained epoch, and the firmware releases with the fleet's
release state. Every rule several instances agree on is a row and a conditional UPDATE (whoever
changes the row wins, the others see rowcount 0 and step back), never a leader and never an
in-process lock. The queries over them live in
``provisioning.service.store``.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from provisioning.db.schema import ID_LENGTH, NAMING_CONVENTION


class ServiceBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class OperatorKey(ServiceBase):
    __tablename__ = "service_operator_keys"

    name: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    kid: Mapped[str] = mapped_column(String(64), unique=True)  # hex
    cert_pem: Mapped[str] = mapped_column(Text)
    added_at: Mapped[int] = mapped_column(BigInteger)


class ReplayState(ServiceBase):
    __tablename__ = "service_replay"

    sender: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    state: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[int] = mapped_column(BigInteger)


class OperatorCommand(ServiceBase):
    __tablename__ = "service_commands"

    command_id: Mapped[str] = mapped_column(String(64), primary_key=True)  # hex
    operator: Mapped[str] = mapped_column(String(ID_LENGTH))
    type: Mapped[str] = mapped_column(String(ID_LENGTH))
    received_at: Mapped[int] = mapped_column(BigInteger)


class AttestChallengeRow(ServiceBase):
    __tablename__ = "service_attest_challenges"

    nonce: Mapped[str] = mapped_column(String(128), primary_key=True)  # hex
    device_id: Mapped[str] = mapped_column(String(ID_LENGTH), index=True)
    pcrs: Mapped[str] = mapped_column(String(128))  # "0,1,4,8,9"
    issued_at: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int] = mapped_column(BigInteger)
    answered_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class JobRow(ServiceBase):
    """One group change (create, add, remove, update) of a group's FIFO queue. ``version`` makes
    every change a compare-and-set; ``deadline`` is the lease of the instance that last moved it
    (``claimed_by``): when it passes with nothing answered, any instance takes the job over."""

    __tablename__ = "service_jobs"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), unique=True)  # hex
    group_id: Mapped[str] = mapped_column(String(ID_LENGTH), index=True)
    action: Mapped[str] = mapped_column(String(16))
    member: Mapped[str | None] = mapped_column(String(ID_LENGTH), nullable=True)
    command_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    persistent: Mapped[bool] = mapped_column(Boolean, default=False)
    candidates: Mapped[str] = mapped_column(Text, default="")  # comma-separated device ids
    prefer: Mapped[str | None] = mapped_column(String(ID_LENGTH), nullable=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    key_package: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # public
    committer: Mapped[str | None] = mapped_column(String(ID_LENGTH), nullable=True)
    tried: Mapped[str] = mapped_column(Text, default="")
    request_epoch: Mapped[int] = mapped_column(BigInteger, default=0)
    deadline: Mapped[int] = mapped_column(BigInteger, default=0)
    detail: Mapped[str] = mapped_column(Text, default="")
    claimed_by: Mapped[str | None] = mapped_column(String(ID_LENGTH), nullable=True)
    version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[int] = mapped_column(BigInteger)


class GroupSlot(ServiceBase):
    """The per-group "one outstanding change" claim: ``job_id`` is the job in flight. A job is
    started only by the instance whose conditional UPDATE takes the empty slot, so two instances
    can never have two commit requests out for one group."""

    __tablename__ = "service_group_slots"

    group_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    job_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class OperationRow(ServiceBase):
    """An operator command in flight, whoever accepted it: any instance that sees its last ack
    sends the operator the result. ``finished_at`` is set by exactly one instance (conditional
    UPDATE), which then sends the final result and audits it."""

    __tablename__ = "service_operations"

    command_id: Mapped[str] = mapped_column(String(64), primary_key=True)  # hex
    operator: Mapped[str] = mapped_column(String(ID_LENGTH))
    type: Mapped[str] = mapped_column(String(ID_LENGTH))
    target: Mapped[str] = mapped_column(String(ID_LENGTH))
    groups: Mapped[str] = mapped_column(Text)  # ",g1,g2," (LIKE-searchable)
    last_progress: Mapped[int] = mapped_column(BigInteger)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True, index=True)
    accepted_by: Mapped[str] = mapped_column(String(ID_LENGTH), default="")  # instance
    nudged_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_sent: Mapped[str] = mapped_column(Text, default="")
    throttle: Mapped[str] = mapped_column(Text, default="")  # the ack throttle, as JSON
    # The operators' Authorization (agent.protocol.authz) the change runs under, if it came
    # through dual control: commit requests and welcomes of its jobs carry it to the members.
    authz: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger)


class HeldMessage(ServiceBase):
    """A commit that adds members waiting for its Welcome, or a Welcome that came first. The two
    may reach different instances; whichever instance deletes the held half (rowcount 1) owns the
    acceptance."""

    __tablename__ = "service_held"

    group_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # the commit's epoch
    sender: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)  # commit | welcome
    data: Mapped[bytes] = mapped_column(LargeBinary)  # commit or welcome bytes (public, sealed)
    extra: Mapped[str] = mapped_column(Text, default="")  # command id hex | new members
    received_at: Mapped[int] = mapped_column(BigInteger)


class AttestOperationRow(ServiceBase):
    """An operator's ``op.attest`` waiting for the device's report (keyed by the nonce)."""

    __tablename__ = "service_attest_ops"

    nonce: Mapped[str] = mapped_column(String(128), primary_key=True)
    command_id: Mapped[str] = mapped_column(String(64))
    operator: Mapped[str] = mapped_column(String(ID_LENGTH))
    device_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    deadline: Mapped[int] = mapped_column(BigInteger, index=True)


class AttestScheduleRow(ServiceBase):
    """When each device was last challenged by the schedule or an operator: the claim that makes
    a scheduled challenge once per interval fleet-wide."""

    __tablename__ = "service_attest_schedule"

    device_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    challenged_at: Mapped[int] = mapped_column(BigInteger)


class TaskLease(ServiceBase):
    """Periodic fleet-wide work (attestation scan, pruning): due at ``due_at``; an instance runs
    it after claiming it until ``claimed_until``. A dead instance's claim simply expires."""

    __tablename__ = "service_tasks"

    name: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    due_at: Mapped[int] = mapped_column(BigInteger)
    claimed_by: Mapped[str | None] = mapped_column(String(ID_LENGTH), nullable=True)
    claimed_until: Mapped[int] = mapped_column(BigInteger, default=0)


class SequenceRow(ServiceBase):
    """The service's envelope sequence number, shared: all instances sign as one sender, and a
    device's replay window (32) would refuse two instances' interleaved private counters."""

    __tablename__ = "service_sequence"

    name: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


class QuorumRequestRow(ServiceBase):
    """A dual-control request (``keyfleet propose``): the Request the service built (public),
    the operators' approvals so far and where it stands. ``state``: pending, approved (quorum
    met, its change being started), executed (the change started, ``command_id`` names its
    operation), expired, refused (``detail`` says why). Every move is a conditional UPDATE on
    ``version``, so two instances taking two approvals at once cannot lose one."""

    __tablename__ = "service_quorum_requests"

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)  # hex
    op: Mapped[str] = mapped_column(String(ID_LENGTH))
    group_id: Mapped[str | None] = mapped_column(String(ID_LENGTH), nullable=True)
    members: Mapped[str] = mapped_column(Text, default="")  # comma-separated device ids
    request: Mapped[bytes] = mapped_column(LargeBinary)  # the Request's CBOR bytes
    approvals: Mapped[bytes] = mapped_column(LargeBinary)  # CBOR array of Approval bytes
    approvers: Mapped[str] = mapped_column(Text, default="")  # comma-separated operator ids
    state: Mapped[str] = mapped_column(String(16), index=True)
    proposer: Mapped[str] = mapped_column(String(ID_LENGTH))
    reason: Mapped[str] = mapped_column(Text, default="")  # a revocation's reason text
    command_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # hex
    detail: Mapped[str] = mapped_column(Text, default="")
    version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int] = mapped_column(BigInteger, index=True)
    updated_at: Mapped[int] = mapped_column(BigInteger)


class QuorumPolicyRow(ServiceBase):
    """The signed quorum policies the service adopted, one row per serial: ``authz`` is the
    Authorization (op "policy") that approved it. The highest serial is in force; without any
    row the service uses ``QuorumPolicy.initial(k)`` with k from ``[quorum] min_approvals``."""

    __tablename__ = "service_quorum_policies"

    serial: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    authz: Mapped[bytes] = mapped_column(LargeBinary)
    adopted_at: Mapped[int] = mapped_column(BigInteger)


class RevocationFeedRow(ServiceBase):
    """The revocation feed (``agent.protocol.feed``): one row per entry, numbered from 1 with no
    gap; ``entry`` is its CBOR bytes (the revoke's Authorization and the hash of the entry
    before), ``hash`` its hash, the newest of which the signed head names."""

    __tablename__ = "service_revocation_feed"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    entry: Mapped[bytes] = mapped_column(LargeBinary)
    hash: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[int] = mapped_column(BigInteger)


class RevocationFeedSeen(ServiceBase):
    """How far each device's kept feed is, from its last ``keys.report`` (who lags)."""

    __tablename__ = "service_revocation_feed_seen"

    device_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    reported_at: Mapped[int] = mapped_column(BigInteger)


class AuditCheckpointRow(ServiceBase):
    """The signed audit checkpoints the service made (``provisioning.checkpoint``), one per
    chain length ``count``: ``signed`` is the COSE_Sign1 bytes, the other columns repeat what it
    says for queries. A row proves nothing by itself; the operator verifies ``signed``."""

    __tablename__ = "service_audit_checkpoints"

    count: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    head: Mapped[bytes] = mapped_column(LargeBinary(32))
    time: Mapped[int] = mapped_column(BigInteger)
    instance: Mapped[str] = mapped_column(String(ID_LENGTH))
    signed: Mapped[bytes] = mapped_column(LargeBinary)


class DeviceCertRow(ServiceBase):
    """Every certificate the device CA issued to a device (its DevID and its MQTT TLS client
    certificate, recorded at enrollment), by serial; ``revoked_at`` set when the device was
    revoked: the device CA's CRL lists every row that has it (``provisioning.revocation``)."""

    __tablename__ = "service_device_certs"

    serial: Mapped[str] = mapped_column(String(64), primary_key=True)  # hex, no leading zeros
    device_id: Mapped[str] = mapped_column(String(ID_LENGTH), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "devid" or "tls"
    not_after: Mapped[int] = mapped_column(BigInteger)
    issued_at: Mapped[int] = mapped_column(BigInteger)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True, index=True)
    reason: Mapped[str] = mapped_column(Text, default="")


class DeviceCrlRow(ServiceBase):
    """The device CA's CRLs, one row per CRL number (monotone: the primary key makes two
    instances issuing at once conflict, and the loser retries with the next number)."""

    __tablename__ = "service_device_crls"

    number: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    this_update: Mapped[int] = mapped_column(BigInteger)
    next_update: Mapped[int] = mapped_column(BigInteger)
    der: Mapped[bytes] = mapped_column(LargeBinary)


class CommitReportRow(ServiceBase):
    """A member's report that it cannot process the commit accepted in ``epoch`` of
    ``group_id`` (``group.commit_refused``): the commit's hash as the member saw it and the check
    it failed. One row per member and epoch; the service decides on them
    (``provisioning.service.recovery``) and drops them when it decided."""

    __tablename__ = "service_commit_reports"

    group_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    device_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    commit_hash: Mapped[bytes] = mapped_column(LargeBinary)
    check_id: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[int] = mapped_column(BigInteger)


class GroupPreviousRow(ServiceBase):
    """A group's public state before the commit made in ``epoch`` (its public tree and
    GroupContext): what a rollback of that commit restores. Written only by a commit that
    converts a row holding the whole state (``store.trees``); any other commit's rollback
    restores its undo rows and kept head (``GroupTreeUndoRow``, ``GroupTreeEpochRow``). Rows
    written by every commit before that change are still read. Public, like the ``groups`` row
    it shadows."""

    __tablename__ = "service_group_previous"

    group_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger)
    public_tree: Mapped[bytes] = mapped_column(LargeBinary)
    group_context: Mapped[bytes] = mapped_column(LargeBinary)


class GroupPreviousNodeRow(ServiceBase):
    """What ``group_tree_nodes`` held, before the commit of ``GroupPreviousRow``, at each node
    that commit rewrote (``data`` NULL: no row, a blank node). A rollback puts these back."""

    __tablename__ = "service_group_previous_nodes"

    group_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    node: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    data: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class GroupTreeUndoRow(ServiceBase):
    """What ``group_tree_nodes`` held at ``epoch``, at each node the commit accepted in that
    epoch rewrote (``data`` NULL: no row, a blank node): with the current rows, the tree of any
    epoch whose commits are still kept (``store.trees.load_at``, for joiners' tree pages), and
    what a rollback of the group's newest commit writes back (``store.wedge.roll_back``).
    Dropped with the commit log's retention, with a rollback of that commit, with the group."""

    __tablename__ = "service_group_tree_undo"

    group_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    node: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    data: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class GroupTreeEpochRow(ServiceBase):
    """A group's head (``store.trees.head``) and GroupContext at ``epoch``, kept when the commit
    made in that epoch was accepted: with ``GroupTreeUndoRow`` what rebuilds and checks the
    tree of an epoch the group has left. Dropped like those rows."""

    __tablename__ = "service_group_tree_epochs"

    group_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    head: Mapped[bytes] = mapped_column(LargeBinary)
    group_context: Mapped[bytes] = mapped_column(LargeBinary)


class RekeyPolicyRow(ServiceBase):
    """A group's rekey policy (``keyfleet group policy``): the longest a member may go without
    updating its own leaf, in seconds and in epochs (0: no bound); a group without a row follows
    the service's ``[groups]`` default (``provisioning.service.rekeypolicy``)."""

    __tablename__ = "service_rekey_policies"

    group_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    max_age: Mapped[int] = mapped_column(BigInteger)
    max_epochs: Mapped[int] = mapped_column(BigInteger)
    set_by: Mapped[str] = mapped_column(String(ID_LENGTH))
    set_at: Mapped[int] = mapped_column(BigInteger)


class LeafUpdateRow(ServiceBase):
    """A member's last self-update in a group: the epoch its leaf key took effect in (its
    commit's epoch + 1, or the epoch it joined at) and when; ``asked_at``: when the service last
    asked it for a self-update (NULL once it answered)."""

    __tablename__ = "service_leaf_updates"

    group_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)
    asked_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # when the rekey check next looks at the row, by the group's policy (NULL: not by time):
    # ``updated_at + max_age``, or once asked ``asked_at`` + the repeat interval
    due_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True, index=True)
    # the group epoch at which it is due by the epoch bound (NULL: not by epochs, or asked)
    due_epoch: Mapped[int | None] = mapped_column(BigInteger, nullable=True)

    __table_args__ = (Index("ix_service_leaf_updates_group_due_epoch", "group_id", "due_epoch"),)


class RekeyDefaultRow(ServiceBase):
    """The service's default rekey policy the due columns of ``LeafUpdateRow`` were computed
    with, for groups without their own (one row, ``id`` 1): the check recomputes those groups'
    rows when the configured default differs."""

    __tablename__ = "service_rekey_default"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    max_age: Mapped[int] = mapped_column(BigInteger)
    max_epochs: Mapped[int] = mapped_column(BigInteger)


class UpdateProposalRow(ServiceBase):
    """A member's Update proposal collected for a full rekey (``provisioning.service.fullrekey``):
    the job it answers (its request id), the epoch it was asked at, the member's leaf index and
    the encoded Update (public: a new leaf public key and a signature).
    ``requested_epoch``: the epoch of the commit request that carries it, NULL while none does;
    the row goes once a commit carrying it is accepted or the job ends."""

    __tablename__ = "service_update_proposals"

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)  # hex
    device_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    group_id: Mapped[str] = mapped_column(String(ID_LENGTH), index=True)
    epoch: Mapped[int] = mapped_column(BigInteger)
    leaf_index: Mapped[int] = mapped_column(BigInteger)
    proposal: Mapped[bytes] = mapped_column(LargeBinary)
    requested_epoch: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    received_at: Mapped[int] = mapped_column(BigInteger)


class ReleaseRow(ServiceBase):
    """A firmware release (``provisioning.service.releases``): ``manifest`` its canonical
    manifest (JSON: version and components {name, version, pcr, sha256}), ``manifest_sha256``
    its digest (hex), ``pcrs`` its expected PCR values (CBOR {pcr: value}, replayed from zero).
    ``state``: proposed | approved | revoked | expired. ``approval``/``revocation``: the
    Authorization bytes of the quorum request that approved/revoked it (``approval`` NULL and
    ``source`` "import": imported at first start from ``[attestation] golden_measurements``),
    with the quorum policy serial they were verified under. Readers verify them again: the row
    alone grants nothing."""

    __tablename__ = "service_releases"

    version: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    manifest: Mapped[bytes] = mapped_column(LargeBinary)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    pcrs: Mapped[bytes] = mapped_column(LargeBinary)
    state: Mapped[str] = mapped_column(String(16), index=True)
    source: Mapped[str] = mapped_column(String(16))
    proposed_by: Mapped[str] = mapped_column(String(ID_LENGTH))
    proposed_at: Mapped[int] = mapped_column(BigInteger)
    approved_by: Mapped[str | None] = mapped_column(Text, nullable=True)
    approved_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    approval: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    approval_serial: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    superseded_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    ended_by: Mapped[str | None] = mapped_column(Text, nullable=True)
    ended_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    revocation: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    revocation_serial: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class ReleaseStateRow(ServiceBase):
    """The fleet's release state, one row (id 1): ``seq`` grows on every change of the set of
    approved releases (instances re-read the golden policy when it moved), ``generation`` on
    every revocation or expiry; ``bundle`` the signed release bundle of that seq, if any."""

    __tablename__ = "service_release_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    generation: Mapped[int] = mapped_column(BigInteger)
    bundle: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    updated_at: Mapped[int] = mapped_column(BigInteger)


class DeviceReleaseRow(ServiceBase):
    """The release a device's latest trusted attestation matched (its quoted PCR values are the
    release's expected ones); ``version`` NULL: it matched none of the approved releases."""

    __tablename__ = "service_device_releases"

    device_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    version: Mapped[str | None] = mapped_column(String(ID_LENGTH), nullable=True)
    attested_at: Mapped[int] = mapped_column(BigInteger)


class RolloutRow(ServiceBase):
    """A staged rollout (``provisioning.service.rollout``): release ``version`` to the members of
    ``group_id`` in ``waves`` (JSON: lists of device ids, computed once at start), ``wave`` the
    index of the current one, started at ``wave_started_at`` (NULL: not started yet). ``state``:
    running | rolling-back | done | failed | timeout | rolled-back | aborted; ``reason`` and
    ``device`` say why it stopped. ``active_group``: the group while the rollout is not over,
    NULL after (unique: one rollout of a group at a time). ``command_id``/``operator``: the
    start command, whose operator is told the progress."""

    __tablename__ = "service_rollouts"

    rollout_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    version: Mapped[str] = mapped_column(String(ID_LENGTH))
    group_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    active_group: Mapped[str | None] = mapped_column(String(ID_LENGTH), unique=True, nullable=True)
    operator: Mapped[str] = mapped_column(String(ID_LENGTH))
    command_id: Mapped[bytes] = mapped_column(LargeBinary)
    rollback: Mapped[bool] = mapped_column(Boolean)
    state: Mapped[str] = mapped_column(String(16), index=True)
    waves: Mapped[str] = mapped_column(Text)
    wave: Mapped[int] = mapped_column(Integer)
    wave_started_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    device: Mapped[str | None] = mapped_column(String(ID_LENGTH), nullable=True)
    started_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class RolloutDeviceRow(ServiceBase):
    """One device of a rollout: its ``wave``, ``state`` (pending | checking | installing |
    attested | passed | failed | rolling-back | rolled-back), the release it attested on before
    the install (``previous``, what a rollback returns it to), when its install was sent
    (``sent_at``) and how often (``attempts``), when it was last challenged (``asked_at``),
    ``lost``: its agent restarted without the install (a keys.report without it),
    ``acked_at``: when it acked the group's current epoch after its trusted verdict, and
    ``detail``: the last thing learnt (a verdict, an install failure)."""

    __tablename__ = "service_rollout_devices"

    rollout_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, index=True)
    wave: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    previous: Mapped[str | None] = mapped_column(String(ID_LENGTH), nullable=True)
    sent_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer)
    asked_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    lost: Mapped[bool] = mapped_column(Boolean)
    acked_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)


class TrustBundleRow(ServiceBase):
    """The chain of trust bundles (``agent.protocol.trust``; docs/trust.md), one row per seq
    from 1 with no gap: ``link`` the bundle signed by the key of the bundle before, ``authz`` the
    admins' ``trust.rotate`` Authorization of it, ``key_ref`` the key reference (``pkcs11:`` URI
    or file) of the service signing key the bundle makes current: every instance signs with the
    newest row's key. Public data and a key's name, never key material."""

    __tablename__ = "service_trust_bundles"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    link: Mapped[bytes] = mapped_column(LargeBinary)
    authz: Mapped[bytes] = mapped_column(LargeBinary)
    key_ref: Mapped[str] = mapped_column(Text)
    created_at: Mapped[int] = mapped_column(BigInteger)


def create_service_schema(engine: Engine) -> None:
    """Create the runtime tables directly (tests that build a bare database; ``keyfleet db
    init`` runs the migrations instead)."""
    ServiceBase.metadata.create_all(engine)
