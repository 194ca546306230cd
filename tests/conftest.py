"""Shared pytest setup. Real components (swtpm, Mosquitto) come from the fixture modules below;
every test carries exactly one tier marker (pure, tpm, broker, e2e) so tiers can be selected."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.fixtures.swtpm", "tests.fixtures.mosquitto"]

TIERS = ("pure", "tpm", "broker", "e2e")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tiers = [m.name for m in item.iter_markers() if m.name in TIERS]
        if not tiers:
            raise pytest.UsageError(f"{item.nodeid} has no tier marker (one of {', '.join(TIERS)})")
