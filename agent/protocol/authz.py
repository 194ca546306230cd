"""Operator authorizations: requests, k-of-n approvals, the quorum policy, and their verification.

A membership change (create a group, add or remove members, revoke a device) and a change of
the quorum policy itself happen only under an **Authorization**: a **Request** naming exactly the
change, its group and a validity window, together with **Approvals**, each an ECDSA P-256
signature by one operator whose certificate chains to the operator CA the device trusts. The
**QuorumPolicy** says how many distinct operators each operation needs (k of n), per group if it
names the group. Devices check all of it themselves (docs/authorization.md), so the fleet
service, which only relays these bytes, cannot invent or alter one.

Why one module of this size (~900 lines): the formats, their strict decoders and the verifier
that judges them are one trust boundary; splitting the decoders from the checks that rely on
their guarantees would make each half unreviewable alone.

Formats (deterministic CBOR maps, every one with ``"v": 1``; the request also names the cipher
suite, MLS suite 2: P-256, SHA-256):

- Request ``{"v", "suite", "id": 16 bytes, "op", "group": str | null, "members": [{"id", "key":
  SHA-256 of the DevID public point}], "policy": QuorumPolicy bytes | null, "nbf", "exp", "by"}``
  and, only for the service's release and operator ops, ``"subject"``: the bytes naming exactly
  what is approved (a request without one encodes as before, byte for byte)
- Approval ``{"v", "cert": operator certificate DER, "sig": DER ECDSA-P256-SHA256 over
  APPROVAL_LABEL || SHA-256(request bytes)}``
- Authorization ``{"v", "req": request bytes, "approvals": [Approval]}``
- QuorumPolicy ``{"v", "serial", "default": {op | "*": k}, "groups": {group: {op | "*": k}},
  "auto": {"remove": [group | "*"], "readd": [group | "*"]}}``

Pure: no I/O, no clock (``now`` is passed in as unix seconds), no randomness except the request id
a caller passes in. Every refusal is a ``ProtocolError`` with an ``authz.*`` check id.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID

from agent.protocol.errors import CryptoError, ProtocolError
from agent.protocol.mls import codec
from agent.protocol.wire.messages.base import ID_PATTERN
from agent.protocol.x509der import load_certificate

VERSION = 1
SUITE = 2
"""MLS cipher suite 2 (P-256, SHA-256, AES-128-GCM): the only one so far."""

APPROVAL_LABEL = b"keyfleet approval v1\x00"
"""Prefix of what an approval signs, so the signature means nothing in any other protocol."""

REQUEST_ID_SIZE = 16
MEMBER_KEY_SIZE = 32
POINT_SIZE = 65
MAX_MEMBERS = 4096
MAX_APPROVALS = 32
MAX_K = MAX_APPROVALS
MAX_CERT = 4096
MAX_SIGNATURE = 80  # a DER ECDSA P-256 signature is at most 72 bytes
MAX_POLICY = 64 * 1024
MAX_POLICY_GROUPS = 1024
MAX_POLICY_OPS = 64
MAX_REQUEST = 512 * 1024
MAX_APPROVAL = MAX_CERT + MAX_SIGNATURE + 64
MAX_AUTHORIZATION = MAX_REQUEST + MAX_APPROVALS * MAX_APPROVAL + 64
MAX_LIFETIME = 31 * 24 * 3600
"""Longest validity window (``exp - nbf``) a request may name."""
MAX_SERIAL = (1 << 63) - 1
MAX_TIME = (1 << 63) - 1
MAX_OP = 64

# Operations. Devices check the membership ops, "policy" and "release.approve" (each release of
# the bundle carries its approval: agent.protocol.releaseproof); the service checks the others
# ("fleet.attest", "fleet.rekey", ...) itself with the same verifier.
OP_GROUP_CREATE = "group.create"
OP_GROUP_ADD = "group.add"
OP_GROUP_REMOVE = "group.remove"
OP_DEVICE_REVOKE = "device.revoke"
# Deleting a group: names the group, no members. Devices learn it from the revocation feed
# (agent.protocol.feed) and destroy every key of the group; the group id is never used again.
OP_GROUP_DELETE = "group.delete"
# A device replaced after a TPM failure (RMA): fleet-wide, members exactly [old, new]. It lets a
# commit add the new identity to a group the old one is in and remove the old one; the old
# identity is revoked (a revocation feed entry names it, not the new one).
OP_DEVICE_REPLACE = "device.replace"
OP_POLICY = "policy"
# The service's own op: a revoked device's TPM (its EK) may enroll once more. It names the
# revoked device with its old DevID key; it authorizes no commit (``authz.scope``).
OP_DEVICE_REENROLL = "device.reenroll"
# The release ops (provisioning.service.releases): approve or revoke one firmware release.
# Their ``subject`` binds the exact release (its version and manifest digest).
OP_RELEASE_APPROVE = "release.approve"
OP_RELEASE_REVOKE = "release.revoke"
# The service's operator management ops (provisioning.service.operatorops): register an
# operator (subject binds its certificate), remove one (its id and certificate) or set its role
# within the certificate's OU (its id and the role). Admins' decisions, like a policy change.
OP_OPERATOR_ADD = "operator.add"
OP_OPERATOR_REMOVE = "operator.remove"
OP_OPERATOR_ROLE = "operator.role"
OPERATOR_OPS = frozenset({OP_OPERATOR_ADD, OP_OPERATOR_REMOVE, OP_OPERATOR_ROLE})
# A trust bundle's rollover (agent.protocol.trust: service signing key, device CA): the subject
# is the exact trust bundle; devices check it themselves, admins approve it.
OP_TRUST_ROTATE = "trust.rotate"
# Deleting a group destroys its keys on every member for good: admins decide it, as the service
# requires (provisioning.service.requests.ADMIN_OPS); devices check the role themselves.
ADMIN_OPS = OPERATOR_OPS | {OP_POLICY, OP_TRUST_ROTATE, OP_GROUP_DELETE}
SUBJECT_OPS = frozenset({OP_RELEASE_APPROVE, OP_RELEASE_REVOKE, OP_TRUST_ROTATE}) | OPERATOR_OPS
MAX_SUBJECT = 1024
# A ``trust.rotate``'s subject is the whole trust bundle: with device CA certificates (version
# 2, agent.protocol.trust) it outgrows MAX_SUBJECT.
MAX_TRUST_SUBJECT = 8 * 1024
# A replacement's subject names every group of the replaced device (``replace_subject``).
MAX_REPLACE_SUBJECT = 64 * 1024
REPLACE_LABEL = "keyfleet replace v1"
MEMBERSHIP_OPS = frozenset(
    {OP_GROUP_CREATE, OP_GROUP_ADD, OP_GROUP_REMOVE, OP_DEVICE_REVOKE, OP_DEVICE_REPLACE}
)
FLEET_OPS = frozenset({OP_DEVICE_REVOKE, OP_DEVICE_REPLACE})
"""Membership ops that name no group: they change every group their members are in."""
DEVICE_OPS = MEMBERSHIP_OPS | {OP_POLICY}
OPERATOR_PREFIX = "op-"
"""Operator ids (certificate CNs) start with this, as ``keyfleet pki issue operator`` enforces."""
ANY = "*"
"""In a policy: any operation not named (in ``default``/``groups``) or any group (in ``auto``)."""

ROLE_RANK = MappingProxyType({"viewer": 0, "operator": 1, "admin": 2})
"""Operator roles (the certificate's OU), lowest first. Approvals need "operator" or higher;
approvals of a policy change need "admin"."""

_DECODE = "authz.decode"


def _fail(what: str, reason: str) -> ProtocolError:
    return ProtocolError(_DECODE, f"{what}: {reason}")


def _decode_cbor(data: object, max_size: int, what: str) -> object:
    if not isinstance(data, bytes):
        raise _fail(what, "expected bytes")
    if len(data) > max_size:
        raise _fail(what, f"{len(data)} bytes exceed the limit of {max_size}")
    try:
        return codec.decode(data, max_size, what)
    except ProtocolError as exc:
        raise _fail(what, f"not deterministic CBOR ({exc.check})") from None


def _versioned_map(
    value: object, what: str, keys: frozenset[str], *, suite: bool
) -> dict[str, object]:
    """A map whose version (and suite) are checked before its key set, so that a later version
    with other fields is refused as a version, not as garbage."""
    if not isinstance(value, Mapping):
        raise _fail(what, "expected a map")
    if "v" not in value or (suite and "suite" not in value):
        raise _fail(what, "no version" + (" or cipher suite" if suite else ""))
    if value.get("v") != VERSION or type(value.get("v")) is not int:
        raise ProtocolError("authz.version", f"{what}: version {value.get('v')!r} is not {VERSION}")
    if suite and (value.get("suite") != SUITE or type(value.get("suite")) is not int):
        raise ProtocolError(
            "authz.version", f"{what}: cipher suite {value.get('suite')!r} is not {SUITE}"
        )
    if set(value) != keys:
        missing = sorted(keys - set(value), key=str)
        unknown = sorted(set(value) - keys, key=str)
        raise _fail(what, f"missing keys {missing}, unknown keys {unknown}")
    return dict(value)


def _uint(value: object, what: str, max_value: int) -> int:
    if type(value) is not int or not 0 <= value <= max_value:
        raise _fail(what, f"expected an integer in [0, {max_value}]")
    return value


def _bytes(value: object, what: str, min_len: int, max_len: int) -> bytes:
    if type(value) is not bytes or not min_len <= len(value) <= max_len:
        raise _fail(what, f"expected {min_len} to {max_len} bytes")
    return value


def _ident(value: object, what: str) -> str:
    if type(value) is not str or not ID_PATTERN.fullmatch(value):
        raise _fail(what, "expected an id of 1-64 characters [A-Za-z0-9._-]")
    return value


def _op(value: object, what: str) -> str:
    if (
        type(value) is not str
        or not 1 <= len(value) <= MAX_OP
        or not value[0].isascii()
        or not value[0].islower()
        or not all(ch.isascii() and (ch.islower() or ch.isdigit() or ch in ".-") for ch in value)
    ):
        raise _fail(what, "expected an operation name [a-z][a-z0-9.-]*")
    return value


def _list(value: object, what: str, max_len: int) -> list[object]:
    if type(value) is not list or len(value) > max_len:
        raise _fail(what, f"expected an array of at most {max_len} items")
    return value


def replace_subject(groups: Iterable[str]) -> bytes:
    """The subject of a ``device.replace`` request: the groups the new identity may join in the
    old one's place (the groups the old one was in when operators approved)."""
    return codec.encode([REPLACE_LABEL, sorted(set(groups))])


def replaced_groups(subject: object) -> tuple[str, ...]:
    """The groups a ``device.replace`` subject names (sorted, each once); ``authz.decode``."""
    if type(subject) is not bytes or not 1 <= len(subject) <= MAX_REPLACE_SUBJECT:
        raise _fail("request.subject", f"expected 1 to {MAX_REPLACE_SUBJECT} bytes")
    decoded = _decode_cbor(subject, MAX_REPLACE_SUBJECT, "request.subject")
    if not isinstance(decoded, list) or len(decoded) != 2 or decoded[0] != REPLACE_LABEL:
        raise _fail("request.subject", "not a replacement's subject")
    groups = [_ident(g, "request.subject") for g in _list(decoded[1], "request.subject", 4096)]
    if groups != sorted(set(groups)):
        raise _fail("request.subject", "groups must be sorted and named once")
    return tuple(groups)


def member_key(point: bytes) -> bytes:
    """The key hash a request names for a member: SHA-256 of its DevID public key's 65-byte
    uncompressed SEC1 point."""
    if type(point) is not bytes or len(point) != POINT_SIZE or point[0] != 4:
        raise ProtocolError("authz.members", "a member key must be a 65-byte uncompressed point")
    return hashlib.sha256(point).digest()


# -- Request ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One device a request names: its id and the SHA-256 of its DevID public point."""

    device_id: str
    key: bytes

    def __post_init__(self) -> None:
        _ident(self.device_id, "member.id")
        _bytes(self.key, "member.key", MEMBER_KEY_SIZE, MEMBER_KEY_SIZE)

    @classmethod
    def of(cls, device_id: str, point: bytes) -> Member:
        """The member entry for a device and its DevID public point."""
        return cls(device_id, member_key(point))


@dataclass(frozen=True)
class Request:
    """What operators approve: one operation, its group, its members and a validity window.

    Constructing one checks every field (``authz.decode``), so a ``Request`` that exists is
    well-formed whether it was decoded or built by the service.
    """

    id: bytes
    op: str
    group: str | None
    members: tuple[Member, ...]
    policy: bytes | None
    nbf: int
    exp: int
    by: str
    subject: bytes | None = None

    def __post_init__(self) -> None:
        _bytes(self.id, "request.id", REQUEST_ID_SIZE, REQUEST_ID_SIZE)
        _op(self.op, "request.op")
        if self.group is not None:
            _ident(self.group, "request.group")
        if type(self.members) is not tuple or len(self.members) > MAX_MEMBERS:
            raise _fail("request.members", f"expected a tuple of at most {MAX_MEMBERS} members")
        if not all(isinstance(m, Member) for m in self.members):
            raise _fail("request.members", "expected Member entries")
        if len({m.device_id for m in self.members}) != len(self.members):
            raise _fail("request.members", "a device is named twice")
        _uint(self.nbf, "request.nbf", MAX_TIME)
        _uint(self.exp, "request.exp", MAX_TIME)
        if not self.nbf <= self.exp <= self.nbf + MAX_LIFETIME:
            raise _fail("request", f"window must satisfy nbf <= exp <= nbf + {MAX_LIFETIME}")
        _ident(self.by, "request.by")
        if self.op == OP_POLICY:
            if self.policy is None or self.group is not None or self.members:
                raise _fail("request", "a policy request carries a policy, no group, no members")
            QuorumPolicy.decode(self.policy)  # nothing half-parsed: the policy must decode too
        elif self.policy is not None:
            raise _fail("request.policy", f"only op {OP_POLICY!r} carries a policy")
        if (
            self.op in {OP_GROUP_CREATE, OP_GROUP_ADD, OP_GROUP_REMOVE, OP_GROUP_DELETE}
            and self.group is None
        ):
            raise _fail("request.group", f"op {self.op!r} names a group")
        if self.op == OP_GROUP_DELETE and self.members:
            raise _fail("request.members", f"op {self.op!r} names no members")
        if self.op in MEMBERSHIP_OPS and not self.members:
            raise _fail("request.members", f"op {self.op!r} names at least one member")
        if self.op == OP_DEVICE_REPLACE:
            if len(self.members) != 2 or self.group is not None:
                raise _fail("request", f"op {self.op!r} names no group and two members: old, new")
            replaced_groups(self.subject)
        if self.op in SUBJECT_OPS:
            limit = MAX_TRUST_SUBJECT if self.op == OP_TRUST_ROTATE else MAX_SUBJECT
            _bytes(self.subject, "request.subject", 1, limit)
            if self.group is not None or self.members:
                raise _fail("request", f"op {self.op!r} names its subject, no group, no members")
        elif self.subject is not None and self.op != OP_DEVICE_REPLACE:
            raise _fail("request.subject", f"op {self.op!r} carries no subject")

    def to_obj(self) -> dict[str, object]:
        obj: dict[str, object] = {
            "v": VERSION,
            "suite": SUITE,
            "id": self.id,
            "op": self.op,
            "group": self.group,
            "members": [{"id": m.device_id, "key": m.key} for m in self.members],
            "policy": self.policy,
            "nbf": self.nbf,
            "exp": self.exp,
            "by": self.by,
        }
        if self.subject is not None:
            obj["subject"] = self.subject
        return obj

    def encode(self) -> bytes:
        return codec.encode(self.to_obj())

    @classmethod
    def decode(cls, data: bytes) -> Request:
        raw = _decode_cbor(data, MAX_REQUEST, "request")
        # "subject" is present only when it has a value: one request, one encoding
        subject = isinstance(raw, Mapping) and "subject" in raw
        keys = _REQUEST_KEYS | {"subject"} if subject else _REQUEST_KEYS
        obj = _versioned_map(raw, "request", keys, suite=True)
        if subject and obj["subject"] is None:
            raise _fail("request.subject", "expected bytes when present")
        members = []
        for i, item in enumerate(_list(obj["members"], "request.members", MAX_MEMBERS)):
            if not isinstance(item, Mapping) or set(item) != {"id", "key"}:
                raise _fail(f"request.members[{i}]", "expected a map {id, key}")
            members.append(Member(item["id"], item["key"]))
        # the constructor checks every field's type and bounds
        return cls(
            members=tuple(members),
            subject=obj.get("subject"),  # type: ignore[arg-type]
            **{k: obj[k] for k in _REQUEST_FIELDS},  # type: ignore[arg-type]
        )


_REQUEST_FIELDS = ("id", "op", "group", "policy", "nbf", "exp", "by")
_REQUEST_KEYS = frozenset({"v", "suite", "members", *_REQUEST_FIELDS})


# -- Approval and Authorization -----------------------------------------------------------------


def approval_message(request: bytes) -> bytes:
    """The bytes an approval signs: the label and the SHA-256 of the exact request bytes."""
    return APPROVAL_LABEL + hashlib.sha256(request).digest()


@dataclass(frozen=True)
class Approval:
    """One operator's signature over a request, with the certificate that names the operator."""

    cert: bytes
    sig: bytes

    def __post_init__(self) -> None:
        _bytes(self.cert, "approval.cert", 1, MAX_CERT)
        _bytes(self.sig, "approval.sig", 1, MAX_SIGNATURE)

    def to_obj(self) -> dict[str, object]:
        return {"v": VERSION, "cert": self.cert, "sig": self.sig}

    def encode(self) -> bytes:
        return codec.encode(self.to_obj())

    @classmethod
    def from_obj(cls, value: object, what: str = "approval") -> Approval:
        obj = _versioned_map(value, what, frozenset({"v", "cert", "sig"}), suite=False)
        return cls(cert=obj["cert"], sig=obj["sig"])  # type: ignore[arg-type]

    @classmethod
    def decode(cls, data: bytes) -> Approval:
        return cls.from_obj(_decode_cbor(data, MAX_APPROVAL, "approval"))


@dataclass(frozen=True)
class Authorization:
    """A request (its exact bytes, as signed) and the approvals collected for it."""

    request: bytes
    approvals: tuple[Approval, ...]

    def __post_init__(self) -> None:
        _bytes(self.request, "authorization.req", 1, MAX_REQUEST)
        if type(self.approvals) is not tuple or not 1 <= len(self.approvals) <= MAX_APPROVALS:
            raise _fail("authorization.approvals", f"expected 1 to {MAX_APPROVALS} approvals")
        if not all(isinstance(a, Approval) for a in self.approvals):
            raise _fail("authorization.approvals", "expected Approval entries")

    def to_obj(self) -> dict[str, object]:
        return {
            "v": VERSION,
            "req": self.request,
            "approvals": [a.to_obj() for a in self.approvals],
        }

    def encode(self) -> bytes:
        return codec.encode(self.to_obj())

    @classmethod
    def decode(cls, data: bytes) -> Authorization:
        obj = _versioned_map(
            _decode_cbor(data, MAX_AUTHORIZATION, "authorization"),
            "authorization",
            frozenset({"v", "req", "approvals"}),
            suite=False,
        )
        items = _list(obj["approvals"], "authorization.approvals", MAX_APPROVALS)
        return cls(
            request=obj["req"],  # type: ignore[arg-type]
            approvals=tuple(
                Approval.from_obj(a, f"authorization.approvals[{i}]") for i, a in enumerate(items)
            ),
        )


def sign_approval(
    request: bytes, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> Approval:
    """An approval of ``request`` (its exact bytes) by the operator holding ``key`` and ``cert``.

    The request is decoded first, so an operator's tool never signs bytes that devices would
    refuse as malformed; a key that is not the certificate's is refused (``authz.signature``).
    """
    Request.decode(request)
    if not isinstance(key.curve, ec.SECP256R1):
        raise ProtocolError("authz.signature", "operator keys are P-256")
    if cert.public_key() != key.public_key():
        raise ProtocolError("authz.signature", "the key is not the certificate's key")
    signature = key.sign(approval_message(request), ec.ECDSA(hashes.SHA256()))
    return Approval(cert=cert.public_bytes(serialization.Encoding.DER), sig=signature)


# -- QuorumPolicy ------------------------------------------------------------------------------


def _quorums(value: object, what: str) -> Mapping[str, int]:
    if not isinstance(value, Mapping) or len(value) > MAX_POLICY_OPS:
        raise _fail(what, f"expected a map of at most {MAX_POLICY_OPS} operations")
    out: dict[str, int] = {}
    for op, k in value.items():
        if op != ANY:
            _op(op, f"{what} key")
        if type(k) is not int or not 1 <= k <= MAX_K:
            raise _fail(f"{what}[{op!r}]", f"k must be an integer in [1, {MAX_K}]")
        out[str(op)] = k
    return MappingProxyType(out)


def _scopes(value: object, what: str) -> frozenset[str]:
    items = _list(value, what, MAX_POLICY_GROUPS)
    names = [item if item == ANY else _ident(item, f"{what} item") for item in items]
    if len(set(names)) != len(names):
        raise _fail(what, "a group is named twice")
    return frozenset(str(n) for n in names)


@dataclass(frozen=True, eq=False)
class QuorumPolicy:
    """How many distinct operators each operation needs, and where automatic changes may run.

    ``required(op, group)`` looks up ``groups[group][op]``, ``groups[group]["*"]``,
    ``default[op]``, ``default["*"]`` in that order; ``default`` must hold ``"*"`` so that every
    operation has a quorum. ``auto_remove``/``auto_readd`` name the groups (or ``"*"``) where the
    service may remove a member (quarantine) or re-add the same identity without a request.
    """

    serial: int
    default: Mapping[str, int]
    groups: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    auto_remove: frozenset[str] = frozenset()
    auto_readd: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        _uint(self.serial, "policy.serial", MAX_SERIAL)
        object.__setattr__(self, "default", _quorums(self.default, "policy.default"))
        if ANY not in self.default:
            raise _fail("policy.default", f"must name {ANY!r}, the quorum of any other operation")
        if not isinstance(self.groups, Mapping) or len(self.groups) > MAX_POLICY_GROUPS:
            raise _fail("policy.groups", f"expected a map of at most {MAX_POLICY_GROUPS} groups")
        groups = {
            _ident(name, "policy.groups key"): _quorums(ops, f"policy.groups[{name!r}]")
            for name, ops in self.groups.items()
        }
        object.__setattr__(self, "groups", MappingProxyType(groups))
        for name in ("auto_remove", "auto_readd"):
            scopes = getattr(self, name)
            if not isinstance(scopes, frozenset | set):
                raise _fail(f"policy.{name}", "expected a set of group names")
            object.__setattr__(self, name, _scopes(list(scopes), f"policy.{name}"))

    @classmethod
    def initial(
        cls, k: int, *, auto_remove: Iterable[str] = (), auto_readd: Iterable[str] = ()
    ) -> QuorumPolicy:
        """The policy a device uses before any signed one: serial 0, ``k`` for every operation
        (``min_approvals`` of its configuration)."""
        return cls(
            serial=0,
            default={ANY: k},
            auto_remove=frozenset(auto_remove),
            auto_readd=frozenset(auto_readd),
        )

    def required(self, op: str, group: str | None) -> int:
        """The number of distinct operators ``op`` on ``group`` (None: fleet-wide) needs."""
        scoped = self.groups.get(group) if group is not None else None
        if scoped is not None:
            if op in scoped:
                return scoped[op]
            if ANY in scoped:
                return scoped[ANY]
        return self.default.get(op, self.default[ANY])

    def allows_auto_remove(self, group: str) -> bool:
        """May the service remove a member of ``group`` on its own (quarantine)?"""
        return ANY in self.auto_remove or group in self.auto_remove

    def allows_auto_readd(self, group: str) -> bool:
        """May the service re-add a removed member of ``group`` under the same identity?"""
        return ANY in self.auto_readd or group in self.auto_readd

    def to_obj(self) -> dict[str, object]:
        return {
            "v": VERSION,
            "serial": self.serial,
            "default": dict(self.default),
            "groups": {name: dict(ops) for name, ops in self.groups.items()},
            "auto": {"remove": sorted(self.auto_remove), "readd": sorted(self.auto_readd)},
        }

    def encode(self) -> bytes:
        return codec.encode(self.to_obj())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QuorumPolicy) and self.to_obj() == other.to_obj()

    def __hash__(self) -> int:
        return hash(self.encode())

    @classmethod
    def decode(cls, data: bytes) -> QuorumPolicy:
        keys = frozenset({"v", "serial", "default", "groups", "auto"})
        obj = _versioned_map(_decode_cbor(data, MAX_POLICY, "policy"), "policy", keys, suite=False)
        auto = obj["auto"]
        if not isinstance(auto, Mapping) or set(auto) != {"remove", "readd"}:
            raise _fail("policy.auto", "expected a map {remove, readd}")
        groups = obj["groups"]
        if not isinstance(groups, Mapping) or not all(type(k) is str for k in groups):
            raise _fail("policy.groups", "expected a map keyed by group names")
        return cls(
            serial=_uint(obj["serial"], "policy.serial", MAX_SERIAL),
            default=_quorums(obj["default"], "policy.default"),
            groups={k: _quorums(v, f"policy.groups[{k!r}]") for k, v in groups.items()},
            auto_remove=_scopes(auto["remove"], "policy.auto.remove"),
            auto_readd=_scopes(auto["readd"], "policy.auto.readd"),
        )


# -- Verification ------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifiedOperator:
    """An operator whose certificate chains to a trusted operator CA: id (CN) and role (OU)."""

    operator_id: str
    role: str
    public_key: ec.EllipticCurvePublicKey = field(repr=False, compare=False)


@dataclass(frozen=True)
class VerifiedAuthorization:
    """An authorization whose quorum was met: the request, the distinct operators whose
    approvals counted, and ``digest`` = SHA-256 of the authorization bytes (the admission hash
    recorded in the tree)."""

    request: Request
    operators: frozenset[str]
    digest: bytes


@dataclass(frozen=True)
class _CachedOperator:
    operator: VerifiedOperator
    not_before: int  # the operator certificate's own validity
    not_after: int
    chain_from: int  # the validity every certificate of the verified chain shares
    chain_until: int


_NONE_REMOVED: Mapping[bytes, int] = MappingProxyType({})


def _check_not_removed(approval: Approval, removed: Mapping[bytes, int], at: int) -> None:
    """Refuse an approval made with an operator certificate the quorum removed at or before
    ``at`` (``operator.removed``)."""
    if not removed:
        return
    since = removed.get(hashlib.sha256(approval.cert).digest())
    if since is not None and at >= since:
        raise ProtocolError(
            "operator.removed",
            f"an approval by an operator certificate the quorum removed at {since} "
            f"(judged at {at})",
        )


def _unix(moment: datetime) -> int:
    return int(moment.timestamp())


def _requires_digital_signature(
    policy: verification.Policy, cert: x509.Certificate, usage: x509.KeyUsage
) -> None:
    if not usage.digital_signature:
        raise ValueError("an operator certificate must allow digitalSignature")


def _single_attribute(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str | None:
    values = cert.subject.get_attributes_for_oid(oid)
    if len(values) != 1 or not isinstance(values[0].value, str):
        return None
    return values[0].value


class AuthzVerifier:
    """Checks authorizations against the operator CA(s) a device trusts.

    Operator certificates are validated with ``cryptography.x509.verification`` (RFC 5280 path
    validation, a client verifier: clientAuth EKU): the chain must end at one of
    ``operator_anchors`` with no intermediate, the operator certificate needs digitalSignature,
    and needs no subjectAltName (operators are named by CN and OU, not by a host name). A
    successful validation is remembered per certificate DER (an LRU of ``cache_size``) together
    with the chain's validity window, so a certificate seen in thousands of admissions is
    validated once; a time outside that window validates again (and fails).

    ``ends``: anchor DER -> the last second (unix) an approval with a certificate of that CA is
    judged valid (an operator CA a trust bundle keeps only until a time,
    ``agent.protocol.trust``); judged later, such a certificate fails with ``authz.chain``.
    """

    def __init__(
        self,
        operator_anchors: Sequence[x509.Certificate],
        *,
        cache_size: int = 1024,
        ends: Mapping[bytes, int] | None = None,
    ) -> None:
        if not operator_anchors:
            raise ProtocolError("authz.chain", "no operator CA to validate approvals against")
        self._store = verification.Store(list(operator_anchors))
        self._ends = dict(ends or {})
        self._ca_policy = verification.ExtensionPolicy.webpki_defaults_ca()
        self._ee_policy = (
            verification.ExtensionPolicy.webpki_defaults_ee()
            .may_be_present(x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None)
            .require_present(
                x509.KeyUsage, verification.Criticality.AGNOSTIC, _requires_digital_signature
            )
        )
        self._cache: OrderedDict[bytes, _CachedOperator] = OrderedDict()
        self._cache_size = max(1, cache_size)

    # -- whole authorizations

    def verify(
        self,
        authz: bytes,
        *,
        policy: QuorumPolicy,
        now: int | None,
        op: str,
        group: str | None,
        removed: Mapping[bytes, int] = _NONE_REMOVED,
        executed: bool = False,
    ) -> VerifiedAuthorization:
        """Verify that ``authz`` authorizes ``op`` on ``group`` under ``policy``.

        ``now`` (unix seconds) checks freshness: ``nbf <= now <= exp``, and every operator
        certificate valid at ``now``. ``now=None`` is historical verification (another leaf's
        admission in a Welcome): the window is not checked, and each operator certificate must
        have been valid at some moment of the request's window (checked at the first such moment).

        ``removed`` maps the SHA-256 of an operator certificate's DER to the time the quorum
        removed it (a device learns it from its revocation feed): an approval made with it does
        not count (``operator.removed``) when the request is judged at or after that time, at
        ``now``, or historically at the request's ``nbf`` (an approval of a request dated
        before the removal, already executed, stays valid). ``executed``: a change another
        device already made (a Welcome's own admission) is judged at ``nbf`` for removals even
        with ``now``, which still checks its window.

        Approvals that fail (chain, role, signature) do not count; the same operator counts
        once. Raises if fewer than ``policy.required(op, group)`` distinct operators remain:
        with the check id of the first refused approval if there was one, else ``authz.quorum``.
        """
        if now is not None:
            _check_now(now)
        parsed = Authorization.decode(authz)
        request = Request.decode(parsed.request)
        if request.op != op or request.group != group:
            raise ProtocolError(
                "authz.scope",
                f"authorizes {request.op!r} on {request.group!r}, not {op!r} on {group!r}",
            )
        if now is not None and now < request.nbf:
            raise ProtocolError("authz.not-yet", f"valid from {request.nbf}, now is {now}")
        if now is not None and now > request.exp:
            raise ProtocolError("authz.expired", f"expired at {request.exp}, now is {now}")
        needed = policy.required(op, group)
        message = approval_message(parsed.request)
        approved: set[str] = set()
        refused: list[ProtocolError] = []
        judged_at = request.nbf if now is None or executed else now
        for approval in parsed.approvals:
            try:
                _check_not_removed(approval, removed, judged_at)
                operator = self._approval(approval, message, request, now)
            except ProtocolError as exc:
                refused.append(exc)
                continue
            approved.add(operator.operator_id)
        if len(approved) < needed:
            counted = f"{len(approved)} distinct operator(s) of {needed} needed"
            if refused:
                first = refused[0]
                raise type(first)(
                    first.check, f"{counted}; an approval was refused: {first.reason}"
                )
            raise ProtocolError("authz.quorum", f"{counted} ({len(parsed.approvals)} approvals)")
        return VerifiedAuthorization(
            request=request, operators=frozenset(approved), digest=hashlib.sha256(authz).digest()
        )

    def verify_policy_update(
        self,
        authz: bytes,
        *,
        current: QuorumPolicy,
        now: int | None,
        removed: Mapping[bytes, int] = _NONE_REMOVED,
    ) -> QuorumPolicy:
        """The new policy an authorization with op "policy" carries, if it meets the quorum of
        the ``current`` policy for "policy" (admins only) and raises the serial."""
        verified = self.verify(
            authz, policy=current, now=now, op=OP_POLICY, group=None, removed=removed
        )
        if verified.request.policy is None:  # Request refuses this already; kept for mypy
            raise _fail("request.policy", "a policy request carries a policy")
        new = QuorumPolicy.decode(verified.request.policy)
        if new.serial <= current.serial:
            raise ProtocolError(
                "authz.policy.serial",
                f"serial {new.serial} does not follow the current serial {current.serial}",
            )
        return new

    # -- single approvals (the service checks each one when it is submitted)

    def verify_approval(
        self, request: bytes, approval: Approval, *, now: int | None
    ) -> VerifiedOperator:
        """Verify one approval of ``request``: operator certificate (chain, role for the
        request's op) and signature. Raises with the approval's check id."""
        if now is not None:
            _check_now(now)
        return self._approval(approval, approval_message(request), Request.decode(request), now)

    def _approval(
        self, approval: Approval, message: bytes, request: Request, now: int | None
    ) -> VerifiedOperator:
        operator = self._operator(approval.cert, request, now)
        needed = "admin" if request.op in ADMIN_OPS else "operator"
        if ROLE_RANK[operator.role] < ROLE_RANK[needed]:
            raise ProtocolError(
                "authz.role",
                f"{operator.operator_id} has role {operator.role!r};"
                f" {request.op!r} needs {needed!r} or higher",
            )
        try:
            operator.public_key.verify(approval.sig, message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise CryptoError(
                "authz.signature", f"{operator.operator_id}'s approval does not verify"
            ) from None
        return operator

    def _operator(self, der: bytes, request: Request, now: int | None) -> VerifiedOperator:
        cached = self._cache.get(der)
        cert: x509.Certificate | None = None
        if cached is not None:
            not_before, not_after = cached.not_before, cached.not_after
        else:
            try:
                cert = load_certificate(der)
            except (
                ValueError,
                x509.InvalidVersion,
            ):  # a version field outside 1..3 raises the latter
                raise ProtocolError(
                    "authz.chain", "an approval's certificate does not parse"
                ) from None
            if not _signature_bits_canonical(der):
                # the parser accepts unused bits in the signature BIT STRING: the same
                # certificate under other bytes, which no issuer writes
                raise ProtocolError("authz.chain", "an approval's certificate is not canonical DER")
            not_before = _unix(cert.not_valid_before_utc)
            not_after = _unix(cert.not_valid_after_utc)
        if now is not None:
            at = now
        else:
            at = max(request.nbf, not_before)
            if at > min(request.exp, not_after):
                raise ProtocolError(
                    "authz.chain",
                    "the operator certificate was not valid during the request's window",
                )
        if cached is not None and cached.chain_from <= at <= cached.chain_until:
            self._cache.move_to_end(der)
            return cached.operator
        if cert is None:
            cert = load_certificate(der)
        entry = self._validate(cert, at)
        self._cache[der] = entry
        self._cache.move_to_end(der)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return entry.operator

    def _validate(self, cert: x509.Certificate, at: int) -> _CachedOperator:
        verifier = (
            verification.PolicyBuilder()
            .store(self._store)
            .time(datetime.fromtimestamp(at, UTC))
            .max_chain_depth(0)
            .extension_policies(ca_policy=self._ca_policy, ee_policy=self._ee_policy)
            .build_client_verifier()
        )
        try:
            chain = verifier.verify(cert, []).chain
        except verification.VerificationError as exc:
            raise ProtocolError("authz.chain", f"operator certificate: {exc}") from None
        end = self._ends.get(chain[-1].public_bytes(serialization.Encoding.DER))
        if end is not None and at > end:
            raise ProtocolError(
                "authz.chain", f"operator certificate: its operator CA is accepted only until {end}"
            )
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise ProtocolError("authz.chain", "operator keys are P-256")
        operator_id = _single_attribute(cert, NameOID.COMMON_NAME)
        if (
            operator_id is None
            or not ID_PATTERN.fullmatch(operator_id)
            or not operator_id.startswith(OPERATOR_PREFIX)
        ):
            raise ProtocolError("authz.chain", "the certificate names no operator id (one CN op-…)")
        role = _single_attribute(cert, NameOID.ORGANIZATIONAL_UNIT_NAME)
        if role is None or role not in ROLE_RANK:
            raise ProtocolError("authz.role", f"{operator_id} has no operator role (OU)")
        return _CachedOperator(
            operator=VerifiedOperator(operator_id=operator_id, role=role, public_key=key),
            not_before=_unix(cert.not_valid_before_utc),
            not_after=_unix(cert.not_valid_after_utc),
            chain_from=max(_unix(c.not_valid_before_utc) for c in chain),
            chain_until=min(
                [_unix(c.not_valid_after_utc) for c in chain] + ([] if end is None else [end])
            ),
        )


def _tlv(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of content, end) of the DER element at ``at``."""
    tag, length = der[at], der[at + 1]
    at += 2
    if length & 0x80:
        size = length & 0x7F
        length = int.from_bytes(der[at : at + size], "big")
        at += size
    return tag, at, at + length


def _signature_bits_canonical(der: bytes) -> bool:
    """The certificate is one SEQUENCE {tbs, algorithm, BIT STRING} filling ``der`` whose
    signature BIT STRING declares no unused bits."""
    try:
        tag, start, end = _tlv(der, 0)
        if tag != 0x30 or end != len(der):
            return False
        _, _, after_tbs = _tlv(der, start)
        _, _, after_algorithm = _tlv(der, after_tbs)
        tag, bits, stop = _tlv(der, after_algorithm)
    except IndexError:
        return False
    return tag == 0x03 and stop == end and bits < stop and der[bits] == 0


def _check_now(now: object) -> None:
    if type(now) is not int or not 0 <= now <= MAX_TIME:
        raise ProtocolError("authz.decode", "now must be unix seconds (an int)")


# -- What a commit changes against what the request names -----------------------------------------


def members_match(
    verified: VerifiedAuthorization,
    adds: Sequence[tuple[str, bytes]],
    removes: Sequence[str],
) -> None:
    """Check that a commit's membership change is exactly the one ``verified`` authorizes.

    ``adds`` are (device id, 65-byte DevID public point) of the leaves the commit adds (for
    "group.create": every leaf of the new group, the creator's included); ``removes`` the device
    ids of the leaves it removes. "group.create"/"group.add": the adds are exactly the request's
    members (ids and key hashes), nothing removed. "group.remove": the removes are exactly the
    members (by id), nothing added. "device.revoke" (fleet-wide, so one group may hold only some
    of the revoked devices): removes only, at least one, all named. "device.replace" (members
    old, new): at most the new identity added (id and key hash), at most the old one removed, at
    least one of the two (the caller checks that the old one is in the group an add is for:
    ``Membership.check_commit``). Raises ``authz.members``, or
    ``authz.scope`` for an op that authorizes no membership change.
    """
    request = verified.request
    added: dict[str, bytes] = {}
    for device_id, point in adds:
        if device_id in added:
            raise ProtocolError("authz.members", f"the commit adds {device_id!r} twice")
        added[device_id] = member_key(point)
    removed = set(removes)
    if len(removed) != len(removes):
        raise ProtocolError("authz.members", "the commit removes a device twice")
    named = {m.device_id: m.key for m in request.members}
    if request.op in (OP_GROUP_CREATE, OP_GROUP_ADD):
        if removed:
            raise ProtocolError("authz.members", f"{request.op!r} authorizes no removal")
        if added != named:
            raise ProtocolError(
                "authz.members",
                f"the commit adds {sorted(added)}, the request names {sorted(named)}"
                + (" (a key differs)" if set(added) == set(named) else ""),
            )
    elif request.op == OP_GROUP_REMOVE:
        if added or removed != set(named):
            raise ProtocolError(
                "authz.members",
                f"the commit adds {sorted(added)} and removes {sorted(removed)}, "
                f"the request removes {sorted(named)}",
            )
    elif request.op == OP_DEVICE_REVOKE:
        if added or not removed or not removed <= set(named):
            raise ProtocolError(
                "authz.members",
                f"the commit adds {sorted(added)} and removes {sorted(removed)}, "
                f"the request revokes {sorted(named)}",
            )
    elif request.op == OP_DEVICE_REPLACE:
        old, new = request.members
        if (
            (not added and not removed)
            or not removed <= {old.device_id}
            or any(d != new.device_id or k != new.key for d, k in added.items())
        ):
            raise ProtocolError(
                "authz.members",
                f"the commit adds {sorted(added)} and removes {sorted(removed)}, the request "
                f"replaces {old.device_id!r} by {new.device_id!r}"
                + (" (a key differs)" if set(added) == {new.device_id} else ""),
            )
    else:
        raise ProtocolError("authz.scope", f"{request.op!r} authorizes no membership change")
