"""Operators managed under the quorum policy: ``operator.add``, ``operator.remove`` and
``operator.role`` requests (docs/operations.md, "Operator management"; docs/authorization.md).

Each is a service-side request like ``release.approve``: its Request names no group and no
device; its ``subject`` binds exactly what the admins approve:

- ``operator.add``: the operator id and the SHA-256 of its certificate's DER. The certificate
  travels with the proposal (``op.propose`` ``cert``) and waits with the pending request (its PEM
  in the request row's ``reason``); at execution its hash must be the one approved.
- ``operator.remove``: the operator id and the fingerprint of the certificate it holds.
- ``operator.role``: the operator id, the fingerprint and the new role, which must lie within the
  certificate's OU (``credentials.certificate_role``): a quorum may narrow a role or restore it up
  to the certificate's, never beyond it.

Removed operators. A removal keeps the operator's registry row and stored certificate (history:
``keyfleet operator list`` shows it ``removed``, with who approved). What makes it removed is
the executed removal's Authorization, kept in its request row and verified whenever the state is
read (``removed``): a database writer who deletes or edits nothing else cannot re-activate the
operator by editing its row, and a forged removal (approvals that do not verify) removes nobody
and is reported (``operator.stored``). From the removal on, the operator's commands are refused
(``operator.removed``, checked on every command with its certificate's fingerprint), its
approvals are withdrawn from pending requests (a request that falls below its quorum stays
pending) and its certificate belongs on the operator CA's CRL (``keyfleet pki crl operator
--config [--ca-key pkcs11:…]``, signed with the operator CA key where custody keeps it, lists the
removed certificates' serials; the broker takes it through ``[revocation] broker_crls``).

Audit: ``operator.add``, ``operator.remove``, ``operator.role`` (actor ``quorum``, details the
approvers and the request id) and ``request.withdraw`` per pending request that lost an approval.
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.orm import Session

from agent.protocol import authz
from agent.protocol.errors import ProtocolError
from agent.protocol.operatorsubject import OperatorSubject
from agent.protocol.wire import cbor as codec
from agent.protocol.wire.cose import key_id
from agent.protocol.wire.messages.operator import Propose
from agent.protocol.wire.messages.result import RequestState
from provisioning import audit, pki
from provisioning.registry import Outcome, Registry, Role, cert_fingerprint
from provisioning.service import credentials, store
from provisioning.service.context import Call, Env
from provisioning.service.effects import Effects, Log
from provisioning.service.store import quorum
from provisioning.service.store.quorum import StoredRequest

log = logging.getLogger("keyfleet.service")

REMOVED = "operator.removed"
STORED = "operator.stored"
_T = TypeVar("_T")


def subject_matches(subject: bytes, asked: Propose) -> bool:
    """The subject the service bound is the operator change ``asked`` for."""
    try:
        found = OperatorSubject.decode(subject)
    except ProtocolError:
        return False
    if found.op != asked.op or found.operator != asked.operator or found.role != asked.role:
        return False
    return asked.cert is None or found.cert_sha256 == hashlib.sha256(asked.cert).digest()


def subject_json(subject: bytes) -> dict[str, object]:
    found = OperatorSubject.decode(subject)
    return {"id": found.operator, "cert_sha256": found.cert_sha256.hex(), "role": found.role}


def describe_subject(subject: bytes) -> str:
    found = OperatorSubject.decode(subject)
    role = "" if found.role is None else f", role {found.role}"
    return f"  operator: {found.operator} (certificate SHA-256 {found.cert_sha256.hex()}{role})"


# -- the removed state --------------------------------------------------------------------------


@dataclass(frozen=True)
class Removal:
    """One verified removal: the operator, the fingerprint of the certificate removed, the
    certificate itself when the request row kept it (its hash checked against the approved
    subject) and when it was approved."""

    operator: str
    cert_fingerprint: str
    cert: x509.Certificate | None
    at: int


class _VerifiedMemo:
    """What one verifier (one set of operator anchors) already verified, keyed by SHA-256 of
    exactly the bytes verified: the policy chain and each removal's Authorization under it. The
    verdicts depend on nothing else (``now`` is None), so a row a database writer edits is new
    bytes and is verified afresh; the state is read on every operator command, and without
    this every command re-verified every removal's signatures."""

    LIMIT = 4096

    def __init__(self) -> None:
        self.policies: dict[bytes, list[authz.QuorumPolicy]] = {}
        self.removals: dict[bytes, Removal | None] = {}

    def remember(self, table: dict[bytes, _T], key: bytes, value: _T) -> _T:
        if len(table) >= self.LIMIT:
            table.clear()
        table[key] = value
        return value


_memos: weakref.WeakKeyDictionary[authz.AuthzVerifier, _VerifiedMemo] = weakref.WeakKeyDictionary()


def verified_removals(
    session: Session, verifier: authz.AuthzVerifier, min_approvals: int
) -> list[Removal]:
    """Every ``operator.remove`` request whose kept approvals verify as a quorum under a policy
    that was in force (the initial one from ``min_approvals``, then each adopted one, each
    verified under the one before). A row whose approvals do not verify removes nobody (logged
    when it claims to be executed: ``operator.stored``). Verdicts are remembered per verifier
    and exact bytes (``_VerifiedMemo``)."""
    rows = [s for s in quorum.requests_of_op(session, authz.OP_OPERATOR_REMOVE) if s.approvals]
    if not rows:
        return []
    memo = _memos.setdefault(verifier, _VerifiedMemo())
    adopted = quorum.adopted_policies(session)
    chain = hashlib.sha256(
        codec.encode([min_approvals, [stored_policy for _serial, stored_policy in adopted]])
    ).digest()
    policies = memo.policies.get(chain)
    if policies is None:
        policy = authz.QuorumPolicy.initial(min_approvals)
        policies = [policy]
        for _serial, stored_policy in adopted:
            policy = verifier.verify_policy_update(stored_policy, current=policy, now=None)
            policies.append(policy)
        memo.remember(memo.policies, chain, policies)
    found = []
    for stored in rows:
        key = hashlib.sha256(
            codec.encode(
                [
                    chain,
                    stored.request,
                    list(stored.approvals),
                    stored.reason or "",
                    stored.created_at,
                ]
            )
        ).digest()
        if key in memo.removals:
            removal = memo.removals[key]
        else:
            removal = memo.remember(memo.removals, key, _removal(verifier, stored, policies))
        if removal is not None:
            found.append(removal)
    return found


def _removal(
    verifier: authz.AuthzVerifier, stored: StoredRequest, policies: Iterable[authz.QuorumPolicy]
) -> Removal | None:
    verified = _verify_removal(verifier, stored, policies)
    if verified is None:
        return None
    assert verified.request.subject is not None
    subject = OperatorSubject.decode(verified.request.subject)
    fingerprint = subject.cert_sha256.hex()
    cert = None
    if stored.reason:
        kept = pki.cert_from_pem(stored.reason.encode())
        cert = kept if cert_fingerprint(kept) == fingerprint else None
    return Removal(subject.operator, fingerprint, cert, stored.created_at)


def removals(env: Env, session: Session) -> dict[str, str]:
    """Removed certificate fingerprint -> operator id (``verified_removals``)."""
    found = verified_removals(session, env.approvals(), env.settings.min_approvals)
    return {r.cert_fingerprint: r.operator for r in found}


def _verify_removal(
    verifier: authz.AuthzVerifier,
    stored: StoredRequest,
    policies: Iterable[authz.QuorumPolicy],
) -> authz.VerifiedAuthorization | None:
    # Whatever the row's state says (a database writer could set it back to pending): the
    # approvals decide. A pending removal below its quorum simply does not verify yet.
    try:
        encoded = authz.Authorization(
            request=stored.request,
            approvals=tuple(authz.Approval.decode(a) for a in stored.approvals),
        ).encode()
    except ProtocolError:
        encoded = b""
    for policy in policies if encoded else ():
        try:
            return verifier.verify(
                encoded, policy=policy, now=None, op=authz.OP_OPERATOR_REMOVE, group=None
            )
        except ProtocolError:
            continue
    if stored.state is RequestState.EXECUTED:
        log.warning(
            "[%s] removal request %s: its approvals do not verify; it removes nobody",
            STORED,
            stored.request_id.hex(),
        )
    return None


def check_not_removed(env: Env, session: Session, operator: str, fingerprint: str) -> None:
    """Raises ``operator.removed`` if the certificate ``fingerprint`` of ``operator`` was
    removed by a quorum (whatever its registry row says now)."""
    if fingerprint in removals(env, session):
        raise ProtocolError(REMOVED, f"operator {operator!r} was removed by the quorum")


def active_admins(env: Env, session: Session) -> list[str]:
    removed = removals(env, session)
    admins = []
    for record in Registry(session).operators():
        if record.cert_fingerprint in removed:
            continue
        try:
            if credentials.effective_role(session, record.name) is Role.ADMIN:
                admins.append(record.name)
        except ProtocolError:
            continue
    return admins


# -- propose ------------------------------------------------------------------------------------


def load_certificate(der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        raise ProtocolError("operator.certificate", "the certificate does not decode") from None


def check_certificate(cx: Call, cert: x509.Certificate, operator: str, now: int) -> Role:
    """The certificate chains to the operator CA, names ``operator`` and carries a role (its
    OU), which it returns. Raises ``pki.*``, ``op.name``, ``op.role``."""
    cx.env.verify_operator_certificate(cert, now, current_only=True)
    name = pki.common_name(cert)
    if name != operator:
        raise ProtocolError("op.name", f"the certificate is {name!r}'s, not {operator!r}'s")
    if not name.startswith(authz.OPERATOR_PREFIX):
        prefix = authz.OPERATOR_PREFIX
        raise ProtocolError("op.name", f"operator ids start with {prefix!r}: {name!r}")
    return credentials.certificate_role(cert)


def _active_record(cx: Call, session: Session, operator: str) -> str:
    """The fingerprint of the certificate an active operator holds; ``registry.not_found`` or
    ``operator.removed``."""
    record = Registry(session).operator(operator)
    check_not_removed(cx.env, session, operator, record.cert_fingerprint)
    return record.cert_fingerprint


def request_subject(
    cx: Call, session: Session, body: Propose, now: int
) -> tuple[OperatorSubject, str]:
    """The subject of a new operator request and what the request row keeps beside it (the
    certificate's PEM for ``operator.add``); raises unless the change can be made now."""
    assert body.operator is not None
    operator = body.operator
    if body.op == authz.OP_OPERATOR_ADD:
        assert body.cert is not None
        cert = load_certificate(body.cert)
        check_certificate(cx, cert, operator, now)
        fingerprint = cert_fingerprint(cert)
        if fingerprint in removals(cx.env, session):
            raise ProtocolError(REMOVED, "this certificate was removed: issue a new one")
        registry = Registry(session)
        if any(o.name == operator for o in registry.operators()):
            holder = registry.operator(operator)
            if holder.cert_fingerprint not in removals(cx.env, session):
                raise ProtocolError(
                    "registry.operator.exists", f"operator {operator!r} is active already"
                )
        elif registry.operator_by_fingerprint(fingerprint) is not None:
            raise ProtocolError(
                "registry.operator.fingerprint_taken", "the certificate belongs to an operator"
            )
        subject = OperatorSubject(body.op, operator, bytes.fromhex(fingerprint))
        return subject, pki.cert_to_pem(cert).decode()
    fingerprint = _active_record(cx, session, operator)
    if body.op == authz.OP_OPERATOR_REMOVE:
        _refuse_last_admin(cx, session, operator)
        # the removed certificate, kept with the request: the operator CA's CRL names its serial
        row = store.operator_key(session, operator)
        kept = "" if row is None else row.cert_pem
        if kept and cert_fingerprint(pki.cert_from_pem(kept.encode())) != fingerprint:
            kept = ""
        return OperatorSubject(body.op, operator, bytes.fromhex(fingerprint)), kept
    assert body.op == authz.OP_OPERATOR_ROLE and body.role is not None
    _check_role(cx, session, operator, Role(body.role))
    return OperatorSubject(body.op, operator, bytes.fromhex(fingerprint), body.role), ""


def _check_role(cx: Call, session: Session, operator: str, role: Role) -> None:
    row = store.operator_key(session, operator)
    if row is None:
        raise ProtocolError("op.certificate", f"operator {operator!r} has no certificate")
    cert_role = credentials.certificate_role(pki.cert_from_pem(row.cert_pem.encode()))
    if not cert_role.allows(role):
        raise ProtocolError(
            "op.role", f"role {role.value} exceeds {operator}'s certificate role {cert_role.value}"
        )
    if role is not Role.ADMIN:
        _refuse_last_admin(cx, session, operator)


def _refuse_last_admin(cx: Call, session: Session, operator: str) -> None:
    # Without an admin nobody could manage operators again short of the local bootstrap.
    admins = active_admins(cx.env, session)
    if admins == [operator]:
        raise ProtocolError("registry.operator.last_admin", f"{operator} is the last active admin")


# -- execute ------------------------------------------------------------------------------------


def execute(
    cx: Call,
    session: Session,
    stored: StoredRequest,
    verified: authz.VerifiedAuthorization,
    *,
    now: int,
) -> Effects:
    """A quorum approved an operator request: check its subject against the registry again
    and make the change. Raises ``ProtocolError`` when it can no longer be made (the caller
    ends the request ``refused``)."""
    assert verified.request.subject is not None
    subject = OperatorSubject.decode(verified.request.subject)
    if subject.op != stored.op:
        raise ProtocolError("operator.subject", "the subject names another op")
    who = ",".join(stored.approvers)
    details: dict[str, str | int | None] = {
        "request_id": stored.request_id.hex(),
        "approvers": who,
        "cert_fingerprint": subject.cert_sha256.hex(),
    }
    registry = Registry(session)
    effects: Effects = []
    if subject.op == authz.OP_OPERATOR_ADD:
        cert = pki.cert_from_pem(stored.reason.encode())
        if cert_fingerprint(cert) != subject.cert_sha256.hex():
            raise ProtocolError(
                "operator.subject", "the kept certificate is not the one the quorum approved"
            )
        role = check_certificate(cx, cert, subject.operator, now)
        if subject.cert_sha256.hex() in removals(cx.env, session):
            raise ProtocolError(REMOVED, "this certificate was removed: issue a new one")
        public_key = cert.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)  # pki checked P-256
        if any(o.name == subject.operator for o in registry.operators()):
            holder = registry.operator(subject.operator)
            if holder.cert_fingerprint not in removals(cx.env, session):
                raise ProtocolError(
                    "registry.operator.exists", f"operator {subject.operator!r} is active"
                )
            registry.set_operator_certificate(subject.operator, subject.cert_sha256.hex(), now=now)
            registry.set_operator_role(subject.operator, role, now=now)
        else:
            registry.add_operator(
                subject.operator, cert_fingerprint=subject.cert_sha256.hex(), role=role, now=now
            )
        store.put_operator_key(
            session,
            name=subject.operator,
            kid=key_id(public_key),
            cert_pem=stored.reason,
            now=now,
        )
        details["role"] = role.value
    else:
        fingerprint = _active_record(cx, session, subject.operator)
        if fingerprint != subject.cert_sha256.hex():
            raise ProtocolError(
                "operator.subject", f"{subject.operator} holds another certificate than approved"
            )
        if subject.op == authz.OP_OPERATOR_ROLE:
            assert subject.role is not None
            _check_role(cx, session, subject.operator, Role(subject.role))
            registry.set_operator_role(subject.operator, Role(subject.role), now=now)
            details["role"] = subject.role
        else:
            _refuse_last_admin(cx, session, subject.operator)
            effects = withdraw_approvals(session, subject.operator, stored, now=now)
    audit.append(
        session,
        now=now,
        actor="quorum",
        action=subject.op,
        target=subject.operator,
        outcome=Outcome.ACCEPTED,
        details=details,
    )
    return [
        Log(logging.INFO, "%s of %s approved by %s", (subject.op, subject.operator, who)),
        *effects,
    ]


def withdraw_approvals(
    session: Session, operator: str, removal: StoredRequest, *, now: int
) -> Effects:
    """Take ``operator``'s approvals off every pending request (the removal itself excepted:
    it is executed). A request below its quorum again stays pending."""
    withdrawn = []
    for stored in quorum.open_requests(session):
        if stored.request_id == removal.request_id or operator not in stored.approvers:
            continue
        if stored.state is not RequestState.PENDING:
            continue
        at = stored.approvers.index(operator)
        del stored.approvers[at]
        del stored.approvals[at]
        quorum.save_request(session, stored, now=now)
        withdrawn.append(stored.request_id.hex())
        audit.append(
            session,
            now=now,
            actor="quorum",
            action="request.withdraw",
            target=stored.request_id.hex(),
            outcome=Outcome.ACCEPTED,
            details={"operator": operator, "approvals": len(stored.approvers)},
        )
    if not withdrawn:
        return []
    return [Log(logging.INFO, "%s's approvals withdrawn from %s", (operator, ",".join(withdrawn)))]
