"""Operations: an operator's group command in flight (``service_operations``) and what the
operator is told about it — ``accepted`` (queued behind N earlier changes, if so), progress of
its jobs, then of the members' acks, and one final result: ``done`` when every member acked the
same epoch authenticator, ``failed`` (a job failed, or the members forked), ``timeout`` when
the operation made no progress for ``ack_timeout`` seconds (naming the stragglers).

Any instance may load an operation and report its progress. Ending it happens once fleet-wide:
the instance whose conditional UPDATE sets ``finished_at`` audits the outcome in the same
transaction and tells the operator (``finish``). Acks that stop coming are nudged: the epoch's
commit is sent again to each straggler, once per ``commit_request_timeout`` fleet-wide
(``nudge``), which recovers acks lost with an instance that died holding them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence

from sqlalchemy.orm import Session

from agent.protocol.errors import ProtocolError
from agent.protocol.topics import device_cmd_topic, operator_result_topic
from agent.protocol.wire import cbor
from agent.protocol.wire.messages.group import CommitMessage
from agent.protocol.wire.messages.result import OperatorResult, ResultStatus
from provisioning import audit
from provisioning.registry import Outcome, Registry
from provisioning.service import bulkadd, groupdelete, jobs, store
from provisioning.service.context import Call
from provisioning.service.model import JobState, Operation

log = logging.getLogger("keyfleet.service")


def tick_operations(cx: Call, now: int) -> None:
    """Operations without progress for ``ack_timeout`` end in ``timeout``; a held-back ack view
    goes out; stragglers of a quiet operation are nudged."""
    for operation in load_operations(cx, None):
        if now - operation.last_progress >= cx.env.settings.ack_timeout:
            time_out(cx, operation, now)
        else:
            if operation.acks_deferred:
                progress(cx, operation, now)  # an ack view the throttle held back
            if now - operation.last_progress >= cx.env.settings.commit_request_timeout:
                nudge(cx, operation, now)


def sent_key(kind: str, *parts: object) -> str:
    digest = hashlib.sha256(json.dumps(parts, default=list).encode()).hexdigest()[:32]
    return f"{kind}:{digest}"


def progress_state(operation: Operation) -> tuple[object, ...]:
    """What is worth a write when it changes: what the operator was told and the throttle's
    send state; ``last_progress`` only moves in whole seconds (at most a write a second). The
    per-ack ``acks_seen`` is left out on purpose: another instance that reads an older one just
    counts the difference as progress, which it is."""
    return (
        operation.last_sent,
        operation.last_progress,
        operation.acks_sent_at,
        operation.acks_step,
        operation.acks_counts,
        operation.acks_deferred,
    )


def load_operation(cx: Call, command_id: bytes) -> Operation | None:
    operation = cx.env.read(lambda s: store.load_operation(s, command_id))
    return None if operation is None or operation.finished else operation


def load_operations(cx: Call, group_id: str | None) -> list[Operation]:
    """Unfinished operations (touching ``group_id``, if given), with their jobs."""
    return cx.env.read(lambda s: store.load_operations(s, group_id))


def save_progress(cx: Call, operation: Operation) -> None:
    """The operation's reporting state (``store.save_progress``: last writer wins)."""
    cx.env.tx(lambda s: store.save_progress(s, operation))


ENVELOPE_ROOM = 1024
"""What a result's envelope (type, sender, recipient, sequence, time) and COSE signature add
to its body, at most: a body larger than its type's frame limit minus this is not sent."""


def build_result(
    operation: Operation,
    status: ResultStatus,
    detail: str,
    *,
    acked: Sequence[str] = (),
    pending: Sequence[str] = (),
    epoch: int | None = None,
) -> OperatorResult:
    """The ``op.result`` body, checked against its frame limit. Raises ``ProtocolError``
    (the body's own check, or ``wire.oversize``) when it cannot be built: the caller ends
    the operation ``failed`` instead (``ds.result.build``), so the operator is told why
    rather than waiting for a timeout."""
    body = OperatorResult.of(
        operation.command_id, status, detail[:1000], acked=acked, pending=pending, epoch=epoch
    )
    size = len(cbor.encode(body.to_cbor_map()))
    if size > OperatorResult.MAX_MESSAGE_SIZE - ENVELOPE_ROOM:
        raise ProtocolError(
            "wire.oversize",
            f"{status.value} result of {size} bytes exceeds {OperatorResult.MAX_MESSAGE_SIZE}",
        )
    return body


def unbuildable(status: ResultStatus, err: ProtocolError) -> str:
    """The reason an operation ends ``failed`` when its ``status`` result cannot be built."""
    return f"[ds.result.build] the {status.value} result could not be built: {err}"


def result(
    cx: Call,
    operation: Operation,
    status: ResultStatus,
    detail: str,
    *,
    acked: Sequence[str] = (),
    pending: Sequence[str] = (),
    epoch: int | None = None,
    now: int,
) -> None:
    """Tell the operator about a step of the operation (not its end: ``finish``). A result
    that cannot be built ends the operation ``failed`` with the reason, audited."""
    try:
        body = build_result(operation, status, detail, acked=acked, pending=pending, epoch=epoch)
    except ProtocolError as err:
        log.error("%s on %s: %s", operation.type, operation.target, unbuildable(status, err))
        finish(cx, operation, ResultStatus.FAILED, unbuildable(status, err), now)
        return
    cx.send(operator_result_topic(operation.operator), body, to=operation.operator, now=now)


def ack_view(cx: Call, operation: Operation) -> tuple[list[str], list[str], int | None, bool]:
    """(acked, pending, epoch, forked) over the operation's groups at their current epochs."""

    if operation.type == groupdelete.OPERATION_TYPE:
        # a deletion: done where the member's feed reached the deletion's entry
        done, waiting, _ = cx.env.read(lambda s: groupdelete.view(s, operation.target))
        return done, waiting, None, False

    def work(session: Session) -> tuple[list[str], list[str], int | None, bool]:
        registry = Registry(session)
        acked: set[str] = set()
        pending: set[str] = set()
        epoch: int | None = None
        forked = False
        for group_id in sorted(operation.groups):
            try:
                status = registry.ack_status(group_id)
            except ProtocolError:
                continue
            epoch = status.epoch
            if status.epoch == 0:
                acked.update(status.members)  # the founder alone: nothing to agree on
                continue
            for devices in status.by_authenticator.values():
                acked.update(devices)
            pending.update(status.stragglers)
            forked = forked or len(status.by_authenticator) > 1
        return sorted(acked), sorted(pending), epoch, forked

    return cx.env.read(work)


def progress(cx: Call, operation: Operation, now: int) -> None:
    if operation.finished:
        return
    before = progress_state(operation)
    progress_step(cx, operation, now)
    if not operation.finished and progress_state(operation) != before:
        save_progress(cx, operation)


def progress_step(cx: Call, operation: Operation, now: int) -> None:
    failed = [j for j in operation.jobs if j.state is JobState.FAILED]
    if failed:
        finish(
            cx,
            operation,
            ResultStatus.FAILED,
            "; ".join(f"{j.describe()}: {j.detail}" for j in failed),
            now,
        )
        return
    open_jobs = [j for j in operation.jobs if j.state is not JobState.DONE]
    if open_jobs:
        job = open_jobs[0]
        if job.state is JobState.KEY_PACKAGE and bulkadd.is_multi(job):
            wanted = bulkadd.missing(job)
            stage = f"waiting for {len(wanted)} key packages ({', '.join(wanted[:5])}...)"
        elif job.state is JobState.KEY_PACKAGE:
            stage = f"waiting for the key package of {job.member}"
        elif job.state is JobState.REQUESTED:
            stage = f"commit requested from {job.committer}"
        elif job.state is JobState.WAITING and len(job.candidates) > 1:
            stage = "waiting for the members to reach the current epoch"
        elif job.state is JobState.WAITING:
            stage = "waiting for a member at the current epoch"
        else:
            stage = "queued"
        done = len(operation.jobs) - len(open_jobs)
        detail = f"{done}/{len(operation.jobs)} committed; {job.describe()}: {stage}"
        key = sent_key("jobs", detail)
        if key != operation.last_sent:
            operation.last_sent = key
            result(cx, operation, ResultStatus.IN_PROGRESS, detail, now=now)
        return
    if operation.type == groupdelete.OPERATION_TYPE:
        deletion_step(cx, operation, now)
        return
    if ack_counts_unchanged_or_held(cx, operation, now):
        return
    acked, pending, epoch, forked = ack_view(cx, operation)
    if not pending and not forked:
        finish(
            cx,
            operation,
            ResultStatus.DONE,
            f"every member agrees on epoch {epoch}",
            now,
            acked=acked,
            epoch=epoch,
        )
        return
    if not pending and forked:
        finish(
            cx,
            operation,
            ResultStatus.FAILED,
            f"members acked epoch {epoch} with different epoch authenticators (fork)",
            now,
            acked=acked,
            epoch=epoch,
        )
        return
    key = sent_key("acks", acked, pending, epoch)
    if key != operation.last_sent:
        if operation.last_sent.startswith("acks:"):
            operation.last_progress = max(operation.last_progress, now)
        total = len(acked) + len(pending)
        if not ack_progress_due(operation, epoch, total, len(acked), now):
            operation.acks_deferred = True
            return
        operation.last_sent = key
        operation.acks_sent_at = now
        operation.acks_step = ack_step(epoch, total, len(acked))
        operation.acks_counts = (epoch, total, len(acked))
        operation.acks_seen = operation.acks_counts
        operation.acks_deferred = False
        result(
            cx,
            operation,
            ResultStatus.IN_PROGRESS,
            f"{len(acked)}/{len(acked) + len(pending)} acked epoch {epoch}",
            acked=acked,
            pending=pending,
            epoch=epoch,
            now=now,
        )


def deletion_step(cx: Call, operation: Operation, now: int) -> None:
    """A group's deletion (``groupdelete``): done once every member at deletion reported a
    revocation feed at or past the deletion's entry; until then, counts as they move."""
    done, waiting, seq = cx.env.read(lambda s: groupdelete.view(s, operation.target))
    if not waiting:
        detail = f"every member ({len(done)}) destroyed the group's keys (feed entry {seq})"
        finish(cx, operation, ResultStatus.DONE, detail, now, acked=done)
        return
    key = sent_key("feed", done, waiting)
    if key == operation.last_sent:
        return
    if operation.last_sent.startswith("feed:"):
        operation.last_progress = max(operation.last_progress, now)
    operation.last_sent = key
    total = len(done) + len(waiting)
    detail = f"{len(done)}/{total} members destroyed the group's keys (feed entry {seq})"
    result(cx, operation, ResultStatus.IN_PROGRESS, detail, acked=done, pending=waiting, now=now)


def ack_counts_unchanged_or_held(cx: Call, operation: Operation, now: int) -> bool:
    """The per-ack fast path: for one group already reporting acks, count acks in the
    database instead of listing them. True when nothing changed since the last result, or
    when something did and the throttle holds it back (the operation still counts as
    making progress). False means: build the full view (it may be final, or due)."""
    if len(operation.groups) != 1 or not operation.last_sent.startswith("acks:"):
        return False
    (group_id,) = operation.groups
    try:
        epoch, total, acked = cx.env.read(lambda s: Registry(s).ack_counts(group_id))
    except ProtocolError:
        return False
    if epoch == 0 or acked >= total:
        return False
    counts = (epoch, total, acked)
    if counts == operation.acks_counts:
        operation.acks_deferred = False
        return True
    if counts != operation.acks_seen:
        operation.acks_seen = counts
        operation.last_progress = max(operation.last_progress, now)
    if ack_progress_due(operation, epoch, total, acked, now):
        return False
    operation.acks_deferred = True
    return True


def ack_step(epoch: int | None, total: int, acked: int) -> tuple[int | None, int, int]:
    return (epoch, total, acked // max(1, total // 20))


def ack_progress_due(
    operation: Operation, epoch: int | None, total: int, acked: int, now: int
) -> bool:
    """Whether an in-progress ack result goes out now. Each one carries the full acked and
    pending lists, so one per ack is O(N^2) bytes per rekey and, signed and published one at
    a time, was most of the service's time at N = 1000 (docs/bench/README.md). ``now`` is
    whole seconds, so the throttle is by count: the first view, every 5% of the members
    (every ack below 40 members), any change of epoch or member count, and otherwise at
    most one per second; ``tick`` sends a held-back view. The final result is never held."""
    return (
        operation.acks_sent_at is None
        or ack_step(epoch, total, acked) != operation.acks_step
        or now > operation.acks_sent_at
    )


def finish(
    cx: Call,
    operation: Operation,
    status: ResultStatus,
    detail: str,
    now: int,
    *,
    acked: Sequence[str] = (),
    pending: Sequence[str] = (),
    epoch: int | None = None,
) -> bool:
    """End the operation, once fleet-wide: the instance whose conditional UPDATE sets
    ``finished_at`` audits the outcome (same transaction) and tells the operator. False:
    another instance ended it first."""
    key = operation.command_id.hex()
    try:
        body = build_result(operation, status, detail, acked=acked, pending=pending, epoch=epoch)
    except ProtocolError as err:
        log.error("%s on %s: %s", operation.type, operation.target, unbuildable(status, err))
        status, detail, acked, pending = ResultStatus.FAILED, unbuildable(status, err), (), ()
        body = build_result(operation, status, detail, epoch=epoch)

    def work(session: Session) -> bool:
        if not store.finish_operation(session, operation.command_id, now=now):
            return False
        audit.append(
            session,
            now=now,
            actor="service",
            action=f"{operation.type}.result",
            target=operation.target,
            outcome=Outcome.ACCEPTED,
            reason=f"{status.value}: {detail}"[:1000],
            details={
                "command_id": key,
                "operator": operation.operator,
                # as the result names them: the first stragglers and how many there are
                "pending": ",".join(body.stragglers),
                "pending_count": body.pending,
                "at_ms": cx.clock.ms,
            },
        )
        return True

    operation.finished = True
    if not cx.env.tx(work):
        cx.env.metrics.claims_lost.inc("result")
        return False
    cx.env.metrics.results.inc(status.value)
    log.info(
        "%s from %s on %s: %s (%s)",
        operation.type,
        operation.operator,
        operation.target,
        status.value,
        detail,
    )
    cx.send(operator_result_topic(operation.operator), body, to=operation.operator, now=now)
    return True


def time_out(cx: Call, operation: Operation, now: int) -> None:
    open_jobs = [j for j in operation.jobs if j.open]
    if open_jobs:
        job = open_jobs[0]
        if job.state in (JobState.KEY_PACKAGE, JobState.QUEUED) and bulkadd.is_multi(job):
            # the joiners that sent no key package (a creation's follow-up multi-add may
            # still be queued behind the group's other jobs)
            pending = bulkadd.missing(job)
        elif job.state is JobState.KEY_PACKAGE and job.member is not None:
            pending = [job.member]
        elif job.state is JobState.REQUESTED:
            pending = sorted({*job.tried, *([job.committer] if job.committer else [])})
        else:
            pending = []
        detail = f"no progress for {cx.env.settings.ack_timeout}s: {job.describe()} not committed"
        acked: list[str] = []
        epoch = None
    else:
        acked, pending, epoch, _ = ack_view(cx, operation)
        deletion = operation.type == groupdelete.OPERATION_TYPE
        heard = "feed report past the deletion" if deletion else "ack"
        detail = (
            f"no {heard} from {', '.join(pending) or 'nobody'} within "
            f"{cx.env.settings.ack_timeout}s"
        )
    if not finish(
        cx, operation, ResultStatus.TIMEOUT, detail, now, acked=acked, pending=pending, epoch=epoch
    ):
        return
    for job in open_jobs:
        if not job.persistent:
            jobs.cancel(cx, job, now)


def nudge(cx: Call, operation: Operation, now: int) -> None:
    """Acks stopped coming: send the epoch's commit again to each straggler (``to`` = the
    device, on its command topic). A member that already applied it answers with its ack
    again (the agent's reply to an already-applied commit), one that missed it applies it.
    Recovers acks lost with an instance that died holding them (docs/scale-out.md). Once
    per ``commit_request_timeout`` per operation fleet-wide (conditional UPDATE)."""
    if any(job.open for job in operation.jobs):
        return
    interval = cx.env.settings.commit_request_timeout

    def work(session: Session) -> list[tuple[str, CommitMessage]]:
        if not store.claim_nudge(session, operation.command_id, now=now, interval=interval):
            return []
        registry = Registry(session)
        sends: list[tuple[str, CommitMessage]] = []
        for group_id in sorted(operation.groups):
            try:
                status = registry.ack_status(group_id)
            except ProtocolError:
                continue
            last = store.commit_at(session, group_id, status.epoch - 1)
            if last is None:
                continue
            relay = CommitMessage(group_id, last.epoch, last.commit)
            sends.extend((device_id, relay) for device_id in status.stragglers)
        return sends

    sends = cx.env.tx(work)
    if sends:
        log.info(
            "%s on %s: no ack for %ss; sending the commit again to %d straggler(s)",
            operation.type,
            operation.target,
            interval,
            len(sends),
        )
    for device_id, relay in sends:
        cx.send(device_cmd_topic(device_id), relay, to=device_id, now=now)
