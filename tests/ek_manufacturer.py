"""A TPM manufacturer's PKI for EK-chain tests: a root, intermediates and EK certificates shaped
like the TCG EK Credential Profile (empty subject, critical subjectAltName directoryName naming
the TPM, tcg-kp-EKCertificate, keyEncipherment for RSA / keyAgreement for ECC), and CRLs. Made
with pyca's builders; the EK key may be a real TPM's (``ek_certificate(..., public_key=)``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from provisioning.ekchain import TCG_EK_CERTIFICATE

TPM_MANUFACTURER = x509.ObjectIdentifier("2.23.133.2.1")
TPM_MODEL = x509.ObjectIdentifier("2.23.133.2.2")
TPM_VERSION = x509.ObjectIdentifier("2.23.133.2.3")

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def key_usage(**bits: bool) -> x509.KeyUsage:
    names = (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    )
    return x509.KeyUsage(**{n: bits.get(n, False) for n in names})


@dataclass
class CA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)


def make_ca(
    name: str,
    now: datetime,
    *,
    parent: CA | None = None,
    path_length: int | None = None,
    crl_sign: bool = True,
    cert_sign: bool = True,
    days: int = 365,
) -> CA:
    key = ec.generate_private_key(ec.SECP384R1())
    signer = parent.key if parent is not None else key
    issuer = parent.cert.subject if parent is not None else _name(name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(key_usage(key_cert_sign=cert_sign, crl_sign=crl_sign), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
            critical=False,
        )
        .sign(signer, hashes.SHA384())
    )
    return CA(cert, key)


def ek_certificate(
    issuer: CA,
    now: datetime,
    *,
    public_key: PublicKey | None = None,
    usage: x509.KeyUsage | None = None,
    with_usage: bool = True,
    purposes: list[x509.ObjectIdentifier] | None = None,
    ca: bool = False,
    serial: int | None = None,
    days: int = 365,
) -> x509.Certificate:
    """An EK certificate from ``issuer`` for ``public_key`` (default a fresh RSA-2048 key) with
    the keyUsage the TCG profile asks for its algorithm unless ``usage`` says otherwise."""
    key = public_key or rsa.generate_private_key(65537, 2048).public_key()
    if usage is None:
        usage = (
            key_usage(key_encipherment=True)
            if isinstance(key, rsa.RSAPublicKey)
            else key_usage(key_agreement=True)
        )
    tpm = x509.Name(
        [
            x509.NameAttribute(TPM_MANUFACTURER, "id:00001014"),
            x509.NameAttribute(TPM_MODEL, "swtpm"),
            x509.NameAttribute(TPM_VERSION, "id:20191023"),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer.cert.subject)
        .public_key(key)
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DirectoryName(tpm)]), critical=True)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(purposes if purposes is not None else [TCG_EK_CERTIFICATE]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    if with_usage:
        builder = builder.add_extension(usage, critical=True)
    return builder.sign(issuer.key, hashes.SHA384())


def crl(
    issuer: CA,
    now: datetime,
    *,
    revoked: tuple[int, ...] = (),
    number: int = 1,
    next_update: timedelta = timedelta(days=7),
    this_update: timedelta = timedelta(hours=-1),
    delta: bool = False,
) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(now + this_update)
        .next_update(now + next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    if delta:
        builder = builder.add_extension(x509.DeltaCRLIndicator(number - 1), critical=True)
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - timedelta(hours=2))
            .build()
        )
    return builder.sign(issuer.key, hashes.SHA384())
