"""Verification of every message the service takes, and refusals.

A message is opened (``open_envelope``: COSE signature by a key the resolver knows, recipient,
age, and a replay pre-check against the sender's ``ReplayGuard`` in the database), then handled
in one transaction with the sender's replay row locked (``accept_and``): the replay check runs
again under the lock and the message is recorded as seen only if its effects commit. Device
reports are signed by the device's DevID key; a revoked or destroyed device is refused
(``ds.device.revoked``). Every refusal is counted, logged (no secrets) and audited, except
benign redeliveries (``refuse``). A device report that passed is a ``VerifiedReport``: the only
type the device flows take.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.orm import Session

from agent.protocol.errors import ProtocolError
from agent.protocol.topics import SERVICE_ID
from agent.protocol.wire.envelope import KeyResolver, Signer, VerifiedMessage, open_message
from agent.protocol.wire.messages.base import Body
from agent.protocol.wire.messages.group import CommitMessage
from agent.protocol.wire.rejections import is_benign
from provisioning import audit
from provisioning.registry import DeviceRecord, DeviceState, Outcome, Registry
from provisioning.service import store
from provisioning.service.context import Call
from provisioning.service.effects import Effects

log = logging.getLogger("keyfleet.service")

REFUSED_DEVICE_STATES: Final = frozenset({DeviceState.REVOKED, DeviceState.DESTROYED})


@dataclass(frozen=True)
class VerifiedReport:
    """A device report that passed ``open_device``: signed by the registered DevID key of the
    device its topic names (neither revoked nor destroyed), fresh enough, and not a replay as
    of the pre-check (the check that counts runs again under the sender's row lock, in the
    transaction of its effects). Only this type reaches the device flows."""

    message: VerifiedMessage

    @property
    def sender(self) -> str:
        return self.message.sender

    @property
    def body(self) -> Body:
        return self.message.body

    @property
    def type(self) -> str:
        return self.message.type


def devid_public_key(cx: Call, device: DeviceRecord, now: int) -> ec.EllipticCurvePublicKey:
    """``device``'s DevID key from its stored certificate, checked at use against the device CA
    (and its stored AK against the certificate): ``cred.stored`` otherwise
    (``credentials.StoredDevices``)."""
    return cx.env.devices.check(device, now).devid_key


def refuse(
    cx: Call,
    err: ProtocolError,
    *,
    actor: str,
    action: str,
    target: str,
    now: int,
    details: dict[str, str | int | None] | None = None,
    audit_benign: bool = False,
) -> None:
    cx.env.rejections.record(err)
    cx.env.metrics.rejections.inc(err.check)
    if action == CommitMessage.TYPE:
        cx.env.metrics.commits.inc("refused")
    if is_benign(err) and not audit_benign:
        log.debug("dropped a redelivery from %s (%s)", actor, err.check)
        return
    log.warning("refused %s from %s on %s: [%s] %s", action, actor, target, err.check, err.reason)
    audit.record(
        cx.env.sessions,
        now=now,
        actor=actor,
        action=action,
        target=target,
        outcome=Outcome.REFUSED,
        reason=f"[{err.check}] {err.reason}",
        details=details or {},
    )


def open_envelope(
    cx: Call,
    payload: bytes,
    resolver_for: Callable[[Session], KeyResolver],
    *,
    now: int,
    max_age: int,
    session: Session | None = None,
    replay_window: int = store.REPLAY_WINDOW,
) -> VerifiedMessage:
    def work(session: Session) -> VerifiedMessage:
        message = open_message(
            payload,
            resolver_for(session),
            now=now,
            recipients=(SERVICE_ID,),
            max_age=max_age,
        )
        store.load_guard(session, message.sender, window=replay_window, memo=cx.guards).check(
            message
        )
        return message

    return cx.env.read(work) if session is None else work(session)


def accept_and(
    cx: Call,
    message: VerifiedMessage,
    now: int,
    handler: Callable[[Session], Effects],
    *,
    device: bool = False,
    replay_window: int = store.REPLAY_WINDOW,
) -> Effects:
    """Run ``handler`` in one transaction with the sender's replay guard: the message is
    recorded as seen only if its effects commit."""

    def work(session: Session) -> Effects:
        # Locked, then read: the check in open_envelope ran on a window another instance may have
        # moved since; accept() checks again under the lock.
        store.lock_guard(session, message.sender)
        guard = store.load_guard(session, message.sender, window=replay_window)
        guard.accept(message)
        group_epoch = message.body.group_epoch()
        if group_epoch is not None:
            # The registry judges epochs (commit log, acks), with the group's real state;
            # the guard's per-sender epoch tracking would refuse a catch-up ack that jumps.
            guard.forget_group(group_epoch[0])
        effects = handler(session)
        store.save_guard(session, message.sender, guard, now=now)
        if device:
            # "Heard from" must be shared: another instance picks committers and the
            # attestation schedule by it. Same transaction as the replay state: no extra
            # commit per report.
            store.mark_heard(session, (message.sender,), now=now)
        return effects

    return cx.env.tx(work)


def device_resolver(cx: Call, device_id: str, now: int) -> Callable[[Session], KeyResolver]:
    def make(session: Session) -> KeyResolver:
        def resolve(kid: bytes) -> Signer:
            # the columns the batch's read session read for every sender (``load_senders``),
            # else the device's row
            loaded, columns = store.loaded_sender(session, device_id)
            if not loaded:
                try:
                    device = Registry(session).device(device_id)
                except ProtocolError:
                    raise LookupError(device_id) from None
                columns = (device.state, device.devid_cert_pem)
            if columns is None:
                raise LookupError(device_id)
            state, cert_pem = columns
            if state in REFUSED_DEVICE_STATES:
                raise ProtocolError("ds.device.revoked", f"device {device_id!r} is {state.value}")
            checked = cx.env.devices.check_stored(device_id, cert_pem, now)
            if checked.kid != kid:
                raise LookupError(device_id)
            return Signer(device_id, checked.devid_key, checked.kid)

        return resolve

    return make


def open_device(
    cx: Call, device_id: str, payload: bytes, now: int, session: Session | None = None
) -> VerifiedReport | None:
    """Verify a device report (signature, key, age, replay pre-check); None: refused."""
    try:
        message = open_envelope(
            cx,
            payload,
            device_resolver(cx, device_id, now),
            now=now,
            max_age=cx.env.settings.device_max_age,
            session=session,
        )
    except ProtocolError as err:
        actor = f"device:{device_id}"
        refuse(cx, err, actor=actor, action="device.message", target=device_id, now=now)
        return None
    cx.env.last_heard[device_id] = now
    return VerifiedReport(message)
