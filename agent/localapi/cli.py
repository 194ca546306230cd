"""``keyagent api ...``: the local key API from a shell.

Data goes through stdin/stdout as raw bytes so commands compose with pipes::

    keyagent api encrypt --group g1 < report.json > report.kfd
    keyagent api decrypt --group g1 < report.kfd
    keyagent api sign < firmware.bin > firmware.sig
    printf %s "$TOKEN" | keyagent api seal cloud-token
    keyagent api unseal cloud-token
    keyagent api keys [--json]

Exit status: 0 done, 1 the agent refused (the check id and reason on stderr), 3 the agent could
not be reached. ``--socket`` or ``$KEYAGENT_API_SOCKET`` choose the socket.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, BinaryIO, TextIO

from agent.localapi.client import LocalApiClient
from agent.localapi.protocol import MAX_MESSAGE, default_socket_path
from agent.protocol.errors import ProtocolError, TransportError

EXIT_REFUSED = 1
EXIT_UNREACHABLE = 3


def register_api_command(commands: Any) -> None:
    """Add ``api`` to an argparse subparsers object (``keyagent``'s); the parsed namespace gets
    ``api_handler``, to be called as ``run_api_command(args)``."""
    api = commands.add_parser(
        "api",
        help="use the local key API (encrypt, decrypt, sign, seal, unseal, keys)",
        description="Call the running keyagent's local key API; data on stdin/stdout.",
    )
    api.add_argument(
        "--socket",
        default=None,
        help=f"API socket (default $KEYAGENT_API_SOCKET or {default_socket_path()})",
    )
    ops = api.add_subparsers(dest="api_op", required=True)
    for name, text in (("encrypt", "seal stdin for a group"), ("decrypt", "open stdin")):
        sub = ops.add_parser(name, help=text)
        sub.add_argument("--group", required=True)
    ops.add_parser("sign", help="sign stdin with the DevID key (DER signature on stdout)")
    seal = ops.add_parser("seal", help="seal stdin (<= 128 bytes) in the TPM under NAME")
    seal.add_argument("name")
    unseal = ops.add_parser("unseal", help="print the secret sealed under NAME")
    unseal.add_argument("name")
    keys = ops.add_parser("keys", help="list the agent's keys and their states")
    keys.add_argument("--json", action="store_true")
    api.set_defaults(api_handler=run_api_command)


def run_api_command(
    args: argparse.Namespace,
    stdin: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    stdin = stdin if stdin is not None else sys.stdin.buffer
    stdout = stdout if stdout is not None else sys.stdout.buffer
    stderr = stderr if stderr is not None else sys.stderr
    try:
        with LocalApiClient(args.socket) as client:
            out = _run(client, args, stdin)
    except TransportError as exc:
        print(f"keyagent api: {exc}", file=stderr)
        return EXIT_UNREACHABLE
    except ProtocolError as exc:
        print(f"keyagent api: refused [{exc.check}] {exc.reason}", file=stderr)
        return EXIT_REFUSED
    stdout.write(out)
    stdout.flush()
    return 0


def _run(client: LocalApiClient, args: argparse.Namespace, stdin: BinaryIO) -> bytes:
    op = args.api_op
    if op == "keys":
        records = client.list_keys()
        if args.json:
            return (json.dumps(records, indent=2, sort_keys=True) + "\n").encode()
        return _table(records).encode()
    if op == "unseal":
        return client.unseal(args.name)
    data = stdin.read(MAX_MESSAGE + 1)
    if op == "encrypt":
        return client.encrypt(args.group, data)
    if op == "decrypt":
        return client.decrypt(args.group, data)
    if op == "sign":
        return client.sign(data)
    client.seal(args.name, data)
    return b""


def _table(records: list[dict[str, Any]]) -> str:
    rows = [("NAME", "KIND", "STATE", "SINCE")]
    for r in records:
        since = r["transitions"][-1][1] if r.get("transitions") else ""
        rows.append((str(r.get("name")), str(r.get("kind")), str(r.get("state")), str(since)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "".join(
        f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}\n"
        for row in rows
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m agent.localapi.cli ...``: the same as ``keyagent api ...``."""
    parser = argparse.ArgumentParser(prog="keyagent")
    register_api_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["api", *(argv if argv is not None else sys.argv[1:])])
    return run_api_command(args)


if __name__ == "__main__":
    sys.exit(main())
