"""Two delivery-service instances on one SQLite file, driven in-process: every message goes to
one of them at random (what a shared subscription does), so each flow crosses instances at any
step. The members are the real-MLS software members of tests/service_members.py.

What must hold (docs/scale-out.md): one chain per group (no duplicate epoch, no gap), every
operator gets its final result whichever instance saw the completion, an instance that dies with
a job in flight has it taken over when its lease (the job's deadline) expires, and scheduled
attestation challenges each device once per interval fleet-wide.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, update

from agent.protocol.wire.envelope import open_message
from agent.protocol.wire.messages.attestation import AttestChallenge
from agent.protocol.wire.messages.key_state import KeyStateReport
from agent.protocol.wire.messages.result import ResultStatus
from agent.protocol.wire.replay import DEFAULT_WINDOW
from firmware_sim.boot import default_components
from provisioning import audit
from provisioning.db.runtime import GroupSlot, HeldMessage, JobRow
from provisioning.db.schema import CommitLogEntry, Device
from provisioning.metrics import ServiceMetrics
from provisioning.policy import policy_from_components
from provisioning.registry import Registry
from provisioning.service import jobs, store
from provisioning.service.context import Call, Clock
from provisioning.service.core import (
    AttestationSettings,
    DeliveryService,
    JobState,
    Publish,
)
from tests.pure.test_service_core import Fleet, make_fleet
from tests.service_members import Outgoing, group_create, rekey

pytestmark = pytest.mark.pure


class TwoInstances:
    """The test fleet with a second instance beside ``fleet.service`` (same key, same database):
    messages and ticks go to a seeded random choice of the live ones."""

    def __init__(self, fleet: Fleet, *, seed: int, attestation: AttestationSettings | None = None):
        self.fleet = fleet
        first = fleet.service
        counter = iter(range(1 << 20, 1 << 30))
        self.metrics = {"a": ServiceMetrics(), "b": ServiceMetrics()}
        self.instances = {
            name: DeliveryService(
                fleet.sessions,
                signing_key=first._env.key,
                operator_ca=first._env.operator_ca,
                device_ca=first._env.devices.device_ca,
                settings=first.settings,
                attestation=attestation,
                rng=(lambda n: next(counter).to_bytes(n, "big")) if name == "b" else first._env.rng,
                instance=name,
                metrics=self.metrics[name],
            )
            for name in ("a", "b")
        }
        self.alive = {"a", "b"}
        self.random = random.Random(seed)
        self.handled = {"a": 0, "b": 0}

    def pick(self) -> str:
        return self.random.choice(sorted(self.alive))

    def send(self, *outgoing: Outgoing) -> None:
        queue = list(outgoing)
        while queue:
            topic, payload = queue.pop(0)
            name = self.pick()
            self.handled[name] += 1
            out = self.instances[name].handle(topic, payload, self.fleet.now)
            queue.extend(self.fleet.deliver(out))

    def tick(self, seconds: int) -> None:
        self.fleet.now += seconds
        for name in sorted(self.alive):
            for topic, payload in self.fleet.deliver(self.instances[name].tick(self.fleet.now)):
                self.send((topic, payload))

    def chain(self, group_id: str) -> list[int]:
        with self.fleet.sessions() as s:
            return list(
                s.scalars(
                    select(CommitLogEntry.epoch)
                    .where(CommitLogEntry.group_id == group_id)
                    .order_by(CommitLogEntry.epoch)
                )
            )


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    yield from make_fleet(tmp_path, ("dev-1", "dev-2", "dev-3", "dev-4"))


def test_flows_split_across_two_instances_keep_one_chain_per_group(fleet: Fleet) -> None:
    both = TwoInstances(fleet, seed=7)
    admin = fleet.operators["op-admin"]
    created = [
        group_create("g1", "dev-1", "dev-2", "dev-3"),
        group_create("g2", "dev-2", "dev-3", "dev-4"),
    ]
    both.send(*(admin.command(body, fleet.now) for body in created))
    # Two rekeys of each group arrive at once (at either instance): each group is moved one
    # epoch per rekey, in order, never forked.
    rekeys = [rekey(g) for g in ("g1", "g2", "g1", "g2")]
    both.send(*(admin.command(body, fleet.now) for body in rekeys))
    for _ in range(5):
        both.tick(1)
    for body in [*created, *rekeys]:
        result = fleet.final(body.command_id)
        assert result.status is ResultStatus.DONE, fleet.results[body.command_id]
    for group_id in ("g1", "g2"):
        # created at epoch 0, one commit adding both other founders, two rekeys: commits for
        # epochs 0..2, group at 3
        assert both.chain(group_id) == [0, 1, 2]
        assert fleet.epoch(group_id) == 3
        holders = [d for d in fleet.devices.values() if group_id in d.groups]
        assert len({d.groups[group_id].epoch_authenticator for d in holders}) == 1
    # The split really happened: both instances handled messages and accepted commits.
    assert min(both.handled.values()) > 10, both.handled
    accepted = {n: m.commits.value("accepted") for n, m in both.metrics.items()}
    assert sum(accepted.values()) == 6 and min(accepted.values()) >= 1, accepted
    with fleet.sessions() as s:
        assert audit.verify_chain(s).ok
        # nothing left in flight
        assert s.scalars(select(GroupSlot.job_id).where(GroupSlot.job_id.is_not(None))).all() == []


def test_a_dead_instance_s_commit_request_is_taken_over_after_its_lease(fleet: Fleet) -> None:
    both = TwoInstances(fleet, seed=1)
    admin = fleet.operators["op-admin"]
    created = group_create("g1", "dev-1", "dev-2", "dev-3")
    both.send(admin.command(created, fleet.now))
    assert fleet.final(created.command_id).status is ResultStatus.DONE
    epoch = fleet.epoch("g1")

    # Instance a accepts the rekey, claims the job and dies before its publishes leave
    # (kill -9 between the database commit and the MQTT publish): nobody was asked to commit.
    body = rekey("g1")
    topic, payload = admin.command(body, fleet.now)
    lost: list[Publish] = both.instances["a"].handle(topic, payload, fleet.now)
    assert any("/cmd" in p.topic for p in lost)
    both.alive.discard("a")
    with fleet.sessions() as s:
        job = s.scalar(select(JobRow).where(JobRow.command_id == body.command_id.hex()))
        assert job is not None and job.claimed_by == "a" and job.state == "requested"

    # Before the lease expires instance b leaves the job alone; after it, b takes it over.
    both.tick(fleet.service.settings.commit_request_timeout - 1)
    assert fleet.epoch("g1") == epoch
    both.tick(2)
    assert fleet.epoch("g1") == epoch + 1
    assert both.metrics["b"].jobs.value("taken_over") == 1
    # The operator's result comes from b, which never saw the command.
    assert fleet.final(body.command_id).status is ResultStatus.DONE
    assert fleet.final(body.command_id).epoch == epoch + 1
    assert both.chain("g1") == list(range(epoch + 1))


def test_a_stale_claim_after_the_job_ended_leaves_the_group_free(fleet: Fleet) -> None:
    """Instance a holds an old copy of a job that instance b has meanwhile requested, seen
    committed and ended; a's late claim must change nothing (it once took the freed slot for
    the ended job, and the group's next change waited forever)."""
    both = TwoInstances(fleet, seed=0)
    admin = fleet.operators["op-admin"]
    created = group_create("g1", "dev-1", "dev-2", "dev-3")
    both.send(admin.command(created, fleet.now))
    first = rekey("g1")
    out = both.instances["b"].handle(*admin.command(first, fleet.now), fleet.now)
    # instance a's own view, through its flows (the facade has no entry for a stale copy)
    at_a = Call(both.instances["a"]._env, Clock.reading(fleet.now))
    stale = jobs.group_head(at_a, "g1")
    assert stale is not None and stale.state.value == "requested"
    for topic, payload in fleet.deliver(out):
        both.send((topic, payload))
    assert fleet.final(first.command_id).status is ResultStatus.DONE
    stale.state = JobState.WAITING  # what a's tick does with a job whose deadline passed
    jobs.start(at_a, stale, fleet.now)
    assert at_a.outbox == []  # the claim lost: nothing to send
    with fleet.sessions() as s:
        assert s.get(GroupSlot, "g1").job_id is None  # type: ignore[union-attr]
    second = rekey("g1")
    both.send(admin.command(second, fleet.now))
    assert fleet.final(second.command_id).status is ResultStatus.DONE


def test_a_commit_and_its_welcome_at_different_instances_are_accepted_once(
    fleet: Fleet,
) -> None:
    # Every add is a commit plus a welcome on the committer's report topic; with a random split
    # over many seeds some pairs land on two instances (held in the database, taken by one).
    # A creation adds its other founders in one commit: one pair per seed.
    both = TwoInstances(fleet, seed=0)
    admin = fleet.operators["op-admin"]
    for seed in range(18):
        fleet.now += 100
        both.random = random.Random(seed)
        group_id = f"h{seed}"
        created = group_create(group_id, "dev-1", "dev-2", "dev-3", "dev-4")
        both.send(admin.command(created, fleet.now))
        result = fleet.final(created.command_id)
        assert result.status is ResultStatus.DONE, fleet.results[created.command_id]
        assert both.chain(group_id) == [0]
    with fleet.sessions() as s:
        assert s.scalars(select(HeldMessage)).all() == []


def test_scheduled_attestation_challenges_each_device_once_per_interval(fleet: Fleet) -> None:
    interval = 600
    settings = AttestationSettings(
        policy=policy_from_components(default_components("1.0")), interval=interval
    )
    both = TwoInstances(fleet, seed=3, attestation=settings)
    with fleet.sessions() as s, s.begin():
        # attestable devices (an AK registered) heard from just now
        s.execute(update(Device).values(ak_public=b"ak-public-area", last_seen=fleet.now))

    def challenges(publishes: list[Publish]) -> list[str]:
        found = []
        for p in publishes:
            parts = p.topic.split("/")
            message = open_message(
                p.payload, fleet._service_signer, now=fleet.now, recipients={parts[3]}
            )
            if isinstance(message.body, AttestChallenge):
                found.append(parts[3])
        return found

    sent: list[str] = []
    for step in range(40):  # 2 ticks per second by two instances, 20 s
        fleet.now += step % 2
        for name in ("a", "b") if step % 3 else ("b", "a"):
            sent += challenges(both.instances[name].tick(fleet.now))
    assert sorted(sent) == sorted(fleet.devices), sent
    runs = {n: m.tasks.value("attest.scan") for n, m in both.metrics.items()}
    assert sum(runs.values()) >= 3, runs  # the scan ran several times, by one instance each

    with fleet.sessions() as s, s.begin():
        s.execute(update(Device).values(last_seen=fleet.now + interval))
    fleet.now += interval
    again: list[str] = []
    for _ in range(12):
        fleet.now += 1
        for name in ("a", "b"):
            again += challenges(both.instances[name].tick(fleet.now))
    assert sorted(again) == sorted(fleet.devices), again


def test_one_sender_s_reports_at_two_instances_at_once_keep_its_replay_window(
    fleet: Fleet,
) -> None:
    """Both instances take one device's reports at the same time (threads, one SQLite file): the
    replay row is locked before it is read, so no instance saves a window that lacks the other's
    sequence numbers; afterwards every one of them is refused as a replay. Fewer reports than
    the replay window: one thread may run far ahead of the other, and a seq a whole window below
    the highest is refused by design (``replay.seq-old``), which is not what this test is about."""
    both = TwoInstances(fleet, seed=0)
    device = fleet.devices["dev-1"]
    count = DEFAULT_WINDOW - 2
    reports = [device.report(KeyStateReport(()), fleet.now) for _ in range(count)]

    def run(name: str, items: list[Outgoing]) -> None:
        for topic, payload in items:
            both.instances[name].handle(topic, payload, fleet.now)

    threads = [
        threading.Thread(target=run, args=("a", reports[0::2])),
        threading.Thread(target=run, args=("b", reports[1::2])),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    handled = sum(m.reports.value("keys.report") for m in both.metrics.values())
    assert handled == count
    with fleet.sessions() as s:
        assert store.load_guard(s, "dev-1").highest_seq("dev-1") == count
    for topic, payload in reports:
        both.instances["a"].handle(topic, payload, fleet.now)
    assert sum(m.reports.value("keys.report") for m in both.metrics.values()) == count
    assert both.metrics["a"].rejections.value("replay.duplicate") == count


def test_metrics_exposition_format() -> None:
    metrics = ServiceMetrics()
    metrics.reports.inc("group.ack")
    metrics.reports.inc("group.ack")
    metrics.rejections.inc('odd"check\\id')
    metrics.ack_latency.observe(0.7)
    metrics.ack_latency.observe(45)
    text = metrics.exposition(instance="a")
    lines = text.splitlines()
    assert "# TYPE keyfleet_reports_handled_total counter" in lines
    assert 'keyfleet_reports_handled_total{type="group.ack"} 2' in lines
    assert 'keyfleet_rejections_total{check="odd\\"check\\\\id"} 1' in lines
    assert 'keyfleet_instance_info{instance_id="a"} 1' in lines
    # cumulative buckets, +Inf equals the count, sum of the observations
    assert 'keyfleet_ack_latency_seconds_bucket{le="0.5"} 0' in lines
    assert 'keyfleet_ack_latency_seconds_bucket{le="1"} 1' in lines
    assert 'keyfleet_ack_latency_seconds_bucket{le="60"} 2' in lines
    assert 'keyfleet_ack_latency_seconds_bucket{le="+Inf"} 2' in lines
    assert "keyfleet_ack_latency_seconds_sum 45.7" in lines
    assert "keyfleet_ack_latency_seconds_count 2" in lines
    assert text.endswith("\n")
    with pytest.raises(ValueError):
        metrics.reports.inc()  # the label is required
    with pytest.raises(ValueError):
        metrics.reports.inc("x", amount=-1)


def test_an_instance_whose_copy_of_a_group_is_stale_decodes_the_row_again(fleet: Fleet) -> None:
    """Each instance keeps the public groups it decoded or accepted in memory (``Env.groups``);
    after the other instance accepts a commit the row's state token changed, and the first
    instance's next commit for the group starts from the row's state (its copy brought up to
    it by replaying the commit from the log), not from its stale copy."""
    both = TwoInstances(fleet, seed=1)
    admin = fleet.operators["op-admin"]
    caches = {name: service._env.groups for name, service in both.instances.items()}

    def rekey_at(name: str) -> None:
        both.alive = {name}
        body = rekey("g1")
        both.send(admin.command(body, fleet.now))
        for _ in range(3):
            both.tick(1)
        assert fleet.final(body.command_id).status is ResultStatus.DONE

    both.alive = {"a"}
    create = group_create("g1", "dev-1", "dev-2", "dev-3")
    both.send(admin.command(create, fleet.now))
    both.tick(1)
    assert fleet.final(create.command_id).status is ResultStatus.DONE
    rekey_at("a")
    with fleet.sessions() as s:
        token = Registry(s).group("g1").state_token
    stale = caches["a"].get("g1", token)
    assert stale is not None and stale.epoch == fleet.epoch("g1")  # a's copy is current
    rekey_at("b")  # b decodes the row (its cache is empty), accepts, writes a new token
    assert caches["a"].get("g1", token) is stale  # a still holds its copy for the old token
    misses, replays = caches["a"].misses, caches["a"].replays
    rekey_at("a")  # a's copy is one commit behind the row: a replays b's commit from the log
    assert caches["a"].misses > misses and caches["a"].replays > replays
    assert both.chain("g1") == list(range(fleet.epoch("g1")))
    holders = [d for d in fleet.devices.values() if "g1" in d.groups]
    assert len({d.groups["g1"].epoch_authenticator for d in holders}) == 1
    with fleet.sessions() as s:
        group = Registry(s).group("g1")
    current = caches["a"].get("g1", group.state_token)
    assert current is not None and current.state.group_context() == group.group_context
