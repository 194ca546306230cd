"""The local API's wire format: length-prefixed CBOR maps over a Unix stream socket.

A message is a 4-byte big-endian length followed by that many bytes of one CBOR map in the
deterministic encoding (``agent.protocol.wire.cbor``, the same strict decoder as the fleet protocol:
size limit before decoding, no tags, no floats, no indefinite lengths, exact consumption). Several
requests may follow each other on one connection; each gets exactly one response, in order.

Request: ``{"v": 1, "op": OP, ...fields}``; the fields allowed are fixed per operation and an
unknown field is an error (a client that misspells one must hear about it)::

    encrypt    group: text, data: bytes (plaintext)       -> bytes (agent.protocol.dataseal)
    decrypt    group: text, data: bytes (sealed data)     -> bytes (plaintext)
    sign       data: bytes                                -> bytes (DER ECDSA P-256 / SHA-256)
    seal       name: text, secret: bytes (<= 128)         -> null
    unseal     name: text                                 -> bytes
    list-keys  (nothing)                                  -> [key record maps]

Response: ``{"ok": true, "result": R}`` or ``{"ok": false, "error": {"check": C, "reason": T}}``.

``sign`` never signs the caller's bytes as they are: the DevID key also signs the device's fleet
messages, so the agent signs ``APP_SIGN_CONTEXT || data``. A COSE Sig_structure starts with a CBOR
array head, never with this text, so no app can obtain a signature over a fleet message.
Verifiers check the signature over the same prefixed bytes (``app_signing_input``).
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from agent.localapi.access import OPERATIONS, AccessDenied
from agent.protocol.dataseal import MAX_PLAINTEXT, check_group_name
from agent.protocol.errors import ProtocolError
from agent.protocol.wire import cbor

PROTOCOL_VERSION = 1
DEFAULT_API_SOCKET = Path("/run/keyagent/api.sock")
SOCKET_ENV = "KEYAGENT_API_SOCKET"
LENGTH = struct.Struct(">I")
MAX_SEAL_SECRET = 128  # a TPM sealed data object holds at most 128 bytes (MAX_SYM_DATA)
MAX_SIGN_DATA = 64 * 1024
# A request carries at most 1 MiB of plaintext plus sealed-data header and CBOR overhead.
MAX_MESSAGE = MAX_PLAINTEXT + 4096
SEAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
APP_SIGN_CONTEXT = b"keyfleet local-api app signature v1\x00"

_FIELDS: dict[str, dict[str, type]] = {
    "encrypt": {"group": str, "data": bytes},
    "decrypt": {"group": str, "data": bytes},
    "sign": {"data": bytes},
    "seal": {"name": str, "secret": bytes},
    "unseal": {"name": str},
    "list-keys": {},
}


def default_socket_path() -> Path:
    """``$KEYAGENT_API_SOCKET`` or /run/keyagent/api.sock."""
    env = os.environ.get(SOCKET_ENV)
    return Path(env) if env else DEFAULT_API_SOCKET


def app_signing_input(data: bytes) -> bytes:
    """The bytes the DevID key actually signs for a local API ``sign`` of ``data``."""
    return APP_SIGN_CONTEXT + data


@dataclass(frozen=True)
class Request:
    """A decoded, type-checked request. Payload fields are kept out of reprs."""

    op: str
    group: str | None = None
    name: str | None = None
    data: bytes | None = field(default=None, repr=False)
    secret: bytes | None = field(default=None, repr=False)

    def to_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {"v": PROTOCOL_VERSION, "op": self.op}
        for key in _FIELDS.get(self.op, {}):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


def frame(payload: bytes) -> bytes:
    if len(payload) > MAX_MESSAGE:
        raise ProtocolError("api.too-large", f"message of {len(payload)} bytes is over the limit")
    return LENGTH.pack(len(payload)) + payload


def check_length(length: int) -> None:
    """Refuse a frame length before reading the frame (so a bad length costs nothing)."""
    if length == 0:
        raise ProtocolError("api.frame-length", "empty frame")
    if length > MAX_MESSAGE:
        raise ProtocolError(
            "api.too-large", f"frame of {length} bytes is over the limit of {MAX_MESSAGE}"
        )


def encode_request(request: Request) -> bytes:
    """A framed request (length prefix included)."""
    return frame(cbor.encode(request.to_map()))


def decode_request(payload: bytes) -> Request:
    """Strictly decode one request payload (without its length prefix). Every problem raises
    ``ProtocolError``: ``cbor.*`` for malformed CBOR, ``api.request`` for a wrong shape, field or
    type, ``api.op-unknown``, ``api.version``, ``data.group`` / ``api.name`` / ``api.too-large``
    for bad values."""
    obj = cbor.decode(payload, max_size=MAX_MESSAGE)
    if not isinstance(obj, dict):
        raise ProtocolError("api.request", "a request is a CBOR map")
    if obj.get("v") != PROTOCOL_VERSION:
        raise ProtocolError("api.version", f"request version must be {PROTOCOL_VERSION}")
    op = obj.get("op")
    if not isinstance(op, str):
        raise ProtocolError("api.request", "request has no text 'op'")
    if op not in _FIELDS:
        shown = op if len(op) <= 32 else op[:32] + "..."
        raise ProtocolError(
            "api.op-unknown",
            f"unknown operation {shown!r}, expected one of {', '.join(OPERATIONS)}",
        )
    fields = _FIELDS[op]
    extra = [k for k in obj if k not in ("v", "op") and k not in fields]
    if extra:
        raise ProtocolError("api.request", f"{op}: unexpected field(s) {sorted(map(str, extra))}")
    values: dict[str, Any] = {}
    for key, kind in fields.items():
        value = obj.get(key)
        if type(value) is not kind:
            raise ProtocolError(
                "api.request", f"{op}: field {key!r} must be {'text' if kind is str else 'bytes'}"
            )
        values[key] = value
    if "group" in values:
        check_group_name(values["group"])
    if "name" in values and not SEAL_NAME.fullmatch(values["name"]):
        raise ProtocolError("api.name", "secret name must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}")
    if op == "encrypt" and len(values["data"]) > MAX_PLAINTEXT:
        raise ProtocolError("api.too-large", f"plaintext is over {MAX_PLAINTEXT} bytes")
    if op == "sign" and len(values["data"]) > MAX_SIGN_DATA:
        raise ProtocolError("api.too-large", f"data to sign is over {MAX_SIGN_DATA} bytes")
    if op == "seal" and not 0 < len(values["secret"]) <= MAX_SEAL_SECRET:
        raise ProtocolError(
            "api.too-large", f"a sealed secret is 1 to {MAX_SEAL_SECRET} bytes (seal a key)"
        )
    return Request(op, **values)


def encode_ok(result: object) -> bytes:
    return frame(cbor.encode({"ok": True, "result": result}))


def encode_error(check: str, reason: str) -> bytes:
    return frame(cbor.encode({"ok": False, "error": {"check": check, "reason": reason}}))


def decode_response(payload: bytes) -> object:
    """The result of a response payload, or the error it carries raised as ``ProtocolError``."""
    obj = cbor.decode(payload, max_size=MAX_MESSAGE)
    if not isinstance(obj, dict) or type(obj.get("ok")) is not bool:
        raise ProtocolError("api.response", "response is not an {ok, ...} map")
    if obj["ok"]:
        if set(obj) != {"ok", "result"}:
            raise ProtocolError("api.response", "success response must be {ok, result}")
        return obj["result"]
    error = obj.get("error")
    if (
        set(obj) != {"ok", "error"}
        or not isinstance(error, dict)
        or set(error) != {"check", "reason"}
        or not isinstance(error["check"], str)
        or not isinstance(error["reason"], str)
    ):
        raise ProtocolError("api.response", "error response must be {ok, error: {check, reason}}")
    raise_error(error["check"], error["reason"])


def raise_error(check: str, reason: str) -> NoReturn:
    """Raise the error a response carried: ``AccessDenied`` for refusals, else ProtocolError."""
    if check == "api.denied":
        raise AccessDenied(reason)
    raise ProtocolError(check, reason)
