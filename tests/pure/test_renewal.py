"""Certificate renewal, the pure core (agent.protocol.renewal) and the agent core's part of it
(agent.core.AgentCore with a ``RenewalSetup``): when a device asks, how it backs off while nobody
answers, what renewed certificates it accepts (refusals by check id, nothing taken). The TPM
proofs and the service's checks run against a real TPM in tests/tpm/test_renewal_service.py;
here the renewer is a named fake (``FakeRenewer``) and keys are software keys."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from agent.core import AgentCore, AttestationEvidence, RenewalEvidence, RenewalSetup
from agent.protocol.errors import ProtocolError
from agent.protocol.mls.messages import Commit
from agent.protocol.renewal import (
    FIRST_RETRY,
    MAX_RETRY,
    Ratio,
    RenewalSchedule,
    renewal_point,
    sign_tls_proof,
    tls_proof_message,
    verify_renewed,
)
from agent.protocol.wire.messages.group import CommitMessage, UpdateRequest
from agent.protocol.wire.messages.renewal import (
    RenewAnswer,
    RenewChallenge,
    RenewIssued,
    RenewRequest,
)
from agent.protocol.wire.messages.service import CommitAction
from provisioning import pki
from provisioning.service.renewal import Expired, judge_expired
from tests.device_certs import device_ca as shared_device_ca
from tests.pure.test_agent_core import FakeService, FakeSoftwareKeys, G, acks, group_of_two

pytestmark = pytest.mark.pure

T0 = 1_700_000_000
LIFETIME = 3000
NONCE = bytes(range(32))


def at(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def issue(
    ca: pki.CertificateAuthority,
    devid: ec.EllipticCurvePrivateKey,
    tls: ec.EllipticCurvePrivateKey,
    *,
    device_id: str = "dev-1",
    now: int = T0,
    lifetime: int = LIFETIME,
) -> tuple[bytes, bytes]:
    devid_cert = pki.issue_devid_cert(
        ca,
        devid.public_key(),
        device_id=device_id,
        hardware_serial="SN-1",
        now=at(now),
        valid_for=timedelta(seconds=lifetime),
    )
    tls_cert = pki.issue_client_cert(
        ca,
        tls.public_key(),
        identity=device_id,
        role="device",
        now=at(now),
        valid_for=timedelta(seconds=lifetime),
    )
    return der(devid_cert), der(tls_cert)


def new_ca(name: str = "keyfleet test device CA") -> pki.CertificateAuthority:
    return pki.create_ca(name, now=at(T0 - 86400), valid_for=timedelta(days=30))


def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


# -- when ---------------------------------------------------------------------------------------


def test_renewal_point_is_the_fraction_of_the_lifetime() -> None:
    assert renewal_point(0, 3000) == 2000
    assert renewal_point(100, 1100, Ratio(3, 4)) == 850
    for bad in (Ratio(0, 1), Ratio(1, 1), Ratio(3, 2)):
        with pytest.raises(ValueError):
            renewal_point(0, 100, bad)
        with pytest.raises(ValueError):
            RenewalSchedule(bad)


def test_ratio_parses_as_fractions_did_and_refuses_the_rest() -> None:
    """The renewal fraction is an exact ratio of integers (``fractions.Fraction`` is not loaded
    by the agent): the forms the configuration documents, in lowest terms, and nothing else."""
    for text, ratio in (
        ("2/3", Ratio(2, 3)),
        (" 6/8 ", Ratio(3, 4)),
        ("0.75", Ratio(3, 4)),
        (".5", Ratio(1, 2)),
        ("1", Ratio(1, 1)),
        ("-1/-2", Ratio(1, 2)),
        ("0.95", Ratio(19, 20)),
    ):
        assert Ratio.parse(text) == ratio, text
    for bad in ("", "x", "1/0", "1/", "/2", "1.2.3", "0.7x", "1e-1", "\u0661/2", "0.", "2 / 3"):
        with pytest.raises(ValueError):
            Ratio.parse(bad)
    assert Ratio(2, 3).scale(3001) == 2000 and Ratio(1, 2).within(Ratio(1, 2), Ratio(1, 1))
    assert not Ratio(1, 2).strictly_within(Ratio(1, 2), Ratio(1, 1))


def test_short_lifetimes_are_backdated_by_a_tenth_at_most() -> None:
    """The issuer's backdate for clock skew must not push a short lifetime's renewal point
    past its expiry (a minute-long lab certificate backdated five minutes would be)."""
    devid, _ = issue(new_ca(), key(), key(), lifetime=60)
    cert = x509.load_der_x509_certificate(devid)
    assert cert.not_valid_before_utc == at(T0 - 6)
    point = RenewalSchedule().point([devid])
    assert T0 < point < T0 + 60


def test_backoff_doubles_with_jitter_up_to_a_ceiling_and_resets() -> None:
    schedule = RenewalSchedule()
    certs = [issue(new_ca(), key(), key())[0]]
    point = schedule.point(certs)
    assert not schedule.due(point - 1, certs)
    assert schedule.due(point, certs)
    waits = []
    now = point
    for attempt in range(12):
        lowest = bytes([0xFF] * 4) if attempt % 2 else bytes(4)  # both ends of the jitter
        next_try = schedule.asked(now, lowest)
        waits.append(next_try - now)
        assert not schedule.due(next_try - 1, certs) and schedule.due(next_try, certs)
        now = next_try
    assert waits[0] == FIRST_RETRY  # no jitter drawn
    assert 2 * FIRST_RETRY * 3 // 4 <= waits[1] < 2 * FIRST_RETRY  # doubled, jittered down
    assert all(w <= MAX_RETRY for w in waits) and waits[-1] >= MAX_RETRY * 3 // 4
    assert waits[2] > waits[0]
    schedule.reconnected()  # back online: ask at once
    assert schedule.due(now + 1, certs) and schedule.attempts == 12
    schedule.renewed()
    assert schedule.attempts == 0 and schedule.next_try is None


# -- what the device accepts ----------------------------------------------------------------------


def test_renewed_certificates_must_chain_hold_the_same_keys_and_name_the_device() -> None:
    ca, devid, tls = new_ca(), key(), key()
    current = issue(ca, devid, tls)
    renewed = issue(ca, devid, tls, now=T0 + 2000)

    def check(devid_der: bytes, tls_der: bytes) -> None:
        verify_renewed(
            device_id="dev-1",
            devid_der=devid_der,
            tls_der=tls_der,
            current_devid=current[0],
            current_tls=current[1],
            anchors=(ca.certificate,),
            now=T0 + 2000,
        )

    check(*renewed)
    other_ca = issue(new_ca("another CA"), devid, tls, now=T0 + 2000)
    other_keys = issue(ca, key(), key(), now=T0 + 2000)
    other_device = issue(ca, devid, tls, device_id="dev-2", now=T0 + 2000)
    for devid_der, tls_der in (
        (other_ca[0], renewed[1]),  # DevID not chaining to the anchors
        (renewed[0], other_ca[1]),  # TLS not issued by the device CA
        (other_keys[0], renewed[1]),  # another DevID key
        (renewed[0], other_keys[1]),  # another TLS key
        (other_device[0], renewed[1]),  # another device's DevID certificate
        (renewed[0], other_device[1]),  # a TLS certificate naming another device
        (renewed[0], b"\x30\x00"),  # junk
    ):
        with pytest.raises(ProtocolError) as caught:
            check(devid_der, tls_der)
        assert caught.value.check == "renew.issued"


def test_the_tls_proof_is_bound_to_the_device_and_the_nonce() -> None:
    tls = key()
    proof = sign_tls_proof(tls, "dev-1", NONCE)
    tls.public_key().verify(proof, tls_proof_message("dev-1", NONCE), ec.ECDSA(hashes.SHA256()))
    assert tls_proof_message("dev-1", NONCE) != tls_proof_message("dev-2", NONCE)
    assert tls_proof_message("dev-1", NONCE) != tls_proof_message("dev-1", bytes(32))


# -- the agent core -------------------------------------------------------------------------------


class FakeRenewer:
    """Stands in for the daemon's TPM evidence (a quote and a certify): fixed bytes, counted."""

    def __init__(self, tls: ec.EllipticCurvePrivateKey) -> None:
        self.tls = tls
        self.calls: list[bytes] = []

    def __call__(self, nonce: bytes, pcrs: tuple[int, ...]) -> RenewalEvidence:
        self.calls.append(nonce)
        return RenewalEvidence(
            attestation=AttestationEvidence(b"quote", b"\x30sig", b"log"),
            devid_public=b"\x00\x58public",
            certify=b"certify",
            certify_signature=b"\x30ak",
            tls_proof=sign_tls_proof(self.tls, "dev-1", nonce),
        )


def renewing_core() -> tuple[FakeService, AgentCore, pki.CertificateAuthority, FakeRenewer]:
    service = FakeService()
    service.now = T0
    ca, keys, tls = new_ca(), FakeSoftwareKeys(), key()
    devid_der, tls_der = issue(ca, keys.devid, tls)
    renewer = FakeRenewer(tls)
    core = service.core("dev-1", keys)
    core._credential = devid_der  # the enrolled DevID certificate of this CA
    core.renewal = RenewalSetup(tls_der, (ca.certificate,), RenewalSchedule(), renewer)
    return service, core, ca, renewer


def test_the_core_asks_when_due_answers_the_challenge_and_takes_checked_certificates() -> None:
    service, core, ca, renewer = renewing_core()
    assert core.renewal is not None
    point = core.renewal.schedule.point([core.credential])
    assert core.tick(point - 1).publishes == []
    service.now = point
    outcome = core.tick(point)
    assert outcome.changed  # the request spent a sequence number
    (request,) = service.bodies("dev-1", outcome)
    assert isinstance(request, RenewRequest) and request.not_after == T0 + LIFETIME
    assert core.tick(point + 1).publishes == []  # backing off

    outcome = service.deliver("dev-1", RenewChallenge(NONCE, (0, 7)))
    (answer,) = service.bodies("dev-1", outcome)
    assert isinstance(answer, RenewAnswer) and answer.nonce == NONCE and renewer.calls == [NONCE]
    assert answer.tls_cert == core.renewal.tls_credential and answer.pcrs == (0, 7)

    old = core.credential
    devid_der, tls_der = issue(ca, core._keys.devid, renewer.tls, now=point)
    # certificates for another nonce than the one answered: refused, nothing taken
    refused = service.deliver("dev-1", RenewIssued(bytes(32), devid_der, tls_der))
    assert refused.refused is not None and refused.refused.check == "renew.issued"
    assert refused.renewed is None and core.credential == old
    # another device's key in the "renewed" DevID certificate: refused
    wrong = issue(ca, key(), renewer.tls, now=point)
    refused = service.deliver("dev-1", RenewIssued(NONCE, wrong[0], tls_der))
    assert refused.refused is not None and refused.refused.check == "renew.issued"
    assert core.rejections.count("renew.issued") == 2

    taken = service.deliver("dev-1", RenewIssued(NONCE, devid_der, tls_der))
    assert taken.refused is None and taken.renewed == (devid_der, tls_der) and taken.changed
    assert core.credential == devid_der and core.renewal.tls_credential == tls_der
    assert core.renewal.schedule.attempts == 0
    # the same certificates again (a replayed relay): the nonce is spent
    again = service.deliver("dev-1", RenewIssued(NONCE, devid_der, tls_der))
    assert again.refused is not None and again.renewed is None


def test_without_renewal_the_core_refuses_renewal_messages() -> None:
    service = FakeService()
    service.core("dev-1")
    outcome = service.deliver("dev-1", RenewChallenge(NONCE, (0,)))
    assert outcome.refused is not None and outcome.refused.check == "agent.renew.unavailable"


def test_after_renewal_the_member_carries_its_new_credential_into_its_groups() -> None:
    """The DevID certificate is in every group's tree (each leaf's credential) and members check
    it when a leaf changes: after renewal the device asks for a self-update
    (``credential-renewed``) whose commit carries the new certificate to every member, before
    the old one expires."""
    service, a, b = group_of_two()
    ca, tls = shared_device_ca(), key()
    _, tls_der = issue(ca, a._keys.devid, tls, device_id="dev-a", now=service.now)
    renewer = FakeRenewer(tls)
    a.renewal = RenewalSetup(tls_der, (ca.certificate,), RenewalSchedule(), renewer)
    service.deliver("dev-a", RenewChallenge(NONCE, (0,)))
    devid_der, tls_der = issue(ca, a._keys.devid, tls, device_id="dev-a", now=service.now)
    taken = service.deliver("dev-a", RenewIssued(NONCE, devid_der, tls_der))
    assert taken.renewed is not None

    (asked,) = service.bodies("dev-a", a.tick(service.now))
    assert isinstance(asked, UpdateRequest) and asked.reason == "credential-renewed"
    (commit,) = service.request_commit("dev-a", CommitAction.UPDATE)
    assert isinstance(commit, CommitMessage)
    assert Commit.decode(commit.commit).content.path.credential == devid_der
    acks(service, service.fan_out(service.order(commit), ["dev-a", "dev-b"]))
    for core in (a, b):
        group = core.groups()[G]
        assert group.tree.leaf(a.groups()[G].own_leaf).credential == devid_der  # type: ignore[union-attr]
    assert service.bodies("dev-a", a.tick(service.now + 1)) == []  # nothing stale any more


# -- after expiry ---------------------------------------------------------------------------------


def test_the_expired_policy_allows_within_the_window_and_refuses_otherwise() -> None:
    end = T0 + LIFETIME
    window = 90 * 86400

    def judge(now: int, *, allow: bool = True) -> Expired | None:
        return judge_expired(not_after=end, now=now, allow=allow, max_expired=window)

    # not expired (up to and including the not-after second): an ordinary renewal
    assert judge(end - 1) is None and judge(end) is None
    assert judge(end, allow=False) is None
    # expired, allowed: how long ago, for the audit
    assert judge(end + 1) == Expired(end, 1)
    assert judge(end + window) == Expired(end, window)
    # too late, or the policy refuses: renew.expired, with the reason naming which
    with pytest.raises(ProtocolError) as late:
        judge(end + window + 1)
    assert late.value.check == "renew.expired" and "max_expired_seconds" in late.value.reason
    with pytest.raises(ProtocolError) as off:
        judge(end + 1, allow=False)
    assert off.value.check == "renew.expired" and '"refuse"' in off.value.reason


def test_the_core_asks_over_https_only_once_expired_and_backs_off() -> None:
    service, core, _ca, _renewer = renewing_core()
    assert core.renewal is not None
    end = T0 + LIFETIME
    assert not core.certificates_expired(end)
    assert core.expired_renewal(end) is None  # valid: MQTT renews it
    # the broker refused the certificate as expired (its clock is ahead of ours): asked anyway
    refused = core.expired_renewal(end - 5, refused=True)
    assert refused is not None and refused.changed
    core.renewal.schedule.renewed()

    assert core.certificates_expired(end + 1)
    outcome = core.expired_renewal(end + 1)
    assert outcome is not None and outcome.changed  # the request spent a sequence number
    service.now = end + 1
    (request,) = service.bodies("dev-1", outcome)
    assert isinstance(request, RenewRequest) and request.not_after == end
    # backing off with jitter as the MQTT requests do: not again before the wait is over
    next_try = core.renewal.schedule.next_try
    assert next_try is not None and end + 1 + 22 <= next_try <= end + 1 + FIRST_RETRY
    assert core.expired_renewal(next_try - 1) is None
    assert core.expired_renewal(next_try) is not None
    assert core.renewal.schedule.attempts == 2
    # with HTTPS configured the tick sends no renew.request over MQTT for expired certificates
    # (the broker refuses them); without, it still asks there
    later = core.renewal.schedule.next_try
    assert later is not None
    assert [p.type for p in core.tick(later).publishes] == ["renew.request"]
    core.renewal = replace(core.renewal, over_https=True)
    assert core.renewal.schedule.next_try is not None
    assert core.tick(core.renewal.schedule.next_try).publishes == []
