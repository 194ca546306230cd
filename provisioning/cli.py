"""``keyfleet``: the fleet service's command line.

``keyfleet serve`` runs the delivery service; ``db init`` / ``db upgrade`` / ``db status`` manage
the schema (docs/database.md); ``audit verify`` checks the audit chain (and, with
``--checkpoint``, that it agrees with signed checkpoints), ``audit show`` prints entries, ``audit
checkpoint export`` writes the stored checkpoints, and ``audit sync`` / ``audit witness`` fetch
and check them as an operator (``provisioning.audit_cli``); ``devices``, ``groups``, ``operator
list`` and ``station list`` read the registry
(``provisioning.listings``); ``keys list`` inventories the fleet's keys and certificates
(``provisioning.inventory``); ``operator add`` and ``station add`` register certificates; the
operator commands (``group``, ``rekey``, ``attest``, ``revoke``, ``device replace``) go over MQTT
(``provisioning.operator``); the membership changes among them, and ``propose``, ``approve``
and ``requests``, go through dual control (``provisioning.requests_cli``); ``release`` and
``rollout`` manage firmware releases and staged rollouts (``provisioning.releases_cli``,
``provisioning.rollout_cli``). The database comes
from ``--config FILE`` (the service configuration) or ``--db URL`` (an auditor's copy needs no
broker certificates).

Exit status: 0 success; 1 the audit chain is broken (the first bad entry is printed) or disagrees
with a checkpoint, or a checkpoint does not extend the one seen before; 2 the
command could not run (usage, configuration or database error); 141 (128 + SIGPIPE) the reader
of the output went away (``keyfleet audit show | head``), quietly as Unix tools do.

Why one module of this size (~1,100 lines): it is the one argument parser of ``keyfleet`` and the
small handlers that bind each subcommand to its module; the command families with logic of their
own live in their ``*_cli`` modules.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from agent.protocol.errors import ConfigError, KeyfleetError
from agent.protocol.wire.messages.operator import (
    AttestDevice,
    GroupPolicy,
    Propose,
    Rekey,
    TagDevice,
)
from agent.version import add_version_option
from provisioning import (
    audit,
    audit_cli,
    inventory,
    operators_cli,
    pki,
    releases_cli,
    revocation,
    trust_cli,
)
from provisioning.backup_cli import add_backup_commands
from provisioning.config import load_config
from provisioning.dashboard import start_dashboard
from provisioning.db import migrations
from provisioning.db.engine import (
    make_engine,
    missing_tables,
    redact_url,
    run_in_transaction,
    session_factory,
    sqlite_path,
)
from provisioning.db.schema import Outcome, Role
from provisioning.listings import (
    AuditFilter,
    Row,
    human_time,
    list_audit,
    list_device_keys,
    list_devices,
    list_groups,
    list_stations,
    parse_time,
    print_table,
    short_fingerprint,
)
from provisioning.operator import (
    Command,
    OperatorClient,
    OperatorSettings,
    Progress,
    run_commands,
)
from provisioning.pki_cli import add_pki_commands
from provisioning.registry import Registry, cert_fingerprint
from provisioning.releases_cli import add_release_commands
from provisioning.requests_cli import (
    add_proposal,
    add_request_commands,
    add_tag_option,
    create_proposal,
    delete_proposal,
    read_members,
    replace_proposal,
    run_direct,
    run_request_command,
    tag_argument,
)
from provisioning.rollout_cli import add_rollout_commands, run_rollout_command, show_status
from provisioning.service import rekeypolicy
from provisioning.service.model import ServiceSettings
from provisioning.service.mqtt import ServiceRunner
from provisioning.service.operators import register_operator

EXIT_OK = 0
EXIT_BROKEN = 1
EXIT_ERROR = 2
EXIT_PIPE_CLOSED = 128 + signal.SIGPIPE


def _database_url(args: argparse.Namespace) -> str:
    if args.db is not None:
        url: str = args.db
        return url
    return load_config(args.config).database_url


def _duration(text: str) -> int:
    try:
        seconds = rekeypolicy.parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if seconds > rekeypolicy.MAX_AGE_LIMIT:
        raise argparse.ArgumentTypeError(f"{text!r} is longer than a year")
    return seconds


def _epochs(text: str) -> int:
    if not text.isdigit() or int(text) > rekeypolicy.MAX_EPOCHS_LIMIT:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of epochs from 0 to {rekeypolicy.MAX_EPOCHS_LIMIT}"
        )
    return int(text)


def _add_database_options(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", metavar="FILE", help="the service configuration (TOML)")
    source.add_argument("--db", metavar="URL", help="a database URL, e.g. sqlite:///fleet.db")


def _parse_anchor(text: str) -> tuple[int, bytes]:
    seq, sep, digest = text.partition(":")
    try:
        anchor = (int(seq), bytes.fromhex(digest))
    except ValueError:
        anchor = (0, b"")
    if not sep or anchor[0] < 1 or len(anchor[1]) != 32:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not SEQ:HASH (a sequence number and 64 hex digits, as printed by "
            "`keyfleet audit verify`)"
        )
    return anchor


def _existing_engine(url: str) -> Engine:
    # Verifying must not create an empty database where the real one was expected.
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        raise ConfigError(f"no database file at {path}")
    engine = make_engine(url)
    missing = missing_tables(engine)
    if missing:
        engine.dispose()
        raise ConfigError(
            f"{redact_url(url)} has no keyfleet schema (missing tables: {', '.join(missing)}); "
            "run `keyfleet db init` first"
        )
    return engine


def _audit_verify(args: argparse.Namespace) -> int:
    checkpoints = []
    if args.checkpoint is not None:
        key = audit_cli.pinned_key(args.checkpoint_cert)
        checkpoints = audit_cli.read_checkpoint_file(args.checkpoint, key)
    engine = _existing_engine(_database_url(args))
    try:
        with session_factory(engine)() as session:
            result = audit.verify_chain(session, anchor=args.anchor)
            mismatches = audit_cli.check_chain(session, result, checkpoints)
    finally:
        engine.dispose()
    status = EXIT_OK
    if result.problem is None:
        print(f"audit chain OK: {result.entries} entries")
        print(f"head: {result.head_seq}:{result.head_hash.hex()}")
    else:
        problem = result.problem
        print(f"audit chain BROKEN at entry {problem.seq}: {problem.kind}: {problem.reason}")
        if result.entries:
            print(
                f"entries 1..{result.head_seq} verified; last good head: {result.head_seq}:"
                f"{result.head_hash.hex()}"
            )
        status = EXIT_BROKEN
    for mismatch in mismatches:
        print(f"audit checkpoint MISMATCH [{mismatch.check}]: {mismatch.reason}")
    if mismatches:
        return EXIT_BROKEN
    if checkpoints:
        print(f"{len(checkpoints)} checkpoint(s) agree with the chain")
    return status


def _audit_checkpoint_export(args: argparse.Namespace) -> int:
    key = audit_cli.pinned_key(args.checkpoint_cert)
    engine = _existing_engine(_database_url(args))
    try:
        with session_factory(engine)() as session:
            text = audit_cli.export_checkpoints(session, key)
    finally:
        engine.dispose()
    if args.out is None:
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text)
        print(f"{len(text.splitlines())} checkpoint(s) written to {args.out}")
    return EXIT_OK


def _audit_operator(args: argparse.Namespace) -> int:
    with OperatorClient(_operator_settings(args)) as client:
        status: int = args.audit_run(client, args)
        return status


def _database_hint(args: argparse.Namespace) -> str:
    """How the user named the database, for messages that tell them what to run next."""
    return f"--config {args.config}" if args.config is not None else "--db URL"


def _db_init(args: argparse.Namespace) -> int:
    url = _database_url(args)
    engine = make_engine(url)
    try:
        # every table the service uses, at the newest revision, under the migration lock: runs
        # side by side (several instances, operators) queue and the later ones find it done
        migrations.upgrade(engine)
    finally:
        engine.dispose()
    print(f"database ready: {redact_url(url)}")
    return EXIT_OK


def _db_upgrade(args: argparse.Namespace) -> int:
    url = _database_url(args)
    engine = make_engine(url)
    try:
        before, after = migrations.upgrade(engine, args.revision, create=False)
    finally:
        engine.dispose()
    if before == after:
        print(f"schema revision {after}, nothing to do: {redact_url(url)}")
    else:
        print(f"schema revision {before or 'none (adopted)'} -> {after}: {redact_url(url)}")
    return EXIT_OK


def _db_status(args: argparse.Namespace) -> int:
    url = _database_url(args)
    engine = make_engine(url)
    try:
        status = migrations.schema_status(engine)
    finally:
        engine.dispose()
    print(f"{redact_url(url)}: {status.state} (revision {status.revision}, head {status.head})")
    return EXIT_OK if status.state == "current" else EXIT_BROKEN


def _ready_schema(engine: Engine, config: str) -> None:
    """For registrations: an empty database gets the schema (as ``db init`` would); any other
    must already be at the newest revision (upgrading is the administrator's decision)."""
    if migrations.schema_status(engine).state == "empty":
        migrations.upgrade(engine)
    migrations.require_current(engine, how=f"--config {config}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keyfleet", description="keyfleet fleet service: registry and audit log tools"
    )
    add_version_option(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    audit_parser = commands.add_parser("audit", help="the hash-chained audit log")
    audit_commands = audit_parser.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser(
        "verify", help="check the whole chain; name the first bad entry"
    )
    _add_database_options(verify)
    verify.add_argument(
        "--anchor",
        metavar="SEQ:HASH",
        type=_parse_anchor,
        help="a head printed by an earlier verify, kept elsewhere: also detects a cut-off end",
    )
    verify.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="a checkpoint file (export, witness): the chain must agree with each checkpoint",
    )
    verify.add_argument(
        "--checkpoint-cert",
        metavar="FILE",
        help="$KEYFLEET_CHECKPOINT_CERT: the key the checkpoints are signed with",
    )
    verify.set_defaults(handler=_audit_verify)
    _add_audit_show(audit_commands)
    audit_cli.add_checkpoint_commands(
        audit_commands,
        operator_options=_add_operator_options,
        database_options=_add_database_options,
        operator_handler=_audit_operator,
        export_handler=_audit_checkpoint_export,
    )

    db_parser = commands.add_parser("db", help="the registry database")
    db_commands = db_parser.add_subparsers(dest="db_command", required=True)
    init = db_commands.add_parser(
        "init", help="create the schema or bring it to the newest revision (idempotent)"
    )
    _add_database_options(init)
    init.set_defaults(handler=_db_init)
    upgrade = db_commands.add_parser(
        "upgrade",
        help="apply new schema revisions; adopts a database made before revisions existed",
    )
    _add_database_options(upgrade)
    upgrade.add_argument("--revision", default="head", help="target revision (default: head)")
    upgrade.set_defaults(handler=_db_upgrade)
    status = db_commands.add_parser(
        "status", help="the database's schema revision: exit 0 at the newest, 1 otherwise"
    )
    _add_database_options(status)
    status.set_defaults(handler=_db_status)
    _add_service_commands(commands)
    add_pki_commands(commands)
    add_backup_commands(commands)
    return parser


# ---- the delivery service and the operator CLI (docs/service.md, "Running", "Operator CLI") ----


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = load_config(args.config)
    config.require_signing()  # before anything else: a signing key of its own, or no start
    engine = make_engine(config.database_url)
    try:
        # several instances must never run different schemas: upgrading is an explicit step
        migrations.require_current(engine, how=f"--config {args.config}")
    finally:
        engine.dispose()
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        logging.getLogger("keyfleet.service").info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    runner = ServiceRunner(config)
    dashboard = None
    if config.dashboard is not None:
        try:
            dashboard = start_dashboard(config)
        except BaseException:
            runner.close()
            raise
        logging.getLogger("keyfleet.service").info(
            "keyfleet serve: dashboard on %s (mutual TLS, registered operators only)",
            dashboard.url,
        )
    try:
        runner.run(stop)
    finally:
        if dashboard is not None:
            dashboard.stop()
    return EXIT_OK


def _crl(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    settings = revocation.settings_from_config(config)
    if settings.crl_file is None:
        raise ConfigError(f"{args.config}: [revocation] crl_file is not set")
    engine = make_engine(config.database_url)
    try:
        _ready_schema(engine, args.config)
        number = revocation.write_current_crl(
            settings, session_factory(engine), now=int(time.time())
        )
    finally:
        engine.dispose()
    print(f"CRL {number} of the device CA in {settings.crl_file}")
    return 0


def _operator_add(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    try:
        cert = pki.cert_from_pem(Path(args.cert).read_bytes())
        operator_ca = pki.cert_from_pem(config.operator_ca_cert.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None
    if pki.common_name(cert) != args.name:
        raise ConfigError(
            f"{args.cert} is the certificate of {pki.common_name(cert)!r}, not {args.name!r}"
        )
    engine = make_engine(config.database_url)
    try:
        _ready_schema(engine, args.config)
        record = register_operator(
            session_factory(engine),
            cert,
            operator_ca=operator_ca,
            role=None if args.role is None else Role(args.role),
            actor=f"local:{getpass.getuser()}",
            now=int(time.time()),
            bootstrap_check=operators_cli.check_bootstrap_open,
        )
    finally:
        engine.dispose()
    print(f"operator {record.name} registered with role {record.role.value}")
    return EXIT_OK


def _station_add(args: argparse.Namespace) -> int:
    """Register a factory station: its certificate must be issued by ``[http] station_ca``
    (the TLS layer checks that too) and its CN must be the station name."""
    config = load_config(args.config)
    if config.http is None:
        raise ConfigError(f"{config.path}: no [http] table: the enrollment API is not configured")
    try:
        cert = pki.cert_from_pem(Path(args.cert).read_bytes())
        station_ca = pki.cert_from_pem(config.http.station_ca.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None
    if pki.common_name(cert) != args.name:
        raise ConfigError(
            f"{args.cert} is the certificate of {pki.common_name(cert)!r}, not {args.name!r}"
        )
    now = int(time.time())
    pki.verify_certificate(cert, station_ca, now=datetime.fromtimestamp(now, UTC), purpose="client")
    engine = make_engine(config.database_url)
    fingerprint = cert_fingerprint(cert)

    def work(session: Session) -> None:
        Registry(session).add_station(args.name, cert_fingerprint=fingerprint, now=now)
        audit.append(
            session,
            now=now,
            actor=f"local:{getpass.getuser()}",
            action="station.add",
            target=f"station:{args.name}",
            outcome=Outcome.ACCEPTED,
            details={"cert": fingerprint},
        )

    try:
        _ready_schema(engine, args.config)
        run_in_transaction(session_factory(engine), work)
    finally:
        engine.dispose()
    print(f"station {args.name} registered (certificate {fingerprint[:16]}…)")
    return EXIT_OK


def _operator_settings(args: argparse.Namespace) -> OperatorSettings:
    def pick(flag: str, env: str) -> str:
        value: str | None = getattr(args, flag) or os.environ.get(env)
        if not value:
            raise ConfigError(f"--{flag.replace('_', '-')} (or ${env}) is required")
        return value

    host, _, port = pick("broker", "KEYFLEET_BROKER").rpartition(":")
    if not host or not port.isdigit():
        host, port = pick("broker", "KEYFLEET_BROKER"), "8883"
    return OperatorSettings(
        host=host.strip("[]"),
        port=int(port),
        ca=Path(pick("ca", "KEYFLEET_CA")),
        cert=Path(pick("cert", "KEYFLEET_CERT")),
        key=pick("key", "KEYFLEET_KEY"),
        service_cert=Path(pick("service_cert", "KEYFLEET_SERVICE_CERT")),
        tls_cert=_optional_path(args.tls_cert or os.environ.get("KEYFLEET_TLS_CERT")),
        tls_key=_optional_path(args.tls_key or os.environ.get("KEYFLEET_TLS_KEY")),
        passphrase_file=_optional_path(args.passphrase_file),
    )


def _optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _operator_command(args: argparse.Namespace) -> int:
    settings = _operator_settings(args)
    audit_cli.warn_if_stale(args)
    with OperatorClient(settings) as client:
        commands: list[tuple[str, Command]] = []
        if args.command == "rekey":
            full = True if args.full else None
            label = f"{'full rekey' if full else 'rekey'} {args.group}"
            commands.append((label, Rekey(client.new_command_id(), args.group, full)))
        elif args.command == "group" and args.group_command == "policy":
            body = GroupPolicy(client.new_command_id(), args.group, args.max_age, args.max_epochs)
            commands.append((f"rekey policy of {args.group}", body))
        elif args.command == "device" and args.device_command == "tag":
            if not args.add and not args.remove:
                raise ConfigError("device tag: --add TAG or --remove TAG (repeat)")
            add, remove = tuple(dict.fromkeys(args.add)), tuple(dict.fromkeys(args.remove))
            tagging = TagDevice(client.new_command_id(), args.device, add, remove)
            commands.append((f"tag {args.device}", tagging))
        elif args.command == "attest":
            # Several devices in one run: the challenges go out together and the verdicts
            # arrive as the devices answer (one process, one broker connection).
            for device in dict.fromkeys(args.devices):
                commands.append((f"attest {device}", AttestDevice(client.new_command_id(), device)))
        else:
            # Membership changes go through dual control: a request and this operator's
            # approval; the change starts where the quorum policy asks for one operator.
            return run_direct(
                client, _direct_proposals(args, client), timeout=args.timeout, json_lines=args.json
            )
        progress = Progress(sys.stdout, json_lines=args.json)
        return run_commands(client, commands, timeout=args.timeout, progress=progress)


def _direct_proposals(
    args: argparse.Namespace, client: OperatorClient
) -> list[tuple[str, Propose]]:
    if args.command == "revoke":
        # several devices: one request (one feed entry), their removals from every group
        devices = read_members(args.device)
        label = f"revoke {devices[0]}" if len(devices) == 1 else f"revoke {len(devices)} devices"
        body = Propose(client.new_command_id(), "device.revoke", devices, reason=args.reason)
        return [(label, body)]
    if args.command == "device":  # device replace OLD NEW (RMA)
        return [replace_proposal(client.new_command_id(), args.old, args.new, args.reason)]
    if args.group_command == "delete":
        return [(f"delete {args.group}", delete_proposal(client.new_command_id(), args.group))]
    if args.group_command == "create":
        return [create_proposal(client.new_command_id(), args.group, args.members, args.all_in)]
    # several devices: one request, one commit adding all of them (one Welcome)
    return [add_proposal(client.new_command_id(), args.group, args.devices, args.all_in)]


def _request_command(args: argparse.Namespace) -> int:
    audit_cli.warn_if_stale(args)
    with OperatorClient(_operator_settings(args)) as client:
        return run_request_command(client, args)


def _operator_request(args: argparse.Namespace) -> int:
    audit_cli.warn_if_stale(args)
    with OperatorClient(_operator_settings(args)) as client:
        return operators_cli.run_request(client, args)


def _operator_add_or_request(args: argparse.Namespace) -> int:
    if args.config is not None:
        if args.cert is None:
            raise ConfigError("operator add --config: --cert FILE names the certificate")
        if args.operator_cert is not None:
            raise ConfigError("operator add --config registers --cert FILE; no --operator-cert")
        return _operator_add(args)
    return _operator_request(args)


def _keys_rotate(args: argparse.Namespace) -> int:
    audit_cli.warn_if_stale(args)
    with OperatorClient(_operator_settings(args)) as client:
        return trust_cli.run(client, args)


def _release_request(args: argparse.Namespace) -> int:
    audit_cli.warn_if_stale(args)
    with OperatorClient(_operator_settings(args)) as client:
        return releases_cli.run_request(client, args)


def _release_engine(args: argparse.Namespace) -> Engine:
    """The database of ``keyfleet release`` on the service host, at the newest revision."""
    engine = _existing_engine(_database_url(args))
    try:
        migrations.require_current(engine, how="--config/--db")
    except BaseException:
        engine.dispose()
        raise
    return engine


def _rollout_command(args: argparse.Namespace) -> int:
    audit_cli.warn_if_stale(args)
    with OperatorClient(_operator_settings(args)) as client:
        return run_rollout_command(client, args)


def _rollout_status(args: argparse.Namespace) -> int:
    return show_status(args, _read)


def _read(args: argparse.Namespace, query: Callable[[Session], list[Row]]) -> list[Row]:
    engine = _existing_engine(_database_url(args))
    try:
        with session_factory(engine)() as session:
            return query(session)
    finally:
        engine.dispose()


def _print_rows(
    args: argparse.Namespace,
    rows: list[Row],
    columns: Sequence[str],
    *,
    times: Sequence[str] = (),
    human: Callable[[Row], Row] | None = None,
) -> int:
    """``--json``: the rows as they are (times in Unix seconds); otherwise a table for people,
    each row first passed through ``human``."""
    if args.json:
        print(json.dumps(rows, sort_keys=True))
    else:
        shown = rows if human is None else [human(dict(row)) for row in rows]
        print_table(shown, columns, sys.stdout, times=times)
    return EXIT_OK


def _human_transitions(row: Row) -> Row:
    steps = row["transitions"]
    assert isinstance(steps, list)
    # joined by spaces, so each time is written without one
    row["transitions"] = " ".join(f"{state}@{human_time(at, sep='T')}" for state, at in steps)
    return row


def _human_fingerprint(row: Row) -> Row:
    row["cert_fingerprint"] = short_fingerprint(str(row["cert_fingerprint"]))
    return row


def _devices(args: argparse.Namespace) -> int:
    if args.keys:
        return _print_rows(
            args,
            _read(args, lambda session: list_device_keys(session, tag=args.tag)),
            ("device_id", "key", "kind", "state", "since", "transitions"),
            times=("since",),
            human=_human_transitions,
        )
    return _print_rows(
        args,
        _read(args, lambda session: list_devices(session, tag=args.tag)),
        (
            "device_id",
            "state",
            "attestation",
            "last_seen",
            "groups",
            "tags",
            "feed_behind",
            "attestation_reason",
        ),
        times=("last_seen",),
    )


def _groups(args: argparse.Namespace) -> int:
    return _print_rows(
        args,
        _read(args, list_groups),
        ("group_id", "epoch", "members", "stragglers", "agreed", "pending"),
    )


def _group_show(args: argparse.Namespace) -> int:
    """Each member's leaf: how long and how many epochs since it last updated itself, and its
    standing under the group's rekey policy (``provisioning.service.rekeypolicy``)."""
    settings = ServiceSettings()
    if args.config is not None:
        groups = load_config(args.config).groups
        settings = ServiceSettings(
            rekey_max_age=groups.rekey_max_age_seconds, rekey_max_epochs=groups.rekey_max_epochs
        )
    now = int(time.time())

    def query(session: Session) -> list[Row]:
        return [s.to_obj() for s in rekeypolicy.leaf_ages(session, args.group, settings, now)]

    return _print_rows(
        args,
        _read(args, query),
        ("device", "age_seconds", "epochs", "due", "straggler", "overdue"),
    )


def _operator_list(args: argparse.Namespace) -> int:
    return _print_rows(
        args,
        _read(args, operators_cli.operator_rows),
        ("name", "state", "role", "cert_fingerprint", "approved_by", "created_at", "updated_at"),
        times=("created_at", "updated_at"),
        human=_human_fingerprint,
    )


def _station_list(args: argparse.Namespace) -> int:
    return _print_rows(
        args,
        _read(args, list_stations),
        ("name", "cert_fingerprint", "created_at"),
        times=("created_at",),
        human=_human_fingerprint,
    )


def _human_key(row: Row) -> Row:
    if row["fingerprint"] is not None:
        row["fingerprint"] = short_fingerprint(str(row["fingerprint"]))
    if row["problem"] is not None:
        row["state"] = f"? ({row['problem']})"
    return row


def _keys_list(args: argparse.Namespace) -> int:
    """Every key and certificate of the fleet (``provisioning.inventory``): the ones the
    configuration names (token keys read through the token), then the operators', stations'
    and devices' certificates from the registry, each scope by expiry, the nearest first."""
    config = load_config(args.config)
    now = int(time.time())
    entries = inventory.fleet_facts(config)
    engine = _existing_engine(config.database_url)
    try:
        with session_factory(engine)() as session:
            entries += inventory.trust_facts(session)
            entries += inventory.holder_facts(session) + inventory.device_facts(session)
    finally:
        engine.dispose()
    return _print_rows(
        args,
        inventory.rows(entries, now),
        ("scope", "kind", "name", "state", "not_after", "algorithm", "key", "fingerprint"),
        times=("not_after",),
        human=_human_key,
    )


def _human_details(row: Row) -> Row:
    details = row["details"]
    row["details"] = json.dumps(details, sort_keys=True, separators=(",", ":")) if details else None
    return row


def _audit_show(args: argparse.Namespace) -> int:
    if args.since is not None and args.until is not None and args.since > args.until:
        raise ConfigError("--since is later than --until: no entry can match")
    where = AuditFilter(
        since=args.since,
        until=args.until,
        actor=args.actor,
        action=args.action,
        target=args.target,
        outcome=None if args.outcome is None else Outcome(args.outcome),
        limit=args.limit,
    )
    return _print_rows(
        args,
        _read(args, lambda session: list_audit(session, where)),
        ("seq", "time", "actor", "action", "target", "outcome", "reason", "details"),
        times=("time",),
        human=_human_details,
    )


def _time_option(text: str) -> int:
    try:
        return parse_time(text, now=int(time.time()))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def _add_audit_show(audit_commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    show = audit_commands.add_parser(
        "show",
        help="print entries, oldest first (filters combine)",
        description=(
            "Print audit entries, oldest first; the filters combine. --actor, --action and "
            "--target match exactly, or as a prefix when they end in '*' (--action 'group.*'). "
            "TIME is Unix seconds, a span back from now (30m, 2h, 7d) or an ISO-8601 date/time "
            "in UTC unless it names a zone (2026-12-06, 2026-12-06T08:10:05Z)."
        ),
    )
    _add_database_options(show)
    show.add_argument("--since", metavar="TIME", type=_time_option, help="entries at or after")
    show.add_argument("--until", metavar="TIME", type=_time_option, help="entries at or before")
    show.add_argument("--actor", help="who: operator:NAME, device:ID, service, local:USER")
    show.add_argument("--action", help="what, e.g. group.rekey or 'device.*'")
    show.add_argument("--target", help="on what: a device, group, operator:NAME...")
    show.add_argument("--outcome", choices=[o.value for o in Outcome])
    show.add_argument("--limit", metavar="N", type=_positive, help="only the newest N matches")
    show.add_argument(
        "--json", action="store_true", help="a JSON array: times in Unix seconds, hashes in hex"
    )
    show.set_defaults(handler=_audit_show)


def _add_listing(
    parser: argparse.ArgumentParser, handler: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    _add_database_options(parser)
    parser.add_argument("--json", action="store_true", help="a JSON array (times in Unix seconds)")
    parser.set_defaults(handler=handler)
    return parser


def _add_operator_options(parser: argparse.ArgumentParser) -> None:
    mqtt = parser.add_argument_group("connection (flags or environment)")
    mqtt.add_argument("--broker", metavar="HOST[:PORT]", help="$KEYFLEET_BROKER; port 8883")
    mqtt.add_argument("--ca", metavar="FILE", help="$KEYFLEET_CA: CA of the broker's certificate")
    mqtt.add_argument("--cert", metavar="FILE", help="$KEYFLEET_CERT: operator certificate")
    mqtt.add_argument(
        "--key",
        metavar="FILE|URI",
        help="$KEYFLEET_KEY: operator key, a PEM file (passphrase-encrypted, or plain: warned "
        "about; TLS and COSE) or a pkcs11: URI (COSE; then --tls-cert/--tls-key)",
    )
    mqtt.add_argument("--tls-cert", metavar="FILE", help="$KEYFLEET_TLS_CERT: with a token key")
    mqtt.add_argument("--tls-key", metavar="FILE", help="$KEYFLEET_TLS_KEY: with a token key")
    mqtt.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="first line decrypts an encrypted --key (else $KEYFLEET_KEY_PASSPHRASE or a prompt)",
    )
    mqtt.add_argument(
        "--service-cert", metavar="FILE", help="$KEYFLEET_SERVICE_CERT: verifies results"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds (default 120)")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of text")
    parser.set_defaults(handler=_operator_command)


def _add_service_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser("serve", help="run the delivery service (MQTT)")
    serve.add_argument("--config", metavar="FILE", required=True, help="service configuration")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    serve.set_defaults(handler=_serve)

    crl = commands.add_parser(
        "crl",
        help="write the device CA's CRL to [revocation] crl_file (issuing one if none is current)",
    )
    crl.add_argument("--config", metavar="FILE", required=True, help="service configuration")
    crl.set_defaults(handler=_crl)

    operator = commands.add_parser("operator", help="operators of the fleet")
    operator_commands = operator.add_subparsers(dest="operator_command", required=True)
    add_op = operator_commands.add_parser(
        "add",
        help="request an operator's registration (admins, quorum); with --config: the local "
        "bootstrap of a fleet's first operators",
    )
    add_op.add_argument("name", help="the operator id, the certificate's CN (op-...)")
    add_op.add_argument(
        "--operator-cert", metavar="FILE", help="the new operator's certificate (operator CA)"
    )
    add_op.add_argument(
        "--role", choices=("viewer", "operator", "admin"), help="bootstrap only: = the cert's OU"
    )
    add_op.add_argument(
        "--config",
        metavar="FILE",
        help="bootstrap on the service host: register --cert FILE locally (empty fleet only)",
    )
    _add_operator_options(add_op)
    add_op.set_defaults(handler=_operator_add_or_request)
    remove_op = operator_commands.add_parser(
        "remove", help="request an operator's removal (admins, quorum); revokes its approvals"
    )
    remove_op.add_argument("name")
    _add_operator_options(remove_op)
    remove_op.set_defaults(handler=_operator_request)
    role_op = operator_commands.add_parser(
        "role", help="request an operator's role (admins, quorum), within its certificate's OU"
    )
    role_op.add_argument("name")
    role_op.add_argument("role", choices=("viewer", "operator", "admin"))
    _add_operator_options(role_op)
    role_op.set_defaults(handler=_operator_request)
    _add_listing(
        operator_commands.add_parser("list", help="registered operators (registry)"),
        _operator_list,
    )

    group = commands.add_parser("group", help="create groups, add members, delete groups")
    group_commands = group.add_subparsers(dest="group_command", required=True)
    create = group_commands.add_parser("create", help="create GROUP with its members")
    create.add_argument("group")
    founders = create.add_mutually_exclusive_group(required=True)
    founders.add_argument(
        "--members",
        nargs="+",
        metavar="DEVICE|FILE",
        help="the founders: device ids, or files with one device id a line (# comments); "
        "all of them join in as few commits as the message size allows",
    )
    add_tag_option(founders, "the founders: every device tagged TAG that may join, now")
    _add_operator_options(create)
    add = group_commands.add_parser(
        "add", help="add devices to GROUP (several: one request, one commit) or --all-in TAG"
    )
    add.add_argument("group")
    add.add_argument("devices", nargs="*", metavar="DEVICE|FILE")
    add_tag_option(add, "the devices tagged TAG that may join and are not in GROUP, now")
    _add_operator_options(add)

    delete = group_commands.add_parser(
        "delete",
        help="delete GROUP (admins, quorum): every member destroys its keys; "
        "the id is never used again",
    )
    delete.add_argument("group")
    _add_operator_options(delete)

    policy = group_commands.add_parser(
        "policy", help="set GROUP's rekey policy (admin): how long a leaf key may live"
    )
    policy.add_argument("group")
    policy.add_argument(
        "--max-age",
        type=_duration,
        required=True,
        metavar="DURATION",
        help="every member updates at least this often: 7d, 12h, 30m, 45s or off",
    )
    policy.add_argument(
        "--max-epochs",
        type=_epochs,
        required=True,
        metavar="N",
        help="and at most N epochs after its last update (0: no bound)",
    )
    _add_operator_options(policy)
    _add_listing(
        group_commands.add_parser(
            "show", help="each member's leaf age under GROUP's rekey policy (registry)"
        ),
        _group_show,
    ).add_argument("group")

    rekey = commands.add_parser("rekey", help="move a group to a fresh epoch")
    rekey.add_argument("--group", required=True)
    rekey.add_argument(
        "--full",
        action="store_true",
        help="every member's leaf key is replaced (Update proposals, a few commits)",
    )
    _add_operator_options(rekey)
    attest = commands.add_parser(
        "attest",
        help="attest devices now: exit 0 all trusted, 1 one untrusted or refused",
    )
    attest.add_argument("devices", nargs="+", metavar="DEVICE")
    _add_operator_options(attest)

    station = commands.add_parser("station", help="factory stations (enrollment API)")
    station_commands = station.add_subparsers(dest="station_command", required=True)
    add_station = station_commands.add_parser("add", help="register a station certificate")
    add_station.add_argument("name", help="the station name, the certificate's CN")
    add_station.add_argument(
        "--cert", required=True, metavar="FILE", help="issued by [http] station_ca"
    )
    add_station.add_argument("--config", metavar="FILE", required=True, help="configuration")
    add_station.set_defaults(handler=_station_add)
    _add_listing(
        station_commands.add_parser("list", help="registered stations (registry)"), _station_list
    )

    revoke = commands.add_parser(
        "revoke", help="revoke devices (admin; several: one request, files: one id a line)"
    )
    revoke.add_argument("device", nargs="+", metavar="DEVICE|FILE")
    revoke.add_argument("--reason")
    _add_operator_options(revoke)
    device = commands.add_parser("device", help="a device's replacement after a TPM failure")
    device_commands = device.add_subparsers(dest="device_command", required=True)
    replace = device_commands.add_parser(
        "replace",
        help="RMA (admin): NEW, enrolled, joins OLD's groups; OLD is revoked (dual control)",
    )
    replace.add_argument("old", metavar="OLD", help="the device whose TPM failed")
    replace.add_argument("new", metavar="NEW", help="its replacement, enrolled as a new device")
    replace.add_argument("--reason", help="recorded with OLD's revocation")
    _add_operator_options(replace)
    tag = device_commands.add_parser(
        "tag",
        help="add tags to DEVICE or take them off (selects devices for group --all-in TAG)",
    )
    tag.add_argument("device", metavar="DEVICE")
    tag.add_argument(
        "--add", action="append", default=[], type=tag_argument, metavar="TAG", help="(repeat)"
    )
    tag.add_argument(
        "--remove", action="append", default=[], type=tag_argument, metavar="TAG", help="(repeat)"
    )
    _add_operator_options(tag)
    add_request_commands(commands, _add_operator_options, _request_command)
    add_release_commands(
        commands,
        operator_options=_add_operator_options,
        database_options=_add_database_options,
        operator_handler=_release_request,
        engine_for=_release_engine,
    )
    add_rollout_commands(
        commands, _add_operator_options, _add_listing, _rollout_command, _rollout_status
    )

    devices = _add_listing(
        commands.add_parser("devices", help="list devices (registry, on the service host)"),
        _devices,
    )
    devices.add_argument(
        "--keys",
        action="store_true",
        help="one row per device key: kind, NIST state, since, transitions",
    )
    devices.add_argument(
        "--tag", type=tag_argument, metavar="TAG", help="only the devices tagged TAG"
    )
    _add_listing(
        commands.add_parser("groups", help="list groups (registry, on the service host)"), _groups
    )
    keys = commands.add_parser("keys", help="the fleet's keys and certificates")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    keys_list = keys_commands.add_parser(
        "list",
        help="every fleet key and certificate, then device certificates, by expiry",
        description=(
            "Every key and certificate of the fleet: where it lives (file, or token and slot), "
            "algorithm, SHA-256 fingerprint of the public key, not-after and NIST SP 800-57 "
            "state; then operators, stations and the devices' DevID certificates, each by "
            "expiry, the nearest first. Keys in a token are read through the token with the "
            "PIN source of their reference; no private key is read."
        ),
    )
    keys_list.add_argument(
        "--config", metavar="FILE", required=True, help="the service configuration (TOML)"
    )
    keys_list.add_argument(
        "--json", action="store_true", help="a JSON array (times in Unix seconds)"
    )
    keys_list.set_defaults(handler=_keys_list)
    trust_cli.add_commands(keys_commands, _add_operator_options, _keys_rotate)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        status = _run(argv)
        sys.stdout.flush()  # here, where a closed pipe is still caught
    except BrokenPipeError:
        return _output_closed()
    return status


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.handler(args)
    except KeyfleetError as exc:
        print(f"keyfleet: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except SQLAlchemyError as exc:
        # SQLAlchemy's text names the statement and the driver's error, not the URL.
        print(f"keyfleet: database error: {type(exc).__name__}: {exc.args[0]}", file=sys.stderr)
        return EXIT_ERROR
    return status


def _output_closed() -> int:
    """The reader of our output went away (``keyfleet audit show | head -1``): stop quietly, as
    Unix tools do. What is still buffered goes nowhere: stdout becomes /dev/null, so the flush
    at interpreter exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass  # stdout is no file (a test's capture): nothing will flush into the pipe
    return EXIT_PIPE_CLOSED


if __name__ == "__main__":
    sys.exit(main())
