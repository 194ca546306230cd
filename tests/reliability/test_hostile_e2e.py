"""Issue 8, hostile input end to end: replayed, bit-flipped, forged and stale/future-epoch
messages against a whole installation (``firmware_sim.lab``: a real Mosquitto with mutual TLS
and the product ACL, ``keyfleet serve`` on SQLite, three simulated devices with swtpm running
``keyagent``), then a rekey to show the fleet still works.

Threats modelled (devices cannot publish on ``grp/+/commit`` at all, test_acl_broker.py):

* **Broker-level attacker**: holds MQTT credentials that may read and publish on every topic
  (here the service's TLS client identity, under another client id: what a compromised broker
  or a stolen service TLS key gives) but none of the fleet's signing keys. It taps a real
  relayed commit on ``grp/G/commit`` and re-publishes it verbatim (replay), with one bit flipped
  in the signature and one in the payload, and publishes commits, commit requests and operator
  commands signed by a key of its own under the service's and an operator's names.
* **Compromised member device**: uses its own DevID key in its own TPM and its own TLS identity
  (both legitimately its) to send the service a validly signed ``group.commit`` for an epoch
  the group left (stale) and one far ahead (future).

Stale- and future-epoch messages validly signed by the service itself cannot be made by either
attacker (only the service key signs what agents take); the agents' epoch checks on such
messages are exercised in test_hostile_messages.py with the service's key. Here a stale replay
at the agents is the group's first commit, re-sent after the service's sequence numbers moved on.

Every message is refused with the expected check id, counted (each agent's status-file
``rejections`` counters; the service's audit log, actor named), and changes nothing (epoch and
epoch authenticator of the group); afterwards a rekey is done by every member and data crosses.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.config import load_config
from agent.daemon import load_devid
from agent.mqtt import MqttClient, ReceivedMessage
from agent.protocol.topics import SERVICE_ID, operator_cmd_topic
from agent.protocol.wire.envelope import RawMessage, decode_message, encode_message
from agent.protocol.wire.messages.ack import Ack
from agent.protocol.wire.messages.group import CommitMessage
from agent.protocol.wire.messages.operator import Rekey
from agent.protocol.wire.messages.service import CommitAction, CommitRequest
from agent.tpm.store import TPMStore
from firmware_sim.lab import Lab, LabDevice
from tests.fixtures.fleet import refusals_since, service_tap

pytestmark = [pytest.mark.e2e, pytest.mark.long]

LAB_OPTIONS = {"devices": 3, "ack_timeout": 20, "commit_request_timeout": 3}
G = "gh"
WAIT = 20.0
OLD_COMMIT_CHECKS = {
    "founder": ("replay.duplicate", "replay.seq-old"),
    "joined": ("replay.epoch-old", "replay.seq-old"),
}
"""What stops an old commit. An agent's guard remembers the service's last 32 seqs and refuses
every seq below its floor (docs/wire.md, "Replay"): the founder, who took the commit, refuses it
as a duplicate while it still remembers its seq and as old after; a member who joined later by
welcome never saw the seq and refuses the commit by its epoch (the group left epoch 0) unless 32
later seqs already raised its floor above it. Which one depends on how many messages each agent
took; that it is refused, counted once and changes nothing does not."""
MEMBER_CHECKS = {
    "ds.commit.epoch_taken": "stale-epoch commit (the epoch the group left), member's DevID",
    "ds.commit.epoch_mismatch": "future-epoch commit envelope around an older MLS commit",
    "ds.ack.epoch_ahead": "ack for an epoch five ahead of the group, member's DevID",
}


@pytest.fixture(scope="module")
def lab(fleet_lab: Lab) -> Lab:
    return fleet_lab


def epoch_of(lab: Lab) -> int:
    return int(next(row for row in lab.groups() if row["group_id"] == G)["epoch"])


def agreed_authenticator(lab: Lab) -> bytes:
    status = lab.ack_status(G)
    assert status.agreed and len(status.by_authenticator) == 1, status
    (authenticator, acked), *_ = status.by_authenticator.items()
    assert sorted(acked) == sorted(lab.device_ids)
    return bytes(authenticator)


def rekey(lab: Lab) -> dict[str, Any]:
    result = lab.op("rekey", "--group", G, operator="op-ops", timeout=120)
    assert result.returncode == 0 and result.final is not None, str(result)
    assert result.final["status"] == "done", str(result)
    return result.final


def rejections(device: LabDevice) -> dict[str, int]:
    status = device.status() or {}
    return dict(status.get("rejections", {}))


def wait_for(what: str, condition: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Attacker:
    """An MQTT client with the broker-level attacker's credentials (service TLS identity,
    client id ``attacker``), tapping ``grp/+/commit``."""

    def __init__(self, lab: Lab) -> None:
        self.seen: list[ReceivedMessage] = []
        # not a method of self: no reference cycle
        self.client = service_tap(lab, "attacker", on_message=self.seen.append)
        self.client.subscribe("kf/v1/grp/+/commit")

    def commits(self) -> list[tuple[ReceivedMessage, CommitMessage]]:
        seen = list(self.seen)  # list.append and list() are atomic under the GIL
        out = []
        for message in seen:
            decoded = decode_message(RawMessage.from_bytes(message.payload))
            out.append((message, CommitMessage.from_cbor_map(decoded.untrusted_body)))
        return out

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload)

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def attacker(lab: Lab) -> Iterator[Attacker]:
    client = Attacker(lab)
    yield client
    client.close()


def flip(data: bytes, index: int, bit: int = 0x10) -> bytes:
    return data[:index] + bytes([data[index] ^ bit]) + data[index + 1 :]


def test_replayed_flipped_forged_and_stale_messages_are_refused_counted_and_harmless(
    lab: Lab, attacker: Attacker, summary: Any
) -> None:
    created = lab.op("group", "create", G, "--members", *lab.device_ids, timeout=120)
    assert created.returncode == 0 and created.final is not None, str(created)
    assert created.final["status"] == "done", str(created)
    lab.wait_settled(G, timeout=60)  # the joiners' first self-updates (docs/treekem.md)
    start = epoch_of(lab)
    rekey(lab)
    wait_for("the tapped commit", lambda: any(c.epoch == start for _, c in attacker.commits()))
    tapped, body = next((m, c) for m, c in attacker.commits() if c.epoch == start)
    epoch = epoch_of(lab)
    assert epoch == start + 1
    authenticator = agreed_authenticator(lab)
    lab.wait_epoch(G, epoch, lab.devices, timeout=30)
    topic = f"kf/v1/grp/{G}/commit"
    now = int(time.time())
    forger = ec.generate_private_key(ec.SECP256R1())

    # -- the broker-level attacker, at the agents --------------------------------------------
    commit_at = tapped.payload.index(body.commit) + len(body.commit) // 2
    device_attacks: list[tuple[str, str, Callable[[LabDevice], tuple[str, bytes]]]] = [
        ("replayed commit", "replay.duplicate", lambda d: (topic, tapped.payload)),
        (
            "commit, bit flipped in the signature",
            "cose.signature",
            lambda d: (topic, flip(tapped.payload, len(tapped.payload) - 5)),
        ),
        (
            "commit, bit flipped in the payload (inside the MLS commit)",
            "cose.signature",
            lambda d: (topic, flip(tapped.payload, commit_at)),
        ),
        (
            "commit for the current epoch signed by an unknown key as keyfleet-service",
            "cose.kid-unknown",
            lambda d: (
                topic,
                encode_message(
                    CommitMessage(G, epoch, body.commit),
                    key=forger,
                    sender=SERVICE_ID,
                    to=G,
                    seq=10**12,
                    time=now,
                ),
            ),
        ),
        (
            "commit request (remove a member) signed by an unknown key as keyfleet-service",
            "cose.kid-unknown",
            lambda d: (
                f"kf/v1/dev/{d.id}/cmd",
                encode_message(
                    CommitRequest(
                        os.urandom(16),
                        G,
                        epoch,
                        CommitAction.REMOVE,
                        member=next(x for x in lab.device_ids if x != d.id),
                    ),
                    key=forger,
                    sender=SERVICE_ID,
                    to=d.id,
                    seq=10**12 + 1,
                    time=now,
                ),
            ),
        ),
    ]
    table: list[dict[str, Any]] = []
    for what, check, make in device_attacks:
        before = {d.id: rejections(d).get(check, 0) for d in lab.devices}
        if make(lab.devices[0])[0] == topic:
            attacker.publish(*make(lab.devices[0]))
        else:
            for device in lab.devices:
                attacker.publish(*make(device))
        for device in lab.devices:
            wait_for(
                f"{device.name} to count {check} ({what})",
                lambda d=device, c=check, n=before[device.id] + 1: rejections(d).get(c, 0) == n,  # type: ignore[misc]
            )
        table.append(
            {
                "attack": what,
                "where": "agents",
                "inputs": len(lab.devices),
                "refused": len(lab.devices),
                "check": check,
                "got_through": 0,
            }
        )

    # the group's first commit (epoch 0) replayed: the founder took it, the others joined later
    # by welcome and never took it; a stale replay is refused at all of them
    first_message, first = min(attacker.commits(), key=lambda mc: mc[1].epoch)
    assert first.epoch == 0
    founder = lab.registry(lambda r: r.commits_from(G, 0)[0].committer)
    allowed = {
        d.id: OLD_COMMIT_CHECKS["founder" if d.id == founder else "joined"] for d in lab.devices
    }
    counts = {d.id: rejections(d) for d in lab.devices}
    epochs = {d.id: d.epoch(G) for d in lab.devices}
    attacker.publish(topic, first_message.payload)
    seen: set[str] = set()
    for device in lab.devices:

        def refused_once(d: LabDevice = device) -> bool:
            now_counts = rejections(d)
            grown = {
                c: now_counts.get(c, 0) - counts[d.id].get(c, 0)
                for c in set(now_counts) | set(counts[d.id])
                if now_counts.get(c, 0) != counts[d.id].get(c, 0)
            }
            if not grown:
                return False
            assert len(grown) == 1 and set(grown.values()) == {1}, (d.name, grown)
            (check,) = grown
            assert check in allowed[d.id], (d.name, check, allowed[d.id])
            seen.add(check)
            return True

        wait_for(f"{device.name} to refuse the old commit", refused_once)
        assert device.epoch(G) == epochs[device.id], device.name
    table.append(
        {
            "attack": "the group's first commit (epoch 0) replayed, to members in epoch "
            f"{epoch}; {len(lab.devices) - 1} of them never took it",
            "where": "agents",
            "inputs": len(lab.devices),
            "refused": len(lab.devices),
            "check": " / ".join(sorted(seen)),
            "got_through": 0,
        }
    )

    # -- the broker-level attacker, at the service -------------------------------------------
    head = lab.audit_head()
    forged_rekey = encode_message(
        Rekey(os.urandom(16), G),
        key=forger,
        sender="op-ops",
        to=SERVICE_ID,
        seq=10**12,
        time=now,
    )
    attacker.publish(operator_cmd_topic("op-ops"), forged_rekey)
    refused = wait_refused(lab, head, "operator:op-ops", "cose.kid-unknown")
    table.append(
        {
            "attack": "operator rekey signed by an unknown key as op-ops",
            "where": "service",
            "inputs": 1,
            "refused": len(refused),
            "check": "cose.kid-unknown",
            "got_through": 0,
        }
    )

    # -- a compromised member: stale- and future-epoch commits, validly signed ----------------
    member = lab.devices[1]
    next_seq = int((member.status() or {})["next_seq"])
    lab.stop_agent(member)
    try:
        signed = signed_as_member(
            lab,
            member,
            [
                (CommitMessage(G, epoch - 1, body.commit), next_seq + 1000),
                (CommitMessage(G, epoch + 5, body.commit), next_seq + 1001),
                (Ack(G, epoch + 5, bytes(32)), next_seq + 1002),
            ],
        )
        publish_as_member(lab, member, signed)
        for check in MEMBER_CHECKS:
            wait_refused(lab, head, f"device:{member.id}", check)
    finally:
        lab.reboot(member)
    for check, what in MEMBER_CHECKS.items():
        table.append(
            {
                "attack": what,
                "where": "service",
                "inputs": 1,
                "refused": 1,
                "check": check,
                "got_through": 0,
            }
        )

    # nothing moved
    time.sleep(1.0)
    assert epoch_of(lab) == epoch
    assert agreed_authenticator(lab) == authenticator
    lab.wait_epoch(G, epoch, lab.devices, timeout=30)

    # and the fleet still works: a rekey done by every member, data across them
    final = rekey(lab)
    assert final["epoch"] == epoch + 1 and final["acked"] == len(lab.device_ids)
    assert agreed_authenticator(lab) != authenticator
    plaintext = os.urandom(40)
    with lab.devices[0].api() as api:
        blob = api.encrypt(G, plaintext)
    for device in lab.devices[1:]:
        with device.api() as api:
            assert api.decrypt(G, blob) == plaintext
    verify = lab.keyfleet("audit", "verify", "--config", str(lab.service_config))
    assert verify.returncode == 0, str(verify)
    summary.record("hostile_e2e", {"attacks": table})


def wait_refused(lab: Lab, head: int, actor: str, check: str) -> list[str]:
    found: list[str] = []

    def seen() -> bool:
        found[:] = [line for line in refusals_since(lab, head, actor) if f"[{check}]" in line]
        return bool(found)

    wait_for(f"an audited refusal [{check}] of {actor}", seen)
    assert len(found) == 1, found
    return found


def signed_as_member(
    lab: Lab, member: LabDevice, bodies: list[tuple[CommitMessage | Ack, int]]
) -> list[bytes]:
    """Envelopes signed by ``member``'s DevID key in its TPM (its agent is stopped)."""
    lab.flush_tpm(member)
    config = load_config(member.agent_config)
    now = int(time.time())
    with TPMStore(member.tcti) as store:
        devid = load_devid(store, config, False)
        return [
            encode_message(body, key=devid, sender=member.id, to=SERVICE_ID, seq=seq, time=now)
            for body, seq in bodies
        ]


def publish_as_member(lab: Lab, member: LabDevice, payloads: list[bytes]) -> None:
    """Publish on the member's own report topic with its own TLS identity."""
    assert lab.broker is not None and lab.pki is not None
    config = load_config(member.agent_config)
    assert config.identity is not None
    client = MqttClient(
        host=lab.broker.host,
        port=lab.broker.port,
        ca_file=lab.pki.tls_ca,
        cert_file=config.identity.tls_cert.path,
        key_file=config.identity.tls_key,
        client_id=f"{member.id}-compromised",
        clean_start=True,
        session_expiry=0,
    )
    client.connect()
    try:
        for payload in payloads:
            client.publish(f"kf/v1/dev/{member.id}/report", payload)
    finally:
        client.close()
