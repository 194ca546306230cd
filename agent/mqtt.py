"""The MQTT adapter: paho-mqtt 2.x (MQTT v5) behind a small blocking API with our own types.

The agent and the fleet service both talk MQTT through ``MqttClient``. It holds no protocol
logic: it moves bytes between topics and callers. What it adds over paho:

- one place where paho callbacks and ``MQTTMessage`` become ``ReceivedMessage``;
- a timeout on every wait (CONNACK, SUBACK, UNSUBACK, PUBACK) that ends in ``TransportError``,
  and broker refusals (reason codes >= 0x80, e.g. an ACL denial) as ``MqttRefused``;
- its own I/O thread that reconnects with exponential backoff and injectable jitter, resumes
  the persistent session (clean_start False + session expiry) and re-subscribes if the broker
  lost it;
- a refused client certificate, which paho only shows as a connection that never completes,
  reported with the TLS error that caused it.

Delivery is at least once: a ``publish`` that times out has an unknown outcome (paho keeps the
message and resends it after a reconnect), so protocol messages must be idempotent, which the
wire layer's sequence numbers make them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent import lazyimport
from agent.protocol.errors import ConfigError, TransportError

# paho imports these at its top for what the agent never uses (proxies, generated client ids)
lazyimport.defer("urllib.request", "uuid")

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402
from paho.mqtt.reasoncodes import ReasonCode  # noqa: E402

log = logging.getLogger("keyfleet.mqtt")

DEFAULT_TIMEOUT = 10.0
DEFAULT_SESSION_EXPIRY = 7 * 24 * 3600  # a device may be offline for a week and still resume
_LOOP_SLICE = 0.1  # how often the I/O thread notices close()
_MQTT_ERR_SUCCESS = MQTTErrorCode.MQTT_ERR_SUCCESS


def _no_delay(sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttRefused(TransportError):
    """The broker answered with a failure reason code (e.g. 0x87 "Not authorized" when the ACL
    denies a publish). ``reason_code`` is the MQTT v5 code."""

    def __init__(self, operation: str, reason_code: int, reason: str) -> None:
        super().__init__(f"broker refused {operation}: {reason} (0x{reason_code:02x})")
        self.operation = operation
        self.reason_code = reason_code


@dataclass(frozen=True)
class ReceivedMessage:
    """A message delivered by the broker, already out of paho's types."""

    topic: str
    payload: bytes = field(repr=False)
    qos: int
    retain: bool
    duplicate: bool
    mid: int
    content_type: str | None = None
    message_expiry: int | None = None
    user_properties: tuple[tuple[str, str], ...] = ()


def _default_jitter(delay: float) -> float:
    """ "Equal jitter": somewhere in [delay/2, delay], so a fleet that lost its broker at the same
    moment does not come back in lockstep. Not security relevant, hence not ``secrets``."""
    return random.SystemRandom().uniform(delay / 2, delay)


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays: ``initial * multiplier**attempt`` capped at ``maximum``, then passed
    through ``jitter`` (injectable so tests can make it deterministic)."""

    initial: float = 0.5
    maximum: float = 60.0
    multiplier: float = 2.0
    jitter: Callable[[float], float] = _default_jitter

    def delay(self, attempt: int) -> float:
        nominal = min(self.maximum, self.initial * self.multiplier ** min(attempt, 64))
        return max(0.0, self.jitter(nominal))


class _Completions:
    """Acknowledgements (CONNACK aside) arriving on the I/O thread, matched to waiting callers.

    Keyed by (packet kind, message id). Callers register nothing before paho hands them the id,
    so an ack may land before anyone waits for it; results therefore carry their arrival time
    and a waiter accepts only results newer than its own start, which also makes a late ack for
    an abandoned wait harmless when the id is reused after wrapping.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._results: dict[tuple[str, int], tuple[int, Any]] = {}
        self._closed = False

    def complete(self, kind: str, mid: int, result: Any) -> None:
        with self._cond:
            self._results[(kind, mid)] = (time.monotonic_ns(), result)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._results.clear()
            self._cond.notify_all()

    def wait(self, kind: str, mid: int, since_ns: int, timeout: float) -> tuple[bool, Any]:
        key = (kind, mid)

        def ready() -> bool:
            entry = self._results.get(key)
            return self._closed or (entry is not None and entry[0] >= since_ns)

        with self._cond:
            try:
                arrived = self._cond.wait_for(ready, timeout)
                if self._closed:
                    raise TransportError(f"MQTT client closed while waiting for {kind}")
                if not arrived:
                    return False, None
                return True, self._results[key][1]
            finally:
                # Whatever happened, this id's slot is done with: no table grows with timeouts.
                entry = self._results.get(key)
                if entry is not None and entry[0] >= since_ns:
                    del self._results[key]


class MqttClient:
    """A persistent-session MQTT v5 client with mutual TLS, QoS 1 by default.

    Messages go to ``on_message`` (called on the I/O thread: keep it short, never block on this
    client from it) or, when no handler is given, to a thread-safe queue read with ``get()``.
    With ``manual_ack=True`` the PUBACK for a received QoS 1 message is sent only when the
    caller passes it to ``ack()``, so a crash before the message is processed gets it redelivered
    on the next session.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        ca_file: str | os.PathLike[str],
        cert_file: str | os.PathLike[str],
        key_file: str | os.PathLike[str],
        client_id: str,
        clean_start: bool = False,
        session_expiry: int = DEFAULT_SESSION_EXPIRY,
        keepalive: int = 30,
        timeout: float = DEFAULT_TIMEOUT,
        backoff: Backoff | None = None,
        on_message: Callable[[ReceivedMessage], None] | None = None,
        manual_ack: bool = False,
        max_inflight: int = 20,
        max_queued: int = 10_000,
        key_password: str | None = None,
    ) -> None:
        if not client_id:
            raise ValueError("client_id must not be empty: persistent sessions are keyed by it")
        self.host = host
        self.port = port
        self.client_id = client_id
        self.timeout = timeout
        self._backoff = backoff if backoff is not None else Backoff()
        self._on_message = on_message
        self._inbox: queue.Queue[ReceivedMessage] = queue.Queue()
        self._completions = _Completions()
        self._lock = threading.Lock()  # guards the fields below; never held while calling paho
        self._subscriptions: dict[str, int] = {}
        self._recent_errors: deque[str] = deque(maxlen=3)
        self._session_present: bool | None = None
        self._reconnects = 0
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # Touched only on the I/O thread (paho runs its callbacks there too).
        self._awaiting_connack = False
        self._resubscribing: set[int] = set()

        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=manual_ack,
            reconnect_on_failure=False,  # our I/O thread owns reconnects (backoff with jitter)
        )
        try:
            client.tls_set(
                ca_certs=os.fspath(ca_file),
                certfile=os.fspath(cert_file),
                keyfile=os.fspath(key_file),
                # an encrypted key file (an operator's): decrypted in memory by the TLS stack
                keyfile_password=key_password,
            )
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            # Name the files, never their content: one of them is a private key.
            raise ConfigError(
                f"MQTT TLS files unusable (ca_file={os.fspath(ca_file)}, "
                f"cert_file={os.fspath(cert_file)}, key_file={os.fspath(key_file)}): "
                f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or exc.args[0]}"
            ) from None
        client.max_inflight_messages_set(max_inflight)
        client.max_queued_messages_set(max_queued)
        client.connect_timeout = min(timeout, 5.0)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        client.on_unsubscribe = self._handle_unsubscribe
        client.on_log = self._handle_log
        # Without this, paho (no loop_start thread of its own) writes a publish/ack straight to
        # the TLS socket from the caller's thread while our I/O thread reads it: concurrent use
        # of one SSL object ("bad record mac" at the broker). With a write callback registered,
        # paho only queues the packet and wakes our loop's select through its socket pair.
        client.on_socket_register_write = lambda client, userdata, sock: None
        connect_properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        connect_properties.SessionExpiryInterval = session_expiry
        client.connect_async(
            host,
            port,
            keepalive=keepalive,
            clean_start=clean_start,
            properties=connect_properties,
        )
        self._client = client

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the I/O thread, which connects and keeps reconnecting until ``close()``."""
        if self._stopping.is_set():
            raise TransportError("this MQTT client was closed; make a new one")
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._run, name=f"mqtt-{self.client_id}", daemon=True
        )
        self._thread.start()

    def connect(self, timeout: float | None = None) -> None:
        """``start()`` and wait for the first CONNACK. On timeout the error names the last
        failure (a cut TLS handshake usually means the broker refused our certificate)."""
        self.start()
        self.wait_connected(timeout)

    def wait_connected(self, timeout: float | None = None) -> None:
        limit = self.timeout if timeout is None else timeout
        if self._connected.wait(limit):
            return
        with self._lock:
            last = " | ".join(self._recent_errors) or "no connection attempt finished"
        raise TransportError(
            f"MQTT connect to {self.host}:{self.port} as {self.client_id!r} did not complete "
            f"within {limit:g}s; last error: {last}"
        )

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def session_present(self) -> bool | None:
        """From the last successful CONNACK: did the broker still hold our session?"""
        with self._lock:
            return self._session_present

    @property
    def recent_errors(self) -> tuple[str, ...]:
        """The last few connection errors (newest last), e.g. the TLS alert of a broker that
        refused this client's certificate."""
        with self._lock:
            return tuple(self._recent_errors)

    @property
    def reconnects(self) -> int:
        """Successful connections after the first one."""
        with self._lock:
            return self._reconnects

    def close(self, timeout: float | None = None) -> None:
        """Send DISCONNECT (the broker keeps the session for ``session_expiry``) and stop the I/O
        thread. Anyone still waiting gets ``TransportError``."""
        self._stopping.set()
        thread = self._thread
        if thread is not None:
            thread.join(self.timeout if timeout is None else timeout)
            if thread.is_alive():
                log.warning("MQTT I/O thread of %s did not stop in time", self.client_id)
        self._connected.clear()
        self._completions.close()
        self._thread = None

    def __enter__(self) -> MqttClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- operations ---------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float | None = None,
        message_expiry: int | None = None,
        content_type: str | None = None,
    ) -> None:
        """Publish and, for QoS 1, wait for the PUBACK. While disconnected the message is queued
        and sent after the reconnect, inside the same timeout."""
        properties: Properties | None = None
        if message_expiry is not None or content_type is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if message_expiry is not None:
                properties.MessageExpiryInterval = message_expiry
            if content_type is not None:
                properties.ContentType = content_type
        since = time.monotonic_ns()
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise TransportError(f"MQTT outgoing queue is full; not published to {topic}")
        if qos == 0:
            return
        reason = self._await("PUBACK", info.mid, since, timeout, topic)
        if reason.is_failure:
            raise MqttRefused(f"publish to {topic}", reason.value, str(reason))

    def publish_all(
        self, messages: Sequence[tuple[str, bytes]], *, qos: int = 1, timeout: float | None = None
    ) -> None:
        """Publish ``(topic, payload)`` pairs, then wait for all their PUBACKs: one round trip
        for the lot instead of one per message. Paho sends them in this order on the one
        connection (and again in order after a reconnect)."""
        since = time.monotonic_ns()
        sent: list[tuple[int, str]] = []
        for topic, payload in messages:
            info = self._client.publish(topic, payload, qos=qos)
            if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                raise TransportError(f"MQTT outgoing queue is full; not published to {topic}")
            sent.append((info.mid, topic))
        if qos == 0:
            return
        for mid, topic in sent:
            reason = self._await("PUBACK", mid, since, timeout, topic)
            if reason.is_failure:
                raise MqttRefused(f"publish to {topic}", reason.value, str(reason))

    def subscribe(self, topic_filter: str, *, qos: int = 1, timeout: float | None = None) -> int:
        """Subscribe and wait for the SUBACK; returns the granted QoS. The filter is remembered
        and re-subscribed after every reconnect. While disconnected, this waits (within the
        timeout) for the next connection, which subscribes it. Mosquitto grants subscriptions
        the ACL forbids and then withholds the messages, so a granted QoS is no proof of read
        access."""
        with self._lock:
            self._subscriptions[topic_filter] = qos
        since = time.monotonic_ns()
        rc, mid = self._client.subscribe(topic_filter, qos=qos)
        if rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            try:
                # The filter is in the table, so the next CONNACK re-subscribes it, and
                # "connected" is reported only after that SUBACK.
                self.wait_connected(timeout)
            except TransportError:
                with self._lock:
                    self._subscriptions.pop(topic_filter, None)
                raise
            return qos
        if rc != _MQTT_ERR_SUCCESS or mid is None:
            with self._lock:
                self._subscriptions.pop(topic_filter, None)
            raise TransportError(
                f"could not send SUBSCRIBE {topic_filter}: {paho.error_string(rc)}"
            )
        codes: list[ReasonCode] = self._await("SUBACK", mid, since, timeout, topic_filter)
        failed = [c for c in codes if c.is_failure]
        if failed:
            with self._lock:
                self._subscriptions.pop(topic_filter, None)
            raise MqttRefused(f"subscribe to {topic_filter}", failed[0].value, str(failed[0]))
        return int(codes[0].value)

    def unsubscribe(self, topic_filter: str, *, timeout: float | None = None) -> None:
        with self._lock:
            self._subscriptions.pop(topic_filter, None)
        since = time.monotonic_ns()
        rc, mid = self._client.unsubscribe(topic_filter)
        if rc != _MQTT_ERR_SUCCESS or mid is None:
            raise TransportError(
                f"could not send UNSUBSCRIBE {topic_filter}: {paho.error_string(rc)}"
            )
        codes: list[ReasonCode] = self._await("UNSUBACK", mid, since, timeout, topic_filter)
        failed = [c for c in codes if c.is_failure]
        if failed:
            raise MqttRefused(f"unsubscribe from {topic_filter}", failed[0].value, str(failed[0]))

    def get(self, timeout: float | None = None) -> ReceivedMessage | None:
        """The next received message, or None if none arrived within ``timeout`` (only when no
        ``on_message`` handler was given)."""
        try:
            return self._inbox.get(timeout=self.timeout if timeout is None else timeout)
        except queue.Empty:
            return None

    def waiting(self) -> int:
        """How many received messages wait for ``get`` (approximately: paho's thread adds)."""
        return self._inbox.qsize()

    def ack(self, message: ReceivedMessage) -> None:
        """Acknowledge a QoS 1 message (only with ``manual_ack=True``)."""
        if message.qos > 0:
            self._client.ack(message.mid, message.qos)

    def _await(self, kind: str, mid: int, since: int, timeout: float | None, what: str) -> Any:
        limit = self.timeout if timeout is None else timeout
        arrived, result = self._completions.wait(kind, mid, since, limit)
        if not arrived:
            state = "connected" if self._connected.is_set() else "not connected"
            raise TransportError(f"no {kind} for {what} within {limit:g}s ({state})")
        return result

    # -- I/O thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        attempt = 0
        need_connect = True
        while not self._stopping.is_set():
            if need_connect:
                try:
                    self._client.reconnect()
                except OSError as exc:  # refused, unreachable, TLS handshake failure
                    self._note_error(f"{type(exc).__name__}: {exc}")
                    self._stopping.wait(self._backoff.delay(attempt))
                    attempt += 1
                    continue
                need_connect = False
                self._awaiting_connack = True
            rc = self._client.loop(timeout=_LOOP_SLICE)
            if rc == _MQTT_ERR_SUCCESS:
                if not self._awaiting_connack:
                    attempt = 0
                continue
            need_connect = True
            self._connected.clear()
            if self._stopping.is_set():
                break
            if self._awaiting_connack:
                # With TLS 1.3 the client finishes its handshake before the broker has checked
                # the client certificate, so a refusal arrives as a closed connection after
                # CONNECT; paho on its own reports nothing but a missing CONNACK.
                self._note_error(
                    "the broker closed the connection before CONNACK, right after the TLS "
                    "handshake: it most likely refused this client's certificate "
                    "(unknown CA, expired, wrong purpose, or none)"
                )
            log.info("MQTT %s: connection lost (%s)", self.client_id, paho.error_string(rc))
            self._stopping.wait(self._backoff.delay(attempt))
            attempt += 1
        # Leaving: send DISCONNECT (a normal one: the broker keeps our session) and let the loop
        # flush it; paho closes the socket once it is written or the connection is gone.
        self._client.disconnect()
        for _ in range(10):
            if self._client.loop(timeout=_LOOP_SLICE) != _MQTT_ERR_SUCCESS:
                break
        self._connected.clear()
        # paho's loop() opens a loopback socket pair to wake itself and only its __del__ closes
        # it (paho 2.x has no public call for it); a stopped client must not hold descriptors
        # until some later garbage collection, which reports them as unclosed sockets.
        reset = getattr(self._client, "_reset_sockets", None)
        if reset is not None:
            reset(sockpair_only=True)

    def _note_error(self, text: str) -> None:
        with self._lock:
            if text in self._recent_errors:
                self._recent_errors.remove(text)
            self._recent_errors.append(text)
        log.info("MQTT %s: %s", self.client_id, text)

    # -- paho callbacks (I/O thread): convert and hand over, nothing else ----------------------

    def _handle_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._awaiting_connack = False
        # Nagle's algorithm would hold a small write (a PUBLISH) until the broker acknowledges
        # the previous one (often a PUBACK the broker answers with nothing, so its delayed ACK
        # adds ~40 ms to every exchange); MQTT packets are whole messages, send them at once.
        _no_delay(client.socket())
        if reason.is_failure:
            self._note_error(f"broker refused the connection: {reason} (0x{reason.value:02x})")
            return
        with self._lock:
            first = self._session_present is None
            self._session_present = flags.session_present
            if not first:
                self._reconnects += 1
            resubscribe = list(self._subscriptions.items())
        log.info(
            "MQTT %s connected to %s:%d (session present: %s)",
            self.client_id,
            self.host,
            self.port,
            flags.session_present,
        )
        # Re-subscribe even when the broker says the session is present: Mosquitto 2.0.11 was
        # seen restoring a persisted session without its $share subscriptions. SUBSCRIBE is
        # idempotent, and "connected" is only reported once every SUBACK is back, so that a
        # caller who waited for the connection does not publish into a gap.
        self._resubscribing.clear()
        for topic_filter, qos in resubscribe:
            rc, mid = client.subscribe(topic_filter, qos=qos)
            if rc == _MQTT_ERR_SUCCESS and mid is not None:
                self._resubscribing.add(mid)
        if not self._resubscribing:
            self._connected.set()

    def _handle_disconnect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()
        if not self._stopping.is_set():
            # A consequence, not a cause: the cause (TLS alert, socket error, refusal) has been
            # noted already and is what wait_connected() should report.
            log.info("MQTT %s: disconnected: %s", self.client_id, reason)

    def _handle_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        user_properties: tuple[tuple[str, str], ...] = ()
        content_type = expiry = None
        if props is not None:
            user_properties = tuple(getattr(props, "UserProperty", ()))
            content_type = getattr(props, "ContentType", None)
            expiry = getattr(props, "MessageExpiryInterval", None)
        message = ReceivedMessage(
            topic=msg.topic,
            payload=bytes(msg.payload),
            qos=msg.qos,
            retain=bool(msg.retain),
            duplicate=bool(msg.dup),
            mid=msg.mid,
            content_type=content_type,
            message_expiry=expiry,
            user_properties=user_properties,
        )
        if self._on_message is None:
            self._inbox.put(message)
            return
        try:
            self._on_message(message)
        except Exception:
            # A handler bug must not kill the I/O thread (and with it every reconnect).
            log.exception("MQTT %s: message handler failed on %s", self.client_id, message.topic)

    def _handle_publish(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._completions.complete("PUBACK", mid, reason)

    def _handle_subscribe(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        failed = [r for r in reasons if r.is_failure]
        if failed:
            log.warning("MQTT %s: SUBSCRIBE refused: %s", self.client_id, failed[0])
        if mid in self._resubscribing:
            self._resubscribing.discard(mid)
            if not self._resubscribing:
                self._connected.set()
            return
        self._completions.complete("SUBACK", mid, reasons)

    def _handle_unsubscribe(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self._completions.complete("UNSUBACK", mid, reasons)

    def _handle_log(self, client: paho.Client, userdata: object, level: int, text: str) -> None:
        if (
            level == paho.MQTT_LOG_ERR
            and not self._stopping.is_set()
            and not text.startswith("Client is not connected")
        ):
            # e.g. "failed to receive on socket: [SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED]": the
            # only trace a refused client certificate leaves on this side.
            self._note_error(text)
        else:
            log.debug("paho %s: %s", self.client_id, text)
