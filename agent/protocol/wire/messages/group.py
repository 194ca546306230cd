"""Group handshake messages: key package, commit, welcome.

The MLS-layer structures (agent/protocol/mls/) travel as opaque bytes, encoded by that layer; only
the group id and the epoch are in the clear, so that the delivery service can order commits (one per
epoch, the first valid wins) and receivers can refuse rolled-back epochs without decrypting.
``epoch`` is always the epoch the sender was in when it made the message: a commit made in epoch
``e`` moves the group to ``e + 1``; a welcome's epoch is the epoch the joiner enters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from agent.protocol.errors import ProtocolError
from agent.protocol.wire.messages.base import (
    COMMAND_ID_MAX,
    COMMAND_ID_MIN,
    MAX_AUTHORIZATION,
    MAX_LIST,
    MAX_TREE_PAGES,
    MAX_WELCOME_MESSAGE_SIZE,
    Body,
    check_admissions,
    check_bytes,
    check_choice,
    check_epoch,
    check_id,
    check_ids,
    check_uint,
)

UPDATE_REASONS = frozenset(
    {"max-epoch-age", "max-messages-per-epoch", "first-update-after-join", "credential-renewed"}
)
REFUSAL_CHECKS = frozenset(
    {"mls.path.decrypt", "mls.path.mismatch", "mls.confirmation-tag", "mls.update.unknown-key"}
)
"""What a member reports of an accepted commit it cannot process (``CommitRefused``): the
commit's private part is wrong, which no public check sees."""
COMMIT_HASH_SIZE = 32


@dataclass(frozen=True)
class KeyPackageMessage(Body):
    """Device -> service: a key package (leaf public key in the TPM, signed by the device) that
    lets a committer add the device to a group."""

    TYPE: ClassVar[str] = "group.key_package"

    key_package: bytes
    command_id: bytes | None = None

    def __post_init__(self) -> None:
        check_bytes(self.key_package, "key_package", min_len=1)
        if self.command_id is not None:
            check_bytes(
                self.command_id, "command_id", min_len=COMMAND_ID_MIN, max_len=COMMAND_ID_MAX
            )


@dataclass(frozen=True)
class GroupCreated(Body):
    """Founder -> service: the group exists at epoch 0 with the sender as its only member;
    ``public_group`` is the public view (agent.protocol.mls.public.PublicGroup state) the delivery
    service keeps to check every later commit; ``authz`` the Authorization the founder's leaf
    records as its admission (the operators' creation Authorization with the policy chain it
    was judged under), which the service keeps to deliver to joiners."""

    TYPE: ClassVar[str] = "group.created"

    group_id: str
    public_group: bytes
    command_id: bytes
    authz: bytes | None = None

    def __post_init__(self) -> None:
        check_id(self.group_id, "group_id")
        check_bytes(self.public_group, "public_group", min_len=1)
        check_bytes(self.command_id, "command_id", min_len=COMMAND_ID_MIN, max_len=COMMAND_ID_MAX)
        if self.authz is not None:
            check_bytes(self.authz, "authz", min_len=1, max_len=MAX_AUTHORIZATION)


MAX_HANDOFF_BYTES = 192 << 10
"""Authorizations one ``group.admissions`` carries in all (its frame is 256 KiB)."""


@dataclass(frozen=True)
class GroupAdmissions(Body):
    """Member -> service, once after an upgrade: the operators' Authorizations its saved group
    state still held (a version-2 state; members keep none since) for a group the service may
    have kept none of. The service keeps those whose hash a leaf of the group's current tree
    records, and ignores the rest; content-addressed, so the sender is not trusted with them
    (docs/treekem.md, "Admissions delivered by the service"). Sent in parts of at most
    ``MAX_HANDOFF_BYTES``."""

    TYPE: ClassVar[str] = "group.admissions"

    group_id: str
    admissions: tuple[bytes, ...]

    def __post_init__(self) -> None:
        check_id(self.group_id, "group_id")
        check_admissions(
            self.admissions, "admissions", max_items=MAX_LIST, max_total=MAX_HANDOFF_BYTES
        )
        if not self.admissions:
            raise ProtocolError("body.bounds", "admissions must hold at least one")


@dataclass(frozen=True)
class CommitMessage(Body):
    """Committer -> service -> members (``grp/{group}/commit``): a commit made in ``epoch``.
    ``command_id`` names the service's commit request it answers, when there was one."""

    TYPE: ClassVar[str] = "group.commit"

    group_id: str
    epoch: int
    commit: bytes
    command_id: bytes | None = None

    def __post_init__(self) -> None:
        check_id(self.group_id, "group_id")
        check_epoch(self.epoch)
        check_bytes(self.commit, "commit", min_len=1)
        if self.command_id is not None:
            check_bytes(
                self.command_id, "command_id", min_len=COMMAND_ID_MIN, max_len=COMMAND_ID_MAX
            )

    def group_epoch(self) -> tuple[str, int]:
        return (self.group_id, self.epoch)


@dataclass(frozen=True)
class WelcomeMessage(Body):
    """Committer -> service: the welcome for the devices its commit added, entering ``epoch``.
    The service forwards it to each new member as ``svc.welcome``."""

    TYPE: ClassVar[str] = "group.welcome"
    MAX_MESSAGE_SIZE: ClassVar[int] = MAX_WELCOME_MESSAGE_SIZE

    group_id: str
    epoch: int
    welcome: bytes
    new_members: tuple[str, ...]

    def __post_init__(self) -> None:
        check_id(self.group_id, "group_id")
        check_epoch(self.epoch)
        check_bytes(self.welcome, "welcome", min_len=1, max_len=MAX_WELCOME_MESSAGE_SIZE)
        check_ids(self.new_members, "new_members", min_len=1)

    def group_epoch(self) -> tuple[str, int]:
        return (self.group_id, self.epoch)


@dataclass(frozen=True)
class UpdateRequest(Body):
    """Member -> service: this member's current epoch of ``group_id`` reached its rotation limit
    (``reason``: ``max-epoch-age`` or ``max-messages-per-epoch``,
    agent.protocol.lifecycle.RotationReason), or it still holds the leaf key it joined with
    (``first-update-after-join``, agent.protocol.initkeys);
    please send it a ``svc.commit_request`` with action ``update`` (a self-update with a new TPM
    leaf key). Asking rather than committing keeps the service the only orderer of commits."""

    TYPE: ClassVar[str] = "group.update_request"

    group_id: str
    epoch: int
    reason: str

    def __post_init__(self) -> None:
        check_id(self.group_id, "group_id")
        check_epoch(self.epoch)
        check_choice(self.reason, "reason", UPDATE_REASONS)

    def group_epoch(self) -> tuple[str, int]:
        return (self.group_id, self.epoch)


MAX_UPDATE_BYTES = 256


@dataclass(frozen=True)
class UpdateProposal(Body):
    """Member -> service, answering ``svc.update_proposal_request`` ``command_id``: this
    member's Update for ``group_id`` at ``epoch`` (an encoded
    ``agent.protocol.mls.messages.Update``: its leaf index, a new leaf key from its TPM, the
    leaf signature by its DevID key). The service checks the signature against the group's
    public tree and hands the Update to the member it asks to commit the batch."""

    TYPE: ClassVar[str] = "group.update_proposal"

    command_id: bytes
    group_id: str
    epoch: int
    update: bytes

    def __post_init__(self) -> None:
        check_bytes(self.command_id, "command_id", min_len=COMMAND_ID_MIN, max_len=COMMAND_ID_MAX)
        check_id(self.group_id, "group_id")
        check_epoch(self.epoch)
        check_bytes(self.update, "update", min_len=1, max_len=MAX_UPDATE_BYTES)

    def group_epoch(self) -> tuple[str, int]:
        return (self.group_id, self.epoch)


@dataclass(frozen=True)
class CommitRefused(Body):
    """Member -> service: the commit the service accepted in ``epoch`` of ``group_id`` (named by
    ``commit_hash``, SHA-256 of its bytes) fails ``check`` for this member, which stays at
    ``epoch``. The service counts such reports (provisioning/service/recovery.py) and rolls the
    group back when enough members cannot process the commit."""

    TYPE: ClassVar[str] = "group.commit_refused"

    group_id: str
    epoch: int
    commit_hash: bytes
    check: str

    def __post_init__(self) -> None:
        check_id(self.group_id, "group_id")
        check_epoch(self.epoch)
        check_bytes(
            self.commit_hash, "commit_hash", min_len=COMMIT_HASH_SIZE, max_len=COMMIT_HASH_SIZE
        )
        check_choice(self.check, "check", REFUSAL_CHECKS)

    def group_epoch(self) -> tuple[str, int]:
        return (self.group_id, self.epoch)


@dataclass(frozen=True)
class TreeRequest(Body):
    """Joiner -> service: page ``page`` of the public tree of ``group_id`` at ``epoch``, for a
    Welcome whose GroupInfo references the tree by its hash only (docs/treekem.md, "Joining a
    large group"). Answered with a ``svc.tree_page``, or refused (``ds.tree.*``). Not a group
    message (the joiner does not hold the group yet): no ``group_epoch``."""

    TYPE: ClassVar[str] = "group.tree_request"

    group_id: str
    epoch: int
    page: int

    def __post_init__(self) -> None:
        check_id(self.group_id, "group_id")
        check_epoch(self.epoch)
        check_uint(self.page, "page", maximum=MAX_TREE_PAGES - 1)
