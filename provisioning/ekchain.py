"""EK certificate chains: path validation to the TPM manufacturers' roots, the TCG EK profile,
and revocation by the CRLs the operator imports.

The manufacturer bundle (``[attestation] manufacturer_cas``) holds roots and intermediates.
A self-signed certificate in it is a trust anchor; any other is an intermediate that counts only
through a path to a root in the bundle (checked when the bundle is loaded: an intermediate without
its root is a configuration error, not an anchor). An EK certificate is then path-validated with
cryptography's RFC 5280 verifier (``cryptography.x509.verification``): signatures, validity at
``now``, basicConstraints and path length of every CA, keyUsage keyCertSign of every CA (the
web-PKI CA profile), at most ``MAX_CHAIN_DEPTH`` certificates. The EK certificate itself follows
the TCG EK Credential Profile rather than the web PKI: its subject may be empty and its
subjectAltName (the TPM manufacturer, model and version as a directoryName) is critical, so the
end-entity policy admits any extension and the profile is checked here:

    enroll.ek.chain   no valid path to a root of the bundle (unknown issuer, bad signature, a
                      certificate of the path expired or not yet valid, path length exceeded, an
                      issuer that is not a CA or may not sign certificates)
    ek.profile        the EK certificate is a CA certificate, or has an extendedKeyUsage without
                      tcg-kp-EKCertificate (2.23.133.8.1)
    ek.key_usage      keyUsage absent, or without keyEncipherment (RSA EK) / keyAgreement (ECC
                      EK) as the TCG profile requires, or the key is neither RSA nor ECC
    ek.revoked        a certificate of the path (the EK's or an intermediate's) is on its
                      issuer's imported CRL
    ek.crl.stale      an imported CRL of an issuer on the path is past its nextUpdate: revocation
                      cannot be judged, so the EK is refused until a fresh CRL is imported

CRLs (``ManufacturerCRLs``) are checked when imported and again when loaded:

    ek.crl.decode     not a PEM or DER X.509 CRL
    ek.crl.issuer     no CA of the bundle issued it (name and signature), or that CA's keyUsage
                      lacks cRLSign
    ek.crl.stale      thisUpdate in the future, no nextUpdate, or nextUpdate passed
    ek.crl.scope      a delta CRL, or one whose issuingDistributionPoint covers only part of the
                      issuer's certificates (a partial CRL would hide revocations)
    ek.crl.rollback   older than the CRL of the same issuer already imported (lower CRL number, or
                      earlier thisUpdate when there is no number)

Pure: no I/O (the service reads the files; ``provisioning.enroll`` and ``provisioning.pki_cli``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from agent.protocol.errors import ConfigError, ProtocolError

TCG_EK_CERTIFICATE: Final = x509.ObjectIdentifier("2.23.133.8.1")
MAX_CHAIN_DEPTH: Final = 6
PEM_CRL_BEGIN: Final = b"-----BEGIN X509 CRL-----"


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except Exception:  # InvalidSignature, ValueError, TypeError: not self-signed
        return False
    return True


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:  # InvalidSignature, ValueError, TypeError: not this issuer
        return False
    return True


# -- CRLs ---------------------------------------------------------------------------------------


def crls_from_bytes(data: bytes) -> list[x509.CertificateRevocationList]:
    """Every CRL in ``data``: PEM blocks (any number, also none) or one DER CRL."""
    try:
        if data.lstrip().startswith(b"-----"):
            blocks = data.split(PEM_CRL_BEGIN)[1:]
            return [x509.load_pem_x509_crl(PEM_CRL_BEGIN + block) for block in blocks]
        if not data.strip():
            return []
        return [x509.load_der_x509_crl(data)]
    except ValueError:
        raise ProtocolError("ek.crl.decode", "not a PEM or DER X.509 CRL") from None


def crls_to_pem(crls: Iterable[x509.CertificateRevocationList]) -> bytes:
    return b"".join(crl.public_bytes(serialization.Encoding.PEM) for crl in crls)


def _crl_number(crl: x509.CertificateRevocationList) -> int | None:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


def _check_scope(crl: x509.CertificateRevocationList) -> None:
    try:
        crl.extensions.get_extension_for_oid(ExtensionOID.DELTA_CRL_INDICATOR)
    except x509.ExtensionNotFound:
        pass
    else:
        raise ProtocolError("ek.crl.scope", "a delta CRL: import the issuer's full CRL")
    try:
        point = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
    except x509.ExtensionNotFound:
        return
    if (
        point.only_contains_user_certs
        or point.only_contains_ca_certs
        or point.only_contains_attribute_certs
        or point.only_some_reasons is not None
        or point.indirect_crl
    ):
        raise ProtocolError("ek.crl.scope", "the CRL covers only part of its issuer's certificates")


def _check_fresh(crl: x509.CertificateRevocationList, when: datetime) -> None:
    if crl.last_update_utc > when:
        raise ProtocolError(
            "ek.crl.stale", f"the CRL is dated in the future ({crl.last_update_utc})"
        )
    next_update = crl.next_update_utc
    if next_update is None:
        raise ProtocolError("ek.crl.stale", "the CRL has no nextUpdate")
    if when > next_update:
        raise ProtocolError(
            "ek.crl.stale",
            f"the CRL of {crl.issuer.rfc4514_string()!r} expired at {next_update}: import a "
            "fresh one",
        )


@dataclass(frozen=True)
class CheckedCRL:
    """A CRL whose signature verified with ``issuer``'s key (a CA of the bundle allowed to sign
    CRLs)."""

    crl: x509.CertificateRevocationList
    issuer: x509.Certificate

    @property
    def number(self) -> int | None:
        return _crl_number(self.crl)

    def newer_or_same_as(self, other: CheckedCRL) -> bool:
        mine, theirs = self.number, other.number
        if mine is not None and theirs is not None:
            return mine >= theirs
        return self.crl.last_update_utc >= other.crl.last_update_utc


# -- the trust store ----------------------------------------------------------------------------


class ManufacturerTrust:
    """The manufacturer bundle, split into roots and intermediates, with the imported CRLs.
    Raises ``ConfigError`` when the bundle has no root or an intermediate with no path to one."""

    def __init__(
        self,
        bundle: Sequence[x509.Certificate],
        crls: Sequence[x509.CertificateRevocationList] = (),
        *,
        now: datetime | None = None,
    ) -> None:
        self.roots = [c for c in bundle if _self_signed(c)]
        self.intermediates = [c for c in bundle if not _self_signed(c)]
        if not self.roots:
            raise ConfigError(
                "the manufacturer CA bundle has no root (self-signed) certificate: add the "
                "manufacturers' roots; intermediates count only through them"
            )
        reachable = list(self.roots)
        pending = list(self.intermediates)
        while pending:
            step = [c for c in pending if any(_issued_by(c, r) for r in reachable)]
            if not step:
                names = ", ".join(repr(c.subject.rfc4514_string()) for c in pending)
                raise ConfigError(
                    f"manufacturer intermediate(s) {names} have no issuer in the bundle: add "
                    "their root"
                )
            reachable += step
            pending = [c for c in pending if c not in step]
        self._store = Store(self.roots)
        # one checked CRL per issuer (the newest given)
        self.crls: dict[bytes, CheckedCRL] = {}
        for crl in crls:
            checked = self.check_crl(crl, now=now)
            key = _issuer_key(checked.issuer)
            current = self.crls.get(key)
            if current is None or checked.newer_or_same_as(current):
                self.crls[key] = checked

    def __repr__(self) -> str:
        return (
            f"ManufacturerTrust({len(self.roots)} root(s), {len(self.intermediates)} "
            f"intermediate(s), {len(self.crls)} CRL(s))"
        )

    def check_crl(
        self, crl: x509.CertificateRevocationList, *, now: datetime | None = None
    ) -> CheckedCRL:
        """``crl`` if a CA of the bundle signed it and may sign CRLs, and it covers all that CA's
        certificates; with ``now``, also fresh. Raises ``ek.crl.*``."""
        issuer = next(
            (
                ca
                for ca in (*self.roots, *self.intermediates)
                if ca.subject == crl.issuer and _crl_signed_by(crl, ca)
            ),
            None,
        )
        if issuer is None:
            raise ProtocolError(
                "ek.crl.issuer",
                f"no CA of the manufacturer bundle signed this CRL (issuer "
                f"{crl.issuer.rfc4514_string()!r})",
            )
        try:
            usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            usage = None
        if usage is not None and not usage.crl_sign:  # RFC 5280 6.3.3 (f)
            raise ProtocolError(
                "ek.crl.issuer",
                f"{issuer.subject.rfc4514_string()!r} may not sign CRLs (keyUsage without cRLSign)",
            )
        _check_scope(crl)
        if now is not None:
            _check_fresh(crl, now.astimezone(UTC))
        return CheckedCRL(crl, issuer)

    def merge(self, crl: x509.CertificateRevocationList, *, now: datetime) -> CheckedCRL:
        """Check a CRL to import (fresh at ``now``, not older than the one held for its issuer)
        and hold it in place of that one; returns it. Raises ``ek.crl.*``."""
        checked = self.check_crl(crl, now=now)
        key = _issuer_key(checked.issuer)
        current = self.crls.get(key)
        if current is not None and not checked.newer_or_same_as(current):
            raise ProtocolError(
                "ek.crl.rollback",
                f"older than the CRL of {checked.issuer.subject.rfc4514_string()!r} already "
                f"imported (number {checked.number} < {current.number})",
            )
        self.crls[key] = checked
        return checked

    def verify(self, cert: x509.Certificate, *, now: datetime) -> list[x509.Certificate]:
        """The validated path of EK certificate ``cert`` at ``now`` (EK first, root last).
        Raises ``ProtocolError`` (``enroll.ek.chain``, ``ek.*``)."""
        when = now.astimezone(UTC)
        verifier = (
            PolicyBuilder()
            .store(self._store)
            .time(when)
            .max_chain_depth(MAX_CHAIN_DEPTH)
            .extension_policies(
                ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                ee_policy=ExtensionPolicy.permit_all(),
            )
            .build_client_verifier()
        )
        try:
            chain = list(verifier.verify(cert, self.intermediates).chain)
        except VerificationError as exc:
            raise ProtocolError(
                "enroll.ek.chain",
                f"EK certificate has no valid path to a trusted manufacturer root: {exc}",
            ) from None
        check_ek_profile(cert)
        self._check_revocation(chain, when)
        return chain

    def _check_revocation(self, chain: Sequence[x509.Certificate], when: datetime) -> None:
        for cert, issuer in itertools.pairwise(chain):
            held = self.crls.get(_issuer_key(issuer))
            if held is None:
                continue  # no CRL imported for this issuer: nothing to check against
            _check_fresh(held.crl, when)
            revoked = held.crl.get_revoked_certificate_by_serial_number(cert.serial_number)
            if revoked is not None:
                what = "the EK certificate" if cert is chain[0] else "an intermediate of its path"
                raise ProtocolError(
                    "ek.revoked",
                    f"{what} (serial {cert.serial_number:x}) is revoked by "
                    f"{issuer.subject.rfc4514_string()!r} since {revoked.revocation_date_utc}",
                )


def check_ek_profile(cert: x509.Certificate) -> None:
    """The TCG EK Credential Profile parts the path validation leaves open: an end-entity
    certificate, the EK certificate purpose if a purpose is given, and the keyUsage of the EK's
    algorithm. Raises ``ek.profile`` / ``ek.key_usage``."""
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and constraints.ca:
        raise ProtocolError("ek.profile", "the EK certificate is a CA certificate")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and TCG_EK_CERTIFICATE not in eku:
        raise ProtocolError("ek.profile", "the EK certificate's purposes lack tcg-kp-EKCertificate")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise ProtocolError("ek.key_usage", "the EK certificate has no keyUsage") from None
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        if not usage.key_encipherment:
            raise ProtocolError("ek.key_usage", "an RSA EK certificate needs keyEncipherment")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if not usage.key_agreement:
            raise ProtocolError("ek.key_usage", "an ECC EK certificate needs keyAgreement")
    else:
        raise ProtocolError("ek.key_usage", "the EK is neither an RSA nor an ECC key")


def _crl_signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    key = ca.public_key()
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return False
    return crl.is_signature_valid(key)


def _issuer_key(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)
