"""Certificate renewal after expiry, over the service's HTTPS renewal listener
(``provisioning.renewal_http`` on a real uvicorn server with server TLS, in front of
``provisioning.service.expired``), with the device side run by the real agent core and its HTTPS
client (``agent.renewal_https``) over a real TPM: each device has its own swtpm booted by
firmware_sim's measured boot (tests/tpm/test_renewal_service.py builds them).

A device whose certificates expired cannot renew over MQTT (its stored DevID certificate no
longer passes: ``cred.stored``); over HTTPS it renews within ``[renewal] max_expired_seconds``
with the same TPM proofs and checks, audited ``renew.expired``. The policy ``refuse`` and a
certificate expired too long ago are refused ``renew.expired`` (audited); malformed, oversize,
forged and misdirected requests, a replayed answer, a nonce never issued and another device's
certify are refused by check id with nothing changed."""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from sqlalchemy import select

from agent.core import Outcome
from agent.protocol.errors import ProtocolError
from agent.protocol.topics import SERVICE_ID
from agent.protocol.wire import cbor
from agent.protocol.wire.envelope import Signer, encode_message, open_message
from agent.protocol.wire.messages.renewal import RenewAnswer, RenewChallenge, RenewRequest
from agent.renewal_https import RenewalClient, exchange
from firmware_sim.boot import default_components
from provisioning import pki
from provisioning.db.runtime import AttestChallengeRow
from provisioning.http import EnrollmentServer
from provisioning.registry import DeviceState, Registry
from provisioning.registry import Outcome as AuditOutcome
from provisioning.renewal_http import (
    FINISH_PATH,
    MAX_BODY,
    START_PATH,
    build_renewal_app,
    start_renewal_server,
)
from tests.fixtures.swtpm import SwtpmFactory
from tests.pure.test_service_core import Fleet
from tests.tpm.test_renewal_service import (
    LIFETIME,
    Member,
    _answer,
    issued_serials,
    member,
    refused,
    renewal_fleet,
    stored_devid,
)

pytestmark = pytest.mark.tpm

GOOD = default_components("1.0")
WINDOW = 3600  # [renewal] max_expired_seconds in these tests
LATE = 100  # how long after expiry the device comes back


@dataclass
class Listener:
    server: EnrollmentServer
    client: RenewalClient
    ca: Path
    rejections: object
    reported: list[str]  # what the listener reports to keyfleet serve's metrics (on_refusal)


@pytest.fixture
def fleet(tmp_path: Path, swtpm_factory: SwtpmFactory) -> Iterator[Fleet]:
    yield from renewal_fleet(tmp_path, swtpm_factory, renew_expired=True, max_expired=WINDOW)


@pytest.fixture
def listener(fleet: Fleet, tmp_path: Path) -> Iterator[Listener]:
    """The renewal listener on the fleet's service and clock; its server certificate is valid
    on the real clock (the TLS client checks it), issued by a TLS CA of its own."""
    now = datetime.now(UTC)
    tls_ca = pki.create_ca("renewal TLS CA", now=now, valid_for=timedelta(days=1))
    server_key = pki.generate_key()
    server_cert = pki.issue_server_cert(
        tls_ca,
        server_key.public_key(),
        common_name="keyfleet-renew",
        ip_addresses=["127.0.0.1"],
        now=now,
        valid_for=timedelta(days=1),
    )
    ca, cert, key = tmp_path / "tls-ca.pem", tmp_path / "renew.pem", tmp_path / "renew.key"
    pki.write_certificate(ca, tls_ca.certificate)
    pki.write_certificate(cert, server_cert)
    pki.write_private_key(key, server_key)
    reported: list[str] = []
    app = build_renewal_app(
        fleet.service.renew_over_https,
        clock=lambda: fleet.now,
        on_refusal=reported.append,
    )
    server = start_renewal_server(app, server_cert=cert, server_key=key)
    try:
        yield Listener(server, RenewalClient(server.url, ca=ca), ca, app.state.rejections, reported)
    finally:
        server.stop()


def expire(fleet: Fleet, late: int = LATE) -> int:
    """Let the certificates of every device expire ``late`` seconds ago (nobody ticks: the
    devices were off); their not-after."""
    device = member(fleet)
    assert device.core is not None
    end = int(
        x509.load_der_x509_certificate(device.core.credential).not_valid_after_utc.timestamp()
    )
    fleet.now = end + late
    return end


def renew(fleet: Fleet, listener: Listener, name: str = "dev-1") -> Outcome:
    """What keyagent does once its certificates expired (agent/daemon.py ``_renew_expired``)."""
    device = member(fleet, name)
    core = device.core
    assert core is not None
    request = core.expired_renewal(fleet.now)
    assert request is not None
    return exchange(
        listener.client,
        name,
        request,
        lambda envelope: core.handle(envelope, core.command_topic, fleet.now),
        lambda: None,
    )


def challenge_for(fleet: Fleet, listener: Listener, device: Member) -> RenewChallenge:
    """The start step with a fresh renew.request of the device's DevID key; the challenge."""
    _, payload = device.send_signed(RenewRequest(not_after=fleet.now - LATE), fleet.now)
    answer = listener.client.start(device.name, payload)
    message = open_message(
        answer,
        lambda kid: Signer(SERVICE_ID, device.service_key),
        now=fleet.now,
        recipients={device.name},
    )
    assert isinstance(message.body, RenewChallenge)
    return message.body


def finish_with(fleet: Fleet, listener: Listener, device: Member, answer: RenewAnswer) -> bytes:
    _, payload = device.send_signed(answer, fleet.now)
    return listener.client.finish(device.name, payload)


def refusal(call: object) -> str:
    assert callable(call)
    with pytest.raises(ProtocolError) as caught:
        call()
    return caught.value.check


def expired_audit(fleet: Fleet, outcome: AuditOutcome) -> list[dict[str, object]]:
    return [
        {"reason": e.reason, **json.loads(e.details)}
        for e in fleet.audit_entries()
        if e.action == "renew.expired" and e.outcome == outcome.value
    ]


# -- renewal after expiry ------------------------------------------------------------------------


def test_an_expired_device_renews_over_https_with_its_tpm_and_talks_over_mqtt_again(
    fleet: Fleet, listener: Listener
) -> None:
    device = member(fleet)
    assert device.core is not None
    old_devid, old_stored = device.core.credential, stored_devid(fleet)
    end = expire(fleet)
    # over MQTT (had the broker let it in) the expired certificate no longer identifies it
    fleet.send(device.send_signed(RenewRequest(not_after=end), fleet.now))
    assert refused(fleet, "cred.stored") == 1

    taken = renew(fleet, listener)
    assert taken.renewed is not None
    devid_der, tls_der = taken.renewed
    assert device.core.credential == devid_der != old_devid
    new = x509.load_der_x509_certificate(devid_der)
    assert new.public_key() == device.devid.public_key()  # the same TPM key, re-certified
    assert x509.load_der_x509_certificate(tls_der).public_key() == device.tls_key.public_key()
    assert int(new.not_valid_after_utc.timestamp()) == fleet.now + LIFETIME
    assert stored_devid(fleet) == pki.cert_to_pem(new).decode() != old_stored
    assert len(issued_serials(fleet)) == 4  # enrollment's two and this renewal's two
    (entry,) = expired_audit(fleet, AuditOutcome.ACCEPTED)
    assert entry["expired_at"] == end and entry["expired_seconds"] == LATE
    assert entry["not_after"] == fleet.now + LIFETIME
    assert not any(e.action == "renew.issued" for e in fleet.audit_entries())

    # the renewed device is heard over MQTT again: its next request is answered
    before = refused(fleet, "cred.stored")
    fleet.send(device.send_signed(RenewRequest(not_after=fleet.now + LIFETIME), fleet.now))
    assert refused(fleet, "cred.stored") == before


def test_the_policy_refuse_and_a_certificate_expired_too_long_ago_are_refused_and_audited(
    fleet: Fleet, listener: Listener
) -> None:
    device = member(fleet)
    before, serials = stored_devid(fleet), issued_serials(fleet)
    end = expire(fleet)
    env = fleet.service._env
    allowing = env.settings
    env.settings = replace(allowing, renew_expired=False)
    assert refusal(lambda: renew(fleet, listener)) == "renew.expired"
    env.settings = allowing
    expire(fleet, late=WINDOW + 1)
    assert device.core is not None and device.core.renewal is not None
    device.core.renewal.schedule.renewed()  # ask at once again (not after the backoff)
    assert refusal(lambda: renew(fleet, listener)) == "renew.expired"

    assert refused(fleet, "renew.expired") == 2
    policy, late = expired_audit(fleet, AuditOutcome.REFUSED)
    assert str(policy["reason"]).startswith("[renew.expired]") and '"refuse"' in str(
        policy["reason"]
    )
    assert "max_expired_seconds" in str(late["reason"]) and late["expired_seconds"] == WINDOW + 1
    assert policy["expired_at"] == late["expired_at"] == end
    assert stored_devid(fleet) == before and issued_serials(fleet) == serials
    assert expired_audit(fleet, AuditOutcome.ACCEPTED) == []


# -- attacks: refused by check id, nothing changed -----------------------------------------------


def post(
    listener: Listener,
    path: str,
    body: bytes,
    content_type: str = "application/cbor",
    method: str = "POST",
) -> tuple[int, object]:
    context = ssl.create_default_context(cafile=str(listener.ca))
    conn = http.client.HTTPSConnection("127.0.0.1", listener.server.port, context=context)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": content_type})
        response = conn.getresponse()
        return response.status, cbor.decode(response.read(), max_size=MAX_BODY)
    finally:
        conn.close()


def check_of(answer: tuple[int, object]) -> tuple[int, str]:
    status, value = answer
    assert isinstance(value, dict)
    return status, str(value["check"])


def test_malformed_oversize_forged_and_misdirected_requests_are_refused_unaudited(
    fleet: Fleet, listener: Listener
) -> None:
    device, other = member(fleet), member(fleet, "dev-2")
    before, serials, entries = stored_devid(fleet), issued_serials(fleet), fleet.audit_entries()
    expire(fleet)
    _, request = device.send_signed(RenewRequest(not_after=fleet.now), fleet.now)

    def body(device_id: str, envelope: bytes) -> bytes:
        return cbor.encode({"device": device_id, "envelope": envelope})

    assert check_of(post(listener, START_PATH, body("dev-1", request), "text/plain")) == (
        415,
        "http.content-type",
    )
    status, check = check_of(post(listener, START_PATH, b"\xff\x00 not cbor"))
    assert status == 400 and check.startswith("cbor.")
    wrong_map = cbor.encode({"device": "dev-1", "envelope": request, "extra": 1})
    assert check_of(post(listener, START_PATH, wrong_map)) == (400, "renew.https.request")
    assert check_of(post(listener, START_PATH, bytes(MAX_BODY + 1))) == (413, "http.size")
    assert check_of(post(listener, START_PATH, b"", method="GET")) == (405, "http.method")
    assert check_of(post(listener, "/v1/renew/other", body("dev-1", request))) == (
        404,
        "http.route",
    )
    status, check = check_of(post(listener, START_PATH, body("dev-1", b"\xa0junk")))
    assert status in (400, 403) and check.startswith(("envelope.", "cose.", "cbor."))

    # forged: dev-2's DevID key signs a request for dev-1 (either name as the sender)
    forged = encode_message(
        RenewRequest(not_after=fleet.now),
        key=other.devid,
        sender="dev-1",
        to=SERVICE_ID,
        seq=other.seq + 1,
        time=fleet.now,
    )
    assert check_of(post(listener, START_PATH, body("dev-1", forged))) == (403, "cose.kid-unknown")
    _, theirs = other.send_signed(RenewRequest(not_after=fleet.now), fleet.now)
    assert check_of(post(listener, START_PATH, body("dev-1", theirs))) == (
        403,
        "cose.kid-unknown",
    )
    # a device nobody enrolled
    assert check_of(post(listener, START_PATH, body("dev-9", request)))[1] == "cose.kid-unknown"

    # authenticated, but the wrong step: a renew.request to finish (audited: an expired device)
    assert check_of(post(listener, FINISH_PATH, body("dev-1", request))) == (
        403,
        "renew.https.message",
    )
    # the listener counted every refusal; it reported its own to the metrics (the service
    # counts the ones it made itself, once); the service audited only the authenticated one
    counted = listener.rejections.snapshot()  # type: ignore[attr-defined]
    assert counted["http.size"] == 1 and counted["cose.kid-unknown"] == 3
    assert counted["renew.https.message"] == 1
    assert {c for c in listener.reported if not c.startswith("cbor.")} == {
        "http.content-type",
        "http.method",
        "http.route",
        "http.size",
        "renew.https.request",
    }
    assert any(c.startswith("cbor.") for c in listener.reported)
    assert fleet.service.metrics.rejections.value("renew.https.message") == 1
    new_entries = fleet.audit_entries()[len(entries) :]
    assert [(e.action, e.reason.split("]")[0] + "]") for e in new_entries] == [
        ("renew.expired", "[renew.https.message]")
    ]
    assert stored_devid(fleet) == before and issued_serials(fleet) == serials


def test_another_devices_certify_a_nonce_never_issued_and_a_replayed_answer_are_refused(
    fleet: Fleet, listener: Listener
) -> None:
    device, other = member(fleet), member(fleet, "dev-2")
    before, serials = stored_devid(fleet), issued_serials(fleet)
    expire(fleet)

    # dev-2's TPM certifies its DevID key over dev-1's nonce: valid, by the wrong AK
    challenge = challenge_for(fleet, listener, device)
    own = device.evidence(challenge.nonce, challenge.pcrs)
    theirs = other.evidence(challenge.nonce, challenge.pcrs)
    stolen = replace(
        own,
        devid_public=theirs.devid_public,
        certify=theirs.certify,
        certify_signature=theirs.certify_signature,
    )
    answer = _answer(challenge, stolen, device)
    assert refusal(lambda: finish_with(fleet, listener, device, answer)) == "renew.certify"

    # a genuine answer to a nonce the service never issued
    challenge = challenge_for(fleet, listener, device)
    genuine = _answer(challenge, device.evidence(challenge.nonce, challenge.pcrs), device)
    unissued = replace(genuine, nonce=bytes(len(challenge.nonce)))
    assert refusal(lambda: finish_with(fleet, listener, device, unissued)) == "renew.nonce"
    assert stored_devid(fleet) == before and issued_serials(fleet) == serials
    refusals = expired_audit(fleet, AuditOutcome.REFUSED)
    assert [str(e["reason"])[:14] for e in refusals] == ["[renew.certify", "[renew.nonce] "]

    # the genuine answer renews; the same envelope again is a replay, the same answer in a new
    # envelope finds its nonce spent
    _, payload = device.send_signed(genuine, fleet.now)
    listener.client.finish(device.name, payload)
    renewed, serials = stored_devid(fleet), issued_serials(fleet)
    assert renewed != before and len(serials) == 4
    assert refusal(lambda: listener.client.finish(device.name, payload)).startswith("replay.")
    assert refusal(lambda: finish_with(fleet, listener, device, genuine)) == "renew.nonce"
    assert stored_devid(fleet) == renewed and issued_serials(fleet) == serials
    assert len(expired_audit(fleet, AuditOutcome.ACCEPTED)) == 1


def test_revoked_and_quarantined_devices_are_not_renewed(fleet: Fleet, listener: Listener) -> None:
    before, serials = stored_devid(fleet), issued_serials(fleet)
    expire(fleet)
    with fleet.sessions.begin() as session:
        Registry(session).set_device_state(
            "dev-1", DeviceState.QUARANTINED, reason="test: bad firmware", now=fleet.now
        )
    assert refusal(lambda: renew(fleet, listener)) == "ds.device.quarantined"
    with fleet.sessions.begin() as session:
        Registry(session).set_device_state(
            "dev-1", DeviceState.REVOKED, reason="test: lost", now=fleet.now
        )
    device = member(fleet)
    assert device.core is not None and device.core.renewal is not None
    device.core.renewal.schedule.renewed()
    assert refusal(lambda: renew(fleet, listener)) == "ds.device.revoked"
    assert stored_devid(fleet) == before and issued_serials(fleet) == serials
    assert expired_audit(fleet, AuditOutcome.ACCEPTED) == []


def test_open_nonces_per_device_stay_bounded(fleet: Fleet, listener: Listener) -> None:
    """A device (or whoever signs with its DevID key) asking again and again holds at most the
    nonce book's per-device limit of open nonces, as for attestation."""
    device = member(fleet)
    expire(fleet)
    limit = fleet.service.attestation.max_open  # type: ignore[union-attr]
    nonces = []
    for _ in range(limit + 3):
        fleet.now += 1
        nonces.append(challenge_for(fleet, listener, device).nonce)
    assert len(set(nonces)) == limit + 3
    with fleet.sessions() as session:
        open_rows = session.scalars(
            select(AttestChallengeRow).where(
                AttestChallengeRow.device_id == "dev-1",
                AttestChallengeRow.answered_at.is_(None),
            )
        ).all()
    assert len(open_rows) == limit
