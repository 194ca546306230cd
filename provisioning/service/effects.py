"""Effects as data: what a flow that ran in a transaction wants done once that transaction has
committed (messages to send, follow-ups such as "start the group's next job", log lines and
metrics). ``provisioning.service.execute.run`` executes them, in order.

A flow never acts after its own commit through a closure: it returns these values, so what it
decided is visible to tests as data, and a rolled-back transaction leaves nothing behind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from agent.protocol.wire.messages.base import Body
from provisioning.attestation import AttestationVerdict
from provisioning.service.model import AttestOperation, Job, Operation


@dataclass(frozen=True)
class Send:
    """Sign and publish ``body`` to ``to`` on ``topic``."""

    topic: str
    body: Body
    to: str


@dataclass(frozen=True)
class TrustRolled:
    """A trust bundle was added (``trustroll.execute``): once this call's messages are signed
    with the key it began with, sign with the new one and publish the chain again."""


@dataclass(frozen=True)
class Log:
    level: int
    message: str
    args: tuple[object, ...] = ()


@dataclass(frozen=True)
class Count:
    """Increment one of the service's counters (``ServiceMetrics``) for ``label``."""

    counter: Literal["reports", "commands", "commits", "attestations", "challenges"]
    label: str


@dataclass(frozen=True)
class AckLatency:
    """Observe the time from a commit's acceptance (``accepted_ms``) to an ack of it, now."""

    accepted_ms: int


@dataclass(frozen=True)
class StartNext:
    """Move the group's head job forward if it is queued or waiting."""

    group_id: str


@dataclass(frozen=True)
class Touch:
    """The job's operation made progress now."""

    job: Job


@dataclass(frozen=True)
class JobEnded:
    """The job ended: its operation's progress, the group's next job."""

    job: Job


@dataclass(frozen=True)
class AskAgain:
    """A commit request's epoch was taken by another commit: ask for ``job`` at the new one."""

    job: Job


@dataclass(frozen=True)
class GroupChanged:
    """The group's epoch or acks moved: progress of its operations, its next job."""

    group_id: str


@dataclass(frozen=True)
class CancelAddsOf:
    """Cancel every queued add of the device (it is leaving the fleet or its groups)."""

    device_id: str


@dataclass(frozen=True)
class AcceptHeld:
    """A commit or welcome half was held: accept the pair if both halves are now held."""

    group_id: str
    epoch: int
    sender: str


@dataclass(frozen=True)
class Accepted:
    """Tell the operator the command was accepted."""

    operation: Operation
    detail: str


@dataclass(frozen=True)
class Progress:
    """Report the progress of the operation ``command_id`` (if it is still unfinished)."""

    command_id: bytes = field(repr=False)


@dataclass(frozen=True)
class AttestVerdict:
    """Tell the operator who asked (``waiting``) the verdict and what it changed."""

    waiting: AttestOperation
    verdict: AttestationVerdict
    change: str


@dataclass(frozen=True)
class WriteCrl:
    """A device was revoked: write the newest device CA CRL for the broker."""


Effect = (
    Send
    | Log
    | Count
    | AckLatency
    | StartNext
    | Touch
    | JobEnded
    | AskAgain
    | GroupChanged
    | CancelAddsOf
    | AcceptHeld
    | Accepted
    | Progress
    | AttestVerdict
    | WriteCrl
    | TrustRolled
)
Effects = list[Effect]
