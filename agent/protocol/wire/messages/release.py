"""The release bundle's carrier (``release.bundle``, service -> devices) and the instruction to
install a release (``release.install``, service -> device, a staged rollout's step).

The service keeps it **retained** on ``kf/v1/feed/releases`` (addressed to ``FEED_RECIPIENT``):
the outer envelope is the service's, like every service message; the ``bundle`` inside is a
COSE_Sign1 by the fleet's release-signing key (``agent.protocol.release``), which is what a
device trusts for its sealed state (docs/releases.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

from agent.protocol.errors import ProtocolError
from agent.protocol.wire.messages.base import (
    COMMAND_ID_MAX,
    COMMAND_ID_MIN,
    Body,
    Record,
    check_bool,
    check_bytes,
    check_enum,
    check_id,
    check_text,
    check_tuple,
)

MAX_BUNDLE = 192 * 1024
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

    RUNNING = "running"  # the hook runs now
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
        if (self.check is None) == (self.state is InstallState.FAILED):
            raise ProtocolError("body.bounds", "an install result has a check iff it failed")
        if self.check is not None:
            check_text(self.check, "check", min_len=1, max_len=INSTALL_CHECK_MAX)


# -- operator -> service: staged rollouts --------------------------------------------------------

WAVE_STEP = re.compile(r"[1-9][0-9]{0,5}%?")
"""A wave's cumulative size: a device count (``3``) or a percentage of the group (``25%``)."""
MAX_WAVES = 16


@dataclass(frozen=True)
class RolloutStart(Body):
    """Start a staged rollout of approved release ``version`` to the members of ``group_id``:
    ``waves`` are cumulative sizes (``"1"``, ``"5%"``, ..., the first one the canary), each
    wave must attest trusted on ``version`` and ack the group before the next starts; with
    ``rollback`` a failed wave is returned to the release it ran before."""

    TYPE: ClassVar[str] = "op.rollout.start"

    command_id: bytes
    version: str
    group_id: str
    waves: tuple[str, ...]
    rollback: bool | None = None

    def __post_init__(self) -> None:
        check_bytes(self.command_id, "command_id", min_len=COMMAND_ID_MIN, max_len=COMMAND_ID_MAX)
        check_id(self.version, "version")
        check_id(self.group_id, "group_id")
        check_tuple(self.waves, "waves", min_len=1, max_len=MAX_WAVES)
        for step in self.waves:
            if type(step) is not str or WAVE_STEP.fullmatch(step) is None:
                raise ProtocolError("body.bounds", "waves: a count or a percentage each")
            if step.endswith("%") and int(step[:-1]) > 100:
                raise ProtocolError("body.bounds", "waves: a percentage above 100")
        if self.rollback is not None:
            check_bool(self.rollback, "rollback")


@dataclass(frozen=True)
class RolloutAbort(Body):
    """Stop rollout ``rollout`` where it is (no rollback: devices keep what they run)."""

    TYPE: ClassVar[str] = "op.rollout.abort"

    command_id: bytes
    rollout: str

    def __post_init__(self) -> None:
        check_bytes(self.command_id, "command_id", min_len=COMMAND_ID_MIN, max_len=COMMAND_ID_MAX)
        check_id(self.rollout, "rollout")
