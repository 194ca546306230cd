"""Issue 8, faults: ``keyagent`` killed with SIGKILL while it applies a commit, many times,
seeded and reproducible (``RELIABILITY_SEED``; ``RELIABILITY_KILL_RUNS`` overrides the long
test's 100 runs).

Real parts (``firmware_sim.lab``): Mosquitto with mutual TLS and the product ACL, ``keyfleet
serve`` on SQLite, three ``firmware-sim device`` processes each with its swtpm, measured boot and
``keyagent run``. One lab and one group for every run, so a run costs a rekey and an agent
restart (~1-2 s), not a lab.

One run: a victim among the members and a kill mode are drawn from the seeded generator, data is
sealed under the current epoch on another member, a rekey is sent (operator client, in process),
and the victim dies by SIGKILL

- at one of the daemon's fault points (``agent.daemon.FaultPoints``): ``before-persist``
  (handled in memory only), ``after-persist`` (state saved, nothing published), ``after-publish``
  (ack published, the relay not acknowledged to the broker); the agent was restarted with
  ``KEYAGENT_TEST_KILL_AT`` armed for the next ``group.commit`` it handles (restarted, it is the
  member the service heard last and is asked to commit; half the time a first rekey goes
  through and the fault fires at the second commit, which another member may have made); or
- at a random moment: 0-30 ms after the service's relay of the commit appeared on the broker
  (seen by a wiretap), which lands before, during (TPM ECDH, state write, ack) or after the
  victim's handling of it.

Then it is restarted the way systemd restarts it (no reboot; the dead process's TPM objects
flushed, as /dev/tpmrm0 does). Each run must end with: the agent running and connected, its
state file loaded at start ("state resumed"), the group at exactly one epoch more with one commit
for it in the log, every member (the victim too) acked with one epoch authenticator, the
victim's status at that epoch, and no lost key: the victim decrypts the data sealed in the
epoch before the kill and new data of the new epoch, and its data reaches the others. At the
end, every member decrypts the data of every epoch the test made (the grace period is a day).
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from typing import Any

import pytest

from agent.mqtt import ReceivedMessage
from agent.protocol.wire.messages.result import ResultStatus
from firmware_sim.lab import Lab, LabDevice
from provisioning.operator import OperatorClient
from tests.reliability.conftest import (
    KILL_ENV,
    SEED_ENV,
    AgentSupervisor,
    Summary,
    Wiretap,
    await_final,
    commit_epochs,
    decrypt,
    encrypt,
    group_epoch,
    operator_settings,
    reliability_seed,
    send_rekey,
    wait_agreed,
)

pytestmark = pytest.mark.e2e

LAB_OPTIONS = {"devices": 3, "ack_timeout": 20, "commit_request_timeout": 3}
G = "rel-kill"
FAULT_POINTS = ("before-persist", "after-persist", "after-publish")
RANDOM_MODE = "relay+random-delay"
MODES = (*FAULT_POINTS, RANDOM_MODE)
MAX_DELAY = 0.030
RUNS_ENV = "RELIABILITY_KILL_RUNS"


class KillCampaign:
    """The state that outlives one run: the group, the data sealed in each epoch, the counts."""

    def __init__(self, lab: Lab, supervisor: AgentSupervisor, seed: int) -> None:
        self.lab = lab
        self.supervisor = supervisor
        self.rng = random.Random(seed)
        self.seed = seed
        self.sealed: dict[int, tuple[bytes, bytes]] = {}
        self.counts: Counter[str] = Counter()
        self.durations: list[float] = []
        self.replayed = 0

    def seal_current(self, device: LabDevice) -> int:
        epoch = group_epoch(self.lab, G)
        if epoch not in self.sealed:
            plaintext = os.urandom(32)
            self.sealed[epoch] = (plaintext, encrypt(device, G, plaintext))
        return epoch

    def run(self, index: int, client: OperatorClient, tap: Wiretap) -> None:
        lab, rng = self.lab, self.rng
        started = time.monotonic()
        victim = rng.choice(lab.devices)
        others = [d for d in lab.devices if d is not victim]
        mode = rng.choice(MODES)
        delay = rng.uniform(0.0, MAX_DELAY) if mode == RANDOM_MODE else 0.0
        label = f"run {index} (seed {self.seed}): {mode} on {victim.name}"
        epoch = self.seal_current(rng.choice(others))

        if mode in FAULT_POINTS:
            # Restarted, the victim is the member the service heard last, so it is asked to
            # commit: half the time a first rekey is let through (the fault fires at the
            # second commit) so that someone else may commit the one that kills it.
            primed = rng.random() < 0.5
            lab.stop_agent(victim)  # SIGTERM: a clean stop, then armed for this run
            count = 2 if primed else 1
            self.supervisor.start(victim, env={KILL_ENV: f"{mode}:group.commit:{count}"})
            if primed:
                first = await_final(client, send_rekey(client, G), timeout=60)
                assert first.status is ResultStatus.DONE, (label, first)
                wait_agreed(lab, G, epoch + 1)
                epoch = self.seal_current(rng.choice(others))
                self.counts["primed by one rekey first"] += 1
        tap.drain()
        command_id = send_rekey(client, G)
        if mode in FAULT_POINTS:
            self.supervisor.wait_dead(victim, 30)
            assert f"SIGKILL at {mode} of group.commit" in victim.agent_log.read_text(), label
        else:
            relay = tap.next(30, lambda m: m.topic == f"kf/v1/grp/{G}/commit")
            time.sleep(delay)
            self.supervisor.kill(victim)
            report = f"kf/v1/dev/{victim.id}/report"
            seen: list[ReceivedMessage] = []
            while (message := tap.client.get(timeout=0)) is not None:
                seen.append(message)
            after = "answered" if any(m.topic == report for m in seen) else "silent"
            self.counts[f"random kill: victim {after} after the relay"] += 1
            assert relay is not None
        self.counts[f"mode {mode}"] += 1

        offset = self.supervisor.start(victim)
        result = await_final(client, command_id, timeout=90)
        self.counts[f"rekey {result.status.value}"] += 1
        assert result.status in (ResultStatus.DONE, ResultStatus.TIMEOUT), (label, result)
        wait_agreed(lab, G, epoch + 1, timeout=60)
        restarted = victim.agent_log.read_text(errors="replace")[offset:]
        assert "state resumed: generation" in restarted, (label, restarted[-2000:])
        status = victim.status() or {}
        self.replayed += int(status.get("rejections", {}).get("replay.duplicate", 0))
        log = commit_epochs(lab, G)
        assert log == list(range(log[0], epoch + 1)), (label, log)  # contiguous, one per epoch
        committer = lab.registry(lambda r: r.commits_from(G, epoch)[0].committer)
        if committer == victim.id:
            self.counts["victim was the committer"] += 1

        # no lost key: the epoch before the kill and the new one, both ways
        plaintext, blob = self.sealed[epoch]
        assert decrypt(victim, G, blob) == plaintext, label
        new_epoch = self.seal_current(rng.choice(others))
        assert new_epoch == epoch + 1
        plaintext, blob = self.sealed[new_epoch]
        assert decrypt(victim, G, blob) == plaintext, label
        mine = os.urandom(24)
        sealed = encrypt(victim, G, mine)
        for other in others:
            assert decrypt(other, G, sealed) == mine, label
        self.durations.append(time.monotonic() - started)


def campaign(lab: Lab, supervisor: AgentSupervisor, summary: Summary, name: str, runs: int) -> None:
    seed = reliability_seed()
    print(f"\n{name}: {runs} runs, {SEED_ENV}={seed}")
    if not any(row["group_id"] == G for row in lab.groups()):
        created = lab.op("group", "create", G, "--members", *lab.device_ids, timeout=120)
        assert created.returncode == 0, str(created)
    lab.wait_settled(G, timeout=60)  # the joiners' first self-updates (docs/treekem.md)
    start_epoch = group_epoch(lab, G)
    wait_agreed(lab, G, start_epoch)
    state = KillCampaign(lab, supervisor, seed)
    starts_before = supervisor.starts
    tap = Wiretap(lab, [f"kf/v1/grp/{G}/commit", "kf/v1/dev/+/report"], f"rel-tap-{name}")
    try:
        with OperatorClient(operator_settings(lab)) as client:
            for index in range(runs):
                state.run(index, client, tap)
    finally:
        tap.close()
    final_epoch = group_epoch(lab, G)
    assert final_epoch == start_epoch + runs + state.counts["primed by one rekey first"]
    # every member still decrypts the data of every epoch of the campaign
    lost = 0
    for _epoch, (plaintext, blob) in sorted(state.sealed.items()):
        for device in lab.devices:
            if decrypt(device, G, blob) != plaintext:
                lost += 1
    assert lost == 0
    verify = lab.keyfleet("audit", "verify", "--config", str(lab.service_config))
    assert verify.returncode == 0, str(verify)
    durations = sorted(state.durations)
    counts: dict[str, Any] = {
        "seed": seed,
        "runs": runs,
        "group_members": len(lab.devices),
        "epochs": [start_epoch, final_epoch],
        "agent_restarts": supervisor.starts - starts_before,
        "redeliveries_recognised_replay_duplicate": state.replayed,
        "epochs_decrypted_at_end_per_member": len(state.sealed),
        "lost_keys": lost,
        "corrupt_state_files": 0,  # every restart resumed its state (asserted per run)
        "forks_or_duplicate_commits": 0,  # one commit per epoch, one authenticator (asserted)
        "run_seconds_median": round(durations[len(durations) // 2], 2),
        "run_seconds_max": round(durations[-1], 2),
        **dict(sorted(state.counts.items())),
    }
    summary.record(name, counts)


@pytest.fixture(scope="module")
def lab(fleet_lab: Lab) -> Lab:
    return fleet_lab


def test_agent_sigkill_while_applying_commits_quick(
    lab: Lab, supervisor: AgentSupervisor, summary: Summary
) -> None:
    campaign(lab, supervisor, summary, "agent_sigkill_quick", 8)


@pytest.mark.long
def test_agent_sigkill_while_applying_commits_100_runs(
    lab: Lab, supervisor: AgentSupervisor, summary: Summary
) -> None:
    runs = int(os.environ.get(RUNS_ENV, "100"))
    campaign(lab, supervisor, summary, "agent_sigkill_long", runs)
