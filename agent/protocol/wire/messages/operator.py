"""Operator -> service commands (``ops/{operator}/cmd``).

The operator is the envelope's ``sender``, bound to the operator's key by the signature; bodies
do not repeat it (a second copy could only disagree). ``command_id`` is chosen by the operator
(random, 8..32 bytes) and names the command in results and in the audit log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from agent.protocol.wire.messages.base import Body, check_id, check_ids, check_text
from agent.protocol.wire.messages.service import check_command_id


@dataclass(frozen=True)
class Rekey(Body):
    """Move ``group_id`` to a fresh epoch (an update commit by an online member)."""

    TYPE: ClassVar[str] = "op.rekey"

    command_id: bytes
    group_id: str

    def __post_init__(self) -> None:
        check_command_id(self.command_id)
        check_id(self.group_id, "group_id")


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
class AttestDevice(Body):
    """Attest ``device_id`` now."""

    TYPE: ClassVar[str] = "op.attest"

    command_id: bytes
    device_id: str

    def __post_init__(self) -> None:
        check_command_id(self.command_id)
        check_id(self.device_id, "device_id")
