"""The envelope every message shares, and decoding in typed stages.

A message is a COSE_Sign1 whose payload is the deterministic CBOR map::

    {"type": text, "version": 1, "sender": id, "to": id, "seq": uint, "time": uint, "body": map}

Receiving goes through three types, and only the last one reaches a state machine:

``RawMessage``       bytes whose size has been checked (nothing decoded yet);
``DecodedMessage``   COSE parsed, payload decoded, envelope fields type-checked; NOT trusted:
                     the body is still an untyped map, the signature unchecked;
``VerifiedMessage``  the kid resolved to a signer, the signer is the claimed sender, the
                     signature verifies, the time is fresh, the receiver is the addressee, and
                     the body parsed strictly into its typed class.

``to`` is not in the original field list of DESIGN.md: without it a signed command for device A
could be replayed to device B (the service's sequence numbers are one counter for all devices, so
B's sequence check alone would not catch it). It names the addressee: a device, the service, an
operator, or a group (for group handshake messages fanned out on ``grp/{group}/commit``).

Replay and epoch checks are separate (:mod:`agent.protocol.wire.replay`), because they need state
that only the receiver persists.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol.errors import ProtocolError
from agent.protocol.wire import cbor, cose
from agent.protocol.wire.messages.base import ID_PATTERN, UINT64_MAX, Body
from agent.protocol.wire.messages.registry import REGISTRY, body_class

VERSION: Final = 1
DEFAULT_MAX_MESSAGE_SIZE: Final = Body.MAX_MESSAGE_SIZE
LARGEST_MESSAGE_SIZE: Final = max(cls.MAX_MESSAGE_SIZE for cls in REGISTRY.values())
"""The frame limit before anything is decoded: the largest any message type allows (Welcomes);
each type's own limit (``Body.MAX_MESSAGE_SIZE``, 256 KiB for all others) is applied as soon as
the envelope names the type, before the body is parsed or the signature checked."""
DEFAULT_MAX_AGE: Final = 300
DEFAULT_MAX_FUTURE: Final = 60
ENVELOPE_FIELDS: Final = frozenset({"type", "version", "sender", "to", "seq", "time", "body"})


@dataclass(frozen=True)
class Signer:
    """What a key resolver knows about a kid: whose key it is, and the key. ``kid``: the key's
    :func:`~agent.protocol.wire.cose.key_id`, if the resolver has it already (from where it
    loaded the key: it must be that key's id), else it is computed at each verification."""

    sender: str
    public_key: ec.EllipticCurvePublicKey = field(repr=False)
    kid: bytes | None = field(default=None, repr=False)


KeyResolver = Callable[[bytes], Signer]
"""kid -> Signer. Raises ``ProtocolError("cose.kid-unknown", ...)`` (or any ``LookupError``,
which is turned into that) for a kid it does not know or no longer trusts (revoked keys)."""


@dataclass(frozen=True)
class RawMessage:
    """Bytes off the wire whose size is within the limit. Construct with :meth:`from_bytes`."""

    data: bytes = field(repr=False)

    @classmethod
    def from_bytes(cls, data: bytes, *, max_size: int = LARGEST_MESSAGE_SIZE) -> RawMessage:
        if type(data) is not bytes:
            raise ProtocolError("wire.type", "a message is bytes")
        if len(data) > max_size:
            raise ProtocolError("wire.oversize", f"{len(data)} bytes exceed {max_size}")
        return cls(data)


@dataclass(frozen=True)
class DecodedMessage:
    """A parsed, NOT verified message. Nothing here may be acted on; ``untrusted_body`` is only
    for the one case that needs to look before verifying (enrollment's proof of possession)."""

    sign1: cose.Sign1
    type: str
    version: int
    sender: str
    to: str
    seq: int
    time: int
    untrusted_body: Mapping[object, object] = field(repr=False)
    message_id: bytes


_VERIFIED: Final = object()


@dataclass(frozen=True)
class VerifiedMessage:
    """A message whose signature, sender binding, freshness and addressee were checked and whose
    body is typed. Only :func:`verify_message` makes these."""

    type: str
    sender: str
    to: str
    seq: int
    time: int
    kid: bytes
    message_id: bytes
    body: Body
    _proof: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._proof is not _VERIFIED:
            raise ProtocolError("envelope.unverified", "VerifiedMessage is made by verify_message")


def message_id(protected: bytes, payload: bytes) -> bytes:
    """SHA-256 over the deterministic encoding of ``[protected, payload]``.

    The signature is left out on purpose: ECDSA signatures are malleable ((r, s) and (r, n - s)
    both verify), so a digest over them would let a replay pass as a new message."""
    return hashlib.sha256(
        b"".join((_PAIR, cose.byte_string(protected), cose.byte_string(payload)))
    ).digest()


_PAIR: Final = b"\x82"  # the head of an array of two


def encode_message(
    body: Body,
    *,
    key: ec.EllipticCurvePrivateKey,
    sender: str,
    to: str,
    seq: int,
    time: int,
) -> bytes:
    """Sign ``body`` in an envelope; return the COSE_Sign1 bytes to publish."""
    _check_id(sender, "sender")
    _check_id(to, "to")
    _check_uint(seq, "seq")
    _check_uint(time, "time")
    if REGISTRY.get(body.TYPE) is not type(body):
        raise ProtocolError("envelope.type", f"{type(body).__name__} is not a registered body")
    payload = cbor.encode(
        {
            "type": body.TYPE,
            "version": VERSION,
            "sender": sender,
            "to": to,
            "seq": seq,
            "time": time,
            "body": body.to_cbor_map(),
        }
    )
    return cose.sign1(payload, key)


def decode_message(raw: RawMessage) -> DecodedMessage:
    """Stage 2: parse COSE and the envelope. Nothing cryptographic is checked yet."""
    limit = len(raw.data)
    sign1 = cose.decode_sign1(raw.data, max_size=limit)
    envelope = cbor.decode(sign1.payload, max_size=limit)
    if not isinstance(envelope, dict):
        raise ProtocolError("envelope.malformed", "payload must be a map")
    if envelope.keys() != ENVELOPE_FIELDS:
        keys = set(envelope)
        missing = sorted(str(k) for k in ENVELOPE_FIELDS - keys)
        unknown = sorted(str(k) for k in keys - ENVELOPE_FIELDS)
        raise ProtocolError("envelope.malformed", f"missing {missing}, unknown {unknown}")
    message_type = envelope["type"]
    if type(message_type) is not str:
        raise ProtocolError("envelope.malformed", "type must be text")
    # envelope.type for unknown types, before anything else is used
    type_limit = body_class(message_type).MAX_MESSAGE_SIZE
    if len(raw.data) > type_limit:
        raise ProtocolError(
            "wire.oversize", f"{len(raw.data)} bytes exceed {type_limit} for {message_type}"
        )
    version = envelope["version"]
    if type(version) is not int:
        raise ProtocolError("envelope.malformed", "version must be an integer")
    if version != VERSION:
        raise ProtocolError("envelope.version", f"version {version} is not supported")
    sender, to = envelope["sender"], envelope["to"]
    _check_id(sender, "sender")
    _check_id(to, "to")
    seq, time = envelope["seq"], envelope["time"]
    _check_uint(seq, "seq")
    _check_uint(time, "time")
    body = envelope["body"]
    if not isinstance(body, dict):
        raise ProtocolError("envelope.malformed", "body must be a map")
    assert type(sender) is str and type(to) is str
    assert type(seq) is int and type(time) is int
    return DecodedMessage(
        sign1=sign1,
        type=message_type,
        version=version,
        sender=sender,
        to=to,
        seq=seq,
        time=time,
        untrusted_body=body,
        message_id=message_id(sign1.protected, sign1.payload),
    )


def verify_message(
    decoded: DecodedMessage,
    resolver: KeyResolver,
    *,
    now: int,
    recipients: Collection[str],
    max_age: int = DEFAULT_MAX_AGE,
    max_future: int = DEFAULT_MAX_FUTURE,
) -> VerifiedMessage:
    """Stage 3: authenticate and type the message.

    ``recipients`` are the names the receiver answers to (its own id, and the groups it is in).
    ``max_age``/``max_future`` bound ``time`` against ``now``; a device catching up on commands
    queued while it was offline passes a larger ``max_age`` (sequence and epoch checks, not the
    clock, are what stop replays of those).
    """
    try:
        signer = resolver(decoded.sign1.kid)
    except LookupError:
        raise ProtocolError("cose.kid-unknown", "no trusted key has this kid") from None
    if not isinstance(signer, Signer):
        raise ProtocolError("cose.kid-unknown", "the resolver returned no signer")
    # Bind before verifying so the log names the real problem (a known key used under another
    # name), and verify before looking at anything else the message says.
    if signer.sender != decoded.sender:
        raise ProtocolError("envelope.sender-mismatch", "the kid belongs to another sender")
    cose.verify_sign1(decoded.sign1, signer.public_key, kid=signer.kid)
    if decoded.time + max_age < now:
        raise ProtocolError("envelope.stale", f"time is more than {max_age} s old")
    if decoded.time > now + max_future:
        raise ProtocolError("envelope.future", f"time is more than {max_future} s ahead")
    if decoded.to not in recipients:
        raise ProtocolError("envelope.recipient", "the message is addressed to someone else")
    body = body_class(decoded.type).from_cbor_map(decoded.untrusted_body)
    return VerifiedMessage(
        type=decoded.type,
        sender=decoded.sender,
        to=decoded.to,
        seq=decoded.seq,
        time=decoded.time,
        kid=decoded.sign1.kid,
        message_id=decoded.message_id,
        body=body,
        _proof=_VERIFIED,
    )


def open_message(
    data: bytes,
    resolver: KeyResolver,
    *,
    now: int,
    recipients: Collection[str],
    max_size: int = LARGEST_MESSAGE_SIZE,
    max_age: int = DEFAULT_MAX_AGE,
    max_future: int = DEFAULT_MAX_FUTURE,
) -> VerifiedMessage:
    """All three stages at once: bytes -> VerifiedMessage, or ProtocolError."""
    decoded = decode_message(RawMessage.from_bytes(data, max_size=max_size))
    return verify_message(
        decoded, resolver, now=now, recipients=recipients, max_age=max_age, max_future=max_future
    )


def _check_id(value: object, name: str) -> None:
    if type(value) is not str or ID_PATTERN.fullmatch(value) is None:
        raise ProtocolError("envelope.malformed", f"{name} must be a valid id")


def _check_uint(value: object, name: str) -> None:
    if type(value) is not int or not 0 <= value <= UINT64_MAX:
        raise ProtocolError("envelope.malformed", f"{name} must be an unsigned integer")
