"""Issue 8, hostile input: the product broker ACL (``firmware_sim.broker.ACL``, the one the lab,
the demo and docs/mqtt.md deploy) against a real Mosquitto with mutual TLS.

Mosquitto drops a denied publish silently at QoS 0 and answers a denied QoS 1 publish with
PUBACK reason code 0x87 (MQTT v5); a denied subscription is *granted* and its messages are then
withheld. So nothing here trusts a return code alone: an observer connected as the service
(``kf/v1/#``, the one identity that may read everything) records what really reached the broker's
subscribers, every denied publish is also sent at QoS 0 and with the retain flag (a retained
message would be delivered to later subscribers), and every denied case has a positive control:
the same publish from the right identity arrives, the same subscription by the right identity
receives.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from agent.mqtt import Backoff, MqttClient, MqttRefused, ReceivedMessage
from firmware_sim.broker import ACL
from tests.fixtures.mosquitto import DEFAULT_ACL, SERVICE_IDENTITY, MosquittoBroker

pytestmark = pytest.mark.broker

NOT_AUTHORIZED = 0x87
FAST = Backoff(initial=0.05, maximum=0.5, jitter=lambda d: d)
SETTLE = 1.5  # seconds an observer keeps listening for messages that must not come
ClientFactory = Callable[..., MqttClient]

DEVICE_TOPICS = ("dev/{x}/report", "dev/{x}/cmd")
OPERATOR_TOPICS = ("ops/{x}/cmd", "ops/{x}/result")

# (publisher, topic under kf/v1/): every publish a device or operator must not make. Devices:
# another device's report (a commit "as" another device travels there) and commands, any group
# commit topic (only the service orders commits), operator commands and results, its own command
# topic. Operators: device topics (publishing as a device), another operator's command topic,
# results, group commits.
DENIED_PUBLISHES: tuple[tuple[str, str], ...] = (
    ("dev-a", "dev/dev-b/report"),
    ("dev-a", "dev/dev-b/cmd"),
    ("dev-a", "dev/dev-a/cmd"),
    ("dev-a", "grp/g1/commit"),
    ("dev-a", "ops/op-alice/cmd"),
    ("dev-a", "ops/op-alice/result"),
    ("dev-a", "ops/dev-a/result"),
    ("op-alice", "dev/dev-a/report"),
    ("op-alice", "dev/dev-a/cmd"),
    ("op-alice", "ops/op-bob/cmd"),
    ("op-alice", "ops/op-alice/result"),
    ("op-alice", "ops/op-bob/result"),
    ("op-alice", "grp/g1/commit"),
)
# Positive controls: the owner of each denied topic (or the service) publishes it and it arrives.
ALLOWED_PUBLISHES: tuple[tuple[str, str], ...] = (
    ("dev-a", "dev/dev-a/report"),
    ("dev-b", "dev/dev-b/report"),
    ("op-alice", "ops/op-alice/cmd"),
    ("op-bob", "ops/op-bob/cmd"),
    (SERVICE_IDENTITY, "dev/dev-a/cmd"),
    (SERVICE_IDENTITY, "dev/dev-b/cmd"),
    (SERVICE_IDENTITY, "grp/g1/commit"),
    (SERVICE_IDENTITY, "ops/op-alice/result"),
    (SERVICE_IDENTITY, "ops/op-bob/result"),
)
# Read side: what each subscriber may receive of the topics the service and owners publish.
SNOOP_FILTERS = (
    "kf/v1/#",
    "kf/v1/dev/+/cmd",
    "kf/v1/dev/+/report",
    "kf/v1/dev/dev-b/cmd",
    "kf/v1/dev/dev-b/report",
    "kf/v1/ops/+/cmd",
    "kf/v1/ops/+/result",
    "kf/v1/ops/op-bob/result",
    "kf/v1/ops/op-alice/result",
    "kf/v1/ops/op-alice/cmd",
    "$share/snoop/kf/v1/dev/+/cmd",
    "$share/snoop/kf/v1/ops/+/result",
)
# Who may read what (the only topics of ALLOWED_PUBLISHES each identity may see).
MAY_READ = {
    "dev-a": {"kf/v1/dev/dev-a/cmd", "kf/v1/grp/g1/commit"},
    "op-alice": {"kf/v1/ops/op-alice/result", "kf/v1/grp/g1/commit"},
}


@pytest.fixture
def make_client(mosquitto_factory: Callable[..., MosquittoBroker]) -> Iterator[ClientFactory]:
    broker = mosquitto_factory(acl=ACL)
    made: list[MqttClient] = []
    ids = itertools.count()

    def make(identity: str, **kwargs: Any) -> MqttClient:
        kwargs.setdefault("timeout", 5.0)
        client = MqttClient(
            **broker.client_kwargs(identity),  # type: ignore[arg-type]
            client_id=f"{identity}-{next(ids)}",
            clean_start=True,
            session_expiry=0,
            backoff=FAST,
            **kwargs,
        )
        made.append(client)
        client.connect()
        return client

    yield make
    for client in made:
        client.close()


def drain(client: MqttClient, wait: float = SETTLE) -> list[ReceivedMessage]:
    got = []
    while (message := client.get(timeout=wait)) is not None:
        got.append(message)
    return got


def test_the_fixture_acl_is_the_product_acl() -> None:
    assert DEFAULT_ACL == ACL
    assert "pattern write kf/v1/dev/%u/report" in ACL


def test_denied_publishes_are_refused_and_reach_no_subscriber(make_client: ClientFactory) -> None:
    observer = make_client(SERVICE_IDENTITY)
    observer.subscribe("kf/v1/#")
    publishers = {name: make_client(name) for name in ("dev-a", "dev-b", "op-alice", "op-bob")}
    publishers[SERVICE_IDENTITY] = make_client(SERVICE_IDENTITY)

    refused = 0
    for n, (who, topic) in enumerate(DENIED_PUBLISHES):
        full = f"kf/v1/{topic}"
        with pytest.raises(MqttRefused) as info:
            publishers[who].publish(full, f"denied-{n}-qos1".encode())
        assert info.value.reason_code == NOT_AUTHORIZED, (who, topic)
        refused += 1
        # QoS 0 has no PUBACK: the broker drops it without a word; the observer proves it
        publishers[who].publish(full, f"denied-{n}-qos0".encode(), qos=0)
        with pytest.raises(MqttRefused):
            publishers[who].publish(full, f"denied-{n}-retained".encode(), retain=True)
    for n, (who, topic) in enumerate(ALLOWED_PUBLISHES):
        publishers[who].publish(f"kf/v1/{topic}", f"allowed-{n}".encode())

    got = drain(observer)
    payloads = sorted(m.payload for m in got)
    # every positive control arrived, on its topic, and nothing denied did
    assert payloads == sorted(f"allowed-{n}".encode() for n in range(len(ALLOWED_PUBLISHES)))
    assert {(m.topic, m.payload) for m in got} == {
        (f"kf/v1/{topic}", f"allowed-{n}".encode())
        for n, (_, topic) in enumerate(ALLOWED_PUBLISHES)
    }
    assert refused == len(DENIED_PUBLISHES)

    # a subscriber arriving later gets no retained message from a denied publish
    late = make_client(SERVICE_IDENTITY)
    late.subscribe("kf/v1/#")
    assert drain(late, 1.0) == []


def test_devices_and_operators_read_only_their_own_topics(make_client: ClientFactory) -> None:
    snoops = {name: make_client(name) for name in MAY_READ}
    granted = {name: [c.subscribe(f) for f in SNOOP_FILTERS] for name, c in snoops.items()}
    # Mosquitto grants every one of these subscriptions (a SUBACK proves nothing about reading)
    assert all(qos == 1 for qos_list in granted.values() for qos in qos_list), granted
    for name, snoop in snoops.items():
        snoop.subscribe(f"kf/v1/{'dev' if name.startswith('dev') else 'ops'}/{name}/#")

    # positive controls: the rightful readers, each on its own topic
    owners = {
        "dev-a": ("kf/v1/dev/dev-a/cmd",),
        "dev-b": ("kf/v1/dev/dev-b/cmd", "kf/v1/grp/g1/commit"),
        "op-alice": ("kf/v1/ops/op-alice/result",),
        "op-bob": ("kf/v1/ops/op-bob/result",),
    }
    rightful = {}
    for name, filters in owners.items():
        if name in snoops:
            continue
        rightful[name] = make_client(name)
        for topic_filter in filters:
            rightful[name].subscribe(topic_filter)
    service = make_client(SERVICE_IDENTITY)
    service.subscribe("$share/keyfleet/kf/v1/dev/+/report")
    service.subscribe("$share/keyfleet/kf/v1/ops/+/cmd")
    publishers = {name: make_client(name) for name in ("dev-b", "op-bob", SERVICE_IDENTITY)}

    sent: list[tuple[str, str, bytes]] = [
        (SERVICE_IDENTITY, "kf/v1/dev/dev-a/cmd", b"cmd for a"),
        (SERVICE_IDENTITY, "kf/v1/dev/dev-b/cmd", b"cmd for b"),
        (SERVICE_IDENTITY, "kf/v1/grp/g1/commit", b"commit g1"),
        (SERVICE_IDENTITY, "kf/v1/ops/op-alice/result", b"result for alice"),
        (SERVICE_IDENTITY, "kf/v1/ops/op-bob/result", b"result for bob"),
        ("dev-b", "kf/v1/dev/dev-b/report", b"report of b"),
        ("op-bob", "kf/v1/ops/op-bob/cmd", b"command of bob"),
    ]
    for who, topic, payload in sent:
        publishers[who].publish(topic, payload)

    # the rightful readers got theirs (the ACL is not simply closed)
    got_b = drain(rightful["dev-b"], 1.0)
    assert {m.payload for m in got_b} == {b"cmd for b", b"commit g1"}
    assert {m.payload for m in drain(rightful["op-bob"], 1.0)} == {b"result for bob"}
    assert {m.payload for m in drain(service, 1.0)} == {b"report of b", b"command of bob"}
    # each snoop got only what it may read, whatever filters it used
    for name, client in snoops.items():
        seen = {m.topic for m in drain(client, 0.5)}
        assert seen == MAY_READ[name], (name, seen)
