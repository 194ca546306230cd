"""Revocation that sticks at enrollment and in the ledger: a real swtpm enrolled through factory
mode, the sans-I/O service (``DeliveryService``) over the same registry with
``min_approvals = 2``, operators with certificates from a real operator CA signing approvals as
the CLI does (docs/operations.md, "Revocation"); the registry is a SQLite file and a real
PostgreSQL.

- Revoking (two admins) records the device's DevID and TLS certificates revoked, issues the
  device CA's CRL (openssl verifies it; its number grows with each revocation) and moves the
  device's keys to ``compromised``.
- Adversary: the revoked device's TPM at a registered station, and a single operator trying to
  let it back in alone: refused with ``enroll.revoked``, nothing changes. Two approvals of
  ``device.reenroll`` let it enroll once; the approval is used up.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy.orm import Session, sessionmaker

from agent.factory import FactoryDevice
from agent.protocol import authz
from agent.protocol.lifecycle import KeyState
from agent.protocol.wire.messages.operator import Approve, Propose
from agent.protocol.wire.messages.result import RequestState
from agent.tpm.store import TPMStore
from provisioning import audit, listings, revocation
from provisioning.db.engine import make_engine
from provisioning.db.runtime import create_service_schema
from provisioning.enroll import DeviceIdentity, Enrollment
from provisioning.registry import DeviceState, KeyStateReport, Registry, run_in_transaction
from provisioning.service import store
from provisioning.service.core import DeliveryService, ServiceSettings
from provisioning.service.operators import register_operator
from tests.fixtures.swtpm import ManufacturerCA, SwtpmFactory
from tests.service_members import SoftOperator, command_id
from tests.tpm.test_enroll import (
    NOW,
    STATION,
    FleetPKI,
    _refused,
    device_start_request,
    make_pki,
    make_registry,
    make_settings,
)
from tests.tpm.test_reenroll import enroll_once

pytestmark = pytest.mark.tpm
# the registry on a SQLite file and on PostgreSQL (tests/fixtures/postgres.py)
DATABASE_BACKENDS = ("sqlite", "postgresql")

ADMINS = ("op-admin", "op-root")


@dataclass
class Setup:
    tmp_path: Path
    pki: FleetPKI
    enrollment: Enrollment
    device: FactoryDevice
    sessions: sessionmaker[Session]
    service: DeliveryService
    operators: dict[str, SoftOperator] = field(default_factory=dict)
    now: int = NOW

    def send(self, operator: str, body: Propose | Approve) -> None:
        topic, payload = self.operators[operator].command(body, self.now)
        self.service.handle(topic, payload, self.now)

    def request_of(self, op: str, device_id: str) -> store.StoredRequest | None:
        def find(session: Session) -> store.StoredRequest | None:
            matches = [
                s for s in store.open_requests(session) if s.op == op and s.members == (device_id,)
            ]
            return matches[-1] if matches else None

        return run_in_transaction(self.sessions, find)

    def approve(self, operator: str, stored: store.StoredRequest) -> None:
        who = self.operators[operator]
        approval = authz.sign_approval(stored.request, who.key, who.cert).encode()
        self.send(operator, Approve(command_id(), stored.request_id, approval))

    def quorum(self, op: str, device_id: str, *approvers: str) -> store.StoredRequest:
        """``approvers[0]`` proposes; each approver approves. Returns the request as stored."""
        self.send(approvers[0], Propose(command_id(), op, (device_id,)))
        proposed = self.request_of(op, device_id)
        assert proposed is not None and proposed.state is RequestState.PENDING
        for name in approvers:
            self.approve(name, proposed)
        return self.load(proposed.request_id)

    def load(self, request_id: bytes) -> store.StoredRequest:
        loaded = run_in_transaction(self.sessions, lambda s: store.load_request(s, request_id))
        assert loaded is not None
        return loaded

    def device_record(self, device_id: str) -> tuple[DeviceState, str]:
        def read(session: Session) -> tuple[DeviceState, str]:
            record = Registry(session).device(device_id)
            return record.state, record.devid_cert_pem

        return run_in_transaction(self.sessions, read)


@pytest.fixture
def setup(
    tmp_path: Path,
    manufacturer_ca: ManufacturerCA,
    swtpm_factory: SwtpmFactory,
    database_url: str,
) -> Iterator[Setup]:
    fleet_pki = make_pki(tmp_path / "pki")
    sessions = make_registry(database_url, fleet_pki)
    engine = make_engine(database_url)
    create_service_schema(engine)
    engine.dispose()
    service = DeliveryService(
        sessions,
        signing_key=fleet_pki.device_ca.private_key,
        operator_ca=fleet_pki.operator_ca.certificate,
        device_ca=fleet_pki.device_ca.certificate,
        settings=ServiceSettings(min_approvals=2, request_ttl=600),
        revocation=revocation.RevocationSettings(fleet_pki.device_ca),
    )
    operators = {}
    for name in ADMINS:
        operator = SoftOperator.create(
            name, "admin", fleet_pki.operator_ca, datetime.fromtimestamp(NOW - 60, UTC)
        )
        register_operator(
            sessions,
            operator.cert,
            operator_ca=fleet_pki.operator_ca.certificate,
            role=None,
            actor="local:test",
            now=NOW,
        )
        operators[name] = operator
    tpm = swtpm_factory.start()
    with TPMStore(tpm.tcti) as tpm_store, _disposed(sessions):
        yield Setup(
            tmp_path,
            fleet_pki,
            Enrollment(make_settings(fleet_pki, manufacturer_ca, min_approvals=2), sessions),
            FactoryDevice(tpm_store, tmp_path / "device", serial="SN-RV1"),
            sessions,
            service,
            operators,
        )


@contextlib.contextmanager
def _disposed(sessions: sessionmaker[Session]) -> Iterator[None]:
    """Close the registry's connections at the end (PostgreSQL warns about open ones)."""
    try:
        yield
    finally:
        sessions.kw["bind"].dispose()


def crl_verifies(setup: Setup, der: bytes) -> None:
    crl_file = setup.tmp_path / "device-ca.crl"
    crl_file.write_bytes(x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM))
    ca_file = setup.tmp_path / "device-ca.pem"
    ca_file.write_bytes(setup.pki.device_ca.certificate.public_bytes(serialization.Encoding.PEM))
    checked = subprocess.run(
        ["openssl", "crl", "-in", str(crl_file), "-CAfile", str(ca_file), "-verify", "-noout"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0 and "verify OK" in checked.stdout + checked.stderr, checked


def revoke(setup: Setup, device_id: str) -> None:
    done = setup.quorum("device.revoke", device_id, *ADMINS)
    assert done.state is RequestState.EXECUTED, done.detail
    assert setup.device_record(device_id)[0] is DeviceState.REVOKED


def newest_crl(setup: Setup) -> x509.CertificateRevocationList:
    row = run_in_transaction(setup.sessions, revocation.newest_crl)
    assert row is not None
    crl_verifies(setup, row.der)
    return x509.load_der_x509_crl(row.der)


def serials(identity: DeviceIdentity) -> set[int]:
    return {identity.devid_cert.serial_number, identity.tls_cert.serial_number}


def listed(crl: x509.CertificateRevocationList) -> set[int]:
    return {entry.serial_number for entry in crl}


def test_revoke_issues_the_crl_and_compromises_the_keys(setup: Setup) -> None:
    first = enroll_once(setup.enrollment, setup.device, NOW)
    device_id = first.device_id

    def live(session: Session) -> None:
        Registry(session).record_report(
            device_id,
            b"r",
            [
                KeyStateReport("devid", KeyState.PRE_ACTIVATION, NOW, "devid"),
                KeyStateReport("devid", KeyState.ACTIVE, NOW, "devid"),
                KeyStateReport("g1.leaf", KeyState.PRE_ACTIVATION, NOW, "leaf"),
                KeyStateReport("g1.leaf", KeyState.DESTROYED, NOW, "leaf"),
            ],
            now=NOW + 2,
        )

    run_in_transaction(setup.sessions, live)
    setup.now = NOW + 10
    revoke(setup, device_id)

    crl = newest_crl(setup)
    assert revocation.crl_number(crl) == 1
    assert listed(crl) == serials(first)  # the DevID and the TLS client certificate
    assert crl.next_update_utc is not None and crl.next_update_utc > crl.last_update_utc

    def keys(session: Session) -> dict[str, KeyState]:
        return {k.key_name: k.state for k in Registry(session).key_states(device_id)}

    # suspected compromised, not deactivated; a destroyed key stays destroyed
    assert run_in_transaction(setup.sessions, keys) == {
        "devid": KeyState.COMPROMISED,
        "g1.leaf": KeyState.DESTROYED,
    }
    # what `keyfleet devices --keys` shows: the service-recorded step at the revocation's time
    (devid,) = [
        row
        for row in run_in_transaction(setup.sessions, listings.list_device_keys)
        if row["key"] == "devid"
    ]
    assert devid["device_state"] == "revoked" and devid["state"] == "compromised"
    assert devid["transitions"] == [
        ["pre-activation", NOW],
        ["active", NOW],
        ["compromised", NOW + 10],
    ]


def test_a_revoked_tpm_enrolls_again_only_with_two_approvals_and_only_once(setup: Setup) -> None:
    """Adversaries: the revoked device's TPM at a registered station; a single operator trying
    to re-enroll it alone."""
    first = enroll_once(setup.enrollment, setup.device, NOW)
    device_id = first.device_id
    setup.now = NOW + 10
    revoke(setup, device_id)
    before = setup.device_record(device_id)
    sessions_before = setup.enrollment.pending_session_ids()

    # No request: refused at start, audited with the check id; nothing changed.
    request, _ = device_start_request(setup.device)
    _refused("enroll.revoked", setup.enrollment.start, STATION, request, now=NOW + 11)
    assert setup.device_record(device_id) == before
    assert setup.enrollment.pending_session_ids() == sessions_before

    def refusals(session: Session) -> list[str]:
        return [
            e.details
            for e in audit.entries(session)
            if e.action == "enroll.start" and e.outcome.value == "refused"
        ]

    assert '"check":"enroll.revoked"' in run_in_transaction(setup.sessions, refusals)[-1]

    # One admin proposes and approves alone: the request stays pending, still refused.
    alone = setup.quorum("device.reenroll", device_id, "op-admin")
    assert alone.state is RequestState.PENDING and alone.approvers == ["op-admin"]
    request, _ = device_start_request(setup.device)
    _refused("enroll.revoked", setup.enrollment.start, STATION, request, now=NOW + 12)
    assert setup.device_record(device_id) == before

    # The second admin's approval: the TPM enrolls once, the request is used up.
    setup.approve("op-root", alone)
    approved = setup.load(alone.request_id)
    assert approved.state is RequestState.APPROVED, approved.detail
    second = enroll_once(setup.enrollment, setup.device, NOW + 20)
    assert second.device_id == device_id
    assert second.devid_cert != first.devid_cert
    state, devid_pem = setup.device_record(device_id)
    assert state is DeviceState.REGISTERED
    assert devid_pem.encode() == second.devid_cert.public_bytes(serialization.Encoding.PEM)
    used = setup.load(alone.request_id)
    assert used.state is RequestState.EXECUTED and "used by station" in used.detail

    def actions(session: Session) -> list[tuple[str, str]]:
        return [(e.action, e.target) for e in audit.entries(session)]

    assert ("request.consume", alone.request_id.hex()) in run_in_transaction(
        setup.sessions, actions
    )

    # Revoked again: the used approval does not count twice.
    setup.now = NOW + 30
    revoke(setup, device_id)
    again = setup.device_record(device_id)
    request, _ = device_start_request(setup.device)
    _refused("enroll.revoked", setup.enrollment.start, STATION, request, now=NOW + 31)
    assert setup.device_record(device_id) == again

    # The CRL grew: number 2 lists both identities' certificates.
    crl = newest_crl(setup)
    assert revocation.crl_number(crl) == 2
    assert listed(crl) == serials(first) | serials(second)


def test_a_revoked_identity_moved_on_to_destroyed_still_needs_the_quorum(setup: Setup) -> None:
    """Adversary: the revoked device's TPM, after its identity was marked destroyed (which alone
    would let a TPM enroll again): its DevID is on the CRL, so the quorum is still needed."""
    first = enroll_once(setup.enrollment, setup.device, NOW)
    device_id = first.device_id
    setup.now = NOW + 10
    revoke(setup, device_id)

    def destroy(session: Session) -> None:
        Registry(session).set_device_state(
            device_id, DeviceState.DESTROYED, reason="t", now=NOW + 11
        )

    run_in_transaction(setup.sessions, destroy)
    before = setup.device_record(device_id)
    request, _ = device_start_request(setup.device)
    _refused("enroll.revoked", setup.enrollment.start, STATION, request, now=NOW + 12)
    assert setup.device_record(device_id) == before
    # the quorum may still let it back, as for a revoked state
    approved = setup.quorum("device.reenroll", device_id, *ADMINS)
    assert approved.state is RequestState.APPROVED, approved.detail
    second = enroll_once(setup.enrollment, setup.device, NOW + 20)
    assert setup.device_record(device_id)[0] is DeviceState.REGISTERED
    assert second.devid_cert != first.devid_cert
