"""Devices check the operators' approval of every release they take (agent.protocol.releaseproof,
agent.releasefeed, ``release.install`` in agent.core): pure, with the FakeService of
test_agent_core, the real test operator CA (tests.operator_certs) and software release keys.

A bundle entry carries its canonical manifest and the ``release.approve`` Authorization; an entry
whose proof is missing, forged, for another release, another manifest or another op, short of the
quorum, or whose PCR policy is not the approved manifest's, makes the device refuse the bundle
(``release.approval``) and keep the one it holds. The attack: a service with the real release
key and the real service key publishes a bundle with a release no quorum approved and tells the
device to install it."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.core import AgentCore
from agent.protocol import authz as az
from agent.protocol.errors import ProtocolError
from agent.protocol.mls import codec
from agent.protocol.release import MAX_BUNDLE, ReleaseBundle, open_bundle, sign_bundle
from agent.protocol.releaseproof import ReleaseProof, encode_certs, manifest_pcrs
from agent.protocol.topics import RELEASES_TOPIC
from agent.protocol.wire import cose
from agent.protocol.wire.messages.release import ReleaseInstall
from firmware_sim.boot import default_components
from provisioning import releases as model
from provisioning.pki import create_ca, issue_client_cert
from tests.operator_certs import VALID_FOR, VALID_FROM, membership
from tests.pure.test_agent_core import T0, FakeService, refused_without_change
from tests.pure.test_agent_releases import RELEASE_KEY, bundle, retained
from tests.release_proofs import approve, manifest, pcrs, proof

pytestmark = pytest.mark.pure


def follower(*, min_approvals: int = 1, held: bytes | None = None) -> tuple[FakeService, AgentCore]:
    """A device following releases, holding bundle 1 (release 1.0, approved) unless ``held``."""
    service = FakeService()
    core = service.core("dev-a", membership=membership(min_approvals=min_approvals))
    data = bundle(1, 1, ("1.0",)) if held is None else held
    core.follow_releases(
        RELEASE_KEY.public_key(), open_bundle(data, RELEASE_KEY.public_key()), "1.0"
    )
    return service, core


def with_entry(
    version: str,
    entry_proof: ReleaseProof | None,
    *,
    values: dict[int, bytes] | None = None,
    seq: int = 2,
) -> bytes:
    """Bundle ``seq``: release 1.0 (approved) and ``version`` with ``entry_proof``, signed by the
    real release key."""
    proofs = {"1.0": proof("1.0")}
    if entry_proof is not None:
        proofs[version] = entry_proof
    return sign_bundle(
        seq=seq,
        generation=1,
        time=T0 + seq,
        releases=[("1.0", pcrs("1.0")), (version, pcrs(version) if values is None else values)],
        key=RELEASE_KEY,
        proofs=proofs,
    )


def _rogue_approval() -> bytes:
    """An approval by an ``op-alice`` whose certificate a CA of the attacker's issued."""
    ca = create_ca("rogue operator CA", now=VALID_FROM, valid_for=VALID_FOR)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue_client_cert(
        ca, key.public_key(), identity="op-alice", role="operator", now=VALID_FROM,
        valid_for=timedelta(days=3650),
    )  # fmt: skip
    found = manifest("1.1")
    request = az.Authorization.decode(approve("1.1", found.sha256)).request
    return az.Authorization(request, (az.sign_approval(request, key, cert),)).encode()


def _flipped_signature() -> bytes:
    parsed = az.Authorization.decode(proof("1.1").authz)
    [approval] = parsed.approvals
    sig = bytearray(approval.sig)
    sig[-1] ^= 1
    return az.Authorization(parsed.request, (az.Approval(approval.cert, bytes(sig)),)).encode()


def _canonical(version: str) -> bytes:
    return manifest(version).canonical


BAD: dict[str, Callable[[], bytes]] = {
    "missing": lambda: with_entry("1.1", None),
    "forged by another CA": lambda: with_entry(
        "1.1", ReleaseProof(_canonical("1.1"), _rogue_approval())
    ),
    "signature flipped": lambda: with_entry(
        "1.1", ReleaseProof(_canonical("1.1"), _flipped_signature())
    ),
    "approved for another version": lambda: with_entry(
        "1.1", ReleaseProof(_canonical("1.1"), approve("1.2", manifest("1.1").sha256))
    ),
    "approved for another manifest": lambda: with_entry(
        "1.1",
        ReleaseProof(_canonical("1.1"), approve("1.1", manifest("1.1", kernel="other").sha256)),
    ),
    "a revoke, not an approve": lambda: with_entry(
        "1.1",
        ReleaseProof(
            _canonical("1.1"),
            approve("1.1", manifest("1.1").sha256, op=az.OP_RELEASE_REVOKE),
        ),
    ),
    "another manifest than the approved one": lambda: with_entry(
        "1.1",
        ReleaseProof(
            manifest("1.1", kernel="other").canonical,
            approve("1.1", manifest("1.1").sha256),
        ),
    ),
    "PCR values not the approved manifest's": lambda: with_entry(
        "1.1", proof("1.1"), values=pcrs("evil")
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_an_entry_without_a_valid_approval_refuses_the_bundle(case: str) -> None:
    service, core = follower()
    before = core.releases.held if core.releases else None
    payload = retained(service, BAD[case]())
    assert refused_without_change(core, payload, RELEASES_TOPIC, T0) == "release.approval"
    assert core.releases is not None and core.releases.held == before
    assert core.rejections.count("release.approval") == 1


def test_one_approval_where_the_policy_needs_two_is_refused_and_two_are_taken() -> None:
    service, core = follower(min_approvals=2, held=bundle(1, 1, ()))
    one = with_entry("1.1", proof("1.1", approvers=("op-alice",)))
    assert refused_without_change(core, retained(service, one), RELEASES_TOPIC, T0) == (
        "release.approval"
    )
    same_twice = with_entry("1.1", proof("1.1", approvers=("op-alice", "op-alice")))
    out = core.handle(retained(service, same_twice), RELEASES_TOPIC, T0)
    assert out.refused is not None and out.refused.check == "release.approval"
    assert core.releases is not None and core.releases.held is not None
    assert core.releases.held.seq == 1
    two = sign_bundle(
        seq=2, generation=1, time=T0, releases=[("1.1", pcrs("1.1"))], key=RELEASE_KEY,
        proofs={"1.1": proof("1.1", approvers=("op-alice", "op-bob"))},
    )  # fmt: skip
    taken = core.handle(retained(service, two), RELEASES_TOPIC, T0)
    assert taken.refused is None and taken.release is not None
    assert core.releases.approved("1.1")


def test_an_approval_whose_window_closed_long_ago_still_counts() -> None:
    """Approved in 2022 for ten minutes, checked in 2023: judged at the request's own time."""
    service, core = follower()
    out = core.handle(retained(service, with_entry("1.1", proof("1.1"))), RELEASES_TOPIC, T0)
    assert out.refused is None and out.release is not None
    request = az.Request.decode(az.Authorization.decode(proof("1.1").authz).request)
    assert request.exp < T0


def test_entries_without_a_proof_only_in_the_first_bundle_and_carried_on_unchanged() -> None:
    """Releases the service imported at its first start carry no approval: the first bundle a
    device takes may hold them, later bundles may keep them unchanged, never add one."""
    imported = sign_bundle(
        seq=1, generation=1, time=T0, releases=[("1.0", pcrs("1.0"))], key=RELEASE_KEY
    )
    service = FakeService()
    core = service.core("dev-a")
    core.follow_releases(RELEASE_KEY.public_key(), None, None)
    assert core.handle(retained(service, imported), RELEASES_TOPIC, T0).release is not None
    kept = sign_bundle(
        seq=2, generation=1, time=T0, key=RELEASE_KEY,
        releases=[("1.0", pcrs("1.0")), ("1.1", pcrs("1.1"))], proofs={"1.1": proof("1.1")},
    )  # fmt: skip
    assert core.handle(retained(service, kept), RELEASES_TOPIC, T0).release is not None
    added = sign_bundle(
        seq=3, generation=1, time=T0, key=RELEASE_KEY,
        releases=[("1.0", pcrs("1.0")), ("1.1", pcrs("1.1")), ("1.2", pcrs("1.2"))],
        proofs={"1.1": proof("1.1")},
    )  # fmt: skip
    assert refused_without_change(core, retained(service, added), RELEASES_TOPIC, T0) == (
        "release.approval"
    )
    # 1.0 with other PCR values under the same version is no longer the imported entry
    swapped = sign_bundle(
        seq=3, generation=1, time=T0, key=RELEASE_KEY,
        releases=[("1.0", pcrs("evil")), ("1.1", pcrs("1.1"))], proofs={"1.1": proof("1.1")},
    )  # fmt: skip
    assert refused_without_change(core, retained(service, swapped), RELEASES_TOPIC, T0) == (
        "release.approval"
    )


@pytest.mark.parametrize("how", ["no approval", "a forged quorum"])
def test_a_rogue_service_with_the_real_release_key_cannot_install_an_unapproved_release(
    how: str,
) -> None:
    """The service host alone (its signing key and the real release key) publishes a bundle
    with release 6.6 nobody approved and tells the device to install it: the bundle is refused,
    the one held stays, the update hook never runs."""
    service, core = follower()
    core.can_install = True
    status = core.status()
    forged = None if how == "no approval" else ReleaseProof(_canonical("6.6"), _rogue_approval())
    rogue = with_entry("6.6", forged, seq=7)
    assert refused_without_change(core, retained(service, rogue), RELEASES_TOPIC, T0) == (
        "release.approval"
    )
    install = service.deliver("dev-a", ReleaseInstall(rollout="ro-evil", version="6.6"))
    assert install.install is None and install.refused is None and core.installing is None
    assert core.rejections.count("release.approval") == 2
    after = core.status()
    assert (
        after["releases"]
        == status["releases"]
        == {
            "bundle_seq": 1,
            "generation": 1,
            "version": "1.0",
        }
    )
    assert after["install"]["running"] is None
    assert after["install"]["last"]["state"] == "failed"
    assert after["install"]["last"]["check"] == "release.approval"


def test_bundle_round_trip_with_proofs_is_deterministic() -> None:
    data = bundle(4, 2, ("1.0", "1.1"))
    opened = open_bundle(data, RELEASE_KEY.public_key())
    assert [e.proof for e in opened.releases] == [proof_of(opened, "1.0"), proof_of(opened, "1.1")]
    assert ReleaseBundle.decode(opened.encode()) == opened
    assert cose.decode_sign1(data).payload == opened.encode()
    assert manifest_pcrs(manifest("1.1").canonical) == ("1.1", pcrs("1.1"))


def proof_of(opened: ReleaseBundle, version: str) -> ReleaseProof:
    entry = opened.version(version)
    assert entry is not None and entry.proof is not None
    assert hashlib.sha256(entry.proof.manifest).digest() == manifest(version).sha256
    return entry.proof


def test_a_version_1_bundle_is_read_without_proofs_and_may_carry_none() -> None:
    entry = open_bundle(bundle(1, 1, ("1.0",)), RELEASE_KEY.public_key()).releases[0]
    certs = encode_certs([entry.proof])
    v1 = {
        "v": 1, "seq": 1, "generation": 1, "time": T0, "revoked": [],
        "releases": [{k: v for k, v in entry.to_obj(certs).items() if k != "proof"}],
    }  # fmt: skip
    read = ReleaseBundle.decode(codec.encode(v1))
    assert read.releases[0].proof is None and read.releases[0].version == "1.0"
    v1["releases"] = [entry.to_obj(certs)]
    with pytest.raises(ProtocolError) as refused:
        ReleaseBundle.decode(codec.encode(v1))
    assert refused.value.check == "release.malformed"


def _resigned(data: bytes, mutate: Callable[[dict[str, object]], None]) -> bytes:
    obj = codec.decode(cose.decode_sign1(data).payload, MAX_BUNDLE, "bundle")
    assert isinstance(obj, dict)
    mutate(obj)
    return cose.sign1(codec.encode(obj), RELEASE_KEY)


def _certs(obj: dict[str, object]) -> list[bytes]:
    certs = obj["certs"]
    assert isinstance(certs, list)
    return certs


def _first_approval(obj: dict[str, object]) -> list[object]:
    releases = obj["releases"]
    assert isinstance(releases, list)
    approvals: list[list[object]] = releases[0]["proof"]["approvals"]
    return approvals[0]


TABLE: dict[str, Callable[[dict[str, object]], None]] = {
    "a certificate no approval names": lambda o: _certs(o).append(b"\xff" * 40),
    "a certificate twice": lambda o: _certs(o).append(_certs(o)[-1]),
    "certificates out of order": lambda o: _certs(o).reverse(),
    "an index past the table": lambda o: _first_approval(o).__setitem__(0, 99),
    "no table": lambda o: o.pop("certs"),
}


@pytest.mark.parametrize("case", sorted(TABLE))
def test_the_certificate_table_has_one_encoding(case: str) -> None:
    data = bundle(1, 1, ("1.0", "1.1"))
    if case == "certificates out of order":  # two operators: a table of two
        data = sign_bundle(
            seq=1, generation=1, time=T0, releases=[("1.0", pcrs("1.0"))], key=RELEASE_KEY,
            proofs={"1.0": proof("1.0", approvers=("op-alice", "op-bob"))},
        )  # fmt: skip
    with pytest.raises(ProtocolError) as refused:
        open_bundle(_resigned(data, TABLE[case]), RELEASE_KEY.public_key())
    assert refused.value.check == "release.malformed"


def test_sixty_four_releases_with_their_proofs_fit() -> None:
    """The bundle's limit holds the most releases a bundle carries, each approved by two
    operators with a manifest of the simulator's five components (docs/releases.md, "Size")."""
    versions = [f"2.{i}" for i in range(64)]
    manifests = {
        v: model.Manifest(
            v,
            tuple(
                model.Component(c.name, v, c.pcr, hashlib.sha256(f"{c.name} {v}".encode()).digest())
                for c in default_components(v)
            ),
        )
        for v in versions
    }
    data = sign_bundle(
        seq=2, generation=1, time=T0, key=RELEASE_KEY,
        releases=[(v, model.expected_pcrs(m)) for v, m in manifests.items()],
        proofs={
            v: ReleaseProof(m.canonical, approve(v, m.sha256, approvers=("op-alice", "op-bob")))
            for v, m in manifests.items()
        },
    )  # fmt: skip
    assert len(data) <= MAX_BUNDLE // 2  # ~76 KB: room for more approvals per release
    service, core = follower(min_approvals=2)
    out = core.handle(retained(service, data), RELEASES_TOPIC, T0)
    assert out.refused is None and out.release is not None
    assert len(out.release[0].releases) == 64


@pytest.mark.parametrize(
    "data",
    [
        b'{"version": "1.1", "components": []}',  # not canonical
        b"[" * 100_000 + b"]" * 100_000,  # nested past the parser's depth
        b'{"components":[],"version":"1.1"}',  # no components
        b"\xff",
        b"9" * 5000,  # past the integer digit limit
    ],
)
def test_a_manifest_that_is_not_one_is_refused(data: bytes) -> None:
    with pytest.raises(ProtocolError) as refused:
        manifest_pcrs(data)
    assert refused.value.check == "release.approval"


_PAYLOAD = ReleaseBundle.encode(open_bundle(bundle(3, 2, ("1.0", "1.1")), RELEASE_KEY.public_key()))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flips=st.lists(st.tuples(st.integers(0, len(_PAYLOAD) - 1), st.integers(0, 7)), max_size=3))
def test_the_bundle_decoder_refuses_or_reads_back_byte_for_byte(
    flips: list[tuple[int, int]],
) -> None:
    """Bit flips in a version 2 payload with proofs: either ``release.malformed`` or a bundle
    whose encoding is the same bytes (nothing half-parsed, one encoding)."""
    data = bytearray(_PAYLOAD)
    for at, bit in flips:
        data[at] ^= 1 << bit
    try:
        decoded = ReleaseBundle.decode(bytes(data))
    except ProtocolError as exc:
        assert exc.check == "release.malformed", exc.check
        return
    assert decoded.encode() == bytes(data)
