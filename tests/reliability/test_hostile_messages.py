"""Issue 8, hostile input: replayed, reordered, forged (unknown signer, another member's key,
a victim's key id over an attacker's signature, a flipped bit), stale-epoch and future-epoch
messages at the agent (``AgentCore``, software keys) and at the service (``DeliveryService`` on a
real SQLite file with software MLS members). Unit claims on the pure cores; the end-to-end
version over real Mosquitto and real agents is tests/e2e/test_e2e_fleet.py's refused operator
commands and revoked-device checks.

Every case: refused with its check id, counted (``rejections`` grows by one under that id),
logged at the agent (WARNING on ``keyagent.core`` naming the check; a QoS 1 redelivery at DEBUG)
and audited at the service (one ``refused`` audit record naming the check; redeliveries are
benign: counted, not audited), and no state change (agent: whole serialized state; service: every
table but the audit log and its outgoing seq).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from agent.core import AgentCore
from agent.protocol.wire import cbor, cose
from agent.protocol.wire.messages.ack import Ack
from agent.protocol.wire.messages.group import CommitMessage
from agent.protocol.wire.messages.key_state import KeyStateReport
from agent.protocol.wire.messages.service import CommitAction, CommitRequest, ReportRequest
from tests.reliability.test_fuzz_messages import _recorded_fleet, agent_state, service_view

pytestmark = pytest.mark.pure


def forge_with_kid(genuine: bytes, attacker: ec.EllipticCurvePrivateKey, kid: bytes) -> bytes:
    """``genuine``'s payload under the victim's key id, signed by ``attacker``."""
    payload = cose.decode_sign1(genuine).payload
    protected = cose.protected_header(kid)
    der = attacker.sign(cose.sig_structure(protected, payload), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return b"\xd2" + cbor.encode(
        [protected, {}, payload, r.to_bytes(32, "big") + s.to_bytes(32, "big")]
    )


def flip_bit(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


# ---- the agent ------------------------------------------------------------------------------


def refused_at_agent(  # noqa: PLR0917
    core: AgentCore,
    payload: bytes,
    topic: str,
    now: int,
    check: str,
    caplog: pytest.LogCaptureFixture,
    *,
    state_may_change: bool = False,
) -> None:
    before = agent_state(core)
    count = core.rejections.count(check)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="keyagent.core"):
        out = core.handle(payload, topic, now)
    assert out.refused is not None and out.refused.check == check, out.refused
    assert core.rejections.count(check) == count + 1
    marker = "redelivered" if check == "replay.duplicate" else f"[{check}]"
    logged = [r for r in caplog.records if marker in r.getMessage()]
    assert logged, f"{check} not logged"
    if check not in ("replay.duplicate", "replay.epoch-old"):  # both benign in catch-up
        assert logged[0].levelno == logging.WARNING
    if not state_may_change:
        assert agent_state(core) == before, check


@pytest.fixture
def group() -> Iterator[tuple[Any, AgentCore, AgentCore]]:
    from tests.pure.test_agent_core import group_of_two

    yield group_of_two()


def test_agent_refuses_forged_replayed_reordered_and_wrong_epoch_messages(
    group: tuple[Any, AgentCore, AgentCore], caplog: pytest.LogCaptureFixture
) -> None:
    from tests.pure.test_agent_core import G, acks, cmd

    service, a, b = group
    now = service.now
    command = "kf/v1/dev/dev-a/cmd"
    commits = f"kf/v1/grp/{G}/commit"
    body = CommitRequest(cmd(), G, 1, CommitAction.UPDATE)
    genuine = service.sign(body, "dev-a", seq=500)

    # forged: an unknown signer; another member's (real, registered) key; the service's kid
    # over an attacker's signature; one flipped bit in the signature, in the payload
    attacker = ec.generate_private_key(ec.SECP256R1())
    from agent.protocol.wire.envelope import encode_message

    unknown = encode_message(
        body, key=attacker, sender="keyfleet-service", to="dev-a", seq=501, time=now
    )
    refused_at_agent(a, unknown, command, now, "cose.kid-unknown", caplog)
    member = encode_message(
        body, key=b._keys.devid, sender="keyfleet-service", to="dev-a", seq=502, time=now
    )
    refused_at_agent(a, member, command, now, "cose.kid-unknown", caplog)
    wrong_kid = forge_with_kid(genuine, attacker, cose.key_id(service.key.public_key()))
    refused_at_agent(a, wrong_kid, command, now, "cose.signature", caplog)
    refused_at_agent(a, flip_bit(genuine, len(genuine) - 3), command, now, "cose.signature", caplog)
    refused_at_agent(
        a,
        flip_bit(genuine, genuine.index(body.command_id) + 2),
        command,
        now,
        "cose.signature",
        caplog,
    )

    # future epoch: a request for an epoch the device has not reached
    ahead = service.sign(CommitRequest(cmd(), G, 4, CommitAction.UPDATE), "dev-a", seq=503)
    refused_at_agent(a, ahead, command, now, "replay.epoch-future", caplog, state_may_change=True)

    # reordered: dev-b's update (epoch 1 -> 2) and then dev-a's own (2 -> 3) relayed in the
    # wrong order: the later one is refused as from the future, then both apply in order
    out_b = b.handle(
        *service.command("dev-b", CommitRequest(cmd(), G, 1, CommitAction.UPDATE)), now
    )
    (commit_b,) = service.bodies("dev-b", out_b)
    assert isinstance(commit_b, CommitMessage)
    relay_b = service.order(commit_b)
    acks(service, service.fan_out(relay_b, ["dev-b"]))
    out_a = a.handle(
        *service.command("dev-a", CommitRequest(cmd(), G, 2, CommitAction.UPDATE)), now
    )
    assert out_a.refused is not None and out_a.refused.check == "mls.epoch-future"
    # a's state did not move: it is at epoch 1 and cannot commit for 2; b commits 2 -> 3
    out_b2 = b.handle(
        *service.command("dev-b", CommitRequest(cmd(), G, 2, CommitAction.UPDATE)), now
    )
    (commit_b2,) = service.bodies("dev-b", out_b2)
    assert isinstance(commit_b2, CommitMessage)
    relay_b2 = service.order(commit_b2)
    acks(service, service.fan_out(relay_b2, ["dev-b"]))
    refused_at_agent(a, relay_b2, commits, now, "mls.epoch-future", caplog, state_may_change=True)
    assert a.epoch(G) == 1
    acks(service, {"dev-a": a.handle(relay_b, commits, now)})
    acks(service, {"dev-a": a.handle(relay_b2, commits, now)})
    assert a.epoch(G) == b.epoch(G) == 3

    # replayed: the same relay again (a QoS 1 redelivery: benign, answered again)
    refused_at_agent(a, relay_b2, commits, now, "replay.duplicate", caplog, state_may_change=True)
    # stale epoch: the epoch-1 commit, freshly signed (new seq): a rollback attempt
    stale = service.sign(CommitMessage(G, 1, commit_b.commit), G, seq=900)
    refused_at_agent(a, stale, commits, now, "replay.epoch-old", caplog, state_may_change=True)
    assert a.epoch(G) == 3
    # a command reusing an accepted seq with other content, and one below the floor (the
    # agent remembers 32 of the service's seqs: once 32 later ones are taken, older are refused)
    accepted = service.sign(ReportRequest(cmd()), "dev-a", seq=1000)
    assert a.handle(accepted, command, now).refused is None
    reused = service.sign(ReportRequest(cmd()), "dev-a", seq=1000)
    refused_at_agent(a, reused, command, now, "replay.seq-reused", caplog)
    for seq in range(1100, 1132):
        assert (
            a.handle(service.sign(ReportRequest(cmd()), "dev-a", seq=seq), command, now).refused
            is None
        )
    for seq in (1000, 900):  # accepted then forgotten; never seen
        old = service.sign(ReportRequest(cmd()), "dev-a", seq=seq)
        refused_at_agent(a, old, command, now, "replay.seq-old", caplog)
    # stale and future envelope times
    late = service.sign(ReportRequest(cmd()), "dev-a", seq=1001, time=now - a.max_age - 1)
    refused_at_agent(a, late, command, now, "envelope.stale", caplog)
    early = service.sign(ReportRequest(cmd()), "dev-a", seq=1002, time=now + 3600)
    refused_at_agent(a, early, command, now, "envelope.future", caplog)
    assert a.rejections.suspicious >= 14


# ---- the service ----------------------------------------------------------------------------


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Any]:
    from tests.pure.test_service_core import create_g1, make_fleet

    yield from _recorded_fleet(tmp_path, make_fleet, create_g1)


def refused_at_service(fleet: Any, topic: str, payload: bytes, check: str) -> None:
    from provisioning import audit

    service = fleet.service
    before = service_view(fleet)
    count = service.rejections.count(check)
    publishes = service.handle(topic, payload, fleet.now)
    assert service.rejections.count(check) == count + 1, (check, service.rejections)
    after = service_view(fleet)
    assert after.tables == before.tables, f"{check} changed the registry"
    assert all(p.topic.startswith("kf/v1/ops/") for p in publishes), check
    if check == "replay.duplicate":
        assert after.audit == before.audit
        return
    assert after.audit == before.audit + 1, check
    with fleet.sessions() as session:
        last = audit.entries(session)[-1]
    assert last.outcome.value == "refused" and f"[{check}]" in last.reason, last


def test_service_refuses_forged_replayed_reordered_and_wrong_epoch_messages(fleet: Any) -> None:
    from agent.protocol.topics import device_report_topic

    d1, d2 = fleet.devices["dev-1"], fleet.devices["dev-2"]
    topic = device_report_topic("dev-1")
    now = fleet.now
    group = d1.groups["g1"]
    epoch = group.epoch

    # replayed: an ack the service already took, byte for byte
    acked = [p for t, p in fleet.seeds if t == topic][-1]
    refused_at_service(fleet, topic, acked, "replay.duplicate")

    genuine = d1.envelope(KeyStateReport(()), now)
    attacker = ec.generate_private_key(ec.SECP256R1())
    # forged: unknown key; another registered device's key (dev-2 signs as dev-1); dev-1's kid
    # over an attacker's signature; a flipped bit
    from agent.protocol.topics import SERVICE_ID
    from agent.protocol.wire.envelope import encode_message

    unknown = encode_message(
        KeyStateReport(()), key=attacker, sender="dev-1", to=SERVICE_ID, seq=d1.seq + 5, time=now
    )
    refused_at_service(fleet, topic, unknown, "cose.kid-unknown")
    as_other = encode_message(
        KeyStateReport(()), key=d2.devid, sender="dev-1", to=SERVICE_ID, seq=d1.seq + 6, time=now
    )
    refused_at_service(fleet, topic, as_other, "cose.kid-unknown")
    # dev-2 signing honestly as itself but publishing on dev-1's topic
    refused_at_service(fleet, topic, d2.envelope(KeyStateReport(()), now), "cose.kid-unknown")
    wrong_kid = forge_with_kid(genuine, attacker, cose.key_id(d1.devid.public_key()))
    refused_at_service(fleet, topic, wrong_kid, "cose.signature")
    refused_at_service(fleet, topic, flip_bit(genuine, len(genuine) - 2), "cose.signature")

    # stale and future epochs: acks and commits for epochs the group is not in
    refused_at_service(
        fleet, topic, d1.envelope(Ack("g1", epoch + 3, bytes(32)), now), "ds.ack.epoch_ahead"
    )
    old_commit = group.update(d1.devid, ec.generate_private_key(ec.SECP256R1()))
    stale = d1.envelope(CommitMessage("g1", epoch - 1, old_commit.commit.encode()), now)
    refused_at_service(fleet, topic, stale, "ds.commit.epoch_mismatch")
    future = d1.envelope(CommitMessage("g1", epoch + 2, old_commit.commit.encode()), now)
    refused_at_service(fleet, topic, future, "ds.commit.epoch_mismatch")

    # reordered: seqs inside the window are taken out of order; far below it, refused
    first, second = d1.envelope(KeyStateReport(()), now), d1.envelope(KeyStateReport(()), now)
    assert fleet.service.handle(topic, second, now) is not None
    before = fleet.service.rejections.total
    fleet.service.handle(topic, first, now)
    assert fleet.service.rejections.total == before  # reordered within the window: taken
    d1.seq += 100
    fleet.service.handle(topic, d1.envelope(KeyStateReport(()), now), now)
    ancient = encode_message(
        KeyStateReport(()), key=d1.devid, sender="dev-1", to=SERVICE_ID, seq=2, time=now
    )
    refused_at_service(fleet, topic, ancient, "replay.seq-old")
    # stale envelope time
    d1.seq += 1
    late = d1.envelope(KeyStateReport(()), now - 10 * 86_400)
    refused_at_service(fleet, topic, late, "envelope.stale")
    assert fleet.epoch("g1") == epoch
