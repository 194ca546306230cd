"""The layering contracts of pyproject.toml ([tool.importlinter], checked by ``make lint``).

Three things: the contracts hold on the tree as it is; every module beside the protocol core and
every part of the fleet side is classified in them (a new module cannot slip past the lists);
and a deliberate violation, written into a copy of the tree, makes ``lint-imports`` fail naming
the broken contract.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
# The device side's I/O modules that the fleet side may use: transports and file helpers that
# both sides need (MQTT client and the deferred imports under it, serial link client, atomic
# writes, configuration schema checks, the installed version for --version).
SHARED_ADAPTERS = {
    "agent.mqtt",
    "agent.lazyimport",
    "agent.serial_link",
    "agent.fsio",
    "agent.configschema",
    "agent.version",
}


def contracts() -> dict[str, dict[str, Any]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {c["id"]: c for c in config["tool"]["importlinter"]["contracts"]}


def children(package: str) -> set[str]:
    """The direct submodules and subpackages of a top-level package directory."""
    base = ROOT / package
    found = {p.stem for p in base.glob("*.py") if p.stem != "__init__"}
    found |= {p.name for p in base.iterdir() if (p / "__init__.py").exists()}
    return {f"{package}.{name}" for name in found}


def lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-logo", "--no-cache"],
        cwd=cwd,
        env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_the_tree_keeps_every_contract() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(contracts())} kept, 0 broken" in result.stdout


def test_every_module_beside_the_core_is_classified() -> None:
    core = contracts()["core-is-pure"]
    fleet = contracts()["fleet-uses-core-only"]
    beside_core = children("agent") - {"agent.protocol"}
    assert beside_core == set(core["forbidden_modules"]) - {"provisioning", "firmware_sim"}
    # the fleet side may use the shared adapters and nothing else of the daemon
    assert beside_core - SHARED_ADAPTERS == set(fleet["forbidden_modules"]) - {"firmware_sim"}


def test_every_part_of_the_fleet_side_is_above_the_database() -> None:
    bottom = contracts()["persistence-at-bottom"]
    assert children("provisioning") - {"provisioning.db"} == set(bottom["forbidden_modules"])


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("agent/protocol/hpke.py", "import agent.tpm.store", "core-is-pure"),
        ("provisioning/db/engine.py", "import provisioning.registry", "persistence-at-bottom"),
        ("provisioning/audit.py", "import agent.core", "fleet-uses-core-only"),
    ],
)
def test_a_deliberate_violation_breaks_the_lint(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    for package in ("agent", "provisioning"):
        shutil.copytree(ROOT / package, tmp_path / package)
    shutil.copytree(ROOT / "firmware-sim" / "firmware_sim", tmp_path / "firmware_sim")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    assert lint(tmp_path).returncode == 0  # the copy itself is clean
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # a deliberate violation\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    name = contracts()[contract]["name"]
    # lint-imports wraps long names: compare without line breaks
    flat = " ".join(result.stdout.split())
    assert f"{name} BROKEN" in flat, result.stdout
