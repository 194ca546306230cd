"""Deleted groups' rows (``groups.deleted_at``/``deleted_seq``, ``group_deleted_members``) and
the reads the deletion's progress needs; the flow is ``provisioning.service.groupdelete``
(which imports this as a module)."""

from __future__ import annotations

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from provisioning.db.engine import RetryableConflict, rowcount
from provisioning.db.runtime import HeldMessage, OperationRow, RevocationFeedSeen
from provisioning.db.schema import Group, GroupDeletedMember, GroupMember
from provisioning.service.store import trees


def deleted_seq(session: Session, group_id: str) -> int | None:
    """The feed entry that deleted ``group_id``; None if it is not deleted (or unknown)."""
    row = session.get(Group, group_id)
    return None if row is None or row.deleted_at is None else row.deleted_seq


def mark_deleted(session: Session, group_id: str, *, seq: int, now: int) -> list[str]:
    """Mark the group deleted by feed entry ``seq`` and move its members (those holding a
    leaf) to ``group_deleted_members``; pending adds and removals are dropped with the rest of
    its ``group_members`` rows, and the rows that rebuild its older trees (``trees.drop_undo``).
    Returns the members. Two instances deleting at once: one conditional UPDATE wins, the
    other transaction retries (and then finds it deleted)."""
    marked = session.execute(
        update(Group)
        .where(Group.group_id == group_id, Group.deleted_at.is_(None))
        .values(deleted_at=now, deleted_seq=seq, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if rowcount(marked) != 1:
        raise RetryableConflict(f"group {group_id!r} was deleted concurrently")
    members = list(
        session.scalars(
            select(GroupMember.device_id)
            .where(GroupMember.group_id == group_id, GroupMember.leaf_index.is_not(None))
            .order_by(GroupMember.device_id)
        )
    )
    if members:
        session.execute(
            insert(GroupDeletedMember),
            [{"group_id": group_id, "device_id": device_id} for device_id in members],
        )
    session.execute(
        delete(GroupMember)
        .where(GroupMember.group_id == group_id)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        delete(HeldMessage)
        .where(HeldMessage.group_id == group_id)
        .execution_options(synchronize_session=False)
    )
    trees.drop_undo(session, group_id)  # no member is left to ask for an older tree
    row = session.get(Group, group_id)
    if row is not None:
        session.expire(row)  # its columns were written by the UPDATE above
    return members


def members(session: Session, group_id: str) -> list[str]:
    return list(
        session.scalars(
            select(GroupDeletedMember.device_id)
            .where(GroupDeletedMember.group_id == group_id)
            .order_by(GroupDeletedMember.device_id)
        )
    )


def reached(session: Session, group_id: str, seq: int) -> set[str]:
    """The deleted group's members whose last keys.report showed a feed at or past ``seq``."""
    return set(
        session.scalars(
            select(GroupDeletedMember.device_id)
            .join(RevocationFeedSeen, RevocationFeedSeen.device_id == GroupDeletedMember.device_id)
            .where(GroupDeletedMember.group_id == group_id, RevocationFeedSeen.seq >= seq)
        )
    )


def open_operations_reached(
    session: Session, device_id: str, seq: int, operation_type: str
) -> list[bytes]:
    """Command ids of the unfinished deletions (``operation_type``) of groups ``device_id``
    was a member of whose feed entry is at or below ``seq``."""
    groups = select(Group.group_id).join(
        GroupDeletedMember, GroupDeletedMember.group_id == Group.group_id
    )
    groups = groups.where(GroupDeletedMember.device_id == device_id, Group.deleted_seq <= seq)
    rows = session.scalars(
        select(OperationRow.command_id).where(
            OperationRow.type == operation_type,
            OperationRow.finished_at.is_(None),
            OperationRow.target.in_(groups),
        )
    )
    return [bytes.fromhex(command_id) for command_id in rows]


def any_open_operation(session: Session, operation_type: str) -> bool:
    """Whether any ``operation_type`` operation is unfinished (one query for a batch of reports:
    none open, and no report can complete one)."""
    found = session.scalars(
        select(OperationRow.command_id)
        .where(OperationRow.type == operation_type, OperationRow.finished_at.is_(None))
        .limit(1)
    ).first()
    return found is not None


def live_group_ids(session: Session) -> list[str]:
    """Every group not deleted."""
    return list(
        session.scalars(
            select(Group.group_id).where(Group.deleted_at.is_(None)).order_by(Group.group_id)
        )
    )
