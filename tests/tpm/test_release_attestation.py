"""An approved release is enforced by every service instance without a restart: two instances
of the sans-I/O service on one SQLite file; the devices quote with their own swtpm after a
measured boot (tests/tpm/test_attestation_service.py's fleet). A release is approved through
instance 1; a device booted into it attests trusted on instance 2, which was running (and had
the old golden policy cached) all along, and ``keyfleet release list`` shows the device on it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.protocol import authz
from agent.protocol.wire.messages.result import RequestState, ResultStatus
from firmware_sim.boot import default_components
from provisioning.releases_cli import release_rows
from provisioning.service import releases
from provisioning.service.core import DeliveryService
from tests.fixtures.swtpm import SwtpmFactory
from tests.pure.test_service_core import Fleet
from tests.pure.test_service_releases import manifest_of, propose_release
from tests.pure.test_service_requests import approve
from tests.tpm.test_attestation_service import attest, attesting_fleet, member

pytestmark = pytest.mark.tpm

NEXT = default_components("1.1")


@pytest.fixture
def fleet(tmp_path: Path, swtpm_factory: SwtpmFactory) -> Iterator[Fleet]:
    yield from attesting_fleet(tmp_path, swtpm_factory, quarantine=False)


def second_instance(fleet: Fleet) -> DeliveryService:
    old = fleet.service
    return DeliveryService(
        fleet.sessions,
        signing_key=old._env.key,
        operator_ca=old._env.operator_ca,
        device_ca=old._env.devices.device_ca,
        settings=old.settings,
        attestation=old.attestation,
        instance="2",
    )


def test_a_release_approved_on_one_instance_is_trusted_on_the_other(fleet: Fleet) -> None:
    first = fleet.service
    second = second_instance(fleet)
    member(fleet, "dev-1").boot(NEXT)

    fleet.service = second
    status, detail = attest(fleet, "dev-1")
    assert status is ResultStatus.FAILED and "untrusted" in detail, detail
    status, detail = attest(fleet, "dev-2")  # still on 1.0, the imported release
    assert status is ResultStatus.DONE, detail

    fleet.service = first
    with fleet.sessions.begin() as session:
        releases.add_release(
            session, manifest_of("1.1"), by="op-admin", actor="local:op-admin", now=fleet.now
        )
    info = propose_release(fleet, "op-admin", authz.OP_RELEASE_APPROVE, "1.1")
    _, done = approve(fleet, "op-admin", info.request)  # this fleet's quorum is one operator
    assert done is not None and done.state is RequestState.EXECUTED, done

    fleet.service = second
    fleet.now += 1
    status, detail = attest(fleet, "dev-1")
    assert status is ResultStatus.DONE, detail
    assert "dev-1 trusted" in detail and "kernel 1.1" in detail

    with fleet.sessions() as session:
        listed = {row["version"]: row for row in release_rows(session)}
    assert listed["1.1"]["state"] == "approved" and listed["1.1"]["devices"] == ["dev-1"]
    assert listed["1.0"]["devices"] == ["dev-2"]
    assert json.dumps(listed)  # what ``release list --json`` prints
