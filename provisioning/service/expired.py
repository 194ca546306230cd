"""Certificate renewal over HTTPS, for a device whose certificates expired (docs/attestation.md,
"Certificate renewal", after expiry).

The broker refuses an expired client certificate at the TLS handshake, so such a device cannot
reach the service over MQTT. With ``[renewal] expired = "allow"`` ``keyfleet serve`` runs a small
HTTPS listener (``provisioning.renewal_http``) that carries the same two steps as the MQTT flow,
with the same envelopes: ``start`` takes the device's ``renew.request`` and gives the service's
``renew.challenge``, ``finish`` takes its ``renew.answer`` and gives ``renew.issued``. Each is
what ``provisioning.service.renewal`` does for MQTT (the same nonce book, the same checks, the
same issuing), with one difference: the device is identified by its stored DevID certificate
*as of its expiry* (its path to the device CA, its AK; ``credentials.StoredDevices``), and the
policy (``renewal.judge_expired``) decides whether an expired certificate may still renew:
``renew.expired`` when it refuses or the certificate expired more than
``[renewal] max_expired_seconds`` ago. What is proved is the TPM's: a quote and a TPM2_Certify of
the DevID key by the AK enrolled for this device over the service's nonce. Nothing but the same
keys is re-certified.

Refusals are counted and logged like every other; once the envelope is authenticated (signed by
the device's DevID key) they are audited too, as ``renew.expired`` for an expired device (an
accepted one is audited ``renew.expired`` by ``renewal.on_renew_answer``). A request whose
envelope does not verify is not audited: anyone can reach this listener, and must not be able
to grow the audit log. A revoked or destroyed device is refused (``ds.device.revoked``), a
quarantined one too (``ds.device.quarantined``), as over MQTT.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from sqlalchemy.orm import Session

from agent.protocol.errors import ProtocolError
from agent.protocol.topics import device_cmd_topic
from agent.protocol.wire.cose import key_id
from agent.protocol.wire.envelope import KeyResolver, Signer
from agent.protocol.wire.messages.base import Body
from agent.protocol.wire.messages.renewal import RenewAnswer, RenewRequest
from provisioning import pki
from provisioning.registry import DeviceState, Registry
from provisioning.service import execute, intake, renewal, verify
from provisioning.service.context import Call
from provisioning.service.effects import Effects

log = logging.getLogger("keyfleet.service")

STEPS: Final[dict[str, type[Body]]] = {"start": RenewRequest, "finish": RenewAnswer}


def _resolver(
    cx: Call, device_id: str, now: int, found: list[int]
) -> Callable[[Session], KeyResolver]:
    """``verify.device_resolver``, except that the stored DevID certificate is checked as of
    its not-after when it has expired by ``now`` (``found`` gets that not-after): identification
    only; whether an expired certificate may renew is the policy's decision, made once the
    envelope verified."""

    def make(session: Session) -> KeyResolver:
        def resolve(kid: bytes) -> Signer:
            try:
                device = Registry(session).device(device_id)
            except ProtocolError:
                raise LookupError(device_id) from None
            if device.state in verify.REFUSED_DEVICE_STATES:
                raise ProtocolError(
                    "ds.device.revoked", f"device {device_id!r} is {device.state.value}"
                )
            try:
                cert = pki.cert_from_pem(device.devid_cert_pem.encode())
            except ProtocolError as err:
                raise ProtocolError(
                    "cred.stored",
                    f"the stored DevID certificate of {device_id!r}: [{err.check}] {err.reason}",
                ) from None
            not_after = int(cert.not_valid_after_utc.timestamp())
            at = now
            if now > not_after:
                found.append(not_after)
                at = not_after
            public_key = cx.env.devices.check(device, at).devid_key
            if key_id(public_key) != kid:
                raise LookupError(device_id)
            return Signer(device_id, public_key, kid)

        return resolve

    return make


def renew(cx: Call, step: str, device_id: str, payload: bytes, now: int) -> bytes:
    """One step (``start``: a ``renew.request`` envelope; ``finish``: a ``renew.answer``) for
    ``device_id``; returns the service's signed answer (``renew.challenge``, ``renew.issued``).
    Raises ``ProtocolError`` (counted, logged and, once authenticated, audited)."""
    expected = STEPS[step]
    actor = f"device:{device_id}"
    found: list[int] = []
    try:
        message = verify.open_envelope(
            cx,
            payload,
            _resolver(cx, device_id, now, found),
            now=now,
            max_age=cx.env.settings.device_max_age,
        )
    except ProtocolError as err:
        # not authenticated (or a replay of an envelope already taken): counted and logged,
        # not audited (see the module docstring)
        cx.env.rejections.record(err)
        cx.env.metrics.rejections.inc(err.check)
        log.warning(
            "refused a renewal %s over HTTPS for %s: [%s] %s", step, actor, err.check, err.reason
        )
        raise
    body = message.body
    expired: renewal.Expired | None = None
    try:
        if found:
            expired = renewal.judge_expired(
                not_after=found[0],
                now=now,
                allow=cx.env.settings.renew_expired,
                max_expired=cx.env.settings.max_expired,
            )
        if not isinstance(body, expected):
            raise ProtocolError(
                "renew.https.message",
                f"the renewal {step} takes {expected.TYPE}, not {message.type}",
            )

        def work(session: Session) -> Effects:
            if Registry(session).device(device_id).state is DeviceState.QUARANTINED:
                raise ProtocolError(
                    "ds.device.quarantined", f"device {device_id!r} is quarantined: not renewed"
                )
            if isinstance(body, RenewRequest):
                return renewal.on_renew_request(cx, session, device_id, body, now)
            assert isinstance(body, RenewAnswer)
            return renewal.on_renew_answer(cx, session, device_id, body, now, expired=expired)

        effects = verify.accept_and(cx, message, now, work, device=True)
    except ProtocolError as err:
        details: dict[str, str | int | None] = {"type": message.type, "transport": "https"}
        if found:
            details["expired_at"] = found[0]
            details["expired_seconds"] = now - found[0]
        verify.refuse(
            cx,
            err,
            actor=actor,
            action="renew.expired" if found else message.type,
            target=device_id,
            now=now,
            details=details,
            audit_benign=bool(found),
        )
        raise
    cx.env.metrics.reports.inc(message.type)
    execute.run(cx, effects)
    topic = device_cmd_topic(device_id)
    answers = [p.payload for p in intake.sign(cx) if p.topic == topic]
    if len(answers) != 1:
        raise ProtocolError("renew.https.message", "the renewal step gave no answer")
    if expired is not None and isinstance(body, RenewRequest):
        log.info(
            "renewal of %s asked over HTTPS, %d s after its certificates expired",
            device_id,
            expired.seconds,
        )
    return answers[0]
