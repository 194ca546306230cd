"""Dual control: requests that k distinct operators approve before a membership change (or a
new quorum policy) runs (docs/operations.md, "Dual control").

- ``op.propose``: the service builds the Request (``agent.protocol.authz``): a random id, the
  op, the group, each member's device id with the SHA-256 of its DevID public key taken from the
  registry (the DevID certificate enrollment issued), the window ``now .. now + request_ttl``
  and the proposer. It stores it pending and answers with its bytes, unsigned: the proposer's
  tool decodes and shows them and sends the first approval like any other approver. (The
  approval cannot travel with the proposal: what is signed is the service's bytes.)
- ``op.approve``: one operator's Approval of a pending request. The service checks it as the
  devices will (operator certificate chains to the operator CA, role, signature over the exact
  request bytes; ``AuthzVerifier.verify_approval``), that the sender approves in its own name,
  that the request has not expired and that this operator has not approved it already. When the
  approvals reach the quorum policy's k for the op and group, the service verifies the whole
  Authorization itself and starts the change as the direct command would
  (``operators.start_change``), under the approver's command id, with the Authorization kept on
  the operation: every commit request of the change carries it to the committer, whose commit
  carries it to every member (and its Welcome to the joiners), who verify it again. A
  "policy" request is adopted instead (``store.adopt_policy``).
- ``op.list_requests``: the open requests, or one request in whatever state it is.
- ``expire_tick``: pending requests past their window become ``expired``.

Every step is one audit entry (``request.propose``, ``request.approve``, ``request.execute``,
``request.refuse``, ``request.expire``, ``quorum.policy``; a ``device.reenroll`` request stays
``approved`` until enrollment uses it, ``request.consume``); refusals are audited by the
caller (``verify.refuse``) with their check id: ``quorum.unknown``, ``quorum.expired``,
``quorum.state``, ``quorum.approver``, ``quorum.duplicate``, ``op.role``, ``authz.*``.

The policy in force is the newest adopted one, re-verified from the initial policy
(``QuorumPolicy.initial(min_approvals)``) along the chain of adopted policies each time it is
read: a policy row written into the database by anyone but a quorum of operators is refused
(``authz.*``), not obeyed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from cryptography.hazmat.primitives import serialization
from sqlalchemy.orm import Session

from agent.protocol import authz, trust
from agent.protocol.errors import ProtocolError
from agent.protocol.topics import operator_result_topic
from agent.protocol.wire.envelope import VerifiedMessage
from agent.protocol.wire.messages.operator import Approve, ListRequests, Propose
from agent.protocol.wire.messages.result import (
    MAX_REQUESTS,
    RequestInfo,
    RequestsResult,
    RequestState,
)
from provisioning import audit, revocation
from provisioning.registry import DeviceState, Outcome, Registry, Role, tags
from provisioning.service import (
    bulkadd,
    credentials,
    feed,
    groupdelete,
    operatorops,
    operators,
    releases,
    replaceops,
    store,
    trustroll,
)
from provisioning.service.context import Call
from provisioning.service.effects import Effects, Log, Send
from provisioning.service.model import Job
from provisioning.service.store.quorum import StoredRequest

log = logging.getLogger("keyfleet.service")

# The operation type (as a direct command's) each request op starts.
OPERATION_TYPES = {
    authz.OP_GROUP_CREATE: "op.group_create",
    authz.OP_GROUP_ADD: "op.group_add",
    authz.OP_GROUP_REMOVE: "op.group_remove",
    authz.OP_DEVICE_REVOKE: "op.revoke",
    authz.OP_DEVICE_REPLACE: "op.replace",
}
# Ops whose proposal and approval the service gives to admins only (a revocation was an admin
# command before dual control; a policy change is an admin's per the authorization format).
ADMIN_OPS = frozenset(
    {
        authz.OP_DEVICE_REVOKE,
        authz.OP_DEVICE_REPLACE,
        authz.OP_DEVICE_REENROLL,
        authz.OP_GROUP_DELETE,
        authz.OP_POLICY,
        authz.OP_RELEASE_APPROVE,
        authz.OP_RELEASE_REVOKE,
        authz.OP_TRUST_ROTATE,
    }
    | authz.OPERATOR_OPS
)
# What one ``op.list_requests`` answer holds at most (a service message is at most 256 KiB).
LIST_BYTES = 160 * 1024


# -- the policy in force ------------------------------------------------------------------------


def verifier(cx: Call) -> authz.AuthzVerifier:
    """The service's verifier against the operator CA it trusts (kept: it caches validated
    operator certificates)."""
    return cx.env.approvals()


def current_policy(cx: Call, session: Session) -> authz.QuorumPolicy:
    """The initial policy, moved along every adopted policy in serial order, each verified
    under the one before it (historically: its window need not be now)."""
    return revocation.quorum_policy(session, verifier(cx), cx.env.settings.min_approvals)


# -- dispatch -----------------------------------------------------------------------------------


def dispatch(
    cx: Call, session: Session, message: VerifiedMessage, command_id: bytes, now: int
) -> Effects:
    body = message.body
    if isinstance(body, Propose):
        return on_propose(cx, session, message.sender, body, now)
    if isinstance(body, Approve):
        return on_approve(cx, session, message.sender, body, now)
    if isinstance(body, ListRequests):
        return on_list(cx, session, message.sender, body, now)
    raise ProtocolError("op.type", f"{message.type} is not a request command")  # pragma: no cover


def require_role(session: Session, operator: str, op: str) -> None:
    # the role from the operator's certificate, narrowed by its row (credentials.operator_role)
    if op in ADMIN_OPS and not credentials.effective_role(session, operator).allows(Role.ADMIN):
        raise ProtocolError("op.role", f"{op} is proposed and approved by admins only")


def info(stored: StoredRequest, policy: authz.QuorumPolicy, now: int) -> RequestInfo:
    state = stored.state
    detail = stored.detail
    if state is RequestState.PENDING and now > stored.expires_at:
        state, detail = RequestState.EXPIRED, f"expired at {stored.expires_at}"
    return RequestInfo(
        request=stored.request,
        state=state,
        approvers=tuple(stored.approvers),
        required=policy.required(stored.op, stored.group_id),
        detail=detail,
    )


def answer(
    cx: Call,
    session: Session,
    operator: str,
    command_id: bytes,
    items: list[StoredRequest],
    *,
    now: int,
) -> Send:
    policy = current_policy(cx, session)
    result = RequestsResult(command_id, tuple(info(s, policy, now) for s in items))
    return Send(operator_result_topic(operator), result, operator)


# -- propose ------------------------------------------------------------------------------------


def devid_point(cx: Call, registry: Registry, device_id: str, now: int) -> bytes:
    """The 65-byte DevID public point of ``device_id``, from the certificate enrollment issued
    (checked at use against the device CA: ``cred.stored``)."""
    public = cx.env.devices.check(registry.device(device_id), now).devid_key
    return public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def check_request(
    cx: Call, session: Session, op: str, group: str | None, members: tuple[str, ...]
) -> None:
    """Raises unless the change can be made now (the same checks the direct command makes)."""
    registry = Registry(session)
    if op == authz.OP_GROUP_DELETE:
        assert group is not None
        groupdelete.check(session, group)
    elif op == authz.OP_GROUP_CREATE:
        assert group is not None
        groupdelete.check_live(session, group)  # a deleted group's id is never used again
        if store.pending_create(session, group):
            raise ProtocolError("registry.group.exists", f"group {group!r} is being created")
        if group in {g.group_id for g in registry.groups()}:
            raise ProtocolError("registry.group.exists", f"group {group!r} already exists")
        for device_id in members:
            operators.check_eligible(registry, device_id, group)
    elif op == authz.OP_GROUP_ADD:
        assert group is not None
        for device_id in members:
            operators.check_add(session, group, device_id)
        room = bulkadd.adds_per_commit(bulkadd.estimated_authz_size(len(members)))
        if len(members) > room:
            # the devices take exactly the named members in one commit (docs/authorization.md)
            raise ProtocolError(
                "ds.add.frame",
                f"{len(members)} devices do not fit one commit (about {room}): split the add",
            )
    elif op == authz.OP_GROUP_REMOVE:
        assert group is not None
        operators.check_remove(session, group, members[0])
    elif op == authz.OP_DEVICE_REPLACE:
        replaceops.check(session, members[0], members[1])
    elif op == authz.OP_DEVICE_REVOKE:
        for device_id in members:
            if registry.device(device_id).state is DeviceState.REVOKED:
                raise ProtocolError("registry.device.revoked", f"{device_id} is revoked already")
    elif op == authz.OP_DEVICE_REENROLL and not revocation.identity_revoked(
        session, device := registry.device(members[0])
    ):
        raise ProtocolError(
            "revocation.reenroll.state",
            f"{members[0]} is {device.state.value}: only a revoked identity's TPM needs a "
            "re-enroll request",
        )


def by_tag(session: Session, body: Propose) -> Propose:
    """A group create or add by tag as the same proposal naming the devices the tag resolves to
    now (``provisioning.registry.tags.resolve``): the Request names them, so approvers approve
    these devices, not whatever holds the tag later. Any other proposal as it is."""
    if body.tag is None:
        return body
    group = body.group_id if body.op == authz.OP_GROUP_ADD else None
    return replace(body, members=tags.resolve(session, body.tag, group=group), tag=None)


def on_propose(cx: Call, session: Session, operator: str, asked: Propose, now: int) -> Effects:
    require_role(session, operator, asked.op)
    body = by_tag(session, asked)
    registry = Registry(session)
    subject: bytes | None = None
    kept = body.reason or ""
    if body.op in authz.OPERATOR_OPS:
        operator_subject, kept = operatorops.request_subject(cx, session, body, now)
        subject = operator_subject.encode()
        members: tuple[authz.Member, ...] = ()
    elif body.op == authz.OP_POLICY:
        assert body.policy is not None
        proposed = authz.QuorumPolicy.decode(body.policy)
        current = current_policy(cx, session)
        if proposed.serial <= current.serial:
            raise ProtocolError(
                "authz.policy.serial",
                f"serial {proposed.serial} does not follow the current serial {current.serial}",
            )
        members = ()
    elif body.op == authz.OP_TRUST_ROTATE:
        # the new bundle names when the old key's acceptance ends: the window's end + overlap
        subject, kept = trustroll.request_subject(
            cx, session, body, now + cx.env.settings.request_ttl
        )
        members = ()
    elif body.op in authz.SUBJECT_OPS:
        assert body.release is not None
        subject = releases.request_subject(session, body.op, body.release)
        members = ()
    else:
        check_request(cx, session, body.op, body.group_id, body.members)
        if body.op == authz.OP_DEVICE_REPLACE:
            subject = authz.replace_subject(replaceops.check(session, *body.members))
        members = tuple(authz.Member.of(d, devid_point(cx, registry, d, now)) for d in body.members)
    request = authz.Request(
        id=cx.env.rng(authz.REQUEST_ID_SIZE),
        op=body.op,
        group=body.group_id,
        members=members,
        policy=body.policy,
        nbf=now,
        exp=now + cx.env.settings.request_ttl,
        by=operator,
        subject=subject,
    )
    stored = StoredRequest(
        request_id=request.id,
        op=request.op,
        group_id=request.group,
        members=body.members,
        request=request.encode(),
        approvals=[],
        approvers=[],
        state=RequestState.PENDING,
        proposer=operator,
        created_at=now,
        expires_at=request.exp,
        # an operator.add request keeps the certificate its subject binds, until it executes
        reason=kept,
    )
    store.insert_request(session, stored, now=now)
    audit.append(
        session,
        now=now,
        actor=f"operator:{operator}",
        action="request.propose",
        target=request.id.hex(),
        outcome=Outcome.ACCEPTED,
        details={
            "op": request.op,
            "group": request.group,
            "members": ",".join(body.members),
            "release": body.release,
            "operator": body.operator,
            "tag": asked.tag,
            "expires_at": request.exp,
        },
    )
    return [
        Log(logging.INFO, "%s proposed %s request %s", (operator, request.op, request.id.hex())),
        answer(cx, session, operator, body.command_id, [stored], now=now),
    ]


# -- approve ------------------------------------------------------------------------------------


def on_approve(cx: Call, session: Session, operator: str, body: Approve, now: int) -> Effects:
    stored = store.load_request(session, body.request_id)
    if stored is None:
        raise ProtocolError("quorum.unknown", f"no request {body.request_id.hex()}")
    check_stored(stored)
    if stored.state is RequestState.EXPIRED or (
        stored.state is RequestState.PENDING and now > stored.expires_at
    ):
        raise ProtocolError(
            "quorum.expired", f"request {body.request_id.hex()} expired at {stored.expires_at}"
        )
    if stored.state is not RequestState.PENDING:
        raise ProtocolError(
            "quorum.state", f"request {body.request_id.hex()} is {stored.state.value}"
        )
    require_role(session, operator, stored.op)
    approval = authz.Approval.decode(body.approval)
    approver = verifier(cx).verify_approval(stored.request, approval, now=now)
    if approver.operator_id != operator:
        raise ProtocolError(
            "quorum.approver",
            f"{operator} sent an approval by {approver.operator_id}: each operator sends its own",
        )
    if operator in stored.approvers:
        raise ProtocolError(
            "quorum.duplicate", f"{operator} approved request {stored.request_id.hex()} already"
        )
    stored.approvals.append(body.approval)
    stored.approvers.append(operator)
    policy = current_policy(cx, session)
    needed = policy.required(stored.op, stored.group_id)
    audit.append(
        session,
        now=now,
        actor=f"operator:{operator}",
        action="request.approve",
        target=stored.request_id.hex(),
        outcome=Outcome.ACCEPTED,
        details={"op": stored.op, "approvals": len(stored.approvers), "required": needed},
    )
    effects: Effects = []
    if len(stored.approvers) >= needed:
        effects = execute_request(
            cx, session, stored, operator, body.command_id, policy=policy, now=now
        )
    store.save_request(session, stored, now=now)
    return [
        Log(
            logging.INFO,
            "%s approved request %s (%d of %d)",
            (operator, stored.request_id.hex(), len(stored.approvers), needed),
        ),
        answer(cx, session, operator, body.command_id, [stored], now=now),
        *effects,
    ]


def check_stored(stored: StoredRequest) -> None:
    """The row's columns (which the change is planned from) say what its Request bytes (which
    the operators sign) say: a database writer cannot point approvals at another change."""
    request = authz.Request.decode(stored.request)
    if (
        request.id != stored.request_id
        or request.op != stored.op
        or request.group != stored.group_id
        or tuple(m.device_id for m in request.members) != stored.members
        or request.exp != stored.expires_at
    ):
        raise ProtocolError(
            "quorum.stored", f"request {stored.request_id.hex()}: its row disagrees with its bytes"
        )


def authorization(stored: StoredRequest) -> bytes:
    approvals = tuple(authz.Approval.decode(a) for a in stored.approvals)
    return authz.Authorization(request=stored.request, approvals=approvals).encode()


def refuse(session: Session, stored: StoredRequest, err: ProtocolError, *, now: int) -> Effects:
    """An approved request the service cannot carry out: refused with the check that failed,
    audited (``request.refuse``)."""
    stored.state = RequestState.REFUSED
    stored.detail = f"[{err.check}] {err.reason}"
    audit.append(
        session,
        now=now,
        actor="service",
        action="request.refuse",
        target=stored.request_id.hex(),
        outcome=Outcome.REFUSED,
        reason=stored.detail,
    )
    detail = (stored.request_id.hex(), stored.detail)
    return [Log(logging.WARNING, "request %s refused: %s", detail)]


def execute_request(
    cx: Call,
    session: Session,
    stored: StoredRequest,
    operator: str,
    command_id: bytes,
    *,
    policy: authz.QuorumPolicy,
    now: int,
) -> Effects:
    """The approvals met the quorum: verify the Authorization as a device would, then adopt
    the policy or start the change. A change that can no longer be made (the device was
    revoked meanwhile, the group is gone) ends the request ``refused``, its approvals kept."""
    authorization_bytes = authorization(stored)
    stored.state = RequestState.APPROVED
    if stored.op == authz.OP_POLICY:
        adopted = verifier(cx).verify_policy_update(authorization_bytes, current=policy, now=now)
        store.adopt_policy(session, adopted.serial, authorization_bytes, now=now)
        stored.state = RequestState.EXECUTED
        stored.detail = f"policy serial {adopted.serial} in force"
        audit.append(
            session,
            now=now,
            actor=f"operator:{operator}",
            action="quorum.policy",
            target=str(adopted.serial),
            outcome=Outcome.ACCEPTED,
            details={
                "request_id": stored.request_id.hex(),
                "approvers": ",".join(stored.approvers),
            },
        )
        return [Log(logging.INFO, "quorum policy serial %d adopted", (adopted.serial,))]
    verified = verifier(cx).verify(
        authorization_bytes, policy=policy, now=now, op=stored.op, group=stored.group_id
    )
    if stored.op == authz.OP_TRUST_ROTATE:

        def check(signed: bytes, under: trust.TrustBundle) -> authz.VerifiedAuthorization:
            # as a device holding ``under`` checks it: under that bundle's operator CAs
            return trustroll.approvals_under(cx.env, under).verify(
                signed, policy=policy, now=None, op=authz.OP_TRUST_ROTATE, group=None
            )

        return execute_service_op(
            session,
            stored,
            lambda: trustroll.execute(cx, session, stored, authorization_bytes, check, now=now),
            detail="trust bundle published; the service signs with the new key",
            operator=operator,
            now=now,
        )
    if stored.op in authz.OPERATOR_OPS:

        def run_operator_op() -> Effects:
            effects = operatorops.execute(cx, session, stored, verified, now=now)
            if stored.op == authz.OP_OPERATOR_REMOVE:
                # devices stop counting the removed operator's approvals through the feed
                effects = [*effects, *feed.on_revoked(session, authorization_bytes, now=now)]
            return effects

        return execute_service_op(
            session,
            stored,
            run_operator_op,
            detail=f"{stored.op} done",
            operator=operator,
            now=now,
        )
    if stored.op == authz.OP_GROUP_DELETE:
        # the feed entry, the group marked deleted, an operation following the members
        return execute_service_op(
            session,
            stored,
            lambda: groupdelete.execute(
                cx,
                session,
                stored,
                authorization_bytes,
                operator=operator,
                command_id=command_id,
                now=now,
            ),
            detail="group deleted; its members destroy its keys",
            operator=operator,
            now=now,
        )
    if stored.op in authz.SUBJECT_OPS:
        return execute_service_op(
            session,
            stored,
            lambda: releases.execute(
                cx,
                session,
                verified,
                authorization_bytes,
                policy_serial=current_policy(cx, session).serial,
                approvers=stored.approvers,
                operator=operator,
                now=now,
            ),
            detail="release state updated",
            operator=operator,
            now=now,
        )
    try:
        check_request(cx, session, stored.op, stored.group_id, stored.members)
        registry = Registry(session)
        for member in verified.request.members:
            if authz.member_key(devid_point(cx, registry, member.device_id, now)) != member.key:
                raise ProtocolError(
                    "quorum.member", f"{member.device_id} has another DevID key than approved"
                )
        if stored.op == authz.OP_DEVICE_REPLACE:
            replaceops.check_groups(session, verified.request)
    except ProtocolError as err:
        return refuse(session, stored, err, now=now)
    if stored.op == authz.OP_DEVICE_REENROLL:
        # Nothing runs now: the request stays approved until enrollment of that TPM uses it
        # (``revocation.consume_reenroll``, once, within its window).
        audit_executed(
            session,
            stored,
            operator=operator,
            detail="the TPM may enroll once",
            now=now,
            state=RequestState.APPROVED,
        )
        return [Log(logging.INFO, "re-enroll of %s approved", (stored.members[0],))]
    jobs, groups = plan(
        cx,
        session,
        stored,
        verified.request,
        operator=operator,
        now=now,
        authz_size=len(authorization_bytes),
    )
    stored.command_id = command_id
    audit_executed(
        session,
        stored,
        operator=operator,
        detail="change started",
        now=now,
        details={"command_id": command_id.hex(), "approvers": ",".join(stored.approvers)},
    )
    # a revocation also becomes an entry of the feed devices keep (provisioning.service.feed)
    revoked_feed = (
        feed.on_revoked(session, authorization_bytes, now=now)
        if stored.op in authz.FLEET_OPS
        else []
    )
    return revoked_feed + operators.start_change(
        cx,
        session,
        operator=operator,
        type_=OPERATION_TYPES[stored.op],
        target=stored.group_id
        if stored.group_id is not None
        else f"{len(stored.members)} devices"
        if stored.op == authz.OP_DEVICE_REVOKE and len(stored.members) > 1
        else stored.members[0],
        jobs=jobs,
        groups=groups,
        command_id=command_id,
        now=now,
        revoked=(
            stored.members
            if stored.op == authz.OP_DEVICE_REVOKE
            else stored.members[:1]
            if stored.op in authz.FLEET_OPS
            else ()
        ),
        authz=authorization_bytes,
        request_id=stored.request_id,
    )


def audit_executed(
    session: Session,
    stored: StoredRequest,
    *,
    operator: str,
    detail: str,
    now: int,
    details: dict[str, str] | None = None,
    state: RequestState = RequestState.EXECUTED,
) -> None:
    """The request is carried out (``state``: executed, or still approved for a re-enroll that
    waits for its TPM) with ``detail``, audited (``request.execute``)."""
    stored.state = state
    stored.detail = f"approved by {', '.join(stored.approvers)}; {detail}"
    audit.append(
        session,
        now=now,
        actor=f"operator:{operator}",
        action="request.execute",
        target=stored.request_id.hex(),
        outcome=Outcome.ACCEPTED,
        details=details or {"op": stored.op, "approvers": ",".join(stored.approvers)},
    )


def execute_service_op(
    session: Session,
    stored: StoredRequest,
    run: Callable[[], Effects],
    *,
    detail: str,
    operator: str,
    now: int,
) -> Effects:
    """A release or operator op met the quorum: ``run`` carries it out (``releases.execute``,
    ``operatorops.execute``). One that can no longer be made (the release or operator is no
    longer in the state the op needs) ends the request ``refused``."""
    try:
        effects = run()
    except ProtocolError as err:
        return refuse(session, stored, err, now=now)
    audit_executed(session, stored, operator=operator, detail=detail, now=now)
    return effects


def plan(
    cx: Call,
    session: Session,
    stored: StoredRequest,
    request: authz.Request,
    *,
    operator: str,
    now: int,
    authz_size: int = 0,
) -> tuple[list[Job], set[str]]:
    group, members = stored.group_id, stored.members
    if stored.op == authz.OP_GROUP_CREATE:
        assert group is not None
        return operators.plan_create(cx, session, group, members, authz_size=authz_size)
    if stored.op == authz.OP_GROUP_ADD and len(members) > 1:
        assert group is not None
        return operators.plan_add_many(cx, session, group, members, now, authz_size=authz_size)
    if stored.op == authz.OP_GROUP_ADD:
        assert group is not None
        return operators.plan_add(cx, session, group, members[0], now)
    if stored.op == authz.OP_GROUP_REMOVE:
        assert group is not None
        return operators.plan_group_remove(cx, session, group, members[0], now)
    reason = f"request {stored.request_id.hex()} approved by {', '.join(stored.approvers)}"
    if stored.reason:
        reason = f"{stored.reason} ({reason})"
    if stored.op == authz.OP_DEVICE_REPLACE:
        reason = f"replaced by {members[1]}: {reason}"
        return replaceops.plan(cx, session, request, reason=reason, operator=operator, now=now)
    # device.revoke: each named device (one request may revoke several; one feed entry)
    jobs: list[Job] = []
    groups: set[str] = set()
    for device_id in members:
        more, touched = operators.plan_revoke(
            cx, session, device_id, reason=reason, operator=operator, now=now
        )
        jobs += more
        groups |= touched
    return jobs, groups


# -- list and expire ----------------------------------------------------------------------------


def on_list(cx: Call, session: Session, operator: str, body: ListRequests, now: int) -> Effects:
    if body.request_id is not None:
        stored = store.load_request(session, body.request_id)
        if stored is None:
            raise ProtocolError("quorum.unknown", f"no request {body.request_id.hex()}")
        items = [stored]
    else:
        # The newest open requests, as many as fit one answer (a group.create request names
        # every founder with its key hash: a large one is tens of kilobytes).
        items = []
        size = 0
        for stored in reversed([s for s in store.open_requests(session) if now <= s.expires_at]):
            size += len(stored.request) + 256
            if len(items) == MAX_REQUESTS or (items and size > LIST_BYTES):
                break
            items.append(stored)
        items.reverse()
    return [answer(cx, session, operator, body.command_id, items, now=now)]


def expire_tick(cx: Call, now: int) -> None:
    """Pending requests past their window end ``expired`` (one audit entry each)."""

    def work(session: Session) -> int:
        expired = store.expired_requests(session, now)
        for stored in expired:
            stored.state = RequestState.EXPIRED
            stored.detail = (
                f"expired at {stored.expires_at} with {len(stored.approvers)} approval(s)"
            )
            store.save_request(session, stored, now=now)
            audit.append(
                session,
                now=now,
                actor="service",
                action="request.expire",
                target=stored.request_id.hex(),
                outcome=Outcome.ACCEPTED,
                details={"op": stored.op, "approvals": len(stored.approvers)},
            )
        return len(expired)

    if cx.env.read(lambda s: bool(store.expired_requests(s, now))):
        count = cx.env.tx(work)
        if count:
            log.info("%d request(s) expired", count)
