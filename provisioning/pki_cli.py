"""``keyfleet pki``: the fleet's certificate authorities and certificates from the command line.

``keyfleet pki init DIR`` makes the four CAs of a fleet (docs/mqtt.md, "Certificates") in one
directory, with the file names the example configurations use (docs/examples/):

=================  =========================================================================
``tls-ca``         issues the broker's and the enrollment API's server certificates and the
                   service's MQTT client certificate
``device-ca``      issues DevID and TLS certificates at enrollment; its key is read by
                   ``keyfleet serve`` (``[device_ca] key``), so it is never encrypted
``operator-ca``    issues operator certificates (CN ``op-…``, OU = role)
``station-ca``     issues factory station certificates (``[http] station_ca``)
=================  =========================================================================

plus ``client-cas.pem``, the bundle the broker trusts for client certificates (TLS, device and
operator CA), and ``service-signing.pem``/``.key``: the key that signs the service's messages
(``[service] signing_key``/``signing_cert``), apart from every TLS key.

With ``--token pkcs11:token=LABEL?pin-source=...`` the device CA, operator CA and service signing
keys are made inside that PKCS#11 token (labels ``device-ca``, ``operator-ca``,
``service-signing``; not extractable) instead of files, and ``init`` prints the references to
put in the configuration; ``issue --ca-key REF`` then issues with the token key.
With ``--backup`` those token keys may leave the token wrapped (never in the clear), for
``keyfleet backup create`` (provisioning.backup_cli).
``keyfleet pki token-key URI`` makes one more key in a token (``--backup`` likewise);
``keyfleet pki encrypt-key FILE`` encrypts a plain key file (an operator's) with a passphrase.

``keyfleet pki issue KIND NAME`` makes a key and a certificate from the matching CA:
``operator`` (role in the OU: viewer, operator or admin), ``station``, ``service`` (the service's
MQTT client identity) and ``server`` (TLS server, with the DNS names and addresses clients dial).
``keyfleet pki crl tls|operator`` writes a CRL of that CA (``DIR/<ca>.crl``, numbered above the
previous one) for the broker's ``crlfile`` (``[revocation] broker_crls``).
``keyfleet pki device-ca OUT`` and ``keyfleet pki operator-ca OUT`` make the next device or
operator CA, named with the date, for ``keyfleet keys rotate device-ca|operator-ca``.
``keyfleet pki import-crl CRL --config FILE`` imports a TPM manufacturer CA's CRL
(``provisioning.ekcrls``).

Private keys are written 0600 and atomically, and are never printed. With ``--passphrase-file``
the keys of the offline CAs (TLS, operator, station) are encrypted; ``issue`` then needs the same
file. Nothing is overwritten: an existing target file is an error and nothing is written.
"""

from __future__ import annotations

import argparse
import getpass
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.fsio import atomic_write
from agent.protocol import authz
from agent.protocol.errors import ConfigError, ProtocolError
from agent.protocol.wire.cose import key_id
from provisioning import audit, custody, pki, revocation
from provisioning.config import load_config
from provisioning.db import migrations
from provisioning.ekcrls import import_crl
from provisioning.registry import Outcome, make_engine, session_factory
from provisioning.service import operatorops
from provisioning.service.operators import OPERATOR_PREFIX

EXIT_OK = 0
CA_DAYS = 3650
LEAF_DAYS = 365
CRL_DAYS = 365
ROLES = ("viewer", "operator", "admin")
CLIENT_CA_BUNDLE = "client-cas.pem"
# A name becomes a file name and an MQTT topic level: keep it to what is safe for both.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ENCRYPTED_PEM = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"


@dataclass(frozen=True)
class FleetCA:
    """One of the fleet's CAs: its file stem in the PKI directory, its subject suffix, and
    whether ``--passphrase-file`` encrypts its key."""

    stem: str
    title: str
    offline: bool


TLS_CA = FleetCA("tls-ca", "TLS CA", offline=True)
SIGNING_STEM = "service-signing"
# the keys ``init --token`` makes in the token, by label
TOKEN_LABELS = {"device-ca": "device CA", "operator-ca": "operator CA", SIGNING_STEM: "signing"}
DEVICE_CA = FleetCA("device-ca", "device CA", offline=False)
OPERATOR_CA = FleetCA("operator-ca", "operator CA", offline=True)
STATION_CA = FleetCA("station-ca", "station CA", offline=True)
FLEET_CAS = (TLS_CA, DEVICE_CA, OPERATOR_CA, STATION_CA)
# the CA that issues each kind of client certificate (the OU is the kind, or the operator role)
CLIENT_KINDS = {"operator": OPERATOR_CA, "station": STATION_CA, "service": TLS_CA}


def _read_passphrase(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the passphrase file {path}: {exc.strerror}") from None
    lines = data.splitlines()
    passphrase = lines[0] if lines else b""
    if not passphrase:
        raise ConfigError(f"the passphrase file {path} is empty")
    return passphrase


def _refuse_existing(paths: Sequence[Path]) -> None:
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing:
        raise ConfigError(
            f"refusing to overwrite {', '.join(existing)}: remove it first or choose another "
            "name (nothing was written)"
        )


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"{name!r} is not a usable name: 1-64 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit"
        )
    return name


@contextmanager
def _all_or_nothing(paths: Sequence[Path]) -> Iterator[None]:
    """A write that fails (permissions, full disk) removes whatever of ``paths`` it wrote:
    ``paths`` were checked not to exist before, so nothing of the user's is removed."""
    try:
        yield
    except OSError as exc:
        for path in paths:
            with suppress(OSError):  # never written, or not removable either
                path.unlink()
        raise ConfigError(
            f"cannot write {exc.filename}: {exc.strerror} (nothing was written)"
        ) from None


# ---- keyfleet pki init -------------------------------------------------------------------------


def init_pki(
    directory: Path,
    *,
    organization: str,
    now: datetime,
    valid_for: timedelta,
    passphrase: bytes | None = None,
    token: str | None = None,
    backup: bool = False,
) -> list[Path]:
    """Create the fleet's CAs and the service's signing key in ``directory``; return the files
    written. Refuses (writing nothing) if any of them exists. With ``token`` the device CA,
    operator CA and signing keys are made in that token instead of files (extractable only
    wrapped, for ``keyfleet backup``, when ``backup``)."""
    stems = [ca.stem for ca in FLEET_CAS] + [SIGNING_STEM]
    targets = [directory / f"{stem}{ext}" for stem in stems for ext in (".pem", ".key")]
    bundle = directory / CLIENT_CA_BUNDLE
    _refuse_existing([*targets, bundle])
    keys: dict[str, ec.EllipticCurvePrivateKey] = {}
    if token is not None:
        for label in TOKEN_LABELS:
            ref = token_ref(token, label)
            custody.generate_token_key(ref, backup=backup)
            keys[label] = custody.load_private_key(ref)
    authorities = {
        ca: pki.create_ca(
            f"{organization} {ca.title}", now=now, valid_for=valid_for, key=keys.get(ca.stem)
        )
        for ca in FLEET_CAS
    }
    signing_key = keys.get(SIGNING_STEM) or pki.generate_key()
    signing_cert = pki.issue_client_cert(
        authorities[TLS_CA], signing_key.public_key(), identity="keyfleet-service-signing",
        role="service", now=now, valid_for=valid_for,
    )  # fmt: skip
    written: list[Path] = []
    with _all_or_nothing(written):
        directory.mkdir(parents=True, exist_ok=True)
        for ca, authority in authorities.items():
            cert_path, key_path = directory / f"{ca.stem}.pem", directory / f"{ca.stem}.key"
            if ca.stem not in keys:
                written.append(key_path)
                key_password = passphrase if ca.offline else None
                pki.write_private_key(key_path, authority.private_key, key_password)
            written.append(cert_path)
            pki.write_certificate(cert_path, authority.certificate)
        if SIGNING_STEM not in keys:
            written.append(directory / f"{SIGNING_STEM}.key")
            pki.write_private_key(directory / f"{SIGNING_STEM}.key", signing_key)
        written.append(directory / f"{SIGNING_STEM}.pem")
        pki.write_certificate(directory / f"{SIGNING_STEM}.pem", signing_cert)
        written.append(bundle)
        pki.write_certificate(
            bundle, *(authorities[ca].certificate for ca in (TLS_CA, DEVICE_CA, OPERATOR_CA))
        )
    return written


def token_ref(token: str, label: str) -> custody.TokenKeyRef:
    """The reference of key ``label`` in the token that ``token`` (a ``pkcs11:`` URI with
    ``token=`` and a ``pin-source``, without ``object=``) names."""
    path, sep, query = token.partition("?")
    if ";object=" in path or (path.endswith(":") is False and "object=" in path.split(":", 1)[1]):
        raise ConfigError("--token names the token only (token=...), not a key (object=...)")
    return custody.parse_token_uri(f"{path};object={label}{sep}{query}")


def _init(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory} exists and is not a directory")
    written = init_pki(
        directory,
        organization=args.org,
        now=datetime.now(UTC),
        valid_for=timedelta(days=args.days),
        passphrase=_read_passphrase(args.passphrase_file),
        token=args.token,
        backup=args.backup,
    )
    for path in written:
        print(f"wrote {path}{' (private key, 0600)' if path.suffix == '.key' else ''}")
    if args.token is not None:
        for label in TOKEN_LABELS:
            ref = token_ref(args.token, label)
            print(f"made {label} in the token: {custody.describe(ref)}; reference {ref.uri}")
    return EXIT_OK


# ---- keyfleet pki issue ------------------------------------------------------------------------


def load_ca(
    directory: Path, ca: FleetCA, passphrase: bytes | None, ca_key: str | None = None
) -> pki.CertificateAuthority:
    """A CA of ``keyfleet pki init``'s layout, with its key (or the key ``ca_key`` names, e.g. a
    ``pkcs11:`` URI); clear errors for what is missing."""
    cert_path, key_path = directory / f"{ca.stem}.pem", directory / f"{ca.stem}.key"
    if ca_key is not None:
        try:
            certificate = pki.cert_from_pem(cert_path.read_bytes())
        except OSError as exc:
            raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None
        key = custody.load_private_key(custody.parse_key_ref(ca_key), role=ca.title)
        if certificate.public_key() != key.public_key():
            raise ConfigError(f"{ca_key} is not the key of {cert_path}")
        return pki.CertificateAuthority(certificate=certificate, private_key=key)
    try:
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the {ca.title} at {exc.filename}: {exc.strerror} (is {directory} a "
            "directory made by `keyfleet pki init`? see --dir)"
        ) from None
    if _ENCRYPTED_PEM in key_pem and passphrase is None:
        raise ConfigError(f"{key_path} is encrypted: give --passphrase-file")
    try:
        key = pki.key_from_pem(key_pem, passphrase if _ENCRYPTED_PEM in key_pem else None)
        certificate = pki.cert_from_pem(cert_pem)
    except ProtocolError as exc:
        raise ConfigError(f"{ca.title} in {directory}: {exc}") from None
    if certificate.public_key() != key.public_key():
        raise ConfigError(f"{key_path} is not the key of {cert_path}")
    return pki.CertificateAuthority(certificate=certificate, private_key=key)


def issue(
    kind: str,
    name: str,
    *,
    directory: Path,
    out: Path,
    now: datetime,
    valid_for: timedelta,
    role: str | None = None,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    passphrase: bytes | None = None,
    ca_key: str | None = None,
) -> tuple[Path, Path]:
    """Issue a ``kind`` certificate for ``name``; write ``out``.pem and ``out``.key (0600).
    ``ca_key``: the issuing CA's key reference when it is not the file of ``directory``."""
    _check_name(name)
    cert_path, key_path = out.with_name(out.name + ".pem"), out.with_name(out.name + ".key")
    _refuse_existing([cert_path, key_path])
    key: ec.EllipticCurvePrivateKey = pki.generate_key()
    certificate: x509.Certificate
    if kind == "server":
        if role is not None:
            raise ConfigError("--role applies to operators only")
        if not dns_names and not ip_addresses:
            raise ConfigError("a server certificate needs --dns NAME or --ip ADDRESS (or both)")
        ca = load_ca(directory, TLS_CA, passphrase, ca_key)
        try:
            certificate = pki.issue_server_cert(
                ca,
                key.public_key(),
                common_name=name,
                dns_names=dns_names,
                ip_addresses=ip_addresses,
                now=now,
                valid_for=valid_for,
            )
        except ValueError as exc:  # an unparsable --ip
            raise ConfigError(f"server certificate for {name}: {exc}") from None
    else:
        if dns_names or ip_addresses:
            raise ConfigError("--dns and --ip apply to server certificates only")
        if kind == "operator":
            if not name.startswith(OPERATOR_PREFIX):
                raise ConfigError(f"operator names start with {OPERATOR_PREFIX!r}: {name!r}")
            unit = role or "viewer"
        elif role is not None:
            raise ConfigError("--role applies to operators only")
        else:
            unit = kind
        ca = load_ca(directory, CLIENT_KINDS[kind], passphrase, ca_key)
        certificate = pki.issue_client_cert(
            ca, key.public_key(), identity=name, role=unit, now=now, valid_for=valid_for
        )
    with _all_or_nothing([key_path, cert_path]):
        out.parent.mkdir(parents=True, exist_ok=True)
        pki.write_private_key(key_path, key)
        pki.write_certificate(cert_path, certificate)
    return cert_path, key_path


def _issue(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    out = Path(args.out) if args.out is not None else directory / args.name
    cert_path, key_path = issue(
        args.kind,
        args.name,
        directory=directory,
        out=out,
        now=datetime.now(UTC),
        valid_for=timedelta(days=args.days),
        role=args.role,
        dns_names=args.dns,
        ip_addresses=args.ip,
        passphrase=_read_passphrase(args.passphrase_file),
        ca_key=args.ca_key,
    )
    certificate = pki.cert_from_pem(cert_path.read_bytes())
    role = pki.role_of(certificate)
    print(
        f"{args.kind} {args.name}{f' (role {role})' if args.kind == 'operator' else ''}: "
        f"certificate {cert_path}, key {key_path} (0600), issued by "
        f"{certificate.issuer.rfc4514_string()}, valid until "
        f"{certificate.not_valid_after_utc:%Y-%m-%d}"
    )
    return EXIT_OK


# ---- keyfleet pki device-ca / operator-ca: the next CA, for a rollover -------------------------


def _next_ca(args: argparse.Namespace, fleet_ca: FleetCA) -> int:
    """A new CA for ``keyfleet keys rotate device-ca|operator-ca``: its certificate ``OUT.pem``
    and, unless ``--key`` names a key made in the token (``pki token-key``), its key
    ``OUT.key`` (an offline CA's encrypted with ``--passphrase-file`` if given)."""
    out = Path(args.out)
    cert_path, key_path = out.with_name(out.name + ".pem"), out.with_name(out.name + ".key")
    _refuse_existing([cert_path] if args.key else [cert_path, key_path])
    key = None if args.key is None else custody.load_private_key(args.key, role=fleet_ca.title)
    passphrase = _read_passphrase(getattr(args, "passphrase_file", None))
    now = datetime.now(UTC)
    # a name of its own: the broker finds a certificate's CRL by its issuer's name
    authority = pki.create_ca(
        f"{args.org} {fleet_ca.title} {now:%Y-%m-%d}", now=now,
        valid_for=timedelta(days=args.days), key=key,
    )  # fmt: skip
    written: list[Path] = []
    with _all_or_nothing(written):
        out.parent.mkdir(parents=True, exist_ok=True)
        if key is None:
            written.append(key_path)
            pki.write_private_key(key_path, authority.private_key, passphrase)
            print(f"wrote {key_path} (private key, 0600)")
        written.append(cert_path)
        pki.write_certificate(cert_path, authority.certificate)
        print(f"wrote {cert_path}")
    return EXIT_OK


def _device_ca(args: argparse.Namespace) -> int:
    return _next_ca(args, DEVICE_CA)


def _operator_ca(args: argparse.Namespace) -> int:
    return _next_ca(args, OPERATOR_CA)


# ---- keys: in a token, or encrypted -------------------------------------------------------------


def _token_key(args: argparse.Namespace) -> int:
    ref = custody.parse_token_uri(args.uri)
    if ref.label is None:
        raise ConfigError("the new key needs a label: object=LABEL in the URI")
    public = custody.generate_token_key(ref, backup=args.backup)
    how = "extractable only wrapped, for backup" if args.backup else "not extractable"
    print(
        f"made a P-256 key (sensitive, {how}) in {custody.describe(ref)}; "
        f"kid {key_id(public).hex()}"
    )
    sys.stdout.write(pki.public_key_to_pem(public).decode())
    return EXIT_OK


def _encrypt_key(args: argparse.Namespace) -> int:
    path = Path(args.key)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None
    if _ENCRYPTED_PEM in data:
        raise ConfigError(f"{path} is encrypted already (nothing was changed)")
    passphrase = _read_passphrase(args.passphrase_file)
    assert passphrase is not None  # the flag is required
    try:
        key = pki.key_from_pem(data)
    except ProtocolError as exc:
        raise ConfigError(f"{path}: {exc} (nothing was changed)") from None
    pki.write_private_key(path, key, passphrase)
    print(f"{path}: encrypted with the passphrase of {args.passphrase_file} (0600)")
    return EXIT_OK


# ---- keyfleet pki crl --------------------------------------------------------------------------


def _crl(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    fleet_ca = TLS_CA if args.ca == "tls" else OPERATOR_CA
    ca = load_ca(directory, fleet_ca, _read_passphrase(args.passphrase_file), args.ca_key)
    path = directory / f"{fleet_ca.stem}.crl"
    previous = revocation.file_crl_number(path) if path.exists() else None
    now = int(datetime.now(UTC).timestamp())
    revoked: list[tuple[int, int]] = []
    if args.config is not None:
        if args.ca != "operator":
            raise ConfigError("pki crl --config lists removed operators: only for the operator CA")
        revoked = _removed_operator_serials(args.config, ca.certificate)
    crl = revocation.build_crl(
        ca,
        revoked,
        number=(previous or 0) + 1,
        this_update=now,
        next_update=now + args.days * 86400,
    )
    atomic_write(path, crl.public_bytes(serialization.Encoding.PEM), mode=0o644)
    listed = f", {len(revoked)} certificate(s) revoked" if revoked else ""
    print(f"wrote {path} (CRL {revocation.crl_number(crl)} of the {fleet_ca.title}{listed})")
    return EXIT_OK


def _removed_operator_serials(
    config_path: str, operator_ca: x509.Certificate
) -> list[tuple[int, int]]:
    """(serial, removed at) of every operator certificate a quorum removed (removals whose kept
    approvals verify: ``operatorops.verified_removals``), from the service's database."""
    config = load_config(Path(config_path))
    if pki.cert_from_pem(config.operator_ca_cert.read_bytes()) != operator_ca:
        raise ConfigError(f"{config_path}: [operator_ca] cert is not DIR's operator CA")
    engine = make_engine(config.database_url)
    try:
        migrations.require_current(engine, how=f"--config {config_path}")
        with session_factory(engine)() as session:
            found = operatorops.verified_removals(
                session, authz.AuthzVerifier([operator_ca]), config.quorum.min_approvals
            )
    finally:
        engine.dispose()
    revoked = []
    for removal in found:
        if removal.cert is None:
            print(
                f"keyfleet: the removal of {removal.operator} kept no certificate: its serial "
                "cannot be listed (its commands are refused by the service all the same)",
                file=sys.stderr,
            )
            continue
        revoked.append((removal.cert.serial_number, removal.at))
    return revoked


# ---- keyfleet pki import-crl ---------------------------------------------------------------------


def _import_crl(args: argparse.Namespace) -> int:
    """Check a manufacturer CA's CRL and add it to ``[attestation] manufacturer_crls``
    (provisioning.ekcrls); accepted or refused, it is audited in the service's database (which
    must be at the current schema: checked before anything is written)."""
    config = load_config(args.config)
    crl_path = config.attestation.manufacturer_crls
    if crl_path is None:
        raise ConfigError(
            f"{config.path}: [attestation] manufacturer_crls is not set: name the file the "
            "imported CRLs are kept in (e.g. pki/manufacturer-crls.pem) and run this again"
        )
    try:
        data = Path(args.crl).read_bytes()
        bundle = pki.certs_from_pem(config.attestation.manufacturer_cas.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None
    engine = make_engine(config.database_url)
    try:
        migrations.require_current(engine, how=f"--config {args.config}")
        sessions = session_factory(engine)
        now = int(time.time())
        actor = f"local:{getpass.getuser()}"
        try:
            checked = import_crl(bundle, crl_path, data, now=datetime.fromtimestamp(now, UTC))
        except ProtocolError as err:
            audit.record(
                sessions,
                now=now,
                actor=actor,
                action="pki.import_crl",
                target=str(args.crl),
                outcome=Outcome.REFUSED,
                reason=f"[{err.check}] {err.reason}",
            )
            raise
        for crl in checked:
            issuer = crl.issuer.subject.rfc4514_string()
            audit.record(
                sessions,
                now=now,
                actor=actor,
                action="pki.import_crl",
                target=issuer,
                outcome=Outcome.ACCEPTED,
                details={"crl_number": crl.number, "revoked": len(crl.crl), "file": str(crl_path)},
            )
            next_update = crl.crl.next_update_utc
            print(
                f"CRL of {issuer} imported into {crl_path}: number {crl.number}, "
                f"{len(crl.crl)} revoked, next update "
                f"{'-' if next_update is None else f'{next_update:%Y-%m-%d %H:%M} UTC'}"
            )
    finally:
        engine.dispose()
    return EXIT_OK


# ---- the argparse tree -------------------------------------------------------------------------


def _days(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 36500:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days from 1 to 36500")
    return int(text)


def add_pki_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``keyfleet pki init`` and ``keyfleet pki issue`` to the ``keyfleet`` parser."""
    parser = commands.add_parser("pki", help="the fleet's CAs and certificates")
    pki_commands = parser.add_subparsers(dest="pki_command", required=True, metavar="COMMAND")
    ca_key_file_help = (
        "file whose first line encrypts (init) or decrypts (issue) the TLS, operator and station "
        "CA keys; the device CA key stays readable by the service"
    )

    init = pki_commands.add_parser(
        "init",
        help="create the fleet's CAs (TLS, device, operator, station) in DIR",
        description=(
            "Write tls-ca, device-ca, operator-ca and station-ca (.pem certificate, .key private "
            "key 0600) and client-cas.pem (the CAs the broker trusts for clients) into DIR. "
            "Refuses to overwrite anything."
        ),
    )
    init.add_argument("directory", metavar="DIR", help="the PKI directory (made if missing)")
    init.add_argument("--org", default="keyfleet", help="prefix of the CA names (keyfleet)")
    init.add_argument("--days", type=_days, default=CA_DAYS, help=f"validity ({CA_DAYS})")
    init.add_argument("--passphrase-file", metavar="FILE", help=ca_key_file_help)
    init.add_argument(
        "--token",
        metavar="URI",
        help="make the device CA, operator CA and service signing keys in this PKCS#11 token "
        "(pkcs11:token=LABEL?pin-source=file:PATH) instead of files",
    )
    init.add_argument(
        "--backup",
        action="store_true",
        help="with --token: let the token keys out wrapped (never in the clear), so that "
        "keyfleet backup create can back them up",
    )
    init.set_defaults(handler=_init)

    token_key = pki_commands.add_parser(
        "token-key",
        help="make a P-256 key inside a PKCS#11 token",
        description="Make a P-256 key pair in the token the URI names (object=LABEL), sensitive "
        "and not extractable; print its public key. Refuses an existing label.",
    )
    token_key.add_argument("uri", metavar="URI", help="pkcs11:token=T;object=L?pin-source=...")
    token_key.add_argument(
        "--backup",
        action="store_true",
        help="let the key out wrapped (never in the clear), for keyfleet backup create",
    )
    token_key.set_defaults(handler=_token_key)

    next_ca_help = {
        "device-ca": (DEVICE_CA, _device_ca, "pki/device-ca-2", ""),
        "operator-ca": (
            OPERATOR_CA,
            _operator_ca,
            "pki-2/operator-ca",
            " An offline CA: keep OUT.key off the service host (--passphrase-file encrypts it); "
            "name OUT DIR/operator-ca so that keyfleet pki issue operator --dir DIR and "
            "keyfleet pki crl operator --dir DIR use it.",
        ),
    }
    for command, (fleet_ca, handler, example, note) in next_ca_help.items():
        next_ca = pki_commands.add_parser(
            command,
            help=f"create the next {fleet_ca.title}, for keyfleet keys rotate {command}",
            description=f"Write OUT.pem, a new self-signed {fleet_ca.title} certificate (its "
            "name carries the date), and OUT.key, its key (0600), or with --key use a key made "
            f"in the token (keyfleet pki token-key). Refuses to overwrite anything.{note}",
        )
        next_ca.add_argument("out", metavar="OUT", help=f"path without suffix, e.g. {example}")
        next_ca.add_argument("--org", default="keyfleet", help="prefix of the CA name (keyfleet)")
        next_ca.add_argument("--days", type=_days, default=3650, help="validity (3650)")
        next_ca.add_argument(
            "--key",
            metavar="URI",
            help="the CA key in a token: pkcs11:token=T;object=L?pin-source=...",
        )
        if fleet_ca.offline:
            next_ca.add_argument(
                "--passphrase-file", metavar="FILE", help="encrypt OUT.key with its first line"
            )
        next_ca.set_defaults(handler=handler)

    encrypt = pki_commands.add_parser(
        "encrypt-key",
        help="encrypt a plain private key file with a passphrase",
        description="Rewrite KEY (a plain PEM private key, e.g. an operator's) encrypted with "
        "the first line of --passphrase-file; the operator CLI then asks for the passphrase.",
    )
    encrypt.add_argument("key", metavar="KEY")
    encrypt.add_argument("--passphrase-file", metavar="FILE", required=True)
    encrypt.set_defaults(handler=_encrypt_key)

    issue_parser = pki_commands.add_parser(
        "issue",
        help="make a key and certificate: operator, station, service or server",
        description=(
            "Make a P-256 key and a certificate for NAME from the matching CA of DIR: operator "
            "(operator CA, OU = --role), station (station CA), service (TLS CA: the service's "
            "MQTT client identity, CN keyfleet-service) or server (TLS CA, serverAuth, SANs from "
            "--dns/--ip). Writes OUT.pem and OUT.key (0600); refuses to overwrite."
        ),
    )
    issue_parser.add_argument("kind", choices=("operator", "station", "service", "server"))
    issue_parser.add_argument("name", help="the identity, the certificate's CN (op-... operators)")
    issue_parser.add_argument(
        "--role", choices=ROLES, help="operators only: the role, written as the OU (viewer)"
    )
    issue_parser.add_argument("--dir", default=".", metavar="DIR", help="the PKI directory (.)")
    issue_parser.add_argument(
        "--out", metavar="PREFIX", help="write PREFIX.pem and PREFIX.key (default DIR/NAME)"
    )
    issue_parser.add_argument(
        "--dns", action="append", default=[], metavar="NAME", help="server: a DNS name (repeat)"
    )
    issue_parser.add_argument(
        "--ip", action="append", default=[], metavar="ADDRESS", help="server: an IP (repeat)"
    )
    issue_parser.add_argument("--days", type=_days, default=LEAF_DAYS, help=f"({LEAF_DAYS})")
    issue_parser.add_argument("--passphrase-file", metavar="FILE", help=ca_key_file_help)
    issue_parser.add_argument(
        "--ca-key",
        metavar="REF",
        help="the issuing CA's key when it is not DIR's file: a pkcs11: URI or a file",
    )
    issue_parser.set_defaults(handler=_issue)

    crl_parser = pki_commands.add_parser(
        "crl",
        help="write a CRL of the TLS or operator CA for the broker's crlfile",
        description=(
            "Write DIR/CA.crl: a CRL of the TLS or operator CA, numbered one above the file's "
            "previous one, listing no certificate (with --config, for the operator CA: every "
            "operator certificate the quorum removed), valid for --days. With crlfile set the "
            "broker refuses every client whose CA has no current CRL in it: name these files in "
            "[revocation] broker_crls and issue them again before they expire "
            "(docs/operations.md, \"Revocation\"). The device CA's CRL is the service's "
            "(keyfleet crl)."
        ),
    )
    crl_parser.add_argument("ca", choices=("tls", "operator"))
    crl_parser.add_argument("--dir", default=".", metavar="DIR", help="the PKI directory (.)")
    crl_parser.add_argument("--days", type=_days, default=CRL_DAYS, help=f"({CRL_DAYS})")
    crl_parser.add_argument("--passphrase-file", metavar="FILE", help=ca_key_file_help)
    crl_parser.add_argument(
        "--config",
        metavar="FILE",
        help="operator CA: list every operator certificate the quorum removed (service database)",
    )
    crl_parser.add_argument(
        "--ca-key",
        metavar="REF",
        help="the CA's key when it is not DIR's file: a pkcs11: URI or a file (custody)",
    )
    crl_parser.set_defaults(handler=_crl)
    import_parser = pki_commands.add_parser(
        "import-crl",
        help="import a TPM manufacturer CA's CRL (EK certificates it lists stop enrolling)",
        description=(
            "Check CRL (PEM or DER: signed by a CA of [attestation] manufacturer_cas allowed to "
            "sign CRLs, current, complete, not older than the one already imported for that CA) "
            "and keep it in [attestation] manufacturer_crls in place of that CA's older one. "
            "Enrollment refuses EK certificates it lists (ek.revoked) from the next enrollment on."
        ),
    )
    import_parser.add_argument("crl", metavar="CRL", help="the CRL file")
    import_parser.add_argument(
        "--config", metavar="FILE", required=True, help="service configuration"
    )
    import_parser.set_defaults(handler=_import_crl)
