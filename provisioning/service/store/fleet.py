"""The service's reads and writes of registry tables that ``provisioning.registry`` has no
repository method for: when a device was last heard from, who is proven at an epoch, the
commit log's timing, bulk loads that let one session answer a batch of reports."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Final

from sqlalchemy import bindparam, func, select, text, update
from sqlalchemy.orm import Session, selectinload

from provisioning.db.runtime import OperatorKey, ReplayState, RevocationFeedSeen, TaskLease
from provisioning.db.schema import Ack as AckRow
from provisioning.db.schema import (
    CommitLogEntry,
    Device,
    DeviceKey,
    DeviceState,
    Group,
    GroupMember,
    KeyTransition,
)
from provisioning.registry import KeyState, KeyStateReport
from provisioning.service.store import ledger, revocations


def mark_heard(session: Session, devices: Iterable[str], *, now: int) -> None:
    """``devices.last_seen``: the shared "heard from", written with every accepted report
    (another instance picks committers and the attestation schedule by it)."""
    ids = sorted(set(devices))
    if not ids:
        return
    session.execute(
        update(Device)
        .where(Device.device_id.in_(ids) if len(ids) > 1 else Device.device_id == ids[0])
        .values(last_seen=now)
        .execution_options(synchronize_session=False)
    )


def member_device_states(
    session: Session, group_id: str
) -> dict[str, tuple[DeviceState, int | None]]:
    """``device -> (state, last_seen)`` of ``group_id``'s members, in one query of those two
    columns (choosing a committer reads them for every member: neither a query nor a whole
    device row a member)."""
    rows = session.execute(
        select(Device.device_id, Device.state, Device.last_seen)
        .join(GroupMember, GroupMember.device_id == Device.device_id)
        .where(GroupMember.group_id == group_id)
    )
    return {device_id: (state, last_seen) for device_id, state, last_seen in rows}


def load_senders(session: Session, devices: AbstractSet[str]) -> list[object]:
    """Load the devices' rows and replay rows into ``session`` in two queries; the caller keeps
    the returned list while it reads them (the identity map holds them only weakly)."""
    ordered = sorted(devices)
    held: list[object] = list(session.scalars(select(Device).where(Device.device_id.in_(ordered))))
    held += session.scalars(select(ReplayState).where(ReplayState.sender.in_(ordered)))
    ledger.note_loaded_guards(session, ordered)
    return held


def load_ack_senders(
    session: Session, senders: Sequence[str], groups: Iterable[str]
) -> list[object]:
    """The senders' device rows, the groups' rows and the senders' membership rows in
    ``groups`` (one query each), for the session's identity map; the caller keeps the returned
    list while it reads them."""
    held: list[object] = list(session.scalars(select(Device).where(Device.device_id.in_(senders))))
    ordered = sorted(set(groups))
    held += session.scalars(select(Group).where(Group.group_id.in_(ordered)))
    for group_id in ordered:
        held += session.scalars(
            select(GroupMember).where(
                GroupMember.group_id == group_id, GroupMember.device_id.in_(senders)
            )
        )
    return held


def load_report_senders(session: Session, senders: Sequence[str]) -> list[object]:
    """The senders' device rows with their keys and key transitions, and their revocation feed
    rows (one query each), for the session's identity map (what a batch of key-state reports
    reads); the caller keeps the returned list while it reads them."""
    if not senders:
        return []
    held: list[object] = list(
        session.scalars(
            select(Device)
            .where(Device.device_id.in_(senders))
            .options(selectinload(Device.keys).selectinload(DeviceKey.transitions))
        )
    )
    feed_rows = list(
        session.scalars(select(RevocationFeedSeen).where(RevocationFeedSeen.device_id.in_(senders)))
    )
    revocations.note_seen_rows(session, senders, feed_rows)
    return held + feed_rows


def number_new_key_rows(session: Session) -> None:
    """Give the key and key-transition rows pending in ``session`` their ids before the flush,
    so that the flush inserts each table's new rows in one statement: without them the ORM
    inserts one row per statement to learn each id (SQLite returns generated ids row by row),
    which made a device's first report cost a dozen statements. The ids come from where the
    database would take them: PostgreSQL's sequence of the column (``nextval``, one query for
    all), on SQLite the largest id plus one, read under the transaction's write lock (taken by
    the replay rows' lock before any of this: no other writer can insert meanwhile). Rows are
    numbered in the order they were added, as their inserts one by one would be."""
    with session.no_autoflush:
        _number_new_key_rows(session)


def _number_new_key_rows(session: Session) -> None:
    pending = list(session.new)
    for model in (DeviceKey, KeyTransition):
        rows = [row for row in pending if isinstance(row, model) and row.id is None]
        if not rows:
            continue
        table = model.__tablename__
        if session.get_bind().dialect.name == "sqlite":
            first = (session.scalar(select(func.max(model.id))) or 0) + 1
            ids = list(range(first, first + len(rows)))
        else:
            ids = list(
                session.scalars(
                    text(
                        "SELECT nextval(pg_get_serial_sequence(:t, 'id'))"
                        " FROM generate_series(1, :n)"
                    ),
                    {"t": table, "n": len(rows)},
                )
            )
        for row, id_ in zip(rows, ids, strict=True):
            row.id = id_


@dataclass(frozen=True)
class ReportedDevice:
    """What a key-state report is judged against, read as plain columns (``reported_devices``):
    the device's state, when it was last heard from, its attestation due time, and per key its
    kind and every recorded (state, at) transition."""

    state: DeviceState
    last_seen: int | None
    attest_due: int
    keys: Mapping[str, tuple[str | None, AbstractSet[tuple[KeyState, int]]]]

    def knows(self, items: Iterable[KeyStateReport]) -> bool:
        """Whether every transition of ``items`` is recorded with its kind, so that
        ``Registry.record_report`` would change nothing but the report and heard-from columns."""
        for item in items:
            key = self.keys.get(item.key_name)
            if key is None or (item.state, item.at) not in key[1]:
                return False
            if item.kind is not None and item.kind != key[0]:
                return False
        return True


def reported_devices(session: Session, senders: Sequence[str]) -> dict[str, ReportedDevice]:
    """``ReportedDevice`` of each known sender, in two Core queries (no ORM objects)."""
    keys: dict[str, dict[str, tuple[str | None, set[tuple[KeyState, int]]]]] = {}
    for device_id, name, kind, to_state, at in session.execute(
        select(
            DeviceKey.device_id,
            DeviceKey.key_name,
            DeviceKey.kind,
            KeyTransition.to_state,
            KeyTransition.at,
        )
        .join(KeyTransition, KeyTransition.device_key_id == DeviceKey.id)
        .where(DeviceKey.device_id.in_(senders))
    ):
        entry = keys.setdefault(device_id, {}).setdefault(name, (kind, set()))
        entry[1].add((to_state, int(at)))
    return {
        device_id: ReportedDevice(state, last_seen, int(attest_due), keys.get(device_id, {}))
        for device_id, state, last_seen, attest_due in session.execute(
            select(Device.device_id, Device.state, Device.last_seen, Device.attest_due).where(
                Device.device_id.in_(senders)
            )
        )
    }


def write_reports(session: Session, reports: Sequence[Mapping[str, object]]) -> None:
    """What ``Registry.record_report`` writes for a report whose transitions are all recorded
    (``ReportedDevice.knows``), for several devices in one Core ``executemany``: each mapping
    holds ``device`` and the row's new ``report``, ``report_at``, ``seen`` and ``due``
    (``last_report``, ``last_report_at``, ``last_seen``, ``attest_due``). The devices' ORM rows
    must not be in the session (their objects would not see the change)."""
    if not reports:
        return
    session.connection().execute(
        update(Device)
        .where(Device.device_id == bindparam("device"))
        .values(
            last_report=bindparam("report"),
            last_report_at=bindparam("report_at"),
            last_seen=bindparam("seen"),
            attest_due=bindparam("due"),
        ),
        list(reports),
    )


def load_feed_seen(session: Session, senders: Sequence[str]) -> list[object]:
    """The senders' revocation feed rows (one query), for the session's identity map."""
    if not senders:
        return []
    feed_rows = list(
        session.scalars(select(RevocationFeedSeen).where(RevocationFeedSeen.device_id.in_(senders)))
    )
    revocations.note_seen_rows(session, senders, feed_rows)
    return list(feed_rows)


def device_state(session: Session, device_id: str) -> DeviceState | None:
    """The device's state (from the identity map when its row is loaded), None if unknown."""
    row = session.get(Device, device_id)
    return None if row is None else row.state


def memberships(session: Session, devices: Iterable[str]) -> dict[str, list[GroupMember]]:
    """Each device's membership rows, by group id."""
    found: dict[str, list[GroupMember]] = {}
    for row in session.scalars(
        select(GroupMember)
        .where(GroupMember.device_id.in_(sorted(set(devices))))
        .order_by(GroupMember.device_id, GroupMember.group_id)
    ):
        found.setdefault(row.device_id, []).append(row)
    return found


# The largest integer a database column holds (a signed 64-bit INTEGER / BIGINT). A message may
# name an epoch up to 2**64 - 1 (the wire's bound); no row can have a larger one, and a query
# binding it fails before the registry could refuse the message for it.
SQL_INT_MAX = (1 << 63) - 1


def acks_recorded(
    session: Session, acks: Iterable[tuple[str, int, str]]
) -> tuple[set[tuple[str, int, str]], list[object]]:
    """Which of (group, epoch, device) have an ack recorded, and their rows for the session's
    identity map (one query per group and epoch); keep the rows while using them. An epoch no
    column can hold has none (the registry refuses such an ack as ahead of its group)."""
    wanted: dict[tuple[str, int], set[str]] = {}
    for group_id, epoch, device_id in acks:
        if 0 <= epoch <= SQL_INT_MAX:
            wanted.setdefault((group_id, epoch), set()).add(device_id)
    found: set[tuple[str, int, str]] = set()
    held: list[object] = []
    for (group_id, epoch), devices in sorted(wanted.items()):
        for row in session.scalars(
            select(AckRow).where(
                AckRow.group_id == group_id,
                AckRow.epoch == epoch,
                AckRow.device_id.in_(sorted(devices)),
            )
        ):
            held.append(row)
            found.add((group_id, epoch, row.device_id))
    return found, held


def commit_at(session: Session, group_id: str, epoch: int) -> CommitLogEntry | None:
    """The accepted commit that moved ``group_id`` from ``epoch`` to ``epoch + 1``, if kept
    (none for an epoch no column can hold)."""
    if not 0 <= epoch <= SQL_INT_MAX:
        return None
    return session.get(CommitLogEntry, (group_id, epoch))


def commit_ms(entry: CommitLogEntry) -> int:
    """When a commit was accepted, in ms (seconds * 1000 for one accepted before revision
    0003 recorded milliseconds)."""
    ms = entry.accepted_at_ms
    return entry.accepted_at * 1000 if ms is None else ms


def known_epoch(session: Session, group_id: str, device_id: str, joined: int) -> int:
    """The newest epoch ``device_id`` is proven to hold: its acks, the commits it made, the
    epoch it joined at."""
    acked = session.scalar(
        select(func.max(AckRow.epoch)).where(
            AckRow.group_id == group_id, AckRow.device_id == device_id
        )
    )
    committed = session.scalar(
        select(func.max(CommitLogEntry.epoch)).where(
            CommitLogEntry.group_id == group_id, CommitLogEntry.committer == device_id
        )
    )
    known = joined
    if acked is not None:
        known = max(known, int(acked))
    if committed is not None:
        known = max(known, int(committed) + 1)
    return known


def known_epochs(
    session: Session, members: Iterable[tuple[str, str, int]]
) -> dict[tuple[str, str], int]:
    """``known_epoch`` of each (group, device, joined) in two queries per group (by the
    (group, device, epoch) indexes of acks and the commit log): (group, device) -> epoch."""
    by_group: dict[str, dict[str, int]] = {}
    for group_id, device_id, joined in members:
        by_group.setdefault(group_id, {})[device_id] = joined
    known: dict[tuple[str, str], int] = {}
    for group_id, joined_at in sorted(by_group.items()):
        ids = sorted(joined_at)
        for device_id, joined in joined_at.items():
            known[(group_id, device_id)] = joined
        acked = session.execute(
            select(AckRow.device_id, func.max(AckRow.epoch))
            .where(AckRow.group_id == group_id, AckRow.device_id.in_(ids))
            .group_by(AckRow.device_id)
        )
        committed = session.execute(
            select(CommitLogEntry.committer, func.max(CommitLogEntry.epoch))
            .where(CommitLogEntry.group_id == group_id, CommitLogEntry.committer.in_(ids))
            .group_by(CommitLogEntry.committer)
        )
        # an ack proves its epoch; a commit made in an epoch proves the one it made
        for rows, made in ((acked, 0), (committed, 1)):
            for device_id, epoch in rows:
                if epoch is not None:
                    key = (group_id, device_id)
                    known[key] = max(known[key], int(epoch) + made)
    return known


def last_commit_at(session: Session, group_id: str, device_id: str) -> int | None:
    """When ``device_id``'s newest kept commit in ``group_id`` was accepted."""
    value = session.scalar(_LAST_COMMIT_AT, {"group": group_id, "device": device_id})
    return None if value is None else int(value)


_LAST_COMMIT_AT: Final = select(func.max(CommitLogEntry.accepted_at)).where(
    CommitLogEntry.group_id == bindparam("group"), CommitLogEntry.committer == bindparam("device")
)


def acked_at(session: Session, group_id: str, epoch: int) -> set[str]:
    """Devices that acked ``epoch`` of ``group_id``."""
    return set(
        session.scalars(
            select(AckRow.device_id).where(AckRow.group_id == group_id, AckRow.epoch == epoch)
        )
    )


def operator_key(session: Session, operator: str) -> OperatorKey | None:
    return session.get(OperatorKey, operator)


def task_lease(session: Session, name: str) -> TaskLease | None:
    return session.get(TaskLease, name)
