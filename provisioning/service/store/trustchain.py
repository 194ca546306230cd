"""The chain of trust bundles (``provisioning.service.trustroll``): one row per bundle from 1,
no gap; a second instance adding the same seq loses on the primary key."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from provisioning.db.runtime import TrustBundleRow


def links(session: Session) -> list[TrustBundleRow]:
    """Every row, oldest first."""
    return list(session.scalars(select(TrustBundleRow).order_by(TrustBundleRow.seq)))


def newest(session: Session) -> TrustBundleRow | None:
    return session.scalars(
        select(TrustBundleRow).order_by(TrustBundleRow.seq.desc()).limit(1)
    ).first()


def add(session: Session, seq: int, link: bytes, authz: bytes, key_ref: str, *, now: int) -> None:
    session.add(TrustBundleRow(seq=seq, link=link, authz=authz, key_ref=key_ref, created_at=now))
    session.flush()
