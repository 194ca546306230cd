"""Wedge recovery, the flow (the decision is ``recovery.decide``; docs/threat-model.md, "An
insider wedging a group", docs/operations.md "Wedge recovery").

A member that cannot process an accepted commit reports it (``group.commit_refused``); the
report is recorded (``on_commit_refused``). Every tick, each reported commit is judged
(``recovery_tick``):

- **rollback**: the group's public state goes back to the epoch the reporters hold (the tree and
  GroupContext kept before the commit), the commit leaves the commit log (catch-up never replays
  it again), the acks of the epoch it started are dropped; its committer is quarantined and
  removed from every group it is in through the quarantine path (persistent remove jobs that an
  honest member commits under the standing policy; in this group asked of a witness first, the
  one nearest to the committer in the tree: a witness just showed it is there and holds the
  epoch, while the committer's nearest neighbour may be the member that stayed silent); members
  that had acked the rolled-back epoch are re-added with a fresh welcome; audited as
  ``group.rollback``.
- **stands**: the commit stays; the reporters (a liar, or members a partly junk commit left
  behind) are re-added with a fresh welcome; audited as ``group.commit_reports``.

Only a group's newest commit can be rolled back, and only one that changes no members (a junk
commit that adds or removes members is audited and left to the operator).
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from agent.protocol.errors import ProtocolError
from agent.protocol.mls.messages import Commit
from agent.protocol.wire.messages.group import CommitRefused
from provisioning import audit
from provisioning.registry import DeviceState, Outcome, Registry
from provisioning.service import catchup, jobs, operators, store
from provisioning.service.context import Call
from provisioning.service.effects import Effects, Log
from provisioning.service.model import GROUP_ELIGIBLE, JobState
from provisioning.service.recovery import Decision, Verdict, commit_hash, decide
from provisioning.service.store import wedge as wedge_store

log = logging.getLogger("keyfleet.service")


def on_commit_refused(
    cx: Call, session: Session, sender: str, body: CommitRefused, now: int
) -> Effects:
    """Record a member's report of a commit it cannot process (judged on the next tick)."""
    registry = Registry(session)
    if not any(
        m.device_id == sender and m.leaf_index is not None for m in registry.members(body.group_id)
    ):
        raise ProtocolError(
            "ds.group.member", f"{sender!r} is not a member of group {body.group_id!r}"
        )
    group = registry.group(body.group_id)
    if body.epoch != group.epoch - 1:
        # Only the group's newest commit can be rolled back; an older one is history (the
        # member is behind: catch-up or a re-add brings it on).
        raise ProtocolError(
            "ds.recovery.epoch",
            f"group {body.group_id!r} is at epoch {group.epoch}: a report about the commit of "
            f"epoch {body.epoch} is not about its newest commit",
        )
    entry = store.commit_at(session, body.group_id, body.epoch)
    if entry is None or commit_hash(entry.commit) != body.commit_hash:
        # a late report about a commit already rolled back (the epoch has a new commit since)
        raise ProtocolError(
            "ds.recovery.commit",
            f"group {body.group_id!r}: the report names another commit than the one accepted "
            f"in epoch {body.epoch}",
        )
    if not wedge_store.add_report(session, sender, body, now=now):
        return []
    audit.append(
        session,
        now=now,
        actor=f"device:{sender}",
        action=CommitRefused.TYPE,
        target=body.group_id,
        outcome=Outcome.ACCEPTED,
        reason=f"[{body.check}] cannot process the commit of epoch {body.epoch}",
        details={"epoch": body.epoch, "check": body.check, "commit": body.commit_hash.hex()},
    )
    return [
        Log(
            logging.WARNING,
            "%s cannot process the commit of %s epoch %s: [%s]",
            (sender, body.group_id, body.epoch, body.check),
        ),
    ]


def recovery_tick(cx: Call, now: int) -> None:
    """Judge every reported commit whose members all answered or whose wait passed."""
    for group_id, epoch in cx.env.read(wedge_store.reported):
        settle(cx, group_id, epoch, now)


def settle(cx: Call, group_id: str, epoch: int, now: int) -> Decision | None:
    """Judge the reports about the commit of ``epoch``; act on a decision (one instance does:
    the reports are dropped in the same transaction, and a rollback is conditional on the
    group's epoch)."""

    def work(session: Session) -> tuple[Decision, str, list[str], set[str]] | None:
        registry = Registry(session)
        group = registry.group(group_id)
        entry = store.commit_at(session, group_id, epoch)
        if group.epoch != epoch + 1 or entry is None:
            wedge_store.drop_reports(session, group_id, epoch)  # the group moved on
            return None
        members = [m.device_id for m in registry.members(group_id) if m.leaf_index is not None]
        decision = decide(
            committer=entry.committer,
            members=members,
            reports=wedge_store.reports(session, group_id, epoch),
            acks=store.acked_at(session, group_id, epoch + 1),
            commit=entry.commit,
            accepted_at=entry.accepted_at,
            now=now,
            wait=cx.env.settings.recovery_wait,
        )
        if decision.verdict is Verdict.WAIT:
            return None
        wedge_store.drop_reports(session, group_id, epoch)
        details: dict[str, str | int | None] = {
            "epoch": epoch,
            "committer": entry.committer,
            "witnesses": ",".join(decision.witnesses),
            "acks": ",".join(decision.acks),
        }
        content = Commit.decode(entry.commit).content
        if decision.verdict is Verdict.ROLLBACK and (content.adds or content.removes):
            decision = Decision(
                Verdict.STANDS,
                decision.witnesses,
                decision.acks,
                decision.reason + "; it changes members: not rolled back (operator)",
            )
        if decision.verdict is Verdict.ROLLBACK and not wedge_store.roll_back(
            session, group_id, epoch, now=now
        ):
            decision = Decision(
                Verdict.STANDS,
                decision.witnesses,
                decision.acks,
                decision.reason + "; its previous public state is not kept: not rolled back",
            )
        if decision.verdict is Verdict.STANDS:
            audit.append(
                session,
                now=now,
                actor="service",
                action="group.commit_reports",
                target=group_id,
                outcome=Outcome.REFUSED,
                reason=f"the commit stands: {decision.reason}; reporters re-added",
                details=details,
            )
            return decision, entry.committer, list(decision.witnesses), set()
        groups: set[str] = set()
        device = registry.device(entry.committer)
        if device.state in GROUP_ELIGIBLE:
            registry.set_device_state(
                entry.committer,
                DeviceState.QUARANTINED,
                reason=f"its commit of {group_id} epoch {epoch} was rolled back"[:1000],
                now=now,
            )
            # asked of a witness first: it just showed it is there and holds the epoch (the
            # committer's nearest neighbour may be the member that stayed silent)
            _, groups = operators.plan_removal(
                cx, session, entry.committer, now, ask_first={group_id: decision.witnesses}
            )
        audit.append(
            session,
            now=now,
            actor="service",
            action="group.rollback",
            target=group_id,
            outcome=Outcome.ACCEPTED,
            reason=f"epoch {epoch + 1} -> {epoch}: {decision.reason}; committer quarantined",
            details={**details, "removal": ",".join(sorted(groups))},
        )
        return decision, entry.committer, list(decision.acks), groups

    try:
        result = cx.env.tx(work)
    except ProtocolError as err:
        log.warning(
            "cannot judge reports on %s epoch %s: [%s] %s", group_id, epoch, err.check, err.reason
        )
        return None
    if result is None:
        return None
    decision, committer, readd, groups = result
    cx.env.metrics.commits.inc(
        "rolled_back" if decision.verdict is Verdict.ROLLBACK else "reported"
    )
    if decision.verdict is Verdict.ROLLBACK:
        log.warning(
            "rolled %s back from epoch %s to %s (%s); %s quarantined, its removal queued",
            group_id,
            epoch + 1,
            epoch,
            decision.reason,
            committer,
        )
        jobs.cancel_adds_of(cx, committer, now)
        head = jobs.group_head(cx, group_id)
        if head is not None and head.state is JobState.REQUESTED and head.request_epoch > epoch:
            head.state = JobState.WAITING  # asked at the rolled-back epoch: ask again
            jobs.start(cx, head, now)
        for other in sorted(groups - {group_id}):
            jobs.start_next(cx, other, now)
        jobs.start_next(cx, group_id, now)
    else:
        log.warning("the commit of %s epoch %s stands: %s", group_id, epoch, decision.reason)
    for device_id in readd:
        catchup.re_add(cx, group_id, device_id, now)
    return decision
