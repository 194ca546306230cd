"""The release bundle and its signed PCR policies (agent.protocol.release), pure: signing and
opening, every refusal by check id, the stale/replay rule and matching live PCRs. The TPM agrees
with the software digests in tests/tpm/test_release_digests.py."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol import release as rel
from agent.protocol.errors import ProtocolError
from agent.protocol.eventlog import EventType, MeasurementEvent
from agent.protocol.mls import codec
from agent.protocol.wire import cose

pytestmark = pytest.mark.pure

KEY = ec.generate_private_key(ec.SECP256R1())
OTHER = ec.generate_private_key(ec.SECP256R1())


def events(version: str) -> list[MeasurementEvent]:
    return [
        MeasurementEvent(
            pcr,
            EventType.IMAGE if name != "boot-config" else EventType.CONFIG,
            name,
            version,
            hashlib.sha256(f"{name}/{version}".encode()).digest(),
        )
        for pcr, name in ((0, "bootloader"), (1, "boot-config"), (4, "kernel"), (9, "agent"))
    ]


V10 = rel.expected_pcrs(events("1.0"))
V11 = rel.expected_pcrs(events("1.1"))


def bundle(
    seq: int = 1,
    generation: int = 0,
    key: ec.EllipticCurvePrivateKey = KEY,
    releases: tuple[tuple[str, dict[int, bytes]], ...] = (("1.0", V10), ("1.1", V11)),
    revoked: tuple[str, ...] = (),
) -> bytes:
    return rel.sign_bundle(
        seq=seq,
        generation=generation,
        time=1_800_000_000,
        releases=releases,
        revoked=revoked,
        key=key,
    )


def test_expected_pcrs_replays_from_zero() -> None:
    first = events("1.0")[0]
    assert V10[0] == hashlib.sha256(bytes(32) + first.digest).digest()
    assert sorted(V10) == [0, 1, 4, 9]


def test_open_bundle_round_trip_and_match() -> None:
    opened = rel.open_bundle(bundle(), KEY.public_key())
    assert [r.version for r in opened.releases] == ["1.0", "1.1"]
    assert rel.match(opened, V11) is opened.version("1.1")
    assert rel.match(opened, {**V11, 4: bytes(32)}) is None  # a patched kernel: no release
    assert rel.match(opened, {0: V10[0]}) is None  # PCRs missing: no match
    entry = opened.version("1.0")
    assert entry is not None
    assert entry.approved == rel.policy_pcr((0, 1, 4, 9), V10)


def test_signature_covers_generation() -> None:
    entry = rel.open_bundle(bundle(generation=3), KEY.public_key()).releases[0]
    entry.check(KEY.public_key(), 3)
    with pytest.raises(ProtocolError) as refused:
        entry.check(KEY.public_key(), 2)
    assert refused.value.check == "release.signature"


def test_bundle_by_another_key_is_refused() -> None:
    with pytest.raises(ProtocolError) as refused:
        rel.open_bundle(bundle(key=OTHER), KEY.public_key())
    assert refused.value.check == "release.signature"


def _resign(mutate: dict[str, object]) -> bytes:
    obj = dict(codec.decode(cose.decode_sign1(bundle()).payload, rel.MAX_BUNDLE, "b"))  # type: ignore[arg-type]
    obj.update(mutate)
    return cose.sign1(codec.encode(obj), KEY)


def test_entry_signed_by_another_key_inside_a_good_bundle_is_refused() -> None:
    foreign = rel.make_entry("1.1", V11, 0, OTHER)
    data = _resign({"releases": [foreign.to_obj()]})
    with pytest.raises(ProtocolError) as refused:
        rel.open_bundle(data, KEY.public_key())
    assert refused.value.check == "release.signature"


def test_entry_whose_approved_digest_lies_is_refused() -> None:
    good = rel.make_entry("1.1", V11, 0, KEY)
    lying = rel.ReleaseEntry(
        "1.1", good.pcrs, hashlib.sha256(b"x").digest(), good.approved, good.sig
    )
    with pytest.raises(ProtocolError) as refused:
        rel.open_bundle(_resign({"releases": [lying.to_obj()]}), KEY.public_key())
    assert refused.value.check == "release.policy"


@pytest.mark.parametrize(
    "mutate",
    [
        {"v": 3},
        {"extra": 1},
        {"seq": -1},
        {"releases": [{"version": "1.0"}]},
        {"revoked": ["1.0"]},  # both approved and revoked
        {"releases": "none"},
    ],
)
def test_malformed_bundles_are_refused(mutate: dict[str, object]) -> None:
    with pytest.raises(ProtocolError) as refused:
        rel.open_bundle(_resign(mutate), KEY.public_key())
    assert refused.value.check == "release.malformed"


def test_garbage_is_malformed() -> None:
    for data in (b"", b"\x00" * 10, bundle()[:-3], b"\xd2" + b"\xff" * 100):
        with pytest.raises(ProtocolError) as refused:
            rel.open_bundle(data, KEY.public_key())
        assert refused.value.check in {"release.malformed", "release.signature"}


def test_check_newer_refuses_replays_and_older_generations() -> None:
    one = rel.open_bundle(bundle(seq=5, generation=1), KEY.public_key())
    rel.check_newer(None, one)
    rel.check_newer(one, rel.open_bundle(bundle(seq=6, generation=1), KEY.public_key()))
    for seq, generation in ((5, 1), (4, 1), (7, 0)):
        with pytest.raises(ProtocolError) as refused:
            rel.check_newer(
                one, rel.open_bundle(bundle(seq=seq, generation=generation), KEY.public_key())
            )
        assert refused.value.check == "release.stale"


def test_policy_authorize_and_key_name_shapes() -> None:
    name = rel.key_name(KEY.public_key())
    assert len(name) == 34 and name[:2] == b"\x00\x0b"
    assert rel.key_name(OTHER.public_key()) != name
    assert rel.policy_authorize(name, rel.policy_ref(1)) != rel.policy_authorize(
        name, rel.policy_ref(2)
    )
    assert (
        rel.authorize_digest(b"\x01" * 32, 0)
        == hashlib.sha256(b"\x01" * 32 + rel.REF_LABEL + bytes(8)).digest()
    )


def test_pcr_selection_refuses_bad_indices() -> None:
    for pcrs in ((), (24,), (4, 1), (1, 1)):
        with pytest.raises(ProtocolError):
            rel.pcr_selection(pcrs)
