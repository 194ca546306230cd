"""The measured-boot event log: what was extended into which PCR, in order.

The device (firmware-sim's measured boot) writes it; the agent sends it, unchanged, in its
attestation report; the fleet service decodes it, replays it into the PCR values it implies and
compares those with the TPM's signed quote. The log itself is not signed: it is trusted only
because its replay reproduces the quoted PCR digest. So the decoder is strict (one encoding per
log, size limits before decoding) and the replay is the exact TPM extend rule.

Format, version 1 (byte-level description in docs/attestation.md): deterministic CBOR
(RFC 8949 §4.2.1, decoded by ``agent.protocol.wire.cbor``)::

    EventLog = { "v": 1, "alg": "sha256", "events": [* Event] }
    Event    = [ pcr: uint 0..23, type: uint (1 image, 2 config), component: tstr,
                 version: tstr, digest: bstr .size 32 ]

This module is pure: no TPM, no files. Every refusal is a ``ProtocolError`` with an
``eventlog.*`` check id:

    eventlog.size       input larger than MAX_EVENT_LOG_SIZE, refused before decoding
    eventlog.cbor       not strict deterministic CBOR (the reason names the cbor.* check)
    eventlog.malformed  not the shape above: wrong keys, wrong types, wrong event arity
    eventlog.version    format version is not 1
    eventlog.alg        hash algorithm is not "sha256"
    eventlog.bounds     PCR index, event type, name/version syntax, digest size, event count
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent.protocol.errors import ProtocolError
from agent.protocol.wire import cbor

FORMAT_VERSION = 1
HASH_ALG = "sha256"
DIGEST_SIZE = 32
PCR_COUNT = 24
MAX_EVENT_LOG_SIZE = 64 * 1024
"""Largest encoded log accepted (bytes); a boot of a handful of components needs about 100 bytes
per event. Below the wire's ``attest.report`` limit so that the report bounds it first."""
MAX_EVENTS = 512

_COMPONENT_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_KEYS = frozenset({"v", "alg", "events"})
_ZERO = bytes(DIGEST_SIZE)


class EventType(enum.IntEnum):
    """What was measured. Both are extended the same way; the type tells a reader whether the
    digest is of code (an image that runs) or of data that steers it (a configuration)."""

    IMAGE = 1
    CONFIG = 2


def check_component_name(name: object) -> str:
    """A component name: lower-case ASCII letter, then letters, digits, '-'; at most 32."""
    if type(name) is not str or not _COMPONENT_RE.fullmatch(name):
        raise ProtocolError("eventlog.bounds", f"component name {name!r} is not [a-z][a-z0-9-]*")
    return name


def check_version(version: object) -> str:
    """A version string: ASCII letters, digits, '.', '_', '+', '-'; 1..64 characters."""
    if type(version) is not str or not _VERSION_RE.fullmatch(version):
        raise ProtocolError("eventlog.bounds", f"version {version!r} is not [A-Za-z0-9._+-]+")
    return version


@dataclass(frozen=True)
class MeasurementEvent:
    """One extend: ``digest`` (SHA-256 of the component's image) went into ``pcr``."""

    pcr: int
    event_type: EventType
    component: str
    version: str
    digest: bytes

    def __post_init__(self) -> None:
        if type(self.pcr) is not int or not 0 <= self.pcr < PCR_COUNT:
            raise ProtocolError("eventlog.bounds", f"PCR {self.pcr!r} is not in 0..23")
        if type(self.event_type) is not EventType:
            raise ProtocolError("eventlog.bounds", f"event type {self.event_type!r} unknown")
        check_component_name(self.component)
        check_version(self.version)
        if type(self.digest) is not bytes or len(self.digest) != DIGEST_SIZE:
            raise ProtocolError("eventlog.bounds", "digest is not 32 bytes")

    def to_cbor(self) -> list[object]:
        return [self.pcr, int(self.event_type), self.component, self.version, self.digest]

    @classmethod
    def from_cbor(cls, value: object) -> MeasurementEvent:
        if type(value) is not list or len(value) != 5:
            raise ProtocolError("eventlog.malformed", "an event is not a 5-item array")
        pcr, event_type, component, version, digest = value
        if type(pcr) is not int or type(event_type) is not int:
            raise ProtocolError("eventlog.malformed", "event pcr and type must be integers")
        if type(component) is not str or type(version) is not str:
            raise ProtocolError("eventlog.malformed", "event component and version must be text")
        if type(digest) is not bytes:
            raise ProtocolError("eventlog.malformed", "event digest must be a byte string")
        try:
            kind = EventType(event_type)
        except ValueError:
            raise ProtocolError("eventlog.bounds", f"event type {event_type} unknown") from None
        return cls(pcr, kind, component, version, digest)


@dataclass(frozen=True)
class EventLog:
    """The events of one boot, in the order they were extended."""

    events: tuple[MeasurementEvent, ...] = ()

    def __post_init__(self) -> None:
        if len(self.events) > MAX_EVENTS:
            raise ProtocolError("eventlog.bounds", f"more than {MAX_EVENTS} events")

    def encode(self) -> bytes:
        return encode_event_log(self)

    def replay(self, pcrs: Iterable[int]) -> dict[int, bytes]:
        return replay(self, pcrs)

    def pcrs(self) -> frozenset[int]:
        """Every PCR some event extended."""
        return frozenset(event.pcr for event in self.events)


def encode_event_log(log: EventLog) -> bytes:
    """The one deterministic encoding of ``log``."""
    data = cbor.encode(
        {"v": FORMAT_VERSION, "alg": HASH_ALG, "events": [e.to_cbor() for e in log.events]}
    )
    if len(data) > MAX_EVENT_LOG_SIZE:
        raise ProtocolError("eventlog.size", f"{len(data)} bytes exceed {MAX_EVENT_LOG_SIZE}")
    return data


def decode_event_log(data: bytes) -> EventLog:
    """Strictly decode an event log; anything else raises ``ProtocolError`` (eventlog.*)."""
    if type(data) is not bytes:
        raise ProtocolError("eventlog.malformed", "event log must be bytes")
    if len(data) > MAX_EVENT_LOG_SIZE:
        raise ProtocolError(
            "eventlog.size", f"{len(data)} bytes exceed the limit of {MAX_EVENT_LOG_SIZE}"
        )
    try:
        value = cbor.decode(data, max_size=MAX_EVENT_LOG_SIZE, max_depth=3)
    except ProtocolError as exc:
        raise ProtocolError("eventlog.cbor", f"{exc.check}: {exc.reason}") from None
    if type(value) is not dict or set(value) != _KEYS:
        raise ProtocolError("eventlog.malformed", 'not a map of exactly "v", "alg", "events"')
    if type(value["v"]) is not int:
        raise ProtocolError("eventlog.malformed", "version must be an integer")
    if value["v"] != FORMAT_VERSION:
        raise ProtocolError("eventlog.version", f"format version {value['v']} is not 1")
    if type(value["alg"]) is not str:
        raise ProtocolError("eventlog.malformed", "alg must be text")
    if value["alg"] != HASH_ALG:
        raise ProtocolError("eventlog.alg", f"hash algorithm {value['alg']!r} is not sha256")
    events = value["events"]
    if type(events) is not list:
        raise ProtocolError("eventlog.malformed", "events must be an array")
    if len(events) > MAX_EVENTS:
        raise ProtocolError("eventlog.bounds", f"more than {MAX_EVENTS} events")
    return EventLog(tuple(MeasurementEvent.from_cbor(event) for event in events))


def extend(old: bytes, digest: bytes) -> bytes:
    """The TPM's extend rule for the sha256 bank: new = SHA-256(old || digest)."""
    return hashlib.sha256(old + digest).digest()


def replay(log: EventLog, pcrs: Iterable[int]) -> dict[int, bytes]:
    """The values ``pcrs`` hold after the log's events, starting from the reset state (zeros).

    Events for PCRs outside ``pcrs`` are not replayed: the caller decides whether such events are
    acceptable (the attestation verifier refuses them, since no quote vouches for them)."""
    values: dict[int, bytes] = {}
    for index in pcrs:
        if type(index) is not int or not 0 <= index < PCR_COUNT:
            raise ProtocolError("eventlog.bounds", f"PCR {index!r} is not in 0..23")
        values[index] = _ZERO
    for event in log.events:
        old = values.get(event.pcr)
        if old is not None:
            values[event.pcr] = hashlib.sha256(old + event.digest).digest()
    return values


def measurements(log: EventLog) -> Mapping[str, MeasurementEvent]:
    """Events by component name; a component measured twice is refused (``eventlog.bounds``):
    a boot measures each component once, and two events would make "the kernel's digest"
    ambiguous for a policy."""
    by_name: dict[str, MeasurementEvent] = {}
    for event in log.events:
        if event.component in by_name:
            raise ProtocolError("eventlog.bounds", f"{event.component} is measured twice")
        by_name[event.component] = event
    return by_name
