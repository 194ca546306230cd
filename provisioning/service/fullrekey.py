"""``keyfleet rekey --full`` in a few commits: members' Update proposals, committed in batches.

A member's leaf key changes by its own commit, or by another member's commit carrying its
Update proposal (RFC 9420 §12.1.2; agent.protocol.mls). One full-rekey job (``plan``) does:

1. **Proposals.** The service asks every member at the group's epoch, all at once, for an
   Update (``svc.update_proposal_request``); each answers with ``group.update_proposal`` (a
   new TPM leaf key, signed by its DevID key). The service checks each against the public
   tree (``on_proposal``: the sender's own leaf index, its leaf signature) and keeps it
   (``service_update_proposals``). Collection ends when every member answered or after
   ``commit_request_timeout``; members that did not answer are asked for an ordinary
   self-update of their own (aimed jobs, queued behind this one: a member that answers
   neither is named a straggler, ``ds.rekey.straggler``, as before).
2. **Commits.** One member (chosen like any committer: online, at the epoch) is asked to
   commit the proposals, at most ``BATCH`` per commit (``svc.commit_request`` with
   ``updates``), together with its own self-update; its own proposal is dropped (its
   UpdatePath renews its leaf). After each accepted commit the next batch goes out at the new
   epoch, until none is left. So N members take ceil((N - 1) / BATCH) commits, plus the
   proposal round: 2 commits for 1,000 members.

The commit is solicited in the wedge sense (provisioning.service.recovery): a commit carrying
Updates is accepted only from the member asked, and only if it carries exactly the proposals
that request carried (``check_updates``: ``ds.commit.unauthorized`` otherwise, and
``ds.commit.unsolicited`` for Updates nobody asked to commit).

Why ``BATCH`` = 500: an Update is about 150 bytes in a commit, but the commit's path secrets go
to the copath resolutions, which Updates blank: with every other leaf updated, the committer
seals its path secrets to about one key per member (about 120 bytes each). At N = 1,000 the
second of two commits is ~190 KB, under the 256 KiB a ``group.commit`` may be; one commit of all
999 would be ~260 KB. Groups much larger than ~1,500 members would need larger commit messages:
the per-member ciphertexts alone approach the limit there (docs/treekem.md, "Who updates when").
"""

from __future__ import annotations

import logging
from typing import Final

from sqlalchemy.orm import Session

from agent.protocol.errors import ProtocolError
from agent.protocol.mls.messages import Commit, Update
from agent.protocol.topics import device_cmd_topic
from agent.protocol.wire.messages.group import UpdateProposal
from agent.protocol.wire.messages.service import (
    CommitAction,
    CommitRequest,
    UpdateProposalRequest,
)
from provisioning.registry import PendingChange, Registry
from provisioning.service import rekeypolicy, store
from provisioning.service.context import Call
from provisioning.service.effects import Effects, Log, StartNext
from provisioning.service.model import Job, JobState
from provisioning.service.store import rekey as rows

log = logging.getLogger("keyfleet.service")

BATCH: Final = 500
"""Most Update proposals one commit carries (module docstring)."""


def is_batch(job: Job) -> bool:
    """A full-rekey job: an update job naming two or more members (one names one: aimed)."""
    return job.action is CommitAction.UPDATE and len(job.candidates) >= 2


def plan(cx: Call, session: Session, group_id: str) -> list[Job]:
    """The jobs of ``rekey --full``: one full-rekey job over every member with a leaf (an
    aimed self-update when there is only one)."""
    members = [
        m
        for m in Registry(session).members(group_id)
        if m.leaf_index is not None and m.pending is not PendingChange.REMOVE
    ]
    if not members:
        raise ProtocolError("ds.rekey.empty", f"group {group_id!r} has no member to update")
    if len(members) == 1:
        return [rekeypolicy.aimed_update(cx, group_id, members[0].device_id)]
    members.sort(key=lambda m: m.leaf_index if m.leaf_index is not None else 0)
    names = tuple(m.device_id for m in members)
    return [
        Job(CommitAction.UPDATE, group_id, None, cx.env.new_id(), persistent=True, candidates=names)
    ]


def first_updates(cx: Call, group_id: str, founders: tuple[str, ...]) -> Job:
    """The full-rekey job that ends a group's creation: every joiner's first update (its
    KeyPackage's leaf key replaced, docs/treekem.md "Joining") as Update proposals, committed
    in ceil((N - 1) / BATCH) commits, instead of one self-update commit per joiner that each
    member processes (O(N^2)). ``ask`` asks those of ``founders`` that hold a leaf by then.
    Detached from the creation's operation: the creation is done when every founder joined and
    agrees; this job follows like the rekey policy's updates (a joiner that sends no proposal
    gets an aimed update, and asks for its first update itself too)."""
    return Job(
        CommitAction.UPDATE,
        group_id,
        None,
        cx.env.new_id(),
        persistent=True,
        candidates=founders,
        detached=True,
    )


def members_ready(cx: Call, job: Job, now: int) -> bool:
    """Whether to ask for proposals now: every member the job names that holds a leaf is
    proven at the group's epoch (it acked it: a joiner has opened its Welcome), or the job has
    waited half an ``ack_timeout`` for them. A member asked before it holds the epoch cannot
    answer in time, and would then need a commit of its own."""
    from provisioning.service import jobs  # noqa: PLC0415 - jobs routes to this module

    if job.state is JobState.WAITING and job.deadline != 0 and now >= job.deadline:
        return True

    def read(session: Session) -> bool:
        registry = Registry(session)
        named = set(job.candidates)
        members = [
            m.device_id
            for m in registry.members(job.group_id)
            if m.leaf_index is not None and m.device_id in named
        ]
        at_epoch = jobs.proven_at_epoch(session, job.group_id, registry.group(job.group_id).epoch)
        return all(m in at_epoch for m in members)

    return cx.env.read(read)


def wait_for_members(cx: Call, job: Job, now: int) -> None:
    """Hold the job (``members_ready``): acks start it again, the tick at the latest."""
    from provisioning.service import jobs  # noqa: PLC0415 - jobs routes to this module

    if job.state is not JobState.WAITING or job.deadline == 0:
        job.state = JobState.WAITING
        job.deadline = now + max(1, cx.env.settings.ack_timeout // 2)
        jobs.claim(cx, job, now)


# -- 1. proposals ------------------------------------------------------------------------------


def ask(cx: Call, job: Job, now: int) -> None:
    """Ask every member of the job for an Update at the group's epoch."""
    from provisioning.service import jobs  # noqa: PLC0415 - jobs routes to this module

    def read(session: Session) -> tuple[int, list[str]]:
        registry = Registry(session)
        members = {m.device_id for m in registry.members(job.group_id) if m.leaf_index is not None}
        return registry.group(job.group_id).epoch, [d for d in job.candidates if d in members]

    epoch, members = cx.env.read(read)
    cx.env.tx(lambda s: rows.drop_proposals(s, job.request_id))
    job.state = JobState.PROPOSALS
    job.request_epoch = epoch
    job.committer = None
    job.deadline = now + cx.env.settings.commit_request_timeout
    if not jobs.claim(cx, job, now):
        return
    log.info(
        "asked %d members of %s for Update proposals at epoch %s", len(members), job.group_id, epoch
    )
    for device_id in members:
        cx.send(
            device_cmd_topic(device_id),
            UpdateProposalRequest(job.request_id, job.group_id, epoch),
            to=device_id,
            now=now,
        )


def on_proposal(cx: Call, session: Session, sender: str, body: UpdateProposal, now: int) -> Effects:
    """A member's Update for the full-rekey job ``body.command_id``: kept if the job is
    collecting at that epoch, the sender is one of its members, and the Update is for the
    sender's own leaf and signed by it (``mls.leaf.signature``); ``ds.rekey.proposal``
    otherwise. When every member answered, the job moves on."""
    from provisioning.service import commits  # noqa: PLC0415 - commits imports this module

    job = store.job_by_request(session, body.command_id)
    if (
        job is None
        or not is_batch(job)
        or job.group_id != body.group_id
        or job.state is not JobState.PROPOSALS
        or job.deadline == 0
        or job.request_epoch != body.epoch
        or sender not in job.candidates
    ):
        raise ProtocolError(
            "ds.rekey.proposal", f"{sender!r}: no Update proposal of {body.group_id!r} asked"
        )
    public, _ = commits.load_public(session, body.group_id, cx.env.groups)
    update = Update.decode(body.update)
    old = public.tree.leaf(update.leaf_index)
    if old is None or old.device_id != sender.encode():
        raise ProtocolError("ds.rekey.proposal", f"{sender!r}: the Update is for another leaf")
    update.leaf(old).verify(public.group_id, update.leaf_index)
    rows.put_proposal(
        session,
        job.request_id,
        group_id=job.group_id,
        device_id=sender,
        epoch=body.epoch,
        leaf_index=update.leaf_index,
        proposal=body.update,
        now=now,
    )
    if len(rows.proposals(session, job.request_id)) < len(job.candidates):
        return []
    return [
        Log(logging.INFO, "every member of %s proposed an Update", (job.group_id,)),
        StartNext(job.group_id),
    ]


# -- 2. commits --------------------------------------------------------------------------------


def ready(cx: Call, job: Job, now: int) -> bool:
    """Whether the job's collection is over (every member answered, or its time is up)."""
    if job.deadline == 0 or now >= job.deadline:
        return True
    return len(cx.env.read(lambda s: rows.proposals(s, job.request_id))) >= len(job.candidates)


def commit_next(cx: Call, job: Job, now: int) -> None:
    """Ask one member to commit the next batch of proposals with its own self-update. The
    first time (collection just ended), members that sent no proposal get aimed self-updates
    queued behind this job."""
    from provisioning.service import jobs  # noqa: PLC0415 - jobs routes to this module

    first = job.deadline != 0
    choice = cx.env.read(lambda s: jobs.choose_committer(cx, s, job, now))
    if choice is None:
        return  # nobody at the epoch yet: tick_jobs tries again
    committer, epoch = choice
    job.state = JobState.REQUESTED
    job.committer = committer
    job.request_epoch = epoch
    job.deadline = now + cx.env.settings.commit_request_timeout
    if not jobs.claim(cx, job, now):
        return  # another instance moved the job first: it asks

    def work(session: Session) -> list[bytes]:
        if first:
            answered = {p.device_id for p in rows.proposals(session, job.request_id)}
            for device_id in job.candidates:
                if device_id not in answered:
                    aimed = rekeypolicy.aimed_update(cx, job.group_id, device_id)
                    aimed.command_id = job.command_id
                    store.insert_job(session, aimed, now)
        # the committer's own proposal is not in its commit: its UpdatePath renews its leaf
        others = [p for p in rows.proposals(session, job.request_id) if p.device_id != committer]
        batch = others[:BATCH]
        rows.mark_requested(session, job.request_id, [p.device_id for p in batch], epoch)
        return [p.proposal for p in batch]

    updates = cx.env.tx(work)
    request = CommitRequest(
        command_id=job.request_id,
        group_id=job.group_id,
        epoch=epoch,
        action=CommitAction.UPDATE,
        updates=tuple(updates) or None,
    )
    log.info(
        "asked %s to commit %d Update proposals of %s at epoch %s",
        committer,
        len(updates),
        job.group_id,
        epoch,
    )
    cx.send(device_cmd_topic(committer), request, to=committer, now=now)


def check_updates(session: Session, job: Job | None, commit: Commit, epoch: int) -> None:
    """A commit carrying Updates is taken only as the answer to a full-rekey job's request,
    with exactly the proposals that request carried; a full-rekey job's request is answered
    only with them (``ds.commit.unsolicited`` / ``ds.commit.unauthorized``)."""
    if job is None or not is_batch(job):
        if commit.content.updates:
            raise ProtocolError(
                "ds.commit.unsolicited", "nobody asked for a commit of members' Updates"
            )
        return
    asked = sorted(rows.requested(session, job.request_id, epoch))
    carried = sorted(u.encode() for u in commit.content.updates)
    if carried != asked:
        raise ProtocolError(
            "ds.commit.unauthorized",
            f"the commit carries {len(carried)} Updates, not the {len(asked)} asked for",
        )


def after_commit(session: Session, job: Job, committer: str, updated: list[str]) -> bool:
    """A commit of the job's batch was accepted: forget its proposals and the committer's own
    (its commit renewed its leaf). True if proposals are left (the job stays open, its next
    batch goes out at the new epoch)."""
    rows.drop_proposals(session, job.request_id, [committer, *updated])
    if not rows.proposals(session, job.request_id):
        return False
    job.state = JobState.PROPOSALS
    job.deadline = 0  # collection is over: the next start commits the next batch
    job.committer = None
    job.tried.clear()
    return True


def forget(session: Session, job: Job) -> None:
    """The job ended without committing everything: its proposals go."""
    rows.drop_proposals(session, job.request_id)
