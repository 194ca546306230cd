"""Backups of the fleet's keys under split knowledge: one encrypted backup file, and its key
split into Shamir shares (``provisioning.shamir``), one file per custodian.

The pure part lives here (no token, no file system): the data key, the container, the share
files, and opening a backup with shares. ``provisioning.backup_cli`` reads the keys (wrapped in
the token, ``custody.wrap_token_key``, or a PEM file wrapped here) and writes the files.

Keys. A backup has one random 32-byte data key. From it HKDF-SHA256 derives the *wrapping key*
(AES-256, RFC 5649 key wrap with padding: the token's CKM_AES_KEY_WRAP_PAD, so a token key
leaves the token only wrapped) and the *sealing key* (AES-256-GCM over the container). The
data key itself is what is split; it is never written whole.

Backup file (``keyfleet-backup`` v1), JSON with sorted keys: a header (backup id, created time,
threshold K and count N, the SHA-256 of each share, the public facts of each key: label, CKA_ID,
public point, SHA-256 fingerprint of the SubjectPublicKeyInfo) and ``sealed``: nonce and
AES-256-GCM ciphertext of the private part (each key's wrapped PKCS#8), with the canonical
header as associated data, so a changed header or ciphertext is refused (``backup.tampered``).

Share file (``keyfleet-backup-share`` v1): backup id, index, K, N, the share bytes and a SHA-256
checksum of those fields. A share is checked alone (checksum: ``backup.share`` "corrupted") and
against the backup (its id, K, N, and the digest the backup recorded for that index: another
backup's share, or a changed one, is named) before any share is combined. Fewer than K good
shares: ``backup.threshold``, nothing is tried.

Refusals are ``BackupError`` with a check id (docs/checks.md); no message, repr or log carries a
data key, share or private key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)

from agent.protocol.errors import ConfigError
from provisioning import shamir

FORMAT = "keyfleet-backup"
SHARE_FORMAT = "keyfleet-backup-share"
VERSION = 1
DATA_KEY_BYTES = 32
BACKUP_ID_BYTES = 16
# a backup holds a handful of keys; anything far larger is not one of ours
MAX_FILE_BYTES = 1 << 20
MAX_SHARE_BYTES = 4096


class BackupError(ConfigError):
    """A backup or share that cannot be used. ``check`` is a stable id (docs/checks.md)."""

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(f"[{check}] {reason}")
        self.check = check
        self.reason = reason


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class DataKey:
    """The backup's data key; its repr never shows it."""

    def __init__(self, value: bytes) -> None:
        if len(value) != DATA_KEY_BYTES:
            raise BackupError("backup.key", "a data key is 32 bytes")
        self._value = value

    @classmethod
    def new(cls, random_bytes: Callable[[int], bytes] = secrets.token_bytes) -> DataKey:
        return cls(random_bytes(DATA_KEY_BYTES))

    def __repr__(self) -> str:
        return "DataKey(<redacted>)"

    def _derive(self, purpose: bytes) -> bytes:
        return HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"keyfleet backup " + purpose
        ).derive(self._value)

    def wrapping_key(self) -> bytes:
        """The AES-256 key the private keys are wrapped under (RFC 5649)."""
        return self._derive(b"wrap")

    def sealing_key(self) -> bytes:
        return self._derive(b"seal")

    def split(
        self,
        *,
        threshold: int,
        count: int,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> dict[int, bytes]:
        try:
            return shamir.split(
                self._value, threshold=threshold, count=count, random_bytes=random_bytes
            )
        except shamir.SharingError as exc:
            raise BackupError("backup.shares", str(exc)) from None


@dataclass(frozen=True)
class KeyEntry:
    """One fleet key in a backup: its label and CKA_ID, its public point (uncompressed P-256,
    what devices and certificates hold), and its private key wrapped under the wrapping key."""

    label: str
    key_id: bytes
    public_point: bytes
    wrapped: bytes = field(repr=False)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), self.public_point)

    def fingerprint(self) -> str:
        spki = self.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return hashlib.sha256(spki).hexdigest()


def wrap_file_key(private: ec.EllipticCurvePrivateKey, wrapping_key: bytes) -> bytes:
    """A key read from a PEM file, wrapped as the token wraps: PKCS#8 under RFC 5649."""
    pkcs8 = private.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return aes_key_wrap_with_padding(wrapping_key, pkcs8)


def unwrap_to_private_key(entry: KeyEntry, wrapping_key: bytes) -> ec.EllipticCurvePrivateKey:
    """The private key of ``entry`` in memory (for tests and checks only: a restore unwraps in
    the token)."""
    try:
        pkcs8 = aes_key_unwrap_with_padding(wrapping_key, entry.wrapped)
        key = serialization.load_der_private_key(pkcs8, password=None)
    except (InvalidUnwrap, ValueError):
        raise BackupError("backup.tampered", f"key {entry.label!r} does not unwrap") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise BackupError("backup.tampered", f"key {entry.label!r} is not an EC key")
    return key


@dataclass(frozen=True)
class Share:
    """One custodian's share of a backup's data key; its repr never shows the share bytes."""

    backup_id: bytes
    index: int
    threshold: int
    count: int
    value: bytes = field(repr=False)

    def digest(self) -> str:
        """What the backup file records for this share (SHA-256 over id, index and bytes)."""
        h = hashlib.sha256(b"keyfleet backup share v1\x00")
        h.update(self.backup_id + bytes([self.index]) + self.value)
        return h.hexdigest()

    def _fields(self) -> dict[str, Any]:
        return {
            "format": SHARE_FORMAT,
            "version": VERSION,
            "backup_id": self.backup_id.hex(),
            "index": self.index,
            "threshold": self.threshold,
            "shares": self.count,
            "value": self.value.hex(),
        }

    def encode(self) -> bytes:
        fields = self._fields()
        fields["checksum"] = hashlib.sha256(_canonical(fields)).hexdigest()
        return json.dumps(fields, sort_keys=True, indent=1).encode() + b"\n"


def parse_share(data: bytes, name: str) -> Share:
    """A share file's content; ``name`` (its path) is in every refusal."""
    if len(data) > MAX_SHARE_BYTES:
        raise BackupError("backup.share", f"{name}: too large for a share file")
    try:
        fields = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise BackupError("backup.share", f"{name}: corrupted (not a share file)") from None
    if not isinstance(fields, dict) or fields.get("format") != SHARE_FORMAT:
        raise BackupError("backup.share", f"{name}: not a keyfleet backup share")
    if fields.get("version") != VERSION:
        raise BackupError("backup.share", f"{name}: share version {fields.get('version')!r}")
    checksum = fields.pop("checksum", None)
    if checksum != hashlib.sha256(_canonical(fields)).hexdigest():
        raise BackupError("backup.share", f"{name}: corrupted (its checksum does not match)")
    try:
        share = Share(
            backup_id=bytes.fromhex(fields["backup_id"]),
            index=int(fields["index"]),
            threshold=int(fields["threshold"]),
            count=int(fields["shares"]),
            value=bytes.fromhex(fields["value"]),
        )
    except (KeyError, TypeError, ValueError):
        raise BackupError("backup.share", f"{name}: corrupted (a field is malformed)") from None
    if not 1 <= share.index <= share.count or len(share.value) != DATA_KEY_BYTES:
        raise BackupError("backup.share", f"{name}: corrupted (index or length out of range)")
    return share


@dataclass(frozen=True)
class BackupHeader:
    """The public part of a backup file (readable without shares)."""

    backup_id: bytes
    created: int
    threshold: int
    count: int
    share_digests: tuple[str, ...]
    keys: tuple[dict[str, str], ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "backup_id": self.backup_id.hex(),
            "created": self.created,
            "threshold": self.threshold,
            "shares": self.count,
            "share_digests": list(self.share_digests),
            "keys": [dict(k) for k in self.keys],
        }


def create_backup(
    entries: Sequence[KeyEntry],
    data_key: DataKey,
    *,
    threshold: int,
    count: int,
    now: int,
    random_bytes: Callable[[int], bytes] = secrets.token_bytes,
) -> tuple[bytes, list[Share]]:
    """The backup file's bytes and its ``count`` shares. ``entries`` were wrapped under
    ``data_key.wrapping_key()``."""
    if not entries:
        raise BackupError("backup.keys", "no key to back up")
    labels = [e.label for e in entries]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise BackupError("backup.keys", f"two keys are labelled {', '.join(twice)}")
    backup_id = random_bytes(BACKUP_ID_BYTES)
    values = data_key.split(threshold=threshold, count=count, random_bytes=random_bytes)
    shares = [Share(backup_id, i, threshold, count, v) for i, v in sorted(values.items())]
    header = BackupHeader(
        backup_id=backup_id,
        created=now,
        threshold=threshold,
        count=count,
        share_digests=tuple(s.digest() for s in shares),
        keys=tuple(
            {
                "label": e.label,
                "id": e.key_id.hex(),
                "public": e.public_point.hex(),
                "fingerprint": e.fingerprint(),
            }
            for e in entries
        ),
    )
    private = {"keys": [{"label": e.label, "wrapped": _b64(e.wrapped)} for e in entries]}
    nonce = random_bytes(12)
    sealed = AESGCM(data_key.sealing_key()).encrypt(
        nonce, _canonical(private), _canonical(header.as_json())
    )
    document = header.as_json() | {"sealed": {"nonce": _b64(nonce), "ciphertext": _b64(sealed)}}
    return json.dumps(document, sort_keys=True, indent=1).encode() + b"\n", shares


@dataclass(frozen=True)
class SealedBackup:
    """A parsed, not yet opened, backup file."""

    header: BackupHeader
    nonce: bytes
    ciphertext: bytes = field(repr=False)


def parse_backup(data: bytes, name: str) -> SealedBackup:
    if len(data) > MAX_FILE_BYTES:
        raise BackupError("backup.file", f"{name}: too large for a backup file")
    try:
        document = json.loads(data)
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise BackupError("backup.file", f"{name}: not a keyfleet backup")
        if document.get("version") != VERSION:
            raise BackupError("backup.file", f"{name}: backup version {document.get('version')!r}")
        keys = tuple(
            {k: str(entry[k]) for k in ("label", "id", "public", "fingerprint")}
            for entry in document["keys"]
        )
        header = BackupHeader(
            backup_id=bytes.fromhex(document["backup_id"]),
            created=int(document["created"]),
            threshold=int(document["threshold"]),
            count=int(document["shares"]),
            share_digests=tuple(str(d) for d in document["share_digests"]),
            keys=keys,
        )
        sealed = document["sealed"]
        nonce = base64.b64decode(sealed["nonce"], validate=True)
        ciphertext = base64.b64decode(sealed["ciphertext"], validate=True)
    except BackupError:
        raise
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise BackupError("backup.file", f"{name}: malformed backup file") from None
    if len(header.share_digests) != header.count or not 2 <= header.threshold <= header.count:
        raise BackupError("backup.file", f"{name}: malformed backup file (shares)")
    return SealedBackup(header, nonce, ciphertext)


def _check_shares(backup: SealedBackup, shares: Mapping[str, Share]) -> dict[int, bytes]:
    header = backup.header
    chosen: dict[int, bytes] = {}
    seen: dict[int, str] = {}
    for name, share in shares.items():
        if share.backup_id != header.backup_id:
            raise BackupError(
                "backup.share",
                f"{name}: a share of another backup ({share.backup_id.hex()}, this backup is "
                f"{header.backup_id.hex()})",
            )
        if (share.threshold, share.count) != (header.threshold, header.count):
            raise BackupError(
                "backup.share",
                f"{name}: says {share.threshold} of {share.count}, the backup "
                f"{header.threshold} of {header.count}",
            )
        if share.digest() != header.share_digests[share.index - 1]:
            raise BackupError(
                "backup.share",
                f"{name}: share {share.index} is not the one this backup recorded (changed)",
            )
        if share.index in seen:
            raise BackupError(
                "backup.share", f"{name}: share {share.index} again (also {seen[share.index]})"
            )
        seen[share.index] = name
        chosen[share.index] = share.value
    if len(chosen) < header.threshold:
        raise BackupError(
            "backup.threshold",
            f"{len(chosen)} share(s) given, this backup needs {header.threshold} of "
            f"{header.count}: nothing restored",
        )
    return chosen


def open_backup(
    backup: SealedBackup, shares: Mapping[str, Share]
) -> tuple[DataKey, list[KeyEntry]]:
    """The data key and the keys of ``backup``, given shares by file name. Every share is
    checked before any is combined; the container must authenticate (``backup.tampered``)."""
    chosen = _check_shares(backup, shares)
    data_key = DataKey(shamir.combine(chosen))
    header_json = backup.header.as_json()
    try:
        plain = AESGCM(data_key.sealing_key()).decrypt(
            backup.nonce, backup.ciphertext, _canonical(header_json)
        )
    except (InvalidTag, ValueError):
        raise BackupError(
            "backup.tampered", "the backup file does not authenticate (changed or damaged)"
        ) from None
    private = json.loads(plain)
    wrapped = {k["label"]: base64.b64decode(k["wrapped"]) for k in private["keys"]}
    entries = [
        KeyEntry(
            label=k["label"],
            key_id=bytes.fromhex(k["id"]),
            public_point=bytes.fromhex(k["public"]),
            wrapped=wrapped[k["label"]],
        )
        for k in backup.header.keys
    ]
    return data_key, entries
