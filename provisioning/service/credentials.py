"""Authority from certificates, not rows: what the service believes about an operator or a device
comes from a certificate its CA signed, checked when it is used. A database row only caches
it (and, for an operator's role, may narrow it).

Operators. The effective role of a command is the lower of the operator certificate's OU and
the registry row's role (``operator_role``): a row that says admin under a viewer's certificate
grants nothing more (``op.role``). The certificate under an operator's name must name that
operator (CN) and hold the key the command's kid names (``op.certificate``), so a database writer
cannot file another operator's certificate under a name.

Devices. Every use of a device's stored DevID certificate or AK public area goes through
``StoredDevices.check``: the DevID certificate must pass path validation to the configured device
CA (``agent.protocol.credentials.CredentialVerifier``: clientAuth end-entity, keyUsage
digitalSignature, SAN ``urn:keyfleet:device:<id>``) and name that device; where the AK is used
(attestation) the stored AK must also be the one whose TPM Name the certificate's AK-name
extension carries. (Only there: a device enrolled before DevID certificates named the AK keeps
talking to the service, and only its attestation is refused.) A row swapped by a database writer (a
certificate from another CA, another device's certificate, another AK) is refused at use with
``cred.stored``; the refusal is counted and audited by the flow that used it. Results are
remembered by (device, SHA-256 of the certificate PEM, SHA-256 of the AK) for as long as the
certificates are valid, so the hot path (every device report) validates a certificate once, not
per message: the last ``MEMO_SIZE`` results whole (the key object, about 4 KB each with what
OpenSSL holds: 16 MB), and the last ``COMPACT_MEMO_SIZE`` as the key's 65-byte point, its key
id and the validity window (about 0.4 KB each: about 55 MB at 131,072 devices), from which a
result is rebuilt without validating the chain again (about 14 µs: the point's decoding). Past
that many devices talking in turn, a certificate is validated again at use. Only the
certificate's check is remembered: whether the device is revoked, destroyed or quarantined is
read from its row with every batch (``verify.device_resolver``), so a remembered key never
speaks for a revoked device, nor for a certificate its row no longer holds (the memo is keyed
by the stored certificate's digest). A result checked with the AK also holds the AK's key
decoded from that stored public area (the same bytes, by their digest in the key), so an
attestation answer does not decode it again (about 0.3 ms with tpm2-pytss).

Check ids: ``op.role``, ``op.certificate``, ``cred.stored`` (docs/checks.md).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy.orm import Session

from agent.protocol.attest import public_key_from_area, tpm_name
from agent.protocol.credentials import CredentialVerifier
from agent.protocol.errors import ProtocolError
from agent.protocol.wire.cose import key_id
from provisioning import pki
from provisioning.registry import DeviceRecord, Registry, Role
from provisioning.service import store

MEMO_SIZE: Final = 4096
COMPACT_MEMO_SIZE: Final = 131_072

# -- operators ----------------------------------------------------------------------------------


def certificate_role(cert: x509.Certificate) -> Role:
    """The role an operator certificate grants: its OU. Raises ``op.role`` when it has none or
    one that is not a role (such a certificate grants nothing)."""
    ou = pki.role_of(cert)
    if ou is None:
        raise ProtocolError("op.role", "the operator certificate carries no role (OU)")
    try:
        return Role(ou)
    except ValueError:
        raise ProtocolError("op.role", f"certificate OU {ou!r} is not a role") from None


def operator_role(cert: x509.Certificate, row_role: Role) -> Role:
    """The effective role: the lower of the certificate's and the registry row's."""
    cert_role = certificate_role(cert)
    return row_role if cert_role.allows(row_role) else cert_role


def check_operator_certificate(cert: x509.Certificate, operator: str, kid: bytes) -> None:
    """The certificate filed under ``operator`` names that operator and holds the key ``kid``
    names. Raises ``op.certificate``."""
    if pki.common_name(cert) != operator:
        raise ProtocolError(
            "op.certificate",
            f"the certificate stored for {operator!r} is {pki.common_name(cert)!r}'s",
        )
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or key_id(public_key) != kid:
        raise ProtocolError(
            "op.certificate", f"the certificate stored for {operator!r} does not hold its key"
        )


def effective_role(session: Session, operator: str) -> Role:
    """The effective role of a registered operator, from its stored certificate and its row
    (for checks made after the command's envelope was verified, e.g. per request op)."""
    row = store.operator_key(session, operator)
    if row is None:
        raise ProtocolError("op.certificate", f"operator {operator!r} has no certificate")
    cert = pki.cert_from_pem(row.cert_pem.encode())
    return operator_role(cert, Registry(session).operator(operator).role)


# -- devices ------------------------------------------------------------------------------------


_MemoKey = tuple[str, bytes, bytes | None]


@dataclass(frozen=True)
class StoredDevice:
    """A device's stored credentials, checked: its DevID public key (the key that signs its
    reports, key packages and leaves) and the validity window of the checked chain."""

    device_id: str
    devid_key: ec.EllipticCurvePublicKey
    not_before: int
    not_after: int
    kid: bytes  # the DevID key's COSE key id (``cose.key_id``), computed once
    # checked ``with_ak``: the AK's key decoded from the stored public area that was checked
    # (None from the compact memo, or if it is not a P-256 key: the caller decodes it, and
    # refuses it, as before)
    ak_key: ec.EllipticCurvePublicKey | None = None


class StoredDevices:
    """Checks stored DevID certificates and AK public areas against the device CA at use; see
    the module docstring. Remembers up to ``memo_size`` results (LRU); a remembered result is
    still checked against ``now``."""

    def __init__(
        self,
        device_ca: x509.Certificate,
        *,
        others: Sequence[x509.Certificate] = (),
        ends: Mapping[bytes, int] | None = None,
        memo_size: int = MEMO_SIZE,
        compact_size: int = COMPACT_MEMO_SIZE,
    ) -> None:
        # ``device_ca`` the CA the service issues from; ``others`` the device CAs a trust bundle
        # still accepts (``ends``: certificate DER -> until when; agent.protocol.trust)
        self.device_ca = device_ca
        self.cas = (device_ca, *others)
        self._ends = dict(ends or {})
        self._verifier = CredentialVerifier(self.cas, ends=ends, memo_size=memo_size)
        # (device, SHA-256 of the certificate PEM, of the AK when it was checked too) -> the
        # checked result; the compact memo holds the DevID key as its encoded point
        self._memo: OrderedDict[_MemoKey, StoredDevice] = OrderedDict()
        self._memo_size = memo_size
        self._compact: OrderedDict[_MemoKey, tuple[bytes, int, int, bytes]] = OrderedDict()
        self._compact_size = max(compact_size, memo_size)
        self.validations = 0

    def __repr__(self) -> str:
        return f"StoredDevices({len(self._memo)} remembered)"

    def check(self, device: DeviceRecord, now: int, *, with_ak: bool = False) -> StoredDevice:
        """``device``'s DevID key, once its stored certificate passes, and with ``with_ak`` its
        stored AK too (where the AK is used: attestation). Raises
        ``ProtocolError("cred.stored")``."""
        return self.check_stored(
            device.device_id,
            device.devid_cert_pem,
            now,
            ak_public=device.ak_public if with_ak else None,
            with_ak=with_ak,
        )

    def check_stored(
        self,
        device_id: str,
        devid_cert_pem: str,
        now: int,
        *,
        ak_public: bytes | None = None,
        with_ak: bool = False,
    ) -> StoredDevice:
        """``check`` of the stored columns themselves (a device read as plain columns)."""
        ak = ak_public if with_ak else None
        key = (
            device_id,
            hashlib.sha256(devid_cert_pem.encode()).digest(),
            None if ak is None else hashlib.sha256(ak).digest(),
        )
        memo = self._memo.get(key)
        if memo is not None and memo.not_before <= now <= memo.not_after:
            self._memo.move_to_end(key)
            return memo
        compact = self._compact.get(key)
        if compact is not None and compact[1] <= now <= compact[2]:
            self._compact.move_to_end(key)
            point, not_before, not_after, kid = compact
            checked = StoredDevice(
                device_id=device_id,
                devid_key=ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point),
                not_before=not_before,
                not_after=not_after,
                kid=kid,
            )
        else:
            checked, point = self._check(device_id, devid_cert_pem, ak, now, with_ak=with_ak)
            self._compact[key] = (point, checked.not_before, checked.not_after, checked.kid)
            self._compact.move_to_end(key)
            while len(self._compact) > self._compact_size:
                self._compact.popitem(last=False)
        self._memo[key] = checked
        self._memo.move_to_end(key)
        while len(self._memo) > self._memo_size:
            self._memo.popitem(last=False)
        return checked

    def _check(
        self, name: str, devid_cert_pem: str, ak_public: bytes | None, now: int, *, with_ak: bool
    ) -> tuple[StoredDevice, bytes]:
        """The stored credentials checked, and the DevID key's encoded point."""
        self.validations += 1
        try:
            checked = self._verifier.check(_pem_der(devid_cert_pem), now)
        except ProtocolError as err:
            raise ProtocolError(
                "cred.stored",
                f"the stored DevID certificate of {name!r}: [{err.check}] {err.reason}",
            ) from None
        verified = checked.device
        if verified.device_id != name:
            raise ProtocolError(
                "cred.stored",
                f"the stored DevID certificate of {name!r} names {verified.device_id!r}",
            )
        if with_ak and ak_public is not None:
            try:
                stored_ak = tpm_name(ak_public)
            except ProtocolError:
                raise ProtocolError(
                    "cred.stored", f"the stored AK of {name!r} does not decode"
                ) from None
            if verified.ak_name is None or verified.ak_name != stored_ak:
                raise ProtocolError(
                    "cred.stored",
                    f"the stored AK of {name!r} is not the AK its DevID certificate names",
                )
        ak_key = None
        if with_ak and ak_public is not None:
            try:
                ak_key = public_key_from_area(ak_public)
            except ProtocolError:
                ak_key = None
        # a remembered result lasts while the certificate's whole path validates: its
        # certificates' validity and its device CA's end of acceptance (the verifier's window)
        stored = StoredDevice(
            device_id=name,
            devid_key=checked.key,
            not_before=checked.not_before,
            not_after=checked.not_after,
            kid=key_id(checked.key),
            ak_key=ak_key,
        )
        return stored, verified.signature_key


_PEM_HEAD: Final = "-----BEGIN CERTIFICATE-----"
_PEM_TAIL: Final = "-----END CERTIFICATE-----"


def _pem_der(pem: str) -> bytes:
    """The DER of the one certificate a stored PEM holds, for the verifier (which parses it
    once). A PEM as the service writes it (one block, nothing around it) is only base64-decoded;
    anything else is read by ``pki.cert_from_pem`` (exactly one certificate, ``pki.pem``)."""
    text = pem.strip()
    if text.startswith(_PEM_HEAD) and text.endswith(_PEM_TAIL) and text.count("-----") == 4:
        body = "".join(text[len(_PEM_HEAD) : -len(_PEM_TAIL)].split())
        try:
            return base64.b64decode(body, validate=True)
        except binascii.Error:
            pass
    return pki.cert_from_pem(pem.encode()).public_bytes(Encoding.DER)
