"""The delivery service, sans I/O: MQTT messages in, MQTT publishes out, the registry in between.

``DeliveryService.handle(topic, payload, now)`` takes one message the service received (a device
report on ``kf/v1/dev/{id}/report`` or an operator command on ``kf/v1/ops/{op}/cmd``) and returns
the ``Publish`` actions to perform; ``tick(now)`` drives timeouts and retries. Nothing here opens
a socket or reads a clock: the MQTT adapter (``provisioning.service.mqtt``) does that.

What the service does (docs/service.md, "Running"; /work/notes/FLOWS.md is the contract):

- **Authorizes** operator commands: COSE signature by a registered operator key whose
  certificate still chains to the operator CA, role (viewer < operator < admin), replay (per
  sender ReplayGuard kept in the database) and command-id reuse. Every accepted or refused
  command is one audit entry.
- **Orders** group changes: each group has a FIFO queue of jobs (create, add, remove, update);
  only the head is in flight (it holds the group's slot in the database), so at most one commit
  request per group is outstanding fleet-wide. A second
  operator request for a busy group is queued behind the first, and its ``accepted`` result says
  so. The database's UNIQUE(group, epoch) is the final guard: the first valid commit per epoch
  wins, any other is refused with ``ds.commit.epoch_taken``.
- **Checks in public** what it can (``agent.protocol.mls.public.PublicGroup``): committer
signature, epoch,
  tree shape, that the committer is the envelope's signer, that add/remove match the job in
  flight, that key packages carry the added device's registered DevID key, that a Welcome has one
  entry per add. It never holds a private group key: it cannot.
- **Relays** accepted commits on ``grp/{G}/commit`` and welcomes to ``dev/{new}/cmd``, records
  acks, and reports progress to the operator until every member acked the same epoch
  authenticator or the operation makes no progress for ``ack_timeout`` seconds (``timeout``,
  naming the stragglers).
- **Catch-up**: on any verified report from a device that is behind in a group, it replays the
  missing commits from the commit log on the device's command topic; if retention already
  dropped them, it removes and re-adds the device (fresh key package, fresh welcome).

"Online" (who may be asked to commit): a member proven to be at the group's current epoch (it
acked it, it made the commit that started it, or it founded the group at epoch 0), not revoked,
not being removed; among those, devices heard from within ``online_window`` seconds come first
(most recent first). If the chosen committer does not answer within ``commit_request_timeout``
seconds, the request goes to the next candidate.

- **Attests** devices (with ``AttestationSettings``): challenges (``attest.challenge``, a fresh
  nonce over the golden policy's PCRs) on a schedule from ``tick`` and on an operator's
  ``op.attest``; an ``attest.report`` is checked by ``provisioning.attestation.verify_evidence``
  against the AK registered at enrollment and the policy, and the verdict (with the failing
  check and component) is recorded, audited and told to the operator who asked. Open nonces are
  in the database (``store.issue_challenge``/``consume_challenge``). With ``quarantine`` on, an
  untrusted device is quarantined and removed from all its groups by commits of other members
  (the revocation's removal path); its later reports are refused (``ds.device.quarantined``)
  except attestation reports, and a later trusted verdict makes it ``active`` again without
  re-adding it anywhere (an operator runs ``keyfleet group add``).

Several instances (docs/scale-out.md): everything in flight is in the database (jobs, the
per-group in-flight slot, operations, held commits and welcomes, attestation waits and schedule,
task leases, the envelope sequence counter; ``provisioning.service.store``), and every step that
two instances could both take is a conditional write that only one wins. So any instance handles
any message the shared subscription gives it, a job's deadline is the lease of the instance that
last moved it, and nothing needs a leader. Only harmless caches stay in memory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from functools import partial
from typing import Final, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from agent.protocol.attest import public_key_from_area
from agent.protocol.errors import InternalError, KeyfleetError, ProtocolError
from agent.protocol.hpke import Rng, serialize_public_key
from agent.protocol.mls import codec
from agent.protocol.mls.messages import Commit, KeyPackage, Welcome
from agent.protocol.mls.public import PublicGroup
from agent.protocol.topics import (
    SERVICE_ID,
    device_cmd_topic,
    group_commit_topic,
    operator_result_topic,
    report_sender,
)
from agent.protocol.wire.cose import key_id
from agent.protocol.wire.envelope import (
    KeyResolver,
    Signer,
    VerifiedMessage,
    encode_message,
    open_message,
)
from agent.protocol.wire.messages.ack import Ack as AckBody
from agent.protocol.wire.messages.attestation import AttestChallenge, AttestReport
from agent.protocol.wire.messages.base import Body
from agent.protocol.wire.messages.group import (
    CommitMessage,
    GroupCreated,
    KeyPackageMessage,
    UpdateRequest,
    WelcomeMessage,
)
from agent.protocol.wire.messages.key_state import DeviceDestroyed
from agent.protocol.wire.messages.key_state import KeyStateReport as KeyStateBody
from agent.protocol.wire.messages.operator import AttestDevice, GroupAdd, GroupCreate, Rekey, Revoke
from agent.protocol.wire.messages.result import OperatorResult, ResultStatus
from agent.protocol.wire.messages.service import (
    CommitAction,
    CommitRequest,
    KeyPackageRequest,
    WelcomeDelivery,
)
from agent.protocol.wire.rejections import Rejections, is_benign
from agent.protocol.wire.replay import ReplayGuard
from provisioning import audit, pki
from provisioning.attestation import (
    AttestationRefused,
    AttestationVerdict,
    Evidence,
    verify_evidence,
)
from provisioning.db.engine import RetryableConflict, rowcount
from provisioning.db.runtime import (
    AttestOperationRow,
    GroupSlot,
    HeldMessage,
    JobRow,
    OperationRow,
    OperatorKey,
    ReplayState,
    TaskLease,
)
from provisioning.db.schema import Ack as AckRow
from provisioning.db.schema import CommitLogEntry, Device, GroupMember
from provisioning.metrics import ServiceMetrics
from provisioning.policy import GoldenPolicy
from provisioning.registry import (
    AttestationResult,
    DeviceRecord,
    DeviceState,
    GroupRecord,
    KeyStateReport,
    Outcome,
    PendingChange,
    Registry,
    Role,
    cert_fingerprint,
    run_in_transaction,
)
from provisioning.service import store

log = logging.getLogger("keyfleet.service")

T = TypeVar("T")

MAX_PUBLIC_GROUP: Final = 1 << 20
COMMAND_ID_SIZE: Final = 16

# Who may send what. A role includes the ones below it (Role.allows).
REQUIRED_ROLE: Final[dict[str, Role]] = {
    Rekey.TYPE: Role.OPERATOR,
    GroupCreate.TYPE: Role.OPERATOR,
    GroupAdd.TYPE: Role.OPERATOR,
    AttestDevice.TYPE: Role.OPERATOR,
    Revoke.TYPE: Role.ADMIN,
}
_GROUP_ELIGIBLE = frozenset({DeviceState.REGISTERED, DeviceState.ACTIVE})
# (group, commits to replay, the group's current epoch) per group a device is behind in
_Replays = list[tuple[str, list[CommitMessage], int]]

_REFUSED_DEVICE_STATES = frozenset({DeviceState.REVOKED, DeviceState.DESTROYED})
_ATTESTABLE = frozenset({DeviceState.REGISTERED, DeviceState.ACTIVE, DeviceState.QUARANTINED})
ATTEST_SCAN_SECONDS: Final = 5
PRUNE_SECONDS: Final = 60
# How long a claimed periodic task stays with its instance: longer than one run takes, short
# enough that a killed instance's task is taken over within a few ticks.
TASK_LEASE_SECONDS: Final = 30
NONCE_SIZE: Final = 32


@dataclass(frozen=True)
class Publish:
    """Publish ``payload`` (a service-signed envelope) on ``topic``, QoS 1."""

    topic: str
    payload: bytes = field(repr=False)


@dataclass(frozen=True)
class ServiceSettings:
    """Timing and retention knobs (from the configuration's [groups] and [service] tables)."""

    ack_timeout: int = 30
    commit_request_timeout: int = 10
    online_window: int = 300
    retention_epochs: int = 64
    operator_max_age: int = 300
    device_max_age: int = 86_400
    catchup_grace: int = 5
    catchup_repeat: int = 30


@dataclass(frozen=True)
class AttestationSettings:
    """Runtime attestation (the configuration's [attestation] table): the golden policy, how
    often each device is challenged, whether an untrusted device is quarantined, how long a
    challenge stays answerable and how many may be open per device."""

    policy: GoldenPolicy
    interval: int = 3600
    quarantine: bool = False
    nonce_ttl: int = 300
    max_open: int = 4


class JobState(StrEnum):
    QUEUED = "queued"
    KEY_PACKAGE = "key-package"  # waiting for the new member's key package
    WAITING = "waiting"  # no member is known to be at the current epoch yet
    REQUESTED = "requested"  # commit request sent to ``committer``
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


_TERMINAL = frozenset({"done", "failed", "cancelled"})


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
    candidates: tuple[str, ...] = ()  # create: the founders to try, in order
    prefer: str | None = None  # update: ask this member first (it asked for the rotation)
    state: JobState = JobState.QUEUED
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

    def describe(self) -> str:
        what = self.action.value + (f" {self.member}" if self.member else "")
        return f"{what} in {self.group_id}"

    @property
    def open(self) -> bool:
        return self.state.value not in _TERMINAL


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
    # Ack progress throttle (see ``_ack_progress_due``): when and at which step the last
    # in-progress ack result went out, and whether a newer ack view is still unsent.
    acks_sent_at: int | None = None
    acks_step: tuple[int | None, int, int] | None = None
    acks_counts: tuple[int | None, int, int] | None = None
    acks_seen: tuple[int | None, int, int] | None = None
    acks_deferred: bool = False


@dataclass(eq=False)
class _AttestOperation:
    """An operator's ``op.attest`` waiting for the device's report."""

    command_id: bytes = field(repr=False)
    operator: str
    device_id: str
    nonce: bytes = field(repr=False)
    deadline: int


@dataclass(frozen=True)
class _CheckedCommit:
    """A commit that passed every check short of acceptance, with what it changes."""

    commit: Commit
    public: PublicGroup
    adds: list[str]
    removes: list[str]
    job: Job | None


Post = Callable[[], None]


class DeliveryService:
    """See the module docstring. Not thread-safe: one adapter thread calls it; other instances
    (other processes) share only the database."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        signing_key: ec.EllipticCurvePrivateKey,
        operator_ca: x509.Certificate,
        settings: ServiceSettings | None = None,
        attestation: AttestationSettings | None = None,
        rng: Rng = os.urandom,
        instance: str = "1",
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self._sessions = sessions
        self.attestation = attestation
        self._key = signing_key
        self._operator_ca = operator_ca
        self.settings = settings if settings is not None else ServiceSettings()
        self._rng = rng
        self.instance = instance
        self.metrics = metrics if metrics is not None else ServiceMetrics()
        self.rejections = Rejections()
        self._out: list[tuple[str, Body, str, int]] = []
        # Pure caches (losing them, or one instance not seeing another's, is harmless):
        # - when a device was last heard from: ``devices.last_seen`` in the database is the
        #   shared truth (written with every accepted report), this only saves a read;
        # - which commit range was last replayed to a member for catch-up: another instance
        #   may replay the same range once more, and a member drops commits it already has.
        self._last_heard: dict[str, int] = {}
        self._catchup_sent: dict[tuple[str, str], tuple[int, int, int]] = {}
        self._started = False
        # The caller's clock reading in milliseconds for the call in progress (``now_ms`` of
        # handle/handle_many/tick), like ``_out`` only valid during one call: see ``_ms``.
        self._call_ms: int | None = None

    # -- public API ----------------------------------------------------------------------------

    def handle(
        self, topic: str, payload: bytes, now: int, *, now_ms: int | None = None
    ) -> list[Publish]:
        """Process one received message; return what to publish. Never raises for a bad
        message: refusals are counted, logged (no secrets) and audited. ``now_ms``: the same
        clock reading in milliseconds (``now == now_ms // 1000``), if the caller has one."""
        return self.handle_many([(topic, payload)], now, now_ms=now_ms)

    def handle_many(
        self, messages: Sequence[tuple[str, bytes]], now: int, *, now_ms: int | None = None
    ) -> list[Publish]:
        """Process messages received together, in their order; return what to publish for all
        of them (signed with one reservation from the shared sequence counter). Device acks
        that follow each other are taken in one transaction (``_on_acks``): at a fleet rekey
        they are nearly all the traffic, and one transaction, one progress check and one
        catch-up query per batch instead of per ack is what keeps the service up with the
        fleet (docs/bench/README.md). Never raises for a bad message; a transport or database
        failure while handling one is logged and the others are still handled (the senders'
        timeouts and the service's retries recover that one's flow)."""
        with self._clock_reading(now, now_ms):
            return self._handle_many(messages, now)

    def _handle_many(self, messages: Sequence[tuple[str, bytes]], now: int) -> list[Publish]:
        self._ensure_started(now)
        acks: list[VerifiedMessage] = []
        senders = [report_sender(topic) for topic, _ in messages]
        # One read session verifies the device reports up to the next message that is handled
        # on its own, with the senders' device and replay rows loaded in one query each: a
        # sender's device state is then as of that load (a few hundred ms at most), as if its
        # message had been verified that much earlier; the replay check that counts runs again
        # under the row lock (``_on_acks``, ``_accept_and``).
        reader: Session | None = None
        held: list[object] | None = None
        try:
            for index, (topic, payload) in enumerate(messages):
                device_id = senders[index]
                message: VerifiedMessage | None = None
                if device_id is not None:
                    if reader is None:
                        reader = self._sessions()
                        if held is None:
                            # once per call: again after each message handled on its own would
                            # be quadratic in a batch of reports that are not acks
                            held = _load_senders(reader, {d for d in senders[index:] if d})
                    message = self._guarded(
                        topic, partial(self._open_device, device_id, payload, now, reader), None
                    )
                    if message is None:
                        continue
                    if isinstance(message.body, AckBody):
                        acks.append(message)
                        continue
                if reader is not None:
                    reader.close()
                    reader = None
                self._guarded("acks", partial(self._on_acks, acks, now), None)
                parts = topic.split("/")
                if message is not None:
                    self._guarded(topic, partial(self._on_device_message, message, now), None)
                elif (
                    len(parts) == 5 and parts[:2] == ["kf", "v1"] and parts[2:5:2] == ["ops", "cmd"]
                ):
                    self._guarded(topic, partial(self._on_operator, parts[3], payload, now), None)
                else:
                    log.warning("ignored a message on %s: not a service topic", topic)
        finally:
            if reader is not None:
                reader.close()
        del held
        self._guarded("acks", partial(self._on_acks, acks, now), None)
        return self._flush()

    @staticmethod
    def _guarded(what: str, work: Callable[[], T], failed: T) -> T:
        try:
            return work()
        except (KeyfleetError, SQLAlchemyError) as exc:
            log.error("handling a message on %s failed: %s", what, exc)
            return failed

    def tick(self, now: int, *, now_ms: int | None = None) -> list[Publish]:
        """Timeouts and retries: commit requests nobody answered go to the next candidate, key
        package requests are repeated, operations without progress end in ``timeout``. Every
        instance ticks; each step is a compare-and-set on a shared row, so each happens once
        (and a dead instance's jobs are taken over when their deadline, its lease, passes)."""
        with self._clock_reading(now, now_ms):
            return self._tick(now)

    @contextmanager
    def _clock_reading(self, now: int, now_ms: int | None) -> Iterator[None]:
        """Keep the caller's millisecond reading for the call (``_ms``). Everything else in the
        core goes on taking whole seconds: only the times the dashboard measures sub-second
        spans with (acks, accepted commits, the start and result of an operator command) are
        recorded in milliseconds, so only those read it."""
        if now_ms is not None and now_ms // 1000 != now:
            raise InternalError(f"now_ms {now_ms} is not within second {now}")
        self._call_ms = now_ms
        try:
            yield
        finally:
            self._call_ms = None

    def _ms(self, now: int) -> int:
        """``now`` in milliseconds: the call's own reading when the caller gave one for this
        second, otherwise the second itself (``now * 1000``: callers with a seconds clock, such
        as the tests' fake clocks, keep their precision)."""
        ms = self._call_ms
        return ms if ms is not None and ms // 1000 == now else now * 1000

    def _tick(self, now: int) -> list[Publish]:
        self._ensure_started(now)
        for group_id in self._read(_groups_with_open_jobs):
            job = self._head(group_id)
            if job is None:
                continue
            if job.state is JobState.REQUESTED and now >= job.deadline:
                log.info(
                    "no commit from %s for %s within %ss; asking another member",
                    job.committer,
                    job.describe(),
                    self.settings.commit_request_timeout,
                )
                if job.committer is not None and job.committer not in job.tried:
                    job.tried.append(job.committer)
                job.state = JobState.WAITING
                self._start(job, now)
            elif job.state is JobState.KEY_PACKAGE and now >= job.deadline:
                self._request_key_package(job, now)
            elif job.state in (JobState.WAITING, JobState.QUEUED):
                self._start(job, now)
        for operation in self._load_operations(None):
            if now - operation.last_progress >= self.settings.ack_timeout:
                self._time_out(operation, now)
            else:
                if operation.acks_deferred:
                    self._progress(operation, now)  # an ack view the throttle held back
                if now - operation.last_progress >= self.settings.commit_request_timeout:
                    self._nudge(operation, now)
        self._attest_tick(now)
        self._prune_tick(now)
        return self._flush()

    def _nudge(self, operation: Operation, now: int) -> None:
        """Acks stopped coming: send the epoch's commit again to each straggler (``to`` = the
        device, on its command topic). A member that already applied it answers with its ack
        again (the agent's reply to an already-applied commit), one that missed it applies it.
        Recovers acks lost with an instance that died holding them (docs/scale-out.md). Once
        per ``commit_request_timeout`` per operation fleet-wide (conditional UPDATE)."""
        if any(job.open for job in operation.jobs):
            return
        key = operation.command_id.hex()
        interval = self.settings.commit_request_timeout

        def work(session: Session) -> list[tuple[str, CommitMessage]]:
            claimed = session.execute(
                update(OperationRow)
                .where(
                    OperationRow.command_id == key,
                    OperationRow.finished_at.is_(None),
                    (OperationRow.nudged_at.is_(None)) | (OperationRow.nudged_at <= now - interval),
                )
                .values(nudged_at=now)
                .execution_options(synchronize_session=False)
            )
            if rowcount(claimed) != 1:
                return []
            registry = Registry(session)
            sends: list[tuple[str, CommitMessage]] = []
            for group_id in sorted(operation.groups):
                try:
                    status = registry.ack_status(group_id)
                except ProtocolError:
                    continue
                last = session.get(CommitLogEntry, (group_id, status.epoch - 1))
                if last is None:
                    continue
                relay = CommitMessage(group_id, last.epoch, last.commit)
                sends.extend((device_id, relay) for device_id in status.stragglers)
            return sends

        sends = self._tx(work)
        if sends:
            log.info(
                "%s on %s: no ack for %ss; sending the commit again to %d straggler(s)",
                operation.type,
                operation.target,
                interval,
                len(sends),
            )
        for device_id, relay in sends:
            self._send(device_cmd_topic(device_id), relay, to=device_id, now=now)

    def queue_length(self, group_id: str) -> int:
        """Open jobs of ``group_id`` (queued or in flight), fleet-wide."""
        return len(self._read(lambda s: _open_job_rows(s, group_id)))

    # -- plumbing ----------------------------------------------------------------------------

    def _flush(self) -> list[Publish]:
        """Sign what is queued: sequence numbers are reserved from the shared counter in one
        write, so that several instances signing as one sender stay inside every device's
        replay window (docs/scale-out.md)."""
        out, self._out = self._out, []
        if not out:
            return []
        now = max(item[3] for item in out)
        # Milliseconds of the clock as a floor: a counter row created on an existing fleet still
        # starts above the seqs devices saw from the single-instance service.
        first = self._tx(lambda s: store.reserve_seqs(s, len(out), floor=now * 1000))
        return [
            Publish(
                topic,
                encode_message(
                    body, key=self._key, sender=SERVICE_ID, to=to, seq=first + i, time=at
                ),
            )
            for i, (topic, body, to, at) in enumerate(out)
        ]

    def _tx(self, work: Callable[[Session], T]) -> T:
        return run_in_transaction(self._sessions, work)

    def _read(self, work: Callable[[Session], T]) -> T:
        with self._sessions() as session:
            return work(session)

    def _send(self, topic: str, body: Body, *, to: str, now: int) -> None:
        self._out.append((topic, body, to, now))

    def _new_id(self) -> bytes:
        return self._rng(COMMAND_ID_SIZE)

    def _ensure_started(self, now: int) -> None:
        """Queue a removal job for every removal the registry has pending without one (a
        revocation recorded by a service version that kept its jobs in memory must still take
        the device out of its groups). Jobs themselves are in the database: nothing else to
        resume."""
        if self._started:
            return
        self._started = True

        def pending_removals(session: Session) -> list[tuple[str, str]]:
            registry = Registry(session)
            found = []
            for group in registry.groups():
                jobs = {
                    row.member
                    for row in _open_job_rows(session, group.group_id)
                    if row.action == CommitAction.REMOVE.value
                }
                for member in registry.members(group.group_id):
                    if (
                        member.pending is PendingChange.REMOVE
                        and member.leaf_index is not None
                        and member.device_id not in jobs
                    ):
                        found.append((group.group_id, member.device_id))
            return found

        for group_id, device_id in self._read(pending_removals):
            log.info("resuming the removal of %s from %s", device_id, group_id)
            self._enqueue(
                Job(CommitAction.REMOVE, group_id, device_id, self._new_id(), persistent=True), now
            )

    def _refuse(
        self,
        err: ProtocolError,
        *,
        actor: str,
        action: str,
        target: str,
        now: int,
        details: dict[str, str | int | None] | None = None,
        audit_benign: bool = False,
    ) -> None:
        self.rejections.record(err)
        self.metrics.rejections.inc(err.check)
        if action == CommitMessage.TYPE:
            self.metrics.commits.inc("refused")
        if is_benign(err) and not audit_benign:
            log.debug("dropped a redelivery from %s (%s)", actor, err.check)
            return
        log.warning(
            "refused %s from %s on %s: [%s] %s", action, actor, target, err.check, err.reason
        )
        audit.record(
            self._sessions,
            now=now,
            actor=actor,
            action=action,
            target=target,
            outcome=Outcome.REFUSED,
            reason=f"[{err.check}] {err.reason}",
            details=details or {},
        )

    def _open(
        self,
        payload: bytes,
        resolver_for: Callable[[Session], KeyResolver],
        *,
        now: int,
        max_age: int,
        session: Session | None = None,
        replay_window: int = store.REPLAY_WINDOW,
    ) -> VerifiedMessage:
        def work(session: Session) -> VerifiedMessage:
            message = open_message(
                payload,
                resolver_for(session),
                now=now,
                recipients=(SERVICE_ID,),
                max_age=max_age,
            )
            store.load_guard(session, message.sender, window=replay_window).check(message)
            return message

        return self._read(work) if session is None else work(session)

    def _accept_and(
        self,
        message: VerifiedMessage,
        now: int,
        handler: Callable[[Session], Post | None],
        *,
        device: bool = False,
        replay_window: int = store.REPLAY_WINDOW,
    ) -> Post | None:
        """Run ``handler`` in one transaction with the sender's replay guard: the message is
        recorded as seen only if its effects commit."""

        def work(session: Session) -> Post | None:
            # Locked, then read: the check in _open ran on a window another instance may have
            # moved since; accept() checks again under the lock.
            store.lock_guard(session, message.sender)
            guard = store.load_guard(session, message.sender, window=replay_window)
            guard.accept(message)
            group_epoch = message.body.group_epoch()
            if group_epoch is not None:
                # The registry judges epochs (commit log, acks), with the group's real state;
                # the guard's per-sender epoch tracking would refuse a catch-up ack that jumps.
                guard.forget_group(group_epoch[0])
            post = handler(session)
            store.save_guard(session, message.sender, guard, now=now)
            if device:
                # "Heard from" must be shared: another instance picks committers and the
                # attestation schedule by it. Same transaction as the replay state: no extra
                # commit per report.
                session.execute(
                    update(Device)
                    .where(Device.device_id == message.sender)
                    .values(last_seen=now)
                    .execution_options(synchronize_session=False)
                )
            return post

        return self._tx(work)

    # -- devices -------------------------------------------------------------------------------

    def _device_resolver(self, device_id: str) -> Callable[[Session], KeyResolver]:
        def make(session: Session) -> KeyResolver:
            def resolve(kid: bytes) -> Signer:
                try:
                    device = Registry(session).device(device_id)
                except ProtocolError:
                    raise LookupError(device_id) from None
                public_key = _devid_public_key(device)
                if key_id(public_key) != kid:
                    raise LookupError(device_id)
                if device.state in _REFUSED_DEVICE_STATES:
                    raise ProtocolError(
                        "ds.device.revoked", f"device {device_id!r} is {device.state.value}"
                    )
                return Signer(device_id, public_key)

            return resolve

        return make

    def _open_device(
        self, device_id: str, payload: bytes, now: int, session: Session | None = None
    ) -> VerifiedMessage | None:
        """Verify a device report (signature, key, age, replay pre-check); None: refused."""
        try:
            message = self._open(
                payload,
                self._device_resolver(device_id),
                now=now,
                max_age=self.settings.device_max_age,
                session=session,
            )
        except ProtocolError as err:
            actor = f"device:{device_id}"
            self._refuse(err, actor=actor, action="device.message", target=device_id, now=now)
            return None
        self._last_heard[device_id] = now
        return message

    def _on_device_message(self, message: VerifiedMessage, now: int) -> None:
        device_id = message.sender
        actor = f"device:{device_id}"
        body = message.body
        try:
            post = self._accept_and(
                message, now, lambda s: self._dispatch_device(s, message, now), device=True
            )
        except ProtocolError as err:
            target = getattr(body, "group_id", device_id)
            details: dict[str, str | int | None] = {"type": message.type}
            epoch = getattr(body, "epoch", None)
            if isinstance(epoch, int):
                details["epoch"] = epoch
            self._refuse(
                err, actor=actor, action=message.type, target=str(target), now=now, details=details
            )
            if not err.check.startswith("replay."):
                # The device is alive and authentic even if this report was refused (e.g. a
                # key-state history the registry cannot take): it must still catch up.
                self._catch_up(device_id, now)
            return
        self.metrics.reports.inc(message.type)
        if post is not None:
            post()
        self._catch_up(device_id, now)

    def _dispatch_device(self, session: Session, message: VerifiedMessage, now: int) -> Post | None:
        body = message.body
        sender = message.sender
        if isinstance(body, DeviceDestroyed):
            return self._on_device_destroyed(session, sender, body, now)
        if isinstance(body, AttestReport):
            return self._on_attest_report(session, sender, body, message, now)
        if Registry(session).device(sender).state is DeviceState.QUARANTINED:
            # Like a revoked device's, except attestation reports: a device whose firmware was
            # fixed can prove it and become active again (it is not re-added automatically).
            raise ProtocolError(
                "ds.device.quarantined",
                f"device {sender!r} is quarantined: only attestation reports are taken",
            )
        if isinstance(body, KeyStateBody):
            return self._on_key_states(session, sender, body, message, now)
        if isinstance(body, KeyPackageMessage):
            return self._on_key_package(session, sender, body, now)
        if isinstance(body, GroupCreated):
            return self._on_group_created(session, sender, body, now)
        if isinstance(body, CommitMessage):
            return self._on_commit(session, sender, body, now)
        if isinstance(body, WelcomeMessage):
            return self._on_welcome(session, sender, body, now)
        if isinstance(body, AckBody):
            return self._on_ack(session, sender, body, now)
        if isinstance(body, UpdateRequest):
            return self._on_update_request(session, sender, body, now)
        raise ProtocolError("ds.message.type", f"{message.type} is not a device report")

    def _on_key_states(
        self,
        session: Session,
        sender: str,
        body: KeyStateBody,
        message: VerifiedMessage,
        now: int,
    ) -> Post | None:
        items = [
            KeyStateReport(key_name=record.name, state=state, at=at, kind=record.kind.value)
            for record in body.keys
            for state, at in record.transitions
        ]
        Registry(session).record_report(sender, message.message_id, items, now=now)
        return None

    def _on_update_request(
        self, session: Session, sender: str, body: UpdateRequest, now: int
    ) -> Post | None:
        """A member's epoch reached its rotation limit (max epoch age or messages): queue a
        self-update of the group, asked of that member first, so keys rotate without an
        operator. Nothing is queued if an update is already queued or in flight (it rotates the
        epoch too) or if the group has already moved past the epoch the member asked about."""
        registry = Registry(session)
        group = registry.group(body.group_id)
        if not any(
            m.device_id == sender and m.leaf_index is not None
            for m in registry.members(body.group_id)
        ):
            raise ProtocolError(
                "ds.group.member", f"{sender!r} is not a member of group {body.group_id!r}"
            )
        if body.epoch > group.epoch:
            raise ProtocolError(
                "ds.update.epoch_ahead",
                f"group {body.group_id!r} is at epoch {group.epoch}, not {body.epoch}",
            )
        queued = [_job_from_row(r) for r in _open_job_rows(session, body.group_id)]
        if body.epoch < group.epoch or any(j.action is CommitAction.UPDATE for j in queued):
            log.info(
                "rotation request of %s for %s epoch %s: nothing to do (group at epoch %s, "
                "%d update(s) queued)",
                sender,
                body.group_id,
                body.epoch,
                group.epoch,
                sum(1 for j in queued if j.action is CommitAction.UPDATE),
            )
            return None
        job = Job(CommitAction.UPDATE, body.group_id, None, self._new_id(), prefer=sender)
        _insert_job(session, job, now)
        audit.append(
            session,
            now=now,
            actor=f"device:{sender}",
            action="group.rotate",
            target=body.group_id,
            outcome=Outcome.ACCEPTED,
            reason=f"automatic rotation: {body.reason}",
            details={"epoch": body.epoch, "reason": body.reason},
        )

        def post() -> None:
            log.info(
                "%s: %s epoch %s reached %s; self-update queued (automatic rotation)",
                sender,
                body.group_id,
                body.epoch,
                body.reason,
            )
            self._start_next(job.group_id, now)

        return post

    def _on_device_destroyed(
        self, session: Session, sender: str, body: DeviceDestroyed, now: int
    ) -> Post:
        """The device is destroying its identity (``keyagent factory-reset``): the device and
        every key it reported become destroyed, it leaves its groups by commits of the other
        members (the revocation's path), and its DevID key is refused from now on
        (``ds.device.revoked``, the resolver's check of the device state)."""
        registry = Registry(session)
        registry.set_device_state(
            sender, DeviceState.DESTROYED, reason=f"factory reset: {body.reason}"[:200], now=now
        )
        keys = registry.destroy_keys(sender, now=now)
        jobs: list[Job] = []
        for member in registry.groups_of(sender):
            if member.pending is PendingChange.REMOVE:
                continue  # already being removed (quarantine): its job is queued
            registry.request_remove(member.group_id, sender, now=now)
            if member.leaf_index is not None:
                job = Job(
                    CommitAction.REMOVE, member.group_id, sender, self._new_id(), persistent=True
                )
                _insert_job(session, job, now)
                jobs.append(job)
        audit.append(
            session,
            now=now,
            actor=f"device:{sender}",
            action=DeviceDestroyed.TYPE,
            target=sender,
            outcome=Outcome.ACCEPTED,
            reason=body.reason,
            details={"keys_destroyed": len(keys), "groups": ",".join(j.group_id for j in jobs)},
        )

        def post() -> None:
            log.warning(
                "device %s destroyed its identity (%d keys); removing it from %s",
                sender,
                len(keys),
                [j.group_id for j in jobs] or "no group",
            )
            self._cancel_adds_of(sender, now)
            for job in jobs:
                self._start_next(job.group_id, now)

        return post

    def _on_key_package(
        self, session: Session, sender: str, body: KeyPackageMessage, now: int
    ) -> Post:
        row = (
            session.scalar(select(JobRow).where(JobRow.request_id == body.command_id.hex()))
            if body.command_id is not None
            else None
        )
        job = None if row is None else _job_from_row(row)
        if job is None or job.member != sender or job.state is not JobState.KEY_PACKAGE:
            raise ProtocolError(
                "ds.key_package.unexpected", "no key package was requested with this command id"
            )
        key_package = KeyPackage.decode(body.key_package)
        key_package.verify()
        device = Registry(session).device(sender)
        if key_package.device_id != sender.encode() or key_package.signature_key != (
            serialize_public_key(_devid_public_key(device))
        ):
            raise ProtocolError(
                "ds.key_package.identity",
                "the key package is not bound to the sender's DevID key and device id",
            )
        job.key_package = body.key_package
        job.state = JobState.WAITING
        if not _save_job(session, job, self.instance):
            # Another instance took this key package (a redelivery raced it): nothing to do.
            raise ProtocolError(
                "ds.key_package.unexpected", "the requested key package was already taken"
            )

        def post() -> None:
            self._touch(job, now)
            self._start_next(job.group_id, now)

        return post

    def _on_group_created(
        self, session: Session, sender: str, body: GroupCreated, now: int
    ) -> Post:
        job = self._head(body.group_id, session)
        if (
            job is None
            or job.action is not CommitAction.CREATE
            or job.state is not JobState.REQUESTED
            or job.committer != sender
            or job.request_id != body.command_id
        ):
            raise ProtocolError(
                "ds.create.unexpected", f"{sender} was not asked to create {body.group_id}"
            )
        public = PublicGroup.from_state(
            codec.decode(body.public_group, MAX_PUBLIC_GROUP, "public_group")
        )
        registry = Registry(session)
        devid = serialize_public_key(_devid_public_key(registry.device(sender)))
        members = list(public.tree.members())
        if (
            public.group_id != body.group_id.encode()
            or public.epoch != 0
            or len(members) != 1
            or members[0][0] != 0
            or members[0][1].device_id != sender.encode()
            or members[0][1].signature_key != devid
        ):
            raise ProtocolError(
                "ds.create.public_group",
                "the public group is not epoch 0 of this group with the sender alone at leaf 0",
            )
        registry.create_group(
            body.group_id,
            creator=sender,
            public_tree=codec.encode(public.to_state()),
            group_context=public.state.group_context(),
            now=now,
        )
        audit.append(
            session,
            now=now,
            actor=f"device:{sender}",
            action="group.created",
            target=body.group_id,
            outcome=Outcome.ACCEPTED,
            details=_job_details(job, epoch=0),
        )
        _end_job(session, job, JobState.DONE)

        def post() -> None:
            log.info("group %s created by %s at epoch 0", body.group_id, sender)
            self._job_ended(job, now)

        return post

    def _load_public(self, session: Session, group_id: str) -> tuple[PublicGroup, int]:
        group = Registry(session).group(group_id)
        public = PublicGroup.from_state(
            codec.decode(group.public_tree, MAX_PUBLIC_GROUP, "public_tree")
        )
        return public, group.epoch

    def _check_commit(self, session: Session, sender: str, body: CommitMessage) -> _CheckedCommit:
        """Every check before acceptance; returns the commit, the group's public view, the
        device ids it adds and removes, and the job it fulfils."""
        public, epoch = self._load_public(session, body.group_id)
        commit = Commit.decode(body.commit)
        if commit.content.epoch != body.epoch:
            raise ProtocolError("ds.commit.epoch_mismatch", "envelope and commit epochs differ")
        if body.epoch < epoch:
            raise ProtocolError(
                "ds.commit.epoch_taken",
                f"group {body.group_id!r}: epoch {body.epoch} already has an accepted commit; "
                f"the group is at epoch {epoch}",
            )
        public.verify(commit)
        registry = Registry(session)
        leaf = public.tree.leaf(commit.content.sender)
        devid = serialize_public_key(_devid_public_key(registry.device(sender)))
        if leaf is None or leaf.device_id != sender.encode() or leaf.signature_key != devid:
            raise ProtocolError(
                "ds.commit.sender", "the commit's committer leaf is not the signing device"
            )
        adds = [kp.device_id.decode() for kp in commit.content.adds]
        removes = []
        for index in commit.content.removes:
            removed_leaf = public.tree.leaf(index)
            assert removed_leaf is not None  # verify() refused blank removes
            removes.append(removed_leaf.device_id.decode())
        for kp in commit.content.adds:
            added = registry.device(kp.device_id.decode())
            if kp.signature_key != serialize_public_key(_devid_public_key(added)):
                raise ProtocolError(
                    "ds.commit.key_package", "an added key package is not the device's DevID key"
                )
        job = self._head(body.group_id, session)
        if adds or removes:
            authorized = (
                job is not None
                and job.state is JobState.REQUESTED
                and (
                    (
                        job.action is CommitAction.ADD
                        and not removes
                        and len(commit.content.adds) == 1
                        and commit.content.adds[0].encode() == job.key_package
                    )
                    or (job.action is CommitAction.REMOVE and not adds and removes == [job.member])
                )
            )
            if not authorized:
                raise ProtocolError(
                    "ds.commit.unauthorized",
                    "the commit adds or removes members nobody asked to add or remove",
                )
            return _CheckedCommit(commit, public, adds, removes, job)
        matched = job if job is not None and job.action is CommitAction.UPDATE else None
        return _CheckedCommit(commit, public, adds, removes, matched)

    def _on_commit(self, session: Session, sender: str, body: CommitMessage, now: int) -> Post:
        checked = self._check_commit(session, sender, body)
        if checked.adds:
            welcome = _take_held_welcome(session, body.group_id, body.epoch, sender)
            if welcome is None:
                # Held in the database: its welcome may reach another instance.
                session.merge(
                    HeldMessage(
                        group_id=body.group_id,
                        epoch=body.epoch,
                        sender=sender,
                        kind="commit",
                        data=body.commit,
                        extra="" if body.command_id is None else body.command_id.hex(),
                        received_at=now,
                    )
                )

                def hold() -> None:
                    log.info(
                        "commit for %s epoch %s from %s holds until its welcome arrives",
                        body.group_id,
                        body.epoch,
                        sender,
                    )
                    # The welcome may have been held by another instance meanwhile.
                    self._accept_held(body.group_id, body.epoch, sender, now)

                return hold
            return self._accept_commit(session, sender, body, checked, welcome=welcome, now=now)
        return self._accept_commit(session, sender, body, checked, welcome=None, now=now)

    def _on_welcome(self, session: Session, sender: str, body: WelcomeMessage, now: int) -> Post:
        commit_epoch = body.epoch - 1 if body.epoch > 0 else -1
        held = _take_held_commit(session, body.group_id, commit_epoch, sender)
        if held is None:
            # The welcome came first (or the commit is at another instance): keep it briefly.
            session.merge(
                HeldMessage(
                    group_id=body.group_id,
                    epoch=commit_epoch,
                    sender=sender,
                    kind="welcome",
                    data=body.welcome,
                    extra=",".join(body.new_members),
                    received_at=now,
                )
            )

            def keep() -> None:
                self._accept_held(body.group_id, commit_epoch, sender, now)

            return keep
        checked = self._check_commit(session, sender, held)
        return self._accept_commit(session, sender, held, checked, welcome=body, now=now)

    def _accept_held(self, group_id: str, epoch: int, sender: str, now: int) -> None:
        """Both halves held (they reached two instances at once): whoever takes both rows
        accepts the commit; anyone else finds nothing."""

        def work(session: Session) -> Post | None:
            commit = _take_held_commit(session, group_id, epoch, sender)
            if commit is None:
                return None
            welcome = _take_held_welcome(session, group_id, epoch, sender)
            if welcome is None:
                raise _NothingHeld  # roll back: the commit stays held
            checked = self._check_commit(session, sender, commit)
            return self._accept_commit(session, sender, commit, checked, welcome=welcome, now=now)

        try:
            post = self._tx(work)
        except _NothingHeld:
            return
        except ProtocolError as err:
            self._refuse(
                err,
                actor=f"device:{sender}",
                action=CommitMessage.TYPE,
                target=group_id,
                now=now,
                details={"epoch": epoch},
            )
            return
        if post is not None:
            post()

    def _accept_commit(
        self,
        session: Session,
        sender: str,
        body: CommitMessage,
        checked: _CheckedCommit,
        *,
        welcome: WelcomeMessage | None,
        now: int,
    ) -> Post:
        commit, public, adds, removes, job = (
            checked.commit,
            checked.public,
            checked.adds,
            checked.removes,
            checked.job,
        )
        if welcome is not None:
            if welcome.epoch != body.epoch + 1 or sorted(welcome.new_members) != sorted(adds):
                raise ProtocolError(
                    "ds.welcome.members", "the welcome does not match the commit's adds and epoch"
                )
            public.check_welcome(commit, Welcome.decode(welcome.welcome))
        verified = public.verify(commit)
        following = PublicGroup(verified.next_state())
        added = {
            kp.device_id.decode(): leaf
            for kp, leaf in zip(commit.content.adds, verified.added, strict=True)
        }
        registry = Registry(session)
        registry.append_commit(
            body.group_id,
            epoch=body.epoch,
            committer=sender,
            commit=body.commit,
            welcome=None if welcome is None else welcome.welcome,
            public_tree=codec.encode(following.to_state()),
            group_context=following.state.group_context(),
            added=added,
            removed=removes,
            now=now,
            now_ms=self._ms(now),
        )
        below = body.epoch + 1 - self.settings.retention_epochs
        if below > 0:
            registry.prune_commit_log(body.group_id, below)
        details: dict[str, str | int | None] = {
            "epoch": body.epoch,
            "new_epoch": body.epoch + 1,
            "adds": ",".join(adds),
            "removes": ",".join(removes),
            "command_id": None if body.command_id is None else body.command_id.hex(),
        }
        audit.append(
            session,
            now=now,
            actor=f"device:{sender}",
            action="group.commit",
            target=body.group_id,
            outcome=Outcome.ACCEPTED,
            details=details,
        )
        session.execute(
            delete(HeldMessage).where(
                HeldMessage.group_id == body.group_id,
                HeldMessage.epoch == body.epoch,
            )
        )
        # The job ends in the commit's own transaction: no instance can see the epoch moved
        # and the job still in flight.
        finished = job if job is not None and _end_job(session, job, JobState.DONE) else None
        head = None if finished is not None else self._head(body.group_id, session)

        def post() -> None:
            group_id, epoch = body.group_id, body.epoch
            self.metrics.commits.inc("accepted")
            log.info(
                "accepted the commit of %s for %s epoch %s -> %s (adds %s, removes %s)",
                sender,
                group_id,
                epoch,
                epoch + 1,
                adds or "-",
                removes or "-",
            )
            relay = CommitMessage(group_id, epoch, body.commit, body.command_id)
            self._send(group_commit_topic(group_id), relay, to=group_id, now=now)
            if welcome is not None:
                for device_id in adds:
                    self._send(
                        device_cmd_topic(device_id),
                        WelcomeDelivery(group_id, epoch + 1, welcome.welcome),
                        to=device_id,
                        now=now,
                    )
            if finished is not None:
                self._job_ended(finished, now)
            elif head is not None and head.state is JobState.REQUESTED:
                # Another member's self-update won the epoch the request was made for: ask
                # again at the new epoch.
                head.state = JobState.WAITING
                head.tried.clear()
                self._start(head, now)
            self._group_changed(group_id, now)

        return post

    def _on_ack(self, session: Session, sender: str, body: AckBody, now: int) -> Post:
        Registry(session).record_ack(
            body.group_id,
            epoch=body.epoch,
            device_id=sender,
            epoch_authenticator=body.epoch_authenticator,
            now=now,
            now_ms=self._ms(now),
        )
        started = session.get(CommitLogEntry, (body.group_id, body.epoch - 1))
        accepted_ms = None if started is None else _commit_ms(started)

        def post() -> None:
            log.debug("ack from %s for %s epoch %s", sender, body.group_id, body.epoch)
            if accepted_ms is not None:
                self.metrics.ack_latency.observe(max(0, self._ms(now) - accepted_ms) / 1000)
            self._group_changed(body.group_id, now)

        return post

    def _on_acks(self, acks: list[VerifiedMessage], now: int) -> None:
        """Take the acks received together (``acks`` is emptied) in one transaction: the same
        checks and writes per ack as ``_accept_and`` + ``_on_ack``, then one progress check per
        group and one catch-up pass for the senders.

        Every sender's replay row is locked first, in sorted order (``store.lock_guards``), so
        two instances locking overlapping sets cannot deadlock; each ack is then checked against
        its sender's window under that lock. An ack refused here (replay, not a member, epoch
        ahead, changed authenticator, quarantined sender) is refused alone: all of those checks
        run before the ack writes anything, and its replay window is updated on a copy that is
        kept only when the ack is taken, so the others' effects commit and its own do not, as if
        it had been handled on its own. If the transaction itself fails, each ack is tried on
        its own."""
        if not acks:
            return
        batch = list(acks)
        acks.clear()
        taken: list[tuple[VerifiedMessage, int | None]] = []
        refused: list[tuple[VerifiedMessage, ProtocolError]] = []

        def work(session: Session) -> None:
            taken.clear()
            refused.clear()
            senders = sorted({m.sender for m in batch})
            # Loaded once for the batch (the session's identity map then answers the per-ack
            # reads without a query); ``held`` keeps them there.
            held: list[object] = [*store.lock_guards(session, senders)]
            held += session.scalars(select(Device).where(Device.device_id.in_(senders)))
            for group_id in sorted({m.body.group_id for m in batch if isinstance(m.body, AckBody)}):
                held += session.scalars(
                    select(GroupMember).where(
                        GroupMember.group_id == group_id, GroupMember.device_id.in_(senders)
                    )
                )
            registry = Registry(session)
            guards: dict[str, ReplayGuard] = {}
            for message in batch:
                sender = message.sender
                body = message.body
                assert isinstance(body, AckBody)
                guard = guards.get(sender)
                if guard is None:
                    guard = store.load_guard(session, sender)
                trial = copy.deepcopy(guard)
                try:
                    trial.accept(message)
                    # the registry judges epochs (see _accept_and)
                    trial.forget_group(body.group_id)
                    if registry.device(sender).state is DeviceState.QUARANTINED:
                        raise ProtocolError(
                            "ds.device.quarantined",
                            f"device {sender!r} is quarantined: only attestation reports are taken",
                        )
                    registry.record_ack(
                        body.group_id,
                        epoch=body.epoch,
                        device_id=sender,
                        epoch_authenticator=body.epoch_authenticator,
                        now=now,
                        now_ms=self._ms(now),
                    )
                except ProtocolError as err:
                    refused.append((message, err))
                    continue
                guards[sender] = trial
                started = session.get(CommitLogEntry, (body.group_id, body.epoch - 1))
                taken.append((message, None if started is None else _commit_ms(started)))
            for sender in sorted(guards):
                store.save_guard(session, sender, guards[sender], now=now)
            if guards:
                session.execute(
                    update(Device)
                    .where(Device.device_id.in_(sorted(guards)))
                    .values(last_seen=now)
                    .execution_options(synchronize_session=False)
                )

        try:
            self._tx(work)
        except (KeyfleetError, SQLAlchemyError) as exc:
            if len(batch) == 1:
                raise
            log.warning("a batch of %d acks failed (%s); taking them one by one", len(batch), exc)
            for message in batch:
                try:
                    self._on_device_message(message, now)
                except (KeyfleetError, SQLAlchemyError) as one:
                    log.error("handling an ack from %s failed: %s", message.sender, one)
            return
        behind: list[str] = []
        for message, err in refused:
            body = message.body
            assert isinstance(body, AckBody)
            self._refuse(
                err,
                actor=f"device:{message.sender}",
                action=message.type,
                target=body.group_id,
                now=now,
                details={"type": message.type, "epoch": body.epoch},
            )
            if not err.check.startswith("replay."):
                behind.append(message.sender)  # alive and authentic: it must still catch up
        groups: list[str] = []
        current: set[tuple[str, str, int]] = set()
        for message, accepted_ms in taken:
            body = message.body
            assert isinstance(body, AckBody)
            self.metrics.reports.inc(message.type)
            log.debug("ack from %s for %s epoch %s", message.sender, body.group_id, body.epoch)
            if accepted_ms is not None:
                self.metrics.ack_latency.observe(max(0, self._ms(now) - accepted_ms) / 1000)
            if body.group_id not in groups:
                groups.append(body.group_id)
            current.add((body.group_id, message.sender, body.epoch))
            behind.append(message.sender)
        for group_id in groups:
            self._group_changed(group_id, now)
        self._catch_up_many(list(dict.fromkeys(behind)), now, acked=current)

    # -- catch-up ----------------------------------------------------------------------------

    def _known_epoch(self, session: Session, group_id: str, device_id: str, joined: int) -> int:
        acked = session.scalar(
            select(func.max(AckRow.epoch)).where(
                AckRow.group_id == group_id, AckRow.device_id == device_id
            )
        )
        committed = session.scalar(
            select(func.max(CommitLogEntry.epoch)).where(
                CommitLogEntry.group_id == group_id, CommitLogEntry.committer == device_id
            )
        )
        known = joined
        if acked is not None:
            known = max(known, int(acked))
        if committed is not None:
            known = max(known, int(committed) + 1)
        return known

    def _catch_up(self, device_id: str, now: int) -> None:
        """Replay the commits a member missed on its command topic; if retention dropped them,
        re-add it with a fresh welcome (docs/service.md, "Catch-up")."""
        self._catch_up_many([device_id], now)

    def _catch_up_many(
        self,
        device_ids: Sequence[str],
        now: int,
        *,
        acked: AbstractSet[tuple[str, str, int]] = frozenset(),
    ) -> None:
        """``_catch_up`` for several devices, in one read session. ``acked`` holds (group,
        device, epoch) of acks just committed: a device whose ack is for its group's current
        epoch is known to be there, and its epoch queries are skipped."""
        if not device_ids:
            return

        def plan(session: Session) -> list[tuple[str, _Replays, list[str]]]:
            registry = Registry(session)
            memberships: dict[str, list[GroupMember]] = {}
            for row in session.scalars(
                select(GroupMember)
                .where(GroupMember.device_id.in_(sorted(set(device_ids))))
                .order_by(GroupMember.device_id, GroupMember.group_id)
            ):
                memberships.setdefault(row.device_id, []).append(row)
            groups: dict[str, GroupRecord] = {}
            plans = []
            for device_id in device_ids:
                replays, readd = self._plan_catch_up(
                    session,
                    registry,
                    device_id,
                    memberships=memberships.get(device_id, []),
                    groups=groups,
                    acked=acked,
                    now=now,
                )
                if replays or readd:
                    plans.append((device_id, replays, readd))
            return plans

        for device_id, replays, readd in self._read(plan):
            self._send_catch_up(device_id, replays, readd, now)

    def _plan_catch_up(
        self,
        session: Session,
        registry: Registry,
        device_id: str,
        *,
        memberships: Sequence[GroupMember],
        groups: dict[str, GroupRecord],
        acked: AbstractSet[tuple[str, str, int]],
        now: int,
    ) -> tuple[_Replays, list[str]]:
        """What to send ``device_id`` so it catches up: (group, commits, current epoch) to
        replay, and the groups whose needed commits retention dropped (re-add)."""
        replays: _Replays = []
        readd: list[str] = []
        for member in memberships:
            if member.leaf_index is None or member.pending is PendingChange.REMOVE:
                continue
            group = groups.get(member.group_id)
            if group is None:
                group = groups[member.group_id] = registry.group(member.group_id)
            if (group.group_id, device_id, group.epoch) in acked:
                continue
            known = self._known_epoch(session, group.group_id, device_id, member.joined_epoch or 0)
            if known >= group.epoch:
                continue
            if self._catchup_sent.get((group.group_id, device_id), (-1, -1, -1))[:2] == (
                known,
                group.epoch,
            ) and now - self._catchup_sent[(group.group_id, device_id)][2] < (
                self.settings.catchup_repeat
            ):
                continue
            try:
                commits = registry.commits_from(group.group_id, known)
            except ProtocolError as err:
                if err.check == "ds.catchup.pruned":
                    readd.append(group.group_id)
                continue
            if len(commits) == 1 and now - commits[0].accepted_at < self.settings.catchup_grace:
                continue  # the relay on grp/G/commit is still on its way
            replays.append(
                (
                    group.group_id,
                    [CommitMessage(c.group_id, c.epoch, c.commit) for c in commits],
                    group.epoch,
                )
            )
        return replays, readd

    def _send_catch_up(
        self,
        device_id: str,
        replays: _Replays,
        readd: list[str],
        now: int,
    ) -> None:
        for group_id, commits, current in replays:
            log.info(
                "catch-up: %s is behind in %s; replaying %d commit(s) up to epoch %s",
                device_id,
                group_id,
                len(commits),
                current,
            )
            for message in commits:
                self._send(device_cmd_topic(device_id), message, to=device_id, now=now)
            self._catchup_sent[(group_id, device_id)] = (commits[0].epoch, current, now)
        for group_id in readd:
            self._readd(group_id, device_id, now)

    def _readd(self, group_id: str, device_id: str, now: int) -> None:
        def work(session: Session) -> bool:
            if any(
                row.action == CommitAction.ADD.value and row.member == device_id
                for row in _open_job_rows(session, group_id)
            ):
                return False  # a re-add (or an operator's add) is already under way
            registry = Registry(session)
            others = [
                m
                for m in registry.members(group_id)
                if m.leaf_index is not None and m.device_id != device_id
            ]
            if not others:
                return False
            registry.request_remove(group_id, device_id, now=now)
            audit.append(
                session,
                now=now,
                actor="service",
                action="group.readd",
                target=group_id,
                outcome=Outcome.ACCEPTED,
                reason="the member is behind the commit log's retention: fresh welcome",
                details={"device": device_id},
            )
            for action in (CommitAction.REMOVE, CommitAction.ADD):
                _insert_job(
                    session, Job(action, group_id, device_id, self._new_id(), persistent=True), now
                )
            return True

        if not self._tx(work):
            return
        log.info(
            "catch-up: %s is beyond retention in %s; removing and re-adding it", device_id, group_id
        )
        self._start_next(group_id, now)

    # -- operators -----------------------------------------------------------------------------

    def _operator_resolver(
        self, operator: str, found: dict[str, Role], now: int
    ) -> Callable[[Session], KeyResolver]:
        def make(session: Session) -> KeyResolver:
            def resolve(kid: bytes) -> Signer:
                row = session.get(OperatorKey, operator)
                if row is None or row.kid != kid.hex():
                    raise LookupError(operator)
                cert = pki.cert_from_pem(row.cert_pem.encode())
                record = Registry(session).operator(operator)
                if record.cert_fingerprint != cert_fingerprint(cert):
                    raise ProtocolError(
                        "op.certificate", f"operator {operator!r} has another certificate now"
                    )
                # Re-checked on every command: an expired certificate stops working at once.
                pki.verify_certificate(
                    cert, self._operator_ca, now=datetime.fromtimestamp(now, UTC), purpose="client"
                )
                found["role"] = record.role
                public_key = cert.public_key()
                assert isinstance(public_key, ec.EllipticCurvePublicKey)  # pki checked P-256
                return Signer(operator, public_key)

            return resolve

        return make

    def _on_operator(self, operator: str, payload: bytes, now: int) -> None:
        actor = f"operator:{operator}"
        found: dict[str, Role] = {}
        make = self._operator_resolver(operator, found, now)
        # operator seqs are clock readings: a window as wide as the commands' freshness
        window = store.operator_replay_window(self.settings.operator_max_age)
        try:
            message = self._open(
                payload,
                make,
                now=now,
                max_age=self.settings.operator_max_age,
                replay_window=window,
            )
        except ProtocolError as err:
            self._refuse(
                err,
                actor=actor,
                action="operator.command",
                target=operator,
                now=now,
                audit_benign=True,
            )
            return
        body = message.body
        command_id: bytes | None = getattr(body, "command_id", None)
        target = _target_of(body)
        details: dict[str, str | int | None] = {
            "command_id": None if command_id is None else command_id.hex()
        }
        try:
            required = REQUIRED_ROLE.get(message.type)
            if required is None or command_id is None:
                raise ProtocolError("op.type", f"{message.type} is not an operator command")
            role = found["role"]
            if not role.allows(required):
                raise ProtocolError(
                    "op.role", f"{message.type} needs role {required.value}; {operator} is {role}"
                )
            post = self._accept_and(
                message,
                now,
                lambda s: self._dispatch_operator(s, message, command_id, now),
                replay_window=window,
            )
        except ProtocolError as err:
            self._refuse(
                err, actor=actor, action=message.type, target=target, now=now, details=details
            )
            if command_id is not None and err.check not in (
                "replay.duplicate",
                "op.command_id.reused",
            ):
                self._send(
                    operator_result_topic(operator),
                    OperatorResult(
                        command_id, ResultStatus.REJECTED, f"[{err.check}] {err.reason}", (), ()
                    ),
                    to=operator,
                    now=now,
                )
            return
        self.metrics.commands.inc(message.type)
        if post is not None:
            post()

    def _dispatch_operator(
        self, session: Session, message: VerifiedMessage, command_id: bytes, now: int
    ) -> Post:
        operator = message.sender
        body = message.body
        if store.command_seen(session, command_id):
            raise ProtocolError("op.command_id.reused", "this command id was already used")
        registry = Registry(session)
        jobs: list[Job] = []
        groups: set[str] = set()
        if isinstance(body, Rekey):
            registry.group(body.group_id)
            jobs.append(Job(CommitAction.UPDATE, body.group_id, None, self._new_id()))
            groups.add(body.group_id)
        elif isinstance(body, GroupCreate):
            if _pending_create(session, body.group_id):
                raise ProtocolError(
                    "registry.group.exists", f"group {body.group_id!r} is being created"
                )
            if body.group_id in {g.group_id for g in registry.groups()}:
                raise ProtocolError(
                    "registry.group.exists", f"group {body.group_id!r} already exists"
                )
            for device_id in body.members:
                _check_eligible(registry, device_id, body.group_id)
            jobs.append(
                Job(
                    CommitAction.CREATE,
                    body.group_id,
                    None,
                    self._new_id(),
                    candidates=body.members,
                )
            )
            jobs.extend(
                Job(CommitAction.ADD, body.group_id, device_id, self._new_id())
                for device_id in body.members[1:]
            )
            groups.add(body.group_id)
        elif isinstance(body, GroupAdd):
            _check_eligible(registry, body.device_id, body.group_id)
            if not _pending_create(session, body.group_id):
                registry.group(body.group_id)
                current = {m.device_id: m for m in registry.members(body.group_id)}
                existing = current.get(body.device_id)
                if existing is not None and existing.leaf_index is not None:
                    raise ProtocolError(
                        "ds.group.member",
                        f"device {body.device_id!r} is already a member of {body.group_id!r}",
                    )
                registry.request_add(body.group_id, body.device_id, now=now)
            jobs.append(Job(CommitAction.ADD, body.group_id, body.device_id, self._new_id()))
            groups.add(body.group_id)
        elif isinstance(body, Revoke):
            registry.set_device_state(
                body.device_id,
                DeviceState.REVOKED,
                reason=body.reason or f"revoked by {operator}",
                now=now,
            )
            jobs, groups = self._plan_removal(session, body.device_id, now)
        elif isinstance(body, AttestDevice):
            return self._dispatch_attest(session, operator, body, command_id, now)
        else:  # pragma: no cover - REQUIRED_ROLE lists exactly the types above
            raise ProtocolError("op.type", f"{message.type} is not an operator command")
        store.record_command(session, command_id, operator=operator, type_=message.type, now=now)
        target = _target_of(body)
        audit.append(
            session,
            now=now,
            actor=f"operator:{operator}",
            action=message.type,
            target=target,
            outcome=Outcome.ACCEPTED,
            # at_ms: when it was accepted, in ms (the entry's time is whole seconds); the
            # dashboard times a rekey from it to the result's at_ms
            details={"command_id": command_id.hex(), "jobs": len(jobs), "at_ms": self._ms(now)},
        )
        # Earlier changes only: a revocation's removal jobs are already inserted
        # (``_plan_removal``) and must not count as queued ahead of themselves.
        own = {job.id for job in jobs if job.id}
        ahead = sum(1 for g in groups for row in _open_job_rows(session, g) if row.id not in own)
        operation = Operation(
            command_id=command_id,
            operator=operator,
            type=message.type,
            target=target,
            groups=groups,
            jobs=jobs,
            last_progress=now,
        )
        # The operation and its jobs commit with the command: an instance that dies right
        # after leaves them for the others (nothing lives only in this process).
        session.add(
            OperationRow(
                command_id=command_id.hex(),
                operator=operator,
                type=message.type,
                target=target,
                groups="," + ",".join(sorted(groups)) + ",",
                last_progress=now,
                created_at=now,
                accepted_by=self.instance,
            )
        )
        session.flush()
        for job in jobs:
            if job.id == 0:
                job.command_id = command_id
                _insert_job(session, job, now)
            else:  # a removal _plan_removal already inserted
                job.command_id = command_id
                session.execute(
                    update(JobRow)
                    .where(JobRow.id == job.id)
                    .values(command_id=command_id.hex())
                    .execution_options(synchronize_session=False)
                )

        def post() -> None:
            log.info(
                "accepted %s from %s on %s (%d job(s), %d queued ahead)",
                message.type,
                operator,
                target,
                len(jobs),
                ahead,
            )
            if isinstance(body, Revoke):
                self._cancel_adds_of(body.device_id, now)
            detail = f"{len(jobs)} group change(s)"
            if ahead:
                detail += f"; queued behind {ahead} earlier change(s)"
            self._result(operation, ResultStatus.ACCEPTED, detail, now=now)
            for group_id in sorted(groups):
                self._start_next(group_id, now)
            fresh = self._load_operation(command_id)
            if fresh is not None:
                self._progress(fresh, now)

        return post

    def _plan_removal(
        self, session: Session, device_id: str, now: int
    ) -> tuple[list[Job], set[str]]:
        """Mark ``device_id`` pending removal in every group it is in (pending adds are
        withdrawn) and make one persistent remove job per group where it holds a leaf: the
        revocation's and the quarantine's path out of the groups. The jobs are inserted in the
        caller's transaction; after it committed, the caller starts them (and cancels queued adds
        of the device)."""
        registry = Registry(session)
        jobs: list[Job] = []
        groups: set[str] = set()
        for member in registry.groups_of(device_id):
            registry.request_remove(member.group_id, device_id, now=now)
            if member.leaf_index is not None:
                job = Job(
                    CommitAction.REMOVE,
                    member.group_id,
                    device_id,
                    self._new_id(),
                    persistent=True,
                )
                _insert_job(session, job, now)
                jobs.append(job)
                groups.add(member.group_id)
        return jobs, groups

    # -- attestation ---------------------------------------------------------------------------

    def _issue_challenge(self, session: Session, device_id: str, now: int) -> AttestChallenge:
        settings = self.attestation
        assert settings is not None
        challenge = store.issue_challenge(
            session,
            device_id,
            self._rng(NONCE_SIZE),
            settings.policy.pcrs,
            now=now,
            ttl=settings.nonce_ttl,
            max_open=settings.max_open,
        )
        return AttestChallenge(challenge.nonce, challenge.pcrs)

    def challenge(self, device_id: str, now: int) -> list[Publish]:
        """Challenge ``device_id`` now (what the schedule and ``op.attest`` do); returns the
        publish. Raises ``ProtocolError`` if the device cannot be attested."""
        self._ensure_started(now)
        self._challenge(device_id, now)
        return self._flush()

    def _challenge(self, device_id: str, now: int, *, scheduled: bool = False) -> bool:
        """Challenge ``device_id``; with ``scheduled`` only if no instance challenged it within
        the interval (the schedule row is the claim). False: it was not due after all."""

        def work(session: Session) -> AttestChallenge | None:
            self._check_attestable(Registry(session), device_id)
            assert self.attestation is not None
            if not store.claim_challenge_slot(
                session,
                device_id,
                now=now,
                interval=self.attestation.interval,
                force=not scheduled,
            ):
                return None
            return self._issue_challenge(session, device_id, now)

        body = self._tx(work)
        if body is None:
            self.metrics.claims_lost.inc("challenge")
            return False
        self.metrics.challenges.inc("schedule" if scheduled else "operator")
        self._send(device_cmd_topic(device_id), body, to=device_id, now=now)
        return True

    def _check_attestable(self, registry: Registry, device_id: str) -> DeviceRecord:
        if self.attestation is None:
            raise ProtocolError("op.unsupported", "attestation is not configured")
        device = registry.device(device_id)
        if device.state not in _ATTESTABLE:
            raise ProtocolError(
                "attest.device.state", f"device {device_id!r} is {device.state.value}"
            )
        if device.ak_public is None:
            raise ProtocolError(
                "attest.device.ak", f"device {device_id!r} has no AK registered: not attestable"
            )
        return device

    def _dispatch_attest(
        self, session: Session, operator: str, body: AttestDevice, command_id: bytes, now: int
    ) -> Post:
        registry = Registry(session)
        self._check_attestable(registry, body.device_id)
        challenge = self._issue_challenge(session, body.device_id, now)
        assert self.attestation is not None
        store.claim_challenge_slot(
            session, body.device_id, now=now, interval=self.attestation.interval, force=True
        )
        session.add(
            AttestOperationRow(
                nonce=challenge.nonce.hex(),
                command_id=command_id.hex(),
                operator=operator,
                device_id=body.device_id,
                deadline=now + self.settings.ack_timeout,
            )
        )
        store.record_command(session, command_id, operator=operator, type_=body.TYPE, now=now)
        audit.append(
            session,
            now=now,
            actor=f"operator:{operator}",
            action=body.TYPE,
            target=body.device_id,
            outcome=Outcome.ACCEPTED,
            details={"command_id": command_id.hex()},
        )

        def post() -> None:
            self.metrics.challenges.inc("operator")
            log.info("attestation of %s requested by %s: challenge sent", body.device_id, operator)
            self._send(
                operator_result_topic(operator),
                OperatorResult(
                    command_id,
                    ResultStatus.ACCEPTED,
                    f"challenge sent to {body.device_id}",
                    (),
                    (body.device_id,),
                ),
                to=operator,
                now=now,
            )
            self._send(device_cmd_topic(body.device_id), challenge, to=body.device_id, now=now)

        return post

    def _on_attest_report(
        self,
        session: Session,
        sender: str,
        body: AttestReport,
        message: VerifiedMessage,
        now: int,
    ) -> Post:
        """Verify a report against the challenge it answers; record, audit, maybe quarantine.
        A report that answers no open challenge of this device (unknown, replayed, expired
        nonce) is refused and changes nothing; any other failure is an untrusted verdict."""
        settings = self.attestation
        if settings is None:
            raise ProtocolError("op.unsupported", "attestation is not configured")
        registry = Registry(session)
        device = registry.device(sender)
        challenge = store.consume_challenge(session, sender, body.nonce, now=now)
        waiting = _take_attest_operation(session, body.nonce)
        if device.ak_public is None:
            raise ProtocolError("attest.device.ak", f"device {sender!r} has no AK registered")
        try:
            verdict = verify_evidence(
                Evidence.from_report(body),
                ak_public=public_key_from_area(device.ak_public),
                challenge=challenge,
                policy=settings.policy,
            )
        except AttestationRefused as refused:
            verdict = refused.verdict
        registry.record_attestation(
            sender,
            AttestationResult.TRUSTED if verdict.trusted else AttestationResult.UNTRUSTED,
            reason=verdict.summary,
            now=now,
        )
        items = [
            KeyStateReport(key_name=record.name, state=state, at=at)
            for record in body.keys
            for state, at in record.transitions
        ]
        keys_note: str | None = None
        try:
            registry.record_report(sender, message.message_id, items, now=now)
        except ProtocolError as err:
            # record_report checks everything before changing anything: the verdict stands
            keys_note = f"[{err.check}] {err.reason}"
        audit.append(
            session,
            now=now,
            actor=f"device:{sender}",
            action="attest.verdict",
            target=sender,
            outcome=Outcome.ACCEPTED,
            reason=verdict.summary[:1000],
            details={
                "result": "trusted" if verdict.trusted else "untrusted",
                "check": verdict.check,
                "component": verdict.failing_component,
                "keys": keys_note,
            },
        )
        jobs: list[Job] = []
        groups: set[str] = set()
        change = ""
        if not verdict.trusted and settings.quarantine and device.state in _GROUP_ELIGIBLE:
            registry.set_device_state(
                sender,
                DeviceState.QUARANTINED,
                reason=f"attestation: {verdict.summary}"[:1000],
                now=now,
            )
            jobs, groups = self._plan_removal(session, sender, now)
            audit.append(
                session,
                now=now,
                actor="service",
                action="device.quarantine",
                target=sender,
                outcome=Outcome.ACCEPTED,
                reason=verdict.summary[:1000],
                details={
                    "groups": ",".join(sorted(groups)),
                    "component": verdict.failing_component,
                },
            )
            change = "quarantined" + (
                f"; removal from {', '.join(sorted(groups))} queued" if groups else ""
            )
        elif verdict.trusted and device.state in (DeviceState.REGISTERED, DeviceState.QUARANTINED):
            registry.set_device_state(
                sender, DeviceState.ACTIVE, reason="attestation: trusted", now=now
            )
            audit.append(
                session,
                now=now,
                actor="service",
                action="device.activate",
                target=sender,
                outcome=Outcome.ACCEPTED,
                reason=f"was {device.state.value}; attestation trusted",
                details={},
            )
            change = "active" + (
                " (not re-added to any group: `keyfleet group add`)"
                if device.state is DeviceState.QUARANTINED
                else ""
            )

        def post() -> None:
            log.info(
                "attestation of %s: %s %s%s",
                sender,
                "trusted" if verdict.trusted else "UNTRUSTED",
                verdict.summary,
                f" -> {change}" if change else "",
            )
            self.metrics.attestations.inc("trusted" if verdict.trusted else "untrusted")
            if jobs:
                self._cancel_adds_of(sender, now)
                for group_id in sorted(groups):
                    self._start_next(group_id, now)
            if waiting is not None:
                self._attest_result(waiting, verdict, change, now)

        return post

    def _attest_result(
        self, operation: _AttestOperation, verdict: AttestationVerdict, change: str, now: int
    ) -> None:
        word = "trusted" if verdict.trusted else "untrusted"
        detail = f"{operation.device_id} {word}: {verdict.summary}"
        if change:
            detail += f"; {change}"
        status = ResultStatus.DONE if verdict.trusted else ResultStatus.FAILED
        self._attest_finish(operation, status, detail, now, acked=(operation.device_id,))

    def _attest_finish(
        self,
        operation: _AttestOperation,
        status: ResultStatus,
        detail: str,
        now: int,
        *,
        acked: Sequence[str] = (),
        pending: Sequence[str] = (),
    ) -> None:
        self._send(
            operator_result_topic(operation.operator),
            OperatorResult(
                operation.command_id, status, detail[:1000], tuple(acked), tuple(pending)
            ),
            to=operation.operator,
            now=now,
        )
        audit.record(
            self._sessions,
            now=now,
            actor="service",
            action=f"{AttestDevice.TYPE}.result",
            target=operation.device_id,
            outcome=Outcome.ACCEPTED,
            reason=f"{status.value}: {detail}"[:1000],
            details={"command_id": operation.command_id.hex(), "operator": operation.operator},
        )

    def _attest_tick(self, now: int) -> None:
        """Operator attestations that got no report in time end in ``timeout`` (the instance
        that deletes the waiting row reports it); every ``ATTEST_SCAN_SECONDS`` one instance,
        the one that claims the ``attest.scan`` task, challenges the devices that are due."""
        expired = self._read(
            lambda s: list(
                s.scalars(
                    select(AttestOperationRow.nonce).where(AttestOperationRow.deadline <= now)
                )
            )
        )
        for nonce in expired:
            operation = self._tx(partial(_take_attest_operation, nonce=bytes.fromhex(nonce)))
            if operation is None:
                continue  # the report or another instance's tick came first
            self._attest_finish(
                operation,
                ResultStatus.TIMEOUT,
                f"no attestation report from {operation.device_id} within "
                f"{self.settings.ack_timeout}s",
                now,
                pending=(operation.device_id,),
            )
        if self.attestation is None or not self._claim_task("attest.scan", now):
            return
        interval = self.attestation.interval

        def due(session: Session) -> list[str]:
            store.forget_challenges(session, now=now)
            challenged = store.last_challenged(session)
            found = []
            for device in Registry(session).devices():
                if device.state not in _ATTESTABLE or device.ak_public is None:
                    continue
                heard = max(self._last_heard.get(device.device_id, -1), device.last_seen or -1)
                if heard < now - self.settings.online_window:
                    continue  # offline: the challenge would expire in its session queue
                # A device never attested is due at once; otherwise one interval after its
                # last verdict or challenge (by any instance: the schedule table).
                last = challenged.get(device.device_id)
                if device.attested_at is not None:
                    last = max(last or 0, device.attested_at)
                if last is not None and now - last < interval:
                    continue
                found.append(device.device_id)
            return found

        try:
            for device_id in self._tx(due):
                try:
                    challenged = self._challenge(device_id, now, scheduled=True)
                except ProtocolError as err:
                    log.warning("could not challenge %s: [%s] %s", device_id, err.check, err.reason)
                else:
                    if challenged:
                        log.info("scheduled attestation: challenged %s", device_id)
        finally:
            self._finish_task("attest.scan", now + ATTEST_SCAN_SECONDS)

    def _claim_task(self, name: str, now: int) -> bool:
        # A read first: most ticks find the task not due, and a claim attempt would take the
        # database's write lock (all of SQLite) for nothing.
        row = self._read(lambda s: s.get(TaskLease, name))
        if row is not None and (
            row.due_at > now or (row.claimed_until > now and row.claimed_by != self.instance)
        ):
            return False
        claimed = self._tx(
            lambda s: store.claim_task(
                s, name, instance=self.instance, now=now, lease=TASK_LEASE_SECONDS
            )
        )
        if claimed:
            self.metrics.tasks.inc(name)
        return claimed

    def _finish_task(self, name: str, next_due: int) -> None:
        self._tx(lambda s: store.finish_task(s, name, instance=self.instance, next_due=next_due))

    def _prune_tick(self, now: int) -> None:
        """Once a minute fleet-wide: held halves nobody completed, ended jobs of ended
        operations, operations finished a day ago."""
        if not self._claim_task("service.prune", now):
            return

        def work(session: Session) -> None:
            session.execute(
                delete(HeldMessage).where(
                    HeldMessage.received_at < now - self.settings.commit_request_timeout
                )
            )
            finished = select(OperationRow.command_id).where(OperationRow.finished_at.is_not(None))
            session.execute(
                delete(JobRow).where(
                    JobRow.state.in_(sorted(_TERMINAL)),
                    (JobRow.command_id.is_(None)) | JobRow.command_id.in_(finished),
                )
            )
            session.execute(delete(OperationRow).where(OperationRow.finished_at < now - 86_400))

        try:
            self._tx(work)
        finally:
            self._finish_task("service.prune", now + PRUNE_SECONDS)

    # -- jobs ----------------------------------------------------------------------------------

    def _head(self, group_id: str, session: Session | None = None) -> Job | None:
        """The group's job in flight (the slot holder), else its oldest queued job."""
        if session is None:
            return self._read(lambda s: _head_job(s, group_id))
        return _head_job(session, group_id)

    def _enqueue(self, job: Job, now: int) -> None:
        self._tx(lambda s: _insert_job(s, job, now))
        self._start_next(job.group_id, now)

    def _touch(self, job: Job, now: int) -> None:
        if job.command_id is None:
            return
        key = job.command_id.hex()
        self._tx(
            lambda s: s.execute(
                update(OperationRow)
                .where(OperationRow.command_id == key, OperationRow.last_progress < now)
                .values(last_progress=now)
                .execution_options(synchronize_session=False)
            )
        )

    def _claim(self, job: Job, now: int) -> bool:
        """Write the job's new state if nobody changed it since we read it, taking the group's
        slot for it: the compare-and-set that keeps one commit request per group in flight
        fleet-wide. False: another instance moved it first (it sends, we don't)."""
        previous = job.claimed_by
        lease_expired = job.lease_until != 0 and now >= job.lease_until

        def work(session: Session) -> bool:
            if not _save_job(session, job, self.instance):
                return False  # nothing written
            if not _take_slot(session, job):
                raise _SlotTaken  # roll the job's write back with the transaction
            return True

        try:
            won = self._tx(work)
        except _SlotTaken:
            won = False
        if not won:
            self.metrics.claims_lost.inc("job")
            return False
        taken_over = previous not in (None, self.instance) and lease_expired
        self.metrics.jobs.inc("taken_over" if taken_over else "claimed")
        if taken_over:
            log.info("took over %s from instance %s (its lease expired)", job.describe(), previous)
        return True

    def _start(self, job: Job, now: int) -> None:
        """Move the head job forward as far as it can go now."""
        if not job.open:
            return
        if job.action is CommitAction.ADD and job.key_package is None:
            if job.state is not JobState.KEY_PACKAGE:
                self._request_key_package(job, now)
            return
        if job.action is CommitAction.CREATE:
            candidates = job.candidates
            committer = candidates[len(job.tried) % len(candidates)]
            self._request_commit(job, committer, 0, now)
            return
        try:
            choice = self._read(lambda s: self._choose_committer(s, job, now))
        except ProtocolError as err:
            self._fail_job(job, f"[{err.check}] {err.reason}", now)
            return
        if choice is None:
            if job.state is not JobState.WAITING:
                job.state = JobState.WAITING
                self._claim(job, now)
            return
        committer, epoch = choice
        self._request_commit(job, committer, epoch, now)

    def _request_key_package(self, job: Job, now: int) -> None:
        assert job.member is not None
        job.state = JobState.KEY_PACKAGE
        job.deadline = now + self.settings.commit_request_timeout
        if not self._claim(job, now):
            return
        self._send(
            device_cmd_topic(job.member),
            KeyPackageRequest(job.request_id),
            to=job.member,
            now=now,
        )

    def _request_commit(self, job: Job, committer: str, epoch: int, now: int) -> None:
        job.state = JobState.REQUESTED
        job.committer = committer
        job.request_epoch = epoch
        job.deadline = now + self.settings.commit_request_timeout
        if not self._claim(job, now):
            return
        request = CommitRequest(
            command_id=job.request_id,
            group_id=job.group_id,
            epoch=epoch,
            action=job.action,
            member=job.member if job.action in (CommitAction.ADD, CommitAction.REMOVE) else None,
            key_package=job.key_package if job.action is CommitAction.ADD else None,
        )
        log.info("asked %s to commit %s at epoch %s", committer, job.describe(), epoch)
        self._send(device_cmd_topic(committer), request, to=committer, now=now)

    def _at_epoch(self, session: Session, group_id: str, epoch: int) -> set[str]:
        """Members proven to hold the group's current epoch."""
        acked = set(
            session.scalars(
                select(AckRow.device_id).where(AckRow.group_id == group_id, AckRow.epoch == epoch)
            )
        )
        if epoch == 0:
            acked.update(
                m.device_id for m in Registry(session).members(group_id) if m.leaf_index == 0
            )
        else:
            last = session.get(CommitLogEntry, (group_id, epoch - 1))
            if last is not None:
                acked.add(last.committer)
        return acked

    def _choose_committer(self, session: Session, job: Job, now: int) -> tuple[str, int] | None:
        registry = Registry(session)
        group = registry.group(job.group_id)
        members = [m for m in registry.members(job.group_id) if m.leaf_index is not None]
        if job.action is CommitAction.REMOVE:
            if not any(m.device_id == job.member for m in members):
                raise ProtocolError(
                    "ds.job.member", f"{job.member} is no longer a member of {job.group_id}"
                )
            if len(members) < 2:
                raise ProtocolError(
                    "ds.job.last_member",
                    f"{job.member} is the only member of {job.group_id}: nobody can remove it",
                )
        at_epoch = self._at_epoch(session, job.group_id, group.epoch)
        preferred: str | None = None
        if job.action is CommitAction.REMOVE:
            public, _ = self._load_public(session, job.group_id)
            target = next(m for m in members if m.device_id == job.member)
            assert target.leaf_index is not None
            near = public.tree.leaf(public.committer_for_remove(target.leaf_index))
            preferred = None if near is None else near.device_id.decode()
        elif job.prefer is not None:
            preferred = job.prefer
        candidates: list[tuple[bool, bool, int, str]] = []
        for member in members:
            device_id = member.device_id
            if device_id == job.member or member.pending is PendingChange.REMOVE:
                continue
            if device_id not in at_epoch:
                continue
            device = registry.device(device_id)
            if device.state not in _GROUP_ELIGIBLE:
                continue
            seen = max(self._last_heard.get(device_id, -1), device.last_seen or -1)
            online = seen >= now - self.settings.online_window
            candidates.append((online, device_id == preferred, seen, device_id))
        if not candidates:
            return None
        candidates.sort(reverse=True)
        untried = [c for c in candidates if c[3] not in job.tried]
        if not untried:
            job_tried_reset = candidates
            return job_tried_reset[len(job.tried) % len(candidates)][3], group.epoch
        return untried[0][3], group.epoch

    def _job_ended(self, job: Job, now: int) -> None:
        """After the transaction that ended ``job`` committed: progress, next job."""
        self._touch(job, now)
        if job.command_id is not None:
            operation = self._load_operation(job.command_id)
            if operation is not None:
                self._progress(operation, now)
        self._start_next(job.group_id, now)

    def _fail_job(self, job: Job, detail: str, now: int) -> None:
        job.detail = detail
        if not self._tx(lambda s: _end_job(s, job, JobState.FAILED)):
            return
        log.warning("gave up on %s: %s", job.describe(), detail)
        if job.command_id is not None:
            operation = self._load_operation(job.command_id)
            if operation is not None:
                self._progress(operation, now)
        self._start_next(job.group_id, now)

    def _start_next(self, group_id: str, now: int) -> None:
        head = self._head(group_id)
        if head is not None and head.state in (JobState.QUEUED, JobState.WAITING):
            self._start(head, now)

    def _cancel(self, job: Job, now: int) -> None:
        def work(session: Session) -> bool:
            if not _end_job(session, job, JobState.CANCELLED):
                return False
            if job.action is CommitAction.ADD and job.member is not None:
                registry = Registry(session)
                try:
                    rows = {m.device_id: m for m in registry.members(job.group_id)}
                except ProtocolError:
                    return True  # the group was never created
                row = rows.get(job.member)
                if row is not None and row.leaf_index is None:
                    registry.request_remove(job.group_id, job.member, now=now)
            return True

        if self._tx(work):
            self._start_next(job.group_id, now)

    def _cancel_adds_of(self, device_id: str, now: int) -> None:
        rows = self._read(
            lambda s: [
                _job_from_row(r)
                for r in s.scalars(
                    select(JobRow).where(
                        JobRow.member == device_id,
                        JobRow.action == CommitAction.ADD.value,
                        JobRow.state.not_in(sorted(_TERMINAL)),
                    )
                )
            ]
        )
        for job in rows:
            self._cancel(job, now)

    def _group_changed(self, group_id: str, now: int) -> None:
        for operation in self._load_operations(group_id):
            self._progress(operation, now)
        self._start_next(group_id, now)

    def _load_operation(self, command_id: bytes) -> Operation | None:
        def work(session: Session) -> Operation | None:
            row = session.get(OperationRow, command_id.hex())
            return None if row is None else _operation_from_row(session, row)

        operation = self._read(work)
        return None if operation is None or operation.finished else operation

    def _load_operations(self, group_id: str | None) -> list[Operation]:
        """Unfinished operations (touching ``group_id``, if given), with their jobs."""

        def work(session: Session) -> list[Operation]:
            query = select(OperationRow).where(OperationRow.finished_at.is_(None))
            if group_id is not None:
                query = query.where(OperationRow.groups.contains(f",{group_id},"))
            return [_operation_from_row(session, row) for row in session.scalars(query)]

        return self._read(work)

    def _save_progress(self, operation: Operation) -> None:
        """The operation's reporting state (what it last told the operator, the ack throttle).
        Last writer wins: two instances reporting at once at worst repeat a progress line."""
        values = {
            "last_sent": operation.last_sent,
            "throttle": json.dumps(
                [
                    operation.acks_sent_at,
                    operation.acks_step,
                    operation.acks_counts,
                    operation.acks_seen,
                    operation.acks_deferred,
                ]
            ),
        }
        key = operation.command_id.hex()

        def work(session: Session) -> None:
            session.execute(
                update(OperationRow)
                .where(OperationRow.command_id == key)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            session.execute(
                update(OperationRow)
                .where(
                    OperationRow.command_id == key,
                    OperationRow.last_progress < operation.last_progress,
                )
                .values(last_progress=operation.last_progress)
                .execution_options(synchronize_session=False)
            )

        self._tx(work)

    # -- operator results ----------------------------------------------------------------------

    def _result(
        self,
        operation: Operation,
        status: ResultStatus,
        detail: str,
        *,
        acked: Sequence[str] = (),
        pending: Sequence[str] = (),
        epoch: int | None = None,
        now: int,
    ) -> None:
        self._send(
            operator_result_topic(operation.operator),
            OperatorResult(
                operation.command_id, status, detail[:1000], tuple(acked), tuple(pending), epoch
            ),
            to=operation.operator,
            now=now,
        )

    def _ack_view(self, operation: Operation) -> tuple[list[str], list[str], int | None, bool]:
        """(acked, pending, epoch, forked) over the operation's groups at their current epochs."""

        def work(session: Session) -> tuple[list[str], list[str], int | None, bool]:
            registry = Registry(session)
            acked: set[str] = set()
            pending: set[str] = set()
            epoch: int | None = None
            forked = False
            for group_id in sorted(operation.groups):
                try:
                    status = registry.ack_status(group_id)
                except ProtocolError:
                    continue
                epoch = status.epoch
                if status.epoch == 0:
                    acked.update(status.members)  # the founder alone: nothing to agree on
                    continue
                for devices in status.by_authenticator.values():
                    acked.update(devices)
                pending.update(status.stragglers)
                forked = forked or len(status.by_authenticator) > 1
            return sorted(acked), sorted(pending), epoch, forked

        return self._read(work)

    def _progress(self, operation: Operation, now: int) -> None:
        if operation.finished:
            return
        before = _progress_state(operation)
        self._progress_step(operation, now)
        if not operation.finished and _progress_state(operation) != before:
            self._save_progress(operation)

    def _progress_step(self, operation: Operation, now: int) -> None:
        failed = [j for j in operation.jobs if j.state is JobState.FAILED]
        if failed:
            self._finish(
                operation,
                ResultStatus.FAILED,
                "; ".join(f"{j.describe()}: {j.detail}" for j in failed),
                now,
            )
            return
        open_jobs = [j for j in operation.jobs if j.state is not JobState.DONE]
        if open_jobs:
            job = open_jobs[0]
            if job.state is JobState.KEY_PACKAGE:
                stage = f"waiting for the key package of {job.member}"
            elif job.state is JobState.REQUESTED:
                stage = f"commit requested from {job.committer}"
            elif job.state is JobState.WAITING:
                stage = "waiting for a member at the current epoch"
            else:
                stage = "queued"
            done = len(operation.jobs) - len(open_jobs)
            detail = f"{done}/{len(operation.jobs)} committed; {job.describe()}: {stage}"
            key = _sent_key("jobs", detail)
            if key != operation.last_sent:
                operation.last_sent = key
                self._result(operation, ResultStatus.IN_PROGRESS, detail, now=now)
            return
        if self._ack_counts_unchanged_or_held(operation, now):
            return
        acked, pending, epoch, forked = self._ack_view(operation)
        if not pending and not forked:
            self._finish(
                operation,
                ResultStatus.DONE,
                f"every member agrees on epoch {epoch}",
                now,
                acked=acked,
                epoch=epoch,
            )
            return
        if not pending and forked:
            self._finish(
                operation,
                ResultStatus.FAILED,
                f"members acked epoch {epoch} with different epoch authenticators (fork)",
                now,
                acked=acked,
                epoch=epoch,
            )
            return
        key = _sent_key("acks", acked, pending, epoch)
        if key != operation.last_sent:
            if operation.last_sent.startswith("acks:"):
                operation.last_progress = max(operation.last_progress, now)
            total = len(acked) + len(pending)
            if not self._ack_progress_due(operation, epoch, total, len(acked), now):
                operation.acks_deferred = True
                return
            operation.last_sent = key
            operation.acks_sent_at = now
            operation.acks_step = self._ack_step(epoch, total, len(acked))
            operation.acks_counts = (epoch, total, len(acked))
            operation.acks_seen = operation.acks_counts
            operation.acks_deferred = False
            self._result(
                operation,
                ResultStatus.IN_PROGRESS,
                f"{len(acked)}/{len(acked) + len(pending)} acked epoch {epoch}",
                acked=acked,
                pending=pending,
                epoch=epoch,
                now=now,
            )

    def _ack_counts_unchanged_or_held(self, operation: Operation, now: int) -> bool:
        """The per-ack fast path: for one group already reporting acks, count acks in the
        database instead of listing them. True when nothing changed since the last result, or
        when something did and the throttle holds it back (the operation still counts as
        making progress). False means: build the full view (it may be final, or due)."""
        if len(operation.groups) != 1 or not operation.last_sent.startswith("acks:"):
            return False
        (group_id,) = operation.groups
        try:
            epoch, total, acked = self._read(lambda s: Registry(s).ack_counts(group_id))
        except ProtocolError:
            return False
        if epoch == 0 or acked >= total:
            return False
        counts = (epoch, total, acked)
        if counts == operation.acks_counts:
            operation.acks_deferred = False
            return True
        if counts != operation.acks_seen:
            operation.acks_seen = counts
            operation.last_progress = max(operation.last_progress, now)
        if self._ack_progress_due(operation, epoch, total, acked, now):
            return False
        operation.acks_deferred = True
        return True

    @staticmethod
    def _ack_step(epoch: int | None, total: int, acked: int) -> tuple[int | None, int, int]:
        return (epoch, total, acked // max(1, total // 20))

    def _ack_progress_due(
        self, operation: Operation, epoch: int | None, total: int, acked: int, now: int
    ) -> bool:
        """Whether an in-progress ack result goes out now. Each one carries the full acked and
        pending lists, so one per ack is O(N^2) bytes per rekey and, signed and published one at
        a time, was most of the service's time at N = 1000 (docs/bench/README.md). ``now`` is
        whole seconds, so the throttle is by count: the first view, every 5% of the members
        (every ack below 40 members), any change of epoch or member count, and otherwise at
        most one per second; ``tick`` sends a held-back view. The final result is never held."""
        return (
            operation.acks_sent_at is None
            or self._ack_step(epoch, total, acked) != operation.acks_step
            or now > operation.acks_sent_at
        )

    def _finish(
        self,
        operation: Operation,
        status: ResultStatus,
        detail: str,
        now: int,
        *,
        acked: Sequence[str] = (),
        pending: Sequence[str] = (),
        epoch: int | None = None,
    ) -> bool:
        """End the operation, once fleet-wide: the instance whose conditional UPDATE sets
        ``finished_at`` audits the outcome (same transaction) and tells the operator. False:
        another instance ended it first."""
        key = operation.command_id.hex()

        def work(session: Session) -> bool:
            result = session.execute(
                update(OperationRow)
                .where(OperationRow.command_id == key, OperationRow.finished_at.is_(None))
                .values(finished_at=now)
                .execution_options(synchronize_session=False)
            )
            if rowcount(result) != 1:
                return False
            audit.append(
                session,
                now=now,
                actor="service",
                action=f"{operation.type}.result",
                target=operation.target,
                outcome=Outcome.ACCEPTED,
                reason=f"{status.value}: {detail}"[:1000],
                details={
                    "command_id": key,
                    "operator": operation.operator,
                    "pending": ",".join(pending),
                    "at_ms": self._ms(now),
                },
            )
            return True

        operation.finished = True
        if not self._tx(work):
            self.metrics.claims_lost.inc("result")
            return False
        self.metrics.results.inc(status.value)
        log.info(
            "%s from %s on %s: %s (%s)",
            operation.type,
            operation.operator,
            operation.target,
            status.value,
            detail,
        )
        self._result(operation, status, detail, acked=acked, pending=pending, epoch=epoch, now=now)
        return True

    def _time_out(self, operation: Operation, now: int) -> None:
        open_jobs = [j for j in operation.jobs if j.open]
        if open_jobs:
            job = open_jobs[0]
            if job.state is JobState.KEY_PACKAGE and job.member is not None:
                pending = [job.member]
            elif job.state is JobState.REQUESTED:
                pending = sorted({*job.tried, *([job.committer] if job.committer else [])})
            else:
                pending = []
            detail = f"no progress for {self.settings.ack_timeout}s: {job.describe()} not committed"
            acked: list[str] = []
            epoch = None
        else:
            acked, pending, epoch, _ = self._ack_view(operation)
            detail = (
                f"no ack from {', '.join(pending) or 'nobody'} within {self.settings.ack_timeout}s"
            )
        if not self._finish(
            operation, ResultStatus.TIMEOUT, detail, now, acked=acked, pending=pending, epoch=epoch
        ):
            return
        for job in open_jobs:
            if not job.persistent:
                self._cancel(job, now)


# -- shared job state (service_jobs, service_group_slots, ...) ------------------------------------


class _NothingHeld(Exception):
    """Rolls back an attempt to accept a held commit whose welcome is not there."""


class _SlotTaken(Exception):
    """Rolls back a job's claim when another job of its group holds the in-flight slot."""


def _commit_ms(entry: CommitLogEntry) -> int:
    """When a commit was accepted, in ms (seconds * 1000 for one accepted before revision
    0003 recorded milliseconds)."""
    ms = entry.accepted_at_ms
    return entry.accepted_at * 1000 if ms is None else ms


def _load_senders(session: Session, devices: AbstractSet[str]) -> list[object]:
    """Load the devices' rows and replay rows into ``session`` in two queries; the caller keeps
    the returned list while it reads them (the identity map holds them only weakly)."""
    ordered = sorted(devices)
    held: list[object] = list(session.scalars(select(Device).where(Device.device_id.in_(ordered))))
    held += session.scalars(select(ReplayState).where(ReplayState.sender.in_(ordered)))
    return held


def _job_from_row(row: JobRow) -> Job:
    return Job(
        action=CommitAction(row.action),
        group_id=row.group_id,
        member=row.member,
        request_id=bytes.fromhex(row.request_id),
        command_id=None if row.command_id is None else bytes.fromhex(row.command_id),
        persistent=bool(row.persistent),
        candidates=tuple(c for c in row.candidates.split(",") if c),
        prefer=row.prefer,
        state=JobState(row.state),
        key_package=row.key_package,
        committer=row.committer,
        tried=[t for t in row.tried.split(",") if t],
        request_epoch=row.request_epoch,
        deadline=row.deadline,
        detail=row.detail,
        id=row.id,
        version=row.version,
        claimed_by=row.claimed_by,
        lease_until=row.deadline,
    )


def _job_values(job: Job) -> dict[str, object]:
    return {
        "state": job.state.value,
        "key_package": job.key_package,
        "committer": job.committer,
        "tried": ",".join(job.tried),
        "request_epoch": job.request_epoch,
        "deadline": job.deadline,
        "detail": job.detail[:1000],
    }


def _insert_job(session: Session, job: Job, now: int) -> None:
    row = JobRow(
        request_id=job.request_id.hex(),
        group_id=job.group_id,
        action=job.action.value,
        member=job.member,
        command_id=None if job.command_id is None else job.command_id.hex(),
        persistent=job.persistent,
        candidates=",".join(job.candidates),
        prefer=job.prefer,
        claimed_by=None,
        version=0,
        created_at=now,
        **_job_values(job),
    )
    session.add(row)
    session.flush()
    job.id = row.id


def _save_job(session: Session, job: Job, instance: str) -> bool:
    """Compare-and-set: write ``job`` if its row still has the version it was read at."""
    result = session.execute(
        update(JobRow)
        .where(
            JobRow.id == job.id,
            JobRow.version == job.version,
            JobRow.state.not_in(sorted(_TERMINAL)),
        )
        .values(version=job.version + 1, claimed_by=instance, **_job_values(job))
        .execution_options(synchronize_session=False)
    )
    if rowcount(result) != 1:
        return False
    job.version += 1
    job.claimed_by = instance
    return True


def _end_job(session: Session, job: Job, state: JobState) -> bool:
    """Move an open job to a terminal state and free its group's slot; False if it had ended
    already (another instance ended it)."""
    result = session.execute(
        update(JobRow)
        .where(JobRow.id == job.id, JobRow.state.not_in(sorted(_TERMINAL)))
        .values(state=state.value, detail=job.detail[:1000], version=JobRow.version + 1)
        .execution_options(synchronize_session=False)
    )
    if rowcount(result) != 1:
        return False
    session.execute(
        update(GroupSlot)
        .where(GroupSlot.group_id == job.group_id, GroupSlot.job_id == job.id)
        .values(job_id=None)
        .execution_options(synchronize_session=False)
    )
    job.state = state
    return True


def _take_slot(session: Session, job: Job) -> bool:
    """Hold the group's one in-flight slot for ``job`` (it may hold it already)."""
    open_jobs = select(JobRow.id).where(JobRow.state.not_in(sorted(_TERMINAL)))
    result = session.execute(
        update(GroupSlot)
        .where(
            GroupSlot.group_id == job.group_id,
            (GroupSlot.job_id.is_(None))
            | (GroupSlot.job_id == job.id)
            # a holder that ended without freeing the slot (it cannot, by construction; this
            # keeps a group from being stuck forever if it ever did)
            | GroupSlot.job_id.not_in(open_jobs),
        )
        .values(job_id=job.id)
        .execution_options(synchronize_session=False)
    )
    if rowcount(result) == 1:
        return True
    if session.get(GroupSlot, job.group_id) is not None:
        return False  # another job of the group is in flight
    session.add(GroupSlot(group_id=job.group_id, job_id=job.id))
    try:
        session.flush()
    except IntegrityError:
        raise RetryableConflict(f"the slot of {job.group_id!r} was created concurrently") from None
    return True


def _open_job_rows(session: Session, group_id: str) -> list[JobRow]:
    return list(
        session.scalars(
            select(JobRow)
            .where(JobRow.group_id == group_id, JobRow.state.not_in(sorted(_TERMINAL)))
            .order_by(JobRow.id)
        )
    )


def _groups_with_open_jobs(session: Session) -> list[str]:
    return list(
        session.scalars(
            select(JobRow.group_id)
            .where(JobRow.state.not_in(sorted(_TERMINAL)))
            .distinct()
            .order_by(JobRow.group_id)
        )
    )


def _head_job(session: Session, group_id: str) -> Job | None:
    holder = session.scalar(select(GroupSlot.job_id).where(GroupSlot.group_id == group_id))
    rows = _open_job_rows(session, group_id)
    for row in rows:
        if row.id == holder:
            return _job_from_row(row)
    return _job_from_row(rows[0]) if rows else None


def _pending_create(session: Session, group_id: str) -> bool:
    return any(row.action == CommitAction.CREATE.value for row in _open_job_rows(session, group_id))


def _take_held(
    session: Session, group_id: str, epoch: int, sender: str, kind: str
) -> HeldMessage | None:
    key = (group_id, epoch, sender, kind)
    row = session.get(HeldMessage, key)
    if row is None:
        return None
    result = session.execute(
        delete(HeldMessage).where(
            HeldMessage.group_id == group_id,
            HeldMessage.epoch == epoch,
            HeldMessage.sender == sender,
            HeldMessage.kind == kind,
        )
    )
    return row if rowcount(result) == 1 else None


def _take_held_commit(
    session: Session, group_id: str, epoch: int, sender: str
) -> CommitMessage | None:
    row = _take_held(session, group_id, epoch, sender, "commit")
    if row is None:
        return None
    command_id = bytes.fromhex(row.extra) if row.extra else None
    return CommitMessage(group_id, epoch, row.data, command_id)


def _take_held_welcome(
    session: Session, group_id: str, epoch: int, sender: str
) -> WelcomeMessage | None:
    row = _take_held(session, group_id, epoch, sender, "welcome")
    if row is None:
        return None
    members = tuple(m for m in row.extra.split(",") if m)
    return WelcomeMessage(group_id, epoch + 1, row.data, members)


def _take_attest_operation(session: Session, nonce: bytes) -> _AttestOperation | None:
    row = session.get(AttestOperationRow, nonce.hex())
    if row is None:
        return None
    result = session.execute(
        delete(AttestOperationRow).where(AttestOperationRow.nonce == nonce.hex())
    )
    if rowcount(result) != 1:
        return None
    return _AttestOperation(
        bytes.fromhex(row.command_id), row.operator, row.device_id, nonce, row.deadline
    )


def _tuple3(value: object) -> tuple[int | None, int, int] | None:
    if not isinstance(value, list) or len(value) != 3:
        return None
    first, total, acked = value
    return (first if isinstance(first, int) else None, int(total), int(acked))


def _operation_from_row(session: Session, row: OperationRow) -> Operation:
    jobs = [
        _job_from_row(j)
        for j in session.scalars(
            select(JobRow).where(JobRow.command_id == row.command_id).order_by(JobRow.id)
        )
    ]
    throttle = json.loads(row.throttle) if row.throttle else [None, None, None, None, False]
    sent_at, step, counts, seen, deferred = throttle
    return Operation(
        command_id=bytes.fromhex(row.command_id),
        operator=row.operator,
        type=row.type,
        target=row.target,
        groups={g for g in row.groups.split(",") if g},
        jobs=jobs,
        last_progress=row.last_progress,
        finished=row.finished_at is not None,
        last_sent=row.last_sent,
        acks_sent_at=sent_at if isinstance(sent_at, int) else None,
        acks_step=_tuple3(step),
        acks_counts=_tuple3(counts),
        acks_seen=_tuple3(seen),
        acks_deferred=bool(deferred),
    )


def _sent_key(kind: str, *parts: object) -> str:
    digest = hashlib.sha256(json.dumps(parts, default=list).encode()).hexdigest()[:32]
    return f"{kind}:{digest}"


def _progress_state(operation: Operation) -> tuple[object, ...]:
    """What is worth a write when it changes: what the operator was told and the throttle's
    send state; ``last_progress`` only moves in whole seconds (at most a write a second). The
    per-ack ``acks_seen`` is left out on purpose: another instance that reads an older one just
    counts the difference as progress, which it is."""
    return (
        operation.last_sent,
        operation.last_progress,
        operation.acks_sent_at,
        operation.acks_step,
        operation.acks_counts,
        operation.acks_deferred,
    )


# -- helpers --------------------------------------------------------------------------------------


def _devid_public_key(device: DeviceRecord) -> ec.EllipticCurvePublicKey:
    cert = pki.cert_from_pem(device.devid_cert_pem.encode())
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise ProtocolError("pki.key_type", f"device {device.device_id!r} has no ECC DevID key")
    return public_key


def _check_eligible(registry: Registry, device_id: str, group_id: str) -> None:
    device = registry.device(device_id)
    if device.state not in _GROUP_ELIGIBLE:
        raise ProtocolError(
            "registry.member.device_state",
            f"device {device_id!r} is {device.state.value} and cannot join group {group_id!r}",
        )


def _target_of(body: Body) -> str:
    for name in ("group_id", "device_id"):
        value = getattr(body, name, None)
        if isinstance(value, str):
            return value
    return body.TYPE


def _job_details(job: Job, *, epoch: int) -> dict[str, str | int | None]:
    return {
        "epoch": epoch,
        "request_id": job.request_id.hex(),
        "command_id": None if job.command_id is None else job.command_id.hex(),
    }


def describe_publishes(publishes: Iterable[Publish]) -> list[str]:
    """Topics only (for logs and tests): payloads are never logged."""
    return [p.topic for p in publishes]
