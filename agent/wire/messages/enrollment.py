"""Enrollment at the factory: request, challenge, response, result.

The device signs its request with its new DevID key (proof of possession). No registry knows
that key yet, so the service reads ``devid_public`` from ``DecodedMessage.untrusted_body`` with
``EnrollRequest.from_cbor_map``, builds a one-key resolver from it and then verifies the message
as usual; the EK certificate, the credential activation and the TPM2_Certify are what make that
key trustworthy, and checking them is the service's job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from agent.errors import ProtocolError
from agent.wire.messages.base import (
    Body,
    check_bool,
    check_bytes,
    check_id,
    check_ids,
    check_text,
    check_tuple,
)

MAX_CERT = 16 * 1024
MAX_TPM_BLOB = 4096


@dataclass(frozen=True)
class EnrollRequest(Body):
    """Device -> service: the TPM's EK certificate, the AK, the DevID public key and the AK's
    TPM2_Certify over the DevID (``certify_info`` is the TPMS_ATTEST, ``certify_signature`` the
    marshalled TPMT_SIGNATURE). ``serial`` is the hardware serial the station read."""

    TYPE: ClassVar[str] = "enroll.request"

    serial: str
    ek_cert: bytes
    ak_public: bytes
    devid_public: bytes
    certify_info: bytes
    certify_signature: bytes

    def __post_init__(self) -> None:
        check_text(self.serial, "serial", min_len=1, max_len=128)
        check_bytes(self.ek_cert, "ek_cert", min_len=1, max_len=MAX_CERT)
        check_bytes(self.ak_public, "ak_public", min_len=1, max_len=MAX_TPM_BLOB)
        check_bytes(self.devid_public, "devid_public", min_len=1, max_len=MAX_TPM_BLOB)
        check_bytes(self.certify_info, "certify_info", min_len=1, max_len=MAX_TPM_BLOB)
        check_bytes(self.certify_signature, "certify_signature", min_len=1, max_len=MAX_TPM_BLOB)


@dataclass(frozen=True)
class EnrollChallenge(Body):
    """Service -> device: TPM2_MakeCredential output for the AK, to be activated with the EK."""

    TYPE: ClassVar[str] = "enroll.challenge"

    credential_blob: bytes
    encrypted_secret: bytes

    def __post_init__(self) -> None:
        check_bytes(self.credential_blob, "credential_blob", min_len=1, max_len=MAX_TPM_BLOB)
        check_bytes(self.encrypted_secret, "encrypted_secret", min_len=1, max_len=MAX_TPM_BLOB)


@dataclass(frozen=True)
class EnrollResponse(Body):
    """Device -> service: proof that the AK lives in the TPM that owns the EK. ``proof`` is
    derived from the activated credential secret; it is kept out of reprs."""

    TYPE: ClassVar[str] = "enroll.response"

    proof: bytes = field(repr=False)

    def __post_init__(self) -> None:
        check_bytes(self.proof, "proof", min_len=16, max_len=64)


@dataclass(frozen=True)
class EnrollResult(Body):
    """Service -> device: accepted (with the device id, DevID certificate, trust anchors, broker
    address and groups) or refused (with a reason)."""

    TYPE: ClassVar[str] = "enroll.result"

    accepted: bool
    device_id: str | None = None
    devid_cert: bytes | None = None
    trust_anchors: tuple[bytes, ...] | None = None
    broker: str | None = None
    groups: tuple[str, ...] | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        check_bool(self.accepted, "accepted")
        if self.accepted:
            if None in (self.device_id, self.devid_cert, self.trust_anchors, self.broker):
                raise ProtocolError(
                    "body.malformed",
                    "an accepted enrollment needs device_id, devid_cert, trust_anchors, broker",
                )
            check_id(self.device_id, "device_id")
            check_bytes(self.devid_cert, "devid_cert", min_len=1, max_len=MAX_CERT)
            check_tuple(self.trust_anchors, "trust_anchors", min_len=1, max_len=16)
            for anchor in self.trust_anchors or ():
                check_bytes(anchor, "trust_anchors[]", min_len=1, max_len=MAX_CERT)
            check_text(self.broker, "broker", min_len=1, max_len=255)
            if self.groups is not None:
                check_ids(self.groups, "groups")
            if self.reason is not None:
                raise ProtocolError("body.malformed", "an accepted enrollment has no reason")
        else:
            if self.reason is None:
                raise ProtocolError("body.malformed", "a refused enrollment needs a reason")
            check_text(self.reason, "reason", min_len=1)
            present = (self.device_id, self.devid_cert, self.trust_anchors, self.broker)
            if any(item is not None for item in present) or self.groups is not None:
                raise ProtocolError("body.malformed", "a refused enrollment carries no identity")
