"""The device CA rollover in the sans-I/O service (provisioning/service/trustroll.py): a
``trust.rotate`` of the device CA proposed and approved by admins, the version 2 bundle it
publishes (the service keys kept, the old CA accepted until the request's window end plus the
certificate validity), the service issuing from the new CA and accepting stored credentials of
both until the old CA's end, another instance following. A real SQLite file, operators of a real
operator CA (test_service_core's fleet); the new CA key is a software key the test's key loader
names."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol import authz, trust
from agent.protocol.errors import ProtocolError
from agent.protocol.topics import TRUST_TOPIC
from agent.protocol.wire.messages.operator import ROTATE_BROKER_CA, ROTATE_DEVICE_CA, Propose
from agent.protocol.wire.messages.result import OperatorResult, RequestsResult, RequestState
from provisioning import pki, revocation
from provisioning.registry import Registry
from provisioning.requests_cli import check_proposed, describe_trust
from provisioning.revocation import RevocationSettings
from provisioning.service.core import DeliveryService
from provisioning.service.model import ServiceSettings
from tests.pure.test_service_core import T0, Fleet, make_fleet
from tests.pure.test_service_requests import add_operator
from tests.pure.test_trust_service import (
    OVERLAP,
    TTL,
    Keys,
    Operators,
    _approve,
    _device_view,
    _request,
    _send,
)
from tests.service_members import command_id, utc

pytestmark = pytest.mark.pure

VALIDITY = 2 * 86400
REF = "pkcs11:token=keyfleet;object=device-ca-2"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Fleet, Keys]]:
    for made in make_fleet(tmp_path, ("dev-1",), min_approvals=2, request_ttl=TTL):
        add_operator(made, "op-bob", "admin")
        keys = Keys()
        made.service._env.load_key = keys.load
        yield made, keys


def _new_ca(keys: Keys, ref: str = REF) -> pki.CertificateAuthority:
    ca = pki.create_ca("keyfleet test device CA 2", now=utc(T0), valid_for=timedelta(days=30))
    keys.keys[ref] = ca.private_key
    return ca


def _propose_ca(fleet: Fleet, cert: bytes, ref: str, operator: str = "op-admin") -> list:  # type: ignore[type-arg]
    body = Propose(
        command_id(),
        authz.OP_TRUST_ROTATE,
        (),
        cert=cert,
        key_ref=ref,
        overlap=OVERLAP,
        rotate=ROTATE_DEVICE_CA,
    )
    return _send(fleet, operator, body)


def _der(ca: pki.CertificateAuthority) -> bytes:
    return ca.certificate.public_bytes(serialization.Encoding.DER)


def _with_cert(fleet: Fleet, name: str, ca: pki.CertificateAuthority):  # type: ignore[no-untyped-def]
    """The device's registry record with a DevID certificate of ``ca`` (as after a renewal)."""
    with fleet.sessions() as session:
        record = Registry(session).device(name)
    cert = pki.issue_devid_cert(
        ca,
        fleet.devices[name].devid.public_key(),
        device_id=name,
        hardware_serial=f"SN-{name}",
        now=utc(T0),
        valid_for=timedelta(days=1),
    )
    return record, dataclasses.replace(record, devid_cert_pem=pki.cert_to_pem(cert).decode())


def _setup(made: Fleet) -> None:
    assert made.device_ca is not None
    made.service._env.revocation = RevocationSettings(device_ca=made.device_ca)
    made.service._env.settings = dataclasses.replace(
        made.service._env.settings, certificate_validity=VALIDITY
    )


def test_two_admins_roll_the_device_ca_over_and_the_service_issues_from_the_new_one(
    fleet: tuple[Fleet, Keys],
) -> None:
    made, keys = fleet
    _setup(made)
    assert made.device_ca is not None and made.operator_ca is not None
    key = made.service.signing_key
    made.service.tick(made.now)  # CRL 1, of the old CA
    new_ca = _new_ca(keys)
    request = _request(made, _propose_ca(made, _der(new_ca), REF), key)
    exp = authz.Request.decode(request).exp
    bundle = trust.read_subject(authz.Request.decode(request).subject or b"")
    # version 2: the service key kept, the old CA until the window's end + certificate validity
    assert bundle.seq == 1 and bundle.service == trust.TrustBundle.initial(key).service
    assert bundle.device_ca == (
        trust.DeviceCA(_der(made.device_ca), exp + VALIDITY),
        trust.DeviceCA(_der(new_ca)),
    )
    assert any("device CA" in line and "no end" in line for line in describe_trust(
        authz.Request.decode(request).subject or b""
    ))  # fmt: skip

    # one admin: pending; the service still issues from the old CA
    assert not any(p.topic == TRUST_TOPIC for p in _approve(made, "op-admin", request))
    assert made.service.device_issuer(made.now)[0].certificate == made.device_ca.certificate
    publishes = _approve(made, "op-bob", request)
    bodies = Operators(key).read(publishes, made.now)
    assert any(
        isinstance(b, RequestsResult) and b.requests[0].state is RequestState.EXECUTED
        for b in bodies
    )
    (chain,) = [p.payload for p in publishes if p.topic == TRUST_TOPIC]
    # the service signs with the same key, issues from the new CA; new devices trust both
    assert made.service.signing_key == key
    issuer, anchors = made.service.device_issuer(made.now)
    assert issuer.certificate == new_ca.certificate
    assert anchors == (made.device_ca.certificate, new_ca.certificate)
    assert made.service.device_issuer(exp + VALIDITY + 1)[1] == (new_ca.certificate,)
    # the broker's CRL: the next CRL check issues the new CA's; the old CA's copy keeps being signed
    settings = made.service._env.revocation
    assert settings is not None and settings.previous == (made.device_ca,)
    made.service.tick(made.now + 31)  # the CRL task's lease from CRL 1 has passed
    row = made.service._env.read(revocation.newest_crl)
    assert row is not None and row.number == 2
    crl = x509.load_der_x509_crl(row.der)
    assert crl.is_signature_valid(new_ca.private_key.public_key())
    (old_copy,) = revocation.previous_crls(settings, crl)
    assert old_copy.is_signature_valid(made.device_ca.private_key.public_key())
    # stored credentials of both CAs pass until the old CA's end
    old_record, new_record = _with_cert(made, "dev-1", new_ca)
    devices = made.service._env.devices
    devices.check(old_record, made.now)
    devices.check(new_record, made.now)
    with pytest.raises(ProtocolError) as err:
        devices.check(old_record, exp + VALIDITY + 1)  # remembered, and still refused after
    assert err.value.check == "cred.stored"
    devices.check(new_record, T0 + 3600)

    # the new CA's key never becomes the service signing key
    publishes = _send(
        made,
        "op-admin",
        Propose(
            command_id(), authz.OP_TRUST_ROTATE, (), cert=_der(new_ca), key_ref=REF,
            overlap=OVERLAP,
        ),
    )  # fmt: skip
    (result,) = [
        b for b in Operators(key).read(publishes, made.now) if isinstance(b, OperatorResult)
    ]
    assert "trust.key" in result.detail and "a device CA's key" in result.detail

    # a device enrolled with the service key takes the chain
    taken = trust.advance(
        trust.TrustBundle.initial(key),
        trust.TrustChain.decode(chain),
        _device_view(made).check_trust_approval,
    )
    assert taken == bundle

    # another instance on the same database follows at its next tick
    other = DeliveryService(
        made.sessions,
        signing_key=made.service._env.key,
        operator_ca=made.operator_ca.certificate,
        device_ca=made.device_ca.certificate,
        settings=ServiceSettings(min_approvals=2, request_ttl=TTL),
        load_key=keys.load,
        revocation=RevocationSettings(device_ca=made.device_ca),
    )
    ticked = other.tick(made.now + 1)
    assert [p.payload for p in ticked if p.topic == TRUST_TOPIC] == [chain]
    assert other.device_issuer(made.now)[0].certificate == new_ca.certificate
    other._env.devices.check(new_record, made.now)


def test_a_ca_the_reference_does_not_hold_a_current_ca_or_a_leaf_are_refused(
    fleet: tuple[Fleet, Keys],
) -> None:
    made, keys = fleet
    _setup(made)
    assert made.device_ca is not None
    key = made.service.signing_key
    new_ca = _new_ca(keys)
    other = _new_ca(keys, "file:other.key")
    keys.keys["pki/device-ca.key"] = made.device_ca.private_key
    same_name = pki.create_ca(
        made.device_ca.certificate.subject.rfc4514_string().removeprefix("CN="),
        now=utc(T0), valid_for=timedelta(days=1),
    )  # fmt: skip
    keys.keys["file:same.key"] = same_name.private_key
    leaf = pki.issue_client_cert(
        new_ca, ec.generate_private_key(ec.SECP256R1()).public_key(), identity="x",
        role="device", now=utc(T0), valid_for=timedelta(days=1),
    )  # fmt: skip
    for cert, ref, why in (
        (_der(new_ca), "file:other.key", "not the new CA certificate's"),
        (_der(made.device_ca), "pki/device-ca.key", "the device CA's key"),
        (leaf.public_bytes(serialization.Encoding.DER), REF, "not a CA's"),
        (_der(same_name), "file:same.key", "the name of a current device CA"),
    ):
        (result,) = [
            b
            for b in Operators(key).read(_propose_ca(made, cert, ref), made.now)
            if isinstance(b, OperatorResult)
        ]
        assert "trust.key" in result.detail and why in result.detail, result.detail
    # an operator may not propose it
    publishes = _propose_ca(made, _der(other), "file:other.key", "op-alice")
    (result,) = [
        b for b in Operators(key).read(publishes, made.now) if isinstance(b, OperatorResult)
    ]
    assert "op.role" in result.detail
    assert made.service.device_issuer(made.now)[0].certificate == made.device_ca.certificate


def test_the_proposers_tool_signs_only_a_bundle_that_makes_its_ca_current(
    fleet: tuple[Fleet, Keys],
) -> None:
    made, keys = fleet
    _setup(made)
    new_ca = _new_ca(keys)
    body = Propose(
        command_id(), authz.OP_TRUST_ROTATE, (), cert=_der(new_ca), key_ref=REF,
        overlap=OVERLAP, rotate=ROTATE_DEVICE_CA,
    )  # fmt: skip
    request = authz.Request.decode(
        _request(made, _send(made, "op-admin", body), made.service.signing_key)
    )
    check_proposed(request, body, "op-admin", made.now)
    real = trust.read_subject(request.subject or b"")
    assert real.device_ca is not None
    rogue = pki.create_ca("rogue", now=utc(T0), valid_for=timedelta(days=1))
    for cas in (
        (real.device_ca[0], trust.DeviceCA(_der(rogue))),  # another CA current
        (trust.DeviceCA(real.device_ca[0].cert, request.exp + OVERLAP - 1), real.device_ca[1]),
    ):
        bundle = trust.TrustBundle(real.seq, real.service, cas)
        forged = dataclasses.replace(request, subject=trust.subject(bundle.encode()))
        with pytest.raises(ProtocolError) as err:
            check_proposed(forged, body, "op-admin", made.now)
        assert err.value.check == "quorum.mismatch"


def test_two_admins_roll_the_broker_ca_over_without_any_key(fleet: tuple[Fleet, Keys]) -> None:
    """The broker CA: no key on the service host (the broker's PKI keeps it); the bundle keeps
    the service keys and the device CA section and lists the configured broker CA until the
    window's end plus the overlap; devices take it; a later device CA rollover keeps it."""
    made, keys = fleet
    _setup(made)
    key = made.service.signing_key
    configured = pki.create_ca("lab TLS CA", now=utc(T0), valid_for=timedelta(days=30))
    made.service._env.broker_ca_origin = (configured.certificate,)
    new_broker = pki.create_ca("lab TLS CA 2", now=utc(T0), valid_for=timedelta(days=30))
    body = Propose(
        command_id(), authz.OP_TRUST_ROTATE, (), cert=_der(new_broker), overlap=OVERLAP,
        rotate=ROTATE_BROKER_CA,
    )  # fmt: skip
    request = _request(made, _send(made, "op-admin", body), key)
    decoded = authz.Request.decode(request)
    check_proposed(decoded, body, "op-admin", made.now)
    bundle = trust.read_subject(decoded.subject or b"")
    assert bundle.device_ca is None and bundle.service == trust.TrustBundle.initial(key).service
    assert bundle.broker_ca == (
        trust.DeviceCA(_der(configured), decoded.exp + OVERLAP),
        trust.DeviceCA(_der(new_broker)),
    )
    assert made.service.broker_cas(made.now) == (configured.certificate,)
    _approve(made, "op-admin", request)
    publishes = _approve(made, "op-bob", request)
    (chain,) = [p.payload for p in publishes if p.topic == TRUST_TOPIC]
    taken = trust.advance(
        trust.TrustBundle.initial(key),
        trust.TrustChain.decode(chain),
        _device_view(made).check_trust_approval,
    )
    assert taken == bundle
    # new devices get both broker CAs; the service key and the device CA did not change
    assert made.service.broker_cas(made.now) == (configured.certificate, new_broker.certificate)
    assert made.service.signing_key == key
    # the next device CA rollover carries the broker CA section on
    new_ca = _new_ca(keys)
    request = _request(made, _propose_ca(made, _der(new_ca), REF), key)
    following = trust.read_subject(authz.Request.decode(request).subject or b"")
    assert following.seq == 2 and following.broker_ca == bundle.broker_ca
