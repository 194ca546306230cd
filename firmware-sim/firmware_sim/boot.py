"""Measured boot of a simulated device: hash each firmware component, extend it into its PCR in
boot order, and write down what was extended (the event log, ``agent.protocol.eventlog``).

A real device does this in its boot ROM, bootloader and kernel, each stage measuring the next
before running it. Here one function plays all stages against a TPM (swtpm), with the component
images as inputs, so that a test can boot tampered firmware and watch attestation refuse it.

PCR map (docs/attestation.md), loosely after the TCG PC Client profile's split of code and
configuration and of platform firmware versus the OS:

    PCR 0  bootloader   code   the first stage that the ROM runs (platform firmware)
    PCR 1  boot-config  data   the bootloader's configuration: kernel command line, device tree
    PCR 4  kernel       code   the kernel image the bootloader starts
    PCR 8  rootfs       code   the root file system (its dm-verity root hash, in a real device)
    PCR 9  agent        code   the keyagent release running the device's keys

PCR 7 (secure-boot policy) and 16 (debug) are left out on purpose: PCR 16 is resettable at
locality 0, so nothing a verifier relies on may live there.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from agent.fsio import atomic_write
from agent.protocol.errors import ConfigError, ProtocolError, StateError
from agent.protocol.eventlog import (
    EventLog,
    EventType,
    MeasurementEvent,
    check_component_name,
    check_version,
)
from agent.tpm.store import TPMStore

PCR_MAP: Mapping[str, int] = {
    "bootloader": 0,
    "boot-config": 1,
    "kernel": 4,
    "rootfs": 8,
    "agent": 9,
}
"""Which PCR each standard component is measured into."""

BOOT_ORDER: tuple[str, ...] = ("bootloader", "boot-config", "kernel", "rootfs", "agent")

_EVENT_TYPES: Mapping[str, EventType] = {"boot-config": EventType.CONFIG}

_DEMO_SIZES: Mapping[str, int] = {
    "bootloader": 16 * 1024,
    "kernel": 64 * 1024,
    "rootfs": 128 * 1024,
    "agent": 8 * 1024,
}


@dataclass(frozen=True)
class FirmwareComponent:
    """One firmware component as the boot chain sees it. ``image`` is the bytes themselves or
    the path of a file holding them; ``pcr`` and ``event_type`` default from the PCR map."""

    name: str
    version: str
    image: bytes | Path = field(repr=False)
    pcr: int = -1
    event_type: EventType = EventType.IMAGE

    def __post_init__(self) -> None:
        try:
            check_component_name(self.name)
            check_version(self.version)
        except ProtocolError as exc:
            raise ConfigError(f"firmware component: {exc.reason}") from None
        if self.pcr == -1:
            if self.name not in PCR_MAP:
                raise ConfigError(
                    f"firmware component {self.name!r} is not in the PCR map "
                    f"({', '.join(PCR_MAP)}): give its pcr"
                )
            object.__setattr__(self, "pcr", PCR_MAP[self.name])
            object.__setattr__(self, "event_type", _EVENT_TYPES.get(self.name, self.event_type))
        if not 0 <= self.pcr <= 23 or self.pcr == 16:
            raise ConfigError(f"firmware component {self.name!r}: PCR {self.pcr} not usable")

    def read_image(self) -> bytes:
        if isinstance(self.image, bytes):
            return self.image
        try:
            return Path(self.image).read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"firmware component {self.name!r}: cannot read image {self.image}: "
                f"{exc.strerror or exc}"
            ) from None

    def digest(self) -> bytes:
        """SHA-256 of the image: what the previous boot stage extends."""
        return hashlib.sha256(self.read_image()).digest()

    def event(self) -> MeasurementEvent:
        return MeasurementEvent(self.pcr, self.event_type, self.name, self.version, self.digest())


def demo_image(name: str, version: str) -> bytes:
    """A deterministic stand-in image for ``name`` at ``version``: SHA-256 in counter mode over
    the name and version, so every run (and every test) sees the same bytes."""
    if name == "boot-config":
        return (
            f"console=serial0,115200 root=/dev/mmcblk0p2 ro rootwait keyfleet.release={version}\n"
        ).encode()
    size = _DEMO_SIZES.get(name, 4096)
    seed = f"keyfleet-demo-firmware/{name}/{version}".encode()
    blocks = (hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(size // 32))
    return b"".join(blocks)


def default_components(version: str = "1.0") -> tuple[FirmwareComponent, ...]:
    """The demo device's firmware release ``version``: every standard component, in boot order."""
    return tuple(FirmwareComponent(name, version, demo_image(name, version)) for name in BOOT_ORDER)


def tampered(components: Sequence[FirmwareComponent], name: str) -> tuple[FirmwareComponent, ...]:
    """The same release with one byte of ``name``'s image flipped and the version string left as
    it was: what an attacker who patched the kernel would boot."""
    if name not in {c.name for c in components}:
        raise ConfigError(f"no component {name!r} to tamper with")
    out: list[FirmwareComponent] = []
    for component in components:
        if component.name == name:
            image = bytearray(component.read_image())
            if not image:
                image.append(0)
            image[len(image) // 2] ^= 0x01
            out.append(replace(component, image=bytes(image)))
        else:
            out.append(component)
    return tuple(out)


def measured_boot(
    store: TPMStore,
    components: Iterable[FirmwareComponent],
    *,
    log_path: str | os.PathLike[str] | None = None,
) -> EventLog:
    """Measure ``components`` in order into ``store``'s PCRs and return the event log; if
    ``log_path`` is given, also write the encoded log there (atomically, mode 0644: the log is
    public, the quote is what makes it trustworthy).

    The PCRs used must be in their reset state (all zeros, as a TPM started with startup-clear
    has them): measuring on top of an earlier boot would give values no log can replay. A PCR
    that is not zero raises ``StateError`` before anything is extended.
    """
    parts = tuple(components)
    names = [c.name for c in parts]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"components measured twice: {', '.join(duplicates)}")
    events = [c.event() for c in parts]  # read and hash everything before touching the TPM
    log = EventLog(tuple(events))
    encoded = log.encode()
    used = sorted(log.pcrs())
    if used:
        current = store.pcr_read(used)
        dirty = [i for i in used if current[i] != bytes(32)]
        if dirty:
            raise StateError(
                f"PCRs {dirty} are not in their reset state: measured boot needs a freshly "
                "started TPM (startup-clear)"
            )
    for event in events:
        store.pcr_extend(event.pcr, event.digest)
    if log_path is not None:
        atomic_write(log_path, encoded, mode=0o644)
    return log
