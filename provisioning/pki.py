"""The fleet's small X.509 PKI: certificate authorities, leaf certificates, chain checks.

One module serves three uses: the device CA (DevID certificates for TPM-held keys), the operator
CA (operator identities), and the TLS certificates of the MQTT broker. Everything is ECDSA P-256
with SHA-256, because that is what the TPM signs with and what every MQTT stack accepts.

Naming convention (see docs/mqtt.md): the subject CN is the identity, exactly the string the
broker uses as user name (``use_identity_as_username``) and that appears in topics: a device id
``dev-0001``, an operator ``op-alice``, the service ``keyfleet-service``. The optional role
(``device``, ``service``, ``viewer``, ``operator``, ``admin``) is the subject OU, because OU is
printed by every tool (openssl, mosquitto logs) and needs no private OID.

Pure: no I/O except the two ``write_*`` helpers, which go through ``agent.fsio.atomic_write``.
Time is passed in (``now``); serial numbers come from an injectable ``rng``.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.fsio import atomic_write
from agent.protocol.credentials import DEVICE_URN_PREFIX, ak_name_extension
from agent.protocol.errors import ProtocolError

Purpose = Literal["server", "client", "any"]
Rng = Callable[[int], bytes]

CLIENT_PURPOSE = ExtendedKeyUsageOID.CLIENT_AUTH
SERVER_PURPOSE = ExtendedKeyUsageOID.SERVER_AUTH
# The subjectAltName URI of a DevID certificate: this prefix and the device id.
# Certificates are back-dated a little so that a device whose clock is slightly behind the
# issuer's does not reject a certificate issued a second ago.
BACKDATE = timedelta(minutes=5)


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA certificate together with its signing key. The key never shows in a repr."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)

    @property
    def name(self) -> str:
        return common_name(self.certificate)


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh software P-256 key (CA keys, broker key, test client keys). Device keys are made in
    the TPM instead and only their public half reaches this module."""
    return ec.generate_private_key(ec.SECP256R1())


def _serial(rng: Rng) -> int:
    # RFC 5280 allows up to 20 octets; 16 random bytes with the top bit cleared stays positive.
    return int.from_bytes(rng(16), "big") >> 1 or 1


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    return now.astimezone(UTC)


def _require_p256(public_key: object) -> ec.EllipticCurvePublicKey:
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise ProtocolError("pki.key_type", "only ECDSA P-256 keys are accepted")
    return public_key


def _name(common: str, unit: str | None = None) -> x509.Name:
    if not common:
        raise ValueError("an identity (CN) must not be empty")
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common)]
    if unit is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    return x509.Name(attrs)


def create_ca(
    name: str,
    *,
    now: datetime,
    valid_for: timedelta,
    key: ec.EllipticCurvePrivateKey | None = None,
    rng: Rng = os.urandom,
) -> CertificateAuthority:
    """A self-signed root that may sign end-entity certificates only (pathLen 0)."""
    private_key = key if key is not None else generate_key()
    public_key = _require_p256(private_key.public_key())
    start = _utc(now)
    subject = _name(name)
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(_serial(rng))
        .not_valid_before(start - BACKDATE)
        .not_valid_after(start + valid_for)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(private_key, hashes.SHA256())
    )
    return CertificateAuthority(certificate=certificate, private_key=private_key)


def _leaf_builder(
    ca: CertificateAuthority,
    public_key: object,
    subject: x509.Name,
    *,
    now: datetime,
    valid_for: timedelta,
    rng: Rng,
) -> x509.CertificateBuilder:
    key = _require_p256(public_key)
    start = _utc(now)
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    not_after = min(start + valid_for, ca.certificate.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.certificate.subject)
        .public_key(key)
        .serial_number(_serial(rng))
        # Backdated for clock skew, by at most a tenth of the lifetime: devices renew at a
        # fraction of (not-after - not-before), which a short lifetime's backdate would skew
        .not_valid_before(start - min(BACKDATE, valid_for / 10))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )


def issue_server_cert(
    ca: CertificateAuthority,
    public_key: object,
    *,
    common_name: str,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    now: datetime,
    valid_for: timedelta,
    rng: Rng = os.urandom,
) -> x509.Certificate:
    """A TLS server certificate (serverAuth) whose SANs name every host and address clients dial:
    TLS clients check SANs, never the CN."""
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    if not sans:
        raise ValueError("a server certificate needs at least one DNS name or IP address")
    builder = (
        _leaf_builder(ca, public_key, _name(common_name), now=now, valid_for=valid_for, rng=rng)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([SERVER_PURPOSE]), critical=False)
    )
    return builder.sign(ca.private_key, hashes.SHA256())


def issue_client_cert(
    ca: CertificateAuthority,
    public_key: object,
    *,
    identity: str,
    role: str | None = None,
    now: datetime,
    valid_for: timedelta,
    rng: Rng = os.urandom,
) -> x509.Certificate:
    """A client certificate (clientAuth) with CN = ``identity`` and OU = ``role`` if given.

    ``identity`` must be usable as an MQTT topic level, since the broker ACL substitutes it there.
    """
    if any(ch in identity for ch in "/+#\x00") or identity.startswith("$"):
        raise ValueError(f"identity {identity!r} cannot be used as an MQTT topic level")
    builder = _leaf_builder(
        ca, public_key, _name(identity, role), now=now, valid_for=valid_for, rng=rng
    )
    builder = builder.add_extension(x509.ExtendedKeyUsage([CLIENT_PURPOSE]), critical=False)
    return builder.sign(ca.private_key, hashes.SHA256())


def device_urn(device_id: str) -> str:
    """The URI naming a device in its DevID certificate's subjectAltName."""
    return f"{DEVICE_URN_PREFIX}{device_id}"


def _serial_number_attribute(serial: str) -> x509.NameAttribute[str]:
    # X.520 serialNumber is a PrintableString; a serial outside that alphabet (the station may
    # send any printable ASCII) goes in as UTF8String rather than being altered.
    if not serial or len(serial) > 64:
        raise ValueError("a hardware serial number has 1 to 64 characters")
    printable = all(ch.isalnum() or ch in " '()+,-./:=?" for ch in serial) and serial.isascii()
    return x509.NameAttribute(
        NameOID.SERIAL_NUMBER,
        serial,
        _type=_ASN1Type.PrintableString if printable else _ASN1Type.UTF8String,
    )


def issue_devid_cert(
    ca: CertificateAuthority,
    public_key: object,
    *,
    device_id: str,
    hardware_serial: str,
    now: datetime,
    valid_for: timedelta,
    ak_name: bytes | None = None,
    rng: Rng = os.urandom,
) -> x509.Certificate:
    """A device's DevID certificate (IEEE 802.1AR LDevID), clientAuth like any client
    certificate, naming the device three ways: CN = ``device_id`` (the broker user name and topic
    level), subject serialNumber = ``hardware_serial`` (the serial the station read from the
    device, 802.1AR 8.6), and a subjectAltName URI ``urn:keyfleet:device:<device_id>``
    (docs/provisioning.md, "What the DevID certificate says"). ``ak_name``: the TPM Name of the
    device's enrolled AK, carried in the non-critical keyfleet AK-name extension
    (``agent.protocol.credentials.AK_NAME_OID``) so that group members can check a TPM2_Certify
    of a leaf key by that AK (``verify_tpm_residency``)."""
    if any(ch in device_id for ch in "/+#\x00") or device_id.startswith("$"):
        raise ValueError(f"device id {device_id!r} cannot be used as an MQTT topic level")
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, device_id),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "device"),
            _serial_number_attribute(hardware_serial),
        ]
    )
    builder = (
        _leaf_builder(ca, public_key, subject, now=now, valid_for=valid_for, rng=rng)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(device_urn(device_id))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([CLIENT_PURPOSE]), critical=False)
    )
    if ak_name is not None:
        builder = builder.add_extension(ak_name_extension(ak_name), critical=False)
    return builder.sign(ca.private_key, hashes.SHA256())


def hardware_serial_of(cert: x509.Certificate) -> str | None:
    """The subject serialNumber (a DevID's hardware serial), or None when there is none."""
    values = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    if not values:
        return None
    if len(values) != 1 or not isinstance(values[0].value, str):
        raise ProtocolError("pki.subject", "certificate subject must have at most one serialNumber")
    return values[0].value


def common_name(cert: x509.Certificate) -> str:
    """The subject CN: the identity. Raises ``pki.subject`` if there is not exactly one."""
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(values) != 1 or not isinstance(values[0].value, str):
        raise ProtocolError("pki.subject", "certificate subject must have exactly one CN")
    return values[0].value


def role_of(cert: x509.Certificate) -> str | None:
    """The subject OU (the role), or None when the certificate carries none."""
    values = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if not values:
        return None
    if len(values) != 1 or not isinstance(values[0].value, str):
        raise ProtocolError("pki.subject", "certificate subject must have at most one OU")
    return values[0].value


def _check_ca(ca_cert: x509.Certificate) -> None:
    try:
        constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise ProtocolError("pki.ca", "issuer has no basicConstraints extension") from None
    if not constraints.ca:
        raise ProtocolError("pki.ca", "issuer is not a CA (basicConstraints CA=false)")
    try:
        usage = ca_cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return  # RFC 5280 4.2.1.3: without keyUsage every use is allowed
    if not usage.key_cert_sign:
        raise ProtocolError("pki.ca", "issuer key usage does not include keyCertSign")


def _check_validity(cert: x509.Certificate, when: datetime, what: str) -> None:
    if when < cert.not_valid_before_utc:
        raise ProtocolError(
            "pki.validity", f"{what} is not valid before {cert.not_valid_before_utc}"
        )
    if when > cert.not_valid_after_utc:
        raise ProtocolError("pki.validity", f"{what} expired at {cert.not_valid_after_utc}")


def verify_certificate(
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    *,
    now: datetime,
    purpose: Purpose = "any",
) -> None:
    """Check that ``cert`` is an end-entity certificate issued directly by ``ca_cert``, both valid
    at ``now``, and (unless ``purpose`` is "any") that its EKU allows that purpose.

    Raises ``ProtocolError`` with a stable check id, never returns a bool. Check ids:
    ``pki.ca`` (issuer is not a CA), ``pki.issuer`` (names or key ids do not match),
    ``pki.signature``, ``pki.validity``, ``pki.leaf_is_ca``, ``pki.purpose``, ``pki.key_type``.
    """
    when = _utc(now)
    _check_ca(ca_cert)
    _check_validity(ca_cert, when, "CA certificate")
    if cert.issuer != ca_cert.subject:
        raise ProtocolError(
            "pki.issuer",
            f"certificate issued by {cert.issuer.rfc4514_string()!r}, not by the expected CA "
            f"{ca_cert.subject.rfc4514_string()!r}",
        )
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        pass  # key ids are a hint for path building; the signature below is the proof
    else:
        if aki.key_identifier is not None and aki.key_identifier != ski.digest:
            raise ProtocolError("pki.issuer", "authority key id does not match the CA key id")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError):
        raise ProtocolError("pki.signature", "certificate signature does not verify") from None
    _check_validity(cert, when, "certificate")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and constraints.ca:
        raise ProtocolError("pki.leaf_is_ca", "a CA certificate cannot be used as an identity")
    _require_p256(cert.public_key())
    if purpose != "any":
        wanted = SERVER_PURPOSE if purpose == "server" else CLIENT_PURPOSE
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            raise ProtocolError("pki.purpose", f"certificate has no EKU for {purpose}") from None
        if wanted not in eku:
            raise ProtocolError("pki.purpose", f"certificate is not allowed for {purpose} use")


# PEM helpers -------------------------------------------------------------------------------


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def certs_to_pem(certs: Iterable[x509.Certificate]) -> bytes:
    """A bundle, e.g. a broker ``cafile`` trusting the device, operator and service CAs."""
    return b"".join(cert_to_pem(c) for c in certs)


def cert_from_pem(data: bytes) -> x509.Certificate:
    """Exactly one certificate; anything else raises ``pki.pem``."""
    certs = certs_from_pem(data)
    if len(certs) != 1:
        raise ProtocolError("pki.pem", f"expected one certificate, found {len(certs)}")
    return certs[0]


def certs_from_pem(data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ProtocolError("pki.pem", "not a valid PEM certificate bundle") from None


def key_to_pem(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    """PKCS#8 PEM, encrypted when a password is given. The result is secret: write it only with
    ``write_private_key`` (mode 0600, atomic) or hand it to a TLS library."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def key_from_pem(data: bytes, password: bytes | None = None) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError):
        # The loader's message may quote the input; never echo key material.
        raise ProtocolError("pki.pem", "not a valid PEM private key (or wrong password)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ProtocolError("pki.key_type", "only ECDSA P-256 keys are accepted")
    return key


def public_key_to_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def write_certificate(path: str | os.PathLike[str], *certs: x509.Certificate) -> None:
    """Write one certificate or a bundle (world-readable: certificates are public)."""
    atomic_write(path, certs_to_pem(certs), mode=0o644)


def write_private_key(
    path: str | os.PathLike[str], key: ec.EllipticCurvePrivateKey, password: bytes | None = None
) -> None:
    """Write a private key, 0600, atomically."""
    atomic_write(path, key_to_pem(key, password), mode=0o600)
