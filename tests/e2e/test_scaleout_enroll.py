"""Factory enrollment across two ``keyfleet serve`` processes over one database (a SQLite file and
a real PostgreSQL, tests/fixtures/postgres.py), each serving the enrollment API on its own port
(mutual TLS), as behind a load balancer without affinity: a station starts a session on one
instance and finishes it on the other; a retried finish returns the same identity from either;
two finishes of one session sent to both instances at once register one device and both answer
with its identity; a wrong answer on one instance ends the session on the other. The device is a
swtpm answering the credential challenge through factory mode, the station is
``provisioning.station.FleetClient`` over HTTPS.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from agent.factory import FactoryDevice
from agent.protocol.errors import ProtocolError
from provisioning import audit
from provisioning.enroll import DeviceIdentity
from provisioning.registry import Registry
from provisioning.station import FleetClient
from tests.fixtures.deployment import DeployFactory
from tests.fixtures.swtpm import ManufacturerCA, SwtpmFactory
from tests.service_deployment import Deployment
from tests.tpm.test_enroll import (
    STATION,
    activate,
    at_once,
    device_start_request,
    factory_device,
    make_pki,
)

pytestmark = pytest.mark.e2e
DATABASE_BACKENDS = ("sqlite", "postgresql")

INSTANCES = ("a", "b")
JOIN_TIMEOUT = 120.0
# the enrollment API's TLS and the station CA, as tests/tpm/test_enroll.make_pki writes them
HTTPS = """tls_cert = "pki/server.pem"
tls_key = "pki/server.key"
station_ca = "pki/station-ca.pem"
"""


@dataclass
class Pair:
    """Two instances sharing one database, and a station client for each one's API."""

    deployment: Deployment
    clients: dict[str, FleetClient]

    def devices(self) -> list[str]:
        return self.deployment.read(lambda s: [d.device_id for d in Registry(s).devices()])

    def finishes(self) -> list[tuple[str, str]]:
        """(outcome, target) of every enroll.finish audit entry, oldest first."""
        return self.deployment.read(
            lambda s: [
                (e.outcome.value, e.target) for e in audit.entries(s) if e.action == "enroll.finish"
            ]
        )


@pytest.fixture
def pair(
    tmp_path: Path, deploy: DeployFactory, manufacturer_ca: ManufacturerCA, database_url: str
) -> Pair:
    fleet_pki = make_pki(tmp_path / "pki")
    deployment = deploy(
        "enroll",
        db_url=database_url,
        instances=INSTANCES,
        station=(STATION, fleet_pki.station_cert_path),
        groups="ack_timeout_seconds = 30\n",
        http=HTTPS,
        ready=b"keyfleet serve: ready",
        log_tail=8_000,
        device_ca=fleet_pki.device_ca,
        operator_ca=fleet_pki.operator_ca,
        manufacturer_cas=[manufacturer_ca.root_cert(), manufacturer_ca.issuer_cert()],
    )
    clients: dict[str, FleetClient] = {}
    for name, port in deployment.http_ports.items():
        assert b"enrollment API on https://127.0.0.1" in deployment.logs[name].read_bytes()
        clients[name] = FleetClient(
            f"https://127.0.0.1:{port}",
            cert=fleet_pki.station_cert_path,
            key=fleet_pki.station_key_path,
            ca=fleet_pki.server_ca_path,
            retries=0,  # a retry here would hide which instance answered
        )
    return Pair(deployment, clients)


@pytest.fixture
def device(swtpm_factory: SwtpmFactory, tmp_path: Path) -> Iterator[FactoryDevice]:
    with factory_device(swtpm_factory, tmp_path / "device", "SN-SCALE-1") as device:
        yield device


def finish_on_both(pair: Pair, session: str, secret: bytes) -> list[DeviceIdentity | BaseException]:
    """The same finish sent to both instances at once (one thread each)."""
    calls = [partial(pair.clients[name].finish, session, secret) for name in INSTANCES]
    return at_once(calls, JOIN_TIMEOUT)


def test_a_station_finishes_on_another_instance_than_it_started(
    pair: Pair, device: FactoryDevice
) -> None:
    a, b = pair.clients["a"], pair.clients["b"]
    request, _ = device_start_request(device, groups=("line",))
    started = a.start(request)
    secret = activate(device, started).reveal()
    identity = b.finish(started.session, secret)
    assert identity.device_id == started.device_id and identity.groups == ("line",)
    device.handle("install", identity.to_map())
    # the answer was lost: a retry on either instance returns the same identity
    assert a.finish(started.session, secret).to_map() == identity.to_map()
    assert b.finish(started.session, secret).to_map() == identity.to_map()
    assert pair.devices() == [started.device_id]
    assert pair.finishes() == [("accepted", f"device:{started.device_id}")]

    # undone on instance b (the install "failed"), enrolled again: both instances at once
    b.revoke(identity.device_id, "install failed")
    assert pair.devices() == []
    request, _ = device_start_request(device)
    started = b.start(request)
    secret = activate(device, started).reveal()
    results = finish_on_both(pair, started.session, secret)
    identities = [r for r in results if isinstance(r, DeviceIdentity)]
    assert len(identities) == 2, results
    assert identities[0].to_map() == identities[1].to_map()
    assert identities[0].devid_cert != identity.devid_cert  # a new identity, registered once
    assert pair.devices() == [started.device_id]
    assert pair.finishes()[1:] == [("accepted", f"device:{started.device_id}")]


def test_a_wrong_answer_on_one_instance_ends_the_session_on_the_other(
    pair: Pair, device: FactoryDevice
) -> None:
    a, b = pair.clients["a"], pair.clients["b"]
    request, _ = device_start_request(device)
    started = a.start(request)
    secret = activate(device, started).reveal()
    wrong = bytes(x ^ 1 for x in secret)
    with pytest.raises(ProtocolError) as err:
        b.finish(started.session, wrong)
    assert err.value.check == "enroll.credential"
    with pytest.raises(ProtocolError) as err:
        a.finish(started.session, secret)
    assert err.value.check == "enroll.session.unknown"
    assert pair.devices() == []
    assert [o for o, _ in pair.finishes()] == ["refused", "refused"]
