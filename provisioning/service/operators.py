"""Operators: registering them with the service (``keyfleet operator add``, on the service
host), authorizing their commands, and planning the group changes a command asks for.

An operator is known by its certificate from the operator CA: subject CN = the operator id
(``op-alice``, also its MQTT user name and topic level), OU = its role (viewer, operator or
admin). Registration checks the chain against the configured operator CA, stores the role and
certificate fingerprint in the registry and the certificate itself in the service's key table
(commands carry only a kid), and writes one audit entry, all in one transaction.

A command is authorized by: COSE signature by a registered operator key whose certificate
still chains to the operator CA and names that operator (re-checked on every command: an
expired certificate stops working at once), role (viewer < operator < admin,
``REQUIRED_ROLE``; the certificate's OU, which the registry row may only narrow:
``credentials``), replay (a per-sender
``ReplayGuard`` in the database) and command-id reuse. Every accepted or refused command is one
audit entry. An accepted command becomes an operation and its jobs, in the command's own
transaction (nothing lives only in this process); its ``accepted`` result says how many earlier
changes of its groups are queued ahead of it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.orm import Session, sessionmaker

from agent.protocol.errors import ProtocolError
from agent.protocol.topics import operator_result_topic
from agent.protocol.wire.cose import key_id
from agent.protocol.wire.envelope import KeyResolver, Signer, VerifiedMessage
from agent.protocol.wire.messages.base import Body
from agent.protocol.wire.messages.operator import (
    Approve,
    AttestDevice,
    AuditSync,
    GroupAdd,
    GroupCreate,
    GroupPolicy,
    ListRequests,
    Propose,
    Rekey,
    ReleaseAdd,
    Revoke,
    TagDevice,
)
from agent.protocol.wire.messages.release import RolloutAbort, RolloutStart
from agent.protocol.wire.messages.result import OperatorResult, ResultStatus
from agent.protocol.wire.messages.service import CommitAction
from provisioning import audit, pki, revocation
from provisioning.registry import (
    DeviceState,
    OperatorRecord,
    Outcome,
    Registry,
    Role,
    cert_fingerprint,
    run_in_transaction,
)
from provisioning.service import (
    attestation,
    bulkadd,
    checkpoints,
    credentials,
    devicetags,
    execute,
    fullrekey,
    groupdelete,
    operatorops,
    rekeypolicy,
    releases,
    requests,
    rollout,
    store,
    verify,
)
from provisioning.service.context import Call
from provisioning.service.effects import (
    Accepted,
    CancelAddsOf,
    Effects,
    Log,
    Progress,
    StartNext,
    WriteCrl,
)
from provisioning.service.model import GROUP_ELIGIBLE, Job, Operation

log = logging.getLogger("keyfleet.service")

OPERATOR_PREFIX = "op-"

# Who may send what. A role includes the ones below it (Role.allows).
REQUIRED_ROLE: Final[dict[str, Role]] = {
    Rekey.TYPE: Role.OPERATOR,
    # How long leaf keys may live: an admin's decision (docs/operations.md, "Rekey policy").
    GroupPolicy.TYPE: Role.ADMIN,
    GroupCreate.TYPE: Role.OPERATOR,
    GroupAdd.TYPE: Role.OPERATOR,
    AttestDevice.TYPE: Role.OPERATOR,
    # Tags select devices for a later group request, which names them and needs the quorum.
    TagDevice.TYPE: Role.OPERATOR,
    Revoke.TYPE: Role.ADMIN,
    # A proposed release is trusted by nothing: approving it is an admins' quorum (requests.py).
    ReleaseAdd.TYPE: Role.OPERATOR,
    # Dual control: who may propose or approve which op is checked per request (requests.py).
    Propose.TYPE: Role.OPERATOR,
    Approve.TYPE: Role.OPERATOR,
    ListRequests.TYPE: Role.VIEWER,
    AuditSync.TYPE: Role.VIEWER,
    # Staged rollouts of an approved release (provisioning/service/rollout.py).
    RolloutStart.TYPE: Role.OPERATOR,
    RolloutAbort.TYPE: Role.OPERATOR,
}

# The request op a direct membership command stands for (agent.protocol.authz op names).
DIRECT_OPS: Final[dict[str, str]] = {
    GroupCreate.TYPE: "group.create",
    GroupAdd.TYPE: "group.add",
    Revoke.TYPE: "device.revoke",
}


def register_operator(
    sessions: sessionmaker[Session],
    cert: x509.Certificate,
    *,
    operator_ca: x509.Certificate,
    role: Role | None,
    actor: str,
    now: int,
    bootstrap_check: Callable[[Session], None] | None = None,
) -> OperatorRecord:
    """Add (or re-certify) the operator named by ``cert``'s CN. ``role`` defaults to the
    certificate's OU and, if given, may only narrow it (the role travels in the certificate;
    every command is held to the lower of the two). ``bootstrap_check`` runs first in the same
    transaction (the CLI's local path: ``operators_cli.check_bootstrap_open``). Raises
    ``ProtocolError`` (``pki.*``, ``op.name``, ``op.role``, ``registry.operator.*``,
    ``operator.bootstrap.closed``); a refusal is audited too."""
    name = pki.common_name(cert)
    try:
        pki.verify_certificate(
            cert, operator_ca, now=datetime.fromtimestamp(now, UTC), purpose="client"
        )
        if not name.startswith(OPERATOR_PREFIX):
            raise ProtocolError("op.name", f"operator ids start with {OPERATOR_PREFIX!r}: {name!r}")
        # Roles come from the certificate (credentials.operator_role): one without a role
        # grants nothing, and --role may only narrow the certificate's.
        cert_role = credentials.certificate_role(cert)
        chosen = role if role is not None else cert_role
        if not cert_role.allows(chosen):
            raise ProtocolError(
                "op.role",
                f"--role {chosen.value} exceeds the certificate's role {cert_role.value}",
            )
        public_key = cert.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)  # pki.key_type checked it

        def work(session: Session) -> OperatorRecord:
            if bootstrap_check is not None:
                bootstrap_check(session)
            registry = Registry(session)
            fingerprint = cert_fingerprint(cert)
            if any(o.name == name for o in registry.operators()):
                registry.set_operator_certificate(name, fingerprint, now=now)
                record = registry.set_operator_role(name, chosen, now=now)
            else:
                record = registry.add_operator(
                    name, cert_fingerprint=fingerprint, role=chosen, now=now
                )
            store.put_operator_key(
                session,
                name=name,
                kid=key_id(public_key),
                cert_pem=pki.cert_to_pem(cert).decode(),
                now=now,
            )
            audit.append(
                session,
                now=now,
                actor=actor,
                action="operator.add",
                target=name,
                outcome=Outcome.ACCEPTED,
                details={"role": chosen.value, "cert_fingerprint": fingerprint},
            )
            return record

        return run_in_transaction(sessions, work)
    except ProtocolError as err:
        audit.record(
            sessions,
            now=now,
            actor=actor,
            action="operator.add",
            target=name,
            outcome=Outcome.REFUSED,
            reason=f"[{err.check}] {err.reason}",
        )
        raise


def check_eligible(registry: Registry, device_id: str, group_id: str) -> None:
    device = registry.device(device_id)
    if device.state not in GROUP_ELIGIBLE:
        raise ProtocolError(
            "registry.member.device_state",
            f"device {device_id!r} is {device.state.value} and cannot join group {group_id!r}",
        )


def target_of(body: Body) -> str:
    for name in ("group_id", "device_id", "request_id"):
        value = getattr(body, name, None)
        if isinstance(value, str):
            return value
        if isinstance(value, bytes):
            return value.hex()
    return body.TYPE


def operator_resolver(
    cx: Call, operator: str, found: dict[str, Role], now: int
) -> Callable[[Session], KeyResolver]:
    def make(session: Session) -> KeyResolver:
        def resolve(kid: bytes) -> Signer:
            row = store.operator_key(session, operator)
            if row is None or row.kid != kid.hex():
                raise LookupError(operator)
            cert = pki.cert_from_pem(row.cert_pem.encode())
            credentials.check_operator_certificate(cert, operator, kid)
            record = Registry(session).operator(operator)
            if record.cert_fingerprint != cert_fingerprint(cert):
                raise ProtocolError(
                    "op.certificate", f"operator {operator!r} has another certificate now"
                )
            # A removal holds whatever the row says (its kept Authorization: operatorops).
            operatorops.check_not_removed(cx.env, session, operator, record.cert_fingerprint)
            # Re-checked on every command: an expired certificate stops working at once.
            cx.env.verify_operator_certificate(cert, now)
            # The role comes from the certificate; the row may only narrow it.
            found["role"] = credentials.operator_role(cert, record.role)
            public_key = cert.public_key()
            assert isinstance(public_key, ec.EllipticCurvePublicKey)  # pki checked P-256
            return Signer(operator, public_key)

        return resolve

    return make


def on_operator(cx: Call, operator: str, payload: bytes, now: int) -> None:
    actor = f"operator:{operator}"
    found: dict[str, Role] = {}
    make = operator_resolver(cx, operator, found, now)
    # operator seqs are clock readings: a window as wide as the commands' freshness
    window = store.operator_replay_window(cx.env.settings.operator_max_age)
    try:
        message = verify.open_envelope(
            cx,
            payload,
            make,
            now=now,
            max_age=cx.env.settings.operator_max_age,
            replay_window=window,
        )
    except ProtocolError as err:
        verify.refuse(
            cx,
            err,
            actor=actor,
            action="operator.command",
            target=operator,
            now=now,
            audit_benign=True,
        )
        return
    body = message.body
    command_id: bytes | None = getattr(body, "command_id", None)
    target = target_of(body)
    details: dict[str, str | int | None] = {
        "command_id": None if command_id is None else command_id.hex()
    }
    try:
        required = REQUIRED_ROLE.get(message.type)
        if required is None or command_id is None:
            raise ProtocolError("op.type", f"{message.type} is not an operator command")
        role = found["role"]
        if not role.allows(required):
            raise ProtocolError(
                "op.role", f"{message.type} needs role {required.value}; {operator} is {role}"
            )
        effects = verify.accept_and(
            cx,
            message,
            now,
            lambda s: dispatch_operator(cx, s, message, command_id, now),
            replay_window=window,
        )
    except ProtocolError as err:
        verify.refuse(
            cx, err, actor=actor, action=message.type, target=target, now=now, details=details
        )
        if command_id is not None and err.check not in (
            "replay.duplicate",
            "op.command_id.reused",
        ):
            cx.send(
                operator_result_topic(operator),
                OperatorResult.of(command_id, ResultStatus.REJECTED, f"[{err.check}] {err.reason}"),
                to=operator,
                now=now,
            )
        return
    cx.env.metrics.commands.inc(message.type)
    execute.run(cx, effects)


def dispatch_operator(
    cx: Call, session: Session, message: VerifiedMessage, command_id: bytes, now: int
) -> Effects:
    operator = message.sender
    body = message.body
    if store.command_seen(session, command_id):
        raise ProtocolError("op.command_id.reused", "this command id was already used")
    if isinstance(body, Propose | Approve | ListRequests):
        store.record_command(session, command_id, operator=operator, type_=message.type, now=now)
        return requests.dispatch(cx, session, message, command_id, now)
    if isinstance(body, AuditSync):
        store.record_command(session, command_id, operator=operator, type_=message.type, now=now)
        return checkpoints.on_sync(cx, session, operator, body, now)
    if isinstance(body, AttestDevice):
        return attestation.dispatch_attest(cx, session, operator, body, command_id, now=now)
    if isinstance(body, ReleaseAdd):
        store.record_command(session, command_id, operator=operator, type_=message.type, now=now)
        return releases.on_add(session, body, operator=operator, now=now)
    if isinstance(body, RolloutStart):
        return rollout.dispatch_start(cx, session, operator, body, command_id, now=now)
    if isinstance(body, RolloutAbort):
        return rollout.dispatch_abort(cx, session, operator, body, command_id, now=now)
    if isinstance(body, TagDevice):
        store.record_command(session, command_id, operator=operator, type_=message.type, now=now)
        return devicetags.on_tag(session, body, operator=operator, command_id=command_id, now=now)
    if isinstance(body, GroupPolicy):
        store.record_command(session, command_id, operator=operator, type_=message.type, now=now)
        return rekeypolicy.set_group_policy(
            cx, session, body, operator=operator, command_id=command_id, now=now
        )
    if isinstance(body, Rekey):
        groupdelete.check_live(session, body.group_id)
        Registry(session).group(body.group_id)
        if body.full:
            jobs = fullrekey.plan(cx, session, body.group_id)
        else:
            jobs = [Job(CommitAction.UPDATE, body.group_id, None, cx.env.new_id())]
        groups = {body.group_id}
    else:
        # A membership change without an Authorization: only where the quorum policy lets one
        # operator decide alone (the CLI's direct commands go through requests anyway).
        op, group = DIRECT_OPS[message.type], getattr(body, "group_id", None)
        needed = requests.current_policy(cx, session).required(op, group)
        if needed > 1:
            raise ProtocolError(
                "quorum.required",
                f"{op} needs {needed} operators' approval: use keyfleet propose",
            )
        if isinstance(body, GroupCreate):
            jobs, groups = plan_create(cx, session, body.group_id, body.members)
        elif isinstance(body, GroupAdd):
            jobs, groups = plan_add(cx, session, body.group_id, body.device_id, now)
        elif isinstance(body, Revoke):
            jobs, groups = plan_revoke(
                cx, session, body.device_id, reason=body.reason, operator=operator, now=now
            )
        else:  # pragma: no cover - REQUIRED_ROLE lists exactly the types above
            raise ProtocolError("op.type", f"{message.type} is not an operator command")
    return start_change(
        cx,
        session,
        operator=operator,
        type_=message.type,
        target=target_of(body),
        jobs=jobs,
        groups=groups,
        command_id=command_id,
        now=now,
        revoked=(body.device_id,) if isinstance(body, Revoke) else (),
    )


def plan_create(
    cx: Call, session: Session, group_id: str, members: Sequence[str], *, authz_size: int = 0
) -> tuple[list[Job], set[str]]:
    """The jobs that create ``group_id``: the first founder that answers creates it, the
    others are added many per commit (``bulkadd``: as many as a commit carrying an
    Authorization of ``authz_size`` bytes holds). Raises if the group exists or a member may
    not join."""
    registry = Registry(session)
    groupdelete.check_live(session, group_id)  # a deleted group's id is never used again
    if store.pending_create(session, group_id):
        raise ProtocolError("registry.group.exists", f"group {group_id!r} is being created")
    if group_id in {g.group_id for g in registry.groups()}:
        raise ProtocolError("registry.group.exists", f"group {group_id!r} already exists")
    for device_id in members:
        check_eligible(registry, device_id, group_id)
    jobs = [Job(CommitAction.CREATE, group_id, None, cx.env.new_id(), candidates=tuple(members))]
    size = bulkadd.adds_per_commit(authz_size)
    # every founder: the one that creates the group (the first that answers) is left out of
    # its chunk when that starts (jobs.start), so whoever creates it, the others all join
    jobs.extend(
        bulkadd.new_job(group_id, chunk, cx.env.new_id())
        for chunk in bulkadd.chunks(tuple(members), size)
    )
    if len(members) - 1 >= bulkadd.FIRST_UPDATES_BATCH_MIN:
        # the joiners' first updates, as Update proposals in a few commits (fullrekey)
        jobs.append(fullrekey.first_updates(cx, group_id, tuple(members)))
    return jobs, {group_id}


def check_add(session: Session, group_id: str, device_id: str) -> None:
    """Raises unless ``device_id`` may be added to ``group_id`` (existing or being created)."""
    registry = Registry(session)
    groupdelete.check_live(session, group_id)
    check_eligible(registry, device_id, group_id)
    if not store.pending_create(session, group_id):
        registry.group(group_id)
        existing = {m.device_id: m for m in registry.members(group_id)}.get(device_id)
        if existing is not None and existing.leaf_index is not None:
            raise ProtocolError(
                "ds.group.member", f"device {device_id!r} is already a member of {group_id!r}"
            )


def plan_add(
    cx: Call, session: Session, group_id: str, device_id: str, now: int
) -> tuple[list[Job], set[str]]:
    check_add(session, group_id, device_id)
    if not store.pending_create(session, group_id):
        Registry(session).request_add(group_id, device_id, now=now)
    return [Job(CommitAction.ADD, group_id, device_id, cx.env.new_id())], {group_id}


def plan_add_many(
    cx: Call,
    session: Session,
    group_id: str,
    members: Sequence[str],
    now: int,
    *,
    authz_size: int = 0,
) -> tuple[list[Job], set[str]]:
    """Add several devices by one commit (``bulkadd``): devices add exactly the members a
    ``group.add`` request names, so they must fit one commit (``ds.add.frame`` otherwise: use
    several requests)."""
    for device_id in members:
        check_add(session, group_id, device_id)
    if len(members) > bulkadd.adds_per_commit(authz_size):
        raise ProtocolError(
            "ds.add.frame",
            f"{len(members)} devices do not fit one commit (at most "
            f"{bulkadd.adds_per_commit(authz_size)}): split the add into several requests",
        )
    if not store.pending_create(session, group_id):
        for device_id in members:
            Registry(session).request_add(group_id, device_id, now=now)
    return [bulkadd.new_job(group_id, tuple(members), cx.env.new_id())], {group_id}


def check_remove(session: Session, group_id: str, device_id: str) -> None:
    """Raises unless ``device_id`` holds a leaf of ``group_id`` that can be removed."""
    registry = Registry(session)
    groupdelete.check_live(session, group_id)
    registry.group(group_id)
    member = {m.device_id: m for m in registry.members(group_id)}.get(device_id)
    if member is None or member.leaf_index is None:
        raise ProtocolError(
            "ds.group.not_member", f"device {device_id!r} is not a member of {group_id!r}"
        )


def plan_group_remove(
    cx: Call, session: Session, group_id: str, device_id: str, now: int
) -> tuple[list[Job], set[str]]:
    """Remove ``device_id`` from ``group_id`` only (it stays in the fleet and its other
    groups): a persistent remove job, like a revocation's in that group."""
    check_remove(session, group_id, device_id)
    Registry(session).request_remove(group_id, device_id, now=now)
    job = Job(CommitAction.REMOVE, group_id, device_id, cx.env.new_id(), persistent=True)
    return [job], {group_id}


def plan_revoke(
    cx: Call, session: Session, device_id: str, *, reason: str | None, operator: str, now: int
) -> tuple[list[Job], set[str]]:
    reason = reason or f"revoked by {operator}"
    Registry(session).set_device_state(device_id, DeviceState.REVOKED, reason=reason, now=now)
    revocation.revoke_device(session, cx.env.revocation, device_id, reason=reason, now=now)
    return plan_removal(cx, session, device_id, now)


def start_change(
    cx: Call,
    session: Session,
    *,
    operator: str,
    type_: str,
    target: str,
    jobs: list[Job],
    groups: set[str],
    command_id: bytes,
    now: int,
    revoked: Sequence[str] = (),
    authz: bytes | None = None,
    request_id: bytes | None = None,
) -> Effects:
    """Record an accepted change (a direct command, or a request whose approvals met the
    quorum: ``authz`` is then its Authorization, kept on the operation for the members) as an
    operation with its jobs, audited, in the caller's transaction; return what to do after
    it committed. Jobs with an id were inserted by the planner (``plan_removal``). The
    command id of an approval is recorded already (``dispatch_operator``)."""
    if request_id is None:
        store.record_command(session, command_id, operator=operator, type_=type_, now=now)
    details: dict[str, str | int | None] = {
        "command_id": command_id.hex(),
        "jobs": len(jobs),
        # at_ms: when it was accepted, in ms (the entry's time is whole seconds); the
        # dashboard times a rekey from it to the result's at_ms
        "at_ms": cx.clock.ms,
    }
    if request_id is not None:
        details["request_id"] = request_id.hex()
    audit.append(
        session,
        now=now,
        actor=f"operator:{operator}",
        action=type_,
        target=target,
        outcome=Outcome.ACCEPTED,
        details=details,
    )
    # Earlier changes only: a revocation's removal jobs are already inserted
    # (``plan_removal``) and must not count as queued ahead of themselves.
    own = {job.id for job in jobs if job.id}
    ahead = sum(1 for g in groups for row in store.open_job_rows(session, g) if row.id not in own)
    operation = Operation(
        command_id=command_id,
        operator=operator,
        type=type_,
        target=target,
        groups=groups,
        jobs=jobs,
        last_progress=now,
    )
    # The operation and its jobs commit with the command: an instance that dies right
    # after leaves them for the others (nothing lives only in this process).
    store.insert_operation(session, operation, now=now, instance=cx.env.instance)
    if authz is not None:
        store.set_operation_authz(session, command_id, authz)
    for job in jobs:
        if job.id == 0:
            job.command_id = None if job.detached else command_id
            store.insert_job(session, job, now)
        else:  # a removal plan_removal already inserted
            store.link_job(session, job, command_id)
    detail = f"{len(jobs)} group change(s)"
    if ahead:
        detail += f"; queued behind {ahead} earlier change(s)"
    return [
        Log(
            logging.INFO,
            "accepted %s from %s on %s (%d job(s), %d queued ahead)",
            (type_, operator, target, len(jobs), ahead),
        ),
        *(CancelAddsOf(device_id) for device_id in revoked),
        Accepted(operation, detail),
        *(StartNext(group_id) for group_id in sorted(groups)),
        Progress(command_id),
        *((WriteCrl(),) if revoked else ()),
    ]


def plan_removal(
    cx: Call,
    session: Session,
    device_id: str,
    now: int,
    *,
    ask_first: Mapping[str, tuple[str, ...]] | None = None,
) -> tuple[list[Job], set[str]]:
    """Mark ``device_id`` pending removal in every group it is in (pending adds are
    withdrawn) and make one persistent remove job per group where it holds a leaf: the
    revocation's and the quarantine's path out of the groups. The jobs are inserted in the
    caller's transaction; after it committed, the caller starts them (and cancels queued adds
    of the device). ``ask_first``: per group, the members to ask for the removal first
    (``Job.candidates``)."""
    registry = Registry(session)
    jobs: list[Job] = []
    groups: set[str] = set()
    for member in registry.groups_of(device_id):
        registry.request_remove(member.group_id, device_id, now=now)
        if member.leaf_index is not None:
            job = Job(
                CommitAction.REMOVE,
                member.group_id,
                device_id,
                cx.env.new_id(),
                persistent=True,
                candidates=(ask_first or {}).get(member.group_id, ()),
            )
            store.insert_job(session, job, now)
            jobs.append(job)
            groups.add(member.group_id)
    return jobs, groups
