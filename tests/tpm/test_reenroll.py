"""Re-provisioning (issue 6): the same TPM enrolls again only once its old identity is destroyed
(a revoked one needs the quorum's approval besides: tests/tpm/test_attacks_revoke_reenroll.py);
it gets a new DevID certificate under the same device id, the old identity's key
records and the service's replay state for it are gone, and the audit names what it replaced.
Real swtpm through factory mode, real SQLite registry (helpers of tests/tpm/test_enroll.py)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy.orm import Session, sessionmaker

from agent.factory import FactoryDevice
from agent.protocol.lifecycle import KeyState
from agent.protocol.wire.replay import ReplayGuard
from agent.tpm.store import TPMStore
from provisioning import audit
from provisioning.db.engine import make_engine
from provisioning.db.runtime import ReplayState, create_service_schema
from provisioning.enroll import DeviceIdentity, Enrollment, FinishRequest
from provisioning.registry import DeviceState, KeyStateReport, Registry, run_in_transaction
from provisioning.service import store
from tests.fixtures.swtpm import ManufacturerCA, SwtpmFactory
from tests.tpm.test_enroll import (
    NOW,
    STATION,
    _refused,
    activate,
    device_start_request,
    make_pki,
    make_registry,
    make_settings,
)

pytestmark = pytest.mark.tpm


@dataclass
class Setup:
    enrollment: Enrollment
    device: FactoryDevice
    sessions: sessionmaker[Session]


@pytest.fixture
def setup(
    tmp_path: Path, manufacturer_ca: ManufacturerCA, swtpm_factory: SwtpmFactory
) -> Iterator[Setup]:
    fleet_pki = make_pki(tmp_path / "pki")
    db_sessions = make_registry(tmp_path / "fleet.db", fleet_pki)
    tpm = swtpm_factory.start()
    with TPMStore(tpm.tcti) as tpm_store:
        yield Setup(
            Enrollment(make_settings(fleet_pki, manufacturer_ca), db_sessions),
            FactoryDevice(tpm_store, tmp_path / "device", serial="SN-R1"),
            db_sessions,
        )


def enroll_once(enrollment: Enrollment, device: FactoryDevice, now: int) -> DeviceIdentity:
    request, _ = device_start_request(device)
    started = enrollment.start(STATION, request, now=now)
    secret = activate(device, started)
    return enrollment.finish(STATION, FinishRequest(started.session, secret), now=now + 1)


@pytest.mark.parametrize("old_state", [DeviceState.DESTROYED])
def test_a_destroyed_identity_may_be_replaced_by_a_new_enrollment(
    setup: Setup, tmp_path: Path, old_state: DeviceState
) -> None:
    enrollment, device, sessions = setup.enrollment, setup.device, setup.sessions
    first = enroll_once(enrollment, device, NOW)
    device_id = first.device_id

    def live_history(session: Session) -> None:
        registry = Registry(session)
        registry.record_report(
            device_id,
            b"r",
            [
                KeyStateReport("devid", KeyState.PRE_ACTIVATION, NOW, "devid"),
                KeyStateReport("devid", KeyState.ACTIVE, NOW, "devid"),
            ],
            now=NOW + 2,
        )
        guard = ReplayGuard(store.REPLAY_WINDOW)
        store.save_guard(session, device_id, guard, now=NOW + 2)

    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    create_service_schema(engine)
    engine.dispose()
    run_in_transaction(sessions, live_history)
    # a live identity: the TPM cannot enroll again
    request, _ = device_start_request(device)
    _refused("enroll.ek.registered", enrollment.start, STATION, request, now=NOW + 3)

    def retire(session: Session) -> None:
        Registry(session).set_device_state(device_id, old_state, reason="test", now=NOW + 4)

    run_in_transaction(sessions, retire)
    second = enroll_once(enrollment, device, NOW + 5)
    assert second.device_id == device_id
    assert second.devid_cert != first.devid_cert

    def check(session: Session) -> None:
        registry = Registry(session)
        record = registry.device(device_id)
        assert record.state is DeviceState.REGISTERED and record.state_reason == "re-enrolled"
        assert record.devid_cert_pem.encode() == second.devid_cert.public_bytes(Encoding.PEM)
        assert registry.key_states(device_id) == []
        assert session.get(ReplayState, device_id) is None
        finish = [e for e in audit.entries(session) if e.action == "enroll.finish"]
        assert len(finish) == 2
        assert '"replaces":"' + old_state.value + '"' in finish[-1].details

    run_in_transaction(sessions, check)
