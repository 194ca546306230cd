"""The rekey policy's rows (``provisioning.service.rekeypolicy``): each group's own policy and
each member's last self-update. Plain reads and upserts: two instances recording the same
accepted commit write the same values; the ask is recorded by the one instance holding the
rekey task's lease."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from sqlalchemy import (
    ColumnElement,
    Executable,
    Select,
    and_,
    bindparam,
    case,
    delete,
    literal,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from provisioning.db.engine import table_of
from provisioning.db.runtime import (
    LeafUpdateRow,
    RekeyDefaultRow,
    RekeyPolicyRow,
    UpdateProposalRow,
)
from provisioning.db.schema import Group, GroupMember, PendingChange

_IN_CHUNK: Final = 500  # ids per IN list (SQLite's bound on variables, PostgreSQL's plans)


def group_ids(session: Session) -> list[str]:
    """Every group the rekey policy applies to: not the deleted ones."""
    return list(
        session.scalars(
            select(Group.group_id).where(Group.deleted_at.is_(None)).order_by(Group.group_id)
        )
    )


def policy(session: Session, group_id: str) -> tuple[int, int] | None:
    """``(max_age, max_epochs)`` of the group's own policy, None if it follows the default."""
    row = session.get(RekeyPolicyRow, group_id)
    return None if row is None else (row.max_age, row.max_epochs)


def set_policy(
    session: Session, group_id: str, *, max_age: int, max_epochs: int, operator: str, now: int
) -> None:
    row = session.get(RekeyPolicyRow, group_id)
    if row is None:
        session.add(
            RekeyPolicyRow(
                group_id=group_id,
                max_age=max_age,
                max_epochs=max_epochs,
                set_by=operator,
                set_at=now,
            )
        )
    else:
        row.max_age, row.max_epochs, row.set_by, row.set_at = max_age, max_epochs, operator, now
    session.flush()


Bounds = tuple[int, int]  # (max_age, max_epochs) of a policy; 0: that bound off


def due_values(
    bounds: Bounds,
    *,
    epoch: int,
    updated_at: int,
    asked_at: int | None,
    repeat: int,
    group_epoch: int,
    now: int,
) -> tuple[int | None, int | None]:
    """``(due_at, due_epoch)`` of a row under ``bounds`` in a group at ``group_epoch``: when the
    rekey check must look at it again (None: not by time), and from which group epoch it is
    due by the epoch bound (None: not by epochs). A row due by epochs already is due ``now``;
    one the group's commits make due later is made due then (``mark_epoch_due``): the check
    reads ``due_at`` alone. Once asked, only the repeat interval counts: the check looks again
    then, and a row it finds not due any more is written back as if never asked."""
    if asked_at is not None:
        return asked_at + repeat, None
    max_age, max_epochs = bounds
    due_at = updated_at + max_age if max_age else None
    due_epoch = epoch + max_epochs if max_epochs else None
    if due_epoch is not None and due_epoch <= group_epoch:
        due_at = now if due_at is None else min(due_at, now)
    return due_at, due_epoch


def leaf_rows(session: Session, group_id: str) -> list[LeafUpdateRow]:
    return list(session.scalars(select(LeafUpdateRow).where(LeafUpdateRow.group_id == group_id)))


def put_update(
    session: Session,
    group_id: str,
    device_id: str,
    *,
    epoch: int,
    now: int,
    bounds: Bounds,
    group_epoch: int,
) -> None:
    """``device_id``'s leaf is new from ``epoch``, at ``now``; any open ask is answered.
    ``bounds``: the group's policy, ``group_epoch`` its epoch, for the row's due columns."""
    put_updates(
        session,
        group_id,
        (device_id,),
        epoch=epoch,
        now=now,
        bounds=bounds,
        group_epoch=group_epoch,
    )


def put_updates(
    session: Session,
    group_id: str,
    device_ids: Sequence[str],
    *,
    epoch: int,
    now: int,
    bounds: Bounds,
    group_epoch: int,
) -> None:
    """``put_update`` of each of ``device_ids`` (a commit adding a hundred members writes a
    hundred rows): one upsert (``INSERT ... ON CONFLICT DO UPDATE ... WHERE``, SQLite and
    PostgreSQL), which leaves a row alone whose epoch is already past ``epoch`` (every commit
    writes some rows: the session need not hold them)."""
    wanted = list(dict.fromkeys(device_ids))
    if not wanted:
        return
    due_at, due_epoch = due_values(
        bounds,
        epoch=epoch,
        updated_at=now,
        asked_at=None,
        repeat=0,
        group_epoch=group_epoch,
        now=now,
    )
    values = {
        "epoch": epoch,
        "updated_at": now,
        "asked_at": None,
        "due_at": due_at,
        "due_epoch": due_epoch,
    }
    session.execute(
        _upsert(session.get_bind().dialect.name),
        [{"group_id": group_id, "device_id": d, **values} for d in wanted],
    )


_UPSERTS: dict[str, Executable] = {}


def _upsert(dialect: str) -> Executable:
    """The leaf-update rows' upsert, built once per dialect: a row's columns move only from an
    epoch not past the new one."""
    statement = _UPSERTS.get(dialect)
    if statement is None:
        table = table_of(LeafUpdateRow)
        insert_ = sqlite_insert(table) if dialect == "sqlite" else postgresql_insert(table)
        new = insert_.excluded
        statement = insert_.on_conflict_do_update(
            index_elements=[table.c.group_id, table.c.device_id],
            set_={
                "epoch": new.epoch,
                "updated_at": new.updated_at,
                "asked_at": new.asked_at,
                "due_at": new.due_at,
                "due_epoch": new.due_epoch,
            },
            where=table.c.epoch <= new.epoch,
        )
        _UPSERTS[dialect] = statement
    return statement


def mark_epoch_due(session: Session, group_id: str, group_epoch: int, now: int) -> None:
    """The group reached ``group_epoch``: its rows due by epochs from then on are due ``now``
    (one indexed UPDATE, index ``group_id, due_epoch``; asked rows have no ``due_epoch``)."""
    session.execute(_MARK_EPOCH_DUE, {"group": group_id, "reached": group_epoch, "now": now})


_LEAVES = table_of(LeafUpdateRow)
_MARK_EPOCH_DUE: Final = (
    update(_LEAVES)
    .where(
        _LEAVES.c.group_id == bindparam("group"),
        _LEAVES.c.due_epoch <= bindparam("reached"),
        or_(_LEAVES.c.due_at.is_(None), _LEAVES.c.due_at > bindparam("now")),
    )
    .values(due_at=bindparam("now"))
)


def mark_asked(
    session: Session,
    group_id: str,
    device_id: str,
    *,
    epoch: int,
    updated_at: int,
    now: int,
    repeat: int,
) -> None:
    """The service asked ``device_id`` (last updated at ``epoch``, ``updated_at``: written if
    it has no row yet) for a self-update at ``now``; the check looks again ``repeat`` later."""
    row = session.get(LeafUpdateRow, (group_id, device_id))
    if row is None:
        session.add(
            LeafUpdateRow(
                group_id=group_id,
                device_id=device_id,
                epoch=epoch,
                updated_at=updated_at,
                asked_at=now,
                due_at=now + repeat,
                due_epoch=None,
            )
        )
    else:
        row.asked_at, row.due_at, row.due_epoch = now, now + repeat, None
    session.flush()


def set_due(session: Session, row: LeafUpdateRow, due: tuple[int | None, int | None]) -> None:
    row.due_at, row.due_epoch = due
    session.flush()


def recompute(
    session: Session, bounds: Bounds, *, repeat: int, group_id: str | None, now: int
) -> None:
    """Every row of ``group_id`` (None: of every group without its own policy) computed again
    under ``bounds`` (``due_values`` in one UPDATE)."""
    max_age, max_epochs = bounds
    asked = LeafUpdateRow.asked_at.is_not(None)
    group_epoch = (
        select(Group.epoch).where(Group.group_id == LeafUpdateRow.group_id).scalar_subquery()
    )
    whens: list[tuple[ColumnElement[bool], Any]] = [(asked, LeafUpdateRow.asked_at + repeat)]
    if max_epochs:
        whens.append((LeafUpdateRow.epoch + max_epochs <= group_epoch, literal(now)))
    query = update(LeafUpdateRow).values(
        due_at=case(*whens, else_=(LeafUpdateRow.updated_at + max_age) if max_age else null()),
        due_epoch=case((asked, null()), else_=LeafUpdateRow.epoch + max_epochs)
        if max_epochs
        else null(),
    )
    live = select(Group.group_id).where(Group.deleted_at.is_(None))
    query = query.where(LeafUpdateRow.group_id.in_(live))
    if group_id is not None:
        query = query.where(LeafUpdateRow.group_id == group_id)
    else:
        query = query.where(LeafUpdateRow.group_id.not_in(select(RekeyPolicyRow.group_id)))
    session.execute(query.execution_options(synchronize_session=False))


def bounds_of(session: Session, group_id: str) -> tuple[Bounds | None, Bounds | None]:
    """``(policy(group_id), default_basis())`` in one query."""
    found: list[Bounds | None] = [None, None]
    for max_age, max_epochs, which in session.execute(_BOUNDS, {"group": group_id}):
        found[int(which)] = (int(max_age), int(max_epochs))
    return found[0], found[1]


_BOUNDS: Final = (
    select(RekeyPolicyRow.max_age, RekeyPolicyRow.max_epochs, literal(0))
    .where(RekeyPolicyRow.group_id == bindparam("group"))
    .union_all(
        select(RekeyDefaultRow.max_age, RekeyDefaultRow.max_epochs, literal(1)).where(
            RekeyDefaultRow.id == 1
        )
    )
)


def default_basis(session: Session) -> Bounds | None:
    """The service default the rows of groups without their own policy were computed with."""
    row = session.get(RekeyDefaultRow, 1)
    return None if row is None else (row.max_age, row.max_epochs)


def set_default_basis(session: Session, bounds: Bounds) -> None:
    row = session.get(RekeyDefaultRow, 1)
    if row is None:
        session.add(RekeyDefaultRow(id=1, max_age=bounds[0], max_epochs=bounds[1]))
    else:
        row.max_age, row.max_epochs = bounds
    session.flush()


def own_policies(session: Session) -> dict[str, Bounds]:
    """Every group's own policy (the groups that have one)."""
    return {r.group_id: (r.max_age, r.max_epochs) for r in session.scalars(select(RekeyPolicyRow))}


def _due(now: int) -> Select[LeafUpdateRow, int]:
    """Rows with ``due_at <= now`` (index ``due_at``) of members holding a leaf in live groups
    (a row of a deleted group has no due columns: ``clear_due``), with the group's epoch."""
    return (
        select(LeafUpdateRow, Group.epoch)
        .join(Group, Group.group_id == LeafUpdateRow.group_id)
        .join(
            GroupMember,
            and_(
                GroupMember.group_id == LeafUpdateRow.group_id,
                GroupMember.device_id == LeafUpdateRow.device_id,
            ),
        )
        .where(
            LeafUpdateRow.due_at <= now,
            Group.deleted_at.is_(None),
            GroupMember.leaf_index.is_not(None),
            or_(GroupMember.pending.is_(None), GroupMember.pending != PendingChange.REMOVE),
        )
    )


def any_due(session: Session, now: int) -> bool:
    return session.execute(_due(now).limit(1)).first() is not None


def due_rows(
    session: Session, now: int, group_id: str | None = None
) -> list[tuple[LeafUpdateRow, int]]:
    """The rows the rekey check must look at, each with its group's epoch: one indexed read,
    whatever the number of members not due."""
    query = _due(now)
    if group_id is not None:
        query = query.where(LeafUpdateRow.group_id == group_id)
    return [(row, epoch) for row, epoch in session.execute(query)]


def clear_due(session: Session, group_id: str) -> None:
    """The group is deleted: the check never looks at its rows again."""
    session.execute(
        update(LeafUpdateRow)
        .where(LeafUpdateRow.group_id == group_id)
        .values(due_at=None, due_epoch=None)
        .execution_options(synchronize_session=False)
    )


def unrecorded(session: Session, limit: int) -> list[tuple[str, str, int | None, int]]:
    """Up to ``limit`` members holding a leaf in live groups with no row yet (from before the
    policy existed): ``(group, device, joined_epoch, group's epoch)``. One anti-join over the
    members."""
    query = (
        select(GroupMember.group_id, GroupMember.device_id, GroupMember.joined_epoch, Group.epoch)
        .join(Group, Group.group_id == GroupMember.group_id)
        .outerjoin(
            LeafUpdateRow,
            and_(
                LeafUpdateRow.group_id == GroupMember.group_id,
                LeafUpdateRow.device_id == GroupMember.device_id,
            ),
        )
        .where(
            LeafUpdateRow.device_id.is_(None),
            Group.deleted_at.is_(None),
            GroupMember.leaf_index.is_not(None),
            or_(GroupMember.pending.is_(None), GroupMember.pending != PendingChange.REMOVE),
        )
        .limit(limit)
    )
    return [(g, d, e, ge) for g, d, e, ge in session.execute(query)]


def forget(session: Session, group_id: str, device_id: str) -> None:
    session.execute(
        delete(LeafUpdateRow).where(
            LeafUpdateRow.group_id == group_id, LeafUpdateRow.device_id == device_id
        )
    )


# -- a full rekey's Update proposals (provisioning.service.fullrekey) ----------------------------


def put_proposal(
    session: Session,
    request_id: bytes,
    *,
    group_id: str,
    device_id: str,
    epoch: int,
    leaf_index: int,
    proposal: bytes,
    now: int,
) -> None:
    """Keep ``device_id``'s proposal for the job ``request_id`` (a repeated answer replaces
    its earlier one: the device answers a repeated request with the same proposal)."""
    row = session.get(UpdateProposalRow, (request_id.hex(), device_id))
    if row is None:
        session.add(
            UpdateProposalRow(
                request_id=request_id.hex(),
                device_id=device_id,
                group_id=group_id,
                epoch=epoch,
                leaf_index=leaf_index,
                proposal=proposal,
                requested_epoch=None,
                received_at=now,
            )
        )
    else:
        row.epoch, row.leaf_index, row.proposal = epoch, leaf_index, proposal
    session.flush()


def proposals(session: Session, request_id: bytes) -> list[UpdateProposalRow]:
    """The job's proposals not committed yet, by leaf index."""
    return list(
        session.scalars(
            select(UpdateProposalRow)
            .where(UpdateProposalRow.request_id == request_id.hex())
            .order_by(UpdateProposalRow.leaf_index)
        )
    )


def mark_requested(session: Session, request_id: bytes, devices: list[str], epoch: int) -> None:
    """The commit request for ``epoch`` carries exactly these devices' proposals."""
    for row in proposals(session, request_id):
        row.requested_epoch = epoch if row.device_id in devices else None
    session.flush()


def requested(session: Session, request_id: bytes, epoch: int) -> list[bytes]:
    """The proposals the commit request for ``epoch`` carries."""
    return [p.proposal for p in proposals(session, request_id) if p.requested_epoch == epoch]


def drop_proposals(session: Session, request_id: bytes, devices: list[str] | None = None) -> None:
    """Forget the job's proposals of ``devices`` (committed, or its committer's own), or all."""
    query = delete(UpdateProposalRow).where(UpdateProposalRow.request_id == request_id.hex())
    if devices is not None:
        query = query.where(UpdateProposalRow.device_id.in_(devices))
    session.execute(query.execution_options(synchronize_session=False))
