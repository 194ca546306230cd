"""The rekey policy's rows (``provisioning.service.rekeypolicy``): each group's own policy and
each member's last self-update. Plain reads and upserts: two instances recording the same
accepted commit write the same values; the ask is recorded by the one instance holding the
rekey task's lease."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from provisioning.db.runtime import LeafUpdateRow, RekeyPolicyRow, UpdateProposalRow
from provisioning.db.schema import Group

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


def leaf_rows(session: Session, group_id: str) -> list[LeafUpdateRow]:
    return list(session.scalars(select(LeafUpdateRow).where(LeafUpdateRow.group_id == group_id)))


def put_update(session: Session, group_id: str, device_id: str, *, epoch: int, now: int) -> None:
    """``device_id``'s leaf is new from ``epoch``, at ``now``; any open ask is answered."""
    put_updates(session, group_id, (device_id,), epoch=epoch, now=now)


def put_updates(
    session: Session, group_id: str, device_ids: Sequence[str], *, epoch: int, now: int
) -> None:
    """``put_update`` of each of ``device_ids``: their rows read in one query and written in
    one flush (a commit adding a hundred members writes a hundred rows)."""
    wanted = list(dict.fromkeys(device_ids))
    if not wanted:
        return
    found: dict[str, LeafUpdateRow] = {}
    for start in range(0, len(wanted), _IN_CHUNK):
        part = wanted[start : start + _IN_CHUNK]
        found.update(
            (row.device_id, row)
            for row in session.scalars(
                select(LeafUpdateRow).where(
                    LeafUpdateRow.group_id == group_id, LeafUpdateRow.device_id.in_(part)
                )
            )
        )
    for device_id in wanted:
        row = found.get(device_id)
        if row is None:
            session.add(
                LeafUpdateRow(
                    group_id=group_id,
                    device_id=device_id,
                    epoch=epoch,
                    updated_at=now,
                    asked_at=None,
                )
            )
        elif epoch >= row.epoch:
            row.epoch, row.updated_at, row.asked_at = epoch, now, None
    session.flush()


def mark_asked(
    session: Session, group_id: str, device_id: str, *, epoch: int, updated_at: int, now: int
) -> None:
    """The service asked ``device_id`` (last updated at ``epoch``, ``updated_at``: written if
    it has no row yet) for a self-update at ``now``."""
    row = session.get(LeafUpdateRow, (group_id, device_id))
    if row is None:
        session.add(
            LeafUpdateRow(
                group_id=group_id,
                device_id=device_id,
                epoch=epoch,
                updated_at=updated_at,
                asked_at=now,
            )
        )
    else:
        row.asked_at = now
    session.flush()


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
