"""Executes effects (``provisioning.service.effects``) after the transaction that produced
them committed, in order: sends go to the call's outbox, follow-ups run the flow they name
(each in transactions of its own), log lines and metrics are emitted."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from agent.protocol.wire.messages.result import ResultStatus
from provisioning.service import attestation, commits, jobs, operations, tasks
from provisioning.service.context import Call
from provisioning.service.effects import (
    Accepted,
    AcceptHeld,
    AckLatency,
    AskAgain,
    AttestVerdict,
    CancelAddsOf,
    Count,
    Effect,
    GroupChanged,
    JobEnded,
    Log,
    Progress,
    Send,
    StartNext,
    Touch,
    TrustRolled,
    WriteCrl,
)
from provisioning.service.model import JobState

log = logging.getLogger("keyfleet.service")


def run(cx: Call, effects: Iterable[Effect]) -> None:
    """Execute ``effects`` in order (after the transaction that produced them committed)."""
    now = cx.clock.seconds
    for effect in effects:
        match effect:
            case Send(topic, body, to):
                cx.send(topic, body, to=to, now=now)
            case Log(level, message, args):
                log.log(level, message, *args)
            case Count(counter, label):
                getattr(cx.env.metrics, counter).inc(label)
            case AckLatency(accepted_ms):
                cx.env.metrics.ack_latency.observe(max(0, cx.clock.ms - accepted_ms) / 1000)
            case StartNext(group_id):
                jobs.start_next(cx, group_id, now)
            case Touch(job):
                jobs.touch(cx, job, now)
            case JobEnded(job):
                jobs.job_ended(cx, job, now)
            case AskAgain(job):
                job.state = JobState.WAITING
                job.tried.clear()
                jobs.start(cx, job, now)
            case GroupChanged(group_id):
                jobs.group_changed(cx, group_id, now)
            case CancelAddsOf(device_id):
                jobs.cancel_adds_of(cx, device_id, now)
            case AcceptHeld(group_id, epoch, sender):
                commits.accept_held(cx, group_id, epoch, sender, now)
            case Accepted(operation, detail):
                operations.result(cx, operation, ResultStatus.ACCEPTED, detail, now=now)
            case Progress(command_id):
                fresh = operations.load_operation(cx, command_id)
                if fresh is not None:
                    operations.progress(cx, fresh, now)
            case AttestVerdict(waiting, verdict, change):
                attestation.attest_result(cx, waiting, verdict, change, now)
            case TrustRolled():
                cx.rolled = True
            case WriteCrl():
                # Not now: the broker restarts when the file changes, and this call's answers
                # (the operator's result) are published after the effects ran.
                cx.env.crl_write_at_ms = cx.clock.ms + tasks.CRL_WRITE_GRACE_MS
