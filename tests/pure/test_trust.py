"""The trust bundle's rules (agent.protocol.trust): a device takes the next bundle only when it
follows the held one by exactly one, is signed by a key the held bundle lists and carries a
quorum of admins' ``trust.rotate`` approval of exactly its bytes. Pure: software service keys,
the real test operator CA (tests.operator_certs, tests.trust_links)."""

from __future__ import annotations

from collections.abc import Callable

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.protocol import authz as az
from agent.protocol import trust
from agent.protocol.errors import ProtocolError
from agent.protocol.feed import page
from agent.protocol.membership import Membership
from agent.protocol.mls import codec
from provisioning.pki import create_ca, issue_client_cert
from tests.operator_certs import VALID_FOR, VALID_FROM, membership
from tests.pure.test_feed_operators import REMOVED_AT, entries, removal
from tests.trust_links import other_subject, rollover, rotate_authz

pytestmark = pytest.mark.pure

T0 = 1_700_000_000
OLD = ec.generate_private_key(ec.SECP256R1())
NEW = ec.generate_private_key(ec.SECP256R1())
NEWER = ec.generate_private_key(ec.SECP256R1())
BUNDLE0 = trust.TrustBundle.initial(OLD.public_key())


def check(member: Membership | None = None) -> trust.ApprovalCheck:
    return (membership() if member is None else member).check_trust_approval


def test_bundle_round_trip_and_one_encoding() -> None:
    bundle, _ = rollover(BUNDLE0, NEW.public_key(), OLD, until=T0 + 100)
    data = bundle.encode()
    assert trust.TrustBundle.decode(data) == bundle
    assert bundle.current.public_key.public_numbers() == NEW.public_key().public_numbers()
    raw = codec.decode(data, 4096, "t")
    assert isinstance(raw, dict)
    # the same map with keys out of order is not the canonical encoding
    unsorted = cbor2.dumps({"service": raw["service"], "v": 1, "seq": raw["seq"]})
    with pytest.raises(ProtocolError) as err:
        trust.TrustBundle.decode(unsorted)
    assert err.value.check in ("trust.malformed", "cbor.noncanonical")


@pytest.mark.parametrize(
    "make",
    [
        lambda: trust.TrustBundle(1, ()),  # no key
        lambda: trust.TrustBundle(1, (trust.ServiceKey(trust.key_der(NEW.public_key()), 5),)),
        lambda: trust.TrustBundle(
            1,
            (
                trust.ServiceKey(trust.key_der(NEW.public_key())),
                trust.ServiceKey(trust.key_der(OLD.public_key())),
            ),
        ),  # two keys without an end
        lambda: trust.TrustBundle(
            1,
            (
                trust.ServiceKey(trust.key_der(NEW.public_key())),
                trust.ServiceKey(trust.key_der(NEW.public_key()), 5),
            ),
        ),  # a key twice
        lambda: trust.ServiceKey(b"\x30\x00"),
        lambda: trust.ServiceKey(
            trust.key_der(ec.generate_private_key(ec.SECP384R1()).public_key())
        ),
    ],
)
def test_malformed_bundles_are_refused(make: Callable[[], object]) -> None:
    with pytest.raises(ProtocolError) as err:
        make()
    assert err.value.check == "trust.malformed"


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_decoders_refuse_junk_with_a_check_id(data: bytes) -> None:
    for decode in (trust.TrustBundle.decode, trust.TrustChain.decode):
        try:
            decode(data)
        except ProtocolError as exc:
            assert exc.check.startswith(("trust.", "cbor."))


def test_a_link_is_taken_and_both_keys_overlap_until_the_old_ones_end() -> None:
    bundle, link = rollover(BUNDLE0, NEW.public_key(), OLD, until=T0 + 100)
    taken = trust.check_link(BUNDLE0, link, check())
    assert taken == bundle
    old_kid, new_kid = (trust.ServiceKey(trust.key_der(k.public_key())).kid for k in (OLD, NEW))
    assert set(taken.accepted(T0 + 100)) == {old_kid, new_kid}  # the overlap
    assert set(taken.accepted(T0 + 101)) == {new_kid}  # the old key's end
    assert set(BUNDLE0.accepted(T0 + 10**9)) == {old_kid}  # bundle 0's key has no end


def test_an_offline_device_applies_the_chain_in_order() -> None:
    b1, l1 = rollover(BUNDLE0, NEW.public_key(), OLD, until=T0 + 100)
    b2, l2 = rollover(b1, NEWER.public_key(), NEW, until=T0 + 200)
    chain = trust.TrustChain((l1, l2))
    assert trust.TrustChain.decode(chain.encode()) == chain
    assert trust.advance(BUNDLE0, chain, check()) == b2
    assert trust.advance(b1, chain, check()) == b2  # the first link held already: skipped
    assert trust.advance(b2, chain, check()) is None  # nothing newer
    # out of order: link 2 does not follow bundle 0
    with pytest.raises(ProtocolError) as err:
        trust.advance(BUNDLE0, trust.TrustChain((l2, l1)), check())
    assert err.value.check == "trust.seq"


def test_a_missing_link_is_refused() -> None:
    b1, _ = rollover(BUNDLE0, NEW.public_key(), OLD, until=T0 + 100)
    _, l2 = rollover(b1, NEWER.public_key(), NEW, until=T0 + 200)
    with pytest.raises(ProtocolError) as err:
        trust.advance(BUNDLE0, trust.TrustChain((l2,)), check())
    assert err.value.check == "trust.seq"


def test_a_replayed_older_bundle_is_not_taken() -> None:
    b1, l1 = rollover(BUNDLE0, NEW.public_key(), OLD, until=T0 + 100)
    with pytest.raises(ProtocolError) as err:
        trust.check_link(b1, l1, check())
    assert err.value.check == "trust.seq"


def test_the_old_key_still_signs_the_next_link_after_its_end() -> None:
    """A link is judged against every key of the held bundle, whatever its end: the device may
    have been offline past the overlap (the quorum is what allows the change)."""
    b1, _ = rollover(BUNDLE0, NEW.public_key(), OLD, until=T0 + 1)
    _, l2 = rollover(b1, NEWER.public_key(), OLD, until=T0 + 2)
    assert trust.check_link(b1, l2, check()).seq == 2


def test_a_bundle_signed_by_an_unknown_key_is_refused() -> None:
    rogue = ec.generate_private_key(ec.SECP256R1())
    _, link = rollover(BUNDLE0, NEW.public_key(), rogue, until=T0 + 100)
    with pytest.raises(ProtocolError) as err:
        trust.check_link(BUNDLE0, link, check())
    assert err.value.check == "trust.signer"


def test_a_bundle_with_a_broken_signature_is_refused() -> None:
    _, link = rollover(BUNDLE0, NEW.public_key(), OLD, until=T0 + 100)
    broken = bytearray(link.bundle)
    broken[-3] ^= 1
    with pytest.raises(ProtocolError) as err:
        trust.check_link(BUNDLE0, trust.TrustLink(bytes(broken), link.authz), check())
    assert err.value.check == "trust.signer"


def _rogue_admin_authz(bundle: bytes) -> bytes:
    ca = create_ca("rogue operator CA", now=VALID_FROM, valid_for=VALID_FOR)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue_client_cert(
        ca, key.public_key(), identity="op-root", role="admin", now=VALID_FROM, valid_for=VALID_FOR
    )
    request = az.Authorization.decode(rotate_authz(bundle)).request
    return az.Authorization(request, (az.sign_approval(request, key, cert),)).encode()


APPROVALS: dict[str, Callable[[bytes], bytes]] = {
    "by a CA of the service's own": _rogue_admin_authz,
    "by an operator, not an admin": lambda b: rotate_authz(b, approvers=("op-alice",)),
    "for another bundle": lambda b: rotate_authz(b, subject=other_subject(b)),
    "of another op": lambda b: rotate_authz(
        b,
        op=az.OP_RELEASE_APPROVE,
        subject=codec.encode(["keyfleet release v1", "1.0", b"\0" * 32]),
    ),
    "not an Authorization": lambda b: b"\xa0",
}


@pytest.mark.parametrize("approval", list(APPROVALS.values()), ids=list(APPROVALS))
def test_a_bundle_without_the_operators_approval_is_refused(
    approval: Callable[[bytes], bytes],
) -> None:
    """The attack: the service host, with the real signing key, signs a bundle that hands trust
    to a key of its choosing; without a quorum of admins no device takes it."""
    bundle, link = rollover(BUNDLE0, NEW.public_key(), OLD, until=T0 + 100)
    forged = trust.TrustLink(link.bundle, approval(bundle.encode()))
    with pytest.raises(ProtocolError) as err:
        trust.check_link(BUNDLE0, forged, check())
    assert err.value.check == "trust.approval"


def test_one_admin_is_not_enough_where_the_policy_needs_two() -> None:
    two = membership(min_approvals=2)
    _, alone = rollover(BUNDLE0, NEW.public_key(), OLD, until=T0 + 100)
    with pytest.raises(ProtocolError) as err:
        trust.check_link(BUNDLE0, alone, check(two))
    assert err.value.check == "trust.approval"
    assert "authz.quorum" in err.value.reason
    # the same admin twice is one operator
    _, twice = rollover(BUNDLE0, NEW.public_key(), OLD, until=T0 + 100, approvers=("op-root",) * 2)
    with pytest.raises(ProtocolError) as err:
        trust.check_link(BUNDLE0, twice, check(two))
    assert err.value.check == "trust.approval"
    b1, both = rollover(
        BUNDLE0, NEW.public_key(), OLD, until=T0 + 100, approvers=("op-root", "op-root2")
    )
    assert trust.check_link(BUNDLE0, both, check(two)) == b1


def test_an_admin_removed_before_the_request_does_not_count() -> None:
    """The revocation feed's removed operators hold for trust bundles too: an approval by an
    admin the quorum removed before the request's time is not counted (``operator.removed``)."""
    two = membership(min_approvals=2)
    assert two.follow_feed(page(entries((removal("op-dora"), REMOVED_AT)), time=REMOVED_AT))
    bundle = trust.TrustBundle(
        1,
        (
            trust.ServiceKey(BUNDLE0.current.key, T0 + 100),
            trust.ServiceKey(trust.key_der(NEW.public_key())),
        ),
    )

    def link(nbf: int) -> trust.TrustLink:
        approved = rotate_authz(bundle.encode(), approvers=("op-root", "op-dora"), nbf=nbf)
        return trust.TrustLink(trust.sign_link(bundle, OLD), approved)

    with pytest.raises(ProtocolError) as err:
        trust.check_link(BUNDLE0, link(REMOVED_AT + 10), check(two))
    assert err.value.check == "trust.approval" and "operator.removed" in err.value.reason
    # approved before the removal (a device catching up on an old chain): it counts
    assert trust.check_link(BUNDLE0, link(REMOVED_AT - 4000), check(two)) == bundle


def test_malformed_links_and_chains_are_refused() -> None:
    _, link = rollover(BUNDLE0, NEW.public_key(), OLD, until=T0 + 100)
    for bad in (
        trust.TrustLink(b"\xd2\x80", link.authz),  # a tag-18 empty array
        trust.TrustLink(trust.cose.sign1(b"\xa0", OLD), link.authz),  # signs no bundle
    ):
        with pytest.raises(ProtocolError) as err:
            trust.check_link(BUNDLE0, bad, check())
        assert err.value.check == "trust.malformed"
    for data in (
        codec.encode({"v": 2, "links": []}),
        codec.encode({"v": 1, "links": []}),
        codec.encode({"v": 1, "links": [{"bundle": b"x"}]}),
    ):
        with pytest.raises(ProtocolError) as err:
            trust.TrustChain.decode(data)
        assert err.value.check == "trust.malformed"


def test_subject_is_read_back() -> None:
    data = BUNDLE0.encode()
    assert trust.read_subject(trust.subject(data)) == BUNDLE0
    for other in (
        codec.encode(["keyfleet release v1", data]),
        codec.encode([trust.SUBJECT_LABEL, b"junk"]),
        codec.encode([trust.SUBJECT_LABEL, 0, data]),
    ):
        with pytest.raises(ProtocolError) as err:
            trust.read_subject(other)
        assert err.value.check == "trust.approval"


def test_a_device_enrolled_after_a_rollover_starts_from_the_bundle_of_its_key() -> None:
    b1, l1 = rollover(BUNDLE0, NEW.public_key(), OLD, until=T0 + 100)
    b2, l2 = rollover(b1, NEWER.public_key(), NEW, until=T0 + 200)
    enrolled_with_new = trust.TrustBundle.initial(NEW.public_key())
    assert trust.advance(enrolled_with_new, trust.TrustChain((l1, l2)), check()) == b2
    assert trust.advance(enrolled_with_new, trust.TrustChain((l1,)), check()) == b1
    # the bundle it starts from must carry the operators' approval
    forged = trust.TrustLink(l1.bundle, rotate_authz(b1.encode(), approvers=("op-alice",)))
    with pytest.raises(ProtocolError) as err:
        trust.advance(enrolled_with_new, trust.TrustChain((forged, l2)), check())
    assert err.value.check == "trust.approval"


@pytest.mark.parametrize(
    ("section", "entries", "where"),
    [
        ("service", [{"cert": b"k", "until": None}], "trust bundle.service"),  # a CA's field
        ("service", [{"key": b"", "until": None}], "trust bundle.service[0].key"),
        ("service", [{"key": b"k" * 257, "until": None}], "trust bundle.service[0].key"),
        ("service", [{"key": b"k", "until": -1}], "trust bundle.service[0].until"),
        ("service", [{"key": b"k", "until": "x"}], "trust bundle.service[0].until"),
        ("service", [{"key": b"k", "until": i} for i in range(5)], "trust bundle.service"),
        ("device_ca", [{"key": b"c", "until": None}], "trust bundle.device_ca"),
        ("device_ca", [{"cert": b"c" * 1025, "until": None}], "trust bundle.device_ca[0].cert"),
        ("device_ca", [{"cert": b"c", "until": b"x"}], "trust bundle.device_ca[0].until"),
        ("device_ca", [{"cert": b"c", "until": i} for i in range(5)], "trust bundle.device_ca"),
    ],
)
def test_malformed_key_and_ca_lists_are_refused_naming_the_entry(
    section: str, entries: list[dict[str, object]], where: str
) -> None:
    """The service key and CA lists are decoded alike: a map with other fields, a DER empty or
    too long, an end that is not unix seconds, too many entries: refused, naming where."""
    key = {"key": trust.key_der(NEW.public_key()), "until": None}
    obj: dict[str, object] = {"v": 2 if section == "device_ca" else 1, "seq": 1, "service": [key]}
    if section == "device_ca":
        obj["device_ca"] = entries
    else:
        obj["service"] = entries
    with pytest.raises(ProtocolError) as err:
        trust.TrustBundle.decode(codec.encode(obj))
    assert err.value.check == "trust.malformed"
    assert where in err.value.reason
