"""``keyfleet backup``: back up the fleet's keys under split knowledge, and restore them into a
fresh token (docs/operations.md, "Backup and restore").

``keyfleet backup create --token URI --shares N --threshold K --out DIR`` backs up every EC key
of the token (or the ``--label``s named), each wrapped in the token under the backup's wrapping
key (the keys must have been made with backup: ``pki init --token ... --backup``; a key that is
not extractable is named, nothing is written), plus any ``--key-file LABEL=PATH`` (a plain or
passphrase-encrypted PEM: read directly, with the ``custody.file`` warning). It writes
``DIR/keyfleet-backup-<id>.json`` and ``DIR/keyfleet-share-<id>-<i>-of-<N>.json`` for i = 1..N,
0600, atomically; nothing is overwritten.

``keyfleet backup restore BACKUP --share FILE... --token URI`` checks every share (each bad one
is named) and needs K of them, opens the backup, and unwraps each key into the token (empty of
those labels), non-extractable, with its label and id, checking that it signs for its recorded
public key. ``keyfleet backup show BACKUP`` prints the public header.

With ``--config FILE`` the command is audited (``backup.create`` / ``backup.restore``) in the
service's database when it is reachable; an unreachable database is said on stderr and does not
stop a restore (the database may be what is being rebuilt).

Device keys are never here: they cannot leave their TPM.
"""

from __future__ import annotations

import argparse
import getpass
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from cryptography.hazmat.primitives import serialization

from agent.fsio import atomic_write
from agent.protocol.errors import ConfigError, KeyfleetError, ProtocolError, StateError
from provisioning import audit, backup, custody
from provisioning.config import load_config
from provisioning.pki_cli import _read_passphrase, token_ref
from provisioning.registry import Outcome, make_engine, session_factory

EXIT_OK = 0


def _audit(
    config_path: str | None,
    *,
    action: str,
    target: str,
    outcome: Outcome,
    reason: str = "",
    details: Mapping[str, audit.JsonValue] | None = None,
) -> None:
    if config_path is None:
        return
    try:
        config = load_config(config_path)
        engine = make_engine(config.database_url)
    except ConfigError as exc:
        print(f"warning: {action} not audited: {exc}", file=sys.stderr)
        return
    try:
        audit.record(
            session_factory(engine),
            now=int(time.time()),
            actor=f"local:{getpass.getuser()}",
            action=action,
            target=target,
            outcome=outcome,
            reason=reason,
            details=details,
        )
    except Exception as exc:  # the database being down must not undo a backup or a restore
        print(
            f"warning: {action} not audited: the database is not reachable ({type(exc).__name__})",
            file=sys.stderr,
        )
    finally:
        engine.dispose()


def _key_ref(token: str, label: str) -> custody.TokenKeyRef:
    """The reference of key ``label`` in the token ``token`` names (any label: percent-encoded
    into the URI, decoded again by the parser)."""
    return token_ref(token, quote(label, safe=""))


def _parse_key_file(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: give LABEL=PATH")
    return label, Path(path)


def _collect(args: argparse.Namespace, data_key: backup.DataKey) -> list[backup.KeyEntry]:
    wrapping = data_key.wrapping_key()
    entries: list[backup.KeyEntry] = []
    if args.token is not None:
        probe = token_ref(args.token, "-")
        labels = args.label or custody.token_key_labels(probe)
        for label in labels:
            wrapped, ident, point = custody.wrap_token_key(_key_ref(args.token, label), wrapping)
            entries.append(backup.KeyEntry(label, ident, point, wrapped))
    elif args.label:
        raise ConfigError("--label picks keys of the --token: give --token")
    passphrase = _read_passphrase(args.passphrase_file)
    for label, path in args.key_file or []:
        try:
            key = custody.load_private_key(
                custody.FileKeyRef(path), password=passphrase, role=label
            )
        except ProtocolError as exc:
            raise ConfigError(f"--key-file {label}={path}: {exc}") from None
        point = key.public_key().public_bytes(
            serialization.Encoding.X962,
            serialization.PublicFormat.UncompressedPoint,
        )
        entries.append(
            backup.KeyEntry(label, label.encode(), point, backup.wrap_file_key(key, wrapping))
        )
    return entries


def _create(args: argparse.Namespace) -> int:
    if args.token is None and not args.key_file:
        raise ConfigError("nothing to back up: give --token and/or --key-file LABEL=PATH")
    if args.threshold > args.shares:
        raise backup.BackupError(
            "backup.shares", f"--threshold {args.threshold} is more than --shares {args.shares}"
        )
    out = Path(args.out)
    if not out.is_dir():
        raise ConfigError(f"{out} is not a directory")
    data_key = backup.DataKey.new()
    entries = _collect(args, data_key)
    now = int(time.time())
    document, shares = backup.create_backup(
        entries, data_key, threshold=args.threshold, count=args.shares, now=now
    )
    ident = shares[0].backup_id.hex()
    backup_path = out / f"keyfleet-backup-{ident}.json"
    share_paths = [out / f"keyfleet-share-{ident}-{s.index}-of-{s.count}.json" for s in shares]
    written: list[Path] = []
    try:
        for path, data in [(backup_path, document)] + [
            (p, s.encode()) for p, s in zip(share_paths, shares, strict=True)
        ]:
            if path.exists():
                raise ConfigError(f"refusing to overwrite {path}")
            atomic_write(path, data, 0o600)
            written.append(path)
    except (ConfigError, StateError):
        for path in written:
            path.unlink(missing_ok=True)
        raise
    labels = [e.label for e in entries]
    _audit(
        args.config,
        action="backup.create",
        target=ident,
        outcome=Outcome.ACCEPTED,
        details={"keys": list(labels), "threshold": args.threshold, "shares": args.shares},
    )
    print(f"backup {ident}: {len(entries)} key(s): {', '.join(labels)}")
    print(f"wrote {backup_path} (encrypted backup, 0600)")
    for path in share_paths:
        print(f"wrote {path} (share, 0600: give it to one custodian)")
    print(f"any {args.threshold} of the {args.shares} shares restore it; fewer restore nothing")
    return EXIT_OK


def _load(args: argparse.Namespace) -> backup.SealedBackup:
    try:
        data = Path(args.backup).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {args.backup}: {exc.strerror}") from None
    return backup.parse_backup(data, args.backup)


def _into_token(
    entries: list[backup.KeyEntry], refs: list[custody.TokenKeyRef], wrapping: bytes
) -> list[str]:
    """Unwrap every entry into the token, all or nothing: labels already there refuse the whole
    restore, and a key that fails takes the ones restored before it out again."""
    present = set(custody.token_key_labels(refs[0]))
    taken = [e.label for e in entries if e.label in present]
    if taken:
        raise custody.CustodyError(
            "token.exists",
            f"the token holds {', '.join(taken)} already: restore into a fresh token "
            "(nothing was restored)",
        )
    done: list[custody.TokenKeyRef] = []
    try:
        for entry, ref in zip(entries, refs, strict=True):
            custody.unwrap_into_token(ref, entry.wrapped, entry.public_point, wrapping)
            done.append(ref)
            print(
                f"restored {entry.label} (sha256 {entry.fingerprint()}) into "
                f"{custody.describe(ref)}"
            )
    except BaseException:
        for ref in done:
            custody.remove_token_key(ref)
        raise
    return [e.label for e in entries]


def _restore(args: argparse.Namespace) -> int:
    sealed = _load(args)
    shares: dict[str, backup.Share] = {}
    for name in args.share:
        try:
            data = Path(name).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {name}: {exc.strerror}") from None
        shares[name] = backup.parse_share(data, name)
    ident = sealed.header.backup_id.hex()
    try:
        data_key, entries = backup.open_backup(sealed, shares)
    except backup.BackupError as exc:
        _audit(
            args.config,
            action="backup.restore",
            target=ident,
            outcome=Outcome.REFUSED,
            reason=f"[{exc.check}] {exc.reason}",
        )
        raise
    wrapping = data_key.wrapping_key()
    refs = []
    for entry in entries:
        named = _key_ref(args.token, entry.label)
        # the same CKA_ID as before: configurations may name the key by id=
        refs.append(
            custody.TokenKeyRef(
                named.uri, named.token, named.label, entry.key_id, named.pin, named.module
            )
        )
    try:
        restored = _into_token(entries, refs, wrapping)
    except KeyfleetError as exc:
        _audit(
            args.config,
            action="backup.restore",
            target=ident,
            outcome=Outcome.REFUSED,
            reason=str(exc),
        )
        raise
    _audit(
        args.config,
        action="backup.restore",
        target=ident,
        outcome=Outcome.ACCEPTED,
        details={"keys": list(restored), "shares": sorted(s.index for s in shares.values())},
    )
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    header = _load(args).header
    created = datetime.fromtimestamp(header.created, UTC)
    print(f"backup {header.backup_id.hex()}, made {created:%Y-%m-%d %H:%M} UTC")
    print(f"{header.threshold} of {header.count} shares restore it")
    for key in header.keys:
        print(f"  {key['label']}: id {key['id']}, sha256 {key['fingerprint']}")
    return EXIT_OK


def _count(text: str) -> int:
    if not text.isdigit() or not 2 <= int(text) <= 255:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 2 to 255")
    return int(text)


def add_backup_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``keyfleet backup create|restore|show`` to the ``keyfleet`` parser."""
    parser = commands.add_parser("backup", help="back up and restore the fleet's keys")
    sub = parser.add_subparsers(dest="backup_command", required=True, metavar="COMMAND")
    audited = "the service configuration: the command is audited in its database if reachable"

    create = sub.add_parser(
        "create",
        help="write an encrypted backup of the fleet's keys and split its key into shares",
    )
    create.add_argument(
        "--token", metavar="URI", help="the token (pkcs11:token=LABEL?pin-source=...)"
    )
    create.add_argument(
        "--label", action="append", metavar="LABEL", help="back up only this key (repeatable)"
    )
    create.add_argument(
        "--key-file",
        action="append",
        type=_parse_key_file,
        metavar="LABEL=PATH",
        help="a fleet key kept in a PEM file (repeatable)",
    )
    create.add_argument(
        "--passphrase-file", metavar="FILE", help="decrypts encrypted --key-file keys"
    )
    create.add_argument("--shares", type=_count, required=True, help="custodians (N)")
    create.add_argument("--threshold", type=_count, required=True, help="shares needed (K)")
    create.add_argument("--out", required=True, metavar="DIR", help="where the files go")
    create.add_argument("--config", metavar="FILE", help=audited)
    create.set_defaults(handler=_create)

    restore = sub.add_parser("restore", help="restore a backup into a fresh token with K shares")
    restore.add_argument("backup", metavar="BACKUP", help="the backup file")
    restore.add_argument(
        "--share", action="append", required=True, metavar="FILE", help="a share (repeat)"
    )
    restore.add_argument("--token", required=True, metavar="URI", help="the token to restore into")
    restore.add_argument("--config", metavar="FILE", help=audited)
    restore.set_defaults(handler=_restore)

    show = sub.add_parser("show", help="the public facts of a backup file (no share needed)")
    show.add_argument("backup", metavar="BACKUP", help="the backup file")
    show.set_defaults(handler=_show)
