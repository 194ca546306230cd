"""The operator CA rollover in the sans-I/O service (provisioning/service/trustroll.py): a
``trust.rotate`` of the operator CA (no key: the operator CA is offline) proposed and approved
by admins of the current operator CA; the version 2 bundle it publishes (the service keys kept,
the configured operator CA accepted until the request's window end plus the overlap, the new one
without an end); the service verifying operators of both CAs until the old one's end, then only
the new one's (an old-CA operator refused by check id, nothing changed); new operators from the
new CA only; devices and another instance following. A real SQLite file, operators of real
operator CAs (test_service_core's fleet)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol import authz, trust
from agent.protocol.errors import ProtocolError
from agent.protocol.membership import Membership
from agent.protocol.topics import TRUST_TOPIC
from agent.protocol.wire.messages.operator import (
    ROTATE_OPERATOR_CA,
    ListRequests,
    Propose,
)
from agent.protocol.wire.messages.result import OperatorResult, RequestsResult, RequestState
from provisioning import pki
from provisioning.requests_cli import check_proposed, describe_trust
from provisioning.service.core import DeliveryService
from provisioning.service.model import ServiceSettings
from provisioning.service.operators import register_operator
from provisioning.service.store import quorum as quorum_rows
from tests.pure.test_service_core import T0, Fleet, make_fleet
from tests.pure.test_service_requests import add_operator
from tests.pure.test_trust_service import (
    OVERLAP,
    TTL,
    Operators,
    _approve,
    _device_view,
    _request,
    _send,
)
from tests.service_members import SoftOperator, command_id, utc

pytestmark = pytest.mark.pure


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    for made in make_fleet(tmp_path, ("dev-1",), min_approvals=2, request_ttl=TTL):
        add_operator(made, "op-bob", "admin")
        yield made


def _der(ca: pki.CertificateAuthority) -> bytes:
    return ca.certificate.public_bytes(serialization.Encoding.DER)


def _new_ca(name: str = "keyfleet test operator CA 2") -> pki.CertificateAuthority:
    return pki.create_ca(name, now=utc(T0), valid_for=timedelta(days=30))


def _propose(fleet: Fleet, cert: bytes, operator: str = "op-admin") -> tuple[list, Propose]:  # type: ignore[type-arg]
    body = Propose(
        command_id(), authz.OP_TRUST_ROTATE, (), cert=cert, overlap=OVERLAP,
        rotate=ROTATE_OPERATOR_CA,
    )  # fmt: skip
    return _send(fleet, operator, body), body


def _result(fleet: Fleet, publishes: list, now: int) -> object:  # type: ignore[type-arg]
    key = fleet.service.signing_key
    (answer,) = [
        b
        for b in Operators(key).read(publishes, now)
        if isinstance(b, OperatorResult | RequestsResult)
    ]
    return answer


def _roll(fleet: Fleet, new: pki.CertificateAuthority) -> tuple[trust.TrustBundle, bytes, int]:
    """The rollover proposed by op-admin and approved by op-admin and op-bob (old-CA admins):
    the bundle, the published chain, the request's window end."""
    publishes, body = _propose(fleet, _der(new))
    request = _request(fleet, publishes, fleet.service.signing_key)
    decoded = authz.Request.decode(request)
    check_proposed(decoded, body, "op-admin", fleet.now)
    bundle = trust.read_subject(decoded.subject or b"")
    _approve(fleet, "op-admin", request)
    published = _approve(fleet, "op-bob", request)
    bodies = Operators(fleet.service.signing_key).read(published, fleet.now)
    assert any(
        isinstance(b, RequestsResult) and b.requests[0].state is RequestState.EXECUTED
        for b in bodies
    )
    (chain,) = [p.payload for p in published if p.topic == TRUST_TOPIC]
    return bundle, chain, decoded.exp


def _device(fleet: Fleet) -> Membership:
    return _device_view(fleet)


def test_two_admins_roll_the_operator_ca_over_and_the_service_follows_it(fleet: Fleet) -> None:
    made = fleet
    assert made.operator_ca is not None
    key = made.service.signing_key
    new = _new_ca()
    bundle, chain, exp = _roll(made, new)
    end = exp + OVERLAP
    # version 2: the service key kept, the configured operator CA until the window's end +
    # overlap, the new one without an end; no other section
    assert bundle.seq == 1 and bundle.service == trust.TrustBundle.initial(key).service
    assert bundle.device_ca is None and bundle.broker_ca is None
    assert bundle.operator_ca == (
        trust.DeviceCA(_der(made.operator_ca), end),
        trust.DeviceCA(_der(new)),
    )
    assert any(
        "operator CA" in line and "no end" in line
        for line in describe_trust(trust.subject(bundle.encode()))
    )
    assert made.service.signing_key == key
    # devices enrolled with the service key take the chain (approved under the old CA)
    device = _device(made)
    taken = trust.advance(
        trust.TrustBundle.initial(key), trust.TrustChain.decode(chain), device.check_trust_approval
    )
    assert taken == bundle
    # new devices get both operator CAs until the end, then the new one
    assert made.service.operator_cas(made.now) == (made.operator_ca.certificate, new.certificate)
    assert made.service.operator_cas(end + 1) == (new.certificate,)

    # an operator of the new CA (registered from it) gets through; one of the old CA too, now
    newbie = SoftOperator.create("op-newbie", "operator", new, utc(T0))
    register_operator(
        made.sessions, newbie.cert, operator_ca=new.certificate, role=None,
        actor="local:test", now=made.now,
    )  # fmt: skip
    made.operators["op-newbie"] = newbie
    for name in ("op-newbie", "op-alice"):
        answer = _result(made, _send(made, name, ListRequests(command_id())), made.now)
        assert isinstance(answer, RequestsResult), answer
    env = made.service._env
    env.verify_operator_certificate(newbie.cert, made.now, current_only=True)
    # a newly added operator's certificate must be of the new CA
    with pytest.raises(ProtocolError) as err:
        env.verify_operator_certificate(
            made.operators["op-alice"].cert, made.now, current_only=True
        )
    assert err.value.check == "pki.issuer"

    # after the old CA's end: an old-CA operator's command is refused by check id, nothing
    # changes (no request); the new-CA operator still gets through
    late = end + 1
    before = env.rejections.snapshot().get("pki.issuer", 0)
    with made.sessions() as session:
        pending = len(quorum_rows.open_requests(session))
    made.now = late
    publishes, _ = _propose(made, _der(_new_ca("keyfleet test operator CA 3")), "op-admin")
    assert env.rejections.snapshot()["pki.issuer"] == before + 1
    assert not any(isinstance(b, RequestsResult) for b in Operators(key).read(publishes, late))
    with made.sessions() as session:
        assert len(quorum_rows.open_requests(session)) == pending
    answer = _result(made, _send(made, "op-newbie", ListRequests(command_id())), late)
    assert isinstance(answer, RequestsResult)
    # approvals: an old-CA admin's is refused after the end (authz.chain), historically not
    old_admin = made.operators["op-admin"]
    request = authz.Request(
        id=b"\x01" * authz.REQUEST_ID_SIZE, op=authz.OP_GROUP_CREATE, group="g9",
        members=(authz.Member.of("dev-1", b"\x04" + b"\x01" * 64),), policy=None, nbf=late,
        exp=late + 60, by="op-admin",
    ).encode()  # fmt: skip
    approval = authz.sign_approval(request, old_admin.key, old_admin.cert)
    with pytest.raises(ProtocolError) as err:
        env.approvals().verify_approval(request, approval, now=late)
    assert err.value.check == "authz.chain"
    early = dataclasses.replace(authz.Request.decode(request), nbf=T0, exp=T0 + 60).encode()
    env.approvals().verify_approval(
        early, authz.sign_approval(early, old_admin.key, old_admin.cert), now=None
    )

    # another instance on the same database follows at its next tick
    other = DeliveryService(
        made.sessions,
        signing_key=env.key,
        operator_ca=made.operator_ca.certificate,
        device_ca=env.device_ca_origin or made.operator_ca.certificate,
        settings=ServiceSettings(min_approvals=2, request_ttl=TTL),
    )
    other.tick(late)
    assert other._env.operator_cas == (made.operator_ca.certificate, new.certificate)
    with pytest.raises(ProtocolError) as err:
        other._env.verify_operator_certificate(old_admin.cert, late)
    assert err.value.check == "pki.issuer"
    other._env.verify_operator_certificate(newbie.cert, late)


def test_a_ca_already_listed_its_key_or_name_or_a_leaf_is_refused_and_the_next_keeps_the_old(
    fleet: Fleet,
) -> None:
    made = fleet
    assert made.operator_ca is not None
    key = made.service.signing_key
    same_name = pki.create_ca(
        made.operator_ca.certificate.subject.rfc4514_string().removeprefix("CN="),
        now=utc(T0), valid_for=timedelta(days=1),
    )  # fmt: skip
    same_key = pki.create_ca(
        "another name", now=utc(T0), valid_for=timedelta(days=1),
        key=made.operator_ca.private_key,
    )  # fmt: skip
    leaf = pki.issue_client_cert(
        made.operator_ca, ec.generate_private_key(ec.SECP256R1()).public_key(),
        identity="op-x", role="admin", now=utc(T0), valid_for=timedelta(days=1),
    )  # fmt: skip
    for cert, why in (
        (_der(made.operator_ca), "already"),
        (_der(same_name), "the name of a listed operator CA"),
        (_der(same_key), "the key of a listed operator CA"),
        (leaf.public_bytes(serialization.Encoding.DER), "not a CA's"),
    ):
        answer = _result(made, _propose(made, cert)[0], made.now)
        assert isinstance(answer, OperatorResult) and "trust.key" in answer.detail, answer
        assert why in answer.detail, answer.detail
    # an operator (not an admin) may not propose it
    answer = _result(made, _propose(made, _der(_new_ca()), "op-alice")[0], made.now)
    assert isinstance(answer, OperatorResult) and "op.role" in answer.detail
    assert made.service._env.operator_cas == ()  # nothing changed

    # a second rollover keeps the first's old CA with its end and ends the second
    first = _new_ca()
    b1, _, _ = _roll(made, first)
    second = _new_ca("keyfleet test operator CA 3")
    publishes, _ = _propose(made, _der(second))
    b2 = trust.read_subject(authz.Request.decode(_request(made, publishes, key)).subject or b"")
    assert b1.operator_ca is not None and b2.operator_ca is not None
    assert b2.operator_ca[0] == b1.operator_ca[0]  # the configured one, its end kept
    assert b2.operator_ca[1].cert == _der(first) and b2.operator_ca[1].until is not None
    assert b2.operator_ca[2] == trust.DeviceCA(_der(second))


def test_a_bundle_with_an_operator_ca_section_by_an_unknown_key_or_rogue_admins_is_refused(
    fleet: Fleet,
) -> None:
    """What devices (and the service's own link check) refuse: an operator CA section signed
    by a key the held bundle does not list, or approved by admins of another CA."""
    made = fleet
    key = made.service.signing_key
    rogue_ca = _new_ca("rogue operator CA")
    held = trust.TrustBundle.initial(key)
    assert made.operator_ca is not None
    cas = (trust.DeviceCA(_der(made.operator_ca), T0 + 10), trust.DeviceCA(_der(rogue_ca)))
    bundle = trust.TrustBundle(1, held.service, None, None, cas)
    admins = [SoftOperator.create(n, "admin", rogue_ca, utc(T0)) for n in ("op-admin", "op-bob")]
    request = authz.Request(
        id=b"\x02" * authz.REQUEST_ID_SIZE, op=authz.OP_TRUST_ROTATE, group=None, members=(),
        policy=None, nbf=T0, exp=T0 + 60, by="op-admin", subject=trust.subject(bundle.encode()),
    ).encode()  # fmt: skip
    rogue_authz = authz.Authorization(
        request, tuple(authz.sign_approval(request, a.key, a.cert) for a in admins)
    ).encode()
    device = _device(made)
    unknown = ec.generate_private_key(ec.SECP256R1())
    for signer, approval, check in (
        (unknown, rogue_authz, "trust.signer"),
        (made.service._env.key, rogue_authz, "trust.approval"),
    ):
        link = trust.TrustLink(trust.sign_link(bundle, signer), approval)
        with pytest.raises(ProtocolError) as err:
            trust.advance(held, trust.TrustChain((link,)), device.check_trust_approval)
        assert err.value.check == check
