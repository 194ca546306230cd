"""A staged rollout's waves (provisioning.service.rollout.plan_waves, pure): cumulative sizes
over the group's members in device id order, a percentage rounded up, at least one new device
per wave, nothing past the whole group; and the release a verdict shows."""

from __future__ import annotations

import pytest

from agent.protocol.wire.messages.result import OperatorResult, ResultStatus
from provisioning.policy import GoldenPolicy
from provisioning.rollout_cli import exit_code
from provisioning.service.model import ReleaseCache
from provisioning.service.rollout import plan_waves, wave_target

pytestmark = pytest.mark.pure

SIX = ("dev-f", "dev-b", "dev-a", "dev-e", "dev-c", "dev-d")


def test_waves_are_cumulative_in_device_id_order() -> None:
    assert plan_waves(SIX, ["1", "50%", "100%"]) == (
        ("dev-a",),
        ("dev-b", "dev-c"),
        ("dev-d", "dev-e", "dev-f"),
    )
    # the same members in any order give the same waves
    assert plan_waves(sorted(SIX), ["1", "50%", "100%"]) == plan_waves(SIX, ["1", "50%", "100%"])


def test_percentages_round_up_and_every_wave_moves_at_least_one_device() -> None:
    assert wave_target("5%", 6) == 1 and wave_target("25%", 6) == 2 and wave_target("34%", 3) == 2
    assert plan_waves(SIX, ["5%", "25%", "100%"]) == (
        ("dev-a",),
        ("dev-b",),
        ("dev-c", "dev-d", "dev-e", "dev-f"),
    )
    # a step that would not grow the rollout still takes the next device
    assert plan_waves(SIX, ["1", "1", "10%"]) == (("dev-a",), ("dev-b",), ("dev-c",))
    # steps past the group add nothing; a partial rollout stops where its last step says
    assert plan_waves(("dev-b", "dev-a"), ["1", "100%", "100%"]) == (("dev-a",), ("dev-b",))
    assert plan_waves(SIX, ["50%"]) == (("dev-a", "dev-b", "dev-c"),)
    assert plan_waves((), ["100%"]) == ()
    assert plan_waves(SIX, ["100"]) == (tuple(sorted(SIX)),)


def test_a_device_runs_the_newest_approved_release_its_quote_shows() -> None:
    """Rollout and ``release list`` name a device's release by its trusted quote's PCR values
    (``ReleaseCache.match``): the newest approved release whose expected values all match."""
    old, new = {0: b"\x01" * 32, 4: b"\x02" * 32}, {0: b"\x01" * 32, 4: b"\x03" * 32}
    cache = ReleaseCache(3, GoldenPolicy({}), (("1.0", old), ("1.1", new), ("1.1-again", new)))
    assert cache.match({0: b"\x01" * 32, 4: b"\x02" * 32, 7: b"\x09" * 32}) == "1.0"
    assert cache.match(dict(new)) == "1.1-again"  # the newest approval of the same image
    assert cache.match({0: b"\x01" * 32, 4: b"\x04" * 32}) is None  # a mix: no release
    assert cache.match({4: b"\x02" * 32}) is None  # a PCR the release expects is missing
    assert ReleaseCache(0, GoldenPolicy({})).match(dict(old)) is None


def test_the_cli_exit_code_names_how_a_rollout_ended() -> None:
    def final(status: ResultStatus, detail: str) -> OperatorResult:
        return OperatorResult.of(bytes(16), status, detail)

    assert exit_code(final(ResultStatus.DONE, "ro-1 done: 1.1 to g")) == 0
    assert exit_code(final(ResultStatus.FAILED, "ro-1 failed: 1.1 to g; dev-1 untrusted")) == 1
    assert exit_code(final(ResultStatus.TIMEOUT, "ro-1 timeout: wave 1 not passed")) == 3
    assert exit_code(final(ResultStatus.FAILED, "ro-1 rolled-back: 1.1 to g; failed")) == 5
    assert exit_code(final(ResultStatus.REJECTED, "[rollout.group.busy] ...")) == 1
