"""``firmware-sim``: the device simulator's command line.

``firmware-sim device --state DIR`` runs one simulated device (``firmware_sim.device``) in the
foreground until SIGTERM or SIGINT; SIGHUP reboots it in place (``firmware-sim install --reboot``
sends it: the installed release boots). Its output is made to be read by programs: ``key: value``
lines, or with ``--json`` one JSON object per line; ``--ready-file`` gets the same object
written atomically once the console is up (and again at every change of mode).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from agent.fsio import atomic_write
from agent.protocol.errors import KeyfleetError
from agent.version import add_version_option
from firmware_sim import release
from firmware_sim.boot import FirmwareComponent
from firmware_sim.device import (
    DEFAULT_CA_DIR_NAME,
    TPM_DIR,
    SimulatedDevice,
    firmware_components,
)
from firmware_sim.swtpm import is_provisioned

EXIT_OK = 0
EXIT_FAILED = 1


def _pairs(values: Sequence[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise argparse.ArgumentTypeError(f"{what} {value!r}: expected NAME=VALUE")
        out[name] = rest
    return out


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="firmware-sim", description="keyfleet device simulator: measured boot into swtpm."
    )
    add_version_option(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    device = commands.add_parser(
        "device",
        help="run one simulated device: swtpm, measured boot, factory console on a pty",
        description=(
            "Boot a simulated device from its state directory (made on the first run: a new "
            "TPM with EK certificates from the manufacturer CA) and serve its serial console on "
            "a pty. Until provisioned the console speaks factory mode; once the station locks "
            "it, the agent (keyagent run) starts and the console answers identity only. Runs "
            "until SIGTERM or SIGINT."
        ),
    )
    device.add_argument("--state", required=True, metavar="DIR", help="the device's directory")
    device.add_argument(
        "--manufacturer-ca",
        metavar="DIR",
        help=(
            "an existing manufacturer CA directory for a new TPM (default: DIR/../manufacturer-ca, "
            "made if missing, which is said on stderr)"
        ),
    )
    device.add_argument(
        "--create-manufacturer-ca",
        action="store_true",
        help="make a new manufacturer CA at --manufacturer-ca if there is none",
    )
    device.add_argument(
        "--version",
        help="firmware release to boot (default: the installed one, see `install`; else 1.0)",
    )
    device.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="boot component NAME (bootloader, boot-config, kernel, rootfs, agent) from a file",
    )
    device.add_argument(
        "--component-version",
        action="append",
        default=[],
        metavar="NAME=VERSION",
        help="version label of one component, overriding --version",
    )
    device.add_argument(
        "--tamper",
        action="append",
        default=[],
        metavar="COMPONENT",
        help="flip one byte of COMPONENT's image (its version label unchanged)",
    )
    device.add_argument("--serial", help="hardware serial number (default: from the EK cert)")
    device.add_argument(
        "--tpm-transport",
        choices=("unix", "tcp"),
        help="swtpm socket (default: unix in the state dir if the path fits, else tcp)",
    )
    device.add_argument(
        "--no-agent", action="store_true", help="once provisioned, do not start keyagent run"
    )
    device.add_argument("--json", action="store_true", help="print JSON lines")
    device.add_argument(
        "--ready-file", metavar="PATH", help="write the device's JSON here once the console is up"
    )
    device.add_argument("-v", "--verbose", action="store_true", help="log to stderr (INFO)")
    release = commands.add_parser(
        "release",
        help="the demo firmware's release manifests (for keyfleet release add)",
    )
    release_commands = release.add_subparsers(dest="release_command", required=True)
    manifest = release_commands.add_parser(
        "manifest",
        help="write the manifest of a demo release: its components' PCRs and SHA-256 digests",
    )
    manifest.add_argument("--version", required=True, help="the release, e.g. 1.1")
    manifest.add_argument("--out", metavar="FILE", help="write here (default: stdout)")
    install = commands.add_parser(
        "install",
        help="install a release into a device: its next boot measures that release",
        description=(
            "Switch the device's boot slot to release VERSION (atomically). The running device "
            "is not touched: the new release is measured at its next boot."
        ),
    )
    install.add_argument("--state", required=True, metavar="DIR", help="the device's directory")
    install.add_argument("--version", required=True, help="the release to boot next")
    install.add_argument(
        "--reboot",
        action="store_true",
        help=(
            "then ask the running `firmware-sim device` of DIR to reboot (SIGHUP): it stops its "
            "agent, power cycles its TPM and boots the new release (the update hook of a rollout)"
        ),
    )
    fleet = commands.add_parser(
        "fleet",
        help="run N virtual devices in one process (software keys: simulation only, INSECURE)",
        description=(
            "Run N virtual devices (firmware_sim.fleet): each an agent protocol core with its own "
            "DevID certificate and MQTT connection, against the real broker and service. Keys "
            "are SOFTWARE keys: refused unless the configuration says [simulation] "
            "insecure_software_keys = true and --allow-insecure-software-keys is given. New "
            "devices are registered directly in the registry (no factory enrollment). Runs "
            "until SIGTERM or SIGINT."
        ),
    )
    fleet.add_argument("--config", required=True, metavar="FILE", help="fleet configuration")
    fleet.add_argument("--devices", required=True, type=int, metavar="N", help="how many")
    fleet.add_argument(
        "--allow-insecure-software-keys",
        action="store_true",
        help="accept software keys (simulation only; never on real devices)",
    )
    fleet.add_argument("--json", action="store_true", help="print JSON lines")
    fleet.add_argument("-v", "--verbose", action="store_true", help="log to stderr (INFO)")
    return parser


class _Reporter:
    """Prints the device's events: the ready object first, then one per change of mode."""

    def __init__(self, as_json: bool, ready_file: Path | None) -> None:
        self._json = as_json
        self._ready_file = ready_file
        self._lock = threading.Lock()

    def __call__(self, event: str, info: Mapping[str, Any]) -> None:
        with self._lock:
            if self._ready_file is not None:
                body = json.dumps({"event": event, **info}, sort_keys=True).encode()
                atomic_write(self._ready_file, body, mode=0o644)
            if self._json:
                print(json.dumps({"event": event, **info}, sort_keys=True), flush=True)
                return
            if event == "ready":
                print(f"console: {info['console']}", flush=True)
                print(f"tcti: {info['tcti']}", flush=True)
                print(f"mode: {info['mode']}", flush=True)
                for index, value in info["pcrs"].items():
                    print(f"pcr {index}: {value}", flush=True)
            elif event == "provisioned":
                print(f"provisioned: {info['device_id']}", flush=True)
            elif event == "agent":
                print(f"agent: pid {info['agent_pid']}", flush=True)


def _manufacturer_ca_check(args: argparse.Namespace) -> str | None:
    """Refuse (return the message) an explicit ``--manufacturer-ca`` that is no CA directory:
    a mistyped path would otherwise mint a new manufacturer whose EK certificates no fleet
    trusts, and enrollment would fail far from the cause. A CA made at the default place, or
    with ``--create-manufacturer-ca``, is announced on stderr with the files a fleet must trust."""
    state = Path(args.state)
    if is_provisioned(state / TPM_DIR):
        return None  # the TPM exists: the CA is not used on this run
    explicit = args.manufacturer_ca is not None
    ca_dir = Path(args.manufacturer_ca) if explicit else state.parent / DEFAULT_CA_DIR_NAME
    if (ca_dir / "swtpm_setup.conf").exists():
        return None
    if explicit and not args.create_manufacturer_ca:
        return (
            f"--manufacturer-ca {ca_dir}: no manufacturer CA there (no swtpm_setup.conf); give "
            "an existing CA directory, or add --create-manufacturer-ca to make a new one"
        )
    print(
        f"firmware-sim device: creating a new manufacturer CA in {ca_dir.resolve()}; a fleet "
        f"must trust its state/swtpm-localca-rootca-cert.pem and state/issuercert.pem "
        "(attestation.manufacturer_cas) to enroll this device",
        file=sys.stderr,
        flush=True,
    )
    return None


def _release(args: argparse.Namespace) -> int:
    try:
        document = release.demo_manifest(args.version)
    except KeyfleetError as exc:
        print(f"firmware-sim release manifest: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.out:
        release.write_manifest(args.out, document)
    else:
        print(json.dumps(document, indent=2))
    return EXIT_OK


def _install(args: argparse.Namespace) -> int:
    try:
        release.install(args.state, args.version)
    except KeyfleetError as exc:
        print(f"firmware-sim install: {exc}", file=sys.stderr)
        return EXIT_FAILED
    pid = release.running_simulator(args.state) if args.reboot else None
    if pid is None:
        print(f"{args.state}: release {args.version} installed; it boots next", flush=True)
        return EXIT_OK
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        print(f"firmware-sim install: cannot ask pid {pid} to reboot: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{args.state}: release {args.version} installed; rebooting (pid {pid})", flush=True)
    return EXIT_OK


def _components(args: argparse.Namespace, version: str) -> tuple[FirmwareComponent, ...]:
    return firmware_components(
        version,
        images=_pairs(args.image, "--image"),
        versions=_pairs(args.component_version, "--component-version"),
        tamper=args.tamper,
    )


def _device(args: argparse.Namespace) -> int:
    try:
        components = _components(args, args.version or release.installed_version(args.state))
    except (argparse.ArgumentTypeError, KeyfleetError) as exc:
        print(f"firmware-sim device: {exc}", file=sys.stderr)
        return EXIT_FAILED
    refused = _manufacturer_ca_check(args)
    if refused is not None:
        print(f"firmware-sim device: {refused}", file=sys.stderr)
        return EXIT_FAILED
    stop = threading.Event()
    reboot = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            reboot.set()
        else:
            stop.set()

    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.signal(s, on_signal) for s in signals}
    device = SimulatedDevice(
        args.state,
        manufacturer_ca=args.manufacturer_ca,
        components=components,
        serial=args.serial,
        transport=args.tpm_transport,
        run_agent=not args.no_agent,
        listener=_Reporter(args.json, Path(args.ready_file) if args.ready_file else None),
    )
    try:
        device.start()
    except KeyfleetError as exc:
        print(f"firmware-sim device: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        while not stop.wait(timeout=0.2):
            if reboot.is_set():
                reboot.clear()
                _reboot(args, device)
    finally:
        device.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return EXIT_OK


def _reboot(args: argparse.Namespace, device: SimulatedDevice) -> None:
    """SIGHUP: boot the installed release (or, if none was ever installed, the same one)."""
    try:
        version = (
            release.installed_version(args.state)
            if release.installed(args.state)
            else args.version or release.DEFAULT_VERSION
        )
        components = _components(args, version)
    except (argparse.ArgumentTypeError, KeyfleetError) as exc:
        print(f"firmware-sim device: reboot: {exc}; rebooting the same firmware", file=sys.stderr)
        components = None
    device.reboot(components)


def _fleet(args: argparse.Namespace) -> int:
    from firmware_sim.fleet import VirtualFleet, load_fleet_config  # noqa: PLC0415 - heavy

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        config = load_fleet_config(args.config)
        fleet = VirtualFleet.from_config(
            config, args.devices, allow_insecure=args.allow_insecure_software_keys
        )
        fleet.start()
    except KeyfleetError as exc:
        print(f"firmware-sim fleet: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        status = fleet.status()
        info = {"event": "ready", "devices": status.devices, "ready": status.ready}
        if args.json:
            print(json.dumps(info, sort_keys=True), flush=True)
        else:
            print(f"fleet: {status.ready}/{status.devices} virtual devices ready", flush=True)
        while not stop.wait(timeout=0.5):
            pass
    finally:
        fleet.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if args.command == "device":
        return _device(args)
    if args.command == "fleet":
        return _fleet(args)
    if args.command == "release":
        return _release(args)
    if args.command == "install":
        return _install(args)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse refuses unknown ones


if __name__ == "__main__":
    sys.exit(main())
