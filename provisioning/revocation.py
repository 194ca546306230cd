"""Revocation that sticks: the device CA's CRL for the broker, the key ledger, and the quorum a
revoked TPM needs to enroll again (docs/operations.md, "Revocation"; docs/threat-model.md,
"Revoked devices").

- Every certificate the device CA issues to a device (DevID and MQTT TLS client certificate) is
  recorded by serial at enrollment (``record_issued``, table ``service_device_certs``).
- ``revoke_device`` (in the transaction that marks the device revoked) marks all of them
  revoked, moves every key of the device to ``compromised`` in the SP 800-57 ledger (a revoked
  device is suspected compromised: its keys are not merely deactivated) and issues the next CRL.
- ``issue_crl`` signs a CRL of every revoked serial with the device CA key (any
  ``ec.EllipticCurvePrivateKey``: a file key or a token key), numbered one above the newest
  stored one (CRL number extension; the number is the row's primary key, so two instances
  issuing at once conflict and one retries with the next number) and valid until
  ``this_update + crl_validity``. ``refresh_due`` says when the newest one is past half its
  validity: OpenSSL refuses every device certificate once the CRL in the broker has expired.
- ``write_broker_crl`` writes the newest CRL, followed by the CRLs of the broker's other client
  CAs (``[revocation] broker_crls``: with ``crlfile`` set, Mosquitto checks every client
  certificate against its issuer's CRL and refuses a client whose CA has none), atomically to
  ``[revocation] crl_file``. Mosquitto 2.0.11 reads the file only at start: the broker unit
  restarts on a change (systemd/keyfleet-broker-crl.path), within about a second.
- Re-enrolling the EK of a revoked device needs an approved ``device.reenroll`` request
  (``keyfleet propose reenroll DEVICE``): ``reenroll_approval`` finds it at ``start`` and
  ``consume_reenroll`` re-verifies its Authorization (operator CA, quorum policy in force,
  window) and marks it used in the transaction that registers the new identity: once. An
  identity counts as revoked while its state is ``revoked`` or its DevID certificate is on the
  CRL (``identity_revoked``: a revoked identity later marked destroyed still needs the quorum).
- ``keyfleet crl`` (``write_current_crl``) writes the broker's file before its first start.

Check ids: ``enroll.revoked`` (a revoked device's EK without an approved, unused, valid
re-enroll request), ``revocation.crl.file`` (the CRL could not be written for the broker).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from agent.fsio import atomic_write
from agent.protocol import authz
from agent.protocol.errors import ProtocolError, StateError
from agent.protocol.wire.messages.result import RequestState
from provisioning import audit
from provisioning.config import ServiceConfig
from provisioning.custody import load_private_key
from provisioning.db.engine import RetryableConflict, run_in_transaction
from provisioning.db.runtime import DeviceCertRow, DeviceCrlRow
from provisioning.pki import CertificateAuthority, cert_from_pem
from provisioning.registry import DeviceRecord, DeviceState, Outcome, Registry
from provisioning.service.store import quorum
from provisioning.service.store.quorum import StoredRequest

log = logging.getLogger("keyfleet.revocation")

DEFAULT_CRL_VALIDITY = 7 * 86400
"""How long a CRL is valid (its next-update); it is re-issued at half of it."""

KIND_DEVID = "devid"
KIND_TLS = "tls"


@dataclass(frozen=True)
class RevocationSettings:
    """What revocation needs from the configuration's [device_ca] and [revocation] tables."""

    device_ca: CertificateAuthority
    crl_file: Path | None = None
    broker_crls: tuple[Path, ...] = ()
    crl_validity: int = DEFAULT_CRL_VALIDITY
    # After a device CA rollover (provisioning.service.trustroll): the older device CAs the
    # trust bundle still accepts. Their devices reach the broker until they renew, so the
    # broker's file carries a CRL of each too, signed with its key, listing the same serials.
    previous: tuple[CertificateAuthority, ...] = field(default=(), repr=False)


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def _ts(at: int) -> datetime:
    return datetime.fromtimestamp(at, UTC)


# -- issued certificates ------------------------------------------------------------------------


def record_issued(
    session: Session, device_id: str, certs: Iterable[tuple[str, x509.Certificate]], *, now: int
) -> None:
    """Remember the serials the device CA issued to ``device_id`` (kind ``devid``/``tls``)."""
    for kind, cert in certs:
        serial = serial_hex(cert)
        if session.get(DeviceCertRow, serial) is None:
            session.add(
                DeviceCertRow(
                    serial=serial,
                    device_id=device_id,
                    kind=kind,
                    not_after=int(cert.not_valid_after_utc.timestamp()),
                    issued_at=now,
                    revoked_at=None,
                    reason="",
                )
            )
    session.flush()


def revoked_serials(session: Session) -> list[DeviceCertRow]:
    return list(
        session.scalars(
            select(DeviceCertRow)
            .where(DeviceCertRow.revoked_at.is_not(None))
            .order_by(DeviceCertRow.revoked_at, DeviceCertRow.serial)
        )
    )


def device_certs(session: Session, device_id: str) -> list[DeviceCertRow]:
    return list(
        session.scalars(
            select(DeviceCertRow)
            .where(DeviceCertRow.device_id == device_id)
            .order_by(DeviceCertRow.issued_at, DeviceCertRow.serial)
        )
    )


# -- revoking -----------------------------------------------------------------------------------


def revoke_device(
    session: Session,
    settings: RevocationSettings | None,
    device_id: str,
    *,
    reason: str,
    now: int,
) -> x509.CertificateRevocationList | None:
    """In the revoking transaction: every certificate of ``device_id`` revoked, its keys
    compromised in the ledger, and (with ``settings``) the next CRL issued and stored. Returns
    the CRL for ``write_broker_crl`` after the transaction committed."""
    registry = Registry(session)
    device = registry.device(device_id)
    devid = x509.load_pem_x509_certificate(device.devid_cert_pem.encode())
    # a device enrolled before certificates were recorded: its DevID is known from its row
    record_issued(session, device_id, [(KIND_DEVID, devid)], now=now)
    serials = []
    for row in device_certs(session, device_id):
        if row.revoked_at is None:
            row.revoked_at = now
            row.reason = reason[:200]
            serials.append(row.serial)
    compromised = registry.compromise_keys(device_id, now=now)
    audit.append(
        session,
        now=now,
        actor="service",
        action="revocation.certificates",
        target=f"device:{device_id}",
        outcome=Outcome.ACCEPTED,
        details={"serials": ",".join(serials), "compromised_keys": ",".join(compromised)},
    )
    if settings is None:
        return None
    return issue_crl(session, settings, now=now)


# -- the CRL ------------------------------------------------------------------------------------


def build_crl(
    ca: CertificateAuthority,
    revoked: Iterable[tuple[int, int]],
    *,
    number: int,
    this_update: int,
    next_update: int,
) -> x509.CertificateRevocationList:
    """The device CA's CRL ``number`` listing ``(serial, revoked_at)`` pairs (no I/O)."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(_ts(this_update))
        .next_update(_ts(next_update))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
    )
    for serial, at in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(_ts(at))
            .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False)
            .build()
        )
    return builder.sign(ca.private_key, hashes.SHA256())


def newest_crl(session: Session) -> DeviceCrlRow | None:
    return session.scalar(select(DeviceCrlRow).order_by(DeviceCrlRow.number.desc()).limit(1))


def issue_crl(
    session: Session, settings: RevocationSettings, *, now: int
) -> x509.CertificateRevocationList:
    """Sign and store the next CRL (number = newest + 1) of every revoked certificate."""
    number = (session.scalar(select(func.max(DeviceCrlRow.number))) or 0) + 1
    entries = [(int(row.serial, 16), row.revoked_at or now) for row in revoked_serials(session)]
    next_update = now + settings.crl_validity
    crl = build_crl(
        settings.device_ca, entries, number=number, this_update=now, next_update=next_update
    )
    session.add(
        DeviceCrlRow(
            number=number,
            this_update=now,
            next_update=next_update,
            der=crl.public_bytes(serialization.Encoding.DER),
        )
    )
    try:
        session.flush()
    except IntegrityError:
        # another instance issued this number first: the whole unit runs again and takes the next
        raise RetryableConflict(f"CRL number {number} was issued concurrently") from None
    return crl


def refresh_due(
    row: DeviceCrlRow | None, now: int, settings: RevocationSettings | None = None
) -> bool:
    """No CRL yet, the newest is past half its validity, or (``settings`` given) an older
    device CA signed it: the device CA rolled over (``RevocationSettings.previous``)."""
    if row is None:
        return True
    if settings is not None and settings.previous:
        crl = x509.load_der_x509_crl(row.der)
        if any(_signed_by(crl, ca) for ca in settings.previous):
            return True
    return now >= row.this_update + (row.next_update - row.this_update) // 2


def _signed_by(crl: x509.CertificateRevocationList, ca: CertificateAuthority) -> bool:
    return crl.is_signature_valid(ca.private_key.public_key())


def crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def file_crl_number(path: Path) -> int | None:
    """The CRL number of the first CRL in ``path`` (the device CA's), None if absent/unreadable."""
    try:
        data = path.read_bytes()
        end = data.index(b"-----END X509 CRL-----") + len(b"-----END X509 CRL-----")
        return crl_number(x509.load_pem_x509_crl(data[:end]))
    except (OSError, ValueError, x509.ExtensionNotFound):
        return None


def write_broker_crl(settings: RevocationSettings, crl: x509.CertificateRevocationList) -> bool:
    """Write ``crl`` and the other client CAs' CRLs to ``crl_file`` atomically, unless the file
    holds a newer device CA CRL (another instance wrote it) or exactly these bytes already (an
    unchanged file does not restart the broker). True if written."""
    path = settings.crl_file
    if path is None:
        return False
    number = crl_number(crl)
    present = file_crl_number(path)
    if present is not None and present > number:
        return False
    head = crl.public_bytes(serialization.Encoding.PEM)
    older = [c.public_bytes(serialization.Encoding.PEM) for c in previous_crls(settings, crl)]
    try:
        tail = b"".join(e.read_bytes().rstrip(b"\n") + b"\n" for e in settings.broker_crls)
        # the older CAs' CRLs are signed anew each time (ECDSA): same number, same entries
        if present == number and _unchanged(path.read_bytes(), head, len(older), tail):
            return False
        atomic_write(path, head + b"".join(older) + tail, mode=0o644)
    except (OSError, StateError) as exc:
        raise StateError(f"[revocation.crl.file] cannot write the CRL to {path}: {exc}") from None
    log.info("device CA CRL %d written to %s", number, path)
    return True


def previous_crls(
    settings: RevocationSettings, crl: x509.CertificateRevocationList
) -> list[x509.CertificateRevocationList]:
    """``crl`` (the current device CA's) again from each older device CA the service still
    accepts (``settings.previous``): the same number, times and revoked serials."""
    entries = [(r.serial_number, int(r.revocation_date_utc.timestamp())) for r in crl]
    signers = [c for c in settings.previous if not _signed_by(crl, c)]
    this_update = int(crl.last_update_utc.timestamp())
    next_update = crl.next_update_utc
    assert next_update is not None  # every CRL the service issues has one
    return [
        build_crl(
            ca,
            entries,
            number=crl_number(crl),
            this_update=this_update,
            next_update=int(next_update.timestamp()),
        )
        for ca in signers  # not the one that signed ``crl`` (before the switch's new CRL)
    ]


def _unchanged(data: bytes, head: bytes, older: int, tail: bytes) -> bool:
    """``data`` is ``head``, then ``older`` CRLs, then ``tail``."""
    if not (data.startswith(head) and data.endswith(tail)):
        return False
    middle = data[len(head) : len(data) - len(tail)]
    return middle.count(b"-----BEGIN X509 CRL-----") == older


# -- re-enrollment ------------------------------------------------------------------------------


def identity_revoked(session: Session, device: DeviceRecord) -> bool:
    """Was ``device``'s current identity revoked? Its state says so, or its DevID certificate
    is on the CRL (a revoked identity moved on to ``destroyed`` stays revoked: only the quorum
    lets its TPM enroll again)."""
    if device.state is DeviceState.REVOKED:
        return True
    serial = serial_hex(x509.load_pem_x509_certificate(device.devid_cert_pem.encode()))
    row = session.get(DeviceCertRow, serial)
    return row is not None and row.revoked_at is not None


def reenroll_approval(session: Session, device_id: str) -> StoredRequest | None:
    """The approved, unused ``device.reenroll`` request naming ``device_id``, if any."""
    for stored in quorum.open_requests(session):
        if (
            stored.op == authz.OP_DEVICE_REENROLL
            and stored.state is RequestState.APPROVED
            and stored.members == (device_id,)
        ):
            return stored
    return None


def quorum_policy(
    session: Session, verifier: authz.AuthzVerifier, min_approvals: int
) -> authz.QuorumPolicy:
    """The quorum policy in force: the initial one moved along every adopted policy, each
    verified under the one before it."""
    policy = authz.QuorumPolicy.initial(min_approvals)
    for _serial, stored in quorum.adopted_policies(session):
        policy = verifier.verify_policy_update(stored, current=policy, now=None)
    return policy


def consume_reenroll(
    session: Session,
    device_id: str,
    *,
    devid_point: bytes,
    verifier: authz.AuthzVerifier,
    min_approvals: int,
    station: str,
    now: int,
) -> str:
    """In the registering transaction: verify the approved re-enroll request of ``device_id``
    again (the row alone is no authority) and mark it used. Returns its id; raises
    ``enroll.revoked`` when there is none or it does not verify."""
    stored = reenroll_approval(session, device_id)
    if stored is None:
        raise ProtocolError(
            "enroll.revoked",
            f"{device_id} is revoked: its TPM enrolls again only with an approved "
            "'keyfleet propose reenroll' request",
        )
    approvals = tuple(authz.Approval.decode(a) for a in stored.approvals)
    authorization = authz.Authorization(request=stored.request, approvals=approvals).encode()
    try:
        verified = verifier.verify(
            authorization,
            policy=quorum_policy(session, verifier, min_approvals),
            now=now,
            op=authz.OP_DEVICE_REENROLL,
            group=None,
        )
    except ProtocolError as exc:
        raise ProtocolError(
            "enroll.revoked", f"the re-enroll request of {device_id} does not verify: {exc}"
        ) from None
    members = verified.request.members
    if (
        len(members) != 1
        or members[0].device_id != device_id
        or members[0].key != authz.member_key(devid_point)
    ):
        raise ProtocolError(
            "enroll.revoked", f"the re-enroll request does not name {device_id} as revoked"
        )
    stored.state = RequestState.EXECUTED
    stored.detail = f"used by station {station} at {now}"
    quorum.save_request(session, stored, now=now)
    audit.append(
        session,
        now=now,
        actor=f"station:{station}",
        action="request.consume",
        target=stored.request_id.hex(),
        outcome=Outcome.ACCEPTED,
        details={"op": stored.op, "device": device_id, "approvers": ",".join(stored.approvers)},
    )
    return stored.request_id.hex()


# -- configuration and the command line ---------------------------------------------------------


def settings_from_config(config: ServiceConfig) -> RevocationSettings:
    """[device_ca] and [revocation]. The device CA key is loaded here and in enrollment
    (``EnrollmentSettings.from_service_config``)."""
    device_ca = CertificateAuthority(
        certificate=cert_from_pem(config.device_ca.cert.read_bytes()),
        private_key=load_private_key(config.device_ca.key, role="device CA"),
    )
    return RevocationSettings(
        device_ca=device_ca,
        crl_file=config.revocation.crl_file,
        broker_crls=config.revocation.broker_crls,
        crl_validity=config.revocation.crl_validity_seconds,
    )


def write_current_crl(
    settings: RevocationSettings, sessions: sessionmaker[Session], *, now: int
) -> int:
    """``keyfleet crl``: issue a CRL if there is none or the newest is past half its validity,
    write the newest to ``crl_file``; returns its number. Run before the broker's first start
    (its ``crlfile`` must exist); ``keyfleet serve`` does the same at start and every
    ``tasks.CRL_CHECK_SECONDS``."""

    def work(session: Session) -> bytes:
        row = newest_crl(session)
        if refresh_due(row, now):
            return issue_crl(session, settings, now=now).public_bytes(serialization.Encoding.DER)
        assert row is not None
        return row.der

    crl = x509.load_der_x509_crl(run_in_transaction(sessions, work))
    write_broker_crl(settings, crl)
    return crl_number(crl)
