"""The service's reads and writes of registry tables that ``provisioning.registry`` has no
repository method for: when a device was last heard from, who is proven at an epoch, the
commit log's timing, bulk loads that let one session answer a batch of reports."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Final, NamedTuple

from sqlalchemy import bindparam, func, insert, select, text, update
from sqlalchemy.orm import Session, selectinload

from provisioning.db.engine import table_of
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
    PendingChange,
)
from provisioning.registry import KeyState, KeyStateReport, plan_key_states
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


# ``session.info`` key: the (state, DevID certificate PEM) of senders read at once
_LOADED_SENDERS = "keyfleet.sender_rows_loaded"


def load_senders(session: Session, devices: AbstractSet[str]) -> None:
    """Read the devices' state and stored DevID certificate and their replay rows as plain
    columns (two queries, no ORM objects), kept with ``session`` for the rest of its life:
    ``loaded_sender`` and ``ledger.load_guard`` answer from them (a device or replay row that
    is not there is taken as missing), as of this read."""
    ordered = sorted(devices)
    if not ordered:
        return
    loaded: dict[str, tuple[DeviceState, str] | None] = session.info.setdefault(_LOADED_SENDERS, {})
    loaded.update(dict.fromkeys(ordered))
    for device_id, state, pem in session.execute(
        select(Device.device_id, Device.state, Device.devid_cert_pem).where(
            Device.device_id.in_(ordered)
        )
    ):
        loaded[device_id] = (state, pem)
    rows = session.execute(
        select(ReplayState.sender, ReplayState.state).where(ReplayState.sender.in_(ordered))
    )
    ledger.note_loaded_guards(session, ordered, {sender: state for sender, state in rows})


def loaded_sender(session: Session, device_id: str) -> tuple[bool, tuple[DeviceState, str] | None]:
    """Whether ``load_senders`` read ``device_id`` in ``session``, and then its (state, DevID
    certificate PEM), None for no such device."""
    loaded: dict[str, tuple[DeviceState, str] | None] | None = session.info.get(_LOADED_SENDERS)
    if loaded is None or device_id not in loaded:
        return False, None
    return True, loaded[device_id]


@dataclass(frozen=True)
class AckSenders:
    """What a batch of acks is judged against, read as plain columns (``load_ack_senders``):
    the senders' device states, the groups' epochs, and the senders' leaf index in each group
    they are a member of (None: a member whose leaf is not assigned yet)."""

    states: Mapping[str, DeviceState]
    epochs: Mapping[str, int]
    leaves: Mapping[tuple[str, str], int | None]


def load_ack_senders(session: Session, senders: Sequence[str], groups: Iterable[str]) -> AckSenders:
    """``AckSenders`` of ``senders`` in ``groups``: one query for the devices, one for the
    groups, one per group for its members (Core columns, no ORM objects)."""
    states = {
        device_id: state
        for device_id, state in session.execute(
            select(Device.device_id, Device.state).where(Device.device_id.in_(senders))
        )
    }
    ordered = sorted(set(groups))
    epochs = {
        group_id: int(epoch)
        for group_id, epoch in session.execute(
            select(Group.group_id, Group.epoch).where(Group.group_id.in_(ordered))
        )
    }
    leaves: dict[tuple[str, str], int | None] = {}
    for group_id in ordered:
        for device_id, leaf_index in session.execute(
            select(GroupMember.device_id, GroupMember.leaf_index).where(
                GroupMember.group_id == group_id, GroupMember.device_id.in_(senders)
            )
        ):
            leaves[(group_id, device_id)] = leaf_index
    return AckSenders(states, epochs, leaves)


def load_report_senders(session: Session, senders: Sequence[str]) -> list[object]:
    """The senders' device rows with their keys and key transitions, and their revocation feed
    rows (one query each), for the session's identity map (what a batch of key-state reports
    reads); the caller keeps the returned list while it reads them."""
    if not senders:
        return []
    held = load_device_rows(session, senders)
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
        for row, id_ in zip(rows, _new_ids(session, model, len(rows)), strict=True):
            row.id = id_


def _new_ids(session: Session, model: type[DeviceKey] | type[KeyTransition], n: int) -> list[int]:
    """``n`` ids for new rows of ``model`` (``number_new_key_rows`` says where from)."""
    if session.get_bind().dialect.name == "sqlite":
        first = (session.scalar(select(func.max(model.id))) or 0) + 1
        return list(range(first, first + n))
    return list(
        session.scalars(
            text("SELECT nextval(pg_get_serial_sequence(:t, 'id')) FROM generate_series(1, :n)"),
            {"t": model.__tablename__, "n": n},
        )
    )


def keyless(session: Session, devices: Sequence[str]) -> set[str]:
    """Those of ``devices`` that have no key row at all (one query): a device's first report
    makes all of its key rows (``FirstKeys``)."""
    if not devices:
        return set()
    with_keys = session.scalars(
        select(DeviceKey.device_id).where(DeviceKey.device_id.in_(devices)).distinct()
    )
    return set(devices) - set(with_keys)


@dataclass
class _NewKey:
    kind: str | None
    state: KeyState
    changed_at: int
    transitions: list[tuple[KeyState | None, KeyState, int, int]]  # from, to, at, recorded_at


class FirstKeys:
    """The key and transition rows of devices that have none yet (their first reports: a burst
    after a fleet-wide reconnect), made as ``Registry.record_report`` makes them, same checks
    (``plan_key_states``) and same rows, but as plain values inserted in one Core statement per
    table (``insert``) instead of ORM objects. The caller holds the devices' replay rows under
    lock (every report's key rows are written under it) and writes their device rows with
    ``write_reports``; their ORM rows must not be in the session."""

    def __init__(self) -> None:
        self._keys: dict[str, dict[str, _NewKey]] = {}

    def record(self, device_id: str, key_states: Sequence[KeyStateReport], *, now: int) -> None:
        """A report's transitions (several reports of one device: in their order); refuses as
        ``Registry.record_report`` does, changing nothing then."""
        keys = self._keys.setdefault(device_id, {})
        planned, kinds = plan_key_states(
            device_id,
            key_states,
            current={name: (key.state, key.changed_at) for name, key in keys.items()},
            recorded=lambda name, state, at: (
                name in keys and any(t[1] == state and t[2] == at for t in keys[name].transitions)
            ),
        )
        for item, from_state in planned:
            key = keys.get(item.key_name)
            if key is None:
                key = keys[item.key_name] = _NewKey(item.kind, item.state, item.at, [])
            key.transitions.append((from_state, item.state, item.at, now))
            key.state = item.state
            key.changed_at = item.at
        for name, kind in kinds.items():
            if name in keys:
                keys[name].kind = kind

    def insert(self, session: Session) -> None:
        """The rows recorded, numbered in device, then report order (``number_new_key_rows``)."""
        keys = [
            (device_id, name, key)
            for device_id in sorted(self._keys)
            for name, key in self._keys[device_id].items()
        ]
        if not keys:
            return
        key_ids = _new_ids(session, DeviceKey, len(keys))
        transitions = [
            (key_id, step)
            for key_id, (_, _, key) in zip(key_ids, keys, strict=True)
            for step in key.transitions
        ]
        transition_ids = _new_ids(session, KeyTransition, len(transitions))
        connection = session.connection()
        connection.execute(
            insert(table_of(DeviceKey)),
            [
                {
                    "id": key_id,
                    "device_id": device_id,
                    "key_name": name,
                    "kind": key.kind,
                    "state": key.state,
                    "changed_at": key.changed_at,
                }
                for key_id, (device_id, name, key) in zip(key_ids, keys, strict=True)
            ],
        )
        connection.execute(
            insert(table_of(KeyTransition)),
            [
                {
                    "id": id_,
                    "device_key_id": key_id,
                    "from_state": from_state,
                    "to_state": to_state,
                    "at": at,
                    "recorded_at": recorded_at,
                }
                for id_, (key_id, (from_state, to_state, at, recorded_at)) in zip(
                    transition_ids, transitions, strict=True
                )
            ],
        )
        self._keys.clear()


@dataclass(frozen=True)
class ReportedDevice:
    """What a key-state report is judged against, read as plain columns (``reported_devices``):
    the device's state, when it was last heard from, its attestation due time, the digest of
    a key state known to be recorded (``Device.reported_keys``), and per key its kind and
    every recorded (state, at) transition (not read, empty, when every report of the batch
    from this device has that digest: ``keys_read`` False)."""

    state: DeviceState
    last_seen: int | None
    attest_due: int
    keys: Mapping[str, tuple[str | None, AbstractSet[tuple[KeyState, int]]]]
    reported: bytes | None = None
    keys_read: bool = True

    def knows(self, items: Iterable[KeyStateReport], digest: bytes | None = None) -> bool:
        """Whether every transition of ``items`` (whose ``key_state_digest`` is ``digest``,
        if given) is recorded with its kind, so that ``Registry.record_report`` would change
        nothing but the report and heard-from columns."""
        if digest is not None and digest == self.reported:
            return True
        if not self.keys_read:
            raise AssertionError("the key rows of a device were not read")
        for item in items:
            key = self.keys.get(item.key_name)
            if key is None or (item.state, item.at) not in key[1]:
                return False
            if item.kind is not None and item.kind != key[0]:
                return False
        return True


def reported_devices(
    session: Session,
    senders: Sequence[str],
    digests: Mapping[str, AbstractSet[bytes]] | None = None,
) -> dict[str, ReportedDevice]:
    """``ReportedDevice`` of each known sender, in two Core queries (no ORM objects): the
    device rows, then the key rows of the senders not every report of which (``digests``:
    the ``key_state_digest`` of each sender's reports) has the row's ``reported_keys``."""
    rows = [
        (device_id, state, last_seen, attest_due, None if reported is None else bytes(reported))
        for device_id, state, last_seen, attest_due, reported in session.execute(
            select(
                Device.device_id,
                Device.state,
                Device.last_seen,
                Device.attest_due,
                Device.reported_keys,
            ).where(Device.device_id.in_(senders))
        )
    ]
    wanted = digests or {}
    settled = {
        device_id
        for device_id, _, _, _, reported in rows
        if reported is not None and wanted.get(device_id) == {reported}
    }
    keys = _recorded_keys(session, [row[0] for row in rows if row[0] not in settled])
    return {
        device_id: ReportedDevice(
            state,
            last_seen,
            int(attest_due),
            keys.get(device_id, {}),
            reported,
            device_id not in settled,
        )
        for device_id, state, last_seen, attest_due, reported in rows
    }


_Keys = dict[str, tuple[str | None, set[tuple[KeyState, int]]]]


def _recorded_keys(session: Session, devices: Sequence[str]) -> dict[str, _Keys]:
    """Per device of ``devices``, per key its kind and every recorded (state, at) transition,
    in one Core query (``ReportedDevice.keys``)."""
    keys: dict[str, _Keys] = {}
    for device_id, name, kind, to_state, at in (
        session.execute(
            select(
                DeviceKey.device_id,
                DeviceKey.key_name,
                DeviceKey.kind,
                KeyTransition.to_state,
                KeyTransition.at,
            )
            .join(KeyTransition, KeyTransition.device_key_id == DeviceKey.id)
            .where(DeviceKey.device_id.in_(devices))
        )
        if devices
        else ()
    ):
        device = keys.get(device_id)
        if device is None:
            device = keys[device_id] = {}
        entry = device.get(name)
        if entry is None:
            entry = device[name] = (kind, set())
        entry[1].add((to_state, int(at)))
    return keys


@dataclass(frozen=True)
class AttestSender:
    """What an attestation answer of a batch is judged against, read as plain columns
    (``attest_senders``): the device's state, its stored DevID certificate and AK, and its
    recorded keys (``reported.knows``: whether the answer's key states change nothing)."""

    state: DeviceState
    devid_cert_pem: str
    ak_public: bytes | None
    reported: ReportedDevice


def attest_senders(
    session: Session,
    senders: Sequence[str],
    digests: Mapping[str, AbstractSet[bytes]] | None = None,
) -> dict[str, AttestSender]:
    """``AttestSender`` of each known sender, in two Core queries (no ORM objects): the device
    rows, then the key rows of the senders not every answer of which (``digests``: the
    ``key_state_digest`` of each sender's answers) has the row's ``reported_keys``."""
    if not senders:
        return {}
    rows = [
        (device_id, state, pem, None if ak is None else bytes(ak), last_seen, attest_due, kept)
        for device_id, state, pem, ak, last_seen, attest_due, kept in session.execute(
            select(
                Device.device_id,
                Device.state,
                Device.devid_cert_pem,
                Device.ak_public,
                Device.last_seen,
                Device.attest_due,
                Device.reported_keys,
            ).where(Device.device_id.in_(senders))
        )
    ]
    wanted = digests or {}
    settled = {
        row[0] for row in rows if row[6] is not None and wanted.get(row[0]) == {bytes(row[6])}
    }
    keys = _recorded_keys(session, [row[0] for row in rows if row[0] not in settled])
    return {
        device_id: AttestSender(
            state,
            pem,
            ak,
            ReportedDevice(
                state,
                last_seen,
                int(attest_due),
                keys.get(device_id, {}),
                None if kept is None else bytes(kept),
                device_id not in settled,
            ),
        )
        for device_id, state, pem, ak, last_seen, attest_due, kept in rows
    }


_WRITE_ATTESTATION: Final = (
    update(table_of(Device))
    .where(table_of(Device).c.device_id == bindparam("device"))
    .values(
        last_report=bindparam("report"),
        last_report_at=bindparam("at"),
        last_seen=bindparam("at"),
        attestation_result=bindparam("result"),
        attestation_reason=bindparam("reason"),
        attested_at=bindparam("at"),
        reported_keys=bindparam("keys"),
    )
)


def write_attestations(session: Session, rows: Sequence[Mapping[str, object]]) -> None:
    """What ``Registry.record_report`` and ``record_attestation`` write for an attestation
    answer whose key states are all recorded (``ReportedDevice.knows``) and that changes no
    state, for several devices in one Core ``executemany``: each mapping holds ``device``, the
    answer's ``report`` (its message id), ``at`` (the time of the answer), the verdict's
    ``result`` and ``reason``, and ``keys``, the answer's ``key_state_digest`` (every item of
    it recorded: ``reported_keys``); its key rows stay as they are, nothing in them changed.
    The devices' ORM rows must not be in the session. (On
    PostgreSQL an UPDATE from a VALUES list of the same rows took three times as long.)"""
    if rows:
        session.connection().execute(_WRITE_ATTESTATION, list(rows))


def load_device_rows(session: Session, devices: Sequence[str]) -> list[object]:
    """The devices' ORM rows with their keys and key transitions (one query each), for the
    session's identity map; the caller keeps the returned list while it reads them."""
    if not devices:
        return []
    return list(
        session.scalars(
            select(Device)
            .where(Device.device_id.in_(devices))
            .options(selectinload(Device.keys).selectinload(DeviceKey.transitions))
        )
    )


def write_reports(session: Session, reports: Sequence[Mapping[str, object]]) -> None:
    """What ``Registry.record_report`` writes for a report whose transitions are all recorded
    (``ReportedDevice.knows``), for several devices in one Core ``executemany``: each mapping
    holds ``device`` and the row's new ``report``, ``report_at``, ``seen``, ``due`` and
    ``keys`` (``last_report``, ``last_report_at``, ``last_seen``, ``attest_due``,
    ``reported_keys``: the report's ``key_state_digest``, every item of it recorded). The
    devices' ORM rows must not be in the session (their objects would not see the change)."""
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
            reported_keys=bindparam("keys"),
        ),
        list(reports),
    )


def load_feed_seen(session: Session, senders: Sequence[str]) -> list[object]:
    """The senders' revocation feed rows, read as plain columns in one query (no ORM object
    unless a report moves a row: ``revocations.record_seen``); nothing for the session to
    hold, hence the empty list."""
    revocations.load_seen_seqs(session, senders)
    return []


def device_state(session: Session, device_id: str) -> DeviceState | None:
    """The device's state (from the identity map when its row is loaded), None if unknown."""
    row = session.get(Device, device_id)
    return None if row is None else row.state


class Membership(NamedTuple):
    """A device's membership row, read as plain columns (``memberships``)."""

    group_id: str
    device_id: str
    leaf_index: int | None
    joined_epoch: int | None
    pending: PendingChange | None


# the columns of ``Membership``, in its order
_MEMBERSHIP_COLUMNS: Final = (
    GroupMember.group_id,
    GroupMember.device_id,
    GroupMember.leaf_index,
    GroupMember.joined_epoch,
    GroupMember.pending,
)


def memberships(session: Session, devices: Iterable[str]) -> dict[str, list[Membership]]:
    """Each device's memberships, by group id (one Core query, no ORM objects)."""
    found: dict[str, list[Membership]] = {}
    for row in session.execute(
        select(*_MEMBERSHIP_COLUMNS)
        .where(GroupMember.device_id.in_(sorted(set(devices))))
        .order_by(GroupMember.device_id, GroupMember.group_id)
    ):
        member = Membership(*row)
        found.setdefault(member.device_id, []).append(member)
    return found


# The largest integer a database column holds (a signed 64-bit INTEGER / BIGINT). A message may
# name an epoch up to 2**64 - 1 (the wire's bound); no row can have a larger one, and a query
# binding it fails before the registry could refuse the message for it.
SQL_INT_MAX = (1 << 63) - 1


def acks_recorded(
    session: Session, acks: Iterable[tuple[str, int, str]]
) -> dict[tuple[str, int, str], bytes]:
    """The epoch authenticators recorded for (group, epoch, device), those that have one
    (Core columns, one query per group and epoch). An epoch no column can hold has none (the
    registry refuses such an ack as ahead of its group)."""
    wanted: dict[tuple[str, int], set[str]] = {}
    for group_id, epoch, device_id in acks:
        if 0 <= epoch <= SQL_INT_MAX:
            wanted.setdefault((group_id, epoch), set()).add(device_id)
    found: dict[tuple[str, int, str], bytes] = {}
    for (group_id, epoch), devices in sorted(wanted.items()):
        for device_id, authenticator in session.execute(
            select(AckRow.device_id, AckRow.epoch_authenticator).where(
                AckRow.group_id == group_id,
                AckRow.epoch == epoch,
                AckRow.device_id.in_(sorted(devices)),
            )
        ):
            found[(group_id, epoch, device_id)] = authenticator
    return found


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


class CatchUpFacts(NamedTuple):
    """What the catch-up plan of several devices reads (``catch_up_facts``): each device's
    memberships, the epoch of each of their groups, and per (group, device) the epoch the
    device is proven to hold (``known_epoch``)."""

    memberships: dict[str, list[Membership]]
    epochs: dict[str, int]
    proven: dict[tuple[str, str], int]


def catch_up_facts(session: Session, devices: Iterable[str]) -> CatchUpFacts:
    """``memberships``, their groups' epochs and ``known_epoch`` of each membership of the
    devices in one query (one round trip): the newest ack and commit of each membership are
    correlated subqueries on the (group, device, epoch) indexes of acks and the commit log."""
    acked = (
        select(func.max(AckRow.epoch))
        .where(AckRow.group_id == GroupMember.group_id, AckRow.device_id == GroupMember.device_id)
        .scalar_subquery()
    )
    committed = (
        select(func.max(CommitLogEntry.epoch))
        .where(
            CommitLogEntry.group_id == GroupMember.group_id,
            CommitLogEntry.committer == GroupMember.device_id,
        )
        .scalar_subquery()
    )
    facts = CatchUpFacts({}, {}, {})
    for row in session.execute(
        select(*_MEMBERSHIP_COLUMNS, Group.epoch, acked, committed)
        .join(Group, Group.group_id == GroupMember.group_id)
        .where(GroupMember.device_id.in_(sorted(set(devices))))
        .order_by(GroupMember.device_id, GroupMember.group_id)
    ):
        member = Membership(*row[:5])
        facts.memberships.setdefault(member.device_id, []).append(member)
        facts.epochs[member.group_id] = int(row[5])
        # an ack proves its epoch; a commit made in an epoch proves the one it made
        known = member.joined_epoch or 0
        if row[6] is not None:
            known = max(known, int(row[6]))
        if row[7] is not None:
            known = max(known, int(row[7]) + 1)
        facts.proven[(member.group_id, member.device_id)] = known
    return facts


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
