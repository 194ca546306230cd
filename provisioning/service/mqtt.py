"""The MQTT adapter around the delivery service: ``keyfleet serve``.

One loop on one thread: take the next message from the broker (shared subscriptions
``$share/keyfleet/kf/v1/dev/+/report`` and ``$share/keyfleet/kf/v1/ops/+/cmd``) together with
whatever else is already queued (up to ``MAX_BATCH``), hand them to
``DeliveryService.handle_many`` with one wall-clock reading (whole seconds, and the same reading in
milliseconds for the times the dashboard measures), publish what it returns, and
only then acknowledge the messages (manual PUBACK): a crash in between gets them redelivered on
the next session, which the replay guard turns into benign duplicates. About once a second
``tick`` runs timeouts and retries.

The service's MQTT identity is its client certificate (CN ``keyfleet-service``); its client id
is ``keyfleet-service-<instance>`` so several instances may share the certificate. Any number of
instances may run against one database and one broker (docs/scale-out.md): the shared
subscriptions split the messages between them, and every piece of work in flight is a row in the
database that any instance can continue. Each instance serves its own Prometheus metrics on
``[metrics] listen`` when configured. It signs its
envelopes with ``[service] signing_key`` (a key of its own, never its TLS key; in a PKCS#11
token unless a file is explicitly configured), whose certificate ``[service] signing_cert`` the
devices hold as ``fleet.service_cert``, and audit checkpoints with ``[audit] checkpoint_key``
(``load_checkpoint_key``: a key of its own, refused if it is the signing or a TLS key).

With ``[http]`` configured the same process serves the enrollment API for factory stations
(``provisioning.http``: uvicorn in a thread, mutual TLS) on the same database; ``run`` stops it
with the MQTT loop. With ``[renewal] expired = "allow"`` it serves the HTTPS renewal listener
too (``provisioning.renewal_http``: server TLS only, for devices whose certificates expired).
The golden-measurements policy (``[attestation] golden_measurements``) is
loaded at start: a bad policy file is a configuration error, not a surprise at the first report.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.exc import SQLAlchemyError

from agent.mqtt import MqttClient
from agent.protocol.errors import ConfigError, KeyfleetError
from agent.protocol.topics import (
    OPS_SUBSCRIPTION,
    RELEASES_TOPIC,
    REPORT_SUBSCRIPTION,
    REVOCATION_FEED_TOPIC,
    TRUST_TOPIC,
)
from agent.protocol.wire.cose import key_id
from provisioning import custody, inventory, pki, revocation
from provisioning.config import InvalidConfig, ServiceConfig
from provisioning.db.runtime import create_service_schema
from provisioning.enroll import Enrollment, EnrollmentSettings
from provisioning.http import EnrollmentServer, build_app, start_enrollment_server
from provisioning.metrics import MetricsServer, ServiceMetrics
from provisioning.policy import load_policy
from provisioning.registry import create_schema, make_engine, session_factory
from provisioning.renewal_http import build_renewal_app, start_renewal_server
from provisioning.service import checkpoints
from provisioning.service.core import (
    AttestationSettings,
    DeliveryService,
    Publish,
    ServiceSettings,
)

log = logging.getLogger("keyfleet.service")

# Published retained: every device, connected now or later, reads the newest.
RETAINED = frozenset({REVOCATION_FEED_TOPIC, RELEASES_TOPIC, TRUST_TOPIC})

TICK_SECONDS = 1.0
POLL_SECONDS = 0.2
# At most this many queued messages are handed to the core at once (handle_many): enough to take
# a rekey's acks in a few transactions, few enough that a tick is not held back for long.
MAX_BATCH = 200


def settings_from(config: ServiceConfig) -> ServiceSettings:
    return ServiceSettings(
        ack_timeout=config.groups.ack_timeout_seconds,
        commit_request_timeout=config.service.commit_request_timeout_seconds,
        online_window=config.service.online_window_seconds,
        retention_epochs=config.groups.commit_log_retention_epochs,
        rekey_max_age=config.groups.rekey_max_age_seconds,
        rekey_max_epochs=config.groups.rekey_max_epochs,
        tree_requests_per_minute=config.groups.tree_requests_per_minute,
        tree_request_burst=config.groups.tree_request_burst,
        tree_pages_kept=config.groups.tree_pages_kept,
        min_approvals=config.quorum.min_approvals,
        request_ttl=config.quorum.request_ttl_seconds,
        checkpoint_interval=config.audit.checkpoint_interval_seconds,
        member_updates=config.groups.member_updates,
        member_update_min_interval=config.groups.member_update_min_interval_seconds,
        recovery_wait=config.groups.recovery_wait_seconds,
        release_grace=config.releases.grace_days * 86_400,
        rollout_wave_timeout=config.rollout.wave_timeout_seconds,
        certificate_validity=config.enrollment.certificate_validity_seconds,
        renew_expired=config.renewal.allows_expired,
        max_expired=config.renewal.max_expired_seconds,
    )


def load_checkpoint_key(
    config: ServiceConfig, signing_key: ec.EllipticCurvePublicKey
) -> ec.EllipticCurvePrivateKey | None:
    """``[audit] checkpoint_key`` (None when not configured), refused when it is the service's
    signing key (``signing_key``, the public half) or the key of one of its TLS certificates.
    The one place it is loaded."""
    ref = config.audit.checkpoint_key
    if ref is None:
        return None
    key = custody.load_private_key(ref, role="audit checkpoint")
    others = [("the service signing key", signing_key)]
    certs = [("the broker client_cert's key", config.broker.client_cert)]
    if config.http is not None:
        certs.append(("the [http] tls_cert's key", config.http.tls_cert))
    if config.dashboard is not None:
        certs.append(("the [dashboard] tls_cert's key", config.dashboard.tls_cert))
    if config.renewal.tls_cert is not None:
        certs.append(("the [renewal] tls_cert's key", config.renewal.tls_cert))
    for name, cert_path in certs:
        public = pki.cert_from_pem(cert_path.read_bytes()).public_key()
        if isinstance(public, ec.EllipticCurvePublicKey):
            others.append((name, public))
    checkpoints.require_distinct(key, others)
    return key


def load_release_key(
    config: ServiceConfig, signing_key: ec.EllipticCurvePublicKey
) -> ec.EllipticCurvePrivateKey | None:
    """``[releases] signing_key`` (None when not configured: no bundle is published), refused
    when it is the service's signing key: devices trust it for their sealed state, a key of its
    own keeps a service-signing compromise from approving firmware."""
    ref = config.releases.signing_key
    if ref is None:
        log.warning("keyfleet serve: no [releases] signing_key: no release bundle is published")
        return None
    key = custody.load_private_key(ref, role="release signing")
    if key_id(key.public_key()) == key_id(signing_key):
        raise ConfigError(
            "[releases] signing_key is the service signing key: release policies must be "
            'signed by a key of their own (release.key-reuse; docs/operations.md, "Releases")'
        )
    return key


def attestation_from(config: ServiceConfig) -> AttestationSettings:
    return AttestationSettings(
        policy=load_policy(config.attestation.golden_measurements),
        interval=config.attestation.interval_seconds,
        quarantine=config.attestation.quarantine,
        challenges_per_second=config.attestation.max_challenges_per_second,
    )


def load_signing_key(config: ServiceConfig) -> ec.EllipticCurvePrivateKey:
    """``[service] signing_key``, checked against ``[service] signing_cert``
    (``token.signing_cert.mismatch``: devices would refuse every message)."""
    config.require_signing()
    assert config.service.signing_key is not None and config.service.signing_cert is not None
    key = custody.load_private_key(config.service.signing_key, role="service signing")
    cert = pki.cert_from_pem(config.service.signing_cert.read_bytes())
    if cert.public_key() != key.public_key():
        raise InvalidConfig(
            config.path,
            [
                "[token.signing_cert.mismatch] [service] signing_cert does not certify the "
                "public key of [service] signing_key"
            ],
        )
    return key


def _key_loader(config: ServiceConfig) -> Callable[[str], ec.EllipticCurvePrivateKey]:
    """How a ``trust.rotate`` names the new service signing key: a key reference as in the
    configuration (a ``pkcs11:`` URI, or a file relative to the configuration's directory)."""
    base = config.path.parent

    def load(ref: str) -> ec.EllipticCurvePrivateKey:
        return custody.load_private_key(
            custody.parse_key_ref(ref, base=base), role="service signing"
        )

    return load


def _tls_keys(config: ServiceConfig) -> list[tuple[str, ec.EllipticCurvePublicKey]]:
    """The keys of the service's TLS certificates (a new signing key must not be one)."""
    certs = [("the broker client_cert's key", config.broker.client_cert)]
    if config.http is not None:
        certs.append(("the [http] tls_cert's key", config.http.tls_cert))
    if config.dashboard is not None:
        certs.append(("the [dashboard] tls_cert's key", config.dashboard.tls_cert))
    if config.renewal.tls_cert is not None:
        certs.append(("the [renewal] tls_cert's key", config.renewal.tls_cert))
    found = []
    for name, path in certs:
        public = pki.cert_from_pem(path.read_bytes()).public_key()
        if isinstance(public, ec.EllipticCurvePublicKey):
            found.append((name, public))
    return found


class ServiceRunner:
    """``keyfleet serve``: database, service core and MQTT client, wired together; the
    enrollment API too when ``[http]`` is configured."""

    def __init__(self, config: ServiceConfig, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.config = config
        self.http: EnrollmentServer | None = None
        self.renewal_http: EnrollmentServer | None = None
        self.metrics = ServiceMetrics(clock=clock)
        self.metrics_server: MetricsServer | None = None
        self._expiry_thread: threading.Thread | None = None
        config.require_signing()
        attestation = attestation_from(config)
        self._engine = make_engine(config.database_url)
        create_schema(self._engine)
        create_service_schema(self._engine)
        assert config.service.signing_key is not None  # require_signing above
        signing_key = load_signing_key(config)
        operator_ca = pki.cert_from_pem(config.operator_ca_cert.read_bytes())
        self.revocation = revocation.settings_from_config(config)
        checkpoint_key = load_checkpoint_key(config, signing_key.public_key())
        release_key = load_release_key(config, signing_key.public_key())
        self._service_args: dict[str, Any] = {
            "signing_key": signing_key,
            "operator_ca": operator_ca,
            "device_ca": pki.cert_from_pem(config.device_ca.cert.read_bytes()),
            "settings": settings_from(config),
            "attestation": attestation,
            "metrics": self.metrics,
            "revocation": self.revocation,
            "load_key": _key_loader(config),
            "reserved_keys": _tls_keys(config),
            "broker_ca": pki.certs_from_pem(config.broker.ca.read_bytes()),
        }
        self.service = DeliveryService(
            session_factory(self._engine),
            instance=config.service.instance,
            checkpoint_key=checkpoint_key,
            release_key=release_key,
            **self._service_args,
        )
        # a rollover done while this instance was down: sign with the newest bundle's key
        self.service.sync_trust()
        # The broker's crlfile must exist before the broker starts (and hold a current CRL):
        # issue the first one now if there is none, and bring the file up to date.
        self.service.ensure_crl(int(clock()))
        self.client_id = f"keyfleet-service-{config.service.instance}"
        self.client = MqttClient(
            host=config.broker.host,
            port=config.broker.port,
            ca_file=config.broker.ca,
            cert_file=config.broker.client_cert,
            key_file=config.broker.client_key,
            client_id=self.client_id,
            manual_ack=True,
            session_expiry=config.service.session_expiry_seconds,
        )
        log.info(
            "keyfleet serve: database %s, broker %s:%s as %s, service signing kid %s (%s)",
            config.database_url_redacted,
            config.broker.host,
            config.broker.port,
            self.client_id,
            key_id(self.service.signing_key).hex(),
            custody.describe(config.service.signing_key),
        )
        log.info("keyfleet serve: device CA key (%s)", custody.describe(config.device_ca.key))
        if checkpoint_key is not None and config.audit.checkpoint_key is not None:
            log.info(
                "keyfleet serve: audit checkpoint kid %s (%s), every %d s",
                key_id(checkpoint_key.public_key()).hex(),
                custody.describe(config.audit.checkpoint_key),
                config.audit.checkpoint_interval_seconds,
            )

    def _publish(self, publishes: list[Publish]) -> None:
        """All of them, then one wait for their PUBACKs (the client keeps their order on its
        one connection): a round trip per batch instead of per message. The revocation feed's
        head is published retained (every device, now or later connected, reads the newest)."""
        self.client.publish_all(
            [(item.topic, item.payload) for item in publishes if item.topic not in RETAINED]
        )
        for item in publishes:
            if item.topic in RETAINED:
                self.client.publish(item.topic, item.payload, retain=True)

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set; then disconnect cleanly (the broker keeps the session
        and queues what arrives meanwhile)."""
        try:
            self._start_http()
            self._start_renewal()
            self._start_metrics()
            self.client.connect()
            self.client.subscribe(REPORT_SUBSCRIPTION)
            self.client.subscribe(OPS_SUBSCRIPTION)
            # the retained trust chain, feed head and release bundle again (a broker that lost
            # them, or a restored database)
            self._publish(self.service.trust_chain())
            self._publish(self.service.feed_head(int(self._clock())))
            self._publish(self.service.release_bundle(int(self._clock())))
            log.info("keyfleet serve: ready (subscribed to device reports and operator commands)")
            last_tick = 0.0
            last_expiry = -float("inf")
            while not stop.is_set():
                if self.metrics_server is not None and (
                    time.monotonic() - last_expiry >= self._expiry_refresh_seconds
                ):
                    last_expiry = time.monotonic()
                    self._refresh_expiry()
                message = self.client.get(timeout=POLL_SECONDS)
                if message is not None:
                    batch = [message]
                    while len(batch) < MAX_BATCH:
                        more = self.client.get(timeout=0)
                        if more is None:
                            break
                        batch.append(more)
                    # one clock reading in ms, its second as ``now``: acks and commits are
                    # timed in ms (dashboard ack latency), everything else in seconds
                    now_ms = int(self._clock() * 1000)
                    try:
                        self._publish(
                            self.service.handle_many(
                                [(m.topic, m.payload) for m in batch],
                                now_ms // 1000,
                                now_ms=now_ms,
                            )
                        )
                    except (KeyfleetError, SQLAlchemyError) as exc:
                        # A transport or database failure while handling: the messages are
                        # acknowledged anyway (a poison message must not loop); the senders'
                        # timeouts and the service's retries recover the flow.
                        log.error("handling %d message(s) failed: %s", len(batch), exc)
                    for received in batch:
                        self.client.ack(received)
                if time.monotonic() - last_tick >= TICK_SECONDS:
                    last_tick = time.monotonic()
                    try:
                        now_ms = int(self._clock() * 1000)
                        self._publish(self.service.tick(now_ms // 1000, now_ms=now_ms))
                    except (KeyfleetError, SQLAlchemyError) as exc:
                        log.error("periodic work failed: %s", exc)
        finally:
            self.close()

    def _start_http(self) -> None:
        http = self.config.http
        if http is None:
            return
        enrollment = Enrollment(
            EnrollmentSettings.from_service_config(self.config),
            session_factory(self._engine),
            issuer=self.service.device_issuer,  # after a device CA rollover: the new CA
            broker_cas=self.service.broker_cas,  # after a broker CA rollover: the bundle's
            operator_cas=self.service.operator_cas,  # after an operator CA rollover likewise
        )
        self.http = start_enrollment_server(
            build_app(enrollment, clock=self._clock, on_refusal=self._count_http_refusal),
            server_cert=http.tls_cert,
            server_key=http.tls_key,
            station_ca=http.station_ca,
            host=http.host,
            port=http.port,
        )
        log.info("keyfleet serve: enrollment API on %s (mutual TLS)", self.http.url)

    def _start_renewal(self) -> None:
        """The HTTPS renewal listener, when ``[renewal] expired = "allow"``: a
        ``DeliveryService`` of its own (the core is not thread-safe; the database is what the
        two share, as between instances)."""
        renewal = self.config.renewal
        if not renewal.allows_expired:
            return
        assert renewal.host is not None and renewal.port is not None  # config checks it
        assert renewal.tls_cert is not None and renewal.tls_key is not None
        service = DeliveryService(
            session_factory(self._engine),
            instance=f"{self.config.service.instance}-renewal",
            **self._service_args,
        )
        self.renewal_http = start_renewal_server(
            build_renewal_app(
                service.renew_over_https, clock=self._clock, on_refusal=self._count_http_refusal
            ),
            server_cert=renewal.tls_cert,
            server_key=renewal.tls_key,
            host=renewal.host,
            port=renewal.port,
        )
        log.info(
            "keyfleet serve: renewal listener on %s (server TLS; expired certificates renew "
            "up to %d s after expiry)",
            self.renewal_http.url,
            renewal.max_expired_seconds,
        )

    def _count_http_refusal(self, check: str) -> None:
        self.metrics.rejections.inc(check)

    def _start_metrics(self) -> None:
        listen = self.config.metrics
        if listen is None:
            return
        self.metrics_server = MetricsServer(
            self.metrics, listen.host, listen.port, instance=self.config.service.instance
        )
        self.metrics_server.start()
        log.info(
            "keyfleet serve: metrics on http://%s:%s/metrics", listen.host, self.metrics_server.port
        )

    @property
    def _expiry_refresh_seconds(self) -> float:
        return float(self.config.metrics.expiry_refresh_seconds) if self.config.metrics else 0.0

    def _refresh_expiry(self) -> None:
        """Re-read the expiry gauges' data in a thread of its own (a big fleet's certificates
        take a while to parse; the message loop goes on meanwhile); one refresh at a time."""
        if self._expiry_thread is not None and self._expiry_thread.is_alive():
            return

        def work() -> None:
            try:
                with session_factory(self._engine)() as session:
                    fleet, devices = inventory.expiry_data(self.config, session)
                self.metrics.expiry.set(fleet, devices, now=int(self._clock()))
            except (KeyfleetError, SQLAlchemyError, OSError) as exc:
                log.error("expiry gauges not refreshed: %s", exc)

        self._expiry_thread = threading.Thread(target=work, name="keyfleet-expiry", daemon=True)
        self._expiry_thread.start()

    def close(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None
        if self.http is not None:
            self.http.stop()
            self.http = None
        if self.renewal_http is not None:
            self.renewal_http.stop()
            self.renewal_http = None
        if self._expiry_thread is not None:
            self._expiry_thread.join(timeout=10)
        self.client.close()
        self._engine.dispose()
        log.info("keyfleet serve: stopped")
