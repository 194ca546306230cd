"""``keyagent``: the device agent's command line. Subcommands are added as they exist."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from agent.daemon import read_status
from agent.daemon import run as run_daemon
from agent.localapi.cli import register_api_command, run_api_command
from agent.protocol.errors import KeyfleetError
from agent.reset import AgentRunning, factory_reset, plan_reset
from agent.selftest import SelftestReport, run_builtin_selftests, run_vector_files
from agent.version import add_version_option


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keyagent", description="keyfleet device agent: keys born in the TPM."
    )
    add_version_option(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    selftest = commands.add_parser(
        "selftest",
        help="run the known-answer tests (RFC 9180 / RFC 9420 vectors)",
        description=(
            "Run the built-in known-answer tests, or the given test-vector files (RFC 9180 "
            "test-vectors JSON; mls-implementations tree-math, crypto-basics, key-schedule; "
            "the format is detected from the content). Exits 1 if any check failed."
        ),
    )
    selftest.add_argument(
        "--vectors",
        nargs="+",
        metavar="FILE",
        help="vector files to run instead of the built-in ones",
    )
    selftest.add_argument("--json", action="store_true", help="print the report as JSON")
    selftest.add_argument("-v", "--verbose", action="store_true", help="name every failed check")
    register_api_command(commands)
    run = commands.add_parser("run", help="run the device daemon (systemd Type=notify)")
    run.add_argument("--config", metavar="FILE", help="agent.toml (default: $KEYAGENT_CONFIG)")
    run.add_argument(
        "--allow-insecure-software-keys",
        action="store_true",
        help="with [simulation] insecure_software_keys: accept a software DevID key (never on "
        "a real device)",
    )
    status = commands.add_parser("status", help="keys, their states, groups, epochs, reports")
    status.add_argument("--config", metavar="FILE", help="agent.toml (default: $KEYAGENT_CONFIG)")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    reset = commands.add_parser(
        "factory-reset",
        help="destroy this device's identity and every key (tells the service first)",
        description=(
            "Refuses while keyagent runs. Sends a DevID-signed device.destroyed to the service, "
            "flushes TPM objects, shreds every key blob, sealed blob, state and identity file "
            "and the factory lock (the device is back in factory mode). Exit 0: destroyed and "
            "the service told; 1: destroyed but the service was NOT told (revoke the device); "
            "2: refused (agent running, no confirmation, bad configuration)."
        ),
    )
    reset.add_argument("--config", metavar="FILE", help="agent.toml (default: $KEYAGENT_CONFIG)")
    reset.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    reset.add_argument(
        "--clear-tpm",
        action="store_true",
        help="also TPM2_Clear (empty lockout auth): saved copies of key blobs stop loading; "
        "the EKs are re-created from their templates",
    )
    reset.add_argument("--reason", default="factory reset", help="for the service's audit log")
    reset.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to reach the broker (default 10)"
    )
    reset.add_argument(
        "--allow-insecure-software-keys",
        action="store_true",
        help="with [simulation] insecure_software_keys: a software DevID key signs the message",
    )
    return parser


def _factory_reset(args: argparse.Namespace) -> int:
    try:
        if not args.yes:
            plan = plan_reset(args.config)
            name = plan.device_id or str(plan.state_dir)
            if not sys.stdin.isatty():
                print(
                    "keyagent factory-reset: refusing without --yes (no terminal)", file=sys.stderr
                )
                return 2
            answer = input(f"This destroys every key of {name}. Type {name!r} to go on: ")
            if answer.strip() != name:
                print("keyagent factory-reset: not confirmed; nothing destroyed", file=sys.stderr)
                return 2
        report = factory_reset(
            args.config,
            reason=args.reason,
            clear_tpm=args.clear_tpm,
            allow_insecure=args.allow_insecure_software_keys,
            timeout=args.timeout,
            on_destroyed=lambda path: print(f"destroyed {path}"),
        )
    except AgentRunning as exc:
        print(f"keyagent factory-reset: {exc}", file=sys.stderr)
        return 2
    except KeyfleetError as exc:
        print(f"keyagent factory-reset: {exc}", file=sys.stderr)
        return 2
    for note in report.tpm:
        print(f"tpm: {note}")
    print(f"service: {report.service_note}")
    print(
        f"factory reset done: {len(report.destroyed)} file(s) destroyed"
        + ("" if report.exit_code == 0 else "; WARNING: the service was not told")
    )
    return report.exit_code


def _status(args: argparse.Namespace) -> int:
    try:
        status = read_status(args.config)
    except KeyfleetError as exc:
        print(f"keyagent status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    print(
        f"device {status['device_id']}  (pid {status.get('pid')}, updated {status.get('updated')})"
    )
    if status.get("sealed_elsewhere"):
        print("  WARNING: earlier state was sealed to other measurements; re-add needed")
    if status.get("state_rollback"):
        reason = str(status["state_rollback"])
        named = reason if reason.startswith("[state.") else f"[state.rollback] {reason}"
        print(f"  WARNING: {named}; re-add needed")
    if "state_counter" in status:
        print(
            f"  state counter: {status['state_counter']}  "
            f"(rotations since start: {status.get('state_rotations', 0)})"
        )
    print(f"  mqtt connected: {status.get('mqtt_connected')}  last report: {status['last_report']}")
    for group in status["groups"]:
        ack = group["last_ack"] or {}
        count = group.get("member_count", len(group.get("members") or ()))
        print(
            f"  group {group['group']}: epoch {group['epoch']}, {count} members, "
            f"pending commits {group['pending_commits']}, last ack {ack.get('epoch')}"
        )
    for key in status["keys"]:
        where = f" {key['group']}@{key['epoch']}" if "group" in key else ""
        since = key["transitions"][-1][1]
        print(f"  key {key['name']:<40} {key['kind']:<8} {key['state']:<15} since {since}{where}")
    return 0


def _print_report(report: SelftestReport, as_json: bool, verbose: bool) -> None:
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
        return
    for result in report.files:
        print(result.summary())
        # Failures are always named: a self-test that only says "failed" helps nobody.
        shown = result.failures if verbose else result.failures[:10]
        for failure in shown:
            print(f"  FAILED {failure}")
        if len(result.failures) > len(shown):
            print(f"  ... {len(result.failures) - len(shown)} more (use --verbose)")
    verdict = "ok" if report.ok else "FAILED"
    print(
        f"selftest {verdict}: {report.passed} passed, {report.failed} failed, "
        f"{report.skipped} skipped in {report.elapsed_s * 1000:.0f} ms"
    )


def _selftest(args: argparse.Namespace) -> int:
    report = run_vector_files(args.vectors) if args.vectors else run_builtin_selftests()
    _print_report(report, args.json, args.verbose)
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "selftest":
        return _selftest(args)
    if args.command == "api":
        return run_api_command(args)
    if args.command == "run":
        return run_daemon(args.config, allow_insecure=args.allow_insecure_software_keys)
    if args.command == "status":
        return _status(args)
    if args.command == "factory-reset":
        return _factory_reset(args)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse refuses unknown ones


if __name__ == "__main__":
    sys.exit(main())
