"""Device reports: the dispatch of a verified device report to its flow, and the flows for
key-state reports, rotation (update) requests, a device destroying its identity, key packages
the service asked for, and a group's creation by its founder.

Each flow runs in the transaction that also records the report in the sender's replay state
(``verify.accept_and``) and returns its effects as data (``provisioning.service.effects``),
executed after that transaction commits. After every verified report (refused or not, unless
it was a replay; tree requests answered in a batch only read: ``treepages.on_tree_requests``)
the sender is caught up (``catchup``).

A quarantined device's reports are refused (``ds.device.quarantined``) except attestation
reports: a device whose firmware was fixed can prove it and become active again. A device that
destroys its identity (``keyagent factory-reset``) leaves its groups by commits of the other
members (the revocation's path), and its DevID key is refused from then on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from agent.protocol.errors import KeyfleetError, ProtocolError
from agent.protocol.hpke import serialize_public_key
from agent.protocol.mls import codec
from agent.protocol.mls.messages import KeyPackage
from agent.protocol.mls.public import PublicGroup, admission_hash
from agent.protocol.wire.envelope import VerifiedMessage
from agent.protocol.wire.messages.ack import Ack as AckBody
from agent.protocol.wire.messages.attestation import AttestReport
from agent.protocol.wire.messages.group import (
    CommitMessage,
    CommitRefused,
    GroupAdmissions,
    GroupCreated,
    KeyPackageMessage,
    TreeRequest,
    UpdateProposal,
    UpdateRequest,
    WelcomeMessage,
)
from agent.protocol.wire.messages.key_state import DeviceDestroyed
from agent.protocol.wire.messages.key_state import KeyStateReport as KeyStateBody
from agent.protocol.wire.messages.renewal import RenewAnswer, RenewRequest
from agent.protocol.wire.messages.service import CommitAction
from provisioning import audit
from provisioning.registry import DeviceState, Outcome, PendingChange, Registry, key_state_items
from provisioning.service import (
    acks,
    attestation,
    bulkadd,
    catchup,
    commits,
    execute,
    feed,
    fullrekey,
    groupdelete,
    handoff,
    rekeypolicy,
    renewal,
    rollback,
    rollout,
    store,
    treepages,
    verify,
)
from provisioning.service.context import Call
from provisioning.service.effects import (
    CancelAddsOf,
    Effects,
    JobEnded,
    Log,
    StartNext,
    Touch,
)
from provisioning.service.model import MAX_PUBLIC_GROUP, Job, JobState
from provisioning.service.store import admissions, rollouts, trees

log = logging.getLogger("keyfleet.service")


def job_details(job: Job, *, epoch: int) -> dict[str, str | int | None]:
    return {
        "epoch": epoch,
        "request_id": job.request_id.hex(),
        "command_id": None if job.command_id is None else job.command_id.hex(),
    }


def on_device_message(cx: Call, report: verify.VerifiedReport, now: int) -> None:
    message = report.message
    device_id = message.sender
    actor = f"device:{device_id}"
    body = message.body
    try:
        effects = verify.accept_and(
            cx, message, now, lambda s: dispatch_device(cx, s, message, now), device=True
        )
    except ProtocolError as err:
        target = getattr(body, "group_id", device_id)
        details: dict[str, str | int | None] = {"type": message.type}
        epoch = getattr(body, "epoch", None)
        if isinstance(epoch, int):
            details["epoch"] = epoch
        verify.refuse(
            cx, err, actor=actor, action=message.type, target=str(target), now=now, details=details
        )
        if not err.check.startswith("replay."):
            # The device is alive and authentic even if this report was refused (e.g. a
            # key-state history the registry cannot take): it must still catch up.
            catchup.catch_up(cx, device_id, now)
        return
    cx.env.metrics.reports.inc(message.type)
    execute.run(cx, effects)
    catchup.catch_up(cx, device_id, now)


def take_batch(
    cx: Call, messages: list[verify.VerifiedReport], now: int
) -> list[verify.VerifiedReport] | None:
    """The opening of every flow that takes messages received together in one transaction
    (``reports.on_reports``, ``acks.on_acks``, ``keypackages.on_key_packages``,
    ``attestbatch.on_answers``): the messages taken out of ``messages`` (it is emptied), or
    None when nothing is left for the batch: there were none, or one, handled here on the
    ordinary path (``on_device_message``: its own transaction, refusal and catch-up)."""
    if not messages:
        return None
    batch = list(messages)
    messages.clear()
    if len(batch) == 1:
        on_device_message(cx, batch[0], now)
        return None
    return batch


class BatchUndone(Exception):
    """A message of a batch taken together was refused after its handler may have written:
    the batch's transaction is undone and its messages are taken one by one
    (``take_together``)."""


def take_together(
    cx: Call,
    batch: list[verify.VerifiedReport],
    now: int,
    work: Callable[[Session], object],
    *,
    what: str,
) -> bool:
    """Run ``work``, a batch's handling, in one transaction (True when it committed). If it
    fails (a database error, a refusal it raised, ``BatchUndone``), the handler's in-memory
    notes (audited refusal counts, trust bundles seen) are put back as they were before it,
    and each message is taken on its own (``one_by_one``), so that a refused message never
    leaves a partial change behind. The tail of every flow that ``take_batch`` opens."""
    seen = (dict(cx.env.refusals_seen), dict(cx.env.trust_seen))
    try:
        cx.env.tx(work)
        return True
    except BatchUndone as exc:
        log.info("a batch of %d messages is taken one by one (%s)", len(batch), exc)
    except (KeyfleetError, SQLAlchemyError) as exc:
        log.warning("a batch of %d messages failed (%s); taking them one by one", len(batch), exc)
    cx.env.refusals_seen, cx.env.trust_seen = seen
    one_by_one(cx, batch, now, what=what)
    return False


def one_by_one(cx: Call, batch: list[verify.VerifiedReport], now: int, *, what: str) -> None:
    """Take each message of a batch on its own (``on_device_message``: its own transaction,
    refusal and catch-up); a message whose handling fails is logged (``what``: "a report",
    "an ack") and the next one is taken."""
    for report in batch:
        try:
            on_device_message(cx, report, now)
        except (KeyfleetError, SQLAlchemyError) as one:
            log.error("handling %s from %s failed: %s", what, report.sender, one)


def refuse_all(
    cx: Call, refused: list[tuple[verify.VerifiedReport, ProtocolError]], now: int
) -> list[str]:
    """Refuse each message of a batch that its handling refused, after the batch's
    transaction (``verify.refuse``: counted, logged, audited; an ack's or a tree request's
    target is its group, with its epoch in the details). Returns the senders that must still
    catch up: a message refused by anything but its replay window came from an alive,
    authentic device."""
    behind: list[str] = []
    for message, err in refused:
        body = message.body
        target: str = message.sender
        details: dict[str, str | int | None] = {"type": message.type}
        if isinstance(body, AckBody | TreeRequest):
            target, details = body.group_id, {"type": message.type, "epoch": body.epoch}
        verify.refuse(
            cx,
            err,
            actor=f"device:{message.sender}",
            action=message.type,
            target=target,
            now=now,
            details=details,
        )
        if not err.check.startswith("replay."):
            behind.append(message.sender)
    return behind


def check_not_quarantined(session: Session, sender: str) -> None:
    """``ds.device.quarantined``: like a revoked device's, a quarantined device's reports are
    refused, except attestation reports: a device whose firmware was fixed can prove it and
    become active again (it is not re-added automatically)."""
    check_state(sender, Registry(session).device(sender).state)


def check_state(sender: str, state: DeviceState | None) -> None:
    """The sender's state as a batch read it (None: no such row): ``registry.device.unknown``
    for a device that does not exist, ``ds.device.quarantined`` as ``check_not_quarantined``."""
    if state is None:
        raise ProtocolError("registry.device.unknown", f"no device {sender!r}")
    if state is DeviceState.QUARANTINED:
        raise ProtocolError(
            "ds.device.quarantined",
            f"device {sender!r} is quarantined: only attestation reports are taken",
        )


def dispatch_device(cx: Call, session: Session, message: VerifiedMessage, now: int) -> Effects:
    body = message.body
    sender = message.sender
    if isinstance(body, DeviceDestroyed):
        return on_device_destroyed(cx, session, sender, body, now)
    if isinstance(body, AttestReport):
        return attestation.on_attest_report(cx, session, body, message, now=now)
    check_not_quarantined(session, sender)
    if isinstance(body, KeyStateBody):
        return on_key_states(cx, session, sender, body, message, now=now)
    if isinstance(body, KeyPackageMessage):
        return on_key_package(cx, session, sender, body, now)
    if isinstance(body, GroupCreated):
        return on_group_created(cx, session, sender, body, now)
    if isinstance(body, CommitMessage):
        return commits.on_commit(cx, session, sender, body, now)
    if isinstance(body, WelcomeMessage):
        return commits.on_welcome(cx, session, sender, body, now)
    if isinstance(body, AckBody):
        return acks.on_ack(cx, session, sender, body, now)
    if isinstance(body, UpdateRequest):
        return on_update_request(cx, session, sender, body, now)
    if isinstance(body, CommitRefused):
        return rollback.on_commit_refused(cx, session, sender, body, now)
    if isinstance(body, UpdateProposal):
        return fullrekey.on_proposal(cx, session, sender, body, now)
    if isinstance(body, RenewRequest):
        return renewal.on_renew_request(cx, session, sender, body, now)
    if isinstance(body, RenewAnswer):
        return renewal.on_renew_answer(cx, session, sender, body, now)
    if isinstance(body, TreeRequest):
        return treepages.on_tree_request(cx, session, sender, body, now)
    if isinstance(body, GroupAdmissions):
        return handoff.on_group_admissions(cx, session, sender, body, now)
    raise ProtocolError("ds.message.type", f"{message.type} is not a device report")


@dataclass(frozen=True)
class BatchFacts:
    """What a batch of key-state reports reads once in its transaction instead of per report
    (``reports.on_reports``): the newest feed entry, whether a group deletion is open, which
    senders are in a rollout that is not over."""

    feed_newest: int
    deletions_open: bool
    in_rollout: frozenset[str]

    @classmethod
    def read(cls, session: Session, senders: Collection[str]) -> BatchFacts:
        return cls(
            feed_newest=feed.newest(session)[0],
            deletions_open=groupdelete.any_open(session),
            in_rollout=frozenset(rollouts.in_active(session, senders)),
        )


def on_key_states(
    cx: Call,
    session: Session,
    sender: str,
    body: KeyStateBody,
    message: VerifiedMessage,
    *,
    now: int,
    facts: BatchFacts | None = None,
    recorded: bool = False,
) -> Effects:
    """``recorded``: the caller writes what ``Registry.record_report`` would (a batch's reports
    whose transitions are all recorded already, ``reports.on_reports``)."""
    if not recorded:
        Registry(session).record_report(
            sender,
            message.message_id,
            key_state_items(body.keys),
            now=now,
            online_since=now - cx.env.settings.online_window,
            flush=facts is None,
        )
    refused = dict(body.refused)
    if refused and cx.env.refusals_seen.get(sender) != refused:
        # the device refused membership changes, credentials or Welcomes (what a rogue service,
        # operator or member tried): one audit entry each time its counts change
        audit.append(
            session,
            now=now,
            actor=f"device:{sender}",
            action="device.refused",
            target=sender,
            outcome=Outcome.REFUSED,
            reason=", ".join(f"{check} x{n}" for check, n in sorted(refused.items())),
            details=dict(sorted(refused.items())),
        )
        cx.env.refusals_seen[sender] = refused
    if facts is None:
        effects = feed.on_report(session, sender, body.feed, now=now)
        effects += groupdelete.on_feed_report(session, sender, body.feed)
    else:
        effects = feed.on_report(session, sender, body.feed, now=now, ours=facts.feed_newest)
        effects += groupdelete.on_feed_report(
            session, sender, body.feed, any_open=facts.deletions_open
        )
    held = body.trust_seq or 0
    if cx.env.trust_seen.get(sender) != held:
        # who follows a service signing key rollover: one line each time a device's bundle moves
        cx.env.trust_seen[sender] = held
        effects.append(
            Log(
                logging.INFO,
                "%s holds trust bundle %d (the chain is at %d)",
                (sender, held, cx.env.trust_seq),
            )
        )
    if facts is not None and sender not in facts.in_rollout:
        return effects
    return effects + rollout.on_install_report(cx, session, sender, body.install, now)


def on_update_request(
    cx: Call, session: Session, sender: str, body: UpdateRequest, now: int
) -> Effects:
    """A member's epoch reached its rotation limit (max epoch age or messages): queue a
    self-update of the group, asked of that member first, so keys rotate without an
    operator. Nothing is queued if an update is already queued or in flight (it rotates the
    epoch too) or if the group has already moved past the epoch the member asked about."""
    registry = Registry(session)
    groupdelete.check_live(session, body.group_id)
    group = registry.group(body.group_id)
    if not any(
        m.device_id == sender and m.leaf_index is not None for m in registry.members(body.group_id)
    ):
        raise ProtocolError(
            "ds.group.member", f"{sender!r} is not a member of group {body.group_id!r}"
        )
    if body.epoch > group.epoch:
        raise ProtocolError(
            "ds.update.epoch_ahead",
            f"group {body.group_id!r} is at epoch {group.epoch}, not {body.epoch}",
        )
    queued = store.open_jobs(session, body.group_id)
    if body.epoch < group.epoch or any(j.action is CommitAction.UPDATE for j in queued):
        log.info(
            "rotation request of %s for %s epoch %s: nothing to do (group at epoch %s, "
            "%d update(s) queued)",
            sender,
            body.group_id,
            body.epoch,
            group.epoch,
            sum(1 for j in queued if j.action is CommitAction.UPDATE),
        )
        return []
    job = Job(CommitAction.UPDATE, body.group_id, None, cx.env.new_id(), prefer=sender)
    store.insert_job(session, job, now)
    audit.append(
        session,
        now=now,
        actor=f"device:{sender}",
        action="group.rotate",
        target=body.group_id,
        outcome=Outcome.ACCEPTED,
        reason=f"automatic rotation: {body.reason}",
        details={"epoch": body.epoch, "reason": body.reason},
    )

    return [
        Log(
            logging.INFO,
            "%s: %s epoch %s reached %s; self-update queued (automatic rotation)",
            (sender, body.group_id, body.epoch, body.reason),
        ),
        StartNext(job.group_id),
    ]


def on_device_destroyed(
    cx: Call, session: Session, sender: str, body: DeviceDestroyed, now: int
) -> Effects:
    """The device is destroying its identity (``keyagent factory-reset``): the device and
    every key it reported become destroyed, it leaves its groups by commits of the other
    members (the revocation's path), and its DevID key is refused from now on
    (``ds.device.revoked``, the resolver's check of the device state)."""
    registry = Registry(session)
    registry.set_device_state(
        sender, DeviceState.DESTROYED, reason=f"factory reset: {body.reason}"[:200], now=now
    )
    keys = registry.destroy_keys(sender, now=now)
    removals: list[Job] = []
    for member in registry.groups_of(sender):
        if member.pending is PendingChange.REMOVE:
            continue  # already being removed (quarantine): its job is queued
        registry.request_remove(member.group_id, sender, now=now)
        if member.leaf_index is not None:
            job = Job(
                CommitAction.REMOVE, member.group_id, sender, cx.env.new_id(), persistent=True
            )
            store.insert_job(session, job, now)
            removals.append(job)
    audit.append(
        session,
        now=now,
        actor=f"device:{sender}",
        action=DeviceDestroyed.TYPE,
        target=sender,
        outcome=Outcome.ACCEPTED,
        reason=body.reason,
        details={"keys_destroyed": len(keys), "groups": ",".join(j.group_id for j in removals)},
    )

    return [
        Log(
            logging.WARNING,
            "device %s destroyed its identity (%d keys); removing it from %s",
            (sender, len(keys), [j.group_id for j in removals] or "no group"),
        ),
        CancelAddsOf(sender),
        *(StartNext(job.group_id) for job in removals),
    ]


CollectedJobs = dict[bytes, tuple[Job, dict[str, bytes]]]
"""Multi-add jobs a batch of key packages goes to (``keypackages.on_key_packages``), by request
id: each job read and its key-package map decoded once for the batch, then written once after
its last key package (``bulkadd.store_collected``, ``store.save_job``), not once per key
package."""


def on_key_package(
    cx: Call,
    session: Session,
    sender: str,
    body: KeyPackageMessage,
    now: int,
    *,
    collecting: CollectedJobs | None = None,
) -> Effects:
    """Take a joiner's key package for the job that asked for it. With ``collecting`` (a batch)
    a multi-add job's key packages are gathered there and the job is not written here: the
    batch writes each job once (``keypackages.on_key_packages``). Every check runs before
    anything is kept, so a refused key package changes nothing either way."""
    held = collecting is not None and body.command_id in collecting
    job, have = _requesting_job(session, body, collecting)
    multi = job is not None and bulkadd.is_multi(job)
    if (
        job is None
        or job.state is not JobState.KEY_PACKAGE
        or (
            (sender in have or sender not in bulkadd.joiners(job))
            if multi
            else job.member != sender
        )
    ):
        raise ProtocolError(
            "ds.key_package.unexpected", "no key package was requested with this command id"
        )
    if not held:
        # a batch checks a job's group once: nothing in its transaction deletes a group
        groupdelete.check_live(session, job.group_id)
        if collecting is not None and multi and body.command_id is not None:
            collecting[body.command_id] = (job, have)
    key_package = KeyPackage.decode(body.key_package)
    key_package.verify()
    device = Registry(session).device(sender)
    if key_package.device_id != sender.encode() or key_package.signature_key != (
        serialize_public_key(verify.devid_public_key(cx, device, now))
    ):
        raise ProtocolError(
            "ds.key_package.identity",
            "the key package is not bound to the sender's DevID key and device id",
        )
    if multi:
        have[sender] = body.key_package
        complete = len(have) == len(bulkadd.joiners(job))
        if collecting is not None:
            # the batch saves the job (compare-and-set) after its last key package
            if complete:
                job.state = JobState.WAITING
                return [Touch(job), StartNext(job.group_id)]
            return [Touch(job)]
        bulkadd.store_collected(job, have)
        if not complete:
            # more joiners to hear from: the job waits for them (asked again at its deadline)
            if not store.save_job(session, job, cx.env.instance):
                raise ProtocolError(
                    "ds.key_package.unexpected", "the job moved meanwhile: send it again"
                )
            return [Touch(job)]
    else:
        job.key_package = body.key_package
    job.state = JobState.WAITING
    if not store.save_job(session, job, cx.env.instance):
        # Another instance took this key package (a redelivery raced it): nothing to do.
        raise ProtocolError(
            "ds.key_package.unexpected", "the requested key package was already taken"
        )

    return [Touch(job), StartNext(job.group_id)]


def _requesting_job(
    session: Session, body: KeyPackageMessage, collecting: CollectedJobs | None
) -> tuple[Job | None, dict[str, bytes]]:
    """The job that asked for ``body`` (by its command id) and, for a multi-add, the key
    packages it holds so far (from ``collecting`` when the batch holds it already: a job is
    held there once a key package of the batch passed its request and group checks)."""
    if body.command_id is None:
        return None, {}
    if collecting is not None and body.command_id in collecting:
        return collecting[body.command_id]
    job = store.job_by_request(session, body.command_id)
    if job is None or not bulkadd.is_multi(job):
        return job, {}
    return job, bulkadd.collected(job)


def on_group_created(
    cx: Call, session: Session, sender: str, body: GroupCreated, now: int
) -> Effects:
    job = store.head_job(session, body.group_id)
    if (
        job is None
        or job.action is not CommitAction.CREATE
        or job.state is not JobState.REQUESTED
        or job.committer != sender
        or job.request_id != body.command_id
    ):
        raise ProtocolError(
            "ds.create.unexpected", f"{sender} was not asked to create {body.group_id}"
        )
    public = PublicGroup.from_state(
        codec.decode(body.public_group, MAX_PUBLIC_GROUP, "public_group")
    )
    registry = Registry(session)
    devid = serialize_public_key(verify.devid_public_key(cx, registry.device(sender), now))
    members = list(public.tree.members())
    if (
        public.group_id != body.group_id.encode()
        or public.epoch != 0
        or len(members) != 1
        or members[0][0] != 0
        or members[0][1].device_id != sender.encode()
        or members[0][1].signature_key != devid
    ):
        raise ProtocolError(
            "ds.create.public_group",
            "the public group is not epoch 0 of this group with the sender alone at leaf 0",
        )
    if admission_hash(body.authz) != public.tree.admission(0):
        # the service delivers it to every joiner: without it (or with another) none could join
        raise ProtocolError(
            "ds.create.admission",
            "the group.created does not name the creation Authorization the founder's leaf records",
        )
    registry.create_group(
        body.group_id,
        creator=sender,
        public_tree=trees.head(public.state),
        group_context=public.state.group_context(),
        now=now,
    )
    if body.authz is not None:
        # joiners get it from us with their Welcome or tree pages (members keep none)
        admissions.keep(session, body.group_id, [body.authz], epoch=0)
    rekeypolicy.record_creator(cx, session, body.group_id, sender, now)
    trees.write(session, body.group_id, trees.rows_of(public.tree, trees.all_nodes(public.tree)))
    audit.append(
        session,
        now=now,
        actor=f"device:{sender}",
        action="group.created",
        target=body.group_id,
        outcome=Outcome.ACCEPTED,
        details=job_details(job, epoch=0),
    )
    store.end_job(session, job, JobState.DONE)

    return [
        Log(logging.INFO, "group %s created by %s at epoch 0", (body.group_id, sender)),
        JobEnded(job),
    ]
