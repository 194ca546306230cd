"""The agent core's answer to ``attest.challenge`` (pure: the quote comes from a FakeAttester the
test provides, the way the daemon provides a TPM one): the report carries the challenge's nonce
and PCRs, the attester's quote, signature and event log, and the key ledger; a redelivered
challenge gets the very same report; without an attester the challenge is refused by check id
and changes nothing; a fresh state can continue sequence numbers from a given value."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

from agent.core import AttestationEvidence
from agent.protocol.lifecycle import KeyKind
from agent.protocol.wire.envelope import Signer, open_message
from agent.protocol.wire.messages.attestation import AttestChallenge, AttestReport
from tests.pure.test_agent_core import T0, FakeService

pytestmark = pytest.mark.pure


@dataclass
class FakeAttester:
    """Stands in for the daemon's TPM quote: records what it was asked."""

    asked: list[tuple[bytes, tuple[int, ...]]] = field(default_factory=list)

    def __call__(self, nonce: bytes, pcrs: tuple[int, ...]) -> AttestationEvidence:
        self.asked.append((nonce, pcrs))
        return AttestationEvidence(b"quote:" + nonce, b"sig:" + bytes(pcrs), b"event-log")


def open_report(service: FakeService, device: str, payload: bytes) -> AttestReport:
    core = service.devices[device]
    devid = core._keys.devid.public_key()  # type: ignore[attr-defined]
    message = open_message(
        payload, lambda kid: Signer(device, devid), now=service.now, recipients={"keyfleet-service"}
    )
    assert isinstance(message.body, AttestReport)
    return message.body


def test_challenge_is_answered_with_quote_log_and_key_states() -> None:
    service = FakeService()
    attester = FakeAttester()
    core = service.core("dev-1", attester=attester)
    core.ledger.add("devid", KeyKind.DEVID, active=True)
    nonce = os.urandom(32)
    payload, topic = service.command("dev-1", AttestChallenge(nonce, (0, 1, 4, 8, 9)))
    outcome = core.handle(payload, topic, T0)
    assert outcome.refused is None and outcome.changed and outcome.handled == "attest.challenge"
    assert attester.asked == [(nonce, (0, 1, 4, 8, 9))]
    [publish] = outcome.publishes
    assert publish.topic == "kf/v1/dev/dev-1/report" and publish.type == "attest.report"
    report = open_report(service, "dev-1", publish.payload)
    assert report.nonce == nonce and report.pcrs == (0, 1, 4, 8, 9)
    assert report.quote == b"quote:" + nonce and report.signature == b"sig:" + bytes(
        [0, 1, 4, 8, 9]
    )
    assert report.event_log == b"event-log" and report.pcr_bank == "sha256"
    assert [k.name for k in report.keys] == ["devid"]

    # a redelivery (QoS 1) is answered with the same envelope, no second quote
    again = core.handle(payload, topic, T0 + 1)
    assert [p.payload for p in again.publishes] == [publish.payload]
    assert len(attester.asked) == 1


def test_without_an_attester_the_challenge_is_refused() -> None:
    service = FakeService()
    core = service.core("dev-1")
    seq = core.next_seq
    outcome = service.deliver("dev-1", AttestChallenge(os.urandom(32), (0, 4)))
    assert outcome.refused is not None and outcome.refused.check == "agent.attest.unavailable"
    assert outcome.publishes == [] and not outcome.changed
    assert core.next_seq == seq and core.rejections.count("agent.attest.unavailable") == 1


def test_sequence_numbers_skip_forward_never_back() -> None:
    core = FakeService().core("dev-1")
    core.skip_sequence_to(T0 * 1000)
    assert core.next_seq == T0 * 1000
    core.skip_sequence_to(5)
    assert core.next_seq == T0 * 1000
