"""Envelope and staged decoding: signed round trips of every family, sender binding, freshness,
addressee, oversize refused before decoding, and the replay guard's rules with no state change on
any refusal."""

from __future__ import annotations

import copy

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol.errors import ProtocolError, StateError
from agent.protocol.wire import cbor, cose, envelope
from agent.protocol.wire.envelope import (
    DecodedMessage,
    RawMessage,
    Signer,
    VerifiedMessage,
    decode_message,
    encode_message,
    open_message,
    verify_message,
)
from agent.protocol.wire.messages.ack import Ack
from agent.protocol.wire.messages.base import Body
from agent.protocol.wire.messages.group import CommitMessage, WelcomeMessage
from agent.protocol.wire.messages.operator import Rekey
from agent.protocol.wire.rejections import BENIGN_CHECKS, Rejections, is_benign
from agent.protocol.wire.replay import ReplayGuard
from tests.pure.test_wire_messages import CMD, SAMPLES

pytestmark = pytest.mark.pure

NOW = 1_700_000_000
DEV1 = ec.derive_private_key(11, ec.SECP256R1())
DEV2 = ec.derive_private_key(22, ec.SECP256R1())
SERVICE = ec.derive_private_key(33, ec.SECP256R1())
STRANGER = ec.derive_private_key(44, ec.SECP256R1())


class FakeKeyRegistry:
    """kid -> Signer for the keys a receiver trusts (stands in for the service's registry)."""

    def __init__(self, keys: dict[str, ec.EllipticCurvePrivateKey]) -> None:
        self.by_kid = {
            cose.key_id(k.public_key()): Signer(name, k.public_key()) for name, k in keys.items()
        }

    def __call__(self, kid: bytes) -> Signer:
        return self.by_kid[kid]  # KeyError for unknown kids, as a dict-backed registry would


RESOLVER = FakeKeyRegistry({"dev-1": DEV1, "dev-2": DEV2, "service": SERVICE})


def seal(
    body: Body,
    *,
    key: ec.EllipticCurvePrivateKey = DEV1,
    sender: str = "dev-1",
    to: str = "service",
    seq: int = 1,
    time: int = NOW,
) -> bytes:
    return encode_message(body, key=key, sender=sender, to=to, seq=seq, time=time)


def open_(data: bytes, **kwargs: object) -> VerifiedMessage:
    options: dict[str, object] = {"now": NOW, "recipients": {"service", "g1"}}
    options.update(kwargs)
    return open_message(data, RESOLVER, **options)  # type: ignore[arg-type]


def refused(data: bytes, check: str, **kwargs: object) -> None:
    with pytest.raises(ProtocolError) as err:
        open_(data, **kwargs)
    assert err.value.check == check


@pytest.mark.parametrize("body", SAMPLES, ids=lambda b: type(b).__name__)
def test_every_family_round_trips_signed(body: Body) -> None:
    data = seal(body, seq=9)
    raw = RawMessage.from_bytes(data)
    decoded = decode_message(raw)
    assert isinstance(decoded, DecodedMessage)
    assert (decoded.type, decoded.sender, decoded.to, decoded.seq) == (
        body.TYPE,
        "dev-1",
        "service",
        9,
    )
    verified = verify_message(decoded, RESOLVER, now=NOW, recipients={"service"})
    assert verified.body == body
    assert verified.kid == cose.key_id(DEV1.public_key())
    assert verified.message_id == decoded.message_id
    assert seal(body, seq=9) != data  # ECDSA is randomized, ...
    assert open_(seal(body, seq=9)).message_id == verified.message_id  # ... the id is not


def test_payload_is_the_deterministic_envelope() -> None:
    data = seal(Rekey(command_id=CMD, group_id="g1"), seq=3)
    payload = cose.decode_sign1(data).payload
    assert cbor.decode(payload) == {
        "type": "op.rekey",
        "version": 1,
        "sender": "dev-1",
        "to": "service",
        "seq": 3,
        "time": NOW,
        "body": {"command_id": CMD, "group_id": "g1"},
    }


def test_verified_message_cannot_be_made_by_hand() -> None:
    with pytest.raises(ProtocolError) as err:
        VerifiedMessage(
            type="op.rekey",
            sender="dev-1",
            to="service",
            seq=1,
            time=NOW,
            kid=b"",
            message_id=b"",
            body=Rekey(command_id=CMD, group_id="g1"),
        )
    assert err.value.check == "envelope.unverified"


def test_unknown_signer() -> None:
    refused(seal(SAMPLES[0], key=STRANGER), "cose.kid-unknown")


def test_known_key_claiming_another_sender() -> None:
    # dev-2 signs with its own key but claims to be dev-1: the kid belongs to dev-2.
    refused(seal(SAMPLES[0], key=DEV2, sender="dev-1"), "envelope.sender-mismatch")


def test_resolver_returning_a_key_that_does_not_match_the_kid() -> None:
    def lying_resolver(kid: bytes) -> Signer:
        return Signer("dev-1", DEV2.public_key())

    data = seal(SAMPLES[0])
    with pytest.raises(ProtocolError) as err:
        open_message(data, lying_resolver, now=NOW, recipients={"service"})
    assert err.value.check == "cose.kid-mismatch"


def test_resolver_returning_garbage() -> None:
    with pytest.raises(ProtocolError) as err:
        open_message(seal(SAMPLES[0]), lambda kid: None, now=NOW, recipients={"service"})  # type: ignore[arg-type,return-value]
    assert err.value.check == "cose.kid-unknown"


def test_flipped_bits_anywhere_are_refused() -> None:
    data = seal(CommitMessage(group_id="g1", epoch=1, commit=b"c"))
    checks = set()
    for index in range(len(data)):
        for bit in range(8):
            mutated = bytearray(data)
            mutated[index] ^= 1 << bit
            with pytest.raises(ProtocolError) as err:
                open_(bytes(mutated))
            checks.add(err.value.check)
    assert "cose.signature" in checks
    assert "cose.kid-unknown" in checks


def test_freshness() -> None:
    body = SAMPLES[0]
    open_(seal(body, time=NOW - 300))
    open_(seal(body, time=NOW + 60))
    refused(seal(body, time=NOW - 301), "envelope.stale")
    refused(seal(body, time=NOW + 61), "envelope.future")
    # A device catching up on queued commands may allow older ones.
    open_(seal(body, time=NOW - 86_400), max_age=7 * 86_400)


def test_addressee() -> None:
    refused(seal(SAMPLES[0], to="dev-2"), "envelope.recipient")
    open_(seal(SAMPLES[0], to="dev-2"), recipients={"dev-2"})


def test_oversize_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_run(*args: object, **kwargs: object) -> object:
        raise AssertionError("decoded an oversize frame")

    monkeypatch.setattr(cose, "decode_sign1", must_not_run)
    monkeypatch.setattr(cbor, "decode", must_not_run)
    monkeypatch.setattr(cbor, "scan", must_not_run)
    monkeypatch.setattr(cbor.cbor2, "loads", must_not_run)
    data = seal(SAMPLES[0])
    refused(data, "wire.oversize", max_size=len(data) - 1)
    with pytest.raises(ProtocolError) as err:
        RawMessage.from_bytes(b"\x00" * (envelope.LARGEST_MESSAGE_SIZE + 1))
    assert err.value.check == "wire.oversize"


def test_only_welcomes_may_pass_the_default_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    big = b"\x01" * (envelope.DEFAULT_MAX_MESSAGE_SIZE + 1)
    welcome = WelcomeMessage("grp-1", 3, big * 4, ("dev-2",))  # a Welcome of 1 MiB
    assert open_(seal(welcome)).body == welcome
    commit = CommitMessage("grp-1", 3, big)
    data = seal(commit)

    def must_not_run(*args: object, **kwargs: object) -> object:
        raise AssertionError("parsed the body of an oversize message")

    monkeypatch.setattr(CommitMessage, "from_cbor_map", must_not_run)
    refused(data, "wire.oversize")
    assert envelope.LARGEST_MESSAGE_SIZE == WelcomeMessage.MAX_MESSAGE_SIZE == 4 << 20


def forge_payload(payload: object, key: ec.EllipticCurvePrivateKey = DEV1) -> bytes:
    """A correctly signed message around an arbitrary payload (a buggy or hostile sender)."""
    return cose.sign1(cbor.encode(payload), key)


GOOD = {
    "type": "op.rekey",
    "version": 1,
    "sender": "dev-1",
    "to": "service",
    "seq": 1,
    "time": NOW,
    "body": {"command_id": CMD, "group_id": "g1"},
}


@pytest.mark.parametrize(
    ("change", "check"),
    [
        ({"type": "op.nope"}, "envelope.type"),
        ({"type": 1}, "envelope.malformed"),
        ({"version": 2}, "envelope.version"),
        ({"version": True}, "envelope.malformed"),
        ({"sender": "dev/1"}, "envelope.malformed"),
        ({"sender": b"dev-1"}, "envelope.malformed"),
        ({"to": ""}, "envelope.malformed"),
        ({"seq": -1}, "envelope.malformed"),
        ({"seq": "1"}, "envelope.malformed"),
        ({"time": None}, "envelope.malformed"),
        ({"body": []}, "envelope.malformed"),
        ({"extra": 1}, "envelope.malformed"),
        ({"body": {"command_id": CMD}}, "body.malformed"),
        ({"body": {"command_id": CMD, "group_id": "g1", "x": 1}}, "body.malformed"),
        ({"body": {"command_id": "abc", "group_id": "g1"}}, "body.type"),
    ],
)
def test_envelope_field_checks(change: dict[str, object], check: str) -> None:
    refused(forge_payload({**GOOD, **change}), check)


def test_missing_envelope_field() -> None:
    for name in GOOD:
        payload = {k: v for k, v in GOOD.items() if k != name}
        refused(forge_payload(payload), "envelope.malformed")


def test_payload_not_a_map_or_not_cbor() -> None:
    refused(forge_payload([1, 2]), "envelope.malformed")
    refused(cose.sign1(b"\xff", DEV1), "cbor.type")
    refused(cose.sign1(b"\x18\x01", DEV1), "cbor.noncanonical")


def test_body_is_typed_only_after_the_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    # A forged message with a malformed body is refused for its signature, not its body.
    data = bytearray(forge_payload({**GOOD, "body": {"bad": 1}}))
    data[-1] ^= 1
    refused(bytes(data), "cose.signature")


def test_enrollment_proof_of_possession_flow() -> None:
    from tests.pure.test_wire_messages import SAMPLES as bodies

    request = bodies[0]
    fresh = ec.generate_private_key(ec.SECP256R1())
    data = encode_message(request, key=fresh, sender="sn-0001", to="service", seq=0, time=NOW)
    decoded = decode_message(RawMessage.from_bytes(data))
    with pytest.raises(ProtocolError) as err:
        verify_message(decoded, RESOLVER, now=NOW, recipients={"service"})
    assert err.value.check == "cose.kid-unknown"
    # The service reads the claimed key from the untrusted body, then verifies with it.
    untrusted = type(request).from_cbor_map(decoded.untrusted_body)
    assert untrusted == request

    def one_key(kid: bytes) -> Signer:
        if kid != cose.key_id(fresh.public_key()):
            raise KeyError(kid)
        return Signer("sn-0001", fresh.public_key())

    assert verify_message(decoded, one_key, now=NOW, recipients={"service"}).body == request


# -- replay guard -----------------------------------------------------------------------------


def commit(
    seq: int, epoch: int, sender: str = "dev-1", commit_bytes: bytes = b"c"
) -> VerifiedMessage:
    key = {"dev-1": DEV1, "dev-2": DEV2}[sender]
    body = CommitMessage(group_id="g1", epoch=epoch, commit=commit_bytes)
    return open_(seal(body, key=key, sender=sender, to="g1", seq=seq))


def snapshot(guard: ReplayGuard) -> bytes:
    return cbor.encode(guard.to_cbor_map())


def refused_by_guard(guard: ReplayGuard, message: VerifiedMessage, check: str) -> None:
    before = snapshot(guard)
    with pytest.raises(ProtocolError) as err:
        guard.check(message)
    assert err.value.check == check
    with pytest.raises(ProtocolError) as err:
        guard.accept(message)
    assert err.value.check == check
    assert snapshot(guard) == before


def test_duplicate_is_benign_replay() -> None:
    guard = ReplayGuard()
    first = commit(5, 0)
    guard.accept(first)
    redelivered = open_(seal(first.body, to="g1", seq=5))  # same content, new ECDSA signature
    refused_by_guard(guard, redelivered, "replay.duplicate")
    rejections = Rejections()
    with pytest.raises(ProtocolError) as err:
        guard.accept(redelivered)
    rejections.record(err.value)
    assert is_benign(err.value)
    assert rejections.count("replay.duplicate") == 1
    assert rejections.total == 1
    assert rejections.suspicious == 0


def test_same_seq_other_content_is_not_benign() -> None:
    guard = ReplayGuard()
    guard.accept(commit(5, 0))
    other = commit(5, 0, commit_bytes=b"different")
    refused_by_guard(guard, other, "replay.seq-reused")
    assert "replay.seq-reused" not in BENIGN_CHECKS


def test_old_seq_and_window() -> None:
    guard = ReplayGuard(window=4)
    guard.accept(commit(10, 0))
    guard.accept(commit(8, 0))  # out of order, inside the window: accepted
    refused_by_guard(guard, commit(6, 0), "replay.seq-old")  # 10 - 4 = 6: outside
    guard.accept(commit(7, 0))
    guard.accept(commit(11, 0))
    refused_by_guard(guard, commit(7, 0), "replay.seq-old")
    refused_by_guard(guard, commit(8, 0), "replay.duplicate")
    assert guard.highest_seq("dev-1") == 11
    # Sequence numbers are per sender.
    guard.accept(commit(1, 0, sender="dev-2"))


def test_strictly_increasing_with_window_one() -> None:
    guard = ReplayGuard(window=1)
    guard.accept(commit(3, 0))
    refused_by_guard(guard, commit(2, 0), "replay.seq-old")
    guard.accept(commit(4, 0))


def test_epoch_rollback_and_future() -> None:
    guard = ReplayGuard()
    guard.accept(commit(1, 5))
    assert guard.epoch("g1") == 5
    guard.advance_epoch("g1", 6)
    refused_by_guard(guard, commit(2, 5), "replay.epoch-old")
    refused_by_guard(guard, commit(3, 8), "replay.epoch-future")
    guard.accept(commit(4, 7))  # current + 1 is allowed (the receiver may lag one commit)
    assert guard.epoch("g1") == 7
    before = snapshot(guard)
    with pytest.raises(ProtocolError) as err:
        guard.advance_epoch("g1", 6)
    assert err.value.check == "replay.epoch-old"
    assert snapshot(guard) == before
    guard.forget_group("g1")
    guard.accept(commit(5, 2))  # re-joined: any epoch


def test_epoch_checks_apply_to_every_group_message() -> None:
    guard = ReplayGuard()
    guard.advance_epoch("g1", 10)
    old_ack = open_(seal(Ack(group_id="g1", epoch=9, epoch_authenticator=bytes(32)), seq=1))
    refused_by_guard(guard, old_ack, "replay.epoch-old")
    welcome = WelcomeMessage(group_id="g1", epoch=3, welcome=b"w", new_members=("dev-9",))
    refused_by_guard(guard, open_(seal(welcome, seq=2)), "replay.epoch-old")
    guard.accept(open_(seal(Rekey(command_id=CMD, group_id="g1"), seq=3)))  # no epoch


def state_refused(state: dict[str, object], mutate: object) -> None:
    """``ReplayGuard.from_cbor_map`` refuses a copy of ``state`` changed by ``mutate``."""
    bad = copy.deepcopy(state)
    assert callable(mutate)
    mutate(bad)
    with pytest.raises(StateError):
        ReplayGuard.from_cbor_map(bad)


def test_guard_state_round_trips_and_is_strict() -> None:
    guard = ReplayGuard(window=8)
    for seq in (1, 3, 2, 9):
        guard.accept(commit(seq, 1))
    guard.accept(commit(1, 1, sender="dev-2"))
    state = guard.to_cbor_map()
    again = ReplayGuard.from_cbor_map(cbor.decode(cbor.encode(state)))
    assert cbor.encode(again.to_cbor_map()) == cbor.encode(state)
    refused_by_guard(again, commit(9, 1), "replay.duplicate")
    refused_by_guard(again, commit(1, 1), "replay.seq-old")

    def broken(mutate: object) -> None:
        state_refused(state, mutate)

    broken(lambda s: s.update(v=3))
    broken(lambda s: s.update(window=0))
    broken(lambda s: s.update(extra=1))
    broken(lambda s: s["senders"]["dev-1"].update(highest=-1))
    broken(lambda s: s["senders"]["dev-1"]["recent"].append([0, bytes(32)]))
    broken(lambda s: s["senders"]["dev-1"]["recent"].append([9, bytes(32)]))
    broken(lambda s: s["senders"]["dev-1"]["recent"][0].__setitem__(1, b"short"))
    broken(lambda s: s["epochs"].update({"g/1": 1}))
    broken(lambda s: s["epochs"].update(g2=True))
    with pytest.raises(StateError):
        ReplayGuard.from_cbor_map([])
