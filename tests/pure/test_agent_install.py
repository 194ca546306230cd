"""A staged rollout's ``release.install`` at the device (pure core with a FakeService, and the
daemon's update-hook runner with real child processes): the core asks its caller to run the hook
once, refuses without a hook, for a release that is not in the verified bundle it holds, or while
one runs, and reports a failed install in its keys.report; the runner passes the version without a
shell and turns exits and timeouts into check ids."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from agent.config import InstallConfig
from agent.core import AgentCore
from agent.daemon import run_install_hook
from agent.protocol.errors import ProtocolError
from agent.protocol.release import open_bundle
from agent.protocol.wire.envelope import Signer, open_message
from agent.protocol.wire.messages.key_state import KeyStateReport
from agent.protocol.wire.messages.release import InstallResult, InstallState, ReleaseInstall
from tests.pure.test_agent_core import T0, FakeService
from tests.pure.test_agent_releases import RELEASE_KEY, bundle

pytestmark = pytest.mark.pure


def installer(service: FakeService, versions: tuple[str, ...] = ("1.0", "1.1", "1.2")) -> AgentCore:
    """A device with an update hook that holds a verified bundle approving ``versions``."""
    core = service.core("dev-1", can_install=True)
    held = open_bundle(bundle(1, 1, versions), RELEASE_KEY.public_key())
    core.follow_releases(RELEASE_KEY.public_key(), held, "1.0")
    return core


def open_keys_report(service: FakeService, device: str, payload: bytes) -> KeyStateReport:
    core = service.devices[device]
    devid = core._keys.devid.public_key()  # type: ignore[attr-defined]
    message = open_message(
        payload, lambda kid: Signer(device, devid), now=service.now, recipients={"keyfleet-service"}
    )
    assert isinstance(message.body, KeyStateReport)
    return message.body


def test_install_is_an_effect_run_once_then_reported() -> None:
    service = FakeService()
    core = installer(service)
    install = ReleaseInstall(rollout="ro-1", version="1.1")
    payload, topic = service.command("dev-1", install)
    outcome = core.handle(payload, topic, T0)
    assert outcome.refused is None and outcome.changed and outcome.install == install
    assert outcome.publishes == []
    assert core.status()["install"] == {
        "running": "1.1",
        "last": {"rollout": "ro-1", "version": "1.1", "state": "running"},
    }
    # a keys.report while the hook runs says so (the service then does not send it again)
    [running] = core.report(T0).publishes
    assert open_keys_report(service, "dev-1", running.payload).install == InstallResult(
        "ro-1", "1.1", InstallState.RUNNING
    )
    # a redelivery is a duplicate: no second install
    again = core.handle(payload, topic, T0 + 1)
    assert again.install is None and again.refused is not None
    # the same install sent again (the service did not hear from us): no second run
    resent = service.deliver("dev-1", install)
    assert resent.install is None and resent.refused is None
    [report] = resent.publishes
    assert open_keys_report(service, "dev-1", report.payload).install == InstallResult(
        "ro-1", "1.1", InstallState.RUNNING
    )
    # another instruction while the hook runs is refused and reported
    busy = service.deliver("dev-1", ReleaseInstall(rollout="ro-2", version="1.2"))
    assert busy.install is None
    [report] = busy.publishes
    assert open_keys_report(service, "dev-1", report.payload).install == InstallResult(
        "ro-2", "1.2", InstallState.FAILED, "release.install.busy"
    )
    done = core.install_finished(install, None, T0 + 5)
    [report] = done.publishes
    assert done.changed and report.type == "keys.report"
    assert open_keys_report(service, "dev-1", report.payload).install == InstallResult(
        "ro-1", "1.1", InstallState.DONE
    )
    # every later keys.report repeats it (a report lost to a reconnect is made up)
    [later] = core.report(T0 + 9).publishes
    assert open_keys_report(service, "dev-1", later.payload).install is not None
    assert core.status()["install"]["running"] is None


def test_a_failed_hook_is_reported_with_its_check() -> None:
    service = FakeService()
    core = installer(service)
    install = ReleaseInstall(rollout="ro-1", version="1.1")
    assert service.deliver("dev-1", install).install == install
    failed = core.install_finished(
        install, ProtocolError("release.install.failed", "exited with 3"), T0 + 2
    )
    [report] = failed.publishes
    assert open_keys_report(service, "dev-1", report.payload).install == InstallResult(
        "ro-1", "1.1", InstallState.FAILED, "release.install.failed"
    )
    assert core.rejections.count("release.install.failed") == 1


def test_without_a_hook_the_instruction_is_refused_and_reported() -> None:
    service = FakeService()
    core = service.core("dev-1")
    outcome = service.deliver("dev-1", ReleaseInstall(rollout="ro-1", version="1.1"))
    assert outcome.install is None
    [report] = outcome.publishes
    assert open_keys_report(service, "dev-1", report.payload).install == InstallResult(
        "ro-1", "1.1", InstallState.FAILED, "release.install.unavailable"
    )
    assert core.rejections.count("release.install.unavailable") == 1


@pytest.mark.parametrize("follows", [True, False])
def test_a_release_not_in_the_verified_bundle_is_not_installed(follows: bool) -> None:
    """Only a release of the bundle held (each entry's approval checked when it was taken) is
    installed; a device that follows no bundle has nothing to check an install against."""
    service = FakeService()
    core = installer(service, ("1.0",)) if follows else service.core("dev-1", can_install=True)
    outcome = service.deliver("dev-1", ReleaseInstall(rollout="ro-1", version="1.1"))
    assert outcome.install is None and core.installing is None
    [report] = outcome.publishes
    assert open_keys_report(service, "dev-1", report.payload).install == InstallResult(
        "ro-1", "1.1", InstallState.FAILED, "release.approval"
    )
    assert core.rejections.count("release.approval") == 1


def _hook(tmp_path: Path, body: str, timeout: int = 30) -> InstallConfig:
    script = tmp_path / "hook.py"
    script.write_text(body)
    return InstallConfig(
        command=(sys.executable, str(script), "--version", "{version}"), timeout=timeout
    )


def test_hook_gets_the_version_as_one_argument_without_a_shell(tmp_path: Path) -> None:
    out = tmp_path / "args"
    config = _hook(
        tmp_path, f"import sys, pathlib; pathlib.Path({str(out)!r}).write_text(repr(sys.argv[1:]))"
    )
    assert run_install_hook(config, "1.1") is None
    assert out.read_text() == repr(["--version", "1.1"])


def test_hook_failure_and_timeout_have_check_ids(tmp_path: Path) -> None:
    failed = run_install_hook(_hook(tmp_path, "import sys; print('no space'); sys.exit(3)"), "1.1")
    assert failed is not None and failed.check == "release.install.failed"
    assert "exited with 3" in failed.reason and "no space" in failed.reason
    slow = run_install_hook(_hook(tmp_path, "import time; time.sleep(30)", timeout=1), "1.1")
    assert slow is not None and slow.check == "release.install.timeout"
    missing = run_install_hook(InstallConfig(command=(str(tmp_path / "nope"), "{version}")), "1.1")
    assert missing is not None and missing.check == "release.install.failed"
