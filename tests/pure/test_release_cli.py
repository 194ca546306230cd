"""``keyfleet release list/export`` on a real SQLite file made by ``keyfleet db init`` (the
migrations, 0012 included): a release proposed from firmware-sim's manifest is listed,
``export --toml`` writes the golden policy of the approved releases, ``export`` without a signed
bundle says so (tier pure: SQLite is an in-process library). ``release add`` is a signed
command: tests/pure/test_service_releases.py, tests/broker/test_releases_mqtt.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.protocol.errors import ConfigError
from firmware_sim.release import demo_manifest
from provisioning.cli import EXIT_ERROR, main
from provisioning.policy import load_policy
from provisioning.registry import make_engine, session_factory
from provisioning.releases import parse_manifest
from provisioning.service.releases import add_release

pytestmark = pytest.mark.pure


def test_release_list_and_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    assert main(["db", "init", "--db", url]) == 0
    engine = make_engine(url)
    with session_factory(engine).begin() as session:
        manifest = parse_manifest(json.dumps(demo_manifest("1.1")).encode())
        add_release(session, manifest, by="op-alice", actor="operator:op-alice", now=1)
    engine.dispose()
    capsys.readouterr()

    assert main(["release", "list", "--db", url, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["version"], row["state"], row["source"]) == ("1.1", "proposed", "operator")
    assert row["components"].startswith("bootloader=1.1") and row["devices"] == []
    assert row["manifest_sha256"] == manifest.sha256.hex()
    assert main(["release", "list", "--db", url]) == 0
    assert "proposed" in capsys.readouterr().out

    golden = tmp_path / "golden.toml"
    assert main(["release", "export", "--db", url, "--toml", str(golden)]) == 0
    with pytest.raises(ConfigError, match="components"):
        load_policy(golden)  # nothing approved yet: an empty policy is no policy file
    assert main(["release", "export", "--db", url]) == 1  # no bundle was ever signed
    assert "no signed release bundle" in capsys.readouterr().err
    assert main(["release", "list", "--db", f"sqlite:///{tmp_path / 'none.db'}"]) == EXIT_ERROR
