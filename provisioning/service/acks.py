"""Acks: a member's ack of the epoch it reached, recorded with its epoch authenticator (the
registry refuses an ack for an epoch the group has not reached and notices a fork).

At a fleet rekey acks are nearly all the traffic, so acks received together are taken in one
transaction (``on_acks``): every sender's replay row is locked in sorted order (two instances
locking overlapping sets cannot deadlock), each ack is judged alone against its sender's window
under the lock, and then one progress check per group and one catch-up pass for the senders
run, instead of one per ack (docs/bench/README.md).
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from agent.protocol.errors import ProtocolError
from agent.protocol.wire.messages.ack import Ack as AckBody
from agent.protocol.wire.replay import ReplayGuard
from provisioning.registry import Registry, judge_ack
from provisioning.service import catchup, devices, jobs, rollout, store, verify
from provisioning.service.context import Call
from provisioning.service.effects import AckLatency, Effects, GroupChanged, Log
from provisioning.service.store import rollouts

log = logging.getLogger("keyfleet.service")


def _record(cx: Call, registry: Registry, sender: str, body: AckBody, now: int) -> None:
    registry.record_ack(
        body.group_id,
        epoch=body.epoch,
        device_id=sender,
        epoch_authenticator=body.epoch_authenticator,
        now=now,
        now_ms=cx.clock.ms,
    )


def on_ack(cx: Call, session: Session, sender: str, body: AckBody, now: int) -> Effects:
    _record(cx, Registry(session), sender, body, now)
    rollout.on_ack(session, sender, body.group_id, body.epoch, now)
    started = store.commit_at(session, body.group_id, body.epoch - 1)
    return [
        Log(logging.DEBUG, "ack from %s for %s epoch %s", (sender, body.group_id, body.epoch)),
        *(() if started is None else (AckLatency(store.commit_ms(started)),)),
        GroupChanged(body.group_id),
    ]


def on_acks(cx: Call, acks: list[verify.VerifiedReport], now: int) -> None:
    """Take the acks received together (``acks`` is emptied) in one transaction: the same
    checks and writes per ack as ``verify.accept_and`` + ``on_ack``, then one progress check per
    group and one catch-up pass for the senders.

    Every sender's replay row is locked first, in sorted order (``store.lock_guards``), so
    two instances locking overlapping sets cannot deadlock; each ack is then checked against
    its sender's window under that lock. An ack refused here (replay, not a member, epoch
    ahead, changed authenticator, quarantined sender) is refused alone: all of those checks
    run before the ack writes anything, and its replay window is updated on a copy that is
    kept only when the ack is taken, so the others' effects commit and its own do not, as if
    it had been handled on its own. If the transaction itself fails, each ack is tried on
    its own. One ack alone takes the ordinary path (``devices.take_batch``)."""
    batch = devices.take_batch(cx, acks, now)
    if batch is None:
        return
    taken: list[tuple[verify.VerifiedReport, int | None]] = []
    refused: list[tuple[verify.VerifiedReport, ProtocolError]] = []

    def work(session: Session) -> None:
        taken.clear()
        refused.clear()
        senders = sorted({m.sender for m in batch})
        # Read once for the batch, as plain columns: the senders' replay rows (locked), their
        # states and memberships, the groups' epochs, the acks already recorded.
        stored = store.lock_guards(session, senders)
        rows = store.load_ack_senders(
            session, senders, (m.body.group_id for m in batch if isinstance(m.body, AckBody))
        )
        bodies = [m.body for m in batch if isinstance(m.body, AckBody)]
        recorded = store.acks_recorded(
            session, ((b.group_id, b.epoch, m.sender) for m, b in zip(batch, bodies, strict=True))
        )
        new: list[tuple[str, int, str, bytes]] = []
        guards: dict[str, ReplayGuard] = {}
        in_rollout = rollouts.attested_devices(session, senders)
        # read before any write: a read after one would flush the acks one by one
        started_at: dict[tuple[str, int], int | None] = {}
        for commit in sorted({(b.group_id, b.epoch - 1) for b in bodies}):
            started = store.commit_at(session, *commit)
            started_at[commit] = None if started is None else store.commit_ms(started)
        for message in batch:
            sender = message.sender
            body = message.body
            assert isinstance(body, AckBody)
            guard = guards.get(sender)
            if guard is None:
                guard = store.load_guard(session, sender, memo=cx.guards, stored=stored)
            trial = guard.copy()
            try:
                trial.accept(message.message)
                # the registry judges epochs (see verify.accept_and)
                trial.forget_group(body.group_id)
                state = rows.states.get(sender)
                devices.check_state(sender, state)
                group_epoch = rows.epochs.get(body.group_id)
                if group_epoch is None:
                    raise ProtocolError("registry.group.unknown", f"no group {body.group_id!r}")
                key = (body.group_id, body.epoch, sender)
                # Registry.record_ack's checks; the new acks are inserted together below
                # (under the senders' replay row locks), last_seen by mark_heard
                if judge_ack(
                    body.group_id,
                    group_epoch=group_epoch,
                    device_id=sender,
                    leaf_index=rows.leaves.get((body.group_id, sender)),
                    epoch=body.epoch,
                    epoch_authenticator=body.epoch_authenticator,
                    recorded=recorded.get(key),
                ):
                    new.append((*key, body.epoch_authenticator))
                    recorded[key] = body.epoch_authenticator
                if sender in in_rollout:
                    rollout.on_ack(session, sender, body.group_id, body.epoch, now)
            except ProtocolError as err:
                refused.append((message, err))
                continue
            guards[sender] = trial
            taken.append((message, started_at[(body.group_id, body.epoch - 1)]))
        Registry(session).insert_acks(new, now=now, now_ms=cx.clock.ms)
        store.save_guards(session, guards, now=now, stored=stored)
        store.mark_heard(session, guards, now=now)

    if not devices.take_together(cx, batch, now, work, what="an ack"):
        return
    behind = devices.refuse_all(cx, refused, now)
    groups: list[str] = []
    current: set[tuple[str, str, int]] = set()
    for message, accepted_ms in taken:
        body = message.body
        assert isinstance(body, AckBody)
        cx.env.metrics.reports.inc(message.type)
        log.debug("ack from %s for %s epoch %s", message.sender, body.group_id, body.epoch)
        if accepted_ms is not None:
            cx.env.metrics.ack_latency.observe(max(0, cx.clock.ms - accepted_ms) / 1000)
        if body.group_id not in groups:
            groups.append(body.group_id)
        current.add((body.group_id, message.sender, body.epoch))
        behind.append(message.sender)
    for group_id in groups:
        jobs.group_changed(cx, group_id, now)
    catchup.catch_up_many(cx, list(dict.fromkeys(behind)), now, acked=current)
