"""The factory station's serial link: CBOR requests and responses in COBS frames with a CRC-32.

One frame on the wire::

    0x00 || COBS(payload || CRC-32(payload), big-endian) || 0x00

COBS (Cheshire & Baker, "Consistent Overhead Byte Stuffing", 1999) removes every 0x00 from the
body, so 0x00 only ever delimits frames: a receiver that lost sync (line noise, a half frame from
a device that reset mid-write, the station starting in the middle of a reply) throws away what it
has and starts afresh at the next 0x00. The leading delimiter ends whatever garbage preceded the
frame. The CRC-32 (zlib's, IEEE 802.3) catches corrupted bodies; the size limit applies before
anything is decoded, so a stream without delimiters costs a bounded buffer.

The payload is deterministic CBOR decoded by ``agent.protocol.wire.cbor`` (strict: one encoding per
value, no tags or floats)::

    request  = {"v": 1, "id": uint, "op": tstr, "args": {* tstr => any}}
    response = {"v": 1, "id": uint, "ok": true, "result": {* tstr => any}}
             / {"v": 1, "id": uint, "ok": false, "check": tstr, "reason": tstr}

One request is outstanding at a time. The station (``SerialClient``) gives every request a fresh
random id, waits for the response with that id (ignoring stale ones), and on timeout sends the
*same* frame again. The device (``DeviceLink``) keeps its last few responses keyed by id and the
request's digest, so a retried request that the device already executed (its response was lost)
is answered from that cache and not executed twice. After a device reset the cache is empty and a
retried request runs again: the factory requests are designed so that this is safe.

``DeviceLink`` is sans-I/O (bytes in, bytes out); ``SerialClient`` is a thin loop over a
pyserial-like port (``serial.serial_for_url`` works for ptys, real UARTs and ``loop://``).

Refusals and counters use these check ids:

    serial.frame.size    a frame longer than the limit (dropped before decoding)
    serial.frame.cobs    the body is not valid COBS
    serial.frame.crc     the CRC-32 does not match (or the body is shorter than a CRC)
    serial.message       the payload is valid CBOR but not a request/response of this protocol
    serial.timeout       no response after every retry (a ``TransportError``)
    cbor.*               the payload is not strict deterministic CBOR (agent.protocol.wire.cbor)
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import struct
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import serial

from agent.protocol.errors import KeyfleetError, ProtocolError, TransportError
from agent.protocol.wire import cbor

log = logging.getLogger("keyfleet.serial")

PROTOCOL_VERSION = 1
DELIMITER = 0x00
CRC_SIZE = 4
MAX_PAYLOAD = 64 * 1024
"""Largest CBOR payload of one frame (bytes). An install request with certificates and a TLS
certificate chain is a few KiB; the limit bounds what a noisy line can make either side buffer."""
MAX_OP_LENGTH = 64
MAX_CHECK_LENGTH = 128
MAX_REASON_LENGTH = 1024
MAX_REQUEST_ID = (1 << 63) - 1
DEFAULT_TIMEOUT = 5.0
DEFAULT_RETRIES = 3
REPLY_CACHE_SIZE = 8
INSTALL_ARGS = (
    "device_id",
    "devid_cert",
    "tls_cert",
    "trust_anchors",
    "operator_anchors",
    "min_approvals",
    "broker",
    "service_cert",
    "groups",
)
"""The arguments of the factory ``install`` request: exactly the device identity the service
returns from enroll/finish, which the station passes on unchanged."""
OPTIONAL_INSTALL_ARGS = ("release_key", "renewal_url")
"""Install arguments a fleet may leave out: ``release_key``, the SubjectPublicKeyInfo (DER) of
the fleet's release-signing key, given when the service has one (docs/releases.md);
``renewal_url``, the service's HTTPS renewal listener, given when the fleet lets expired
certificates renew (the agent's ``[renewal] url``; docs/attestation.md, "Certificate
renewal")."""

Args = dict[str, Any]


def max_encoded_size(max_payload: int = MAX_PAYLOAD) -> int:
    """Longest COBS body (without delimiters) a payload of ``max_payload`` bytes can produce:
    one code byte per started 254-byte block, plus the CRC."""
    raw = max_payload + CRC_SIZE
    return raw + raw // 254 + 1


# ---- COBS ----------------------------------------------------------------------------------


def cobs_encode(data: bytes) -> bytes:
    """COBS-encode ``data``: the result contains no 0x00 byte."""
    out = bytearray()
    for piece in data.split(b"\x00"):
        # A code byte of 0xFF means "254 data bytes and no implied zero after them".
        start = 0
        while len(piece) - start >= 254:
            out.append(0xFF)
            out += piece[start : start + 254]
            start += 254
        out.append(len(piece) - start + 1)
        out += piece[start:]
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    """Inverse of ``cobs_encode``; raises ``ProtocolError("serial.frame.cobs")`` on a zero byte
    or a code that runs past the end."""
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        code = data[i]
        if code == 0:
            raise ProtocolError("serial.frame.cobs", f"zero byte at offset {i} inside a frame")
        end = i + code
        if end > n:
            raise ProtocolError("serial.frame.cobs", "a COBS block runs past the end of the frame")
        block = data[i + 1 : end]
        if DELIMITER in block:
            raise ProtocolError("serial.frame.cobs", "zero byte inside a COBS block")
        out += block
        i = end
        if code != 0xFF and i < n:
            out.append(0)
    return bytes(out)


# ---- frames --------------------------------------------------------------------------------


def encode_frame(payload: bytes, *, max_payload: int = MAX_PAYLOAD) -> bytes:
    """One delimited frame carrying ``payload``."""
    if len(payload) > max_payload:
        raise ProtocolError(
            "serial.frame.size", f"payload of {len(payload)} bytes exceeds {max_payload}"
        )
    crc = struct.pack(">I", zlib.crc32(payload))
    return b"\x00" + cobs_encode(payload + crc) + b"\x00"


def decode_frame(body: bytes, *, max_payload: int = MAX_PAYLOAD) -> bytes:
    """The payload of one frame body (the bytes between two delimiters): size limit first,
    then COBS, then the CRC."""
    if len(body) > max_encoded_size(max_payload):
        raise ProtocolError("serial.frame.size", f"frame of {len(body)} bytes is too long")
    raw = cobs_decode(body)
    if len(raw) < CRC_SIZE:
        raise ProtocolError("serial.frame.crc", "frame is shorter than its CRC")
    payload, crc = raw[:-CRC_SIZE], raw[-CRC_SIZE:]
    if len(payload) > max_payload:
        raise ProtocolError("serial.frame.size", f"payload of {len(payload)} bytes is too long")
    if struct.unpack(">I", crc)[0] != zlib.crc32(payload):
        raise ProtocolError("serial.frame.crc", "CRC-32 mismatch")
    return payload


class Deframer:
    """Splits a byte stream into frame payloads. Never raises on input: a bad frame is dropped,
    counted in ``errors`` by check id, and the next delimiter starts afresh. The buffer never
    holds more than one maximal frame body: past that the bytes are dropped until a delimiter."""

    def __init__(self, *, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._limit = max_encoded_size(max_payload)
        self._buffer = bytearray()
        self._overflow = False
        self.errors: collections.Counter[str] = collections.Counter()
        self.frames = 0

    def reset(self) -> None:
        """Forget a partial frame (e.g. after the peer reset)."""
        self._buffer.clear()
        self._overflow = False

    def feed(self, data: bytes) -> list[bytes]:
        """Payloads of every complete, valid frame that ``data`` finished."""
        payloads: list[bytes] = []
        chunk = bytes(data)
        start = 0
        while True:
            index = chunk.find(b"\x00", start)
            if index < 0:
                self._append(chunk[start:])
                return payloads
            self._append(chunk[start:index])
            start = index + 1
            self._end_of_frame(payloads)

    def _append(self, chunk: bytes) -> None:
        if self._overflow or not chunk:
            return
        if len(self._buffer) + len(chunk) > self._limit:
            self._overflow = True
            self._buffer.clear()
            self.errors["serial.frame.size"] += 1
            return
        self._buffer += chunk

    def _end_of_frame(self, payloads: list[bytes]) -> None:
        if self._overflow:
            self._overflow = False
            return
        if not self._buffer:
            return  # back-to-back delimiters: an empty frame carries nothing
        body = bytes(self._buffer)
        self._buffer.clear()
        try:
            payload = decode_frame(body, max_payload=self.max_payload)
        except ProtocolError as exc:
            self.errors[exc.check] += 1
            return
        self.frames += 1
        payloads.append(payload)


# ---- messages ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    id: int
    op: str
    args: Args = field(repr=False)


@dataclass(frozen=True)
class Response:
    """A device's answer. ``ok`` responses carry ``result``; refusals carry ``check``/``reason``
    (never secret material)."""

    id: int
    ok: bool
    result: Args = field(default_factory=dict, repr=False)
    check: str = ""
    reason: str = ""

    def raise_for_refusal(self) -> Args:
        """The result, or the device's refusal as a ``ProtocolError``."""
        if not self.ok:
            raise ProtocolError(self.check, self.reason)
        return self.result


def _require_keys(value: object, keys: frozenset[str], what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError("serial.message", f"{what} is not a map")
    if set(value) != keys:
        extra = sorted(str(k) for k in set(value) - keys)
        missing = sorted(keys - set(value))
        raise ProtocolError(
            "serial.message", f"{what} keys wrong (missing {missing}, unexpected {extra})"
        )
    if value["v"] != PROTOCOL_VERSION:
        raise ProtocolError("serial.message", f"{what} version {value['v']!r} is not 1")
    ident = value["id"]
    if type(ident) is not int or not 0 <= ident <= MAX_REQUEST_ID:
        raise ProtocolError("serial.message", f"{what} id is not an integer in 0..2**63-1")
    return value


def _text(value: object, name: str, max_len: int) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= max_len:
        raise ProtocolError("serial.message", f"{name} is not text of 1..{max_len} characters")
    return value


def _args(value: object, name: str) -> Args:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ProtocolError("serial.message", f"{name} is not a map with text keys")
    return value


_REQUEST_KEYS = frozenset({"v", "id", "op", "args"})
_OK_KEYS = frozenset({"v", "id", "ok", "result"})
_REFUSAL_KEYS = frozenset({"v", "id", "ok", "check", "reason"})


def encode_request(request: Request) -> bytes:
    return cbor.encode(
        {"v": PROTOCOL_VERSION, "id": request.id, "op": request.op, "args": request.args}
    )


def decode_request(payload: bytes, *, max_payload: int = MAX_PAYLOAD) -> Request:
    value = cbor.decode(payload, max_size=max_payload)
    message = _require_keys(value, _REQUEST_KEYS, "request")
    return Request(
        id=message["id"],
        op=_text(message["op"], "op", MAX_OP_LENGTH),
        args=_args(message["args"], "args"),
    )


def encode_response(response: Response) -> bytes:
    if response.ok:
        return cbor.encode(
            {"v": PROTOCOL_VERSION, "id": response.id, "ok": True, "result": response.result}
        )
    return cbor.encode(
        {
            "v": PROTOCOL_VERSION,
            "id": response.id,
            "ok": False,
            "check": response.check[:MAX_CHECK_LENGTH] or "serial.message",
            "reason": response.reason[:MAX_REASON_LENGTH] or "refused",
        }
    )


def decode_response(payload: bytes, *, max_payload: int = MAX_PAYLOAD) -> Response:
    value = cbor.decode(payload, max_size=max_payload)
    if not isinstance(value, dict) or "ok" not in value:
        raise ProtocolError("serial.message", "response is not a map with 'ok'")
    ok = value["ok"]
    if ok is True:
        message = _require_keys(value, _OK_KEYS, "response")
        return Response(id=message["id"], ok=True, result=_args(message["result"], "result"))
    if ok is False:
        message = _require_keys(value, _REFUSAL_KEYS, "response")
        return Response(
            id=message["id"],
            ok=False,
            check=_text(message["check"], "check", MAX_CHECK_LENGTH),
            reason=_text(message["reason"], "reason", MAX_REASON_LENGTH),
        )
    raise ProtocolError("serial.message", "response 'ok' is not a boolean")


# ---- device side (sans-I/O) ----------------------------------------------------------------

Handler = Callable[[str, Args], Mapping[str, Any]]


class DeviceLink:
    """The device's end of the link: bytes from the line in, bytes for the line out.

    ``handler(op, args)`` runs a request and returns its result map, or raises: a
    ``ProtocolError`` becomes a refusal with its check id; any other ``KeyfleetError`` a refusal
    ``factory.error`` with its (secret-free) message; anything else ``factory.internal`` without
    details (logged here). A request repeated with the same id and the same bytes is answered
    from the reply cache, not run again."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_payload: int = MAX_PAYLOAD,
        cache_size: int = REPLY_CACHE_SIZE,
    ) -> None:
        self._handler = handler
        self._deframer = Deframer(max_payload=max_payload)
        self._max_payload = max_payload
        self._cache: collections.OrderedDict[int, tuple[bytes, bytes]] = collections.OrderedDict()
        self._cache_size = cache_size
        self.executed = 0
        self.replayed = 0
        self.refused_messages = 0

    @property
    def errors(self) -> collections.Counter[str]:
        """Frames dropped, by check id (CRC, COBS, size) plus undecodable requests."""
        return self._deframer.errors

    def receive(self, data: bytes) -> bytes:
        """Feed bytes read from the line; returns the bytes to write back (possibly empty)."""
        out = bytearray()
        for payload in self._deframer.feed(data):
            out += self._answer(payload)
        return bytes(out)

    def _answer(self, payload: bytes) -> bytes:
        digest = hashlib.sha256(payload).digest()
        try:
            request = decode_request(payload, max_payload=self._max_payload)
        except ProtocolError as exc:
            # Without a trustworthy id there is nobody to answer; the station will time out and
            # retry. Count it so that a noisy line shows in diagnostics.
            self.refused_messages += 1
            self._deframer.errors[exc.check] += 1
            log.info("serial: undecodable request dropped [%s] %s", exc.check, exc.reason)
            return b""
        cached = self._cache.get(request.id)
        if cached is not None and cached[0] == digest:
            self.replayed += 1
            return cached[1]
        response = self._run(request)
        try:
            frame = encode_frame(encode_response(response), max_payload=self._max_payload)
        except ProtocolError as exc:
            frame = encode_frame(
                encode_response(
                    Response(id=request.id, ok=False, check=exc.check, reason=exc.reason)
                ),
                max_payload=self._max_payload,
            )
        self._cache[request.id] = (digest, frame)
        self._cache.move_to_end(request.id)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return frame

    def _run(self, request: Request) -> Response:
        self.executed += 1
        try:
            result = dict(self._handler(request.op, request.args))
        except ProtocolError as exc:
            return Response(id=request.id, ok=False, check=exc.check, reason=exc.reason)
        except KeyfleetError as exc:
            return Response(id=request.id, ok=False, check="factory.error", reason=str(exc))
        except Exception:
            log.exception("serial: request %r failed with an internal error", request.op)
            return Response(
                id=request.id,
                ok=False,
                check="factory.internal",
                reason="internal error in the device (see its log)",
            )
        return Response(id=request.id, ok=True, result=result)


# ---- station side --------------------------------------------------------------------------


class SerialPort(Protocol):
    """What ``SerialClient`` needs of a port: pyserial's ``Serial`` fits."""

    timeout: float | None

    def read(self, size: int = 1) -> bytes: ...

    def write(self, data: bytes, /) -> int | None: ...

    def flush(self) -> None: ...


class SerialClient:
    """The station's end: one request at a time, with a timeout per attempt and retries of the
    identical frame (same id), so the device's reply cache can recognise a retry."""

    def __init__(
        self,
        port: SerialPort,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        max_payload: int = MAX_PAYLOAD,
        rng: Callable[[int], bytes] = os.urandom,
        clock: Callable[[], float] = time.monotonic,
        poll_interval: float = 0.02,
    ) -> None:
        self._port = port
        self.timeout = timeout
        self.retries = retries
        self._max_payload = max_payload
        self._rng = rng
        self._clock = clock
        self._deframer = Deframer(max_payload=max_payload)
        self._poll = poll_interval
        self.attempts = 0
        self.stale_responses = 0

    @classmethod
    def open(cls, url: str, *, baudrate: int = 115200, **kwargs: Any) -> SerialClient:
        """Open ``url`` (a device path such as /dev/ttyUSB0 or a pty, or a pyserial URL)."""
        try:
            port = serial.serial_for_url(url, baudrate=baudrate, timeout=0.02)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise TransportError(f"cannot open serial port {url}: {exc}") from None
        return cls(port, **kwargs)

    @property
    def port(self) -> SerialPort:
        return self._port

    @property
    def errors(self) -> collections.Counter[str]:
        return self._deframer.errors

    def close(self) -> None:
        close = getattr(self._port, "close", None)
        if close is not None:
            close()

    def call(
        self,
        op: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        retries: int | None = None,
    ) -> Args:
        """Send ``op`` and return the device's result; a device refusal raises
        ``ProtocolError`` with the device's check id; silence after every attempt raises
        ``TransportError`` (``serial.timeout``)."""
        request = Request(
            id=int.from_bytes(self._rng(8), "big") & MAX_REQUEST_ID,
            op=op,
            args=dict(args or {}),
        )
        frame = encode_frame(encode_request(request), max_payload=self._max_payload)
        per_attempt = self.timeout if timeout is None else timeout
        attempts = 1 + (self.retries if retries is None else retries)
        for attempt in range(attempts):
            self.attempts += 1
            if attempt:
                log.info("serial: %s: no answer, attempt %d of %d", op, attempt + 1, attempts)
            self._write(frame)
            response = self._await(request.id, per_attempt)
            if response is not None:
                return response.raise_for_refusal()
        raise TransportError(
            f"[serial.timeout] device did not answer {op!r} after {attempts} attempt(s) of "
            f"{per_attempt:g} s"
        )

    def _write(self, frame: bytes) -> None:
        try:
            self._port.write(frame)
            self._port.flush()
        except OSError as exc:
            raise TransportError(f"serial write failed: {exc}") from None
        except Exception as exc:  # pyserial raises SerialException (an OSError subclass) mostly
            raise TransportError(f"serial write failed: {type(exc).__name__}: {exc}") from None

    def _await(self, request_id: int, timeout: float) -> Response | None:
        deadline = self._clock() + timeout
        while True:
            remaining = deadline - self._clock()
            if remaining <= 0:
                return None
            self._port.timeout = min(self._poll, remaining)
            try:
                data = self._port.read(4096)
            except OSError as exc:
                raise TransportError(f"serial read failed: {exc}") from None
            if not data:
                continue
            for payload in self._deframer.feed(data):
                try:
                    response = decode_response(payload, max_payload=self._max_payload)
                except ProtocolError as exc:
                    self._deframer.errors[exc.check] += 1
                    continue
                if response.id != request_id:
                    self.stale_responses += 1  # an answer to an earlier attempt or call
                    continue
                return response
