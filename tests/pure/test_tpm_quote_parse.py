"""agent.protocol.tpmquote against tpm2-pytss, the decoder it replaces on the attestation path:
for well-formed quotes (built here field by field) and for mutated, truncated and extended
bytes, both accept with the same fields, or both refuse with the same check id. The one
documented difference: clockInfo.safe other than 0 or 1, which only the new decoder refuses.
(tests/tpm/test_tpm_quote_parse.py does the same on real swtpm quotes.)"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tpm2_pytss.constants import TPM2_ST
from tpm2_pytss.types import TPMS_ATTEST

from agent.protocol.errors import ProtocolError
from agent.protocol.tpmquote import MAX_ATTEST_SIZE, TPM_GENERATED_VALUE, parse_quote

pytestmark = pytest.mark.pure

FUZZ = settings(
    max_examples=3_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

Outcome = tuple[str, Any]


def reference(attest: bytes) -> Outcome:
    """What ``agent.protocol.attest.parse_attest`` (tpm2-pytss) and the type check decide."""
    if not 0 < len(attest) <= MAX_ATTEST_SIZE:
        return ("refused", "tpm.attest.parse")
    try:
        parsed, consumed = TPMS_ATTEST.unmarshal(attest)
    except Exception:
        return ("refused", "tpm.attest.parse")
    if consumed != len(attest):
        return ("refused", "tpm.attest.parse")
    if parsed.magic != TPM_GENERATED_VALUE:
        return ("refused", "tpm.attest.magic")
    if parsed.type != TPM2_ST.ATTEST_QUOTE:
        return ("refused", "tpm.attest.type")
    quote = parsed.attested.quote
    selections = tuple(
        (
            int(quote.pcrSelect.pcrSelections[i].hash),
            bytes(quote.pcrSelect.pcrSelections[i].pcrSelect)[
                : quote.pcrSelect.pcrSelections[i].sizeofSelect
            ],
        )
        for i in range(quote.pcrSelect.count)
    )
    clock = parsed.clockInfo
    return (
        "ok",
        (
            bytes(parsed.qualifiedSigner),
            bytes(parsed.extraData),
            int(clock.clock),
            int(clock.resetCount),
            int(clock.restartCount),
            int(clock.safe),
            int(parsed.firmwareVersion),
            selections,
            bytes(quote.pcrDigest),
        ),
    )


def unsafe(attest: bytes) -> bool:
    """tpm2-pytss decodes ``attest`` whole and its clockInfo.safe is neither 0 nor 1."""
    try:
        parsed, consumed = TPMS_ATTEST.unmarshal(attest)
    except Exception:
        return False
    return consumed == len(attest) and int(parsed.clockInfo.safe) > 1


def decoded(attest: bytes) -> Outcome:
    try:
        q = parse_quote(attest)
    except ProtocolError as exc:
        return ("refused", exc.check)
    return (
        "ok",
        (
            q.qualified_signer,
            q.extra_data,
            q.clock,
            q.reset_count,
            q.restart_count,
            q.safe,
            q.firmware_version,
            q.selections,
            q.pcr_digest,
        ),
    )


def assert_same(attest: bytes) -> None:
    """The differential property (module doc)."""
    ours, theirs = decoded(attest), reference(attest)
    if ours == theirs:
        return
    header_type = attest[4:6] if len(attest) >= 6 else b""
    if ours == ("refused", "tpm.attest.parse") and unsafe(attest):
        # the one place the new decoder is stricter: safe is a TPMI_YES_NO
        return
    assert theirs[0] == "refused", (attest.hex(), ours, theirs)
    assert ours[0] == "refused", (attest.hex(), ours, theirs)
    if header_type != struct.pack(">H", TPM2_ST.ATTEST_QUOTE):
        # another attestation type: its body is not decoded, so a body tpm2-pytss refuses
        # is named by the type (or the magic) rather than as a parse failure
        assert ours[1] in {"tpm.attest.parse", "tpm.attest.magic", "tpm.attest.type"}
        return
    raise AssertionError((attest.hex(), ours, theirs))


def sized(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def marshal_quote(
    *,
    magic: int = TPM_GENERATED_VALUE,
    kind: int = TPM2_ST.ATTEST_QUOTE,
    signer: bytes = b"\x00\x0b" + bytes(32),
    extra: bytes = bytes(32),
    clock: tuple[int, int, int, int] = (1, 2, 3, 1),
    firmware: int = 7,
    selections: tuple[tuple[int, bytes], ...] = ((0x000B, b"\x8f\x00\x01"),),
    digest: bytes = bytes(32),
) -> bytes:
    out = struct.pack(">IH", magic, kind) + sized(signer) + sized(extra)
    out += struct.pack(">QIIBQ", *clock, firmware)
    out += struct.pack(">I", len(selections))
    for alg, bitmap in selections:
        out += struct.pack(">HB", alg, len(bitmap)) + bitmap
    return out + sized(digest)


def test_a_well_formed_quote_decodes_to_its_fields() -> None:
    attest = marshal_quote(extra=b"n" * 32, digest=b"d" * 32, clock=(9, 8, 7, 1), firmware=3)
    q = parse_quote(attest)
    assert (q.extra_data, q.pcr_digest, q.clock, q.reset_count, q.restart_count) == (
        b"n" * 32,
        b"d" * 32,
        9,
        8,
        7,
    )
    assert q.selections == ((0x000B, b"\x8f\x00\x01"),)
    assert_same(attest)


@pytest.mark.parametrize(
    ("attest", "check"),
    [
        (b"", "tpm.attest.parse"),
        (marshal_quote() + b"\x00", "tpm.attest.parse"),
        (marshal_quote()[:-1], "tpm.attest.parse"),
        (marshal_quote(magic=0xFF544348), "tpm.attest.magic"),
        (marshal_quote(kind=TPM2_ST.ATTEST_CERTIFY), "tpm.attest.type"),
        (marshal_quote(selections=((0x000B, b"\x01"),) * 17), "tpm.attest.parse"),
        (marshal_quote(selections=((0x000B, b"\x01" * 5),)), "tpm.attest.parse"),
        (marshal_quote(digest=bytes(65)), "tpm.attest.parse"),
        (marshal_quote(extra=bytes(65)), "tpm.attest.parse"),
        (marshal_quote(signer=bytes(69)), "tpm.attest.parse"),
        (marshal_quote(clock=(1, 2, 3, 2)), "tpm.attest.parse"),
        (bytes(MAX_ATTEST_SIZE + 1), "tpm.attest.parse"),
    ],
    ids=[
        "empty",
        "trailing",
        "truncated",
        "magic",
        "certify",
        "17-banks",
        "bitmap-5",
        "digest-65",
        "data-65",
        "name-69",
        "safe-2",
        "oversize",
    ],
)
def test_malformed_quotes_are_refused_by_check_id(attest: bytes, check: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        parse_quote(attest)
    assert refused.value.check == check
    assert_same(attest)


quotes = st.builds(
    marshal_quote,
    magic=st.sampled_from([TPM_GENERATED_VALUE, 0, 0xFF544346]),
    kind=st.sampled_from([TPM2_ST.ATTEST_QUOTE, TPM2_ST.ATTEST_QUOTE, TPM2_ST.ATTEST_CERTIFY]),
    signer=st.binary(max_size=70),
    extra=st.binary(max_size=66),
    clock=st.tuples(
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2),
    ),
    firmware=st.integers(0, 2**64 - 1),
    selections=st.lists(
        st.tuples(st.sampled_from([0x0004, 0x000B, 0x000C]), st.binary(max_size=5)),
        max_size=17,
    ).map(tuple),
    digest=st.binary(max_size=66),
)


@FUZZ
@given(quotes)
def test_built_quotes_decode_as_tpm2_pytss_decodes_them(attest: bytes) -> None:
    assert_same(attest)


@FUZZ
@given(quotes, st.data())
def test_mutated_quotes_decode_as_tpm2_pytss_decodes_them(
    attest: bytes, data: st.DataObject
) -> None:
    """Bytes flipped, cut off or appended: the same verdict as tpm2-pytss."""
    edit = data.draw(st.sampled_from(["flip", "cut", "extend", "splice"]))
    if edit == "flip" and attest:
        at = data.draw(st.integers(0, len(attest) - 1))
        attest = attest[:at] + bytes([data.draw(st.integers(0, 255))]) + attest[at + 1 :]
    elif edit == "cut":
        attest = attest[: data.draw(st.integers(0, len(attest)))]
    elif edit == "extend":
        attest += data.draw(st.binary(min_size=1, max_size=8))
    else:
        at = data.draw(st.integers(0, len(attest)))
        attest = attest[:at] + data.draw(st.binary(max_size=4)) + attest[at:]
    assert_same(attest)
