"""agent.mqtt against a real Mosquitto: mutual TLS, ACL, persistent sessions, broker restarts,
shared subscriptions."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.mqtt import Backoff, MqttClient, MqttRefused, ReceivedMessage
from agent.protocol.errors import TransportError
from provisioning import pki
from tests.fixtures.mosquitto import SERVICE_IDENTITY, MosquittoBroker

pytestmark = pytest.mark.broker

FAST = Backoff(initial=0.05, maximum=0.5, jitter=lambda d: d)
SERVICE = SERVICE_IDENTITY

ClientFactory = Callable[..., MqttClient]


@pytest.fixture
def make_client(mosquitto: MosquittoBroker) -> Iterator[ClientFactory]:
    """Connected clients on the test's broker, closed at teardown."""
    made: list[MqttClient] = []

    def make(
        identity: str,
        client_id: str | None = None,
        broker: MosquittoBroker = mosquitto,
        connect: bool = True,
        **kwargs: Any,
    ) -> MqttClient:
        kwargs.setdefault("timeout", 5.0)
        kwargs.setdefault("backoff", FAST)
        client = MqttClient(
            **broker.client_kwargs(identity),  # type: ignore[arg-type]
            client_id=client_id or identity,
            **kwargs,
        )
        made.append(client)
        if connect:
            client.connect()
        return client

    yield make
    for client in made:
        client.close()


def _drain(client: MqttClient, wait: float) -> list[ReceivedMessage]:
    got = []
    while (message := client.get(timeout=wait)) is not None:
        got.append(message)
    return got


def test_mtls_round_trip_qos1(make_client: ClientFactory) -> None:
    service = make_client(SERVICE)
    assert service.subscribe("kf/v1/dev/+/report") == 1
    device = make_client("dev-a")
    device.publish("kf/v1/dev/dev-a/report", b"\x00hello\xff")
    message = service.get(timeout=5)
    assert message is not None
    assert message.topic == "kf/v1/dev/dev-a/report"
    assert message.payload == b"\x00hello\xff"
    assert message.qos == 1
    assert not message.retain
    assert b"hello" not in repr(message).encode()


def test_message_properties_cross_the_adapter(make_client: ClientFactory) -> None:
    device = make_client("dev-a")
    device.subscribe("kf/v1/dev/dev-a/cmd")
    service = make_client(SERVICE)
    service.publish(
        "kf/v1/dev/dev-a/cmd", b"cmd", message_expiry=600, content_type="application/cose"
    )
    message = device.get(timeout=5)
    assert message is not None
    assert message.content_type == "application/cose"
    assert message.message_expiry is not None and 590 <= message.message_expiry <= 600


def test_handler_callback_receives_messages(make_client: ClientFactory) -> None:
    got: list[ReceivedMessage] = []
    arrived = threading.Event()

    def handler(message: ReceivedMessage) -> None:
        got.append(message)
        arrived.set()

    make_client(SERVICE, on_message=handler).subscribe("kf/v1/dev/+/report")
    make_client("dev-a").publish("kf/v1/dev/dev-a/report", b"x")
    assert arrived.wait(5)
    assert [m.payload for m in got] == [b"x"]


def test_certificate_from_another_ca_is_refused(
    mosquitto: MosquittoBroker, make_client: ClientFactory
) -> None:
    now = datetime.now(UTC)
    rogue = pki.create_ca("keyfleet test broker CA", now=now, valid_for=timedelta(days=1))
    files = mosquitto.pki.client("dev-a", ca=rogue)
    client = MqttClient(
        host=mosquitto.host,
        port=mosquitto.port,
        ca_file=files.ca_file,
        cert_file=files.cert_file,
        key_file=files.key_file,
        client_id="dev-a",
        backoff=FAST,
    )
    try:
        with pytest.raises(TransportError) as exc:
            client.connect(timeout=2)
    finally:
        client.close()
    text = str(exc.value)
    assert "did not complete within 2s" in text
    # The cause is named, not just "timeout".
    assert "before CONNACK" in text and "refused this client's certificate" in text, text
    assert not client.connected


def test_client_without_certificate_is_refused(mosquitto: MosquittoBroker) -> None:
    # MqttClient always presents a certificate; a plain paho client shows the broker side.
    results: list[object] = []
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id="anon", protocol=MQTTProtocolVersion.MQTTv5
    )
    client.tls_set(ca_certs=str(mosquitto.ca_file))
    client.on_connect = lambda c, u, f, rc, p: results.append(rc)
    try:
        connect_rc = None
        with contextlib.suppress(OSError):  # with TLS 1.2 the handshake itself fails
            connect_rc = client.connect(mosquitto.host, mosquitto.port)
        if connect_rc is not None:
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                if client.loop(timeout=0.1) != paho.MQTT_ERR_SUCCESS:
                    break
    finally:
        client.disconnect()
    assert results == [], "broker must never send CONNACK to a client without a certificate"
    assert not client.is_connected()


def test_device_cannot_publish_to_another_device(make_client: ClientFactory) -> None:
    service = make_client(SERVICE)
    service.subscribe("kf/v1/dev/+/report")
    device = make_client("dev-a")
    with pytest.raises(MqttRefused) as exc:
        device.publish("kf/v1/dev/dev-b/report", b"forged")
    assert exc.value.reason_code == 0x87
    device.publish("kf/v1/dev/dev-a/report", b"mine")
    assert [m.payload for m in _drain(service, 1.0)] == [b"mine"]


def test_device_cannot_publish_operator_commands_or_device_commands(
    make_client: ClientFactory,
) -> None:
    device = make_client("dev-a")
    for topic in ("kf/v1/ops/op-x/cmd", "kf/v1/ops/dev-a/result", "kf/v1/dev/dev-a/cmd"):
        with pytest.raises(MqttRefused):
            device.publish(topic, b"nope")


def test_device_cannot_read_another_devices_commands(make_client: ClientFactory) -> None:
    snoop = make_client("dev-a")
    # Mosquitto grants the subscription but must withhold every message on it.
    snoop.subscribe("kf/v1/dev/dev-b/cmd")
    snoop.subscribe("kf/v1/dev/+/cmd")
    snoop.subscribe("kf/v1/dev/dev-a/cmd")
    victim = make_client("dev-b")
    victim.subscribe("kf/v1/dev/dev-b/cmd")
    service = make_client(SERVICE)
    service.publish("kf/v1/dev/dev-b/cmd", b"for b")
    service.publish("kf/v1/dev/dev-a/cmd", b"for a")
    got_b = victim.get(timeout=5)
    assert got_b is not None and got_b.payload == b"for b"
    got_a = _drain(snoop, 1.0)
    # Two of dev-a's filters match its own topic; whether the broker sends one copy or two,
    # nothing of dev-b's may be among them.
    assert got_a
    assert {(m.topic, m.payload) for m in got_a} == {("kf/v1/dev/dev-a/cmd", b"for a")}


def test_group_commits_reach_members_and_operators_are_confined(
    make_client: ClientFactory,
) -> None:
    member = make_client("dev-a")
    member.subscribe("kf/v1/grp/+/commit")
    service = make_client(SERVICE)
    service.subscribe("kf/v1/ops/+/cmd")
    service.publish("kf/v1/grp/g1/commit", b"commit")
    got = member.get(timeout=5)
    assert got is not None and got.topic == "kf/v1/grp/g1/commit"
    with pytest.raises(MqttRefused):  # only the service orders and publishes commits
        member.publish("kf/v1/grp/g1/commit", b"unordered commit")

    operator = make_client("op-alice")
    operator.subscribe("kf/v1/ops/op-alice/result")
    operator.publish("kf/v1/ops/op-alice/cmd", b"rekey")
    got = service.get(timeout=5)
    assert got is not None and got.topic == "kf/v1/ops/op-alice/cmd"
    for topic in ("kf/v1/ops/op-bob/cmd", "kf/v1/dev/dev-a/cmd", "kf/v1/ops/op-alice/result"):
        with pytest.raises(MqttRefused):
            operator.publish(topic, b"x")
    service.publish("kf/v1/ops/op-alice/result", b"done")
    got = operator.get(timeout=5)
    assert got is not None and got.payload == b"done"


def test_persistent_session_delivers_what_was_sent_while_offline(
    make_client: ClientFactory,
) -> None:
    device = make_client("dev-a")
    device.subscribe("kf/v1/dev/dev-a/cmd")
    device.close()
    service = make_client(SERVICE)
    for i in range(5):
        service.publish("kf/v1/dev/dev-a/cmd", b"cmd-%d" % i)

    again = make_client("dev-a")  # same client id, clean_start False, no new SUBSCRIBE
    assert again.session_present is True
    got = [m.payload for m in _drain(again, 1.0)]
    assert got == [b"cmd-%d" % i for i in range(5)]


def test_clean_start_drops_the_session(make_client: ClientFactory) -> None:
    device = make_client("dev-a")
    device.subscribe("kf/v1/dev/dev-a/cmd")
    device.close()
    make_client(SERVICE).publish("kf/v1/dev/dev-a/cmd", b"lost")
    fresh = make_client("dev-a", clean_start=True)
    assert fresh.session_present is False
    assert fresh.get(timeout=0.5) is None


def test_broker_restart_client_reconnects_and_continues(
    mosquitto: MosquittoBroker, make_client: ClientFactory
) -> None:
    device = make_client("dev-a")
    device.subscribe("kf/v1/dev/dev-a/cmd")
    service = make_client(SERVICE)
    service.subscribe("$share/keyfleet/kf/v1/dev/+/report")
    old_pid = mosquitto.pid

    mosquitto.stop()
    # Published while the broker is down: queued by the client, sent after the reconnect,
    # acknowledged inside the same timeout.
    outcome: list[BaseException | None] = []

    def publish_offline() -> None:
        try:
            service.publish("kf/v1/dev/dev-a/cmd", b"during restart", timeout=10)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    publisher = threading.Thread(target=publish_offline)
    publisher.start()
    time.sleep(0.3)
    mosquitto.start()
    assert mosquitto.pid != old_pid
    publisher.join(15)
    assert outcome == [None]

    device.wait_connected(10)
    service.wait_connected(10)
    assert device.reconnects >= 1 and service.reconnects >= 1
    assert device.session_present is True  # persistence kept the session across the restart
    got = device.get(timeout=5)
    assert got is not None and got.payload == b"during restart"

    device.publish("kf/v1/dev/dev-a/report", b"after restart")
    got = service.get(timeout=5)
    assert got is not None and got.payload == b"after restart"


def test_lost_session_is_resubscribed(
    mosquitto: MosquittoBroker, make_client: ClientFactory
) -> None:
    # session_expiry 0: the broker forgets the session when the connection ends, so after the
    # restart only the adapter's own re-subscribe brings the subscription back.
    device = make_client("dev-a", session_expiry=0)
    device.subscribe("kf/v1/dev/dev-a/cmd")
    mosquitto.restart()
    device.wait_connected(10)
    assert device.session_present is False
    service = make_client(SERVICE)
    deadline = time.monotonic() + 5
    got = None
    while got is None and time.monotonic() < deadline:
        # The re-SUBSCRIBE is asynchronous: publish until it is in place.
        service.publish("kf/v1/dev/dev-a/cmd", b"again")
        got = device.get(timeout=0.2)
    assert got is not None and got.payload == b"again"


def test_publish_without_broker_times_out(
    mosquitto: MosquittoBroker, make_client: ClientFactory
) -> None:
    device = make_client("dev-a")
    mosquitto.stop()
    started = time.monotonic()
    with pytest.raises(TransportError) as exc:
        device.publish("kf/v1/dev/dev-a/report", b"x", timeout=0.5)
    assert time.monotonic() - started < 3
    assert "no PUBACK" in str(exc.value)


def test_connect_to_closed_port_names_the_cause(
    mosquitto: MosquittoBroker, make_client: ClientFactory
) -> None:
    mosquitto.stop()
    client = make_client("dev-a", connect=False)
    with pytest.raises(TransportError) as exc:
        client.connect(timeout=0.5)
    assert "ConnectionRefusedError" in str(exc.value)


def test_shared_subscription_splits_messages(make_client: ClientFactory) -> None:
    shared = "$share/keyfleet/kf/v1/dev/+/report"
    first = make_client(SERVICE, client_id="keyfleet-service-1")
    second = make_client(SERVICE, client_id="keyfleet-service-2")
    first.subscribe(shared)
    second.subscribe(shared)
    device = make_client("dev-a")
    sent = [b"r-%d" % i for i in range(20)]
    for payload in sent:
        device.publish("kf/v1/dev/dev-a/report", payload)
    got_first = [m.payload for m in _drain(first, 1.0)]
    got_second = [m.payload for m in _drain(second, 0.2)]
    assert sorted(got_first + got_second) == sorted(sent)  # each exactly once
    assert got_first and got_second  # both instances got work


def test_unacknowledged_message_is_redelivered_with_manual_ack(make_client: ClientFactory) -> None:
    device = make_client("dev-a", manual_ack=True)
    device.subscribe("kf/v1/dev/dev-a/cmd")
    make_client(SERVICE).publish("kf/v1/dev/dev-a/cmd", b"must not be lost")
    first = device.get(timeout=5)
    assert first is not None
    device.close()  # "crashed" before processing: no PUBACK was sent

    again = make_client("dev-a", manual_ack=True)
    redelivered = again.get(timeout=5)
    assert redelivered is not None and redelivered.payload == b"must not be lost"
    assert redelivered.duplicate
    again.ack(redelivered)
    again.close()

    third = make_client("dev-a", manual_ack=True)
    assert third.get(timeout=0.5) is None


def test_session_takeover_with_another_certificate_reads_nothing(
    make_client: ClientFactory,
) -> None:
    victim = make_client("dev-b")
    victim.subscribe("kf/v1/dev/dev-b/cmd")
    victim.close()
    service = make_client(SERVICE)
    service.publish("kf/v1/dev/dev-b/cmd", b"queued for b")
    # dev-a's certificate, dev-b's client id: the broker hands over dev-b's session ...
    impostor = make_client("dev-a", client_id="dev-b")
    assert impostor.session_present is True
    service.publish("kf/v1/dev/dev-b/cmd", b"live for b")
    # ... but checks delivery against the user name (CN) of the new connection.
    assert impostor.get(timeout=1.0) is None


def test_subscribe_while_disconnected_waits_for_the_connection(
    mosquitto: MosquittoBroker, make_client: ClientFactory
) -> None:
    mosquitto.stop()
    device = make_client("dev-a", connect=False)
    device.start()
    starter = threading.Timer(0.3, mosquitto.start)
    starter.start()
    try:
        assert device.subscribe("kf/v1/dev/dev-a/cmd", timeout=10) == 1
    finally:
        starter.join()
    assert device.connected
    make_client(SERVICE).publish("kf/v1/dev/dev-a/cmd", b"hello")
    got = device.get(timeout=5)
    assert got is not None and got.payload == b"hello"


def test_closed_client_cannot_be_restarted(make_client: ClientFactory) -> None:
    device = make_client("dev-a")
    device.close()
    assert not device.connected
    with pytest.raises(TransportError, match="closed"):
        device.connect(timeout=1)


def test_broker_trusts_extra_client_cas(mosquitto_factory: Callable[..., MosquittoBroker]) -> None:
    now = datetime.now(UTC)
    device_ca = pki.create_ca("fleet device CA", now=now, valid_for=timedelta(days=1))
    broker = mosquitto_factory(extra_ca_certs=[device_ca.certificate])
    files = broker.pki.client("dev-0001", role="device", ca=device_ca)
    client = MqttClient(
        host=broker.host,
        port=broker.port,
        ca_file=files.ca_file,
        cert_file=files.cert_file,
        key_file=files.key_file,
        client_id="dev-0001",
        timeout=5,
    )
    try:
        client.connect()
        client.subscribe("kf/v1/dev/dev-0001/cmd")
        client.publish("kf/v1/dev/dev-0001/report", b"enrolled")
    finally:
        client.close()
