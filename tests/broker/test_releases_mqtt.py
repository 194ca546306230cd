"""Release approval end to end over a real Mosquitto (mutual TLS, the product ACL): ``keyfleet
serve`` as a subprocess whose service signing key, device CA key and release-signing key are in
a SoftHSM2 token, ``[quorum] min_approvals = 2``, two admins running the CLI as subprocesses,
the database a SQLite file.

Shown: at start the service publishes, retained on ``kf/v1/feed/releases``, the bundle of the
release it imported from the golden measurements; ``keyfleet release add`` (a signed command)
proposes 1.1, one
admin's ``keyfleet release approve`` leaves it pending, the second admin's ``keyfleet approve``
approves it, and a device (its DevID client certificate, the product ACL) receives the new
bundle, signed by the release key for generation 0, and a device connecting later gets it
retained. ``keyfleet release list`` shows 1.1 approved by both admins.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.mqtt import MqttClient
from agent.protocol.release import ReleaseBundle, open_bundle
from agent.protocol.topics import FEED_RECIPIENT, RELEASES_TOPIC, SERVICE_ID
from agent.protocol.wire.envelope import Signer, open_message
from agent.protocol.wire.messages.release import ReleaseBundleMessage
from firmware_sim.release import demo_manifest, write_manifest
from firmware_sim.softhsm import SoftToken
from provisioning import custody, pki
from provisioning.registry import create_schema, make_engine
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

ADMINS = ("op-alice", "op-bob")
REQUEST_ID = re.compile(r"keyfleet approve ([0-9a-f]{32})")


@dataclass
class Releases:
    workdir: Path
    config: Path
    fleet: DeploymentPKI
    release_public: ec.EllipticCurvePublicKey
    device: tuple[Path, Path]
    args: dict[str, list[str]]

    def cli(self, operator: str | None, *args: str) -> tuple[int, str, str]:
        extra = self.args[operator] if operator is not None else []
        done = keyfleet(*args, *extra, cwd=self.workdir, timeout=90)
        return done.returncode, done.stdout, done.stderr

    def device_client(self, name: str) -> MqttClient:
        key_file, cert_file = self.device
        broker: MosquittoBroker = self.fleet.broker
        client = MqttClient(
            host=broker.host,
            port=broker.port,
            ca_file=broker.ca_file,
            cert_file=cert_file,
            key_file=key_file,
            client_id=name,
            clean_start=True,
        )
        client.connect()
        client.subscribe(RELEASES_TOPIC)
        return client

    def next_bundle(self, client: MqttClient, timeout: float = 30) -> ReleaseBundle:
        """The next release bundle the device receives, opened as a device opens it."""
        deadline = time.monotonic() + timeout
        service = Signer(SERVICE_ID, self.fleet.signing_public_key())
        while time.monotonic() < deadline:
            message = client.get(timeout=0.5)
            if message is None or message.topic != RELEASES_TOPIC:
                continue
            opened = open_message(
                message.payload,
                lambda kid: service,  # the envelope's signature is checked against it
                now=int(time.time()),
                recipients={FEED_RECIPIENT},
            )
            assert isinstance(opened.body, ReleaseBundleMessage)
            return open_bundle(opened.body.bundle, self.release_public)
        raise AssertionError("no release bundle arrived")


@pytest.fixture
def releases(
    tmp_path: Path,
    broker_pki: BrokerPKI,
    mosquitto_factory: BrokerFactory,
    softhsm_token: SoftToken,
) -> Iterator[Releases]:
    fleet = deployment_pki(tmp_path, "releases", broker_pki, mosquitto_factory, token=softhsm_token)
    release_ref = softhsm_token.uri("release-signing")
    release_public = custody.generate_token_key(custody.parse_token_uri(release_ref))
    database_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    config = tmp_path / "keyfleet.toml"
    config.write_text(
        service_config(
            db_url=database_url,
            broker=fleet.broker,
            client=fleet.service,
            instance="releases",
            groups="",
            quorum="min_approvals = 2\n",
            signing_key=fleet.signing_key_ref,
            device_ca_key=fleet.device_ca_key_ref,
            extra=f'\n[releases]\nsigning_key = "{release_ref}"\ngrace_days = 30\n',
        )
    )
    engine = make_engine(database_url)
    create_schema(engine)
    engine.dispose()
    device = SoftDevice.create("dev-r", fleet.device_ca, fleet.signing_public_key(), fleet.now)
    files = fleet.files
    key_file = write_pem(files / "dev-r.key", pki.key_to_pem(device.devid), private=True)
    cert_file = write_pem(files / "dev-r.pem", device.cert_pem.encode())
    args = {}
    for name in ADMINS:
        write_operator(files, fleet.operator_ca, name, role="admin", now=fleet.now, stem=name)
        add_operator(name, f"pki/{name}.pem", config=config, cwd=tmp_path)
        args[name] = operator_args(
            fleet.broker,
            cert=f"pki/{name}.pem",
            key=f"pki/{name}.key",
            service_cert=fleet.signing_cert,
        )
    log = tmp_path / "serve.log"
    service = start_serve(config, cwd=tmp_path, log=log, timeout=30)
    try:
        yield Releases(tmp_path, config, fleet, release_public, (key_file, cert_file), args)
    finally:
        if service.poll() is None:
            service.kill()
            service.wait(10)
        print(log.read_text(errors="replace")[-20_000:])


def test_two_admins_approve_a_release_and_devices_receive_the_signed_bundle(
    releases: Releases,
) -> None:
    device = releases.device_client("dev-r")
    try:
        first = releases.next_bundle(device)  # retained since the service started
        assert (first.seq, first.generation) == (1, 0)
        assert [r.version for r in first.releases] == ["1.0"]

        manifest = releases.workdir / "manifest-1.1.json"
        write_manifest(manifest, demo_manifest("1.1"))
        code, out, err = releases.cli("op-alice", "release", "add", str(manifest))
        assert code == 0, f"{out}\n{err}"
        assert "release 1.1 proposed" in out
        code, out, err = releases.cli("op-alice", "release", "approve", "1.1")
        assert code == 0, f"{out}\n{err}"
        assert "release:  1.1 (manifest SHA-256" in out and "needs 1 more" in out
        request_id = REQUEST_ID.search(out)
        assert request_id is not None, out
        code, out, err = releases.cli("op-bob", "approve", request_id.group(1), "--yes")
        assert code == 0, f"{out}\n{err}"
        assert "release:  1.1" in out and "done" in out

        second = releases.next_bundle(device)
        assert (second.seq, second.generation) == (2, 0)
        assert [r.version for r in second.releases] == ["1.0", "1.1"]
    finally:
        device.close()

    later = releases.device_client("dev-r")  # a device connecting later: the retained bundle
    try:
        assert releases.next_bundle(later) == second
    finally:
        later.close()

    code, out, err = releases.cli(
        None, "release", "list", "--config", str(releases.config), "--json"
    )
    assert code == 0, err
    listed = {row["version"]: row for row in json.loads(out)}
    assert listed["1.1"]["state"] == "approved"
    assert listed["1.1"]["approved_by"] == "op-alice,op-bob"
    assert listed["1.0"]["source"] == "import"
