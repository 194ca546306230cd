"""Every member's key moves: the rekey policy the service enforces, and full rekeys.

A member's leaf key changes only by that member's own commit (every commit carries an update
path: the committer's leaf is replaced). In an active group a member that never commits keeps
its leaf key, and with it the power to open every Welcome and path secret sealed to that key,
for as long as the key exists. So the service asks:

- **Policy.** Every member updates its own leaf at least every ``max_age`` seconds and at most
  ``max_epochs`` epochs after its last update (``RekeyPolicy``; a group's own row set by
  ``keyfleet group policy``, else the service's ``[groups]`` default; 0 turns a bound off). The
  service records each member's last self-update (``service_leaf_updates``: the epoch its leaf
  took effect in and when; a join counts as one) whenever it accepts a commit
  (``record_commit``), with when it falls due under the group's policy (``due_at``, and
  ``due_epoch``, which the commit that reaches it turns into ``due_at``: the check reads the
  ``due_at`` index alone, never the members not due; a policy change, or another configured
  default, computes them again; instances share the recorded default, ``_follows_default``).
  Every ``CHECK_SECONDS`` one instance (``rekey_tick``) asks each due member for a self-update
  commit: an update job aimed at that member only (``Job.candidates``), so the commit is
  solicited. A member asked and silent for
  ``commit_request_timeout`` (or not at the group's epoch within it) fails its job as a
  straggler (``ds.rekey.straggler``) and is asked again ``ASK_REPEAT_SECONDS`` later;
  ``leaf_ages`` reports each member's age, whether it is due, a straggler, or overdue past the
  grace (``grace``).
- **Full rekey.** ``provisioning.service.fullrekey``: every member proposes an Update and one
  member commits them in batches (a few commits, not one per member); members that do not
  propose fall back to an aimed self-update (``aimed_update``).

Pure parts (``RekeyPolicy``, ``parse_duration``, ``due``, ``status``) take a clock reading and
rows; the flows read and write through ``provisioning.service.store.rekey``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from sqlalchemy.orm import Session

from agent.protocol.errors import ProtocolError
from agent.protocol.topics import operator_result_topic
from agent.protocol.wire.messages.operator import GroupPolicy
from agent.protocol.wire.messages.result import OperatorResult, ResultStatus
from agent.protocol.wire.messages.service import CommitAction
from provisioning import audit
from provisioning.registry import Outcome, PendingChange, Registry
from provisioning.service import groupdelete, store, tasks
from provisioning.service.context import Call
from provisioning.service.effects import Effects, Log, Send
from provisioning.service.model import Job, ServiceSettings
from provisioning.service.store import rekey as rows

log = logging.getLogger("keyfleet.service")

# How often one instance looks for due members (a task lease, like the prune).
CHECK_SECONDS: Final = 10
# A member asked and silent is asked again after this long.
ASK_REPEAT_SECONDS: Final = 300
# The longest a policy may allow (a year) and the most epochs.
MAX_AGE_LIMIT: Final = 366 * 86_400
MAX_EPOCHS_LIMIT: Final = 1_000_000
TASK: Final = "service.rekey_policy"
# Another instance recorded another [groups] default (``_follows_default``).
DEFAULT_MISMATCH: Final = "ds.rekey.default-mismatch"
# Members holding a leaf without a row are looked for at an instance's first check, then this
# often, at most this many per check.
SWEEP_SECONDS: Final = 3600
SWEEP_LIMIT: Final = 1000

_DURATION = re.compile(r"(\d+)([smhdw]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}


def parse_duration(text: str) -> int:
    """Seconds in ``text``: ``45``, ``45s``, ``30m``, ``12h``, ``7d``, ``2w``; ``0`` or
    ``off``: no bound. ``ValueError`` (with what was expected) otherwise."""
    value = text.strip().lower()
    if value == "off":
        return 0
    match = _DURATION.fullmatch(value)
    if match is None:
        raise ValueError(f"{text!r} is not a duration: expected e.g. 7d, 12h, 30m, 45s or off")
    return int(match.group(1)) * _UNIT[match.group(2)]


def format_duration(seconds: int) -> str:
    if seconds == 0:
        return "off"
    for unit, size in (("w", 7 * 86_400), ("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@dataclass(frozen=True)
class RekeyPolicy:
    """Every member updates its own leaf at least every ``max_age`` seconds and after at most
    ``max_epochs`` epochs since its last update (0: that bound is off)."""

    max_age: int
    max_epochs: int

    def __post_init__(self) -> None:
        if not 0 <= self.max_age <= MAX_AGE_LIMIT:
            raise ProtocolError(
                "ds.rekey.policy", f"max_age must be 0..{MAX_AGE_LIMIT} seconds (0: off)"
            )
        if not 0 <= self.max_epochs <= MAX_EPOCHS_LIMIT:
            raise ProtocolError(
                "ds.rekey.policy", f"max_epochs must be 0..{MAX_EPOCHS_LIMIT} (0: off)"
            )

    @classmethod
    def default(cls, settings: ServiceSettings) -> RekeyPolicy:
        return cls(settings.rekey_max_age, settings.rekey_max_epochs)

    def looser_than(self, other: RekeyPolicy) -> bool:
        """True if this policy lets some leaf key live longer than ``other`` does (a bound
        raised, or turned off)."""

        def looser(mine: int, theirs: int) -> bool:
            return theirs != 0 and (mine == 0 or mine > theirs)

        return looser(self.max_age, other.max_age) or looser(self.max_epochs, other.max_epochs)

    def grace(self) -> int:
        """How long past due a member may stay before it is listed as overdue: a tenth of the
        age bound, at least an hour (a device asleep for the night is not an incident)."""
        return max(3600, self.max_age // 10)

    def describe(self) -> str:
        epochs = "off" if self.max_epochs == 0 else str(self.max_epochs)
        return f"max age {format_duration(self.max_age)}, max epochs {epochs}"


@dataclass(frozen=True)
class LeafUpdate:
    """A member's last self-update: its leaf key took effect at ``epoch`` at ``updated_at``;
    ``asked_at``: when the service last asked it for one and had no answer yet."""

    device_id: str
    epoch: int
    updated_at: int
    asked_at: int | None = None


def due(policy: RekeyPolicy, leaf: LeafUpdate, *, epoch: int, now: int) -> str | None:
    """Why ``leaf`` must update now (``"age"`` or ``"epochs"``), or None."""
    if policy.max_age and now - leaf.updated_at >= policy.max_age:
        return "age"
    if policy.max_epochs and epoch - leaf.epoch >= policy.max_epochs:
        return "epochs"
    return None


def to_ask(
    policy: RekeyPolicy,
    leaves: Sequence[LeafUpdate],
    *,
    epoch: int,
    now: int,
    repeat: int = ASK_REPEAT_SECONDS,
) -> list[LeafUpdate]:
    """The due members not asked within ``repeat`` seconds, oldest leaf first."""
    out = [
        leaf
        for leaf in leaves
        if due(policy, leaf, epoch=epoch, now=now) is not None
        and (leaf.asked_at is None or now - leaf.asked_at >= repeat)
    ]
    return sorted(out, key=lambda leaf: (leaf.updated_at, leaf.epoch, leaf.device_id))


@dataclass(frozen=True)
class LeafStatus:
    """What ``keyfleet group show`` and the dashboard say about one member's leaf."""

    device_id: str
    age: int  # seconds since its last self-update
    epochs: int  # epochs since
    due: str | None
    straggler: bool  # asked, and silent past the commit request timeout
    overdue: bool  # due for longer than the policy's grace

    def to_obj(self) -> dict[str, object]:
        return {
            "device": self.device_id,
            "age_seconds": self.age,
            "epochs": self.epochs,
            "due": self.due,
            "straggler": self.straggler,
            "overdue": self.overdue,
        }


def status(
    policy: RekeyPolicy,
    leaves: Sequence[LeafUpdate],
    *,
    epoch: int,
    now: int,
    answer_within: int,
) -> list[LeafStatus]:
    """Each member's leaf, oldest first."""
    out = []
    for leaf in leaves:
        reason = due(policy, leaf, epoch=epoch, now=now)
        since = _due_since(policy, leaf, epoch=epoch, now=now)
        out.append(
            LeafStatus(
                device_id=leaf.device_id,
                age=max(0, now - leaf.updated_at),
                epochs=max(0, epoch - leaf.epoch),
                due=reason,
                straggler=leaf.asked_at is not None and now - leaf.asked_at > answer_within,
                overdue=reason is not None and since is not None and now - since > policy.grace(),
            )
        )
    return sorted(out, key=lambda s: (-s.age, -s.epochs, s.device_id))


def _due_since(policy: RekeyPolicy, leaf: LeafUpdate, *, epoch: int, now: int) -> int | None:
    """When ``leaf`` became due by age (the epoch bound has no time: counted from the ask)."""
    if policy.max_age and now - leaf.updated_at >= policy.max_age:
        return leaf.updated_at + policy.max_age
    if policy.max_epochs and epoch - leaf.epoch >= policy.max_epochs:
        return leaf.asked_at if leaf.asked_at is not None else now
    return None


def bit_reversed(count: int) -> list[int]:
    """0..count-1 in bit-reversed order (0, n/2, n/4, 3n/4, ...): consecutive committers'
    direct paths overlap as little as possible, so after 2^k of them every node at depth
    <= k of a full tree has been re-keyed."""
    if count <= 1:
        return list(range(count))
    bits = (count - 1).bit_length()
    order = sorted(range(1 << bits), key=lambda i: int(f"{i:0{bits}b}"[::-1], 2))
    return [i for i in order if i < count]


# --- the service's side (I/O through store.rekey) -------------------------------------------


def group_policy(cx: Call, session: Session, group_id: str) -> RekeyPolicy:
    own = rows.policy(session, group_id)
    if own is None:
        return RekeyPolicy.default(cx.env.settings)
    return RekeyPolicy(*own)


def row_bounds(cx: Call, session: Session, group_id: str) -> rows.Bounds:
    """The policy a row of ``group_id`` is written under: the group's own, else the default
    the rows were computed with (the service's, until the check has recorded one)."""
    own, basis = rows.bounds_of(session, group_id)
    if own is not None:
        return own
    if basis is not None:
        return basis
    return cx.env.settings.rekey_max_age, cx.env.settings.rekey_max_epochs


def record_creator(cx: Call, session: Session, group_id: str, creator: str, now: int) -> None:
    """A new group's creator holds its leaf from epoch 0, now."""
    bounds = row_bounds(cx, session, group_id)
    rows.put_update(session, group_id, creator, epoch=0, now=now, bounds=bounds, group_epoch=0)


def leaves(session: Session, group_id: str, now: int) -> tuple[list[LeafUpdate], list[LeafUpdate]]:
    """Every member with a leaf, with its last self-update; and those of them the service has
    no row for yet (members from before the policy existed): they are counted from the epoch
    they joined at and, for age, from ``now`` (the first check that saw them), which the
    caller records, so an upgrade does not ask every old member at once."""
    registry = Registry(session)
    recorded = {r.device_id: r for r in rows.leaf_rows(session, group_id)}
    out, new = [], []
    for member in registry.members(group_id):
        if member.leaf_index is None or member.pending is PendingChange.REMOVE:
            continue
        row = recorded.get(member.device_id)
        if row is not None:
            out.append(LeafUpdate(member.device_id, row.epoch, row.updated_at, row.asked_at))
        else:
            joined = member.joined_epoch if member.joined_epoch is not None else 0
            leaf = LeafUpdate(member.device_id, joined, now)
            out.append(leaf)
            new.append(leaf)
    return out, new


def record_commit(
    session: Session,
    group_id: str,
    *,
    committer: str,
    epoch: int,
    added: Sequence[str],
    removed: Sequence[str],
    updated: Sequence[str] = (),
    now: int,
    bounds: rows.Bounds,
) -> None:
    """An accepted commit made at ``epoch``: its committer's leaf is new from ``epoch + 1``
    (every commit carries an update path), so is the leaf of every member whose Update it
    carries (a full rekey), an added member's leaf starts then, a removed member's row goes.
    ``bounds``: the group's policy (``row_bounds``), for the rows' due columns."""
    rows.put_updates(
        session,
        group_id,
        (committer, *updated, *added),
        epoch=epoch + 1,
        now=now,
        bounds=bounds,
        group_epoch=epoch + 1,
    )
    for device_id in removed:
        rows.forget(session, group_id, device_id)
    rows.mark_epoch_due(session, group_id, epoch + 1, now)


def aimed_update(cx: Call, group_id: str, device_id: str) -> Job:
    """An update job only ``device_id`` may fulfil (its own self-update)."""
    return Job(
        CommitAction.UPDATE,
        group_id,
        None,
        cx.env.new_id(),
        persistent=True,
        candidates=(device_id,),
        prefer=device_id,
    )


def is_aimed(job: Job) -> bool:
    return job.action is CommitAction.UPDATE and len(job.candidates) == 1


def rekey_tick(cx: Call, now: int) -> list[str]:
    """Every ``CHECK_SECONDS`` fleet-wide: ask each due member for a self-update (an aimed
    job queued in its group). Returns the groups whose queue grew (the caller starts them).

    It reads only what is due: the rows whose ``due_at`` has passed (one indexed read,
    ``store.rekey.due_rows``; a commit makes the rows its epoch brings to the epoch bound due at
    once, ``record_commit``), and opens a write transaction only for a group with such a row.
    Members without a row (from before the policy existed) are looked for at the first check of
    each instance and then every ``SWEEP_SECONDS``, ``SWEEP_LIMIT`` at a time."""
    if now < cx.env.rekey_next_at:
        return []
    cx.env.rekey_next_at = now + CHECK_SECONDS
    # reads first: most checks find nothing to do, and claiming the task takes two write
    # transactions (on SQLite the whole database's write lock)
    if not _has_work(cx, now) or not tasks.claim_task(cx, TASK, now):
        return []
    grew = []
    try:
        _follow_default(cx, now)
        _sweep_unrecorded(cx, now)
        due_groups = cx.env.read(lambda s: sorted({r.group_id for r, _ in rows.due_rows(s, now)}))
        for group_id in due_groups:

            def plan(session: Session, group_id: str = group_id) -> list[Job]:
                return _plan_asks(cx, session, group_id, now)

            for job in cx.env.tx(plan):
                log.info("asked %s for a self-update in %s (rekey policy)", job.prefer, group_id)
                grew.append(group_id)
    finally:
        tasks.finish_task(cx, TASK, now + CHECK_SECONDS)
    return list(dict.fromkeys(grew))


def _has_work(cx: Call, now: int) -> bool:
    """Whether the check has anything to do: the configured default is to be followed
    (``_follows_default``), members without a row are to be looked for, or a row is due."""
    if _sweep_due(cx, now):
        return True

    def read(session: Session) -> bool:
        return _follows_default(cx, rows.default_basis(session)) or rows.any_due(session, now)

    return cx.env.read(read)


def _configured(cx: Call) -> rows.Bounds:
    return cx.env.settings.rekey_max_age, cx.env.settings.rekey_max_epochs


def _follows_default(cx: Call, basis: rows.Bounds | None) -> bool:
    """Whether the rows are to be computed again for this instance's configured default, the
    recorded one being ``basis``. Yes when none is recorded (the first check after the upgrade)
    or this instance has not yet recorded its own (a restart with another ``[groups]``
    default). Not when another default was recorded after this instance's own: another
    instance runs with another ``[groups]`` default, and following it back would make the
    instances compute every row again by turns. The recorded one stays (``row_bounds``, what
    the check asks by), and the mismatch is counted and logged as ``ds.rekey.default-mismatch``
    until the instances share one configuration (docs/operations.md, "Rekey policy")."""
    configured = _configured(cx)
    held = cx.env.rekey_default_held
    if basis == configured:
        cx.env.rekey_default_held = configured
        return False
    if basis is None or held is None or basis == held:
        return True
    cx.env.metrics.rejections.inc(DEFAULT_MISMATCH)
    if cx.env.rekey_default_warned != basis:
        cx.env.rekey_default_warned = basis
        log.warning(
            "%s: another instance recorded the default rekey policy %s, this one's [groups] "
            "default is %s: the recorded one stays; give every instance the same [groups] "
            "configuration",
            DEFAULT_MISMATCH,
            RekeyPolicy(*basis).describe(),
            RekeyPolicy(*configured).describe(),
        )
    return False


def _sweep_due(cx: Call, now: int) -> bool:
    return cx.env.rekey_swept_at is None or now - cx.env.rekey_swept_at >= SWEEP_SECONDS


def _follow_default(cx: Call, now: int) -> None:
    """The rows of groups without their own policy computed again when the configured default
    is not the one they were computed with (a restart with another ``[groups]`` default; the
    first check after the upgrade that added the due columns computes every group's)."""
    default = _configured(cx)
    if not _follows_default(cx, cx.env.read(rows.default_basis)):
        return

    def recompute(session: Session) -> bool:
        basis = rows.default_basis(session)
        if not _follows_default(cx, basis):  # another instance's meanwhile, or ours
            return False
        if basis is None:
            for group_id, own in rows.own_policies(session).items():
                rows.recompute(session, own, repeat=ASK_REPEAT_SECONDS, group_id=group_id, now=now)
        rows.recompute(session, default, repeat=ASK_REPEAT_SECONDS, group_id=None, now=now)
        rows.set_default_basis(session, default)
        return True

    if not cx.env.tx(recompute):
        return
    cx.env.rekey_default_held = default
    log.info("rekey policy: default %s: due times computed again", RekeyPolicy(*default).describe())


def _sweep_unrecorded(cx: Call, now: int) -> None:
    """Rows for members holding a leaf without one, counted from the epoch they joined at and,
    for age, from ``now`` (the first check that saw them), so an upgrade does not ask every old
    member at once."""
    if not _sweep_due(cx, now):
        return
    found = cx.env.read(lambda s: rows.unrecorded(s, SWEEP_LIMIT))
    if found:

        def record(session: Session) -> None:
            for group_id, device_id, joined, group_epoch in found:
                rows.put_update(
                    session,
                    group_id,
                    device_id,
                    epoch=joined if joined is not None else 0,
                    now=now,
                    bounds=row_bounds(cx, session, group_id),
                    group_epoch=group_epoch,
                )

        cx.env.tx(record)
    if len(found) < SWEEP_LIMIT:  # else the next check goes on
        cx.env.rekey_swept_at = now


def _plan_asks(cx: Call, session: Session, group_id: str, now: int) -> list[Job]:
    found = rows.due_rows(session, now, group_id)
    if not found:
        return []
    epoch = found[0][1]
    bounds = row_bounds(cx, session, group_id)
    policy = RekeyPolicy(*bounds)
    waiting = {job.candidates[0] for job in store.open_jobs(session, group_id) if is_aimed(job)}
    leaves = {
        r.device_id: LeafUpdate(r.device_id, r.epoch, r.updated_at, r.asked_at) for r, _ in found
    }
    asking = to_ask(policy, list(leaves.values()), epoch=epoch, now=now)
    chosen = {leaf.device_id for leaf in asking}
    for row, _ in found:
        if row.device_id in chosen:
            continue
        # found but not to ask: not due (a looser policy since), or asked within the repeat
        # interval; written back so that the check finds it when it is next due
        leaf = leaves[row.device_id]
        not_due = due(policy, leaf, epoch=epoch, now=now) is None
        values = rows.due_values(
            bounds,
            epoch=row.epoch,
            updated_at=row.updated_at,
            asked_at=None if not_due else row.asked_at,
            repeat=ASK_REPEAT_SECONDS,
            group_epoch=epoch,
            now=now,
        )
        rows.set_due(session, row, values)
    asked = []
    for leaf in asking:
        if leaf.device_id in waiting:
            continue
        job = aimed_update(cx, group_id, leaf.device_id)
        store.insert_job(session, job, now)
        rows.mark_asked(
            session,
            group_id,
            leaf.device_id,
            epoch=leaf.epoch,
            updated_at=leaf.updated_at,
            now=now,
            repeat=ASK_REPEAT_SECONDS,
        )
        asked.append(job)
    return asked


def set_group_policy(
    cx: Call, session: Session, body: GroupPolicy, *, operator: str, command_id: bytes, now: int
) -> Effects:
    """``op.group_policy``: write the group's policy, audited with the one it replaces and
    whether it is looser; answered at once."""
    Registry(session).group(body.group_id)  # registry.group.unknown if there is none
    groupdelete.check_live(session, body.group_id)
    new = RekeyPolicy(body.max_age, body.max_epochs)
    old = group_policy(cx, session, body.group_id)
    rows.set_policy(
        session,
        body.group_id,
        max_age=new.max_age,
        max_epochs=new.max_epochs,
        operator=operator,
        now=now,
    )
    # the group's rows are due by the new policy from now on
    rows.recompute(
        session,
        (new.max_age, new.max_epochs),
        repeat=ASK_REPEAT_SECONDS,
        group_id=body.group_id,
        now=now,
    )
    audit.append(
        session,
        now=now,
        actor=f"operator:{operator}",
        action="group.rekey_policy",
        target=body.group_id,
        outcome=Outcome.ACCEPTED,
        details={
            "command_id": command_id.hex(),
            "max_age": new.max_age,
            "max_epochs": new.max_epochs,
            "was_max_age": old.max_age,
            "was_max_epochs": old.max_epochs,
            "looser": int(new.looser_than(old)),
        },
    )
    detail = f"{body.group_id}: {new.describe()} (was {old.describe()})"
    return [
        Log(logging.INFO, "rekey policy of %s set by %s: %s", (body.group_id, operator, detail)),
        Send(
            operator_result_topic(operator),
            OperatorResult.of(command_id, ResultStatus.DONE, detail),
            operator,
        ),
    ]


def leaf_ages(
    session: Session, group_id: str, settings: ServiceSettings, now: int
) -> list[LeafStatus]:
    """Each member's leaf age and standing under the group's policy, oldest first (for
    ``keyfleet group show`` and the dashboard)."""
    own = rows.policy(session, group_id)
    policy = RekeyPolicy.default(settings) if own is None else RekeyPolicy(*own)
    return status(
        policy,
        leaves(session, group_id, now)[0],
        epoch=Registry(session).group(group_id).epoch,
        now=now,
        answer_within=settings.commit_request_timeout,
    )
