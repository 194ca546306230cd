"""Staged rollouts of a firmware release (``keyfleet rollout``, docs/releases.md "Staged
rollout").

``op.rollout.start`` (an operator's signed command, audited) names an approved release, a group
and cumulative wave sizes; the waves are computed once (``plan_waves``: the group's members in
device id order, a percentage rounded up, at least one new device per wave) and stored with
every device's step. Everything after is driven by the database: the ``rollout`` task's holder
(one instance at a time, ``tasks.claim_task``) moves each rollout at every tick, and any instance
that takes a device's attestation report or keys.report updates that device's row. A service
killed mid-rollout loses nothing; the next holder of the task continues.

A device of the current wave goes ``checking`` (challenged: which release does it attest on,
what a rollback returns it to) -> ``installing`` (``release.install`` sent; nothing to install
if it already runs the release) -> ``attested`` (a trusted verdict on the release after the
install) -> ``passed`` (it acked the group's current epoch after that verdict: the service relays
the epoch's commit to it, which a member holding its group state answers with its ack, so a
device that lost its state cannot pass on an ack from before the update). The wave **passes**
when all its
devices passed, and the next wave starts. It **fails** (the rollout stops, reason and device
named) when a device attests untrusted, reports a failed install (``keys.report`` ``install``)
or the wave does not pass within ``rollout_wave_timeout`` (``timeout``). With ``rollback`` the
wave's devices that moved get ``release.install`` of their previous release and the rollout
ends ``rolled-back`` once each attests trusted on it.

A device whose agent restarted without finishing the install (a keys.report without it, then a
verdict on the old release) is sent the install again, up to ``MAX_ATTEMPTS`` times.

A device's release is the approved release whose expected PCR values its trusted quote showed
(``releases.matched_release``, the same match ``keyfleet release list`` counts devices by).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from functools import partial
from typing import Final

from sqlalchemy.orm import Session

from agent.protocol.errors import ProtocolError
from agent.protocol.topics import device_cmd_topic, operator_result_topic
from agent.protocol.wire.messages.group import CommitMessage
from agent.protocol.wire.messages.release import (
    InstallResult,
    InstallState,
    ReleaseInstall,
    RolloutAbort,
    RolloutStart,
)
from agent.protocol.wire.messages.result import OperatorResult, ResultStatus
from provisioning import audit
from provisioning.attestation import AttestationVerdict
from provisioning.db.runtime import RolloutDeviceRow, RolloutRow
from provisioning.policy import GoldenPolicy
from provisioning.registry import Outcome, Registry
from provisioning.service import attestation, releases, store
from provisioning.service.context import Call
from provisioning.service.effects import Effects, Log, Send
from provisioning.service.store import rollouts

log = logging.getLogger("keyfleet.service")

TASK: Final = "rollout"
TICK_SECONDS: Final = 1
RECHECK_SECONDS: Final = 20
"""A device of the current wave without a verdict is challenged again this often (a challenge
or its answer lost with a restart)."""
REPORT_RECHECK_SECONDS: Final = 2
"""A device that reports back (reconnected) while installing is challenged at most this often."""
MAX_ATTEMPTS: Final = 3
FINAL_STATUS: Final = {
    "done": ResultStatus.DONE,
    "timeout": ResultStatus.TIMEOUT,
    "failed": ResultStatus.FAILED,
    "rolled-back": ResultStatus.FAILED,
    "aborted": ResultStatus.FAILED,
}


# -- planning (pure) ------------------------------------------------------------------------------


def wave_target(step: str, members: int) -> int:
    """The cumulative number of devices ``step`` (``"3"`` or ``"25%"``) stands for."""
    if step.endswith("%"):
        return math.ceil(members * int(step[:-1]) / 100)
    return int(step)


def plan_waves(members: Sequence[str], steps: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """The waves of a rollout over ``members`` (taken in device id order): each step a
    cumulative size, rounded up, at least one device more than the wave before, capped at the
    group; steps past the whole group add nothing."""
    ordered = sorted(set(members))
    waves: list[tuple[str, ...]] = []
    done = 0
    for step in steps:
        if done >= len(ordered):
            break
        target = min(len(ordered), max(wave_target(step, len(ordered)), done + 1))
        waves.append(tuple(ordered[done:target]))
        done = target
    return tuple(waves)


def golden(cx: Call, session: Session) -> GoldenPolicy:
    """The golden policy attestation judges by: the approved releases (``releases.golden``)."""
    return releases.golden(cx, session)


def approved(cx: Call, session: Session, version: str) -> bool:
    """Whether ``version`` is an approved release: every component of the golden policy
    approves an image of that version."""
    components = golden(cx, session).components.values()
    return bool(components) and all(version in c.versions for c in components)


# -- operator commands ---------------------------------------------------------------------------


def dispatch_start(
    cx: Call, session: Session, operator: str, body: RolloutStart, command_id: bytes, *, now: int
) -> Effects:
    if cx.env.attestation is None:
        raise ProtocolError(
            "rollout.attestation", "a staged rollout needs attestation ([attestation] configured)"
        )
    registry = Registry(session)
    try:
        registry.group(body.group_id)
    except ProtocolError:
        raise ProtocolError("rollout.group.unknown", f"no group {body.group_id!r}") from None
    if not approved(cx, session, body.version):
        raise ProtocolError(
            "rollout.version.unapproved",
            f"release {body.version!r} is not approved: `keyfleet release approve` it first",
        )
    members = [m.device_id for m in registry.members(body.group_id) if m.leaf_index is not None]
    waves = plan_waves(members, body.waves)
    if not waves:
        raise ProtocolError("rollout.group.empty", f"group {body.group_id!r} has no members")
    rollout_id = "ro-" + cx.env.rng(6).hex()
    store.record_command(session, command_id, operator=operator, type_=body.TYPE, now=now)
    rollouts.insert_rollout(
        session,
        rollouts.NewRollout(
            rollout_id,
            body.version,
            body.group_id,
            operator,
            command_id,
            bool(body.rollback),
            waves,
        ),
        now=now,
    )
    sizes = ",".join(str(len(wave)) for wave in waves)
    audit.append(
        session,
        now=now,
        actor=f"operator:{operator}",
        action=body.TYPE,
        target=body.group_id,
        outcome=Outcome.ACCEPTED,
        reason=f"rollout {rollout_id} of {body.version}: waves {sizes}",
        details={
            "command_id": command_id.hex(),
            "rollout": rollout_id,
            "version": body.version,
            "waves": sizes,
            "rollback": bool(body.rollback),
        },
    )
    row = rollouts.rollout(session, rollout_id)
    assert row is not None
    effects: Effects = [
        Log(
            logging.INFO,
            "rollout %s of %s to %s started by %s: waves %s",
            (rollout_id, body.version, body.group_id, operator, sizes),
        ),
        Send(
            operator_result_topic(operator),
            OperatorResult.of(
                command_id,
                ResultStatus.ACCEPTED,
                f"{rollout_id} running: {body.version} to {body.group_id} in waves of {sizes}",
                pending=waves[0],
            ),
            operator,
        ),
    ]
    return effects + _start_wave(cx, session, row, now=now)


def dispatch_abort(
    cx: Call, session: Session, operator: str, body: RolloutAbort, command_id: bytes, *, now: int
) -> Effects:
    row = rollouts.rollout_for_update(session, body.rollout)
    if row is None:
        raise ProtocolError("rollout.unknown", f"no rollout {body.rollout!r}")
    if row.active_group is None:
        raise ProtocolError("rollout.over", f"rollout {body.rollout} is already {row.state}")
    store.record_command(session, command_id, operator=operator, type_=body.TYPE, now=now)
    row.reason = f"aborted by {operator}"
    rollouts.end(session, row, "aborted", now=now)
    audit.append(
        session,
        now=now,
        actor=f"operator:{operator}",
        action=body.TYPE,
        target=row.group_id,
        outcome=Outcome.ACCEPTED,
        reason=f"rollout {row.rollout_id} of {row.version} aborted in wave {row.wave + 1}",
        details={"command_id": command_id.hex(), "rollout": row.rollout_id},
    )
    return [
        Log(logging.WARNING, "rollout %s aborted by %s", (row.rollout_id, operator)),
        Send(
            operator_result_topic(operator),
            OperatorResult.of(command_id, ResultStatus.DONE, f"{row.rollout_id} aborted"),
            operator,
        ),
        _progress(session, row),
    ]


# -- device reports ------------------------------------------------------------------------------


def on_verdict(
    cx: Call, session: Session, device_id: str, verdict: AttestationVerdict, now: int
) -> Effects:
    """An attestation verdict of ``device_id`` (in the report's transaction): its step in a
    rollout that is not over, if it is in the current wave."""
    found = rollouts.device_in_active(session, device_id)
    if found is None:
        return []
    row, device = found
    if device.wave != row.wave:
        return []
    release = releases.matched_release(cx, verdict.pcr_values) if verdict.trusted else None
    device.detail = verdict.summary[:500]
    if row.state == "rolling-back":
        if device.state == "rolling-back" and release is not None and release == device.previous:
            device.state = "rolled-back"
            return _after_rollback_step(session, row, now)
        if device.state == "rolling-back" and release is not None and device.lost:
            return _send_again(cx, session, row, device, device.previous or row.version, now=now)
        return []
    if device.state not in ("checking", "installing", "attested", "passed"):
        return []
    if not verdict.trusted:  # a device of the wave that passed already counts too
        component = verdict.failing_component or "the device"
        return _stop(
            cx,
            session,
            row,
            "failed",
            f"{device_id} untrusted ({component}): {verdict.summary}",
            device_id=device_id,
            now=now,
        )
    if device.state == "passed":
        return []
    if device.state == "checking":
        device.previous = release
        if release == row.version:
            return _attested(session, row, device)  # already runs it: nothing to install
        return _send_install(session, row, device, row.version, now)
    if release == row.version:
        if device.state != "attested":
            return _attested(session, row, device)
        return []
    if device.state == "installing" and device.lost:
        return _send_again(cx, session, row, device, row.version, now=now)
    return []


def on_ack(session: Session, device_id: str, group_id: str, epoch: int, now: int) -> None:
    """An ack of ``device_id`` (in the ack's transaction): after its trusted verdict, an ack
    of the rollout group's current epoch proves it kept its group state through the update."""
    found = rollouts.device_in_active(session, device_id)
    if found is None:
        return
    row, device = found
    if device.state != "attested" or row.group_id != group_id or device.acked_at is not None:
        return
    if epoch == Registry(session).group(group_id).epoch:
        device.acked_at = now


def on_install_report(
    cx: Call, session: Session, device_id: str, install: InstallResult | None, now: int
) -> Effects:
    """A keys.report of ``device_id``: a failed install stops the rollout; a report without the
    install we sent means its agent restarted since (it reconnected): challenge it to see which
    release it came back on."""
    found = rollouts.device_in_active(session, device_id)
    if found is None:
        return []
    row, device = found
    if device.wave != row.wave or device.state not in ("installing", "rolling-back"):
        return []
    target = row.version if device.state == "installing" else device.previous
    if install is not None and (install.rollout, install.version) == (row.rollout_id, target):
        if install.state is InstallState.FAILED and device.state == "installing":
            device.detail = f"install failed [{install.check}]"
            return _stop(
                cx,
                session,
                row,
                "failed",
                f"{device_id}: install of {row.version} failed [{install.check}]",
                device_id=device_id,
                now=now,
            )
        if install.state is InstallState.FAILED:
            device.detail = f"rollback install failed [{install.check}]"
        return []
    if device.sent_at is None:
        return []
    device.lost = True
    asked = device.asked_at
    if asked is not None and asked > device.sent_at and asked > now - REPORT_RECHECK_SECONDS:
        return []  # asked since the install went out, and just now
    return _challenge(cx, session, device, now)


# -- the tick ------------------------------------------------------------------------------------


def rollout_tick(cx: Call, now: int) -> None:
    """Move every rollout that is not over (the holder of the ``rollout`` task only)."""
    from provisioning.service import execute, tasks  # noqa: PLC0415 - they import this module

    pending = cx.env.read(lambda s: [r.rollout_id for r in rollouts.active_rollouts(s)])
    if not pending or not tasks.claim_task(cx, TASK, now):
        return
    try:
        for rollout_id in pending:
            execute.run(cx, cx.env.tx(partial(_step, cx, rollout_id=rollout_id, now=now)))
    finally:
        tasks.finish_task(cx, TASK, now + TICK_SECONDS)


def _step(cx: Call, session: Session, *, rollout_id: str, now: int) -> Effects:
    row = rollouts.rollout_for_update(session, rollout_id)
    if row is None or row.active_group is None:
        return []
    if row.state == "rolling-back":
        return _rollback_tick(cx, session, row, now)
    if row.wave_started_at is None:
        return _start_wave(cx, session, row, now=now)
    wave = rollouts.devices(session, row.rollout_id, row.wave)
    effects: Effects = []
    try:
        Registry(session).group(row.group_id)
    except ProtocolError:
        return _stop(
            cx, session, row, "failed", f"group {row.group_id} is gone", device_id=None, now=now
        )
    moved = False
    for device in wave:
        if device.state == "attested" and device.acked_at is not None:
            device.state, moved = "passed", True
        elif device.state in ("checking", "installing") and (
            device.asked_at is None or device.asked_at <= now - RECHECK_SECONDS
        ):
            effects += _challenge(cx, session, device, now)
    if all(device.state == "passed" for device in wave):
        return effects + _next_wave(cx, session, row, now)
    if now - row.wave_started_at >= cx.env.settings.rollout_wave_timeout:
        late = [d.device_id for d in wave if d.state != "passed"]
        reason = (
            f"wave {row.wave + 1} not passed within {cx.env.settings.rollout_wave_timeout}s: "
            + ", ".join(f"{d.device_id} {d.state}" for d in wave if d.state != "passed")
        )
        return effects + _stop(cx, session, row, "timeout", reason, device_id=late[0], now=now)
    if moved:
        row.updated_at = now
        effects.append(_progress(session, row))
    return effects


def _start_wave(cx: Call, session: Session, row: RolloutRow, now: int) -> Effects:
    row.wave_started_at = row.updated_at = now
    effects: Effects = []
    registry = Registry(session)
    for device in rollouts.devices(session, row.rollout_id, row.wave):
        try:
            attestation.check_attestable(cx, registry, device.device_id)
        except ProtocolError as err:
            device.detail = f"[{err.check}] {err.reason}"
            return _stop(
                cx,
                session,
                row,
                "failed",
                f"{device.device_id} cannot be attested: [{err.check}] {err.reason}",
                device_id=device.device_id,
                now=now,
            )
        device.state = "checking"
        effects += _challenge(cx, session, device, now)
    log.info("rollout %s: wave %d started", row.rollout_id, row.wave + 1)
    return [*effects, _progress(session, row)]


def _next_wave(cx: Call, session: Session, row: RolloutRow, now: int) -> Effects:
    waves = rollouts.waves_of(row)
    passed = f"wave {row.wave + 1}/{len(waves)} passed"
    if row.wave + 1 < len(waves):
        row.wave += 1
        log.info("rollout %s: %s", row.rollout_id, passed)
        return _start_wave(cx, session, row, now=now)
    row.reason = f"every wave passed: {row.group_id} runs {row.version}"
    rollouts.end(session, row, "done", now=now)
    _audit_end(session, row, now)
    return [
        Log(logging.INFO, "rollout %s done: %s", (row.rollout_id, row.reason)),
        _progress(session, row),
    ]


def _stop(
    cx: Call,
    session: Session,
    row: RolloutRow,
    state: str,
    reason: str,
    *,
    device_id: str | None,
    now: int,
) -> Effects:
    """The wave failed (``failed`` or ``timeout``): stop, or roll the wave back."""
    row.reason, row.device, row.updated_at = reason[:1000], device_id, now
    effects: Effects = [Log(logging.WARNING, "rollout %s %s: %s", (row.rollout_id, state, reason))]
    if row.rollback:
        back = [
            d
            for d in rollouts.devices(session, row.rollout_id, row.wave)
            if d.sent_at is not None and d.previous is not None and d.previous != row.version
        ]
        if back:
            row.state, row.wave_started_at = "rolling-back", now
            row.reason = f"{state}: {reason}; rolling back"[:1000]
            for device in back:
                device.attempts = 0
                effects += _send_install(session, row, device, device.previous or "", now)
                device.state = "rolling-back"
            audit.append(
                session,
                now=now,
                actor="service",
                action="rollout.rollback",
                target=row.group_id,
                outcome=Outcome.ACCEPTED,
                reason=row.reason,
                details={"rollout": row.rollout_id, "devices": ",".join(d.device_id for d in back)},
            )
            return [*effects, _progress(session, row)]
    rollouts.end(session, row, state, now=now)
    _audit_end(session, row, now)
    return [*effects, _progress(session, row)]


def _rollback_tick(cx: Call, session: Session, row: RolloutRow, now: int) -> Effects:
    effects: Effects = []
    for device in rollouts.devices(session, row.rollout_id, row.wave):
        if device.state == "rolling-back" and (
            device.asked_at is None or device.asked_at <= now - RECHECK_SECONDS
        ):
            effects += _challenge(cx, session, device, now)
    assert row.wave_started_at is not None
    if now - row.wave_started_at >= cx.env.settings.rollout_wave_timeout:
        row.reason = f"{row.reason}; rollback not done within the wave timeout"[:1000]
        rollouts.end(session, row, "failed", now=now)
        _audit_end(session, row, now)
        effects.append(_progress(session, row))
    return effects


def _after_rollback_step(session: Session, row: RolloutRow, now: int) -> Effects:
    wave = rollouts.devices(session, row.rollout_id, row.wave)
    if any(d.state == "rolling-back" for d in wave):
        return [_progress(session, row)]
    rollouts.end(session, row, "rolled-back", now=now)
    _audit_end(session, row, now)
    return [
        Log(logging.WARNING, "rollout %s rolled back: %s", (row.rollout_id, row.reason)),
        _progress(session, row),
    ]


# -- helpers -------------------------------------------------------------------------------------


def _attested(session: Session, row: RolloutRow, device: RolloutDeviceRow) -> Effects:
    """Trusted on the release: now it must show it kept its group state. The group's current
    epoch's commit is relayed to it; a member at that epoch answers with its ack (the agent's
    reply to an already-applied commit), one that lost its state cannot (``on_ack``)."""
    device.state, device.acked_at = "attested", None
    effects: Effects = [_progress(session, row)]
    try:
        epoch = Registry(session).group(row.group_id).epoch
    except ProtocolError:
        return effects  # the group is gone: the tick stops the rollout
    last = store.commit_at(session, row.group_id, epoch - 1)
    if last is None:
        # the group's first epoch has no commit to relay: its stored ack has to do
        if device.device_id in Registry(session).ack_status(row.group_id).stragglers:
            return effects
        device.acked_at = device.sent_at or row.started_at
        return effects
    relay = CommitMessage(row.group_id, last.epoch, last.commit)
    return [*effects, Send(device_cmd_topic(device.device_id), relay, device.device_id)]


def _send_install(
    session: Session, row: RolloutRow, device: RolloutDeviceRow, version: str, now: int
) -> Effects:
    device.state = "installing"
    device.sent_at, device.lost = now, False
    device.attempts += 1
    return [
        Send(
            device_cmd_topic(device.device_id),
            ReleaseInstall(rollout=row.rollout_id, version=version),
            device.device_id,
        ),
        _progress(session, row),
    ]


def _send_again(
    cx: Call,
    session: Session,
    row: RolloutRow,
    device: RolloutDeviceRow,
    version: str,
    *,
    now: int,
) -> Effects:
    """The device came back on another release without the install (its agent restarted before
    the hook ran): send it again, or stop after ``MAX_ATTEMPTS``."""
    if device.attempts >= MAX_ATTEMPTS:
        return _stop(
            cx,
            session,
            row,
            "failed",
            f"{device.device_id} did not install {version} after {device.attempts} attempts",
            device_id=device.device_id,
            now=now,
        )
    state = device.state
    effects = _send_install(session, row, device, version, now)
    device.state = state
    return effects


def _challenge(cx: Call, session: Session, device: RolloutDeviceRow, now: int) -> Effects:
    settings = cx.env.attestation
    assert settings is not None
    try:
        body = attestation.issue_challenge(cx, session, device.device_id, now)
    except ProtocolError as err:  # too many open challenges: the next recheck asks again
        log.info("rollout: %s not challenged now: [%s] %s", device.device_id, err.check, err.reason)
        return []
    store.claim_challenge_slot(
        session, device.device_id, now=now, interval=settings.interval, force=True
    )
    device.asked_at = now
    return [Send(device_cmd_topic(device.device_id), body, device.device_id)]


def _audit_end(session: Session, row: RolloutRow, now: int) -> None:
    audit.append(
        session,
        now=now,
        actor="service",
        action=f"rollout.{row.state}",
        target=row.group_id,
        outcome=Outcome.ACCEPTED,
        reason=(row.reason or row.state)[:1000],
        details={"rollout": row.rollout_id, "version": row.version, "device": row.device},
    )


def _progress(session: Session, row: RolloutRow) -> Send:
    """What the starting operator is told: in progress (passed devices, the current wave's
    others pending), then the final state."""
    devices = rollouts.devices(session, row.rollout_id)
    waves = rollouts.waves_of(row)
    passed = [d.device_id for d in devices if d.state == "passed"]
    pending = [d.device_id for d in devices if d.wave == row.wave and d.state != "passed"]
    status = FINAL_STATUS.get(row.state, ResultStatus.IN_PROGRESS)
    detail = (
        f"{row.rollout_id} {row.state}: {row.version} to {row.group_id}, wave "
        f"{row.wave + 1}/{len(waves)}, {len(passed)}/{len(devices)} passed"
    )
    if row.reason:
        detail += f"; {row.reason}"
    return Send(
        operator_result_topic(row.operator),
        OperatorResult.of(row.command_id, status, detail[:1000], acked=passed, pending=pending),
        row.operator,
    )


# -- reading (keyfleet rollout status) -----------------------------------------------------------


def status(session: Session, rollout_id: str | None = None) -> list[dict[str, object]]:
    """Rollouts (newest last) with their waves and devices; one if ``rollout_id``."""
    if rollout_id is not None:
        row = rollouts.rollout(session, rollout_id)
        if row is None:
            raise ProtocolError("rollout.unknown", f"no rollout {rollout_id!r}")
        rows = [row]
    else:
        rows = rollouts.all_rollouts(session)
    out: list[dict[str, object]] = []
    for row in rows:
        devices = rollouts.devices(session, row.rollout_id)
        out.append(
            {
                "rollout": row.rollout_id,
                "version": row.version,
                "group": row.group_id,
                "state": row.state,
                "wave": row.wave + 1,
                "waves": [len(wave) for wave in rollouts.waves_of(row)],
                "rollback": row.rollback,
                "operator": row.operator,
                "reason": row.reason,
                "device": row.device,
                "started_at": row.started_at,
                "finished_at": row.finished_at,
                "devices": [
                    {
                        "device": d.device_id,
                        "wave": d.wave + 1,
                        "state": d.state,
                        "previous": d.previous,
                        "attempts": d.attempts,
                        "detail": d.detail,
                    }
                    for d in devices
                ],
            }
        )
    return out
