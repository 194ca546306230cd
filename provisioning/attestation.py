"""The fleet service's attestation verifier: is this device running approved firmware?

A device answers the service's challenge (a fresh nonce and a PCR selection) with a TPM quote
signed by its AK and its measured-boot event log. The quote vouches for the PCR values; the log
says how they came about; the golden policy says which measurements are approved. The verifier
ties the three together. It is pure: no TPM command (``agent.protocol.attest`` checks the quote), no
I/O, the clock passed in. Outstanding nonces live in a ``NonceBook``.

Checks, in order; the first failure decides (ids are stable, docs/attestation.md and
docs/checks.md):

    attest.nonce.unknown     the nonce was never issued to this device (or was dropped)
    attest.nonce.replayed    the nonce was already used by an earlier report
    attest.nonce.expired     the nonce is older than the book's lifetime
    attest.pcrs              the report quotes another PCR selection than the challenge asked
    eventlog.*               the event log does not decode (agent.protocol.eventlog)
    attest.eventlog.unquoted an event extends a PCR outside the quoted selection
    attest.eventlog.duplicate a component is measured twice
    tpm.attest.*, tpm.quote.pcr-select   the quote itself (agent.protocol.attest.verify_quote):
                             parse, magic, type, AK signature, nonce in extraData, selection
    attest.eventlog.replay   the log's replay does not give the quoted PCR digest: the log is
                             forged, truncated or from another boot
    attest.policy.unknown-component  a measured component the policy does not know
    attest.policy.pcr        a component measured into another PCR than the policy's
    attest.policy.digest     a component's digest is not approved
    attest.policy.version    the log's version label disagrees with the approved digest's version
    attest.policy.missing    a component of the policy was not measured

The event log is parsed and replayed before the quote is checked because ``verify_quote`` needs
the expected PCR values, and checking the signature twice would halve the verifier's throughput;
so a report with both a forged quote and a garbled log is refused as ``eventlog.*``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol.attest import Attestation, verify_quote
from agent.protocol.errors import ProtocolError
from agent.protocol.eventlog import EventLog, MeasurementEvent, decode_event_log, replay
from agent.protocol.wire.messages.attestation import AttestReport
from provisioning.policy import GoldenPolicy

DEFAULT_NONCE_TTL = 300
"""Seconds a challenge stays answerable: a device on a slow link answers in seconds; an old
nonce accepted late would let a stolen quote be replayed for that long."""
NONCE_SIZE = 32
MAX_OUTSTANDING_PER_DEVICE = 4
TRUSTED = "attest.trusted"
DECODED_LOGS = 32
"""Event logs remembered decoded, by their bytes: the devices of one firmware send the same log
at every attestation, and decoding is a pure function of the bytes (an ``EventLog`` is frozen),
so a remembered one is what decoding again would give. A log that does not decode is not
remembered (it raises each time). At most 32 x 64 KiB."""

_decode_remembered = functools.lru_cache(maxsize=DECODED_LOGS)(decode_event_log)


def _decode_log(data: bytes) -> EventLog:
    return _decode_remembered(data) if type(data) is bytes else decode_event_log(data)


@dataclass(frozen=True)
class Challenge:
    """What the service asked one device: quote ``pcrs`` over ``nonce``."""

    device_id: str
    nonce: bytes
    pcrs: tuple[int, ...]
    issued_at: int
    expires_at: int


class NonceBook:
    """Outstanding attestation nonces, each single-use, bound to one device and expiring.

    A consumed nonce is remembered until it would have expired so that a replayed report is
    named as such (``attest.nonce.replayed``) rather than as unknown. Each device has at most
    ``max_outstanding`` open challenges; issuing more drops the oldest. Pure: ``rng`` and ``now``
    are passed in. A service with several instances needs this state shared (the registry); this
    class is the reference behaviour for that.
    """

    def __init__(
        self,
        *,
        ttl: int = DEFAULT_NONCE_TTL,
        rng: Callable[[int], bytes] = os.urandom,
        max_outstanding: int = MAX_OUTSTANDING_PER_DEVICE,
    ) -> None:
        if ttl <= 0 or max_outstanding <= 0:
            raise ValueError("ttl and max_outstanding must be positive")
        self._ttl = ttl
        self._rng = rng
        self._max = max_outstanding
        self._open: dict[str, dict[bytes, Challenge]] = {}
        self._used: dict[tuple[str, bytes], int] = {}

    def issue(self, device_id: str, pcrs: Sequence[int], now: int) -> Challenge:
        nonce = self._rng(NONCE_SIZE)
        if len(nonce) != NONCE_SIZE:
            raise ValueError("rng returned a nonce of the wrong size")
        challenge = Challenge(device_id, nonce, tuple(sorted(set(pcrs))), now, now + self._ttl)
        pending = self._open.setdefault(device_id, {})
        pending.pop(nonce, None)
        pending[nonce] = challenge
        while len(pending) > self._max:
            del pending[next(iter(pending))]
        return challenge

    def consume(self, device_id: str, nonce: bytes, now: int) -> Challenge:
        """The challenge ``nonce`` answers, removed from the book; raises if it is not open."""
        pending = self._open.get(device_id, {})
        challenge = pending.pop(nonce, None)
        if challenge is None:
            if (device_id, nonce) in self._used:
                raise ProtocolError(
                    "attest.nonce.replayed", "this nonce was already answered: replayed quote"
                )
            raise ProtocolError("attest.nonce.unknown", "no open challenge with this nonce")
        if not pending:
            self._open.pop(device_id, None)
        self._used[(device_id, nonce)] = challenge.expires_at
        if now >= challenge.expires_at:
            raise ProtocolError(
                "attest.nonce.expired",
                f"challenge issued at {challenge.issued_at} expired at {challenge.expires_at}",
            )
        return challenge

    def expire(self, now: int) -> int:
        """Forget expired challenges and used nonces; returns how many open ones were dropped."""
        dropped = 0
        for device_id in list(self._open):
            pending = self._open[device_id]
            for nonce in [n for n, c in pending.items() if now >= c.expires_at]:
                del pending[nonce]
                dropped += 1
            if not pending:
                del self._open[device_id]
        self._used = {k: t for k, t in self._used.items() if now < t}
        return dropped

    def outstanding(self, device_id: str) -> int:
        return len(self._open.get(device_id, {}))


@dataclass(frozen=True)
class Evidence:
    """What the device sent: the nonce it answers, the quote (TPMS_ATTEST bytes and the AK's DER
    ECDSA signature), the PCR selection quoted and the encoded event log."""

    nonce: bytes
    quote: Attestation
    pcrs: tuple[int, ...]
    event_log: bytes = field(repr=False)

    @classmethod
    def from_report(cls, report: AttestReport) -> Evidence:
        return cls(
            nonce=report.nonce,
            quote=Attestation(attest=report.quote, signature=report.signature),
            pcrs=report.pcrs,
            event_log=report.event_log,
        )


@dataclass(frozen=True)
class AttestationVerdict:
    """The verifier's answer, for the registry (``Registry.record_attestation``) and the audit
    log. ``check`` is ``attest.trusted`` or the id of the failed check; ``pcr_values`` are the
    replayed values (equal to the quoted ones) once the replay matched, else empty;
    ``versions`` maps each component to its approved version when trusted."""

    trusted: bool
    check: str
    reason: str
    failing_component: str | None = None
    pcr_values: Mapping[int, bytes] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        """One line for ``record_attestation(reason=...)``."""
        return f"[{self.check}] {self.reason}"


class AttestationRefused(ProtocolError):
    """Attestation failed; ``verdict`` is the untrusted verdict to record."""

    def __init__(self, verdict: AttestationVerdict) -> None:
        super().__init__(verdict.check, verdict.reason)
        self.verdict = verdict
        self.component = verdict.failing_component


def _refuse(
    check: str,
    reason: str,
    component: str | None = None,
    pcr_values: Mapping[int, bytes] | None = None,
) -> AttestationRefused:
    return AttestationRefused(
        AttestationVerdict(False, check, reason, component, dict(pcr_values or {}))
    )


def _replay_log(event_log: bytes, pcrs: tuple[int, ...]) -> tuple[EventLog, Mapping[int, bytes]]:
    """The event log decoded, checked (every event in a quoted PCR, no component twice) and
    replayed over ``pcrs``: the values the quote must match. Raises ``AttestationRefused``."""
    try:
        log = _decode_log(event_log)
    except ProtocolError as exc:
        raise _refuse(exc.check, f"event log: {exc.reason}") from None
    quoted = set(pcrs)
    seen: set[str] = set()
    for event in log.events:
        if event.pcr not in quoted:
            raise _refuse(
                "attest.eventlog.unquoted",
                f"{event.component}: measured into PCR {event.pcr}, which the quote does not cover",
                event.component,
            )
        if event.component in seen:
            raise _refuse(
                "attest.eventlog.duplicate",
                f"{event.component}: measured more than once",
                event.component,
            )
        seen.add(event.component)
    return log, MappingProxyType(replay(log, pcrs))


# Remembered like decoded logs (``DECODED_LOGS``), by the log's bytes and the PCRs asked: the
# checks and the replay are a pure function of both, and a log that fails them is not
# remembered (it raises each time). The values are read-only: verdicts share them.
_replay_remembered = functools.lru_cache(maxsize=DECODED_LOGS)(_replay_log)


def _replayed(event_log: bytes, pcrs: tuple[int, ...]) -> tuple[EventLog, Mapping[int, bytes]]:
    if type(event_log) is bytes and type(pcrs) is tuple:
        return _replay_remembered(event_log, pcrs)
    return _replay_log(event_log, tuple(pcrs))


def verify_evidence(
    evidence: Evidence,
    *,
    ak_public: ec.EllipticCurvePublicKey,
    challenge: Challenge,
    policy: GoldenPolicy,
) -> AttestationVerdict:
    """Verify ``evidence`` against the ``challenge`` it answers (already taken from the nonce
    book) and ``policy``. Returns a trusted verdict or raises ``AttestationRefused``."""
    if evidence.nonce != challenge.nonce:
        raise _refuse("tpm.attest.nonce", "report answers another nonce than the challenge's")
    if tuple(evidence.pcrs) != challenge.pcrs:
        raise _refuse(
            "attest.pcrs",
            f"report quotes PCRs {list(evidence.pcrs)}, the challenge asked {list(challenge.pcrs)}",
        )
    log, values = _replayed(evidence.event_log, challenge.pcrs)
    try:
        verify_quote(evidence.quote, ak_public, challenge.nonce, values)
    except ProtocolError as exc:
        if exc.check == "tpm.quote.pcr-digest":
            raise _refuse(
                "attest.eventlog.replay",
                "the event log's replay does not reproduce the quoted PCR digest: the log is "
                "forged, truncated or from another boot",
            ) from None
        raise _refuse(exc.check, exc.reason) from None
    versions = _check_policy(log, policy, values)
    listed = ", ".join(f"{name} {version}" for name, version in versions.items())
    return AttestationVerdict(True, TRUSTED, f"approved firmware: {listed}", None, values, versions)


def _check_policy(
    log: EventLog, policy: GoldenPolicy, values: Mapping[int, bytes]
) -> dict[str, str]:
    versions: dict[str, str] = {}
    for event in log.events:
        versions[event.component] = _check_event(event, policy, values)
    missing = [name for name in policy.components if name not in versions]
    if missing:
        raise _refuse(
            "attest.policy.missing",
            f"{missing[0]}: not measured (the policy requires {', '.join(policy.components)})",
            missing[0],
            values,
        )
    return versions


def _check_event(event: MeasurementEvent, policy: GoldenPolicy, values: Mapping[int, bytes]) -> str:
    name = event.component
    rules = policy.components.get(name)
    if rules is None:
        raise _refuse(
            "attest.policy.unknown-component",
            f"{name}: component not in policy (known: {', '.join(policy.components)})",
            name,
            values,
        )
    if event.pcr != rules.pcr:
        raise _refuse(
            "attest.policy.pcr",
            f"{name}: measured into PCR {event.pcr}, the policy expects PCR {rules.pcr}",
            name,
            values,
        )
    version = rules.version_of.get(event.digest)
    if version is None:
        raise _refuse(
            "attest.policy.digest",
            f"{name}: digest {event.digest.hex()[:16]}… not in policy "
            f"(approved versions: {', '.join(rules.versions)})",
            name,
            values,
        )
    if version != event.version:
        raise _refuse(
            "attest.policy.version",
            f"{name}: log says version {event.version}, the digest is approved as {version}",
            name,
            values,
        )
    return version


class AttestationVerifier:
    """The service's attestation step: challenges from a ``NonceBook`` over the policy's PCRs,
    reports checked by ``verify_evidence``. A nonce is consumed by the first report that answers
    it, whatever the outcome, so a refused report cannot be retried with the same quote."""

    def __init__(self, policy: GoldenPolicy, nonces: NonceBook | None = None) -> None:
        self.policy = policy
        self.nonces = nonces if nonces is not None else NonceBook()

    def challenge(self, device_id: str, now: int) -> Challenge:
        return self.nonces.issue(device_id, self.policy.pcrs, now)

    def verify(
        self,
        device_id: str,
        evidence: Evidence,
        ak_public: ec.EllipticCurvePublicKey,
        now: int,
    ) -> AttestationVerdict:
        """Trusted verdict, or ``AttestationRefused`` (a ``ProtocolError``) naming the check."""
        try:
            challenge = self.nonces.consume(device_id, evidence.nonce, now)
        except ProtocolError as exc:
            raise _refuse(exc.check, exc.reason) from None
        return verify_evidence(
            evidence, ak_public=ak_public, challenge=challenge, policy=self.policy
        )

    def evaluate(
        self,
        device_id: str,
        evidence: Evidence,
        ak_public: ec.EllipticCurvePublicKey,
        now: int,
    ) -> AttestationVerdict:
        """Like ``verify`` but a refusal comes back as an untrusted verdict, ready to record."""
        try:
            return self.verify(device_id, evidence, ak_public, now)
        except AttestationRefused as refused:
            return refused.verdict
