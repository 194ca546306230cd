"""Measured boot (firmware_sim.boot) into a real swtpm: the PCRs hold what the event log replays
to, the log file is written atomically and decodes, tampering moves exactly the tampered
component's PCR, and a TPM that was not reset is refused before anything is extended."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from agent.protocol.errors import ConfigError, StateError
from agent.protocol.eventlog import EventType, MeasurementEvent, decode_event_log, replay
from agent.protocol.release import expected_pcrs
from agent.tpm import TPMStore
from firmware_sim import release
from firmware_sim.boot import (
    BOOT_ORDER,
    PCR_MAP,
    FirmwareComponent,
    default_components,
    demo_image,
    measured_boot,
    tampered,
)
from tests.fixtures.swtpm import Swtpm, SwtpmFactory

pytestmark = pytest.mark.tpm

PCRS = sorted(set(PCR_MAP.values()))


def test_boot_extends_pcrs_to_what_the_log_replays(swtpm: Swtpm, tmp_path: Path) -> None:
    components = default_components("1.0")
    log_path = tmp_path / "eventlog.cbor"
    with TPMStore(swtpm.tcti) as store:
        assert store.pcr_read(range(16)) == {i: bytes(32) for i in range(16)}  # reset state
        log = measured_boot(store, components, log_path=log_path)
        pcrs = store.pcr_read(PCRS)
    assert [e.component for e in log.events] == list(BOOT_ORDER)
    for event, component in zip(log.events, components, strict=True):
        assert event.pcr == PCR_MAP[component.name]
        assert event.digest == hashlib.sha256(component.read_image()).digest()
        assert event.version == "1.0"
    assert log.events[1].event_type is EventType.CONFIG
    assert replay(log, PCRS) == pcrs
    # each PCR got exactly one extend of its component's digest
    by_pcr = {e.pcr: e.digest for e in log.events}
    assert all(pcrs[i] == hashlib.sha256(bytes(32) + by_pcr[i]).digest() for i in PCRS)
    assert decode_event_log(log_path.read_bytes()) == log
    assert log_path.stat().st_mode & 0o777 == 0o644
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_tampered_kernel_changes_only_the_kernel_pcr(swtpm_factory: SwtpmFactory) -> None:
    good, bad = swtpm_factory.start(), swtpm_factory.start()
    with TPMStore(good.tcti) as store:
        measured_boot(store, default_components())
        good_pcrs = store.pcr_read(PCRS)
    evil = tampered(default_components(), "kernel")
    assert [c.version for c in evil] == [c.version for c in default_components()]
    with TPMStore(bad.tcti) as store:
        log = measured_boot(store, evil)
        bad_pcrs = store.pcr_read(PCRS)
    assert [i for i in PCRS if good_pcrs[i] != bad_pcrs[i]] == [PCR_MAP["kernel"]]
    assert replay(log, PCRS) == bad_pcrs


def test_boot_on_a_tpm_that_was_not_reset_is_refused(swtpm: Swtpm, tmp_path: Path) -> None:
    log_path = tmp_path / "eventlog.cbor"
    with TPMStore(swtpm.tcti) as store:
        measured_boot(store, default_components())
        before = store.pcr_read(PCRS)
        with pytest.raises(StateError, match=r"not in their reset state"):
            measured_boot(store, default_components(), log_path=log_path)
        assert store.pcr_read(PCRS) == before  # nothing extended
    assert not log_path.exists()
    # a reboot (swtpm restart with startup-clear) resets the PCRs: boot works again
    swtpm.restart()
    with TPMStore(swtpm.tcti) as store:
        log = measured_boot(store, default_components())
        assert replay(log, PCRS) == store.pcr_read(PCRS) == before


def test_images_from_files_and_explicit_pcrs(swtpm: Swtpm, tmp_path: Path) -> None:
    image = tmp_path / "kernel.img"
    image.write_bytes(demo_image("kernel", "2.0"))
    from_file = FirmwareComponent("kernel", "2.0", image)
    from_bytes = FirmwareComponent("kernel", "2.0", demo_image("kernel", "2.0"))
    assert from_file.digest() == from_bytes.digest()
    extra = FirmwareComponent("modem-fw", "7", b"modem", pcr=10)
    with TPMStore(swtpm.tcti) as store:
        log = measured_boot(store, [from_file, extra])
        assert replay(log, [4, 10]) == store.pcr_read([4, 10])
    with pytest.raises(ConfigError, match="cannot read image"):
        FirmwareComponent("kernel", "2.0", tmp_path / "missing.img").digest()


def test_component_and_tamper_errors() -> None:
    with pytest.raises(ConfigError, match="not in the PCR map"):
        FirmwareComponent("modem-fw", "7", b"x")
    with pytest.raises(ConfigError, match="PCR 16"):
        FirmwareComponent("modem-fw", "7", b"x", pcr=16)
    with pytest.raises(ConfigError):
        FirmwareComponent("Kernel", "1.0", b"x")
    with pytest.raises(ConfigError):
        FirmwareComponent("kernel", "1.0 final", b"x")
    with pytest.raises(ConfigError, match="no component"):
        tampered(default_components(), "initrd")
    # demo images are deterministic and differ per name and version
    assert default_components("1.0") == default_components("1.0")
    assert demo_image("kernel", "1.0") != demo_image("kernel", "1.1")
    assert demo_image("kernel", "1.0") != demo_image("rootfs", "1.0")
    assert "image=" not in repr(default_components()[0])  # no image bytes in reprs


def test_duplicate_component_refused_before_the_tpm(swtpm: Swtpm) -> None:
    kernel = default_components()[2]
    with TPMStore(swtpm.tcti) as store:
        with pytest.raises(ConfigError, match="measured twice: kernel"):
            measured_boot(store, [kernel, kernel])
        assert store.pcr_read([4]) == {4: bytes(32)}


def test_release_manifest_predicts_the_pcrs_a_boot_leaves(swtpm: Swtpm) -> None:
    """What the fleet signs for a release (agent.protocol.release.expected_pcrs of its manifest)
    is exactly what a device booting that release holds, so its state opens after the update."""
    document = release.demo_manifest("1.1")
    events = [
        MeasurementEvent(
            c["pcr"], EventType.IMAGE, c["name"], c["version"], bytes.fromhex(c["sha256"])
        )
        for c in document["components"]
    ]
    expected = expected_pcrs(events)
    with TPMStore(swtpm.tcti) as store:
        measured_boot(store, default_components("1.1"))
        assert store.pcr_read(sorted(expected)) == expected
    assert expected != expected_pcrs(
        MeasurementEvent(e.pcr, e.event_type, e.component, e.version, bytes(32)) for e in events
    )
