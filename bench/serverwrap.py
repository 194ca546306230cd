"""The alternative a user would pick instead of TreeKEM, as a benchmark baseline (not a product
feature): a key server that generates each epoch's group key itself and HPKE-wraps it to every
device, one signed unicast message per device, and takes back the same signed acks keyfleet's
members send.

What a real competitor would do, and what this does:

- The server draws a fresh 32-byte group key per rekey (so the server holds every group key).
- For each device it seals the key with HPKE (RFC 9180 base mode, DHKEM(P-256), HKDF-SHA256,
  AES-128-GCM: ``agent.protocol.hpke``, keyfleet's own suite) to the device's encryption
  public key (its TreeKEM leaf key here, the key a device keeps in its TPM), with the group, the
  epoch and the device bound into ``info``/``aad``.
- Each device gets its own message on its own command topic, signed by the server (COSE_Sign1,
  ES256, the same signature format and envelope fields as keyfleet's service messages), so that
  a device accepts a key from the server only. One message carrying N entries (one signature)
  would make every device download every other device's entry, N times the bytes per device:
  ``broadcast`` builds that variant for the byte count only.
- A device checks the signature, opens its entry with its private key and answers with a signed
  ``group.ack`` (keyfleet's own ack: DevID signature) whose 32-byte value is a key confirmation
  (``confirmation``): the server, which knows the key, can compare it; keyfleet's service
  compares epoch authenticators instead.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol import hpke
from agent.protocol.errors import ProtocolError
from agent.protocol.topics import SERVICE_ID, device_cmd_topic
from agent.protocol.wire import cbor, cose

KEY_SIZE = 32
TYPE = "bench.wrapped-key"
VERSION = 1
INFO = b"keyfleet bench server-wrap group key"


@dataclass(frozen=True)
class Recipient:
    """A device as the key server knows it: its id and its encryption public key."""

    device_id: str
    public_key: ec.EllipticCurvePublicKey = field(repr=False)


@dataclass(frozen=True)
class Rekey:
    """One rekey's output: the new key (held by the server) and the messages to publish."""

    group_id: str
    epoch: int
    key: bytes = field(repr=False)
    messages: list[tuple[str, bytes]] = field(repr=False)  # (topic, COSE_Sign1 bytes)


def _aad(group_id: str, epoch: int, device_id: str) -> bytes:
    return cbor.encode([group_id, epoch, device_id])


def confirmation(key: bytes, group_id: str, epoch: int) -> bytes:
    """The 32-byte key confirmation a device acks with (public; proves it holds ``key``)."""
    return hmac.new(key, b"confirm" + _aad(group_id, epoch, ""), hashlib.sha256).digest()


def _envelope(to: str, seq: int, time: int, body: dict[str, object]) -> bytes:
    return cbor.encode(
        {
            "type": TYPE,
            "version": VERSION,
            "sender": SERVICE_ID,
            "to": to,
            "seq": seq,
            "time": time,
            "body": body,
        }
    )


def rekey(
    group_id: str,
    epoch: int,
    recipients: Sequence[Recipient],
    signing_key: ec.EllipticCurvePrivateKey,
    *,
    seq: int,
    time: int,
    rng: Callable[[int], bytes] = os.urandom,
) -> Rekey:
    """The server's work for one rekey: a new key, one HPKE seal and one signed message per
    device, each on the device's own command topic."""
    key = rng(KEY_SIZE)
    messages = []
    for i, recipient in enumerate(recipients):
        aad = _aad(group_id, epoch, recipient.device_id)
        enc, ct = hpke.seal(recipient.public_key, INFO, aad, key)
        payload = _envelope(
            recipient.device_id,
            seq + i,
            time,
            {"group_id": group_id, "epoch": epoch, "enc": enc, "ct": ct},
        )
        messages.append((device_cmd_topic(recipient.device_id), cose.sign1(payload, signing_key)))
    return Rekey(group_id, epoch, key, messages)


def broadcast(
    rekey: Rekey, signing_key: ec.EllipticCurvePrivateKey, *, seq: int, time: int
) -> bytes:
    """The other shape: every device's entry in one message with one signature, published once
    on the group's topic and delivered to every device. Reuses ``rekey``'s seals (same bytes
    per entry); returns the COSE_Sign1 bytes."""
    entries = []
    for _, message in rekey.messages:
        envelope = cbor.decode(cose.decode_sign1(message).payload)
        assert isinstance(envelope, dict)
        body = envelope["body"]
        assert isinstance(body, dict)
        entries.append([envelope["to"], body["enc"], body["ct"]])
    payload = _envelope(
        rekey.group_id,
        seq,
        time,
        {"group_id": rekey.group_id, "epoch": rekey.epoch, "entries": entries},
    )
    return cose.sign1(payload, signing_key)


def open_wrapped(
    message: bytes,
    device_id: str,
    private_key: ec.EllipticCurvePrivateKey,
    server_key: ec.EllipticCurvePublicKey,
) -> tuple[str, int, bytes]:
    """A device's side: check the server's signature, that the message is addressed to it,
    and open the key with its private key. Returns (group, epoch, key); ``ProtocolError`` (or
    ``CryptoError``) if anything does not check."""
    sign1 = cose.decode_sign1(message)
    if sign1.kid != cose.key_id(server_key):
        raise ProtocolError("cose.kid-unknown", "not signed by the key server")
    cose.verify_sign1(sign1, server_key)
    envelope = cbor.decode(sign1.payload)
    if not isinstance(envelope, dict) or envelope.get("type") != TYPE:
        raise ProtocolError("envelope.type", "not a wrapped key")
    if envelope.get("to") != device_id:
        raise ProtocolError("envelope.recipient", "addressed to another device")
    body = envelope["body"]
    if not isinstance(body, dict):
        raise ProtocolError("body.malformed", "the body is not a map")
    group_id, epoch, enc, ct = body["group_id"], body["epoch"], body["enc"], body["ct"]
    if not (isinstance(group_id, str) and isinstance(epoch, int)):
        raise ProtocolError("body.malformed", "bad group or epoch")
    if not (isinstance(enc, bytes) and isinstance(ct, bytes)):
        raise ProtocolError("body.malformed", "bad enc or ct")
    key = hpke.open_(enc, private_key, INFO, _aad(group_id, epoch, device_id), ct)
    if len(key) != KEY_SIZE:
        raise ProtocolError("body.malformed", "the key is not 32 bytes")
    return group_id, epoch, key
