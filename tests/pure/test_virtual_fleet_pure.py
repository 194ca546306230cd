"""The virtual fleet without a broker: the agent's gate on software keys (refused in a normal
configuration, refused without the explicit flag, a loud warning when allowed), the fleet
configuration's problem report, registration, and a directly seeded group (``Group.assemble``)
whose registry rows carry the public state every member holds, that cannot be seeded twice, and
whose members all follow a real commit to the same epoch authenticator (sizes that are not
powers of two)."""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select

from agent.configschema import ConfigProblems
from agent.protocol.credentials import CredentialVerifier, verify_tpm_residency
from agent.protocol.errors import ConfigError, ProtocolError, StateError
from agent.protocol.hpke import serialize_public_key
from agent.protocol.mls import codec
from agent.protocol.mls.public import PublicGroup
from agent.protocol.wire.envelope import Signer, encode_message, open_message
from agent.protocol.wire.messages.base import Body
from agent.protocol.wire.messages.group import CommitMessage
from agent.protocol.wire.messages.service import CommitAction, CommitRequest
from firmware_sim.fleet import (
    VirtualFleet,
    load_devices,
    load_fleet_config,
    open_registry,
    prepare_identities,
)
from provisioning import pki
from provisioning.db.schema import AuditEntry, Device, Group, GroupMember

pytestmark = pytest.mark.pure

SERVICE = "keyfleet-service"


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)
    return path


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, pki.CertificateAuthority, object]:
    now = datetime.now(UTC)
    ca = pki.create_ca("pure device CA", now=now, valid_for=timedelta(days=2))
    broker_ca = pki.create_ca("pure broker CA", now=now, valid_for=timedelta(days=2))
    service_key = pki.generate_key()
    service_cert = pki.issue_client_cert(
        broker_ca,
        service_key.public_key(),
        identity=SERVICE,
        role="service",
        now=now,
        valid_for=timedelta(days=1),
    )
    _write(tmp_path / "ca.pem", pki.cert_to_pem(ca.certificate))
    _write(tmp_path / "ca.key", pki.key_to_pem(ca.private_key), private=True)
    _write(tmp_path / "broker-ca.pem", pki.cert_to_pem(broker_ca.certificate))
    _write(tmp_path / "service.pem", pki.cert_to_pem(service_cert))
    return tmp_path, ca, service_key


def _fleet_toml(directory: Path, *, insecure: bool, extra: str = "") -> Path:
    path = directory / "fleet.toml"
    path.write_text(
        f"""
[fleet]
dir = "virtual"
id_prefix = "dev-p"
service_cert = "service.pem"
{extra}
[broker]
host = "127.0.0.1"
port = 1
ca = "broker-ca.pem"

[device_ca]
cert = "ca.pem"
key = "ca.key"

[registry]
url = "sqlite:///fleet.db"

[simulation]
insecure_software_keys = {"true" if insecure else "false"}
"""
    )
    return path


def test_a_normal_configuration_refuses_the_software_keys(
    setup: tuple[Path, object, object],
) -> None:
    directory = setup[0]
    config = load_fleet_config(_fleet_toml(directory, insecure=False))
    with pytest.raises(ConfigError, match="insecure_software_keys = true AND --allow-insecure"):
        VirtualFleet.from_config(config, 2, allow_insecure=True)
    # The agent's own loader refuses such a device configuration, whatever the caller says.
    paths = prepare_identities(config, 2)
    with pytest.raises(ConfigProblems) as refused:
        load_devices(paths, allow_insecure=True)
    assert "accepted only with simulation.insecure_software_keys = true" in str(refused.value)


def test_the_explicit_flag_is_needed_and_allowing_it_is_loud(
    setup: tuple[Path, object, object], caplog: pytest.LogCaptureFixture
) -> None:
    directory = setup[0]
    config = load_fleet_config(_fleet_toml(directory, insecure=True))
    with pytest.raises(ConfigError, match="--allow-insecure-software-keys"):
        VirtualFleet.from_config(config, 2, allow_insecure=False)
    paths = prepare_identities(config, 3)
    with pytest.raises(ConfigError, match="--allow-insecure-software-keys are both needed"):
        load_devices(paths, allow_insecure=False)
    caplog.set_level(logging.WARNING)
    caplog.clear()
    devices = load_devices(paths, allow_insecure=True)
    assert [d.device_id for d in devices] == ["dev-p00001", "dev-p00002", "dev-p00003"]
    insecure = [r for r in caplog.records if "INSECURE" in r.getMessage()]
    assert any(
        "INSECURE: virtual fleet of 3 devices with SOFTWARE keys" in r.getMessage()
        and r.levelno == logging.WARNING
        for r in insecure
    )
    # the agent's per-device warnings: the first one of each kind shows, the rest are counted
    assert sum(r.name == "keyagent.daemon" for r in insecure) == 1
    assert sum(r.name == "keyagent.config" for r in insecure) == 1
    assert "3x 'INSECURE: the DevID key is a SOFTWARE key'" in insecure[-1].getMessage()
    assert "leaves" in repr(devices[0].keys) and "PRIVATE" not in repr(devices[0].keys)


def test_virtual_devices_have_devid_credentials_and_simulated_leaf_proofs(
    setup: tuple[Path, pki.CertificateAuthority, object],
) -> None:
    """The virtual devices' certificates pass the members' credential check and their (simulated)
    leaf proofs pass the residency check, bound to each device's own software AK."""
    directory, ca, _ = setup
    config = load_fleet_config(_fleet_toml(directory, insecure=True))
    devices = load_devices(prepare_identities(config, 2), allow_insecure=True)
    verifier = CredentialVerifier([ca.certificate])
    now = int(datetime.now(UTC).timestamp())
    names = []
    for device in devices:
        assert device.config.identity is not None
        cert = device.config.identity.devid_cert.certificates[0]
        assert (directory / "virtual" / device.device_id / "ak.key").stat().st_mode & 0o077 == 0
        verified = verifier.verify(cert.public_bytes(serialization.Encoding.DER), now)
        assert verified.device_id == device.device_id
        assert verified.signature_key == serialize_public_key(device.keys.devid.public_key())
        assert verified.ak_name is not None
        names.append(verified.ak_name)
        leaf_point = serialize_public_key(device.keys.new_leaf_key().public_key())
        proof = device.keys.prove_leaf(leaf_point)
        assert proof is not None
        verify_tpm_residency(proof, leaf_point, verified.ak_name)
    assert names[0] != names[1]
    with pytest.raises(ProtocolError) as other_ak:
        verify_tpm_residency(proof, leaf_point, names[0])
    assert other_ak.value.check == "tpm.proof.ak"


def test_registration_is_direct_audited_and_idempotent(setup: tuple[Path, object, object]) -> None:
    directory = setup[0]
    config = load_fleet_config(_fleet_toml(directory, insecure=True))
    first = prepare_identities(config, 4)
    again = prepare_identities(config, 4)  # same identities, nothing registered twice
    assert first == again
    assert oct((first[0].parent / "devid.key").stat().st_mode & 0o777) == "0o600"
    engine, sessions = open_registry(config.registry_url)
    try:
        with sessions() as session:
            devices = list(session.scalars(select(Device.device_id)))
            entries = list(
                session.scalars(
                    select(AuditEntry).where(AuditEntry.action == "device.register.simulated")
                )
            )
    finally:
        engine.dispose()
    assert sorted(devices) == [f"dev-p0000{i}" for i in range(1, 5)]
    assert len(entries) == 1 and "WITHOUT factory enrollment" in entries[0].reason


def test_fleet_configuration_problems_are_all_reported(setup: tuple[Path, object, object]) -> None:
    directory = setup[0]
    path = directory / "bad.toml"
    path.write_text(
        '[fleet]\ndir = "x"\nid_prefix = "-bad"\nservice_cert = "nope.pem"\n'
        '[broker]\nhost = "h"\nport = 0\nca = "broker-ca.pem"\n'
        '[device_ca]\ncert = "ca.pem"\nkey = "ca.key"\n'
        "[registry]\n"
    )
    with pytest.raises(ConfigProblems) as refused:
        load_fleet_config(path)
    text = "\n".join(refused.value.problems)
    assert "fleet.id_prefix" in text
    assert "fleet.service_cert" in text and "file not found" in text
    assert "broker.port" in text
    assert "registry.url: missing" in text


@pytest.mark.parametrize("count", [5, 6])
def test_a_seeded_group_follows_a_real_commit(
    setup: tuple[Path, object, object], count: int
) -> None:
    directory, _, service_key = setup
    config = load_fleet_config(_fleet_toml(directory, insecure=True))
    fleet = VirtualFleet.from_config(config, count, allow_insecure=True)
    engine, sessions = open_registry(config.registry_url)
    now = int(datetime.now(UTC).timestamp())
    try:
        fleet.seed_group("g1", sessions, now=now)
        with sessions() as session:
            members = session.execute(
                select(GroupMember.device_id, GroupMember.leaf_index).where(
                    GroupMember.group_id == "g1"
                )
            ).all()
            row = session.get(Group, "g1")
            assert row is not None
            public_tree, group_context = row.public_tree, row.group_context
            seeded = list(
                session.scalars(
                    select(AuditEntry).where(AuditEntry.action == "group.seed.simulated")
                )
            )
        # seeding the same group again is refused before anything changes in the cores
        with pytest.raises(StateError, match="already"):
            fleet.seed_group("g1", sessions, now=now)
    finally:
        engine.dispose()
    assert sorted(leaf for _, leaf in members) == list(range(count))
    assert {d: i for d, i in members} == {d.device_id: i for i, d in enumerate(fleet.devices)}
    assert len(seeded) == 1 and json.loads(seeded[0].details) == {"members": count}
    # the registry holds the very public state every member holds
    service_view = PublicGroup.from_state(codec.decode(public_tree, 1 << 24, "public_tree"))
    for device in fleet.devices:
        group = device.core.groups()["g1"]
        assert group.group_context() == group_context == service_view.state.group_context()
    first = fleet.authenticators("g1")
    assert len({v for v in first.values()}) == 1

    def envelope(body: Body, to: str, seq: int) -> bytes:
        return encode_message(body, key=service_key, sender=SERVICE, to=to, seq=seq, time=now)

    committer = fleet.devices[-1]
    request = CommitRequest(os.urandom(16), "g1", 1, CommitAction.UPDATE)
    out = committer.handle(
        committer.core.command_topic, envelope(request, committer.device_id, 1), now
    )
    assert [p.type for p in out] == ["group.commit"]
    verified = open_message(
        out[0].payload,
        lambda kid: Signer(committer.device_id, committer.keys.devid.public_key()),
        now=now,
        recipients=(SERVICE,),
    )
    assert isinstance(verified.body, CommitMessage)
    relay = envelope(CommitMessage("g1", 1, verified.body.commit), "g1", 2)
    for device in fleet.devices:
        answers = device.handle("kf/v1/grp/g1/commit", relay, now)
        assert [p.type for p in answers] == ["group.ack"]
    after = fleet.authenticators("g1")
    assert {v[0] for v in after.values() if v is not None} == {2}
    assert len({v for v in after.values()}) == 1
    assert fleet.status().errors == 0
    # the committer's old leaf key is gone, the new one is the only one it holds
    assert "1 leaves" in repr(committer.keys)
    fleet.stop()
