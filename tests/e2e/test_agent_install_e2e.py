"""``release.install`` at a real ``keyagent run`` (real swtpm, real Mosquitto; the harness of
test_agent_daemon plays the service): the agent runs its update hook once with the version and
reports how it ended in its keys.report; a kill -9 of the agent before the hook ran or while it
runs leaves the "device" on the old release or the new one, never half (the hook's slot switch
is one atomic write, and the hook outlives the agent), and the restarted agent reports no install
so the service knows to look (and sends it again). The agent follows a release bundle (a
release key and the operators' approval of each release, as in test_agent_releases_e2e): it runs
the hook only for a release the bundle it holds approves, and reports any other as a failed
install (``release.approval``)."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.protocol.wire.messages.key_state import KeyStateReport
from agent.protocol.wire.messages.release import InstallResult, InstallState, ReleaseInstall
from firmware_sim import release
from tests.e2e.test_agent_daemon import AgentProcess, ServiceHarness, flush_leftovers, write_agent
from tests.e2e.test_agent_releases_e2e import PCR, Releases, boot
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.swtpm import Swtpm

pytestmark = pytest.mark.e2e

HOOK = """\
import sys, time
from firmware_sim import release
time.sleep(float(sys.argv[3]))
if sys.argv[2] == "9.9":
    sys.exit("no such image: 9.9")
release.install(sys.argv[1], sys.argv[2])
"""


@pytest.fixture
def setup(
    tmp_path: Path, swtpm: Swtpm, mosquitto: MosquittoBroker
) -> Iterator[tuple[AgentProcess, ServiceHarness, Path]]:
    files = write_agent(tmp_path / "device", swtpm, mosquitto, pcrs=(PCR,))
    slot = tmp_path / "device" / "slot"
    hook = tmp_path / "hook.py"
    hook.write_text(HOOK)
    key_file = tmp_path / "device" / "release-key.pem"
    with files.config.open("a") as out:
        # the update hook: switch the slot after a delay (a real updater writes its inactive
        # partition first), the version as one argument, no shell
        out.write(
            "\n[releases]\n"
            f'key = "{key_file}"\n'
            f'install_command = ["{sys.executable}", "{hook}", "{slot}", "{{version}}", "1.0"]\n'
            "install_timeout = 30\n"
        )
    agent = AgentProcess(files)
    harness = ServiceHarness(mosquitto, files)
    # booted into 1.0; the operators approved 1.0, 1.1 and 9.9 (an image the hook cannot install)
    boot(swtpm, "1.0")
    Releases(harness, key_file).publish(1, ("1.0", "1.1", "9.9"))
    try:
        yield agent, harness, slot
    finally:
        if agent.process is not None:
            agent.terminate()
        harness.close()
        print(agent.log_text())


def install_report(harness: ServiceHarness, state: InstallState) -> InstallResult:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        body = harness.expect(KeyStateReport, timeout=max(0.1, deadline - time.monotonic())).body
        assert isinstance(body, KeyStateReport)
        if body.install is not None and body.install.state is state:
            return body.install
    raise AssertionError(f"no keys.report with an install {state.value}")


def test_the_hook_runs_once_and_its_end_is_reported(
    setup: tuple[AgentProcess, ServiceHarness, Path],
) -> None:
    agent, harness, slot = setup
    agent.start()
    harness.expect(KeyStateReport)
    harness.command(ReleaseInstall(rollout="ro-1", version="1.1"))
    assert install_report(harness, InstallState.DONE) == InstallResult(
        "ro-1", "1.1", InstallState.DONE
    )
    assert release.installed_version(slot) == "1.1"
    assert agent.status()["install"]["running"] is None
    # an install the hook cannot do fails with the hook's check id
    harness.command(ReleaseInstall(rollout="ro-2", version="9.9"))
    failed = install_report(harness, InstallState.FAILED)
    assert failed.rollout == "ro-2" and failed.check == "release.install.failed"
    assert release.installed_version(slot) == "1.1"  # a failed install changes nothing
    # a release the bundle does not approve: refused before any hook runs
    harness.command(ReleaseInstall(rollout="ro-3", version="6.6"))
    refused = install_report(harness, InstallState.FAILED)
    assert (refused.rollout, refused.check) == ("ro-3", "release.approval")
    assert release.installed_version(slot) == "1.1"


@pytest.mark.parametrize(
    ("point", "installed"), [("before-install", "1.0"), ("during-install", "1.1")]
)
def test_a_kill_during_install_leaves_the_old_or_the_new_release(
    setup: tuple[AgentProcess, ServiceHarness, Path], swtpm: Swtpm, point: str, installed: str
) -> None:
    agent, harness, slot = setup
    agent.env = {"KEYAGENT_TEST_KILL_AT": f"{point}:release.install:1"}
    agent.start()
    harness.expect(KeyStateReport)
    harness.command(ReleaseInstall(rollout="ro-1", version="1.1"))
    assert agent.process is not None
    assert agent.process.wait(10) == -signal.SIGKILL
    agent.process = None
    time.sleep(2.0)  # a hook that was started finishes on its own (its own session)
    assert release.installed_version(slot) == installed
    flush_leftovers(swtpm)
    agent.env = {}
    agent.start()
    # the restarted agent reports without the install: the service challenges it and, seeing
    # the old release, sends the install again; the instruction was not redelivered by the
    # broker (handled and acknowledged before the hook), so the hook does not run twice by itself
    report = harness.expect(KeyStateReport).body
    assert isinstance(report, KeyStateReport) and report.install is None
    harness.command(ReleaseInstall(rollout="ro-1", version="1.1"))
    assert install_report(harness, InstallState.DONE).version == "1.1"
    assert release.installed_version(slot) == "1.1"
