"""Wedge protection: who may commit, and what the service does when members cannot process a
commit it accepted (docs/threat-model.md, "An insider wedging a group").

1. **The service asks for commits.** A commit is *solicited* when it answers a commit request
   the service sent to that very member (the job's current committer, or one it asked earlier
   for the same job) at the group's current epoch. Anything else is unsolicited and refused
   with ``ds.commit.unsolicited`` unless ``[groups] member_updates`` allows member-initiated
   self-updates; then a member may commit unasked only once
   ``member_update_min_interval_seconds`` passed since its last commit of any kind in the group
   (``ds.commit.rate``): every commit renews its committer's leaf and path, so a member that
   committed recently has nothing to rotate. A commit that adds or
   removes members is never accepted unsolicited. Members ask for a self-update with
   ``group.update_request`` (the service queues an update job and asks them): no legitimate flow
   commits unasked.

2. **Recovery decision** (pure: ``decide``). Members that cannot process an accepted commit
   report it (``group.commit_refused``: group, epoch, commit hash, check id among
   ``REFUSAL_CHECKS`` of agent.protocol.wire.messages.group) and stay at the previous epoch.
   A report cannot be verified publicly (only the reporter's private leaf key shows that its
   path ciphertext is junk), so the service counts witnesses: it rolls back when at least
   ``MIN_WITNESSES`` distinct members other than the committer reported the commit's exact
   hash *and* reporters outnumber the members (other than the committer) that acked the new
   epoch. The decision waits until every other member answered (ack or report) or
   ``recovery_wait`` seconds passed since acceptance, so a fast liar's report cannot overtake
   honest acks.

   Why this threshold: one lying member can never trigger anything (a second witness is
   needed); a few colluding liars cannot roll back an honest commit that the rest of the group
   processed (the acks outnumber them); and a junk commit, which nobody but its committer can
   process, has no acks at all, so two honest reports suffice in any group of three or more.
   What a successful rollback does is bounded anyway: it restores the epoch the reporters
   hold (nobody gains access to anything they did not have) and removes the committer of the
   rolled-back commit, never a reporter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum

from agent.protocol.errors import ProtocolError
from agent.protocol.wire.messages.service import CommitAction
from provisioning.service.model import Job, JobState, ServiceSettings

MIN_WITNESSES = 2
"""Distinct members (never the committer) whose reports a rollback needs at least (in a group
of two, the one other member: nothing tells the two apart, and the rollback leaves the
reporter alone in the group)."""


def commit_hash(commit: bytes) -> bytes:
    """The hash a member names an accepted commit by (SHA-256 of the commit's bytes)."""
    return hashlib.sha256(commit).digest()


# -- 1. solicited commits --------------------------------------------------------------------


def asked(job: Job | None, sender: str, epoch: int) -> bool:
    """Whether ``job`` is a commit request the service sent to ``sender`` for ``epoch``."""
    if job is None or job.state is not JobState.REQUESTED or job.request_epoch != epoch:
        return False
    return sender == job.committer or sender in job.tried


def check_member_update(
    settings: ServiceSettings,
    *,
    group_id: str,
    sender: str,
    last_commit_at: int | None,
    now: int,
) -> None:
    """An unsolicited self-update: refused unless the policy allows member-initiated updates,
    and then at most one per ``member_update_min_interval`` per member and group."""
    if not settings.member_updates:
        raise ProtocolError(
            "ds.commit.unsolicited",
            f"group {group_id!r}: nobody asked {sender!r} for a commit and member-initiated "
            "updates are off ([groups] member_updates)",
        )
    if last_commit_at is not None and now - last_commit_at < settings.member_update_min_interval:
        raise ProtocolError(
            "ds.commit.rate",
            f"group {group_id!r}: {sender!r} committed {now - last_commit_at}s ago; at most one "
            f"self-update per {settings.member_update_min_interval}s",
        )


def check_solicited(
    settings: ServiceSettings,
    job: Job | None,
    *,
    group_id: str,
    sender: str,
    epoch: int,
    changes_members: bool,
    answered: Job | None,
    last_commit_at: int | None,
    now: int,
) -> Job | None:
    """The job a commit answers (None for a plain update that fulfils no open job); raises
    ``ds.commit.unsolicited`` or ``ds.commit.rate`` otherwise. ``job``: the group's head job;
    ``answered``: the job of the request the commit's ``command_id`` names, if any (a request
    the service sent and then withdrew, e.g. its operation timed out, is still one it asked:
    a plain update answering it is taken); ``changes_members``: the commit adds or removes
    members (never allowed unasked; commits.check_commit then checks that it does exactly
    what the job asks)."""
    if asked(job, sender, epoch):
        assert job is not None
        if not changes_members and job.action in (CommitAction.ADD, CommitAction.REMOVE):
            raise ProtocolError(
                "ds.commit.unsolicited",
                f"group {group_id!r}: {sender!r} was asked to {job.describe()}, not to update",
            )
        return job
    if changes_members:
        raise ProtocolError(
            "ds.commit.unsolicited",
            f"group {group_id!r}: nobody asked {sender!r} for a commit that changes members",
        )
    if (
        answered is not None
        and answered.group_id == group_id
        and answered.action is CommitAction.UPDATE
        and answered.state is JobState.CANCELLED
        and answered.request_epoch == epoch
        and (sender == answered.committer or sender in answered.tried)
    ):
        return None
    check_member_update(
        settings, group_id=group_id, sender=sender, last_commit_at=last_commit_at, now=now
    )
    return None


# -- 2. recovery decision --------------------------------------------------------------------


class Verdict(StrEnum):
    WAIT = "wait"  # not everyone answered and the wait has not passed
    STANDS = "stands"  # the commit stays (too few witnesses, or acks outnumber reports)
    ROLLBACK = "rollback"  # roll back to the commit's epoch and remove its committer


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    witnesses: tuple[str, ...]  # reporters counted (sorted; never the committer)
    acks: tuple[str, ...]  # members other than the committer that acked the new epoch
    reason: str


def decide(
    *,
    committer: str,
    members: Collection[str],
    reports: Mapping[str, bytes],
    acks: Collection[str],
    commit: bytes,
    accepted_at: int,
    now: int,
    wait: int,
) -> Decision:
    """What to do about a commit (made by ``committer``) that some members reported.

    ``members``: the group's members at the commit's epoch; ``reports``: reporter -> the commit
    hash it named; ``acks``: members that acked the epoch the commit started."""
    wanted = commit_hash(commit)
    others = set(members) - {committer}
    witnesses = tuple(sorted(d for d, h in reports.items() if d in others and h == wanted))
    ackers = tuple(sorted(set(acks) & others - set(witnesses)))
    answered = set(witnesses) | set(ackers)
    if answered < others and now - accepted_at < wait:
        return Decision(Verdict.WAIT, witnesses, ackers, "waiting for the other members")
    needed = min(MIN_WITNESSES, len(others))
    if len(witnesses) < needed or not witnesses:
        return Decision(
            Verdict.STANDS,
            witnesses,
            ackers,
            f"{len(witnesses)} member(s) reported it; a rollback needs {needed}",
        )
    if len(witnesses) <= len(ackers):
        return Decision(
            Verdict.STANDS,
            witnesses,
            ackers,
            f"{len(ackers)} member(s) processed it, {len(witnesses)} reported it",
        )
    return Decision(
        Verdict.ROLLBACK,
        witnesses,
        ackers,
        f"{len(witnesses)} member(s) cannot process it, {len(ackers)} did",
    )
