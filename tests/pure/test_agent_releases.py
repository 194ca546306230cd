"""The release bundle at the device core and the agent's choice of a release (pure: software
keys, the FakeService of test_agent_core; no TPM). A newer bundle goes to the daemon
(``Outcome.release``); an older, foreign, forged or misaddressed one is refused with its check id
and changes nothing; the one held, delivered again after a reconnect, is no refusal.
``agent.releasestate`` picks the entry that opens the state key, and keeps the bundle files."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.core import TRUST_CHECKS, AgentCore
from agent.protocol.release import ReleaseBundle, open_bundle, sign_bundle
from agent.protocol.topics import FEED_RECIPIENT, RELEASES_TOPIC
from agent.protocol.wire.envelope import Signer, encode_message, open_message
from agent.protocol.wire.messages.key_state import KeyStateReport
from agent.protocol.wire.messages.release import ReleaseBundleMessage
from agent.releasestate import (
    BUNDLE_FILE,
    SEALED_BUNDLE_FILE,
    HeldReleases,
    Unapproved,
    choose_entry,
    load_boot,
    save_boot,
)
from tests.pure.test_agent_core import T0, FakeService, refused_without_change
from tests.release_proofs import pcrs, proof

pytestmark = pytest.mark.pure

RELEASE_KEY = ec.generate_private_key(ec.SECP256R1())


def bundle(
    seq: int,
    generation: int,
    versions: tuple[str, ...],
    key: ec.EllipticCurvePrivateKey = RELEASE_KEY,
) -> bytes:
    """Releases ``versions``, each with the operators' approval (``tests.release_proofs``)."""
    return sign_bundle(
        seq=seq,
        generation=generation,
        time=T0 + seq,
        releases=[(v, pcrs(v)) for v in versions],
        key=key,
        proofs={v: proof(v) for v in versions},
    )


def retained(service: FakeService, data: bytes, *, to: str = FEED_RECIPIENT) -> bytes:
    return encode_message(
        ReleaseBundleMessage(bundle=data),
        key=service.key,
        sender="keyfleet-service",
        to=to,
        seq=next(service.seq),
        time=service.now,
    )


def follower(held: bytes | None = None) -> tuple[FakeService, AgentCore]:
    service = FakeService()
    core = service.core("dev-a")
    opened = None if held is None else open_bundle(held, RELEASE_KEY.public_key())
    core.follow_releases(RELEASE_KEY.public_key(), opened, None if held is None else "1.0")
    return service, core


def test_a_newer_bundle_goes_to_the_daemon_and_the_same_one_again_is_no_refusal() -> None:
    service, core = follower(bundle(1, 1, ("1.0",)))
    data = bundle(2, 1, ("1.0", "1.1"))
    out = core.handle(retained(service, data), RELEASES_TOPIC, T0)
    assert out.refused is None and out.changed and out.handled == "release.bundle"
    assert out.release is not None
    received, raw = out.release
    assert (
        raw == data
        and received.seq == 2
        and [e.version for e in received.releases]
        == [
            "1.0",
            "1.1",
        ]
    )
    again = core.handle(retained(service, data), RELEASES_TOPIC, T0)
    assert again.refused is None and not again.changed and again.release is None
    status = core.status()["releases"]
    assert status == {"bundle_seq": 2, "generation": 1, "version": "1.0"}
    # the daemon could not keep it (disk full): forgotten, so its next delivery is taken
    core.forget_release(open_bundle(bundle(1, 1, ("1.0",)), RELEASE_KEY.public_key()))
    retry = core.handle(retained(service, data), RELEASES_TOPIC, T0)
    assert retry.release is not None and retry.release[1] == data
    report = core.report(T0).publishes[0]
    body = open_message(
        report.payload,
        lambda kid: Signer("dev-a", core._keys.devid.public_key()),  # type: ignore[attr-defined]
        now=T0,
        recipients={"keyfleet-service"},
    ).body
    assert isinstance(body, KeyStateReport)
    assert (body.release_seq, body.release_generation, body.release_version) == (2, 1, "1.0")


@pytest.mark.parametrize(
    ("make", "check"),
    [
        (lambda: bundle(1, 1, ("1.0", "1.1")), "release.stale"),  # same seq, other content
        (lambda: bundle(0, 1, ("1.0",)), "release.stale"),  # an older bundle replayed
        (lambda: bundle(5, 0, ("1.0",)), "release.stale"),  # an older generation
        (
            lambda: bundle(5, 1, ("1.0",), key=ec.generate_private_key(ec.SECP256R1())),
            "release.signature",
        ),
        (lambda: b"\x00not cose", "release.malformed"),
    ],
)
def test_refused_bundles_change_nothing_and_are_reported(make: object, check: str) -> None:
    service, core = follower(bundle(1, 1, ("1.0",)))
    payload = retained(service, make())  # type: ignore[operator]
    assert refused_without_change(core, payload, RELEASES_TOPIC, T0) == check
    assert core.releases is not None and core.releases.held is not None
    assert core.releases.held.seq == 1
    assert core.rejections.snapshot()[check] == 1
    # a trust refusal: keys.report carries it, and the next one is due soon
    assert check.startswith(TRUST_CHECKS) and core.report_due is not None


def test_a_bundle_not_signed_by_the_service_or_not_for_every_device_is_refused() -> None:
    service, core = follower(bundle(1, 1, ("1.0",)))
    forged = encode_message(
        ReleaseBundleMessage(bundle=bundle(2, 1, ("1.0",))),
        key=ec.generate_private_key(ec.SECP256R1()),
        sender="keyfleet-service",
        to=FEED_RECIPIENT,
        seq=1,
        time=T0,
    )
    assert refused_without_change(core, forged, RELEASES_TOPIC, T0).startswith("cose.")
    misaddressed = retained(service, bundle(2, 1, ("1.0",)), to="dev-b")
    assert refused_without_change(core, misaddressed, RELEASES_TOPIC, T0).startswith("envelope.")


def test_a_device_without_a_release_key_ignores_the_topic() -> None:
    service = FakeService()
    core = service.core("dev-a")
    out = core.handle(retained(service, bundle(1, 1, ("1.0",))), RELEASES_TOPIC, T0)
    assert out.handled == "ignored" and out.refused is None and out.release is None


def opened(data: bytes) -> ReleaseBundle:
    return open_bundle(data, RELEASE_KEY.public_key())


def test_choose_entry_takes_the_matching_release_of_the_key_generation() -> None:
    held = HeldReleases(RELEASE_KEY.public_key(), newest=opened(bundle(2, 1, ("1.0", "1.1"))))
    assert choose_entry(held, 1, pcrs("1.1")).version == "1.1"
    with pytest.raises(Unapproved) as unapproved:
        choose_entry(held, 1, pcrs("1.2"), last_boot=pcrs("1.1"))
    assert unapproved.value.check == "release.unapproved"
    assert "PCRs [4] differ from the last approved boot" in unapproved.value.reason
    with pytest.raises(Unapproved):
        choose_entry(HeldReleases(RELEASE_KEY.public_key()), 1, pcrs("1.0"))
    with pytest.raises(Unapproved, match="no bundle of that generation"):
        choose_entry(held, 0, pcrs("1.0"))  # a key of an older generation, its bundle gone


def test_between_a_revocation_and_the_reseal_only_still_approved_releases_open() -> None:
    held = HeldReleases(RELEASE_KEY.public_key(), newest=opened(bundle(2, 1, ("1.0", "1.1"))))
    held.adopt(opened(bundle(3, 2, ("1.1",))), sealed_generation=1)
    assert held.sealed is not None and held.sealed.generation == 1
    entry = choose_entry(held, 1, pcrs("1.1"))
    assert entry.version == "1.1" and held.sealed.version("1.1") == entry  # generation 1's
    with pytest.raises(Unapproved, match="not an approved release"):
        choose_entry(held, 1, pcrs("1.0"))  # revoked: generation 1 would open, not used
    held.resealed()
    assert held.sealed is None
    assert choose_entry(held, 2, pcrs("1.1")).version == "1.1"


def test_bundles_are_kept_on_disk_and_read_back_verified(tmp_path: Path) -> None:
    key = RELEASE_KEY.public_key()
    held = HeldReleases.load(tmp_path, key)
    assert held.newest is None and held.sealed is None
    first = bundle(1, 1, ("1.0",))
    held.adopt(opened(first), sealed_generation=None, raw=first)
    assert (tmp_path / BUNDLE_FILE).read_bytes() == first
    second = bundle(2, 2, ("1.0",))
    held.adopt(opened(second), sealed_generation=1, raw=second)
    assert (tmp_path / SEALED_BUNDLE_FILE).read_bytes() == first
    again = HeldReleases.load(tmp_path, key)
    assert again.newest == opened(second) and again.sealed == opened(first)
    again.resealed()
    assert not (tmp_path / SEALED_BUNDLE_FILE).exists()
    # a bundle file someone edited is left out, loudly, not trusted
    (tmp_path / BUNDLE_FILE).write_bytes(
        bundle(9, 9, ("1.0",), key=ec.generate_private_key(ec.SECP256R1()))
    )
    assert HeldReleases.load(tmp_path, key).newest is None
    # the PCRs of the last approved boot
    assert load_boot(tmp_path) is None
    save_boot(tmp_path, "1.0", pcrs("1.0"))
    assert load_boot(tmp_path) == pcrs("1.0")


def test_the_older_bundle_stays_while_an_app_secret_is_sealed_under_its_generation(
    tmp_path: Path,
) -> None:
    """``HeldReleases.others`` (the generations app secrets are under, ``agent.appseal``): the
    state key's re-seal does not drop the older bundle while an app secret still needs it."""
    key = RELEASE_KEY.public_key()
    under: set[int] = {1}
    held = HeldReleases.load(tmp_path, key)
    held.others = lambda: under
    first, second = bundle(1, 1, ("1.0",)), bundle(2, 2, ("1.0",))
    held.adopt(opened(first), sealed_generation=None, raw=first)
    held.adopt(opened(second), sealed_generation=1, raw=second)
    held.resealed()  # the state key is under generation 2, an app secret still under 1
    assert held.sealed == opened(first) and (tmp_path / SEALED_BUNDLE_FILE).exists()
    under.clear()
    under.add(2)  # the app secrets were sealed again
    held.resealed()
    assert held.sealed is None and not (tmp_path / SEALED_BUNDLE_FILE).exists()
