"""Signed checkpoints of the audit log, and the check that a newer one extends an older one.

A checkpoint says "the audit chain had ``count`` entries and entry ``count`` hashed to ``head``
at ``time``, as instance ``instance`` saw it", signed by the audit checkpoint key (``[audit]
checkpoint_key``: never the service's message-signing key or a TLS key). Its bytes are one
COSE_Sign1 (``agent.protocol.wire.cose``, ES256, kid in the protected header) over the
deterministic CBOR map

    {"type": "kf.audit.checkpoint", "v": 1, "count": uint, "head": bstr(32), "time": uint,
     "instance": tstr}

signed with the external AAD ``keyfleet audit checkpoint v1``: the ``type`` and the AAD keep a
checkpoint from being taken for any other object the fleet signs (an envelope's signature is made
with no AAD and never verifies as a checkpoint, and the other way round).

Validation stages are types: bytes become a ``VerifiedCheckpoint`` only through
``verify_checkpoint`` with the pinned public key. ``ChainExtension`` then checks that the entries
between a remembered checkpoint and a new one, rehashed here from their preimages
(``provisioning.audit.entry_preimage``; nothing of the stored hashes is trusted), lead from the
old head to the new one. Whoever rewrote history before the remembered head (an entry deleted and
the chain recomputed) or cut entries off the end cannot make a checkpoint that passes.

Check ids (docs/checks.md, "Audit checkpoints"): ``audit.checkpoint.malformed``,
``audit.checkpoint.key``, ``audit.checkpoint.signature``, ``audit.checkpoint.rollback``,
``audit.checkpoint.fork``, ``audit.checkpoint.entries``.

Checkpoint files (``keyfleet audit checkpoint export``, the witness) hold one JSON object a line:
``{"count", "head" (hex), "time", "instance", "signed" (base64 of the COSE bytes)}``; only
``signed`` is trusted, the other fields are for people and must agree with it.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol.errors import CryptoError, ProtocolError
from agent.protocol.wire import cbor, cose
from agent.protocol.wire.messages.base import ID_PATTERN
from provisioning.audit import GENESIS_PREV_HASH, compute_hash

CHECKPOINT_TYPE = "kf.audit.checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_AAD = b"keyfleet audit checkpoint v1"
HEAD_SIZE = 32
# A checkpoint is about 200 bytes; nothing larger is decoded.
MAX_CHECKPOINT = 1024
UINT63 = (1 << 63) - 1
_FIELDS = frozenset({"type", "v", "count", "head", "time", "instance"})


class CheckpointError(ProtocolError):
    """A checkpoint, or the entries offered between two, was refused; ``check`` names why."""


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint states (not yet signed, or already verified)."""

    count: int
    head: bytes
    time: int
    instance: str

    def __post_init__(self) -> None:
        if type(self.count) is not int or not 0 <= self.count <= UINT63:
            raise CheckpointError("audit.checkpoint.malformed", "count must be an unsigned int")
        if type(self.head) is not bytes or len(self.head) != HEAD_SIZE:
            raise CheckpointError("audit.checkpoint.malformed", f"head must be {HEAD_SIZE} bytes")
        if self.count == 0 and self.head != GENESIS_PREV_HASH:
            raise CheckpointError("audit.checkpoint.malformed", "an empty log has no head")
        if type(self.time) is not int or not 0 <= self.time <= UINT63:
            raise CheckpointError("audit.checkpoint.malformed", "time must be an unsigned int")
        if type(self.instance) is not str or not ID_PATTERN.fullmatch(self.instance):
            raise CheckpointError("audit.checkpoint.malformed", "instance must be a service id")

    def payload(self) -> bytes:
        return cbor.encode(
            {
                "type": CHECKPOINT_TYPE,
                "v": CHECKPOINT_VERSION,
                "count": self.count,
                "head": self.head,
                "time": self.time,
                "instance": self.instance,
            }
        )

    def describe(self) -> str:
        return f"{self.count}:{self.head.hex()}"


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint whose signature by the pinned key verified; ``signed`` its exact bytes."""

    checkpoint: Checkpoint
    signed: bytes

    @property
    def count(self) -> int:
        return self.checkpoint.count

    @property
    def head(self) -> bytes:
        return self.checkpoint.head


def sign_checkpoint(checkpoint: Checkpoint, key: ec.EllipticCurvePrivateKey) -> bytes:
    """The COSE_Sign1 bytes of ``checkpoint`` signed by the audit checkpoint key (any pyca P-256
    private key, a token key included: only ``key.sign`` is called)."""
    return cose.sign1(checkpoint.payload(), key, external_aad=CHECKPOINT_AAD)


def _decode_payload(payload: bytes) -> Checkpoint:
    try:
        body = cbor.decode(payload, max_size=MAX_CHECKPOINT)
    except ProtocolError as err:
        raise CheckpointError("audit.checkpoint.malformed", f"payload: {err.reason}") from None
    if not isinstance(body, dict) or set(body) != _FIELDS:
        raise CheckpointError("audit.checkpoint.malformed", "not a checkpoint map")
    if body["type"] != CHECKPOINT_TYPE or body["v"] != CHECKPOINT_VERSION:
        raise CheckpointError("audit.checkpoint.malformed", "not a version-1 audit checkpoint")
    return Checkpoint(
        count=body["count"], head=body["head"], time=body["time"], instance=body["instance"]
    )


def verify_checkpoint(signed: bytes, public_key: ec.EllipticCurvePublicKey) -> VerifiedCheckpoint:
    """Raise ``CheckpointError`` unless ``signed`` is a checkpoint signed by ``public_key``."""
    try:
        message = cose.decode_sign1(signed, max_size=MAX_CHECKPOINT)
    except ProtocolError as err:
        raise CheckpointError("audit.checkpoint.malformed", f"not a COSE_Sign1: {err}") from None
    if message.kid != cose.key_id(public_key):
        raise CheckpointError(
            "audit.checkpoint.key",
            f"signed by key {message.kid.hex()[:16]}…, not by the pinned checkpoint key "
            f"{cose.key_id(public_key).hex()[:16]}…",
        )
    try:
        cose.verify_sign1(message, public_key, external_aad=CHECKPOINT_AAD)
    except CryptoError as err:
        raise CheckpointError("audit.checkpoint.signature", err.reason) from None
    return VerifiedCheckpoint(_decode_payload(message.payload), signed)


class ChainExtension:
    """Checks that ``target`` extends ``base`` (``None``: the empty log, so the whole chain is
    walked): feed the entries ``base.count + 1 .. target.count`` as (seq, preimage) in any number
    of pages, then ``finish``. Each entry is hashed here onto the running head."""

    def __init__(self, base: VerifiedCheckpoint | None, target: VerifiedCheckpoint) -> None:
        base_count, base_head = (0, GENESIS_PREV_HASH) if base is None else (base.count, base.head)
        if target.count < base_count:
            raise CheckpointError(
                "audit.checkpoint.rollback",
                f"the log went back from {base_count} entries to {target.count}: entries were "
                "cut off the end (or the service is not the one that signed the remembered "
                "checkpoint)",
            )
        if target.count == base_count and target.head != base_head:
            raise CheckpointError(
                "audit.checkpoint.fork",
                f"entry {base_count} hashed to {base_head.hex()} and now to "
                f"{target.head.hex()}: the log was rewritten",
            )
        self.base_count = base_count
        self.seq = base_count
        self.head = base_head
        self.target = target

    @property
    def done(self) -> bool:
        return self.seq == self.target.count

    def feed(self, links: Iterable[tuple[int, bytes]]) -> None:
        for seq, preimage in links:
            if seq != self.seq + 1 or seq > self.target.count:
                raise CheckpointError(
                    "audit.checkpoint.entries",
                    f"entry {seq} offered where entry {self.seq + 1} (of at most "
                    f"{self.target.count}) was expected",
                )
            self.head = compute_hash(self.head, preimage)
            self.seq = seq

    def finish(self) -> None:
        if not self.done:
            raise CheckpointError(
                "audit.checkpoint.entries",
                f"entries {self.seq + 1}..{self.target.count} were not offered",
            )
        if self.head != self.target.head:
            raise CheckpointError(
                "audit.checkpoint.fork",
                f"entries {self.base_count + 1}..{self.target.count} do not hash from the "
                f"remembered head (entry {self.base_count}) to the new head: history before "
                "the new checkpoint was rewritten",
            )


def check_extends(
    base: VerifiedCheckpoint | None,
    target: VerifiedCheckpoint,
    links: Sequence[tuple[int, bytes]],
) -> None:
    """``ChainExtension`` in one call, for entries that are all at hand."""
    extension = ChainExtension(base, target)
    extension.feed(links)
    extension.finish()


# ---- checkpoint files --------------------------------------------------------------------------


def file_line(verified: VerifiedCheckpoint) -> str:
    """One line of a checkpoint file (newline included)."""
    item = verified.checkpoint
    record = {
        "count": item.count,
        "head": item.head.hex(),
        "time": item.time,
        "instance": item.instance,
        "signed": base64.b64encode(verified.signed).decode("ascii"),
    }
    return json.dumps(record, sort_keys=True) + "\n"


def parse_file(text: str, public_key: ec.EllipticCurvePublicKey) -> list[VerifiedCheckpoint]:
    """Every checkpoint of a checkpoint file, each verified with ``public_key``; the readable
    fields of each line must agree with its signed bytes. Raises ``CheckpointError`` naming the
    line."""
    found: list[VerifiedCheckpoint] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            signed = base64.b64decode(record["signed"], validate=True)
            shown = (record["count"], record["head"], record["time"], record["instance"])
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise CheckpointError(
                "audit.checkpoint.malformed", f"line {number} is not a checkpoint record"
            ) from None
        try:
            verified = verify_checkpoint(signed, public_key)
        except CheckpointError as err:
            raise CheckpointError(err.check, f"line {number}: {err.reason}") from None
        item = verified.checkpoint
        if shown != (item.count, item.head.hex(), item.time, item.instance):
            raise CheckpointError(
                "audit.checkpoint.malformed",
                f"line {number}: the readable fields disagree with the signed checkpoint",
            )
        found.append(verified)
    return found
