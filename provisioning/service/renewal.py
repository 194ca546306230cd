"""Device certificate renewal, proved by the TPM (docs/attestation.md, "Certificate renewal").

A device asks (``renew.request``) when its certificates reach their renewal point. The service
answers with a fresh nonce (``renew.challenge``), an open runtime-attestation challenge
(``attestation.issue_challenge``: the same store, TTL and per-device limit), so freshness comes
from the service. The device's ``renew.answer``, signed by its current DevID key, carries a
quote and a TPM2_Certify of the DevID key by its AK, both over that nonce, and its TLS key's
signature over it. The service takes the answer only if:

- the nonce is an open challenge of this device (``renew.nonce``: unknown, replayed, expired);
- the quote verifies under the AK enrolled for this device and its event log replays to it
  (``renew.quote``), and the measured firmware is an approved release (``renew.policy``): the
  attestation verifier ``provisioning.attestation.verify_evidence``, not a second one;
- the DevID key is certified by that same AK over the nonce (``renew.certify``: e.g. another
  device's certify);
- the certified DevID key and the TLS key are the keys of the device's current certificates
  (``renew.key``): a renewal re-certifies the same TPM key and the same TLS key, never new ones.

Then new certificates are issued by the device CA (after a device CA rollover the new one,
``trustroll``) for ``certificate_validity``, the DevID
certificate is stored in the registry (``keyfleet keys list`` and the inventory see the new
not-after), both serials are recorded for revocation, the renewal is audited and the
certificates are sent (``renew.issued``). A refused answer changes nothing (the transaction rolls
back): it is counted, logged and audited by the device-report path (``verify.refuse``). A revoked
or destroyed device never gets this far (``ds.device.revoked``), nor a quarantined one
(``ds.device.quarantined``).

After expiry (``[renewal] expired = "allow"``): the same two steps over HTTPS
(``provisioning.service.expired``) call these handlers; ``judge_expired`` is the policy
(``renew.expired``: refused, or expired more than ``max_expired_seconds`` ago), and an answer
taken for expired certificates checks the stored credentials as of their expiry and is audited
``renew.expired`` instead of ``renew.issued``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy.orm import Session

from agent.protocol.attest import Attestation, public_key_from_area, tpm_name
from agent.protocol.errors import ProtocolError
from agent.protocol.renewal import verify_key_proofs
from agent.protocol.topics import device_cmd_topic
from agent.protocol.wire.messages.renewal import (
    RenewAnswer,
    RenewChallenge,
    RenewIssued,
    RenewRequest,
)
from provisioning import audit, pki, revocation
from provisioning.attestation import AttestationRefused, Challenge, Evidence, verify_evidence
from provisioning.registry import DeviceState, Outcome, Registry
from provisioning.service import attestation, releases, store
from provisioning.service.context import Call
from provisioning.service.effects import Effects, Log, Send

log = logging.getLogger("keyfleet.service")

RENEWABLE = frozenset({DeviceState.REGISTERED, DeviceState.ACTIVE})


@dataclass(frozen=True)
class Expired:
    """A renewal of certificates that expired at ``not_after``, ``seconds`` before now."""

    not_after: int
    seconds: int


def judge_expired(*, not_after: int, now: int, allow: bool, max_expired: int) -> Expired | None:
    """The ``[renewal]`` policy for certificates valid until ``not_after``: None while they are
    valid (an ordinary renewal); an ``Expired`` when they expired and the policy allows renewal
    (``allow``) and at most ``max_expired`` seconds have passed since. Raises ``renew.expired``
    otherwise (the policy refuses, or too late: the device is enrolled again)."""
    if now <= not_after:
        return None
    seconds = now - not_after
    if not allow:
        raise ProtocolError(
            "renew.expired",
            f'the certificates expired {seconds} s ago and [renewal] expired = "refuse"',
        )
    if seconds > max_expired:
        raise ProtocolError(
            "renew.expired",
            f"the certificates expired {seconds} s ago, more than [renewal] "
            f"max_expired_seconds = {max_expired}: enroll the device again",
        )
    return Expired(not_after, seconds)


def _device_ca(cx: Call) -> pki.CertificateAuthority:
    if cx.env.attestation is None or cx.env.revocation is None:
        raise ProtocolError(
            "renew.unsupported",
            "certificate renewal needs [attestation] (the release policy) and the device CA key",
        )
    return cx.env.revocation.device_ca


def _check_renewable(registry: Registry, device_id: str) -> None:
    device = registry.device(device_id)
    if device.state not in RENEWABLE:
        raise ProtocolError(
            "renew.device", f"device {device_id!r} is {device.state.value}: not renewed"
        )
    if device.ak_public is None:
        raise ProtocolError("renew.device", f"device {device_id!r} has no AK registered")


def on_renew_request(
    cx: Call, session: Session, sender: str, body: RenewRequest, now: int
) -> Effects:
    """Answer with a fresh nonce (an open attestation challenge of ``sender``)."""
    _device_ca(cx)
    _check_renewable(Registry(session), sender)
    challenge = attestation.issue_challenge(cx, session, sender, now)
    return [
        Log(
            logging.INFO,
            "renewal of %s asked (certificates valid until %d): challenge sent",
            (sender, body.not_after),
        ),
        Send(device_cmd_topic(sender), RenewChallenge(challenge.nonce, challenge.pcrs), sender),
    ]


def _check_quote(
    cx: Call, session: Session, body: RenewAnswer, ak_public: bytes, challenge: Challenge
) -> None:
    evidence = Evidence(
        nonce=body.nonce,
        quote=Attestation(attest=body.quote, signature=body.signature),
        pcrs=body.pcrs,
        event_log=body.event_log,
    )
    try:
        verify_evidence(
            evidence,
            ak_public=public_key_from_area(ak_public),
            challenge=challenge,
            policy=releases.golden(cx, session),
        )
    except AttestationRefused as refused:
        check = "renew.policy" if refused.check.startswith("attest.policy") else "renew.quote"
        raise ProtocolError(check, f"[{refused.check}] {refused.reason}") from None


def _current_tls(cx: Call, session: Session, device_id: str, der: bytes) -> x509.Certificate:
    """The TLS certificate the device presented, if the device CA issued it to this device as a
    TLS certificate (its serial is recorded so) and it is not revoked. Raises ``renew.key``."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        raise ProtocolError("renew.key", "the TLS certificate does not decode") from None
    serial = revocation.serial_hex(cert)
    row = next((r for r in revocation.device_certs(session, device_id) if r.serial == serial), None)
    if row is None or row.kind != revocation.KIND_TLS or row.revoked_at is not None:
        raise ProtocolError(
            "renew.key", "the TLS certificate is not a current TLS certificate of this device"
        )
    # a device CA the trust bundle accepts: after a device CA rollover, the old one's too
    for ca in cx.env.devices.cas:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return cert
    raise ProtocolError("renew.key", "the TLS certificate is not a device CA's")


def on_renew_answer(
    cx: Call,
    session: Session,
    sender: str,
    body: RenewAnswer,
    now: int,
    *,
    expired: Expired | None = None,
) -> Effects:
    """Check the answer (module docstring), then issue, store, audit and send the new
    certificates. Every check runs before anything is written. ``expired``: the device's
    certificates have expired and the policy allows this renewal (``judge_expired``, over
    HTTPS: ``provisioning.service.expired``); its stored credentials are then checked as of
    their expiry, everything else as for any renewal, and the audit entry is
    ``renew.expired``."""
    device_ca = _device_ca(cx)
    registry = Registry(session)
    _check_renewable(registry, sender)
    device = registry.device(sender)
    assert device.ak_public is not None  # _check_renewable
    # the stored AK must be the one the stored DevID certificate names (``cred.stored``)
    checked_at = now if expired is None else expired.not_after
    cx.env.devices.check(device, checked_at, with_ak=True)
    try:
        challenge = store.consume_challenge(session, sender, body.nonce, now=now)
    except ProtocolError as exc:
        raise ProtocolError("renew.nonce", f"[{exc.check}] {exc.reason}") from None
    _check_quote(cx, session, body, device.ak_public, challenge)
    current_devid = pki.cert_from_pem(device.devid_cert_pem.encode())
    tls_cert = _current_tls(cx, session, sender, body.tls_cert)
    proven = verify_key_proofs(
        device_id=sender,
        nonce=body.nonce,
        ak_public=public_key_from_area(device.ak_public),
        devid_public=body.devid_public,
        devid_certify=Attestation(body.devid_certify, body.devid_certify_signature),
        current_devid=current_devid,
        tls_cert=tls_cert,
        tls_proof=body.tls_proof,
    )
    serial = pki.hardware_serial_of(current_devid)
    if serial is None:
        raise ProtocolError("renew.key", "the DevID certificate on record names no serial")
    when = datetime.fromtimestamp(now, UTC)
    valid_for = timedelta(seconds=cx.env.settings.certificate_validity)
    new_devid = pki.issue_devid_cert(
        device_ca,
        proven.devid,
        device_id=sender,
        hardware_serial=serial,
        now=when,
        valid_for=valid_for,
        ak_name=tpm_name(device.ak_public),
        rng=cx.env.rng,
    )
    new_tls = pki.issue_client_cert(
        device_ca,
        proven.tls,
        identity=sender,
        role="device",
        now=when,
        valid_for=valid_for,
        rng=cx.env.rng,
    )
    registry.renew_devid_cert(sender, pki.cert_to_pem(new_devid).decode(), now=now)
    revocation.record_issued(
        session,
        sender,
        [(revocation.KIND_DEVID, new_devid), (revocation.KIND_TLS, new_tls)],
        now=now,
    )
    not_after = int(new_devid.not_valid_after_utc.timestamp())
    details: dict[str, str | int | None] = {
        "devid_cert": revocation.serial_hex(new_devid),
        "tls_cert": revocation.serial_hex(new_tls),
        "replaces_devid": revocation.serial_hex(current_devid),
        "replaces_tls": revocation.serial_hex(tls_cert),
        "not_after": not_after,
    }
    if expired is not None:
        details["expired_at"] = expired.not_after
        details["expired_seconds"] = expired.seconds
    audit.append(
        session,
        now=now,
        actor=f"device:{sender}",
        action="renew.issued" if expired is None else "renew.expired",
        target=sender,
        outcome=Outcome.ACCEPTED,
        details=details,
    )
    return [
        Log(
            logging.INFO,
            "certificates of %s renewed until %d%s",
            (
                sender,
                not_after,
                "" if expired is None else f" ({expired.seconds} s after they expired)",
            ),
        ),
        Send(
            device_cmd_topic(sender),
            RenewIssued(
                body.nonce,
                new_devid.public_bytes(Encoding.DER),
                new_tls.public_bytes(Encoding.DER),
            ),
            sender,
        ),
    ]
