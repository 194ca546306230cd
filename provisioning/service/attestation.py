"""Runtime attestation (with ``AttestationSettings``): challenges, verdicts, quarantine.

Challenges (``attest.challenge``, a fresh nonce over the golden policy's PCRs) go out on a
schedule (``tasks.attest_tick``) and on an operator's ``op.attest``. Open nonces are in the
database (``store.issue_challenge``/``consume_challenge``), so any instance can take the report.
An ``attest.report`` is checked by ``provisioning.attestation.verify_evidence`` (the pure
verifier) against the AK registered at enrollment and the policy; a report that answers no open
challenge of this device (unknown, replayed, expired nonce) is refused and changes nothing, any
other failure is an untrusted verdict. The verdict (with the failing check and component) is
recorded, audited and told to the operator who asked.

With ``quarantine`` on, an untrusted device is quarantined and removed from all its groups by
commits of other members (the revocation's removal path, ``operators.plan_removal``); its later
reports are refused (``ds.device.quarantined``) except attestation reports, and a later trusted
verdict makes it ``active`` again without re-adding it anywhere (an operator runs
``keyfleet group add``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from sqlalchemy.orm import Session

from agent.protocol.attest import public_key_from_area
from agent.protocol.errors import ProtocolError
from agent.protocol.topics import device_cmd_topic, operator_result_topic
from agent.protocol.wire.envelope import VerifiedMessage
from agent.protocol.wire.messages.attestation import AttestChallenge, AttestReport
from agent.protocol.wire.messages.operator import AttestDevice
from agent.protocol.wire.messages.result import OperatorResult, ResultStatus
from provisioning import audit
from provisioning.attestation import (
    AttestationRefused,
    AttestationVerdict,
    Evidence,
    verify_evidence,
)
from provisioning.policy import GoldenPolicy
from provisioning.registry import (
    AttestationResult,
    DeviceRecord,
    DeviceState,
    Outcome,
    Registry,
    key_state_digest,
    key_state_items,
)
from provisioning.registry import KeyStateReport as KeyStateItem
from provisioning.service import operators, releases, rollout, store
from provisioning.service.context import Call
from provisioning.service.effects import (
    AttestVerdict,
    CancelAddsOf,
    Count,
    Effects,
    Log,
    Send,
    StartNext,
)
from provisioning.service.model import GROUP_ELIGIBLE, AttestOperation, Job

log = logging.getLogger("keyfleet.service")

ATTESTABLE: Final = frozenset({DeviceState.REGISTERED, DeviceState.ACTIVE, DeviceState.QUARANTINED})
NONCE_SIZE: Final = 32
# the states a trusted verdict moves to ``active`` (a device in one is not judged on plain
# columns in a batch of answers: ``attestbatch``)
STATE_CHANGING: Final = frozenset({DeviceState.REGISTERED, DeviceState.QUARANTINED})


def issue_challenge(cx: Call, session: Session, device_id: str, now: int) -> AttestChallenge:
    settings = cx.env.attestation
    assert settings is not None
    challenge = store.issue_challenge(
        session,
        device_id,
        cx.env.rng(NONCE_SIZE),
        releases.golden(cx, session).pcrs,
        now=now,
        ttl=settings.nonce_ttl,
        max_open=settings.max_open,
    )
    return AttestChallenge(challenge.nonce, challenge.pcrs)


def challenge(cx: Call, device_id: str, now: int, *, scheduled: bool = False) -> bool:
    """Challenge ``device_id``; with ``scheduled`` only if no instance challenged it within
    the interval (the schedule row is the claim). False: it was not due after all."""

    def work(session: Session) -> AttestChallenge | None:
        check_attestable(cx, Registry(session), device_id)
        assert cx.env.attestation is not None
        if not store.claim_challenge_slot(
            session,
            device_id,
            now=now,
            interval=cx.env.attestation.interval,
            force=not scheduled,
        ):
            return None
        return issue_challenge(cx, session, device_id, now)

    body = cx.env.tx(work)
    if body is None:
        cx.env.metrics.claims_lost.inc("challenge")
        return False
    cx.env.metrics.challenges.inc("schedule" if scheduled else "operator")
    cx.send(device_cmd_topic(device_id), body, to=device_id, now=now)
    return True


def check_attestable(cx: Call, registry: Registry, device_id: str) -> DeviceRecord:
    if cx.env.attestation is None:
        raise ProtocolError("op.unsupported", "attestation is not configured")
    device = registry.device(device_id)
    if device.state not in ATTESTABLE:
        raise ProtocolError("attest.device.state", f"device {device_id!r} is {device.state.value}")
    if device.ak_public is None:
        raise ProtocolError(
            "attest.device.ak", f"device {device_id!r} has no AK registered: not attestable"
        )
    return device


def dispatch_attest(
    cx: Call,
    session: Session,
    operator: str,
    body: AttestDevice,
    command_id: bytes,
    *,
    now: int,
) -> Effects:
    registry = Registry(session)
    check_attestable(cx, registry, body.device_id)
    challenge = issue_challenge(cx, session, body.device_id, now)
    assert cx.env.attestation is not None
    store.claim_challenge_slot(
        session, body.device_id, now=now, interval=cx.env.attestation.interval, force=True
    )
    store.add_attest_operation(
        session,
        AttestOperation(
            command_id, operator, body.device_id, challenge.nonce, now + cx.env.settings.ack_timeout
        ),
    )
    store.record_command(session, command_id, operator=operator, type_=body.TYPE, now=now)
    audit.append(
        session,
        now=now,
        actor=f"operator:{operator}",
        action=body.TYPE,
        target=body.device_id,
        outcome=Outcome.ACCEPTED,
        details={"command_id": command_id.hex()},
    )

    return [
        Count("challenges", "operator"),
        Log(
            logging.INFO,
            "attestation of %s requested by %s: challenge sent",
            (body.device_id, operator),
        ),
        Send(
            operator_result_topic(operator),
            OperatorResult.of(
                command_id,
                ResultStatus.ACCEPTED,
                f"challenge sent to {body.device_id}",
                pending=(body.device_id,),
            ),
            operator,
        ),
        Send(device_cmd_topic(body.device_id), challenge, body.device_id),
    ]


@dataclass
class AnswerBatch:
    """What the answers of one batch (``attestbatch.on_answers``) read once and write once
    instead of per answer: the golden policy, which senders are in a rollout that is not over,
    which nonces an operator waits for, the challenges the answers name (``challenges``), and
    the audit entries and release records collected for one write each at the batch's end.
    ``plain``: the senders judged on plain columns (``store.attest_senders``); an answer of one
    of them whose key states are all recorded and that changes no device state is written with
    the others in one statement (``written``), any other answer goes through the registry's
    rows (``to_rows``). ``changing`` is set once an answer has started to change rows: a
    refusal after that undoes the batch."""

    policy: GoldenPolicy
    in_rollout: frozenset[str]
    waited: frozenset[bytes]
    challenges: store.ChallengeBook
    plain: dict[str, store.AttestSender] = field(default_factory=dict)
    written: dict[str, dict[str, object]] = field(default_factory=dict)
    audits: list[audit.Pending] = field(default_factory=list)
    releases: dict[str, str | None] = field(default_factory=dict)
    changing: bool = False

    def flush_audits(self, session: Session, now: int) -> None:
        audit.append_many(session, self.audits, now=now)
        self.audits.clear()

    def to_rows(self, session: Session, sender: str) -> None:
        """``sender``'s answers go through its registry rows from now on: what an earlier
        answer of the batch left to write for it is written first, so its rows are read as
        that answer left them."""
        if self.plain.pop(sender, None) is None:
            return
        row = self.written.pop(sender, None)
        if row is not None:
            store.write_attestations(session, [row])

    def flush(self, session: Session, now: int) -> None:
        """The batch's writes of plain columns: the devices', then the challenges'."""
        store.write_attestations(session, [self.written[s] for s in sorted(self.written)])
        self.written.clear()
        self.challenges.write(session, now=now)


def on_attest_report(
    cx: Call,
    session: Session,
    body: AttestReport,
    message: VerifiedMessage,
    *,
    now: int,
    batch: AnswerBatch | None = None,
    items: tuple[list[KeyStateItem], bytes] | None = None,
) -> Effects:
    """Verify a report against the challenge it answers; record, audit, maybe quarantine.
    A report that answers no open challenge of this device (unknown, replayed, expired
    nonce) is refused and changes nothing; any other failure is an untrusted verdict.
    With ``batch`` (answers taken together), the reads and writes it names are the batch's;
    the checks and the verdict are the same. ``items``: the report's key states
    (``key_state_items`` of its keys) and their ``key_state_digest``, if the caller has them
    already."""
    sender = message.sender
    settings = cx.env.attestation
    if settings is None:
        raise ProtocolError("op.unsupported", "attestation is not configured")
    plain = None if batch is None else batch.plain.get(sender)
    registry: Registry | None = None
    if plain is None:
        # the device row is read once and held for the steps below (verdict, report, state)
        registry = Registry(session, hold_rows=True)
        device = registry.device(sender)
        state, pem, ak_public = device.state, device.devid_cert_pem, device.ak_public
    else:
        state, pem, ak_public = plain.state, plain.devid_cert_pem, plain.ak_public
    if ak_public is None:
        raise ProtocolError("attest.device.ak", f"device {sender!r} has no AK registered")
    # The stored AK must be the one the device's DevID certificate names (``cred.stored``).
    stored = cx.env.devices.check_stored(sender, pem, now, ak_public=ak_public, with_ak=True)
    # the AK's key as that check decoded it from these stored bytes (remembered with it)
    ak_key = stored.ak_key or public_key_from_area(ak_public)
    challenge = (
        store.consume_challenge(session, sender, body.nonce, now=now)
        if batch is None
        else batch.challenges.consume(sender, body.nonce, now=now)
    )
    # nothing below refuses the answer: every failure from here on is an untrusted verdict
    if batch is not None:
        batch.changing = True
    waiting = (
        store.take_attest_operation(session, body.nonce)
        if batch is None or body.nonce in batch.waited
        else None
    )
    try:
        verdict = verify_evidence(
            Evidence.from_report(body),
            ak_public=ak_key,
            challenge=challenge,
            policy=releases.golden(cx, session) if batch is None else batch.policy,
        )
    except AttestationRefused as refused:
        verdict = refused.verdict
    summary = verdict.summary
    if verdict.trusted:
        if batch is None:
            releases.record_device(cx, session, sender, verdict.pcr_values, now)
        else:
            batch.releases[sender] = releases.matched_release(cx, verdict.pcr_values)
    keys, digest = (key_state_items(body.keys), None) if items is None else items
    result = AttestationResult.TRUSTED if verdict.trusted else AttestationResult.UNTRUSTED
    quarantine = not verdict.trusted and settings.quarantine and state in GROUP_ELIGIBLE
    activate = verdict.trusted and state in STATE_CHANGING
    keys_note: str | None = None
    if (
        batch is not None
        and plain is not None
        and not (quarantine or activate)
        and plain.reported.knows(keys, digest)
    ):
        # what the registry would write (the report and the verdict; no key row changes)
        batch.written[sender] = {
            "device": sender,
            "report": message.message_id,
            "at": now,
            "result": result,
            "reason": summary,
            "keys": key_state_digest(keys) if digest is None else digest,
        }
    else:
        if registry is None:
            assert batch is not None
            batch.to_rows(session, sender)
            registry = Registry(session, hold_rows=True)
        try:
            # not flushed yet: written with the verdict's columns (one UPDATE of the device row)
            registry.record_report(sender, message.message_id, keys, now=now, flush=False)
        except ProtocolError as err:
            # record_report checks everything before changing anything: the verdict stands
            keys_note = f"[{err.check}] {err.reason}"
        registry.record_attestation(sender, result, reason=summary, now=now, flush=batch is None)
    entry = audit.Pending(
        actor=f"device:{sender}",
        action="attest.verdict",
        target=sender,
        outcome=Outcome.ACCEPTED,
        reason=summary[:1000],
        details={
            "result": "trusted" if verdict.trusted else "untrusted",
            "check": verdict.check,
            "component": verdict.failing_component,
            "keys": keys_note,
        },
    )
    if batch is None:
        audit.append(
            session,
            now=now,
            actor=entry.actor,
            action=entry.action,
            target=entry.target,
            outcome=entry.outcome,
            reason=entry.reason,
            details=entry.details,
        )
    else:
        batch.audits.append(entry)
    jobs: list[Job] = []
    groups: set[str] = set()
    change = ""
    if batch is not None and (quarantine or activate):
        # the state change's entries follow the verdict's, in the log's order
        batch.flush_audits(session, now)
    if quarantine:
        assert registry is not None
        registry.set_device_state(
            sender,
            DeviceState.QUARANTINED,
            reason=f"attestation: {summary}"[:1000],
            now=now,
        )
        jobs, groups = operators.plan_removal(cx, session, sender, now)
        audit.append(
            session,
            now=now,
            actor="service",
            action="device.quarantine",
            target=sender,
            outcome=Outcome.ACCEPTED,
            reason=summary[:1000],
            details={
                "groups": ",".join(sorted(groups)),
                "component": verdict.failing_component,
            },
        )
        change = "quarantined" + (
            f"; removal from {', '.join(sorted(groups))} queued" if groups else ""
        )
    elif activate:
        assert registry is not None
        registry.set_device_state(
            sender, DeviceState.ACTIVE, reason="attestation: trusted", now=now
        )
        audit.append(
            session,
            now=now,
            actor="service",
            action="device.activate",
            target=sender,
            outcome=Outcome.ACCEPTED,
            reason=f"was {state.value}; attestation trusted",
            details={},
        )
        change = "active" + (
            " (not re-added to any group: `keyfleet group add`)"
            if state is DeviceState.QUARANTINED
            else ""
        )

    effects: Effects = [
        Log(
            logging.INFO,
            "attestation of %s: %s %s%s",
            (
                sender,
                "trusted" if verdict.trusted else "UNTRUSTED",
                summary,
                f" -> {change}" if change else "",
            ),
        ),
        Count("attestations", "trusted" if verdict.trusted else "untrusted"),
    ]
    if jobs:
        effects.append(CancelAddsOf(sender))
        effects += [StartNext(group_id) for group_id in sorted(groups)]
    if waiting is not None:
        effects.append(AttestVerdict(waiting, verdict, change))
    if batch is not None and sender not in batch.in_rollout:
        return effects
    # a staged rollout's step of this device (provisioning/service/rollout.py)
    return effects + rollout.on_verdict(cx, session, sender, verdict, now)


def attest_result(
    cx: Call, operation: AttestOperation, verdict: AttestationVerdict, change: str, now: int
) -> None:
    word = "trusted" if verdict.trusted else "untrusted"
    detail = f"{operation.device_id} {word}: {verdict.summary}"
    if change:
        detail += f"; {change}"
    status = ResultStatus.DONE if verdict.trusted else ResultStatus.FAILED
    attest_finish(cx, operation, status, detail, now, acked=(operation.device_id,))


def attest_finish(
    cx: Call,
    operation: AttestOperation,
    status: ResultStatus,
    detail: str,
    now: int,
    *,
    acked: Sequence[str] = (),
    pending: Sequence[str] = (),
) -> None:
    cx.send(
        operator_result_topic(operation.operator),
        OperatorResult.of(
            operation.command_id, status, detail[:1000], acked=acked, pending=pending
        ),
        to=operation.operator,
        now=now,
    )
    audit.record(
        cx.env.sessions,
        now=now,
        actor="service",
        action=f"{AttestDevice.TYPE}.result",
        target=operation.device_id,
        outcome=Outcome.ACCEPTED,
        reason=f"{status.value}: {detail}"[:1000],
        details={"command_id": operation.command_id.hex(), "operator": operation.operator},
    )
