"""Shared pytest setup. Real components (swtpm, Mosquitto) come from the fixture modules below;
every test carries exactly one tier marker (pure, tpm, broker, e2e) so tiers can be selected."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

pytest_plugins = ["tests.fixtures.swtpm", "tests.fixtures.mosquitto", "tests.fixtures.fleet"]

TIERS = ("pure", "tpm", "broker", "e2e")

# CI runs the same generated inputs every time (a red run can be replayed exactly) and keeps no
# example database in the clone; developers get fresh random inputs on every run.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tiers = [m.name for m in item.iter_markers() if m.name in TIERS]
        if not tiers:
            raise pytest.UsageError(f"{item.nodeid} has no tier marker (one of {', '.join(TIERS)})")
