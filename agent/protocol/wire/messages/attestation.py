"""Runtime attestation: the service's challenge and the device's report.

The challenge is also what the service command family calls "attest-request": one message type,
``attest.challenge``, so that the nonce handling exists once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Self

from agent.protocol.errors import ProtocolError
from agent.protocol.wire.messages.base import (
    NONCE_MAX,
    NONCE_MIN,
    Body,
    check_bytes,
    check_choice,
    check_tuple,
    check_uint,
)
from agent.protocol.wire.messages.key_state import (
    KeyRecord,
    check_records,
    records_from_cbor,
    records_to_cbor,
)

PCR_MAX = 23
PCR_BANKS = frozenset({"sha256"})
MAX_QUOTE = 4096
MAX_EVENT_LOG = 512 * 1024


def check_pcrs(value: object, name: str = "pcrs") -> None:
    """A non-empty, strictly increasing tuple of PCR indices 0..23 (one canonical form)."""
    check_tuple(value, name, min_len=1, max_len=PCR_MAX + 1)
    assert isinstance(value, tuple)
    for index in value:
        check_uint(index, f"{name}[]", maximum=PCR_MAX)
    if list(value) != sorted(set(value)):
        raise ProtocolError("body.bounds", f"{name} must be strictly increasing")


@dataclass(frozen=True)
class AttestChallenge(Body):
    """Service -> device: quote these PCRs over this fresh nonce."""

    TYPE: ClassVar[str] = "attest.challenge"

    nonce: bytes
    pcrs: tuple[int, ...]

    def __post_init__(self) -> None:
        check_bytes(self.nonce, "nonce", min_len=NONCE_MIN, max_len=NONCE_MAX)
        check_pcrs(self.pcrs)


@dataclass(frozen=True)
class AttestReport(Body):
    """Device -> service: the quote (marshalled TPMS_ATTEST) and its ECDSA signature (DER, as
    ``TPMStore.quote`` returns it) by the AK over the challenge's nonce, the PCR selection
    quoted, the measured-boot event log, and the states of all keys."""

    TYPE: ClassVar[str] = "attest.report"

    nonce: bytes
    quote: bytes
    signature: bytes
    pcr_bank: str
    pcrs: tuple[int, ...]
    event_log: bytes
    keys: tuple[KeyRecord, ...]

    def __post_init__(self) -> None:
        check_bytes(self.nonce, "nonce", min_len=NONCE_MIN, max_len=NONCE_MAX)
        check_bytes(self.quote, "quote", min_len=1, max_len=MAX_QUOTE)
        check_bytes(self.signature, "signature", min_len=1, max_len=MAX_QUOTE)
        check_choice(self.pcr_bank, "pcr_bank", PCR_BANKS)
        check_pcrs(self.pcrs)
        check_bytes(self.event_log, "event_log", max_len=MAX_EVENT_LOG)
        check_records(self.keys, "keys")

    def to_cbor_map(self) -> dict[str, object]:
        out = super().to_cbor_map()
        out["keys"] = records_to_cbor(self.keys)
        return out

    @classmethod
    def from_cbor_map(cls, value: object) -> Self:
        if isinstance(value, dict) and "keys" in value:
            value = {**value, "keys": records_from_cbor(value["keys"], "keys")}
        return super().from_cbor_map(value)
