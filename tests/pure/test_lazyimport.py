"""Deferred standard library imports (agent/lazyimport.py): an import binds a stand-in, the first
use imports the real module, and the caller sees no difference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, env: dict[str, str] | None = None) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env=None if env is None else {**os.environ, **env},
    )
    return dict(json.loads(done.stdout.splitlines()[-1]))


def test_a_deferred_module_loads_on_first_use() -> None:
    result = _run(
        """
import json, sys
from agent import lazyimport
deferred = lazyimport.defer("colorsys", "no_such_module_here", "sys")
import colorsys
stand_in = colorsys
before = "rgb_to_hsv" in vars(colorsys) or "colorsys" not in sys.modules
hsv = colorsys.rgb_to_hsv(1.0, 0.0, 0.0)
from colorsys import hsv_to_rgb
try:
    import no_such_module_here
    missing = "imported"
except ModuleNotFoundError:
    missing = "not found"
print(json.dumps({
    "deferred": deferred, "loaded_before_use": before, "hsv": hsv,
    "rgb": hsv_to_rgb(0.0, 1.0, 1.0),
    "real_now": type(sys.modules["colorsys"]).__name__ == "module",
    "stand_in_has_names": "hls_to_rgb" in vars(stand_in),
    "missing": missing,
}))
"""
    )
    assert result == {
        "deferred": ["colorsys"],
        "loaded_before_use": False,
        "hsv": [0.0, 1.0, 1.0],
        "rgb": [1.0, 0.0, 0.0],
        "real_now": True,
        "stand_in_has_names": True,
        "missing": "not found",
    }


def test_paho_reads_proxies_from_the_environment_through_the_deferred_module() -> None:
    # PySocks (a development dependency) makes paho look at ``mqtt_proxy`` in the environment
    result = _run(
        """
import json, sys
import agent.mqtt
from paho.mqtt.client import Client
from paho.mqtt.enums import CallbackAPIVersion
deferred = type(sys.modules["urllib.request"]).__name__ != "module"
proxy = Client(CallbackAPIVersion.VERSION2, client_id="dev-1")
proxy.connect_async("broker.example", 8883)
found = proxy._get_proxy()
print(json.dumps({"deferred_at_start": deferred, "proxy": [found["proxy_addr"],
    found["proxy_port"]], "loaded": type(sys.modules["urllib.request"]).__name__}))
""",
        env={"mqtt_proxy": "socks://127.0.0.9:1080", "no_proxy": ""},
    )
    assert result == {
        "deferred_at_start": True,
        "proxy": ["127.0.0.9", 1080],
        "loaded": "module",
    }


def test_a_probe_of_the_module_file_loads_it_and_module_lookups_still_work() -> None:
    # inspect.getmodule walks sys.modules and reads each module's __file__
    result = _run(
        """
import inspect, json, sys
from agent import lazyimport
lazyimport.defer("colorsys")
import colorsys
found = inspect.getmodule(inspect.getmodule)
print(json.dumps({"found": found.__name__, "file": colorsys.__file__.endswith("colorsys.py"),
    "real_now": type(sys.modules["colorsys"]).__name__ == "module"}))
"""
    )
    assert result == {"found": "inspect", "file": True, "real_now": True}
