"""Catch-up: on any verified report from a device that is behind in a group, the service
replays the missing commits from the commit log on the device's command topic; if retention
already dropped them, it removes and re-adds the device (fresh key package, fresh welcome:
``re_add``). docs/service.md, "Catch-up".

A device is behind when the newest epoch it is proven to hold (its acks, commits it made, the
epoch it joined at) is older than the group's. A single missing commit younger than
``catchup_grace`` seconds is left alone (its relay on ``grp/{G}/commit`` is still on its way),
and the same range is not replayed to the same device again within ``catchup_repeat`` seconds
by this instance (``Env.catchup_sent``, a harmless cache: another instance may replay a range
once more, and a member drops commits it already has).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet

from sqlalchemy.orm import Session

from agent.protocol.errors import ProtocolError
from agent.protocol.topics import device_cmd_topic
from agent.protocol.wire.messages.group import CommitMessage
from agent.protocol.wire.messages.service import CommitAction
from provisioning import audit
from provisioning.registry import GroupRecord, Outcome, PendingChange, Registry
from provisioning.service import jobs, store
from provisioning.service.context import Call
from provisioning.service.model import Job

log = logging.getLogger("keyfleet.service")

# (group, commits to replay, the group's current epoch) per group a device is behind in
Replays = list[tuple[str, list[CommitMessage], int]]


def catch_up(cx: Call, device_id: str, now: int) -> None:
    """Replay the commits a member missed on its command topic; if retention dropped them,
    re-add it with a fresh welcome (docs/service.md, "Catch-up")."""
    catch_up_many(cx, [device_id], now)


def catch_up_many(
    cx: Call,
    device_ids: Sequence[str],
    now: int,
    *,
    acked: AbstractSet[tuple[str, str, int]] = frozenset(),
) -> None:
    """``catch_up`` for several devices, in one read session. ``acked`` holds (group,
    device, epoch) of acks just committed: a device whose ack is for its group's current
    epoch is known to be there, and is not planned a catch-up in that group."""
    if not device_ids:
        return

    def plan(session: Session) -> list[tuple[str, Replays, list[str]]]:
        registry = Registry(session)
        groups: dict[str, GroupRecord] = {}
        proven: dict[tuple[str, str], int] | None = None
        epochs: dict[str, int] | None = None
        if len(device_ids) > 1:
            # the memberships, their groups' epochs and the epochs the devices are proven to
            # hold, for every membership at once (one query)
            facts = store.catch_up_facts(session, device_ids)
            memberships, epochs, proven = facts.memberships, facts.epochs, facts.proven
        else:
            memberships = store.memberships(session, device_ids)
        plans = []
        for device_id in device_ids:
            replays, readd = plan_catch_up(
                cx,
                session,
                registry,
                device_id,
                memberships=memberships.get(device_id, []),
                groups=groups,
                acked=acked,
                now=now,
                proven=proven,
                epochs=epochs,
            )
            if replays or readd:
                plans.append((device_id, replays, readd))
        return plans

    for device_id, replays, readd in cx.env.read(plan):
        send_catch_up(cx, device_id, replays, readd, now)


def plan_catch_up(
    cx: Call,
    session: Session,
    registry: Registry,
    device_id: str,
    *,
    memberships: Sequence[store.Membership],
    groups: dict[str, GroupRecord],
    acked: AbstractSet[tuple[str, str, int]],
    now: int,
    proven: Mapping[tuple[str, str], int] | None = None,
    epochs: Mapping[str, int] | None = None,
) -> tuple[Replays, list[str]]:
    """What to send ``device_id`` so it catches up: (group, commits, current epoch) to
    replay, and the groups whose needed commits retention dropped (re-add). ``epochs``: the
    groups' current epochs, read already (a group's row is then read only for a device
    behind in it)."""
    replays: Replays = []
    readd: list[str] = []
    for member in memberships:
        if member.leaf_index is None or member.pending is PendingChange.REMOVE:
            continue
        group_id = member.group_id
        epoch = None if epochs is None else epochs.get(group_id)
        if epoch is None:
            group = groups.get(group_id)
            if group is None:
                group = groups[group_id] = registry.group(group_id)
            epoch = group.epoch
        if (group_id, device_id, epoch) in acked:
            continue
        found = None if proven is None else proven.get((group_id, device_id))
        known = (
            store.known_epoch(session, group_id, device_id, member.joined_epoch or 0)
            if found is None
            else found
        )
        if known >= epoch:
            continue
        group = groups.get(group_id)
        if group is None:
            group = groups[group_id] = registry.group(group_id)
        if cx.env.catchup_sent.get((group.group_id, device_id), (-1, -1, -1))[:2] == (
            known,
            group.epoch,
        ) and now - cx.env.catchup_sent[(group.group_id, device_id)][2] < (
            cx.env.settings.catchup_repeat
        ):
            continue
        try:
            commits = registry.commits_from(group.group_id, known)
        except ProtocolError as err:
            if err.check == "ds.catchup.pruned":
                readd.append(group.group_id)
            continue
        if len(commits) == 1 and now - commits[0].accepted_at < cx.env.settings.catchup_grace:
            continue  # the relay on grp/G/commit is still on its way
        replays.append(
            (
                group.group_id,
                [CommitMessage(c.group_id, c.epoch, c.commit) for c in commits],
                group.epoch,
            )
        )
    return replays, readd


def send_catch_up(
    cx: Call,
    device_id: str,
    replays: Replays,
    readd: list[str],
    now: int,
) -> None:
    for group_id, commits, current in replays:
        log.info(
            "catch-up: %s is behind in %s; replaying %d commit(s) up to epoch %s",
            device_id,
            group_id,
            len(commits),
            current,
        )
        for message in commits:
            cx.send(device_cmd_topic(device_id), message, to=device_id, now=now)
        cx.env.catchup_sent[(group_id, device_id)] = (commits[0].epoch, current, now)
    for group_id in readd:
        re_add(cx, group_id, device_id, now)


def re_add(cx: Call, group_id: str, device_id: str, now: int) -> None:
    def work(session: Session) -> bool:
        if any(
            row.action == CommitAction.ADD.value and row.member == device_id
            for row in store.open_job_rows(session, group_id)
        ):
            return False  # a re-add (or an operator's add) is already under way
        registry = Registry(session)
        others = [
            m
            for m in registry.members(group_id)
            if m.leaf_index is not None and m.device_id != device_id
        ]
        if not others:
            return False
        registry.request_remove(group_id, device_id, now=now)
        audit.append(
            session,
            now=now,
            actor="service",
            action="group.readd",
            target=group_id,
            outcome=Outcome.ACCEPTED,
            reason="the member is behind the commit log's retention: fresh welcome",
            details={"device": device_id},
        )
        for action in (CommitAction.REMOVE, CommitAction.ADD):
            store.insert_job(
                session, Job(action, group_id, device_id, cx.env.new_id(), persistent=True), now
            )
        return True

    if not cx.env.tx(work):
        return
    log.info(
        "catch-up: %s is beyond retention in %s; removing and re-adding it", device_id, group_id
    )
    jobs.start_next(cx, group_id, now)
