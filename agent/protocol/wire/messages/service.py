"""Service -> device commands (``dev/{device}/cmd``).

The service's "attest-request" is :class:`agent.protocol.wire.messages.attestation.AttestChallenge`
(``attest.challenge``), re-exported here as ``AttestRequest``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

from agent.protocol.errors import ProtocolError
from agent.protocol.wire.messages.attestation import AttestChallenge
from agent.protocol.wire.messages.base import (
    COMMAND_ID_MAX,
    COMMAND_ID_MIN,
    MAX_LIST,
    MAX_TREE_PAGE,
    MAX_TREE_PAGE_MESSAGE_SIZE,
    MAX_TREE_PAGES,
    MAX_TREE_WIDTH,
    MAX_WELCOME_ADMISSIONS,
    MAX_WELCOME_MESSAGE_SIZE,
    Body,
    check_admissions,
    check_bytes,
    check_enum,
    check_epoch,
    check_id,
    check_tuple,
    check_uint,
)

AttestRequest = AttestChallenge

# An operators' Authorization (agent.protocol.authz): a Request (up to a group's worth of member
# entries) and its approvals. Bounded before anything else of it is looked at.
MAX_AUTHZ = 512 * 1024
# The chain of signed quorum policies (each an Authorization of a policy document).
MAX_POLICIES = 16
MAX_POLICY_AUTHZ = 96 * 1024
# Members' Update proposals one commit request carries (agent.protocol.mls.messages.Update:
# about 150 bytes each); the service batches at most provisioning.service.fullrekey.BATCH.
MAX_REQUEST_UPDATES = 1024
MAX_UPDATE_BYTES = 256
# KeyPackages one multi-add commit request carries (agent.protocol.mls.messages.MAX_ADDS), each
# at most MAX_KEY_PACKAGE_BYTES; the frame limit (256 KiB) bounds them well before that.
MAX_REQUEST_ADDS = 1024
MAX_KEY_PACKAGE_BYTES = 16 * 1024


class CommitAction(StrEnum):
    CREATE = "create"
    ADD = "add"
    REMOVE = "remove"
    UPDATE = "update"


def check_command_id(value: object) -> None:
    check_bytes(value, "command_id", min_len=COMMAND_ID_MIN, max_len=COMMAND_ID_MAX)


@dataclass(frozen=True)
class CommitRequest(Body):
    """Make a commit in ``epoch`` of ``group_id``: add ``member`` (with its ``key_package``),
    remove ``member``, or update the receiver's own leaf (no member). ``create`` (epoch 0, no
    member) asks the receiver to found the group as its first member and answer with
    ``group.created``: only a member device can create a group, the service holds no secret.
    ``authz``: the operators' Authorization of the change (create, add, remove), when it came
    through dual control; the committer checks it itself and puts it into the commit.
    ``policies``: the signed quorum policies the operators adopted, oldest first (each approved
    under the one before it); the committer verifies the chain and judges the change under the
    newest, and passes the chain on in the commit so every member judges it the same way.
    ``updates`` (action ``update`` only): other members' Update proposals
    (``group.update_proposal``, each an encoded ``agent.protocol.mls.messages.Update``) the
    receiver commits together with its own self-update (``keyfleet rekey --full``).
    ``key_packages`` (action ``add`` without ``member`` and ``key_package``): add all these
    members in one commit (one Welcome for all of them), each an encoded KeyPackage."""

    TYPE: ClassVar[str] = "svc.commit_request"
    ENUMS: ClassVar = {"action": CommitAction}

    command_id: bytes
    group_id: str
    epoch: int
    action: CommitAction
    member: str | None = None
    key_package: bytes | None = None
    authz: bytes | None = None
    policies: tuple[bytes, ...] = ()
    updates: tuple[bytes, ...] | None = None
    key_packages: tuple[bytes, ...] | None = None

    def __post_init__(self) -> None:
        check_command_id(self.command_id)
        check_id(self.group_id, "group_id")
        check_epoch(self.epoch)
        check_enum(self.action, "action", CommitAction)
        if self.key_packages is not None:
            check_tuple(self.key_packages, "key_packages", max_len=MAX_REQUEST_ADDS)
            if (
                not self.key_packages
                or self.action is not CommitAction.ADD
                or self.member is not None
                or self.key_package is not None
            ):
                raise ProtocolError(
                    "body.malformed",
                    "key_packages: only a non-empty list, only with action add and no member",
                )
            for key_package in self.key_packages:
                check_bytes(key_package, "key_packages[]", min_len=1, max_len=MAX_KEY_PACKAGE_BYTES)
        if self.updates is not None:
            check_tuple(self.updates, "updates", max_len=MAX_REQUEST_UPDATES)
            if not self.updates or self.action is not CommitAction.UPDATE:
                raise ProtocolError(
                    "body.malformed", "updates: only a non-empty list, only with action update"
                )
            for update in self.updates:
                check_bytes(update, "updates[]", min_len=1, max_len=MAX_UPDATE_BYTES)
        if self.authz is not None:
            check_bytes(self.authz, "authz", min_len=1, max_len=MAX_AUTHZ)
        check_tuple(self.policies, "policies", max_len=MAX_POLICIES)
        for policy in self.policies:
            check_bytes(policy, "policies[]", min_len=1, max_len=MAX_POLICY_AUTHZ)
        if self.action in (CommitAction.UPDATE, CommitAction.CREATE):
            if self.member is not None or self.key_package is not None:
                raise ProtocolError("body.malformed", f"{self.action} names no member")
            if self.action is CommitAction.CREATE and self.epoch != 0:
                raise ProtocolError("body.malformed", "a group is created at epoch 0")
            return
        if self.key_packages is not None:
            return  # a multi-add, checked above
        if self.member is None:
            raise ProtocolError("body.malformed", f"{self.action} needs a member")
        check_id(self.member, "member")
        if self.action is CommitAction.ADD:
            if self.key_package is None:
                raise ProtocolError("body.malformed", "add needs the member's key package")
            check_bytes(self.key_package, "key_package", min_len=1)
        elif self.key_package is not None:
            raise ProtocolError("body.malformed", "remove carries no key package")

    def group_epoch(self) -> tuple[str, int]:
        return (self.group_id, self.epoch)


@dataclass(frozen=True)
class UpdateProposalRequest(Body):
    """Propose a new leaf key for ``group_id`` at ``epoch``: answer with a
    ``group.update_proposal`` (a new TPM leaf key, its Update signed with the DevID key) that
    another member will commit (``keyfleet rekey --full``)."""

    TYPE: ClassVar[str] = "svc.update_proposal_request"

    command_id: bytes
    group_id: str
    epoch: int

    def __post_init__(self) -> None:
        check_command_id(self.command_id)
        check_id(self.group_id, "group_id")
        check_epoch(self.epoch)

    def group_epoch(self) -> tuple[str, int]:
        return (self.group_id, self.epoch)


@dataclass(frozen=True)
class ReportRequest(Body):
    """Send a ``keys.report`` now."""

    TYPE: ClassVar[str] = "svc.report_request"

    command_id: bytes

    def __post_init__(self) -> None:
        check_command_id(self.command_id)


@dataclass(frozen=True)
class KeyPackageRequest(Body):
    """Send a fresh ``group.key_package`` (a new TPM leaf key) so that a committer can add the
    receiver to a group."""

    TYPE: ClassVar[str] = "svc.key_package_request"

    command_id: bytes

    def __post_init__(self) -> None:
        check_command_id(self.command_id)


@dataclass(frozen=True)
class WelcomeDelivery(Body):
    """The welcome a committer made for the receiver: join ``group_id`` at ``epoch``. When
    its GroupInfo carries the tree (at most 256 leaves), ``admissions`` carries the operators'
    Authorization of every member's admission, each distinct one once, the receiver's own
    included (docs/authorization.md); the joiner takes each by the hash a leaf records, so the
    service that attaches them is not trusted with them. A larger tree's Authorizations come
    with its pages (``svc.tree_page``), as do those of an inline tree the service could not fit
    here (then ``admissions`` is empty and the joiner fetches the pages).
    ``docs/treekem.md``, "Admissions delivered by the service"."""

    TYPE: ClassVar[str] = "svc.welcome"
    MAX_MESSAGE_SIZE: ClassVar[int] = MAX_WELCOME_MESSAGE_SIZE

    group_id: str
    epoch: int
    welcome: bytes
    admissions: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        check_id(self.group_id, "group_id")
        check_epoch(self.epoch)
        check_bytes(self.welcome, "welcome", min_len=1, max_len=MAX_WELCOME_MESSAGE_SIZE)
        check_admissions(
            self.admissions,
            "admissions",
            max_items=MAX_WELCOME_ADMISSIONS,
            max_total=MAX_WELCOME_MESSAGE_SIZE,
        )

    def group_epoch(self) -> tuple[str, int]:
        return (self.group_id, self.epoch)


@dataclass(frozen=True)
class TreePage(Body):
    """Service -> joiner, answering a ``group.tree_request``: page ``page`` of ``pages`` of the
    public tree of ``group_id`` at ``epoch`` (``width`` nodes): nodes ``[start, start + n)`` as
    the encoded CBOR array ``nodes`` of their encodings (agent.protocol.mls.treepages), and
    ``admissions``: the operators' Authorizations that leaves of this page name and no earlier
    page carried (nodes and Authorizations together at most ``MAX_TREE_PAGE`` bytes). The
    joiner trusts none of it: it accepts the tree only if its hash is the signed GroupInfo's,
    and an Authorization only by the admission hash a leaf records.
    Not a group message (no ``group_epoch``): the joiner does not hold the group yet."""

    TYPE: ClassVar[str] = "svc.tree_page"
    MAX_MESSAGE_SIZE: ClassVar[int] = MAX_TREE_PAGE_MESSAGE_SIZE

    group_id: str
    epoch: int
    page: int
    pages: int
    width: int
    start: int
    nodes: bytes
    admissions: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        check_id(self.group_id, "group_id")
        check_epoch(self.epoch)
        check_uint(self.pages, "pages", minimum=1, maximum=MAX_TREE_PAGES)
        check_uint(self.page, "page", maximum=self.pages - 1)
        check_uint(self.width, "width", minimum=1, maximum=MAX_TREE_WIDTH)
        check_uint(self.start, "start", maximum=self.width - 1)
        check_bytes(self.nodes, "nodes", min_len=1, max_len=MAX_TREE_PAGE)
        check_admissions(
            self.admissions,
            "admissions",
            max_items=MAX_LIST,
            max_total=MAX_TREE_PAGE - len(self.nodes),
        )
