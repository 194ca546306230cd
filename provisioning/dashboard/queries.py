"""What the dashboard shows, read from the registry: every query is paged or aggregated.

Read-only on purpose: the dashboard holds a session only to SELECT; every change stays a signed
operator command. The queries are written for a fleet of tens of thousands of devices: lists
are LIMIT/OFFSET (devices, groups, members, keys) or keyset on the primary key (the audit log,
which only grows), and summaries are GROUP BY counts done by the database, never a Python loop
over every row. Nothing here reads a column that could hold secret material (there is none in
the registry; see docs/service.md) and the raw ``last_report`` bytes are never selected.

Why one module of this size: one read-only query per dashboard view (overview, devices, device,
groups, group, audit), each paged or aggregated, and the record types they return; they share
the same joins and paging helpers and nothing else of the service uses them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from agent.protocol.lifecycle import ALLOWED_TRANSITIONS, KeyState
from provisioning.audit import AuditRecord, record_of
from provisioning.db.runtime import QuorumRequestRow
from provisioning.db.schema import (
    Ack,
    AuditEntry,
    CommitLogEntry,
    Device,
    DeviceKey,
    DeviceState,
    DeviceTag,
    Group,
    GroupMember,
    KeyTransition,
    Operator,
    Outcome,
    Role,
)
from provisioning.registry import tags
from provisioning.service.store import deletions

T = TypeVar("T")

NEVER = "never"  # attestation filter value: devices never attested
OUT_OF_SERVICE = (DeviceState.QUARANTINED, DeviceState.REVOKED, DeviceState.DESTROYED)
# exclusive buckets: (label, seen at most this many seconds ago and more than the previous)
LAST_SEEN_BUCKETS: tuple[tuple[str, int], ...] = (
    ("under 5 min", 300),
    ("5 min to 1 h", 3600),
    ("1 h to 1 day", 86400),
)
TIMELINE_BUCKETS = 24
ATTESTATION_HISTORY = 20
REKEY_HISTORY = 10

# Ack and commit times in milliseconds (revision 0003). Rows recorded before it have only
# seconds: they count as the start of their second, so their latencies stay whole seconds as
# they were, never made up.
ACK_MS = func.coalesce(Ack.received_at_ms, Ack.received_at * 1000)
COMMIT_MS = func.coalesce(CommitLogEntry.accepted_at_ms, CommitLogEntry.accepted_at * 1000)
_BY_CURRENT_MEMBER = and_(
    GroupMember.group_id == Ack.group_id,
    GroupMember.device_id == Ack.device_id,
    GroupMember.leaf_index.is_not(None),
)
"""Join condition: the ack's sender is a current member of the group (not one being added)."""
_MADE_CURRENT_EPOCH = and_(
    Group.group_id == CommitLogEntry.group_id, CommitLogEntry.epoch == Group.epoch - 1
)
"""Join condition: the commit is the one that made the group's current epoch."""
_COMMIT_COLUMNS = (
    CommitLogEntry.epoch,
    CommitLogEntry.committer,
    CommitLogEntry.accepted_at,
    COMMIT_MS.label("accepted_ms"),
)
"""What a ``CommitRow`` takes from the commit log."""


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list: ``page`` counts from 1; ``total`` rows match the filter."""

    rows: list[T]
    page: int
    per_page: int
    total: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))

    @property
    def has_prev(self) -> bool:
        return self.page > 1

    @property
    def has_next(self) -> bool:
        return self.page < self.pages


def _offset(page: int, per_page: int) -> int:
    return (max(page, 1) - 1) * per_page


def _like(text: str) -> str:
    """A LIKE pattern matching ``text`` anywhere, with LIKE's wildcards taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


# ---- operators (authorization) -----------------------------------------------------------------


@dataclass(frozen=True)
class Viewer:
    """The operator looking at the dashboard: their registered name and role."""

    name: str
    role: Role


def operator_for(session: Session, name: str, cert_fingerprint: str) -> Viewer | None:
    """The registered operator ``name`` if ``cert_fingerprint`` is the certificate the registry
    holds for them (a re-issued or stolen-and-replaced certificate is not enough)."""
    row = session.execute(
        select(Operator.name, Operator.role, Operator.cert_fingerprint).where(Operator.name == name)
    ).first()
    if row is None or row.cert_fingerprint != cert_fingerprint:
        return None
    return Viewer(row.name, Role(row.role))


# ---- fleet overview ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TimelinePoint:
    start: int
    registered: int  # devices registered by the end of this bucket (cumulative)
    out_of_service: int  # of those, now quarantined/revoked/destroyed since before the bucket end
    trusted: int  # attestation verdicts in this bucket (audit log)
    untrusted: int


@dataclass(frozen=True)
class AttentionRow:
    device_id: str
    state: str
    attestation_reason: str | None
    attested_at: int | None


@dataclass(frozen=True)
class FleetSummary:
    total: int
    by_state: dict[str, int]
    by_attestation: dict[str, int]
    matrix: dict[tuple[str, str], int]  # (state, attestation or "never") -> count
    last_seen: list[tuple[str, int]]
    groups: int
    operators: int
    timeline: list[TimelinePoint]
    bucket_seconds: int
    attention: list[AttentionRow]


def fleet_summary(session: Session, *, now: int) -> FleetSummary:
    matrix: dict[tuple[str, str], int] = {}
    by_state = {state.value: 0 for state in DeviceState}
    by_attestation = {"trusted": 0, "untrusted": 0, NEVER: 0}
    for state, result, count in session.execute(
        select(Device.state, Device.attestation_result, func.count()).group_by(
            Device.state, Device.attestation_result
        )
    ):
        key = (str(state), NEVER if result is None else str(result))
        matrix[key] = int(count)
        by_state[key[0]] = by_state.get(key[0], 0) + int(count)
        by_attestation[key[1]] = by_attestation.get(key[1], 0) + int(count)
    total = sum(by_state.values())
    last_seen: list[tuple[str, int]] = []
    within = 0  # seen within the previous bucket's window
    for label, window in LAST_SEEN_BUCKETS:
        seen = int(
            session.scalar(
                select(func.count()).select_from(Device).where(Device.last_seen >= now - window)
            )
            or 0
        )
        last_seen.append((label, seen - within))
        within = seen
    never_seen = int(
        session.scalar(select(func.count()).select_from(Device).where(Device.last_seen.is_(None)))
        or 0
    )
    last_seen.append(("over a day", total - within - never_seen))
    last_seen.append(("never", never_seen))
    timeline, bucket = _timeline(session, now=now)
    attention = [
        AttentionRow(row.device_id, str(row.state), row.attestation_reason, row.attested_at)
        for row in session.execute(
            select(Device.device_id, Device.state, Device.attestation_reason, Device.attested_at)
            .where(or_(Device.attestation_result == "untrusted", Device.state == "quarantined"))
            .order_by(Device.attested_at.desc(), Device.device_id)
            .limit(10)
        )
    ]
    return FleetSummary(
        total=total,
        by_state=by_state,
        by_attestation=by_attestation,
        matrix=matrix,
        last_seen=last_seen,
        groups=int(session.scalar(select(func.count()).select_from(Group)) or 0),
        operators=int(session.scalar(select(func.count()).select_from(Operator)) or 0),
        timeline=timeline,
        bucket_seconds=bucket,
        attention=attention,
    )


def _timeline(session: Session, *, now: int) -> tuple[list[TimelinePoint], int]:
    """Counts over time in ``TIMELINE_BUCKETS`` equal buckets from the first registration to
    ``now``. The registry keeps current state only, so "out of service" places each device that
    is out of service now at the time it entered that state; attestation verdicts come from the
    audit log (one ``attest.verdict`` entry each)."""
    first = session.scalar(select(func.min(Device.registered_at)))
    start = int(first) if first is not None else now - 3600
    width = max(60, -(-(now - start + 1) // TIMELINE_BUCKETS))
    start = now + 1 - width * TIMELINE_BUCKETS

    def bucket_counts(column: Any, *where: Any) -> dict[int, int]:
        # integer division in SQL: one row per non-empty bucket, never one per device
        index = ((column - start) // width).label("b")
        query = select(index, func.count()).where(column >= start, *where).group_by(index)
        return {int(b): int(n) for b, n in session.execute(query)}

    registered = bucket_counts(Device.registered_at)
    before_start = int(
        session.scalar(select(func.count()).select_from(Device).where(Device.registered_at < start))
        or 0
    )
    out = bucket_counts(Device.state_changed_at, Device.state.in_(OUT_OF_SERVICE))
    out_before = int(
        session.scalar(
            select(func.count())
            .select_from(Device)
            .where(Device.state.in_(OUT_OF_SERVICE), Device.state_changed_at < start)
        )
        or 0
    )
    verdict = AuditEntry.details.like('%"result":"trusted"%')
    trusted = bucket_counts(AuditEntry.time, AuditEntry.action == "attest.verdict", verdict)
    untrusted = bucket_counts(AuditEntry.time, AuditEntry.action == "attest.verdict", ~verdict)
    points: list[TimelinePoint] = []
    cumulative, cumulative_out = before_start, out_before
    for i in range(TIMELINE_BUCKETS):
        cumulative += registered.get(i, 0)
        cumulative_out += out.get(i, 0)
        points.append(
            TimelinePoint(
                start=start + i * width,
                registered=cumulative,
                out_of_service=cumulative_out,
                trusted=trusted.get(i, 0),
                untrusted=untrusted.get(i, 0),
            )
        )
    return points, width


# ---- devices -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceRow:
    device_id: str
    state: str
    attestation_result: str | None
    attestation_reason: str | None
    attested_at: int | None
    last_seen: int | None
    registered_at: int
    groups: int
    tags: list[str] = field(default_factory=list)


def device_list(
    session: Session,
    *,
    page: int,
    per_page: int,
    state: str | None = None,
    attestation: str | None = None,
    query: str | None = None,
    tag: str | None = None,
) -> Page[DeviceRow]:
    where = []
    if state:
        where.append(Device.state == state)
    if attestation == NEVER:
        where.append(Device.attestation_result.is_(None))
    elif attestation:
        where.append(Device.attestation_result == attestation)
    if query:
        where.append(Device.device_id.like(_like(query), escape="\\"))
    if tag:
        where.append(Device.device_id.in_(select(DeviceTag.device_id).where(DeviceTag.tag == tag)))
    total = int(session.scalar(select(func.count()).select_from(Device).where(*where)) or 0)
    rows = session.execute(
        select(
            Device.device_id,
            Device.state,
            Device.attestation_result,
            Device.attestation_reason,
            Device.attested_at,
            Device.last_seen,
            Device.registered_at,
        )
        .where(*where)
        .order_by(Device.device_id)
        .limit(per_page)
        .offset(_offset(page, per_page))
    ).all()
    ids = [row.device_id for row in rows]
    groups = dict(
        session.execute(
            select(GroupMember.device_id, func.count())
            .where(GroupMember.device_id.in_(ids))
            .group_by(GroupMember.device_id)
        ).all()
    )
    held = tags.tags_of(session, ids)
    return Page(
        [
            DeviceRow(
                device_id=row.device_id,
                state=str(row.state),
                attestation_result=None
                if row.attestation_result is None
                else str(row.attestation_result),
                attestation_reason=row.attestation_reason,
                attested_at=row.attested_at,
                last_seen=row.last_seen,
                registered_at=row.registered_at,
                groups=int(groups.get(row.device_id, 0)),
                tags=held.get(row.device_id, []),
            )
            for row in rows
        ],
        page=max(page, 1),
        per_page=per_page,
        total=total,
    )


@dataclass(frozen=True)
class CertificateInfo:
    """The public facts of a certificate, for people: nothing here is secret."""

    subject: str
    issuer: str
    serial: str
    not_before: int
    not_after: int
    fingerprint_sha256: str
    public_key: str
    key_id: str  # SHA-256 of the SubjectPublicKeyInfo, as COSE kids are made
    pem: str


def certificate_info(pem: str) -> CertificateInfo | None:
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        return None
    public = cert.public_key()
    spki = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if isinstance(public, ec.EllipticCurvePublicKey):
        described = f"EC {public.curve.name}"
    else:
        described = type(public).__name__
    return CertificateInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial=f"{cert.serial_number:x}",
        not_before=int(cert.not_valid_before_utc.timestamp()),
        not_after=int(cert.not_valid_after_utc.timestamp()),
        fingerprint_sha256=hashlib.sha256(
            cert.public_bytes(serialization.Encoding.DER)
        ).hexdigest(),
        public_key=described,
        key_id=hashlib.sha256(spki).hexdigest(),
        pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
    )


@dataclass(frozen=True)
class TransitionRow:
    from_state: str | None
    to_state: str
    at: int
    recorded_at: int


@dataclass(frozen=True)
class KeyRow:
    key_name: str
    kind: str | None
    state: str
    changed_at: int
    transitions: list[TransitionRow]
    next_states: list[str]  # where SP 800-57 lets it go from here


@dataclass(frozen=True)
class AttestationRow:
    seq: int
    time: int
    result: str
    check: str | None
    component: str | None
    reason: str


@dataclass(frozen=True)
class MembershipRow:
    group_id: str
    epoch: int
    leaf_index: int | None
    pending: str | None
    joined_epoch: int | None
    acked_current: bool


@dataclass(frozen=True)
class DeviceDetail:
    device_id: str
    state: str
    state_reason: str
    state_changed_at: int
    registered_at: int
    ek_cert_fingerprint: str
    attestation_result: str | None
    attestation_reason: str | None
    attested_at: int | None
    last_seen: int | None
    last_report_at: int | None
    has_ak: bool
    certificate: CertificateInfo | None
    keys: Page[KeyRow]
    key_states: dict[str, int]
    attestations: list[AttestationRow]
    groups: list[MembershipRow]
    tags: tuple[str, ...] = ()


def device_detail(
    session: Session, device_id: str, *, key_page: int, per_page: int
) -> DeviceDetail | None:
    row = session.execute(
        select(
            Device.device_id,
            Device.state,
            Device.state_reason,
            Device.state_changed_at,
            Device.registered_at,
            Device.ek_cert_fingerprint,
            Device.attestation_result,
            Device.attestation_reason,
            Device.attested_at,
            Device.last_seen,
            Device.last_report_at,
            Device.devid_cert_pem,
            Device.ak_public.is_not(None).label("has_ak"),
        ).where(Device.device_id == device_id)
    ).first()
    if row is None:
        return None
    key_total = int(
        session.scalar(
            select(func.count()).select_from(DeviceKey).where(DeviceKey.device_id == device_id)
        )
        or 0
    )
    key_states = {
        str(state): int(n)
        for state, n in session.execute(
            select(DeviceKey.state, func.count())
            .where(DeviceKey.device_id == device_id)
            .group_by(DeviceKey.state)
        )
    }
    key_rows = session.execute(
        select(
            DeviceKey.id, DeviceKey.key_name, DeviceKey.kind, DeviceKey.state, DeviceKey.changed_at
        )
        .where(DeviceKey.device_id == device_id)
        .order_by(DeviceKey.key_name)
        .limit(per_page)
        .offset(_offset(key_page, per_page))
    ).all()
    history: dict[int, list[TransitionRow]] = {row.id: [] for row in key_rows}
    for t in session.execute(
        select(
            KeyTransition.device_key_id,
            KeyTransition.from_state,
            KeyTransition.to_state,
            KeyTransition.at,
            KeyTransition.recorded_at,
        )
        .where(KeyTransition.device_key_id.in_(list(history)))
        .order_by(KeyTransition.id)
    ):
        history[t.device_key_id].append(
            TransitionRow(
                None if t.from_state is None else str(t.from_state),
                str(t.to_state),
                t.at,
                t.recorded_at,
            )
        )
    keys = Page(
        [
            KeyRow(
                key_name=k.key_name,
                kind=k.kind,
                state=str(k.state),
                changed_at=k.changed_at,
                transitions=history[k.id],
                next_states=sorted(s.value for s in ALLOWED_TRANSITIONS[KeyState(k.state)]),
            )
            for k in key_rows
        ],
        page=max(key_page, 1),
        per_page=per_page,
        total=key_total,
    )
    attestations = [
        _attestation_row(record)
        for record in _audit_rows(
            session,
            (AuditEntry.action == "attest.verdict") & (AuditEntry.target == device_id),
            limit=ATTESTATION_HISTORY,
        )
    ]
    groups = [
        MembershipRow(
            group_id=m.group_id,
            epoch=m.epoch,
            leaf_index=m.leaf_index,
            pending=None if m.pending is None else str(m.pending),
            joined_epoch=m.joined_epoch,
            acked_current=m.acked is not None,
        )
        for m in session.execute(
            select(
                GroupMember.group_id,
                Group.epoch,
                GroupMember.leaf_index,
                GroupMember.pending,
                GroupMember.joined_epoch,
                Ack.received_at.label("acked"),
            )
            .join(Group, Group.group_id == GroupMember.group_id)
            .outerjoin(
                Ack,
                and_(
                    Ack.group_id == GroupMember.group_id,
                    Ack.device_id == GroupMember.device_id,
                    Ack.epoch == Group.epoch,
                ),
            )
            .where(GroupMember.device_id == device_id)
            .order_by(GroupMember.group_id)
        )
    ]
    return DeviceDetail(
        device_id=row.device_id,
        state=str(row.state),
        state_reason=row.state_reason,
        state_changed_at=row.state_changed_at,
        registered_at=row.registered_at,
        ek_cert_fingerprint=row.ek_cert_fingerprint,
        attestation_result=None if row.attestation_result is None else str(row.attestation_result),
        attestation_reason=row.attestation_reason,
        attested_at=row.attested_at,
        last_seen=row.last_seen,
        last_report_at=row.last_report_at,
        has_ak=bool(row.has_ak),
        certificate=certificate_info(row.devid_cert_pem),
        keys=keys,
        key_states=key_states,
        attestations=attestations,
        groups=groups,
        tags=tags.device_tags(session, device_id),
    )


def _attestation_row(record: AuditRecord) -> AttestationRow:
    details = record.details_dict()
    result = details.get("result")
    return AttestationRow(
        seq=record.seq,
        time=record.time,
        result=str(result) if result else "?",
        check=None if details.get("check") is None else str(details["check"]),
        component=None if details.get("component") is None else str(details["component"]),
        reason=record.reason,
    )


def _audit_rows(session: Session, where: object, *, limit: int) -> list[AuditRecord]:
    rows = session.scalars(
        select(AuditEntry).where(where).order_by(AuditEntry.seq.desc()).limit(limit)  # type: ignore[arg-type]
    )
    return [record_of(row) for row in rows]


# ---- groups ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RekeyInfo:
    """The last operator rekey of a group, from the audit log: when it was accepted, by whom,
    when its result came and what it said. The ``*_ms`` times are the ``at_ms`` the service
    records in both entries' details (``started_at * 1000`` etc. for entries without it)."""

    started_at: int
    operator: str
    finished_at: int | None
    result: str | None
    started_at_ms: int
    finished_at_ms: int | None

    @property
    def duration_ms(self) -> int | None:
        return None if self.finished_at_ms is None else self.finished_at_ms - self.started_at_ms


@dataclass(frozen=True)
class GroupRow:
    group_id: str
    epoch: int
    members: int
    acked: int
    pending_changes: int
    commit_at: int | None  # when the commit that made the current epoch was accepted
    last_ack_at: int | None
    commit_at_ms: int | None = None
    last_ack_at_ms: int | None = None

    @property
    def pending(self) -> int:
        return self.members - self.acked

    @property
    def ack_duration_ms(self) -> int | None:
        """From the commit to the last member's ack, once every member acked."""
        if self.commit_at_ms is None or self.last_ack_at_ms is None or self.pending:
            return None
        return self.last_ack_at_ms - self.commit_at_ms


def _member_counts(session: Session, group_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(members with a leaf, pending changes) per group."""
    counts: dict[str, tuple[int, int]] = {g: (0, 0) for g in group_ids}
    for group_id, members, pending in session.execute(
        select(
            GroupMember.group_id,
            func.count(GroupMember.leaf_index),
            func.count(GroupMember.pending),
        )
        .where(GroupMember.group_id.in_(group_ids))
        .group_by(GroupMember.group_id)
    ):
        counts[group_id] = (int(members), int(pending))
    return counts


def _current_acks(
    session: Session, group_ids: Sequence[str]
) -> dict[str, tuple[int, int | None, int | None]]:
    """(acks by current members for the current epoch, time of the last one in seconds and in
    ms) per group."""
    result: dict[str, tuple[int, int | None, int | None]] = {}
    for group_id, count, last, last_ms in session.execute(
        select(Ack.group_id, func.count(), func.max(Ack.received_at), func.max(ACK_MS))
        .join(Group, and_(Group.group_id == Ack.group_id, Group.epoch == Ack.epoch))
        .join(GroupMember, _BY_CURRENT_MEMBER)
        .where(Ack.group_id.in_(group_ids))
        .group_by(Ack.group_id)
    ):
        result[group_id] = (
            int(count),
            None if last is None else int(last),
            None if last_ms is None else int(last_ms),
        )
    return result


def _commit_times(session: Session, group_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
    """When the commit that made each group's current epoch was accepted (if retained), in
    seconds and in ms."""
    return {
        group_id: (int(at), int(at_ms))
        for group_id, at, at_ms in session.execute(
            select(CommitLogEntry.group_id, CommitLogEntry.accepted_at, COMMIT_MS)
            .join(Group, _MADE_CURRENT_EPOCH)
            .where(CommitLogEntry.group_id.in_(group_ids))
        )
    }


def group_list(
    session: Session, *, page: int, per_page: int, query: str | None = None
) -> Page[GroupRow]:
    where = [Group.deleted_at.is_(None)]  # a deleted group is no longer listed
    if query:
        where.append(Group.group_id.like(_like(query), escape="\\"))
    total = int(session.scalar(select(func.count()).select_from(Group).where(*where)) or 0)
    groups = session.execute(
        select(Group.group_id, Group.epoch)
        .where(*where)
        .order_by(Group.group_id)
        .limit(per_page)
        .offset(_offset(page, per_page))
    ).all()
    ids = [g.group_id for g in groups]
    members = _member_counts(session, ids)
    acks = _current_acks(session, ids)
    commits = _commit_times(session, ids)
    return Page(
        [_group_row(g.group_id, g.epoch, members[g.group_id], acks, commits) for g in groups],
        page=max(page, 1),
        per_page=per_page,
        total=total,
    )


def _group_row(
    group_id: str,
    epoch: int,
    members: tuple[int, int],
    acks: dict[str, tuple[int, int | None, int | None]],
    commits: dict[str, tuple[int, int]],
) -> GroupRow:
    acked, last, last_ms = acks.get(group_id, (0, None, None))
    commit_at, commit_ms = commits.get(group_id, (None, None))
    return GroupRow(
        group_id=group_id,
        epoch=epoch,
        members=members[0],
        acked=acked,
        pending_changes=members[1],
        commit_at=commit_at,
        last_ack_at=last,
        commit_at_ms=commit_ms,
        last_ack_at_ms=last_ms,
    )


@dataclass(frozen=True)
class MemberRow:
    device_id: str
    device_state: str
    leaf_index: int | None
    pending: str | None
    joined_epoch: int | None
    acked_at: int | None
    latency_ms: int | None  # from the commit to this member's ack


@dataclass(frozen=True)
class CommitRow:
    epoch: int  # the epoch the commit was made in (it made epoch + 1)
    committer: str
    accepted_at: int
    acks: int  # acks for epoch + 1
    last_ack_at: int | None
    accepted_at_ms: int = 0
    last_ack_at_ms: int | None = None

    @property
    def last_ack_after_ms(self) -> int | None:
        return None if self.last_ack_at_ms is None else self.last_ack_at_ms - self.accepted_at_ms


@dataclass(frozen=True)
class GroupDeletion:
    """A deleted group's deletion (``keyfleet group delete``, ``provisioning.service.
    groupdelete``): when, the revocation feed entry that carries it, who asked and approved
    (from its ``op.group_delete`` audit entry, ``audit_seq``; None if that entry is not found),
    and its members at the deletion: how many reported a feed at or past the entry (they
    destroyed the group's keys), and the first ``per_page`` of those that did not yet. The
    proposer comes from the request's row while the service keeps it."""

    deleted_at: int
    feed_seq: int | None
    audit_seq: int | None
    proposer: str | None
    request_id: str | None
    approvers: list[str]
    members: int
    destroyed: int
    not_yet: list[str]


@dataclass(frozen=True)
class GroupDetail:
    summary: GroupRow
    created_at: int
    updated_at: int
    authenticators: int  # distinct epoch authenticators among the acks: more than 1 is a fork
    members: Page[MemberRow]
    commits: list[CommitRow]
    last_rekey: RekeyInfo | None
    deletion: GroupDeletion | None = None


def group_detail(
    session: Session, group_id: str, *, member_page: int, per_page: int
) -> GroupDetail | None:
    group = session.execute(
        select(
            Group.group_id,
            Group.epoch,
            Group.created_at,
            Group.updated_at,
            Group.deleted_at,
            Group.deleted_seq,
        ).where(Group.group_id == group_id)
    ).first()
    if group is None:
        return None
    summary = group_list_row(session, group.group_id, group.epoch)
    commit_ms = summary.commit_at_ms
    total = int(
        session.scalar(
            select(func.count()).select_from(GroupMember).where(GroupMember.group_id == group_id)
        )
        or 0
    )
    rows = session.execute(
        select(
            GroupMember.device_id,
            Device.state,
            GroupMember.leaf_index,
            GroupMember.pending,
            GroupMember.joined_epoch,
            Ack.received_at,
            ACK_MS.label("acked_ms"),
        )
        .join(Device, Device.device_id == GroupMember.device_id)
        .outerjoin(
            Ack,
            and_(
                Ack.group_id == GroupMember.group_id,
                Ack.device_id == GroupMember.device_id,
                Ack.epoch == group.epoch,
            ),
        )
        .where(GroupMember.group_id == group_id)
        .order_by(GroupMember.device_id)
        .limit(per_page)
        .offset(_offset(member_page, per_page))
    ).all()
    members = Page(
        [
            MemberRow(
                device_id=r.device_id,
                device_state=str(r.state),
                leaf_index=r.leaf_index,
                pending=None if r.pending is None else str(r.pending),
                joined_epoch=r.joined_epoch,
                acked_at=r.received_at,
                latency_ms=None
                if r.acked_ms is None or commit_ms is None
                else int(r.acked_ms) - commit_ms,
            )
            for r in rows
        ],
        page=max(member_page, 1),
        per_page=per_page,
        total=total,
    )
    authenticators = int(
        session.scalar(
            select(func.count(func.distinct(Ack.epoch_authenticator))).where(
                Ack.group_id == group_id, Ack.epoch == group.epoch
            )
        )
        or 0
    )
    commit_rows = session.execute(
        select(*_COMMIT_COLUMNS)
        .where(CommitLogEntry.group_id == group_id)
        .order_by(CommitLogEntry.epoch.desc())
        .limit(REKEY_HISTORY)
    ).all()
    ack_stats = {
        int(epoch): (int(n), _int(last), _int(last_ms))
        for epoch, n, last, last_ms in session.execute(
            select(Ack.epoch, func.count(), func.max(Ack.received_at), func.max(ACK_MS))
            .where(Ack.group_id == group_id, Ack.epoch.in_([c.epoch + 1 for c in commit_rows]))
            .group_by(Ack.epoch)
        )
    }
    commits = []
    for c in commit_rows:
        n, last, last_ms = ack_stats.get(c.epoch + 1, (0, None, None))
        commits.append(
            CommitRow(
                epoch=c.epoch,
                committer=c.committer,
                accepted_at=c.accepted_at,
                acks=n,
                last_ack_at=last,
                accepted_at_ms=int(c.accepted_ms),
                last_ack_at_ms=last_ms,
            )
        )
    return GroupDetail(
        summary=summary,
        created_at=group.created_at,
        updated_at=group.updated_at,
        authenticators=authenticators,
        members=members,
        commits=commits,
        last_rekey=last_rekey(session, group_id),
        deletion=None
        if group.deleted_at is None
        else _deletion(session, group_id, group.deleted_at, group.deleted_seq, per_page),
    )


def _deletion(
    session: Session, group_id: str, deleted_at: int, feed_seq: int | None, per_page: int
) -> GroupDeletion:
    entries = _audit_rows(
        session,
        (AuditEntry.action == "op.group_delete") & (AuditEntry.target == group_id),
        limit=1,
    )
    record = entries[0] if entries else None
    details = record.details_dict() if record is not None else {}
    everyone = deletions.members(session, group_id)
    reached = set() if feed_seq is None else deletions.reached(session, group_id, feed_seq)
    approvers = str(details.get("approvers") or "")
    request_id = None if details.get("request_id") is None else str(details["request_id"])
    proposer = (
        None
        if request_id is None
        else session.scalar(
            select(QuorumRequestRow.proposer).where(QuorumRequestRow.request_id == request_id)
        )
    )
    return GroupDeletion(
        deleted_at=deleted_at,
        feed_seq=feed_seq,
        audit_seq=None if record is None else record.seq,
        proposer=proposer,
        request_id=request_id,
        approvers=[a for a in approvers.split(",") if a],
        members=len(everyone),
        destroyed=sum(1 for d in everyone if d in reached),
        not_yet=[d for d in everyone if d not in reached][:per_page],
    )


def group_list_row(session: Session, group_id: str, epoch: int) -> GroupRow:
    return _group_row(
        group_id,
        epoch,
        _member_counts(session, [group_id])[group_id],
        _current_acks(session, [group_id]),
        _commit_times(session, [group_id]),
    )


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def current_commit(session: Session, group_id: str) -> CommitRow | None:
    """The accepted commit that made the group's current epoch, with its acks so far."""
    row = session.execute(
        select(*_COMMIT_COLUMNS)
        .join(Group, _MADE_CURRENT_EPOCH)
        .where(CommitLogEntry.group_id == group_id)
    ).first()
    if row is None:
        return None
    acks, last, last_ms = session.execute(
        select(func.count(), func.max(Ack.received_at), func.max(ACK_MS)).where(
            Ack.group_id == group_id, Ack.epoch == row.epoch + 1
        )
    ).one()
    return CommitRow(
        epoch=row.epoch,
        committer=row.committer,
        accepted_at=row.accepted_at,
        acks=int(acks),
        last_ack_at=_int(last),
        accepted_at_ms=int(row.accepted_ms),
        last_ack_at_ms=_int(last_ms),
    )


def last_rekey(session: Session, group_id: str) -> RekeyInfo | None:
    started = session.execute(
        select(AuditEntry.seq, AuditEntry.time, AuditEntry.actor, AuditEntry.details)
        .where(
            AuditEntry.action == "op.rekey",
            AuditEntry.target == group_id,
            AuditEntry.outcome == Outcome.ACCEPTED,
        )
        .order_by(AuditEntry.seq.desc())
        .limit(1)
    ).first()
    if started is None:
        return None
    finished = session.execute(
        select(AuditEntry.time, AuditEntry.reason, AuditEntry.details)
        .where(
            AuditEntry.action == "op.rekey.result",
            AuditEntry.target == group_id,
            AuditEntry.seq > started.seq,
        )
        .order_by(AuditEntry.seq)
        .limit(1)
    ).first()
    return RekeyInfo(
        started_at=started.time,
        operator=started.actor.removeprefix("operator:"),
        finished_at=None if finished is None else finished.time,
        result=None if finished is None else finished.reason,
        started_at_ms=_entry_ms(started.time, started.details),
        finished_at_ms=None if finished is None else _entry_ms(finished.time, finished.details),
    )


def _entry_ms(time: int, details: str) -> int:
    """An audit entry's time in ms: its ``at_ms`` detail (the service records one in operator
    commands and their results) if it lies within the entry's second, else ``time * 1000``."""
    try:
        at_ms = json.loads(details).get("at_ms")
    except (ValueError, AttributeError):
        at_ms = None
    if isinstance(at_ms, int) and not isinstance(at_ms, bool) and at_ms // 1000 == time:
        return at_ms
    return time * 1000


# ---- live ack progress -------------------------------------------------------------------------


@dataclass(frozen=True)
class AckProgress:
    """The current epoch's acks of a group, for the live view: ``acks`` are (device, received
    time in seconds, in ms) of current members, oldest first, restricted to those at or after
    second ``since``."""

    group_id: str
    epoch: int
    members: int
    acked: int
    commit_at: int | None
    commit_at_ms: int | None = None
    acks: list[tuple[str, int, int]] = field(default_factory=list)


def ack_progress(
    session: Session, group_id: str, *, since: int | None = None
) -> AckProgress | None:
    """None for no group, or a deleted one: its event stream ends (``gone``) or is a 404."""
    group = session.execute(
        select(Group.group_id, Group.epoch).where(
            Group.group_id == group_id, Group.deleted_at.is_(None)
        )
    ).first()
    if group is None:
        return None
    row = group_list_row(session, group.group_id, group.epoch)
    query = (
        select(Ack.device_id, Ack.received_at, ACK_MS)
        .join(GroupMember, _BY_CURRENT_MEMBER)
        .where(Ack.group_id == group_id, Ack.epoch == group.epoch)
        .order_by(ACK_MS, Ack.device_id)
    )
    if since is not None:
        query = query.where(Ack.received_at >= since)
    return AckProgress(
        group_id=group_id,
        epoch=group.epoch,
        members=row.members,
        acked=row.acked,
        commit_at=row.commit_at,
        commit_at_ms=row.commit_at_ms,
        acks=[(device, int(at), int(at_ms)) for device, at, at_ms in session.execute(query)],
    )


# ---- audit log ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditPage:
    rows: list[AuditRecord]
    total: int  # entries matching the filter
    newer: int | None  # ``after`` value for the newer page, None if this is the newest
    older: int | None  # ``before`` value for the older page, None if this is the oldest


def audit_list(
    session: Session,
    *,
    per_page: int,
    query: str | None = None,
    outcome: str | None = None,
    before: int | None = None,
    after: int | None = None,
) -> AuditPage:
    """Newest first, keyset-paged on ``seq`` (the primary key): ``before`` shows entries older
    than that seq, ``after`` entries newer than it; the cost does not grow with the page number.
    ``query`` matches actor, action, target or reason anywhere."""
    where = []
    if query:
        pattern = _like(query)
        where.append(
            or_(
                AuditEntry.actor.like(pattern, escape="\\"),
                AuditEntry.action.like(pattern, escape="\\"),
                AuditEntry.target.like(pattern, escape="\\"),
                AuditEntry.reason.like(pattern, escape="\\"),
            )
        )
    if outcome:
        where.append(AuditEntry.outcome == outcome)
    total = int(session.scalar(select(func.count()).select_from(AuditEntry).where(*where)) or 0)
    page_where = list(where)
    if after is not None:
        page_where.append(AuditEntry.seq > after)
        order = AuditEntry.seq.asc()
    else:
        if before is not None:
            page_where.append(AuditEntry.seq < before)
        order = AuditEntry.seq.desc()
    rows = [
        record_of(row)
        for row in session.scalars(
            select(AuditEntry).where(*page_where).order_by(order).limit(per_page)
        )
    ]
    rows.sort(key=lambda r: r.seq, reverse=True)
    newer = older = None
    if rows:
        top, bottom = rows[0].seq, rows[-1].seq
        if session.scalar(select(AuditEntry.seq).where(*where, AuditEntry.seq > top).limit(1)):
            newer = top
        if session.scalar(select(AuditEntry.seq).where(*where, AuditEntry.seq < bottom).limit(1)):
            older = bottom
    return AuditPage(rows=rows, total=total, newer=newer, older=older)


def audit_head(session: Session) -> tuple[int, bytes]:
    """(seq, hash) of the newest entry, (0, b"") for an empty log: the verification cache key."""
    row = session.execute(
        select(AuditEntry.seq, AuditEntry.entry_hash).order_by(AuditEntry.seq.desc()).limit(1)
    ).first()
    return (0, b"") if row is None else (int(row.seq), bytes(row.entry_hash))
