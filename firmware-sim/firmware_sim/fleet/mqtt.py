"""The virtual fleet's MQTT multiplexer (``VirtualFleet``): one paho client per virtual device,
each with its own mutual-TLS connection (client certificate CN = device id, so the broker's ACL
confines it exactly as it confines a real device), all driven from ONE selector thread (paho's
``loop_read``, ``loop_write`` and ``loop_misc`` on each client's socket) rather than one thread
per client: 1,000 threads each polling a socket would spend the GIL on wake-ups. Message
handling (verification, ``Group.process``, the signed ack) runs on that thread too; it is
CPU-bound Python and one thread per process is what the GIL allows anyway. TLS handshakes at
start run in a small thread pool (OpenSSL releases the GIL during the handshake). Reconnects
back off exponentially with jitter; ``set_offline`` takes a device off the network for fault
tests; the reading methods (``status``, ``epochs``, ``authenticators``, ``wait_epoch``) are what
tests and benchmarks assert on."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import selectors
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from sqlalchemy.orm import Session, sessionmaker

from agent.core import Publish
from agent.protocol.errors import ConfigError, StateError
from agent.protocol.topics import ALL_GROUP_COMMITS, REVOCATION_FEED_TOPIC, TRUST_TOPIC
from firmware_sim.fleet import groups
from firmware_sim.fleet.config import FleetConfig
from firmware_sim.fleet.device import VirtualDevice, load_devices
from firmware_sim.fleet.identities import prepare_identities

log = logging.getLogger(__name__)

CONNECT_WORKERS: Final = 8
TICK_SECONDS: Final = 5.0
SELECT_SECONDS: Final = 0.05
MISC_SECONDS: Final = 1.0
RECONNECT_MIN: Final = 1.0
RECONNECT_MAX: Final = 30.0


@dataclass
class _Link:
    """A device's MQTT connection, driven by the fleet's selector loop."""

    device: VirtualDevice
    client: paho.Client
    sock: socket.socket | None = None
    connected: bool = False
    subscribed: bool = False
    reported: bool = False
    started: bool = False
    failures: int = 0
    retry_at: float = 0.0
    last_error: str = ""
    offline: bool = False  # held off the network by set_offline: no reconnect


@dataclass(frozen=True)
class FleetStatus:
    devices: int
    connected: int
    ready: int
    errors: int


class VirtualFleet:
    """N virtual devices and one selector thread driving their MQTT connections.

    Thread safety: the loop thread handles every message while holding ``lock``; the reading
    methods (``epochs``, ``authenticators``, ``status``) take it too.
    """

    def __init__(self, devices: Sequence[VirtualDevice], *, clock: Callable[[], float] = time.time):
        if not devices:
            raise ConfigError("a virtual fleet needs at least one device")
        self.devices = list(devices)
        self.by_id = {d.device_id: d for d in self.devices}
        self.lock = threading.RLock()
        self._clock = clock
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._links = [self._make_link(d) for d in self.devices]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop_ident: int | None = None
        self._calls: list[Callable[[], None]] = []
        self._calls_lock = threading.Lock()
        self.messages = 0

    @classmethod
    def from_config(cls, config: FleetConfig, count: int, *, allow_insecure: bool) -> VirtualFleet:
        """Prepare identities (register new ones) and load them as the agent would."""
        if not (config.insecure_software_keys and allow_insecure):
            # Checked here too only to fail before minting a thousand certificates: the
            # authoritative refusal is the agent's own, per device, in load_devices.
            raise ConfigError(
                "the virtual fleet runs on SOFTWARE keys: refused unless the fleet configuration "
                "says [simulation] insecure_software_keys = true AND --allow-insecure-software-"
                "keys is given (simulation only; never on real devices)"
            )
        paths = prepare_identities(config, count)
        return cls(load_devices(paths, allow_insecure=allow_insecure))

    def now(self) -> int:
        return int(self._clock())

    # -- MQTT plumbing (loop thread) ----------------------------------------------------------

    def _make_link(self, device: VirtualDevice) -> _Link:
        config = device.config
        assert config.identity is not None and config.broker is not None
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=device.device_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            reconnect_on_failure=False,
        )
        client.tls_set(
            ca_certs=os.fspath(config.broker.ca.path),
            certfile=os.fspath(config.identity.tls_cert.path),
            keyfile=os.fspath(config.identity.tls_key),
        )
        client.max_inflight_messages_set(20)
        client.max_queued_messages_set(10_000)
        client.connect_timeout = 10.0
        link = _Link(device, client)
        client.user_data_set(link)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return link

    def _attach(self, link: _Link) -> None:
        """After a (re)connect: watch the socket from the selector; writes go through it too."""
        client = link.client
        sock = client.socket()
        if sock is None:
            return
        assert isinstance(sock, socket.socket)
        # Nagle would hold the ack behind the PUBACK just written until the broker's delayed
        # ACK (~40 ms): MQTT packets are whole messages, send them at once.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link.sock = sock
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)
        with contextlib.suppress(KeyError):
            self._selector.unregister(sock)
        self._selector.register(sock, events, link)
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._done_writing
        client.on_socket_close = self._closed

    def _want_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        link: _Link = userdata
        if link.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.modify(link.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, link)

    def _done_writing(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        link: _Link = userdata
        if link.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.modify(link.sock, selectors.EVENT_READ, link)

    def _closed(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        link: _Link = userdata
        if link.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(link.sock)
        link.sock = None

    def _connect(self, link: _Link) -> bool:
        """Blocking TCP + TLS handshake + CONNECT (runs in the start pool or the loop)."""
        config = link.device.config
        assert config.broker is not None
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 0
        try:
            if not link.started:
                link.started = True
                link.client.connect(
                    config.broker.host,
                    config.broker.port,
                    keepalive=config.broker.keepalive,
                    clean_start=True,
                    properties=properties,
                )
            else:
                link.client.reconnect()
        except (OSError, ValueError) as exc:
            link.failures += 1
            link.last_error = f"{type(exc).__name__}: {exc}"
            delay = min(RECONNECT_MAX, RECONNECT_MIN * 2 ** min(link.failures, 8))
            link.retry_at = time.monotonic() + random.uniform(delay / 2, delay)  # noqa: S311
            return False
        return True

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        link: _Link = userdata
        if reason.is_failure:
            link.last_error = f"CONNACK {reason}"
            return
        link.connected = True
        link.failures = 0
        device = link.device
        client.subscribe(
            [
                (TRUST_TOPIC, 1),  # first, as keyagent run: the service key before its commands
                (device.core.command_topic, 1),
                (ALL_GROUP_COMMITS, 1),
                (REVOCATION_FEED_TOPIC, 1),
            ]
        )

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        link: _Link = userdata
        if any(r.is_failure for r in reasons):
            link.last_error = f"SUBACK {reasons}"
            return
        link.subscribed = True
        # after every (re)connect: our epochs to the service, as keyagent run does (catch-up)
        with self.lock:
            publishes = link.device.report(self.now())
        self._publish(link, publishes)
        link.reported = True

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        link: _Link = userdata
        link.connected = link.subscribed = False
        if not self._stop.is_set():
            link.failures += 1
            link.last_error = f"disconnected: {reason}"
            delay = min(RECONNECT_MAX, RECONNECT_MIN * 2 ** min(link.failures, 8))
            link.retry_at = time.monotonic() + random.uniform(delay / 2, delay)  # noqa: S311

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        link: _Link = userdata
        with self.lock:
            self.messages += 1
            publishes = link.device.handle(message.topic, bytes(message.payload), self.now())
        self._publish(link, publishes)

    def _publish(self, link: _Link, publishes: Iterable[Publish]) -> None:
        for item in publishes:
            info = link.client.publish(item.topic, item.payload, qos=1)
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                log.warning(
                    "%s: publish of %s failed: rc %s", link.device.device_id, item.type, info.rc
                )

    # -- the loop ------------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> None:
        """Connect every device (TLS handshakes in a small pool), start the loop thread and wait
        until every device is subscribed and has sent its keys.report."""
        if self._thread is not None:
            raise StateError("the fleet is already running")
        with ThreadPoolExecutor(CONNECT_WORKERS, thread_name_prefix="fleet-connect") as pool:
            list(pool.map(self._connect, self._links))
        for link in self._links:
            self._attach(link)
        self._thread = threading.Thread(target=self._run, name="virtual-fleet", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if status.ready == status.devices:
                return
            if time.monotonic() > deadline or not self._thread.is_alive():
                waiting = [k for k in self._links if not k.reported][:5]
                detail = "; ".join(
                    f"{k.device.device_id}: {k.last_error or 'no CONNACK'}" for k in waiting
                )
                raise StateError(
                    f"virtual fleet: {status.ready}/{status.devices} devices ready after "
                    f"{timeout:g}s (e.g. {detail})"
                )
            time.sleep(0.05)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread (paho clients are only touched there)."""
        with self._calls_lock:
            self._calls.append(fn)
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"\0")

    def send(self, device_id: str, publishes: Sequence[Publish]) -> None:
        """Publish ``publishes`` (made by the device's core, e.g. ``VirtualDevice.report``) on
        ``device_id``'s connection, from the loop thread: what a benchmark uses to load the
        service with messages it made in advance."""
        link = self._link_of(device_id)
        items = list(publishes)
        self.call_soon(lambda: self._publish(link, items))

    def _link_of(self, device_id: str) -> _Link:
        link = next((k for k in self._links if k.device.device_id == device_id), None)
        if link is None:
            raise StateError(f"no virtual device {device_id!r} in this fleet")
        return link

    def set_offline(self, device_id: str, offline: bool) -> None:
        """Take a device off the network (it disconnects and does not reconnect; its session
        expires at once, so what it misses meanwhile is lost to it) or let it come back (it
        reconnects within a second, reports its epochs and is caught up by the service): a
        device losing its network or power, for load and fault tests."""
        link = self._link_of(device_id)

        def change() -> None:
            link.offline = offline
            if offline and link.sock is not None:
                with contextlib.suppress(Exception):
                    link.client.disconnect()
                    link.client.loop_write()
            elif not offline:
                link.retry_at = 0.0

        self.call_soon(change)

    def _run(self) -> None:
        self._loop_ident = threading.get_ident()
        next_misc = time.monotonic() + MISC_SECONDS
        next_tick = time.monotonic() + TICK_SECONDS
        try:
            while not self._stop.is_set():
                for key, events in self._selector.select(SELECT_SECONDS):
                    link = key.data
                    if link is None:
                        with contextlib.suppress(BlockingIOError):
                            self._wake_r.recv(4096)
                        continue
                    self._service(link, events)
                with self._calls_lock:
                    calls, self._calls = self._calls, []
                for call in calls:
                    call()
                now = time.monotonic()
                if now >= next_misc:
                    next_misc = now + MISC_SECONDS
                    self._misc(now)
                if now >= next_tick:
                    next_tick = now + TICK_SECONDS
                    self._tick()
        except Exception:
            log.exception("virtual fleet loop failed")
            raise
        finally:
            self._disconnect_all()

    def _service(self, link: _Link, events: int) -> None:
        client = link.client
        if events & selectors.EVENT_READ:
            rc = client.loop_read(max_packets=64)
            sock = link.sock
            # TLS may hold whole records already decrypted: read them before select() again.
            while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and sock is not None and _pending(sock):
                rc = client.loop_read(max_packets=64)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return
        if link.sock is not None and (events & selectors.EVENT_WRITE or client.want_write()):
            client.loop_write()

    def _misc(self, now: float) -> None:
        for link in self._links:
            if link.sock is not None:
                link.client.loop_misc()
                if link.client.want_write():
                    link.client.loop_write()
            elif (
                not link.offline
                and now >= link.retry_at
                and not self._stop.is_set()
                and self._connect(link)
            ):
                self._attach(link)

    def _tick(self) -> None:
        stamp = self.now()
        for link in self._links:
            with self.lock:
                publishes = link.device.tick(stamp)
            if publishes:
                self._publish(link, publishes)

    def _disconnect_all(self) -> None:
        for link in self._links:
            if link.sock is None:
                continue
            with contextlib.suppress(Exception):
                link.client.disconnect()
                link.client.loop_write()
        for link in self._links:
            with contextlib.suppress(Exception):
                if link.client.socket() is not None:
                    link.client.loop_read()
            if link.sock is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(link.sock)
                link.sock = None

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> VirtualFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- reading ---------------------------------------------------------------------------------

    def status(self) -> FleetStatus:
        return FleetStatus(
            devices=len(self._links),
            connected=sum(1 for k in self._links if k.connected),
            ready=sum(1 for k in self._links if k.reported and k.connected),
            errors=sum(d.errors for d in self.devices),
        )

    def epochs(self, group: str) -> dict[str, int | None]:
        with self.lock:
            return {d.device_id: d.core.epoch(group) for d in self.devices}

    def wait_settled(
        self, group: str, timeout: float, members: Collection[str] | None = None
    ) -> int:
        """Wait until every device (or those of ``members``, device ids) holds ``group`` at one
        common epoch and none still holds the leaf key it joined with (each joiner's first
        self-update is done); returns that epoch. ``StateError`` naming the stragglers on
        timeout."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                devices = [d for d in self.devices if members is None or d.device_id in members]
                epochs = {d.device_id: d.core.epoch(group) for d in devices}
                pending = [d.device_id for d in devices if d.core.fresh_leaf_pending(group)]
            common = set(epochs.values())
            if len(common) == 1 and None not in common and not pending:
                (epoch,) = common
                assert epoch is not None
                return epoch
            if time.monotonic() > deadline:
                raise StateError(
                    f"group {group} not settled after {timeout:g}s: epochs "
                    f"{sorted(e for e in common if e is not None)}, first update pending at "
                    + " ".join(pending[:10])
                )
            time.sleep(0.01)

    def authenticators(self, group: str) -> dict[str, tuple[int, bytes] | None]:
        """Per device: (epoch, epoch authenticator) of ``group``, or None if it is no member.
        Epoch authenticators are public by design (they derive nothing)."""
        with self.lock:
            out: dict[str, tuple[int, bytes] | None] = {}
            for d in self.devices:
                g = d.core.groups().get(group)
                out[d.device_id] = None if g is None else (g.epoch, g.epoch_authenticator)
            return out

    def wait_epoch(self, group: str, epoch: int, timeout: float) -> float:
        """Wait until every device is at ``epoch`` of ``group``; returns the monotonic time the
        last one acked it. ``StateError`` naming the stragglers on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            epochs = self.epochs(group)
            behind = [d for d, e in epochs.items() if e is None or e < epoch]
            if not behind:
                with self.lock:
                    stamps = [d.acks.get((group, epoch)) for d in self.devices]
                return max(s for s in stamps if s is not None) if any(stamps) else time.monotonic()
            if time.monotonic() > deadline:
                raise StateError(
                    f"{len(behind)} devices not at epoch {epoch} of {group} after {timeout:g}s: "
                    + " ".join(behind[:10])
                )
            time.sleep(0.01)

    # -- simulation shortcut: a full group built directly --------------------------------------

    def seed_group(
        self,
        group_id: str,
        sessions: sessionmaker[Session],
        *,
        now: int,
        authz: bytes | None = None,
    ) -> None:
        """SIMULATION BYPASS (benchmarks): make every fleet device a member of a new group
        ``group_id`` at epoch 1, built in one step rather than by N-1 adds, and record it in the
        registry (group row with the public tree, members, one ack per member so that every
        member counts as holding the current epoch), audited as ``group.seed.simulated``
        (``firmware_sim.fleet.groups``). Call before ``start``."""
        if self._thread is not None:
            raise StateError("seed groups before the fleet starts")
        groups.seed_group(self.devices, group_id, sessions, now=now, authz=authz)


def _pending(sock: socket.socket) -> int:
    pending = getattr(sock, "pending", None)
    return int(pending()) if callable(pending) else 0
