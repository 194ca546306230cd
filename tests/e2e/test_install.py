"""Installing keyfleet as docs/install.md says: the wheel built by scripts/build-wheel.sh (what
`make dist` runs) and scripts/install.sh into a clean root directory. What was installed is checked
from that root: the environment holds exactly the locked versions, the programs run from it, and
systemd-analyze verifies the installed units against it (their ExecStart included).

scripts/install.sh fetches the locked run-time dependencies from PyPI (tpm2-pytss builds from
source against libtss2-dev, without FAPI: scripts/install-tpm2-pytss.sh), so the first run takes a
minute or two; the caches make later ones faster. The configuration examples it installs are
checked by the configuration loaders.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from agent.config import load_config as load_agent_config
from agent.configschema import ConfigProblems
from provisioning.config import InvalidConfig
from provisioning.config import load_config as load_service_config

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "opt/keyfleet"


def _run(
    cmd: list[str | Path],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{cmd}: {result.returncode}\n{result.stdout}{result.stderr}"
    return result


def _pins(lines: list[str]) -> set[str]:
    """``name==version`` lines, names normalised as PEP 503 does."""
    pins = set()
    for line in lines:
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        if match:
            pins.add(f"{re.sub(r'[-_.]+', '-', match[1]).lower()}=={match[2]}")
    return pins


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root directory keyfleet was installed into, both roles; the wheel built from this tree."""
    work = tmp_path_factory.mktemp("install")
    _run(
        [ROOT / "scripts" / "build-wheel.sh", work / "dist"],
        env={**os.environ, "PYTHON": sys.executable},
        timeout=300,
    )
    (wheel,) = (work / "dist").glob("keyfleet-*.whl")
    root = work / "root"
    _run([ROOT / "scripts" / "install.sh", "--root", root, "--wheel", wheel], timeout=900)
    return root


@pytest.mark.e2e
def test_installed_environment_holds_the_lock_and_the_programs_run(
    installed: Path, tmp_path: Path
) -> None:
    env = installed / PREFIX
    python = env / "bin" / "python"
    for program in ("keyagent", "keyfleet", "keyprovision", "firmware-sim"):
        # written to run once the root is the system's: /opt/keyfleet, not the staging path
        first = (env / "bin" / program).read_text().splitlines()[0]
        assert first == "#!/opt/keyfleet/bin/python", (program, first)

    frozen = _run([python, "-m", "pip", "freeze", "--all"], cwd=tmp_path).stdout.splitlines()
    locked = _pins((ROOT / "requirements.lock").read_text().splitlines())
    installed_pins = _pins(frozen) - {"keyfleet==0.1.0"}
    installed_pins = {p for p in installed_pins if p.split("==")[0] not in ("pip", "setuptools")}
    assert installed_pins == locked

    # the console scripts, run by the installed interpreter, import the installed packages only
    where = _run([python, "-c", "import agent, provisioning; print(agent.__file__)"], cwd=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(env)
    # the TPM binding is built for ESAPI only: FAPI and its libraries cost keyagent memory
    fapi = subprocess.run(
        [python, "-c", "import tpm2_pytss.FAPI"], capture_output=True, text=True, check=False
    )
    assert fapi.returncode != 0 and "NotImplementedError" in fapi.stderr, fapi.stderr
    selftest = _run([python, env / "bin" / "keyagent", "selftest"], cwd=tmp_path)
    assert "selftest ok" in selftest.stdout and ", 0 failed" in selftest.stdout
    usage = _run([python, env / "bin" / "keyfleet", "--help"], cwd=tmp_path)
    assert "usage: keyfleet" in usage.stdout


@pytest.mark.e2e
def test_installed_units_verify_against_the_root(installed: Path) -> None:
    units = installed / "etc" / "systemd" / "system"
    assert sorted(p.name for p in units.iterdir()) == [
        "keyagent.service",
        "keyfleet-broker-crl.path",
        "keyfleet-broker-crl.service",
        "keyfleet.service",
        "keyfleet@.service",
    ]
    for unit in units.iterdir():
        if unit.name.startswith("keyfleet-broker-crl"):
            continue  # restarts the broker (systemctl), runs no keyfleet program
        assert "/opt/keyfleet/bin/" in unit.read_text()
    assert (installed / "etc" / "sysusers.d" / "keyfleet.conf").is_file()
    assert (installed / "etc" / "tmpfiles.d" / "keyfleet.conf").is_file()
    # a real system's root has systemd's own units (sysinit.target, ...) beside ours
    system_units = installed / "usr" / "lib" / "systemd" / "system"
    if not system_units.exists():
        shutil.copytree("/usr/lib/systemd/system", system_units, symlinks=True)
    # ... and systemctl, which keyfleet-broker-crl.service runs to restart the broker
    systemctl = installed / "usr" / "bin" / "systemctl"
    if not systemctl.exists():
        systemctl.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2("/usr/bin/systemctl", systemctl)
    names = [
        "keyagent.service",
        "keyfleet.service",
        "keyfleet@a.service",
        "keyfleet-broker-crl.path",
        "keyfleet-broker-crl.service",
    ]
    verify = subprocess.run(
        ["systemd-analyze", "verify", f"--root={installed}", *names],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    # the check does look at the installed program: without it, verify fails
    program = installed / PREFIX / "bin" / "keyagent"
    program.rename(program.with_suffix(".moved"))
    try:
        missing = subprocess.run(
            ["systemd-analyze", "verify", f"--root={installed}", "keyagent.service"],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
    finally:
        program.with_suffix(".moved").rename(program)
    assert missing.returncode != 0 and "/opt/keyfleet/bin/keyagent" in missing.stderr


@pytest.mark.e2e
def test_reinstall_keeps_the_configuration(installed: Path) -> None:
    config = installed / "etc" / "keyagent" / "agent.toml"
    config.write_text("# the device's own configuration\n")
    (wheel,) = (installed.parent / "dist").glob("keyfleet-*.whl")
    out = _run(
        [ROOT / "scripts" / "install.sh", "--root", installed, "--agent", "--wheel", wheel],
        timeout=900,
    ).stdout
    assert "units: keyagent.service" in out
    assert config.read_text() == "# the device's own configuration\n"
    assert (installed / "etc" / "keyagent" / "agent.toml.example").is_file()


@pytest.mark.pure
def test_configuration_examples_have_only_site_specific_problems() -> None:
    """The examples are complete and well-typed: all the loaders find missing are the site's own
    files (certificates, keys), the app group and the state directory."""
    site_specific = ("(file not found", "(no such group)", "(no directory /var/lib/keyfleet")
    with pytest.raises(ConfigProblems) as agent_problems:
        load_agent_config(ROOT / "packaging" / "agent.toml.example")
    with pytest.raises(InvalidConfig) as service_problems:
        load_service_config(ROOT / "packaging" / "service.toml.example")
    problems = [*agent_problems.value.problems, *service_problems.value.problems]
    assert problems
    assert [p for p in problems if not any(s in p for s in site_specific)] == []


def _check_locks() -> ModuleType:
    path = ROOT / "scripts" / "check-locks.py"
    spec = importlib.util.spec_from_file_location("check_locks", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.pure
def test_lock_files_pin_every_dependency_of_pyproject() -> None:
    assert _check_locks().gaps() == []


@pytest.mark.pure
def test_a_dependency_added_without_make_lock_is_named(tmp_path: Path) -> None:
    for name in ("requirements.lock", "requirements-dev.lock", "requirements-build.lock"):
        shutil.copy(ROOT / name, tmp_path / name)
    text = (ROOT / "pyproject.toml").read_text()
    text = text.replace('    "pytest>=8",\n', '    "pytest>=8",\n    "no-such-checker>=2",\n', 1)
    text = text.replace('"cbor2>=5.6"', '"cbor2>=99"', 1)
    (tmp_path / "pyproject.toml").write_text(text)
    assert _check_locks().gaps(tmp_path) == [
        "requirements.lock: cbor2==6.3.0 does not satisfy cbor2>=99",
        "requirements-dev.lock: cbor2==6.3.0 does not satisfy cbor2>=99",
        "requirements-dev.lock: no-such-checker is not pinned (pyproject.toml: no-such-checker>=2)",
        "requirements-bench.lock: missing",
    ]
