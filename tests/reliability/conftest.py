"""Shared pieces of the reliability suite (faults and load): the run summary every test writes
its counts into, the seed, an agent supervisor that restarts a killed ``keyagent`` the way
systemd does (``Restart=on-failure``), an operator client and the checks that a group agrees.

The summary: each test calls ``summary.record(name, {...})`` with what it counted (runs, kill
points, lost keys, times); at the end of the session the whole summary is written as JSON to
``<pytest basetemp>/reliability-summary.json`` (and to ``$RELIABILITY_SUMMARY`` if set) and
printed in the terminal summary. docs/reliability.md takes its numbers from such a run.

Seeds: ``RELIABILITY_SEED`` (default 8, the issue's number) seeds every random choice of the
suite; tests print the seed they used, so a red run can be replayed exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.mqtt import ReceivedMessage
from agent.protocol.wire.messages.operator import Rekey
from agent.protocol.wire.messages.result import OperatorResult
from firmware_sim.lab import Lab, LabDevice
from firmware_sim.swtpm import pid_alive
from provisioning.operator import FINAL, OperatorClient, OperatorSettings
from tests.fixtures.fleet import service_tap
from tests.service_deployment import stop_processes

SEED_ENV = "RELIABILITY_SEED"
DEFAULT_SEED = 8
SUMMARY_ENV = "RELIABILITY_SUMMARY"
KILL_ENV = "KEYAGENT_TEST_KILL_AT"

_SUMMARY: dict[str, Any] = {}


def reliability_seed() -> int:
    """The suite's seed: ``$RELIABILITY_SEED`` or 8."""
    return int(os.environ.get(SEED_ENV, DEFAULT_SEED))


class Summary:
    """What the tests counted, by test name (JSON-able values only)."""

    def record(self, name: str, counts: Mapping[str, Any]) -> None:
        _SUMMARY[name] = dict(counts)
        print(f"\nreliability summary {name}: {json.dumps(_SUMMARY[name], sort_keys=True)}")


@pytest.fixture(scope="session")
def summary() -> Summary:
    return Summary()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _SUMMARY:
        return
    text = json.dumps(_SUMMARY, indent=2, sort_keys=True)
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None:
        (factory.getbasetemp() / "reliability-summary.json").write_text(text)
    target = os.environ.get(SUMMARY_ENV)
    if target:
        Path(target).write_text(text)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _SUMMARY:
        terminalreporter.write_line("reliability summary (JSON):")
        terminalreporter.write_line(json.dumps(_SUMMARY, indent=2, sort_keys=True))


# ---- agents restarted like systemd restarts them ------------------------------------------------


class AgentSupervisor:
    """Restarts a device's ``keyagent run`` after it died, without rebooting the device: what
    systemd's ``Restart=on-failure`` does on a real device. Before each start the TPM objects the
    dead process left loaded are flushed (what ``/dev/tpmrm0`` does when a process exits; swtpm
    has no resource manager). The new pid is written into the lab's view of the device, so the
    lab stops it by PID at teardown like the agent it replaced."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.starts = 0

    def kill(self, device: LabDevice) -> None:
        """SIGKILL the device's agent and wait until it is gone."""
        pid = device.agent_pid
        assert pid is not None, device.name
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.wait_dead(device, 10)

    def wait_dead(self, device: LabDevice, timeout: float) -> None:
        pid = device.agent_pid
        assert pid is not None
        process = self.processes.get(device.name)
        deadline = time.monotonic() + timeout
        while pid_alive(pid):
            if process is not None and process.pid == pid:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(0.02)
                    continue
            assert time.monotonic() < deadline, f"agent of {device.name} did not die"
            time.sleep(0.01)

    def start(
        self, device: LabDevice, env: Mapping[str, str] | None = None, timeout: float = 60.0
    ) -> int:
        """Start the agent again (its output appended to the device's agent.log); returns the
        byte offset in agent.log where this start's output begins, once it is connected."""
        assert not device.agent_running, f"agent of {device.name} still runs"
        old = self.processes.pop(device.name, None)
        if old is not None:
            old.wait(10)
        self.lab.flush_tpm(device)
        environment = {
            k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))
        }
        environment.pop(KILL_ENV, None)
        environment.update(env or {})
        offset = device.agent_log.stat().st_size if device.agent_log.exists() else 0
        with device.agent_log.open("ab") as out:
            out.write(b"---- reliability: agent restarted by the supervisor ----\n")
            process = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(device.agent_config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,
            )
        self.processes[device.name] = process
        device.info["agent_pid"] = process.pid
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:
            status = device.status()
            if status and status.get("pid") == process.pid and status.get("mqtt_connected"):
                return offset
            assert process.poll() is None, (
                f"agent of {device.name} exited with {process.returncode}:\n"
                + device.agent_log.read_text(errors="replace")[offset:][-3000:]
            )
            assert time.monotonic() < deadline, f"agent of {device.name} did not connect"
            time.sleep(0.02)

    def close(self) -> None:
        stop_processes(self.processes.values())
        self.processes.clear()


@pytest.fixture(scope="module")
def supervisor(fleet_lab: Lab) -> Iterator[AgentSupervisor]:
    keeper = AgentSupervisor(fleet_lab)
    try:
        yield keeper
    finally:
        keeper.close()


# ---- operators and the group's state --------------------------------------------------------


def operator_settings(lab: Lab, operator: str = "op-ops") -> OperatorSettings:
    assert lab.pki is not None and lab.broker is not None
    identity = lab.pki.operators[operator]
    assert lab.pki.signing_cert is not None
    return OperatorSettings(
        host=lab.broker.host,
        port=lab.broker.port,
        ca=lab.pki.tls_ca,
        cert=identity.cert,
        key=identity.key,
        # the service signs with a key of its own, never its TLS key
        service_cert=lab.pki.signing_cert,
    )


def await_final(client: OperatorClient, command_id: bytes, timeout: float) -> OperatorResult:
    """The final result (done, failed, rejected, timeout) of one command; AssertionError if none
    came within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = client.next_result(max(0.0, deadline - time.monotonic()))
        assert result is not None, f"no final result within {timeout:g} s"
        if result.command_id == command_id and result.status in FINAL:
            return result


def send_rekey(client: OperatorClient, group: str) -> bytes:
    body = Rekey(client.new_command_id(), group)
    client.send(body)
    return body.command_id


def group_epoch(lab: Lab, group: str) -> int:
    return lab.registry(lambda r: r.group(group).epoch)


def wait_agreed(
    lab: Lab,
    group: str,
    epoch: int,
    devices: Sequence[LabDevice] | None = None,
    timeout: float = 60.0,
) -> float:
    """Until the registry's group is at ``epoch``, every member acked it with one epoch
    authenticator, and every agent's status file shows it. Returns the seconds waited."""
    members = list(lab.devices if devices is None else devices)
    start = time.monotonic()
    deadline = start + timeout
    while True:
        status = lab.ack_status(group)
        if (
            status.epoch == epoch
            and status.agreed
            and len(status.by_authenticator) == 1
            and all(d.epoch(group) == epoch for d in members)
        ):
            assert sorted(status.members) == sorted(d.id for d in members), status
            return time.monotonic() - start
        assert time.monotonic() < deadline, (
            f"group {group} not agreed at epoch {epoch}: {status}; agents: "
            f"{ {d.name: d.epoch(group) for d in members} }"
        )
        time.sleep(0.05)


def commit_epochs(lab: Lab, group: str) -> list[int]:
    """The epochs of every commit still in the log, in order: must be contiguous, one each."""

    def work(registry: Any) -> list[int]:
        oldest = registry.oldest_retained_epoch(group)
        return [] if oldest is None else [c.epoch for c in registry.commits_from(group, oldest)]

    return lab.registry(work)


def encrypt(device: LabDevice, group: str, plaintext: bytes) -> bytes:
    with device.api() as api:
        return api.encrypt(group, plaintext)


def decrypt(device: LabDevice, group: str, blob: bytes) -> bytes:
    with device.api() as api:
        return api.decrypt(group, blob)


class Wiretap:
    """The broker's view of some topics, with the service's identity under another client id
    (no shared subscription): sees every relay on ``grp/G/commit`` as the members do."""

    def __init__(self, lab: Lab, topics: Sequence[str], client_id: str) -> None:
        self.client = service_tap(lab, client_id)
        for topic in topics:
            self.client.subscribe(topic)

    def drain(self) -> None:
        while self.client.get(timeout=0) is not None:
            pass

    def next(self, timeout: float, match: Callable[[ReceivedMessage], bool]) -> ReceivedMessage:
        deadline = time.monotonic() + timeout
        while True:
            message = self.client.get(timeout=max(0.0, deadline - time.monotonic()))
            assert message is not None, f"nothing seen on the wire within {timeout:g} s"
            if match(message):
                return message

    def close(self) -> None:
        self.client.close()


__all__ = [
    "AgentSupervisor",
    "Summary",
    "Wiretap",
    "await_final",
    "commit_epochs",
    "decrypt",
    "encrypt",
    "group_epoch",
    "operator_settings",
    "reliability_seed",
    "send_rekey",
    "wait_agreed",
]
