"""Pure parts of attestation: the NonceBook (issue, single use, expiry, per-device binding,
bounded size) and the golden policy (build from a release, approve another, write, load, and every
problem in a bad file named)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from agent.protocol.errors import ConfigError, ProtocolError
from firmware_sim.boot import FirmwareComponent, default_components, demo_image
from provisioning.attestation import MAX_OUTSTANDING_PER_DEVICE, NonceBook
from provisioning.policy import (
    GoldenPolicy,
    load_policy,
    parse_policy,
    policy_from_components,
    write_policy,
)

pytestmark = pytest.mark.pure

NOW = 1_700_000_000


def counting_rng() -> NonceBook:
    counter = itertools.count(1)
    return NonceBook(ttl=30, rng=lambda n: next(counter).to_bytes(n, "big"))


def consume_check(book: NonceBook, device: str, nonce: bytes, now: int) -> str:
    with pytest.raises(ProtocolError) as info:
        book.consume(device, nonce, now)
    return info.value.check


def test_nonce_is_single_use_and_bound_to_its_device() -> None:
    book = counting_rng()
    challenge = book.issue("dev-a", [9, 0, 4, 4], NOW)
    assert challenge.pcrs == (0, 4, 9)
    assert (challenge.issued_at, challenge.expires_at) == (NOW, NOW + 30)
    assert len(challenge.nonce) == 32
    assert consume_check(book, "dev-b", challenge.nonce, NOW) == "attest.nonce.unknown"
    assert book.consume("dev-a", challenge.nonce, NOW + 29) == challenge
    assert consume_check(book, "dev-a", challenge.nonce, NOW + 29) == "attest.nonce.replayed"
    assert consume_check(book, "dev-a", b"\x00" * 32, NOW) == "attest.nonce.unknown"


def test_nonce_expiry() -> None:
    book = counting_rng()
    old = book.issue("dev-a", [0], NOW)
    fresh = book.issue("dev-a", [0], NOW + 20)
    assert consume_check(book, "dev-a", old.nonce, NOW + 30) == "attest.nonce.expired"
    assert consume_check(book, "dev-a", old.nonce, NOW + 31) == "attest.nonce.replayed"
    assert book.expire(NOW + 50) == 1  # `fresh` was never answered
    assert book.outstanding("dev-a") == 0
    assert consume_check(book, "dev-a", fresh.nonce, NOW + 45) == "attest.nonce.unknown"
    # used nonces are forgotten once they could no longer be accepted anyway
    assert consume_check(book, "dev-a", old.nonce, NOW + 50) == "attest.nonce.unknown"


def test_outstanding_challenges_are_bounded_per_device() -> None:
    book = counting_rng()
    issued = [book.issue("dev-a", [0], NOW + i) for i in range(MAX_OUTSTANDING_PER_DEVICE + 2)]
    assert book.outstanding("dev-a") == MAX_OUTSTANDING_PER_DEVICE
    assert consume_check(book, "dev-a", issued[0].nonce, NOW + 6) == "attest.nonce.unknown"
    assert book.consume("dev-a", issued[-1].nonce, NOW + 6) == issued[-1]
    book.issue("dev-b", [0], NOW)
    assert book.outstanding("dev-b") == 1


def test_nonce_book_arguments() -> None:
    with pytest.raises(ValueError):
        NonceBook(ttl=0)
    with pytest.raises(ValueError):
        NonceBook(rng=lambda n: b"short").issue("dev-a", [0], NOW)


def test_policy_from_a_release_round_trips_through_the_file(tmp_path: Path) -> None:
    release = default_components("1.0")
    policy = policy_from_components(release).approve(default_components("1.1"))
    assert policy.pcrs == (0, 1, 4, 8, 9)
    kernel = policy.components["kernel"]
    assert kernel.pcr == 4 and kernel.versions == ("1.0", "1.1")
    assert kernel.version_of[release[2].digest()] == "1.0"
    path = tmp_path / "golden.toml"
    write_policy(policy, path)
    assert path.stat().st_mode & 0o777 == 0o644
    loaded = load_policy(path)
    assert loaded == policy
    assert loaded.components["kernel"].version_of == kernel.version_of
    text = path.read_text()
    assert "[components.kernel]" in text and "[[components.kernel.approved]]" in text
    assert f'sha256 = "{release[2].digest().hex()}"' in text
    # approving the same release again changes nothing
    assert policy.approve(release) == policy


def test_approve_refuses_contradictions() -> None:
    policy = policy_from_components(default_components("1.0"))
    other_image = FirmwareComponent("kernel", "1.0", demo_image("kernel", "9.9"))
    with pytest.raises(ConfigError, match=r"version 1\.0 is already approved"):
        policy.approve([other_image])
    moved = FirmwareComponent("kernel", "1.2", b"k", pcr=11)
    with pytest.raises(ConfigError, match=r"components\.kernel\.pcr"):
        policy.approve([moved])


GOOD = """
format = 1
[components.kernel]
pcr = 4
[[components.kernel.approved]]
version = "1.0"
sha256 = "{h}"
""".replace("{h}", "ab" * 32)


def test_bad_policy_files_name_every_problem(tmp_path: Path) -> None:
    assert parse_policy(GOOD).components["kernel"].versions == ("1.0",)
    bad = """
format = 2
colour = "blue"
[components.Kernel]
pcr = 16
[[components.Kernel.approved]]
version = "1.0 beta"
sha256 = "xyz"
[components.rootfs]
pcr = "8"
approved = []
[components.agent]
pcr = 9
extra = true
[[components.agent.approved]]
version = "1"
sha256 = "{h}"
[[components.agent.approved]]
version = "1"
sha256 = "{h}"
""".replace("{h}", "cd" * 32)
    with pytest.raises(ConfigError) as info:
        parse_policy(bad, "golden.toml")
    message = str(info.value)
    for expected in [
        "golden.toml: ",
        "format: found 2",
        "colour: unknown key",
        "components.Kernel: name must be",
        "components.Kernel.pcr: found 16",
        "components.Kernel.approved[0].version: found '1.0 beta'",
        "components.Kernel.approved[0].sha256: found 'xyz'",
        "components.rootfs.pcr: found '8'",
        "components.rootfs.approved: missing or empty",
        "components.agent.extra: unknown key",
        "components.agent.approved: version 1 listed twice",
        "components.agent.approved: digest cdcdcdcdcdcdcdcd… listed twice",
    ]:
        assert expected in message, (expected, message)
    for text, fragment in [
        ("format = 1", "components: missing or empty"),
        ("not toml [", "not valid TOML"),
        ("format = true\n" + GOOD.replace("format = 1", ""), "format: found True"),
    ]:
        with pytest.raises(ConfigError, match=fragment):
            parse_policy(text)
    with pytest.raises(ConfigError, match="cannot read policy"):
        load_policy(tmp_path / "absent.toml")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_policy(binary)


def test_empty_policy_has_no_pcrs() -> None:
    assert GoldenPolicy({}).pcrs == ()
