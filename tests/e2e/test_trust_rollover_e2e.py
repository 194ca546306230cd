"""The service signing key rolled over under the quorum while a device is offline, against a real
Mosquitto (mutual TLS, the product ACL) and a real ``keyfleet serve``, with virtual devices
(agent cores with software keys, their own DevID client certificates).

``keyfleet keys rotate service-signing --new-cert --new-key --overlap`` by the admin: the service
signs the next trust bundle with its enrollment key, publishes the chain retained and signs with
the new key from then on. The online devices take the bundle; a rekey after the switch (its
commands signed with the new key) reaches them. The offline device comes back, takes the chain
from the retained topic, is caught up on the commit it missed and acks the next rekey. A rogue
chain published on the topic (a bundle handing trust to a key of the attacker's, signed by that
key) is refused by every device with ``trust.signer`` and changes nothing."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.mqtt import MqttClient
from agent.protocol import trust
from agent.protocol.topics import TRUST_TOPIC
from agent.protocol.wire.cose import key_id
from firmware_sim.fleet.mqtt import VirtualFleet
from provisioning import pki
from provisioning.db.runtime import TrustBundleRow
from tests.fixtures.deployment import DeployFactory
from tests.service_deployment import Deployment, keyfleet

pytestmark = pytest.mark.e2e

DEVICES = 3
OVERLAP = 600


@pytest.fixture
def installation(deploy: DeployFactory) -> Deployment:
    return deploy(
        "trust rollover test",
        instances=("trust-test",),
        operator=("op-root", "admin"),
        groups="ack_timeout_seconds = 20\n",
        device_prefix="dev-t",
        log_tail=30_000,
    )


def _wait(what: str, done: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _trust_seq(fleet: VirtualFleet, device_id: str) -> int:
    with fleet.lock:
        return fleet.by_id[device_id].core.trust.seq


def _new_signing_key(installation: Deployment) -> tuple[ec.EllipticCurvePrivateKey, str, str]:
    """The custodian's new service signing key, a file on the service host, and its certificate
    (relative paths, as the CLI and the configuration name them)."""
    key = pki.generate_key()
    now = installation.pki.now
    ca = pki.create_ca("service signing 2 CA", now=now, valid_for=timedelta(days=365))
    cert = pki.issue_client_cert(
        ca, key.public_key(), identity="keyfleet-service-signing", role="service", now=now,
        valid_for=timedelta(days=365),
    )  # fmt: skip
    pki.write_private_key(installation.workdir / "pki" / "service-signing-2.key", key)
    pki.write_certificate(installation.workdir / "pki" / "service-signing-2.pem", cert)
    return key, "pki/service-signing-2.key", "pki/service-signing-2.pem"


def test_the_service_key_rolls_over_while_a_device_is_offline(installation: Deployment) -> None:
    fleet = installation.virtual_fleet(DEVICES)
    ids = [device.device_id for device in fleet.devices]
    online, away = ids[:-1], ids[-1]
    fleet.start(timeout=60)
    try:
        created = installation.cli("group", "create", "g1", "--members", *ids, timeout=240)
        assert created.returncode == 0, created.stdout + created.stderr
        settled = fleet.wait_settled("g1", timeout=60)

        fleet.set_offline(away, True)
        _wait("the device to go offline", lambda: not fleet._link_of(away).connected)
        new_key, key_ref, cert_path = _new_signing_key(installation)
        rotated = installation.cli(
            "keys", "rotate", "service-signing", "--new-cert", cert_path, "--new-key", key_ref,
            "--overlap", str(OVERLAP), timeout=120,
        )  # fmt: skip
        out = rotated.stdout + rotated.stderr
        assert rotated.returncode == 0, out
        assert "trust bundle: 1" in out and key_id(new_key.public_key()).hex() in out, out
        rows = installation.read(lambda s: s.query(TrustBundleRow).all())
        assert [(r.seq, r.key_ref) for r in rows] == [(1, key_ref)]

        # the online devices take the bundle; the offline one still holds bundle 0
        for device_id in online:
            _wait(f"{device_id} to take bundle 1", lambda d=device_id: _trust_seq(fleet, d) == 1)
        assert _trust_seq(fleet, away) == 0

        # a rekey after the switch: its commands are signed with the new key; the operator's
        # tool verifies the service's answers with the new certificate now
        args = list(installation.operator_args)
        args[args.index("--service-cert") + 1] = cert_path
        rekeyed = keyfleet("rekey", "--group", "g1", *args, cwd=installation.workdir, timeout=120)
        out = rekeyed.stdout + rekeyed.stderr
        # committed and acked by the online members; the offline one is the only straggler
        assert f"{len(online)} acked, 1 pending" in out, out
        assert rekeyed.returncode == 3 and f"stragglers: {away}" in out, out
        _wait(
            "the online devices at the rekey's epoch",
            lambda: all(fleet.epochs("g1")[d] == settled + 1 for d in online),
        )

        # the offline device comes back: chain, catch-up, and the next rekey
        fleet.set_offline(away, False)
        _wait(f"{away} to take bundle 1", lambda: _trust_seq(fleet, away) == 1, timeout=60)
        fleet.wait_epoch("g1", settled + 1, timeout=60)
        again = keyfleet("rekey", "--group", "g1", *args, cwd=installation.workdir, timeout=120)
        assert again.returncode == 0, again.stdout + again.stderr
        fleet.wait_epoch("g1", settled + 2, timeout=60)
        views = fleet.authenticators("g1")
        assert len({view for view in views.values()}) == 1, views

        # a rogue chain: a bundle handing trust to the attacker's key, signed by it
        held = fleet.by_id[away].core.trust
        rogue = ec.generate_private_key(ec.SECP256R1())
        forged = trust.TrustBundle(2, (trust.ServiceKey(trust.key_der(rogue.public_key())),))
        chain = trust.TrustChain(
            (*trust.TrustChain.decode(_retained(installation)).links,
             trust.TrustLink(trust.sign_link(forged, rogue), rows[0].authz)),
        ).encode()  # fmt: skip
        tap = _service_tap(installation)
        try:
            tap.publish(TRUST_TOPIC, chain, retain=False)
        finally:
            tap.close()
        _wait(
            "every device to refuse the rogue chain",
            lambda: all(
                fleet.by_id[d].core.rejections.snapshot().get("trust.signer", 0) >= 1 for d in ids
            ),
        )
        assert all(fleet.by_id[d].core.trust == held for d in ids)
        assert fleet.status().errors == 0
        # the service learns it from the device's next keys.report
        log = next(iter(installation.logs.values()))
        _wait(
            "the service to log the device's bundle",
            lambda: (
                f"{away} holds trust bundle 1 (the chain is at 1)"
                in log.read_text(errors="replace")
            ),
            timeout=45,
        )
    finally:
        fleet.stop()


def _service_tap(installation: Deployment) -> MqttClient:
    """A client with the service's broker identity under another client id: what a service host
    that publishes on its own topics can do."""
    files = installation.pki.service
    client = MqttClient(
        host=installation.broker.host,
        port=installation.broker.port,
        ca_file=files.ca_file,
        cert_file=files.cert_file,
        key_file=files.key_file,
        client_id=f"trust-test-tap-{time.monotonic_ns()}",
        clean_start=True,
        session_expiry=0,
    )
    client.connect()
    return client


def _retained(installation: Deployment) -> bytes:
    client = _service_tap(installation)
    try:
        client.subscribe(TRUST_TOPIC)
        message = client.get(timeout=10)
        assert message is not None and message.topic == TRUST_TOPIC
        return message.payload
    finally:
        client.close()
