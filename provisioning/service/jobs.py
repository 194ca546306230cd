"""Jobs: each group's FIFO queue of changes (create, add, remove, update) and the choice of the
member asked to commit the head one.

Only the head job is in flight: it holds the group's slot in the database (``store.take_slot``),
so at most one commit request per group is outstanding fleet-wide. Every move of a job is a
compare-and-set on its version together with the slot (``claim``): when two instances try the
same move, one writes and sends, the other sees it lost and does nothing. A job's deadline is
the lease of the instance that last moved it; after it passes, any instance's tick moves the job
on (docs/scale-out.md).

"Online" (who may be asked to commit): a member proven to be at the group's current epoch (it
acked it, it made the commit that started it, or it founded the group at epoch 0), not revoked,
not being removed; among those, devices heard from within ``online_window`` seconds come first
(most recent first), and the member the change concerns (the removal's nearest leaf, the member
that asked for a rotation) before the others. If the chosen committer does not answer within
``commit_request_timeout`` seconds, the request goes to the next candidate (``tick_jobs``).
"""

from __future__ import annotations

import logging
from functools import partial

from sqlalchemy.orm import Session

from agent.protocol.errors import ProtocolError
from agent.protocol.topics import device_cmd_topic
from agent.protocol.wire.messages.operator import GroupCreate
from agent.protocol.wire.messages.service import CommitAction, CommitRequest, KeyPackageRequest
from provisioning.registry import PendingChange, Registry
from provisioning.service import bulkadd, commits, fullrekey, operations, rekeypolicy, store
from provisioning.service.context import Call
from provisioning.service.model import GROUP_ELIGIBLE, Job, JobState

log = logging.getLogger("keyfleet.service")


class _SlotTaken(Exception):
    """Rolls back a job's claim when another job of its group holds the in-flight slot."""


def tick_jobs(cx: Call, now: int) -> None:
    """Commit requests nobody answered go to the next candidate, key package requests are
    repeated, queued and waiting head jobs are started."""
    for group_id in cx.env.read(store.groups_with_open_jobs):
        job = group_head(cx, group_id)
        if job is None:
            continue
        if job.state is JobState.REQUESTED and now >= job.deadline:
            log.info(
                "no commit from %s for %s within %ss; asking another member",
                job.committer,
                job.describe(),
                cx.env.settings.commit_request_timeout,
            )
            if job.committer is not None and job.committer not in job.tried:
                job.tried.append(job.committer)
            job.state = JobState.WAITING
            if fullrekey.is_batch(job):
                # its proposals are collected: ask another member to commit them
                job.state, job.deadline = JobState.PROPOSALS, 0
            start(cx, job, now)
        elif job.state is JobState.KEY_PACKAGE and now >= job.deadline:
            if not _split(cx, job, now):
                request_key_package(cx, job, now)
        elif job.state in (JobState.WAITING, JobState.QUEUED, JobState.PROPOSALS):
            start(cx, job, now)


def group_head(cx: Call, group_id: str) -> Job | None:
    """The group's job in flight (the slot holder), else its oldest queued job."""
    return cx.env.read(lambda s: store.head_job(s, group_id))


def enqueue(cx: Call, job: Job, now: int) -> None:
    cx.env.tx(lambda s: store.insert_job(s, job, now))
    start_next(cx, job.group_id, now)


def touch(cx: Call, job: Job, now: int) -> None:
    if job.command_id is None:
        return
    command_id = job.command_id
    cx.env.tx(lambda s: store.touch_operation(s, command_id, now))


def claim(cx: Call, job: Job, now: int) -> bool:
    """Write the job's new state if nobody changed it since we read it, taking the group's
    slot for it: the compare-and-set that keeps one commit request per group in flight
    fleet-wide. False: another instance moved it first (it sends, we don't)."""
    previous = job.claimed_by
    lease_expired = job.lease_until != 0 and now >= job.lease_until

    def work(session: Session) -> bool:
        if not store.save_job(session, job, cx.env.instance):
            return False  # nothing written
        if not store.take_slot(session, job):
            raise _SlotTaken  # roll the job's write back with the transaction
        return True

    try:
        won = cx.env.tx(work)
    except _SlotTaken:
        won = False
    if not won:
        cx.env.metrics.claims_lost.inc("job")
        return False
    taken_over = previous not in (None, cx.env.instance) and lease_expired
    cx.env.metrics.jobs.inc("taken_over" if taken_over else "claimed")
    if taken_over:
        log.info("took over %s from instance %s (its lease expired)", job.describe(), previous)
    return True


def start(cx: Call, job: Job, now: int) -> None:
    """Move the head job forward as far as it can go now."""
    if not job.open:
        return
    if fullrekey.is_batch(job):
        if job.state in (JobState.QUEUED, JobState.WAITING):
            if fullrekey.members_ready(cx, job, now):
                fullrekey.ask(cx, job, now)
            else:
                fullrekey.wait_for_members(cx, job, now)
        elif job.state is JobState.PROPOSALS and fullrekey.ready(cx, job, now):
            fullrekey.commit_next(cx, job, now)
        return
    if bulkadd.is_multi(job):
        if job.state is JobState.QUEUED and not _drop_members(cx, job, now):
            return  # every joiner is a member already: nothing left to add
        if bulkadd.missing(job):
            if job.state is not JobState.KEY_PACKAGE:
                request_key_package(cx, job, now)
            return
    elif job.action is CommitAction.ADD and job.key_package is None:
        if job.state is not JobState.KEY_PACKAGE:
            request_key_package(cx, job, now)
        return
    if job.action is CommitAction.CREATE:
        candidates = job.candidates
        committer = candidates[len(job.tried) % len(candidates)]
        request_commit(cx, job, committer, 0, now)
        return
    try:
        choice = cx.env.read(lambda s: choose_committer(cx, s, job, now))
    except ProtocolError as err:
        fail_job(cx, job, f"[{err.check}] {err.reason}", now)
        return
    if choice is None:
        if job.state is not JobState.WAITING:
            job.state = JobState.WAITING
            if rekeypolicy.is_aimed(job):
                # an aimed self-update waits for its member at most one request timeout
                job.deadline = now + cx.env.settings.commit_request_timeout
            claim(cx, job, now)
        elif rekeypolicy.is_aimed(job) and now >= job.deadline:
            straggler(cx, job, "not at the group's epoch", now)
        return
    committer, epoch = choice
    request_commit(cx, job, committer, epoch, now)


def _drop_members(cx: Call, job: Job, now: int) -> bool:
    """A multi-add about to start leaves out joiners that hold a leaf already (the founder
    that created the group: any founder may, when the first does not answer). False when none
    is left: the job ends done."""

    def present(session: Session) -> set[str]:
        members = Registry(session).members(job.group_id)
        return {m.device_id for m in members if m.leaf_index is not None}

    held = cx.env.read(present)
    kept = tuple(d for d in bulkadd.joiners(job) if d not in held)
    if kept:
        job.candidates = kept
        return True
    if cx.env.tx(lambda s: store.end_job(s, job, JobState.DONE)):
        job_ended(cx, job, now)
    return False


def creation_chunk(cx: Call, job: Job) -> bool:
    """A multi-add of a group creation (any subset of its founders may be committed: devices
    accept adds of any founder the creation's Authorization names), not of a ``group.add``
    of several devices (devices add exactly its named set)."""
    if not bulkadd.is_multi(job) or job.command_id is None:
        return False
    command_id = job.command_id
    return cx.env.read(lambda s: store.operation_type(s, command_id)) == GroupCreate.TYPE


def _split(cx: Call, job: Job, now: int) -> bool:
    """A creation chunk whose key-package wait passed its deadline with some key packages in:
    it commits those joiners now, the others go on in a follow-up multi-add of the same
    operation, queued behind the group's other jobs (``bulkadd.split_off_missing``). False
    when it does not apply (the caller asks the missing joiners again)."""
    if not creation_chunk(cx, job):
        return False
    follow_up = bulkadd.split_off_missing(job, cx.env.new_id())
    if follow_up is None:
        return False
    job.state, job.deadline = JobState.WAITING, 0

    def work(session: Session) -> bool:
        if not store.save_job(session, job, cx.env.instance):
            return False
        store.insert_job(session, follow_up, now)
        return True

    if not cx.env.tx(work):
        cx.env.metrics.claims_lost.inc("job")
        return True  # another instance moved it first
    log.info(
        "no key package from %s within %ss; %s goes on without them (%s)",
        ", ".join(follow_up.candidates),
        cx.env.settings.commit_request_timeout,
        job.describe(),
        follow_up.describe(),
    )
    start(cx, job, now)
    return True


def request_key_package(cx: Call, job: Job, now: int) -> None:
    """Ask the joiner (a multi-add: each joiner whose key package is not in yet) for one."""
    wanted = bulkadd.missing(job) if bulkadd.is_multi(job) else [job.member]
    job.state = JobState.KEY_PACKAGE
    job.deadline = now + cx.env.settings.commit_request_timeout
    if not claim(cx, job, now):
        return
    for device_id in wanted:
        assert device_id is not None
        cx.send(
            device_cmd_topic(device_id),
            KeyPackageRequest(job.request_id),
            to=device_id,
            now=now,
        )


def request_commit(cx: Call, job: Job, committer: str, epoch: int, now: int) -> None:
    job.state = JobState.REQUESTED
    job.committer = committer
    job.request_epoch = epoch
    job.deadline = now + cx.env.settings.commit_request_timeout
    if not claim(cx, job, now):
        return
    command_id = job.command_id
    # The operators' Authorization of the change (dual control): the committer verifies it and
    # puts it into its commit, with the chain of adopted quorum policies it is judged under. A
    # change the service starts on its own (quarantine, a re-add beyond retention) names the
    # newest policy: devices take it only where that policy allows automatic changes.
    authz = (
        None if command_id is None else cx.env.read(lambda s: store.operation_authz(s, command_id))
    )
    policies = tuple(a for _, a in cx.env.read(store.adopted_policies))
    if authz is None and policies and job.action in (CommitAction.ADD, CommitAction.REMOVE):
        authz = policies[-1]
    multi = bulkadd.is_multi(job)
    if multi:
        try:
            bulkadd.check_fits(bulkadd.key_packages(job), authz, policies)
        except ProtocolError as err:
            fail_job(cx, job, f"[{err.check}] {err.reason}", now)
            return
    request = CommitRequest(
        command_id=job.request_id,
        group_id=job.group_id,
        epoch=epoch,
        action=job.action,
        member=job.member if job.action in (CommitAction.ADD, CommitAction.REMOVE) else None,
        key_package=job.key_package if job.action is CommitAction.ADD and not multi else None,
        authz=authz,
        policies=policies,
        key_packages=bulkadd.key_packages(job) if multi else None,
    )
    log.info("asked %s to commit %s at epoch %s", committer, job.describe(), epoch)
    cx.send(device_cmd_topic(committer), request, to=committer, now=now)


def proven_at_epoch(session: Session, group_id: str, epoch: int) -> set[str]:
    """Members proven to hold the group's current epoch."""
    acked = store.acked_at(session, group_id, epoch)
    if epoch == 0:
        acked.update(m.device_id for m in Registry(session).members(group_id) if m.leaf_index == 0)
    else:
        last = store.commit_at(session, group_id, epoch - 1)
        if last is not None:
            acked.add(last.committer)
    return acked


def choose_committer(cx: Call, session: Session, job: Job, now: int) -> tuple[str, int] | None:
    registry = Registry(session)
    group = registry.group(job.group_id)
    members = [m for m in registry.members(job.group_id) if m.leaf_index is not None]
    if job.action is CommitAction.REMOVE:
        if not any(m.device_id == job.member for m in members):
            raise ProtocolError(
                "ds.job.member", f"{job.member} is no longer a member of {job.group_id}"
            )
        if len(members) < 2:
            raise ProtocolError(
                "ds.job.last_member",
                f"{job.member} is the only member of {job.group_id}: nobody can remove it",
            )
    at_epoch = proven_at_epoch(session, job.group_id, group.epoch)
    if rekeypolicy.is_aimed(job):
        # A self-update asked of one member (rekey policy, full rekey): only it can answer.
        (wanted,) = job.candidates
        if wanted in job.tried:
            raise ProtocolError("ds.rekey.straggler", f"{wanted} did not answer")
        if wanted not in at_epoch or not any(m.device_id == wanted for m in members):
            return None
        if registry.device(wanted).state not in GROUP_ELIGIBLE:
            raise ProtocolError("ds.rekey.straggler", f"{wanted} may not commit (not eligible)")
        return wanted, group.epoch
    preferred: str | None = None
    if job.action is CommitAction.REMOVE:
        public, _ = commits.load_public(session, job.group_id, cx.env.groups)
        target = next(m for m in members if m.device_id == job.member)
        assert target.leaf_index is not None
        among = tuple(c.encode() for c in job.candidates)
        near = public.tree.leaf(public.committer_for_remove(target.leaf_index, among))
        preferred = None if near is None else near.device_id.decode()
    elif job.prefer is not None:
        preferred = job.prefer
        if (
            preferred not in at_epoch
            and preferred not in job.tried
            and any(m.device_id == preferred for m in members)
        ):
            # a member's own rotation request (a joiner's first update): only its own commit
            # gives it a fresh leaf, so wait for it to reach the epoch (as an aimed update
            # does) rather than have another member commit an update that leaves its leaf
            return None
    candidates: list[tuple[bool, bool, int, str]] = []
    states = store.member_device_states(session, job.group_id)
    for member in members:
        device_id = member.device_id
        if device_id == job.member or member.pending is PendingChange.REMOVE:
            continue
        if device_id not in at_epoch:
            continue
        state, last_seen = states[device_id]
        if state not in GROUP_ELIGIBLE:
            continue
        seen = max(cx.env.last_heard.get(device_id, -1), last_seen or -1)
        online = seen >= now - cx.env.settings.online_window
        candidates.append((online, device_id == preferred, seen, device_id))
    if not candidates:
        return None
    candidates.sort(reverse=True)
    untried = [c for c in candidates if c[3] not in job.tried]
    if not untried:
        job_tried_reset = candidates
        return job_tried_reset[len(job.tried) % len(candidates)][3], group.epoch
    return untried[0][3], group.epoch


def job_ended(cx: Call, job: Job, now: int) -> None:
    """After the transaction that ended ``job`` committed: progress, next job."""
    touch(cx, job, now)
    if job.command_id is not None:
        operation = operations.load_operation(cx, job.command_id)
        if operation is not None:
            operations.progress(cx, operation, now)
    start_next(cx, job.group_id, now)


def straggler(cx: Call, job: Job, why: str, now: int) -> None:
    """An aimed self-update its member did not make in time: the job fails (the group's
    queue moves on); the rekey policy asks again later and lists the member as a straggler."""
    (wanted,) = job.candidates
    fail_job(cx, job, f"[ds.rekey.straggler] {wanted}: {why}", now)


def fail_job(cx: Call, job: Job, detail: str, now: int, *, withdraw: bool = False) -> None:
    """``withdraw``: an add's joiners that hold no leaf are no longer pending in the registry."""
    job.detail = detail

    def work(session: Session) -> bool:
        if not store.end_job(session, job, JobState.FAILED):
            return False
        if withdraw:
            _withdraw_joiners(session, job, now)
        return True

    if not cx.env.tx(work):
        return
    if fullrekey.is_batch(job):
        cx.env.tx(lambda s: fullrekey.forget(s, job))
    log.warning("gave up on %s: %s", job.describe(), detail)
    if job.command_id is not None:
        operation = operations.load_operation(cx, job.command_id)
        if operation is not None:
            operations.progress(cx, operation, now)
    start_next(cx, job.group_id, now)


def start_next(cx: Call, group_id: str, now: int) -> None:
    head = group_head(cx, group_id)
    if head is not None and head.state in (JobState.QUEUED, JobState.WAITING, JobState.PROPOSALS):
        start(cx, head, now)


def _withdraw_joiners(session: Session, job: Job, now: int) -> None:
    """An add that ended undone: its joiners that hold no leaf are no longer pending."""
    if job.action is not CommitAction.ADD:
        return
    registry = Registry(session)
    try:
        rows = {m.device_id: m for m in registry.members(job.group_id)}
    except ProtocolError:
        return  # the group was never created
    joiners = bulkadd.joiners(job) if bulkadd.is_multi(job) else (job.member or "",)
    for member in joiners:
        row = rows.get(member)
        if row is not None and row.leaf_index is None:
            registry.request_remove(job.group_id, member, now=now)


def cancel(cx: Call, job: Job, now: int) -> None:
    def work(session: Session) -> bool:
        if not store.end_job(session, job, JobState.CANCELLED):
            return False
        _withdraw_joiners(session, job, now)
        return True

    if cx.env.tx(work):
        start_next(cx, job.group_id, now)


def cancel_adds_of(cx: Call, device_id: str, now: int) -> None:
    """A revoked (or destroyed) device: its single adds are cancelled; a creation's multi-add
    goes on without it; a ``group.add`` of several devices naming it fails (devices add
    exactly the named set: the operators propose the add again without it)."""
    for job in cx.env.read(lambda s: store.open_adds_of(s, device_id)):
        cancel(cx, job, now)
    for job in cx.env.read(lambda s: store.open_multi_adds_naming(s, device_id)):
        if creation_chunk(cx, job):
            _leave_out(cx, job, device_id, now)
        else:
            detail = (
                f"[ds.add.revoked] {device_id} was revoked: a group.add adds exactly the "
                "devices it names; propose the add again without it"
            )
            fail_job(cx, job, detail, now, withdraw=True)


def _leave_out(cx: Call, job: Job, device_id: str, now: int) -> None:
    """A creation's multi-add without ``device_id``: if the others' key packages are all in
    (or its commit request included the device), a commit of the others is asked for."""
    current: Job | None = job
    for _ in range(3):  # another instance may move the job meanwhile: read it again
        if current is None or _left_out(cx, current, device_id, now):
            return
        current = cx.env.read(partial(store.job_by_request, request_id=current.request_id))


def _left_out(cx: Call, job: Job, device_id: str, now: int) -> bool:
    """One try of ``_leave_out``: False when another instance moved the job first."""
    if not job.open or device_id not in bulkadd.joiners(job):
        return True
    bulkadd.leave_out(job, device_id)
    if not bulkadd.joiners(job):
        if cx.env.tx(lambda s: store.end_job(s, job, JobState.DONE)):
            job_ended(cx, job, now)
        return True
    if job.state is JobState.REQUESTED or (
        job.state is JobState.KEY_PACKAGE and not bulkadd.missing(job)
    ):
        job.state, job.committer, job.deadline = JobState.WAITING, None, 0
    if not cx.env.tx(lambda s: store.save_job(s, job, cx.env.instance)):
        return False
    log.info("%s goes on without %s (revoked)", job.describe(), device_id)
    start_next(cx, job.group_id, now)
    return True


def group_changed(cx: Call, group_id: str, now: int) -> None:
    for operation in operations.load_operations(cx, group_id):
        operations.progress(cx, operation, now)
    start_next(cx, group_id, now)
