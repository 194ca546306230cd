"""``keyfleet``: the fleet service's command line.

For now only what works without the broker: ``keyfleet db init`` creates the registry schema and
``keyfleet audit verify`` checks the audit chain. The database comes from ``--config FILE`` (the
service configuration) or ``--db URL`` (an auditor's copy needs no broker certificates).

Exit status: 0 success; 1 the audit chain is broken (the first bad entry is printed); 2 the
command could not run (usage, configuration or database error).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from agent.errors import ConfigError, KeyfleetError
from provisioning import audit
from provisioning.config import load_config
from provisioning.registry.engine import (
    create_schema,
    make_engine,
    missing_tables,
    redact_url,
    session_factory,
    sqlite_path,
)

EXIT_OK = 0
EXIT_BROKEN = 1
EXIT_ERROR = 2


def _database_url(args: argparse.Namespace) -> str:
    if args.db is not None:
        url: str = args.db
        return url
    return load_config(args.config).database_url


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
    engine = _existing_engine(_database_url(args))
    try:
        with session_factory(engine)() as session:
            result = audit.verify_chain(session, anchor=args.anchor)
    finally:
        engine.dispose()
    if result.problem is None:
        print(f"audit chain OK: {result.entries} entries")
        print(f"head: {result.head_seq}:{result.head_hash.hex()}")
        return EXIT_OK
    problem = result.problem
    print(f"audit chain BROKEN at entry {problem.seq}: {problem.kind}: {problem.reason}")
    if result.entries:
        print(
            f"entries 1..{result.head_seq} verified; last good head: {result.head_seq}:"
            f"{result.head_hash.hex()}"
        )
    return EXIT_BROKEN


def _db_init(args: argparse.Namespace) -> int:
    url = _database_url(args)
    engine = make_engine(url)
    try:
        create_schema(engine)
    finally:
        engine.dispose()
    print(f"database ready: {redact_url(url)}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keyfleet", description="keyfleet fleet service: registry and audit log tools"
    )
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
    verify.set_defaults(handler=_audit_verify)

    db_parser = commands.add_parser("db", help="the registry database")
    db_commands = db_parser.add_subparsers(dest="db_command", required=True)
    init = db_commands.add_parser("init", help="create the registry tables (idempotent)")
    _add_database_options(init)
    init.set_defaults(handler=_db_init)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
