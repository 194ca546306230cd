"""Members decide who joins, on the lab: Mosquitto with TLS, ``keyfleet serve`` on SQLite and on
PostgreSQL with ``[quorum] min_approvals = 2``, four agents on swtpm.

A rogue service harness holds what the service host holds: the service's signing key (it signs
commands the agents accept as the service's, sent over the service's own TLS identity) and the
device CA key (it mints DevID certificates). One operator colludes with it (one approval). Every
attack is refused by the agents with its check id (in their logs and refusal counters), the
group stays where it was, and the attacker's keys open nothing the members encrypt.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from agent.mqtt import MqttClient
from agent.protocol import authz as az
from agent.protocol.dataseal import open_sealed
from agent.protocol.errors import ProtocolError
from agent.protocol.hpke import serialize_public_key
from agent.protocol.membership import ChangeAuthorization
from agent.protocol.mls.group import Group
from agent.protocol.mls.messages import KeyPackage
from agent.protocol.secret import Secret
from agent.protocol.topics import SERVICE_ID, device_cmd_topic, device_report_topic
from agent.protocol.wire.envelope import Signer, encode_message, open_message
from agent.protocol.wire.messages.base import Body
from agent.protocol.wire.messages.group import KeyPackageMessage
from agent.protocol.wire.messages.service import (
    CommitAction,
    CommitRequest,
    KeyPackageRequest,
    WelcomeDelivery,
)
from firmware_sim.lab import Lab, LabDevice
from provisioning import custody, pki
from tests.fixtures.fleet import service_tap

pytestmark = pytest.mark.e2e
DATABASE_BACKENDS = ("sqlite", "postgresql")
LAB_OPTIONS = {"devices": 4, "min_approvals": 2}
G = "g-trust"


class Rogue:
    """The service host turned attacker: signs with the real service key over the service's
    TLS identity, mints DevID certificates with the device CA key."""

    def __init__(self, lab: Lab) -> None:
        assert lab.pki is not None
        self.lab = lab
        self.key = custody.load_private_key(lab.pki.signing_key_ref)
        self.device_ca = pki.CertificateAuthority(
            pki.cert_from_pem(lab.pki.device_ca.read_bytes()),
            custody.load_private_key(lab.pki.device_ca_key_ref),
        )
        self.seq = int(time.time() * 1000) + 10_000_000  # above the service's clock-based seqs
        self.client: MqttClient = service_tap(lab, "rogue-service")

    def send(self, device: LabDevice, body: Body) -> None:
        self.seq += 1
        payload = encode_message(
            body, key=self.key, sender=SERVICE_ID, to=device.id, seq=self.seq, time=int(time.time())
        )
        self.client.publish(device_cmd_topic(device.id), payload)

    def key_package(self, device: LabDevice) -> KeyPackage:
        """Ask ``device`` for a KeyPackage as the service may (it comes back on its report
        topic, which the service's identity reads)."""
        self.client.subscribe(device_report_topic(device.id))
        command_id = os.urandom(16)
        self.send(device, KeyPackageRequest(command_id))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            message = self.client.get(timeout=1)
            if message is None:
                continue
            self.client.ack(message)
            if message.topic != device_report_topic(device.id):
                continue
            opened = open_message(
                message.payload,
                lambda kid: Signer(device.id, self.devid_key(device)),
                now=int(time.time()),
                recipients={SERVICE_ID},
            )
            body = opened.body
            if isinstance(body, KeyPackageMessage) and body.command_id == command_id:
                return KeyPackage.decode(body.key_package)
        raise AssertionError(f"no key package from {device.id}")

    def devid_key(self, device: LabDevice) -> ec.EllipticCurvePublicKey:
        cert = self.lab.registry(lambda r: r.device(device.id).devid_cert_pem)
        public = pki.cert_from_pem(cert.encode()).public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        return public

    def mint(self, device_id: str) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
        """A DevID key and certificate for ``device_id`` from the real device CA."""
        key = pki.generate_key()
        cert = pki.issue_devid_cert(
            self.device_ca,
            key.public_key(),
            device_id=device_id,
            hardware_serial=f"ROGUE-{device_id}",
            now=datetime.now(UTC) - timedelta(minutes=5),
            valid_for=timedelta(days=1),
        )
        return key, cert.public_bytes(Encoding.DER)

    def one_approval(self, op: str, members: list[tuple[str, bytes]]) -> bytes:
        """The colluding operator's approval alone (op-ops's real key and certificate)."""
        assert self.lab.pki is not None
        identity = self.lab.pki.operators["op-ops"]
        now = int(time.time())
        request = az.Request(
            id=os.urandom(az.REQUEST_ID_SIZE),
            op=op,
            group=G,
            members=tuple(az.Member.of(d, p) for d, p in members),
            policy=None,
            nbf=now - 60,
            exp=now + 3600,
            by="op-ops",
        ).encode()
        approval = az.sign_approval(
            request,
            pki.key_from_pem(identity.key.read_bytes()),
            pki.cert_from_pem(identity.cert.read_bytes()),
        )
        return az.Authorization(request, (approval,)).encode()


@pytest.fixture(scope="module")
def lab(fleet_lab: Lab) -> Lab:
    d0, d1, d2, _ = (d.id for d in fleet_lab.devices)
    created = fleet_lab.op("group", "create", G, "--members", d0, d1, d2, timeout=120)
    assert created.returncode == 4, str(created)  # a second operator must approve
    assert created.final is not None
    request_id = created.final["request"]["request_id"]
    approved = fleet_lab.op("approve", request_id, "--yes", operator="op-admin", timeout=120)
    assert approved.returncode == 0, str(approved)
    # create, two adds, and the last joiner's first self-update (docs/treekem.md "Joining")
    assert fleet_lab.wait_settled(G, fleet_lab.devices[:3], timeout=60) >= 2
    return fleet_lab


@pytest.fixture
def rogue(lab: Lab) -> Iterator[Rogue]:
    attacker = Rogue(lab)
    yield attacker
    attacker.client.close()


def epochs(lab: Lab) -> dict[str, int | None]:
    return {d.id: d.epoch(G) for d in lab.devices}


def refused(device: LabDevice, check: str, timeout: float = 20) -> None:
    """``device``'s agent refused a message with ``check``: its log says so and its status
    file counts it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = device.status() or {}
        if status.get("rejections", {}).get(check, 0) >= 1 and f"[{check}]" in device.log_tail():
            return
        time.sleep(0.2)
    raise AssertionError(f"{device.id} did not refuse with {check}: {device.log_tail()[-2000:]}")


def audited_refusals(lab: Lab, device: LabDevice, timeout: float = 30) -> dict[str, object]:
    """The refusal counts the service audited from ``device``'s latest keys.report."""
    deadline = time.monotonic() + timeout
    latest: dict[str, object] = {}
    while time.monotonic() < deadline:
        entries = [
            e
            for e in lab.audit()
            if e.action == "device.refused" and e.actor == f"device:{device.id}"
        ]
        if entries:
            latest = entries[-1].details_dict()
            if len(latest) >= 3:
                return latest
        time.sleep(0.5)
    return latest


def members_of(lab: Lab) -> list[str]:
    row = next(row for row in lab.groups() if row["group_id"] == G)
    return sorted(row["members"])


def test_rogue_service_adds_without_a_quorum_and_a_key_package_outside_a_tpm(
    lab: Lab, rogue: Rogue
) -> None:
    d0, _, _, outsider = lab.devices
    before, listed = epochs(lab), members_of(lab)
    epoch = d0.epoch(G)
    assert epoch is not None
    real = rogue.key_package(outsider)  # a real device's KeyPackage, its key in its TPM
    # 1. the add of a real device with no authorization at all
    rogue.send(d0, CommitRequest(os.urandom(16), G, epoch, CommitAction.ADD, outsider.id,
                                 real.encode()))  # fmt: skip
    refused(d0, "authz.missing")
    # 2. one operator's approval where the policy needs two
    one = rogue.one_approval("group.add", [(outsider.id, real.signature_key)])
    rogue.send(d0, CommitRequest(os.urandom(16), G, epoch, CommitAction.ADD, outsider.id,
                                 real.encode(), authz=one))  # fmt: skip
    refused(d0, "authz.quorum")
    # 3. a phantom device: DevID certificate minted with the device CA, leaf key in software
    devid, credential = rogue.mint("dev-phantom")
    leaf = ec.generate_private_key(ec.SECP256R1())
    phantom = KeyPackage.create(
        b"dev-phantom",
        devid,
        leaf.public_key(),
        credential,
        init_key=ec.generate_private_key(ec.SECP256R1()).public_key(),
    )
    one = rogue.one_approval(
        "group.add", [("dev-phantom", serialize_public_key(devid.public_key()))]
    )
    rogue.send(d0, CommitRequest(os.urandom(16), G, epoch, CommitAction.ADD, "dev-phantom",
                                 phantom.encode(), authz=one))  # fmt: skip
    refused(d0, "tpm.proof.missing")
    time.sleep(2)
    assert epochs(lab) == before and members_of(lab) == listed
    # the fleet learns what d0 refused: its keys.report carries the counts, the service audits
    reported = audited_refusals(lab, d0)
    assert {"authz.missing", "authz.quorum", "tpm.proof.missing"} <= set(reported), reported


def test_rogue_welcomes_into_a_fake_group_are_refused_and_open_nothing(
    lab: Lab, rogue: Rogue
) -> None:
    d0, d1, _, outsider = lab.devices
    before = epochs(lab)
    real_epoch = d1.epoch(G)
    assert real_epoch is not None
    # the rogue's own group under the real group's name, with a leaf it minted
    devid, credential = rogue.mint("dev-fake")
    leaf = ec.generate_private_key(ec.SECP256R1())
    own = KeyPackage.create(
        b"dev-fake",
        devid,
        leaf.public_key(),
        credential,
        init_key=ec.generate_private_key(ec.SECP256R1()).public_key(),
    )
    admit = rogue.one_approval(
        "group.create", [("dev-fake", serialize_public_key(devid.public_key()))]
    )
    envelope = ChangeAuthorization(admit).encode()
    fake = Group.create(G.encode(), own, leaf, authz=envelope)
    while fake.epoch < real_epoch + 4:
        fake = fake.update(devid, ec.generate_private_key(ec.SECP256R1())).group
    for victim, check in ((d1, "authz.quorum"), (outsider, "authz.quorum")):
        kp = rogue.key_package(victim)
        result = fake.add(devid, [kp], authz=envelope)
        assert result.welcome is not None
        # with the Authorization its leaves record, as a service delivers it
        rogue.send(
            victim,
            WelcomeDelivery(G, result.group.epoch, result.welcome.encode(), (envelope,)),
        )
        refused(victim, check)
        data_key = Secret(result.group.data_key(32))
        # the members' data stays theirs: the fake group's key opens none of it
        with d0.api() as api:
            blob = api.encrypt(G, b"pump 3 pressure")
        with d1.api() as api:
            assert api.decrypt(G, blob) == b"pump 3 pressure"
        with pytest.raises(ProtocolError):
            open_sealed(blob, lambda name, epoch, key=data_key: key)
    assert epochs(lab) == before
    assert outsider.epoch(G) is None
