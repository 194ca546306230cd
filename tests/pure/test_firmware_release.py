"""firmware_sim.release: the demo release manifest and the installed-release slot (pure: files
only), and the firmware-sim CLI commands over them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.protocol.errors import ConfigError
from firmware_sim import release
from firmware_sim.boot import default_components
from firmware_sim.cli import main

pytestmark = pytest.mark.pure


def test_manifest_names_every_component_with_its_digest() -> None:
    document = release.demo_manifest("1.1")
    assert document["version"] == "1.1"
    components = default_components("1.1")
    assert [c["name"] for c in document["components"]] == [c.name for c in components]
    assert [c["sha256"] for c in document["components"]] == [c.digest().hex() for c in components]
    assert document != release.demo_manifest("1.0")


def test_installed_release_defaults_then_switches(tmp_path: Path) -> None:
    assert release.installed_version(tmp_path) == "1.0"
    release.install(tmp_path, "1.1")
    assert release.installed_version(tmp_path) == "1.1"
    with pytest.raises(ConfigError):
        release.install(tmp_path, "1.1; rm -rf /")
    assert release.installed_version(tmp_path) == "1.1"  # a refused install changes nothing
    (tmp_path / release.INSTALLED_FILE).write_text("../../etc\n")
    with pytest.raises(ConfigError):
        release.installed_version(tmp_path)


def test_cli_manifest_and_install(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.json"
    assert main(["release", "manifest", "--version", "2.0", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == release.demo_manifest("2.0")
    assert main(["install", "--state", str(tmp_path), "--version", "2.0"]) == 0
    assert release.installed_version(tmp_path) == "2.0"
    assert main(["install", "--state", str(tmp_path), "--version", "bad version"]) == 1
    assert "release version" in capsys.readouterr().err
