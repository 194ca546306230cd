"""Deleting a group (docs/operations.md, "Deleting a group"; docs/authorization.md, "Deleted
groups").

A ``group.delete`` request names the group and no members; admins propose and approve it and
it runs once the quorum policy's k for ``group.delete`` on that group approved
(``provisioning.service.requests``). Then, in the transaction that executes the request
(``execute``):

- the request's Authorization becomes the next entry of the revocation feed
  (``provisioning.service.feed``), whose new head is published (signed, retained): devices
  verify the quorum themselves and a member destroys the group's epoch secrets, data keys and
  leaf key (``agent.core``);
- the group is marked deleted (``groups.deleted_at``, ``deleted_seq``: the entry's number) and
  its members move to ``group_deleted_members``; its queued and in-flight jobs fail with
  ``ds.group.deleted`` (their operations end ``failed``), held commit/Welcome halves are dropped;
- an operation ``op.group_delete`` starts whose progress is the members' feed reports: a member
  whose ``keys.report`` shows a feed at or past the deletion's entry has destroyed the group's
  keys (``view``; ``provisioning.service.operations`` reports it like acks: counts, then
  ``done``, or ``timeout`` naming the stragglers).

From then on every commit, Welcome, add, removal, rekey, rotation request, rekey policy or
key package for the group is refused with ``ds.group.deleted`` (``check_live``), changing
nothing, and its id is never used again (a ``group.create`` of it is refused too). The
service alone cannot delete a group on the devices: they accept the feed entry only with the
quorum's approvals of a ``group.delete`` of that group.
"""

from __future__ import annotations

import logging
from typing import Final

from sqlalchemy.orm import Session

from agent.protocol.errors import ProtocolError
from provisioning import audit
from provisioning.registry import Outcome, Registry
from provisioning.service import feed, store
from provisioning.service.context import Call
from provisioning.service.effects import Accepted, Effects, Log, Progress
from provisioning.service.model import JobState, Operation
from provisioning.service.store import deletions
from provisioning.service.store import rekey as rekey_rows
from provisioning.service.store.quorum import StoredRequest

log = logging.getLogger("keyfleet.service")

OPERATION_TYPE: Final = "op.group_delete"
"""The operation a group's deletion starts (its progress: the members' feed reports)."""


def check_live(session: Session, group_id: str) -> None:
    """Raises ``ds.group.deleted`` if the operators deleted ``group_id``."""
    seq = deletions.deleted_seq(session, group_id)
    if seq is not None:
        raise ProtocolError(
            "ds.group.deleted",
            f"group {group_id!r} was deleted by the operators (revocation feed entry {seq})",
        )


def check(session: Session, group_id: str) -> None:
    """Raises unless ``group_id`` can be deleted now: it exists, is not deleted, and is not
    being created (``registry.group.unknown``, ``ds.group.deleted``, ``registry.group.exists``)."""
    check_live(session, group_id)
    Registry(session).group(group_id)


def execute(
    cx: Call,
    session: Session,
    stored: StoredRequest,
    authorization: bytes,
    *,
    operator: str,
    command_id: bytes,
    now: int,
) -> Effects:
    """The quorum approved the deletion of ``stored.group_id`` (``authorization`` verified by
    the caller as a ``group.delete`` of it): append it to the feed, mark the group deleted,
    fail its open jobs, start the operation that follows the members. Raises before writing
    anything if the group cannot be deleted (the caller refuses the request)."""
    group_id = stored.group_id
    assert group_id is not None  # a group.delete Request names its group
    check(session, group_id)
    seq = feed.append(session, authorization, now=now)
    members = deletions.mark_deleted(session, group_id, seq=seq, now=now)
    rekey_rows.clear_due(session, group_id)  # the rekey policy asks its members no more
    failed: set[bytes] = set()
    jobs = store.open_jobs(session, group_id)
    for job in jobs:
        job.detail = f"[ds.group.deleted] group {group_id!r} was deleted by the operators"
        if store.end_job(session, job, JobState.FAILED) and job.command_id is not None:
            failed.add(job.command_id)
    stored.command_id = command_id
    audit.append(
        session,
        now=now,
        actor=f"operator:{operator}",
        action=OPERATION_TYPE,
        target=group_id,
        outcome=Outcome.ACCEPTED,
        details={
            "command_id": command_id.hex(),
            "request_id": stored.request_id.hex(),
            "approvers": ",".join(stored.approvers),
            "feed_seq": seq,
            "members": len(members),
            "jobs_failed": len(jobs),
            "at_ms": cx.clock.ms,
        },
    )
    operation = Operation(
        command_id=command_id,
        operator=operator,
        type=OPERATION_TYPE,
        target=group_id,
        groups={group_id},
        jobs=[],
        last_progress=now,
    )
    store.insert_operation(session, operation, now=now, instance=cx.env.instance)
    return [
        Log(
            logging.WARNING,
            "group %s deleted (revocation feed entry %d; %d member(s) to destroy its keys)",
            (group_id, seq, len(members)),
        ),
        *feed.publish_head(session, now=now),
        Accepted(
            operation, f"revocation feed entry {seq}; {len(members)} member(s) destroy its keys"
        ),
        *(Progress(c) for c in sorted(failed)),
        Progress(command_id),
    ]


def view(session: Session, group_id: str) -> tuple[list[str], list[str], int]:
    """(done, pending, the deletion's feed entry): the members at deletion whose last
    ``keys.report`` showed a feed at or past the entry, and the others."""
    seq = deletions.deleted_seq(session, group_id)
    if seq is None:  # pragma: no cover - the operation exists only for a deleted group
        return [], [], 0
    reached = deletions.reached(session, group_id, seq)
    everyone = deletions.members(session, group_id)
    return (
        [d for d in everyone if d in reached],
        [d for d in everyone if d not in reached],
        seq,
    )


def any_open(session: Session) -> bool:
    """Whether any group deletion is in progress (``on_feed_report``'s ``any_open``)."""
    return deletions.any_open_operation(session, OPERATION_TYPE)


def on_feed_report(
    session: Session, device_id: str, seq: int | None, *, any_open: bool = True
) -> Effects:
    """A device's ``keys.report`` shows its feed at ``seq``: the deletions it completes report
    progress. ``any_open`` False: the caller found no deletion open in this transaction."""
    if seq is None or not any_open:
        return []
    reached = deletions.open_operations_reached(session, device_id, seq, OPERATION_TYPE)
    return [Progress(command_id) for command_id in reached]
