"""Key state reports: every key the agent holds, its NIST SP 800-57 state and its history.

The record format, the states and the allowed transitions belong to :mod:`agent.protocol.lifecycle`
(the ledger the agent keeps); this module carries its records on the wire, so that there is one
definition of a key's life, not two. ``KeyRecord.from_cbor_map`` there refuses unknown fields,
unknown states, histories that do not start in pre-activation, illegal SP 800-57 steps, time going
backwards and a state that disagrees with the history (check id ``key.record``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Self

from agent.protocol.errors import ProtocolError
from agent.protocol.lifecycle import ALLOWED_TRANSITIONS, KeyKind, KeyRecord, KeyState
from agent.protocol.wire.messages.base import Body, check_text, check_tuple, check_uint, fields
from agent.protocol.wire.messages.release import InstallResult

__all__ = [
    "ALLOWED_TRANSITIONS",
    "DeviceDestroyed",
    "MAX_KEYS",
    "KeyKind",
    "KeyRecord",
    "KeyState",
    "KeyStateReport",
    "check_records",
    "records_from_cbor",
    "records_to_cbor",
]

MAX_KEYS = 1024
MAX_REFUSED = 32
MAX_COUNT = (1 << 32) - 1
MAX_FEED_SEQ = (1 << 63) - 1
CHECK_ID = re.compile(r"[a-z][a-z0-9-]*(\.[a-z0-9-]+){0,4}")


def check_records(value: object, name: str) -> None:
    check_tuple(value, name, max_len=MAX_KEYS)
    assert isinstance(value, tuple)
    for item in value:
        if not isinstance(item, KeyRecord):
            raise ProtocolError("body.type", f"{name} must hold lifecycle KeyRecords")
    if len({record.name for record in value}) != len(value):
        raise ProtocolError("body.bounds", f"{name}: two records with one name")


def records_from_cbor(value: object, name: str) -> tuple[KeyRecord, ...]:
    if not isinstance(value, list):
        raise ProtocolError("body.type", f"{name} must be an array")
    if len(value) > MAX_KEYS:
        raise ProtocolError("body.bounds", f"{name} holds more than {MAX_KEYS} records")
    records = []
    for item in value:
        # The wire allows integer map keys; a key record has text keys only. Refuse others here
        # so the lifecycle parser only ever sees the shape it was written for.
        if not isinstance(item, Mapping) or not all(type(key) is str for key in item):
            raise ProtocolError("body.type", f"{name}[] must be a map with text keys")
        records.append(KeyRecord.from_cbor_map(dict(item)))
    return tuple(records)


def records_to_cbor(records: tuple[KeyRecord, ...]) -> list[dict[str, object]]:
    return [dict(record.to_cbor_map()) for record in records]


@dataclass(frozen=True)
class KeyStateReport(Body):
    """Device -> service: the states of all the device's keys (``keys.report``), and
    ``refused``: how often the device refused a membership change, a credential or a Welcome
    since it started, by check id (``authz.*``, ``cred.*``, ``tpm.proof.*``, ...): what a rogue
    service, operator or member tried (the service audits changes of it); ``feed``: the number
    of the newest revocation feed entry the device verified and keeps (absent from agents that
    keep no feed), so the service sends what it lacks and shows who lags; ``release_seq`` and
    ``release_generation``: the newest release bundle the device verified and keeps, and
    ``release_version``: the release its running image matched (absent without a release key,
    or when no bundle or no release applies), so the service shows who runs what and who has
    not re-sealed after a revocation (docs/releases.md); ``install``: the outcome of the latest
    ``release.install`` (a staged rollout's step), repeated in every report until the next one,
    so that a report lost to a reconnect is made up by the next; ``trust_seq``: the trust bundle
    the device holds (absent: bundle 0, its enrollment's service key, or an older agent), so the
    service shows who follows a service signing key rollover (docs/trust.md)."""

    TYPE: ClassVar[str] = "keys.report"

    keys: tuple[KeyRecord, ...]
    refused: tuple[tuple[str, int], ...] = ()
    feed: int | None = None
    release_seq: int | None = None
    release_generation: int | None = None
    release_version: str | None = None
    install: InstallResult | None = None
    trust_seq: int | None = None

    def __post_init__(self) -> None:
        check_records(self.keys, "keys")
        for name in ("feed", "release_seq", "release_generation", "trust_seq"):
            value = getattr(self, name)
            if value is not None:
                check_uint(value, name, maximum=MAX_FEED_SEQ)
        if self.release_version is not None:
            check_text(self.release_version, "release_version", min_len=1, max_len=64)
        if self.install is not None and not isinstance(self.install, InstallResult):
            raise ProtocolError("body.type", "install must be an InstallResult")
        check_tuple(self.refused, "refused", max_len=MAX_REFUSED)
        for item in self.refused:
            if (
                type(item) is not tuple
                or len(item) != 2
                or type(item[0]) is not str
                or CHECK_ID.fullmatch(item[0]) is None
                or type(item[1]) is not int
                or not 0 < item[1] <= MAX_COUNT
            ):
                raise ProtocolError("body.bounds", "refused: (check id, count) pairs")
        if len({check for check, _ in self.refused}) != len(self.refused):
            raise ProtocolError("body.bounds", "refused: a check id twice")

    def to_cbor_map(self) -> dict[str, object]:
        out: dict[str, object] = {"keys": records_to_cbor(self.keys)}
        if self.refused:
            out["refused"] = dict(self.refused)
        for name in ("feed", "release_seq", "release_generation", "release_version", "trust_seq"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.install is not None:
            out["install"] = self.install.to_cbor_map()
        return out

    @classmethod
    def from_cbor_map(cls, value: object) -> Self:
        optional = [
            "refused",
            "feed",
            "release_seq",
            "release_generation",
            "release_version",
            "install",
            "trust_seq",
        ]
        kwargs = fields(value, cls.__name__, ["keys"], optional)
        refused = kwargs.get("refused", {})
        if not isinstance(refused, Mapping):
            raise ProtocolError("body.type", "refused must be a map")
        return cls(
            keys=records_from_cbor(kwargs["keys"], "keys"),
            refused=tuple(sorted(refused.items(), key=lambda kv: str(kv[0]))),
            feed=kwargs.get("feed"),
            release_seq=kwargs.get("release_seq"),
            release_generation=kwargs.get("release_generation"),
            release_version=kwargs.get("release_version"),
            trust_seq=kwargs.get("trust_seq"),
            install=(
                InstallResult.from_cbor_map(kwargs["install"]) if "install" in kwargs else None
            ),
        )


DESTROYED_REASON_MAX = 200


@dataclass(frozen=True)
class DeviceDestroyed(Body):
    """Device -> service: ``keyagent factory-reset`` is about to destroy every key this identity
    has (``device.destroyed``). Signed by the DevID key it is the last thing that key signs; the
    service then marks the device and all its keys destroyed, takes it out of its groups and
    refuses anything signed by that key afterwards. ``reason`` is free text for the audit log."""

    TYPE: ClassVar[str] = "device.destroyed"

    reason: str

    def __post_init__(self) -> None:
        check_text(self.reason, "reason", min_len=1, max_len=DESTROYED_REASON_MAX)

    def to_cbor_map(self) -> dict[str, object]:
        return {"reason": self.reason}

    @classmethod
    def from_cbor_map(cls, value: object) -> Self:
        kwargs = fields(value, cls.__name__, ["reason"])
        return cls(reason=kwargs["reason"])
