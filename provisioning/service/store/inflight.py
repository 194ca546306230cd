"""The shared state of group changes in flight: jobs (``service_jobs``), each group's one
in-flight slot (``service_group_slots``), operator operations (``service_operations``), held
commit/welcome halves (``service_held``) and ``op.attest`` commands waiting for their report
(``service_attest_operations``).

Every write another instance could make at the same time is a conditional UPDATE or DELETE
whose row count says who won (docs/scale-out.md): ``save_job`` (compare-and-set on the job's
version), ``end_job``, ``take_slot``, ``take_held``, ``take_attest_operation``,
``claim_nudge``, ``finish_operation``. Callers act only on a True / a returned row.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Final

from sqlalchemy import bindparam, case, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from agent.protocol.wire.messages.group import CommitMessage, WelcomeMessage
from agent.protocol.wire.messages.service import CommitAction
from provisioning.db.engine import RetryableConflict, rowcount, table_of
from provisioning.db.runtime import (
    AttestOperationRow,
    GroupSlot,
    HeldMessage,
    JobRow,
    OperationRow,
)
from provisioning.service.model import TERMINAL, AttestOperation, Job, JobState, Operation

# -- jobs and the group slot ------------------------------------------------------------------


def job_from_row(row: JobRow) -> Job:
    return Job(
        action=CommitAction(row.action),
        group_id=row.group_id,
        member=row.member,
        request_id=bytes.fromhex(row.request_id),
        command_id=None if row.command_id is None else bytes.fromhex(row.command_id),
        persistent=bool(row.persistent),
        candidates=tuple(c for c in row.candidates.split(",") if c),
        prefer=row.prefer,
        state=JobState(row.state),
        key_package=row.key_package,
        committer=row.committer,
        tried=[t for t in row.tried.split(",") if t],
        request_epoch=row.request_epoch,
        deadline=row.deadline,
        detail=row.detail,
        id=row.id,
        version=row.version,
        claimed_by=row.claimed_by,
        lease_until=row.deadline,
    )


def _job_values(job: Job) -> dict[str, object]:
    return {
        "state": job.state.value,
        "key_package": job.key_package,
        "committer": job.committer,
        "tried": ",".join(job.tried),
        "request_epoch": job.request_epoch,
        "deadline": job.deadline,
        "detail": job.detail[:1000],
        # a multi-add leaves out joiners that became members before it started (bulkadd)
        "candidates": ",".join(job.candidates),
    }


def insert_job(session: Session, job: Job, now: int) -> None:
    row = JobRow(
        request_id=job.request_id.hex(),
        group_id=job.group_id,
        action=job.action.value,
        member=job.member,
        command_id=None if job.command_id is None else job.command_id.hex(),
        persistent=job.persistent,
        prefer=job.prefer,
        claimed_by=None,
        version=0,
        created_at=now,
        **_job_values(job),
    )
    session.add(row)
    session.flush()
    job.id = row.id


def link_job(session: Session, job: Job, command_id: bytes) -> None:
    """Attach an already inserted job to the operation ``command_id``."""
    job.command_id = command_id
    session.execute(
        update(JobRow)
        .where(JobRow.id == job.id)
        .values(command_id=command_id.hex())
        .execution_options(synchronize_session=False)
    )


def save_job(session: Session, job: Job, instance: str) -> bool:
    """Compare-and-set: write ``job`` if its row still has the version it was read at."""
    result = session.execute(
        update(JobRow)
        .where(
            JobRow.id == job.id,
            JobRow.version == job.version,
            JobRow.state.not_in(sorted(TERMINAL)),
        )
        .values(version=job.version + 1, claimed_by=instance, **_job_values(job))
        .execution_options(synchronize_session=False)
    )
    if rowcount(result) != 1:
        return False
    job.version += 1
    job.claimed_by = instance
    return True


def end_job(session: Session, job: Job, state: JobState) -> bool:
    """Move an open job to a terminal state and free its group's slot; False if it had ended
    already (another instance ended it)."""
    result = session.execute(
        update(JobRow)
        .where(JobRow.id == job.id, JobRow.state.not_in(sorted(TERMINAL)))
        .values(state=state.value, detail=job.detail[:1000], version=JobRow.version + 1)
        .execution_options(synchronize_session=False)
    )
    if rowcount(result) != 1:
        return False
    session.execute(
        update(GroupSlot)
        .where(GroupSlot.group_id == job.group_id, GroupSlot.job_id == job.id)
        .values(job_id=None)
        .execution_options(synchronize_session=False)
    )
    job.state = state
    return True


def take_slot(session: Session, job: Job) -> bool:
    """Hold the group's one in-flight slot for ``job`` (it may hold it already)."""
    open_jobs = select(JobRow.id).where(JobRow.state.not_in(sorted(TERMINAL)))
    result = session.execute(
        update(GroupSlot)
        .where(
            GroupSlot.group_id == job.group_id,
            (GroupSlot.job_id.is_(None))
            | (GroupSlot.job_id == job.id)
            # a holder that ended without freeing the slot (it cannot, by construction; this
            # keeps a group from being stuck forever if it ever did)
            | GroupSlot.job_id.not_in(open_jobs),
        )
        .values(job_id=job.id)
        .execution_options(synchronize_session=False)
    )
    if rowcount(result) == 1:
        return True
    if session.get(GroupSlot, job.group_id) is not None:
        return False  # another job of the group is in flight
    session.add(GroupSlot(group_id=job.group_id, job_id=job.id))
    try:
        session.flush()
    except IntegrityError:
        raise RetryableConflict(f"the slot of {job.group_id!r} was created concurrently") from None
    return True


def open_job_rows(session: Session, group_id: str) -> list[JobRow]:
    return list(
        session.scalars(
            select(JobRow)
            .where(JobRow.group_id == group_id, JobRow.state.not_in(sorted(TERMINAL)))
            .order_by(JobRow.id)
        )
    )


def open_jobs(session: Session, group_id: str) -> list[Job]:
    return [job_from_row(row) for row in open_job_rows(session, group_id)]


def groups_with_open_jobs(session: Session) -> list[str]:
    return list(
        session.scalars(
            select(JobRow.group_id)
            .where(JobRow.state.not_in(sorted(TERMINAL)))
            .distinct()
            .order_by(JobRow.group_id)
        )
    )


def head_job(session: Session, group_id: str) -> Job | None:
    """The group's job in flight (the slot holder), else its oldest queued job: one query."""
    row = session.scalar(_HEAD_JOB, {"group": group_id})
    return None if row is None else job_from_row(row)


# built once (every commit reads it): its cache key is computed once, not per execution
_HEAD_JOB: Final = (
    select(JobRow)
    .where(JobRow.group_id == bindparam("group"), JobRow.state.not_in(sorted(TERMINAL)))
    .order_by(
        case(
            (
                JobRow.id
                == select(GroupSlot.job_id)
                .where(GroupSlot.group_id == bindparam("group"))
                .scalar_subquery(),
                0,
            ),
            else_=1,
        ),
        JobRow.id,
    )
    .limit(1)
)


def pending_create(session: Session, group_id: str) -> bool:
    return any(row.action == CommitAction.CREATE.value for row in open_job_rows(session, group_id))


def job_by_request(session: Session, request_id: bytes) -> Job | None:
    row = session.scalar(select(JobRow).where(JobRow.request_id == request_id.hex()))
    return None if row is None else job_from_row(row)


def open_adds_of(session: Session, device_id: str) -> list[Job]:
    return [
        job_from_row(r)
        for r in session.scalars(
            select(JobRow).where(
                JobRow.member == device_id,
                JobRow.action == CommitAction.ADD.value,
                JobRow.state.not_in(sorted(TERMINAL)),
            )
        )
    ]


def open_multi_adds_naming(session: Session, device_id: str) -> list[Job]:
    """Open multi-adds (adds without a member, ``bulkadd``) whose joiners include ``device_id``."""
    rows = session.scalars(
        select(JobRow).where(
            JobRow.member.is_(None),
            JobRow.action == CommitAction.ADD.value,
            JobRow.state.not_in(sorted(TERMINAL)),
            JobRow.candidates.contains(device_id),
        )
    )
    jobs = (job_from_row(r) for r in rows)
    return [job for job in jobs if device_id in job.candidates]


def operation_type(session: Session, command_id: bytes) -> str | None:
    """The type of the operation ``command_id`` (``op.group_create``...), None if unknown."""
    return session.scalar(
        select(OperationRow.type).where(OperationRow.command_id == command_id.hex())
    )


def prune(session: Session, *, held_before: int, operations_before: int) -> None:
    """Held halves received before ``held_before``, ended jobs of ended operations (or of
    none), operations finished before ``operations_before``."""
    session.execute(delete(HeldMessage).where(HeldMessage.received_at < held_before))
    finished = select(OperationRow.command_id).where(OperationRow.finished_at.is_not(None))
    session.execute(
        delete(JobRow).where(
            JobRow.state.in_(sorted(TERMINAL)),
            (JobRow.command_id.is_(None)) | JobRow.command_id.in_(finished),
        )
    )
    # An operation whose job is still open (a persistent removal outliving its operation's
    # timeout) stays: its commit requests carry the operation's Authorization.
    still_open = select(JobRow.command_id).where(
        JobRow.state.not_in(sorted(TERMINAL)), JobRow.command_id.is_not(None)
    )
    session.execute(
        delete(OperationRow).where(
            OperationRow.finished_at < operations_before,
            OperationRow.command_id.not_in(still_open),
        )
    )


# -- operations -------------------------------------------------------------------------------


def _tuple3(value: object) -> tuple[int | None, int, int] | None:
    if not isinstance(value, list) or len(value) != 3:
        return None
    first, total, acked = value
    return (first if isinstance(first, int) else None, int(total), int(acked))


def _operation_from_row(session: Session, row: OperationRow) -> Operation:
    jobs = [
        job_from_row(j)
        for j in session.scalars(
            select(JobRow).where(JobRow.command_id == row.command_id).order_by(JobRow.id)
        )
    ]
    throttle = json.loads(row.throttle) if row.throttle else [None, None, None, None, False]
    sent_at, step, counts, seen, deferred = throttle
    return Operation(
        command_id=bytes.fromhex(row.command_id),
        operator=row.operator,
        type=row.type,
        target=row.target,
        groups={g for g in row.groups.split(",") if g},
        jobs=jobs,
        last_progress=row.last_progress,
        finished=row.finished_at is not None,
        last_sent=row.last_sent,
        acks_sent_at=sent_at if isinstance(sent_at, int) else None,
        acks_step=_tuple3(step),
        acks_counts=_tuple3(counts),
        acks_seen=_tuple3(seen),
        acks_deferred=bool(deferred),
    )


def insert_operation(session: Session, operation: Operation, *, now: int, instance: str) -> None:
    session.add(
        OperationRow(
            command_id=operation.command_id.hex(),
            operator=operation.operator,
            type=operation.type,
            target=operation.target,
            groups="," + ",".join(sorted(operation.groups)) + ",",
            last_progress=now,
            created_at=now,
            accepted_by=instance,
        )
    )
    session.flush()


def load_operation(session: Session, command_id: bytes) -> Operation | None:
    row = session.get(OperationRow, command_id.hex())
    return None if row is None else _operation_from_row(session, row)


def load_operations(session: Session, group_id: str | None) -> list[Operation]:
    """Unfinished operations (touching ``group_id``, if given), with their jobs."""
    query = select(OperationRow).where(OperationRow.finished_at.is_(None))
    if group_id is not None:
        query = query.where(OperationRow.groups.contains(f",{group_id},"))
    return [_operation_from_row(session, row) for row in session.scalars(query)]


def touch_operation(session: Session, command_id: bytes, now: int) -> None:
    """``last_progress`` moves forward only."""
    session.execute(
        update(OperationRow)
        .where(OperationRow.command_id == command_id.hex(), OperationRow.last_progress < now)
        .values(last_progress=now)
        .execution_options(synchronize_session=False)
    )


def save_progress(session: Session, operation: Operation) -> None:
    """The operation's reporting state (what it last told the operator, the ack throttle).
    Last writer wins: two instances reporting at once at worst repeat a progress line."""
    values = {
        "last_sent": operation.last_sent,
        "throttle": json.dumps(
            [
                operation.acks_sent_at,
                operation.acks_step,
                operation.acks_counts,
                operation.acks_seen,
                operation.acks_deferred,
            ]
        ),
    }
    key = operation.command_id.hex()
    session.execute(
        update(OperationRow)
        .where(OperationRow.command_id == key)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(OperationRow)
        .where(
            OperationRow.command_id == key,
            OperationRow.last_progress < operation.last_progress,
        )
        .values(last_progress=operation.last_progress)
        .execution_options(synchronize_session=False)
    )


def claim_nudge(session: Session, command_id: bytes, *, now: int, interval: int) -> bool:
    """Once per ``interval`` per unfinished operation fleet-wide: True for the one claimer."""
    claimed = session.execute(
        update(OperationRow)
        .where(
            OperationRow.command_id == command_id.hex(),
            OperationRow.finished_at.is_(None),
            (OperationRow.nudged_at.is_(None)) | (OperationRow.nudged_at <= now - interval),
        )
        .values(nudged_at=now)
        .execution_options(synchronize_session=False)
    )
    return rowcount(claimed) == 1


def finish_operation(session: Session, command_id: bytes, *, now: int) -> bool:
    """Set ``finished_at`` once fleet-wide: True for the instance that did."""
    result = session.execute(
        update(OperationRow)
        .where(OperationRow.command_id == command_id.hex(), OperationRow.finished_at.is_(None))
        .values(finished_at=now)
        .execution_options(synchronize_session=False)
    )
    return rowcount(result) == 1


# -- held commit/welcome halves ---------------------------------------------------------------


def hold_commit(session: Session, sender: str, body: CommitMessage, *, now: int) -> None:
    session.merge(
        HeldMessage(
            group_id=body.group_id,
            epoch=body.epoch,
            sender=sender,
            kind="commit",
            data=body.commit,
            extra="" if body.command_id is None else body.command_id.hex(),
            received_at=now,
        )
    )


def hold_welcome(
    session: Session, sender: str, body: WelcomeMessage, *, commit_epoch: int, now: int
) -> None:
    session.merge(
        HeldMessage(
            group_id=body.group_id,
            epoch=commit_epoch,
            sender=sender,
            kind="welcome",
            data=body.welcome,
            extra=",".join(body.new_members),
            received_at=now,
        )
    )


def _take_held(
    session: Session, group_id: str, epoch: int, sender: str, kind: str
) -> HeldMessage | None:
    key = (group_id, epoch, sender, kind)
    row = session.get(HeldMessage, key)
    if row is None:
        return None
    result = session.execute(
        delete(HeldMessage).where(
            HeldMessage.group_id == group_id,
            HeldMessage.epoch == epoch,
            HeldMessage.sender == sender,
            HeldMessage.kind == kind,
        )
    )
    return row if rowcount(result) == 1 else None


def take_held_commit(
    session: Session, group_id: str, epoch: int, sender: str
) -> CommitMessage | None:
    row = _take_held(session, group_id, epoch, sender, "commit")
    if row is None:
        return None
    command_id = bytes.fromhex(row.extra) if row.extra else None
    return CommitMessage(group_id, epoch, row.data, command_id)


def take_held_welcome(
    session: Session, group_id: str, epoch: int, sender: str
) -> WelcomeMessage | None:
    row = _take_held(session, group_id, epoch, sender, "welcome")
    if row is None:
        return None
    members = tuple(m for m in row.extra.split(",") if m)
    return WelcomeMessage(group_id, epoch + 1, row.data, members)


def drop_held(session: Session, group_id: str, epoch: int) -> None:
    """Every held half for an epoch that now has its accepted commit."""
    session.execute(_DROP_HELD, {"group": group_id, "epoch": epoch})


_HELD = table_of(HeldMessage)
_DROP_HELD: Final = delete(_HELD).where(
    _HELD.c.group_id == bindparam("group"), _HELD.c.epoch == bindparam("epoch")
)


# -- op.attest waiting for its report ---------------------------------------------------------


def add_attest_operation(session: Session, operation: AttestOperation) -> None:
    session.add(
        AttestOperationRow(
            nonce=operation.nonce.hex(),
            command_id=operation.command_id.hex(),
            operator=operation.operator,
            device_id=operation.device_id,
            deadline=operation.deadline,
        )
    )


def expired_attest_nonces(session: Session, *, now: int) -> list[bytes]:
    return [
        bytes.fromhex(nonce)
        for nonce in session.scalars(
            select(AttestOperationRow.nonce).where(AttestOperationRow.deadline <= now)
        )
    ]


def attest_operation_nonces(session: Session, nonces: Iterable[bytes]) -> set[bytes]:
    """Which of ``nonces`` an operator's ``op.attest`` waits for (one query for a batch of
    answers; ``take_attest_operation`` then takes each of those alone)."""
    keys = sorted({nonce.hex() for nonce in nonces})
    if not keys:
        return set()
    return {
        bytes.fromhex(nonce)
        for nonce in session.scalars(
            select(AttestOperationRow.nonce).where(AttestOperationRow.nonce.in_(keys))
        )
    }


def take_attest_operation(session: Session, nonce: bytes) -> AttestOperation | None:
    row = session.get(AttestOperationRow, nonce.hex())
    if row is None:
        return None
    result = session.execute(
        delete(AttestOperationRow).where(AttestOperationRow.nonce == nonce.hex())
    )
    if rowcount(result) != 1:
        return None
    return AttestOperation(
        bytes.fromhex(row.command_id), row.operator, row.device_id, nonce, row.deadline
    )
