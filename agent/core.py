"""The device agent's protocol core: sans-I/O, one object per device.

``AgentCore`` turns what arrives over MQTT (bytes, a topic, the time) into what must be published,
and keeps every piece of agent state that must survive a restart: the group states
(``agent.protocol.mls.group.Group`` per group), commits this device made that the service has not
ordered yet, key packages it handed out, the replay guard, its own outgoing sequence number, the key
ledger, and the per-epoch data keys apps use. It does no I/O: the TPM enters only through a
``KeyProvider`` (DevID key for signing, leaf keys by public key), the clock as ``now`` and the
randomness as ``rng``; persisting and publishing are the caller's job (agent/daemon.py).

The contract with the caller is one rule: **when an ``Outcome`` says ``changed``, persist
``to_state()`` before publishing ``publishes`` and before acknowledging the MQTT message.** Then a
crash at any point is harmless: the broker redelivers the unacknowledged message; if the state
had been saved it is a ``replay.duplicate`` and the core answers with the very same envelopes it
made the first time (kept in a small reply cache), otherwise it is processed again. Every
outgoing envelope spends a sequence number, so it too is persisted before it leaves.

Inbound rules (docs/agent.md, "Running"): every message is verified against the service keys the
trust bundle accepts now (bundle 0: the enrollment's one key; later ones from the retained chain,
``agent.protocol.trust``), sender ``keyfleet-service``, addressed to this device or a group it
holds, then checked by the replay guard; a refusal is counted by check id and changes nothing.

Why one module of this size: it is the device's single state machine; every inbound message and
every persisted field meet here, and its consistency rule (persist before publishing) is only
checkable when the whole of it is in one place. The parts that are not state transitions live
apart: the wire format and MLS in ``agent.protocol``, persistence in ``agent.statefile``, the
key ledger in ``agent.protocol.lifecycle``, who may join or leave a group (credentials, TPM
proofs, operator approvals) in ``agent.protocol.membership``, the revocation feed a device keeps
in ``agent.protocol.feed``, the TPM in ``agent.tpm``. A join's one-time init key, the first
self-update after it and a full rekey's pending Update proposals are states of a group entry that
the same messages move, so they are here too; their pure rules (KeyPackage lifetimes, when a
fresh leaf is due) are in ``agent.protocol.initkeys``. The release bundle and a staged rollout's
``release.install`` are messages like the others: the core verifies and orders them and hands the
work to the daemon (the bundle's rules in ``agent.protocol.release`` and ``agent.releasefeed``,
the seal in ``agent.releasestate``, the update hook in the daemon).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Final, NamedTuple, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol import dataseal, trust
from agent.protocol import feed as revocation_feed
from agent.protocol.errors import ProtocolError, StateError
from agent.protocol.hpke import Rng, generate_key_pair, serialize_public_key
from agent.protocol.initkeys import (
    JOIN_UPDATE_REASON,
    UsedInitKeys,
    fresh_leaf_pending,
    init_key_name,
    key_package_lifetime,
    needs_refresh,
)
from agent.protocol.lifecycle import (
    AES_GCM_RANDOM_NONCE_LIMIT,
    KeyKind,
    KeyLedger,
    KeyRecord,
    KeyState,
    KeyStateError,
    RotationPolicy,
    rotation_due,
)
from agent.protocol.membership import Membership, MembershipState
from agent.protocol.mls import codec
from agent.protocol.mls.group import Group, OpenedWelcome, admissions_of, legacy_admissions
from agent.protocol.mls.messages import Commit, CommitContent, KeyPackage, Update, Welcome
from agent.protocol.mls.public import CommitCheck, LeafCheck, admission_hash
from agent.protocol.mls.tree import LeafNode, RatchetTree
from agent.protocol.mls.treepages import admissions_missing
from agent.protocol.release import ReleaseBundle
from agent.protocol.renewal import RenewalSchedule, validity, verify_renewed
from agent.protocol.secret import Secret
from agent.protocol.topics import (
    FEED_RECIPIENT,
    RELEASES_TOPIC,
    REVOCATION_FEED_TOPIC,
    SERVICE_ID,
    TRUST_TOPIC,
    device_cmd_topic,
    device_report_topic,
    group_of_commit_topic,
)
from agent.protocol.treefetch import TreeFetches
from agent.protocol.wire.envelope import (
    DEFAULT_MAX_AGE,
    Signer,
    VerifiedMessage,
    encode_message,
    open_message,
)
from agent.protocol.wire.messages.ack import Ack
from agent.protocol.wire.messages.attestation import AttestChallenge, AttestReport
from agent.protocol.wire.messages.base import ID_PATTERN, Body
from agent.protocol.wire.messages.feed import RevocationFeed
from agent.protocol.wire.messages.group import (
    MAX_HANDOFF_BYTES,
    REFUSAL_CHECKS,
    CommitMessage,
    CommitRefused,
    GroupAdmissions,
    GroupCreated,
    KeyPackageMessage,
    UpdateProposal,
    UpdateRequest,
    WelcomeMessage,
)
from agent.protocol.wire.messages.key_state import MAX_KEYS, MAX_REFUSED, KeyStateReport
from agent.protocol.wire.messages.release import (
    InstallResult,
    InstallState,
    ReleaseBundleMessage,
    ReleaseInstall,
)
from agent.protocol.wire.messages.renewal import (
    RenewAnswer,
    RenewChallenge,
    RenewIssued,
    RenewRequest,
)
from agent.protocol.wire.messages.service import (
    CommitAction,
    CommitRequest,
    KeyPackageRequest,
    ReportRequest,
    TreePage,
    UpdateProposalRequest,
    WelcomeDelivery,
)
from agent.protocol.wire.rejections import Rejections, is_benign
from agent.protocol.wire.replay import ReplayGuard
from agent.releasefeed import ReleaseFollower

log = logging.getLogger("keyagent.core")

STATE_VERSION: Final = 1
DATA_KEY_SIZE: Final = dataseal.KEY_SIZE
MAX_PENDING_COMMITS: Final = 4
"""Commits this device made for one epoch and still waits on (a re-sent commit request makes
another one; whichever the service relays is adopted)."""
MAX_KEY_PACKAGES: Final = 8
"""Key packages handed out and not used yet; the oldest is forgotten (and its leaf destroyed)."""
MAX_PROPOSALS: Final = 4
"""Update proposals (new leaf keys another member may commit) kept per group; the oldest is
forgotten (and its leaf key destroyed)."""
PROPOSAL_EPOCHS: Final = 4
"""Epochs an Update proposal waits to be committed (a full rekey commits its batches in
consecutive epochs right after asking); after that its leaf key is destroyed."""
REPLY_CACHE: Final = 64
# The device's replay guard for the service's messages. The service's seqs come from one counter
# shared by its instances that also follows the millisecond clock (max(last, now_ms) + 1), so two
# messages drawn 40 ms apart by two instances are 40 apart, and if the later one arrives first a
# window of 32 seq values refused the other (recovered only by the service's timeouts). Exactness
# does not depend on the window (ReplayGuard keeps a floor below which every seq is refused) and
# the envelope's age check already bounds how late a message may come; so the window is wide
# (2^32 seqs: days of the counter) and the capacity, what the state file holds, stays 32.
SERVICE_REPLAY_WINDOW: Final = 1 << 32
SERVICE_REPLAY_CAPACITY: Final = 32
"""Inbound message ids whose answers are kept, to re-send them byte for byte on redelivery."""
UPDATE_REQUEST_RETRY: Final = 3600
"""Seconds before asking the service for a self-update again if it did not answer."""
CATCHUP_REPORT_INTERVAL: Final = 10
"""At most one keys.report per this many seconds to ask the service for missed commits."""
KEY_CHANGE_REPORT_DELAY: Final = 2
"""Seconds at least from a change of the key states (a new epoch, a data key destroyed) to the
keys.report that tells the service (sent by ``tick``): the ack of a new epoch leaves first and
never waits for it, and every change in that span shares one report, so a burst of epochs costs
one message."""
KEY_CHANGE_REPORT_SPREAD: Final = 30
"""Seconds over which the devices of a fleet spread those reports: each device adds its own fixed
offset in [0, spread] (from its id), so that a rekey of N members, which changes every member's
keys at once, does not send N reports to the service in the same second, on top of the next
rekey's acks (measured: back-to-back rekeys of 1,000 members took 3x longer with every report
2 s after the epoch)."""


# -- what the core needs from the device ----------------------------------------------------------


class KeyProvider(Protocol):
    """The device's keys, as the core sees them. On a device every key lives in the TPM
    (agent/daemon.py); in pure tests they are software keys."""

    @property
    def devid(self) -> ec.EllipticCurvePrivateKey:
        """The DevID key: signs every envelope and the commits and key packages."""
        ...

    def new_leaf_key(self) -> ec.EllipticCurvePrivateKey:
        """A fresh leaf key (ECDH), already stored durably (its blob on disk) when returned, so
        that state referring to it can be saved right after."""
        ...

    def load_leaf(self, public: bytes) -> ec.EllipticCurvePrivateKey:
        """The leaf key whose SEC1 uncompressed public key is ``public``. Raises ``StateError``
        if it is not available."""
        ...

    def prove_leaf(self, public_point: bytes) -> bytes | None:
        """Proof that the leaf key ``public_point`` (SEC1 uncompressed) lives in this device's
        TPM: a TPM2_Certify of it by the enrolled AK over SHA-256 of the point, as the CBOR
        structure ``agent.protocol.credentials.verify_tpm_residency`` checks. None when the
        keys are not in a TPM (software keys in pure tests) or the device has no AK."""
        ...


@dataclass(frozen=True)
class AttestationEvidence:
    """What the device's TPM and firmware give for one challenge: the quote (marshalled
    TPMS_ATTEST) over the challenge's nonce and PCRs, the AK's DER signature over it, and the
    measured-boot event log as the firmware wrote it."""

    quote: bytes
    signature: bytes
    event_log: bytes = field(repr=False)


Attester = Callable[[bytes, tuple[int, ...]], AttestationEvidence]
"""``attester(nonce, pcrs)``: quote ``pcrs`` (sha256 bank) over ``nonce`` with the AK. Raises
``ProtocolError`` (``agent.attest.unavailable``) when it cannot; the core then refuses the
challenge like any other message it cannot serve."""


@dataclass(frozen=True)
class RenewalEvidence:
    """What the device's TPM gives for one renewal challenge: the attestation evidence over the
    nonce, a TPM2_Certify of the DevID key by the AK over the nonce (``devid_public``: the
    key's marshalled TPM2B_PUBLIC; ``certify``/``certify_signature``: TPMS_ATTEST and the AK's
    DER signature), and the TLS key's signature over ``agent.protocol.renewal.
    tls_proof_message``."""

    attestation: AttestationEvidence
    devid_public: bytes
    certify: bytes
    certify_signature: bytes
    tls_proof: bytes


Renewer = Callable[[bytes, tuple[int, ...]], RenewalEvidence]
"""``renewer(nonce, pcrs)``: the evidence of a renewal answer. Raises ``ProtocolError``
(``agent.renew.unavailable``) when it cannot."""


@dataclass(frozen=True)
class RenewalSetup:
    """Certificate renewal: the current TLS certificate (DER; the DevID one is the core's
    ``credential``), the device CAs new certificates must chain to, when to renew, and how to
    prove the keys."""

    tls_credential: bytes = field(repr=False)
    anchors: tuple[x509.Certificate, ...]
    schedule: RenewalSchedule
    renewer: Renewer
    # expired certificates renew over HTTPS (the daemon has a [renewal] url): the tick then
    # sends no renew.request over MQTT, which the broker no longer lets through
    over_https: bool = False


# -- what the core asks the caller to do --------------------------------------------------------


@dataclass(frozen=True)
class Publish:
    """Publish ``payload`` (a signed envelope) on ``topic``, QoS 1."""

    topic: str
    payload: bytes = field(repr=False)
    type: str


@dataclass
class Outcome:
    """The result of one input. ``changed``: persist ``AgentCore.to_state()`` first, then
    publish ``publishes`` in order, then acknowledge the input."""

    publishes: list[Publish] = field(default_factory=list)
    changed: bool = False
    refused: ProtocolError | None = None
    handled: str | None = None
    epochs_changed: bool = False
    # a newer release bundle and its release-signed bytes: the daemon keeps it (before it
    # persists) and re-seals the state key if its generation is newer (agent.releasestate)
    release: tuple[ReleaseBundle, bytes] | None = None
    install: ReleaseInstall | None = None  # run the update hook (after persisting, publishing)
    # renewed certificates (DevID, TLS; DER), already checked and taken by the core: the daemon
    # writes them (atomically) and reconnects with the new TLS certificate
    renewed: tuple[bytes, bytes] | None = None


# -- per-group state ----------------------------------------------------------------------------


@dataclass
class _Pending:
    """A commit this device made and sent to the service; adopted when the service relays it."""

    commit: bytes
    group: Group
    command_id: bytes | None


@dataclass
class _GroupEntry:
    group: Group
    started: int
    messages: int = 0
    pending: list[_Pending] = field(default_factory=list)
    update_requested: tuple[int, int] | None = None  # (epoch, time asked)
    # the leaf key we joined with (it was in the Welcome's tree) until we committed a new one
    joined_leaf: bytes | None = None
    # our Update proposals not committed yet: (epoch asked at, new leaf public key, the Update)
    proposed: list[tuple[int, bytes, bytes]] = field(default_factory=list)


class _Hooks(NamedTuple):
    """The membership checks MLS runs for one group (``AgentCore._checks``)."""

    leaf_check: LeafCheck
    commit_check: CommitCheck


TRUST_CHECKS: Final = (
    "state.rollback",  # an older state refused at start (agent.staterotation)
    "release.",  # a release bundle refused, or an unapproved image (agent.releasestate)
    "authz.",
    "cred.",
    "tpm.proof.",
    "mls.leaf.",
    "mls.parent-hash",
    "mls.welcome.",
    "agent.tree-page.timeout",  # a join that gave up waiting for its tree's pages
    "revocation.rollback",
    "revocation.fork",
    "revocation.authz",
    "revocation.signature",
    "renew.issued",
    "trust.",  # a trust chain refused: only a rogue service or a broken chain sends one
)
"""Refusals a device reports to the fleet: what only a rogue service, operator or member sends."""


def _trust_check(check: str) -> bool:
    return check.startswith(TRUST_CHECKS)


CREDENTIAL_RENEWED_REASON: Final = "credential-renewed"
"""Why a device asks for a self-update after its certificates were renewed (``UpdateRequest``)."""

GROUP_DELETED_NOTE: Final = "group deleted by the operators (a group.delete feed entry)"
"""The ledger note of a deleted group's epoch keys (docs/operations.md, "Deleting a group")."""

INIT_KEY_NOTE: Final = (
    "one-time init key in the TPM: opens one Welcome; destroyed by flushing it from the TPM and "
    "shredding its blob once a state without it is saved (agent.protocol.initkeys)"
)


def leaf_name(public: bytes) -> str:
    """The ledger name of a leaf key: derived from its public key, never secret."""
    return "leaf/" + hashlib.sha256(public).hexdigest()[:16]


def _group_name(entry: _GroupEntry) -> str:
    return entry.group.group_id.decode()


class AgentCore:
    """One device's protocol state machine (see the module docstring)."""

    def __init__(
        self,
        device_id: str,
        service_key: ec.EllipticCurvePublicKey,
        keys: KeyProvider,
        *,
        credential: bytes,
        membership: Membership,
        now: int,
        policy_for: Callable[[str], RotationPolicy] = lambda group: RotationPolicy(),
        rng: Rng = os.urandom,
        max_age: int = DEFAULT_MAX_AGE,
        service_id: str = SERVICE_ID,
        attester: Attester | None = None,
        key_report_spread: int = KEY_CHANGE_REPORT_SPREAD,
        can_install: bool = False,
        renewal: RenewalSetup | None = None,
    ) -> None:
        if ID_PATTERN.fullmatch(device_id) is None:
            raise ValueError("device id must be a valid id")
        self.device_id = device_id
        spread_seed = hashlib.sha256(b"keyfleet/key-report-offset\0" + device_id.encode()).digest()
        self._key_report_delay = KEY_CHANGE_REPORT_DELAY + int.from_bytes(
            spread_seed[:4], "big"
        ) % (max(key_report_spread, 0) + 1)
        self.service_id = service_id
        # the service signing keys we accept: bundle 0 is the one key of our enrollment; a
        # rollover replaces it through the retained trust chain (agent.protocol.trust)
        self.trust = trust.TrustBundle.initial(service_key)
        self._keys = keys
        self._credential = credential  # the DevID certificate (DER): every leaf of ours carries it
        # who may enter or leave our groups: device CA, operator CA, quorum policy, used admissions
        self.membership = membership
        self._attester = attester
        self._policy_for = policy_for
        self._rng = rng
        self.max_age = max_age
        self._now = now
        self._groups: dict[str, _GroupEntry] = {}
        self._data_keys: dict[str, dict[int, Secret]] = {}
        self._key_packages: OrderedDict[bytes, bytes] = OrderedDict()  # leaf public -> kp
        # request command id -> leaf public: a re-sent request is answered with the same key
        # package (see _on_key_package_request)
        self._key_package_requests: OrderedDict[bytes, bytes] = OrderedDict()
        self._used_init = UsedInitKeys()  # packages whose init key opened a Welcome (destroyed)
        # joins waiting for their tree's pages (memory only: they hold GroupSecrets)
        self._tree_fetches = TreeFetches()
        # group -> the Authorizations a version-2 saved state still held, handed to the
        # service once at the next tick (memory only: every member of a group holds them all)
        self._handoff: dict[str, tuple[bytes, ...]] = {}
        self._replies: OrderedDict[bytes, tuple[Publish, ...]] = OrderedDict()
        self._guard = ReplayGuard(SERVICE_REPLAY_WINDOW, SERVICE_REPLAY_CAPACITY)
        self._seq = 1
        self.ledger = KeyLedger(lambda: self._now)
        self.rejections = Rejections()
        self.last_report: int | None = None
        self.report_due: int | None = None  # when tick sends the keys.report of recent changes
        self.last_acks: dict[str, tuple[int, int]] = {}  # group -> (epoch, time)
        self._dirty = False
        self.releases: ReleaseFollower | None = None  # with a release key (follow_releases)
        # staged rollouts: whether an update hook is configured, the install it runs now and
        # the outcome of the latest one (in every keys.report until the next; not persisted:
        # the service judges an install by the device's next attestation, see release.install)
        self.can_install = can_install
        self.installing: ReleaseInstall | None = None
        self.install_result: InstallResult | None = None
        # certificate renewal (agent.protocol.renewal); not persisted: after a restart the
        # device asks again when due
        self.renewal = renewal
        self._renew_nonce: bytes | None = None  # the challenge we answered last

    def __repr__(self) -> str:
        return f"AgentCore({self.device_id!r}, groups={sorted(self._groups)}, seq={self._seq})"

    # -- reading ----------------------------------------------------------------------------

    @property
    def report_topic(self) -> str:
        return device_report_topic(self.device_id)

    @property
    def command_topic(self) -> str:
        return device_cmd_topic(self.device_id)

    @property
    def next_seq(self) -> int:
        return self._seq

    def skip_sequence_to(self, seq: int) -> None:
        """Send no sequence number below ``seq``. A state started afresh (first start, or the
        old state sealed to other measurements) must not reuse the numbers the service already
        saw from this device: it would refuse every later message as ``replay.seq-reused``."""
        self._seq = max(self._seq, seq)

    def groups(self) -> dict[str, Group]:
        return {name: entry.group for name, entry in self._groups.items()}

    def epoch(self, group: str) -> int | None:
        entry = self._groups.get(group)
        return None if entry is None else entry.group.epoch

    def fresh_leaf_pending(self, group: str) -> bool:
        """Whether we still hold ``group`` with the leaf key we joined with (our first
        self-update is still to come: agent.protocol.initkeys)."""
        entry = self._groups.get(group)
        return entry is not None and self._join_update_pending(entry)

    def pending_commits(self, group: str) -> int:
        entry = self._groups.get(group)
        return 0 if entry is None else len(entry.pending)

    def leaf_refs(self) -> set[bytes]:
        """Public keys of every leaf key the state still refers to; any other leaf blob on disk
        is garbage and may be destroyed once this state is persisted."""
        refs = set(self._key_packages) | self._init_refs()
        for entry in self._groups.values():
            refs.add(_leaf_public(entry.group))
            refs.update(_leaf_public(p.group) for p in entry.pending)
            refs.update(public for _, public, _ in entry.proposed)
        return refs

    def _init_refs(self) -> set[bytes]:
        """Public keys of the init keys of outstanding KeyPackages (one-time: see _on_welcome)."""
        return {KeyPackage.decode(kp).init_key for kp in self._key_packages.values()}

    @property
    def dirty(self) -> bool:
        """Something changed outside ``handle``/``tick`` (an app's encryption counted) that
        should be persisted at the next convenient moment."""
        return self._dirty

    def mark_clean(self) -> None:
        self._dirty = False

    def set_time(self, now: int) -> None:
        """The time the ledger stamps on transitions made by the caller (e.g. app secrets)."""
        self._now = now

    def install_group(self, group: Group, now: int) -> None:
        """Make ``group`` this device's current epoch of its group without a Welcome: for a
        member state built outside the wire protocol (``Group.assemble``: simulations and
        benchmarks start from a large group that way). The same bookkeeping as joining: a key
        ledger record for the epoch, its data key, fresh counters; ``dirty`` is set so that a
        daemon persists it.

        Refused (``StateError``, nothing changed) when the group id is not a valid group name,
        when this core holds the group already, or when the key provider does not hold the
        group's leaf key (``load_leaf`` raises)."""
        try:
            name = group.group_id.decode()
        except UnicodeDecodeError:
            raise StateError("the group id is not a valid group name") from None
        if ID_PATTERN.fullmatch(name) is None:
            raise StateError("the group id is not a valid group name")
        if name in self._groups:
            raise StateError(f"this device holds group {name!r} already")
        leaf_public = _leaf_public(group)
        if serialize_public_key(self._keys.load_leaf(leaf_public).public_key()) != leaf_public:
            raise StateError("the key provider's leaf key is not the group's")
        self._now = now
        self._install(name, group)
        self._dirty = True

    # -- inbound messages -------------------------------------------------------------------

    def handle(self, payload: bytes, topic: str, now: int) -> Outcome:
        """Process one MQTT message (``payload`` received on ``topic``) at time ``now``."""
        self._now = now
        if topic == REVOCATION_FEED_TOPIC:
            return self._on_feed_head(payload)
        if topic == RELEASES_TOPIC:
            return self._on_release_bundle(payload)
        if topic == TRUST_TOPIC:
            return self._on_trust_chain(payload)
        group_topic = group_of_commit_topic(topic)
        if group_topic is not None and group_topic not in self._groups:
            # Devices read every group's commit topic (one ACL pattern); others' groups are
            # not ours to judge: drop before spending a signature check.
            return Outcome(handled="ignored")
        try:
            message = open_message(
                payload, self._resolve, now=now, recipients=self._recipients(), max_age=self.max_age
            )
        except ProtocolError as exc:
            return self._refuse(exc)
        try:
            guard = self._replay_check(message)
        except ProtocolError as exc:
            return self._on_replay(message, exc)
        try:
            with self.membership.transaction():  # a refusal leaves the trust state as it was
                outcome = self._dispatch(message)
        except ProtocolError as exc:
            outcome = self._refuse(exc, message)
            self._maybe_catch_up(message, exc, outcome)
            self._maybe_report_commit(message, exc, outcome)
            return outcome
        guard.accept(message)
        self._guard = guard
        group_epoch = message.body.group_epoch()
        if group_epoch is not None and group_epoch[0] not in self._groups:
            guard.forget_group(group_epoch[0])  # left (removed): a re-add starts afresh
        for name, entry in self._groups.items():
            if (self._guard.epoch(name) or 0) < entry.group.epoch:
                self._guard.advance_epoch(name, entry.group.epoch)
        self._replies[message.message_id] = tuple(outcome.publishes)
        while len(self._replies) > REPLY_CACHE:
            self._replies.popitem(last=False)
        self._retire_leaves()
        outcome.changed = True
        outcome.handled = message.type
        return outcome

    def _resolve(self, kid: bytes) -> Signer:
        key = self.trust.accepted(self._now).get(kid)
        if key is None:
            raise ProtocolError(
                "cose.kid-unknown", "not a service signing key our trust bundle accepts now"
            )
        return Signer(self.service_id, key)

    def _recipients(self) -> set[str]:
        return {self.device_id, *self._groups}

    def _replay_check(self, message: VerifiedMessage) -> ReplayGuard:
        """Check ``message`` against the guard; returns the guard to ``accept`` it into. A
        welcome that re-adds this device to a group it still holds at an older epoch (it missed
        its removal, or was too far behind) is judged as for an unknown group."""
        guard = self._guard
        body = message.body
        if isinstance(body, WelcomeDelivery):
            entry = self._groups.get(body.group_id)
            if entry is not None and body.epoch > entry.group.epoch:
                guard = ReplayGuard.from_cbor_map(guard.to_cbor_map())
                guard.forget_group(body.group_id)
        guard.check(message)
        return guard

    def _on_replay(self, message: VerifiedMessage, exc: ProtocolError) -> Outcome:
        """Redeliveries and already-applied group messages: answer again, idempotently."""
        if exc.check == "replay.duplicate":
            self.rejections.record(exc)
            cached = self._replies.get(message.message_id, ())
            log.debug("redelivered %s: re-sending %d answers", message.type, len(cached))
            return Outcome(publishes=list(cached), refused=exc, handled=message.type)
        body = message.body
        if exc.check == "replay.epoch-old" and isinstance(body, CommitMessage | WelcomeDelivery):
            entry = self._groups.get(body.group_id)
            if entry is not None:
                # Already applied (a catch-up replay, or a redelivery whose id was evicted
                # from the reply cache): say where we are, so the service's view converges.
                self.rejections.record(exc)
                log.info("answered %s with our epoch: [%s] %s", message.type, exc.check, exc.reason)
                command_id = body.command_id if isinstance(body, CommitMessage) else None
                outcome = Outcome(refused=exc, handled=message.type, changed=True)
                outcome.publishes.append(self._ack(entry, command_id))
                return outcome
        outcome = self._refuse(exc, message)
        self._maybe_catch_up(message, exc, outcome)
        return outcome

    def _refuse(self, exc: ProtocolError, message: VerifiedMessage | None = None) -> Outcome:
        self.rejections.record(exc)
        what = message.type if message is not None else "message"
        if is_benign(exc):
            log.debug("dropped %s: [%s] %s", what, exc.check, exc.reason)
        else:
            log.warning("refused %s: [%s] %s", what, exc.check, exc.reason)
        if _trust_check(exc.check):
            # the fleet learns what was tried (keys.report "refused") within seconds: such
            # refusals are rare, so the per-device spread of key-change reports is not needed
            due = self._now + KEY_CHANGE_REPORT_DELAY
            self.report_due = due if self.report_due is None else min(self.report_due, due)
        return Outcome(refused=exc, handled=None if message is None else message.type)

    def _maybe_catch_up(
        self, message: VerifiedMessage, exc: ProtocolError, outcome: Outcome
    ) -> None:
        """A group message from beyond our next epoch means we missed a commit: a keys.report
        (which carries our epochs) makes the service replay its commit log to us."""
        if exc.check not in ("replay.epoch-future", "mls.epoch-future", "revocation.gap"):
            return
        self._ask_catch_up(outcome)

    def _maybe_report_commit(
        self, message: VerifiedMessage, exc: ProtocolError, outcome: Outcome
    ) -> None:
        """A commit we cannot process (its private part is wrong: junk path ciphertexts, a
        wrong confirmation tag) is reported as such, so the service can roll the group back;
        we stay at the commit's epoch (provisioning/service/recovery.py)."""
        body = message.body
        if not isinstance(body, CommitMessage) or exc.check not in REFUSAL_CHECKS:
            return
        digest = hashlib.sha256(body.commit).digest()
        outcome.changed = True  # the report took a seq: persist it before publishing
        outcome.publishes.append(
            self._send(CommitRefused(body.group_id, body.epoch, digest, exc.check))
        )

    def _ask_catch_up(self, outcome: Outcome) -> None:
        if self.last_report is not None and self._now - self.last_report < CATCHUP_REPORT_INTERVAL:
            return
        outcome.publishes.append(self._report())
        outcome.changed = True

    def _dispatch(self, message: VerifiedMessage) -> Outcome:
        body = message.body
        if isinstance(body, CommitMessage):
            return self._on_commit(body)
        if isinstance(body, CommitRequest):
            return self._on_commit_request(body)
        if isinstance(body, WelcomeDelivery):
            return self._on_welcome(body)
        if isinstance(body, TreePage):
            return self._on_tree_page(body)
        if isinstance(body, KeyPackageRequest):
            return self._on_key_package_request(body)
        if isinstance(body, UpdateProposalRequest):
            return self._on_update_proposal_request(body)
        if isinstance(body, ReportRequest):
            return Outcome(publishes=[self._report()])
        if isinstance(body, AttestChallenge):
            return self._on_attest_challenge(body)
        if isinstance(body, RevocationFeed):
            return self._on_feed(body)
        if isinstance(body, ReleaseInstall):
            return self._on_release_install(body)
        if isinstance(body, RenewChallenge):
            return self._on_renew_challenge(body)
        if isinstance(body, RenewIssued):
            return self._on_renew_issued(body)
        raise ProtocolError("agent.type", f"a device does not take {message.type} messages")

    # -- handlers: each checks everything first and changes state only at its end -----------

    def _on_feed_head(self, payload: bytes) -> Outcome:
        """The revocation feed's retained head (agent.protocol.feed): signed by the service,
        outside the replay guard (its numbering refuses an older head); a head further ahead
        than the entries it carries makes us ask for the rest (a keys.report with our feed)."""
        try:
            head = revocation_feed.open_head(
                payload, self._resolve, now=self._now, recipient=FEED_RECIPIENT
            )
            with self.membership.transaction():
                outcome = self._on_feed(head)
        except ProtocolError as exc:
            outcome = self._refuse(exc)
            if exc.check == "revocation.gap":
                self._ask_catch_up(outcome)
            return outcome
        outcome.handled = RevocationFeed.TYPE
        return outcome

    def follow_releases(
        self, key: ec.EllipticCurvePublicKey, held: ReleaseBundle | None, version: str | None
    ) -> None:
        """Take release bundles (signed by ``key``) newer than ``held``; ``version``: the
        release this boot matched (None: none, or the state is held)."""
        self.releases = ReleaseFollower(key, self.membership.check_release_approval, held, version)

    def forget_release(self, held: ReleaseBundle | None) -> None:
        """The daemon could not keep the newest bundle: hold ``held`` again, so the bundle is
        taken when it comes again."""
        if self.releases is not None:
            self.releases.held = held

    def _on_release_bundle(self, payload: bytes) -> Outcome:
        """The retained release bundle (agent.releasefeed): refusals are counted and reported
        like the feed's; a newer one goes to the daemon (``Outcome.release``)."""
        if self.releases is None:
            return Outcome(handled="ignored")  # no release key: this device does not follow
        try:
            received = self.releases.receive(payload, self._resolve, self._now)
        except ProtocolError as exc:
            return self._refuse(exc)
        if received is None:
            return Outcome(handled=ReleaseBundleMessage.TYPE)  # the one held, again
        bundle = received[0]
        log.info("release bundle %d (generation %d)", bundle.seq, bundle.generation)
        self._report_soon()
        return Outcome(changed=True, handled=ReleaseBundleMessage.TYPE, release=received)

    def _on_trust_chain(self, payload: bytes) -> Outcome:
        """The retained chain of trust bundles (agent.protocol.trust): the links after the
        bundle we hold, each signed by a key of the one before and approved by a quorum of
        admins, taken in order; a refused chain changes nothing and is counted and reported."""
        try:
            chain = trust.TrustChain.decode(payload)
            taken = trust.advance(self.trust, chain, self.membership.check_trust_approval)
        except ProtocolError as exc:
            return self._refuse(exc)
        if taken is None:
            return Outcome(handled="trust.chain")  # nothing newer than what we hold
        log.info("trust bundle %d taken (was %d)", taken.seq, self.trust.seq)
        self._take_trust(taken)
        self._report_soon()  # the service learns we follow the new key
        return Outcome(changed=True, handled="trust.chain")

    def _take_trust(self, bundle: trust.TrustBundle) -> None:
        """Hold ``bundle``: its service keys sign what we accept, members' credentials chain to
        its device CAs and approvals to its operator CAs (without the section: those of our
        configuration)."""
        self.trust = bundle
        cas = None if bundle.device_ca is None else tuple(c.certificate for c in bundle.device_ca)
        self.membership.use_device_cas(cas, bundle.device_ca_ends())
        self.membership.use_operator_cas(bundle)

    def _device_anchors(
        self, configured: tuple[x509.Certificate, ...]
    ) -> tuple[x509.Certificate, ...]:
        """The device CAs renewed certificates must chain to: those the held bundle accepts
        now, or ``configured`` (bundle 0, or a version 1 bundle)."""
        accepted = self.trust.device_cas(self._now)
        return configured if accepted is None else accepted

    def _on_feed(self, body: RevocationFeed) -> Outcome:
        if not self.membership.follow_feed(body):
            return Outcome()
        log.info("revocation feed at %d", body.seq)
        # a group the operators deleted (a verified group.delete entry): every key destroyed
        deleted = self.membership.revocations.deleted
        live = {r.group for r in self.ledger if r.state is not KeyState.DESTROYED}
        held = (live | set(self._groups) | set(self._data_keys)) & deleted
        for name in sorted(g for g in held if g is not None):
            self._delete_group(name)
        self._report_soon()  # the service learns how far we are (and what we destroyed)
        return Outcome(changed=True, epochs_changed=bool(held))

    def _delete_group(self, name: str) -> None:
        """The operators deleted ``name``: forget its epoch secrets, wipe its data keys, mark
        its epoch keys and (``_retire_leaves``) our leaf key in it destroyed. Also a group we
        were removed from whose deactivated data keys are still in their grace period."""
        entry = self._groups.pop(name, None)
        if entry is not None:
            self._guard.forget_group(name)
            self.last_acks.pop(name, None)
        for secret in self._data_keys.pop(name, {}).values():
            secret.wipe()
        for record in list(self.ledger):
            if record.group == name and record.state is not KeyState.DESTROYED:
                self.ledger.transition(record.name, KeyState.DESTROYED)
                self.ledger.annotate(record.name, GROUP_DELETED_NOTE)
        self._retire_leaves()
        log.warning("group %s deleted by the operators: its keys are destroyed", name)

    def _refuse_deleted(self, group: str, check: str) -> None:
        if self.membership.revocations.is_deleted(group):
            raise ProtocolError(check, f"group {group!r} was deleted by the operators")

    def _entry_at(self, group_id: str, epoch: int, what: str) -> _GroupEntry:
        """The group ``group_id`` if we are in it at ``epoch``; ``what`` names the message in
        the error otherwise."""
        entry = self._groups.get(group_id)
        if entry is None:
            raise ProtocolError("agent.group-unknown", "not a member of this group")
        current = entry.group.epoch
        if epoch != current:
            check = "mls.epoch-stale" if epoch < current else "mls.epoch-future"
            raise ProtocolError(check, f"{what} for epoch {epoch}, we are in {current}")
        return entry

    def _on_commit(self, body: CommitMessage) -> Outcome:
        entry = self._entry_at(body.group_id, body.epoch, "commit")
        group = entry.group
        ours = next((p for p in entry.pending if p.commit == body.commit), None)
        if ours is not None:
            # the ack names the request we committed for, even if the relay does not
            command_id = body.command_id if body.command_id is not None else ours.command_id
            return self._enter_epoch(entry, ours.group, command_id)
        commit = Commit.decode(body.commit)
        if commit.content.group_id != group.group_id:
            raise ProtocolError("mls.group-id", "the commit is for another group")
        try:
            checks = self._checks(body.group_id, fresh=False)
            following = group.process(
                commit,
                leaf_check=checks.leaf_check,
                commit_check=checks.commit_check,
                proposed_leaf_keys=self._proposed_key(entry, commit),
            )
        except ProtocolError as exc:
            if exc.check != "mls.removed":
                raise
            return self._removed(entry)
        return self._enter_epoch(entry, following, body.command_id)

    def _proposed_key(self, entry: _GroupEntry, commit: Commit) -> list[ec.EllipticCurvePrivateKey]:
        """The leaf key of our Update proposal that ``commit`` carries, if it carries one of
        ours (only that one is loaded from the TPM)."""
        own = entry.group.own_leaf
        wanted = {u.encryption_key for u in commit.content.updates if u.leaf_index == own}
        return [self._keys.load_leaf(public) for _, public, _ in entry.proposed if public in wanted]

    def _removed(self, entry: _GroupEntry) -> Outcome:
        name = _group_name(entry)
        log.warning("removed from group %s at epoch %d", name, entry.group.epoch)
        del self._groups[name]
        self._guard.forget_group(name)
        self.last_acks.pop(name, None)
        try:
            current = self.ledger.current_epoch(name)
            self.ledger.transition(current.name, KeyState.DEACTIVATED)
        except KeyStateError:
            pass
        return Outcome(publishes=[self._report()], epochs_changed=True)

    def _enter_epoch(
        self, entry: _GroupEntry, following: Group, command_id: bytes | None
    ) -> Outcome:
        name = _group_name(entry)
        self._install(name, following)
        new_entry = self._groups[name]
        # proposals not committed wait a few epochs; a committed one is our leaf now (the
        # leaf key it replaced is no longer referred to: destroyed with this state)
        new_entry.proposed = [
            p
            for p in entry.proposed
            if p[1] != _leaf_public(following) and following.epoch - p[0] <= PROPOSAL_EPOCHS
        ]
        return Outcome(publishes=[self._ack(new_entry, command_id)], epochs_changed=True)

    def _install(self, name: str, group: Group) -> None:
        """Make ``group`` the current epoch of ``name``: ledger, data key, fresh counters. The
        leaf key we joined with stays marked while we still hold it (another member's commit
        does not replace our leaf: the first self-update is still due)."""
        self.ledger.start_epoch(name, group.epoch)
        self._data_keys.setdefault(name, {})[group.epoch] = Secret(group.data_key(DATA_KEY_SIZE))
        previous = self._groups.get(name)
        joined = None if previous is None else previous.joined_leaf
        if not fresh_leaf_pending(_leaf_public(group), joined):
            joined = None
        self._groups[name] = _GroupEntry(group=group, started=self._now, joined_leaf=joined)
        self._report_soon()

    def _report_soon(self) -> None:
        """The key states changed: ``tick`` reports them once this device's delay has passed
        (``KEY_CHANGE_REPORT_DELAY`` plus its offset within ``KEY_CHANGE_REPORT_SPREAD``; the
        service's ``keyfleet devices --keys`` would otherwise wait for the next connect or
        attestation). A report already due stays due when it was: changes coalesce."""
        if self.report_due is None:
            self.report_due = self._now + self._key_report_delay

    def _on_commit_request(self, body: CommitRequest) -> Outcome:
        if body.action is CommitAction.CREATE:
            return self._create(body)
        entry = self._entry_at(body.group_id, body.epoch, "request")
        group = entry.group
        if len(entry.pending) >= MAX_PENDING_COMMITS:
            raise ProtocolError("agent.pending-full", "too many commits await the service")
        devid = self._keys.devid
        welcome_for: tuple[str, ...] = ()
        self.membership.adopt_policies(body.policies)
        authz = None if body.authz is None else self.membership.envelope(body.authz)
        checks = self._checks(body.group_id, fresh=True)
        commit = partial(
            group.commit,
            devid,
            rng=self._rng,
            leaf_check=checks.leaf_check,
            commit_check=checks.commit_check,
            credential=self._credential,
        )
        if body.action is CommitAction.ADD and body.key_packages is not None:
            # many members in one commit, one Welcome for all (docs/treekem.md)
            key_packages = [KeyPackage.decode(kp) for kp in body.key_packages]
            for key_package in key_packages:
                key_package.check_lifetime(self._now)
            result = commit(
                adds=key_packages, new_leaf_key=self._fresh_leaf_if_pending(entry), authz=authz
            )
            welcome_for = tuple(kp.device_id.decode() for kp in key_packages)
        elif body.action is CommitAction.ADD:
            assert body.key_package is not None and body.member is not None
            key_package = KeyPackage.decode(body.key_package)
            if key_package.device_id != body.member.encode():
                raise ProtocolError(
                    "agent.key-package.member", "the key package names another device"
                )
            key_package.check_lifetime(self._now)
            result = commit(
                adds=[key_package], new_leaf_key=self._fresh_leaf_if_pending(entry), authz=authz
            )
            welcome_for = (body.member,)
        elif body.action is CommitAction.REMOVE:
            assert body.member is not None
            if body.member == self.device_id:
                raise ProtocolError("mls.remove.self", "a member cannot commit its own removal")
            leaf = group.tree.find_device(body.member.encode())
            if leaf is None:
                raise ProtocolError("agent.member-unknown", "that device is not in the group")
            result = commit(
                removes=[leaf], new_leaf_key=self._fresh_leaf_if_pending(entry), authz=authz
            )
        elif body.updates:
            # a full rekey: other members' proposed leaf keys, and our own new one
            result = commit(
                updates=[Update.decode(u) for u in body.updates],
                new_leaf_key=self._keys.new_leaf_key(),
            )
        else:
            result = commit(new_leaf_key=self._keys.new_leaf_key())  # a self-update
        commit_bytes = result.commit.encode()
        publishes = [
            self._send(
                CommitMessage(
                    group_id=body.group_id,
                    epoch=group.epoch,
                    commit=commit_bytes,
                    command_id=body.command_id,
                )
            )
        ]
        if result.welcome is not None:
            publishes.append(
                self._send(
                    WelcomeMessage(
                        group_id=body.group_id,
                        epoch=result.group.epoch,
                        welcome=result.welcome.encode(),
                        new_members=welcome_for,
                    )
                )
            )
        entry.pending.append(_Pending(commit_bytes, result.group, body.command_id))
        return Outcome(publishes=publishes)

    def _create(self, body: CommitRequest) -> Outcome:
        self._refuse_deleted(body.group_id, "agent.group-deleted")
        existing = self._groups.get(body.group_id)
        if existing is not None:
            group = existing.group
            if group.epoch == 0 and group.tree.member_count() == 1:
                # A re-sent create whose answer may have been lost: say it again (with the
                # creation Authorization if the request's is still the one our leaf records)
                again = None if body.authz is None else self.membership.envelope(body.authz)
                if admission_hash(again) != group.tree.admission(group.own_leaf):
                    again = None
                return Outcome(
                    publishes=[self._created(body.group_id, group, body.command_id, again)]
                )
            raise ProtocolError("agent.group-exists", "this device already holds the group")
        self.membership.adopt_policies(body.policies)
        if body.authz is None:
            raise ProtocolError(
                "authz.missing", "a group is created only with the operators' authorization"
            )
        authz = self.membership.envelope(body.authz)
        leaf = self._keys.new_leaf_key()
        # our own package never travels and no Welcome is sealed to it: its init key is a
        # throwaway software key, not a TPM key made only to be destroyed
        own = self._key_package(leaf, generate_key_pair(self._rng), prove_init=False)
        self.membership.check_admission(body.group_id, own.leaf, authz, True, self._now)
        group = Group.create(
            body.group_id.encode(),
            own,
            leaf,
            rng=self._rng,
            authz=authz,
            leaf_check=self._checks(body.group_id, fresh=True).leaf_check,
        )
        self.membership.consume(authz, self._now)
        self._install(body.group_id, group)
        return Outcome(
            publishes=[self._created(body.group_id, group, body.command_id, authz)],
            epochs_changed=True,
        )

    def _key_package(
        self,
        leaf: ec.EllipticCurvePrivateKey,
        init: ec.EllipticCurvePrivateKey,
        *,
        prove_init: bool = True,
    ) -> KeyPackage:
        """Our KeyPackage for ``leaf`` and the one-time ``init`` key, valid for a week from now:
        DevID credential and the TPM's proofs that both keys live in it (the AK's certify)."""
        init_point = serialize_public_key(init.public_key())
        return KeyPackage.create(
            self.device_id.encode(),
            self._keys.devid,
            leaf.public_key(),
            self._credential,
            init_key=init.public_key(),
            lifetime=key_package_lifetime(self._now),
            tpm_proof=self._keys.prove_leaf(serialize_public_key(leaf.public_key())),
            init_tpm_proof=self._keys.prove_leaf(init_point) if prove_init else None,
        )

    def _checks(self, group: str, *, fresh: bool) -> _Hooks:
        """The membership hooks MLS runs for ``group`` (agent.protocol.membership): every new
        leaf's credential, and every commit's membership change against its authorization
        (``fresh``: we are the committer, so the request must be valid now)."""
        membership, now = self.membership, self._now

        def leaf_check(leaf: LeafNode) -> None:
            membership.check_leaf(leaf, now)

        def commit_check(content: CommitContent, tree: RatchetTree) -> None:
            membership.check_commit(group, content, tree, now, fresh=fresh)

        return _Hooks(leaf_check, commit_check)

    def _created(self, name: str, group: Group, command_id: bytes, authz: bytes | None) -> Publish:
        """The founder's answer: the public group and the Authorization its leaf records (the
        service keeps it to deliver to joiners: members keep none)."""
        public = codec.encode(group.public_group().to_state())
        return self._send(
            GroupCreated(group_id=name, public_group=public, command_id=command_id, authz=authz)
        )

    def _on_welcome(self, body: WelcomeDelivery) -> Outcome:
        self._refuse_deleted(body.group_id, "agent.group-deleted")
        existing = self._groups.get(body.group_id)
        if existing is not None and body.epoch <= existing.group.epoch:
            # Joined already (a re-sent welcome): acknowledge where we are.
            return Outcome(publishes=[self._ack(existing, None)])
        welcome = Welcome.decode(body.welcome)
        refs = {s.key_package_ref for s in welcome.secrets}
        match: tuple[bytes, KeyPackage] | None = None
        for public, encoded in self._key_packages.items():
            key_package = KeyPackage.decode(encoded)
            if key_package.ref() in refs:
                match = (public, key_package)
                break
        if match is None:
            if refs & set(self._used_init.to_list()):
                raise ProtocolError(
                    "mls.init-key",
                    "the welcome is sealed to an init key that was used once and destroyed",
                )
            raise ProtocolError(
                "mls.welcome.recipient", "the welcome is for none of our key packages"
            )
        public, key_package = match
        key_package.check_lifetime(self._now)
        opened = Group.open_welcome(
            welcome,
            key_package,
            self._keys.load_leaf(public),
            init_key=self._keys.load_leaf(key_package.init_key),
        )
        # the service's, and those a committer from before then signed into its GroupInfo
        delivered = body.admissions + (opened.info.legacy_admissions or ())
        if opened.info.tree is None or admissions_missing(opened.info.tree, delivered):
            # a large group: its tree comes in pages from the service, checked against the
            # tree hash of the signed GroupInfo before anything is accepted (treefetch); so
            # does a small one's when the service could not fit its Authorizations in the
            # Welcome's frame: the pages carry them
            if opened.info.group_id != body.group_id.encode() or opened.info.epoch != body.epoch:
                raise ProtocolError(
                    "agent.welcome.mismatch",
                    "the welcome's group or epoch differs from its envelope",
                )
            request = self._tree_fetches.start(
                body.group_id,
                body.epoch,
                opened,
                leaf_public=public,
                key_package=key_package,
                now=self._now,
                delivered=delivered,
            )
            log.info("welcome to %s epoch %d: fetching its tree", body.group_id, body.epoch)
            return Outcome(publishes=[self._send(request)], changed=True)
        return self._join(
            body.group_id,
            body.epoch,
            opened,
            public=public,
            key_package=key_package,
            tree=None,
            admissions=delivered,
        )

    def _on_tree_page(self, body: TreePage) -> Outcome:
        """A page of the tree a Welcome we opened references (treefetch): ask for the next
        one, or join once all are in and their tree hash is the GroupInfo's."""
        try:
            fetch, tree, request = self._tree_fetches.page(body, self._now)
        except ProtocolError as exc:
            if exc.check == "mls.welcome.tree-hash" or exc.check.startswith("mls.decode"):
                log.warning(
                    "dropped the join of %s: its tree pages are not the signed tree", body.group_id
                )
            raise
        if request is not None:
            return Outcome(publishes=[self._send(request)], changed=True)
        assert tree is not None
        return self._join(
            body.group_id,
            body.epoch,
            fetch.opened,
            public=fetch.leaf_public,
            key_package=fetch.key_package,
            tree=tree,
            admissions=fetch.admissions(tree),
        )

    def _join(
        self,
        name: str,
        epoch: int,
        opened: OpenedWelcome,
        *,
        public: bytes,
        key_package: KeyPackage,
        tree: RatchetTree | None,
        admissions: tuple[bytes, ...],
    ) -> Outcome:
        """Join with an opened Welcome (and the fetched tree if its GroupInfo holds none) and
        the Authorizations the service delivered (taken by the admission hashes of the tree)."""
        if public not in self._key_packages:
            raise ProtocolError(
                "mls.init-key", "the key package of this welcome was used or dropped meanwhile"
            )
        key_package.check_lifetime(self._now)
        membership, now = self.membership, self._now

        def admission_check(leaf: LeafNode, authz: bytes | None, is_own: bool) -> None:
            membership.check_admission(name, leaf, authz, is_own, now)

        group = Group.join_opened(
            opened,
            key_package,
            self._keys.load_leaf(public),
            tree=tree,
            admissions=admissions,
            leaf_check=self._checks(name, fresh=False).leaf_check,
            admission_check=admission_check,
        )
        if group.group_id != name.encode() or group.epoch != epoch:
            raise ProtocolError(
                "agent.welcome.mismatch", "the welcome's group or epoch differs from its envelope"
            )
        existing = self._groups.get(name)
        if existing is not None and epoch <= existing.group.epoch:
            return Outcome(publishes=[self._ack(existing, None)])
        # the Authorization we were admitted by (the join checked it is among those delivered)
        own = admissions_of(admissions).get(group.tree.admission(group.own_leaf))
        self.membership.consume(own, self._now)
        if existing is not None:
            log.warning("re-added to group %s at epoch %d", name, group.epoch)
        # The init key is spent: no state refers to it any more, so the daemon flushes it and
        # shreds its blob as soon as this state is saved (_retire_leaves records it destroyed).
        del self._key_packages[public]
        self._used_init.add(key_package.ref())
        self._install_join(name, group)
        entry = self._groups[name]
        # our first act in the group: the next tick asks the service for a self-update (and
        # again while we still hold this leaf), so the leaf key the Welcome's tree names is
        # replaced too
        entry.joined_leaf = public
        return Outcome(publishes=[self._ack(entry, None)], epochs_changed=True)

    def _install_join(self, name: str, group: Group) -> None:
        try:
            self._install(name, group)
        except KeyStateError:
            # A group re-created under an old name: its old epoch records are history now.
            for record in list(self.ledger):
                if record.kind is KeyKind.EPOCH and record.group == name:
                    if record.state is not KeyState.DESTROYED:
                        self.ledger.transition(record.name, KeyState.DESTROYED)
                    self._wipe_data_key(name, record.epoch)
            self.ledger.forget_destroyed(self._now + 1)
            self._install(name, group)

    def _on_key_package_request(self, body: KeyPackageRequest) -> Outcome:
        known = self._key_package_requests.get(body.command_id)
        if known is not None and known in self._key_packages:
            # The service asks again under the same command id when our answer is late (its
            # retry timer): answer with the same key package. A fresh one per retry would
            # push the oldest out of the eight kept, and that is the one the service takes
            # first, so its welcome would find no key package here to open it with.
            again = KeyPackageMessage(
                key_package=self._key_packages[known], command_id=body.command_id
            )
            return Outcome(publishes=[self._send(again)])
        leaf = self._keys.new_leaf_key()
        init = self._keys.new_leaf_key()  # one-time: opens one Welcome, then destroyed
        public = serialize_public_key(leaf.public_key())
        key_package = self._key_package(leaf, init)
        self._key_packages[public] = key_package.encode()
        while len(self._key_packages) > MAX_KEY_PACKAGES:
            self._key_packages.popitem(last=False)
        self._key_package_requests[body.command_id] = public
        while len(self._key_package_requests) > MAX_KEY_PACKAGES:
            self._key_package_requests.popitem(last=False)
        message = KeyPackageMessage(key_package=key_package.encode(), command_id=body.command_id)
        return Outcome(publishes=[self._send(message)])

    def _on_update_proposal_request(self, body: UpdateProposalRequest) -> Outcome:
        """A new TPM leaf key and its Update for another member to commit (a full rekey). The
        private key stays pending (in the state, so a restart keeps it) until a commit carrying
        it is processed, or ``PROPOSAL_EPOCHS`` passed: then it is destroyed. Asked again at the
        same epoch (a lost answer), we answer with the same proposal."""
        entry = self._entry_at(body.group_id, body.epoch, "update proposal request")
        same = next((p for p in entry.proposed if p[0] == body.epoch), None)
        if same is None:
            leaf = self._keys.new_leaf_key()
            update = entry.group.propose_update(self._keys.devid, leaf.public_key())
            same = (body.epoch, update.encryption_key, update.encode())
            entry.proposed.append(same)
            while len(entry.proposed) > MAX_PROPOSALS:
                entry.proposed.pop(0)
        message = UpdateProposal(
            command_id=body.command_id, group_id=body.group_id, epoch=body.epoch, update=same[2]
        )
        return Outcome(publishes=[self._send(message)])

    def _on_attest_challenge(self, body: AttestChallenge) -> Outcome:
        """Answer with a quote over the service's nonce, the event log and the key states. The
        answer is cached like every other (a redelivered challenge gets the same quote back,
        which the service refuses as replayed: a fresh challenge is a fresh nonce)."""
        if self._attester is None:
            raise ProtocolError(
                "agent.attest.unavailable",
                "this agent has no AK configured (identity.ak_key): it cannot be attested",
            )
        evidence = self._attester(body.nonce, body.pcrs)
        records = tuple(sorted(self.ledger, key=lambda r: r.name)[:MAX_KEYS])
        report = AttestReport(
            nonce=body.nonce,
            quote=evidence.quote,
            signature=evidence.signature,
            pcr_bank="sha256",
            pcrs=body.pcrs,
            event_log=evidence.event_log,
            keys=records,
        )
        log.info("attestation challenge answered (PCRs %s)", list(body.pcrs))
        return Outcome(publishes=[self._send(report)])

    # -- certificate renewal -----------------------------------------------------------------

    @property
    def credential(self) -> bytes:
        """The DevID certificate (DER) this device uses now."""
        return self._credential

    def _certificates(self, setup: RenewalSetup) -> tuple[bytes, bytes]:
        return self._credential, setup.tls_credential

    def _on_renew_challenge(self, body: RenewChallenge) -> Outcome:
        """Prove our keys over the service's nonce (``renew.answer``). Answered even when no
        renewal is due: the service asks only when we asked."""
        setup = self.renewal
        if setup is None:
            raise ProtocolError("agent.renew.unavailable", "certificate renewal is off")
        evidence = setup.renewer(body.nonce, body.pcrs)
        answer = RenewAnswer(
            nonce=body.nonce,
            quote=evidence.attestation.quote,
            signature=evidence.attestation.signature,
            pcr_bank="sha256",
            pcrs=body.pcrs,
            event_log=evidence.attestation.event_log,
            devid_public=evidence.devid_public,
            devid_certify=evidence.certify,
            devid_certify_signature=evidence.certify_signature,
            tls_cert=setup.tls_credential,
            tls_proof=evidence.tls_proof,
        )
        self._renew_nonce = body.nonce
        log.info("renewal challenge answered")
        return Outcome(publishes=[self._send(answer)])

    def _on_renew_issued(self, body: RenewIssued) -> Outcome:
        """Take the renewed certificates once they check (``verify_renewed``): the daemon
        writes them and reconnects. Refused (``renew.issued``): not for the answer we sent, or
        not chaining to our anchors, for other keys or another device."""
        setup = self.renewal
        if setup is None:
            raise ProtocolError("agent.renew.unavailable", "certificate renewal is off")
        if self._renew_nonce is None or body.nonce != self._renew_nonce:
            raise ProtocolError("renew.issued", "certificates for a renewal we did not answer")
        devid, tls = self._certificates(setup)
        verify_renewed(
            device_id=self.device_id,
            devid_der=body.devid_cert,
            tls_der=body.tls_cert,
            current_devid=devid,
            current_tls=tls,
            anchors=self._device_anchors(setup.anchors),
            now=self._now,
        )
        self._credential = body.devid_cert
        self.renewal = replace(setup, tls_credential=body.tls_cert)
        setup.schedule.renewed()
        self._renew_nonce = None
        log.info(
            "certificates renewed: valid until %d",
            min(validity(body.devid_cert)[1], validity(body.tls_cert)[1]),
        )
        return Outcome(renewed=(body.devid_cert, body.tls_cert))

    def _credential_stale(self, entry: _GroupEntry) -> bool:
        leaf = entry.group.tree.leaf(entry.group.own_leaf)
        return leaf is not None and leaf.credential != self._credential

    def renewal_reconnected(self) -> None:
        """Back online: a renewal that is due is asked at the next tick, without waiting for
        the backoff of the requests sent while offline."""
        if self.renewal is not None:
            self.renewal.schedule.reconnected()

    def certificates_expired(self, now: int) -> bool:
        """Whether the DevID or TLS certificate has expired by ``now`` (our clock): the broker
        refuses such a client, so renewal goes over HTTPS (``expired_renewal``)."""
        setup = self.renewal
        if setup is None:
            return False
        return now > min(validity(der)[1] for der in self._certificates(setup))

    def expired_renewal(self, now: int, *, refused: bool = False) -> Outcome | None:
        """A ``renew.request`` for the service's HTTPS renewal listener, when the certificates
        have expired by ``now`` or the broker ``refused`` them as expired, and the wait after
        the last request is over (the schedule's backoff with jitter); None otherwise. The
        caller posts it, gives the answer to ``handle`` (``renew.challenge``: it answers with
        ``renew.answer``, which the caller posts too; ``renew.issued``: taken as over MQTT)."""
        self._now = now
        setup = self.renewal
        if setup is None or not (refused or self.certificates_expired(now)):
            return None
        if setup.schedule.next_try is not None and now < setup.schedule.next_try:
            return None
        not_after = min(validity(der)[1] for der in self._certificates(setup))
        retry = setup.schedule.asked(now, self._rng(4))
        log.info(
            "certificates expired (valid until %d): asking over HTTPS, again at %d if that fails",
            not_after,
            retry,
        )
        return Outcome(publishes=[self._send(RenewRequest(not_after=not_after))], changed=True)

    def _renewal_tick(self, now: int, outcome: Outcome) -> None:
        setup = self.renewal
        if setup is None:
            return
        certs = self._certificates(setup)
        if setup.over_https and self.certificates_expired(now):
            return  # expired_renewal's
        if not setup.schedule.due(now, certs):
            return
        not_after = min(validity(der)[1] for der in certs)
        retry = setup.schedule.asked(now, self._rng(4))
        log.info(
            "certificates due for renewal (valid until %d): asking, again at %d if unanswered",
            not_after,
            retry,
        )
        outcome.publishes.append(self._send(RenewRequest(not_after=not_after)))
        outcome.changed = True

    # -- staged rollout: release.install ------------------------------------------------------

    def _on_release_install(self, body: ReleaseInstall) -> Outcome:
        """Install ``body.version`` by the update hook the caller runs (``Outcome.install``,
        after this message is saved as handled: a redelivery is a duplicate, never a second
        install). Refused (and reported as a failed install, so the rollout stops at once):
        no hook configured (``release.install.unavailable``), a version that is not in the
        verified bundle held, whose entries the operators' approval was checked for
        (``release.approval``; also without a release key: nothing to check it against), another
        install still running (``release.install.busy``)."""
        if not self.can_install:
            return self._install_refused(
                body,
                ProtocolError(
                    "release.install.unavailable",
                    "this device has no update hook ([releases] install_command)",
                ),
            )
        if self.releases is None or not self.releases.approved(body.version):
            return self._install_refused(
                body,
                ProtocolError(
                    "release.approval",
                    f"release {body.version} is not in the verified release bundle held",
                ),
            )
        if self.installing == body:
            # sent again (the service did not hear from us): it runs already
            return Outcome(publishes=[self._report()])
        if self.installing is not None:
            return self._install_refused(
                body,
                ProtocolError(
                    "release.install.busy",
                    f"installing {self.installing.version} (rollout {self.installing.rollout})",
                ),
            )
        self.installing = body
        self.install_result = InstallResult(body.rollout, body.version, InstallState.RUNNING)
        log.info("installing release %s (rollout %s)", body.version, body.rollout)
        return Outcome(install=body)

    def _install_refused(self, body: ReleaseInstall, exc: ProtocolError) -> Outcome:
        self.rejections.record(exc)
        log.warning("refused release.install of %s: [%s] %s", body.version, exc.check, exc.reason)
        self.install_result = InstallResult(
            body.rollout, body.version, InstallState.FAILED, exc.check
        )
        return Outcome(publishes=[self._report()])

    def install_finished(
        self, install: ReleaseInstall, failure: ProtocolError | None, now: int
    ) -> Outcome:
        """The update hook of ``install`` ended (``failure``: why it failed,
        ``release.install.failed`` or ``release.install.timeout``); a keys.report tells the
        service."""
        self._now = now
        if self.installing == install:
            self.installing = None
        if failure is None:
            log.info("release %s installed: it runs after the reboot", install.version)
            result = InstallResult(install.rollout, install.version, InstallState.DONE)
        else:
            self.rejections.record(failure)
            log.warning(
                "install of release %s failed: [%s] %s",
                install.version,
                failure.check,
                failure.reason,
            )
            result = InstallResult(
                install.rollout, install.version, InstallState.FAILED, failure.check
            )
        self.install_result = result
        return Outcome(publishes=[self._report()], changed=True, handled="install")

    # -- outbound ---------------------------------------------------------------------------

    def _send(self, body: Body) -> Publish:
        """Sign ``body`` in an envelope for the service with the next sequence number."""
        payload = encode_message(
            body,
            key=self._keys.devid,
            sender=self.device_id,
            to=self.service_id,
            seq=self._seq,
            time=self._now,
        )
        self._seq += 1
        return Publish(self.report_topic, payload, body.TYPE)

    def _ack(self, entry: _GroupEntry, command_id: bytes | None) -> Publish:
        name = _group_name(entry)
        group = entry.group
        self.last_acks[name] = (group.epoch, self._now)
        return self._send(
            Ack(
                group_id=name,
                epoch=group.epoch,
                epoch_authenticator=group.epoch_authenticator,
                command_id=command_id,
            )
        )

    def _report(self) -> Publish:
        # Destroyed keys that an earlier report already showed need not be sent again.
        if self.last_report is not None:
            self.ledger.forget_destroyed(self.last_report)
        records = sorted(self.ledger, key=lambda r: r.name)[:MAX_KEYS]
        self.last_report = self._now
        self.report_due = None  # this report carries every change made so far
        refused = sorted(
            (check, n) for check, n in self.rejections.snapshot().items() if _trust_check(check)
        )[:MAX_REFUSED]
        releases = self.releases
        held = None if releases is None else releases.held
        return self._send(
            KeyStateReport(
                keys=tuple(records),
                refused=tuple(refused),
                feed=self.membership.revocations.seq,
                release_seq=None if held is None else held.seq,
                release_generation=None if held is None else held.generation,
                release_version=None if releases is None else releases.version,
                install=self.install_result,
                trust_seq=self.trust.seq or None,
            )
        )

    def report(self, now: int) -> Outcome:
        """A keys.report now (the daemon sends one at start and after every reconnect, so the
        service learns the device's epochs and replays what it missed)."""
        self._now = now
        return Outcome(publishes=[self._report()], changed=True, handled="report")

    # -- time-driven work -------------------------------------------------------------------

    def tick(self, now: int) -> Outcome:
        """Destroy data keys past their grace period; ask for a self-update where an epoch
        reached its rotation limit; send the keys.report of recent key changes once due."""
        self._now = now
        outcome = Outcome(handled="tick")
        for record in list(self.ledger):
            if record.kind is not KeyKind.EPOCH or record.group is None:
                continue
            grace = self._policy_for(record.group).grace_period
            if record in self.ledger.due_for_destruction(grace, now):
                self._wipe_data_key(record.group, record.epoch)
                self.ledger.transition(record.name, KeyState.DESTROYED)
                log.info("destroyed data key %s after its grace period", record.name)
                outcome.changed = True
                self._report_soon()
        if self._drop_expiring_key_packages(now):
            outcome.changed = True
        for name, entry in self._groups.items():
            reason: str | None = rotation_due(
                self._policy_for(name), entry.started, entry.messages, now
            )
            if self._join_update_pending(entry):
                reason = JOIN_UPDATE_REASON
            elif reason is None and self._credential_stale(entry):
                # renewed certificates: our leaf in the tree still carries the old DevID
                # certificate; our next commit carries the new one (before the old one expires)
                reason = CREDENTIAL_RENEWED_REASON
            if reason is None or entry.pending:
                continue
            asked = entry.update_requested
            if (
                asked is not None
                and asked[0] == entry.group.epoch
                and now - asked[1] < UPDATE_REQUEST_RETRY
            ):
                continue
            entry.update_requested = (entry.group.epoch, now)
            log.info(
                "group %s epoch %d: %s reached, asking for an update",
                name,
                entry.group.epoch,
                reason,
            )
            outcome.publishes.append(
                self._send(
                    UpdateRequest(group_id=name, epoch=entry.group.epoch, reason=str(reason))
                )
            )
            outcome.changed = True
        self._tree_fetch_tick(now, outcome)
        self._handoff_tick(outcome)
        if self.report_due is not None and now >= self.report_due:
            outcome.publishes.append(self._report())
            outcome.changed = True
        self._renewal_tick(now, outcome)
        if self._dirty:
            outcome.changed = True
        return outcome

    def _handoff_tick(self, outcome: Outcome) -> None:
        """Hand the service, once, the Authorizations our version-2 group states held (it keeps
        those the group's tree names: docs/treekem.md, "Admissions delivered by the service"),
        in ``group.admissions`` parts that fit their frame."""
        for name, held in self._handoff.items():
            if name not in self._groups:
                continue
            part: list[bytes] = []
            size = 0
            for authz in held:
                if part and size + len(authz) > MAX_HANDOFF_BYTES:
                    outcome.publishes.append(self._send(GroupAdmissions(name, tuple(part))))
                    part, size = [], 0
                part.append(authz)
                size += len(authz)
            outcome.publishes.append(self._send(GroupAdmissions(name, tuple(part))))
            outcome.changed = True
            log.info("handed the service the %d Authorizations group %s held", len(held), name)
        self._handoff = {}

    def _tree_fetch_tick(self, now: int, outcome: Outcome) -> None:
        """Ask again for tree pages left unanswered; give up fetches that took too long (the
        init key stays: a re-sent Welcome opens again)."""
        again, expired = self._tree_fetches.due(now)
        for group_id in expired:
            self.rejections.record(
                ProtocolError("agent.tree-page.timeout", f"no tree for {group_id!r} in time")
            )
            log.warning("gave up fetching the tree of %s", group_id)
        for request in again:
            outcome.publishes.append(self._send(request))
            outcome.changed = True

    def _join_update_pending(self, entry: _GroupEntry) -> bool:
        """Whether we still hold the group with the leaf key we joined with."""
        return fresh_leaf_pending(_leaf_public(entry.group), entry.joined_leaf)

    def _fresh_leaf_if_pending(self, entry: _GroupEntry) -> ec.EllipticCurvePrivateKey | None:
        """A new TPM leaf key when our first commit in a group is not the self-update itself:
        whatever we commit first replaces the leaf key we joined with."""
        return self._keys.new_leaf_key() if self._join_update_pending(entry) else None

    def _drop_expiring_key_packages(self, now: int) -> bool:
        """Drop outstanding KeyPackages near their end (agent.protocol.initkeys): their leaf and
        init keys are destroyed with the next saved state; the service asks for fresh ones."""
        expiring = [
            public
            for public, kp in self._key_packages.items()
            if needs_refresh(KeyPackage.decode(kp).not_after, now)
        ]
        for public in expiring:
            del self._key_packages[public]
        if expiring:
            self._retire_leaves()
            self._report_soon()
        return bool(expiring)

    def _wipe_data_key(self, group: str, epoch: int | None) -> None:
        keys = self._data_keys.get(group)
        if keys is None or epoch is None:
            return
        secret = keys.pop(epoch, None)
        if secret is not None:
            secret.wipe()
        if not keys:
            del self._data_keys[group]

    def _retire_leaves(self) -> None:
        """Leaf keys the state no longer refers to are destroyed (ledger); the daemon shreds
        their blobs once this state is persisted."""
        init_refs = self._init_refs()
        live = {leaf_name(ref) for ref in self.leaf_refs() - init_refs}
        live_init = {init_key_name(ref) for ref in init_refs}
        for record in list(self.ledger):
            if record.kind is KeyKind.INIT:
                if record.name not in live_init and record.state is not KeyState.DESTROYED:
                    self.ledger.transition(record.name, KeyState.DESTROYED)
                continue
            if record.kind is not KeyKind.LEAF:
                continue
            if record.name in live and record.state is KeyState.DESTROYED:
                continue
            if record.name not in live and record.state is not KeyState.DESTROYED:
                self.ledger.transition(record.name, KeyState.DESTROYED)
        for name in live - {r.name for r in self.ledger}:
            self.ledger.add(name, KeyKind.LEAF, active=True)
        for name in live_init - {r.name for r in self.ledger}:
            self.ledger.add(name, KeyKind.INIT, active=True, note=INIT_KEY_NOTE)

    # -- data keys for apps (the local API) ---------------------------------------------------

    def encrypt(self, group: str, plaintext: bytes, now: int) -> bytes:
        """Seal for ``group`` under its current epoch key and count the message."""
        self._now = now
        self._refuse_deleted(group, "data.group-deleted")
        entry = self._groups.get(group)
        if entry is None:
            raise ProtocolError("data.epoch-unknown", f"this device holds no group {group!r}")
        epoch = entry.group.epoch
        if entry.messages >= AES_GCM_RANDOM_NONCE_LIMIT:
            raise ProtocolError(
                "data.epoch-unusable", "this epoch's key reached the AES-GCM message limit"
            )
        self.ledger.check_decrypt(group, epoch, self._policy_for(group).grace_period, now)
        key = self._data_keys.get(group, {}).get(epoch)
        if key is None:
            raise ProtocolError("data.epoch-unknown", f"no data key for {group!r} epoch {epoch}")
        blob = dataseal.seal(group, epoch, key, plaintext, rng=self._rng)
        entry.messages += 1
        self._dirty = True
        return blob

    def decrypt(self, group: str, blob: bytes, now: int) -> bytes:
        """Open data sealed for ``group`` in its current epoch or one still in its grace period."""
        self._now = now
        self._refuse_deleted(group, "data.group-deleted")
        grace = self._policy_for(group).grace_period

        def lookup(name: str, epoch: int) -> Secret:
            self.ledger.check_decrypt(name, epoch, grace, now)
            key = self._data_keys.get(name, {}).get(epoch)
            if key is None:
                raise ProtocolError("data.epoch-expired", f"{name!r} epoch {epoch} was destroyed")
            return key

        return dataseal.open_sealed(blob, lookup, expected_group=group)

    # -- persistence --------------------------------------------------------------------------

    def to_state(self, *, inline_trees: bool = True) -> dict[str, Any]:
        """Everything needed to resume exactly here. Holds secrets (epoch secrets, node keys,
        data keys): write it only into the encrypted state file. ``inline_trees=False``: each
        group's tree as the ``RatchetTree`` itself, O(1) (``agent.treestore`` saves what changed
        of it), not encoded, O(N)."""
        groups: dict[str, Any] = {}
        inline = inline_trees
        for name, entry in self._groups.items():
            groups[name] = {
                "group": entry.group.to_state(inline_tree=inline),
                "started": entry.started,
                "messages": entry.messages,
                "pending": [
                    {
                        "commit": p.commit,
                        "group": p.group.to_state(inline_tree=inline),
                        "command_id": p.command_id,
                    }
                    for p in entry.pending
                ],
                "update_requested": (
                    None if entry.update_requested is None else list(entry.update_requested)
                ),
                "joined_leaf": entry.joined_leaf,
                "proposed": [list(p) for p in entry.proposed],
            }
        return {
            "v": STATE_VERSION,
            "device": self.device_id,
            "seq": self._seq,
            "groups": groups,
            "data_keys": {
                name: {epoch: key.reveal() for epoch, key in keys.items()}
                for name, keys in self._data_keys.items()
            },
            "key_packages": [[public, kp] for public, kp in self._key_packages.items()],
            "key_package_requests": [
                [command_id, public] for command_id, public in self._key_package_requests.items()
            ],
            "used_init_keys": self._used_init.to_list(),
            "replies": [
                [mid, [[p.topic, p.payload, p.type] for p in publishes]]
                for mid, publishes in self._replies.items()
            ],
            "replay": self._guard.to_cbor_map(),
            "ledger": self.ledger.to_cbor(),
            "last_report": self.last_report,
            "last_acks": {name: list(value) for name, value in self.last_acks.items()},
            "membership": self.membership.to_state(),
            **({"trust": self.trust.encode()} if self.trust.seq else {}),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Load ``to_state()`` output into this (fresh) core. Leaf keys are resolved through the
        key provider. Anything inconsistent raises ``StateError`` and leaves nothing half-set."""
        try:
            restored = _Restored.parse(state, self)
        except StateError:
            raise
        except (KeyError, TypeError, ValueError, ProtocolError) as exc:
            raise StateError(f"agent state is malformed: {type(exc).__name__}: {exc}") from None
        self._seq = restored.seq
        self._groups = restored.groups
        self._data_keys = restored.data_keys
        self._key_packages = restored.key_packages
        self._key_package_requests = restored.key_package_requests
        self._used_init = restored.used_init
        self._replies = restored.replies
        self._guard = restored.guard
        self.ledger = restored.ledger
        self.last_report = restored.last_report
        self.last_acks = restored.last_acks
        self.membership.restore(restored.membership)
        self._handoff = restored.handoff
        if restored.trust is not None:
            self._take_trust(restored.trust)

    # -- status (no secrets) ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """A JSON-able summary: groups, epochs, members, keys and their states, last reports."""
        groups = []
        for name, entry in sorted(self._groups.items()):
            group = entry.group
            groups.append(
                {
                    "group": name,
                    "epoch": group.epoch,
                    "member_count": group.tree.member_count(),
                    # past STATUS_MEMBERS members, their count only (the status file is written
                    # at every save: a sorted list of 100,000 ids would be O(N log N) each time)
                    "members": (
                        sorted(device.decode() for _, device in group.members())
                        if group.tree.member_count() <= STATUS_MEMBERS
                        else None
                    ),
                    "own_leaf": group.own_leaf,
                    "epoch_started": entry.started,
                    "messages_this_epoch": entry.messages,
                    "pending_commits": len(entry.pending),
                    "update_requested": entry.update_requested is not None
                    and entry.update_requested[0] == group.epoch,
                    "fresh_leaf_pending": self._join_update_pending(entry),
                    "update_proposals_pending": len(entry.proposed),
                    "last_ack": _ack_json(self.last_acks.get(name)),
                }
            )
        return {
            "device_id": self.device_id,
            "next_seq": self._seq,
            "groups": groups,
            "keys": [_record_json(r) for r in sorted(self.ledger, key=lambda r: r.name)],
            "key_packages_outstanding": len(self._key_packages),
            "last_report": self.last_report,
            "rejections": self.rejections.snapshot(),
            "releases": None if self.releases is None else self.releases.status(),
            "trust": {
                "seq": self.trust.seq,
                "service_keys": [
                    {"kid": k.kid.hex()[:16], "until": k.until} for k in self.trust.service
                ],
                # empty: the device CA of the configuration ([fleet] trust_anchors)
                "device_cas": [
                    {"sha256": c.fingerprint.hex()[:16], "until": c.until}
                    for c in self.trust.device_ca or ()
                ],
                # empty: the broker CA of the configuration ([broker] ca)
                "broker_cas": [
                    {"sha256": c.fingerprint.hex()[:16], "until": c.until}
                    for c in self.trust.broker_ca or ()
                ],
            },
            "revocation_feed": {
                "seq": self.membership.revocations.seq,
                "time": self.membership.revocations.time,
                "revoked": len(self.membership.revocations.revoked),
                "removed_operators": sorted(
                    {name for _, name, _ in self.membership.revocations.operators}
                ),
            },
            "install": {
                "running": None if self.installing is None else self.installing.version,
                "last": None if self.install_result is None else self.install_result.to_cbor_map(),
            },
        }


STATUS_MEMBERS = 1000
"""The largest group whose members ``status()`` lists by device id."""


def _ack_json(value: tuple[int, int] | None) -> dict[str, int] | None:
    return None if value is None else {"epoch": value[0], "time": value[1]}


def _record_json(record: KeyRecord) -> dict[str, Any]:
    return dict(record.to_cbor_map())


def _leaf_public(group: Group) -> bytes:
    leaf = group.tree.leaf(group.own_leaf)
    assert leaf is not None  # a Group is only ever built for a member leaf
    return leaf.encryption_key


@dataclass
class _Restored:
    seq: int
    groups: dict[str, _GroupEntry]
    data_keys: dict[str, dict[int, Secret]]
    key_packages: OrderedDict[bytes, bytes]
    key_package_requests: OrderedDict[bytes, bytes]
    used_init: UsedInitKeys
    replies: OrderedDict[bytes, tuple[Publish, ...]]
    guard: ReplayGuard
    ledger: KeyLedger
    last_report: int | None
    last_acks: dict[str, tuple[int, int]]
    membership: MembershipState
    trust: trust.TrustBundle | None
    handoff: dict[str, tuple[bytes, ...]]

    @classmethod
    def parse(cls, state: dict[str, Any], core: AgentCore) -> _Restored:
        if state.get("v") != STATE_VERSION:
            raise StateError(f"agent state version {state.get('v')!r} is not supported")
        if state["device"] != core.device_id:
            raise StateError("the state file belongs to another device id")
        seq = _uint(state["seq"], "seq")
        load_leaf = core._keys.load_leaf
        groups: dict[str, _GroupEntry] = {}
        handoff: dict[str, tuple[bytes, ...]] = {}
        for name, raw in state["groups"].items():
            group = Group.from_state(raw["group"], load_leaf)
            if group.group_id != name.encode():
                raise StateError(f"group state {name!r} holds another group")
            legacy = legacy_admissions(raw["group"])
            if legacy:
                handoff[name] = legacy
            pending = [
                _Pending(
                    commit=_bytes(p["commit"], "pending commit"),
                    group=Group.from_state(p["group"], load_leaf),
                    command_id=p["command_id"],
                )
                for p in raw["pending"]
            ]
            asked = raw["update_requested"]
            groups[name] = _GroupEntry(
                group=group,
                started=_uint(raw["started"], "started"),
                messages=_uint(raw["messages"], "messages"),
                pending=pending,
                update_requested=None if asked is None else (int(asked[0]), int(asked[1])),
                # absent in state files written before it existed
                joined_leaf=_optional_bytes(raw.get("joined_leaf"), "joined leaf"),
                proposed=[
                    (
                        _uint(p[0], "proposal epoch"),
                        _bytes(p[1], "proposal leaf"),
                        _bytes(p[2], "proposal"),
                    )
                    for p in raw.get("proposed", [])
                ],
            )
        data_keys = {
            name: {
                _uint(epoch, "epoch"): Secret(_bytes(key, "data key", DATA_KEY_SIZE))
                for epoch, key in keys.items()
            }
            for name, keys in state["data_keys"].items()
        }
        key_packages: OrderedDict[bytes, bytes] = OrderedDict(
            (_bytes(public, "key package leaf"), _bytes(kp, "key package"))
            for public, kp in state["key_packages"]
        )
        # absent in state files written before it existed
        key_package_requests: OrderedDict[bytes, bytes] = OrderedDict(
            (_bytes(command_id, "key package request"), _bytes(public, "key package leaf"))
            for command_id, public in state.get("key_package_requests", [])
        )
        replies: OrderedDict[bytes, tuple[Publish, ...]] = OrderedDict(
            (
                _bytes(mid, "reply id"),
                tuple(Publish(str(t), _bytes(p, "reply"), str(k)) for t, p, k in publishes),
            )
            for mid, publishes in state["replies"]
        )
        guard = ReplayGuard.from_cbor_map(state["replay"])
        if (guard.window, guard.capacity) != (SERVICE_REPLAY_WINDOW, SERVICE_REPLAY_CAPACITY):
            # a state file written with other bounds (window 32 before this version): widened
            # without re-opening any seq the old bounds refused
            guard = guard.resized(SERVICE_REPLAY_WINDOW, SERVICE_REPLAY_CAPACITY)
        ledger = KeyLedger.from_cbor(state["ledger"], lambda: core._now)
        # absent until a rollover was taken (bundle 0 is the enrollment's service key); the
        # bundle was verified link by link when it arrived
        held = (
            None
            if state.get("trust") is None
            else trust.TrustBundle.decode(_bytes(state["trust"], "trust bundle"))
        )
        last_report = state["last_report"]
        last_acks = {
            name: (_uint(v[0], "ack epoch"), _uint(v[1], "ack time"))
            for name, v in state["last_acks"].items()
        }
        return cls(
            seq=seq,
            groups=groups,
            data_keys=data_keys,
            key_packages=key_packages,
            key_package_requests=key_package_requests,
            # absent in state files written before it existed
            used_init=UsedInitKeys(
                [_bytes(r, "used init key") for r in state.get("used_init_keys", [])]
            ),
            replies=replies,
            guard=guard,
            ledger=ledger,
            last_report=None if last_report is None else _uint(last_report, "last_report"),
            last_acks=last_acks,
            # a copy of the trust state: checked here (under the held bundle's operator CAs),
            # applied by restore() with the rest
            membership=core.membership.parse_state(state["membership"], held),
            trust=held,
            handoff=handoff,
        )


def _optional_bytes(value: object, what: str) -> bytes | None:
    return None if value is None else _bytes(value, what)


def _uint(value: object, what: str) -> int:
    if type(value) is not int or value < 0:
        raise StateError(f"agent state: {what} is not an unsigned integer")
    return value


def _bytes(value: object, what: str, size: int | None = None) -> bytes:
    if type(value) is not bytes or (size is not None and len(value) != size):
        raise StateError(f"agent state: {what} is malformed")
    return value
