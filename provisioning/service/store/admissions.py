"""The operators' Authorizations that admitted each group's members (``group_admissions``), by
their SHA-256, the admission hash the leaves they admitted record: stored from a group's
creation and from each accepted commit that adds members (``keep``), read to deliver them to
joiners with a Welcome or a tree's pages (``load``). Content-addressed: a joiner takes each by
the hash a leaf records, so nothing here needs to be trusted (docs/treekem.md, "Admissions
delivered by the service").

Kept while the group exists (the rows go with it): a joiner of any epoch the commit log still
keeps may need an Authorization that no leaf of the current tree names any more, and one
Authorization is stored once per group however many members it admitted.

Imported as a module by ``provisioning.service.commits``, ``devices`` and ``treepages``.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Executable, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from agent.protocol.mls.public import admission_hash
from agent.protocol.mls.tree import NO_ADMISSION
from provisioning.db.engine import table_of
from provisioning.db.schema import GroupAdmission

_CHUNK = 500
"""Digests per ``IN`` list (a 100,000-member group grown one add at a time names 100,000)."""

_INSERTS: dict[str, Executable] = {}


def _insert(dialect: str) -> Executable:
    """``INSERT ... ON CONFLICT (group_id, digest) DO NOTHING``, built once per dialect."""
    statement = _INSERTS.get(dialect)
    if statement is None:
        table = table_of(GroupAdmission)
        insert_ = sqlite_insert(table) if dialect == "sqlite" else postgresql_insert(table)
        statement = insert_.on_conflict_do_nothing(
            index_elements=[table.c.group_id, table.c.digest]
        )
        _INSERTS[dialect] = statement
    return statement


def keep(session: Session, group_id: str, authorizations: Iterable[bytes], *, epoch: int) -> None:
    """Store ``authorizations`` for ``group_id`` (one already stored stays as it was)."""
    rows = [
        {"group_id": group_id, "digest": admission_hash(a), "authz": a, "epoch": epoch}
        for a in dict.fromkeys(authorizations)
    ]
    if rows:
        session.execute(_insert(session.get_bind().dialect.name), rows)


def load(session: Session, group_id: str, digests: Iterable[bytes]) -> dict[bytes, bytes]:
    """The stored Authorizations of ``group_id`` among ``digests``, by digest (one not stored
    is missing: its joiner refuses the Welcome, ``mls.welcome.admission``)."""
    wanted = sorted({d for d in digests if d != NO_ADMISSION})
    found: dict[bytes, bytes] = {}
    for i in range(0, len(wanted), _CHUNK):
        rows = session.execute(
            select(GroupAdmission.digest, GroupAdmission.authz).where(
                GroupAdmission.group_id == group_id,
                GroupAdmission.digest.in_(wanted[i : i + _CHUNK]),
            )
        )
        found.update((digest, authz) for digest, authz in rows)
    return found
