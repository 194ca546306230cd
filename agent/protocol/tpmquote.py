"""A strict decoder of the one TPM structure the attestation verifier reads from a device: a
TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE (TPM 2.0 Library, Part 2, 10.12.12 and 10.12.8).

The layout, big-endian, nothing optional::

    magic            UINT32   TPM_GENERATED_VALUE
    type             UINT16   TPM_ST_ATTEST_QUOTE
    qualifiedSigner  TPM2B_NAME     UINT16 size <= 68, then size bytes
    extraData        TPM2B_DATA     UINT16 size <= 64, then size bytes
    clockInfo        clock UINT64, resetCount UINT32, restartCount UINT32, safe BYTE (0 or 1)
    firmwareVersion  UINT64
    pcrSelect        TPML_PCR_SELECTION: count UINT32 <= 16, then count times
                         hash UINT16, sizeofSelect BYTE <= 4, sizeofSelect bytes of bitmap
    pcrDigest        TPM2B_DIGEST   UINT16 size <= 64, then size bytes

Every size is checked against what remains before it is read, and nothing may follow the
digest. Refusals (``ProtocolError``), the ids ``agent.protocol.attest`` uses:

    tpm.attest.parse   too short or too long, a size past the end or past its bound, a count
                       or selection size past its bound, safe not 0 or 1, trailing bytes
    tpm.attest.magic   the structure decodes but magic is not TPM_GENERATED_VALUE
    tpm.attest.type    another attestation type than a quote (its body is not decoded)

This replaces tpm2-pytss's generic unmarshalling on the service's hot path (an attestation
answer per device per interval). It accepts exactly the quotes tpm2-pytss decodes, with the
same fields, and refuses strictly more only where tpm2-pytss is lax: ``safe`` other than 0 or 1
(``tests/pure/test_tpm_quote_parse.py`` compares the two on real and mutated quotes).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.protocol.errors import ProtocolError

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018
MAX_ATTEST_SIZE = 2048
MAX_NAME_SIZE = 68  # sizeof(TPMU_NAME) in tpm2-tss: a SHA-512 TPMT_HA, padded to 4 bytes
MAX_DATA_SIZE = 64  # the TPM2B_DATA buffer of tpm2-tss: a SHA-512 digest
MAX_DIGEST_SIZE = 64  # sizeof(TPMU_HA)
MAX_PCR_BANKS = 16  # TPM2_NUM_PCR_BANKS
MAX_SIZEOF_SELECT = 4  # TPM2_PCR_SELECT_MAX: 32 PCRs


@dataclass(frozen=True, slots=True)
class ParsedQuote:
    """The fields of a decoded quote. ``selections``: (hash algorithm, bitmap) per bank, the
    bitmap ``sizeofSelect`` bytes long, PCR ``i`` is bit ``i % 8`` of byte ``i // 8``."""

    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: int
    firmware_version: int
    selections: tuple[tuple[int, bytes], ...]
    pcr_digest: bytes


def _short(what: str) -> ProtocolError:
    return ProtocolError("tpm.attest.parse", f"TPMS_ATTEST ends inside {what}")


def _sized(data: bytes, at: int, bound: int, what: str) -> tuple[bytes, int]:
    """A TPM2B at ``at``: its bytes and the offset after it."""
    end = len(data)
    if at + 2 > end:
        raise _short(what)
    size = data[at] << 8 | data[at + 1]
    if size > bound:
        raise ProtocolError("tpm.attest.parse", f"{what} of {size} bytes (at most {bound})")
    at += 2
    if at + size > end:
        raise _short(what)
    return data[at : at + size], at + size


def parse_quote(attest: bytes) -> ParsedQuote:
    """Decode ``attest`` as a TPMS_ATTEST holding a TPMS_QUOTE_INFO, strictly (module doc)."""
    end = len(attest)
    if not 0 < end <= MAX_ATTEST_SIZE:
        raise ProtocolError("tpm.attest.parse", f"attestation of {end} bytes")
    if end < 6:
        raise _short("the header")
    magic = int.from_bytes(attest[0:4], "big")
    kind = attest[4] << 8 | attest[5]
    signer, at = _sized(attest, 6, MAX_NAME_SIZE, "qualifiedSigner")
    extra, at = _sized(attest, at, MAX_DATA_SIZE, "extraData")
    if at + 25 > end:
        raise _short("clockInfo and firmwareVersion")
    clock = int.from_bytes(attest[at : at + 8], "big")
    reset_count = int.from_bytes(attest[at + 8 : at + 12], "big")
    restart_count = int.from_bytes(attest[at + 12 : at + 16], "big")
    safe = attest[at + 16]
    if safe > 1:
        raise ProtocolError("tpm.attest.parse", f"clockInfo.safe is {safe}, not a TPMI_YES_NO")
    firmware = int.from_bytes(attest[at + 17 : at + 25], "big")
    at += 25
    if kind != TPM_ST_ATTEST_QUOTE:
        if magic != TPM_GENERATED_VALUE:
            raise ProtocolError("tpm.attest.magic", "magic is not TPM_GENERATED_VALUE")
        raise ProtocolError("tpm.attest.type", f"attestation type {kind:#06x} is not a quote")
    if at + 4 > end:
        raise _short("pcrSelect")
    count = int.from_bytes(attest[at : at + 4], "big")
    if count > MAX_PCR_BANKS:
        raise ProtocolError("tpm.attest.parse", f"{count} PCR selections (at most 16)")
    at += 4
    selections: list[tuple[int, bytes]] = []
    for _ in range(count):
        if at + 3 > end:
            raise _short("a PCR selection")
        alg = attest[at] << 8 | attest[at + 1]
        size = attest[at + 2]
        if size > MAX_SIZEOF_SELECT:
            raise ProtocolError("tpm.attest.parse", f"a PCR bitmap of {size} bytes (at most 4)")
        at += 3
        if at + size > end:
            raise _short("a PCR selection")
        selections.append((alg, attest[at : at + size]))
        at += size
    digest, at = _sized(attest, at, MAX_DIGEST_SIZE, "pcrDigest")
    if at != end:
        raise ProtocolError("tpm.attest.parse", "trailing bytes after TPMS_ATTEST")
    if magic != TPM_GENERATED_VALUE:
        raise ProtocolError("tpm.attest.magic", "magic is not TPM_GENERATED_VALUE")
    return ParsedQuote(
        qualified_signer=signer,
        extra_data=extra,
        clock=clock,
        reset_count=reset_count,
        restart_count=restart_count,
        safe=safe,
        firmware_version=firmware,
        selections=tuple(selections),
        pcr_digest=digest,
    )
