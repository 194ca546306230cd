"""Device certificate renewal (docs/attestation.md, "Certificate renewal"): the device asks, the
service answers with a fresh nonce, the device proves its keys by the TPM over that nonce, the
service sends the new certificates.

The nonce is a runtime-attestation nonce (the same open-challenge store): freshness comes from the
service, never from the device's clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from agent.protocol.wire.messages.attestation import MAX_EVENT_LOG, MAX_QUOTE, PCR_BANKS, check_pcrs
from agent.protocol.wire.messages.base import (
    NONCE_MAX,
    NONCE_MIN,
    Body,
    check_bytes,
    check_choice,
    check_uint,
)

MAX_CERT = 8192
MAX_PUBLIC_AREA = 1024


@dataclass(frozen=True)
class RenewRequest(Body):
    """Device -> service: my certificates are due for renewal; ``not_after`` is the earliest
    not-after of the DevID and TLS certificates the device holds (for the log and the audit)."""

    TYPE: ClassVar[str] = "renew.request"

    not_after: int

    def __post_init__(self) -> None:
        check_uint(self.not_after, "not_after")


@dataclass(frozen=True)
class RenewChallenge(Body):
    """Service -> device: prove your keys over this fresh nonce, quoting these PCRs."""

    TYPE: ClassVar[str] = "renew.challenge"

    nonce: bytes
    pcrs: tuple[int, ...]

    def __post_init__(self) -> None:
        check_bytes(self.nonce, "nonce", min_len=NONCE_MIN, max_len=NONCE_MAX)
        check_pcrs(self.pcrs)


@dataclass(frozen=True)
class RenewAnswer(Body):
    """Device -> service, signed by the current DevID key: a quote over the challenge's nonce
    (as ``attest.report`` carries it), a TPM2_Certify of the DevID key by the AK qualified by the
    same nonce (``devid_public``: its marshalled TPM2B_PUBLIC; ``devid_certify``: the TPMS_ATTEST;
    ``devid_certify_signature``: the AK's DER ECDSA signature), and the current TLS certificate
    (DER) with ``tls_proof``, the TLS key's DER ECDSA signature over
    ``agent.protocol.renewal.tls_proof_message`` (the TLS key is a software key: a signature
    over the service's nonce is what proves it is held now)."""

    TYPE: ClassVar[str] = "renew.answer"

    nonce: bytes
    quote: bytes
    signature: bytes
    pcr_bank: str
    pcrs: tuple[int, ...]
    event_log: bytes
    devid_public: bytes
    devid_certify: bytes
    devid_certify_signature: bytes
    tls_cert: bytes
    tls_proof: bytes

    def __post_init__(self) -> None:
        check_bytes(self.nonce, "nonce", min_len=NONCE_MIN, max_len=NONCE_MAX)
        check_bytes(self.quote, "quote", min_len=1, max_len=MAX_QUOTE)
        check_bytes(self.signature, "signature", min_len=1, max_len=MAX_QUOTE)
        check_choice(self.pcr_bank, "pcr_bank", PCR_BANKS)
        check_pcrs(self.pcrs)
        check_bytes(self.event_log, "event_log", max_len=MAX_EVENT_LOG)
        check_bytes(self.devid_public, "devid_public", min_len=1, max_len=MAX_PUBLIC_AREA)
        check_bytes(self.devid_certify, "devid_certify", min_len=1, max_len=MAX_QUOTE)
        check_bytes(
            self.devid_certify_signature, "devid_certify_signature", min_len=1, max_len=MAX_QUOTE
        )
        check_bytes(self.tls_cert, "tls_cert", min_len=1, max_len=MAX_CERT)
        check_bytes(self.tls_proof, "tls_proof", min_len=1, max_len=MAX_QUOTE)


@dataclass(frozen=True)
class RenewIssued(Body):
    """Service -> device: the new DevID and TLS certificates (DER) for the same keys, issued by
    the device CA; ``nonce`` names the answer they were issued for."""

    TYPE: ClassVar[str] = "renew.issued"

    nonce: bytes
    devid_cert: bytes
    tls_cert: bytes

    def __post_init__(self) -> None:
        check_bytes(self.nonce, "nonce", min_len=NONCE_MIN, max_len=NONCE_MAX)
        check_bytes(self.devid_cert, "devid_cert", min_len=1, max_len=MAX_CERT)
        check_bytes(self.tls_cert, "tls_cert", min_len=1, max_len=MAX_CERT)
