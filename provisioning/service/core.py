"""The delivery service, sans I/O: MQTT messages in, MQTT publishes out, the registry in between.

``DeliveryService.handle(topic, payload, now)`` takes one message the service received (a device
report on ``kf/v1/dev/{id}/report`` or an operator command on ``kf/v1/ops/{op}/cmd``) and returns
the ``Publish`` actions to perform; ``tick(now)`` drives timeouts and retries. Nothing here opens
a socket or reads a clock: the MQTT adapter (``provisioning.service.mqtt``) does that.

This class is a facade that only routes (docs/service.md, "Running"). Each flow is a module of
``provisioning.service``, given the service's dependencies and the call's clock reading and
outbox (``context``), returning what should happen after its transaction commits as data
(``effects``, executed by ``execute``); every query is in ``store``:

- ``intake``: batches, ``tick``, signing with the shared sequence counter;
- ``verify``: envelope verification, the replay guard, refusals;
- ``devices``: device reports (key states, update requests, device destroyed, key packages,
  group created);
- ``commits``: public commit checks, held commit/welcome pairing, acceptance;
- ``acks``: acks, one at a time and in batches;
- ``catchup``: replaying missed commits, re-adding a member beyond retention;
- ``operators``: registration, command authorization, planning of group changes;
- ``requests``: dual control (proposals, approvals, the quorum policy, expiry);
- ``jobs``: each group's queue of changes and the choice of committer;
- ``rekeypolicy``: every member's leaf key moves (the rekey policy, full rekeys);
- ``operations``: operator commands in flight, progress, results, timeouts;
- ``attestation``: challenges, verdicts, quarantine;
- ``tasks``: periodic work one instance does at a time (attestation schedule, prune);
- ``checkpoints``: signed audit checkpoints, made on a schedule and served to operators;
- ``renewal``, ``expired``: certificate renewal by TPM proof, over MQTT and (after expiry) HTTPS.

Several instances (docs/scale-out.md): everything in flight is in the database (jobs, the
per-group in-flight slot, operations, held commits and welcomes, attestation waits and schedule,
task leases, the envelope sequence counter; ``provisioning.service.store``), and every step that
two instances could both take is a conditional write that only one wins. So any instance handles
any message the shared subscription gives it, a job's deadline is the lease of the instance that
last moved it, and nothing needs a leader. Only harmless caches stay in memory (``context.Env``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from agent.protocol.errors import KeyfleetError
from agent.protocol.hpke import Rng
from agent.protocol.topics import TRUST_TOPIC
from agent.protocol.wire.rejections import Rejections
from provisioning.metrics import ServiceMetrics
from provisioning.pki import CertificateAuthority
from provisioning.revocation import RevocationSettings
from provisioning.service import (
    attestation,
    execute,
    expired,
    feed,
    intake,
    releases,
    store,
    tasks,
    trustroll,
)
from provisioning.service.context import Call, Clock, Env
from provisioning.service.credentials import StoredDevices
from provisioning.service.groupcache import TreePageCache
from provisioning.service.model import (
    AttestationSettings,
    AttestOperation,
    Job,
    JobState,
    Operation,
    Publish,
    ServiceSettings,
    describe_publishes,
)

__all__ = [
    "AttestOperation",
    "AttestationSettings",
    "DeliveryService",
    "Job",
    "JobState",
    "Operation",
    "Publish",
    "ServiceSettings",
    "describe_publishes",
]


log = logging.getLogger("keyfleet.service")


class DeliveryService:
    """See the module docstring. Not thread-safe: one adapter thread calls it; other instances
    (other processes) share only the database."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        signing_key: ec.EllipticCurvePrivateKey,
        operator_ca: x509.Certificate,
        device_ca: x509.Certificate,
        settings: ServiceSettings | None = None,
        attestation: AttestationSettings | None = None,
        rng: Rng = os.urandom,
        instance: str = "1",
        metrics: ServiceMetrics | None = None,
        checkpoint_key: ec.EllipticCurvePrivateKey | None = None,
        revocation: RevocationSettings | None = None,
        release_key: ec.EllipticCurvePrivateKey | None = None,
        load_key: trustroll.KeyLoader | None = None,
        trust_origin: ec.EllipticCurvePublicKey | None = None,
        broker_ca: Sequence[x509.Certificate] = (),
        reserved_keys: Sequence[tuple[str, ec.EllipticCurvePublicKey]] = (),
    ) -> None:
        reserved = [*reserved_keys]
        for name, cert in (
            ("the device CA's key", device_ca),
            ("the operator CA's key", operator_ca),
        ):
            public = cert.public_key()
            if isinstance(public, ec.EllipticCurvePublicKey):
                reserved.append((name, public))
        for name, private in (
            ("the audit checkpoint key", checkpoint_key),
            ("the release signing key", release_key),
        ):
            if private is not None:
                reserved.append((name, private.public_key()))
        settings = settings if settings is not None else ServiceSettings()
        self._env = Env(
            sessions=sessions,
            key=signing_key,
            operator_ca=operator_ca,
            settings=settings,
            attestation=attestation,
            metrics=metrics if metrics is not None else ServiceMetrics(),
            instance=instance,
            devices=StoredDevices(device_ca),
            rng=rng,
            checkpoint_key=checkpoint_key,
            revocation=revocation,
            release_key=release_key,
            trust_origin=signing_key.public_key() if trust_origin is None else trust_origin,
            load_key=load_key,
            reserved_keys=tuple(reserved),
            device_ca_origin=device_ca,
            broker_ca_origin=tuple(broker_ca),
            tree_pages=TreePageCache(max_paged=settings.tree_pages_kept),
        )

    @property
    def settings(self) -> ServiceSettings:
        return self._env.settings

    @property
    def attestation(self) -> AttestationSettings | None:
        return self._env.attestation

    @property
    def instance(self) -> str:
        return self._env.instance

    @property
    def metrics(self) -> ServiceMetrics:
        return self._env.metrics

    @property
    def rejections(self) -> Rejections:
        return self._env.rejections

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
        that follow each other are taken in one transaction (``acks.on_acks``). Never raises
        for a bad message; a transport or database failure while handling one is logged and
        the others are still handled (``intake``)."""
        cx = Call(self._env, Clock.reading(now, now_ms))
        intake.handle_many(cx, messages, now)
        return self._signed(cx, now)

    def tick(self, now: int, *, now_ms: int | None = None) -> list[Publish]:
        """Timeouts and retries: commit requests nobody answered go to the next candidate, key
        package requests are repeated, operations without progress end in ``timeout``. Every
        instance ticks; each step is a compare-and-set on a shared row, so each happens once
        (and a dead instance's jobs are taken over when their deadline, its lease, passes)."""
        cx = Call(self._env, Clock.reading(now, now_ms))
        intake.tick(cx, now)
        return self._signed(cx, now, follow=True)

    def _signed(self, cx: Call, now: int, *, follow: bool = False) -> list[Publish]:
        """This call's messages, signed with the key it began with; then, if a trust bundle was
        added (by this call, or with ``follow`` by another instance), the newest bundle's key
        signs from now on and the chain, feed head and release bundle are published again
        (``trustroll``)."""
        publishes = intake.sign(cx)
        if not (cx.rolled or follow):
            return publishes
        try:
            moved = self._env.read(lambda s: trustroll.sync(self._env, s))
        except (KeyfleetError, SQLAlchemyError) as exc:
            log.error("following the trust chain failed: %s", exc)
            return publishes
        if moved:
            publishes += self.trust_chain() + self.feed_head(now) + self.release_bundle(now)
        return publishes

    def sync_trust(self) -> None:
        """At start: sign with the newest trust bundle's key (``trustroll.sync``)."""
        self._env.read(lambda s: trustroll.sync(self._env, s))

    def device_issuer(self, now: int) -> tuple[CertificateAuthority, tuple[x509.Certificate, ...]]:
        """The device CA this instance issues from now and the device CAs a new device trusts
        (the current trust bundle's accepted at ``now``): for the enrollment server."""
        settings = self._env.revocation
        if settings is None:
            raise KeyfleetError("this service instance holds no device CA key")
        bundle = self._env.read(lambda s: trustroll.held(self._env, s))
        accepted = bundle.device_cas(now)
        return settings.device_ca, (
            settings.device_ca.certificate,
        ) if accepted is None else accepted

    def broker_cas(self, now: int) -> tuple[x509.Certificate, ...]:
        """The broker CAs a device enrolled now gets: the current trust bundle's accepted at
        ``now``, or ([broker] ca) those of the configuration."""
        bundle = self._env.read(lambda s: trustroll.held(self._env, s))
        accepted = bundle.broker_cas(now)
        return self._env.broker_ca_origin if accepted is None else accepted

    def operator_cas(self, now: int) -> tuple[x509.Certificate, ...]:
        """The operator CAs a device enrolled now gets: the current trust bundle's accepted at
        ``now``, or ([operator_ca] cert) the configured one."""
        bundle = self._env.read(lambda s: trustroll.held(self._env, s))
        accepted = bundle.operator_cas(now)
        return (self._env.operator_ca,) if accepted is None else accepted

    def trust_chain(self) -> list[Publish]:
        """The chain of trust bundles to publish retained, none before the first rollover. Not
        an envelope: each link is signed by a key of the bundle before it."""
        data = self._env.read(trustroll.chain)
        return [] if data is None else [Publish(TRUST_TOPIC, data)]

    @property
    def signing_key(self) -> ec.EllipticCurvePublicKey:
        """The public half of the key the service signs with now."""
        return self._env.key.public_key()

    def challenge(self, device_id: str, now: int) -> list[Publish]:
        """Challenge ``device_id`` now (what the schedule and ``op.attest`` do); returns the
        publish. Raises ``ProtocolError`` if the device cannot be attested."""
        cx = Call(self._env, Clock.reading(now))
        intake.ensure_started(cx, now)
        attestation.challenge(cx, device_id, now)
        return intake.sign(cx)

    def renew_over_https(self, step: str, device_id: str, payload: bytes, now: int) -> bytes:
        """One step of a renewal over HTTPS (``expired``: ``start`` takes a ``renew.request``
        envelope, ``finish`` a ``renew.answer``); returns the signed answer. Raises
        ``ProtocolError`` (counted, logged, audited once authenticated). Signs with the newest
        trust bundle's key (another instance may have rolled it)."""
        self._env.read(lambda s: trustroll.sync(self._env, s))
        cx = Call(self._env, Clock.reading(now))
        return expired.renew(cx, step, device_id, payload, now)

    def feed_head(self, now: int) -> list[Publish]:
        """The revocation feed's signed head to publish retained (``feed``), none if empty."""
        cx = Call(self._env, Clock.reading(now))
        execute.run(cx, self._env.read(lambda s: feed.publish_head(s, now=now)))
        return intake.sign(cx)

    def release_bundle(self, now: int) -> list[Publish]:
        """The signed release bundle to publish retained (``releases``): the stored one, or one
        signed now if the release state has none yet; none without a release key."""
        cx = Call(self._env, Clock.reading(now))
        intake.ensure_started(cx, now)
        execute.run(cx, self._env.tx(lambda s: releases.current_bundle(cx, s, now)))
        return intake.sign(cx)

    def ensure_crl(self, now: int) -> None:
        """Issue the device CA's first CRL if there is none (or the newest is past half its
        validity) and write it to the broker's CRL file: what ``tick`` does every
        ``tasks.CRL_CHECK_SECONDS``, now (the broker cannot start without the file)."""
        cx = Call(self._env, Clock.reading(now))
        self._env.crl_checked_at = 0
        tasks.crl_tick(cx, now)

    def queue_length(self, group_id: str) -> int:
        """Open jobs of ``group_id`` (queued or in flight), fleet-wide."""
        return len(self._env.read(lambda s: store.open_job_rows(s, group_id)))
