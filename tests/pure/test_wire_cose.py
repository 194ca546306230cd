"""COSE_Sign1 ES256 profile: sign/verify, the exact bytes, and every forgery refused by id."""

from __future__ import annotations

import hashlib
from typing import Any, NoReturn

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from agent.protocol.errors import CryptoError, ProtocolError
from agent.protocol.wire import cbor, cose

pytestmark = pytest.mark.pure

P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
KEY = ec.derive_private_key(0x1234567, ec.SECP256R1())
OTHER = ec.derive_private_key(0x7654321, ec.SECP256R1())
PAYLOAD = cbor.encode({"type": "x", "n": 1})


class FakeResidentKey(ec.EllipticCurvePrivateKey):
    """Stands in for a key that lives in a TPM: its public key and curve can be read, its
    private value never leaves (a subclass allows the one operation it is for)."""

    misuse = "a TPM-resident key cannot be used for this"

    def __init__(self, inner: ec.EllipticCurvePrivateKey) -> None:
        self._inner = inner

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._inner.public_key()

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._inner.curve

    @property
    def key_size(self) -> int:
        return self._inner.key_size

    def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise AssertionError(self.misuse)

    private_numbers = _refuse
    private_bytes = _refuse
    __copy__ = _refuse
    __deepcopy__ = _refuse


class FakeTpmKey(FakeResidentKey):
    """Behaves like a TPM-resident key: it can sign and give its public key, nothing else."""

    misuse = "COSE signing must only call sign()"

    def __init__(self, inner: ec.EllipticCurvePrivateKey) -> None:
        super().__init__(inner)
        self.sign_calls = 0

    def sign(
        self,
        data: Any,
        signature_algorithm: ec.EllipticCurveSignatureAlgorithm,
    ) -> bytes:
        self.sign_calls += 1
        return self._inner.sign(data, signature_algorithm)

    exchange = FakeResidentKey._refuse


def parse(data: bytes) -> cose.Sign1:
    return cose.decode_sign1(data)


def test_key_id_is_sha256_of_spki() -> None:
    spki = KEY.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert cose.key_id(KEY.public_key()) == hashlib.sha256(spki).digest()
    assert len(cose.key_id(KEY.public_key())) == cose.KID_SIZE == 32


def test_sign_verify_round_trip_and_exact_layout() -> None:
    data = cose.sign1(PAYLOAD, KEY)
    kid = cose.key_id(KEY.public_key())
    protected = bytes.fromhex("a2012604") + b"\x58\x20" + kid
    assert data.startswith(b"\xd2\x84\x58" + bytes([len(protected)]) + protected + b"\xa0")
    message = parse(data)
    assert message.protected == protected
    assert message.kid == kid
    assert message.payload == PAYLOAD
    assert len(message.signature) == 64
    cose.verify_sign1(message, KEY.public_key())


def test_signature_is_raw_r_s_over_the_rfc9052_sig_structure() -> None:
    message = parse(cose.sign1(PAYLOAD, KEY, external_aad=b"aad"))
    tbs = cbor.encode(["Signature1", message.protected, b"aad", PAYLOAD])
    assert tbs.startswith(bytes.fromhex("846a5369676e617475726531"))  # [ "Signature1", ...
    r = int.from_bytes(message.signature[:32], "big")
    s = int.from_bytes(message.signature[32:], "big")
    KEY.public_key().verify(encode_dss_signature(r, s), tbs, ec.ECDSA(hashes.SHA256()))
    cose.verify_sign1(message, KEY.public_key(), external_aad=b"aad")
    with pytest.raises(CryptoError) as err:
        cose.verify_sign1(message, KEY.public_key(), external_aad=b"other")
    assert err.value.check == "cose.signature"


def test_a_key_that_can_only_sign_is_enough() -> None:
    tpm_like = FakeTpmKey(KEY)
    message = parse(cose.sign1(PAYLOAD, tpm_like))
    assert tpm_like.sign_calls == 1
    cose.verify_sign1(message, KEY.public_key())


def test_wrong_key_is_refused_by_kid() -> None:
    message = parse(cose.sign1(PAYLOAD, KEY))
    with pytest.raises(CryptoError) as err:
        cose.verify_sign1(message, OTHER.public_key())
    assert err.value.check == "cose.kid-mismatch"


def test_kid_of_another_key_with_this_keys_signature_is_refused() -> None:
    # Signature by KEY, kid claiming OTHER: verifying with OTHER fails on the signature.
    other_kid = cose.key_id(OTHER.public_key())
    protected = cose.protected_header(other_kid)
    der = KEY.sign(cose.sig_structure(protected, PAYLOAD), ec.ECDSA(hashes.SHA256()))
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    r, s = decode_dss_signature(der)
    forged = b"\xd2" + cbor.encode(
        [protected, {}, PAYLOAD, r.to_bytes(32, "big") + s.to_bytes(32, "big")]
    )
    with pytest.raises(CryptoError) as err:
        cose.verify_sign1(parse(forged), OTHER.public_key())
    assert err.value.check == "cose.signature"


def flip(data: bytes, index: int, bit: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


def test_every_bit_flip_in_payload_and_signature_is_refused() -> None:
    message = parse(cose.sign1(PAYLOAD, KEY))
    for index in range(len(message.payload)):
        for bit in range(8):
            forged = cose.Sign1(
                message.protected, message.kid, flip(message.payload, index, bit), message.signature
            )
            with pytest.raises(CryptoError) as err:
                cose.verify_sign1(forged, KEY.public_key())
            assert err.value.check == "cose.signature"
    for index in range(64):
        for bit in range(8):
            forged = cose.Sign1(
                message.protected, message.kid, message.payload, flip(message.signature, index, bit)
            )
            with pytest.raises(CryptoError) as err:
                cose.verify_sign1(forged, KEY.public_key())
            assert err.value.check == "cose.signature"


def test_every_bit_flip_of_the_whole_message_is_refused() -> None:
    data = cose.sign1(PAYLOAD, KEY)
    for index in range(len(data)):
        for bit in range(8):
            with pytest.raises(ProtocolError):
                cose.verify_sign1(parse(flip(data, index, bit)), KEY.public_key())


def test_high_s_twin_verifies_but_has_the_same_signed_content() -> None:
    # ECDSA malleability: (r, n - s) verifies too. This is why message ids exclude signatures.
    message = parse(cose.sign1(PAYLOAD, KEY))
    s = int.from_bytes(message.signature[32:], "big")
    twin = cose.Sign1(
        message.protected,
        message.kid,
        message.payload,
        message.signature[:32] + (P256_N - s).to_bytes(32, "big"),
    )
    cose.verify_sign1(twin, KEY.public_key())
    assert twin.to_be_signed() == message.to_be_signed()


def rebuild(
    protected: object = None,
    unprotected: object = None,
    payload: object = PAYLOAD,
    signature: object = bytes(64),
    tag: bytes = b"\xd2",
) -> bytes:
    kid = cose.key_id(KEY.public_key())
    if protected is None:
        protected = cose.protected_header(kid)
    if unprotected is None:
        unprotected = {}
    return tag + cbor.encode([protected, unprotected, payload, signature])


KID = cose.key_id(KEY.public_key())


@pytest.mark.parametrize(
    ("data", "check"),
    [
        (rebuild(tag=b""), "cose.malformed"),
        (rebuild(tag=b"\xd1"), "cose.malformed"),
        (rebuild(tag=b"\xd8\x12"), "cose.malformed"),
        (b"\xd2" + cbor.encode([b"", {}, PAYLOAD]), "cose.malformed"),
        (b"\xd2" + cbor.encode({"a": 1}), "cose.malformed"),
        (rebuild(payload=None), "cose.malformed"),
        (rebuild(payload="text"), "cose.malformed"),
        (rebuild(protected={1: -7}), "cose.malformed"),
        (rebuild(signature=None), "cose.malformed"),
        (rebuild(unprotected={4: KID}), "cose.header"),
        (rebuild(unprotected=[]), "cose.header"),
        (rebuild(protected=cbor.encode({1: -7})), "cose.header"),
        (rebuild(protected=cbor.encode({4: KID})), "cose.header"),
        (rebuild(protected=cbor.encode({1: -7, 4: KID, 2: [1]})), "cose.header"),
        (rebuild(protected=cbor.encode([1, -7])), "cose.header"),
        (rebuild(protected=cbor.encode({1: -7, 4: KID[:16]})), "cose.header"),
        (rebuild(protected=cbor.encode({1: -7, 4: "kid"})), "cose.header"),
        (rebuild(protected=cbor.encode({1: -35, 4: KID})), "cose.alg"),
        (rebuild(protected=cbor.encode({1: "ES256", 4: KID})), "cose.alg"),
        (rebuild(protected=b""), "cbor.truncated"),
        (rebuild(protected=b"\xa2\x04\x58\x20" + KID + b"\x01\x26"), "cbor.noncanonical"),
        (rebuild(signature=bytes(63)), "cose.signature"),
        (rebuild(signature=bytes(72)), "cose.signature"),
        (rebuild() + b"\x00", "cbor.trailing"),
    ],
)
def test_malformed_messages(data: bytes, check: str) -> None:
    with pytest.raises(ProtocolError) as err:
        cose.decode_sign1(data)
    assert err.value.check == check


def test_zero_and_out_of_range_signature_values() -> None:
    message = parse(cose.sign1(PAYLOAD, KEY))
    for signature in (bytes(64), b"\xff" * 64, P256_N.to_bytes(32, "big") * 2):
        forged = cose.Sign1(message.protected, message.kid, message.payload, signature)
        with pytest.raises(CryptoError) as err:
            cose.verify_sign1(forged, KEY.public_key())
        assert err.value.check == "cose.signature"


def test_other_curves_are_refused() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ProtocolError) as err:
        cose.sign1(PAYLOAD, p384)
    assert err.value.check == "cose.alg"
    message = parse(cose.sign1(PAYLOAD, KEY))
    with pytest.raises(ProtocolError) as err:
        cose.verify_sign1(message, p384.public_key())
    assert err.value.check == "cose.alg"


def test_oversize_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_run(*args: object, **kwargs: object) -> object:
        raise AssertionError("decoded oversize input")

    monkeypatch.setattr(cbor, "decode", must_not_run)
    data = cose.sign1(PAYLOAD, KEY)
    with pytest.raises(ProtocolError) as err:
        cose.decode_sign1(data, max_size=len(data) - 1)
    assert err.value.check == "cbor.size"
