"""Runtime attestation through the delivery service (sans-I/O core, real SQLite file): members
are software MLS devices (tests/service_members.py) whose attestation answers are real: each has
its own swtpm, booted by firmware_sim's measured boot, and quotes with a TPM-resident AK that is
registered in the registry as enrollment registers it. Operators sign ``op.attest``; the verdict
comes back as an ``op.result``, is recorded, audited, listed by ``keyfleet devices``, and with
quarantine on takes the device out of its groups through a commit by another member."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest

from agent.protocol.attest import tpm_name
from agent.protocol.eventlog import EventLog
from agent.protocol.wire.envelope import VerifiedMessage
from agent.protocol.wire.messages.attestation import AttestChallenge, AttestReport
from agent.protocol.wire.messages.key_state import KeyStateReport
from agent.protocol.wire.messages.operator import AttestDevice
from agent.protocol.wire.messages.result import ResultStatus
from agent.tpm import KeyKind, TPMStore
from agent.tpm.blob import KeyBlob
from firmware_sim.boot import FirmwareComponent, default_components, measured_boot, tampered
from provisioning.db.schema import Device
from provisioning.listings import list_devices
from provisioning.pki import cert_to_pem, issue_devid_cert
from provisioning.policy import policy_from_components
from provisioning.registry import AttestationResult, DeviceState, Registry
from provisioning.service.core import AttestationSettings, DeliveryService
from tests.fixtures.swtpm import Swtpm, SwtpmFactory
from tests.pure.test_service_core import Fleet, agreed, create_g1, make_fleet
from tests.service_members import Outgoing, SoftDevice, utc

pytestmark = pytest.mark.tpm


@dataclass
class AttestingDevice(SoftDevice):
    """A software member whose attestation answers come from a real TPM: its swtpm, its AK blob
    (loaded for each quote, as keyagent does) and the event log of its last measured boot."""

    swtpm: Swtpm | None = field(default=None, repr=False)
    ak_blob: KeyBlob | None = field(default=None, repr=False)
    event_log: bytes = field(default=b"", repr=False)
    challenges: list[AttestChallenge] = field(default_factory=list, repr=False)
    reports: list[AttestReport] = field(default_factory=list, repr=False)

    def boot(self, components: Sequence[FirmwareComponent]) -> None:
        """Power-cycle the TPM (PCRs back to zero) and measure ``components`` into it."""
        assert self.swtpm is not None
        self.swtpm.restart()
        with TPMStore(self.swtpm.tcti) as store:
            log: EventLog = measured_boot(store, components)
        self.event_log = log.encode()

    def quote(self, nonce: bytes, pcrs: tuple[int, ...]) -> AttestReport:
        assert self.swtpm is not None and self.ak_blob is not None
        with TPMStore(self.swtpm.tcti) as store, store.load_key(self.ak_blob) as ak:
            quote = store.quote(ak, nonce, pcrs)
        return AttestReport(
            nonce=nonce,
            quote=quote.attest,
            signature=quote.signature,
            pcr_bank="sha256",
            pcrs=pcrs,
            event_log=self.event_log,
            keys=(),
        )

    def _handle(self, message: VerifiedMessage, now: int) -> list[Outgoing]:
        body = message.body
        if isinstance(body, AttestChallenge):
            self.challenges.append(body)
            report = self.quote(body.nonce, body.pcrs)
            self.reports.append(report)
            return [self.report(report, now)]
        return super()._handle(message, now)


GOOD = default_components("1.0")


def make_attesting(
    fleet: Fleet, swtpm_factory: SwtpmFactory, kind: type[AttestingDevice] = AttestingDevice
) -> None:
    """Give every member a TPM, an AK registered in the registry, and a good boot (as ``kind``,
    an ``AttestingDevice`` or a subclass)."""
    assert fleet.device_ca is not None
    for name, device in list(fleet.devices.items()):
        swtpm = swtpm_factory.start()
        with TPMStore(swtpm.tcti) as store:
            ak_blob = store.create_key(KeyKind.AK)
            with store.load_key(ak_blob) as ak:
                ak_public = ak.public_area
        # as enrollment issues it: the DevID certificate names the AK (the service checks it)
        cert = issue_devid_cert(
            fleet.device_ca,
            device.devid.public_key(),
            device_id=name,
            hardware_serial=f"SN-{name}",
            now=utc(fleet.now),
            valid_for=timedelta(days=1),
            ak_name=tpm_name(ak_public),
        )
        cert_pem = cert_to_pem(cert).decode()
        member = kind(device.device_id, device.devid, cert_pem, device.service_key)
        member.swtpm, member.ak_blob = swtpm, ak_blob

        with fleet.sessions.begin() as session:
            row = session.get(Device, name)
            assert row is not None
            # what enrollment stores (Registry.register_device(ak_public=, devid_cert_pem=))
            row.ak_public = ak_public
            row.devid_cert_pem = cert_pem
        member.boot(GOOD)
        fleet.devices[name] = member


def attesting_fleet(
    tmp_path: Path,
    swtpm_factory: SwtpmFactory,
    *,
    quarantine: bool,
    names: tuple[str, ...] = ("dev-1", "dev-2", "dev-3"),
    url: str | None = None,
) -> Iterator[Fleet]:
    """A fleet of ``AttestingDevice`` members (``names``) on SQLite, or on ``url``."""
    for fleet in make_fleet(tmp_path, names, url=url):
        old = fleet.service
        fleet.service = DeliveryService(
            fleet.sessions,
            signing_key=old._env.key,
            operator_ca=old._env.operator_ca,
            device_ca=old._env.devices.device_ca,
            settings=old.settings,
            attestation=AttestationSettings(
                policy=policy_from_components(GOOD), interval=600, quarantine=quarantine
            ),
        )
        make_attesting(fleet, swtpm_factory)
        yield fleet


@pytest.fixture
def fleet(tmp_path: Path, swtpm_factory: SwtpmFactory) -> Iterator[Fleet]:
    yield from attesting_fleet(tmp_path, swtpm_factory, quarantine=True)


def member(fleet: Fleet, name: str) -> AttestingDevice:
    device = fleet.devices[name]
    assert isinstance(device, AttestingDevice)
    return device


def attest(fleet: Fleet, device_id: str, operator: str = "op-alice") -> tuple[ResultStatus, str]:
    body = AttestDevice(os.urandom(16), device_id)
    fleet.send(fleet.operators[operator].command(body, fleet.now))
    result = fleet.final(body.command_id)
    return result.status, result.detail


def device_row(fleet: Fleet, device_id: str) -> dict[str, object]:
    with fleet.sessions() as session:
        return next(r for r in list_devices(session) if r["device_id"] == device_id)


def test_trusted_then_tampered_kernel_is_named_and_quarantined_out_of_its_group(
    fleet: Fleet,
) -> None:
    create_g1(fleet)
    epoch = fleet.epoch("g1")

    status, detail = attest(fleet, "dev-1")
    assert status is ResultStatus.DONE, detail
    assert "dev-1 trusted: [attest.trusted] approved firmware" in detail
    assert "kernel 1.0" in detail and "active" in detail  # registered -> active
    row = device_row(fleet, "dev-1")
    assert row["attestation"] == "trusted" and row["state"] == "active"

    # dev-3 reboots into a kernel with one byte flipped (same version label)
    member(fleet, "dev-3").boot(tampered(GOOD, "kernel"))
    status, detail = attest(fleet, "dev-3")
    assert status is ResultStatus.FAILED
    assert "dev-3 untrusted: [attest.policy.digest] kernel: digest" in detail
    assert "quarantined; removal from g1 queued" in detail
    row = device_row(fleet, "dev-3")
    assert row["attestation"] == "untrusted" and row["state"] == "quarantined"
    assert str(row["attestation_reason"]).startswith("[attest.policy.digest] kernel:")

    # the removal is a commit by another member; the rest of the group agrees on the new epoch
    assert fleet.members("g1") == ["dev-1", "dev-2"]
    assert fleet.epoch("g1") == epoch + 1
    assert len(agreed(fleet, "g1")) == 1
    assert "g1" not in fleet.devices["dev-3"].groups  # it processed its own removal
    with fleet.sessions() as session:
        assert Registry(session).ack_status("g1").agreed
        removal = Registry(session).commits_from("g1", epoch)[0]
    assert removal.committer in ("dev-1", "dev-2")

    entries = fleet.audit_entries()
    verdict = next(e for e in entries if e.action == "attest.verdict" and e.target == "dev-3")
    assert verdict.actor == "device:dev-3" and "kernel" in verdict.reason
    quarantine = next(e for e in entries if e.action == "device.quarantine")
    assert quarantine.actor == "service" and quarantine.target == "dev-3"
    assert '"groups":"g1"' in quarantine.details
    commit = [e for e in entries if e.action == "group.commit"][-1]
    assert '"removes":"dev-3"' in commit.details

    # a quarantined device's other reports are refused like a revoked device's
    before = fleet.service.rejections.count("ds.device.quarantined")
    fleet.send(fleet.devices["dev-3"].report(KeyStateReport(()), fleet.now))
    assert fleet.service.rejections.count("ds.device.quarantined") == before + 1

    # ...but it can be attested again: fixed firmware makes it active, not a member again
    fleet.now += 5
    member(fleet, "dev-3").boot(GOOD)
    status, detail = attest(fleet, "dev-3")
    assert status is ResultStatus.DONE, detail
    assert "not re-added to any group" in detail
    row = device_row(fleet, "dev-3")
    assert row["state"] == "active" and row["groups"] == []


def test_replayed_quote_and_unrequested_nonce_are_refused(fleet: Fleet) -> None:
    status, _ = attest(fleet, "dev-2")
    assert status is ResultStatus.DONE
    device = member(fleet, "dev-2")
    answered = device.reports[-1]
    with fleet.sessions() as session:
        first = Registry(session).device("dev-2")
    audit_before = len(fleet.audit_entries())

    # the same quote again, in a fresh envelope (new seq): the old nonce is spent
    fleet.now += 3
    fleet.send(device.report(answered, fleet.now))
    assert fleet.service.rejections.count("attest.nonce.replayed") == 1

    # a quote over a nonce the service never issued
    fresh = device.quote(os.urandom(32), answered.pcrs)
    fleet.send(device.report(fresh, fleet.now))
    assert fleet.service.rejections.count("attest.nonce.unknown") == 1

    # neither changed the verdict; both refusals are audited with their check ids
    with fleet.sessions() as session:
        after = Registry(session).device("dev-2")
    assert (after.attestation_result, after.attested_at) == (
        first.attestation_result,
        first.attested_at,
    )
    refused = fleet.audit_entries()[audit_before:]
    assert [e.outcome.value for e in refused] == ["refused", "refused"]
    assert "[attest.nonce.replayed]" in refused[0].reason
    assert "[attest.nonce.unknown]" in refused[1].reason


def test_old_quote_under_a_fresh_nonce_is_untrusted(fleet: Fleet) -> None:
    """A device that answers a new challenge with an old (good) quote, relabelled with the new
    nonce: the TPM's extraData still holds the old nonce, so the quote is not fresh."""
    status, _ = attest(fleet, "dev-1")
    assert status is ResultStatus.DONE
    device = member(fleet, "dev-1")
    old = device.reports[-1]

    publishes = fleet.service.challenge("dev-1", fleet.now)
    assert [p.topic for p in publishes] == ["kf/v1/dev/dev-1/cmd"]
    fleet.deliver(publishes)  # the device quotes honestly; that answer is dropped here
    challenge = device.challenges[-1]
    relabelled = AttestReport(
        challenge.nonce, old.quote, old.signature, "sha256", old.pcrs, old.event_log, ()
    )
    fleet.send(device.report(relabelled, fleet.now))
    row = device_row(fleet, "dev-1")
    assert row["attestation"] == "untrusted"
    assert str(row["attestation_reason"]).startswith("[tpm.attest.nonce]")


def test_scheduled_attestation_and_no_quarantine_without_the_option(
    tmp_path: Path, swtpm_factory: SwtpmFactory
) -> None:
    for fleet in attesting_fleet(tmp_path, swtpm_factory, quarantine=False):
        create_g1(fleet, "dev-1", "dev-2")
        member(fleet, "dev-2").boot(tampered(GOOD, "rootfs"))
        # every member was heard from (the group flow): never attested, so due at the first scan
        fleet.tick(1)
        with fleet.sessions() as session:
            records = {d.device_id: d for d in Registry(session).devices()}
        assert records["dev-1"].attestation_result is AttestationResult.TRUSTED
        assert records["dev-2"].attestation_result is AttestationResult.UNTRUSTED
        assert "rootfs" in (records["dev-2"].attestation_reason or "")
        # without the option the untrusted device keeps its state and its group
        assert records["dev-2"].state is DeviceState.REGISTERED
        assert fleet.members("g1") == ["dev-1", "dev-2"]
        asked = len(member(fleet, "dev-1").challenges)
        # not due again before the interval; due after it
        fleet.tick(300)
        assert len(member(fleet, "dev-1").challenges) == asked
        fleet.now += 300
        # the device is online (a report within the online window) and due again
        fleet.send(fleet.devices["dev-1"].report(KeyStateReport(()), fleet.now))
        fleet.tick(1)
        assert len(member(fleet, "dev-1").challenges) == asked + 1
        # dev-3 was never heard from: not challenged (it would answer an expired nonce)
        assert member(fleet, "dev-3").challenges == []


def test_an_ak_swapped_into_the_database_is_refused_at_use(
    fleet: Fleet, swtpm_factory: SwtpmFactory
) -> None:
    """Adversary: a database writer stores another TPM's AK for dev-2, so that quotes by that
    AK would be believed for dev-2. The stored AK must be the one dev-2's DevID certificate
    names: dev-2's attestation report is refused at use with ``cred.stored`` (counted,
    audited), no verdict is recorded, the device's state is unchanged."""
    other = swtpm_factory.start()
    with TPMStore(other.tcti) as store, store.load_key(store.create_key(KeyKind.AK)) as ak:
        foreign = ak.public_area
    with fleet.sessions.begin() as session:
        row = session.get(Device, "dev-2")
        assert row is not None
        row.ak_public = foreign
    before = fleet.service.rejections.count("cred.stored")
    body = AttestDevice(os.urandom(16), "dev-2")
    fleet.send(fleet.operators["op-alice"].command(body, fleet.now))
    assert member(fleet, "dev-2").reports  # the device answered its challenge
    assert fleet.service.rejections.count("cred.stored") == before + 1
    entries = fleet.audit_entries()
    assert not any(e.action == "attest.verdict" and e.target == "dev-2" for e in entries)
    refusal = entries[-1]
    assert refusal.actor == "device:dev-2" and refusal.outcome.value == "refused"
    assert "[cred.stored]" in (refusal.reason or "")
    row_now = device_row(fleet, "dev-2")
    assert row_now["attestation"] is None and row_now["state"] == "registered"
