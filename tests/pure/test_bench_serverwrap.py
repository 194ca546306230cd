"""The server-wrap baseline of bench/bench_server_wrap.py does the work it is timed for: each
device's message opens, with that device's private key only, to the key the server generated;
a changed message or another device's key does not open it. Also the byte count's MQTT packet
size."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol.errors import KeyfleetError
from agent.protocol.topics import device_cmd_topic
from agent.protocol.wire import cbor, cose
from bench import serverwrap
from bench.bench_server_wrap import publish_bytes

pytestmark = pytest.mark.pure


def _fleet(n: int) -> tuple[list[str], list[ec.EllipticCurvePrivateKey]]:
    ids = [f"dev-{i:04d}" for i in range(n)]
    return ids, [ec.generate_private_key(ec.SECP256R1()) for _ in ids]


def _rekey(
    ids: list[str], keys: list[ec.EllipticCurvePrivateKey], server: ec.EllipticCurvePrivateKey
) -> serverwrap.Rekey:
    recipients = [serverwrap.Recipient(d, k.public_key()) for d, k in zip(ids, keys, strict=True)]
    return serverwrap.rekey("g-bench", 7, recipients, server, seq=1, time=1_800_000_000)


def test_every_device_opens_the_group_key() -> None:
    ids, keys = _fleet(5)
    server = ec.generate_private_key(ec.SECP256R1())
    done = _rekey(ids, keys, server)
    assert len(done.key) == serverwrap.KEY_SIZE
    assert len(done.messages) == len(ids)
    for (topic, message), device_id, key in zip(done.messages, ids, keys, strict=True):
        assert topic == device_cmd_topic(device_id)
        assert done.key not in message  # the key travels sealed only
        opened = serverwrap.open_wrapped(message, device_id, key, server.public_key())
        assert opened == ("g-bench", 7, done.key)
    # each rekey draws a new key
    assert _rekey(ids, keys, server).key != done.key


def test_a_wrapped_key_opens_for_its_device_only() -> None:
    ids, keys = _fleet(2)
    server = ec.generate_private_key(ec.SECP256R1())
    done = _rekey(ids, keys, server)
    message = done.messages[0][1]
    with pytest.raises(KeyfleetError):  # addressed to dev-0000
        serverwrap.open_wrapped(message, ids[1], keys[1], server.public_key())
    with pytest.raises(KeyfleetError):  # the right name, another private key: HPKE fails
        serverwrap.open_wrapped(message, ids[0], keys[1], server.public_key())
    with pytest.raises(KeyfleetError):  # not the key server's signature
        other = ec.generate_private_key(ec.SECP256R1())
        serverwrap.open_wrapped(message, ids[0], keys[0], other.public_key())
    envelope = cbor.decode(cose.decode_sign1(message).payload)
    assert isinstance(envelope, dict) and isinstance(envelope["body"], dict)
    ct = bytearray(envelope["body"]["ct"])
    ct[0] ^= 1
    envelope["body"]["ct"] = bytes(ct)
    forged = cose.sign1(cbor.encode(envelope), server)  # re-signed: the HPKE tag refuses it
    with pytest.raises(KeyfleetError):
        serverwrap.open_wrapped(forged, ids[0], keys[0], server.public_key())


def test_broadcast_carries_every_entry_once() -> None:
    ids, keys = _fleet(3)
    server = ec.generate_private_key(ec.SECP256R1())
    done = _rekey(ids, keys, server)
    one = serverwrap.broadcast(done, server, seq=2, time=1_800_000_000)
    cose.verify_sign1(cose.decode_sign1(one), server.public_key())
    envelope = cbor.decode(cose.decode_sign1(one).payload)
    assert isinstance(envelope, dict) and isinstance(envelope["body"], dict)
    unicast = [cbor.decode(cose.decode_sign1(m).payload) for _, m in done.messages]
    assert envelope["body"]["entries"] == [
        [e["to"], e["body"]["enc"], e["body"]["ct"]]  # type: ignore[index]
        for e in unicast
    ]


def test_publish_packet_size() -> None:
    # fixed header (1) + remaining length (1) + topic (2 + 3) + packet id (2) + properties (1)
    assert publish_bytes("a/b", b"x" * 10) == 1 + 1 + 5 + 2 + 1 + 10
    # 200 bytes remaining need a two-byte remaining length
    assert publish_bytes("a/b", b"x" * 192) == 1 + 2 + 5 + 2 + 1 + 192
