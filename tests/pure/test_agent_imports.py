"""What a starting keyagent loads (docs/bench/README.md, "keyagent memory and start").

Every module the agent imports stays in its memory for as long as it runs. Modules that only a
rare path needs are imported on that path: importlib.metadata (only ``--version`` reads the
installed version), subprocess (only the update hook of a release install runs a program), and
zipfile (the self-test reads its vector files as plain files, not through importlib.resources).
Some are not needed at all: fractions and decimal (the renewal fraction is a ratio of integers),
ctypes (the heap trim calls malloc_trim through cffi's backend, already loaded), urllib.request
and uuid (paho imports them for proxies and generated client ids: they are deferred, see
agent/lazyimport.py) and what urllib.request would bring (http.client, email's parser, tempfile,
shutil, bz2, lzma; the HTTPS renewal imports http.client when it runs). This checks,
in a fresh interpreter, that importing the agent's entry point, running the self-test and
trimming the heap do not load them (tests/pure/test_agent_install.py runs the update hook,
tests/pure/test_listings_cli.py prints every command's version).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parents[2]
# Each costs a running agent resident memory and is needed only on a rare path.
NOT_AT_START = (
    "importlib.metadata",
    "zipfile",
    "csv",
    "subprocess",
    "fractions",
    "decimal",
    "ctypes",
    "urllib.request",
    "uuid",
    "http.client",
    "email.parser",
    "tempfile",
    "shutil",
    "bz2",
    "lzma",
)


def _modules_after(statement: str) -> set[str]:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            # a deferred module's stand-in (agent/lazyimport.py) is not the module loaded
            f"import json, sys\n{statement}\nprint(json.dumps(sorted(name for name, module "
            "in sys.modules.items() if type(module).__module__ != 'agent.lazyimport')))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return set(json.loads(done.stdout))


def test_the_agent_entry_point_does_not_load_rare_path_modules() -> None:
    # the entry point, and the power-on self-test every start runs
    loaded = _modules_after(
        "import agent.cli\nfrom agent.selftest import run_builtin_selftests_apart\n"
        "assert run_builtin_selftests_apart() == (True, 0)\n"
        "from agent import heap\nassert heap.release_free_pages()"
    )
    assert "agent.daemon" in loaded  # the whole daemon is there
    assert loaded.isdisjoint(NOT_AT_START), sorted(loaded & set(NOT_AT_START))


def test_the_check_sees_a_module_the_agent_loads() -> None:
    # the same check on an import that does load one of them: it is not blind
    loaded = _modules_after("import agent.cli\nimport agent.version as v\nv.installed_version()")
    assert "importlib.metadata" in loaded


def test_the_check_sees_a_deferred_module_once_used() -> None:
    loaded = _modules_after("import agent.cli\nimport uuid\nuuid.uuid4()")
    assert "uuid" in loaded
    assert "urllib.request" not in loaded
