"""The device CA rollover on the device (agent.protocol.trust version 2 bundles, agent.core): a
bundle with a device CA section replaces the configured device CA (``[fleet] trust_anchors``,
bundle 0) for members' credentials (``cred.chain``) and renewed certificates; the old CA is
accepted until its ``until``, then refused; a version 1 bundle still decodes and leaves the
configured CA in force. Attacks: a bundle adding a device CA without the admins' quorum, signed
by a key the held bundle does not list, or replayed is refused by check id and changes nothing.
Pure: software keys, the real test operator CA (tests.operator_certs, tests.trust_links)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.core import AgentCore
from agent.protocol import trust
from agent.protocol.credentials import CredentialVerifier
from agent.protocol.errors import ProtocolError
from agent.protocol.mls.messages import KeyPackage
from agent.protocol.topics import TRUST_TOPIC
from provisioning.pki import CertificateAuthority, create_ca
from tests.device_certs import VALID_FOR, VALID_FROM, device_ca, devid_cert_der
from tests.operator_certs import membership
from tests.pure.test_agent_core import T0, FakeService, refused_without_change
from tests.trust_links import rollover, rotate_authz

pytestmark = pytest.mark.pure

UNTIL = T0 + 600


def _der(ca: CertificateAuthority) -> bytes:
    return ca.certificate.public_bytes(serialization.Encoding.DER)


NEW_CA = create_ca("keyfleet test device CA 2", now=VALID_FROM, valid_for=VALID_FOR)


def ca_rollover(
    held: trust.TrustBundle,
    signing_key: ec.EllipticCurvePrivateKey,
    *,
    new: CertificateAuthority = NEW_CA,
    until: int = UNTIL,
    approvers: tuple[str, ...] = ("op-root",),
    seq: int | None = None,
) -> tuple[trust.TrustBundle, trust.TrustLink]:
    """The next bundle as the service makes it: the same service keys, the held device CA (the
    configured one for a version 1 bundle) until ``until`` and ``new`` without an end."""
    old = held.current_ca.cert if held.current_ca is not None else _der(device_ca())
    bundle = trust.TrustBundle(
        held.seq + 1 if seq is None else seq,
        held.service,
        (trust.DeviceCA(old, until), trust.DeviceCA(_der(new))),
    )
    authz = rotate_authz(bundle.encode(), approvers=approvers)
    return bundle, trust.TrustLink(trust.sign_link(bundle, signing_key), authz)


def _devid(name: str, ca: CertificateAuthority) -> bytes:
    return devid_cert_der(name, ec.generate_private_key(ec.SECP256R1()), ca=ca)


def _chain_check(core: AgentCore, der: bytes, now: int) -> str | None:
    try:
        core.membership.credentials.verify(der, now)
    except ProtocolError as exc:
        return exc.check
    return None


def test_version_2_round_trip_and_version_1_still_decodes() -> None:
    key, first = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    v1, _ = rollover(
        trust.TrustBundle.initial(first.public_key()), key.public_key(), first, until=5
    )
    assert v1.device_ca is None
    assert trust.TrustBundle.decode(v1.encode()) == v1
    assert v1.to_obj()["v"] == 1 and v1.device_cas(T0) is None
    v2, _ = ca_rollover(v1, key)
    assert v2.to_obj()["v"] == 2
    assert trust.TrustBundle.decode(v2.encode()) == v2
    assert v2.current_ca == trust.DeviceCA(_der(NEW_CA))
    assert v2.device_cas(UNTIL) == (device_ca().certificate, NEW_CA.certificate)
    assert v2.device_cas(UNTIL + 1) == (NEW_CA.certificate,)
    # a version 2 bundle fits a request's subject with four device CAs
    cas = tuple(
        trust.DeviceCA(_der(create_ca(f"ca {i}", now=VALID_FROM, valid_for=VALID_FOR)), i or None)
        for i in range(trust.MAX_DEVICE_CAS)
    )
    assert trust.read_subject(trust.subject(trust.TrustBundle(3, v2.service, cas).encode()))


@pytest.mark.parametrize(
    "obj",
    [
        {"v": 2},  # version 2 without a device CA section
        {"v": 1, "device_ca": []},  # version 1 with one
        {"v": 2, "device_ca": []},  # an empty section
        {"v": 2, "device_ca": [{"cert": b"\x30\x00", "until": None}]},  # not a certificate
        {"v": 3},
    ],
)
def test_malformed_version_2_bundles_are_refused(obj: dict[str, object]) -> None:
    from agent.protocol.mls import codec

    key = ec.generate_private_key(ec.SECP256R1())
    base = {"seq": 1, "service": [{"key": trust.key_der(key.public_key()), "until": None}]}
    with pytest.raises(ProtocolError) as err:
        trust.TrustBundle.decode(codec.encode({**base, **obj}))
    assert err.value.check == "trust.malformed"


def test_a_bundle_of_two_current_cas_or_a_leaf_certificate_as_ca_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    service = (trust.ServiceKey(trust.key_der(key.public_key())),)
    both = (trust.DeviceCA(_der(device_ca())), trust.DeviceCA(_der(NEW_CA)))
    leaf = devid_cert_der("dev-x", key)
    for make in (
        lambda: trust.TrustBundle(1, service, both),
        lambda: trust.TrustBundle(1, service, (trust.DeviceCA(_der(NEW_CA)),) * 2),
        lambda: trust.DeviceCA(leaf),
    ):
        with pytest.raises(ProtocolError) as err:
            make()
        assert err.value.check == "trust.malformed"


def test_the_device_takes_the_new_ca_and_drops_the_old_one_after_its_end() -> None:
    service = FakeService()
    device = service.core("dev-a", membership=membership())
    old_member, new_member = _devid("dev-b", device_ca()), _devid("dev-c", NEW_CA)
    assert _chain_check(device, old_member, T0) is None
    assert _chain_check(device, new_member, T0) == "cred.chain"  # bundle 0: the configured CA

    bundle, link = ca_rollover(device.trust, service.key)
    out = device.handle(trust.TrustChain((link,)).encode(), TRUST_TOPIC, T0)
    assert out.changed and out.refused is None and device.trust == bundle
    assert [c["until"] for c in device.status()["trust"]["device_cas"]] == [UNTIL, None]
    # the overlap: members of both CAs
    assert _chain_check(device, old_member, UNTIL) is None
    assert _chain_check(device, new_member, UNTIL) is None
    # after the old CA's end its members are refused, also when remembered
    assert _chain_check(device, old_member, UNTIL + 1) == "cred.chain"
    assert _chain_check(device, new_member, UNTIL + 1) is None

    # the state file carries it: a restarted device checks the same way
    again = service.restarted(device)
    again.restore(device.to_state())
    assert again.trust == bundle
    assert _chain_check(again, new_member, T0) is None
    assert _chain_check(again, old_member, UNTIL + 1) == "cred.chain"


def test_a_service_key_rollover_after_a_ca_rollover_keeps_the_ca_section() -> None:
    service = FakeService()
    device = service.core("dev-a", membership=membership())
    b1, l1 = ca_rollover(device.trust, service.key)
    new_key = ec.generate_private_key(ec.SECP256R1())
    b2 = trust.TrustBundle(
        2,
        (
            trust.ServiceKey(b1.current.key, UNTIL),
            trust.ServiceKey(trust.key_der(new_key.public_key())),
        ),
        b1.device_ca,
    )
    l2 = trust.TrustLink(trust.sign_link(b2, service.key), rotate_authz(b2.encode()))
    out = device.handle(trust.TrustChain((l1, l2)).encode(), TRUST_TOPIC, T0)
    assert out.refused is None and device.trust == b2
    assert _chain_check(device, _devid("dev-c", NEW_CA), UNTIL + 1) is None


def test_a_ca_bundle_without_the_quorum_by_a_rogue_key_or_replayed_changes_nothing() -> None:
    service = FakeService()
    # the device's quorum policy asks two admins for trust.rotate
    device = service.core("dev-a", membership=membership(min_approvals=2))
    rogue_ca = create_ca("rogue device CA", now=VALID_FROM, valid_for=VALID_FOR)
    rogue_member = _devid("dev-r", rogue_ca)

    _, one_admin = ca_rollover(device.trust, service.key, new=rogue_ca)
    payload = trust.TrustChain((one_admin,)).encode()
    assert refused_without_change(device, payload, TRUST_TOPIC, T0) == "trust.approval"

    rogue_key = ec.generate_private_key(ec.SECP256R1())
    _, unknown_signer = ca_rollover(
        device.trust, rogue_key, new=rogue_ca, approvers=("op-root", "op-root2")
    )
    payload = trust.TrustChain((unknown_signer,)).encode()
    assert refused_without_change(device, payload, TRUST_TOPIC, T0) == "trust.signer"
    assert device.trust.seq == 0
    assert _chain_check(device, rogue_member, T0) == "cred.chain"

    # the real rollover, then an old one replayed with another CA: trust.seq
    bundle, link = ca_rollover(device.trust, service.key, approvers=("op-root", "op-root2"))
    assert device.handle(trust.TrustChain((link,)).encode(), TRUST_TOPIC, T0).refused is None
    _, replayed = ca_rollover(
        trust.TrustBundle.initial(service.key.public_key()),
        service.key,
        new=rogue_ca,
        approvers=("op-root", "op-root2"),
        seq=1,
    )
    stale = trust.TrustChain((replayed,)).encode()
    assert device.handle(stale, TRUST_TOPIC, T0).refused is None  # seq 1 held: skipped
    _, skipped = ca_rollover(
        bundle, service.key, new=rogue_ca, approvers=("op-root", "op-root2"), seq=3
    )
    payload = trust.TrustChain((skipped,)).encode()
    assert refused_without_change(device, payload, TRUST_TOPIC, T0) == "trust.seq"
    assert device.trust == bundle
    assert _chain_check(device, rogue_member, T0) == "cred.chain"
    assert device.rejections.snapshot()["trust.approval"] == 1


def test_renewed_certificates_must_chain_to_a_ca_the_bundle_accepts_now() -> None:
    service = FakeService()
    device = service.core("dev-a", membership=membership())
    configured = (device_ca().certificate,)
    assert device._device_anchors(configured) == configured
    _, link = ca_rollover(device.trust, service.key)
    device.handle(trust.TrustChain((link,)).encode(), TRUST_TOPIC, T0)
    assert device._device_anchors(configured) == (device_ca().certificate, NEW_CA.certificate)
    device._now = UNTIL + 1
    assert device._device_anchors(configured) == (NEW_CA.certificate,)


def test_the_verifier_ends_an_anchor_at_its_until() -> None:
    member = _devid("dev-b", device_ca())
    verifier = CredentialVerifier(
        [device_ca().certificate, NEW_CA.certificate], ends={_der(device_ca()): UNTIL}
    )
    assert verifier.verify(member, UNTIL).device_id == "dev-b"
    with pytest.raises(ProtocolError) as err:
        verifier.verify(member, UNTIL + 1)  # remembered, and still refused
    assert err.value.check == "cred.chain"


def test_a_broker_ca_section_round_trips_and_the_device_accepts_both_until_the_end() -> None:
    service = FakeService()
    device = service.core("dev-a", membership=membership())
    assert device.trust.broker_cas(T0) is None  # bundle 0: [broker] ca
    old_broker = create_ca("broker CA 1", now=VALID_FROM, valid_for=VALID_FOR)
    new_broker = create_ca("broker CA 2", now=VALID_FROM, valid_for=VALID_FOR)
    bundle = trust.TrustBundle(
        1,
        device.trust.service,
        None,
        (trust.DeviceCA(_der(old_broker), UNTIL), trust.DeviceCA(_der(new_broker))),
    )
    assert bundle.to_obj()["v"] == 2 and "device_ca" not in bundle.to_obj()
    assert trust.TrustBundle.decode(bundle.encode()) == bundle
    link = trust.TrustLink(trust.sign_link(bundle, service.key), rotate_authz(bundle.encode()))
    out = device.handle(trust.TrustChain((link,)).encode(), TRUST_TOPIC, T0)
    assert out.refused is None and device.trust == bundle
    assert device.trust.broker_cas(UNTIL) == (old_broker.certificate, new_broker.certificate)
    assert device.trust.broker_cas(UNTIL + 1) == (new_broker.certificate,)
    assert [c["until"] for c in device.status()["trust"]["broker_cas"]] == [UNTIL, None]
    # the device CA stays the configured one
    assert _chain_check(device, _devid("dev-b", device_ca()), T0) is None
    with pytest.raises(ProtocolError) as err:
        trust.TrustBundle(1, device.trust.service, None, (trust.DeviceCA(_der(new_broker), 5),))
    assert err.value.check == "trust.malformed"


def _key_package(name: str, ca: CertificateAuthority) -> KeyPackage:
    devid, leaf, init = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    credential = devid_cert_der(name, devid, ca=ca)
    return KeyPackage.create(
        name.encode(), devid, leaf.public_key(), credential, init_key=init.public_key()
    )


def test_a_member_of_a_ca_past_its_end_is_not_added_and_one_of_the_new_ca_is() -> None:
    """What a device checks before a leaf enters its group (``Membership.check_key_package``,
    ``check_leaf``): under the held bundle, a KeyPackage of the new CA passes; one of the old CA
    passes during the overlap and is refused with ``cred.chain`` after the old CA's end."""
    service = FakeService()
    device = service.core("dev-a", membership=membership())
    old_member, new_member = _key_package("dev-b", device_ca()), _key_package("dev-c", NEW_CA)
    with pytest.raises(ProtocolError) as err:
        device.membership.check_key_package(new_member, T0)  # bundle 0: the configured CA only
    assert err.value.check == "cred.chain"
    _, link = ca_rollover(device.trust, service.key)
    device.handle(trust.TrustChain((link,)).encode(), TRUST_TOPIC, T0)
    device.membership.check_key_package(new_member, T0)
    device.membership.check_key_package(old_member, UNTIL)
    device.membership.check_leaf(old_member.leaf, UNTIL)
    with pytest.raises(ProtocolError) as err:
        device.membership.check_key_package(old_member, UNTIL + 1)
    assert err.value.check == "cred.chain"
    with pytest.raises(ProtocolError) as err:
        device.membership.check_leaf(old_member.leaf, UNTIL + 1)
    assert err.value.check == "cred.chain"
