"""The one exception tree of keyfleet.

A root, a few families, and one "internal error" that means a bug in keyfleet. Messages never
carry secret material: callers put names, sizes and check ids in them, never key bytes.
"""

from __future__ import annotations


class KeyfleetError(Exception):
    """Root of every error keyfleet raises on purpose."""


class ConfigError(KeyfleetError):
    """A configuration file or value is wrong; the message names the key, the value and what was
    expected."""


class TransportError(KeyfleetError):
    """MQTT, serial or HTTP failed: a peer did not answer, a connection broke, a frame was cut."""


class ProtocolError(KeyfleetError):
    """A message was refused. ``check`` is a stable id (documented in docs/checks.md) that logs and
    counters use; ``reason`` is for people."""

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(f"[{check}] {reason}")
        self.check = check
        self.reason = reason


class CryptoError(ProtocolError):
    """A signature, MAC or AEAD tag did not verify, or a key was unusable."""


class TPMError(KeyfleetError):
    """A TPM command failed. ``rc`` is the TPM response code; the message decodes it."""

    def __init__(self, operation: str, rc: int | None, detail: str) -> None:
        code = f" (rc 0x{rc:x})" if rc is not None else ""
        super().__init__(f"TPM {operation} failed{code}: {detail}")
        self.operation = operation
        self.rc = rc
        self.detail = detail


class StateError(KeyfleetError):
    """Persisted state could not be read or written (corrupt, truncated, sealed to other
    measurements, disk full)."""


class InternalError(KeyfleetError):
    """An invariant of keyfleet itself was broken: this is a bug in keyfleet, please report it."""
