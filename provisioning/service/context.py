"""What every flow of the delivery service is given: the service's long-lived dependencies
(``Env``) and, for one ``handle``/``tick`` call, the clock reading and the outgoing messages
gathered so far (``Call``). Nothing per call lives on the service object.

``Env`` holds only harmless caches besides its dependencies (losing them, or one instance not
seeing another's, changes nothing that matters):

- ``last_heard``: when a device was last heard from. ``devices.last_seen`` in the database is
  the shared truth (written with every accepted report); this only saves a read.
- ``releases``: the golden policy built at one release-state seq; every use reads the seq
  and rebuilds it when it moved.
- ``groups``: decoded public groups, each used only while the group row still carries the
  state token it was made for (``groupcache``); otherwise the row is decoded again.
- ``tree_pages``: groups' trees cut into pages for joiners, kept like ``groups``
  (``treepages``); any instance can rebuild a tree the database keeps.
- ``tree_requests``: each device's budget of tree requests at this instance (``treepages``):
  a device's requests spread over n instances get n budgets.
- ``catchup_sent``: which commit range was last replayed to a member for catch-up. Another
  instance may replay the same range once more, and a member drops commits it already has.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy.orm import Session, sessionmaker

from agent.protocol.authz import AuthzVerifier
from agent.protocol.errors import InternalError, ProtocolError
from agent.protocol.hpke import Rng
from agent.protocol.wire.messages.base import Body
from agent.protocol.wire.rejections import Rejections
from agent.protocol.wire.replay import ReplayGuard
from provisioning.metrics import ServiceMetrics
from provisioning.pki import verify_certificate
from provisioning.registry import run_in_transaction
from provisioning.revocation import RevocationSettings
from provisioning.service.credentials import StoredDevices
from provisioning.service.groupcache import GroupCache, RequestBuckets, TreePageCache
from provisioning.service.model import AttestationSettings, ReleaseCache, ServiceSettings

T = TypeVar("T")

COMMAND_ID_SIZE = 16


@dataclass(frozen=True)
class Clock:
    """One reading of the caller's clock: whole seconds, and the same reading in milliseconds
    (``seconds * 1000`` when the caller has only seconds, such as the tests' fake clocks).
    Everything in the service takes whole seconds; only the times the dashboard measures
    sub-second spans with (acks, accepted commits, the start and result of an operator
    command) are recorded in milliseconds."""

    seconds: int
    ms: int

    @classmethod
    def reading(cls, now: int, now_ms: int | None = None) -> Clock:
        if now_ms is None:
            return cls(now, now * 1000)
        if now_ms // 1000 != now:
            raise InternalError(f"now_ms {now_ms} is not within second {now}")
        return cls(now, now_ms)


@dataclass
class Env:
    """The service's dependencies and caches, shared by every call (see the module docstring)."""

    sessions: sessionmaker[Session]
    key: ec.EllipticCurvePrivateKey
    operator_ca: x509.Certificate
    settings: ServiceSettings
    attestation: AttestationSettings | None
    metrics: ServiceMetrics
    instance: str
    # Stored DevID certificates and AKs are checked against the device CA when used
    # (``credentials.StoredDevices``); it remembers what it checked.
    devices: StoredDevices
    rng: Rng = os.urandom
    rejections: Rejections = field(default_factory=Rejections)
    last_heard: dict[str, int] = field(default_factory=dict)
    catchup_sent: dict[tuple[str, str], tuple[int, int, int]] = field(default_factory=dict)
    # device -> the refusal counts its last keys.report carried (audited when they change)
    refusals_seen: dict[str, dict[str, int]] = field(default_factory=dict)
    started: bool = False  # pending removals resumed (``intake.ensure_started``)
    # when this instance last looked for group members without a rekey row (``rekeypolicy``)
    rekey_swept_at: int | None = None
    rekey_next_at: int = 0  # when this instance next runs the rekey check
    # the [groups] default this instance last saw recorded as its own (``rekeypolicy``): another
    # recorded after it means another instance runs with another default
    rekey_default_held: tuple[int, int] | None = None
    rekey_default_warned: tuple[int, int] | None = None  # the other default last logged
    # Operator approvals are checked with it (``requests.verifier``); it caches validated
    # operator certificates.
    authz_verifier: AuthzVerifier | None = None
    # Signs audit checkpoints (``checkpoints``); None: the service makes none.
    checkpoint_key: ec.EllipticCurvePrivateKey | None = field(default=None, repr=False)
    # The device CA and the broker's CRL file (``provisioning.revocation``); None: revoking
    # records the revoked certificates and compromised keys but signs no CRL (tests of flows
    # that do not revoke).
    revocation: RevocationSettings | None = None
    crl_checked_at: int = 0  # when ``tasks.crl_tick`` last compared the CRL file and database
    crl_write_at_ms: int | None = None  # a revocation's CRL goes to the file then (``WriteCrl``)
    releases: ReleaseCache | None = None  # the golden policy at a release seq (``releases``)
    # decoded public groups, each used only while its row has the same state token (``groupcache``)
    groups: GroupCache = field(default_factory=GroupCache)
    # groups' trees cut into pages for joiners, each used only while its row has the same
    # state token (``treepages``)
    tree_pages: TreePageCache = field(default_factory=TreePageCache)
    # each device's budget of tree requests at this instance (``treepages``)
    tree_requests: RequestBuckets = field(default_factory=RequestBuckets)
    # Signs the release bundle (``releases``, [releases] signing_key); None: none is published.
    release_key: ec.EllipticCurvePrivateKey | None = field(default=None, repr=False)
    release_key_warned: bool = False
    # The service signing key rollover (``trustroll``): bundle 0's key (``[service]
    # signing_cert``: what devices got at enrollment), the bundle whose current key ``key`` is,
    # and how a new key is loaded from its reference (None: this instance loads none).
    trust_origin: ec.EllipticCurvePublicKey | None = field(default=None, repr=False)
    trust_seq: int = 0
    trust_seen: dict[str, int] = field(default_factory=dict)  # device -> bundle it reported
    # keys a new service signing key must not be (name, public key): the CAs', the checkpoint
    # and release keys, the TLS keys
    reserved_keys: tuple[tuple[str, ec.EllipticCurvePublicKey], ...] = field(default=(), repr=False)
    load_key: Callable[[str], ec.EllipticCurvePrivateKey] | None = field(default=None, repr=False)
    # The device CA rollover (``trustroll``): the configured device CA ([device_ca] cert, what
    # devices enrolled before any rollover got); later ones come with the chain.
    device_ca_origin: x509.Certificate | None = field(default=None, repr=False)
    # The broker CA rollover: the broker CA(s) devices got at enrollment ([broker] ca)
    broker_ca_origin: tuple[x509.Certificate, ...] = field(default=(), repr=False)
    # The operator CA rollover (``trustroll``): the operator CAs the held trust bundle lists
    # (empty before its first operator CA section: ``operator_ca``, the configured one), the
    # end of each older one (certificate DER -> unix seconds) and the current one (new operator
    # certificates are its).
    operator_cas: tuple[x509.Certificate, ...] = field(default=(), repr=False)
    operator_ca_ends: dict[bytes, int] = field(default_factory=dict, repr=False)

    @property
    def operator_ca_current(self) -> x509.Certificate:
        """The operator CA new operator certificates come from (the held bundle's without an
        end, or the configured one)."""
        for ca in self.operator_cas:
            if ca.public_bytes(Encoding.DER) not in self.operator_ca_ends:
                return ca
        return self.operator_ca

    def approvals(self) -> AuthzVerifier:
        """The verifier of operator approvals: every operator CA the held trust bundle lists,
        each until its end (kept: it caches validated operator certificates)."""
        if self.authz_verifier is None:
            self.authz_verifier = AuthzVerifier(
                self.operator_cas or (self.operator_ca,), ends=self.operator_ca_ends
            )
        return self.authz_verifier

    def verify_operator_certificate(
        self, cert: x509.Certificate, now: int, *, current_only: bool = False
    ) -> None:
        """``cert`` is an operator certificate of an operator CA accepted at ``now`` (with
        ``current_only``: of the current one, as a newly added operator's must be). Raises
        ``pki.*`` (``pki.issuer``: of no CA accepted now)."""
        cas = (
            [self.operator_ca_current] if current_only else self.operator_cas or [self.operator_ca]
        )
        when = datetime.fromtimestamp(now, UTC)
        for ca in cas:
            end = self.operator_ca_ends.get(ca.public_bytes(Encoding.DER))
            if cert.issuer != ca.subject or (end is not None and now > end):
                continue
            verify_certificate(cert, ca, now=when, purpose="client")
            return
        raise ProtocolError(
            "pki.issuer",
            f"certificate issued by {cert.issuer.rfc4514_string()!r}, not by an operator CA "
            + ("new operator certificates come from" if current_only else "accepted now"),
        )

    def tx(self, work: Callable[[Session], T]) -> T:
        """``work`` in one transaction (retried on a serialization conflict)."""
        return run_in_transaction(self.sessions, work)

    def read(self, work: Callable[[Session], T]) -> T:
        with self.sessions() as session:
            return work(session)

    def new_id(self) -> bytes:
        return self.rng(COMMAND_ID_SIZE)


@dataclass(frozen=True)
class Outgoing:
    """A service message to sign and publish: ``body`` to ``to`` on ``topic``, dated ``at``."""

    topic: str
    body: Body
    to: str
    at: int


@dataclass
class Call:
    """One ``handle_many``/``tick``/``challenge`` call: the environment, the clock reading, and
    the messages to sign when the call ends (all at once: one sequence-counter reservation)."""

    env: Env
    clock: Clock
    outbox: list[Outgoing] = field(default_factory=list)
    rolled: bool = False  # a trust bundle was added: switch keys once this call's are signed
    # replay guards decoded in this call, by sender, with the stored bytes they came from
    # (``store.load_guard``'s memo: read-only, copied before use)
    guards: dict[str, tuple[bytes, int, ReplayGuard]] = field(default_factory=dict)

    def send(self, topic: str, body: Body, *, to: str, now: int) -> None:
        self.outbox.append(Outgoing(topic, body, to, now))
