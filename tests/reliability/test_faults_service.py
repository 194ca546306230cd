"""Issue 8, faults: the other parts fail while a rekey is in flight.

Real parts (``firmware_sim.lab``): Mosquitto with mutual TLS and persistence, ``keyfleet serve``
on SQLite, three ``firmware-sim device`` processes (swtpm, measured boot, ``keyagent run``). One
lab and one group for the module. Seeded (``RELIABILITY_SEED``): which fault, when, which device.

- **Service killed** (SIGKILL) 0-150 ms after an operator's rekey was sent, then started again.
- **Mosquitto restarted** 0-400 ms after the rekey: half the runs a clean stop (SIGTERM, its
  persistence saved), half a crash (SIGKILL: only what its 1 s autosave wrote survives).
- **A device's swtpm restarted**: killed (SIGKILL) and started again on the same TPM state, then
  a rekey. The TPM lost every loaded object and, being reset, its PCRs: the agent must fail
  clearly (not hang, not answer wrongly); the device is then power-cycled (what a TPM reset
  means on real hardware: the platform resets and measures its boot again) and catches up.

After each fault the rekey must complete by itself (the operator's result ``done``) or end
clearly (``timeout``/``failed``, or no result when the operator's own connection was cut) and
then succeed when the operator retries it with the ``keyfleet`` CLI. Always: the commit log holds
exactly one commit per epoch and no gap, every member acks the final epoch with one epoch
authenticator, data sealed before the fault and after it decrypts on every member, and the audit
chain verifies. Everything is counted in the run summary.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.mqtt import Backoff
from agent.protocol.wire.messages.result import ResultStatus
from firmware_sim.lab import Lab, LabDevice
from firmware_sim.swtpm import pid_alive
from provisioning.operator import OperatorClient
from tests.reliability.conftest import (
    SEED_ENV,
    Summary,
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
from tests.service_deployment import stop_processes

pytestmark = pytest.mark.e2e

LAB_OPTIONS = {"devices": 3, "ack_timeout": 15, "commit_request_timeout": 3}
G = "rel-svc"
MAX_DELAY = 0.4
SERVICE_KILL_DELAY = 0.15  # a rekey is committed ~50-150 ms after the command on this machine
RESULT_WAIT = 10.0


@pytest.fixture(scope="module")
def lab(fleet_lab: Lab) -> Lab:
    created = fleet_lab.op("group", "create", G, "--members", *fleet_lab.device_ids, timeout=120)
    assert created.returncode == 0, str(created)
    return fleet_lab


class Campaign:
    """Seal data, run one fault during a rekey, recover, check; counts by outcome."""

    def __init__(self, lab: Lab, name: str, salt: int) -> None:
        self.lab = lab
        self.name = name
        self.seed = reliability_seed()
        self.rng = random.Random(self.seed * 1000 + salt)
        self.counts: Counter[str] = Counter()
        self.sealed: list[tuple[int, bytes, bytes]] = []
        self.recovery: list[float] = []
        self.start_epoch = group_epoch(lab, G)
        print(f"\n{name}: {SEED_ENV}={self.seed}")

    def seal(self) -> None:
        epoch = group_epoch(self.lab, G)
        plaintext = os.urandom(32)
        self.sealed.append(
            (epoch, plaintext, encrypt(self.rng.choice(self.lab.devices), G, plaintext))
        )

    def finish(
        self, client: OperatorClient | None, command_id: bytes, before: int, fault_at: float
    ) -> int:
        """The rekey's end after the fault: its own final result, or the operator's retry with
        the CLI. Returns the group's epoch once every member agrees on it; the time from the
        fault to that agreement is recorded."""
        result = None
        if client is not None:
            with contextlib.suppress(AssertionError):
                result = await_final(client, command_id, timeout=RESULT_WAIT)
        status = "no result" if result is None else result.status.value
        self.counts[f"rekey result after recovery: {status}"] += 1
        if result is None or result.status is not ResultStatus.DONE:
            if result is not None:
                assert result.status in (ResultStatus.TIMEOUT, ResultStatus.FAILED), result
            retry = self.lab.op("rekey", "--group", G, timeout=120)
            assert retry.returncode == 0, str(retry)
            assert retry.final is not None and retry.final["status"] == "done", str(retry)
            self.counts["retried by the operator CLI: done"] += 1
        epoch = group_epoch(self.lab, G)
        assert epoch in (before + 1, before + 2), (before, epoch)
        wait_agreed(self.lab, G, epoch, timeout=60)
        self.recovery.append(time.monotonic() - fault_at)
        self.check_log()
        return epoch

    def check_log(self) -> None:
        log = commit_epochs(self.lab, G)
        assert log == list(range(log[0], group_epoch(self.lab, G))), log

    def check_data(self) -> int:
        """Every member decrypts everything sealed so far, and fresh data of this epoch."""
        self.seal()
        lost = 0
        for _epoch, plaintext, blob in self.sealed:
            for device in self.lab.devices:
                if decrypt(device, G, blob) != plaintext:
                    lost += 1
        return lost

    def record(self, summary: Summary, runs: int, **extra: Any) -> None:
        lost = self.check_data()
        assert lost == 0
        verify = self.lab.keyfleet("audit", "verify", "--config", str(self.lab.service_config))
        assert verify.returncode == 0, str(verify)
        commits = commit_epochs(self.lab, G)
        recovery = sorted(self.recovery)
        summary.record(
            self.name,
            {
                "seed": self.seed,
                "runs": runs,
                "epochs": [self.start_epoch, group_epoch(self.lab, G)],
                "commit_log_epochs_contiguous_one_each": [commits[0], commits[-1]],
                "lost_commits_or_duplicates": 0,
                "sealed_blobs_checked_on_every_member": len(self.sealed),
                "lost_keys": lost,
                "recovery_seconds_median": round(recovery[len(recovery) // 2], 2),
                "recovery_seconds_max": round(recovery[-1], 2),
                **extra,
                **dict(sorted(self.counts.items())),
            },
        )


# ---- the service killed ---------------------------------------------------------------------


def service_kill_campaign(lab: Lab, summary: Summary, name: str, runs: int) -> None:
    campaign = Campaign(lab, name, 1)
    for _ in range(runs):
        before = group_epoch(lab, G)
        wait_agreed(lab, G, before)
        campaign.seal()
        delay = campaign.rng.uniform(0.0, SERVICE_KILL_DELAY)
        with OperatorClient(operator_settings(lab)) as client:
            command = send_rekey(client, G)
            time.sleep(delay)
            fault_at = time.monotonic()
            lab.stop_service(kill=True)
            committed = group_epoch(lab, G) > before
            campaign.counts[f"killed {'after' if committed else 'before'} the commit"] += 1
            lab.start_service()
            campaign.finish(client, command, before, fault_at)
    campaign.record(summary, runs, kill="SIGKILL of keyfleet serve 0-150 ms after op.rekey")


def test_service_killed_during_rekey_quick(lab: Lab, summary: Summary) -> None:
    service_kill_campaign(lab, summary, "service_sigkill_quick", 2)


@pytest.mark.long
def test_service_killed_during_rekey(lab: Lab, summary: Summary) -> None:
    service_kill_campaign(lab, summary, "service_sigkill_long", 10)


# ---- Mosquitto restarted --------------------------------------------------------------------


def all_connected(lab: Lab, timeout: float = Backoff.maximum + 60.0) -> None:
    """Every agent is connected again. The bound is the agents' longest reconnect backoff plus a
    minute: a broker that takes several seconds to come back (a loaded machine) pushes their
    exponential backoff (0.5, 1, 2, ... s) past a minute in total before the next try."""
    deadline = time.monotonic() + timeout
    while not all((d.status() or {}).get("mqtt_connected") for d in lab.devices):
        assert time.monotonic() < deadline, "agents did not reconnect to the broker"
        time.sleep(0.1)


def broker_restart_campaign(lab: Lab, summary: Summary, name: str, runs: int) -> None:
    assert lab.broker is not None
    campaign = Campaign(lab, name, 2)
    for _ in range(runs):
        before = group_epoch(lab, G)
        wait_agreed(lab, G, before)
        all_connected(lab)
        campaign.seal()
        crash = campaign.rng.random() < 0.5
        delay = campaign.rng.uniform(0.0, MAX_DELAY)
        client = OperatorClient(operator_settings(lab))
        try:
            command = send_rekey(client, G)
            time.sleep(delay)
            fault_at = time.monotonic()
            lab.broker.restart(crash=crash)
            campaign.counts[f"broker {'SIGKILL' if crash else 'SIGTERM'} and restart"] += 1
            all_connected(lab)
            campaign.finish(client, command, before, fault_at)
        finally:
            client.close()
    campaign.record(summary, runs, fault="Mosquitto restarted 0-400 ms after op.rekey")


def test_broker_restarted_during_rekey_quick(lab: Lab, summary: Summary) -> None:
    broker_restart_campaign(lab, summary, "broker_restart_quick", 2)


@pytest.mark.long
def test_broker_restarted_during_rekey(lab: Lab, summary: Summary) -> None:
    broker_restart_campaign(lab, summary, "broker_restart_long", 6)


# ---- a device's swtpm restarted -------------------------------------------------------------


@pytest.fixture
def tpm_restarts() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    stop_processes(started, timeout=10)


def restart_swtpm(device: LabDevice, started: list[subprocess.Popen[bytes]]) -> None:
    """SIGKILL the device's swtpm and start the same command on the same TPM state."""
    pid = device.swtpm_pid
    assert pid is not None
    command = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_alive(pid):
        assert time.monotonic() < deadline, "swtpm did not die"
        time.sleep(0.01)
    for arg in command:
        if arg.startswith(b"type=unixio,path="):
            with contextlib.suppress(FileNotFoundError):
                Path(arg.split(b"=", 2)[2].decode()).unlink()
    log = device.state_dir / "tpm" / "swtpm-restarted.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [a.decode() for a in command],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    started.append(process)
    device.info["swtpm_pid"] = process.pid
    time.sleep(0.3)
    assert process.poll() is None, log.read_text(errors="replace")


def swtpm_restart_campaign(
    lab: Lab, summary: Summary, name: str, runs: int, started: list[subprocess.Popen[bytes]]
) -> None:
    campaign = Campaign(lab, name, 3)
    for _ in range(runs):
        before = group_epoch(lab, G)
        wait_agreed(lab, G, before)
        campaign.seal()
        victim = campaign.rng.choice(lab.devices)
        agent_pid = victim.agent_pid
        assert agent_pid is not None
        offset = victim.agent_log.stat().st_size
        fault_at = time.monotonic()
        restart_swtpm(victim, started)
        with OperatorClient(operator_settings(lab)) as client:
            command = send_rekey(client, G)
            deadline = time.monotonic() + 30
            while pid_alive(agent_pid):
                assert time.monotonic() < deadline, (
                    "the agent neither recovered nor stopped after its TPM was reset:\n"
                    + victim.agent_log.read_text(errors="replace")[offset:][-3000:]
                )
                time.sleep(0.05)
            tail = victim.agent_log.read_text(errors="replace")[offset:]
            assert "keyagent stopping on an error it cannot handle" in tail, tail[-3000:]
            assert "TPM" in tail or "tpm" in tail, tail[-3000:]
            campaign.counts["agent stopped clearly (TPM error logged)"] += 1
            lab.reboot(victim)  # power cycle: fresh swtpm, measured boot, agent
            campaign.counts["device power-cycled"] += 1
            campaign.finish(client, command, before, fault_at)
    campaign.record(summary, runs, fault="swtpm SIGKILLed and restarted on its state")


def test_swtpm_restarted_under_the_agent(
    lab: Lab, summary: Summary, tpm_restarts: list[subprocess.Popen[bytes]]
) -> None:
    swtpm_restart_campaign(lab, summary, "swtpm_restart", 2, tpm_restarts)
