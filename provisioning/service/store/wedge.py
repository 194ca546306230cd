"""Wedge recovery's rows (imported as a module by ``provisioning.service.recovery``): members'
reports of commits they cannot process, and the rollback of a group's newest commit.

What a rollback restores is what joiners' trees are rebuilt from (``store.trees``): the head and
GroupContext kept for the epoch the commit was made in (``service_group_tree_epochs``) and what
the tree rows it rewrote held before it (``service_group_tree_undo``), written by every accepted
commit. Only a commit that converts a whole-state row (``store.trees``, "A row that holds the
whole public state") keeps that state in ``service_group_previous`` (``save_previous``): its
undo rows cannot rebuild it."""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from agent.protocol.wire.messages.group import CommitRefused
from provisioning.db.engine import rowcount, table_of
from provisioning.db.runtime import (
    CommitReportRow,
    GroupPreviousNodeRow,
    GroupPreviousRow,
    GroupTreeEpochRow,
)
from provisioning.db.schema import Ack as AckRow
from provisioning.db.schema import CommitLogEntry, Group
from provisioning.registry import new_state_token
from provisioning.service.store import trees


def save_previous(session: Session, group_id: str, nodes: Mapping[int, bytes | None]) -> None:
    """Keep the group's public state as it is now (before the commit about to be accepted):
    its row's ``public_tree`` and ``nodes``, what its tree rows hold now at the nodes the commit
    rewrites (``store.trees``). Only for a row holding the whole state (module docstring): any
    other commit's undo rows are what a rollback restores. Core statements on the tables: the
    session never holds these rows."""
    group = session.get(Group, group_id)
    if group is None:
        return
    nodes_table, previous = table_of(GroupPreviousNodeRow), table_of(GroupPreviousRow)
    session.execute(delete(nodes_table).where(nodes_table.c.group_id == group_id))
    if nodes:
        session.execute(
            insert(nodes_table),
            [{"group_id": group_id, "node": x, "data": d} for x, d in nodes.items()],
        )
    head = {
        "epoch": group.epoch,
        "public_tree": group.public_tree,
        "group_context": group.group_context,
    }
    kept = session.execute(update(previous).where(previous.c.group_id == group_id).values(head))
    if rowcount(kept) == 0:
        session.execute(insert(previous).values(group_id=group_id, **head))


def add_report(session: Session, sender: str, body: CommitRefused, *, now: int) -> bool:
    """Record ``sender``'s report; False if it already reported this epoch of the group."""
    if session.get(CommitReportRow, (body.group_id, body.epoch, sender)) is not None:
        return False
    session.add(
        CommitReportRow(
            group_id=body.group_id,
            epoch=body.epoch,
            device_id=sender,
            commit_hash=body.commit_hash,
            check_id=body.check,
            received_at=now,
        )
    )
    return True


def reports(session: Session, group_id: str, epoch: int) -> dict[str, bytes]:
    """Reporter -> the commit hash it named, for ``epoch`` of ``group_id``."""
    rows = session.scalars(
        select(CommitReportRow).where(
            CommitReportRow.group_id == group_id, CommitReportRow.epoch == epoch
        )
    )
    return {row.device_id: row.commit_hash for row in rows}


def reported(session: Session) -> list[tuple[str, int]]:
    """(group, epoch) with reports waiting for a decision."""
    rows = session.execute(select(CommitReportRow.group_id, CommitReportRow.epoch).distinct()).all()
    return sorted((str(g), int(e)) for g, e in rows)


def drop_reports(session: Session, group_id: str, epoch: int) -> None:
    session.execute(
        delete(CommitReportRow).where(
            CommitReportRow.group_id == group_id, CommitReportRow.epoch == epoch
        )
    )


def roll_back(session: Session, group_id: str, epoch: int, *, now: int) -> bool:
    """Undo the commit accepted in ``epoch``: the group goes back to ``epoch`` with the public
    state kept before it, the commit leaves the commit log (catch-up no longer replays it), the
    acks of the epoch it started are dropped. False (nothing changed) unless that commit is the
    group's newest and its previous state is kept (its undo rows, or for a commit that converted
    a whole-state row, ``service_group_previous``)."""
    previous = session.get(GroupPreviousRow, group_id)
    if previous is not None and previous.epoch == epoch:
        if not _restore_head(
            session,
            group_id,
            epoch,
            head=previous.public_tree,
            group_context=previous.group_context,
            now=now,
        ):
            return False
        nodes = session.execute(
            select(GroupPreviousNodeRow.node, GroupPreviousNodeRow.data).where(
                GroupPreviousNodeRow.group_id == group_id
            )
        )
        trees.write(session, group_id, {x: d for x, d in nodes})
        session.execute(
            delete(GroupPreviousNodeRow)
            .where(GroupPreviousNodeRow.group_id == group_id)
            .execution_options(synchronize_session=False)
        )
        session.delete(previous)
        trees.drop_undo_of(session, group_id, epoch)
        return True
    kept = session.get(GroupTreeEpochRow, (group_id, epoch))
    if kept is None:
        return False
    if not _restore_head(
        session, group_id, epoch, head=kept.head, group_context=kept.group_context, now=now
    ):
        return False
    trees.write(session, group_id, trees.undo_rows(session, group_id, epoch))
    trees.drop_undo_of(session, group_id, epoch)
    return True


def _restore_head(
    session: Session, group_id: str, epoch: int, *, head: bytes, group_context: bytes, now: int
) -> bool:
    """The group's row back to ``epoch`` (only from ``epoch + 1``: the commit is its newest),
    its commit of ``epoch`` out of the log and the acks of later epochs dropped."""
    result = session.execute(
        update(Group)
        .where(Group.group_id == group_id, Group.epoch == epoch + 1)
        .values(
            epoch=epoch,
            public_tree=head,
            group_context=group_context,
            updated_at=now,
            state_token=new_state_token(),
        )
        .execution_options(synchronize_session=False)
    )
    if rowcount(result) != 1:
        return False
    session.execute(
        delete(CommitLogEntry).where(
            CommitLogEntry.group_id == group_id, CommitLogEntry.epoch == epoch
        )
    )
    session.execute(delete(AckRow).where(AckRow.group_id == group_id, AckRow.epoch > epoch))
    return True
