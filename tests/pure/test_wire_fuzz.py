"""Hypothesis: the CBOR, COSE and envelope decoders meet 10,000 malformed inputs each (bit flips,
truncations, insertions, random bytes, huge announced lengths, random CBOR structures, validly
signed hostile payloads) and answer every one with a clean ProtocolError or a correct result.
The strategies are shared with tests/pure/test_wire_fuzz_bodies.py."""

from __future__ import annotations

import random

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.protocol.errors import ProtocolError
from agent.protocol.wire import cbor, cose
from agent.protocol.wire.envelope import Signer, open_message
from tests.pure.test_wire_messages import CMD, SAMPLES

pytestmark = pytest.mark.pure

FUZZ = settings(
    max_examples=10_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

NOW = 1_700_000_000
KEY = ec.derive_private_key(99, ec.SECP256R1())
KID = cose.key_id(KEY.public_key())


def resolver(kid: bytes) -> Signer:
    if kid != KID:
        raise KeyError(kid)
    return Signer("dev-1", KEY.public_key())


EDGE_INTS = [
    0,
    1,
    23,
    24,
    255,
    256,
    65535,
    65536,
    (1 << 32) - 1,
    1 << 32,
    (1 << 64) - 1,
    -1,
    -24,
    -25,
    -256,
    -257,
    -(1 << 64),
]


def random_value(rng: random.Random, depth: int = 0) -> object:
    """A random value of the wire data model (seeded, so Hypothesis draws only one integer:
    ten times cheaper per example than ``st.recursive``)."""
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice(EDGE_INTS)
    if kind == 2:
        return rng.randrange(-(1 << 64), 1 << 64) >> rng.randrange(64)
    if kind == 3:
        return rng.randbytes(rng.randrange(40))
    if kind == 4:
        return "".join(rng.choice("ab\u00e9\u6c34\U00010151-_.0") for _ in range(rng.randrange(12)))
    if kind == 5:
        return rng.choice(["type", "body", "g1", "dev-1", "sha256", "add", "active", ""])
    if kind in (6, 7):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    keys = [
        rng.choice([rng.randrange(-30, 30), random_value(rng, 4)]) for _ in range(rng.randrange(5))
    ]
    return {k: random_value(rng, depth + 1) for k in keys if type(k) in (int, str)}


def cbor_values() -> st.SearchStrategy[object]:
    return st.integers(min_value=0, max_value=(1 << 64) - 1).map(
        lambda seed: random_value(random.Random(seed))
    )


HUGE_HEADS = [
    bytes([0x5B]) + b"\xff" * 8,
    bytes([0x7B]) + b"\x7f" + b"\xff" * 7,
    bytes([0x9B]) + b"\xff" * 8,
    bytes([0xBB]) + b"\xff" * 8,
    bytes([0x5A]) + b"\xff" * 4,
    bytes([0x9A]) + b"\x7f\xff\xff\xff",
    bytes([0xBA]) + b"\x7f\xff\xff\xff",
    bytes([0x1B]) + b"\xff" * 8,
    bytes([0xDB]) + b"\xff" * 8,
    b"\x9f" * 20,
    b"\x81" * 40,
]
MUTATIONS = ("flip", "flips", "truncate", "insert", "huge", "set", "random")


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One malformation of a valid encoding."""
    out = bytearray(data)
    kind = rng.choice(MUTATIONS)
    if kind == "random" or not out:
        return rng.randbytes(rng.randrange(300))
    index = rng.randrange(len(out))
    if kind == "flip":
        out[index] ^= 1 << rng.randrange(8)
    elif kind == "flips":
        for _ in range(rng.randrange(2, 9)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del out[index:]
    elif kind == "insert":
        out[index:index] = rng.randbytes(rng.randrange(1, 10))
    elif kind == "huge":
        head = rng.choice(HUGE_HEADS)
        out[index : index + rng.randrange(len(head) + 1)] = head
    else:
        out[index] = rng.randrange(256)
    return bytes(out)


def mutated(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda seed, n: mutate(seed, random.Random(n)),
        st.sampled_from(seeds),
        st.integers(min_value=0, max_value=(1 << 64) - 1),
    )


CBOR_SEEDS = [cbor.encode(body.to_cbor_map()) for body in SAMPLES] + [
    cbor.encode([1, -1, b"x", "y", None, True, {"a": {1: [2]}}]),
    cbor.encode({"k": 1 << 63, -5: ""}),
]


@FUZZ
@given(
    st.one_of(
        mutated(CBOR_SEEDS),
        st.builds(
            lambda value, n: mutate(cbor.encode(value), random.Random(n)),
            cbor_values(),
            st.integers(min_value=0, max_value=(1 << 64) - 1),
        ),
        st.binary(max_size=64),
    )
)
def test_cbor_decoder_survives(data: bytes) -> None:
    try:
        value = cbor.decode(data)
    except ProtocolError as err:
        assert err.check.startswith("cbor.")
        return
    assert cbor.encode(value) == data


@settings(max_examples=2_000, deadline=None)
@given(cbor_values())
def test_cbor_encode_decode_round_trip(value: object) -> None:
    data = cbor.encode(value)
    assert cbor.encode(cbor.decode(data)) == data


COSE_SEEDS = [cose.sign1(seed, KEY) for seed in CBOR_SEEDS[:6]]


@FUZZ
@given(
    st.one_of(
        mutated(COSE_SEEDS),
        cbor_values().map(lambda v: b"\xd2" + cbor.encode(v)),
        st.lists(cbor_values(), min_size=4, max_size=4).map(lambda v: b"\xd2" + cbor.encode(v)),
    )
)
def test_cose_decoder_and_verifier_survive(data: bytes) -> None:
    try:
        message = cose.decode_sign1(data)
        cose.verify_sign1(message, KEY.public_key())
    except ProtocolError:
        return
    # Only an unchanged signed content can verify.
    assert any(message.to_be_signed() == cose.decode_sign1(s).to_be_signed() for s in COSE_SEEDS)


def envelope_of(body: object, seq: int = 1) -> dict[str, object]:
    return {
        "type": "op.rekey",
        "version": 1,
        "sender": "dev-1",
        "to": "service",
        "seq": seq,
        "time": NOW,
        "body": body,
    }


MESSAGE_SEEDS = [
    cose.sign1(cbor.encode({**envelope_of(body.to_cbor_map()), "type": body.TYPE}), KEY)
    for body in SAMPLES
]
ENVELOPE_KEYS = ["type", "version", "sender", "to", "seq", "time", "body", "extra"]


def hostile_payload(rng: random.Random) -> bytes:
    """A validly signed message whose payload is a random or half-right envelope: this is what a
    compromised but registered device could send."""
    base: dict[str, object] = dict(envelope_of({"command_id": CMD, "group_id": "g1"}))
    base["type"] = rng.choice([b.TYPE for b in SAMPLES] + ["nope"])
    if rng.randrange(2):
        base["body"] = rng.choice(SAMPLES).to_cbor_map()
    for _ in range(rng.randrange(4)):
        name = rng.choice(ENVELOPE_KEYS)
        if rng.randrange(2):
            base[name] = random_value(rng)
        else:
            base.pop(name, None)
    payload: object = base if rng.randrange(10) else random_value(rng)
    return cose.sign1(cbor.encode(payload), KEY)


def fuzzed_message(n: int) -> bytes:
    rng = random.Random(n)
    if rng.randrange(2):
        return hostile_payload(rng)
    return mutate(rng.choice(MESSAGE_SEEDS), rng)


@FUZZ
@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_envelope_decoder_survives(n: int) -> None:
    data = fuzzed_message(n)
    try:
        message = open_message(data, resolver, now=NOW, recipients={"service"})
    except ProtocolError:
        return
    assert message.sender == "dev-1"
    assert message.body.to_cbor_map() is not None


def test_the_message_fuzzer_reaches_every_stage() -> None:
    # A fixed sweep (not a fuzz run) proving the generator gets past each stage to the next.
    checks: set[str] = set()
    accepted = 0
    for n in range(3000):
        try:
            open_message(fuzzed_message(n), resolver, now=NOW, recipients={"service"})
            accepted += 1
        except ProtocolError as err:
            checks.add(err.check.split(".")[0])
    assert {"cbor", "cose", "envelope", "body"} <= checks
    assert accepted > 0
