"""Enrollment logic (provisioning.enroll) on inputs made by a real swtpm through factory mode,
with a real SQLite registry: every check id, one-try sessions, expiry, idempotent finish,
undoing a registration, and the audit trail. The helpers here are shared with the HTTP and
end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy.orm import Session, sessionmaker
from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_PUBLIC, TPMT_SIG_SCHEME

from agent.factory import FactoryDevice
from agent.protocol.attest import tpm_name
from agent.protocol.credentials import CredentialVerifier
from agent.protocol.errors import ProtocolError, TPMError
from agent.protocol.secret import Secret
from agent.tpm.blob import KeyBlob
from agent.tpm.store import TPMStore
from agent.tpm.templates import KeyKind
from provisioning import audit
from provisioning.enroll import (
    DeviceIdentity,
    Enrollment,
    EnrollmentSettings,
    FinishRequest,
    StartRequest,
    StartResult,
    certify_qualifying_data,
    device_id_for,
)
from provisioning.http import EnrollmentServer, build_app, start_enrollment_server
from provisioning.pki import (
    CertificateAuthority,
    common_name,
    create_ca,
    generate_key,
    hardware_serial_of,
    issue_client_cert,
    issue_server_cert,
    verify_certificate,
    write_certificate,
    write_private_key,
)
from provisioning.registry import (
    DeviceState,
    Registry,
    cert_fingerprint,
    create_schema,
    make_engine,
    run_in_transaction,
    session_factory,
    tags,
)
from provisioning.station import FleetClient
from tests.fixtures.swtpm import ManufacturerCA, SwtpmFactory

pytestmark = pytest.mark.tpm

# Hours ahead of collection time: the test manufacturer's EK certificates (and the fleet CAs of
# ``make_pki``) are made when a test manufactures its TPM or builds its PKI, after collection,
# and are valid from then on; a whole suite run on a loaded machine takes more than an hour
# before it reaches the last of these tests. Every window these tests check is days long.
NOW = int(time.time()) + 4 * 3600
WHEN = datetime.fromtimestamp(NOW, UTC)
STATION = "line-1"
T = TypeVar("T")


# ---- shared helpers ---------------------------------------------------------------------------


@dataclass
class FleetPKI:
    """Every certificate a test fleet needs, written to ``directory``."""

    directory: Path
    device_ca: CertificateAuthority
    station_ca: CertificateAuthority
    tls_ca: CertificateAuthority
    broker_ca: CertificateAuthority
    operator_ca: CertificateAuthority
    service_cert: x509.Certificate
    station_cert: x509.Certificate

    @property
    def station_cert_path(self) -> Path:
        return self.directory / "station.pem"

    @property
    def station_key_path(self) -> Path:
        return self.directory / "station.key"

    @property
    def station_ca_path(self) -> Path:
        return self.directory / "station-ca.pem"

    @property
    def server_cert_path(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key_path(self) -> Path:
        return self.directory / "server.key"

    @property
    def server_ca_path(self) -> Path:
        return self.directory / "server-ca.pem"

    def extra_station(self, name: str) -> tuple[Path, Path, x509.Certificate]:
        """Another certificate from the station CA (not registered unless the test does)."""
        key = generate_key()
        cert = issue_client_cert(
            self.station_ca,
            key.public_key(),
            identity=name,
            role="station",
            now=datetime.now(UTC),
            valid_for=timedelta(days=2),
        )
        write_certificate(self.directory / f"{name}.pem", cert)
        write_private_key(self.directory / f"{name}.key", key)
        return self.directory / f"{name}.pem", self.directory / f"{name}.key", cert


def make_pki(directory: Path, station: str = STATION) -> FleetPKI:
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    valid = timedelta(days=30)
    device_ca = create_ca("fleet-device-ca", now=now, valid_for=valid)
    station_ca = create_ca("fleet-station-ca", now=now, valid_for=valid)
    tls_ca = create_ca("fleet-service-tls-ca", now=now, valid_for=valid)
    broker_ca = create_ca("fleet-broker-ca", now=now, valid_for=valid)
    operator_ca = create_ca("fleet-operator-ca", now=now, valid_for=valid)
    service_cert = issue_client_cert(
        device_ca,
        generate_key().public_key(),
        identity="keyfleet-service",
        role="service",
        now=now,
        valid_for=valid,
    )
    station_key = generate_key()
    station_cert = issue_client_cert(
        station_ca,
        station_key.public_key(),
        identity=station,
        role="station",
        now=now,
        valid_for=valid,
    )
    server_key = generate_key()
    server_cert = issue_server_cert(
        tls_ca,
        server_key.public_key(),
        common_name="keyfleet-enroll",
        ip_addresses=["127.0.0.1"],
        dns_names=["localhost"],
        now=now,
        valid_for=valid,
    )
    pki = FleetPKI(
        directory,
        device_ca,
        station_ca,
        tls_ca,
        broker_ca,
        operator_ca,
        service_cert,
        station_cert,
    )
    write_certificate(pki.station_cert_path, station_cert)
    write_private_key(pki.station_key_path, station_key)
    write_certificate(pki.station_ca_path, station_ca.certificate)
    write_certificate(pki.server_cert_path, server_cert)
    write_private_key(pki.server_key_path, server_key)
    write_certificate(pki.server_ca_path, tls_ca.certificate)
    return pki


def make_settings(
    pki: FleetPKI, manufacturer: ManufacturerCA, **overrides: Any
) -> EnrollmentSettings:
    settings = EnrollmentSettings(
        manufacturer_cas=(manufacturer.root_cert(), manufacturer.issuer_cert()),
        device_ca=pki.device_ca,
        broker_host="127.0.0.1",
        broker_port=8883,
        broker_ca=(pki.broker_ca.certificate,),
        service_cert=pki.service_cert,
        trust_anchors=(pki.device_ca.certificate,),
        operator_anchors=(pki.operator_ca.certificate,),
    )
    return replace(settings, **overrides)


def make_registry(
    db_file: Path | str, pki: FleetPKI, *stations: x509.Certificate
) -> sessionmaker[Session]:
    """A registry with the fleet's station; ``db_file`` is a SQLite file or a database URL."""
    engine = make_engine(db_file if isinstance(db_file, str) else f"sqlite:///{db_file}")
    create_schema(engine)
    sessions = session_factory(engine)

    def add(session: Session) -> None:
        registry = Registry(session)
        for cert in (pki.station_cert, *stations):
            name = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
            registry.add_station(str(name), cert_fingerprint=cert_fingerprint(cert), now=NOW)

    run_in_transaction(sessions, add)
    return sessions


def device_start_request(
    device: FactoryDevice,
    *,
    groups: tuple[str, ...] = (),
    nonce: bytes | None = None,
    tags: tuple[str, ...] = (),
) -> tuple[StartRequest, dict[str, Any]]:
    """What a station builds from a device: identity, create-keys, certify."""
    ident = device.handle("identity", {})
    keys = device.handle("create-keys", {})
    nonce = nonce or os.urandom(32)
    cert = device.handle(
        "certify", {"qualifying_data": certify_qualifying_data(nonce, keys["tls_public"])}
    )
    request = StartRequest(
        serial=ident["serial"],
        ek_kind="rsa",
        ek_cert=ident["ek"]["rsa"]["cert"],
        ek_public=ident["ek"]["rsa"]["public"],
        ak_public=keys["ak_public"],
        devid_public=keys["devid_public"],
        tls_public=keys["tls_public"],
        certify_attest=cert["attest"],
        certify_signature=cert["signature"],
        certify_nonce=nonce,
        groups=groups,
        tags=tags,
    )
    return request, keys


@dataclass
class EnrollmentService:
    """The enrollment API over real mutual TLS (``provisioning.http``) on a registry with the
    fleet's station, in this process."""

    pki: FleetPKI
    sessions: sessionmaker[Session]
    server: EnrollmentServer

    def client(self) -> FleetClient:
        """The station's client of this service."""
        return FleetClient(
            self.server.url,
            cert=self.pki.station_cert_path,
            key=self.pki.station_key_path,
            ca=self.pki.server_ca_path,
        )


@contextlib.contextmanager
def enrollment_service(
    directory: Path, database: Path | str, manufacturer_ca: ManufacturerCA
) -> Iterator[EnrollmentService]:
    """``make_pki(directory)``, a registry on ``database`` (a SQLite file or a URL) and the
    enrollment server on a free port; stopped and the engine closed on exit."""
    pki = make_pki(directory)
    sessions = make_registry(database, pki)
    server = start_enrollment_server(
        build_app(Enrollment(make_settings(pki, manufacturer_ca), sessions)),
        server_cert=pki.server_cert_path,
        server_key=pki.server_key_path,
        station_ca=pki.station_ca_path,
    )
    try:
        yield EnrollmentService(pki, sessions, server)
    finally:
        server.stop()
        sessions.kw["bind"].dispose()  # a PostgreSQL connection left open warns when collected


def activate(device: FactoryDevice, started: StartResult) -> Secret:
    """The station's second step: the device answers the credential challenge of ``started``."""
    answer = device.handle(
        "activate-credential",
        {"credential_blob": started.credential_blob, "encrypted_secret": started.encrypted_secret},
    )
    return Secret(answer["secret"])


@contextlib.contextmanager
def factory_device(
    swtpm_factory: SwtpmFactory, directory: Path, serial: str
) -> Iterator[FactoryDevice]:
    """A device in factory mode on a fresh swtpm, its state in ``directory``."""
    tpm = swtpm_factory.start()
    with TPMStore(tpm.tcti) as store:
        yield FactoryDevice(store, directory, serial=serial)


def at_once(calls: Sequence[Callable[[], T]], timeout: float = 120.0) -> list[T | BaseException]:
    """Every call in its own thread, released together; what each returned or raised, in the
    order they ended. A call still running after ``timeout`` fails the test."""
    results: list[T | BaseException] = []
    lock = threading.Lock()
    gate = threading.Barrier(len(calls))

    def run(call: Callable[[], T]) -> None:
        gate.wait(timeout=timeout)
        try:
            result: T | BaseException = call()
        except BaseException as exc:  # reported by the caller, whatever it is
            result = exc
        with lock:
            results.append(result)

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a call is stuck"
    return results


def devices_in(sessions: sessionmaker[Session]) -> list[str]:
    return run_in_transaction(sessions, lambda s: [d.device_id for d in Registry(s).devices()])


def audit_trail(sessions: sessionmaker[Session]) -> list[tuple[str, str, str]]:
    return run_in_transaction(
        sessions,
        lambda s: [(e.action, e.outcome.value, e.target) for e in audit.entries(s)],
    )


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> FleetPKI:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def sessions(tmp_path: Path, pki: FleetPKI) -> sessionmaker[Session]:
    return make_registry(tmp_path / "fleet.db", pki)


@pytest.fixture
def enrollment(
    pki: FleetPKI, manufacturer_ca: ManufacturerCA, sessions: sessionmaker[Session]
) -> Enrollment:
    return Enrollment(make_settings(pki, manufacturer_ca), sessions)


@pytest.fixture
def device(swtpm_factory: SwtpmFactory, tmp_path: Path) -> Iterator[FactoryDevice]:
    with factory_device(swtpm_factory, tmp_path / "device", "SN-E1") as device:
        yield device


def _refused(check: str, call: Any, *args: Any, **kwargs: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as err:
        call(*args, **kwargs)
    assert err.value.check == check, err.value
    return err.value


# ---- tests ------------------------------------------------------------------------------------


def test_start_and_finish_register_one_device_with_its_audit_entries(
    enrollment: Enrollment, device: FactoryDevice, sessions: sessionmaker[Session], pki: FleetPKI
) -> None:
    request, _ = device_start_request(device, groups=("sensors",))
    started = enrollment.start(STATION, request, now=NOW)
    ek_fp = cert_fingerprint(x509.load_der_x509_certificate(request.ek_cert))
    assert started.device_id == device_id_for(ek_fp) == "dev-" + ek_fp[:16]
    assert devices_in(sessions) == []  # nothing registered before finish

    secret = activate(device, started)
    identity = enrollment.finish(STATION, FinishRequest(started.session, secret), now=NOW + 1)
    assert identity.device_id == started.device_id
    verify_certificate(identity.devid_cert, pki.device_ca.certificate, now=WHEN, purpose="client")
    verify_certificate(identity.tls_cert, pki.device_ca.certificate, now=WHEN, purpose="client")
    assert identity.groups == ("sensors",)
    assert DeviceIdentity.from_map(identity.to_map()).to_map() == identity.to_map()

    record = run_in_transaction(sessions, lambda s: Registry(s).device(identity.device_id))
    assert record.state is DeviceState.REGISTERED
    assert record.ek_cert_fingerprint == ek_fp
    assert x509.load_pem_x509_certificate(record.devid_cert_pem.encode()) == identity.devid_cert
    assert audit_trail(sessions) == [
        ("enroll.start", "accepted", f"ek:{ek_fp}"),
        ("enroll.finish", "accepted", f"device:{identity.device_id}"),
    ]
    # the device accepts what the service issued
    device.handle("install", _install(identity))

    # a retried finish (its answer was lost) returns the same identity, registers nothing new
    again = enrollment.finish(STATION, FinishRequest(started.session, secret), now=NOW + 2)
    assert again.devid_cert == identity.devid_cert
    # and the same TPM cannot enroll a second time
    request2, _ = device_start_request(device)
    _refused("enroll.ek.registered", enrollment.start, STATION, request2, now=NOW + 3)
    assert devices_in(sessions) == [identity.device_id]


def test_tags_given_at_enrollment_are_the_registered_device_s(
    enrollment: Enrollment, device: FactoryDevice, sessions: sessionmaker[Session]
) -> None:
    """``keyprovision --tag``: the tags travel in enroll/start (optional: a station without tags
    sends the map it always sent) and are set when finish registers the device, not before."""
    request, _ = device_start_request(device, tags=("plant-a", "line.3"))
    assert StartRequest.from_map(request.to_map()).tags == ("plant-a", "line.3")
    assert "tags" not in replace(request, tags=()).to_map()
    started = enrollment.start(STATION, request, now=NOW)
    assert run_in_transaction(sessions, tags.tags_of) == {}
    identity = enrollment.finish(
        STATION, FinishRequest(started.session, activate(device, started)), now=NOW + 1
    )
    assert run_in_transaction(sessions, tags.tags_of) == {identity.device_id: ["line.3", "plant-a"]}


def test_devid_certificate_names_the_device_as_802_1ar_recommends(
    enrollment: Enrollment, device: FactoryDevice, pki: FleetPKI, tmp_path: Path
) -> None:
    request, _ = device_start_request(device)
    started = enrollment.start(STATION, request, now=NOW)
    secret = device.handle(
        "activate-credential",
        {"credential_blob": started.credential_blob, "encrypted_secret": started.encrypted_secret},
    )["secret"]
    identity = enrollment.finish(
        STATION, FinishRequest(started.session, Secret(secret)), now=NOW + 1
    )
    devid = identity.devid_cert
    # CN = device id (broker user name), subject serialNumber = the serial the station read,
    # subjectAltName URI = urn:keyfleet:device:<id>
    assert common_name(devid) == identity.device_id
    assert hardware_serial_of(devid) == request.serial == "SN-E1"
    san = devid.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"urn:keyfleet:device:{identity.device_id}"
    ]
    assert hardware_serial_of(identity.tls_cert) is None  # the broker identity is unchanged
    # group members' credential check accepts it and reads the enrolled AK's TPM Name from it
    member_view = CredentialVerifier([pki.device_ca.certificate]).verify(
        devid.public_bytes(serialization.Encoding.DER), NOW + 2
    )
    assert member_view.device_id == identity.device_id
    assert member_view.ak_name == tpm_name(request.ak_public)
    # the project's own chain check, OpenSSL's, and the device's install checks accept it
    verify_certificate(devid, pki.device_ca.certificate, now=WHEN, purpose="client")
    write_certificate(tmp_path / "devid.pem", devid)
    write_certificate(tmp_path / "ca.pem", pki.device_ca.certificate)
    ca_file, devid_file = str(tmp_path / "ca.pem"), str(tmp_path / "devid.pem")
    attime = str(NOW + 2)
    checked = subprocess.run(
        [
            "openssl",
            "verify",
            "-attime",
            attime,
            "-purpose",
            "sslclient",
            "-x509_strict",
            "-CAfile",
            ca_file,
            devid_file,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    text = subprocess.run(
        ["openssl", "x509", "-noout", "-subject", "-ext", "subjectAltName"],
        input=devid.public_bytes(serialization.Encoding.PEM).decode(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "serialNumber = SN-E1" in text, text
    assert f"URI:urn:keyfleet:device:{identity.device_id}" in text, text
    device.handle("install", _install(identity))


def _install(identity: DeviceIdentity) -> dict[str, Any]:
    values = identity.to_map()
    return {k: values[k] for k in values}


def test_unknown_manufacturer_is_refused_and_audited(
    swtpm_factory: SwtpmFactory,
    other_manufacturer_ca: ManufacturerCA,
    enrollment: Enrollment,
    sessions: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    tpm = swtpm_factory.start(other_manufacturer_ca, fresh=True)
    with TPMStore(tpm.tcti) as store:
        device = FactoryDevice(store, tmp_path / "other", serial="SN-OTHER")
        request, _ = device_start_request(device)
    _refused("enroll.ek.chain", enrollment.start, STATION, request, now=NOW)
    action, outcome, target = audit_trail(sessions)[-1]
    assert (action, outcome) == ("enroll.start", "refused") and target.startswith("ek:")
    assert devices_in(sessions) == []


def test_forged_or_mismatched_inputs_are_refused(
    enrollment: Enrollment, device: FactoryDevice, sessions: sessionmaker[Session]
) -> None:
    request, keys = device_start_request(device)
    # EK public area of another key than the certified one
    other_ek = device._store.ek_public_area("ecc")
    _refused(
        "enroll.ek.public", enrollment.start, STATION, replace(request, ek_public=other_ek), now=NOW
    )
    _refused(
        "enroll.ek.cert", enrollment.start, STATION, replace(request, ek_cert=b"\x30\x00"), now=NOW
    )
    # the certify was made for another nonce / another TLS key
    _refused(
        "tpm.attest.nonce",
        enrollment.start,
        STATION,
        replace(request, certify_nonce=os.urandom(32)),
        now=NOW,
    )
    other_tls = (
        generate_key()
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    _refused(
        "tpm.attest.nonce",
        enrollment.start,
        STATION,
        replace(request, tls_public=other_tls),
        now=NOW,
    )
    # the leaf key presented as DevID: not the certified object
    _refused(
        "tpm.certify.name",
        enrollment.start,
        STATION,
        replace(request, devid_public=keys["leaf_public"]),
        now=NOW,
    )
    # the DevID presented as AK: not restricted
    _refused(
        "enroll.ak.attributes",
        enrollment.start,
        STATION,
        replace(request, ak_public=keys["devid_public"]),
        now=NOW,
    )
    _refused(
        "tpm.attest.signature",
        enrollment.start,
        STATION,
        replace(request, certify_signature=request.certify_signature[:-2] + b"\x00\x01"),
        now=NOW,
    )
    assert devices_in(sessions) == []
    outcomes = [o for _, o, _ in audit_trail(sessions)]
    assert outcomes == ["refused"] * 7


def certify_duplicable_key(
    store: TPMStore, ak_blob: KeyBlob, qualifying: bytes
) -> dict[str, bytes]:
    """A genuine TPM2_Certify by the device's AK over a key that is NOT fixedTPM/fixedParent
    (a duplicable key, which could be exported from the TPM). Uses the store's internals: this
    forges what a malicious device would present."""
    template = TPM2B_PUBLIC.parse(
        "ecc256:ecdsa-sha256",
        objectAttributes=TPMA_OBJECT.SIGN_ENCRYPT
        | TPMA_OBJECT.USERWITHAUTH
        | TPMA_OBJECT.SENSITIVEDATAORIGIN,
    )
    with store._srk() as srk:
        private, public, *_ = store._call("create", "create", srk, None, template)
        handle = store._call("load", "load", srk, private, public)
    try:
        with store.load_key(ak_blob) as ak, store._using(ak) as (ak_handle,):
            attest, signature = store._call(
                "certify",
                "certify",
                handle,
                ak_handle,
                qualifying,
                TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
            )
    finally:
        store._flush(handle)
    return {"public": public.marshal(), "attest": bytes(attest), "signature": bytes(signature)}


def test_certify_of_a_key_that_is_not_fixed_tpm_is_refused(
    enrollment: Enrollment, device: FactoryDevice, sessions: sessionmaker[Session]
) -> None:
    request, _ = device_start_request(device)
    forged = certify_duplicable_key(
        device._store,
        KeyBlob.load(device.paths.key_blob(KeyKind.AK)),
        certify_qualifying_data(request.certify_nonce, request.tls_public),
    )
    bad = replace(
        request,
        devid_public=forged["public"],
        certify_attest=forged["attest"],
        certify_signature=forged["signature"],
    )
    _refused("tpm.certify.attributes", enrollment.start, STATION, bad, now=NOW)
    assert devices_in(sessions) == []


def test_wrong_secret_ends_the_session_and_registers_nothing(
    enrollment: Enrollment, device: FactoryDevice, sessions: sessionmaker[Session]
) -> None:
    request, _ = device_start_request(device)
    started = enrollment.start(STATION, request, now=NOW)
    _refused(
        "enroll.credential",
        enrollment.finish,
        STATION,
        FinishRequest(started.session, Secret(os.urandom(32))),
        now=NOW + 1,
    )
    # one try only: the right secret no longer helps
    secret = activate(device, started)
    _refused(
        "enroll.session.unknown",
        enrollment.finish,
        STATION,
        FinishRequest(started.session, secret),
        now=NOW + 2,
    )
    assert devices_in(sessions) == []
    assert [a for a, o, _ in audit_trail(sessions) if o == "refused"] == [
        "enroll.finish",
        "enroll.finish",
    ]


def test_credential_for_a_swapped_ak_cannot_be_activated(
    enrollment: Enrollment, device: FactoryDevice, sessions: sessionmaker[Session]
) -> None:
    request, _ = device_start_request(device)
    started = enrollment.start(STATION, request, now=NOW)
    device.handle("create-keys", {})  # the device now holds another AK
    with pytest.raises(TPMError, match="credential was not made for this TPM"):
        device.handle(
            "activate-credential",
            {
                "credential_blob": started.credential_blob,
                "encrypted_secret": started.encrypted_secret,
            },
        )
    assert devices_in(sessions) == []


def test_sessions_expire_and_belong_to_their_station(
    pki: FleetPKI,
    manufacturer_ca: ManufacturerCA,
    sessions: sessionmaker[Session],
    device: FactoryDevice,
) -> None:
    enrollment = Enrollment(make_settings(pki, manufacturer_ca, session_ttl=10), sessions)
    request, _ = device_start_request(device)
    started = enrollment.start(STATION, request, now=NOW)
    secret = activate(device, started)
    _refused(
        "enroll.session.station",
        enrollment.finish,
        "line-2",
        FinishRequest(started.session, secret),
        now=NOW + 1,
    )
    _refused(
        "enroll.session.expired",
        enrollment.finish,
        STATION,
        FinishRequest(started.session, secret),
        now=NOW + 11,
    )
    assert devices_in(sessions) == []
    assert enrollment.pending_sessions() == 0


def test_undo_only_for_a_fresh_registration(
    enrollment: Enrollment, device: FactoryDevice, sessions: sessionmaker[Session]
) -> None:
    _refused("enroll.revoke.unknown", enrollment.revoke, STATION, "dev-nobody", reason="x", now=NOW)
    request, _ = device_start_request(device)
    started = enrollment.start(STATION, request, now=NOW)
    secret = activate(device, started)
    identity = enrollment.finish(STATION, FinishRequest(started.session, secret), now=NOW)
    _refused(
        "enroll.revoke.state",
        enrollment.revoke,
        STATION,
        identity.device_id,
        reason="late",
        now=NOW + 7200,
    )
    enrollment.revoke(STATION, identity.device_id, reason="install failed", now=NOW + 5)
    assert devices_in(sessions) == []
    action, outcome, target = audit_trail(sessions)[-1]
    assert (action, outcome, target) == (
        "enroll.revoke",
        "accepted",
        f"device:{identity.device_id}",
    )
    # the same TPM can now be enrolled again (the retry after a failed install)
    request2, _ = device_start_request(device)
    assert enrollment.start(STATION, request2, now=NOW + 6).device_id == identity.device_id


def test_station_must_be_registered_with_that_certificate(
    enrollment: Enrollment, pki: FleetPKI, sessions: sessionmaker[Session]
) -> None:
    assert enrollment.authorize_station(pki.station_cert, now=NOW) == STATION
    _, _, impostor = pki.extra_station(STATION)  # same CN, another certificate
    _refused("enroll.station.unknown", enrollment.authorize_station, impostor, now=NOW)
    _, _, unknown = pki.extra_station("line-9")
    _refused("enroll.station.unknown", enrollment.authorize_station, unknown, now=NOW)
    assert [(a, o) for a, o, _ in audit_trail(sessions)] == [("enroll.station", "refused")] * 2


@pytest.mark.parametrize(
    ("change", "check"),
    [
        ({"serial": "has space"}, "enroll.request"),
        ({"serial": "S" * 65}, "enroll.request"),  # more than X.520 allows in serialNumber
        ({"ek_kind": "dsa"}, "enroll.request"),
        ({"certify_nonce": b"short"}, "enroll.request"),
        ({"groups": ["ok", "bad/name"]}, "enroll.groups"),
        ({"tags": ["plant-a", "Plant-B"]}, "tag.invalid"),
        ({"tags": "plant-a"}, "tag.invalid"),
        ({"tags": [f"t{i}" for i in range(17)]}, "tag.invalid"),
        ({"ak_public": ""}, "enroll.request"),
        ({"extra": 1}, "enroll.request"),
    ],
)
def test_start_request_decoding_is_strict(change: dict[str, Any], check: str) -> None:
    base = StartRequest(
        serial="SN",
        ek_kind="rsa",
        ek_cert=b"c",
        ek_public=b"p",
        ak_public=b"a",
        devid_public=b"d",
        tls_public=b"t",
        certify_attest=b"x",
        certify_signature=b"s",
        certify_nonce=bytes(16),
    ).to_map()
    assert StartRequest.from_map(base).serial == "SN"
    _refused(check, StartRequest.from_map, {**base, **change})
    _refused("enroll.request", FinishRequest.from_map, {"session": "s"})
    assert "secret" not in repr(FinishRequest.from_map({"session": "s", "secret": b"k" * 32}))


def test_settings_from_the_service_configuration(
    pki: FleetPKI, manufacturer_ca: ManufacturerCA, tmp_path: Path
) -> None:
    from provisioning.config import load_config as load_service_config
    from provisioning.pki import certs_to_pem

    d = pki.directory
    write_certificate(d / "device-ca.pem", pki.device_ca.certificate)
    write_private_key(d / "device-ca.key", pki.device_ca.private_key)
    write_certificate(d / "operator-ca.pem", pki.operator_ca.certificate)
    write_certificate(d / "broker-ca.pem", pki.broker_ca.certificate)
    write_certificate(d / "service.pem", pki.service_cert)
    write_private_key(d / "service.key", generate_key())
    write_certificate(d / "service-signing.pem", pki.service_cert)
    write_private_key(d / "service-signing.key", generate_key())
    (d / "mfr.pem").write_bytes(
        certs_to_pem([manufacturer_ca.root_cert(), manufacturer_ca.issuer_cert()])
    )
    (d / "golden.toml").write_text("")
    (tmp_path / "service.toml").write_text(
        f"""
[database]
url = "sqlite:///{tmp_path / "fleet.db"}"
[broker]
host = "mqtt.example.net"
ca = "{d / "broker-ca.pem"}"
client_cert = "{d / "service.pem"}"
client_key = "{d / "service.key"}"
[device_ca]
cert = "{d / "device-ca.pem"}"
key = "{d / "device-ca.key"}"
[operator_ca]
cert = "{d / "operator-ca.pem"}"
[attestation]
manufacturer_cas = "{d / "mfr.pem"}"
golden_measurements = "{d / "golden.toml"}"
[http]
listen = "127.0.0.1:8443"
tls_cert = "{d / "service.pem"}"
tls_key = "{d / "service.key"}"
station_ca = "{d / "operator-ca.pem"}"
[service]
signing_key = "{d / "service-signing.key"}"
signing_cert = "{d / "service-signing.pem"}"
"""
    )
    settings = EnrollmentSettings.from_service_config(
        load_service_config(tmp_path / "service.toml")
    )
    assert settings.broker_host == "mqtt.example.net" and settings.broker_port == 8883
    assert settings.service_cert == pki.service_cert
    assert settings.anchors() == (pki.device_ca.certificate,)
    assert settings.operator_anchors == (pki.operator_ca.certificate,)
    assert len(settings.manufacturer_cas) == 2
    assert settings.device_ca.certificate == pki.device_ca.certificate
    assert settings.renewal_url is None  # renewal after expiry is off: no URL offered

    # allowed: devices are given the renewal listener's URL, and it survives the wire
    with (tmp_path / "service.toml").open("a") as file:
        file.write(
            f"""
[renewal]
expired = "allow"
listen = "0.0.0.0:8445"
url = "https://fleet.example.net:8445"
tls_cert = "{d / "service.pem"}"
tls_key = "{d / "service.key"}"
"""
        )
    settings = EnrollmentSettings.from_service_config(
        load_service_config(tmp_path / "service.toml")
    )
    assert settings.renewal_url == "https://fleet.example.net:8445"
    any_cert = pki.service_cert  # the fields' contents do not matter here, only the URL's trip
    identity = DeviceIdentity(
        device_id="dev-1",
        devid_cert=any_cert,
        tls_cert=any_cert,
        trust_anchors=(any_cert,),
        operator_anchors=(any_cert,),
        min_approvals=1,
        broker_host="mqtt.example.net",
        broker_port=8883,
        broker_ca=(any_cert,),
        service_cert=any_cert,
        groups=(),
        renewal_url=settings.renewal_url,
    )
    assert DeviceIdentity.from_map(identity.to_map()).renewal_url == settings.renewal_url
    with pytest.raises(ProtocolError):
        DeviceIdentity.from_map({**identity.to_map(), "renewal_url": "http://plain"})
