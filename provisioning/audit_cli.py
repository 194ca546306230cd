"""The operator's side of audit checkpoints (docs/operations.md, "Audit checkpoints").

- ``keyfleet audit sync``: fetch the service's newest checkpoint (``op.audit_sync``), verify it
  with the pinned checkpoint key (``--checkpoint-cert``), check that it extends the checkpoint
  this operator remembered (the entries between, rehashed here, lead from the old head to the
  new one; the count never goes back) and remember it. The memory is one file in the operator's
  state directory (``--state-dir``, ``$KEYFLEET_STATE_DIR``, else the directory of the operator
  certificate), named after the checkpoint key, written atomically.
- ``keyfleet audit witness --to DIR [--every SECONDS]``: the same check, and every new
  checkpoint appended to ``DIR/checkpoints.jsonl``, whose last line is the witness's memory.
- ``keyfleet audit checkpoint export`` and ``keyfleet audit verify --checkpoint FILE`` (database
  side, wired in ``provisioning.cli``): ``export_checkpoints`` and ``check_chain``.

Exit codes follow the operator CLI's: 0 the checkpoint extends what was seen; 1 refused (a fork,
a rollback, a checkpoint not signed by the pinned key: the check id is printed); 2 the command
could not run; 3 the service did not answer in time.

The other operator commands call ``warn_if_stale``: a remembered checkpoint older than a day is
named on stderr, so that an operator who stopped syncing hears about it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.fsio import atomic_write
from agent.protocol.errors import ConfigError, KeyfleetError, ProtocolError, StateError
from agent.protocol.wire.cose import key_id
from agent.protocol.wire.messages.operator import AuditSync
from agent.protocol.wire.messages.result import AuditCheckpointResult, OperatorResult
from provisioning.audit import VerifyResult
from provisioning.checkpoint import (
    ChainExtension,
    CheckpointError,
    VerifiedCheckpoint,
    file_line,
    parse_file,
    verify_checkpoint,
)
from provisioning.db.schema import AuditEntry
from provisioning.operator import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    OperatorClient,
    load_public_key,
)
from provisioning.service import store

STATE_ENV = "KEYFLEET_STATE_DIR"
CHECKPOINT_CERT_ENV = "KEYFLEET_CHECKPOINT_CERT"
WITNESS_FILE = "checkpoints.jsonl"
# A remembered checkpoint older than this makes the other operator commands warn.
STALE_AFTER = 86_400
# Pages of entries one sync asks for at most (each up to 160 KiB): a first sync of a long log
# walks it all; after that only what was appended since the last sync is fetched.
MAX_PAGES = 100_000


class NoAnswer(KeyfleetError):
    """The service did not answer in time."""


class SyncRefused(KeyfleetError):
    """The service refused ``op.audit_sync`` (its ``op.result`` detail is the message)."""


# ---- the command line ---------------------------------------------------------------------------


def _positive_seconds(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return int(text)


def add_checkpoint_commands(
    audit_commands: argparse._SubParsersAction[argparse.ArgumentParser],
    *,
    operator_options: Callable[[argparse.ArgumentParser], None],
    database_options: Callable[[argparse.ArgumentParser], None],
    operator_handler: Callable[[argparse.Namespace], int],
    export_handler: Callable[[argparse.Namespace], int],
) -> None:
    """``audit sync``, ``audit witness`` (operator commands: ``operator_handler`` connects and
    calls ``args.audit_run``) and ``audit checkpoint export`` (database: ``export_handler``)."""
    pinned = "$KEYFLEET_CHECKPOINT_CERT: the audit checkpoint public key (certificate or PEM key)"
    sync = audit_commands.add_parser(
        "sync",
        help="fetch the newest signed checkpoint, check it extends the one seen before, keep it",
    )
    operator_options(sync)
    sync.add_argument("--checkpoint-cert", metavar="FILE", help=pinned)
    sync.add_argument(
        "--state-dir",
        metavar="DIR",
        help="$KEYFLEET_STATE_DIR: where the last checkpoint seen is kept (default: the "
        "directory of --cert)",
    )
    sync.set_defaults(handler=operator_handler, audit_run=run_sync)
    witness = audit_commands.add_parser(
        "witness", help="copy each new checkpoint to DIR after checking it extends the last one"
    )
    operator_options(witness)
    witness.add_argument("--checkpoint-cert", metavar="FILE", help=pinned)
    witness.add_argument("--to", metavar="DIR", required=True, help="DIR/checkpoints.jsonl")
    witness.add_argument(
        "--every", metavar="SECONDS", type=_positive_seconds, help="keep witnessing (default: once)"
    )
    witness.set_defaults(handler=operator_handler, audit_run=run_witness)
    checkpoint = audit_commands.add_parser("checkpoint", help="the stored signed checkpoints")
    checkpoint_commands = checkpoint.add_subparsers(dest="checkpoint_command", required=True)
    export = checkpoint_commands.add_parser(
        "export", help="write the stored checkpoints that verify as a checkpoint file"
    )
    database_options(export)
    export.add_argument("--checkpoint-cert", metavar="FILE", help=pinned)
    export.add_argument("--out", metavar="FILE", help="default: standard output")
    export.set_defaults(handler=export_handler)


# ---- the pinned key and the memory -------------------------------------------------------------


def pinned_key(path: str | None) -> ec.EllipticCurvePublicKey:
    """The checkpoint public key from ``path`` or ``$KEYFLEET_CHECKPOINT_CERT`` (a certificate or
    a public key, PEM)."""
    name = path or os.environ.get(CHECKPOINT_CERT_ENV)
    if not name:
        raise ConfigError(
            f"--checkpoint-cert (or ${CHECKPOINT_CERT_ENV}) is required: the audit checkpoint "
            "public key the fleet's administrator gave you"
        )
    try:
        return load_public_key(Path(name).read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read {name}: {exc.strerror}") from None
    except (ProtocolError, ValueError) as err:
        raise ConfigError(f"{name} is not a P-256 certificate or public key: {err}") from None


def state_dir(args: argparse.Namespace) -> Path:
    """``--state-dir``, ``$KEYFLEET_STATE_DIR``, or the directory of the operator certificate."""
    chosen: str | None = getattr(args, "state_dir", None) or os.environ.get(STATE_ENV)
    if chosen:
        return Path(chosen)
    cert: str | None = getattr(args, "cert", None) or os.environ.get("KEYFLEET_CERT")
    return Path(cert).resolve().parent if cert else Path.cwd()


def memory_path(directory: Path, key: ec.EllipticCurvePublicKey) -> Path:
    return directory / f"audit-checkpoint-{key_id(key).hex()[:16]}.json"


@dataclass(frozen=True)
class CheckpointMemory:
    """The last checkpoint this operator saw (one line of a checkpoint file), re-verified with
    the pinned key whenever it is read: a state file edited by someone else is refused."""

    path: Path
    key: ec.EllipticCurvePublicKey

    def load(self) -> VerifiedCheckpoint | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            found = parse_file(text, self.key)
        except CheckpointError as err:
            raise StateError(f"{self.path}: the remembered checkpoint is unusable: {err}") from None
        return found[-1] if found else None

    def save(self, verified: VerifiedCheckpoint) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, file_line(verified).encode(), mode=0o600)


def warn_if_stale(
    args: argparse.Namespace, *, err: TextIO = sys.stderr, now: float | None = None
) -> None:
    """Name a remembered checkpoint older than ``STALE_AFTER`` on ``err``. Never fails the
    command it runs in: a state directory that cannot be read is no warning."""
    try:
        remembered = sorted(state_dir(args).glob("audit-checkpoint-*.json"))
        newest = max((path.stat().st_mtime, path) for path in remembered) if remembered else None
    except OSError:
        return
    if newest is None:
        return
    age = (time.time() if now is None else now) - newest[0]
    if age > STALE_AFTER:
        print(
            f"keyfleet: warning: the audit checkpoint remembered in {newest[1]} was last synced "
            f"{age / 86_400:.1f} days ago: run `keyfleet audit sync` "
            "(audit.checkpoint.stale)",
            file=err,
        )


# ---- fetching and checking ---------------------------------------------------------------------


def _ask(client: OperatorClient, body: AuditSync, timeout: float) -> AuditCheckpointResult:
    reply = client.exchange(body, timeout)
    if reply is None:
        raise NoAnswer(f"no answer from the service within {timeout:g}s")
    if isinstance(reply, OperatorResult):
        raise SyncRefused(f"the service refused: {reply.status.value}: {reply.detail}")
    if not isinstance(reply, AuditCheckpointResult):
        raise SyncRefused("the service answered with another message")
    return reply


def fetch(
    client: OperatorClient,
    key: ec.EllipticCurvePublicKey,
    base: VerifiedCheckpoint | None,
    *,
    timeout: float,
) -> VerifiedCheckpoint:
    """The service's newest checkpoint, verified with ``key`` and checked to extend ``base``
    (``None``: from the empty log, walking every entry). Raises ``CheckpointError``."""
    reply = _ask(client, AuditSync(client.new_command_id(), base.count if base else 0), timeout)
    target = verify_checkpoint(reply.checkpoint, key)
    extension = ChainExtension(base, target)
    extension.feed((link.seq, link.preimage) for link in reply.entries)
    pages = 1
    while not extension.done:
        if not reply.entries or pages >= MAX_PAGES:
            raise CheckpointError(
                "audit.checkpoint.entries",
                f"the service stopped sending entries at {extension.seq} of {target.count}",
            )
        body = AuditSync(client.new_command_id(), extension.seq, target.count)
        reply = _ask(client, body, timeout)
        again = verify_checkpoint(reply.checkpoint, key)
        if again.checkpoint.count != target.count or again.head != target.head:
            raise CheckpointError(
                "audit.checkpoint.fork",
                f"the service signed two different heads for entry {target.count}: "
                f"{target.head.hex()} and {again.head.hex()}",
            )
        extension.feed((link.seq, link.preimage) for link in reply.entries)
        pages += 1
    extension.finish()
    return target


def describe(verified: VerifiedCheckpoint) -> str:
    item = verified.checkpoint
    when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(item.time))
    return (
        f"{item.count} entries, head {item.head.hex()}, signed {when} by instance {item.instance}"
    )


def _refused(err: CheckpointError, base: VerifiedCheckpoint | None, out: TextIO) -> int:
    print(f"keyfleet: audit checkpoint REFUSED [{err.check}]: {err.reason}", file=out)
    if base is not None:
        print(f"keyfleet: the checkpoint you saw before: {describe(base)}", file=out)
    print(
        "keyfleet: the audit log may have been rewritten; keep the remembered checkpoint and "
        'compare with the witnesses (docs/operations.md, "Audit checkpoints")',
        file=out,
    )
    return EXIT_FAILED


def run_sync(client: OperatorClient, args: argparse.Namespace) -> int:
    key = pinned_key(args.checkpoint_cert)
    memory = CheckpointMemory(memory_path(state_dir(args), key), key)
    base = memory.load()
    try:
        verified = fetch(client, key, base, timeout=args.timeout)
    except CheckpointError as err:
        return _refused(err, base, sys.stderr)
    except NoAnswer as err:
        print(f"keyfleet: audit sync: {err}", file=sys.stderr)
        return EXIT_TIMEOUT
    except SyncRefused as err:
        print(f"keyfleet: audit sync: {err}", file=sys.stderr)
        return EXIT_FAILED
    memory.save(verified)
    if args.json:
        record = json.loads(file_line(verified))
        record["previous"] = None if base is None else base.count
        print(json.dumps(record, sort_keys=True))
    elif base is None:
        print(f"audit checkpoint OK (first seen, whole log checked): {describe(verified)}")
    elif base.count == verified.count:
        print(f"audit checkpoint OK (unchanged): {describe(verified)}")
    else:
        print(
            f"audit checkpoint OK: {describe(verified)}; extends the one seen before "
            f"({base.count} entries)"
        )
    return EXIT_OK


# ---- the witness -------------------------------------------------------------------------------


def _append(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def witness_once(
    client: OperatorClient, key: ec.EllipticCurvePublicKey, path: Path, *, timeout: float
) -> VerifiedCheckpoint | None:
    """Check the newest checkpoint against the last one in ``path`` and append it if it is
    newer; returns it (None when the witness already had it)."""
    try:
        seen = parse_file(path.read_text(), key) if path.exists() else []
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}") from None
    base = seen[-1] if seen else None
    verified = fetch(client, key, base, timeout=timeout)
    if base is not None and verified.count == base.count:
        return None
    _append(path, file_line(verified))
    return verified


def run_witness(client: OperatorClient, args: argparse.Namespace) -> int:
    key = pinned_key(args.checkpoint_cert)
    directory = Path(args.to)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot use {directory}: {exc.strerror}") from None
    path = directory / WITNESS_FILE
    stop = threading.Event()
    if args.every is not None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda _signum, _frame: stop.set())
    while True:
        try:
            added = witness_once(client, key, path, timeout=args.timeout)
        except CheckpointError as err:
            print(
                f"keyfleet: WITNESS ALARM: the service's audit log does not extend the "
                f"checkpoints in {path}",
                file=sys.stderr,
            )
            return _refused(err, None, sys.stderr)
        except (NoAnswer, SyncRefused) as err:
            print(f"keyfleet: audit witness: {err}", file=sys.stderr)
            if args.every is None:
                return EXIT_TIMEOUT if isinstance(err, NoAnswer) else EXIT_FAILED
        else:
            if added is not None:
                print(f"witnessed: {describe(added)}", flush=True)
            elif args.every is None:
                print("witness: no new checkpoint", flush=True)
        if args.every is None or stop.wait(args.every):
            return EXIT_OK


# ---- database side: export, and the chain against checkpoints ----------------------------------


def export_checkpoints(
    session: Session, key: ec.EllipticCurvePublicKey, *, err: TextIO = sys.stderr
) -> str:
    """Every stored checkpoint that verifies with ``key``, as a checkpoint file; a stored row
    that does not verify is named on ``err`` and left out."""
    lines = []
    for signed in store.all_checkpoints(session):
        try:
            lines.append(file_line(verify_checkpoint(signed, key)))
        except CheckpointError as problem:
            print(f"keyfleet: left out a stored checkpoint: {problem}", file=err)
    return "".join(lines)


def check_chain(
    session: Session, result: VerifyResult, checkpoints: Sequence[VerifiedCheckpoint]
) -> list[CheckpointError]:
    """What is wrong between the chain ``verify_chain`` walked (``result``) and each checkpoint:
    a checkpoint beyond the chain's end (``audit.checkpoint.rollback``) or whose head is not the
    recomputed hash of its entry (``audit.checkpoint.fork``). Entries past the first bad one
    are not compared (the chain's own problem is reported)."""
    problems: list[CheckpointError] = []
    for verified in checkpoints:
        count = verified.count
        if count > result.head_seq:
            if result.ok:
                problems.append(
                    CheckpointError(
                        "audit.checkpoint.rollback",
                        f"checkpoint {describe(verified)}; the chain has only "
                        f"{result.head_seq} entries: entries were cut off the end",
                    )
                )
            continue
        # verify_chain recomputed every entry up to head_seq from its content and found it
        # equal to the stored hash, so the stored hash is the recomputed one
        stored = session.scalars(
            select(AuditEntry.entry_hash).where(AuditEntry.seq == count)
        ).first()
        if stored is None or bytes(stored) != verified.head:
            problems.append(
                CheckpointError(
                    "audit.checkpoint.fork",
                    f"checkpoint {describe(verified)}; entry {count} of the chain hashes to "
                    f"{'nothing' if stored is None else bytes(stored).hex()}: the log was "
                    "rewritten at or before it",
                )
            )
    return problems


def read_checkpoint_file(path: str, key: ec.EllipticCurvePublicKey) -> list[VerifiedCheckpoint]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    return parse_file(text, key)
