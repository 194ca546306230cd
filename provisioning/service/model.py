"""The delivery service's values: its settings, the publishes it returns, and the snapshots of
its shared rows (a group's jobs, an operator's operation, an ``op.attest`` waiting for its
report). Plain data: the rows themselves are in ``provisioning.db.runtime`` and only
``provisioning.service.store`` reads and writes them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from agent.protocol.wire.messages.service import CommitAction
from provisioning.policy import GoldenPolicy
from provisioning.registry import DeviceState

# Largest public group state a device sends with the group it created (epoch 0, one member);
# stored groups have no such bound (their trees are stored node by node, ``store.trees``).
MAX_PUBLIC_GROUP: Final = 1 << 20
# Devices that may be members of a group (be added, be asked to commit).
GROUP_ELIGIBLE: Final = frozenset({DeviceState.REGISTERED, DeviceState.ACTIVE})


@dataclass(frozen=True)
class Publish:
    """Publish ``payload`` (a service-signed envelope) on ``topic``, QoS 1."""

    topic: str
    payload: bytes = field(repr=False)


def describe_publishes(publishes: Iterable[Publish]) -> list[str]:
    """Topics only (for logs and tests): payloads are never logged."""
    return [p.topic for p in publishes]


@dataclass(frozen=True)
class ServiceSettings:
    """Timing and retention knobs (from the configuration's [groups], [service] and [quorum]
    tables). ``member_updates`` etc.: docs/threat-model.md "An insider wedging a group".
    ``min_approvals``: k of the initial quorum policy (until a signed one is adopted);
    ``request_ttl``: how long a dual-control request stays approvable; ``checkpoint_interval``:
    how often the audit head is checkpointed when it moved ([audit]); ``rekey_max_age`` /
    ``rekey_max_epochs``: the default rekey policy ([groups], ``rekeypolicy``)."""

    ack_timeout: int = 30
    commit_request_timeout: int = 10
    online_window: int = 300
    retention_epochs: int = 64
    operator_max_age: int = 300
    device_max_age: int = 86_400
    catchup_grace: int = 5
    catchup_repeat: int = 30
    min_approvals: int = 2
    request_ttl: int = 86_400
    checkpoint_interval: int = 300
    # [groups] wedge protection (provisioning/service/recovery.py): whether a member may commit
    # a self-update nobody asked for, how often, and how long a commit members report as
    # unprocessable waits for acks and reports before the service decides on a rollback.
    member_updates: bool = False
    member_update_min_interval: int = 3600
    recovery_wait: int = 10
    rekey_max_age: int = 7 * 86_400
    rekey_max_epochs: int = 100
    # [groups] tree_requests_per_minute / tree_request_burst: each device's budget of
    # ``group.tree_request``s at one instance (provisioning/service/treepages.py)
    tree_requests_per_minute: int = 120
    tree_request_burst: int = 256
    # [groups] tree_pages_kept: trees cut into pages one instance keeps (groupcache.TreePageCache)
    tree_pages_kept: int = 2
    # [releases] grace_days: a release superseded by a newer approved one expires this much later
    release_grace: int = 30 * 86_400
    # [rollout]: how long a wave of a staged rollout may take (provisioning/service/rollout.py)
    rollout_wave_timeout: int = 600
    # [enrollment] certificate_validity_seconds: the lifetime of DevID and TLS certificates a
    # renewal issues (provisioning/service/renewal.py), as enrollment issues them
    certificate_validity: int = 365 * 86_400
    # [renewal]: whether a device whose certificates expired at most ``max_expired`` seconds ago
    # may still renew by TPM proof (over HTTPS: provisioning/service/expired.py)
    renew_expired: bool = False
    max_expired: int = 90 * 86_400


@dataclass(frozen=True)
class AttestationSettings:
    """Runtime attestation (the configuration's [attestation] table): the golden policy, how
    often each device is challenged, whether an untrusted device is quarantined, how long a
    challenge stays answerable and how many may be open per device, and how many challenges
    the schedule sends a second at most (``tasks.attest_tick``: a backlog, as after a
    fleet-wide outage, is worked off oldest-due first at this rate)."""

    policy: GoldenPolicy
    interval: int = 3600
    quarantine: bool = False
    nonce_ttl: int = 300
    max_open: int = 4
    challenges_per_second: int = 50


@dataclass(frozen=True)
class ReleaseCache:
    """The golden policy built from the approved releases at one release-state ``seq``
    (``Env.releases``, ``provisioning.service.releases.golden``)."""

    seq: int
    policy: GoldenPolicy
    # each approved release's version and expected PCR values, newest approval last
    expected: tuple[tuple[str, Mapping[int, bytes]], ...] = ()

    def match(self, pcr_values: Mapping[int, bytes]) -> str | None:
        """The newest approved release whose expected PCR values ``pcr_values`` (of a trusted
        quote) show, None if none does (a mix of components, or a release no longer approved)."""
        for version, expected in reversed(self.expected):
            if all(pcr_values.get(pcr) == value for pcr, value in expected.items()):
                return version
        return None


class JobState(StrEnum):
    QUEUED = "queued"
    KEY_PACKAGE = "key-package"  # waiting for the new member's key package
    WAITING = "waiting"  # no member is known to be at the current epoch yet
    REQUESTED = "requested"  # commit request sent to ``committer``
    PROPOSALS = "proposals"  # a full rekey: collecting, or holding, members' Update proposals
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL: Final = frozenset({"done", "failed", "cancelled"})


@dataclass(eq=False)
class Job:
    """One group change in a group's queue (a row of ``service_jobs``; this is a snapshot of it,
    written back with a compare-and-set on ``version``). ``request_id`` is the command id of the
    service's requests for it (key package request, commit request)."""

    action: CommitAction
    group_id: str
    member: str | None
    request_id: bytes = field(repr=False)
    command_id: bytes | None = field(default=None, repr=False)  # its operation, if any
    persistent: bool = False  # survives its operation's timeout (revocations, re-adds)
    # create: the founders to try, in order; an aimed update (rekey policy): its one member;
    # a multi-add (add without member, provisioning.service.bulkadd): its joiners;
    # remove: the members to ask first, the one nearest to the removed leaf first (after a
    # rollback, the members that reported the junk commit)
    candidates: tuple[str, ...] = ()
    prefer: str | None = None  # update: ask this member first (it asked for the rotation)
    state: JobState = JobState.QUEUED
    # add: the member's key package; a multi-add: CBOR map device id -> key package so far
    key_package: bytes | None = field(default=None, repr=False)
    committer: str | None = None
    tried: list[str] = field(default_factory=list)
    request_epoch: int = 0
    deadline: int = 0
    detail: str = ""
    id: int = 0
    version: int = 0
    claimed_by: str | None = None
    lease_until: int = 0  # the deadline as read: the claimer's lease (``deadline`` may move)
    # planned with an operation but not part of it (not stored: the row has no command id), so
    # the operation ends without waiting for it (a creation's first updates, ``fullrekey``)
    detached: bool = False

    def describe(self) -> str:
        what = self.action.value + (f" {self.member}" if self.member else "")
        if self.action.value == "add" and self.member is None:
            what = f"add {len(self.candidates)} members"
        return f"{what} in {self.group_id}"

    @property
    def open(self) -> bool:
        return self.state.value not in TERMINAL


@dataclass(eq=False)
class Operation:
    """An operator command in flight (a row of ``service_operations``): its jobs and what it
    last told the operator. Any instance may load it and report progress."""

    command_id: bytes = field(repr=False)
    operator: str
    type: str
    target: str
    groups: set[str]
    jobs: list[Job]
    last_progress: int
    finished: bool = False
    last_sent: str = ""  # "kind:digest" of what the operator was last told
    # Ack progress throttle (see ``operations.ack_progress_due``): when and at which step the
    # last in-progress ack result went out, and whether a newer ack view is still unsent.
    acks_sent_at: int | None = None
    acks_step: tuple[int | None, int, int] | None = None
    acks_counts: tuple[int | None, int, int] | None = None
    acks_seen: tuple[int | None, int, int] | None = None
    acks_deferred: bool = False


@dataclass(eq=False)
class AttestOperation:
    """An operator's ``op.attest`` waiting for the device's report."""

    command_id: bytes = field(repr=False)
    operator: str
    device_id: str
    nonce: bytes = field(repr=False)
    deadline: int
