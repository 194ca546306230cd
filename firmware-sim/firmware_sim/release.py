"""A simulated device's firmware releases: the manifest an operator gives ``keyfleet release
add``, and "installing" a release (docs/releases.md).

**Manifest** (JSON): what a release's measured boot extends, one entry per component, in boot
order::

    {"version": "1.1",
     "components": [{"name": "bootloader", "version": "1.1", "pcr": 0, "sha256": "64 hex"}, ...]}

A build system writes it next to the images it signs; ``firmware-sim release manifest`` writes the
one of a demo release, so that the fleet approves exactly what the simulated devices boot.

**Installed release**: a real device updates into its inactive A/B slot and switches the boot
slot in one atomic step. Here the slot switch is one file, ``<state>/firmware/installed``, holding
the version the next boot measures (``firmware-sim device`` without ``--version`` boots it;
without the file, the demo release 1.0). A device killed while "installing" boots either the old
or the new release, never a mix.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agent.fsio import atomic_write
from agent.protocol.errors import ConfigError, ProtocolError
from agent.protocol.eventlog import check_version
from firmware_sim.boot import FirmwareComponent, default_components
from firmware_sim.device import DEVICE_LOCK

DEFAULT_VERSION = "1.0"
INSTALLED_FILE = Path("firmware") / "installed"


def manifest(version: str, components: Iterable[FirmwareComponent]) -> dict[str, Any]:
    """The manifest of release ``version`` made of ``components`` (in boot order)."""
    return {
        "version": version,
        "components": [
            {"name": c.name, "version": c.version, "pcr": c.pcr, "sha256": c.digest().hex()}
            for c in components
        ],
    }


def demo_manifest(version: str) -> dict[str, Any]:
    """The manifest of the demo release ``version`` (``boot.default_components``)."""
    return manifest(version, default_components(version))


def write_manifest(path: str | os.PathLike[str], document: dict[str, Any]) -> None:
    atomic_write(path, (json.dumps(document, indent=2) + "\n").encode(), mode=0o644)


def _checked(version: str) -> str:
    try:
        return check_version(version)
    except ProtocolError as exc:
        raise ConfigError(f"release version: {exc.reason}") from None


def installed_version(state_dir: str | os.PathLike[str]) -> str:
    """The release the device's next boot measures (the demo release 1.0 if none was installed)."""
    path = Path(state_dir) / INSTALLED_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return DEFAULT_VERSION
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the installed release: {exc}") from None
    return _checked(text)


def installed(state_dir: str | os.PathLike[str]) -> bool:
    """Whether a release was ever installed (else the device boots what it is told)."""
    return (Path(state_dir) / INSTALLED_FILE).exists()


def running_simulator(state_dir: str | os.PathLike[str]) -> int | None:
    """The pid of the ``firmware-sim device`` running ``state_dir`` (it holds the device lock and
    wrote its pid into it), or None when none runs."""
    path = Path(state_dir) / DEVICE_LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)  # nobody holds it: no simulator runs this device
        return None
    finally:
        os.close(fd)


def install(state_dir: str | os.PathLike[str], version: str) -> None:
    """Make ``version`` the release of the device's next boot (atomically: a crash leaves the
    old or the new one)."""
    path = Path(state_dir) / INSTALLED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (_checked(version) + "\n").encode(), mode=0o644)
