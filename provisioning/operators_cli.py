"""``keyfleet operator``: operators of the fleet (docs/operations.md, "Operator management").

- ``operator add NAME --operator-cert FILE``, ``operator remove NAME``, ``operator role NAME
  ROLE``: a dual-control request of op ``operator.add``/``operator.remove``/``operator.role``
  (admins) and this admin's approval, as ``keyfleet propose`` makes one; further admins approve
  it with ``keyfleet approve ID``. The request's subject binds the operator and the SHA-256 of
  its certificate (and the role), which this tool checks before signing.
- ``operator add NAME --cert FILE --config FILE``: the local bootstrap on the service host, for
  the first operators of a fleet only: refused (``operator.bootstrap.closed``) once the fleet is
  in use (an operator command was accepted, or an operator request exists).
- ``operator list [--json]``: every operator ever registered, its state (active or removed),
  role, certificate fingerprint and who approved it (``bootstrap`` for a local registration).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.protocol import authz
from agent.protocol.errors import ConfigError, ProtocolError
from agent.protocol.operatorsubject import OperatorSubject
from agent.protocol.wire.messages.operator import Propose
from provisioning import pki
from provisioning.db.runtime import OperatorCommand, QuorumRequestRow
from provisioning.listings import Row
from provisioning.operator import OperatorClient
from provisioning.registry import Registry
from provisioning.requests_cli import propose_and_approve
from provisioning.service.store import quorum

BOOTSTRAP_CLOSED = "operator.bootstrap.closed"


def read_certificate_der(path: str) -> bytes:
    try:
        cert = pki.cert_from_pem(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None
    return cert.public_bytes(serialization.Encoding.DER)


def proposal(args: argparse.Namespace, command_id: bytes) -> tuple[str, Propose]:
    """The ``op.propose`` of ``operator add|remove|role``."""
    name = args.name
    if args.operator_command == "add":
        if args.operator_cert is None:
            raise ConfigError(
                "operator add: --operator-cert FILE names the new operator's certificate "
                "(--cert is yours; with --config it is the local bootstrap)"
            )
        if args.role is not None:
            raise ConfigError(
                "operator add: the role is the certificate's OU; narrow it afterwards with "
                "keyfleet operator role"
            )
        der = read_certificate_der(args.operator_cert)
        body = Propose(command_id, authz.OP_OPERATOR_ADD, (), operator=name, cert=der)
        return f"add operator {name}", body
    if args.operator_command == "remove":
        return f"remove operator {name}", Propose(
            command_id, authz.OP_OPERATOR_REMOVE, (), operator=name
        )
    body = Propose(command_id, authz.OP_OPERATOR_ROLE, (), operator=name, role=args.role)
    return f"set operator {name}'s role to {args.role}", body


def run_request(client: OperatorClient, args: argparse.Namespace) -> int:
    label, body = proposal(args, client.new_command_id())
    return propose_and_approve(client, body, label, json_lines=args.json, timeout=args.timeout)


# -- the local bootstrap ------------------------------------------------------------------------


def check_bootstrap_open(session: Session) -> None:
    """The local ``operator add`` registers a fleet's first operators, before anyone uses it:
    refused once an operator command was accepted or an operator request exists (from then on
    operators are managed by the quorum, over signed commands)."""
    used = session.scalar(select(OperatorCommand.command_id).limit(1)) is not None
    managed = (
        session.scalar(
            select(QuorumRequestRow.request_id)
            .where(QuorumRequestRow.op.in_(sorted(authz.OPERATOR_OPS)))
            .limit(1)
        )
        is not None
    )
    if used or managed:
        raise ProtocolError(
            BOOTSTRAP_CLOSED,
            "the fleet is in use: operators are added by the quorum now, with "
            "keyfleet operator add NAME --operator-cert FILE (signed, approved by the admins)",
        )


# -- list ---------------------------------------------------------------------------------------


def operator_rows(session: Session) -> list[Row]:
    """Every registered operator with its state as the executed requests record it (the
    service re-verifies a removal's approvals before it acts on it)."""
    removed: dict[str, str] = {}
    approved: dict[str, str] = {}
    for op in (authz.OP_OPERATOR_ADD, authz.OP_OPERATOR_REMOVE):
        for stored in quorum.requests_of_op(session, op):
            if stored.state.value != "executed":
                continue
            subject = OperatorSubject.decode(authz.Request.decode(stored.request).subject or b"")
            target = removed if op == authz.OP_OPERATOR_REMOVE else approved
            target[subject.cert_sha256.hex()] = ",".join(stored.approvers)
    rows: list[Row] = []
    for record in Registry(session).operators():
        fingerprint = record.cert_fingerprint
        rows.append(
            {
                "name": record.name,
                "state": "removed" if fingerprint in removed else "active",
                "role": record.role.value,
                "cert_fingerprint": fingerprint,
                "approved_by": approved.get(fingerprint, "bootstrap"),
                "removed_by": removed.get(fingerprint),
                "created_at": record.created_at,
                "updated_at": record.updated_at,
            }
        )
    return rows
