"""``keyfleet release add/list/export`` on a real SQLite file made by ``keyfleet db init`` (the
migrations, 0012 included): a manifest from firmware-sim is added as a proposed release and
audited, a bad one is refused naming its problems, ``list --json`` shows it, ``export --toml``
writes the golden policy of the approved releases (tier pure: SQLite is an in-process library).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.protocol.errors import ConfigError
from firmware_sim.release import demo_manifest, write_manifest
from provisioning import audit
from provisioning.cli import EXIT_ERROR, main
from provisioning.policy import load_policy
from provisioning.registry import make_engine, session_factory

pytestmark = pytest.mark.pure


def test_release_add_list_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    assert main(["db", "init", "--db", url]) == 0
    manifest = tmp_path / "m.json"
    write_manifest(manifest, demo_manifest("1.1"))
    assert main(["release", "add", str(manifest), "--by", "op-alice", "--db", url]) == 0
    assert "release 1.1 proposed" in capsys.readouterr().out
    assert (
        main(["release", "add", str(manifest), "--db", url]) == EXIT_ERROR
    )  # one version, one manifest
    assert "release.exists" in capsys.readouterr().err

    bad = demo_manifest("1.2")
    bad["components"][0]["pcr"] = 16
    write_manifest(manifest, bad)
    assert main(["release", "add", str(manifest), "--db", url]) == EXIT_ERROR
    assert "components[0].pcr" in capsys.readouterr().err

    assert main(["release", "list", "--db", url, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["version"], row["state"], row["source"]) == ("1.1", "proposed", "operator")
    assert row["components"].startswith("bootloader=1.1") and row["devices"] == []
    assert main(["release", "list", "--db", url]) == 0
    assert "proposed" in capsys.readouterr().out

    golden = tmp_path / "golden.toml"
    assert main(["release", "export", "--db", url, "--toml", str(golden)]) == 0
    with pytest.raises(ConfigError, match="components"):
        load_policy(golden)  # nothing approved yet: an empty policy is no policy file
    assert main(["release", "export", "--db", url]) == 1  # no bundle was ever signed
    assert "no signed release bundle" in capsys.readouterr().err

    engine = make_engine(url)
    with session_factory(engine)() as session:
        added = [e for e in audit.entries(session) if e.action == "release.add"]
    engine.dispose()
    assert [(e.actor, e.target) for e in added] == [("local:op-alice", "1.1")]
