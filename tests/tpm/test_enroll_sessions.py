"""Enrollment sessions shared through the registry database (provisioning.enroll, table
``enroll_sessions``): two ``Enrollment`` objects over one database stand for two ``keyfleet
serve`` instances, each with its own engine and connection pool, as separate processes would.
On a SQLite file and on a real PostgreSQL (tests/fixtures/postgres.py), with a real swtpm device
answering the credential challenge through factory mode.

What must hold across instances: a session started on one is finished on the other; a retried
finish returns the same identity on either; two finishes of one session at the same moment on
two instances register exactly one device and both get that device's identity; one wrong answer
on any instance ends the session everywhere; expiry, purging and ``max_sessions`` are the
fleet's, not an instance's; the database holds the secret's digest and never the secret.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from agent.factory import FactoryDevice
from agent.protocol.errors import ProtocolError
from agent.protocol.secret import Secret
from provisioning.db.schema import EnrollSession
from provisioning.enroll import (
    DeviceIdentity,
    Enrollment,
    FinishRequest,
    StartResult,
    _Pending,
    secret_digest,
)
from provisioning.registry import Registry, make_engine, run_in_transaction, session_factory
from tests.fixtures.postgres import dump_rows
from tests.fixtures.swtpm import ManufacturerCA, SwtpmFactory
from tests.tpm.test_enroll import (
    NOW,
    STATION,
    FleetPKI,
    _refused,
    activate,
    at_once,
    audit_trail,
    device_start_request,
    devices_in,
    factory_device,
    make_pki,
    make_registry,
    make_settings,
)

pytestmark = pytest.mark.tpm
DATABASE_BACKENDS = ("sqlite", "postgresql")

ROUNDS = 4
JOIN_TIMEOUT = 120.0


class Fleet:
    """One registry database and ``Enrollment`` objects over it, one engine each."""

    def __init__(self, url: str, pki: FleetPKI, manufacturer: ManufacturerCA) -> None:
        self.url = url
        self.pki = pki
        self.manufacturer = manufacturer
        self.sessions = make_registry(url, pki)
        self.engines: list[Engine] = []

    def instance(self, cls: type[Enrollment] = Enrollment, **overrides: Any) -> Enrollment:
        engine = make_engine(self.url)
        self.engines.append(engine)
        return cls(make_settings(self.pki, self.manufacturer, **overrides), session_factory(engine))

    def close(self) -> None:
        for engine in self.engines:
            engine.dispose()
        bind = self.sessions.kw["bind"]
        assert isinstance(bind, Engine)
        bind.dispose()

    def stored_bytes(self) -> bytes:
        """Everything the database holds: the SQLite file and its WAL as they are on disk, or
        every value of every PostgreSQL table."""
        if self.url.startswith("sqlite:///"):
            path = Path(self.url.removeprefix("sqlite:///"))
            files = [path, path.with_name(path.name + "-wal")]
            return b"".join(f.read_bytes() for f in files if f.exists())
        return dump_rows(self.url)


@pytest.fixture
def fleet(database_url: str, tmp_path: Path, manufacturer_ca: ManufacturerCA) -> Iterator[Fleet]:
    fleet = Fleet(database_url, make_pki(tmp_path / "pki"), manufacturer_ca)
    try:
        yield fleet
    finally:
        fleet.close()


@pytest.fixture
def device(swtpm_factory: SwtpmFactory, tmp_path: Path) -> Iterator[FactoryDevice]:
    with factory_device(swtpm_factory, tmp_path / "device", "SN-S1") as device:
        yield device


def session_row(fleet: Fleet, session_id: str) -> EnrollSession | None:
    return run_in_transaction(
        fleet.sessions,
        lambda s: s.scalar(select(EnrollSession).where(EnrollSession.session_id == session_id)),
    )


def same_identity(a: DeviceIdentity, b: DeviceIdentity) -> bool:
    return a.to_map() == b.to_map()


# ---- tests ------------------------------------------------------------------------------------


def test_started_on_one_instance_finished_on_the_other(fleet: Fleet, device: FactoryDevice) -> None:
    one, two = fleet.instance(), fleet.instance()
    request, _ = device_start_request(device, groups=("sensors",))
    started = one.start(STATION, request, now=NOW)
    assert two.pending_session_ids() == one.pending_session_ids() == {started.session}
    secret = activate(device, started)

    identity = two.finish(STATION, FinishRequest(started.session, secret), now=NOW + 1)
    assert identity.device_id == started.device_id and identity.groups == ("sensors",)
    assert devices_in(fleet.sessions) == [started.device_id]
    device.handle("install", identity.to_map())  # the device accepts what instance 2 issued

    # the station lost the answer and retries on either instance: the same identity, nothing new
    for instance in (one, two, one):
        again = instance.finish(STATION, FinishRequest(started.session, secret), now=NOW + 2)
        assert same_identity(again, identity)
    assert devices_in(fleet.sessions) == [started.device_id]
    assert [(a, o) for a, o, _ in audit_trail(fleet.sessions)] == [
        ("enroll.start", "accepted"),
        ("enroll.finish", "accepted"),
    ]

    # undoing it on instance 1 ends the finished session everywhere: no retry hands it out again
    one.revoke(STATION, identity.device_id, reason="install failed", now=NOW + 3)
    _refused(
        "enroll.session.unknown",
        two.finish,
        STATION,
        FinishRequest(started.session, secret),
        now=NOW + 4,
    )
    assert one.pending_sessions() == two.pending_sessions() == 0


class RacingEnrollment(Enrollment):
    """A real ``Enrollment`` that waits, after checking the session and issuing the
    certificates, until every racer has got that far: both finishes have seen the session
    unfinished and hold certificates of their own before either tries to claim it, so which one
    registers is decided by the database alone, on every round, not by thread timing."""

    gate: threading.Barrier
    issued: list[x509.Certificate]

    def _issue(
        self, pending: _Pending, when: datetime
    ) -> tuple[x509.Certificate, x509.Certificate]:
        devid_cert, tls_cert = super()._issue(pending, when)
        self.issued.append(devid_cert)
        self.gate.wait(timeout=JOIN_TIMEOUT)
        return devid_cert, tls_cert


def test_concurrent_finishes_on_two_instances_register_one_device(
    fleet: Fleet, device: FactoryDevice
) -> None:
    racers = [fleet.instance(RacingEnrollment), fleet.instance(RacingEnrollment)]
    starter = fleet.instance()
    for n in range(ROUNDS):
        now = NOW + 10 * n
        gate = threading.Barrier(len(racers))
        for racer in racers:
            assert isinstance(racer, RacingEnrollment)
            racer.gate, racer.issued = gate, []
        request, _ = device_start_request(device)
        started = starter.start(STATION, request, now=now)
        secret = activate(device, started)
        results = finish_together(racers, started.session, secret, now=now + 1)
        assert len(results) == 2, results
        first, second = results
        assert isinstance(first, DeviceIdentity), (n, first)
        assert isinstance(second, DeviceIdentity), (n, second)
        # both racers issued a certificate of their own; the station gets the registered one
        # from either, the other was never stored or returned
        issued = [c for r in racers if isinstance(r, RacingEnrollment) for c in r.issued]
        assert len(issued) == 2 and issued[0] != issued[1], n
        assert same_identity(first, second) and first.devid_cert in issued, n
        assert devices_in(fleet.sessions) == [started.device_id]
        registered = run_in_transaction(fleet.sessions, _devid_pem(started.device_id))
        assert x509.load_pem_x509_certificate(registered.encode()) == first.devid_cert
        # one accepted finish per round so far, none refused (the audit log is append-only)
        finishes = [(o, t) for a, o, t in audit_trail(fleet.sessions) if a == "enroll.finish"]
        assert finishes[n:] == [("accepted", f"device:{started.device_id}")], finishes
        # undo for the next round (same TPM, fresh keys)
        starter.revoke(STATION, started.device_id, reason="next round", now=now + 2)
        assert devices_in(fleet.sessions) == []


def _devid_pem(device_id: str) -> Callable[[Session], str]:
    return lambda session: Registry(session).device(device_id).devid_cert_pem


def finish_together(
    racers: list[Enrollment], session_id: str, secret: Secret, *, now: int
) -> list[DeviceIdentity | BaseException]:
    """Every racer finishes the session in its own thread; what each returned or raised."""
    request = FinishRequest(session_id, secret)
    return at_once(
        [partial(racer.finish, STATION, request, now=now) for racer in racers], JOIN_TIMEOUT
    )


def test_one_wrong_answer_ends_the_session_on_every_instance(
    fleet: Fleet, device: FactoryDevice
) -> None:
    one, two = fleet.instance(), fleet.instance()
    request, _ = device_start_request(device)
    started = one.start(STATION, request, now=NOW)
    secret = activate(device, started)
    # another station's finish on instance 2 does not end the session (nor spend its one try)
    _refused(
        "enroll.session.station",
        two.finish,
        "line-2",
        FinishRequest(started.session, Secret(os.urandom(32))),
        now=NOW + 1,
    )
    assert session_row(fleet, started.session) is not None
    _refused(
        "enroll.credential",
        two.finish,
        STATION,
        FinishRequest(started.session, Secret(os.urandom(32))),
        now=NOW + 1,
    )
    assert session_row(fleet, started.session) is None
    # the right answer on instance 1 comes too late
    _refused(
        "enroll.session.unknown",
        one.finish,
        STATION,
        FinishRequest(started.session, secret),
        now=NOW + 2,
    )
    assert devices_in(fleet.sessions) == []
    refusals = [(a, t) for a, o, t in audit_trail(fleet.sessions) if o == "refused"]
    assert refusals == [
        ("enroll.finish", f"device:{started.device_id}"),
        ("enroll.finish", f"device:{started.device_id}"),
        ("enroll.finish", "session:unknown"),
    ]


def test_expiry_purge_and_session_limit_are_fleet_wide(fleet: Fleet, device: FactoryDevice) -> None:
    one = fleet.instance(session_ttl=10, max_sessions=2)
    two = fleet.instance(session_ttl=10, max_sessions=2)
    request, _ = device_start_request(device)
    first = one.start(STATION, request, now=NOW)
    secret = activate(device, first)
    second = two.start(STATION, request, now=NOW + 1)
    # two sessions pending in the fleet: a third is refused on either instance
    _refused("enroll.session.limit", one.start, STATION, request, now=NOW + 2)
    _refused("enroll.session.limit", two.start, STATION, request, now=NOW + 2)
    # expired on instance 2 although started on instance 1
    _refused(
        "enroll.session.expired",
        two.finish,
        STATION,
        FinishRequest(first.session, secret),
        now=NOW + 11,
    )
    assert one.pending_session_ids() == {second.session}
    # a start on instance 1 purges what expired meanwhile (the second session) and fits
    third = one.start(STATION, request, now=NOW + 12)
    assert two.pending_session_ids() == {third.session}
    assert devices_in(fleet.sessions) == []


def test_the_database_holds_the_secret_digest_never_the_secret(
    fleet: Fleet, device: FactoryDevice
) -> None:
    one, two = fleet.instance(), fleet.instance()
    request, _ = device_start_request(device)
    started = one.start(STATION, request, now=NOW)
    secret = activate(device, started)
    digest = secret_digest(secret.reveal())
    row = session_row(fleet, started.session)
    assert row is not None and row.credential_digest == digest
    assert row.finished_at is None and row.devid_cert_pem is None
    stored = fleet.stored_bytes()
    assert digest in stored  # the search below looks where the session really is
    for form in (secret.reveal(), secret.reveal().hex().encode()):
        assert form not in stored

    identity = two.finish(STATION, FinishRequest(started.session, secret), now=NOW + 1)
    row = session_row(fleet, started.session)
    assert row is not None and row.finished_at == NOW + 1
    assert row.devid_cert_pem is not None
    assert x509.load_pem_x509_certificate(row.devid_cert_pem.encode()) == identity.devid_cert
    stored = fleet.stored_bytes()
    for form in (secret.reveal(), secret.reveal().hex().encode()):
        assert form not in stored


def test_concurrent_starts_on_two_instances_respect_the_fleet_limit(
    fleet: Fleet, device: FactoryDevice
) -> None:
    """``max_sessions`` is counted under a lock that serializes starts fleet-wide: eight starts
    at once on two instances with room for three open exactly three sessions."""
    limit, attempts = 3, 8
    instances = [fleet.instance(max_sessions=limit) for _ in range(2)]
    request, _ = device_start_request(device)
    starts = [partial(instances[i % 2].start, STATION, request, now=NOW) for i in range(attempts)]
    results = at_once(starts, JOIN_TIMEOUT)
    opened = {r.session for r in results if isinstance(r, StartResult)}
    refusals = [r for r in results if not isinstance(r, StartResult)]
    assert len(opened) == limit, results
    assert all(
        isinstance(r, ProtocolError) and r.check == "enroll.session.limit" for r in refusals
    ), refusals
    assert instances[0].pending_session_ids() == opened


def test_a_session_ended_between_check_and_claim_registers_nothing(
    fleet: Fleet, device: FactoryDevice
) -> None:
    """Instance 1 has checked the right answer and issued certificates; before it claims the
    session, a wrong answer on instance 2 ends it. Instance 1's claim then finds no row: it
    refuses (``enroll.session.unknown``) and registers nothing."""
    slow = fleet.instance(RacingEnrollment)
    other = fleet.instance()
    assert isinstance(slow, RacingEnrollment)
    slow.gate, slow.issued = threading.Barrier(2), []
    request, _ = device_start_request(device)
    started = other.start(STATION, request, now=NOW)
    secret = activate(device, started)
    results = []

    def finish_slowly() -> None:
        try:
            results.append(slow.finish(STATION, FinishRequest(started.session, secret), now=NOW))
        except ProtocolError as exc:
            results.append(exc)

    thread = threading.Thread(target=finish_slowly)
    thread.start()
    # a wrong answer while instance 1 waits at the gate with its certificates issued...
    while not slow.issued:
        assert thread.is_alive(), results
        thread.join(0.01)
    _refused(
        "enroll.credential",
        other.finish,
        STATION,
        FinishRequest(started.session, Secret(os.urandom(32))),
        now=NOW,
    )
    slow.gate.wait(timeout=JOIN_TIMEOUT)  # ...then instance 1 goes on to claim
    thread.join(JOIN_TIMEOUT)
    assert not thread.is_alive()
    [result] = results
    assert isinstance(result, ProtocolError) and result.check == "enroll.session.unknown"
    assert devices_in(fleet.sessions) == []
    assert [o for a, o, _ in audit_trail(fleet.sessions) if a == "enroll.finish"] == [
        "refused",
        "refused",
    ]
