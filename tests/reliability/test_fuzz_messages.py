"""Issue 8, hostile input: the two MQTT entry points, ``AgentCore.handle`` (what a device does
with every message it receives) and ``DeliveryService.handle`` (what the service does with every
device report and operator command), each meet 10,000 malformed inputs from a seeded mutation
fuzzer of real, validly signed messages.

The fuzzer (``malform``; also used by the other test_fuzz_* modules): the byte-level mutations of
tests/pure/test_wire_fuzz.py (bit flip, several flips, truncation, insertion, a huge announced
length, a byte set, random bytes), splices of two samples, oversize inputs (just over and far over
the frame limit), deep nesting (up to 100,000 levels) and values of the wrong type. A quarter of the
inputs are *validly signed* hostile messages (what a compromised sender could send: real bodies
whose opaque MLS blobs, ids and epochs are mutated, re-signed with the sender's real key); they
reach the body parsers, the MLS decoders and the state machines.

For every input: no exception escapes (the entry points promise to answer every message; a
refusal is ``Outcome.refused`` / a counted, audited refusal), the input is done in bounded time
(``PER_INPUT_LIMIT``), a refused input changes no state (agent: its whole serialized state, seq
and ledger included; service: every table but the audit log, byte for byte, and its in-memory
queues), and the component's rejection counter grows by exactly one per refusal, by check id.
At the service each refusal that is not a benign redelivery adds exactly one audit record.
"""

from __future__ import annotations

import copy
import hashlib
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, text

from agent.core import AgentCore
from agent.protocol.wire import cbor, cose
from agent.protocol.wire.envelope import RawMessage, decode_message
from agent.protocol.wire.messages.registry import REGISTRY
from agent.protocol.wire.rejections import BENIGN_CHECKS
from tests.pure.test_wire_fuzz import mutate, random_value

pytestmark = [pytest.mark.pure, pytest.mark.long]

INPUTS = 10_000


KINDS = ("mutate", "mutate", "mutate", "mutate", "splice", "oversize", "nest", "type")
PER_INPUT_LIMIT = 2.0
"""CPU seconds one input may take (the slowest legitimate one takes milliseconds): a hang is a
failure, not a slow test. CPU time of this process, because the suite runs this tier niced
beside the others, where a scheduler pause of a few seconds is not the input's doing; an input
that waits instead of working (a deadlock, a server that never answers) is caught by
``PER_INPUT_WALL_LIMIT``."""
PER_INPUT_WALL_LIMIT = 30.0


def malform(seeds: Sequence[bytes], rng: random.Random, *, limit: int = 1 << 20) -> bytes:
    """One malformed input derived from ``seeds``; never equal to a seed."""
    while True:
        out = _one(seeds, rng, limit)
        if out not in seeds:
            return out


def _one(seeds: Sequence[bytes], rng: random.Random, limit: int) -> bytes:
    kind = rng.choice(KINDS)
    seed = rng.choice(seeds)
    if kind == "mutate":
        out = seed
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            out = mutate(out, rng)
        return out
    if kind == "splice":
        other = rng.choice(seeds)
        return seed[: rng.randrange(len(seed) + 1)] + other[rng.randrange(len(other) + 1) :]
    if kind == "oversize":
        size = rng.choice((limit + 1, limit + rng.randrange(1, 4096), 4 * limit))
        return (seed * (size // max(len(seed), 1) + 1))[:size]
    if kind == "nest":
        depth = rng.choice((17, 64, 1000, 100_000))
        head = rng.choice((b"\x81", b"\xa1\x00", b"\xd2\x81", b"\x9f"))
        return head * depth + rng.choice((b"\x00", b"", seed))
    # a valid CBOR value of some other type where the receiver expects its structure
    return cbor.encode(random_value(rng))


@dataclass
class Tally:
    """What the test saw: refusals by check id, accepted inputs, the slowest input."""

    refused: Counter[str] = field(default_factory=Counter)
    accepted: int = 0
    ignored: int = 0
    slowest: float = 0.0
    inputs: int = 0

    def timed(self, call: Callable[[], object]) -> object:
        """Run one input; it counts, and its time is checked, whether it returns or raises."""
        self.inputs += 1
        started, started_cpu = time.monotonic(), time.process_time()
        try:
            return call()
        finally:
            elapsed = time.monotonic() - started
            cpu = time.process_time() - started_cpu
            self.slowest = max(self.slowest, elapsed)
            assert cpu < PER_INPUT_LIMIT, f"input {self.inputs} took {cpu:.2f} s of CPU"
            assert elapsed < PER_INPUT_WALL_LIMIT, f"input {self.inputs} took {elapsed:.2f} s"

    @property
    def total_refused(self) -> int:
        return sum(self.refused.values())

    def summary(self) -> str:
        top = ", ".join(f"{k} {v}" for k, v in self.refused.most_common(8))
        return (
            f"{self.inputs} inputs: {self.total_refused} refused ({top}, ...), "
            f"{self.accepted} accepted, {self.ignored} ignored; slowest {self.slowest * 1e3:.1f} ms"
        )


# ---- validly signed hostile messages --------------------------------------------------------


def resign(seed: bytes, key: Any, rng: random.Random, *, seq: int, now: int) -> bytes:
    """``seed``'s envelope with its body tampered with, signed again with the sender's real key
    under a fresh ``seq`` and time: a compromised sender's message. Opaque blobs (commits,
    welcomes, key packages, public groups) are mutated at byte level, other fields replaced by
    values of any type, ids and epochs nudged, fields dropped or added."""
    decoded = decode_message(RawMessage.from_bytes(seed))
    body: dict[Any, Any] = dict(copy.deepcopy(dict(decoded.untrusted_body)))
    for _ in range(rng.choice((1, 1, 2, 3))):
        if not body or rng.randrange(8) == 0:
            body[rng.choice(("extra", "epoch", "group_id", 7))] = random_value(rng)
            continue
        name = rng.choice(sorted(body, key=str))
        value = body[name]
        choice = rng.randrange(6)
        if choice == 0:
            del body[name]
        elif type(value) is bytes and choice < 4:
            body[name] = mutate(value, rng)
        elif type(value) is int and choice < 4:
            body[name] = min(max(0, value + rng.choice((-2, -1, 1, 2, 1 << 40))), (1 << 64) - 1)
        elif type(value) is str and choice < 4:
            body[name] = rng.choice(("g2", "dev-b", "dev-a", "keyfleet-service", value + "x", ""))
        else:
            body[name] = random_value(rng)
    envelope = {
        "type": decoded.type if rng.randrange(10) else rng.choice(sorted(REGISTRY)),
        "version": 1,
        "sender": decoded.sender,
        "to": decoded.to,
        "seq": seq,
        "time": now,
        "body": body,
    }
    return cose.sign1(cbor.encode(envelope), key)


def fuzz_inputs(
    seeds: Sequence[tuple[str, bytes]],
    signers: dict[str, Any],
    *,
    count: int,
    now: int,
    first_seq: int,
    limit: int,
) -> Iterator[tuple[int, str, bytes, bool]]:
    """``count`` inputs ``(index, topic, payload, signed)``: three quarters malformed bytes, one
    quarter validly signed hostile messages (``signed``). Seeded by index."""
    payloads = [p for _, p in seeds]
    for n in range(count):
        rng = random.Random(n)
        topic, seed = rng.choice(seeds)
        if rng.randrange(4) == 0:
            sender = decode_message(RawMessage.from_bytes(seed)).sender
            yield n, topic, resign(seed, signers[sender], rng, seq=first_seq + n, now=now), True
        else:
            yield n, topic, malform(payloads, rng, limit=limit), False


# ---- the agent: AgentCore.handle ------------------------------------------------------------

CHANGES_WHEN_REFUSED = frozenset({"replay.epoch-old", "replay.epoch-future", "mls.epoch-future"})
"""Refusals after which an authentic message legitimately changes agent state: the core answers
an already-applied commit with an ack, and one from beyond its next epoch with a keys.report
that makes the service replay what it missed (both spend a sequence number)."""


def agent_under_fire() -> tuple[AgentCore, list[tuple[str, bytes]], dict[str, Any], int]:
    """dev-a in group g1 with dev-b (epoch 1), answering attestation challenges; the seeds are
    every kind of message a device takes, some already accepted (their replays are refused),
    the rest fresh."""
    from agent.protocol.hpke import serialize_public_key
    from agent.protocol.wire.messages.attestation import AttestChallenge
    from agent.protocol.wire.messages.group import CommitMessage, WelcomeMessage
    from agent.protocol.wire.messages.service import (
        CommitAction,
        CommitRequest,
        KeyPackageRequest,
        ReportRequest,
        WelcomeDelivery,
    )
    from tests.operator_certs import authorize
    from tests.pure.test_agent_core import FakeService, G, acks, cmd
    from tests.pure.test_agent_core_attest import FakeAttester

    service = FakeService()
    seeds: list[tuple[str, bytes]] = []
    a = service.core("dev-a", attester=FakeAttester())
    service.core("dev-b")
    service.core("dev-c")
    command_topic = "kf/v1/dev/dev-a/cmd"
    group_topic = f"kf/v1/grp/{G}/commit"

    def deliver(device: str, body: Any) -> Any:
        payload, topic = service.command(device, body)
        if device == "dev-a":
            seeds.append((topic, payload))
        return service.devices[device].handle(payload, topic, service.now)

    service.create = lambda device: None  # type: ignore[method-assign]

    def point(device: str) -> bytes:
        return serialize_public_key(service.devices[device]._keys.devid.public_key())

    def approved(op: str, group: str | None, *devices: str) -> bytes:
        return authorize(op, group, [(d, point(d)) for d in devices], now=service.now)

    created = deliver(
        "dev-a",
        CommitRequest(cmd(), G, 0, CommitAction.CREATE, authz=approved("group.create", G, "dev-a")),
    )
    from agent.protocol.mls import codec
    from agent.protocol.mls.public import PublicGroup
    from agent.protocol.wire.messages.group import GroupCreated

    (body,) = service.bodies("dev-a", created)
    assert isinstance(body, GroupCreated)
    service.public[G] = PublicGroup.from_state(codec.decode(body.public_group, 1 << 20, "pg"))
    assert body.authz is not None  # what the service keeps and delivers with Welcomes
    service.authorizations[G] = {hashlib.sha256(body.authz).digest(): body.authz}
    kp_b = service.key_package("dev-b")
    add_b = approved("group.add", G, "dev-b")
    out = deliver("dev-a", CommitRequest(cmd(), G, 0, CommitAction.ADD, "dev-b", kp_b, add_b))
    commit, welcome = service.bodies("dev-a", out)
    assert isinstance(commit, CommitMessage) and isinstance(welcome, WelcomeMessage)
    relay = service.order(commit)
    seeds.append((group_topic, relay))
    acks(service, service.fan_out(relay, ["dev-a"]))
    joined = service.deliver("dev-b", WelcomeDelivery(G, welcome.epoch, welcome.welcome))
    acks(service, {"dev-b": joined})
    deliver("dev-a", ReportRequest(cmd()))
    deliver("dev-a", AttestChallenge(nonce=bytes(range(32)), pcrs=(0, 1, 7)))
    deliver("dev-a", KeyPackageRequest(cmd()))
    # fresh, never delivered to dev-a: every command kind, a commit for its next epoch (dev-b's
    # update), a welcome for one of its key packages (dev-c adds it to another group)
    kp_c = service.key_package("dev-c")
    for body in (
        CommitRequest(cmd(), G, 1, CommitAction.UPDATE),
        CommitRequest(
            cmd(), G, 1, CommitAction.REMOVE, "dev-b", authz=approved("group.remove", G, "dev-b")
        ),
        CommitRequest(
            cmd(), G, 1, CommitAction.ADD, "dev-c", kp_c, approved("group.add", G, "dev-c")
        ),
        CommitRequest(
            cmd(), "g2", 0, CommitAction.CREATE, authz=approved("group.create", "g2", "dev-a")
        ),
        ReportRequest(cmd()),
        KeyPackageRequest(cmd()),
        AttestChallenge(nonce=bytes(32), pcrs=(0, 7)),
    ):
        seeds.append(service.command("dev-a", body)[::-1])  # type: ignore[arg-type]
    update = service.devices["dev-b"].handle(
        *service.command("dev-b", CommitRequest(cmd(), G, 1, CommitAction.UPDATE)), service.now
    )
    (b_commit,) = service.bodies("dev-b", update)
    assert isinstance(b_commit, CommitMessage)
    seeds.append((group_topic, service.sign(b_commit, G)))
    kp_a = next(iter(a._key_packages.values()))
    service.devices["dev-c"].handle(
        *service.command(
            "dev-c",
            CommitRequest(
                cmd(), "g3", 0, CommitAction.CREATE, authz=approved("group.create", "g3", "dev-c")
            ),
        ),
        service.now,
    )
    c_core = service.devices["dev-c"]
    from agent.protocol.mls.messages import KeyPackage

    result = c_core.groups()["g3"].add(c_core._keys.devid, [KeyPackage.decode(kp_a)])
    assert result.welcome is not None
    seeds.append(
        (command_topic, service.sign(WelcomeDelivery("g3", 1, result.welcome.encode()), "dev-a"))
    )
    seeds.append(("kf/v1/grp/g9/commit", service.sign(b_commit, "g9")))
    return a, seeds, {"keyfleet-service": service.key}, service.now


def agent_state(core: AgentCore) -> bytes:
    import cbor2

    return bytes(cbor2.dumps(core.to_state(), canonical=True))


def test_agent_core_meets_10000_malformed_messages(capsys: pytest.CaptureFixture[str]) -> None:
    core, seeds, signers, now = agent_under_fire()
    tally = Tally()
    rejections_before = core.rejections.snapshot()
    for n, topic, payload, signed in fuzz_inputs(
        seeds, signers, count=INPUTS, now=now, first_seq=10_000, limit=256 * 1024
    ):
        before = agent_state(core)
        total = core.rejections.total
        out: Any = tally.timed(lambda: core.handle(payload, topic, now))  # noqa: B023
        if out.refused is None:
            if out.handled == "ignored":
                tally.ignored += 1
                assert agent_state(core) == before, n
                continue
            assert signed, f"input {n}: a malformed message was accepted"
            tally.accepted += 1
            continue
        check = out.refused.check
        tally.refused[check] += 1
        assert core.rejections.total == total + 1, n
        if not signed or check not in CHANGES_WHEN_REFUSED:
            assert agent_state(core) == before, f"input {n} [{check}] changed the agent state"
            assert out.publishes == [] or check == "replay.duplicate", n
    counted = Counter(core.rejections.snapshot())
    counted.subtract(rejections_before)
    assert +counted == tally.refused
    assert tally.inputs == INPUTS and tally.total_refused >= INPUTS * 0.9
    with capsys.disabled():
        print(f"\nAgentCore.handle: {tally.summary()}")


# ---- the service: DeliveryService.handle ------------------------------------------------------

AUDIT_TABLES = frozenset({"audit_log", "audit_head", "service_sequence"})
"""Tables a refusal may change: the audit log records it, and the service's outgoing sequence
counter moves when it tells an operator that a signed command was rejected (an op.result)."""


@dataclass
class ServiceView:
    """The service's whole state but its audit log and outgoing seq: every other table, byte for
    byte, and the sizes of its in-memory queues."""

    tables: bytes
    memory: tuple[int, ...]
    audit: int


def service_view(fleet: Any) -> ServiceView:
    digest = hashlib.sha256()
    with fleet.sessions() as session:
        names = sorted(inspect(session.connection()).get_table_names())
        for name in names:
            if name in AUDIT_TABLES:
                continue
            rows = session.execute(text(f"SELECT * FROM {name}")).all()
            digest.update(name.encode() + repr(sorted(map(repr, rows))).encode())
        audit_rows = session.execute(text("SELECT COUNT(*) FROM audit_log")).scalar_one()
    service = fleet.service
    memory = tuple(
        len(getattr(service, name, ()))  # those still in memory (jobs are moving to tables)
        for name in ("_queues", "_kp_jobs", "_operations", "_held", "_held_welcomes")
    )
    return ServiceView(digest.digest(), memory, int(audit_rows))


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Any]:
    from tests.pure.test_service_core import create_g1, make_fleet

    yield from _recorded_fleet(tmp_path, make_fleet, create_g1)


def _recorded_fleet(tmp_path: Path, make_fleet: Any, create_g1: Any) -> Iterator[Any]:
    """A fleet of three with g1 created and rekeyed; ``fleet.seeds`` holds every message the
    service took on the way (device reports and operator commands, all accepted)."""
    from tests.service_members import rekey

    fleets = make_fleet(tmp_path)
    fleet = next(fleets)
    seen: list[tuple[str, bytes]] = []
    real = fleet.service.handle

    def recording(topic: str, payload: bytes, now: int) -> Any:
        seen.append((topic, payload))
        return real(topic, payload, now)

    fleet.service.handle = recording
    create_g1(fleet)
    cid = fleet.command("op-alice", rekey("g1"))
    assert fleet.final(cid).status.value == "done"
    fleet.service.handle = real
    fleet.seeds = seen
    yield fleet
    for _ in fleets:  # the generator's teardown
        pass


def test_delivery_service_meets_10000_malformed_messages(
    fleet: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    seeds = fleet.seeds
    # (a three-member creation adds both other founders in one commit: 14 messages)
    assert {t.split("/")[2] for t, _ in seeds} == {"dev", "ops"} and len(seeds) >= 14
    signers = {name: d.devid for name, d in fleet.devices.items()}
    signers.update({name: o.key for name, o in fleet.operators.items()})
    service = fleet.service
    now = fleet.now
    tally = Tally()
    before_counts = service.rejections.snapshot()
    view = service_view(fleet)
    for n, topic, payload, signed in fuzz_inputs(
        seeds, signers, count=INPUTS, now=now, first_seq=1_000_000, limit=256 * 1024
    ):
        total = service.rejections.total
        publishes: Any = tally.timed(lambda: service.handle(topic, payload, now))  # noqa: B023
        if service.rejections.total == total:
            assert signed, f"input {n}: a malformed message was accepted"
            tally.accepted += 1
            view = service_view(fleet)
            continue
        assert service.rejections.total == total + 1, n
        counts = service.rejections.snapshot()
        (check,) = [c for c, k in counts.items() if k != before_counts.get(c, 0)]
        before_counts = counts
        tally.refused[check] += 1
        after = service_view(fleet)
        assert after.tables == view.tables, f"input {n} [{check}] changed the registry"
        assert after.memory == view.memory, f"input {n} [{check}] changed the service's queues"
        # every refusal but a benign redelivery is audited, once
        assert after.audit - view.audit == (0 if check in BENIGN_CHECKS else 1), (n, check)
        if not signed:
            assert all(p.topic.startswith("kf/v1/ops/") for p in publishes), (n, check)
        view = after
    assert tally.inputs == INPUTS
    assert tally.total_refused == INPUTS - tally.accepted >= INPUTS * 0.9
    with capsys.disabled():
        print(f"\nDeliveryService.handle: {tally.summary()}; counts {service.rejections}")
