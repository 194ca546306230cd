"""``keyfleet keys rotate service-signing``, ``device-ca``, ``broker-ca`` and ``operator-ca``:
the service signing key's and the CAs' rollovers under the quorum (docs/operations.md, "Rolling
over the service signing key", "... the device CA", "... the broker CA", "... the operator
CA"; docs/trust.md).

``--new-cert FILE`` is the new key's certificate, ``--new-key REF`` where the service finds the
key (a ``pkcs11:`` URI with a PIN source, or a file on the service host: the custodian created
it there; the private key never leaves it), ``--overlap SECONDS`` how long after the request's
window the old key stays accepted. The service answers with a ``trust.rotate`` request whose
subject is the next trust bundle itself; this tool shows it, checks that its new key is the
certificate's, approves it as the proposer and follows it; further admins approve it with
``keyfleet approve ID``, whose listing shows the same bundle.

``broker-ca --new-ca FILE`` and ``operator-ca --new-ca FILE`` roll the broker CA and the
operator CA over likewise, with no key (the broker's PKI keeps the broker CA's, the operator CA
is offline). ``device-ca --new-ca FILE --new-key REF`` does the same for the device CA:
``--new-ca`` is the new CA's certificate, ``--new-key`` its key on the service host. The broker
must accept client certificates of the new CA before the rollover runs (its ``cafile``): this
tool cannot check that, the runbook's first step does it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from agent.protocol import authz, trust
from agent.protocol.errors import ConfigError, ProtocolError
from agent.protocol.wire.messages.operator import (
    MAX_OVERLAP,
    ROTATE_BROKER_CA,
    ROTATE_DEVICE_CA,
    ROTATE_OPERATOR_CA,
    Propose,
)
from provisioning.operator import OperatorClient
from provisioning.operators_cli import read_certificate_der
from provisioning.requests_cli import propose_and_approve
from provisioning.service import trustroll

DEFAULT_OVERLAP = 7 * 86400


def read_new_key(path: str) -> bytes:
    """``--new-cert``: a PEM certificate (its DER), or a PEM public key (its SubjectPublicKeyInfo
    DER: what ``keyfleet pki token-key`` prints for a key made in the token)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" in data:
        return read_certificate_der(path)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise ConfigError(f"{path}: neither a PEM certificate nor a PEM public key") from None
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


CA_TARGETS = {
    # ``keys rotate`` target: (what it names, Propose.rotate, names a key on the service host)
    "device-ca": ("the device CA", ROTATE_DEVICE_CA, True),
    "broker-ca": ("the broker CA", ROTATE_BROKER_CA, False),
    "operator-ca": ("the operator CA", ROTATE_OPERATOR_CA, False),
}


def ca_proposal(args: argparse.Namespace, command_id: bytes) -> tuple[str, Propose]:
    """``keys rotate device-ca|broker-ca|operator-ca``: the new CA's certificate and (device CA
    only) its key reference; the broker's PKI keeps the broker CA's key, the operator CA is
    offline."""
    what, rotate, keyed = CA_TARGETS[args.rotate_command]
    der = read_certificate_der(args.new_ca)
    if not 0 <= args.overlap <= MAX_OVERLAP:
        raise ConfigError(f"--overlap: 0..{MAX_OVERLAP} seconds")
    try:
        ca = trustroll.device_ca_of(der) if rotate != ROTATE_BROKER_CA else trust.DeviceCA(der)
    except ProtocolError as exc:
        raise ConfigError(f"{args.new_ca}: {exc.reason}") from None
    label = (
        f"rotate {what} to {ca.certificate.subject.rfc4514_string()} "
        f"(SHA-256 {ca.fingerprint.hex()[:16]}…)"
    )
    body = Propose(
        command_id,
        authz.OP_TRUST_ROTATE,
        (),
        cert=der,
        key_ref=args.new_key if keyed else None,
        overlap=args.overlap,
        rotate=rotate,
    )
    return label, body


def proposal(args: argparse.Namespace, command_id: bytes) -> tuple[str, Propose]:
    if args.rotate_command in CA_TARGETS:
        return ca_proposal(args, command_id)
    der = read_new_key(args.new_cert)
    if not 0 <= args.overlap <= MAX_OVERLAP:
        raise ConfigError(f"--overlap: 0..{MAX_OVERLAP} seconds")
    try:
        spki = trust.key_der(trustroll.public_key_of(der))
    except ProtocolError as exc:
        raise ConfigError(f"{args.new_cert}: {exc.reason}") from None
    label = f"rotate the service signing key to {trust.ServiceKey(spki).kid.hex()[:16]}…"
    body = Propose(
        command_id,
        authz.OP_TRUST_ROTATE,
        (),
        cert=der,
        key_ref=args.new_key,
        overlap=args.overlap,
    )
    return label, body


def run(client: OperatorClient, args: argparse.Namespace) -> int:
    label, body = proposal(args, client.new_command_id())
    return propose_and_approve(client, body, label, json_lines=args.json, timeout=args.timeout)


def add_commands(
    keys_commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    add_operator_options: Callable[[argparse.ArgumentParser], None],
    handler: Callable[[argparse.Namespace], int],
) -> None:
    rotate = keys_commands.add_parser(
        "rotate",
        help="roll a fleet key over under the quorum (service-signing, device-ca, broker-ca, "
        "operator-ca)",
    )
    which = rotate.add_subparsers(dest="rotate_command", required=True)
    service = which.add_parser(
        "service-signing",
        help="request the service signing key's rollover (admins, quorum)",
        description=(
            "Request a trust.rotate: the next trust bundle accepts the new key, and the current "
            "key until the request's window closes plus --overlap. Once a quorum of admins "
            "approved it the service signs the bundle with the current key, publishes the "
            "chain and signs with the new key from then on."
        ),
    )
    service.add_argument(
        "--new-cert",
        metavar="FILE",
        required=True,
        help="the new key's certificate, or its PEM public key (keyfleet pki token-key prints it)",
    )
    service.add_argument(
        "--new-key",
        metavar="REF",
        required=True,
        help="where the service loads the new key: a pkcs11: URI (with pin-source) or a file "
        "on the service host (relative to its configuration)",
    )
    service.add_argument(
        "--overlap",
        type=int,
        default=DEFAULT_OVERLAP,
        metavar="SECONDS",
        help=f"the old key stays accepted this long after the request's window "
        f"(default {DEFAULT_OVERLAP})",
    )
    add_operator_options(service)
    service.set_defaults(handler=handler)
    device_ca = which.add_parser(
        "device-ca",
        help="request the device CA's rollover (admins, quorum)",
        description=(
            "Request a trust.rotate: the next trust bundle makes the new CA the one the service "
            "issues device certificates from, and keeps the current CA accepted until the "
            "request's window closes plus the longer of the certificate validity and --overlap "
            "(every certificate it issued expires by then). First add the new CA to the "
            "broker's cafile and restart the broker (docs/operations.md, 'Rolling over the "
            "device CA'): this command cannot check it."
        ),
    )
    device_ca.add_argument(
        "--new-ca", metavar="FILE", required=True, help="the new device CA's certificate (PEM)"
    )
    device_ca.add_argument(
        "--new-key",
        metavar="REF",
        required=True,
        help="where the service loads the new CA's key: a pkcs11: URI (with pin-source) or a "
        "file on the service host (relative to its configuration)",
    )
    device_ca.add_argument(
        "--overlap",
        type=int,
        default=0,
        metavar="SECONDS",
        help="keep the old CA accepted at least this long after the request's window (default "
        "0: the certificate validity decides)",
    )
    add_operator_options(device_ca)
    device_ca.set_defaults(handler=handler)
    add_unkeyed_ca_command(
        which,
        "broker-ca",
        "broker CA",
        description=(
            "Request a trust.rotate: the next trust bundle makes the new CA the one the broker's "
            "TLS certificate is to chain to, and keeps the current one until the request's "
            "window closes plus --overlap. Devices that take it accept both for the broker and "
            "reconnect; then move the broker to a certificate of the new CA within the overlap "
            "(docs/operations.md, 'Rolling over the broker CA')."
        ),
        add_operator_options=add_operator_options,
        handler=handler,
    )
    add_unkeyed_ca_command(
        which,
        "operator-ca",
        "operator CA",
        description=(
            "Request a trust.rotate, approved by operators of the current operator CA: the next "
            "trust bundle makes the new CA the one operator certificates chain to, and keeps "
            "the current one until the request's window closes plus --overlap (re-issue every "
            "operator's certificate from the new CA within it). First add the new CA to the "
            "broker's cafile and its CRL to [revocation] broker_crls (docs/operations.md, "
            "'Rolling over the operator CA'): this command cannot check it."
        ),
        add_operator_options=add_operator_options,
        handler=handler,
    )


def add_unkeyed_ca_command(
    which: argparse._SubParsersAction,  # type: ignore[type-arg]
    name: str,
    what: str,
    *,
    description: str,
    add_operator_options: Callable[[argparse.ArgumentParser], None],
    handler: Callable[[argparse.Namespace], int],
) -> None:
    """``keys rotate broker-ca`` and ``operator-ca``: a CA rolled over with no key on the
    service host (``--new-ca``, ``--overlap``); ``ca_proposal`` reads what they parse."""
    command = which.add_parser(
        name, help=f"request the {what}'s rollover (admins, quorum)", description=description
    )
    command.add_argument(
        "--new-ca", metavar="FILE", required=True, help=f"the new {what}'s certificate (PEM)"
    )
    command.add_argument(
        "--overlap",
        type=int,
        default=DEFAULT_OVERLAP,
        metavar="SECONDS",
        help=f"the old {what} stays accepted this long after the request's window "
        f"(default {DEFAULT_OVERLAP})",
    )
    add_operator_options(command)
    command.set_defaults(handler=handler)
