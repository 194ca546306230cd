"""Authority from certificates, not rows: a database writer edits the rows the service reads and
tries to gain authority with them. Played against the real delivery service code on a SQLite
file and on a real PostgreSQL (tests/fixtures/postgres.py), with operators and devices that sign
real envelopes (tests/service_members.py).

Each attack asserts the check id it is refused with, that the refusal is counted and audited,
and that nothing changed (groups, commits, device states, requests)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from tpm2_pytss.constants import TPMA_OBJECT
from tpm2_pytss.types import TPM2B_PUBLIC

from agent.protocol import authz
from agent.protocol.attest import tpm_name
from agent.protocol.errors import ProtocolError
from agent.protocol.lifecycle import KeyKind, KeyRecord, KeyState
from agent.protocol.wire.messages.key_state import KeyStateReport
from agent.protocol.wire.messages.operator import Propose
from agent.protocol.wire.messages.result import ResultStatus
from provisioning import pki
from provisioning.registry import DeviceRecord, DeviceState, Role, cert_fingerprint
from provisioning.service.credentials import StoredDevices, operator_role
from tests.pure.test_service_core import T0, Fleet, create_g1, make_fleet, snapshot
from tests.service_members import Outgoing, SoftDevice, command_id, rekey, revoke, utc

pytestmark = pytest.mark.pure

DATABASE_BACKENDS = ("sqlite", "postgresql")


@pytest.fixture
def fleet(tmp_path: Path, database_url: str) -> Iterator[Fleet]:
    url = None if database_url.startswith("sqlite") else database_url
    yield from make_fleet(tmp_path, url=url)


def write(fleet: Fleet, sql: str, **params: object) -> None:
    """The database writer: a statement straight into the service's database."""
    with fleet.sessions.begin() as session:
        session.execute(text(sql), params)


def state(fleet: Fleet) -> tuple[object, ...]:
    with fleet.sessions() as s:
        requests = s.execute(text("SELECT COUNT(*) FROM service_quorum_requests")).scalar()
        operations = s.execute(text("SELECT COUNT(*) FROM service_operations")).scalar()
    return (snapshot(fleet), requests, operations)


def refused(fleet: Fleet, message: Outgoing, check: str, actor: str) -> None:
    """``message`` is refused with ``check``: counted, audited as refused, nothing sent to a
    device."""
    count = fleet.service.rejections.count(check)
    publishes = fleet.service.handle(*message, fleet.now)
    assert fleet.service.rejections.count(check) == count + 1, check
    assert all(p.topic.startswith("kf/v1/ops/") for p in publishes)
    last = fleet.audit_entries()[-1]
    assert last.actor == actor
    assert last.outcome.value == "refused" and f"[{check}]" in (last.reason or "")


# -- operators: roles from the certificate ---------------------------------------------------------


def test_a_viewer_promoted_to_admin_in_the_database_is_still_a_viewer(fleet: Fleet) -> None:
    """Adversary: a database writer turns op-viewer's registry row into an admin's. The role
    comes from the viewer's certificate (OU viewer): its admin and operator commands are refused
    with ``op.role``, audited, and change nothing."""
    create_g1(fleet)
    write(fleet, "UPDATE operators SET role = 'admin' WHERE name = 'op-viewer'")
    before = state(fleet)
    viewer = fleet.operators["op-viewer"]
    actor = "operator:op-viewer"
    fleet.now += 1
    refused(fleet, viewer.command(revoke("dev-2"), fleet.now), "op.role", actor)
    refused(fleet, viewer.command(rekey("g1"), fleet.now), "op.role", actor)
    propose = Propose(command_id(), authz.OP_DEVICE_REVOKE, ("dev-2",))
    refused(fleet, viewer.command(propose, fleet.now), "op.role", actor)
    assert state(fleet) == before
    with fleet.sessions() as s:
        assert s.execute(text("SELECT state FROM devices WHERE device_id = 'dev-2'")).scalar() == (
            DeviceState.REGISTERED.value
        )
    # the genuine admin still can
    cid = fleet.command("op-admin", revoke("dev-3"))
    assert fleet.final(cid).status is ResultStatus.DONE


def test_another_operators_certificate_filed_under_a_name_is_refused(fleet: Fleet) -> None:
    """Adversary: a database writer files op-admin's certificate under op-viewer (certificate
    and fingerprint rows), hoping op-viewer's commands run with the admin certificate's role.
    The stored certificate must name the operator (CN) and hold the command's key:
    ``op.certificate``."""
    create_g1(fleet)
    admin_pem = pki.cert_to_pem(fleet.operators["op-admin"].cert).decode()
    admin_fp = cert_fingerprint(fleet.operators["op-admin"].cert)
    write(fleet, "UPDATE operators SET cert_fingerprint = :fp WHERE name = 'op-admin'", fp="0" * 64)
    write(
        fleet, "UPDATE operators SET cert_fingerprint = :fp WHERE name = 'op-viewer'", fp=admin_fp
    )
    write(
        fleet,
        "UPDATE service_operator_keys SET cert_pem = :pem WHERE name = 'op-viewer'",
        pem=admin_pem,
    )
    before = state(fleet)
    fleet.now += 1
    viewer = fleet.operators["op-viewer"]
    refused(
        fleet, viewer.command(revoke("dev-2"), fleet.now), "op.certificate", "operator:op-viewer"
    )
    assert state(fleet) == before


@pytest.mark.parametrize(
    ("cert_role", "row_role", "effective"),
    [
        ("viewer", Role.ADMIN, Role.VIEWER),  # a row never grants more
        ("admin", Role.VIEWER, Role.VIEWER),  # a row may narrow
        ("operator", Role.OPERATOR, Role.OPERATOR),
        ("admin", Role.ADMIN, Role.ADMIN),
    ],
)
def test_the_effective_role_is_the_lower_of_certificate_and_row(
    cert_role: str, row_role: Role, effective: Role
) -> None:
    ca = pki.create_ca("op CA", now=utc(T0), valid_for=timedelta(days=1))
    cert = pki.issue_client_cert(
        ca,
        pki.generate_key().public_key(),
        identity="op-x",
        role=cert_role,
        now=utc(T0),
        valid_for=timedelta(days=1),
    )
    assert operator_role(cert, row_role) is effective


@pytest.mark.parametrize("ou", [None, "root"])
def test_a_certificate_without_a_role_grants_nothing(ou: str | None) -> None:
    ca = pki.create_ca("op CA", now=utc(T0), valid_for=timedelta(days=1))
    cert = pki.issue_client_cert(
        ca,
        pki.generate_key().public_key(),
        identity="op-x",
        role=ou,
        now=utc(T0),
        valid_for=timedelta(days=1),
    )
    with pytest.raises(ProtocolError) as refusal:
        operator_role(cert, Role.ADMIN)
    assert refusal.value.check == "op.role"


# -- devices: stored DevID certificates and AKs checked at use ------------------------------------


def test_a_devid_certificate_from_another_ca_swapped_into_the_database_is_refused_at_use(
    fleet: Fleet,
) -> None:
    """Adversary: a database writer replaces dev-2's stored DevID certificate by one from a CA
    of its own, naming dev-2 and certifying the writer's key. Reports signed with that key, and
    dev-2's own next report, are refused at use with ``cred.stored`` (counted, audited);
    nothing changes."""
    create_g1(fleet)
    rogue_ca = pki.create_ca("keyfleet test device CA", now=utc(T0), valid_for=timedelta(days=2))
    impostor = SoftDevice.create("dev-2", rogue_ca, fleet.service._env.key.public_key(), utc(T0))
    write(
        fleet,
        "UPDATE devices SET devid_cert_pem = :pem WHERE device_id = 'dev-2'",
        pem=impostor.cert_pem,
    )
    before = state(fleet)
    fleet.now += 1
    actor = "device:dev-2"
    refused(fleet, impostor.report(KeyStateReport(()), fleet.now), "cred.stored", actor)
    refused(
        fleet, fleet.devices["dev-2"].report(KeyStateReport(()), fleet.now), "cred.stored", actor
    )
    assert state(fleet) == before
    assert "cred.chain" in (fleet.audit_entries()[-1].reason or "")  # why: not the device CA's


def test_another_devices_certificate_swapped_in_is_refused_at_use(fleet: Fleet) -> None:
    """Adversary: a database writer files dev-3's (valid) DevID certificate under dev-2: the
    certificate must name the device it is stored for (``cred.stored``)."""
    with fleet.sessions() as s:
        dev3 = s.execute(
            text("SELECT devid_cert_pem FROM devices WHERE device_id = 'dev-3'")
        ).scalar()
    write(fleet, "UPDATE devices SET devid_cert_pem = :pem WHERE device_id = 'dev-2'", pem=dev3)
    before = state(fleet)
    fleet.now += 1
    refused(
        fleet,
        fleet.devices["dev-2"].report(KeyStateReport(()), fleet.now),
        "cred.stored",
        "device:dev-2",
    )
    assert state(fleet) == before


def _ak_area(seed: int) -> bytes:
    """A well-formed TPM2B_PUBLIC of a restricted signing key (distinct per ``seed``)."""
    attributes = (
        TPMA_OBJECT.RESTRICTED
        | TPMA_OBJECT.SIGN_ENCRYPT
        | TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH
    )
    area = TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256:null", attributes)
    area.publicArea.unique.ecc.x = seed.to_bytes(32, "big")
    return bytes(area.marshal())


def _record(device_id: str, cert_pem: str, ak_public: bytes | None) -> DeviceRecord:
    return DeviceRecord(
        device_id=device_id,
        ek_cert_fingerprint="0" * 64,
        devid_cert_pem=cert_pem,
        state=DeviceState.ACTIVE,
        state_reason="",
        registered_at=T0,
        state_changed_at=T0,
        attestation_result=None,
        attestation_reason=None,
        attested_at=None,
        last_seen=None,
        last_report=None,
        last_report_at=None,
        ak_public=ak_public,
    )


def test_a_stored_ak_must_be_the_one_the_devid_certificate_names() -> None:
    """Adversary: a database writer stores an AK of its choosing for a device, so that its
    quotes would be believed. Where the AK is used (attestation), the stored AK must hash to the
    AK name in the device's DevID certificate (``cred.stored``); the signature key alone (every
    other report) does not depend on it. On a real TPM through the service:
    tests/tpm/test_attestation_service.py::test_an_ak_swapped_into_the_database_is_refused_at_use."""
    ca = pki.create_ca("device CA", now=utc(T0), valid_for=timedelta(days=2))
    genuine, forged = _ak_area(1), _ak_area(2)
    cert = pki.issue_devid_cert(
        ca,
        pki.generate_key().public_key(),
        device_id="dev-1",
        hardware_serial="SN-1",
        now=utc(T0),
        valid_for=timedelta(days=1),
        ak_name=tpm_name(genuine),
    )
    pem = pki.cert_to_pem(cert).decode()
    stored = StoredDevices(ca.certificate)
    stored.check(_record("dev-1", pem, genuine), T0, with_ak=True)
    for record in (
        _record("dev-1", pem, forged),  # another AK
        _record(
            "dev-1",
            SoftDevice.create("dev-1", ca, pki.generate_key().public_key(), utc(T0)).cert_pem,
            genuine,
        ),
    ):  # ... or a certificate that names no AK
        with pytest.raises(ProtocolError) as refusal:
            stored.check(record, T0, with_ak=True)
        assert refusal.value.check == "cred.stored"
        stored.check(record, T0)  # the DevID key itself is fine


# -- the memo ------------------------------------------------------------------------------------


def test_a_checked_credential_is_remembered_and_a_changed_row_is_checked_again() -> None:
    ca = pki.create_ca("device CA", now=utc(T0), valid_for=timedelta(days=2))
    device = SoftDevice.create("dev-1", ca, pki.generate_key().public_key(), utc(T0))
    record = _record("dev-1", device.cert_pem, None)
    stored = StoredDevices(ca.certificate)
    for offset in range(100):
        assert stored.check(record, T0 + offset).device_id == "dev-1"
    assert stored.validations == 1
    # past the certificate's end the memo does not answer: checked again, and refused
    with pytest.raises(ProtocolError) as refusal:
        stored.check(record, T0 + 3 * 86400)
    assert refusal.value.check == "cred.stored" and stored.validations == 2
    # another certificate under the same device: checked again
    rogue = pki.create_ca("device CA", now=utc(T0), valid_for=timedelta(days=2))
    swapped = SoftDevice.create("dev-1", rogue, pki.generate_key().public_key(), utc(T0))
    with pytest.raises(ProtocolError):
        stored.check(DeviceRecord(**{**record.__dict__, "devid_cert_pem": swapped.cert_pem}), T0)
    assert stored.validations == 3


# -- a burst's first reports: a remembered check does not outlive the row it was made for ------

_HISTORY = ((KeyState.PRE_ACTIVATION, T0 - 1000), (KeyState.ACTIVE, T0 - 999))
_FIRST = KeyStateReport((KeyRecord("devid", KeyKind.DEVID, _HISTORY),), feed=0)


def _rows_of(fleet: Fleet, device_id: str) -> tuple[object, ...]:
    """What a taken report writes for a device: its key rows, feed row, last report."""
    with fleet.sessions() as s:
        keys = s.execute(
            text("SELECT COUNT(*) FROM device_keys WHERE device_id = :d"), {"d": device_id}
        ).scalar()
        feed = s.execute(
            text("SELECT seq FROM service_revocation_feed_seen WHERE device_id = :d"),
            {"d": device_id},
        ).all()
        last = s.execute(
            text("SELECT last_report FROM devices WHERE device_id = :d"), {"d": device_id}
        ).scalar()
    return (keys, tuple(feed), last)


def _ordered(fleet: Fleet) -> tuple[object, ...]:
    """``state`` in an order that does not depend on where a row update moved a row."""
    (groups, commits, states), requests, operations = state(fleet)  # type: ignore[misc]
    return (sorted(groups), commits, sorted(states), requests, operations)  # type: ignore[call-overload]


def test_a_certificate_replaced_after_its_check_was_remembered_is_refused(fleet: Fleet) -> None:
    """Adversary: a database writer replaces dev-2's stored DevID certificate after the service
    checked it (and remembered the check) for dev-2's first report: by a certificate from a CA
    of its own naming dev-2 and certifying the writer's key, then by dev-3's genuine one. Taken
    in batches (a burst of first reports), the reports signed with either key are refused with
    ``cred.stored``, counted and audited, and write nothing for dev-2; the other device's first
    report in the same batch is taken (its key and feed rows written)."""
    dev2, dev3 = fleet.devices["dev-2"], fleet.devices["dev-3"]
    fleet.now += 1
    fleet.service.handle_many([dev2.report(_FIRST, fleet.now)], fleet.now)
    assert _rows_of(fleet, "dev-2")[:2] == (1, ((0,),))  # taken: its key row, its feed row
    rogue_ca = pki.create_ca("keyfleet test device CA", now=utc(T0), valid_for=timedelta(days=2))
    impostor = SoftDevice.create("dev-2", rogue_ca, fleet.service._env.key.public_key(), utc(T0))
    with fleet.sessions() as s:
        dev3_pem = s.execute(
            text("SELECT devid_cert_pem FROM devices WHERE device_id = 'dev-3'")
        ).scalar()
    taken = _rows_of(fleet, "dev-2")
    for pem, others in ((impostor.cert_pem, [dev3]), (dev3_pem, [])):
        write(fleet, "UPDATE devices SET devid_cert_pem = :pem WHERE device_id = 'dev-2'", pem=pem)
        before = _ordered(fleet)
        count = fleet.service.rejections.count("cred.stored")
        fleet.now += 1
        batch = [d.report(_FIRST, fleet.now) for d in (*others, dev2, impostor)]
        fleet.service.handle_many(batch, fleet.now)
        assert fleet.service.rejections.count("cred.stored") == count + 2
        last = fleet.audit_entries()[-1]
        assert last.actor == "device:dev-2" and "[cred.stored]" in (last.reason or "")
        assert _rows_of(fleet, "dev-2") == taken and _ordered(fleet) == before
    assert _rows_of(fleet, "dev-3")[:2] == (1, ((0,),))


def test_a_device_revoked_after_its_check_was_remembered_is_refused(fleet: Fleet) -> None:
    """A device whose certificate check the service remembers (its first report taken) and
    that an operator then revokes: its next reports are refused (``ds.device.revoked``): the
    remembered check is the certificate's alone, the device's state is read with every batch.
    Nothing is written for it."""
    dev2 = fleet.devices["dev-2"]
    fleet.now += 1
    fleet.service.handle_many([dev2.report(_FIRST, fleet.now)], fleet.now)
    assert fleet.final(fleet.command("op-admin", revoke("dev-2"))).status is ResultStatus.DONE
    taken = _rows_of(fleet, "dev-2")
    before = _ordered(fleet)
    count = fleet.service.rejections.count("ds.device.revoked")
    fleet.now += 1
    fleet.service.handle_many([dev2.report(_FIRST, fleet.now)], fleet.now)
    assert fleet.service.rejections.count("ds.device.revoked") == count + 1
    assert _rows_of(fleet, "dev-2") == taken and _ordered(fleet) == before


@pytest.mark.parametrize(
    "form",
    ["two certificates", "not base64", "text around it", "no line breaks"],
)
def test_a_stored_pem_in_another_form_is_read_as_one_certificate_or_refused(form: str) -> None:
    """The stored PEM is read as exactly one certificate whatever its form: two certificates or
    a body that is not base64 are refused (``cred.stored``), text around the block or a body on
    one line are read as the certificate."""
    ca = pki.create_ca("device CA", now=utc(T0), valid_for=timedelta(days=2))
    device = SoftDevice.create("dev-1", ca, pki.generate_key().public_key(), utc(T0))
    other = SoftDevice.create("dev-1", ca, pki.generate_key().public_key(), utc(T0))
    lines = device.cert_pem.strip().splitlines()
    head, body, tail = lines[0], "".join(lines[1:-1]), lines[-1]
    pem = {
        "two certificates": device.cert_pem + other.cert_pem,
        "not base64": f"{head}\n{body[:40]}*{body[41:]}\n{tail}\n",
        "text around it": f"Certificate:\n  dev-1\n{device.cert_pem}trailing words\n",
        "no line breaks": f"{head}\n{body}\n{tail}",
    }[form]
    stored = StoredDevices(ca.certificate)
    record = _record("dev-1", pem, None)
    if form in ("two certificates", "not base64"):
        with pytest.raises(ProtocolError) as refusal:
            stored.check(record, T0)
        assert refusal.value.check == "cred.stored"
    else:
        expected = pki.cert_from_pem(device.cert_pem.encode()).public_key()
        assert stored.check(record, T0).devid_key == expected
