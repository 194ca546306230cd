"""Firmware releases in the sans-I/O service: manifests, the quorum that approves or revokes a
release, the golden policy read from the database by every instance, and rows a database writer
tampered with (provisioning/releases.py, provisioning/service/releases.py).

The fleet is test_service_core's, on a real SQLite file and on a real PostgreSQL database, with
operators holding certificates from a real operator CA (approvals signed with
agent.protocol.authz as the CLI signs them), ``min_approvals = 2`` and attestation configured
with release 1.0 as the golden measurements.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import update

from agent.protocol import authz, releaseproof
from agent.protocol.errors import ConfigError, ProtocolError
from agent.protocol.release import ReleaseBundle, check_newer, open_bundle
from agent.protocol.topics import FEED_RECIPIENT, RELEASES_TOPIC
from agent.protocol.wire.envelope import open_message
from agent.protocol.wire.messages.operator import Propose, ReleaseAdd
from agent.protocol.wire.messages.result import RequestInfo, RequestState, ResultStatus
from firmware_sim.boot import default_components
from provisioning import releases as model
from provisioning.db.runtime import ReleaseRow, ReleaseStateRow
from provisioning.policy import GoldenPolicy, policy_from_components
from provisioning.service import releases
from provisioning.service.context import Call, Clock
from provisioning.service.core import AttestationSettings, DeliveryService
from provisioning.service.store import releases as rows
from provisioning.service.store.releases import ReleaseState, Source
from tests.pure.test_service_core import Fleet, make_fleet
from tests.pure.test_service_requests import add_operator, approve, refusal
from tests.service_members import command_id

pytestmark = pytest.mark.pure

GOOD = default_components("1.0")
GRACE = 3600
NEXT = default_components("1.1")


def manifest_of(version: str) -> model.Manifest:
    return model.Manifest(
        version,
        tuple(
            model.Component(c.name, c.version, c.pcr, c.digest())
            for c in default_components(version)
        ),
    )


RELEASE_KEY = ec.generate_private_key(ec.SECP256R1())


def instance(
    fleet: Fleet, name: str, *, release_key: ec.EllipticCurvePrivateKey | None = RELEASE_KEY
) -> DeliveryService:
    """Another service instance on the fleet's database (nothing shared but the database)."""
    old = fleet.service
    return DeliveryService(
        fleet.sessions,
        signing_key=old._env.key,
        operator_ca=old._env.operator_ca,
        device_ca=old._env.devices.device_ca,
        settings=replace(old.settings, release_grace=GRACE),
        attestation=AttestationSettings(policy=policy_from_components(GOOD), interval=600),
        instance=name,
        release_key=release_key,
    )


DATABASE_BACKENDS = ("sqlite", "postgresql")


@pytest.fixture
def fleet(tmp_path: Path, database_url: str) -> Iterator[Fleet]:
    url = None if database_url.startswith("sqlite") else database_url
    for made in make_fleet(tmp_path, ("dev-1",), url=url, min_approvals=2, request_ttl=600):
        made.service = instance(made, "1")
        add_operator(made, "op-bob", "admin")
        made.tick(1)  # first start: the configured golden measurements are imported
        yield made


def golden(fleet: Fleet, service: DeliveryService | None = None) -> GoldenPolicy:
    env = (service or fleet.service)._env
    with fleet.sessions() as session:
        return releases.golden(Call(env, Clock.reading(fleet.now)), session)


def kernel_versions(policy: GoldenPolicy) -> tuple[str, ...]:
    return policy.components["kernel"].versions


def add(fleet: Fleet, version: str) -> None:
    with fleet.sessions.begin() as session:
        releases.add_release(
            session, manifest_of(version), by="op-admin", actor="local:op-admin", now=fleet.now
        )


def propose_release(fleet: Fleet, operator: str, op: str, version: str) -> RequestInfo:
    body = Propose(command_id(), op, (), release=version)
    fleet.send(fleet.operators[operator].command(body, fleet.now))
    answers = fleet.request_results.get(body.command_id)
    assert answers, [r.detail for r in fleet.results.get(body.command_id, [])]
    (info,) = answers[-1].requests
    return info


def stored(fleet: Fleet, version: str) -> rows.StoredRelease:
    with fleet.sessions() as session:
        found = rows.load_release(session, version)
    assert found is not None
    return found


def approve_by_two(fleet: Fleet, op: str, version: str) -> RequestInfo:
    info = propose_release(fleet, "op-admin", op, version)
    approve(fleet, "op-admin", info.request)
    _, done = approve(fleet, "op-bob", info.request)
    assert done is not None
    return done


# -- manifests ------------------------------------------------------------------------------


def test_a_manifest_round_trips_canonically_and_replays_its_pcrs() -> None:
    manifest = manifest_of("1.1")
    again = model.parse_manifest(manifest.canonical)
    assert again == manifest and again.canonical == manifest.canonical
    loose = json.dumps(manifest.to_obj(), indent=2).encode()  # another spelling, same manifest
    assert model.parse_manifest(loose).sha256 == manifest.sha256
    # the replay is what a device booted into the release measures (firmware_sim's boot order)
    values = model.expected_pcrs(manifest)
    assert sorted(values) == sorted({c.pcr for c in NEXT})
    assert values != model.expected_pcrs(manifest_of("1.0"))


def test_a_bad_manifest_names_every_problem() -> None:
    bad = {
        "version": "1 1",
        "extra": 1,
        "components": [
            {"name": "Kernel", "version": "1.0", "pcr": 4, "sha256": "00" * 32},
            {"name": "boot", "version": "1.0", "pcr": 16, "sha256": "zz" * 32},
            {"name": "boot", "version": "", "pcr": 2, "sha256": "AB" * 32, "x": 0},
        ],
    }
    with pytest.raises(ConfigError) as caught:
        model.parse_manifest(json.dumps(bad).encode(), "m.json")
    text = str(caught.value)
    for expected in (
        "extra: unknown key",
        "version: found '1 1'",
        "components[0].name",
        "components[1].pcr",
        "components[1].sha256",
        "components[2].version",
        "components[2].sha256",
        "components[2].x: unknown key",
    ):
        assert expected in text, expected
    with pytest.raises(ConfigError, match="listed twice"):
        twice = manifest_of("1.0").to_obj()
        twice["components"] = [*twice["components"], twice["components"][0]]  # type: ignore[misc]
        model.parse_manifest(json.dumps(twice).encode())
    with pytest.raises(ConfigError, match="not a JSON manifest"):
        model.parse_manifest(b"\xff")


def test_a_request_subject_is_encoded_only_when_present() -> None:
    plain = authz.Request(
        id=bytes(16), op="group.add", group="g", members=(authz.Member("d", bytes(32)),),
        policy=None, nbf=1, exp=2, by="op-a",
    )  # fmt: skip
    assert "subject" not in plain.to_obj()
    assert authz.Request.decode(plain.encode()) == plain
    subject = releaseproof.subject("1.1", bytes(32))
    release = authz.Request(
        id=bytes(16), op=authz.OP_RELEASE_APPROVE, group=None, members=(), policy=None,
        nbf=1, exp=2, by="op-a", subject=subject,
    )  # fmt: skip
    assert authz.Request.decode(release.encode()).subject == subject
    assert releaseproof.read_subject(subject) == ("1.1", bytes(32))
    with pytest.raises(ProtocolError, match="subject"):
        authz.Request(
            id=bytes(16), op=authz.OP_RELEASE_APPROVE, group=None, members=(), policy=None,
            nbf=1, exp=2, by="op-a",
        )  # fmt: skip
    with pytest.raises(ProtocolError, match="carries no subject"):
        authz.Request(
            id=bytes(16), op="group.add", group="g", members=plain.members, policy=None,
            nbf=1, exp=2, by="op-a", subject=subject,
        )  # fmt: skip
    obj = plain.to_obj()
    obj["subject"] = None  # one request, one encoding: an explicit null is refused
    from agent.protocol.mls import codec

    with pytest.raises(ProtocolError) as caught:
        authz.Request.decode(codec.encode(obj))
    assert caught.value.check == "authz.decode"


# -- the database and the quorum -------------------------------------------------------------


def test_first_start_imports_the_golden_measurements_as_approved_releases(fleet: Fleet) -> None:
    imported = stored(fleet, "1.0")
    assert (imported.state, imported.source) == (ReleaseState.APPROVED, Source.IMPORT)
    assert imported.manifest_sha256 == model.from_policy(policy_from_components(GOOD))[0].sha256
    assert [e.action for e in fleet.audit_entries()].count("release.import") == 1
    assert golden(fleet) == policy_from_components(GOOD)
    # a second instance's first start imports nothing more
    other = instance(fleet, "2")
    other.tick(fleet.now + 1)
    assert [e.action for e in fleet.audit_entries()].count("release.import") == 1


def test_two_admins_approve_a_release_and_the_other_instance_enforces_it(fleet: Fleet) -> None:
    second = instance(fleet, "2")
    assert kernel_versions(golden(fleet, second)) == ("1.0",)
    add(fleet, "1.1")
    assert stored(fleet, "1.1").state is ReleaseState.PROPOSED
    info = propose_release(fleet, "op-admin", authz.OP_RELEASE_APPROVE, "1.1")
    request = authz.Request.decode(info.request)
    assert info.required == 2 and request.group is None and request.members == ()
    assert request.subject == releaseproof.subject("1.1", manifest_of("1.1").sha256)
    _, pending = approve(fleet, "op-admin", info.request)
    assert pending is not None and pending.state is RequestState.PENDING
    assert stored(fleet, "1.1").state is ReleaseState.PROPOSED
    assert kernel_versions(golden(fleet, second)) == ("1.0",)

    _, done = approve(fleet, "op-bob", info.request)
    assert done is not None and done.state is RequestState.EXECUTED
    approved = stored(fleet, "1.1")
    assert approved.state is ReleaseState.APPROVED and approved.approval is not None
    assert approved.approved_by == "op-admin,op-bob"
    # the instance that had 1.0 alone cached sees the new seq at its next read: no restart
    assert kernel_versions(golden(fleet, second)) == ("1.0", "1.1")
    assert kernel_versions(golden(fleet)) == ("1.0", "1.1")
    with fleet.sessions() as session:
        state = rows.release_state(session)
    assert (state.seq, state.generation) == (2, 0)
    assert "release.approve" in [e.action for e in fleet.audit_entries()]


def test_release_requests_are_for_admins_and_name_a_release_in_the_right_state(
    fleet: Fleet,
) -> None:
    add(fleet, "1.1")
    for operator, op, version, check in (
        ("op-alice", authz.OP_RELEASE_APPROVE, "1.1", "op.role"),
        ("op-admin", authz.OP_RELEASE_APPROVE, "9.9", "release.unknown"),
        ("op-admin", authz.OP_RELEASE_APPROVE, "1.0", "release.state"),  # approved already
        ("op-admin", authz.OP_RELEASE_REVOKE, "1.1", "release.state"),  # not approved yet
    ):
        body = Propose(command_id(), op, (), release=version)
        fleet.send(fleet.operators[operator].command(body, fleet.now))
        assert check in refusal(fleet, body.command_id), (operator, op, version)


def test_a_revocation_by_two_admins_bumps_the_generation_and_leaves_the_policy(
    fleet: Fleet,
) -> None:
    add(fleet, "1.1")
    approve_by_two(fleet, authz.OP_RELEASE_APPROVE, "1.1")
    done = approve_by_two(fleet, authz.OP_RELEASE_REVOKE, "1.0")
    assert done.state is RequestState.EXECUTED, done.detail
    assert stored(fleet, "1.0").state is ReleaseState.REVOKED
    assert kernel_versions(golden(fleet)) == ("1.1",)
    with fleet.sessions() as session:
        state = rows.release_state(session)
    assert (state.seq, state.generation) == (3, 1)


# -- attacks: the row alone grants nothing ---------------------------------------------------


def refused_on_fresh_instance(fleet: Fleet) -> list[ProtocolError]:
    env = instance(fleet, "fresh")._env
    with fleet.sessions() as session:
        _good, refused = releases.verified_approved(env, session)
    return refused


def test_one_admin_cannot_approve_a_release_when_the_quorum_needs_two(fleet: Fleet) -> None:
    add(fleet, "1.1")
    info = propose_release(fleet, "op-admin", authz.OP_RELEASE_APPROVE, "1.1")
    approve(fleet, "op-admin", info.request)
    assert stored(fleet, "1.1").state is ReleaseState.PROPOSED
    # The database writer records that one approval as if it met the quorum.
    admin = fleet.operators["op-admin"]
    one = authz.sign_approval(info.request, admin.key, admin.cert)
    single = authz.Authorization(request=info.request, approvals=(one,)).encode()
    with fleet.sessions.begin() as session:
        session.execute(
            update(ReleaseRow)
            .where(ReleaseRow.version == "1.1")
            .values(state="approved", approval=single, approval_serial=0)
        )
        rows.advance(session, bump_generation=False, now=fleet.now)
    (refused,) = refused_on_fresh_instance(fleet)
    assert refused.check == "release.stored" and "authz.quorum" in refused.reason
    assert kernel_versions(golden(fleet)) == ("1.0",)


def test_a_release_set_approved_in_the_database_is_not_trusted(fleet: Fleet) -> None:
    add(fleet, "1.1")
    with fleet.sessions.begin() as session:
        session.execute(
            update(ReleaseRow).where(ReleaseRow.version == "1.1").values(state="approved")
        )
        rows.advance(session, bump_generation=False, now=fleet.now)
    (refused,) = refused_on_fresh_instance(fleet)
    assert refused.check == "release.stored" and "without a quorum" in refused.reason
    assert kernel_versions(golden(fleet)) == ("1.0",)
    # nor as an "import" the configured file does not hold
    with fleet.sessions.begin() as session:
        session.execute(
            update(ReleaseRow).where(ReleaseRow.version == "1.1").values(source="import")
        )
        rows.advance(session, bump_generation=False, now=fleet.now)
    (refused,) = refused_on_fresh_instance(fleet)
    assert refused.check == "release.stored" and "import" in refused.reason


def test_a_digest_flipped_under_an_approval_is_detected(fleet: Fleet) -> None:
    add(fleet, "1.1")
    approve_by_two(fleet, authz.OP_RELEASE_APPROVE, "1.1")
    tampered = manifest_of("1.1").to_obj()
    first = tampered["components"][0]  # type: ignore[index]
    first["sha256"] = "00" * 32
    canonical = json.dumps(tampered, sort_keys=True, separators=(",", ":")).encode()
    with fleet.sessions.begin() as session:
        # the writer rewrites the manifest, its digest and PCRs consistently: only the
        # approval's subject still names the approved manifest
        forged = model.parse_manifest(canonical)
        session.execute(
            update(ReleaseRow)
            .where(ReleaseRow.version == "1.1")
            .values(
                manifest=canonical,
                manifest_sha256=forged.sha256.hex(),
                pcrs=model.encode_pcrs(model.expected_pcrs(forged)),
            )
        )
        rows.advance(session, bump_generation=False, now=fleet.now)
    (refused,) = refused_on_fresh_instance(fleet)
    assert refused.check == "release.stored" and "another release" in refused.reason
    # a flipped digest column alone disagrees with the manifest
    with fleet.sessions.begin() as session:
        session.execute(
            update(ReleaseRow).where(ReleaseRow.version == "1.0").values(manifest_sha256="11" * 32)
        )
    refused_checks = refused_on_fresh_instance(fleet)
    assert [r.check for r in refused_checks] == ["release.stored", "release.stored"]
    assert dict(golden(fleet, instance(fleet, "3")).components) == {}


# -- the signed bundle, grace and expiry -----------------------------------------------------


def bundle(fleet: Fleet, service: DeliveryService | None = None) -> ReleaseBundle:
    """The bundle the service publishes retained (its envelope opened as a device opens it)."""
    (publish,) = (service or fleet.service).release_bundle(fleet.now)
    assert publish.topic == RELEASES_TOPIC
    message = open_message(
        publish.payload, fleet._service_signer, now=fleet.now, recipients={FEED_RECIPIENT}
    )
    return open_bundle(message.body.bundle, RELEASE_KEY.public_key())  # type: ignore[attr-defined]


def test_approval_and_revocation_publish_a_bundle_signed_for_the_generation(
    fleet: Fleet,
) -> None:
    first = bundle(fleet)  # signed at start from the imported release
    assert (first.seq, first.generation, [r.version for r in first.releases]) == (1, 0, ["1.0"])
    add(fleet, "1.1")
    approve_by_two(fleet, authz.OP_RELEASE_APPROVE, "1.1")
    second = bundle(fleet)
    assert (second.seq, second.generation) == (2, 0)
    entry = second.version("1.1")
    assert entry is not None and entry.pcrs == tuple(sorted({c.pcr for c in NEXT}))
    check_newer(first, second)
    # each operator-approved release carries its manifest and Authorization, which a device
    # trusting the fleet's operator CA and quorum policy accepts; the import carries none
    assert entry.proof is not None and entry.proof.manifest == manifest_of("1.1").canonical
    imported = second.version("1.0")
    assert imported is not None and imported.proof is None
    device = authz.AuthzVerifier([fleet.service._env.operator_ca])
    policy = authz.QuorumPolicy.initial(2)
    releaseproof.check_bundle(
        second,
        first,
        lambda signed: device.verify(
            signed, policy=policy, now=None, op=authz.OP_RELEASE_APPROVE, group=None
        ),
    )

    approve_by_two(fleet, authz.OP_RELEASE_REVOKE, "1.0")
    third = bundle(fleet)
    assert (third.seq, third.generation) == (3, 1)
    assert [r.version for r in third.releases] == ["1.1"] and third.revoked == ("1.0",)
    # the still-approved release is signed again for the new generation (open_bundle checked
    # every entry's signature against ref(1)); its old policy was for ref(0)
    assert third.version("1.1") != entry
    check_newer(second, third)
    with pytest.raises(ProtocolError) as stale:
        check_newer(third, second)
    assert stale.value.check == "release.stale"
    actions = [e.action for e in fleet.audit_entries()]
    assert actions.count("release.bundle") == 3


def test_a_superseded_release_expires_after_the_grace(fleet: Fleet) -> None:
    add(fleet, "1.1")
    approve_by_two(fleet, authz.OP_RELEASE_APPROVE, "1.1")
    assert stored(fleet, "1.0").superseded_at == fleet.now
    fleet.tick(GRACE - 10)
    assert stored(fleet, "1.0").state is ReleaseState.APPROVED
    fleet.tick(20)
    expired = stored(fleet, "1.0")
    assert expired.state is ReleaseState.EXPIRED and expired.ended_by == "grace"
    assert kernel_versions(golden(fleet)) == ("1.1",)
    latest = bundle(fleet)
    assert latest.generation == 1 and latest.revoked == ("1.0",)
    assert [r.version for r in latest.releases] == ["1.1"]
    entry = next(e for e in fleet.audit_entries() if e.action == "release.expire")
    assert entry.target == "1.0" and entry.actor == "service"
    # another instance ticking later expires nothing twice
    instance(fleet, "2").tick(fleet.now + 5)
    assert [e.action for e in fleet.audit_entries()].count("release.expire") == 1


def test_a_tampered_row_never_reaches_the_bundle(fleet: Fleet) -> None:
    add(fleet, "1.2")
    with fleet.sessions.begin() as session:
        session.execute(
            update(ReleaseRow).where(ReleaseRow.version == "1.2").values(state="approved")
        )
    add(fleet, "1.1")
    approve_by_two(fleet, authz.OP_RELEASE_APPROVE, "1.1")
    assert [r.version for r in bundle(fleet).releases] == ["1.0", "1.1"]


def test_without_a_release_key_no_bundle_is_published(fleet: Fleet) -> None:
    keyless = instance(fleet, "keyless", release_key=None)
    with fleet.sessions.begin() as session:
        session.execute(update(ReleaseStateRow).values(bundle=None))
    assert keyless.release_bundle(fleet.now) == []


def test_the_cli_signs_only_the_release_it_asked_for() -> None:
    from provisioning.requests_cli import check_proposed, describe

    asked = Propose(command_id(), authz.OP_RELEASE_APPROVE, (), release="1.1")
    digest = manifest_of("1.1").sha256

    def request(version: str, op: str = authz.OP_RELEASE_APPROVE) -> authz.Request:
        return authz.Request(
            id=bytes(16), op=op, group=None, members=(), policy=None, nbf=100, exp=700,
            by="op-admin", subject=releaseproof.subject(version, digest),
        )  # fmt: skip

    check_proposed(request("1.1"), asked, "op-admin", 100)
    assert f"  release:  1.1 (manifest SHA-256 {digest.hex()})" in describe(request("1.1"))
    for wrong in (request("1.2"), request("1.1", authz.OP_RELEASE_REVOKE)):
        with pytest.raises(ProtocolError) as caught:
            check_proposed(wrong, asked, "op-admin", 100)
        assert caught.value.check == "quorum.mismatch"


def test_a_release_whose_successor_was_revoked_does_not_expire(fleet: Fleet) -> None:
    add(fleet, "1.1")
    approve_by_two(fleet, authz.OP_RELEASE_APPROVE, "1.1")
    approve_by_two(fleet, authz.OP_RELEASE_REVOKE, "1.1")
    fleet.tick(GRACE + 10)
    assert stored(fleet, "1.0").state is ReleaseState.APPROVED
    assert kernel_versions(golden(fleet)) == ("1.0",)


def test_release_add_is_a_signed_command_that_validates_the_manifest(fleet: Fleet) -> None:
    manifest = manifest_of("1.1")
    good = json.dumps(manifest.to_obj(), indent=2).encode()
    cid = fleet.command("op-alice", ReleaseAdd(command_id(), good))
    result = fleet.final(cid)
    assert result.status is ResultStatus.DONE, result.detail
    assert manifest.sha256.hex() in result.detail
    added = stored(fleet, "1.1")
    assert (added.state, added.proposed_by) == (ReleaseState.PROPOSED, "op-alice")
    assert added.manifest == manifest.canonical  # kept in its one canonical spelling
    entry = [e for e in fleet.audit_entries() if e.action == "release.add"][-1]
    assert (entry.actor, entry.target) == ("operator:op-alice", "1.1")
    # the same version again, a bad manifest, a viewer: refused, nothing stored
    for operator, data, check in (
        ("op-alice", good, "release.exists"),
        ("op-alice", b'{"version": "1.2", "components": []}', "release.manifest"),
        ("op-viewer", json.dumps(manifest_of("1.2").to_obj()).encode(), "op.role"),
    ):
        cid = fleet.command(operator, ReleaseAdd(command_id(), data))
        assert check in refusal(fleet, cid), (operator, check)
    with fleet.sessions() as session:
        assert [r.version for r in rows.all_releases(session)] == ["1.0", "1.1"]


def test_the_dashboard_names_the_release_of_a_pending_request(fleet: Fleet) -> None:
    from tests.pure.test_service_requests import dashboard_overview

    add(fleet, "1.1")
    info = propose_release(fleet, "op-admin", authz.OP_RELEASE_APPROVE, "1.1")
    approve(fleet, "op-admin", info.request)
    request_id = authz.Request.decode(info.request).id.hex()
    page = dashboard_overview(fleet, "op-viewer")
    row = page[page.index(f'data-request="{request_id}"') :].split("</tr>")[0]
    assert "release.approve" in row and "release 1.1" in row
