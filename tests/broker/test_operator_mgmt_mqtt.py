"""Operators managed under the quorum, end to end over a real Mosquitto (mutual TLS, the product
ACL): ``keyfleet serve`` as a subprocess with ``[quorum] min_approvals = 2`` on a SQLite file,
three admins bootstrapped locally, every later change a signed CLI request.

Shown: one admin alone leaves ``operator add`` pending (the newcomer cannot command yet); a
second admin's approval registers it; the local bootstrap is refused once the fleet is in use;
a removed admin's pending approval is withdrawn (the request stays pending) and its next command
is refused with ``operator.removed``; a device (its DevID client certificate, the product ACL)
receives the retained revocation feed head carrying the removal, verifies it under the fleet's
quorum as a device does and from then on refuses the removed admin's approval of a later request
(``operator.removed``) while the others still count; ``keyfleet pki crl operator --config``
issues an operator CA CRL, signed by the operator CA, that lists the removed certificate.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.mqtt import MqttClient
from agent.protocol import authz
from agent.protocol.errors import ProtocolError
from agent.protocol.feed import open_head
from agent.protocol.membership import Membership
from agent.protocol.topics import FEED_RECIPIENT, REVOCATION_FEED_TOPIC, SERVICE_ID
from agent.protocol.wire.envelope import Signer
from agent.protocol.wire.messages.feed import RevocationFeed
from provisioning import audit, pki
from provisioning.registry import make_engine, session_factory
from tests.fixtures.mosquitto import BrokerFactory, BrokerPKI, MosquittoBroker
from tests.service_deployment import (
    DeploymentPKI,
    add_operator,
    deployment_pki,
    keyfleet,
    operator_args,
    service_config,
    start_serve,
    write_operator,
    write_pem,
)
from tests.service_members import SoftDevice

pytestmark = pytest.mark.broker

ADMINS = ("op-alice", "op-bob", "op-carol")


@dataclass
class Fleet:
    workdir: Path
    config: Path
    database_url: str
    args: dict[str, list[str]]
    operator_ca: pki.CertificateAuthority
    made: DeploymentPKI
    device: tuple[Path, Path]  # a device's DevID key and certificate files

    def device_client(self) -> MqttClient:
        key_file, cert_file = self.device
        broker: MosquittoBroker = self.made.broker
        client = MqttClient(
            host=broker.host,
            port=broker.port,
            ca_file=broker.ca_file,
            cert_file=cert_file,
            key_file=key_file,
            client_id="dev-f",
            clean_start=True,
        )
        client.connect()
        client.subscribe(REVOCATION_FEED_TOPIC)
        return client

    def feed_head(self, client: MqttClient, seq: int, timeout: float = 30) -> RevocationFeed:
        """The feed head numbered ``seq`` as the device receives it (retained), opened as the
        agent opens it: signed by the service's key, addressed to every device."""
        service = Signer(SERVICE_ID, self.made.signing_public_key())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = client.get(timeout=0.5)
            if message is None or message.topic != REVOCATION_FEED_TOPIC:
                continue
            head = open_head(
                message.payload, lambda kid: service, now=int(time.time()), recipient=FEED_RECIPIENT
            )
            if head.seq == seq:
                return head
        raise AssertionError(f"no revocation feed head {seq} arrived")

    def operator_key(self, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        files = self.workdir / "pki"
        key = pki.key_from_pem((files / f"{name}.key").read_bytes())
        return key, pki.cert_from_pem((files / f"{name}.pem").read_bytes())

    def release_approval(self, *approvers: str) -> bytes:
        """An Authorization of a release approved now by ``approvers`` (what a device checks
        in a release bundle)."""
        now = int(time.time())
        request = authz.Request(
            id=os.urandom(authz.REQUEST_ID_SIZE),
            op=authz.OP_RELEASE_APPROVE,
            group=None,
            members=(),
            policy=None,
            nbf=now,
            exp=now + 600,
            by=approvers[0],
            subject=b"release 9.9",
        ).encode()
        approvals = tuple(
            authz.sign_approval(request, *self.operator_key(name)) for name in approvers
        )
        return authz.Authorization(request, approvals).encode()

    def cli(self, operator: str, *args: str) -> tuple[int, str]:
        done = keyfleet(*args, *self.args[operator], cwd=self.workdir, timeout=90)
        return done.returncode, done.stdout + done.stderr

    def request(self, operator: str, *args: str) -> dict[str, object]:
        """Run a proposing command with --json; the request as its last line shows it."""
        status, out = self.cli(operator, *args, "--json")
        assert status == 0, out
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        found: dict[str, object] = lines[-1]["request"]
        return found

    def audit(self) -> list[audit.AuditRecord]:
        engine = make_engine(self.database_url)
        try:
            with session_factory(engine)() as session:
                return audit.entries(session)
        finally:
            engine.dispose()


@pytest.fixture
def fleet(
    tmp_path: Path, broker_pki: BrokerPKI, mosquitto_factory: BrokerFactory
) -> Iterator[Fleet]:
    made = deployment_pki(tmp_path, "opmgmt", broker_pki, mosquitto_factory)
    files, broker = made.files, made.broker
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    config = tmp_path / "keyfleet.toml"
    config.write_text(
        service_config(
            db_url=url,
            broker=broker,
            client=made.service,
            instance="opmgmt",
            groups="",
            service="",
            quorum="min_approvals = 2\nrequest_ttl_seconds = 300\n",
        )
    )
    assert keyfleet("db", "init", "--config", str(config), cwd=tmp_path).returncode == 0
    # the operator CA's key beside its certificate, as `keyfleet pki init` lays it out
    pki.write_private_key(files / "operator-ca.key", made.operator_ca.private_key)
    args = {}
    for name, role in (*((a, "admin") for a in ADMINS), ("op-dave", "operator")):
        write_operator(files, made.operator_ca, name, role=role, now=made.now, stem=name)
        if name != "op-dave":
            add_operator(name, f"pki/{name}.pem", config=config, cwd=tmp_path)
        args[name] = operator_args(
            broker, cert=f"pki/{name}.pem", key=f"pki/{name}.key", service_cert=made.signing_cert
        )
    device = SoftDevice.create("dev-f", made.device_ca, made.signing_public_key(), made.now)
    key_file = write_pem(files / "dev-f.key", pki.key_to_pem(device.devid), private=True)
    cert_file = write_pem(files / "dev-f.pem", device.cert_pem.encode())
    log = tmp_path / "serve.log"
    service = start_serve(config, cwd=tmp_path, log=log, timeout=30)
    try:
        yield Fleet(tmp_path, config, url, args, made.operator_ca, made, (key_file, cert_file))
    finally:
        if service.poll() is None:
            service.kill()
            service.wait(10)
        print(log.read_text(errors="replace")[-20_000:])


def test_admins_add_and_remove_operators_by_quorum(fleet: Fleet) -> None:
    # One admin alone: the add is pending and the newcomer cannot command.
    added = fleet.request(
        "op-alice", "operator", "add", "op-dave", "--operator-cert", "pki/op-dave.pem"
    )
    assert added["state"] == "pending" and added["approvers"] == ["op-alice"], added
    status, out = fleet.cli("op-dave", "requests", "--json", "--timeout", "5")
    assert status != 0, out
    # The second admin's approval registers it.
    status, out = fleet.cli("op-bob", "approve", str(added["request_id"]), "--yes")
    assert status == 0, out
    assert "op:       operator.add" in out and "operator: op-dave" in out
    status, out = fleet.cli("op-dave", "requests", "--json")
    assert status == 0, out
    # The fleet is in use: the local path is closed.
    local = keyfleet(
        "operator", "add", "op-dave", "--cert", "pki/op-dave.pem", "--config", str(fleet.config),
        cwd=fleet.workdir,
    )  # fmt: skip
    assert local.returncode != 0 and "operator.bootstrap.closed" in local.stderr, local.stderr

    # Carol's approval waits on a role change; then alice and bob remove carol.
    role = fleet.request("op-carol", "operator", "role", "op-dave", "viewer")
    assert role["approvers"] == ["op-carol"], role
    removal = fleet.request("op-alice", "operator", "remove", "op-carol")
    status, out = fleet.cli("op-bob", "approve", str(removal["request_id"]), "--yes")
    assert status == 0, out
    listed_requests = keyfleet(
        "requests", "--json", *fleet.args["op-alice"], cwd=fleet.workdir, timeout=90
    )
    assert listed_requests.returncode == 0, listed_requests.stderr
    rows = {r["request_id"]: r for r in json.loads(listed_requests.stdout)}
    assert rows[role["request_id"]]["state"] == "pending"
    assert rows[role["request_id"]]["approvers"] == []
    # A device receives the removal in the retained feed head, verifies it under the fleet's
    # quorum and stops counting carol's approvals of later requests; the others still count.
    client = fleet.device_client()
    try:
        head = fleet.feed_head(client, seq=1)
    finally:
        client.close()
    device = Membership(
        device_cas=(fleet.made.device_ca.certificate,),
        operator_cas=(fleet.operator_ca.certificate,),
        min_approvals=2,
    )
    assert device.follow_feed(head)
    carol_der = fleet.operator_key("op-carol")[1].public_bytes(serialization.Encoding.DER)
    assert set(device.revocations.removed_operators()) == {hashlib.sha256(carol_der).digest()}
    with pytest.raises(ProtocolError) as refused_approval:
        device.check_release_approval(fleet.release_approval("op-carol", "op-alice"))
    assert refused_approval.value.check == "operator.removed"
    counted = device.check_release_approval(fleet.release_approval("op-alice", "op-bob"))
    assert counted.operators == {"op-alice", "op-bob"}
    # Carol's next command is refused.
    status, out = fleet.cli("op-carol", "requests", "--json", "--timeout", "5")
    assert status != 0, out
    refused = [e for e in fleet.audit() if e.actor == "operator:op-carol"]
    assert "operator.removed" in (refused[-1].reason or ""), refused[-1]
    listed = keyfleet(
        "operator", "list", "--config", str(fleet.config), "--json", cwd=fleet.workdir
    )
    states = {r["name"]: (r["state"], r["approved_by"]) for r in json.loads(listed.stdout)}
    assert states == {
        "op-alice": ("active", "bootstrap"),
        "op-bob": ("active", "bootstrap"),
        "op-carol": ("removed", "bootstrap"),
        "op-dave": ("active", "op-alice,op-bob"),
    }

    # The operator CA's CRL lists carol's certificate, signed by the operator CA.
    crl_run = keyfleet(
        "pki", "crl", "operator", "--dir", "pki", "--config", str(fleet.config),
        cwd=fleet.workdir,
    )  # fmt: skip
    assert crl_run.returncode == 0, crl_run.stderr
    crl = x509.load_pem_x509_crl((fleet.workdir / "pki" / "operator-ca.crl").read_bytes())
    assert crl.is_signature_valid(fleet.operator_ca.certificate.public_key())
    carol = pki.cert_from_pem((fleet.workdir / "pki" / "op-carol.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(carol.serial_number) is not None
    dave = pki.cert_from_pem((fleet.workdir / "pki" / "op-dave.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(dave.serial_number) is None
