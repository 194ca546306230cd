"""``keyfleet release``: firmware releases on the operator's side (docs/operations.md,
"Releases").

- ``release add MANIFEST``: a proposed release from a JSON manifest, validated here and sent as
  the signed command ``op.release_add`` (the service validates it again and audits
  ``release.add``). A proposed release is trusted by nothing until a quorum approves it.
- ``release approve VERSION`` / ``release revoke VERSION``: a dual-control request of op
  ``release.approve``/``release.revoke`` (admins) and this operator's approval, as
  ``keyfleet propose`` makes one; the request's subject names the release version and its
  manifest digest, which the operator checks before signing. Further admins approve it with
  ``keyfleet approve ID``.
- ``release list [--json]``: every release, its state, who approved it, the devices whose last
  attestation matched it.
- ``release export [--out FILE] [--toml FILE]``: the signed release bundle devices receive, and
  the golden policy the approved releases imply, as a ``golden_measurements`` file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from agent.fsio import atomic_write
from agent.protocol import authz
from agent.protocol.errors import ConfigError, ProtocolError
from agent.protocol.wire.messages.operator import Propose, ReleaseAdd
from provisioning import releases as model
from provisioning.db.engine import session_factory
from provisioning.listings import Row, print_table
from provisioning.operator import EXIT_FAILED, EXIT_OK, OperatorClient, Progress, run_commands
from provisioning.requests_cli import propose_and_approve
from provisioning.service import releases as flows
from provisioning.service.store import releases as rows
from provisioning.service.store.releases import ReleaseState

EngineFor = Callable[[argparse.Namespace], Engine]


def read_manifest(path: Path) -> model.Manifest:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    return model.parse_manifest(data, str(path))


def run_add(client: OperatorClient, args: argparse.Namespace) -> int:
    """Send the manifest, validated here first (the service validates it again)."""
    path = Path(args.manifest)
    manifest = read_manifest(path)
    body = ReleaseAdd(client.new_command_id(), path.read_bytes())
    progress = Progress(sys.stdout, json_lines=args.json)
    label = f"add release {manifest.version}"
    return run_commands(client, [(label, body)], timeout=args.timeout, progress=progress)


def release_rows(session: Session) -> list[Row]:
    """Every release as ``release list`` shows it."""
    state = rows.release_state(session)
    devices = flows.devices_by_release(session)
    found: list[Row] = []
    for stored in rows.all_releases(session):
        try:
            manifest = flows.checked_manifest(stored)
            components = ",".join(f"{c.name}={c.version}" for c in manifest.components)
        except ProtocolError as exc:
            components = f"[{exc.check}]"
        found.append(
            {
                "version": stored.version,
                "state": stored.state.value,
                "source": stored.source.value,
                "approved_by": stored.approved_by,
                "approved_at": stored.approved_at,
                "superseded_at": stored.superseded_at,
                "ended_at": stored.ended_at,
                "manifest_sha256": stored.manifest_sha256.hex(),
                "components": components,
                "devices": devices.get(stored.version, []),
                "seq": state.seq,
                "generation": state.generation,
            }
        )
    return found


def run_list(args: argparse.Namespace, engine_for: EngineFor) -> int:
    engine = engine_for(args)
    try:
        with session_factory(engine)() as session:
            found = release_rows(session)
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(found, sort_keys=True))
        return EXIT_OK
    shown = [{**row, "devices": len(row["devices"])} for row in found]  # type: ignore[arg-type]
    columns = (
        "version",
        "state",
        "source",
        "approved_by",
        "approved_at",
        "superseded_at",
        "ended_at",
        "devices",
    )
    times = ("approved_at", "superseded_at", "ended_at")
    print_table(shown, columns, sys.stdout, times=times)
    return EXIT_OK


def run_export(args: argparse.Namespace, engine_for: EngineFor) -> int:
    engine = engine_for(args)
    try:
        with session_factory(engine)() as session:
            state = rows.release_state(session)
            manifests = [
                flows.checked_manifest(s) for s in rows.releases_in(session, ReleaseState.APPROVED)
            ]
    finally:
        engine.dispose()
    if args.toml is not None:
        atomic_write(args.toml, model.golden_policy(manifests).to_toml().encode(), mode=0o644)
        print(f"golden policy of releases {', '.join(m.version for m in manifests)} written")
    if state.bundle is None:
        print(
            "keyfleet: no signed release bundle yet ([releases] signing_key not configured, "
            "or no change since)",
            file=sys.stderr,
        )
        return EXIT_FAILED if args.toml is None else EXIT_OK
    if args.out is not None:
        atomic_write(args.out, state.bundle, mode=0o644)
        print(f"release bundle seq {state.seq} generation {state.generation} written")
    else:
        sys.stdout.buffer.write(state.bundle)
    return EXIT_OK


def run_request(client: OperatorClient, args: argparse.Namespace) -> int:
    """``release add`` (``op.release_add``), or: propose ``release.approve``/``release.revoke``
    of VERSION and send this approval."""
    if args.release_command == "add":
        return run_add(client, args)
    op = authz.OP_RELEASE_APPROVE if args.release_command == "approve" else authz.OP_RELEASE_REVOKE
    label = f"{args.release_command} release {args.version}"
    body = Propose(client.new_command_id(), op, (), release=args.version)
    return propose_and_approve(client, body, label, json_lines=args.json, timeout=args.timeout)


def add_release_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    *,
    operator_options: Callable[[argparse.ArgumentParser], None],
    database_options: Callable[[argparse.ArgumentParser], None],
    operator_handler: Callable[[argparse.Namespace], int],
    engine_for: EngineFor,
) -> None:
    release = commands.add_parser("release", help="firmware releases (golden policy)")
    kinds = release.add_subparsers(dest="release_command", required=True)
    add = kinds.add_parser("add", help="propose a release from a JSON MANIFEST")
    add.add_argument("manifest", metavar="MANIFEST")
    operator_options(add)
    add.set_defaults(handler=operator_handler)
    listing = kinds.add_parser("list", help="releases, their state and devices")
    database_options(listing)
    listing.add_argument("--json", action="store_true", help="a JSON array (Unix seconds)")
    listing.set_defaults(handler=lambda a: run_list(a, engine_for))
    export = kinds.add_parser("export", help="the signed release bundle and golden policy")
    database_options(export)
    export.add_argument("--out", type=Path, help="write the bundle here (default: stdout)")
    export.add_argument("--toml", type=Path, help="write the golden policy TOML here")
    export.set_defaults(handler=lambda a: run_export(a, engine_for))
    for name, text in (
        ("approve", "request the approval of VERSION (admins; dual control)"),
        ("revoke", "request the revocation of VERSION (admins; dual control)"),
    ):
        parser = kinds.add_parser(name, help=text)
        parser.add_argument("version", metavar="VERSION")
        operator_options(parser)
        parser.set_defaults(handler=operator_handler)
