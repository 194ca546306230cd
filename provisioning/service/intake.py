"""Intake: the service's entry for messages received together (``handle_many``), the
periodic ``tick``, and the signing of everything a call sends (``sign``).

A batch is taken in its order. Device reports are verified in one read session up to the next
message that is handled on its own (the senders' device and replay rows loaded in one query
each); acks, key-state reports, key packages, attestation answers and tree requests that
follow each other are collected and taken in one transaction each (``acks.on_acks``,
``reports.on_reports``, ``keypackages.on_key_packages``, ``attestbatch.on_answers``,
``treepages.on_tree_requests``), every other report and every
operator command on its own. A transport or database failure while handling one message is
logged and the others are still handled (the senders' timeouts and the service's retries
recover that one's flow).

Everything a call sends is signed at its end with one reservation from the shared sequence
counter (``store.reserve_seqs``), so that several instances signing as one sender stay inside
every device's replay window (docs/scale-out.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Final, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from agent.protocol.errors import KeyfleetError
from agent.protocol.topics import SERVICE_ID, report_sender
from agent.protocol.wire.envelope import encode_message
from agent.protocol.wire.messages.ack import Ack as AckBody
from agent.protocol.wire.messages.attestation import AttestReport
from agent.protocol.wire.messages.group import KeyPackageMessage, TreeRequest
from agent.protocol.wire.messages.key_state import KeyStateReport
from agent.protocol.wire.messages.service import CommitAction
from provisioning.registry import PendingChange, Registry
from provisioning.service import acks as acks_flow
from provisioning.service import (
    checkpoints,
    devices,
    execute,
    operations,
    operators,
    rekeypolicy,
    releases,
    requests,
    rollback,
    rollout,
    store,
    tasks,
    treepages,
    verify,
)
from provisioning.service import jobs as jobs_flow
from provisioning.service import reports as reports_flow
from provisioning.service.attestbatch import on_answers
from provisioning.service.context import Call
from provisioning.service.keypackages import on_key_packages
from provisioning.service.model import Job, Publish

log = logging.getLogger("keyfleet.service")

T = TypeVar("T")

BatchFlow = Callable[[Call, list[verify.VerifiedReport], int], None]

BATCHED: Final[tuple[tuple[type, str, BatchFlow], ...]] = (
    (AckBody, "acks", acks_flow.on_acks),
    (KeyStateReport, "reports", reports_flow.on_reports),
    (KeyPackageMessage, "key packages", on_key_packages),
    (AttestReport, "attestation answers", on_answers),
    (TreeRequest, "tree requests", treepages.on_tree_requests),
)
"""The device messages taken together when they follow each other (by body type, exactly),
in the order their batches are handled, with the flow that takes each batch: the messages a
fleet sends most (acks of a rekey, reports after a reconnect, attestation answers)."""


def tick(cx: Call, now: int) -> None:
    """Timeouts and retries (``jobs.tick_jobs``, ``operations.tick_operations``), expiry of
    dual-control requests (``requests.expire_tick``) and the periodic tasks (``tasks``, the audit
    checkpoints)."""
    ensure_started(cx, now)
    jobs_flow.tick_jobs(cx, now)
    operations.tick_operations(cx, now)
    requests.expire_tick(cx, now)
    execute.run(cx, releases.expire_tick(cx, now))
    tasks.attest_tick(cx, now)
    tasks.prune_tick(cx, now)
    checkpoints.checkpoint_tick(cx, now)
    tasks.crl_tick(cx, now)
    rollback.recovery_tick(cx, now)
    rollout.rollout_tick(cx, now)
    for group_id in rekeypolicy.rekey_tick(cx, now):
        jobs_flow.start_next(cx, group_id, now)


def handle_many(cx: Call, messages: Sequence[tuple[str, bytes]], now: int) -> None:
    """Verify and handle ``messages`` in their order; what to send is in ``cx.outbox``."""
    ensure_started(cx, now)
    batches: dict[type, list[verify.VerifiedReport]] = {kind: [] for kind, _, _ in BATCHED}
    senders = [report_sender(topic) for topic, _ in messages]
    # One read session verifies the device reports up to the next message that is handled
    # on its own, with the senders' device and replay rows read in one query each: a
    # sender's device state is then as of that load (a few hundred ms at most), as if its
    # message had been verified that much earlier; the replay check that counts runs again
    # under the row lock (``acks.on_acks``, ``verify.accept_and``).
    reader: Session | None = None
    loaded = False
    try:
        for index, (topic, payload) in enumerate(messages):
            device_id = senders[index]
            message: verify.VerifiedReport | None = None
            if device_id is not None:
                if reader is None:
                    reader = cx.env.sessions()
                    if not loaded:
                        # once per call: again after each message handled on its own would
                        # be quadratic in a batch of reports that are not acks
                        loaded = True
                        store.load_senders(reader, {d for d in senders[index:] if d})
                message = guarded(
                    topic, partial(verify.open_device, cx, device_id, payload, now, reader), None
                )
                if message is None:
                    continue
                batch = batches.get(type(message.body))
                if batch is not None:
                    batch.append(message)
                    continue
            if reader is not None:
                reader.close()
                reader = None
            _take_batches(cx, batches, now)
            parts = topic.split("/")
            if message is not None:
                guarded(topic, partial(devices.on_device_message, cx, message, now), None)
            elif len(parts) == 5 and parts[:2] == ["kf", "v1"] and parts[2:5:2] == ["ops", "cmd"]:
                guarded(topic, partial(operators.on_operator, cx, parts[3], payload, now), None)
            else:
                log.warning("ignored a message on %s: not a service topic", topic)
    finally:
        if reader is not None:
            reader.close()
    _take_batches(cx, batches, now)


def _take_batches(cx: Call, batches: dict[type, list[verify.VerifiedReport]], now: int) -> None:
    """Handle the device messages gathered so far, each kind as one batch (emptied)."""
    for kind, what, flow in BATCHED:
        guarded(what, partial(flow, cx, batches[kind], now), None)


def guarded(what: str, work: Callable[[], T], failed: T) -> T:
    try:
        return work()
    except (KeyfleetError, SQLAlchemyError) as exc:
        log.error("handling a message on %s failed: %s", what, exc)
        return failed


def sign(cx: Call) -> list[Publish]:
    """Sign what is queued: sequence numbers are reserved from the shared counter in one
    write, so that several instances signing as one sender stay inside every device's
    replay window (docs/scale-out.md)."""
    out, cx.outbox = cx.outbox, []
    if not out:
        return []
    now = max(item.at for item in out)
    # Milliseconds of the clock as a floor: a counter row created on an existing fleet still
    # starts above the seqs devices saw from the single-instance service.
    first = cx.env.tx(lambda s: store.reserve_seqs(s, len(out), floor=now * 1000))
    return [
        Publish(
            topic,
            encode_message(body, key=cx.env.key, sender=SERVICE_ID, to=to, seq=first + i, time=at),
        )
        for i, (topic, body, to, at) in enumerate(
            (item.topic, item.body, item.to, item.at) for item in out
        )
    ]


def ensure_started(cx: Call, now: int) -> None:
    """Queue a removal job for every removal the registry has pending without one (a
    revocation recorded by a service version that kept its jobs in memory must still take
    the device out of its groups). Jobs themselves are in the database: nothing else to
    resume."""
    if cx.env.started:
        return
    cx.env.started = True
    releases.import_initial(cx, now)

    def pending_removals(session: Session) -> list[tuple[str, str]]:
        registry = Registry(session)
        found = []
        for group in registry.groups():
            jobs = {
                row.member
                for row in store.open_job_rows(session, group.group_id)
                if row.action == CommitAction.REMOVE.value
            }
            for member in registry.members(group.group_id):
                if (
                    member.pending is PendingChange.REMOVE
                    and member.leaf_index is not None
                    and member.device_id not in jobs
                ):
                    found.append((group.group_id, member.device_id))
        return found

    for group_id, device_id in cx.env.read(pending_removals):
        log.info("resuming the removal of %s from %s", device_id, group_id)
        jobs_flow.enqueue(
            cx, Job(CommitAction.REMOVE, group_id, device_id, cx.env.new_id(), persistent=True), now
        )
