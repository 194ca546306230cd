"""The service signing key's rollover in the sans-I/O service (provisioning/service/trustroll.py):
``trust.rotate`` proposed and approved by admins, the link signed with the current key and
checked as a device checks it, the chain published, the new key signing from then on, another
instance following. A real SQLite file, operators of a real operator CA (test_service_core's
fleet); the new key is a software key the test's key loader names."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol import authz, trust
from agent.protocol.errors import ConfigError, ProtocolError
from agent.protocol.membership import Membership
from agent.protocol.topics import SERVICE_ID, TRUST_TOPIC
from agent.protocol.wire.cose import key_id
from agent.protocol.wire.envelope import Signer, open_message
from agent.protocol.wire.messages.operator import Approve, Propose
from agent.protocol.wire.messages.result import OperatorResult, RequestsResult, RequestState
from provisioning import pki
from provisioning.requests_cli import check_proposed
from provisioning.service.core import DeliveryService, Publish
from provisioning.service.model import ServiceSettings
from tests.pure.test_service_core import T0, Fleet, make_fleet
from tests.pure.test_service_requests import add_operator
from tests.service_members import command_id, utc

pytestmark = pytest.mark.pure

TTL = 600
OVERLAP = 3600


class Keys:
    """The service host's key store as the test sees it: references -> keys."""

    def __init__(self) -> None:
        self.keys: dict[str, ec.EllipticCurvePrivateKey] = {}

    def load(self, ref: str) -> ec.EllipticCurvePrivateKey:
        if ref not in self.keys:
            raise ConfigError(f"no key {ref}")
        return self.keys[ref]

    def new(self, ref: str, fleet: Fleet) -> bytes:
        """A new key under ``ref`` and its certificate (DER), issued by a test CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        self.keys[ref] = key
        ca = pki.create_ca("service signing CA", now=utc(T0), valid_for=timedelta(days=30))
        cert = pki.issue_client_cert(
            ca, key.public_key(), identity="keyfleet-service-signing", role="service",
            now=utc(T0), valid_for=timedelta(days=30),
        )  # fmt: skip
        return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Fleet, Keys]]:
    for made in make_fleet(tmp_path, (), min_approvals=2, request_ttl=TTL):
        add_operator(made, "op-bob", "admin")
        keys = Keys()
        made.service._env.load_key = keys.load
        yield made, keys


class Operators:
    """Reads what the service answers operators, with either service key."""

    def __init__(self, *keys: ec.EllipticCurvePublicKey) -> None:
        self.keys = {key_id(k): k for k in keys}
        self.signed_by: list[bytes] = []

    def resolve(self, kid: bytes) -> Signer:
        self.signed_by.append(kid)
        return Signer(SERVICE_ID, self.keys[kid])

    def read(self, publishes: list[Publish], now: int) -> list[object]:
        bodies = []
        for p in publishes:
            parts = p.topic.split("/")
            if parts[2] == "ops":
                bodies.append(
                    open_message(p.payload, self.resolve, now=now, recipients={parts[3]}).body
                )
        return bodies


def _send(fleet: Fleet, operator: str, body: object) -> list[Publish]:
    topic, payload = fleet.operators[operator].command(body, fleet.now)  # type: ignore[arg-type]
    return fleet.service.handle(topic, payload, fleet.now)


def _propose(fleet: Fleet, operator: str, cert: bytes, ref: str) -> tuple[list[Publish], Propose]:
    body = Propose(command_id(), authz.OP_TRUST_ROTATE, (), cert=cert, key_ref=ref, overlap=OVERLAP)
    return _send(fleet, operator, body), body


def _approve(fleet: Fleet, operator: str, request: bytes) -> list[Publish]:
    who = fleet.operators[operator]
    approval = authz.sign_approval(request, who.key, who.cert).encode()
    return _send(fleet, operator, Approve(command_id(), authz.Request.decode(request).id, approval))


def _device_view(fleet: Fleet) -> Membership:
    assert fleet.operator_ca is not None and fleet.device_ca is not None
    return Membership(
        device_cas=(fleet.device_ca.certificate,),
        operator_cas=(fleet.operator_ca.certificate,),
        min_approvals=2,
    )


def _request(fleet: Fleet, publishes: list[Publish], old: ec.EllipticCurvePublicKey) -> bytes:
    (answer,) = [
        b for b in Operators(old).read(publishes, fleet.now) if isinstance(b, RequestsResult)
    ]
    (info,) = answer.requests
    return info.request


def test_two_admins_roll_the_service_key_over_and_devices_can_follow(
    fleet: tuple[Fleet, Keys],
) -> None:
    made, keys = fleet
    old = made.service.signing_key
    cert = keys.new("pkcs11:token=keyfleet;object=service-signing-2", made)
    publishes, _ = _propose(
        made, "op-admin", cert, "pkcs11:token=keyfleet;object=service-signing-2"
    )
    request = _request(made, publishes, old)
    # the request names the bundle itself: the approver's tool shows the keys and the old end
    bundle = trust.read_subject(authz.Request.decode(request).subject or b"")
    new = keys.keys["pkcs11:token=keyfleet;object=service-signing-2"].public_key()
    assert bundle.seq == 1 and bundle.current.key == trust.key_der(new)
    (ending,) = [k for k in bundle.service if k.until is not None]
    assert ending.key == trust.key_der(old)
    assert ending.until == authz.Request.decode(request).exp + OVERLAP

    # one admin: pending, nothing published, the old key still signs
    assert not any(p.topic == TRUST_TOPIC for p in _approve(made, "op-admin", request))
    assert key_id(made.service.signing_key) == key_id(old)
    # the second admin: executed; the answer still under the old key, then the new one
    publishes = _approve(made, "op-bob", request)
    reader = Operators(old, new)
    bodies = reader.read(publishes, made.now)
    assert any(
        isinstance(b, RequestsResult) and b.requests[0].state is RequestState.EXECUTED
        for b in bodies
    )
    assert set(reader.signed_by) == {key_id(old)}
    assert key_id(made.service.signing_key) == key_id(new)
    (chain,) = [p.payload for p in publishes if p.topic == TRUST_TOPIC]
    # what a device enrolled with the old key does with the chain
    taken = trust.advance(
        trust.TrustBundle.initial(old),
        trust.TrustChain.decode(chain),
        _device_view(made).check_trust_approval,
    )
    assert taken == bundle
    assert made.service.trust_chain() == [Publish(TRUST_TOPIC, chain)]

    # another instance on the same database follows at its next tick
    assert made.operator_ca is not None and made.device_ca is not None
    other = DeliveryService(
        made.sessions,
        signing_key=keys.keys.setdefault("old", ec.generate_private_key(ec.SECP256R1())),
        operator_ca=made.operator_ca.certificate,
        device_ca=made.device_ca.certificate,
        settings=ServiceSettings(min_approvals=2, request_ttl=TTL),
        load_key=keys.load,
    )
    ticked = other.tick(made.now + 1)
    assert key_id(other.signing_key) == key_id(new)
    assert [p.payload for p in ticked if p.topic == TRUST_TOPIC] == [chain]


def test_a_key_the_reference_does_not_name_one_admin_and_an_operator_are_refused(
    fleet: tuple[Fleet, Keys],
) -> None:
    made, keys = fleet
    old = made.service.signing_key
    cert = keys.new("file:new.key", made)
    other_cert = keys.new("file:other.key", made)
    # the reference names another key than the certificate's
    publishes, _ = _propose(made, "op-admin", other_cert, "file:new.key")
    (result,) = [
        b for b in Operators(old).read(publishes, made.now) if isinstance(b, OperatorResult)
    ]
    assert "trust.key" in result.detail
    publishes, _ = _propose(made, "op-admin", cert, "pkcs11:token=t;object=k?pin-value=1234")
    (result,) = [
        b for b in Operators(old).read(publishes, made.now) if isinstance(b, OperatorResult)
    ]
    assert "trust.key" in result.detail and "1234" not in result.detail
    # an operator may not propose it
    publishes, _ = _propose(made, "op-alice", cert, "file:new.key")
    (result,) = [
        b for b in Operators(old).read(publishes, made.now) if isinstance(b, OperatorResult)
    ]
    assert "op.role" in result.detail
    # two rollovers proposed from the same bundle: the second to reach its quorum is refused
    first = _request(made, _propose(made, "op-admin", cert, "file:new.key")[0], old)
    second = _request(made, _propose(made, "op-admin", other_cert, "file:other.key")[0], old)
    for request in (first, second):
        _approve(made, "op-admin", request)
    _approve(made, "op-bob", first)
    new = keys.keys["file:new.key"].public_key()
    publishes = _approve(made, "op-bob", second)
    bodies = Operators(old, new).read(publishes, made.now)
    refused = [b for b in bodies if isinstance(b, RequestsResult)]
    assert refused and refused[-1].requests[0].state is RequestState.REFUSED
    assert "trust.seq" in refused[-1].requests[0].detail
    assert key_id(made.service.signing_key) == key_id(new)
    with pytest.raises(ProtocolError):
        trust.read_subject(b"")


def test_the_proposers_tool_signs_only_a_bundle_that_makes_its_key_current(
    fleet: tuple[Fleet, Keys],
) -> None:
    """A service that answers the proposal with another bundle (another key current, or the old
    key ending before the overlap) gets no approval from the proposer's tool."""
    made, keys = fleet
    cert = keys.new("file:new.key", made)
    old = made.service.signing_key
    publishes, body = _propose(made, "op-admin", cert, "file:new.key")
    request = authz.Request.decode(_request(made, publishes, old))
    check_proposed(request, body, "op-admin", made.now)  # the real answer is signed

    def with_bundle(bundle: trust.TrustBundle) -> authz.Request:
        return dataclasses.replace(request, subject=trust.subject(bundle.encode()))

    real = trust.read_subject(request.subject or b"")
    rogue = ec.generate_private_key(ec.SECP256R1()).public_key()
    other_current = trust.TrustBundle(
        real.seq, (real.service[0], trust.ServiceKey(trust.key_der(rogue)))
    )
    short_overlap = trust.TrustBundle(
        real.seq,
        (trust.ServiceKey(real.service[0].key, request.exp + OVERLAP - 1), real.service[1]),
    )
    for bundle in (other_current, short_overlap):
        with pytest.raises(ProtocolError) as err:
            check_proposed(with_bundle(bundle), body, "op-admin", made.now)
        assert err.value.check == "quorum.mismatch"


def test_a_new_signing_key_that_is_another_fleet_key_is_refused(
    fleet: tuple[Fleet, Keys],
) -> None:
    """The service's other keys (here the device CA's, and a TLS key the runner names) never
    become its signing key: their custody and use differ (``trust.key``)."""
    made, keys = fleet
    assert made.device_ca is not None
    old = made.service.signing_key
    keys.keys["pki/device-ca.key"] = made.device_ca.private_key  # type: ignore[assignment]
    public = made.device_ca.certificate.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    spki = trust.key_der(public)
    publishes, _ = _propose(made, "op-admin", spki, "pki/device-ca.key")
    (result,) = [
        b for b in Operators(old).read(publishes, made.now) if isinstance(b, OperatorResult)
    ]
    assert "trust.key" in result.detail and "the device CA's key" in result.detail
    tls = ec.generate_private_key(ec.SECP256R1())
    keys.keys["tls.key"] = tls
    made.service._env.reserved_keys += (("the broker client_cert's key", tls.public_key()),)
    publishes, _ = _propose(made, "op-admin", trust.key_der(tls.public_key()), "tls.key")
    (result,) = [
        b for b in Operators(old).read(publishes, made.now) if isinstance(b, OperatorResult)
    ]
    assert "trust.key" in result.detail and "client_cert" in result.detail
