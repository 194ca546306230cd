"""Replacing a device whose TPM failed (RMA): ``device.replace`` requests (docs/operations.md,
"RMA: replacing a device"; docs/authorization.md).

A device's keys never leave its TPM, so a device whose TPM failed cannot be restored: the
replacement board enrolls as a new device (its own TPM, its own DevID), and operators approve a
``device.replace`` Request naming the old identity and the new one (each by device id and DevID
key hash) and, in its ``subject``, the groups the old one is in. Devices verify it like a
revocation (fleet-wide, the quorum policy's k for ``device.replace``): a commit under it may
remove only the old identity and add only the new one, and only to a group the subject names
(``agent.protocol.membership``). The service alone can move no membership: it holds no operator
key, and without that Authorization members refuse the commits.

Executed (``plan``), in one operation under that Authorization: the old identity is revoked as
``keyfleet revoke`` revokes (registry state, certificates on the CRL, an entry of the
revocation feed naming only the old identity, one removal job per group), its key ledger records
its keys destroyed (its TPM is gone), and the new identity is added to each group after the old
one's removal there (jobs run in order per group: a joiner's Welcome then holds no revoked leaf).
Audited: ``device.replace`` (actor ``quorum``: the request, the new identity, the groups, the
keys recorded destroyed) beside the revocation's entries and the operation's ``op.replace``.

Refusals, with nothing changed: ``replace.same``, ``replace.old.unknown``, ``replace.old.state``
(revoked or destroyed already), ``replace.new.unknown``, ``replace.new.state`` (not enrolled and
trusted: quarantined, revoked, destroyed), ``replace.new.member`` (the new identity is in, or
being added to or removed from, a group the old one is in), ``replace.group.alone`` (the old
device is the only member of a group: nobody could commit the new one's add), and at execution
``replace.groups`` (the old device's groups changed since the proposal: propose again).
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from agent.protocol import authz
from agent.protocol.errors import ProtocolError
from agent.protocol.wire.messages.service import CommitAction
from provisioning import audit
from provisioning.registry import DeviceRecord, DeviceState, Outcome, Registry
from provisioning.service import operators
from provisioning.service.context import Call
from provisioning.service.model import Job

# What an old identity may be when it is replaced: anything but gone already.
REPLACEABLE = frozenset({DeviceState.REGISTERED, DeviceState.ACTIVE, DeviceState.QUARANTINED})
# What its replacement must be: enrolled and trusted, as for joining any group.
ELIGIBLE = frozenset({DeviceState.REGISTERED, DeviceState.ACTIVE})


def _device(registry: Registry, device_id: str, which: str) -> DeviceRecord:
    try:
        return registry.device(device_id)
    except ProtocolError:
        raise ProtocolError(
            f"replace.{which}.unknown", f"no enrolled device {device_id!r}"
        ) from None


def check(session: Session, old: str, new: str) -> tuple[str, ...]:
    """Raises unless ``new`` can take ``old``'s place now; returns the groups it would join
    (those where ``old`` holds a leaf), sorted."""
    if old == new:
        raise ProtocolError("replace.same", f"{old!r} cannot replace itself")
    registry = Registry(session)
    old_device = _device(registry, old, "old")
    if old_device.state not in REPLACEABLE:
        raise ProtocolError(
            "replace.old.state", f"{old!r} is {old_device.state.value} already: nothing to replace"
        )
    new_device = _device(registry, new, "new")
    if new_device.state not in ELIGIBLE:
        raise ProtocolError(
            "replace.new.state",
            f"{new!r} is {new_device.state.value}: only an enrolled, trusted device replaces one",
        )
    groups = sorted(m.group_id for m in registry.groups_of(old) if m.leaf_index is not None)
    for group_id in groups:
        members = registry.members(group_id)
        if any(m.device_id == new for m in members):
            raise ProtocolError(
                "replace.new.member", f"{new!r} is already in group {group_id!r} with {old!r}"
            )
        if all(m.device_id == old for m in members if m.leaf_index is not None):
            raise ProtocolError(
                "replace.group.alone",
                f"{old!r} is the only member of {group_id!r}: nobody could add {new!r}",
            )
    return tuple(groups)


def check_groups(session: Session, request: authz.Request) -> None:
    """At execution: the old device is still in exactly the groups the operators approved."""
    old, new = (m.device_id for m in request.members)
    now_in = check(session, old, new)
    approved = authz.replaced_groups(request.subject)
    if now_in != approved:
        raise ProtocolError(
            "replace.groups",
            f"{old!r} is in {list(now_in)} now, the request names {list(approved)}: propose again",
        )


def plan(
    cx: Call,
    session: Session,
    request: authz.Request,
    *,
    reason: str,
    operator: str,
    now: int,
) -> tuple[list[Job], set[str]]:
    """Revoke the old identity (its removal jobs), record its keys destroyed, then one add job
    of the new identity per group, queued after that group's removal."""
    old, new = (m.device_id for m in request.members)
    jobs, groups = operators.plan_revoke(
        cx, session, old, reason=reason, operator=operator, now=now
    )
    registry = Registry(session)
    destroyed = registry.destroy_keys(old, now=now)
    moved = authz.replaced_groups(request.subject)
    for group_id in moved:
        registry.request_add(group_id, new, now=now)
        jobs.append(Job(CommitAction.ADD, group_id, new, cx.env.new_id()))
        groups.add(group_id)
    audit.append(
        session,
        now=now,
        actor="quorum",
        action=authz.OP_DEVICE_REPLACE,
        target=old,
        outcome=Outcome.ACCEPTED,
        details={
            "request_id": request.id.hex(),
            "new": new,
            "groups": ",".join(moved),
            "keys_destroyed": ",".join(destroyed),
        },
    )
    return jobs, groups
