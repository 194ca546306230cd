"""Issue 8, faults: the disk fills up while ``keyagent`` writes its state.

Real parts (``firmware_sim.lab``): Mosquitto, ``keyfleet serve``, two ``firmware-sim device``
processes with swtpm and ``keyagent run``. The victim's state directory (``[state] dir``: state
file, sealed state key, leaf key blobs, status) is moved onto its own small tmpfs (``mount -t
tmpfs -o size=2m``; the test runs as root and fails if it cannot mount), which the test then
fills to the last byte with a filler file. Then a rekey. Either the other member commits and the
victim must save the relayed commit's epoch in its state file, or the victim is asked to commit
(it is the member the service heard last) and must first store a new leaf key blob. Each round
makes one of the two writes fail with ENOSPC:

1. (the state file write fails) space comes back while the agent runs: the agent logged the
   failure with its reason, kept running, published nothing and left the state file byte for
   byte as it was (no temp file left behind); once the filler is deleted it saves, answers and
   the group agrees on the new epoch without a restart;
2. (the leaf blob write fails) the agent is killed (SIGKILL) while the disk is full: a restart
   while the disk is still full fails clearly (exit 1, "No space left on device") and writes
   nothing; once space is back it starts from the very state file the disk-full episode left
   (same generation), catches up and the group agrees.

In both rounds the victim still decrypts data of the epochs before and after the episode.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware_sim.lab import Lab, LabDevice
from provisioning.operator import OperatorClient
from tests.reliability.conftest import (
    AgentSupervisor,
    Summary,
    await_final,
    decrypt,
    encrypt,
    group_epoch,
    operator_settings,
    send_rekey,
    wait_agreed,
)

pytestmark = pytest.mark.e2e

LAB_OPTIONS = {"devices": 2, "ack_timeout": 60, "commit_request_timeout": 3}
G = "rel-disk"
TMPFS_SIZE = "2m"
STATE_FILES = ("agent.state", "state-key.pem", "status.json")
STATE_DIRS = ("leaves", "app-seal")
ERROR_TEXT = "the agent's state could not be saved"


def fill(directory: Path) -> int:
    """Fill the file system of ``directory`` to the last byte; returns the bytes written."""
    written = 0
    with open(directory / "filler", "wb", buffering=0) as out:
        for size in (1 << 16, 1 << 12, 1 << 9, 1):
            chunk = b"\0" * size
            while True:
                try:
                    written += out.write(chunk) or 0
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    with contextlib.suppress(OSError):
        os.sync()
    return written


def state_digest(directory: Path) -> tuple[str, int]:
    """SHA-256 and generation (header field) of the state file."""
    data = (directory / "agent.state").read_bytes()
    (generation,) = struct.unpack(">Q", data[5:13])
    return hashlib.sha256(data).hexdigest(), generation


def wait_log(path: Path, offset: int, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        tail = path.read_text(errors="replace")[offset:]
        if text in tail:
            return tail
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{tail[-3000:]}"
        time.sleep(0.05)


def last_seen(lab: Lab, device: LabDevice) -> int:
    return lab.registry(lambda r: r.device(device.id).last_seen or -1)


def attested(lab: Lab, device: LabDevice) -> bool:
    return lab.registry(lambda r: r.device(device.id).attested_at is not None)


def restart_heard_last(
    lab: Lab, supervisor: AgentSupervisor, device: LabDevice, rival: LabDevice
) -> None:
    """Restart ``device``'s agent so that the service asks it (not ``rival``) for the next
    commit. The service asks the member it heard from last, with whole seconds as the clock
    and ties broken by device id: the restart's keys.report must land in a later second than
    anything ``rival`` sent (the first scheduled attestation can answer in the same second), or
    the choice is a coin toss (it once failed CI that way). So: restart until it does."""
    deadline = time.monotonic() + 30  # the service's first (scheduled) attestation of both
    while not (attested(lab, device) and attested(lab, rival)):
        assert time.monotonic() < deadline, "the service did not attest both devices"
        time.sleep(0.05)
    for _ in range(5):
        rival_seen = last_seen(lab, rival)
        lab.stop_agent(device)
        while time.time() < rival_seen + 1:
            time.sleep(0.05)
        supervisor.start(device)
        deadline = time.monotonic() + 10
        while last_seen(lab, device) < rival_seen + 1:
            assert time.monotonic() < deadline, f"no keys.report from {device.id} after a restart"
            time.sleep(0.05)
        if last_seen(lab, device) > last_seen(lab, rival):
            return
    raise AssertionError(f"the service did not hear {device.id} after {rival.id} in 5 restarts")


@pytest.fixture(scope="module")
def lab(fleet_lab: Lab) -> Lab:
    return fleet_lab


@pytest.fixture(scope="module")
def small_disk(lab: Lab, supervisor: AgentSupervisor) -> Iterator[Path]:
    """The victim's state directory on its own 2 MiB tmpfs (config rewritten, files moved)."""
    victim = lab.devices[1]
    mount = lab.workdir / "victim-state"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the disk-full test: {done.stderr}", pytrace=False)
    try:
        lab.stop_agent(victim)
        for name in STATE_FILES:
            if (victim.state_dir / name).exists():
                shutil.move(victim.state_dir / name, mount / name)
        for name in STATE_DIRS:
            if (victim.state_dir / name).exists():
                shutil.move(victim.state_dir / name, mount / name)
        # the lab reads the status where it always was
        (victim.state_dir / "status.json").symlink_to(mount / "status.json")
        text = victim.agent_config.read_text()
        text, count = re.subn(r'(\[state\]\s*\ndir = )"[^"\n]*"', rf'\1"{mount}"', text)
        assert count == 1, text
        victim.agent_config.write_text(text)
        supervisor.start(victim)
        yield mount
    finally:
        supervisor.close()
        with contextlib.suppress(FileNotFoundError):
            (mount / "filler").unlink()
        undone = subprocess.run(["umount", str(mount)], capture_output=True, text=True, check=False)
        assert undone.returncode == 0, f"umount {mount}: {undone.stderr}"


def test_disk_full_while_writing_agent_state(
    lab: Lab, supervisor: AgentSupervisor, small_disk: Path, summary: Summary
) -> None:
    victim, other = lab.devices[1], lab.devices[0]
    created = lab.op("group", "create", G, "--members", *lab.device_ids, timeout=120)
    assert created.returncode == 0, str(created)
    lab.wait_settled(G, timeout=60)  # the joiners' first self-updates (docs/treekem.md)
    counts: dict[str, object] = {"tmpfs_size": TMPFS_SIZE}
    with OperatorClient(operator_settings(lab)) as client:
        epoch = group_epoch(lab, G)
        wait_agreed(lab, G, epoch)
        before = os.urandom(32), b""
        before = before[0], encrypt(other, G, before[0])

        # -- round 1: space comes back while the agent runs --------------------------------
        # The other member restarted is the one the service heard last: it commits, and the
        # victim has to save the relayed commit's new epoch in its state file.
        restart_heard_last(lab, supervisor, other, victim)
        offset = victim.agent_log.stat().st_size
        counts["round1_filled_bytes"] = fill(small_disk)
        digest = state_digest(small_disk)
        command = send_rekey(client, G)
        log = wait_log(victim.agent_log, offset, ERROR_TEXT, 30)
        assert f"could not write {small_disk}/agent.state: No space left on device" in log, log
        deadline = time.monotonic() + 30  # the other member commits (the victim could not)
        while lab.ack_status(G).epoch != epoch + 1 or other.epoch(G) != epoch + 1:
            assert time.monotonic() < deadline, "the other member did not commit and ack"
            time.sleep(0.1)
        time.sleep(1.5)  # a few retries of the victim
        assert victim.agent_running, "the agent died on a full disk"
        assert state_digest(small_disk) == digest, "the state file changed on a full disk"
        assert not [p for p in small_disk.iterdir() if p.name.endswith(".tmp")]
        assert victim.epoch(G) == epoch
        assert group_epoch(lab, G) == epoch + 1
        stragglers = lab.ack_status(G).stragglers
        assert stragglers == (victim.id,), stragglers
        freed = time.monotonic()
        (small_disk / "filler").unlink()
        wait_agreed(lab, G, epoch + 1, timeout=60)
        counts["round1_recovery_seconds_after_space_back"] = round(time.monotonic() - freed, 2)
        log = wait_log(victim.agent_log, offset, "saved again", 10)
        result = await_final(client, command, timeout=90)
        counts["round1_rekey_result"] = result.status.value
        counts["round1_agent_restarts"] = 0
        new_digest = state_digest(small_disk)
        assert new_digest[1] > digest[1]
        assert decrypt(victim, G, before[1]) == before[0]
        epoch += 1
        middle = os.urandom(32)
        middle_blob = encrypt(other, G, middle)
        assert decrypt(victim, G, middle_blob) == middle

        # -- round 2: killed while the disk is full ------------------------------------------
        # Now the victim restarted is the member heard last: asked to commit, it has to store
        # a new leaf key blob first.
        restart_heard_last(lab, supervisor, victim, other)
        offset = victim.agent_log.stat().st_size
        counts["round2_filled_bytes"] = fill(small_disk)
        digest = state_digest(small_disk)
        command = send_rekey(client, G)
        # (the agent may have had a save of its own to make first: then the leaf blob's
        # failure is logged as the next reason)
        log = wait_log(victim.agent_log, offset, f"could not write {small_disk}/leaves/", 30)
        assert ERROR_TEXT in log, log[-3000:]
        deadline = time.monotonic() + 30
        while lab.ack_status(G).epoch != epoch + 1 or other.epoch(G) != epoch + 1:
            assert time.monotonic() < deadline, "the other member did not commit and ack"
            time.sleep(0.1)
        supervisor.kill(victim)
        assert state_digest(small_disk) == digest
        assert not [p for p in small_disk.iterdir() if p.name.endswith(".tmp")]
        lab.flush_tpm(victim)
        refused = subprocess.run(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(victim.agent_config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert refused.returncode == 1, refused.stderr[-3000:]
        assert "keyagent cannot start" in refused.stderr, refused.stderr[-3000:]
        assert "No space left on device" in refused.stderr, refused.stderr[-3000:]
        assert state_digest(small_disk) == digest, "a failed start changed the state file"
        (small_disk / "filler").unlink()
        restart = supervisor.start(victim)
        wait_agreed(lab, G, epoch + 1, timeout=60)
        resumed = victim.agent_log.read_text(errors="replace")[restart:]
        assert f"state resumed: generation {digest[1]}," in resumed, resumed[-3000:]
        result = await_final(client, command, timeout=90)
        counts["round2_rekey_result"] = result.status.value
        counts["round2_resumed_generation"] = digest[1]
        for plaintext, blob in ((before[0], before[1]), (middle, middle_blob)):
            assert decrypt(victim, G, blob) == plaintext
        after = os.urandom(32)
        assert decrypt(victim, G, encrypt(other, G, after)) == after
        assert decrypt(other, G, encrypt(victim, G, after)) == after
    counts["state_file_changed_while_full"] = 0
    counts["lost_keys"] = 0
    summary.record("agent_disk_full", counts)
