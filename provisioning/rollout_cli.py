"""``keyfleet rollout``: staged rollouts of an approved release (provisioning/service/rollout.py).

``start`` and ``abort`` are operator commands over MQTT (signed, audited by the service); ``start``
then shows the rollout's progress as the service reports it, like ``rekey``: a line per change
(a bar on a terminal), JSON lines with ``--json``. ``status`` reads the service's database (on
the service host, like ``keyfleet devices``).

Exit codes of ``start``: 0 every wave passed; 1 failed (an untrusted device, a failed install,
aborted, or refused); 2 usage or configuration error; 3 a wave timed out; 4 still running when
``--timeout`` ran out (see ``keyfleet rollout status``); 5 failed and rolled back.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from agent.protocol.wire.messages.release import WAVE_STEP, RolloutAbort, RolloutStart
from agent.protocol.wire.messages.result import OperatorResult, ResultStatus
from provisioning.listings import print_table
from provisioning.operator import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PENDING,
    EXIT_TIMEOUT,
    FINAL,
    OperatorClient,
    Progress,
    run_commands,
)
from provisioning.service import rollout

EXIT_ROLLED_BACK = 5
DEFAULT_TIMEOUT = 3600.0

Listing = Callable[[argparse.ArgumentParser, Callable[[argparse.Namespace], int]], Any]
Reader = Callable[[argparse.Namespace, Callable[[Session], list[dict[str, Any]]]], list[Any]]


def _step(text: str) -> str:
    if WAVE_STEP.fullmatch(text) is None or (text.endswith("%") and int(text[:-1]) > 100):
        raise argparse.ArgumentTypeError(f"{text!r}: a device count (3) or a percentage (25%)")
    return text


def _steps(text: str) -> list[str]:
    return [_step(part.strip()) for part in text.split(",") if part.strip()]


def add_rollout_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    add_operator_options: Callable[[argparse.ArgumentParser], None],
    add_listing: Listing,
    client_handler: Callable[[argparse.Namespace], int],
    status_handler: Callable[[argparse.Namespace], int],
) -> None:
    """``rollout start|abort`` (run by ``client_handler`` with an operator client) and
    ``rollout status`` (``status_handler``, a database read)."""
    parser = commands.add_parser("rollout", help="staged rollouts of an approved release")
    sub = parser.add_subparsers(dest="rollout_command", required=True)
    start = sub.add_parser(
        "start",
        help="move GROUP to release VERSION in waves (exit 0 done, 1 failed, 3 timeout, "
        "4 still running, 5 rolled back)",
    )
    start.add_argument("version", metavar="VERSION", help="an approved release")
    start.add_argument("--group", required=True)
    start.add_argument(
        "--canary", type=_step, default="1", help="the first wave: a count or N%% (default 1)"
    )
    start.add_argument(
        "--then",
        type=_steps,
        default=["100%"],
        metavar="STEPS",
        help="the next waves' cumulative sizes, e.g. 25%%,100%% (default 100%%)",
    )
    start.add_argument(
        "--rollback",
        action="store_true",
        help="if a wave fails, return its devices to the release they ran before",
    )
    add_operator_options(start)
    start.set_defaults(handler=client_handler, timeout=DEFAULT_TIMEOUT)
    for action in start._actions:
        if action.dest == "timeout":
            action.help = "seconds to follow it (default 3600); the rollout goes on without us"

    abort = sub.add_parser("abort", help="stop a rollout where it is (no rollback)")
    abort.add_argument("rollout", metavar="ID")
    add_operator_options(abort)
    abort.set_defaults(handler=client_handler)
    status = add_listing(
        sub.add_parser("status", help="rollouts and their devices (database, on the service host)"),
        status_handler,
    )
    status.add_argument("rollout", nargs="?", metavar="ID", help="one rollout, with its devices")


def run_rollout_command(client: OperatorClient, args: argparse.Namespace) -> int:
    progress = Progress(sys.stdout, json_lines=args.json)
    if args.rollout_command == "abort":
        body = RolloutAbort(client.new_command_id(), args.rollout)
        return run_commands(
            client, [(f"abort {args.rollout}", body)], timeout=args.timeout, progress=progress
        )
    start = RolloutStart(
        client.new_command_id(),
        args.version,
        args.group,
        (args.canary, *args.then),
        True if args.rollback else None,
    )
    client.send(start)
    return follow_rollout(client, start, timeout=args.timeout, progress=progress)


def follow_rollout(
    client: OperatorClient, start: RolloutStart, *, timeout: float, progress: Progress
) -> int:
    """Show the rollout's results until the final one (its exit code) or ``timeout``."""
    label = f"rollout {start.version} to {start.group_id}"
    deadline = time.monotonic() + timeout
    last: OperatorResult | None = None
    while True:
        result = client.next_result(max(0.0, deadline - time.monotonic()))
        if result is None:
            break
        if not isinstance(result, OperatorResult) or result.command_id != start.command_id:
            continue
        last = result
        progress.show(label, result)
        if result.status in FINAL:
            return exit_code(result)
    which = "" if last is None else f" ({last.detail.split(':', 1)[0]})"
    print(
        f"keyfleet: {label}: still running after {timeout:g}s{which}: `keyfleet rollout status`",
        file=sys.stderr,
    )
    return EXIT_PENDING


def exit_code(result: OperatorResult) -> int:
    """0 done, 3 timeout, 5 rolled back, 1 any other end (the detail starts ``ID STATE:``)."""
    if result.status is ResultStatus.DONE:
        return EXIT_OK
    if result.status is ResultStatus.TIMEOUT:
        return EXIT_TIMEOUT
    words = result.detail.split(":", 1)[0].split()
    if len(words) == 2 and words[1] == "rolled-back":
        return EXIT_ROLLED_BACK
    return EXIT_FAILED


def show_status(args: argparse.Namespace, read: Reader) -> int:
    rows = read(args, lambda session: rollout.status(session, args.rollout))
    if args.json:
        print(json.dumps(rows if args.rollout is None else rows[0], sort_keys=True))
        return EXIT_OK
    table = [
        {
            **row,
            "waves": "+".join(str(n) for n in row["waves"]),
            "wave": f"{row['wave']}/{len(row['waves'])}",
            "reason": row["reason"] or "",
        }
        for row in rows
    ]
    columns = ("rollout", "version", "group", "state", "wave", "waves", "started_at", "reason")
    print_table(table, columns, sys.stdout, times=("started_at",))
    if args.rollout is not None:
        print()
        devices = [{**d, "detail": d["detail"] or ""} for d in rows[0]["devices"]]
        print_table(
            devices, ("device", "wave", "state", "previous", "attempts", "detail"), sys.stdout
        )
    return EXIT_OK
