"""What the fleet service does to its registry, as one class over a caller's Session.

The caller owns the transaction (``run_in_transaction`` in engine.py is the usual way), so a state
change and the audit entry that records it commit together or not at all. Methods never commit.
Every method that changes something takes ``now`` (integer seconds): the clock is injected, as
everywhere in keyfleet. Results are frozen dataclasses, not ORM objects, so they stay valid after
the session is gone and no caller can change the database by mutating a result.

Refusals raise ``agent.protocol.errors.ProtocolError`` with a stable check id (listed in
docs/service.md): the service reports them to the device or operator and writes them to the audit
log as refused.

Why one module of this size: ``Registry`` is the single class through which every writer changes
devices, groups, members, keys, operators and stations, so that the rules between them (a device
in a group must be eligible, a revoked device leaves its groups, a key's SP 800-57 transitions)
are checked in one place against one session; the record types it returns sit beside it.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Final, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from sqlalchemy import bindparam, delete, func, insert, inspect, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from agent.protocol.errors import InternalError, ProtocolError
from agent.protocol.lifecycle import ALLOWED_TRANSITIONS, KeyState
from agent.protocol.lifecycle import KeyRecord as ReportedKey
from provisioning.db.engine import RetryableConflict, savepoint, table_of
from provisioning.db.runtime import ReplayState
from provisioning.db.schema import (
    ID_LENGTH,
    KEY_NAME_LENGTH,
    Ack,
    AttestationResult,
    CommitLogEntry,
    Device,
    DeviceKey,
    DeviceState,
    Group,
    GroupMember,
    KeyTransition,
    Operator,
    PendingChange,
    Role,
    Station,
)

_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
# Agent key names carry a path: "devid", "leaf/<group>", "epoch/<group>/<epoch>".
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")

# Which device-state changes make sense; anything else is an operator or service mistake.
DEVICE_TRANSITIONS: Mapping[DeviceState, frozenset[DeviceState]] = {
    # Any identity may be destroyed: a device reports it (``keyagent factory-reset``) or an
    # operator decides it; destroyed is final until the same TPM is re-enrolled
    # (``Registry.reenroll_device``, a new identity under the same device id).
    DeviceState.REGISTERED: frozenset(
        {DeviceState.ACTIVE, DeviceState.QUARANTINED, DeviceState.REVOKED, DeviceState.DESTROYED}
    ),
    DeviceState.ACTIVE: frozenset(
        {DeviceState.QUARANTINED, DeviceState.REVOKED, DeviceState.DESTROYED}
    ),
    DeviceState.QUARANTINED: frozenset(
        {DeviceState.ACTIVE, DeviceState.REVOKED, DeviceState.DESTROYED}
    ),
    DeviceState.REVOKED: frozenset({DeviceState.DESTROYED}),
    DeviceState.DESTROYED: frozenset(),
}

# The device states from which the same TPM (EK) may enroll again: its old identity is gone
# (destroyed) or will never be trusted again (revoked).
REENROLLABLE = frozenset({DeviceState.DESTROYED, DeviceState.REVOKED})

# NIST SP 800-57 Part 1 Rev. 5, section 7, exactly as the agent applies it: the service accepts
# the transitions a well-behaved agent can make, and nothing leaves destroyed.
KEY_TRANSITIONS: Mapping[KeyState, frozenset[KeyState]] = ALLOWED_TRANSITIONS

# Devices that may be given a leaf in a group.
_GROUP_ELIGIBLE = frozenset({DeviceState.REGISTERED, DeviceState.ACTIVE})


class EpochConflict(ProtocolError):
    """A commit arrived for an epoch that already has an accepted commit: the first valid commit
    won, this one is refused and the committer must process the winner and try again."""

    def __init__(self, group_id: str, epoch: int, current_epoch: int | None) -> None:
        now_at = "" if current_epoch is None else f"; the group is at epoch {current_epoch}"
        super().__init__(
            "ds.commit.epoch_taken",
            f"group {group_id!r}: epoch {epoch} already has an accepted commit{now_at}",
        )
        self.group_id = group_id
        self.epoch = epoch


def cert_fingerprint(cert: x509.Certificate) -> str:
    """The fingerprint the registry stores: lowercase hex SHA-256 of the certificate's DER."""
    return cert.fingerprint(hashes.SHA256()).hex()


def pem_fingerprint(pem: str | bytes) -> str:
    data = pem.encode() if isinstance(pem, str) else pem
    return cert_fingerprint(x509.load_pem_x509_certificate(data))


# ---- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    ek_cert_fingerprint: str
    devid_cert_pem: str
    state: DeviceState
    state_reason: str
    registered_at: int
    state_changed_at: int
    attestation_result: AttestationResult | None
    attestation_reason: str | None
    attested_at: int | None
    last_seen: int | None
    last_report: bytes | None = field(repr=False)
    last_report_at: int | None
    ak_public: bytes | None = field(default=None, repr=False)  # TPM2B_PUBLIC of the AK


@dataclass(frozen=True)
class KeyStateReport:
    """One transition as a device reports it: key ``key_name`` entered ``state`` at ``at``
    (device clock). Reports may repeat transitions already recorded; those are skipped."""

    key_name: str
    state: KeyState
    at: int
    kind: str | None = None  # agent.protocol.lifecycle.KeyKind value, as the device reported it


@dataclass(frozen=True)
class KeyRecord:
    device_id: str
    key_name: str
    state: KeyState
    changed_at: int
    kind: str | None = None


def key_state_items(records: Iterable[ReportedKey]) -> list[KeyStateReport]:
    """The registry's rows for the key records a device reported (in a ``keys.report`` or an
    attestation answer): one per transition, with the key's kind."""
    return [
        KeyStateReport(key_name=record.name, state=state, at=at, kind=record.kind.value)
        for record in records
        for state, at in record.transitions
    ]


def key_state_digest(items: Sequence[KeyStateReport]) -> bytes:
    """A digest of reported key-state items, in their order (``Device.reported_keys``)."""
    return hashlib.sha256(
        repr([(i.key_name, i.kind, i.state.value, i.at) for i in items]).encode()
    ).digest()


@dataclass(frozen=True)
class KeyTransitionRecord:
    key_name: str
    from_state: KeyState | None
    to_state: KeyState
    at: int
    recorded_at: int


@dataclass(frozen=True)
class GroupRecord:
    group_id: str
    epoch: int
    public_tree: bytes = field(repr=False)
    group_context: bytes = field(repr=False)
    created_at: int
    updated_at: int
    state_token: bytes | None = field(default=None, repr=False)
    deleted_at: int | None = None
    deleted_seq: int | None = None


@dataclass(frozen=True)
class MemberRecord:
    group_id: str
    device_id: str
    leaf_index: int | None
    pending: PendingChange | None
    joined_epoch: int | None
    requested_at: int


@dataclass(frozen=True)
class CommitRecord:
    group_id: str
    epoch: int
    committer: str
    commit: bytes = field(repr=False)
    welcome: bytes | None = field(repr=False)
    accepted_at: int
    accepted_at_ms: int | None = None  # None: accepted before revision 0003


@dataclass(frozen=True)
class AckStatus:
    """Who has confirmed the group's current epoch. ``by_authenticator`` groups the acked
    devices by the epoch authenticator they sent: more than one key means members derived
    different epoch secrets (a fork the service can see without knowing any secret)."""

    group_id: str
    epoch: int
    members: tuple[str, ...]
    stragglers: tuple[str, ...]
    by_authenticator: Mapping[bytes, tuple[str, ...]]

    @property
    def agreed(self) -> bool:
        return not self.stragglers and len(self.by_authenticator) <= 1


@dataclass(frozen=True)
class OperatorRecord:
    name: str
    cert_fingerprint: str
    role: Role
    created_at: int
    updated_at: int


@dataclass(frozen=True)
class StationRecord:
    name: str
    cert_fingerprint: str
    created_at: int


# ---- validation helpers ----------------------------------------------------------------------


def _check_identifier(kind: str, value: str) -> None:
    if len(value) > ID_LENGTH or not _IDENTIFIER.fullmatch(value):
        raise ProtocolError(
            f"registry.{kind}.name",
            f"{kind} name {value!r} is not 1..{ID_LENGTH} characters of letters, digits, '.', "
            "'_', ':' or '-' starting with a letter or digit",
        )


def _check_key_name(value: str) -> None:
    if len(value) > KEY_NAME_LENGTH or not _KEY_NAME.fullmatch(value):
        raise ProtocolError(
            "registry.key.name",
            f"key name {value!r} is not 1..{KEY_NAME_LENGTH} characters of letters, digits, "
            "'.', '_', ':', '/' or '-' starting with a letter or digit",
        )


def _check_fingerprint(kind: str, value: str) -> None:
    if not _FINGERPRINT.fullmatch(value):
        raise ProtocolError(
            f"registry.{kind}.fingerprint",
            f"{kind} certificate fingerprint {value!r} is not 64 lowercase hex digits (SHA-256)",
        )


R = TypeVar("R")
M = TypeVar("M", Device, Group, Operator, Station)


def _milliseconds(now: int, now_ms: int | None) -> int:
    """The time to record in a ``*_ms`` column: ``now_ms`` when the caller has it (it must be
    within second ``now``, which is what the seconds column gets), else ``now * 1000``."""
    if now_ms is None:
        return now * 1000
    if now_ms // 1000 != now:
        raise InternalError(f"now_ms {now_ms} is not within second {now}")
    return now_ms


def new_state_token() -> bytes:
    """A fresh ``Group.state_token``."""
    return secrets.token_bytes(16)


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _record(cls: type[R], row: object) -> R:
    """The frozen, session-free record of a row: each record field is the row's column of the
    same name (records are what the registry hands out; rows never leave a session). A loaded
    column's current value is in the row's ``__dict__`` (where the ORM's attribute reads it
    from); only one not loaded (expired) goes through the attribute, which loads it."""
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(cls))  # type: ignore[arg-type]
    loaded = row.__dict__
    return cls(**{name: loaded[name] if name in loaded else getattr(row, name) for name in names})


def judge_ack(
    group_id: str,
    *,
    group_epoch: int,
    device_id: str,
    leaf_index: int | None,
    epoch: int,
    epoch_authenticator: bytes,
    recorded: bytes | None,
) -> bool:
    """Whether an ack of ``device_id`` (at ``leaf_index`` in ``group_id``, None: not a member)
    for ``epoch`` is new (True) or repeats the one recorded with authenticator ``recorded``
    (False). Refuses an ack of a non-member (``ds.ack.not_member``), of an epoch the group has
    not reached (``ds.ack.epoch_ahead``) and one that changes a recorded authenticator
    (``ds.ack.changed``). ``Registry.record_ack``'s checks, for callers that read the rows
    themselves (a batch of acks)."""
    if leaf_index is None:
        raise ProtocolError(
            "ds.ack.not_member", f"device {device_id!r} is not a member of {group_id!r}"
        )
    if epoch > group_epoch:
        raise ProtocolError(
            "ds.ack.epoch_ahead",
            f"device {device_id!r} acked epoch {epoch} of {group_id!r}, "
            f"which is only at epoch {group_epoch}",
        )
    if recorded is None:
        return True
    if recorded != epoch_authenticator:
        raise ProtocolError(
            "ds.ack.changed",
            f"device {device_id!r} already acked epoch {epoch} of {group_id!r} "
            "with a different epoch authenticator",
        )
    return False


# ---- the repository --------------------------------------------------------------------------


def plan_key_states(
    device_id: str,
    key_states: Iterable[KeyStateReport],
    *,
    current: Mapping[str, tuple[KeyState, int]],
    recorded: Callable[[str, KeyState, int], bool],
) -> tuple[list[tuple[KeyStateReport, KeyState | None]], dict[str, str]]:
    """What ``Registry.record_report`` applies for a report's transitions, checked whole before
    anything changes: the transitions not recorded yet, each with the state it leaves (None:
    a new key), and the kind reported per key name. ``current``: each known key's (state,
    changed_at); ``recorded(name, state, at)``: that transition is recorded already (skipped).
    Refuses ``registry.key.name`` and ``registry.key.transition`` (NIST SP 800-57)."""
    planned: list[tuple[KeyStateReport, KeyState | None]] = []
    simulated = dict(current)
    kinds: dict[str, str] = {}
    for item in key_states:
        _check_key_name(item.key_name)
        if item.kind is not None:
            kinds[item.key_name] = item.kind
        if recorded(item.key_name, item.state, item.at):
            continue
        before = simulated.get(item.key_name)
        if before is not None:
            state, changed_at = before
            if item.at < changed_at or item.state not in KEY_TRANSITIONS[state]:
                raise ProtocolError(
                    "registry.key.transition",
                    f"device {device_id!r} key {item.key_name!r}: {state} at {changed_at} "
                    f"cannot become {item.state} at {item.at} (NIST SP 800-57 transitions)",
                )
        planned.append((item, None if before is None else before[0]))
        simulated[item.key_name] = (item.state, item.at)
    return planned, kinds


class Registry:
    """The fleet registry inside one transaction of ``session``."""

    def __init__(self, session: Session, *, hold_rows: bool = False) -> None:
        """``hold_rows``: keep every row this registry reads for its lifetime. The session's
        identity map holds a clean row only weakly: without a holder, the next read of the same
        device (the next step of one handler) selects it again. Only for a handler that does
        not change those rows with Core statements while it holds them."""
        self._s = session
        self._held: list[object] | None = [] if hold_rows else None

    # -- devices --

    def register_device(
        self,
        device_id: str,
        *,
        ek_cert_fingerprint: str,
        devid_cert_pem: str,
        now: int,
        ak_public: bytes | None = None,
    ) -> DeviceRecord:
        """Enroll a device whose EK chain, credential activation and DevID certify the factory
        flow has already checked. One EK is one device: a second enrollment of the same TPM is
        refused (re-provisioning goes through a factory reset, a later issue). ``ak_public`` is
        the AK's TPM2B_PUBLIC, bound to the EK by the credential activation: the attestation
        verifier needs it."""
        _check_identifier("device", device_id)
        _check_fingerprint("device", ek_cert_fingerprint)
        if self._s.get(Device, device_id) is not None:
            raise ProtocolError("registry.device.exists", f"device {device_id!r} already exists")
        holder = self._s.scalar(
            select(Device.device_id).where(Device.ek_cert_fingerprint == ek_cert_fingerprint)
        )
        if holder is not None:
            raise ProtocolError(
                "registry.device.ek_taken",
                f"EK certificate {ek_cert_fingerprint} is already enrolled as device {holder!r}",
            )
        row = Device(
            device_id=device_id,
            ek_cert_fingerprint=ek_cert_fingerprint,
            devid_cert_pem=devid_cert_pem,
            state=DeviceState.REGISTERED,
            state_reason="enrolled",
            registered_at=now,
            state_changed_at=now,
            ak_public=ak_public,
        )
        # another instance may enroll the same id or EK between our check and our insert
        self._insert_or_retry(f"device {device_id!r} was enrolled concurrently", row)
        return _record(DeviceRecord, row)

    def _insert_or_retry(self, conflict: str, *rows: object) -> None:
        """Insert ``rows`` now; a unique constraint that fires means another writer got there
        between our check and our insert: the whole unit of work is retried
        (``run_in_transaction``). The insert runs in a savepoint, so on PostgreSQL the violation
        undoes only it and the transaction is not left aborted."""
        try:
            with savepoint(self._s):
                self._s.add_all(rows)
                self._s.flush()
        except IntegrityError:
            raise RetryableConflict(conflict) from None

    def _row(self, model: type[M], kind: str, key: str) -> M:
        """The row of ``model`` under primary key ``key``; a ``registry.<kind>.unknown`` error
        when there is none."""
        row = self._s.get(model, key)
        if row is None:
            raise ProtocolError(f"registry.{kind}.unknown", f"no {kind} {key!r}")
        if self._held is not None:
            self._held.append(row)
        return row

    def _device_row(self, device_id: str) -> Device:
        return self._row(Device, "device", device_id)

    def device(self, device_id: str) -> DeviceRecord:
        return _record(DeviceRecord, self._device_row(device_id))

    def device_by_ek(self, ek_cert_fingerprint: str) -> DeviceRecord | None:
        row = self._s.scalar(
            select(Device).where(Device.ek_cert_fingerprint == ek_cert_fingerprint)
        )
        return None if row is None else _record(DeviceRecord, row)

    def devices(self, *, state: DeviceState | None = None) -> list[DeviceRecord]:
        query = select(Device).order_by(Device.device_id)
        if state is not None:
            query = query.where(Device.state == state)
        return [_record(DeviceRecord, row) for row in self._s.scalars(query)]

    def set_device_state(
        self, device_id: str, state: DeviceState, *, reason: str, now: int
    ) -> DeviceRecord:
        """Move a device along DEVICE_TRANSITIONS. Setting the state it is already in is a no-op
        (a repeated operator command or report must not fail)."""
        row = self._device_row(device_id)
        if row.state != state:
            if state not in DEVICE_TRANSITIONS[row.state]:
                raise ProtocolError(
                    "registry.device.transition",
                    f"device {device_id!r} cannot go from {row.state} to {state}",
                )
            row.state = state
            row.state_reason = reason
            row.state_changed_at = now
            self._s.flush()
        return _record(DeviceRecord, row)

    def record_attestation(
        self,
        device_id: str,
        result: AttestationResult,
        *,
        reason: str,
        now: int,
        flush: bool = True,
    ) -> DeviceRecord:
        """Store the verifier's verdict. Changing the device's state because of it (quarantine)
        is the service's decision and its own audited step. Without ``flush`` the caller
        flushes (with the report that came with the verdict: one row write)."""
        row = self._device_row(device_id)
        row.attestation_result = result
        row.attestation_reason = reason
        row.attested_at = now
        row.last_seen = now
        if flush:
            self._s.flush()
        return _record(DeviceRecord, row)

    def record_report(
        self,
        device_id: str,
        report: bytes,
        key_states: Iterable[KeyStateReport] = (),
        *,
        now: int,
        online_since: int | None = None,
        flush: bool = True,
    ) -> DeviceRecord:
        """Keep the device's latest report (its verified CBOR payload) and apply its key-state
        transitions in order. Idempotent: transitions already recorded are skipped, so a device
        may always send its whole history. An impossible transition refuses the whole report.
        ``online_since``: a device not seen since then is back (or new): the attestation
        schedule, which put it off while it was away, looks at it at its next scan (the same
        row write as ``last_seen``)."""
        row = self._device_row(device_id)
        row.reported_keys = None  # its key rows may change here (Device.reported_keys)
        if online_since is not None and (row.last_seen is None or row.last_seen < online_since):
            row.attest_due = min(row.attest_due, now)
        keys = {key.key_name: key for key in row.keys}
        # Check the whole report before changing anything, so that a refused report leaves no
        # partial change behind even if the caller goes on to audit the refusal in this session.
        planned, kinds = plan_key_states(
            device_id,
            key_states,
            current={name: (key.state, key.changed_at) for name, key in keys.items()},
            recorded=lambda name, state, at: (
                any(t.to_state == state and t.at == at for t in keys[name].transitions)
                if name in keys
                else False
            ),
        )
        for item, from_state in planned:
            key = keys.get(item.key_name)
            if key is None:
                key = DeviceKey(
                    key_name=item.key_name, kind=item.kind, state=item.state, changed_at=item.at
                )
                row.keys.append(key)
                keys[item.key_name] = key
            key.transitions.append(
                KeyTransition(
                    from_state=from_state, to_state=item.state, at=item.at, recorded_at=now
                )
            )
            key.state = item.state
            key.changed_at = item.at
        # A kind is learned even from a report whose transitions were all known already: a key
        # first recorded from a report without kinds (an attestation's) gets it from the next.
        for name, kind in kinds.items():
            known_key = keys.get(name)
            if known_key is not None and known_key.kind != kind:
                known_key.kind = kind
        row.last_report = report
        row.last_report_at = now
        row.last_seen = now
        if flush:  # without: the caller flushes a batch of reports at once
            self._s.flush()
        return _record(DeviceRecord, row)

    def key_states(self, device_id: str) -> list[KeyRecord]:
        row = self._device_row(device_id)
        return [
            KeyRecord(device_id, key.key_name, key.state, key.changed_at, key.kind)
            for key in sorted(row.keys, key=lambda k: k.key_name)
        ]

    def destroy_keys(self, device_id: str, *, now: int) -> list[str]:
        """Record every key of the device that is not destroyed yet as destroyed at ``now`` (the
        service's clock: the device announced its destruction and sends nothing after it).
        Returns the names changed. Every SP 800-57 state may go to destroyed."""
        return self._move_keys(device_id, KeyState.DESTROYED, now=now)

    def compromise_keys(self, device_id: str, *, now: int) -> list[str]:
        """Record every key of the device that is neither destroyed nor compromised yet as
        compromised at ``now`` (the device was revoked: its keys are suspected compromised, not
        merely deactivated). Returns the names changed. Every SP 800-57 state but destroyed may
        go to compromised."""
        return self._move_keys(
            device_id, KeyState.COMPROMISED, now=now, leave=(KeyState.DESTROYED,)
        )

    def _move_keys(
        self, device_id: str, to: KeyState, *, now: int, leave: tuple[KeyState, ...] = ()
    ) -> list[str]:
        """Every key of the device neither in state ``to`` nor in ``leave`` moved to ``to`` at
        ``now`` (or at its last change, if later), with its transition; the names changed."""
        row = self._device_row(device_id)
        row.reported_keys = None  # its key rows change here (Device.reported_keys)
        changed = []
        for key in sorted(row.keys, key=lambda k: k.key_name):
            if key.state is to or key.state in leave:
                continue
            at = max(now, key.changed_at)
            key.transitions.append(
                KeyTransition(from_state=key.state, to_state=to, at=at, recorded_at=now)
            )
            key.state = to
            key.changed_at = at
            changed.append(key.key_name)
        self._s.flush()
        return changed

    def renew_devid_cert(self, device_id: str, devid_cert_pem: str, *, now: int) -> None:
        """Store the DevID certificate a renewal issued (same key, same AK: only the certificate
        changes; ``provisioning.service.renewal``). Only a registered or active device renews."""
        row = self._device_row(device_id)
        if row.state not in (DeviceState.REGISTERED, DeviceState.ACTIVE):
            raise ProtocolError(
                "registry.device.transition",
                f"device {device_id!r} is {row.state}: its certificates are not renewed",
            )
        row.devid_cert_pem = devid_cert_pem
        self._s.flush()

    def reenroll_device(
        self,
        device_id: str,
        *,
        ek_cert_fingerprint: str,
        devid_cert_pem: str,
        now: int,
        ak_public: bytes | None = None,
    ) -> DeviceRecord:
        """Give a TPM whose old identity was destroyed or revoked a new identity under the same
        device id (ids are derived from the EK). The row is reset: new DevID certificate, state
        ``registered``, no attestation verdict, no key records (the old identity's history stays
        in the audit log), and its replay state is forgotten. Refused while the old identity still
        holds a leaf in a group: its
        removal must be committed first, or the group's tree would name a key nobody holds."""
        row = self._device_row(device_id)
        if row.ek_cert_fingerprint != ek_cert_fingerprint:
            raise ProtocolError(
                "registry.device.ek_mismatch",
                f"device {device_id!r} was enrolled with another EK certificate",
            )
        if row.state not in REENROLLABLE:
            raise ProtocolError(
                "registry.device.transition",
                f"device {device_id!r} is {row.state}: only a destroyed or revoked identity may "
                "be replaced by a new enrollment",
            )
        held = sorted(
            self._s.scalars(
                select(GroupMember.group_id).where(
                    GroupMember.device_id == device_id, GroupMember.leaf_index.is_not(None)
                )
            )
        )
        if held:
            raise ProtocolError(
                "registry.device.in_groups",
                f"device {device_id!r} is still being removed from {', '.join(held)}; "
                "re-enroll once its removal is committed",
            )
        self._s.execute(
            delete(GroupMember)
            .where(GroupMember.device_id == device_id)
            .execution_options(synchronize_session=False)
        )
        row.keys.clear()
        row.reported_keys = None
        row.devid_cert_pem = devid_cert_pem
        row.ak_public = ak_public
        row.state = DeviceState.REGISTERED
        row.state_reason = "re-enrolled"
        row.state_changed_at = now
        row.registered_at = now
        row.attestation_result = None
        row.attestation_reason = None
        row.attested_at = None
        row.attest_due = 0  # a new identity: attested at once
        row.last_seen = None
        row.last_report = None
        row.last_report_at = None
        # The new identity's agent counts its seqs from 1 again: the old one's replay state goes.
        # A database without the service's tables (enrollment before the first ``serve``) has none.
        if inspect(self._s.connection()).has_table(ReplayState.__tablename__):
            self._s.execute(delete(ReplayState).where(ReplayState.sender == device_id))
        self._s.flush()
        return _record(DeviceRecord, row)

    def key_history(self, device_id: str, key_name: str) -> list[KeyTransitionRecord]:
        row = self._device_row(device_id)
        for key in row.keys:
            if key.key_name == key_name:
                return [
                    KeyTransitionRecord(key_name, t.from_state, t.to_state, t.at, t.recorded_at)
                    for t in key.transitions
                ]
        raise ProtocolError("registry.key.unknown", f"device {device_id!r} has no key {key_name!r}")

    # -- groups --

    def create_group(
        self,
        group_id: str,
        *,
        creator: str,
        public_tree: bytes,
        group_context: bytes,
        now: int,
        state_token: bytes | None = None,
    ) -> GroupRecord:
        """Record a group a member device created (RFC 9420: the creator is alone at leaf 0 in
        epoch 0); everyone else joins through accepted commits."""
        _check_identifier("group", group_id)
        device = self._device_row(creator)
        if device.state not in _GROUP_ELIGIBLE:
            raise ProtocolError(
                "registry.member.device_state",
                f"device {creator!r} is {device.state} and cannot create a group",
            )
        if self._s.get(Group, group_id) is not None:
            raise ProtocolError("registry.group.exists", f"group {group_id!r} already exists")
        group = Group(
            group_id=group_id,
            epoch=0,
            public_tree=public_tree,
            group_context=group_context,
            created_at=now,
            updated_at=now,
            state_token=state_token or new_state_token(),
        )
        creator_row = GroupMember(
            group_id=group_id,
            device_id=creator,
            leaf_index=0,
            pending=None,
            joined_epoch=0,
            requested_at=now,
        )
        self._insert_or_retry(f"group {group_id!r} was created concurrently", group, creator_row)
        return _record(GroupRecord, group)

    def _group_row(self, group_id: str) -> Group:
        return self._row(Group, "group", group_id)

    def group(self, group_id: str) -> GroupRecord:
        return _record(GroupRecord, self._group_row(group_id))

    def groups(self) -> list[GroupRecord]:
        return [
            _record(GroupRecord, g) for g in self._s.scalars(select(Group).order_by(Group.group_id))
        ]

    def members(self, group_id: str) -> list[MemberRecord]:
        self._group_row(group_id)
        rows = self._s.scalars(
            select(GroupMember)
            .where(GroupMember.group_id == group_id)
            .order_by(
                GroupMember.leaf_index.is_(None), GroupMember.leaf_index, GroupMember.device_id
            )
        )
        return [_record(MemberRecord, row) for row in rows]

    def groups_of(self, device_id: str) -> list[MemberRecord]:
        self._device_row(device_id)
        rows = self._s.scalars(
            select(GroupMember)
            .where(GroupMember.device_id == device_id)
            .order_by(GroupMember.group_id)
        )
        return [_record(MemberRecord, row) for row in rows]

    def request_add(self, group_id: str, device_id: str, *, now: int) -> MemberRecord:
        """Ask for ``device_id`` to be added to the group: it stays pending (no leaf) until a
        member's commit adding it is accepted. Asking again is a no-op."""
        self._group_row(group_id)
        device = self._device_row(device_id)
        existing = self._s.get(GroupMember, (group_id, device_id))
        if existing is not None:
            if existing.pending is PendingChange.REMOVE:
                raise ProtocolError(
                    "registry.member.pending_remove",
                    f"device {device_id!r} is being removed from group {group_id!r}",
                )
            return _record(MemberRecord, existing)
        if device.state not in _GROUP_ELIGIBLE:
            raise ProtocolError(
                "registry.member.device_state",
                f"device {device_id!r} is {device.state} and cannot join group {group_id!r}",
            )
        row = GroupMember(
            group_id=group_id,
            device_id=device_id,
            leaf_index=None,
            pending=PendingChange.ADD,
            joined_epoch=None,
            requested_at=now,
        )
        self._s.add(row)
        self._s.flush()
        return _record(MemberRecord, row)

    def request_remove(self, group_id: str, device_id: str, *, now: int) -> MemberRecord | None:
        """Ask for a member's removal (pending until a commit removes it). A pending add that no
        commit has made yet is simply withdrawn, and None is returned."""
        self._group_row(group_id)
        row = self._s.get(GroupMember, (group_id, device_id))
        if row is None:
            raise ProtocolError(
                "registry.member.unknown", f"device {device_id!r} is not in group {group_id!r}"
            )
        if row.leaf_index is None:
            self._s.delete(row)
            self._s.flush()
            return None
        row.pending = PendingChange.REMOVE
        row.requested_at = now
        self._s.flush()
        return _record(MemberRecord, row)

    def append_commit(
        self,
        group_id: str,
        *,
        epoch: int,
        committer: str,
        commit: bytes,
        welcome: bytes | None,
        public_tree: bytes,
        group_context: bytes,
        added: Mapping[str, int] | None = None,
        removed: Collection[str] = (),
        now: int,
        now_ms: int | None = None,
        state_token: bytes | None = None,
    ) -> CommitRecord:
        """Accept the commit ``committer`` made in ``epoch`` and move the group to ``epoch + 1``
        with the new public tree and context; ``added`` (device -> leaf index) and ``removed``
        are the membership changes the commit makes, already checked against its proposals.

        Exactly one commit per epoch: the (group_id, epoch) key of the commit log and a
        conditional epoch update decide between racing instances, so a loser gets
        ``EpochConflict`` however the race interleaves. ``now_ms``: the same instant in
        milliseconds, if the caller's clock has them (else ``now * 1000`` is recorded).
        ``state_token``: the group's new state token (``Group.state_token``; default random).
        Reads the member rows of the committer and of the devices added and removed only.
        """
        accepted_ms = _milliseconds(now, now_ms)
        added = dict(added or {})
        group = self._group_row(group_id)
        if epoch < group.epoch:
            raise EpochConflict(group_id, epoch, group.epoch)
        if epoch > group.epoch:
            raise ProtocolError(
                "ds.commit.epoch_ahead",
                f"group {group_id!r} is at epoch {group.epoch}; a commit for epoch {epoch} "
                "cannot be applied",
            )
        member = self._s.get(GroupMember, (group_id, committer))
        if member is None or member.leaf_index is None:
            raise ProtocolError(
                "ds.commit.committer",
                f"device {committer!r} is not a member of group {group_id!r} and cannot commit",
            )
        changed = [*removed, *added]
        current = (
            {
                m.device_id: m
                for m in self._s.scalars(
                    select(GroupMember).where(
                        GroupMember.group_id == group_id, GroupMember.device_id.in_(changed)
                    )
                )
            }
            if changed
            else {}
        )
        for device_id in removed:
            gone = current.get(device_id)
            if gone is None or gone.leaf_index is None:
                raise ProtocolError(
                    "ds.commit.remove_unknown",
                    f"group {group_id!r} has no member {device_id!r} to remove",
                )
        for device_id, leaf in added.items():
            if leaf < 0:
                raise ProtocolError(
                    "ds.commit.leaf", f"leaf index {leaf} for {device_id!r} is negative"
                )
            present = current.get(device_id)
            if present is not None and present.leaf_index is not None:
                raise ProtocolError(
                    "ds.commit.add_member",
                    f"device {device_id!r} is already a member of group {group_id!r}",
                )
            device = self._device_row(device_id)
            if device.state not in _GROUP_ELIGIBLE:
                raise ProtocolError(
                    "registry.member.device_state",
                    f"device {device_id!r} is {device.state} and cannot join group {group_id!r}",
                )

        # The commit-log row first: its primary key is the ordering rule itself. A Core insert
        # (the row is never read back in this transaction); what the session holds is flushed
        # first, as an ORM insert would.
        entry = CommitRecord(
            group_id=group_id,
            epoch=epoch,
            committer=committer,
            commit=commit,
            welcome=welcome,
            accepted_at=now,
            accepted_at_ms=accepted_ms,
        )
        self._s.flush()
        try:
            with savepoint(self._s):
                self._s.execute(
                    _INSERT_COMMIT, {f.name: getattr(entry, f.name) for f in fields(CommitRecord)}
                )
        except IntegrityError:
            raise EpochConflict(group_id, epoch, None) from None
        moved = self._s.execute(
            _MOVE_GROUP,
            {
                "group": group_id,
                "from_epoch": epoch,
                "to_epoch": epoch + 1,
                "tree": public_tree,
                "context": group_context,
                "at": now,
                "token": state_token or new_state_token(),
            },
        )
        if moved.rowcount != 1:  # type: ignore[attr-defined]
            raise EpochConflict(group_id, epoch, None)
        self._s.expire(group)

        # Removals before additions: a commit may give a freed leaf to a newcomer, and the
        # (group_id, leaf_index) constraint must never see both at once.
        for device_id in removed:
            self._s.delete(current[device_id])
        self._s.flush()
        try:
            with savepoint(self._s):
                for device_id, leaf in added.items():
                    row = current.get(device_id)
                    if row is None:
                        row = GroupMember(group_id=group_id, device_id=device_id, requested_at=now)
                        self._s.add(row)
                    row.leaf_index = leaf
                    row.pending = None
                    row.joined_epoch = epoch + 1
                self._s.flush()
        except IntegrityError:
            raise ProtocolError(
                "ds.commit.leaf",
                f"commit for group {group_id!r} epoch {epoch} puts two members on one leaf",
            ) from None
        return entry

    def commits_from(self, group_id: str, epoch: int) -> list[CommitRecord]:
        """The commits a member at ``epoch`` needs to catch up to the current epoch, in order.
        If retention already dropped one of them the member is too far behind and must be
        re-added with a fresh welcome (``ds.catchup.pruned``)."""
        group = self._group_row(group_id)
        if epoch > group.epoch:
            raise ProtocolError(
                "ds.catchup.epoch_ahead",
                f"group {group_id!r} is at epoch {group.epoch}, not {epoch}",
            )
        rows = list(
            self._s.scalars(
                select(CommitLogEntry)
                .where(CommitLogEntry.group_id == group_id, CommitLogEntry.epoch >= epoch)
                .order_by(CommitLogEntry.epoch)
            )
        )
        if len(rows) != group.epoch - epoch or (rows and rows[0].epoch != epoch):
            raise ProtocolError(
                "ds.catchup.pruned",
                f"group {group_id!r}: commits from epoch {epoch} are no longer kept; "
                "the member needs a fresh welcome",
            )
        return [_record(CommitRecord, row) for row in rows]

    def prune_commit_log(self, group_id: str, below_epoch: int) -> int:
        """Retention: drop commits (and acks) of epochs below ``below_epoch``; returns how many
        commits went. The audit log keeps who committed what."""
        self._group_row(group_id)
        pruned = self._s.execute(
            delete(CommitLogEntry)
            .where(CommitLogEntry.group_id == group_id, CommitLogEntry.epoch < below_epoch)
            .execution_options(synchronize_session=False)
        )
        self._s.execute(
            delete(Ack)
            .where(Ack.group_id == group_id, Ack.epoch < below_epoch)
            .execution_options(synchronize_session=False)
        )
        count: int = pruned.rowcount  # type: ignore[attr-defined]
        return count

    def oldest_retained_epoch(self, group_id: str) -> int | None:
        self._group_row(group_id)
        oldest: int | None = self._s.scalar(
            select(func.min(CommitLogEntry.epoch)).where(CommitLogEntry.group_id == group_id)
        )
        return oldest

    def record_ack(
        self,
        group_id: str,
        *,
        epoch: int,
        device_id: str,
        epoch_authenticator: bytes,
        now: int,
        now_ms: int | None = None,
        absent: bool = False,
        mark_seen: bool = True,
    ) -> None:
        """Record that a member reached ``epoch``. Repeating the same ack is a no-op; an ack
        that changes a recorded authenticator, or names an epoch no commit produced, is refused.
        ``now_ms`` as in ``append_commit``: ack latency is measured in milliseconds.
        ``absent``: the caller knows, in this transaction, that no ack of this device for this
        epoch is recorded (a batch of acks reads them at once); ``mark_seen`` False: the caller
        writes the device's ``last_seen`` itself."""
        received_ms = _milliseconds(now, now_ms)
        group = self._group_row(group_id)
        member = self._s.get(GroupMember, (group_id, device_id))
        leaf_index = None if member is None else member.leaf_index

        # membership and epoch first: an epoch past what a column holds is refused before
        # any query binds it
        def judge(recorded: bytes | None) -> bool:
            return judge_ack(
                group_id,
                group_epoch=group.epoch,
                device_id=device_id,
                leaf_index=leaf_index,
                epoch=epoch,
                epoch_authenticator=epoch_authenticator,
                recorded=recorded,
            )

        judge(None)
        existing = None if absent else self._s.get(Ack, (group_id, epoch, device_id))
        if existing is not None and not judge(existing.epoch_authenticator):
            return
        if mark_seen:
            self._device_row(device_id).last_seen = now
        row = Ack(
            group_id=group_id,
            epoch=epoch,
            device_id=device_id,
            epoch_authenticator=epoch_authenticator,
            received_at=now,
            received_at_ms=received_ms,
        )
        if absent:
            # the caller holds the sender's replay row lock, which every writer of this
            # device's acks takes: written with the caller's next flush (a batch's acks in one
            # statement); a conflict there fails the caller's transaction
            self._s.add(row)
            return
        self._insert_or_retry(f"ack from {device_id!r} recorded concurrently", row)

    def insert_acks(
        self, acks: Sequence[tuple[str, int, str, bytes]], *, now: int, now_ms: int | None = None
    ) -> None:
        """Insert new acks (group, epoch, device, epoch authenticator) in one statement, each
        judged new by ``judge_ack`` under its sender's replay row lock, which every writer of a
        device's acks holds (a batch of acks); a conflict fails the caller's transaction."""
        if not acks:
            return
        received_ms = _milliseconds(now, now_ms)
        self._s.execute(
            insert(Ack),
            [
                {
                    "group_id": group_id,
                    "epoch": epoch,
                    "device_id": device_id,
                    "epoch_authenticator": authenticator,
                    "received_at": now,
                    "received_at_ms": received_ms,
                }
                for group_id, epoch, device_id, authenticator in acks
            ],
        )

    def ack_status(self, group_id: str) -> AckStatus:
        """Acks for the group's current epoch, against its current members (pending removals
        are still members until the commit that removes them)."""
        group = self._group_row(group_id)
        members = sorted(
            self._s.scalars(
                select(GroupMember.device_id).where(
                    GroupMember.group_id == group_id, GroupMember.leaf_index.is_not(None)
                )
            )
        )
        acks = self._s.execute(
            select(Ack.device_id, Ack.epoch_authenticator).where(
                Ack.group_id == group_id, Ack.epoch == group.epoch
            )
        ).all()
        # One set for the whole call: membership per ack row must be O(1), or a rekey's
        # ack_status after every ack is O(N^2) (docs/bench/README.md).
        member_set = set(members)
        acked = {device: auth for device, auth in acks if device in member_set}
        by_auth: dict[bytes, list[str]] = {}
        for device, auth in sorted(acked.items()):
            by_auth.setdefault(auth, []).append(device)
        return AckStatus(
            group_id=group_id,
            epoch=group.epoch,
            members=tuple(members),
            stragglers=tuple(m for m in members if m not in acked),
            by_authenticator={auth: tuple(devs) for auth, devs in by_auth.items()},
        )

    def ack_counts(self, group_id: str) -> tuple[int, int, int]:
        """(epoch, members, acked members) for the group's current epoch, counted by the
        database: what ``ack_status`` would list, without loading a row per member. The
        service's per-ack progress check uses it (docs/bench/README.md)."""
        group = self._group_row(group_id)
        members = self._s.scalar(
            select(func.count()).where(
                GroupMember.group_id == group_id, GroupMember.leaf_index.is_not(None)
            )
        )
        acked = self._s.scalar(
            select(func.count())
            .select_from(Ack)
            .join(
                GroupMember,
                (GroupMember.group_id == Ack.group_id) & (GroupMember.device_id == Ack.device_id),
            )
            .where(
                Ack.group_id == group_id,
                Ack.epoch == group.epoch,
                GroupMember.leaf_index.is_not(None),
            )
        )
        return group.epoch, int(members or 0), int(acked or 0)

    def pending_acks(self, group_id: str) -> list[str]:
        """The stragglers: current members that have not acked the current epoch."""
        return list(self.ack_status(group_id).stragglers)

    # -- operators --

    def add_operator(
        self, name: str, *, cert_fingerprint: str, role: Role, now: int
    ) -> OperatorRecord:
        _check_identifier("operator", name)
        _check_fingerprint("operator", cert_fingerprint)
        if self._s.get(Operator, name) is not None:
            raise ProtocolError("registry.operator.exists", f"operator {name!r} already exists")
        if self.operator_by_fingerprint(cert_fingerprint) is not None:
            raise ProtocolError(
                "registry.operator.fingerprint_taken",
                f"certificate {cert_fingerprint} already belongs to another operator",
            )
        row = Operator(
            name=name, cert_fingerprint=cert_fingerprint, role=role, created_at=now, updated_at=now
        )
        self._insert_or_retry(f"operator {name!r} was added concurrently", row)
        return _record(OperatorRecord, row)

    def _operator_row(self, name: str) -> Operator:
        return self._row(Operator, "operator", name)

    def operator(self, name: str) -> OperatorRecord:
        return _record(OperatorRecord, self._operator_row(name))

    def operator_by_fingerprint(self, cert_fingerprint: str) -> OperatorRecord | None:
        row = self._s.scalar(select(Operator).where(Operator.cert_fingerprint == cert_fingerprint))
        return None if row is None else _record(OperatorRecord, row)

    def operators(self) -> list[OperatorRecord]:
        return [
            _record(OperatorRecord, r)
            for r in self._s.scalars(select(Operator).order_by(Operator.name))
        ]

    def set_operator_role(self, name: str, role: Role, *, now: int) -> OperatorRecord:
        row = self._operator_row(name)
        if row.role != role:
            if row.role is Role.ADMIN and role is not Role.ADMIN:
                self._refuse_last_admin(name)
            row.role = role
            row.updated_at = now
            self._s.flush()
        return _record(OperatorRecord, row)

    def set_operator_certificate(
        self, name: str, cert_fingerprint: str, *, now: int
    ) -> OperatorRecord:
        """Rotate an operator's certificate (the old one stops being accepted at once)."""
        _check_fingerprint("operator", cert_fingerprint)
        row = self._operator_row(name)
        other = self.operator_by_fingerprint(cert_fingerprint)
        if other is not None and other.name != name:
            raise ProtocolError(
                "registry.operator.fingerprint_taken",
                f"certificate {cert_fingerprint} already belongs to operator {other.name!r}",
            )
        row.cert_fingerprint = cert_fingerprint
        row.updated_at = now
        self._s.flush()
        return _record(OperatorRecord, row)

    def remove_operator(self, name: str) -> None:
        row = self._operator_row(name)
        if row.role is Role.ADMIN:
            self._refuse_last_admin(name)
        self._s.delete(row)
        self._s.flush()

    def _refuse_last_admin(self, name: str) -> None:
        # Without an admin nobody could manage operators again short of editing the database.
        admins = self._s.scalar(select(func.count()).where(Operator.role == Role.ADMIN))
        if admins is not None and admins <= 1:
            raise ProtocolError(
                "registry.operator.last_admin",
                f"operator {name!r} is the last admin; make another admin first",
            )

    # -- factory stations --

    def add_station(self, name: str, *, cert_fingerprint: str, now: int) -> StationRecord:
        _check_identifier("station", name)
        _check_fingerprint("station", cert_fingerprint)
        if self._s.get(Station, name) is not None:
            raise ProtocolError("registry.station.exists", f"station {name!r} already exists")
        if self.station_by_fingerprint(cert_fingerprint) is not None:
            raise ProtocolError(
                "registry.station.fingerprint_taken",
                f"certificate {cert_fingerprint} already belongs to another station",
            )
        row = Station(name=name, cert_fingerprint=cert_fingerprint, created_at=now)
        self._insert_or_retry(f"station {name!r} was added concurrently", row)
        return _record(StationRecord, row)

    def station(self, name: str) -> StationRecord:
        return _record(StationRecord, self._row(Station, "station", name))

    def station_by_fingerprint(self, cert_fingerprint: str) -> StationRecord | None:
        row = self._s.scalar(select(Station).where(Station.cert_fingerprint == cert_fingerprint))
        return None if row is None else _record(StationRecord, row)

    def stations(self) -> list[StationRecord]:
        return [
            _record(StationRecord, r)
            for r in self._s.scalars(select(Station).order_by(Station.name))
        ]

    def remove_station(self, name: str) -> None:
        row = self._row(Station, "station", name)
        self._s.delete(row)
        self._s.flush()


__all__ = [
    "DEVICE_TRANSITIONS",
    "KEY_TRANSITIONS",
    "REENROLLABLE",
    "AckStatus",
    "CommitRecord",
    "DeviceRecord",
    "EpochConflict",
    "GroupRecord",
    "KeyRecord",
    "KeyStateReport",
    "KeyTransitionRecord",
    "MemberRecord",
    "OperatorRecord",
    "Registry",
    "StationRecord",
    "cert_fingerprint",
    "pem_fingerprint",
]


# The statements of every accepted commit (``Registry.append_commit``), built once: their cache
# keys are computed once, not per commit.
_GROUPS = table_of(Group)
_INSERT_COMMIT: Final = insert(table_of(CommitLogEntry))
_MOVE_GROUP: Final = (
    update(_GROUPS)
    .where(_GROUPS.c.group_id == bindparam("group"), _GROUPS.c.epoch == bindparam("from_epoch"))
    .values(
        epoch=bindparam("to_epoch"),
        public_tree=bindparam("tree"),
        group_context=bindparam("context"),
        updated_at=bindparam("at"),
        state_token=bindparam("token"),
    )
)
