"""Who may call which operation on which group: rules from the configuration, applied to the
peer credentials the kernel reports for a Unix socket connection (SO_PEERCRED).

Deny by default: a peer matched by no rule can do nothing. A rule matches a peer when every
identity it names matches (``uid``, ``gid``, or both); it then allows its ``operations``, and for
the group-scoped operations (encrypt, decrypt) only on its ``groups`` ("*" = every group).
``gid`` is compared with the peer's primary gid as SO_PEERCRED reports it (the credentials of the
connecting process at connect time), not with supplementary groups.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from agent.protocol.errors import ProtocolError

OPERATIONS = ("encrypt", "decrypt", "sign", "seal", "unseal", "list-keys")
GROUP_SCOPED = frozenset({"encrypt", "decrypt"})
ANY = "*"


class AccessDenied(ProtocolError):
    """The caller is not allowed to do this (check id ``api.denied``)."""

    def __init__(self, reason: str) -> None:
        super().__init__("api.denied", reason)


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"uid={self.uid} gid={self.gid} pid={self.pid}"


@dataclass(frozen=True)
class AccessRule:
    uid: int | None
    gid: int | None
    operations: frozenset[str]
    groups: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.uid is None and self.gid is None:
            raise ValueError("an access rule names a uid, a gid, or both")
        unknown = self.operations - set(OPERATIONS) - {ANY}
        if unknown:
            raise ValueError(f"unknown operations in access rule: {sorted(unknown)}")

    def matches(self, peer: PeerCredentials) -> bool:
        return (self.uid is None or self.uid == peer.uid) and (
            self.gid is None or self.gid == peer.gid
        )

    def allows(self, operation: str, group: str | None) -> bool:
        if ANY not in self.operations and operation not in self.operations:
            return False
        if operation in GROUP_SCOPED:
            return group is not None and (ANY in self.groups or group in self.groups)
        return True


class AccessPolicy:
    """An ordered set of rules; any matching rule that allows the call lets it through."""

    def __init__(self, rules: Iterable[AccessRule] = ()) -> None:
        self.rules = tuple(rules)

    def __repr__(self) -> str:
        return f"AccessPolicy({len(self.rules)} rules)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AccessPolicy) and self.rules == other.rules

    def __hash__(self) -> int:
        return hash(self.rules)

    def check(self, peer: PeerCredentials, operation: str, group: str | None) -> None:
        """Return if allowed, else raise ``AccessDenied`` with a reason that names the caller and
        the call (never any data)."""
        for rule in self.rules:
            if rule.matches(peer) and rule.allows(operation, group):
                return
        where = f" on group {group!r}" if operation in GROUP_SCOPED else ""
        raise AccessDenied(f"{peer} may not {operation}{where}: no access rule allows it")
