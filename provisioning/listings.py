"""What ``keyfleet`` prints about the registry and the audit log: devices, their keys, groups,
operators, stations and audit entries.

The listings read the database directly, so they run on the service host (``--config`` or
``--db``): the wire protocol has no listing command. Each listing is a list of plain rows
(dicts) holding raw values, times as Unix seconds: that is what ``--json`` prints. ``print_table``
renders rows for people as aligned columns with times in ISO-8601 UTC (``2026-12-06 08:10:05Z``).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from provisioning import audit
from provisioning.db.runtime import RevocationFeedRow, RevocationFeedSeen
from provisioning.db.schema import Outcome
from provisioning.registry import DeviceRecord, Registry, tags

Row = dict[str, object]


# -- times ----------------------------------------------------------------------------------


def human_time(seconds: int | None, *, sep: str = " ") -> str:
    """Unix seconds as ISO-8601 UTC to the second (``2026-12-06 08:10:05Z``); ``-`` for none.
    ``sep="T"`` gives the form without a space, for values joined by spaces."""
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds, UTC).strftime(f"%Y-%m-%d{sep}%H:%M:%SZ")


_AGO = re.compile(r"(\d+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, *, now: int) -> int:
    """A point in time given on the command line, as Unix seconds: Unix seconds (``1796540774``),
    a span back from ``now`` (``90s``, ``30m``, ``2h``, ``7d``, ``1w``), or an ISO-8601 date or
    date and time (``2026-12-06``, ``2026-12-06 08:10``, ``2026-12-06T08:10:05Z``; without a zone
    it is UTC). Raises ValueError with a sentence for anything else."""
    value = text.strip()
    if value.isdigit():
        return int(value)
    ago = _AGO.fullmatch(value)
    if ago is not None:
        return now - int(ago.group(1)) * _UNIT_SECONDS[ago.group(2)]
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: give Unix seconds, a span back from now (30m, 2h, 7d) or "
            "an ISO-8601 date/time (2026-12-06, 2026-12-06T08:10:05Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


# -- registry listings ------------------------------------------------------------------------


def _devices(session: Session, tag: str | None) -> list[DeviceRecord]:
    """Every device, or those holding ``tag``, by device id."""
    devices = Registry(session).devices()
    if tag is None:
        return devices
    holding = set(tags.tagged(session, tag))
    return [d for d in devices if d.device_id in holding]


def list_devices(session: Session, *, tag: str | None = None) -> list[Row]:
    """One row per device (only those tagged ``tag`` if given); ``tags`` its tags, sorted;
    ``feed`` is the number of the newest revocation feed entry its last keys.report said it
    keeps (None before it reported one), ``feed_behind`` how many entries it lacks then
    (docs/authorization.md, "The revocation feed")."""
    registry = Registry(session)
    feed_seen = {row.device_id: row.seq for row in session.scalars(select(RevocationFeedSeen))}
    feed_head = session.scalar(select(func.max(RevocationFeedRow.seq))) or 0
    held = tags.tags_of(session)
    rows: list[Row] = []
    for device in _devices(session, tag):
        groups = [
            m.group_id for m in registry.groups_of(device.device_id) if m.leaf_index is not None
        ]
        rows.append(
            {
                "device_id": device.device_id,
                "state": device.state.value,
                "attestation": None
                if device.attestation_result is None
                else device.attestation_result.value,
                "attested_at": device.attested_at,
                "attestation_reason": device.attestation_reason,
                "last_seen": device.last_seen,
                "groups": groups,
                "tags": held.get(device.device_id, []),
                "feed": feed_seen.get(device.device_id),
                "feed_behind": None
                if device.device_id not in feed_seen
                else max(0, feed_head - feed_seen[device.device_id]),
            }
        )
    return rows


def list_device_keys(session: Session, *, tag: str | None = None) -> list[Row]:
    """One row per device key (``keyfleet devices --keys``): its NIST SP 800-57 state since when,
    and its whole history as the device reported it (``transitions`` = ``[[state, at], ...]``,
    device clock; a service-recorded destruction carries the service's clock)."""
    registry = Registry(session)
    rows: list[Row] = []
    for device in _devices(session, tag):
        for key in registry.key_states(device.device_id):
            history = registry.key_history(device.device_id, key.key_name)
            rows.append(
                {
                    "device_id": device.device_id,
                    "device_state": device.state.value,
                    "key": key.key_name,
                    "kind": key.kind,
                    "state": key.state.value,
                    "since": key.changed_at,
                    "transitions": [[t.to_state.value, t.at] for t in history],
                }
            )
    return rows


def list_groups(session: Session) -> list[Row]:
    registry = Registry(session)
    rows: list[Row] = []
    for group in registry.groups():
        if group.deleted_at is not None:
            continue  # deleted by the operators: not an active group (its keys are destroyed)
        status = registry.ack_status(group.group_id)
        rows.append(
            {
                "group_id": group.group_id,
                "epoch": group.epoch,
                "members": list(status.members),
                "stragglers": list(status.stragglers),
                "agreed": status.agreed,
                "pending": [
                    f"{m.pending.value}:{m.device_id}"
                    for m in registry.members(group.group_id)
                    if m.pending is not None
                ],
            }
        )
    return rows


def list_operators(session: Session) -> list[Row]:
    return [
        {
            "name": operator.name,
            "role": operator.role.value,
            "cert_fingerprint": operator.cert_fingerprint,
            "created_at": operator.created_at,
            "updated_at": operator.updated_at,
        }
        for operator in Registry(session).operators()
    ]


def list_stations(session: Session) -> list[Row]:
    return [
        {
            "name": station.name,
            "cert_fingerprint": station.cert_fingerprint,
            "created_at": station.created_at,
        }
        for station in Registry(session).stations()
    ]


# -- the audit log ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditFilter:
    """Which entries ``keyfleet audit show`` prints. ``actor``, ``action`` and ``target`` match
    exactly, or as a prefix when they end in ``*`` (``--action 'group.*'``); ``limit`` keeps the
    newest entries that match."""

    since: int | None = None
    until: int | None = None
    actor: str | None = None
    action: str | None = None
    target: str | None = None
    outcome: Outcome | None = None
    limit: int | None = None


def list_audit(session: Session, where: AuditFilter) -> list[Row]:
    records = audit.find_entries(
        session,
        since=where.since,
        until=where.until,
        actor=where.actor,
        action=where.action,
        target=where.target,
        outcome=where.outcome,
        limit=where.limit,
    )
    return [
        {
            "seq": record.seq,
            "time": record.time,
            "actor": record.actor,
            "action": record.action,
            "target": record.target,
            "outcome": record.outcome.value,
            "reason": record.reason,
            "details": record.details_dict(),
            "prev_hash": record.prev_hash.hex(),
            "entry_hash": record.entry_hash.hex(),
        }
        for record in records
    ]


# -- rendering --------------------------------------------------------------------------------


def short_fingerprint(fingerprint: str) -> str:
    return fingerprint[:16] + "…"


def print_table(
    rows: Sequence[Row],
    columns: Sequence[str],
    out: TextIO,
    *,
    times: Collection[str] = (),
) -> None:
    """Rows as columns aligned for people: lists joined by commas, None as ``-``, the columns
    named in ``times`` (Unix seconds) as ISO-8601 UTC."""

    def cell(column: str, value: object) -> str:
        if column in times and (value is None or isinstance(value, int)):
            return human_time(value)
        if isinstance(value, list):
            return ",".join(str(v) for v in value) or "-"
        return "-" if value is None or value == "" else str(value)

    table = [[c.upper() for c in columns]] + [[cell(c, r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip(), file=out)
