"""The fleet service's own database access: every query of the delivery service is here.

- ``ledger``: operator keys, per-sender replay state, operator command ids, attestation nonces
  and schedule, the envelope sequence counter, periodic task leases;
- ``inflight``: jobs, each group's in-flight slot, operations, held commit/welcome halves,
  ``op.attest`` commands waiting for their report;
- ``quorum``: dual-control requests and the adopted quorum policies, the Authorization an
  operation runs under;
- ``revocations``: the revocation feed's entries and how far each device follows it (imported
  as a module by ``provisioning.service.feed``);
- ``checkpoints``: the signed audit checkpoints;
- ``deletions``: deleted groups (when, the feed entry, their members at deletion; imported as
  a module by ``provisioning.service.groupdelete``);
- ``rekey``: each group's rekey policy and each member's last self-update (imported as a
  module by ``provisioning.service.rekeypolicy``);
- ``trustchain``: the chain of trust bundles (imported as a module by
  ``provisioning.service.trustroll``);
- ``fleet``: the service's reads and writes of registry tables (``last_seen``, acks at an
  epoch, the commit log's timing) that ``provisioning.registry`` has no method for.

The tables are in ``provisioning.db.runtime`` (and ``provisioning.db.schema``). Every step two
service instances could both take is a conditional write here whose row count names the one
winner (docs/scale-out.md). Nothing secret is stored: certificates, public-key ids, sequence
numbers, message ids, public MLS messages.
"""

from __future__ import annotations

from provisioning.service.store.checkpoints import (
    all_checkpoints,
    checkpoint_at,
    checkpoint_row,
    newest_checkpoint,
    newest_checkpoint_count,
    store_checkpoint,
)
from provisioning.service.store.fleet import (
    acked_at,
    commit_at,
    commit_ms,
    known_epoch,
    last_commit_at,
    load_ack_senders,
    load_senders,
    mark_heard,
    member_device_states,
    memberships,
    operator_key,
    task_lease,
)
from provisioning.service.store.inflight import (
    add_attest_operation,
    claim_nudge,
    drop_held,
    end_job,
    expired_attest_nonces,
    finish_operation,
    groups_with_open_jobs,
    head_job,
    hold_commit,
    hold_welcome,
    insert_job,
    insert_operation,
    job_by_request,
    job_from_row,
    link_job,
    load_operation,
    load_operations,
    open_adds_of,
    open_job_rows,
    open_jobs,
    open_multi_adds_naming,
    operation_type,
    pending_create,
    prune,
    save_job,
    save_progress,
    take_attest_operation,
    take_held_commit,
    take_held_welcome,
    take_slot,
    touch_operation,
)
from provisioning.service.store.ledger import (
    REPLAY_WINDOW,
    AttestCandidate,
    attest_due,
    claim_challenge_slot,
    claim_task,
    command_seen,
    consume_challenge,
    defer_attestation,
    finish_task,
    forget_challenges,
    issue_challenge,
    load_guard,
    lock_guard,
    lock_guards,
    open_challenges,
    operator_by_kid,
    operator_replay_window,
    put_operator_key,
    record_command,
    reserve_seqs,
    save_guard,
)
from provisioning.service.store.quorum import (
    StoredRequest,
    adopt_policy,
    adopted_policies,
    expired_requests,
    insert_request,
    load_request,
    open_requests,
    operation_authz,
    recent_requests,
    save_request,
    set_operation_authz,
)

__all__ = [
    "all_checkpoints",
    "checkpoint_at",
    "checkpoint_row",
    "newest_checkpoint",
    "newest_checkpoint_count",
    "store_checkpoint",
    "REPLAY_WINDOW",
    "StoredRequest",
    "acked_at",
    "last_commit_at",
    "add_attest_operation",
    "adopt_policy",
    "adopted_policies",
    "claim_challenge_slot",
    "claim_nudge",
    "claim_task",
    "command_seen",
    "commit_at",
    "commit_ms",
    "consume_challenge",
    "drop_held",
    "end_job",
    "expired_attest_nonces",
    "expired_requests",
    "finish_operation",
    "finish_task",
    "forget_challenges",
    "groups_with_open_jobs",
    "head_job",
    "hold_commit",
    "hold_welcome",
    "insert_job",
    "insert_operation",
    "insert_request",
    "issue_challenge",
    "job_by_request",
    "job_from_row",
    "known_epoch",
    "AttestCandidate",
    "attest_due",
    "defer_attestation",
    "link_job",
    "load_ack_senders",
    "load_guard",
    "load_operation",
    "load_operations",
    "load_request",
    "load_senders",
    "lock_guard",
    "lock_guards",
    "mark_heard",
    "member_device_states",
    "memberships",
    "open_adds_of",
    "open_challenges",
    "open_job_rows",
    "open_jobs",
    "open_multi_adds_naming",
    "operation_type",
    "open_requests",
    "operation_authz",
    "operator_by_kid",
    "operator_key",
    "operator_replay_window",
    "pending_create",
    "prune",
    "put_operator_key",
    "recent_requests",
    "record_command",
    "reserve_seqs",
    "save_guard",
    "save_job",
    "save_progress",
    "save_request",
    "set_operation_authz",
    "take_attest_operation",
    "take_held_commit",
    "take_held_welcome",
    "take_slot",
    "task_lease",
    "touch_operation",
]
