"""The release bundle's carrier (``release.bundle``, service -> devices) and the instruction to
install a release (``release.install``, service -> device, a staged rollout's step).

The service keeps it **retained** on ``kf/v1/feed/releases`` (addressed to ``FEED_RECIPIENT``):
the outer envelope is the service's, like every service message; the ``bundle`` inside is a
COSE_Sign1 by the fleet's release-signing key (``agent.protocol.release``), which is what a
device trusts for its sealed state (docs/releases.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

from agent.protocol.errors import ProtocolError
from agent.protocol.wire.messages.base import (
    Body,
    Record,
    check_bytes,
    check_enum,
    check_id,
    check_text,
)

MAX_BUNDLE = 64 * 1024
"""``agent.protocol.release.MAX_BUNDLE`` (repeated: the wire layer does not import the
release module)."""


@dataclass(frozen=True)
class ReleaseBundleMessage(Body):
    """Service -> devices: the signed bundle of approved releases' PCR policies."""

    TYPE: ClassVar[str] = "release.bundle"

    bundle: bytes

    def __post_init__(self) -> None:
        check_bytes(self.bundle, "bundle", min_len=1, max_len=MAX_BUNDLE)


INSTALL_CHECK_MAX = 64


class InstallState(StrEnum):
    """Where a device's run of its update hook for one ``release.install`` ended."""

    DONE = "done"  # the hook exited 0: the device boots the release next (or already reboots)
    FAILED = "failed"  # refused, or the hook failed: ``check`` says why


@dataclass(frozen=True)
class ReleaseInstall(Body):
    """Service -> device: install firmware release ``version`` (step ``rollout`` of a staged
    rollout). The agent runs its configured update hook (``[releases] install_command``) and
    reports the outcome in its ``keys.report`` (``InstallResult``); that the device then runs
    ``version`` the service learns from its next attestation, not from the device's word."""

    TYPE: ClassVar[str] = "release.install"

    rollout: str
    version: str

    def __post_init__(self) -> None:
        check_id(self.rollout, "rollout")
        check_id(self.version, "version")


@dataclass(frozen=True)
class InstallResult(Record):
    """The outcome of the device's latest ``release.install`` (carried by ``keys.report``):
    ``check`` names why it failed (``release.install.*``), absent when it is done."""

    ENUMS: ClassVar[Mapping[str, type[StrEnum]]] = {"state": InstallState}

    rollout: str
    version: str
    state: InstallState
    check: str | None = None

    def __post_init__(self) -> None:
        check_id(self.rollout, "rollout")
        check_id(self.version, "version")
        check_enum(self.state, "state", InstallState)
        if (self.check is None) != (self.state is InstallState.DONE):
            raise ProtocolError("body.bounds", "an install result has a check iff it failed")
        if self.check is not None:
            check_text(self.check, "check", min_len=1, max_len=INSTALL_CHECK_MAX)
