"""Firmware releases and the fleet's release state (``provisioning.service.releases``).

A release row moves only by ``save_release``, a compare-and-set on the state it was read in:
two instances that approve, revoke or expire one release at once cannot both write. The
release state's ``seq`` moves the same way (``advance``): every change of the approved set is
one new seq, which is what each instance watches to re-read the golden policy. Nothing here is
secret: manifests, digests, Authorizations and the signed bundle are public.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from provisioning.db.engine import RetryableConflict, rowcount, table_of
from provisioning.db.runtime import DeviceReleaseRow, ReleaseRow, ReleaseStateRow

STATE_ID = 1


class ReleaseState(StrEnum):
    PROPOSED = "proposed"
    APPROVED = "approved"
    REVOKED = "revoked"
    EXPIRED = "expired"


class Source(StrEnum):
    OPERATOR = "operator"  # added by ``keyfleet release add``, approved under the quorum
    IMPORT = "import"  # imported from ``[attestation] golden_measurements`` at first start


@dataclass(eq=False)
class StoredRelease:
    """A snapshot of one release row; written back with ``save_release``."""

    version: str
    manifest: bytes
    manifest_sha256: bytes
    pcrs: bytes
    state: ReleaseState
    source: Source
    proposed_by: str
    proposed_at: int
    approved_by: str | None = None
    approved_at: int | None = None
    approval: bytes | None = field(default=None, repr=False)
    approval_serial: int | None = None
    superseded_at: int | None = None
    ended_by: str | None = None
    ended_at: int | None = None
    revocation: bytes | None = field(default=None, repr=False)
    revocation_serial: int | None = None
    read_state: ReleaseState | None = field(default=None, repr=False)


@dataclass(frozen=True)
class FleetReleaseState:
    seq: int
    generation: int
    bundle: bytes | None = field(repr=False)
    updated_at: int


_COLUMNS = (
    "approved_by",
    "approved_at",
    "approval",
    "approval_serial",
    "superseded_at",
    "ended_by",
    "ended_at",
    "revocation",
    "revocation_serial",
)


def _from_row(row: ReleaseRow) -> StoredRelease:
    state = ReleaseState(row.state)
    return StoredRelease(
        version=row.version,
        manifest=row.manifest,
        manifest_sha256=bytes.fromhex(row.manifest_sha256),
        pcrs=row.pcrs,
        state=state,
        source=Source(row.source),
        proposed_by=row.proposed_by,
        proposed_at=row.proposed_at,
        read_state=state,
        **{name: getattr(row, name) for name in _COLUMNS},
    )


def insert_release(session: Session, stored: StoredRelease) -> None:
    """Add a release (an existing version is a conflict: the primary key refuses it)."""
    session.add(
        ReleaseRow(
            version=stored.version,
            manifest=stored.manifest,
            manifest_sha256=stored.manifest_sha256.hex(),
            pcrs=stored.pcrs,
            state=stored.state.value,
            source=stored.source.value,
            proposed_by=stored.proposed_by,
            proposed_at=stored.proposed_at,
            **{name: getattr(stored, name) for name in _COLUMNS},
        )
    )
    session.flush()
    stored.read_state = stored.state


def load_release(session: Session, version: str) -> StoredRelease | None:
    row = session.get(ReleaseRow, version)
    return None if row is None else _from_row(row)


def all_releases(session: Session) -> list[StoredRelease]:
    """Every release, oldest proposal first."""
    rows = session.scalars(select(ReleaseRow).order_by(ReleaseRow.proposed_at, ReleaseRow.version))
    return [_from_row(row) for row in rows]


def releases_in(session: Session, state: ReleaseState) -> list[StoredRelease]:
    rows = session.scalars(
        select(ReleaseRow)
        .where(ReleaseRow.state == state.value)
        .order_by(ReleaseRow.proposed_at, ReleaseRow.version)
    )
    return [_from_row(row) for row in rows]


def count_releases(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(ReleaseRow)) or 0)


def save_release(session: Session, stored: StoredRelease) -> None:
    """Write ``stored``'s state and approval columns back if the row is still in the state it
    was read in; otherwise ``RetryableConflict`` (the retried transaction sees the change)."""
    assert stored.read_state is not None
    result = session.execute(
        update(ReleaseRow)
        .where(ReleaseRow.version == stored.version, ReleaseRow.state == stored.read_state.value)
        .values(state=stored.state.value, **{name: getattr(stored, name) for name in _COLUMNS})
    )
    if rowcount(result) != 1:
        raise RetryableConflict(f"release {stored.version} changed meanwhile")
    stored.read_state = stored.state


# -- the release state --------------------------------------------------------------------------


def release_state(session: Session) -> FleetReleaseState:
    """The fleet's release state; seq 0, generation 0 before the first change."""
    row = session.get(ReleaseStateRow, STATE_ID)
    if row is None:
        return FleetReleaseState(0, 0, None, 0)
    return FleetReleaseState(row.seq, row.generation, row.bundle, row.updated_at)


def release_seq(session: Session) -> int:
    """The state's seq alone: the cheap read each instance makes every tick."""
    return int(
        session.scalar(select(ReleaseStateRow.seq).where(ReleaseStateRow.id == STATE_ID)) or 0
    )


def advance(session: Session, *, bump_generation: bool, now: int) -> FleetReleaseState:
    """The next seq (and, ``bump_generation``, the next generation); the bundle is cleared
    until the new one is stored (``store_bundle``). A concurrent advance is a conflict."""
    current = release_state(session)
    new = FleetReleaseState(current.seq + 1, current.generation + int(bump_generation), None, now)
    if session.get(ReleaseStateRow, STATE_ID) is None:
        session.add(
            ReleaseStateRow(
                id=STATE_ID, seq=new.seq, generation=new.generation, bundle=None, updated_at=now
            )
        )
        session.flush()
        return new
    result = session.execute(
        update(ReleaseStateRow)
        .where(ReleaseStateRow.id == STATE_ID, ReleaseStateRow.seq == current.seq)
        .values(seq=new.seq, generation=new.generation, bundle=None, updated_at=now)
    )
    if rowcount(result) != 1:
        raise RetryableConflict("the release state changed meanwhile")
    return new


def store_bundle(session: Session, seq: int, bundle: bytes) -> None:
    """Keep the signed bundle of ``seq`` (nothing if the state moved past it meanwhile)."""
    session.execute(
        update(ReleaseStateRow)
        .where(ReleaseStateRow.id == STATE_ID, ReleaseStateRow.seq == seq)
        .values(bundle=bundle)
    )


# -- which release each device runs ------------------------------------------------------------


def record_device_release(session: Session, device_id: str, version: str | None, now: int) -> None:
    """The device's row written in one statement when it has one (every trusted verdict after
    its first); its first row inserted."""
    written = session.execute(
        update(DeviceReleaseRow)
        .where(DeviceReleaseRow.device_id == device_id)
        .values(version=version, attested_at=now)
    )
    if rowcount(written) == 0:
        session.add(DeviceReleaseRow(device_id=device_id, version=version, attested_at=now))
        session.flush()


def record_device_releases(session: Session, versions: Mapping[str, str | None], now: int) -> None:
    """``record_device_release`` for several devices (a batch of answers): the existing rows
    written in one statement per release (most often one: a fleet runs one firmware), which
    names the rows it wrote, and the first rows inserted in one."""
    ids = sorted(versions)
    if not ids:
        return
    rows = table_of(DeviceReleaseRow)
    by_version: dict[str | None, list[str]] = {}
    for device_id in ids:
        by_version.setdefault(versions[device_id], []).append(device_id)
    existing: set[str] = set()
    for version in sorted(by_version, key=lambda v: (v is not None, v or "")):
        existing.update(
            session.connection().scalars(
                update(rows)
                .where(rows.c.device_id.in_(by_version[version]))
                .values(version=version, attested_at=now)
                .returning(rows.c.device_id)
            )
        )
    new = [
        {"device_id": d, "version": versions[d], "attested_at": now}
        for d in ids
        if d not in existing
    ]
    if new:
        session.execute(insert(DeviceReleaseRow), new)


def device_releases(session: Session) -> list[tuple[str, str | None, int]]:
    """(device, release version or None, when) of every device attested trusted."""
    rows = session.execute(
        select(
            DeviceReleaseRow.device_id, DeviceReleaseRow.version, DeviceReleaseRow.attested_at
        ).order_by(DeviceReleaseRow.device_id)
    )
    return [(d, v, t) for d, v, t in rows]
