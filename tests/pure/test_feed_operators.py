"""Removed operators in the revocation feed (agent.protocol.feed, AuthzVerifier's ``removed``):
an ``operator.remove`` entry, approved by a quorum of admins, makes a device stop counting the
removed certificate's approvals of requests dated at or after the removal (``operator.removed``),
while other operators' approvals and approvals of older requests still count; a removal entry
the quorum did not approve is refused (``revocation.authz``) with nothing changed. Real operator
CA (``tests.operator_certs``), software keys."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocol import authz as az
from agent.protocol.errors import ProtocolError
from agent.protocol.feed import GENESIS, FeedEntry, FeedState, entry_hash, page
from agent.protocol.membership import Membership
from agent.protocol.operatorsubject import OperatorSubject
from tests.operator_certs import membership, operator, operator_ca

pytestmark = pytest.mark.pure

T0 = 1_700_000_000
REMOVED_AT = T0 + 1000
ADMINS = ("op-root", "op-dora")


def cert_hash(name: str) -> bytes:
    return hashlib.sha256(operator(name)[1].public_bytes(serialization.Encoding.DER)).digest()


def signed(
    op: str,
    approvers: Sequence[str],
    *,
    nbf: int,
    subject: bytes | None = None,
    members: tuple[az.Member, ...] = (),
    policy: az.QuorumPolicy | None = None,
) -> bytes:
    """An Authorization of ``op`` (fleet-wide) dated ``nbf``, approved by ``approvers``."""
    request = az.Request(
        id=os.urandom(az.REQUEST_ID_SIZE),
        op=op,
        group=None,
        members=members,
        policy=None if policy is None else policy.encode(),
        nbf=nbf,
        exp=nbf + 3600,
        by=approvers[0],
        subject=subject,
    ).encode()
    approvals = tuple(az.sign_approval(request, *operator(name)) for name in approvers)
    return az.Authorization(request, approvals).encode()


def removal(name: str, approvers: Sequence[str] = ADMINS, *, nbf: int = T0) -> bytes:
    subject = OperatorSubject(az.OP_OPERATOR_REMOVE, name, cert_hash(name)).encode()
    return signed(az.OP_OPERATOR_REMOVE, approvers, nbf=nbf, subject=subject)


def release(approvers: Sequence[str], *, nbf: int) -> bytes:
    return signed(az.OP_RELEASE_APPROVE, approvers, nbf=nbf, subject=b"release 1.2.3")


def revoke(device: str, approvers: Sequence[str], *, nbf: int) -> bytes:
    member = az.Member(device, hashlib.sha256(device.encode()).digest())
    return signed(az.OP_DEVICE_REVOKE, approvers, nbf=nbf, members=(member,))


def entries(*authzs: tuple[bytes, int], start: tuple[int, bytes] = (0, GENESIS)) -> list[bytes]:
    """Chained entries of ``(authorization, time)`` after ``start``."""
    seq, head = start
    out = []
    for signed_authz, at in authzs:
        entry = FeedEntry.after(seq, head, time=at, authz=signed_authz).encode()
        out.append(entry)
        seq, head = seq + 1, entry_hash(entry)
    return out


def with_bob_removed() -> tuple[Membership, list[bytes]]:
    m = membership(min_approvals=2)
    feed = entries((removal("op-bob"), REMOVED_AT))
    assert m.follow_feed(page(feed, time=REMOVED_AT))
    return m, feed


def refused_entry(m: Membership, feed: list[bytes]) -> ProtocolError:
    before = m.revocations
    with pytest.raises(ProtocolError) as info, m.transaction():
        m.follow_feed(page(feed, time=REMOVED_AT))
    assert m.revocations == before  # nothing changed
    assert info.value.check == "revocation.authz", info.value
    return info.value


def test_a_removed_operators_approval_of_a_later_request_is_refused_by_check_id() -> None:
    m, _ = with_bob_removed()
    assert m.revocations.removed_operators() == {cert_hash("op-bob"): REMOVED_AT}
    assert m.revocations.operators == frozenset({(cert_hash("op-bob"), "op-bob", REMOVED_AT)})
    with pytest.raises(ProtocolError) as info:
        m.check_release_approval(release(("op-alice", "op-bob"), nbf=REMOVED_AT + 10))
    assert info.value.check == "operator.removed"
    with pytest.raises(ProtocolError) as info:  # judged at the request's time: the removal's
        m.check_release_approval(release(("op-alice", "op-bob"), nbf=REMOVED_AT))
    assert info.value.check == "operator.removed"
    # the other operators still count, with or without bob beside them
    ok = m.check_release_approval(release(("op-alice", "op-carol"), nbf=REMOVED_AT + 10))
    assert ok.operators == {"op-alice", "op-carol"}
    ok = m.check_release_approval(release(("op-alice", "op-bob", "op-carol"), nbf=REMOVED_AT + 9))
    assert ok.operators == {"op-alice", "op-carol"}
    # a request dated before the removal (executed then) keeps bob's approval
    old = m.check_release_approval(release(("op-alice", "op-bob"), nbf=REMOVED_AT - 1))
    assert old.operators == {"op-alice", "op-bob"}


def test_a_fresh_check_judges_at_now_a_historical_one_at_the_request() -> None:
    verifier = az.AuthzVerifier([operator_ca().certificate])
    before = release(("op-alice", "op-bob"), nbf=REMOVED_AT - 100)
    removed = {cert_hash("op-bob"): REMOVED_AT}
    policy = az.QuorumPolicy.initial(2)

    def verify(
        now: int | None, gone: dict[bytes, int], *, executed: bool = False
    ) -> az.VerifiedAuthorization:
        return verifier.verify(
            before,
            policy=policy,
            now=now,
            op=az.OP_RELEASE_APPROVE,
            group=None,
            removed=gone,
            executed=executed,
        )

    # committing it now, after the removal: bob no longer counts
    with pytest.raises(ProtocolError) as info:
        verify(REMOVED_AT + 1, removed)
    assert info.value.check == "operator.removed"
    # fresh before the removal, or historically (it was dated before): it counts
    assert verify(REMOVED_AT - 1, removed).operators == {"op-alice", "op-bob"}
    assert verify(None, removed).operators == {"op-alice", "op-bob"}
    # a change another device made before the removal (a Welcome's own admission): judged at
    # the request's time, its window still checked at now
    assert verify(REMOVED_AT + 1, removed, executed=True).operators == {"op-alice", "op-bob"}
    later = release(("op-alice", "op-bob"), nbf=REMOVED_AT + 1)
    with pytest.raises(ProtocolError) as info:
        verifier.verify(
            later,
            policy=policy,
            now=REMOVED_AT + 2,
            op=az.OP_RELEASE_APPROVE,
            group=None,
            removed=removed,
            executed=True,
        )
    assert info.value.check == "operator.removed"
    # without the feed's knowledge nothing is refused
    assert verify(REMOVED_AT + 1, {}).operators == {"op-alice", "op-bob"}


def test_later_feed_entries_do_not_count_a_removed_operator() -> None:
    m, feed = with_bob_removed()
    start = (1, entry_hash(feed[0]))
    late = entries((revoke("dev-9", ("op-alice", "op-bob"), nbf=REMOVED_AT + 5), T0), start=start)
    err = refused_entry(m, feed + late)
    assert "operator.removed" in err.reason
    fine = entries((revoke("dev-9", ("op-alice", "op-carol"), nbf=REMOVED_AT + 5), T0), start=start)
    assert m.follow_feed(page(feed + fine, time=REMOVED_AT))
    assert m.revocations.is_revoked("dev-9", hashlib.sha256(b"dev-9").digest())


def test_a_removed_admin_no_longer_moves_the_policy_nor_removes_others() -> None:
    m = membership(min_approvals=2)
    feed = entries((removal("op-dora", ("op-root", "op-dora")), REMOVED_AT))
    assert m.follow_feed(page(feed, time=REMOVED_AT))
    raised = az.QuorumPolicy(serial=1, default={az.ANY: 2})
    later = signed(az.OP_POLICY, ADMINS, nbf=REMOVED_AT + 1, policy=raised)
    with pytest.raises(ProtocolError) as info, m.transaction():
        m.adopt_policies((later,))
    assert info.value.check == "operator.removed" and m.policy.serial == 0
    # nor does she count in a removal of another operator made after hers
    start = (1, entry_hash(feed[0]))
    again = entries((removal("op-bob", nbf=REMOVED_AT + 1), REMOVED_AT + 2), start=start)
    assert "operator.removed" in refused_entry(m, feed + again).reason
    assert cert_hash("op-bob") not in m.revocations.removed_operators()


def _one_admin() -> bytes:
    return removal("op-bob", ("op-root",))


def _operators_not_admins() -> bytes:
    return removal("op-bob", ("op-alice", "op-carol"))


def _swapped_subject() -> bytes:
    """Approved as carol's removal; the request bytes changed afterwards to name bob."""
    parsed = az.Authorization.decode(removal("op-carol"))
    request = az.Request.decode(parsed.request)
    other = OperatorSubject(az.OP_OPERATOR_REMOVE, "op-bob", cert_hash("op-bob")).encode()
    tampered = az.Request(**{**request.__dict__, "subject": other}).encode()
    return az.Authorization(tampered, parsed.approvals).encode()


def _addition() -> bytes:
    """An operator.add approved by the admins: no revocation."""
    subject = OperatorSubject(az.OP_OPERATOR_ADD, "op-bob", cert_hash("op-bob")).encode()
    return signed(az.OP_OPERATOR_ADD, ADMINS, nbf=T0, subject=subject)


def _subject_of_another_op() -> bytes:
    """Approved by the quorum as a removal, but its subject describes a role change."""
    subject = OperatorSubject(az.OP_OPERATOR_ROLE, "op-bob", cert_hash("op-bob"), "viewer")
    return signed(az.OP_OPERATOR_REMOVE, ADMINS, nbf=T0, subject=subject.encode())


@pytest.mark.parametrize(
    ("forged", "why"),
    [
        (_one_admin, "[authz.quorum]"),
        (_operators_not_admins, "[authz.role]"),
        (_swapped_subject, "[authz.signature]"),
        (_addition, "[authz.scope]"),
        (_subject_of_another_op, "the subject names 'operator.role'"),
    ],
)
def test_a_removal_the_quorum_did_not_approve_is_refused_and_changes_nothing(
    forged: Callable[[], bytes], why: str
) -> None:
    m = membership(min_approvals=2)
    err = refused_entry(m, entries((forged(), REMOVED_AT)))
    assert why in err.reason, err
    assert m.revocations == FeedState()
    ok = m.check_release_approval(release(("op-alice", "op-bob"), nbf=REMOVED_AT + 10))
    assert ok.operators == {"op-alice", "op-bob"}  # bob still counts


def test_the_removal_time_stays_within_the_requests_window() -> None:
    far = entries((removal("op-bob", nbf=T0), T0 + 10**9))
    m = membership(min_approvals=2)
    assert m.follow_feed(page(far, time=T0))
    assert m.revocations.removed_operators() == {cert_hash("op-bob"): T0 + 3600}
    early = entries((removal("op-bob", nbf=T0), T0 - 500))
    m = membership(min_approvals=2)
    assert m.follow_feed(page(early, time=T0))
    assert m.revocations.removed_operators() == {cert_hash("op-bob"): T0}


def test_removed_operators_survive_a_restart_and_old_states_read() -> None:
    m, _ = with_bob_removed()
    state = m.to_state()
    again = membership(min_approvals=2)
    again.restore(again.parse_state(state))
    assert again.revocations == m.revocations
    with pytest.raises(ProtocolError):
        again.check_release_approval(release(("op-alice", "op-bob"), nbf=REMOVED_AT + 1))
    # a feed state written before operators were kept has no "operators" key
    old = FeedState(seq=2, head=b"\x01" * 32, time=T0)
    assert "operators" not in old.to_state()
    assert FeedState.parse_state(old.to_state()) == old
    bad = {**m.revocations.to_state(), "operators": [[b"\x00" * 31, "op-bob", 1]]}
    with pytest.raises(ProtocolError):
        FeedState.parse_state(bad)


def test_a_policy_adopted_before_the_device_learned_of_the_removal_stays_after_a_restart() -> None:
    m = membership(min_approvals=2)
    raised = az.QuorumPolicy(serial=1, default={az.ANY: 2})
    m.adopt_policies((signed(az.OP_POLICY, ADMINS, nbf=REMOVED_AT + 1, policy=raised),))
    feed = entries((removal("op-dora", ("op-root", "op-dora")), REMOVED_AT))
    assert m.follow_feed(page(feed, time=REMOVED_AT))
    again = membership(min_approvals=2)
    again.restore(again.parse_state(m.to_state()))
    assert again.policy == raised and again.revocations == m.revocations


_FIELD = st.one_of(
    st.binary(max_size=40), st.text(max_size=70), st.integers(min_value=-2, max_value=1 << 64)
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.lists(st.lists(_FIELD, max_size=4), max_size=3), _FIELD))
def test_kept_removed_operators_decode_strictly(operators: object) -> None:
    """A state's ``operators`` either reads back exactly or is refused (``codec`` ids): never
    half-parsed."""
    state = {**FeedState(seq=1, head=b"\x01" * 32, time=T0).to_state(), "operators": operators}
    try:
        parsed = FeedState.parse_state(state)
    except ProtocolError:
        return
    assert FeedState.parse_state(parsed.to_state()) == parsed
    assert isinstance(operators, list) and len(parsed.operators) <= len(operators)
