"""The revocation feed a device keeps (docs/authorization.md, "The revocation feed").

The fleet service publishes every device revocation as an **entry** of one numbered,
hash-chained feed. An entry *is* the operators' Authorization of the revocation (op
``device.revoke``, naming each revoked device by id and by SHA-256 of its DevID public key), so a
device verifies it with the operator CA and quorum policy it already trusts: the service, even
with its own signing key, cannot invent a revocation (that needs the approvals of a quorum of
operators) nor drop or reorder one unnoticed (each entry carries the hash of the one before it,
and the service-signed head names the newest hash; a device refuses a head that goes back or
does not extend the chain it holds).

An entry may also be the Authorization of an executed ``operator.remove`` (admins' approvals,
its ``subject`` naming the operator and the SHA-256 of the certificate removed:
``agent.protocol.operatorsubject``). From it the device keeps the certificate's hash and the
time of the removal: the entry's ``time`` held within the request's window (the service can
place it no earlier than the request's ``nbf`` and no later than its ``exp``), so the service
alone can neither remove an operator nor push a removal past its request's window. The verifier
then no longer counts that certificate's approvals of requests judged at or after that time
(``operator.removed``; ``AuthzVerifier.verify``'s ``removed``).

An entry may also be the Authorization of an executed ``group.delete`` (naming the group, no
members). The device keeps the group's id; if it is a member it destroys the group's epoch
secrets, leaf key and data keys, and it refuses the group from then on (``group.deleted``): the
id is never used again, so no later Welcome, commit request or data can bring it back.

The device keeps ``FeedState``: the highest sequence number, its hash, the head's time, the
set of revoked identities ``(device id, DevID key hash)``, the removed operator certificates
``(certificate SHA-256, operator id, removed at)`` and the deleted group ids. Members refuse
any leaf with a revoked identity (``cred.revoked``, ``agent.protocol.membership``). The feed
keys on the DevID key, not on the device id alone: a device re-admitted by the operators (a
re-enrollment under the quorum) has a new DevID key, so it is a new identity that the old entry
does not name.

Pure: bytes in, values out; the caller supplies the Authorization check (``AuthzCheck``).

Entry (deterministic CBOR map)::

    {"v": 1, "seq": n, "prev": hash of entry n-1 (32 zero bytes for n = 1),
     "time": unix seconds the service executed the revocation, "authz": Authorization bytes}

``hash(entry) = SHA-256("keyfleet revocation feed v1" || 0x00 || entry bytes)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Final

from agent.protocol import authz as az
from agent.protocol.errors import ProtocolError
from agent.protocol.mls import codec
from agent.protocol.operatorsubject import OperatorSubject
from agent.protocol.wire.envelope import (
    DEFAULT_MAX_FUTURE,
    KeyResolver,
    open_message,
)
from agent.protocol.wire.messages.feed import HASH_SIZE, MAX_ENTRY, MAX_PAGE, RevocationFeed

__all__ = [
    "GENESIS",
    "MAX_PAGE",
    "MAX_REMOVED_OPERATORS",
    "MAX_REVOKED",
    "AuthzCheck",
    "FeedEntry",
    "FeedState",
    "advance",
    "entry_hash",
    "open_head",
    "page",
]

ENTRY_VERSION: Final = 1
GENESIS: Final = bytes(HASH_SIZE)
"""The ``prev`` of entry 1 and the head of an empty feed."""
MAX_REVOKED: Final = 65536
"""Revoked identities a device keeps at most (a fleet revoking more starts a new device CA)."""
MAX_REMOVED_OPERATORS: Final = 4096
"""Removed operator certificates a device keeps at most."""
MAX_DELETED_GROUPS: Final = 65536
"""Deleted group ids a device keeps at most."""
MAX_SEQ: Final = (1 << 63) - 1
_LABEL: Final = b"keyfleet revocation feed v1\x00"
_SIGNATURE_CHECKS: Final = frozenset(
    {"cose.signature", "cose.kid-unknown", "cose.kid-mismatch", "envelope.sender-mismatch"}
)

AuthzCheck = Callable[[bytes, str, str | None, Mapping[bytes, int]], az.VerifiedAuthorization]
"""Verify an entry's Authorization as ``op`` on ``group`` (``device.revoke``,
``device.replace`` or ``operator.remove``: fleet-wide, ``None``; ``group.delete``: the group it
names) under the device's quorum policy, not counting the operator certificates removed so far
(certificate SHA-256 -> removed at); raises ``ProtocolError`` (``authz.*``,
``operator.removed``) when it does not verify."""
ENTRY_OPS: Final = frozenset(
    {az.OP_DEVICE_REVOKE, az.OP_DEVICE_REPLACE, az.OP_OPERATOR_REMOVE, az.OP_GROUP_DELETE}
)


def _malformed(reason: str) -> ProtocolError:
    return ProtocolError("revocation.malformed", reason)


def entry_hash(entry: bytes) -> bytes:
    return hashlib.sha256(_LABEL + entry).digest()


@dataclass(frozen=True)
class FeedEntry:
    """One revocation: its number, the hash of the entry before, when, and its Authorization."""

    seq: int
    prev: bytes
    time: int
    authz: bytes = field(repr=False)

    def encode(self) -> bytes:
        return codec.encode(
            {
                "v": ENTRY_VERSION,
                "seq": self.seq,
                "prev": self.prev,
                "time": self.time,
                "authz": self.authz,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> FeedEntry:
        """Strict: size first, deterministic CBOR, exact keys and bounds (``revocation.malformed``
        for anything else)."""
        if type(data) is not bytes or not 0 < len(data) <= MAX_ENTRY:
            raise _malformed(f"a feed entry is 1..{MAX_ENTRY} bytes")
        try:
            m = codec.as_map(
                codec.decode(data, MAX_ENTRY, "feed.entry"),
                "feed.entry",
                {"v", "seq", "prev", "time", "authz"},
            )
            if type(m["v"]) is not int or m["v"] != ENTRY_VERSION:
                raise _malformed(f"feed entry version {m['v']!r}")
            entry = cls(
                codec.as_uint(m["seq"], "feed.entry.seq", MAX_SEQ),
                codec.as_bytes(m["prev"], "feed.entry.prev", HASH_SIZE, HASH_SIZE),
                codec.as_uint(m["time"], "feed.entry.time", az.MAX_TIME),
                codec.as_bytes(m["authz"], "feed.entry.authz", 1, MAX_ENTRY),
            )
        except ProtocolError as exc:
            if exc.check == "revocation.malformed":
                raise
            raise _malformed(f"feed entry: [{exc.check}] {exc.reason}") from None
        if entry.seq == 0:
            raise _malformed("feed entries are numbered from 1")
        return entry

    @classmethod
    def after(cls, seq: int, head: bytes, *, time: int, authz: bytes) -> FeedEntry:
        """The entry that follows the feed whose newest entry is ``seq`` with hash ``head``."""
        return cls(seq + 1, head, time, authz)


@dataclass(frozen=True)
class FeedState:
    """What a device holds of the feed. Immutable: ``advance`` returns a new one."""

    seq: int = 0
    head: bytes = GENESIS
    time: int = 0
    revoked: frozenset[tuple[str, bytes]] = frozenset()
    operators: frozenset[tuple[bytes, str, int]] = frozenset()
    deleted: frozenset[str] = frozenset()

    def is_deleted(self, group: str) -> bool:
        return group in self.deleted

    def is_revoked(self, device_id: str, key_hash: bytes) -> bool:
        return (device_id, key_hash) in self.revoked

    def removed_operators(self) -> dict[bytes, int]:
        """Certificate SHA-256 -> the time the quorum removed it (the earliest, if twice)."""
        return _removed_map(self.operators)

    def to_state(self) -> dict[str, object]:
        state: dict[str, object] = {
            "seq": self.seq,
            "head": self.head,
            "time": self.time,
            "revoked": [[d, k] for d, k in sorted(self.revoked)],
        }
        if self.operators:  # a state without removed operators reads as before
            state["operators"] = [[h, o, t] for h, o, t in sorted(self.operators)]
        if self.deleted:  # likewise without deleted groups
            state["deleted"] = sorted(self.deleted)
        return state

    @classmethod
    def parse_state(cls, value: object) -> FeedState:
        m = codec.as_map(
            value, "revocations", {"seq", "head", "time", "revoked"}, {"operators", "deleted"}
        )
        pairs = codec.as_list(
            m["revoked"],
            "revocations.revoked",
            MAX_REVOKED,
            lambda v, w: codec.as_list(v, w, 2, lambda x, y: x, min_len=2),
        )
        revoked = frozenset(
            (_device_id(p[0]), codec.as_bytes(p[1], "revocations.revoked.key", 32, 32))
            for p in pairs
        )
        operators = frozenset(
            (
                codec.as_bytes(t[0], "revocations.operators.cert", HASH_SIZE, HASH_SIZE),
                _operator_id(t[1]),
                codec.as_uint(t[2], "revocations.operators.at", az.MAX_TIME),
            )
            for t in codec.as_list(
                m.get("operators", []),
                "revocations.operators",
                MAX_REMOVED_OPERATORS,
                lambda v, w: codec.as_list(v, w, 3, lambda x, y: x, min_len=3),
            )
        )
        deleted = frozenset(
            codec.as_list(
                m.get("deleted", []), "revocations.deleted", MAX_DELETED_GROUPS, _group_id
            )
        )
        seq = codec.as_uint(m["seq"], "revocations.seq", MAX_SEQ)
        head = codec.as_bytes(m["head"], "revocations.head", HASH_SIZE, HASH_SIZE)
        if (seq == 0) != (head == GENESIS):
            raise codec.fail("revocations", "head and seq disagree")
        time = codec.as_uint(m["time"], "revocations.time", az.MAX_TIME)
        return cls(seq, head, time, revoked, operators, deleted)


def _removed_map(operators: frozenset[tuple[bytes, str, int]]) -> dict[bytes, int]:
    removed: dict[bytes, int] = {}
    for cert_hash, _operator, at in operators:
        removed[cert_hash] = min(at, removed.get(cert_hash, at))
    return removed


def _operator_id(value: object) -> str:
    if type(value) is not str or not 0 < len(value) <= codec.MAX_DEVICE_ID:
        raise codec.fail("revocations.operators.id", "expected an operator id")
    return value


def _group_id(value: object, what: str) -> str:
    if type(value) is not str or not 0 < len(value) <= codec.MAX_GROUP_ID:
        raise codec.fail(what, "expected a group id")
    return value


def _device_id(value: object) -> str:
    if type(value) is not str or not 0 < len(value) <= codec.MAX_DEVICE_ID:
        raise codec.fail("revocations.revoked.id", "expected a device id")
    return value


def advance(state: FeedState, head: RevocationFeed, check: AuthzCheck) -> FeedState | None:
    """The state after ``head`` (a verified ``revocation.feed`` body), or None when it is the
    head we hold already. Refusals (nothing changes): ``revocation.rollback`` (an older head),
    ``revocation.fork`` (the same number with another hash, or entries that do not chain onto
    ours or up to the head), ``revocation.gap`` (entries between ours and the head are missing:
    the device asks for them; not a trust failure), ``revocation.authz`` (an entry's
    Authorization does not verify), ``revocation.malformed``."""
    if head.seq < state.seq:
        raise ProtocolError(
            "revocation.rollback", f"feed head {head.seq} is older than the {state.seq} we hold"
        )
    if head.seq == state.seq:
        if head.head != state.head:
            raise ProtocolError(
                "revocation.fork", f"feed head {head.seq} differs from the one we hold"
            )
        return None
    entries = [FeedEntry.decode(data) for data in head.entries]
    for before, after in pairwise(entries):
        if after.seq != before.seq + 1:
            raise _malformed("feed entries are not consecutive")
    if entries and entries[-1].seq != head.seq:
        raise _malformed("the entries do not end at the head's number")
    if not entries or entries[0].seq > state.seq + 1:
        raise ProtocolError(
            "revocation.gap",
            f"entries {state.seq + 1}..{head.seq} are not all in this message",
        )
    new = [(e, data) for e, data in zip(entries, head.entries, strict=True) if e.seq > state.seq]
    prev = state.head
    for entry, data in new:
        if entry.prev != prev:
            raise ProtocolError(
                "revocation.fork",
                f"entry {entry.seq} does not extend the feed we hold (hash of {entry.seq - 1})",
            )
        prev = entry_hash(data)
    if prev != head.head:
        raise ProtocolError("revocation.fork", "the entries do not hash to the signed head")
    revoked = set(state.revoked)
    operators = set(state.operators)
    deleted = set(state.deleted)
    for entry, _ in new:
        # each entry is judged without the operators removed by the entries before it
        verified = _verified(entry, check, _removed_map(frozenset(operators)))
        request = verified.request
        if request.op == az.OP_OPERATOR_REMOVE:
            operators.add(_removed_operator(entry, request))
            continue
        if request.op == az.OP_GROUP_DELETE:
            assert request.group is not None  # Request requires it of group.delete
            deleted.add(request.group)
            continue
        # a replacement (RMA) revokes its old identity, never the new one that takes its place
        members = request.members[:1] if request.op == az.OP_DEVICE_REPLACE else request.members
        revoked.update((m.device_id, m.key) for m in members)
    if len(revoked) > MAX_REVOKED:
        raise _malformed(f"more than {MAX_REVOKED} revoked identities")
    if len(operators) > MAX_REMOVED_OPERATORS:
        raise _malformed(f"more than {MAX_REMOVED_OPERATORS} removed operator certificates")
    if len(deleted) > MAX_DELETED_GROUPS:
        raise _malformed(f"more than {MAX_DELETED_GROUPS} deleted groups")
    return FeedState(
        head.seq,
        head.head,
        head.time,
        frozenset(revoked),
        frozenset(operators),
        frozenset(deleted),
    )


def _verified(
    entry: FeedEntry, check: AuthzCheck, removed: Mapping[bytes, int]
) -> az.VerifiedAuthorization:
    """The entry's Authorization verified as the op its request names (``device.revoke``,
    ``device.replace``, ``operator.remove`` or ``group.delete`` on the group it names);
    ``revocation.authz`` otherwise."""
    try:
        request = az.Request.decode(az.Authorization.decode(entry.authz).request)
        if request.op not in ENTRY_OPS:
            raise ProtocolError("authz.scope", f"{request.op!r} is not a revocation")
        group = request.group if request.op == az.OP_GROUP_DELETE else None
        return check(entry.authz, request.op, group, removed)
    except ProtocolError as exc:
        raise ProtocolError(
            "revocation.authz",
            f"entry {entry.seq}: the revocation's authorization does not verify "
            f"([{exc.check}] {exc.reason})",
        ) from None


def _removed_operator(entry: FeedEntry, request: az.Request) -> tuple[bytes, str, int]:
    """(certificate SHA-256, operator id, removed at) of a verified ``operator.remove``: the
    entry's time held within the request's window (the service executed it inside it)."""
    assert request.subject is not None  # Request requires it of operator ops
    try:
        subject = OperatorSubject.decode(request.subject)
    except ProtocolError as exc:
        raise ProtocolError(
            "revocation.authz", f"entry {entry.seq}: [{exc.check}] {exc.reason}"
        ) from None
    if subject.op != az.OP_OPERATOR_REMOVE:
        raise ProtocolError(
            "revocation.authz", f"entry {entry.seq}: the subject names {subject.op!r}"
        )
    at = min(max(entry.time, request.nbf), request.exp)
    return subject.cert_sha256, subject.operator, at


def open_head(payload: bytes, resolver: KeyResolver, *, now: int, recipient: str) -> RevocationFeed:
    """Open a ``revocation.feed`` message taken from the retained feed topic.

    The replay guard and the envelope's age bound do not apply (a retained head may be months
    old; the feed's own numbering refuses an older one). Refusals: ``revocation.signature``
    (not signed by the service's key: unknown kid, another sender, a bad signature),
    ``revocation.malformed`` (anything else that does not parse or is not a feed head
    addressed to every device)."""
    try:
        message = open_message(
            payload,
            resolver,
            now=now,
            recipients={recipient},
            max_age=now + 1,
            max_future=DEFAULT_MAX_FUTURE,
        )
    except ProtocolError as exc:
        if exc.check in _SIGNATURE_CHECKS:
            raise ProtocolError(
                "revocation.signature", f"feed head not signed by the service ([{exc.check}])"
            ) from None
        raise _malformed(f"feed head: [{exc.check}] {exc.reason}") from None
    if not isinstance(message.body, RevocationFeed):
        raise _malformed(f"a {message.type} message on the feed topic")
    return message.body


def page(entries: list[bytes], *, time: int) -> RevocationFeed:
    """A ``revocation.feed`` body vouching for the newest of ``entries`` (consecutive, oldest
    first, at most ``MAX_PAGE``): what the service publishes."""
    if not entries or len(entries) > MAX_PAGE:
        raise ValueError(f"a page holds 1..{MAX_PAGE} entries")
    last = FeedEntry.decode(entries[-1])
    return RevocationFeed(
        seq=last.seq, head=entry_hash(entries[-1]), time=time, entries=tuple(entries)
    )
