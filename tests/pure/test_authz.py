"""agent.protocol.authz: requests, approvals and the quorum policy, verified against a real small
operator CA issued with provisioning.pki (the same helpers `keyfleet pki` uses). Each refusal is
checked by its check id."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocol import authz
from agent.protocol.authz import (
    Approval,
    Authorization,
    AuthzVerifier,
    Member,
    QuorumPolicy,
    Request,
    members_match,
    sign_approval,
)
from agent.protocol.errors import ProtocolError
from agent.protocol.mls import codec
from provisioning import pki

pytestmark = pytest.mark.pure

ISSUED = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
T0 = int(ISSUED.timestamp())
HOUR = 3600
DAY = 24 * HOUR


@dataclass(frozen=True)
class Operator:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def approve(self, request: bytes) -> Approval:
        return sign_approval(request, self.key, self.cert)


def _operator(
    ca: pki.CertificateAuthority,
    name: str,
    role: str,
    *,
    issued: datetime = ISSUED,
    valid_for: timedelta = timedelta(days=365),
) -> Operator:
    key = pki.generate_key()
    cert = pki.issue_client_cert(
        ca, key.public_key(), identity=name, role=role, now=issued, valid_for=valid_for
    )
    return Operator(key, cert)


@pytest.fixture(scope="module")
def ca() -> pki.CertificateAuthority:
    return pki.create_ca("keyfleet operator CA", now=ISSUED, valid_for=timedelta(days=3650))


@pytest.fixture(scope="module")
def other_ca() -> pki.CertificateAuthority:
    # same name, other key: only the key makes a CA
    return pki.create_ca("keyfleet operator CA", now=ISSUED, valid_for=timedelta(days=3650))


@pytest.fixture(scope="module")
def ops(ca: pki.CertificateAuthority) -> dict[str, Operator]:
    return {
        "alice": _operator(ca, "op-alice", "operator"),
        "bob": _operator(ca, "op-bob", "operator"),
        "carol": _operator(ca, "op-carol", "admin"),
        "dave": _operator(ca, "op-dave", "admin"),
        "vic": _operator(ca, "op-vic", "viewer"),
    }


@pytest.fixture
def verifier(ca: pki.CertificateAuthority) -> AuthzVerifier:
    return AuthzVerifier([ca.certificate])


def _point(seed: int) -> bytes:
    key = ec.derive_private_key(seed, ec.SECP256R1())
    return key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


DEV1, DEV2, DEV3 = _point(101), _point(102), _point(103)


def _request(
    op: str = authz.OP_GROUP_ADD,
    group: str | None = "prod",
    members: Sequence[Member] = (Member.of("dev-0001", DEV1),),
    *,
    policy: bytes | None = None,
    nbf: int = T0,
    exp: int = T0 + DAY,
) -> bytes:
    return Request(
        id=bytes(range(16)),
        op=op,
        group=group,
        members=tuple(members),
        policy=policy,
        nbf=nbf,
        exp=exp,
        by="op-alice",
    ).encode()


def _authz(request: bytes, *signers: Operator) -> bytes:
    return Authorization(request, tuple(s.approve(request) for s in signers)).encode()


def _refused(check: str, call: Callable[[], object]) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        call()
    assert caught.value.check == check, caught.value
    return caught.value


POLICY2 = QuorumPolicy.initial(2)
NOW = T0 + HOUR


def _flip_fixture() -> tuple[AuthzVerifier, bytes]:
    ca = pki.create_ca("keyfleet operator CA", now=ISSUED, valid_for=timedelta(days=3650))
    a, b = _operator(ca, "op-alice", "operator"), _operator(ca, "op-bob", "operator")
    return AuthzVerifier([ca.certificate]), _authz(_request(), a, b)


_FLIP_VERIFIER, _FLIP_SUBJECT = _flip_fixture()


# -- quorum --------------------------------------------------------------------------------------


def test_two_of_n_distinct_operators_meet_the_quorum(
    verifier: AuthzVerifier, ops: dict[str, Operator]
) -> None:
    request = _request()
    data = _authz(request, ops["alice"], ops["bob"])
    verified = verifier.verify(data, policy=POLICY2, now=NOW, op="group.add", group="prod")
    assert verified.operators == {"op-alice", "op-bob"}
    assert verified.digest == hashlib.sha256(data).digest()
    assert verified.request == Request.decode(request)
    assert verified.request.members == (Member("dev-0001", hashlib.sha256(DEV1).digest()),)


def test_one_operator_signing_twice_counts_once(
    verifier: AuthzVerifier, ops: dict[str, Operator]
) -> None:
    request = _request()
    data = _authz(request, ops["alice"], ops["alice"])
    assert len(Authorization.decode(data).approvals) == 2
    error = _refused(
        "authz.quorum",
        lambda: verifier.verify(data, policy=POLICY2, now=NOW, op="group.add", group="prod"),
    )
    assert "1 distinct operator(s) of 2" in error.reason
    # the same duplicate beside a second operator is harmless
    data = _authz(request, ops["alice"], ops["alice"], ops["bob"])
    verified = verifier.verify(data, policy=POLICY2, now=NOW, op="group.add", group="prod")
    assert verified.operators == {"op-alice", "op-bob"}


def test_a_viewers_approval_does_not_count(
    verifier: AuthzVerifier, ops: dict[str, Operator]
) -> None:
    request = _request()
    data = _authz(request, ops["alice"], ops["vic"])
    _refused(
        "authz.role",
        lambda: verifier.verify(data, policy=POLICY2, now=NOW, op="group.add", group="prod"),
    )
    data = _authz(request, ops["vic"], ops["alice"], ops["bob"])
    verified = verifier.verify(data, policy=POLICY2, now=NOW, op="group.add", group="prod")
    assert verified.operators == {"op-alice", "op-bob"}
    _refused(
        "authz.role",
        lambda: verifier.verify_approval(request, ops["vic"].approve(request), now=NOW),
    )
    assert verifier.verify_approval(request, ops["alice"].approve(request), now=NOW).role == (
        "operator"
    )


def test_a_certificate_from_another_ca_is_refused(
    verifier: AuthzVerifier, ops: dict[str, Operator], other_ca: pki.CertificateAuthority
) -> None:
    mallory = _operator(other_ca, "op-bob", "admin")  # even under a real operator's name
    request = _request()
    data = _authz(request, ops["alice"], mallory)
    _refused(
        "authz.chain",
        lambda: verifier.verify(data, policy=POLICY2, now=NOW, op="group.add", group="prod"),
    )


def test_a_certificate_that_names_no_operator_is_refused(
    verifier: AuthzVerifier, ca: pki.CertificateAuthority, ops: dict[str, Operator]
) -> None:
    request = _request()
    for name, role in (("keyfleet-service", "admin"), ("op-sam", "service")):
        stranger = _operator(ca, name, role)
        check = "authz.chain" if role == "admin" else "authz.role"
        _refused(
            check, partial(verifier.verify_approval, request, stranger.approve(request), now=NOW)
        )


def test_another_operator_ca_refuses_ours(
    ops: dict[str, Operator], other_ca: pki.CertificateAuthority
) -> None:
    # a verifier for another CA refuses all of ours: the anchors decide, not the names
    request = _request()
    data = _authz(request, ops["alice"], ops["bob"])
    _refused(
        "authz.chain",
        lambda: AuthzVerifier([other_ca.certificate]).verify(
            data, policy=POLICY2, now=NOW, op="group.add", group="prod"
        ),
    )


def test_group_specific_quorum(verifier: AuthzVerifier, ops: dict[str, Operator]) -> None:
    policy = QuorumPolicy(serial=3, default={"*": 2}, groups={"lab": {"*": 1}})
    assert policy.required("group.add", "lab") == 1
    assert policy.required("group.add", "prod") == 2
    assert policy.required("device.revoke", None) == 2
    lab = _request(group="lab")
    verified = verifier.verify(
        _authz(lab, ops["alice"]), policy=policy, now=NOW, op="group.add", group="lab"
    )
    assert verified.operators == {"op-alice"}
    prod = _request(group="prod")
    _refused(
        "authz.quorum",
        lambda: verifier.verify(
            _authz(prod, ops["alice"]), policy=policy, now=NOW, op="group.add", group="prod"
        ),
    )


def test_policy_lookup_order() -> None:
    policy = QuorumPolicy(
        serial=1,
        default={"*": 2, "device.revoke": 3},
        groups={"prod": {"group.add": 4, "*": 5}, "lab": {"group.remove": 1}},
    )
    assert policy.required("group.add", "prod") == 4
    assert policy.required("group.remove", "prod") == 5
    assert policy.required("group.remove", "lab") == 1
    assert policy.required("group.add", "lab") == 2
    assert policy.required("device.revoke", None) == 3
    assert policy.required("fleet.rekey", None) == 2


# -- freshness and certificate validity -----------------------------------------------------------


def test_request_window(verifier: AuthzVerifier, ops: dict[str, Operator]) -> None:
    data = _authz(_request(nbf=T0, exp=T0 + DAY), ops["alice"], ops["bob"])

    def at(now: int) -> object:
        return verifier.verify(data, policy=POLICY2, now=now, op="group.add", group="prod")

    at(T0)
    at(T0 + DAY)
    _refused("authz.not-yet", lambda: at(T0 - 1))
    _refused("authz.expired", lambda: at(T0 + DAY + 1))
    # historical verification (another leaf's admission) ignores the window
    historical = verifier.verify(data, policy=POLICY2, now=None, op="group.add", group="prod")
    assert historical.operators == {"op-alice", "op-bob"}


def test_expired_and_not_yet_valid_operator_certificates(
    verifier: AuthzVerifier, ca: pki.CertificateAuthority, ops: dict[str, Operator]
) -> None:
    short = _operator(ca, "op-erin", "operator", valid_for=timedelta(days=2))
    later = _operator(ca, "op-fred", "operator", issued=ISSUED + timedelta(days=30))
    request = _request(nbf=T0 + 5 * DAY, exp=T0 + 6 * DAY)
    expired = _authz(request, ops["alice"], short)
    _refused(
        "authz.chain",
        lambda: verifier.verify(
            expired, policy=POLICY2, now=T0 + 5 * DAY + 1, op="group.add", group="prod"
        ),
    )
    not_yet = _authz(request, ops["alice"], later)
    _refused(
        "authz.chain",
        lambda: verifier.verify(
            not_yet, policy=POLICY2, now=T0 + 5 * DAY + 1, op="group.add", group="prod"
        ),
    )
    # historical: a certificate valid at no moment of the request's window never counts
    _refused(
        "authz.chain",
        lambda: verifier.verify(expired, policy=POLICY2, now=None, op="group.add", group="prod"),
    )


def test_historical_verification_accepts_a_certificate_expired_since(
    verifier: AuthzVerifier, ca: pki.CertificateAuthority, ops: dict[str, Operator]
) -> None:
    short = _operator(ca, "op-erin", "operator", valid_for=timedelta(days=2))
    request = _request(nbf=T0, exp=T0 + DAY)
    data = _authz(request, ops["alice"], short)
    fresh = verifier.verify(data, policy=POLICY2, now=T0 + HOUR, op="group.add", group="prod")
    assert fresh.operators == {"op-alice", "op-erin"}
    # a year later the certificate and the request have expired; the admission still holds
    later = T0 + 365 * DAY
    _refused(
        "authz.expired",
        lambda: verifier.verify(data, policy=POLICY2, now=later, op="group.add", group="prod"),
    )
    for check in (verifier, AuthzVerifier([ca.certificate])):  # memoized and cold
        historical = check.verify(data, policy=POLICY2, now=None, op="group.add", group="prod")
        assert historical.operators == {"op-alice", "op-erin"}


def test_certificate_validation_is_memoized_per_der(
    verifier: AuthzVerifier, ops: dict[str, Operator], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[x509.Certificate] = []
    original = verifier._validate

    def counting(cert: x509.Certificate, at: int) -> object:
        calls.append(cert)
        return original(cert, at)

    monkeypatch.setattr(verifier, "_validate", counting)
    data = _authz(_request(), ops["alice"], ops["bob"])
    for _ in range(3):
        verifier.verify(data, policy=POLICY2, now=NOW, op="group.add", group="prod")
    assert len(calls) == 2
    # outside the remembered validity the certificate is validated again, and fails
    with pytest.raises(ProtocolError):
        verifier.verify_approval(
            _request(nbf=T0, exp=T0 + DAY), ops["alice"].approve(_request()), now=T0 + 3650 * DAY
        )
    assert len(calls) == 3


# -- scope, signature, decoding -------------------------------------------------------------------


def test_wrong_op_or_group_is_out_of_scope(
    verifier: AuthzVerifier, ops: dict[str, Operator]
) -> None:
    data = _authz(_request(), ops["alice"], ops["bob"])
    for op, group in (("group.add", "lab"), ("group.remove", "prod"), ("group.add", None)):
        _refused(
            "authz.scope",
            partial(verifier.verify, data, policy=POLICY2, now=NOW, op=op, group=group),
        )


def test_tampered_request_bytes_break_the_signatures(
    verifier: AuthzVerifier, ops: dict[str, Operator]
) -> None:
    request = _request()
    approvals = (ops["alice"].approve(request), ops["bob"].approve(request))
    # the service swaps in another device's key under the approved device id
    forged = _request(members=(Member.of("dev-0001", DEV2),))
    data = Authorization(forged, approvals).encode()
    _refused(
        "authz.signature",
        lambda: verifier.verify(data, policy=POLICY2, now=NOW, op="group.add", group="prod"),
    )
    # a flipped signature byte
    bad = replace(approvals[1], sig=approvals[1].sig[:-1] + bytes([approvals[1].sig[-1] ^ 1]))
    data = Authorization(request, (approvals[0], bad)).encode()
    _refused(
        "authz.signature",
        lambda: verifier.verify(data, policy=POLICY2, now=NOW, op="group.add", group="prod"),
    )


def test_sign_approval_refuses_a_key_that_is_not_the_certificates(
    ops: dict[str, Operator],
) -> None:
    _refused(
        "authz.signature",
        lambda: sign_approval(_request(), ops["alice"].key, ops["bob"].cert),
    )
    _refused("authz.decode", lambda: sign_approval(b"\xa0", ops["alice"].key, ops["alice"].cert))


def test_oversize_and_garbage_are_refused_before_anything_else(
    verifier: AuthzVerifier, ops: dict[str, Operator]
) -> None:
    def verify(data: bytes) -> object:
        return verifier.verify(data, policy=POLICY2, now=NOW, op="group.add", group="prod")

    _refused("authz.decode", lambda: verify(b"\x00" * (authz.MAX_AUTHORIZATION + 1)))
    _refused("authz.decode", lambda: verify(b"garbage"))
    _refused("authz.decode", lambda: verify(b""))
    _refused("authz.decode", lambda: verify(codec.encode({"v": 1, "req": b"x", "approvals": []})))
    request = _request()
    good = Authorization.decode(_authz(request, ops["alice"], ops["bob"]))
    too_many = codec.encode(
        {"v": 1, "req": request, "approvals": [good.approvals[0].to_obj()] * 33}
    )
    _refused("authz.decode", lambda: verify(too_many))
    # a request whose bytes are not CBOR, inside a well-formed authorization
    _refused(
        "authz.decode",
        lambda: verify(Authorization(b"\xff\xff", good.approvals).encode()),
    )
    # an approval certificate that is no certificate counts as a refused approval
    junk = Approval(cert=b"\x30\x03\x02\x01\x00", sig=good.approvals[1].sig)
    _refused(
        "authz.chain",
        lambda: verify(Authorization(request, (good.approvals[0], junk)).encode()),
    )


def test_unknown_versions_and_suites(ops: dict[str, Operator]) -> None:
    request = Request.decode(_request())
    changes: list[dict[str, object]] = [{"v": 2}, {"suite": 3}, {"v": 2, "extra": 1}]
    for change in changes:
        data = codec.encode({**request.to_obj(), **change})
        _refused("authz.version", partial(Request.decode, data))
    approval = ops["alice"].approve(_request()).to_obj()
    _refused("authz.version", lambda: Approval.decode(codec.encode({**approval, "v": 0})))
    _refused(
        "authz.version",
        lambda: Authorization.decode(codec.encode({"v": 2, "req": b"", "approvals": []})),
    )
    policy = QuorumPolicy.initial(2).to_obj()
    _refused("authz.version", lambda: QuorumPolicy.decode(codec.encode({**policy, "v": 2})))


def test_request_fields_are_checked() -> None:
    base = Request.decode(_request())
    bad: list[dict[str, object]] = [
        {"id": b"short"},
        {"op": "Group.Add"},
        {"group": "a/b"},
        {"members": ({"id": "dev-0001", "key": b"x" * 32},) * 2},
        {"nbf": T0 + 10, "exp": T0},
        {"exp": T0 + authz.MAX_LIFETIME + 1},
        {"by": ""},
        {"policy": QuorumPolicy.initial(1).encode()},  # only op "policy" carries one
        {"members": ()},  # an add names someone
    ]
    for change in bad:
        data = codec.encode({**base.to_obj(), **change})
        _refused("authz.decode", partial(Request.decode, data))
    _refused("authz.decode", lambda: _request(op="group.add", group=None))
    _refused("authz.decode", lambda: _request(op="policy", group=None, members=()))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_decoders_refuse_arbitrary_bytes_with_authz_ids(data: bytes) -> None:
    for decoder in (Authorization.decode, Request.decode, Approval.decode, QuorumPolicy.decode):
        try:
            decoder(data)
        except ProtocolError as exc:
            assert exc.check in {"authz.decode", "authz.version"}, exc


# -- policy updates -------------------------------------------------------------------------------


def _policy_request(policy: QuorumPolicy) -> bytes:
    return _request(op="policy", group=None, members=(), policy=policy.encode())


def test_policy_update_with_the_current_quorum_and_a_higher_serial(
    verifier: AuthzVerifier, ops: dict[str, Operator]
) -> None:
    new = QuorumPolicy(
        serial=1,
        default={"*": 2},
        groups={"lab": {"*": 1}},
        auto_remove=frozenset({"*"}),
        auto_readd=frozenset({"lab"}),
    )
    data = _authz(_policy_request(new), ops["carol"], ops["dave"])
    adopted = verifier.verify_policy_update(data, current=QuorumPolicy.initial(2), now=NOW)
    assert adopted == new
    assert adopted.allows_auto_remove("prod") and adopted.allows_auto_readd("lab")
    assert not adopted.allows_auto_readd("prod")
    assert not QuorumPolicy.initial(2).allows_auto_remove("prod")
    # the same update again (equal serial), and an older one, are refused
    _refused(
        "authz.policy.serial",
        lambda: verifier.verify_policy_update(data, current=adopted, now=NOW),
    )
    old = replace(new, serial=0)
    _refused(
        "authz.policy.serial",
        lambda: verifier.verify_policy_update(
            _authz(_policy_request(old), ops["carol"], ops["dave"]),
            current=QuorumPolicy(serial=5, default={"*": 1}),
            now=NOW,
        ),
    )


def test_policy_update_needs_the_current_quorum_of_admins(
    verifier: AuthzVerifier, ops: dict[str, Operator]
) -> None:
    new = QuorumPolicy(serial=7, default={"*": 1})
    request = _policy_request(new)
    current = QuorumPolicy(serial=6, default={"*": 1, "policy": 2})
    _refused(
        "authz.quorum",
        lambda: verifier.verify_policy_update(
            _authz(request, ops["carol"]), current=current, now=NOW
        ),
    )
    _refused(
        "authz.role",
        lambda: verifier.verify_policy_update(
            _authz(request, ops["alice"], ops["bob"]), current=current, now=NOW
        ),
    )
    adopted = verifier.verify_policy_update(
        _authz(request, ops["carol"], ops["dave"]), current=current, now=NOW
    )
    assert adopted.required("group.add", "prod") == 1


def test_policy_encoding_round_trips_and_refuses_bad_values() -> None:
    policy = QuorumPolicy(
        serial=9,
        default={"*": 2, "group.add": 3},
        groups={"lab": {"*": 1}},
        auto_remove=frozenset({"prod", "lab"}),
    )
    assert QuorumPolicy.decode(policy.encode()) == policy
    assert QuorumPolicy.decode(policy.encode()).encode() == policy.encode()
    obj = policy.to_obj()
    changes: list[dict[str, object]] = [
        {"default": {"group.add": 2}},  # no "*"
        {"default": {"*": 0}},
        {"default": {"*": authz.MAX_K + 1}},
        {"groups": {"a/b": {"*": 1}}},
        {"auto": {"remove": ["lab", "lab"], "readd": []}},
        {"auto": {"remove": []}},
        {"serial": -1},
    ]
    for change in changes:
        data = codec.encode({**obj, **change})
        _refused("authz.decode", partial(QuorumPolicy.decode, data))
    assert QuorumPolicy.initial(1).required("anything.else", "g") == 1


# -- members_match ---------------------------------------------------------------------------------


def _verified(
    verifier: AuthzVerifier,
    ops: dict[str, Operator],
    op: str,
    group: str | None,
    members: Sequence[Member],
) -> authz.VerifiedAuthorization:
    data = _authz(_request(op, group, members), ops["alice"], ops["bob"])
    return verifier.verify(data, policy=POLICY2, now=NOW, op=op, group=group)


def test_members_match_for_adds(verifier: AuthzVerifier, ops: dict[str, Operator]) -> None:
    members = (Member.of("dev-0001", DEV1), Member.of("dev-0002", DEV2))
    verified = _verified(verifier, ops, "group.add", "prod", members)
    members_match(verified, [("dev-0002", DEV2), ("dev-0001", DEV1)], [])
    for adds, removes in (
        ([("dev-0001", DEV1)], []),  # fewer
        ([("dev-0001", DEV1), ("dev-0002", DEV2), ("dev-0003", DEV3)], []),  # a phantom
        ([("dev-0001", DEV1), ("dev-0002", DEV3)], []),  # the right id with another key
        ([("dev-0001", DEV1), ("dev-0002", DEV2)], ["dev-0009"]),  # and a removal
        ([("dev-0001", DEV1), ("dev-0001", DEV1), ("dev-0002", DEV2)], []),
    ):
        _refused("authz.members", partial(members_match, verified, adds, removes))
    _refused("authz.members", lambda: members_match(verified, [("dev-0001", b"\x04")], []))
    created = _verified(verifier, ops, "group.create", "prod", members)
    members_match(created, [("dev-0001", DEV1), ("dev-0002", DEV2)], [])


@settings(max_examples=150, deadline=None)
@given(position=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_any_flipped_bit_refuses_the_authorization(position: int, bit: int) -> None:
    data = bytearray(_FLIP_SUBJECT)
    data[position % len(data)] ^= 1 << bit
    with pytest.raises(ProtocolError) as caught:
        _FLIP_VERIFIER.verify(bytes(data), policy=POLICY2, now=NOW, op="group.add", group="prod")
    assert caught.value.check.startswith("authz."), caught.value


def test_members_match_for_removes_and_revokes(
    verifier: AuthzVerifier, ops: dict[str, Operator]
) -> None:
    members = (Member.of("dev-0001", DEV1), Member.of("dev-0002", DEV2))
    removal = _verified(verifier, ops, "group.remove", "prod", members)
    members_match(removal, [], ["dev-0001", "dev-0002"])
    _refused("authz.members", lambda: members_match(removal, [], ["dev-0001"]))
    _refused(
        "authz.members",
        lambda: members_match(removal, [("dev-0003", DEV3)], ["dev-0001", "dev-0002"]),
    )
    revoke = _verified(verifier, ops, "device.revoke", None, members)
    members_match(revoke, [], ["dev-0002"])  # this group held only one of them
    members_match(revoke, [], ["dev-0001", "dev-0002"])
    _refused("authz.members", lambda: members_match(revoke, [], []))
    _refused("authz.members", lambda: members_match(revoke, [], ["dev-0003"]))
    _refused("authz.members", lambda: members_match(revoke, [], ["dev-0001", "dev-0001"]))


def test_a_policy_authorizes_no_membership_change(
    verifier: AuthzVerifier, ops: dict[str, Operator]
) -> None:
    data = _authz(
        _policy_request(QuorumPolicy(serial=1, default={"*": 2})), ops["carol"], ops["dave"]
    )
    verified = verifier.verify(data, policy=POLICY2, now=NOW, op="policy", group=None)
    _refused("authz.scope", lambda: members_match(verified, [], []))
