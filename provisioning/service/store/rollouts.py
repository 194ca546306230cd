"""The staged rollouts' rows (``provisioning.service.rollout``): each rollout and each of its
devices. One rollout of a group at a time is a unique column (``active_group``): a second start
fails its insert whoever tries. The tick that moves a rollout runs on the one instance holding the
``rollout`` task's lease; device reports and verdicts change single device rows."""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass

from sqlalchemy import ColumnElement, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from agent.protocol.errors import ProtocolError
from provisioning.db.runtime import RolloutDeviceRow, RolloutRow

OVER: frozenset[str] = frozenset({"done", "failed", "timeout", "rolled-back", "aborted"})
"""Rollout states that end it (``active_group`` is NULL then)."""


@dataclass(frozen=True)
class NewRollout:
    rollout_id: str
    version: str
    group_id: str
    operator: str
    command_id: bytes
    rollback: bool
    waves: tuple[tuple[str, ...], ...]


def insert_rollout(session: Session, new: NewRollout, *, now: int) -> None:
    """Insert a running rollout and its devices (all ``pending``); ``rollout.group.busy`` when
    the group has a rollout that is not over."""
    running = session.scalar(select(RolloutRow).where(RolloutRow.active_group == new.group_id))
    if running is not None:
        raise ProtocolError(
            "rollout.group.busy",
            f"group {new.group_id!r} is in rollout {running.rollout_id} "
            f"({running.version}, {running.state}): abort it or wait for its end",
        )
    session.add(
        RolloutRow(
            rollout_id=new.rollout_id,
            version=new.version,
            group_id=new.group_id,
            active_group=new.group_id,
            operator=new.operator,
            command_id=new.command_id,
            rollback=new.rollback,
            state="running",
            waves=json.dumps([list(wave) for wave in new.waves]),
            wave=0,
            wave_started_at=None,
            reason=None,
            device=None,
            started_at=now,
            updated_at=now,
            finished_at=None,
        )
    )
    for index, wave in enumerate(new.waves):
        for device_id in wave:
            session.add(
                RolloutDeviceRow(
                    rollout_id=new.rollout_id,
                    device_id=device_id,
                    wave=index,
                    state="pending",
                    previous=None,
                    sent_at=None,
                    attempts=0,
                    asked_at=None,
                    lost=False,
                    acked_at=None,
                    detail=None,
                )
            )
    try:
        session.flush()
    except IntegrityError:
        # another instance started one for this group between our read and our insert
        raise ProtocolError(
            "rollout.group.busy", f"group {new.group_id!r} has a rollout in progress"
        ) from None


def waves_of(row: RolloutRow) -> list[list[str]]:
    waves = json.loads(row.waves)
    assert isinstance(waves, list)
    return [[str(device) for device in wave] for wave in waves]


def rollout(session: Session, rollout_id: str) -> RolloutRow | None:
    return session.get(RolloutRow, rollout_id)


def rollout_for_update(session: Session, rollout_id: str) -> RolloutRow | None:
    return session.scalar(
        select(RolloutRow).where(RolloutRow.rollout_id == rollout_id).with_for_update()
    )


def active_rollouts(session: Session) -> list[RolloutRow]:
    return list(
        session.scalars(
            select(RolloutRow)
            .where(RolloutRow.active_group.is_not(None))
            .order_by(RolloutRow.started_at, RolloutRow.rollout_id)
        )
    )


def all_rollouts(session: Session) -> list[RolloutRow]:
    return list(
        session.scalars(select(RolloutRow).order_by(RolloutRow.started_at, RolloutRow.rollout_id))
    )


def devices(session: Session, rollout_id: str, wave: int | None = None) -> list[RolloutDeviceRow]:
    query = select(RolloutDeviceRow).where(RolloutDeviceRow.rollout_id == rollout_id)
    if wave is not None:
        query = query.where(RolloutDeviceRow.wave == wave)
    return list(session.scalars(query.order_by(RolloutDeviceRow.wave, RolloutDeviceRow.device_id)))


def device_in_active(
    session: Session, device_id: str
) -> tuple[RolloutRow, RolloutDeviceRow] | None:
    """The device's row in a rollout that is not over (at most one: one per group, and a
    device's row is only looked at while its wave runs)."""
    found = session.execute(
        select(RolloutRow, RolloutDeviceRow)
        .join(RolloutDeviceRow, RolloutDeviceRow.rollout_id == RolloutRow.rollout_id)
        .where(
            RolloutRow.active_group.is_not(None),
            RolloutDeviceRow.device_id == device_id,
            RolloutDeviceRow.wave <= RolloutRow.wave,
        )
        .order_by(RolloutRow.started_at.desc())
        .limit(1)
    ).first()
    return None if found is None else (found[0], found[1])


def in_active(session: Session, device_ids: Collection[str]) -> set[str]:
    """Which of ``device_ids`` have a row ``device_in_active`` would find (one query for a batch
    of reports)."""
    return _in_active_where(session, device_ids, RolloutDeviceRow.wave <= RolloutRow.wave)


def attested_devices(session: Session, device_ids: Collection[str]) -> set[str]:
    """Which of ``device_ids`` wait, in a rollout that is not over, for an ack after their
    trusted verdict (one query for a batch of acks)."""
    return _in_active_where(session, device_ids, RolloutDeviceRow.state == "attested")


def _in_active_where(
    session: Session, device_ids: Collection[str], condition: ColumnElement[bool]
) -> set[str]:
    """Which of ``device_ids`` have a row meeting ``condition`` in a rollout that is not over."""
    if not device_ids:
        return set()
    return set(
        session.scalars(
            select(RolloutDeviceRow.device_id)
            .join(RolloutRow, RolloutDeviceRow.rollout_id == RolloutRow.rollout_id)
            .where(
                RolloutRow.active_group.is_not(None),
                RolloutDeviceRow.device_id.in_(sorted(device_ids)),
                condition,
            )
        )
    )


def end(session: Session, row: RolloutRow, state: str, *, now: int) -> None:
    assert state in OVER
    row.state, row.active_group, row.finished_at, row.updated_at = state, None, now, now
    session.flush()
