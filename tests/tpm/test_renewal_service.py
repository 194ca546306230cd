"""Certificate renewal through the delivery service (sans-I/O core, real SQLite file) with the
device side run by the real agent core (``agent.core.AgentCore``) over a real TPM: each device
has its own swtpm booted by firmware_sim's measured boot, a TPM-resident AK and DevID key, a
software TLS key, and certificates with a short lifetime. The service's renewal checks the quote
against the approved releases, the TPM2_Certify of the DevID key against the AK enrolled for that
device, and that the keys are the keys of the current certificates. Attacks are refused by check
id with nothing changed: a stale (already answered) nonce, a quote over an older nonce, another
device's certify, an unapproved release, a key that is not the device's, a revoked device."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from agent.core import AgentCore, AttestationEvidence, RenewalEvidence, RenewalSetup
from agent.protocol.attest import tpm_name
from agent.protocol.errors import StateError
from agent.protocol.membership import Membership
from agent.protocol.renewal import RenewalSchedule, sign_tls_proof
from agent.protocol.topics import SERVICE_ID, device_report_topic
from agent.protocol.wire.envelope import Signer, encode_message, open_message
from agent.protocol.wire.messages.base import Body
from agent.protocol.wire.messages.renewal import RenewAnswer, RenewChallenge, RenewRequest
from agent.tpm import KeyKind, TPMStore
from agent.tpm.blob import KeyBlob
from agent.tpm.store import TPMKey
from firmware_sim.boot import FirmwareComponent, default_components, measured_boot, tampered
from provisioning import pki, revocation
from provisioning.db.schema import Device
from provisioning.inventory import device_not_afters
from provisioning.policy import policy_from_components
from provisioning.registry import DeviceState, Registry
from provisioning.revocation import RevocationSettings
from provisioning.service.core import AttestationSettings, DeliveryService
from tests.fixtures.swtpm import Swtpm, SwtpmFactory
from tests.pure.test_service_core import Fleet, make_fleet
from tests.service_members import Outgoing, utc

pytestmark = pytest.mark.tpm

GOOD = default_components("1.0")
LIFETIME = 600  # seconds: what [enrollment] certificate_validity_seconds would say in a lab
DEVICES = ("dev-1", "dev-2")


class SoftLeaves:
    """``agent.core.KeyProvider`` with the DevID key in the TPM; these tests make no groups, so
    leaf keys are software keys (never asked for)."""

    def __init__(self, devid: Callable[[], TPMKey]) -> None:
        self._devid = devid  # the key as loaded now (a reboot loads it again)

    @property
    def devid(self) -> ec.EllipticCurvePrivateKey:
        return self._devid()

    def new_leaf_key(self) -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def load_leaf(self, public: bytes) -> ec.EllipticCurvePrivateKey:
        raise StateError("no leaf keys in these tests")

    def prove_leaf(self, public_point: bytes) -> bytes | None:
        return None


@dataclass
class Member:
    """One device: its swtpm, key blobs, TLS key, event log and agent core. ``answer_with``: a
    tampered answer to the next renewal challenge instead of the core's (an attacker holding the
    device's DevID key, e.g. compromised software on it)."""

    name: str
    swtpm: Swtpm
    ca: pki.CertificateAuthority
    service_key: ec.EllipticCurvePublicKey
    ak_blob: KeyBlob = field(repr=False)
    devid_blob: KeyBlob = field(repr=False)
    tls_key: ec.EllipticCurvePrivateKey = field(repr=False)
    store: TPMStore = field(repr=False)
    devid: TPMKey = field(repr=False)
    event_log: bytes = b""
    core: AgentCore | None = None
    answer_with: Callable[[RenewChallenge], RenewAnswer] | None = None
    seq: int = 1 << 50
    renewed: list[tuple[bytes, bytes]] = field(default_factory=list)
    challenges: list[RenewChallenge] = field(default_factory=list)
    answers: list[RenewAnswer] = field(default_factory=list)

    # -- the TPM ------------------------------------------------------------------------------

    def boot(self, components: Sequence[FirmwareComponent]) -> None:
        """Power-cycle the TPM and measure ``components``; the keys are loaded again."""
        self.store.close()
        self.swtpm.restart()
        with TPMStore(self.swtpm.tcti) as store:
            self.event_log = measured_boot(store, components).encode()
        self.store = TPMStore(self.swtpm.tcti)
        self.devid = self.store.load_key(self.devid_blob)

    def evidence(self, nonce: bytes, pcrs: tuple[int, ...]) -> RenewalEvidence:
        """What keyagent's daemon gives the core (agent/daemon.py ``_renew_evidence``)."""
        with self.store.load_key(self.ak_blob) as ak:
            quote = self.store.quote(ak, nonce, pcrs)
            certify = self.store.certify(ak, self.devid, nonce)
        return RenewalEvidence(
            attestation=AttestationEvidence(quote.attest, quote.signature, self.event_log),
            devid_public=self.devid.public_area,
            certify=certify.attest,
            certify_signature=certify.signature,
            tls_proof=sign_tls_proof(self.tls_key, self.name, nonce),
        )

    # -- the network ----------------------------------------------------------------------------

    def send_signed(self, body: Body, now: int) -> Outgoing:
        self.seq += 1
        payload = encode_message(
            body, key=self.devid, sender=self.name, to=SERVICE_ID, seq=self.seq, time=now
        )
        return device_report_topic(self.name), payload

    def receive(self, topic: str, payload: bytes, now: int) -> list[Outgoing]:
        assert self.core is not None
        if self.answer_with is not None:
            message = open_message(
                payload,
                lambda kid: Signer(SERVICE_ID, self.service_key),
                now=now,
                recipients={self.name},
            )
            if isinstance(message.body, RenewChallenge):
                answer = self.answer_with(message.body)
                self.answer_with = None
                return [self.send_signed(answer, now)]
        outcome = self.core.handle(payload, topic, now)
        if outcome.renewed is not None:
            self.renewed.append(outcome.renewed)
        return [(p.topic, p.payload) for p in outcome.publishes]

    def tick(self, now: int) -> list[Outgoing]:
        assert self.core is not None
        return [(p.topic, p.payload) for p in self.core.tick(now).publishes]


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def make_member(fleet: Fleet, name: str, swtpm: Swtpm) -> Member:
    assert fleet.device_ca is not None
    ca = fleet.device_ca
    with TPMStore(swtpm.tcti) as store:
        event_log = measured_boot(store, GOOD).encode()
        ak_blob = store.create_key(KeyKind.AK)
        devid_blob = store.create_key(KeyKind.DEVID)
        with store.load_key(ak_blob) as ak:
            ak_public = ak.public_area
    store = TPMStore(swtpm.tcti)
    devid = store.load_key(devid_blob)
    tls_key = ec.generate_private_key(ec.SECP256R1())
    when = utc(fleet.now)
    # what enrollment issues and records
    devid_cert = pki.issue_devid_cert(
        ca,
        devid.public_key(),
        device_id=name,
        hardware_serial=f"SN-{name}",
        now=when,
        valid_for=timedelta(seconds=LIFETIME),
        ak_name=tpm_name(ak_public),
    )
    tls_cert = pki.issue_client_cert(
        ca,
        tls_key.public_key(),
        identity=name,
        role="device",
        now=when,
        valid_for=timedelta(seconds=LIFETIME),
    )
    with fleet.sessions.begin() as session:
        row = session.get(Device, name)
        assert row is not None
        row.ak_public = ak_public
        row.devid_cert_pem = pki.cert_to_pem(devid_cert).decode()
        revocation.record_issued(
            session,
            name,
            [(revocation.KIND_DEVID, devid_cert), (revocation.KIND_TLS, tls_cert)],
            now=fleet.now,
        )
    service_key = fleet.service._env.key.public_key()
    member = Member(
        name, swtpm, ca, service_key, ak_blob, devid_blob, tls_key, store, devid, event_log
    )
    member.core = AgentCore(
        name,
        service_key,
        SoftLeaves(lambda: member.devid),
        credential=_der(devid_cert),
        membership=Membership(device_cas=[ca.certificate], operator_cas=[], min_approvals=1),
        now=fleet.now,
        renewal=RenewalSetup(
            tls_credential=_der(tls_cert),
            anchors=(ca.certificate,),
            schedule=RenewalSchedule(),
            renewer=member.evidence,
        ),
    )
    member.core.skip_sequence_to(fleet.now * 1000)
    return member


def renewal_fleet(
    tmp_path: Path, swtpm_factory: SwtpmFactory, **settings: object
) -> Iterator[Fleet]:
    """A fleet whose service issues LIFETIME certificates (``settings`` replace more of the
    service's settings) and whose devices are real agent cores on their own swtpm."""
    for fleet in make_fleet(tmp_path, DEVICES):
        old = fleet.service
        assert fleet.device_ca is not None
        fleet.service = DeliveryService(
            fleet.sessions,
            signing_key=old._env.key,
            operator_ca=old._env.operator_ca,
            device_ca=old._env.devices.device_ca,
            settings=replace(old.settings, certificate_validity=LIFETIME, **settings),  # type: ignore[arg-type]
            attestation=AttestationSettings(policy=policy_from_components(GOOD), interval=600),
            revocation=RevocationSettings(device_ca=fleet.device_ca),
            rng=os.urandom,
        )
        members = {name: make_member(fleet, name, swtpm_factory.start()) for name in DEVICES}
        fleet.devices.update(members)  # type: ignore[arg-type]
        try:
            yield fleet
        finally:
            for device in members.values():
                device.store.close()


@pytest.fixture
def fleet(tmp_path: Path, swtpm_factory: SwtpmFactory) -> Iterator[Fleet]:
    yield from renewal_fleet(tmp_path, swtpm_factory)


def member(fleet: Fleet, name: str = "dev-1") -> Member:
    device = fleet.devices[name]
    assert isinstance(device, Member)
    return device


def advance(fleet: Fleet, seconds: int, name: str = "dev-1") -> None:
    """Let time pass; the device ticks (and asks for renewal when due) unless offline."""
    fleet.now += seconds
    sent = member(fleet, name).tick(fleet.now)
    if name not in fleet.offline:
        fleet.send(*sent)


def stored_devid(fleet: Fleet, name: str = "dev-1") -> str:
    with fleet.sessions() as session:
        return Registry(session).device(name).devid_cert_pem


def issued_serials(fleet: Fleet, name: str = "dev-1") -> list[str]:
    with fleet.sessions() as session:
        return [row.serial for row in revocation.device_certs(session, name)]


def not_after(der: bytes) -> int:
    return int(x509.load_der_x509_certificate(der).not_valid_after_utc.timestamp())


def request_challenge(fleet: Fleet, name: str = "dev-1") -> None:
    """The device asks for renewal now (its answer to the challenge is ``answer_with``)."""
    device = member(fleet, name)
    fleet.send(device.send_signed(RenewRequest(not_after=fleet.now + 100), fleet.now))


# -- renewal -----------------------------------------------------------------------------------


def test_device_renews_at_two_thirds_of_the_lifetime_and_again_on_the_new_certificates(
    fleet: Fleet,
) -> None:
    device = member(fleet)
    assert device.core is not None
    old_devid = device.core.credential
    # 600 s, backdated by 60 s for clock skew: the renewal point is 2/3 of 660 s after that
    advance(fleet, 370)  # before it: nothing asked
    assert (
        device.renewed == []
        and stored_devid(fleet)
        == pki.cert_to_pem(x509.load_der_x509_certificate(old_devid)).decode()
    )

    advance(fleet, 20)  # past the renewal point: asked, proved, issued, taken
    assert len(device.renewed) == 1
    devid_der, tls_der = device.renewed[0]
    assert device.core.credential == devid_der != old_devid
    assert not_after(devid_der) == fleet.now + LIFETIME == not_after(tls_der)
    new = x509.load_der_x509_certificate(devid_der)
    assert new.public_key() == device.devid.public_key()  # the same TPM key, re-certified
    assert stored_devid(fleet) == pki.cert_to_pem(new).decode()
    assert len(issued_serials(fleet)) == 4  # enrollment's two and the renewal's two
    with fleet.sessions() as session:
        assert fleet.now + LIFETIME in device_not_afters(session)  # what `keys list` shows
    entry = next(e for e in fleet.audit_entries() if e.action == "renew.issued")
    assert entry.actor == "device:dev-1"
    assert json.loads(entry.details)["not_after"] == fleet.now + LIFETIME

    # the device keeps talking to the service on the renewed certificate, and renews again
    advance(fleet, 370)
    assert len(device.renewed) == 1
    advance(fleet, 20)
    assert len(device.renewed) == 2
    assert len(issued_serials(fleet)) == 6
    assert fleet.service.rejections.snapshot() == {}


def test_a_device_offline_past_its_renewal_point_backs_off_then_renews_once_back(
    fleet: Fleet,
) -> None:
    device = member(fleet)
    assert device.core is not None and device.core.renewal is not None
    schedule = device.core.renewal.schedule
    fleet.offline.add("dev-1")
    advance(fleet, 410)  # due, asked: nobody hears it
    assert schedule.attempts == 1 and schedule.next_try is not None
    first_wait = schedule.next_try - fleet.now
    assert 22 <= first_wait <= 30  # 30 s, jittered down by at most a quarter
    advance(fleet, first_wait)
    assert schedule.attempts == 2 and schedule.next_try - fleet.now > first_wait  # doubled
    advance(fleet, 5)  # within the backoff: not asked again
    assert schedule.attempts == 2
    assert device.renewed == []

    # back online (keyagent calls this on every reconnect): asks at the next tick
    fleet.offline.discard("dev-1")
    device.core.renewal_reconnected()
    advance(fleet, 1)
    assert len(device.renewed) == 1
    assert schedule.attempts == 0 and schedule.next_try is None
    assert not_after(device.renewed[0][0]) == fleet.now + LIFETIME


# -- attacks: refused by check id, nothing changed ---------------------------------------------


def refused(fleet: Fleet, check: str) -> int:
    return fleet.service.rejections.snapshot().get(check, 0)


def assert_unchanged(fleet: Fleet, devid_pem: str, serials: list[str]) -> None:
    assert stored_devid(fleet) == devid_pem
    assert issued_serials(fleet) == serials
    assert not any(e.action == "renew.issued" for e in fleet.audit_entries())
    assert member(fleet).renewed == []


def test_replayed_answer_and_stale_quote_are_refused(fleet: Fleet) -> None:
    device = member(fleet)

    # a genuine answer, captured on the way (it renews: its nonce is answered now)
    captured: list[RenewAnswer] = []

    def capture(challenge: RenewChallenge) -> RenewAnswer:
        captured.append(
            _answer(challenge, device.evidence(challenge.nonce, challenge.pcrs), device)
        )
        return captured[-1]

    device.answer_with = capture
    request_challenge(fleet)
    assert _renewals(fleet) == 1
    before, serials = stored_devid(fleet), issued_serials(fleet)
    old = captured[0]

    # the old answer again, in a new envelope: its nonce was answered already
    fleet.send(device.send_signed(old, fleet.now + 1))
    assert refused(fleet, "renew.nonce") == 1

    # a fresh challenge answered with the old quote and certify (stale: over the old nonce)
    device.answer_with = lambda challenge: replace(old, nonce=challenge.nonce)
    request_challenge(fleet)
    assert refused(fleet, "renew.quote") == 1

    # an answer to a nonce the service never issued
    device.answer_with = lambda challenge: replace(
        _answer(challenge, device.evidence(challenge.nonce, challenge.pcrs), device),
        nonce=bytes(len(challenge.nonce)),
    )
    request_challenge(fleet)
    assert refused(fleet, "renew.nonce") == 2
    assert stored_devid(fleet) == before and issued_serials(fleet) == serials
    assert _renewals(fleet) == 1


def _renewals(fleet: Fleet) -> int:
    return sum(1 for e in fleet.audit_entries() if e.action == "renew.issued")


def test_another_devices_certify_is_refused(fleet: Fleet) -> None:
    device, other = member(fleet), member(fleet, "dev-2")
    before, serials = stored_devid(fleet), issued_serials(fleet)

    def with_others_certify(challenge: RenewChallenge) -> RenewAnswer:
        own = device.evidence(challenge.nonce, challenge.pcrs)
        # dev-2's TPM certifies its DevID key over dev-1's nonce: a valid certify, by the
        # wrong AK (and of another key)
        theirs = other.evidence(challenge.nonce, challenge.pcrs)
        return _answer(
            challenge,
            replace(
                own,
                devid_public=theirs.devid_public,
                certify=theirs.certify,
                certify_signature=theirs.certify_signature,
            ),
            device,
        )

    device.answer_with = with_others_certify
    request_challenge(fleet)
    assert refused(fleet, "renew.certify") == 1
    assert_unchanged(fleet, before, serials)


def test_a_key_that_is_not_in_the_current_certificates_is_refused(fleet: Fleet) -> None:
    device = member(fleet)
    before, serials = stored_devid(fleet), issued_serials(fleet)
    other_key = device.store.load_key(device.store.create_key(KeyKind.DEVID))

    def with_new_key(challenge: RenewChallenge) -> RenewAnswer:
        evidence = device.evidence(challenge.nonce, challenge.pcrs)
        with device.store.load_key(device.ak_blob) as ak:
            certify = device.store.certify(ak, other_key, challenge.nonce)
        # a genuine certify by this device's AK, of a key that is not its DevID key
        return _answer(
            challenge,
            replace(
                evidence,
                devid_public=other_key.public_area,
                certify=certify.attest,
                certify_signature=certify.signature,
            ),
            device,
        )

    device.answer_with = with_new_key
    request_challenge(fleet)
    assert refused(fleet, "renew.key") == 1

    # the TLS proof signed by another key than the TLS certificate's
    def with_wrong_tls(challenge: RenewChallenge) -> RenewAnswer:
        evidence = device.evidence(challenge.nonce, challenge.pcrs)
        stranger = ec.generate_private_key(ec.SECP256R1())
        proof = sign_tls_proof(stranger, device.name, challenge.nonce)
        return _answer(challenge, replace(evidence, tls_proof=proof), device)

    device.answer_with = with_wrong_tls
    request_challenge(fleet)
    assert refused(fleet, "renew.key") == 2
    other_key.close()
    assert_unchanged(fleet, before, serials)


def test_an_unapproved_release_is_refused(fleet: Fleet) -> None:
    device = member(fleet)
    before, serials = stored_devid(fleet), issued_serials(fleet)
    device.boot(tampered(GOOD, "kernel"))
    advance(fleet, 410)  # due: the core asks and answers with a quote of the tampered boot
    assert refused(fleet, "renew.policy") == 1
    assert_unchanged(fleet, before, serials)


def test_a_revoked_device_is_not_renewed(fleet: Fleet) -> None:
    before, serials = stored_devid(fleet), issued_serials(fleet)
    with fleet.sessions.begin() as session:
        Registry(session).set_device_state(
            "dev-1", DeviceState.REVOKED, reason="test: lost", now=fleet.now
        )
    advance(fleet, 410)
    assert refused(fleet, "ds.device.revoked") == 1
    assert_unchanged(fleet, before, serials)


def _answer(challenge: RenewChallenge, evidence: RenewalEvidence, device: Member) -> RenewAnswer:
    assert device.core is not None and device.core.renewal is not None
    return RenewAnswer(
        nonce=challenge.nonce,
        quote=evidence.attestation.quote,
        signature=evidence.attestation.signature,
        pcr_bank="sha256",
        pcrs=challenge.pcrs,
        event_log=evidence.attestation.event_log,
        devid_public=evidence.devid_public,
        devid_certify=evidence.certify,
        devid_certify_signature=evidence.certify_signature,
        tls_cert=device.core.renewal.tls_credential,
        tls_proof=evidence.tls_proof,
    )
