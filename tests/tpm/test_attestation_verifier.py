"""The service's attestation verifier against real quotes: firmware booted into swtpm by
firmware_sim's measured boot, quoted by a TPM-resident AK, checked by provisioning.attestation
with a golden policy. Every refusal is asserted by its check id and the component it names."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol.eventlog import EventLog, decode_event_log
from agent.protocol.wire.messages.attestation import AttestReport
from agent.tpm import KeyKind, TPMKey, TPMStore
from firmware_sim.boot import (
    FirmwareComponent,
    default_components,
    demo_image,
    measured_boot,
    tampered,
)
from provisioning.attestation import (
    AttestationRefused,
    AttestationVerifier,
    Challenge,
    Evidence,
    NonceBook,
)
from provisioning.policy import GoldenPolicy, policy_from_components
from provisioning.registry import (
    AttestationResult,
    Registry,
    create_schema,
    make_engine,
    session_factory,
)
from tests.fixtures.swtpm import Swtpm, SwtpmFactory

pytestmark = pytest.mark.tpm

NOW = 1_700_000_000
DEVICE = "dev-0001"


@dataclasses.dataclass
class Device:
    """A booted simulated device: its TPM, its AK and the event log its boot wrote."""

    store: TPMStore
    ak: TPMKey
    log: bytes

    @property
    def ak_public(self) -> ec.EllipticCurvePublicKey:
        return self.ak.public_key()

    def answer(
        self, challenge: Challenge, *, log: bytes | None = None, pcrs: Sequence[int] | None = None
    ) -> Evidence:
        quoted = tuple(pcrs if pcrs is not None else challenge.pcrs)
        quote = self.store.quote(self.ak, challenge.nonce, quoted)
        return Evidence(challenge.nonce, quote, quoted, self.log if log is None else log)


@contextmanager
def booted(swtpm: Swtpm, components: Sequence[FirmwareComponent]) -> Iterator[Device]:
    with TPMStore(swtpm.tcti) as store, store.create_and_load(KeyKind.AK) as ak:
        log = measured_boot(store, components)
        yield Device(store, ak, log.encode())


def golden() -> GoldenPolicy:
    return policy_from_components(default_components("1.0")).approve(default_components("1.1"))


def refusal(
    verifier: AttestationVerifier, device: Device, evidence: Evidence
) -> AttestationRefused:
    with pytest.raises(AttestationRefused) as info:
        verifier.verify(DEVICE, evidence, device.ak_public, NOW + 1)
    assert not info.value.verdict.trusted
    assert info.value.verdict.check == info.value.check
    return info.value


def test_approved_firmware_is_trusted(swtpm: Swtpm) -> None:
    verifier = AttestationVerifier(golden())
    assert verifier.policy.pcrs == (0, 1, 4, 8, 9)
    with booted(swtpm, default_components("1.1")) as device:
        challenge = verifier.challenge(DEVICE, NOW)
        evidence = device.answer(challenge)
        verdict = verifier.verify(DEVICE, evidence, device.ak_public, NOW + 2)
        pcrs = device.store.pcr_read(challenge.pcrs)
    assert verdict.trusted and verdict.check == "attest.trusted"
    assert verdict.failing_component is None
    assert dict(verdict.versions) == {
        "bootloader": "1.1",
        "boot-config": "1.1",
        "kernel": "1.1",
        "rootfs": "1.1",
        "agent": "1.1",
    }
    assert dict(verdict.pcr_values) == pcrs
    assert "kernel 1.1" in verdict.summary
    assert verifier.nonces.outstanding(DEVICE) == 0


def test_report_from_the_wire_message_verifies(swtpm: Swtpm) -> None:
    verifier = AttestationVerifier(golden())
    with booted(swtpm, default_components("1.0")) as device:
        challenge = verifier.challenge(DEVICE, NOW)
        evidence = device.answer(challenge)
    report = AttestReport(
        nonce=challenge.nonce,
        quote=evidence.quote.attest,
        signature=evidence.quote.signature,
        pcr_bank="sha256",
        pcrs=challenge.pcrs,
        event_log=evidence.event_log,
        keys=(),
    )
    decoded = AttestReport.from_cbor_map(report.to_cbor_map())
    verdict = verifier.verify(DEVICE, Evidence.from_report(decoded), device.ak_public, NOW)
    assert verdict.trusted


def test_tampered_kernel_is_untrusted_and_named(swtpm: Swtpm) -> None:
    verifier = AttestationVerifier(golden())
    with booted(swtpm, tampered(default_components("1.0"), "kernel")) as device:
        evidence = device.answer(verifier.challenge(DEVICE, NOW))
        refused = refusal(verifier, device, evidence)
        verdict = verifier.evaluate(
            DEVICE, device.answer(verifier.challenge(DEVICE, NOW)), device.ak_public, NOW
        )
    assert refused.check == "attest.policy.digest"
    assert refused.component == "kernel"
    assert refused.reason.startswith("kernel: digest ")
    assert "not in policy (approved versions: 1.0, 1.1)" in refused.reason
    # the quote and log were genuine: the replayed PCR values are in the verdict
    assert set(refused.verdict.pcr_values) == {0, 1, 4, 8, 9}
    assert not verdict.trusted and verdict.failing_component == "kernel"
    assert verdict.summary.startswith("[attest.policy.digest] kernel: digest")


def test_log_edited_to_golden_digest_is_a_replay_mismatch(swtpm: Swtpm) -> None:
    verifier = AttestationVerifier(golden())
    golden_kernel = default_components("1.0")[2].event()
    with booted(swtpm, tampered(default_components("1.0"), "kernel")) as device:
        log = decode_event_log(device.log)
        forged = EventLog(
            tuple(golden_kernel if e.component == "kernel" else e for e in log.events)
        )
        assert forged != log
        refused = refusal(
            verifier, device, device.answer(verifier.challenge(DEVICE, NOW), log=forged.encode())
        )
        truncated = EventLog(log.events[:-1])  # drop the agent's measurement
        cut = refusal(
            verifier, device, device.answer(verifier.challenge(DEVICE, NOW), log=truncated.encode())
        )
    assert refused.check == "attest.eventlog.replay"
    assert "forged, truncated" in refused.reason
    assert cut.check == "attest.eventlog.replay"
    assert not refused.verdict.pcr_values


def test_replayed_quote_is_refused(swtpm: Swtpm) -> None:
    verifier = AttestationVerifier(golden(), NonceBook(ttl=60))
    with booted(swtpm, default_components("1.0")) as device:
        first = device.answer(verifier.challenge(DEVICE, NOW))
        assert verifier.verify(DEVICE, first, device.ak_public, NOW + 1).trusted
        # the same quote again, even while a new challenge is open: its nonce was consumed
        verifier.challenge(DEVICE, NOW + 5)
        again = refusal(verifier, device, first)
        # a quote answering a challenge that expired before the report came
        late = device.answer(verifier.challenge(DEVICE, NOW))
        with pytest.raises(AttestationRefused) as expired:
            verifier.verify(DEVICE, late, device.ak_public, NOW + 60)
        # a nonce the service never issued, and a quote presented for another device
        made_up = device.answer(Challenge(DEVICE, b"\x07" * 32, verifier.policy.pcrs, NOW, NOW))
        unknown = refusal(verifier, device, made_up)
        other_device = device.answer(verifier.challenge("dev-0002", NOW))
        stolen = refusal(verifier, device, other_device)
    assert again.check == "attest.nonce.replayed"
    assert expired.value.check == "attest.nonce.expired"
    assert unknown.check == "attest.nonce.unknown"
    assert stolen.check == "attest.nonce.unknown"
    # the expired one is used up too: answering it again is a replay
    assert refusal(verifier, device, late).check == "attest.nonce.replayed"


def test_quote_by_another_ak_is_refused(swtpm_factory: SwtpmFactory) -> None:
    enrolled, other = swtpm_factory.start(), swtpm_factory.start(fresh=True)
    verifier = AttestationVerifier(golden())
    with (
        booted(enrolled, default_components("1.0")) as device,
        booted(other, default_components("1.0")) as impostor,
    ):
        evidence = impostor.answer(verifier.challenge(DEVICE, NOW))
        refused = refusal(verifier, device, evidence)  # checked with the enrolled device's AK
    assert refused.check == "tpm.attest.signature"
    assert refused.component is None


def test_policy_refusals_name_the_component(swtpm_factory: SwtpmFactory) -> None:
    verifier = AttestationVerifier(golden())
    release = list(default_components("1.0"))
    cases: list[tuple[list[FirmwareComponent], str, str]] = [
        (release[:-1], "attest.policy.missing", "agent"),
        (
            [*release, FirmwareComponent("debug-shell", "1", b"sh", pcr=9)],
            "attest.policy.unknown-component",
            "debug-shell",
        ),
        (
            [dataclasses.replace(c, pcr=8) if c.name == "kernel" else c for c in release],
            "attest.policy.pcr",
            "kernel",
        ),
        (
            [
                FirmwareComponent("kernel", "1.1", demo_image("kernel", "1.0"))
                if c.name == "kernel"
                else c
                for c in release
            ],
            "attest.policy.version",
            "kernel",
        ),
        (
            [*release, FirmwareComponent("modem-fw", "3", b"m", pcr=10)],
            "attest.eventlog.unquoted",
            "modem-fw",
        ),
    ]
    for components, check, component in cases:
        with booted(swtpm_factory.start(), components) as device:
            refused = refusal(verifier, device, device.answer(verifier.challenge(DEVICE, NOW)))
        assert (refused.check, refused.component) == (check, component), refused.reason
        assert refused.reason.startswith(f"{component}: ")


def test_selection_and_log_refusals(swtpm: Swtpm) -> None:
    verifier = AttestationVerifier(golden())
    with booted(swtpm, default_components("1.0")) as device:
        challenge = verifier.challenge(DEVICE, NOW)
        fewer = device.answer(challenge, pcrs=(0, 1, 4, 8))
        assert refusal(verifier, device, fewer).check == "attest.pcrs"
        # claims the asked selection but the TPM quoted fewer PCRs
        challenge = verifier.challenge(DEVICE, NOW)
        quote = device.store.quote(device.ak, challenge.nonce, (0, 1, 4))
        lying = Evidence(challenge.nonce, quote, challenge.pcrs, device.log)
        assert refusal(verifier, device, lying).check == "tpm.quote.pcr-select"
        garbage = device.answer(verifier.challenge(DEVICE, NOW), log=b"\xa1\x00\x00")
        assert refusal(verifier, device, garbage).check == "eventlog.malformed"
        cut = device.answer(verifier.challenge(DEVICE, NOW), log=device.log[:-3])
        assert refusal(verifier, device, cut).check == "eventlog.cbor"
        duplicated = decode_event_log(device.log)
        doubled = EventLog((*duplicated.events, duplicated.events[2]))
        twice = device.answer(verifier.challenge(DEVICE, NOW), log=doubled.encode())
        refused = refusal(verifier, device, twice)
        assert (refused.check, refused.component) == ("attest.eventlog.duplicate", "kernel")


def test_verdict_is_recorded_in_the_registry(swtpm: Swtpm, tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    create_schema(engine)
    verifier = AttestationVerifier(golden())
    with booted(swtpm, tampered(default_components("1.0"), "rootfs")) as device:
        evidence = device.answer(verifier.challenge(DEVICE, NOW))
        verdict = verifier.evaluate(DEVICE, evidence, device.ak_public, NOW + 3)
    try:
        with session_factory(engine).begin() as session:
            registry = Registry(session)
            registry.register_device(
                DEVICE, ek_cert_fingerprint="ab" * 32, devid_cert_pem="PEM", now=NOW
            )
            result = AttestationResult.TRUSTED if verdict.trusted else AttestationResult.UNTRUSTED
            record = registry.record_attestation(
                DEVICE, result, reason=verdict.summary, now=NOW + 3
            )
    finally:
        engine.dispose()
    assert record.attestation_result is AttestationResult.UNTRUSTED
    assert record.attestation_reason is not None
    assert record.attestation_reason.startswith("[attest.policy.digest] rootfs: digest ")


def test_a_remembered_log_binds_nothing_but_its_bytes(swtpm_factory: SwtpmFactory) -> None:
    """Logs are remembered decoded by their bytes (``provisioning.attestation.DECODED_LOGS``):
    a genuine device's log, once trusted, sent by a device whose firmware is tampered is still
    refused by its quote (replay mismatch), and a garbled log is refused every time."""
    verifier = AttestationVerifier(golden())
    with booted(swtpm_factory.start(), default_components("1.0")) as genuine:
        first = verifier.verify(
            DEVICE, genuine.answer(verifier.challenge(DEVICE, NOW)), genuine.ak_public, NOW
        )
        again = verifier.verify(
            DEVICE, genuine.answer(verifier.challenge(DEVICE, NOW)), genuine.ak_public, NOW
        )
        golden_log = genuine.log
    assert first.trusted and again.trusted
    assert dict(again.pcr_values) == dict(first.pcr_values)
    with booted(
        swtpm_factory.start(fresh=True), tampered(default_components("1.0"), "kernel")
    ) as forger:
        borrowed = refusal(
            verifier, forger, forger.answer(verifier.challenge(DEVICE, NOW), log=golden_log)
        )
        garbled = [
            refusal(
                verifier, forger, forger.answer(verifier.challenge(DEVICE, NOW), log=b"\xa1")
            ).check
            for _ in range(2)
        ]
    assert borrowed.check == "attest.eventlog.replay"
    assert garbled == ["eventlog.cbor", "eventlog.cbor"]
