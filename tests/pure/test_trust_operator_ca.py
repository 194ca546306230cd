"""The operator CA rollover on the device (agent.protocol.trust version 2 bundles with an
``operator_ca`` section, agent.core, agent.protocol.membership): a bundle with the section
replaces the configured operator CA (``[fleet] operator_anchors``, bundle 0) for every approval
the device checks; an operator certificate of the old CA counts until the old CA's ``until``,
then is refused (``authz.chain``), one of the new CA counts from the bundle on; the next link is
approved under the operator CAs of the bundle before it (a device offline through the rollover
catches up); the state file keeps it. Attacks: a bundle that brings its own approvers' CA, or one
approved by operators of an unknown CA, signed with the real service key, is refused by check id
and changes nothing. Pure: software keys, the real test operator CA (tests.operator_certs)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.core import AgentCore
from agent.protocol import authz as az
from agent.protocol import trust
from agent.protocol.errors import ProtocolError
from agent.protocol.mls import codec
from agent.protocol.topics import TRUST_TOPIC
from provisioning.pki import CertificateAuthority, create_ca, issue_client_cert
from tests.operator_certs import VALID_FOR, VALID_FROM, membership, operator, operator_ca
from tests.pure.test_agent_core import T0, FakeService, refused_without_change
from tests.trust_links import APPROVED_AT, rotate_authz

pytestmark = pytest.mark.pure

UNTIL = T0 + 600
NEW_OP_CA = create_ca("keyfleet test operator CA 2", now=VALID_FROM, valid_for=VALID_FOR)
ROGUE_CA = create_ca("rogue operator CA", now=VALID_FROM, valid_for=VALID_FOR)


def _der(ca: CertificateAuthority) -> bytes:
    return ca.certificate.public_bytes(serialization.Encoding.DER)


def _operator_of(
    ca: CertificateAuthority, name: str, role: str = "admin"
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue_client_cert(
        ca, key.public_key(), identity=name, role=role, now=VALID_FROM, valid_for=VALID_FOR
    )
    return key, cert


NEW_ADMIN = _operator_of(NEW_OP_CA, "op-newadmin")
NEW_OPERATOR = _operator_of(NEW_OP_CA, "op-newbie", "operator")
ROGUE_ADMIN = _operator_of(ROGUE_CA, "op-root")  # the name of a real admin, another CA


def _authz(
    signers: Sequence[tuple[ec.EllipticCurvePrivateKey, x509.Certificate]],
    *,
    op: str = "group.create",
    group: str | None = "g1",
    subject: bytes | None = None,
    nbf: int = T0,
) -> bytes:
    request = az.Request(
        id=os.urandom(az.REQUEST_ID_SIZE),
        op=op,
        group=group,
        members=() if group is None else (az.Member.of("dev-b", b"\x04" + b"\x01" * 64),),
        policy=None,
        nbf=nbf,
        exp=nbf + 600,
        by="op-x",
        subject=subject,
    ).encode()
    approvals = tuple(az.sign_approval(request, key, cert) for key, cert in signers)
    return az.Authorization(request, approvals).encode()


def _rotate_by(signers: Sequence[tuple[ec.EllipticCurvePrivateKey, x509.Certificate]]):  # type: ignore[no-untyped-def]
    def make(bundle: bytes) -> bytes:
        return _authz(
            signers, op=az.OP_TRUST_ROTATE, group=None, subject=trust.subject(bundle),
            nbf=APPROVED_AT,
        )  # fmt: skip

    return make


def operator_rollover(
    held: trust.TrustBundle,
    signing_key: ec.EllipticCurvePrivateKey,
    *,
    new: CertificateAuthority = NEW_OP_CA,
    old: bytes | None = None,
    until: int = UNTIL,
    approve=None,  # type: ignore[no-untyped-def]
) -> tuple[trust.TrustBundle, trust.TrustLink]:
    """The next bundle as the service makes it: the same service keys, the held operator CA
    (the configured one before any section) until ``until``, ``new`` without an end; approved by
    ``approve`` (default: op-root of the configured operator CA)."""
    if old is None:
        current = [c for c in held.operator_ca or () if c.until is None]
        old = current[0].cert if current else _der(operator_ca())
    bundle = trust.TrustBundle(
        held.seq + 1,
        held.service,
        held.device_ca,
        held.broker_ca,
        (trust.DeviceCA(old, until), trust.DeviceCA(_der(new))),
    )
    data = bundle.encode()
    authz = rotate_authz(data) if approve is None else approve(data)
    return bundle, trust.TrustLink(trust.sign_link(bundle, signing_key), authz)


def _approval_check(core: AgentCore, authz: bytes, now: int) -> str | None:
    """The check id refusing ``authz`` (a group creation) on the device at ``now``, or None."""
    try:
        core.membership.approvals.verify(
            authz, policy=core.membership.policy, now=now, op="group.create", group="g1"
        )
    except ProtocolError as exc:
        return exc.check
    return None


def test_an_operator_ca_section_round_trips_and_malformed_ones_are_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    bundle, _ = operator_rollover(trust.TrustBundle.initial(key.public_key()), key)
    assert bundle.to_obj()["v"] == 2 and bundle.device_ca is None and bundle.broker_ca is None
    assert trust.TrustBundle.decode(bundle.encode()) == bundle
    assert bundle.operator_cas(UNTIL) == (operator_ca().certificate, NEW_OP_CA.certificate)
    assert bundle.operator_cas(UNTIL + 1) == (NEW_OP_CA.certificate,)
    assert bundle.operator_ca_ends() == {_der(operator_ca()): UNTIL}
    assert trust.TrustBundle.initial(key.public_key()).operator_cas(T0) is None

    service = [{"key": trust.key_der(key.public_key()), "until": None}]
    base = {"v": 2, "seq": 1, "service": service}
    for section in (
        [],  # empty
        [{"cert": _der(NEW_OP_CA), "until": None}] * 2,  # twice
        [{"cert": _der(NEW_OP_CA), "until": None}, {"cert": _der(ROGUE_CA), "until": None}],
        [{"cert": _der(NEW_OP_CA), "until": 5}],  # none current
        [{"cert": b"\x30\x00", "until": None}],  # not a certificate
        [{"cert": NEW_ADMIN[1].public_bytes(serialization.Encoding.DER), "until": None}],  # leaf
    ):
        with pytest.raises(ProtocolError) as err:
            trust.TrustBundle.decode(codec.encode({**base, "operator_ca": section}))
        assert err.value.check == "trust.malformed", section
    with pytest.raises(ProtocolError) as err:  # version 1 with the section
        trust.TrustBundle.decode(codec.encode({**base, "v": 1, "operator_ca": [{}]}))
    assert err.value.check == "trust.malformed"


def test_the_device_verifies_approvals_under_the_bundles_operator_cas_across_the_rollover() -> None:
    service = FakeService()
    device = service.core("dev-a", membership=membership())
    old_op = _authz([operator("op-root")])
    new_op = _authz([NEW_ADMIN])
    # bundle 0: the configured operator CA only
    assert _approval_check(device, old_op, T0) is None
    assert _approval_check(device, new_op, T0) == "authz.chain"

    bundle, link = operator_rollover(device.trust, service.key)
    out = device.handle(trust.TrustChain((link,)).encode(), TRUST_TOPIC, T0)
    assert out.changed and out.refused is None and device.trust == bundle
    # the overlap: operators of both CAs
    assert _approval_check(device, old_op, T0) is None
    assert _approval_check(device, new_op, T0) is None
    # after the old CA's end its operators are refused, also when remembered (cached)
    late_old = _authz([operator("op-root")], nbf=UNTIL + 1)
    late_new = _authz([NEW_ADMIN], nbf=UNTIL + 1)
    assert _approval_check(device, late_old, UNTIL + 1) == "authz.chain"
    assert _approval_check(device, late_new, UNTIL + 1) is None
    # historically, an approval made during the overlap still counts (a Welcome's admission)
    device.membership.approvals.verify(
        old_op, policy=device.membership.policy, now=None, op="group.create", group="g1"
    )

    # a quorum policy approved by an admin of the new CA only: adopted, and re-verified at a
    # restart under the operator CAs of the bundle in the state file
    policy = az.QuorumPolicy(serial=1, default={"*": 1}, groups={})
    request = az.Request(
        id=os.urandom(az.REQUEST_ID_SIZE), op=az.OP_POLICY, group=None, members=(),
        policy=policy.encode(), nbf=T0, exp=T0 + 600, by="op-newadmin",
    ).encode()  # fmt: skip
    signed = az.Authorization(request, (az.sign_approval(request, *NEW_ADMIN),)).encode()
    device.membership.adopt_policies((signed,))
    assert device.membership.policy.serial == 1

    # the state file carries it: a restarted device checks the same way
    again = service.restarted(device)
    again.restore(device.to_state())
    assert again.trust == bundle and again.membership.policy.serial == 1
    assert _approval_check(again, late_old, UNTIL + 1) == "authz.chain"
    assert _approval_check(again, late_new, UNTIL + 1) is None


def test_a_device_offline_through_the_rollover_takes_the_next_link_approved_by_new_ca_admins() -> (
    None
):
    service = FakeService()
    device = service.core("dev-a", membership=membership())
    b1, l1 = operator_rollover(device.trust, service.key)
    # bundle 2: a service key rollover approved by an admin of the new CA only
    new_key = ec.generate_private_key(ec.SECP256R1())
    b2 = trust.TrustBundle(
        2,
        (
            trust.ServiceKey(b1.current.key, UNTIL),
            trust.ServiceKey(trust.key_der(new_key.public_key())),
        ),
        None,
        None,
        b1.operator_ca,
    )
    l2 = trust.TrustLink(trust.sign_link(b2, service.key), _rotate_by([NEW_ADMIN])(b2.encode()))
    # alone after bundle 0 (whose operator CA is the old one) it is refused
    lone = trust.TrustLink(
        trust.sign_link(dataclass_seq(b2, 1), service.key),
        _rotate_by([NEW_ADMIN])(dataclass_seq(b2, 1).encode()),
    )
    payload = trust.TrustChain((lone,)).encode()
    assert refused_without_change(device, payload, TRUST_TOPIC, T0) == "trust.approval"
    out = device.handle(trust.TrustChain((l1, l2)).encode(), TRUST_TOPIC, T0)
    assert out.refused is None and device.trust == b2
    # the operator section travels on with later bundles
    assert _approval_check(device, _authz([NEW_ADMIN], nbf=UNTIL + 1), UNTIL + 1) is None


def dataclass_seq(bundle: trust.TrustBundle, seq: int) -> trust.TrustBundle:
    return trust.TrustBundle(
        seq, bundle.service, bundle.device_ca, bundle.broker_ca, bundle.operator_ca
    )


def test_a_rogue_service_cannot_make_devices_accept_an_operator_ca_without_the_quorum() -> None:
    """The service host holds the real signing key but no admin key of the devices' operator
    CA: a bundle naming its own operator CA, approved by its own operators (even calling one
    op-root), or by fewer admins than the quorum, is refused, and nothing changes."""
    service = FakeService()
    device = service.core("dev-a", membership=membership(min_approvals=2))
    rogue_op = _authz([ROGUE_ADMIN, _operator_of(ROGUE_CA, "op-dora")], nbf=T0)

    # its own CA, approved by its own operators: the approval is checked under the held CAs
    _, self_approved = operator_rollover(
        device.trust,
        service.key,
        new=ROGUE_CA,
        approve=_rotate_by([ROGUE_ADMIN, _operator_of(ROGUE_CA, "op-dora")]),
    )
    payload = trust.TrustChain((self_approved,)).encode()
    assert refused_without_change(device, payload, TRUST_TOPIC, T0) == "trust.approval"
    # one real admin where the policy asks two
    _, one_admin = operator_rollover(device.trust, service.key, new=ROGUE_CA)
    payload = trust.TrustChain((one_admin,)).encode()
    assert refused_without_change(device, payload, TRUST_TOPIC, T0) == "trust.approval"
    # an unknown signing key, even with the quorum
    _, unknown = operator_rollover(
        device.trust,
        ec.generate_private_key(ec.SECP256R1()),
        new=ROGUE_CA,
        approve=lambda data: rotate_authz(data, approvers=("op-root", "op-root2")),
    )
    payload = trust.TrustChain((unknown,)).encode()
    assert refused_without_change(device, payload, TRUST_TOPIC, T0) == "trust.signer"

    assert device.trust.seq == 0
    assert device.rejections.snapshot()["trust.approval"] == 2
    assert _approval_check(device, rogue_op, T0) == "authz.chain"
    # the real quorum rolls it over
    _, link = operator_rollover(
        device.trust,
        service.key,
        approve=lambda data: rotate_authz(data, approvers=("op-root", "op-root2")),
    )
    assert device.handle(trust.TrustChain((link,)).encode(), TRUST_TOPIC, T0).refused is None
    assert _approval_check(device, rogue_op, T0) == "authz.chain"
    # from bundle 1 (a link, not the enrollment anchor) a self-approved rogue CA is refused too
    held = device.trust
    _, again = operator_rollover(
        held,
        service.key,
        new=ROGUE_CA,
        approve=_rotate_by([ROGUE_ADMIN, _operator_of(ROGUE_CA, "op-dora")]),
    )
    payload = trust.TrustChain((link, again)).encode()
    assert refused_without_change(device, payload, TRUST_TOPIC, T0) == "trust.approval"
    assert device.trust == held
    assert _approval_check(device, _authz([NEW_ADMIN, NEW_OPERATOR]), T0) is None
