"""The service signing key's rollover: ``trust.rotate`` requests and the chain of trust bundles
devices follow (``agent.protocol.trust``; docs/trust.md, docs/operations.md "Rolling over the
service signing key").

- **Propose** (``keyfleet keys rotate service-signing --new-cert FILE --new-key REF --overlap
  S``): the service loads the new key from ``REF`` (a ``pkcs11:`` URI or a file on the service
  host: the custodian created it there; the private key never travels), checks it is the
  certificate's key and not one the held bundle lists, and builds the next bundle: the current
  key accepted until the request's window closes plus the overlap, the new key without an end.
  The request's subject binds that bundle's exact bytes; the row keeps them and the key
  reference until the quorum is met.
- **Execute** (the admins' quorum met): the bundle must still follow the newest one
  (``trust.seq``: another rollover ran meanwhile), the key must still load and be the bundle's,
  and the link is checked as a device checks it (``agent.protocol.trust.check_link`` with the
  service's verifier and policy) once signed with the current key. Then it is stored
  (``service_trust_bundles``) and every instance signs with the new key from its next call on
  (``sync``); the chain, the feed head and the release bundle are published again.

- **The device CA** (``keyfleet keys rotate device-ca --new-ca FILE --new-key REF``) rolls
  over the same way: the next bundle (version 2) keeps the service keys and lists the current
  device CA until the request's window closes plus the longer of the certificate validity
  (``[enrollment] certificate_validity_seconds``: every certificate the old CA issued expires
  by then) and the overlap, and the new CA without an end. Once it runs, every instance
  (``sync``) issues enrollments and renewals from the new CA (the key loaded from the
  reference) and accepts stored credentials of every CA the bundle accepts at the time.

- **The operator CA** (``keyfleet keys rotate operator-ca --new-ca FILE``) likewise, with no
  key (the operator CA is offline; the service never signs with it): the next bundle lists the
  current operator CA until the request's window closes plus the overlap, older ones with their
  ends (approvals they made stay verifiable historically), and the new one without an end. Its
  approval is made by operators of the current CA (a bundle cannot bring its approvers' CA).
  Once it runs, every instance (``sync``) verifies operator certificates and approvals against
  every operator CA the bundle lists, each until its end, and registers new operators from the
  new CA only.

Key references are names, not secrets; one carrying a PIN value is refused (``trust.key``):
name a PIN source.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy.orm import Session

from agent.protocol import authz, trust
from agent.protocol.errors import KeyfleetError, ProtocolError
from agent.protocol.wire.messages.operator import (
    ROTATE_BROKER_CA,
    ROTATE_DEVICE_CA,
    ROTATE_OPERATOR_CA,
    Propose,
)
from provisioning.db.runtime import TrustBundleRow
from provisioning.pki import CertificateAuthority
from provisioning.service.context import Call, Env
from provisioning.service.credentials import StoredDevices
from provisioning.service.effects import Effects, Log, TrustRolled
from provisioning.service.store import trustchain
from provisioning.service.store.quorum import StoredRequest

log = logging.getLogger("keyfleet.service")

KEY: Final = "trust.key"

KeyLoader = Callable[[str], ec.EllipticCurvePrivateKey]
"""Load the private key a key reference names (``custody.load_private_key`` relative to the
service's configuration); raises ``KeyfleetError`` when it cannot."""


def held(env: Env, session: Session) -> trust.TrustBundle:
    """The newest bundle of the chain, or bundle 0: the key devices got at enrollment."""
    row = trustchain.newest(session)
    if row is None:
        origin = env.key.public_key() if env.trust_origin is None else env.trust_origin
        return trust.TrustBundle.initial(origin)
    return trust.TrustLink(row.link, row.authz).opened()[1]


def chain(session: Session) -> bytes | None:
    """The retained chain (the newest ``MAX_LINKS`` links), None before the first rollover."""
    rows = trustchain.links(session)[-trust.MAX_LINKS :]
    if not rows:
        return None
    return trust.TrustChain(tuple(trust.TrustLink(r.link, r.authz) for r in rows)).encode()


def _load(env: Env, ref: str) -> ec.EllipticCurvePrivateKey:
    if "pin-value" in ref:
        raise ProtocolError(KEY, "the key reference carries a PIN value: name a pin-source")
    if env.load_key is None:
        raise ProtocolError(KEY, "this service instance loads no new signing key")
    try:
        key = env.load_key(ref)
    except KeyfleetError as exc:
        raise ProtocolError(KEY, f"the new signing key does not load: {exc}") from None
    if not isinstance(key.curve, ec.SECP256R1):
        raise ProtocolError(KEY, "a service signing key is ECC P-256")
    mine = trust.key_der(key.public_key())
    # the device CAs the bundle lists now too (after a device CA rollover, the new one's key)
    cas = [("a device CA's key", c.public_key()) for c in env.devices.cas]
    for name, public in (*env.reserved_keys, *cas):
        if not isinstance(public, ec.EllipticCurvePublicKey):
            continue
        if trust.key_der(public) == mine:
            raise ProtocolError(
                KEY, f"the new key is {name}: the service signing key must be a key of its own"
            )
    return key


def public_key_of(der: bytes) -> ec.EllipticCurvePublicKey:
    """The key of a ``trust.rotate``'s ``cert``: an X.509 certificate (DER), or the key's
    SubjectPublicKeyInfo (DER) for a token key that has no certificate (devices take a public
    key as ``service_cert`` too); ``trust.key`` otherwise."""
    key: object
    try:
        key = x509.load_der_x509_certificate(der).public_key()
    except ValueError:
        try:
            key = serialization.load_der_public_key(der)
        except ValueError:
            raise ProtocolError(KEY, "neither an X.509 certificate nor a public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ProtocolError(KEY, "the new certificate's key is not ECC P-256")
    return key


def request_subject(cx: Call, session: Session, body: Propose, exp: int) -> tuple[bytes, str]:
    """The subject of a new ``trust.rotate`` request whose window closes at ``exp``, and what
    its row keeps (the bundle's bytes and the key reference, JSON)."""
    if body.rotate == ROTATE_BROKER_CA:
        return _broker_ca_subject(cx, session, body, exp)
    if body.rotate == ROTATE_OPERATOR_CA:
        return _operator_ca_subject(cx, session, body, exp)
    assert body.cert is not None and body.key_ref is not None and body.overlap is not None
    if body.rotate == ROTATE_DEVICE_CA:
        return _device_ca_subject(cx, session, body, exp)
    public = public_key_of(body.cert)
    key = _load(cx.env, body.key_ref)
    new_der = trust.key_der(public)
    if trust.key_der(key.public_key()) != new_der:
        raise ProtocolError(KEY, "the key the reference names is not the certificate's")
    current = held(cx.env, session)
    if current.signer(trust.ServiceKey(new_der).kid) is not None:
        raise ProtocolError(KEY, f"the new key is a key of trust bundle {current.seq} already")
    bundle = trust.TrustBundle(
        current.seq + 1,
        (trust.ServiceKey(current.current.key, exp + body.overlap), trust.ServiceKey(new_der)),
        current.device_ca,
        current.broker_ca,
    )
    data = bundle.encode()
    kept = json.dumps({"bundle": data.hex(), "key_ref": body.key_ref})
    return trust.subject(data), kept


def device_ca_of(der: bytes) -> trust.DeviceCA:
    """A ``trust.rotate``'s new device CA: a CA certificate (DER) with a P-256 key;
    ``trust.key`` otherwise."""
    try:
        ca = trust.DeviceCA(der)
    except ProtocolError as exc:
        raise ProtocolError(KEY, exc.reason) from None
    key = ca.certificate.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ProtocolError(KEY, "the new device CA's key is not ECC P-256")
    return ca


def current_ca(env: Env, bundle: trust.TrustBundle) -> trust.DeviceCA:
    """The device CA ``bundle`` issues from: its current one, or (version 1) the configured."""
    if bundle.current_ca is not None:
        return bundle.current_ca
    assert env.device_ca_origin is not None  # DeliveryService sets it
    return trust.DeviceCA(env.device_ca_origin.public_bytes(Encoding.DER))


def _device_ca_subject(cx: Call, session: Session, body: Propose, exp: int) -> tuple[bytes, str]:
    assert body.cert is not None and body.key_ref is not None and body.overlap is not None
    new = device_ca_of(body.cert)
    key = _load(cx.env, body.key_ref)
    new_spki = trust.key_der(new.certificate.public_key())  # type: ignore[arg-type]
    if trust.key_der(key.public_key()) != new_spki:
        raise ProtocolError(KEY, "the key the reference names is not the new CA certificate's")
    if new_spki == trust.key_der(cx.env.key.public_key()):
        raise ProtocolError(KEY, "the new device CA's key is the service signing key")
    current = held(cx.env, session)
    old = current_ca(cx.env, current)
    if any(c.cert == new.cert for c in (current.device_ca or (old,))):
        raise ProtocolError(KEY, f"the new CA is a device CA of trust bundle {current.seq} already")
    if trust.key_der(old.certificate.public_key()) == new_spki:  # type: ignore[arg-type]
        raise ProtocolError(KEY, "the new device CA has the current device CA's key")
    if any(c.certificate.subject == new.certificate.subject for c in current.device_ca or (old,)):
        # OpenSSL (the broker) looks a certificate's issuer and CRL up by name
        raise ProtocolError(KEY, "the new device CA has the name of a current device CA")
    # every certificate the old CA issues (until the change runs, by ``exp``) expires by then
    until = exp + max(body.overlap, cx.env.settings.certificate_validity)
    bundle = trust.TrustBundle(
        current.seq + 1,
        current.service,
        (trust.DeviceCA(old.cert, until), trust.DeviceCA(new.cert)),
        current.broker_ca,
    )
    data = bundle.encode()
    kept = json.dumps({"bundle": data.hex(), "key_ref": body.key_ref})
    return trust.subject(data), kept


def _broker_ca_subject(cx: Call, session: Session, body: Propose, exp: int) -> tuple[bytes, str]:
    """The next bundle with the new broker CA current and the current one(s) accepted until the
    window's end plus the overlap (the time to move the broker to a certificate of the new CA).
    No key: the broker CA's key stays with the broker's PKI."""
    assert body.cert is not None and body.overlap is not None
    try:
        new = trust.DeviceCA(body.cert)
    except ProtocolError as exc:
        raise ProtocolError(KEY, exc.reason) from None
    current = held(cx.env, session)
    if current.broker_ca is not None:
        olds = [c for c in current.broker_ca if c.until is None]
    else:
        olds = [trust.DeviceCA(c.public_bytes(Encoding.DER)) for c in cx.env.broker_ca_origin]
    if not olds:
        raise ProtocolError(KEY, "this service instance does not know the broker CA devices hold")
    if any(c.cert == new.cert for c in (*olds, *(current.broker_ca or ()))):
        raise ProtocolError(KEY, f"the new CA is a broker CA of trust bundle {current.seq} already")
    cas = (*(trust.DeviceCA(c.cert, exp + body.overlap) for c in olds), new)
    if len(cas) > trust.MAX_DEVICE_CAS:
        raise ProtocolError(KEY, f"more than {trust.MAX_DEVICE_CAS} broker CAs")
    bundle = trust.TrustBundle(current.seq + 1, current.service, current.device_ca, cas)
    data = bundle.encode()
    kept = json.dumps({"bundle": data.hex(), "key_ref": ""})
    return trust.subject(data), kept


def _operator_ca_subject(cx: Call, session: Session, body: Propose, exp: int) -> tuple[bytes, str]:
    """The next bundle with the new operator CA current, the current one accepted until the
    window's end plus the overlap, and older ones with their ends (the oldest ended ones give
    way past ``MAX_DEVICE_CAS``). No key: the operator CA is offline."""
    assert body.cert is not None and body.overlap is not None
    new = device_ca_of(body.cert)
    new_spki = trust.key_der(new.certificate.public_key())  # type: ignore[arg-type]
    if new_spki == trust.key_der(cx.env.key.public_key()):
        raise ProtocolError(KEY, "the new operator CA's key is the service signing key")
    current = held(cx.env, session)
    listed = current.operator_ca or (trust.DeviceCA(cx.env.operator_ca.public_bytes(Encoding.DER)),)
    for ca in listed:
        if ca.cert == new.cert:
            raise ProtocolError(
                KEY, f"the new CA is an operator CA of trust bundle {current.seq} already"
            )
        if trust.key_der(ca.certificate.public_key()) == new_spki:  # type: ignore[arg-type]
            raise ProtocolError(KEY, "the new operator CA has the key of a listed operator CA")
        if ca.certificate.subject == new.certificate.subject:
            # OpenSSL (the broker) looks a certificate's issuer and CRL up by name
            raise ProtocolError(KEY, "the new operator CA has the name of a listed operator CA")
    older = sorted((c for c in listed if c.until is not None), key=lambda c: c.until or 0)
    olds = [
        *older,
        *(trust.DeviceCA(c.cert, exp + body.overlap) for c in listed if c.until is None),
    ]
    cas = (*olds[-(trust.MAX_DEVICE_CAS - 1) :], new)
    bundle = trust.TrustBundle(
        current.seq + 1, current.service, current.device_ca, current.broker_ca, cas
    )
    data = bundle.encode()
    kept = json.dumps({"bundle": data.hex(), "key_ref": ""})
    return trust.subject(data), kept


def approvals_under(env: Env, bundle: trust.TrustBundle) -> authz.AuthzVerifier:
    """The verifier of approvals under ``bundle``'s operator CAs (each until its end), or the
    configured operator CA's before any operator CA section: what a device holding ``bundle``
    checks the next link's approval with."""
    if bundle.operator_ca is None:
        return authz.AuthzVerifier([env.operator_ca])
    return authz.AuthzVerifier(
        [c.certificate for c in bundle.operator_ca], ends=bundle.operator_ca_ends()
    )


def _rolled_key(env: Env, held: trust.TrustBundle, bundle: trust.TrustBundle) -> bytes:
    """The public key (SubjectPublicKeyInfo DER) of the key ``bundle``'s row names: the new
    service signing key, or the new device CA's."""
    if bundle.current.key != held.current.key:
        return bundle.current.key
    new = current_ca(env, bundle)
    return trust.key_der(new.certificate.public_key())  # type: ignore[arg-type]


def execute(
    cx: Call,
    session: Session,
    stored: StoredRequest,
    authorization: bytes,
    check: trust.ApprovalCheck,
    *,
    now: int,
) -> Effects:
    """The admins approved ``stored``: store the signed link, switch keys (``TrustRolled``)."""
    kept = json.loads(stored.reason)
    data, ref = bytes.fromhex(kept["bundle"]), str(kept["key_ref"])
    request = authz.Request.decode(stored.request)
    if request.subject != trust.subject(data):
        raise ProtocolError("trust.approval", "the request's bundle is not the one kept with it")
    bundle = trust.TrustBundle.decode(data)
    current = held(cx.env, session)
    if bundle.seq != current.seq + 1:
        raise ProtocolError(
            "trust.seq", f"trust bundle {bundle.seq} no longer follows bundle {current.seq}"
        )
    # a broker or operator CA rollover: the service loads no key
    keyless = bundle.current == current.current and current_ca(cx.env, bundle) == current_ca(
        cx.env, current
    )
    if not keyless:
        key = _load(cx.env, ref)
        if trust.key_der(key.public_key()) != _rolled_key(cx.env, current, bundle):
            raise ProtocolError(KEY, "the key reference no longer names the approved key")
    if trust.key_der(cx.env.key.public_key()) != current.current.key:
        raise ProtocolError(
            "trust.signer", "this instance does not sign with the held bundle's current key"
        )
    link = trust.TrustLink(trust.sign_link(bundle, cx.env.key), authorization)
    trust.check_link(current, link, check)  # what every device will check
    trustchain.add(session, bundle.seq, link.bundle, authorization, ref, now=now)
    if bundle.current != current.current:
        what = "signs with its new key"
    elif keyless and bundle.operator_ca != current.operator_ca:
        what = "accepts operators of the new operator CA"
    elif keyless:
        what = "hands devices the new broker CA"
    else:
        what = "uses its new device CA"
    return [
        Log(logging.INFO, "trust bundle %d: the service %s", (bundle.seq, what)),
        TrustRolled(),
    ]


def _refs(env: Env, rows: Sequence[TrustBundleRow]) -> tuple[str | None, str | None]:
    """The key references of the newest rows that changed the service signing key and the
    device CA (None: no row did)."""
    service_ref = ca_ref = None
    before = trust.TrustBundle.initial(
        env.key.public_key() if env.trust_origin is None else env.trust_origin
    )
    for row in rows:
        bundle = trust.TrustLink(row.link, row.authz).opened()[1]
        if bundle.current.key != before.current.key:
            service_ref = row.key_ref
        elif current_ca(env, bundle) != current_ca(env, before):
            ca_ref = row.key_ref
        before = bundle
    return service_ref, ca_ref


def sync(env: Env, session: Session) -> bool:
    """Sign with the newest bundle's key and issue from its device CA if this instance does not
    yet (another instance ran the rollover, or the service restarted with ``[service]
    signing_key`` or ``[device_ca]`` still naming the old key). True when the bundle changed."""
    row = trustchain.newest(session)
    if row is None or row.seq == env.trust_seq:
        return False
    bundle = trust.TrustLink(row.link, row.authz).opened()[1]
    service_ref, ca_ref = _refs(env, trustchain.links(session))
    if trust.key_der(env.key.public_key()) != bundle.current.key:
        key = _load(env, service_ref or row.key_ref)
        if trust.key_der(key.public_key()) != bundle.current.key:
            raise ProtocolError(KEY, f"trust bundle {row.seq}'s key reference names another key")
        env.key = key
        log.warning(
            "keyfleet serve: signing with trust bundle %d's key; set [service] signing_key and "
            "signing_cert to it (docs/operations.md, 'Rolling over the service signing key')",
            row.seq,
        )
    if bundle.device_ca is not None:
        _use_device_cas(env, bundle, ca_ref)
    if bundle.operator_ca is not None:
        use_operator_cas(env, bundle)
    env.trust_seq = row.seq
    return True


def _use_device_cas(env: Env, bundle: trust.TrustBundle, ref: str | None) -> None:
    """Issue from ``bundle``'s current device CA (its key loaded from ``ref``), accept stored
    credentials of every CA it lists, each until its end, and keep signing the broker's CRL of
    every older CA it lists whose key this instance holds."""
    assert bundle.device_ca is not None
    new = current_ca(env, bundle)
    older = {c.cert for c in bundle.device_ca if c.until is not None}
    settings = env.revocation
    if settings is not None:
        held_cas = [*settings.previous]
        if settings.device_ca.certificate != new.certificate:
            if ref is None:
                raise ProtocolError(KEY, f"trust bundle {bundle.seq}: no key reference for its CA")
            key = _load(env, ref)
            if trust.key_der(key.public_key()) != trust.key_der(new.certificate.public_key()):  # type: ignore[arg-type]
                raise ProtocolError(
                    KEY, f"trust bundle {bundle.seq}'s CA key reference names another key"
                )
            held_cas.insert(0, settings.device_ca)
            settings = dataclasses.replace(
                settings,
                device_ca=CertificateAuthority(certificate=new.certificate, private_key=key),
            )
            log.warning(
                "keyfleet serve: issuing from trust bundle %d's device CA; keep [device_ca] naming "
                "the old CA until its end, then set it to the new one (docs/operations.md, "
                "'Rolling over the device CA')",
                bundle.seq,
            )
        previous = tuple(
            ca for ca in held_cas if ca.certificate.public_bytes(Encoding.DER) in older
        )
        if settings.crl_file is not None and len(previous) < len(older):
            log.warning(
                "keyfleet serve: trust bundle %d still accepts %d older device CA(s) whose key "
                "this instance does not hold: the broker's CRL file lacks their CRL",
                bundle.seq,
                len(older) - len(previous),
            )
        env.revocation = dataclasses.replace(settings, previous=previous)
        env.crl_checked_at = 0  # the next tick issues the new CA's CRL (``tasks.crl_tick``)
    others = [c.certificate for c in bundle.device_ca if c.until is not None]
    env.devices = StoredDevices(new.certificate, others=others, ends=bundle.device_ca_ends())


def use_operator_cas(env: Env, bundle: trust.TrustBundle) -> None:
    """Verify operator certificates and approvals against every operator CA ``bundle`` lists,
    each until its end (``Env.approvals``, ``Env.verify_operator_certificate``)."""
    assert bundle.operator_ca is not None
    env.operator_cas = tuple(c.certificate for c in bundle.operator_ca)
    env.operator_ca_ends = bundle.operator_ca_ends()
    env.authz_verifier = None  # built again over the new set at its next use
