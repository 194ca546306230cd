"""Operator -> service commands (``ops/{operator}/cmd``).

The operator is the envelope's ``sender``, bound to the operator's key by the signature; bodies
do not repeat it (a second copy could only disagree). ``command_id`` is chosen by the operator
(random, 8..32 bytes) and names the command in results and in the audit log.

Dual control (docs/operations.md, "Dual control"): ``op.propose`` asks the service to build a
Request (``agent.protocol.authz``) for a membership change or a new quorum policy; the service
fills in the members' DevID key hashes from the registry and answers with the Request unsigned
(``op.requests``), so the proposer signs only bytes it decoded and showed. ``op.approve``
carries one operator's Approval of a request; ``op.list_requests`` asks for the open requests.

Audit checkpoints (docs/operations.md, "Audit checkpoints"): ``op.audit_sync`` asks for a signed
checkpoint of the audit log and the entries after ``after`` up to it, answered with
``op.audit_checkpoint``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from agent.protocol.errors import ProtocolError
from agent.protocol.wire.messages.base import (
    Body,
    check_bool,
    check_bytes,
    check_choice,
    check_id,
    check_ids,
    check_text,
    check_uint,
)
from agent.protocol.wire.messages.service import check_command_id

REQUEST_ID_SIZE = 16
# An Approval is one operator certificate and one signature: a few hundred bytes.
MAX_APPROVAL = 16 * 1024
MAX_POLICY = 64 * 1024
# What a request may ask for (agent.protocol.authz op names); the members each op names.
PROPOSABLE_OPS = frozenset(
    {
        "group.create",
        "group.add",
        "group.remove",
        "group.delete",
        "device.revoke",
        "device.replace",
        "device.reenroll",
        "policy",
        "release.approve",
        "release.revoke",
        "operator.add",
        "operator.remove",
        "operator.role",
        "trust.rotate",
    }
)
# The longest overlap a trust.rotate may give the old service signing key (a year).
MAX_OVERLAP = 366 * 86400
ROTATE_DEVICE_CA = "device-ca"
ROTATE_BROKER_CA = "broker-ca"
ROTATE_OPERATOR_CA = "operator-ca"
ROTATE_TARGETS = frozenset({ROTATE_DEVICE_CA, ROTATE_BROKER_CA, ROTATE_OPERATOR_CA})
KEYLESS_ROTATE_TARGETS = frozenset({ROTATE_BROKER_CA, ROTATE_OPERATOR_CA})
"""Rollovers of a CA whose key the service never uses (the broker's PKI keeps the broker CA's,
the operator CA is offline): the proposal names no key."""
"""What a ``trust.rotate`` may roll over besides the service signing key (``Propose.rotate``)."""
# The ops that name one firmware release (``release``) and nothing else.
RELEASE_OPS = frozenset({"release.approve", "release.revoke"})
# The ops that name one operator (``operator``) and nothing but its certificate or role.
OPERATOR_OPS = frozenset({"operator.add", "operator.remove", "operator.role"})
# An operator certificate (DER) travelling with an ``operator.add`` proposal is at most this large.
MAX_OPERATOR_CERT = 8 * 1024
# The ops whose members a tag may stand for (``Propose.tag``).
TAG_OPS = frozenset({"group.create", "group.add"})
# The ops that name one device and no group.
DEVICE_ONLY_OPS = frozenset({"device.revoke", "device.reenroll", "device.replace"})


TAG_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")
"""A device tag (``keyfleet device tag``, ``group create --all-in``): 1 to 32 characters of
lowercase letters, digits, ``.``, ``_`` and ``-``, starting with a letter or a digit."""
MAX_TAGS = 16
"""The most tags one device holds, and the most one ``op.device_tag`` adds or removes."""


def check_tag(value: object, name: str = "tag") -> None:
    """Raises ``tag.invalid`` unless ``value`` is a tag (``TAG_PATTERN``)."""
    if type(value) is not str:
        raise ProtocolError("body.type", f"{name} must be a text string")
    if TAG_PATTERN.fullmatch(value) is None:
        raise ProtocolError(
            "tag.invalid",
            f"{name} {value[:40]!r} is not a tag: 1 to 32 of a-z 0-9 . _ -, "
            "starting with a letter or digit",
        )


def check_tags(value: object, name: str) -> None:
    if not isinstance(value, tuple):
        raise ProtocolError("body.type", f"{name} must be an array")
    if len(value) > MAX_TAGS:
        raise ProtocolError("body.bounds", f"{name} holds more than {MAX_TAGS} tags")
    for item in value:
        check_tag(item, f"{name}[]")
    if len(set(value)) != len(value):
        raise ProtocolError("body.bounds", f"{name} holds duplicates")


def check_request_id(value: object) -> None:
    check_bytes(value, "request_id", min_len=REQUEST_ID_SIZE, max_len=REQUEST_ID_SIZE)


@dataclass(frozen=True)
class Rekey(Body):
    """Move ``group_id`` to a fresh epoch (an update commit by an online member); ``full``:
    every member updates its own leaf, one solicited commit each."""

    TYPE: ClassVar[str] = "op.rekey"

    command_id: bytes
    group_id: str
    full: bool | None = None

    def __post_init__(self) -> None:
        check_command_id(self.command_id)
        check_id(self.group_id, "group_id")
        if self.full is not None:
            check_bool(self.full, "full")


# The largest rekey policy bounds (a year; a million epochs).
MAX_REKEY_AGE = 366 * 86_400
MAX_REKEY_EPOCHS = 1_000_000


@dataclass(frozen=True)
class GroupPolicy(Body):
    """Set ``group_id``'s rekey policy: every member updates its own leaf at least every
    ``max_age`` seconds and at most ``max_epochs`` epochs after its last update (0: no bound)."""

    TYPE: ClassVar[str] = "op.group_policy"

    command_id: bytes
    group_id: str
    max_age: int
    max_epochs: int

    def __post_init__(self) -> None:
        check_command_id(self.command_id)
        check_id(self.group_id, "group_id")
        check_uint(self.max_age, "max_age", maximum=MAX_REKEY_AGE)
        check_uint(self.max_epochs, "max_epochs", maximum=MAX_REKEY_EPOCHS)


@dataclass(frozen=True)
class Revoke(Body):
    """Revoke ``device_id``: remove it from all its groups and refuse its keys from now on."""

    TYPE: ClassVar[str] = "op.revoke"

    command_id: bytes
    device_id: str
    reason: str | None = None

    def __post_init__(self) -> None:
        check_command_id(self.command_id)
        check_id(self.device_id, "device_id")
        if self.reason is not None:
            check_text(self.reason, "reason", min_len=1)


@dataclass(frozen=True)
class GroupCreate(Body):
    """Create ``group_id`` with these members."""

    TYPE: ClassVar[str] = "op.group_create"

    command_id: bytes
    group_id: str
    members: tuple[str, ...]

    def __post_init__(self) -> None:
        check_command_id(self.command_id)
        check_id(self.group_id, "group_id")
        check_ids(self.members, "members", min_len=1)


@dataclass(frozen=True)
class GroupAdd(Body):
    """Add ``device_id`` to ``group_id``."""

    TYPE: ClassVar[str] = "op.group_add"

    command_id: bytes
    group_id: str
    device_id: str

    def __post_init__(self) -> None:
        check_command_id(self.command_id)
        check_id(self.group_id, "group_id")
        check_id(self.device_id, "device_id")


@dataclass(frozen=True)
class TagDevice(Body):
    """Add the tags ``add`` to ``device_id`` and take ``remove`` off it (either may be empty,
    not both; no tag in both). Tags only select devices for a later group request, which names
    the devices themselves and goes through dual control, so this is a plain operator command."""

    TYPE: ClassVar[str] = "op.device_tag"

    command_id: bytes
    device_id: str
    add: tuple[str, ...]
    remove: tuple[str, ...]

    def __post_init__(self) -> None:
        check_command_id(self.command_id)
        check_id(self.device_id, "device_id")
        check_tags(self.add, "add")
        check_tags(self.remove, "remove")
        if not self.add and not self.remove:
            raise ProtocolError("body.malformed", "a device tag command adds or removes a tag")
        if set(self.add) & set(self.remove):
            raise ProtocolError("body.malformed", "a tag is both added and removed")


@dataclass(frozen=True)
class AttestDevice(Body):
    """Attest ``device_id`` now."""

    TYPE: ClassVar[str] = "op.attest"

    command_id: bytes
    device_id: str

    def __post_init__(self) -> None:
        check_command_id(self.command_id)
        check_id(self.device_id, "device_id")


@dataclass(frozen=True)
class Propose(Body):
    """Ask the service for a Request of ``op``: ``group.create`` (``group_id``, ``members`` the
    founders, first first), ``group.add`` (``group_id``, the devices to add by one commit),
    ``group.remove`` (``group_id``, one member), ``group.delete`` (``group_id``, no members:
    the group's keys are destroyed on every member, its id never used again),
    ``device.revoke`` (the devices to revoke, no group; ``reason`` the text recorded with the
    revocation),
    ``device.replace`` (two members, the old device then its replacement, no group; ``reason``
    as for a revocation),
    ``device.reenroll`` (one revoked member, no group: its TPM may enroll once more) or
    ``policy`` (``policy``: the new QuorumPolicy's bytes, nothing else) or ``release.approve`` /
    ``release.revoke`` (``release``: the release version, nothing else). The answer is the
    Request, unsigned; the proposer approves it with ``op.approve`` after checking it (the
    Request's bytes are the service's, with its random id, times and the members' key hashes,
    so no approval can travel with the proposal)."""

    TYPE: ClassVar[str] = "op.propose"

    command_id: bytes
    op: str
    members: tuple[str, ...]
    group_id: str | None = None
    policy: bytes | None = None
    reason: str | None = None
    release: str | None = None
    # operator.add / operator.remove / operator.role: the operator's id; with operator.add its
    # certificate (DER, the one the request's subject binds), with operator.role the new role.
    operator: str | None = None
    cert: bytes | None = None
    role: str | None = None
    # trust.rotate (with ``cert``: the new service signing certificate, DER): the key reference
    # the service loads the new key from (``pkcs11:`` URI or a file on the service host) and
    # the seconds the old key stays accepted after the request's window closes
    key_ref: str | None = None
    overlap: int | None = None
    # trust.rotate: what rolls over; None the service signing key, ``device-ca`` the device CA
    # (``cert`` its CA certificate, ``key_ref`` the CA's key), ``broker-ca`` the CA of the
    # broker's TLS certificate, ``operator-ca`` the operator CA (``cert`` the new CA's
    # certificate, no ``key_ref``)
    rotate: str | None = None
    # group.create / group.add with no members: the service names the devices tagged so (those
    # that may join; for an add, those not in the group yet) in the Request it builds
    tag: str | None = None

    def __post_init__(self) -> None:
        check_command_id(self.command_id)
        check_choice(self.op, "op", PROPOSABLE_OPS)
        check_ids(self.members, "members")  # a tuple of ids for every op, empty where none
        if self.tag is not None:
            check_tag(self.tag)
            if self.op not in TAG_OPS or self.members:
                raise ProtocolError(
                    "body.malformed", "a tag stands for the members of a group create or add"
                )
        if self.op == "trust.rotate":
            check_bytes(self.cert, "cert", min_len=1, max_len=MAX_OPERATOR_CERT)
            check_uint(self.overlap, "overlap", maximum=MAX_OVERLAP)
            if self.rotate is not None:
                check_choice(self.rotate, "rotate", ROTATE_TARGETS)
            if self.rotate in KEYLESS_ROTATE_TARGETS:
                # the broker CA's key stays with the broker's PKI, the operator CA's offline:
                # the service never uses them
                if self.key_ref is not None:
                    raise ProtocolError("body.malformed", f"a {self.rotate} rollover names no key")
            else:
                check_text(self.key_ref, "key_ref", min_len=1, max_len=1024)
            named = (self.group_id, self.policy, self.reason, self.release, self.operator)
            if self.members or any(v is not None for v in named) or self.role is not None:
                raise ProtocolError(
                    "body.malformed", "trust.rotate names only the new certificate and key"
                )
            return
        if self.key_ref is not None or self.overlap is not None or self.rotate is not None:
            raise ProtocolError("body.malformed", f"{self.op} names no service signing key")
        if self.op in OPERATOR_OPS:
            check_id(self.operator, "operator")
            if self.members or self.group_id is not None or self.policy or self.reason:
                raise ProtocolError("body.malformed", f"{self.op} names only the operator")
            if self.release is not None:
                raise ProtocolError("body.malformed", f"{self.op} names no release")
            if (self.cert is not None) != (self.op == "operator.add"):
                raise ProtocolError("body.malformed", "only operator.add carries a certificate")
            if self.cert is not None:
                check_bytes(self.cert, "cert", min_len=1, max_len=MAX_OPERATOR_CERT)
            if (self.role is not None) != (self.op == "operator.role"):
                raise ProtocolError("body.malformed", "only operator.role carries a role")
            if self.role is not None:
                check_choice(self.role, "role", ("viewer", "operator", "admin"))
            return
        if self.operator is not None or self.cert is not None or self.role is not None:
            raise ProtocolError("body.malformed", f"{self.op} names no operator")
        if self.op in RELEASE_OPS:
            check_text(self.release, "release", min_len=1, max_len=64)
            if self.members or self.group_id is not None or self.policy or self.reason:
                raise ProtocolError("body.malformed", f"{self.op} names only the release")
            return
        if self.release is not None:
            raise ProtocolError("body.malformed", f"{self.op} names no release")
        if self.reason is not None:
            check_text(self.reason, "reason", min_len=1)
            if self.op not in ("device.revoke", "device.replace"):
                raise ProtocolError("body.malformed", "only a revocation carries a reason")
        if self.group_id is not None:
            check_id(self.group_id, "group_id")
        if self.policy is not None:
            check_bytes(self.policy, "policy", min_len=1, max_len=MAX_POLICY)
        if self.op == "policy":
            if self.policy is None or self.members or self.group_id is not None:
                raise ProtocolError("body.malformed", "a policy request carries only the policy")
            return
        if self.policy is not None:
            raise ProtocolError("body.malformed", f"{self.op} carries no policy")
        if (self.group_id is None) != (self.op in DEVICE_ONLY_OPS):
            raise ProtocolError("body.malformed", f"{self.op}: group_id is wrong for the op")
        if self.op in ("group.create", "group.add", "device.revoke"):
            if not self.members and self.tag is None:
                raise ProtocolError("body.malformed", f"{self.op} needs its members")
        elif self.op == "group.delete":
            if self.members:
                raise ProtocolError("body.malformed", "group.delete names no members")
        elif self.op == "device.replace":
            if len(self.members) != 2:
                raise ProtocolError("body.malformed", "device.replace names the old, then the new")
        elif len(self.members) != 1:
            raise ProtocolError("body.malformed", f"{self.op} names exactly one member")


# A release manifest (JSON, provisioning.releases) is at most this large.
MAX_MANIFEST = 64 * 1024


@dataclass(frozen=True)
class ReleaseAdd(Body):
    """Propose a firmware release from its ``manifest`` (JSON bytes: version and components,
    docs/operations.md "Releases"). The service validates it and keeps it proposed; only a
    ``release.approve`` request that meets the quorum makes the fleet trust it."""

    TYPE: ClassVar[str] = "op.release_add"

    command_id: bytes
    manifest: bytes

    def __post_init__(self) -> None:
        check_command_id(self.command_id)
        check_bytes(self.manifest, "manifest", min_len=1, max_len=MAX_MANIFEST)


@dataclass(frozen=True)
class Approve(Body):
    """The sender's ``approval`` (Approval bytes, ``agent.protocol.authz``) of request
    ``request_id``."""

    TYPE: ClassVar[str] = "op.approve"

    command_id: bytes
    request_id: bytes
    approval: bytes

    def __post_init__(self) -> None:
        check_command_id(self.command_id)
        check_request_id(self.request_id)
        check_bytes(self.approval, "approval", min_len=1, max_len=MAX_APPROVAL)


@dataclass(frozen=True)
class ListRequests(Body):
    """The open requests (pending ones), or only ``request_id`` in whatever state it is."""

    TYPE: ClassVar[str] = "op.list_requests"

    command_id: bytes
    request_id: bytes | None = None

    def __post_init__(self) -> None:
        check_command_id(self.command_id)
        if self.request_id is not None:
            check_request_id(self.request_id)


@dataclass(frozen=True)
class AuditSync(Body):
    """The audit checkpoint at ``count`` (absent: the newest, made now if the log moved since the
    last one) and the entries ``after + 1`` onwards up to it, as many as fit one answer."""

    TYPE: ClassVar[str] = "op.audit_sync"

    command_id: bytes
    after: int
    count: int | None = None

    def __post_init__(self) -> None:
        check_command_id(self.command_id)
        check_uint(self.after, "after")
        if self.count is not None:
            check_uint(self.count, "count", minimum=1)
            if self.count < self.after:
                raise ProtocolError("body.bounds", "count is before after")
