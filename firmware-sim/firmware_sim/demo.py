"""The keyfleet demo (``make demo``): a whole fleet on one machine, every part real.

Mosquitto with mutual TLS, ``keyfleet serve`` on a SQLite file, five simulated devices (each its
own swtpm and measured boot), provisioned over their serial consoles by the factory station; then
an operator creates a group, rekeys it while acks arrive, an app on one device encrypts data the
others decrypt through their local key APIs, one device is revoked and can no longer decrypt,
an admin approves firmware release 1.1 and one device updates to it keeping its group state (its
state key is sealed for every release the fleet's release key signs), and one device is rebooted
into tampered firmware: its state stays sealed, attestation flags it and quarantine removes it
from the group. Everything the demo starts is stopped by PID at the end; leftovers are an error.

The steps run on ``firmware_sim.lab.Lab``, the same library the end-to-end tests use.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from agent.protocol.errors import KeyfleetError
from firmware_sim.lab import Lab, LabDevice
from firmware_sim.release import demo_manifest, write_manifest

GROUP = "demo"
DEVICES = 5
MESSAGE = b"sensor reading 21.7 C, line 3"


class DemoFailed(KeyfleetError):
    """A step did not show what it should; the message says what was seen instead."""


class Narrator:
    """Human-readable progress on stdout, or nothing but the final JSON document."""

    def __init__(self, as_json: bool, out: TextIO = sys.stdout) -> None:
        self.as_json = as_json
        self.out = out
        self.steps: list[dict[str, Any]] = []
        self._total = 7

    def say(self, text: str = "") -> None:
        if not self.as_json:
            print(text, file=self.out, flush=True)

    @contextmanager
    def step(self, title: str) -> Iterator[dict[str, Any]]:
        record: dict[str, Any] = {"step": title}
        self.say(f"\n[{len(self.steps) + 1}/{self._total}] {title}")
        started = time.monotonic()
        yield record
        record["seconds"] = round(time.monotonic() - started, 2)
        self.steps.append(record)
        self.say(f"      done in {record['seconds']:.1f} s")


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise DemoFailed(what)


def _stream_cli(lab: Lab, narrator: Narrator, *args: str, operator: str) -> tuple[int, list[str]]:
    """Run a ``keyfleet`` command and show its progress lines as they arrive."""
    running = lab.keyfleet_start(*args, operator=operator)
    lines: list[str] = []
    assert running.process.stdout is not None
    for raw in iter(running.process.stdout.readline, ""):
        line = raw.rstrip()
        if line:
            lines.append(line)
            narrator.say(f"      | {line}")
    result = running.wait(timeout=120)
    if result.returncode != 0:
        narrator.say(f"      | {result.stderr.strip()}")
    return result.returncode, lines


def _op(lab: Lab, *args: str, operator: str = "op-ops") -> dict[str, Any]:
    result = lab.op(*args, operator=operator, timeout=120)
    final = result.final
    if result.returncode != 0 or final is None:
        raise DemoFailed(f"keyfleet {' '.join(args)} failed:\n{result}")
    return final


def _attest_all(lab: Lab, devices: list[LabDevice]) -> dict[str, str]:
    """``keyfleet attest D1 D2 ...`` once; the verdict (``done`` detail) of each device."""
    result = lab.op("attest", *(device.id for device in devices), timeout=120)
    verdicts = {
        row["command"].removeprefix("attest "): str(row.get("detail", ""))
        for row in result.results
        if row.get("status") == "done"
    }
    missing = [device.name for device in devices if device.id not in verdicts]
    if result.returncode != 0 or missing:
        raise DemoFailed(f"attestation of {', '.join(missing) or 'the fleet'} failed:\n{result}")
    return verdicts


def _epoch_everywhere(lab: Lab, devices: list[LabDevice]) -> int:
    status = lab.ack_status(GROUP)
    _check(status.agreed, f"the group does not agree: stragglers {status.stragglers}")
    epochs = {device.epoch(GROUP) for device in devices}
    _check(epochs == {status.epoch}, f"devices report epochs {epochs}, service {status.epoch}")
    return status.epoch


def run_demo(workdir: Path, narrator: Narrator) -> dict[str, Any]:
    summary: dict[str, Any] = {"devices": {}, "group": GROUP}
    started = time.monotonic()
    narrator.say("keyfleet demo: a fleet of 5 simulated devices, each with its own TPM (swtpm)")
    lab = Lab(workdir, devices=DEVICES, quarantine=True, ack_timeout=30, token=True, releases=True)
    with narrator.step("broker, fleet service, devices: boot, measured boot, provisioning") as rec:
        try:
            lab.start()
        except BaseException:
            # what started (broker, service, devices) stops here too, not only after the steps
            lab.stop(raise_on_leftovers=False)
            raise
        assert lab.broker is not None
        narrator.say(f"      Mosquitto (mutual TLS, ACL) on {lab.broker.host}:{lab.broker.port}")
        narrator.say(
            f"      keyfleet serve: SQLite {lab.database}, enrollment {lab.enrollment_url}"
        )
        narrator.say(
            "      service signing key and device CA key in a PKCS#11 token (SoftHSM2), "
            "apart from the TLS key"
        )
        for device in lab.devices:
            report = device.provision_report
            assert report is not None
            enrolled = report.enrollment_seconds or 0.0
            narrator.say(
                f"      {device.name} {device.id}: EK certificate verified, credential activated, "
                f"DevID certificate issued, factory port locked (enrollment {enrolled:.2f} s)"
            )
            summary["devices"][device.id] = {"name": device.name, "enrollment_s": enrolled}
        rec["timings"] = {k: round(v, 2) for k, v in lab.timings.items()}
    try:
        _run_steps(lab, narrator, summary)
    finally:
        stop_started = time.monotonic()
        leftovers = lab.stop(raise_on_leftovers=False)
        summary["stop_seconds"] = round(time.monotonic() - stop_started, 2)
        summary["leftover_processes"] = leftovers
    _check(not leftovers, f"processes left running: {leftovers}")
    summary["total_seconds"] = round(time.monotonic() - started, 1)
    summary["steps"] = narrator.steps
    return summary


def _run_steps(lab: Lab, narrator: Narrator, summary: dict[str, Any]) -> None:
    devices = list(lab.devices)
    names = {d.id: d.name for d in devices}

    with narrator.step("attestation of every device (TPM quote + event log vs golden policy)"):
        # One command for all of them: the challenges go out together (a keyfleet process per
        # device cost its start-up time five times over).
        verdicts = _attest_all(lab, devices)
        for device in devices:
            narrator.say(f"      {device.name}: {verdicts[device.id]}")
            summary["devices"][device.id]["attestation"] = "trusted"

    with narrator.step(f"keyfleet group create {GROUP} with all {len(devices)} devices") as rec:
        _op(lab, "group", "create", GROUP, "--members", *lab.device_ids)
        # each joiner's first act is a self-update (a fresh leaf key): wait for those too
        lab.wait_settled(GROUP, devices, timeout=60)
        epoch = _epoch_everywhere(lab, devices)
        narrator.say(
            f"      group {GROUP}: {len(devices)} members agree on epoch {epoch}, every joiner "
            "on a fresh leaf key"
        )
        rec["epoch"] = epoch

    with narrator.step(f"operator rekey of {GROUP} (acks as they arrive)") as rec:
        code, _ = _stream_cli(lab, narrator, "rekey", "--group", GROUP, operator="op-ops")
        _check(code == 0, f"rekey exited {code}")
        status = lab.ack_status(GROUP)
        authenticators = set(status.by_authenticator)
        _check(len(authenticators) == 1, "members disagree on the epoch authenticator")
        epoch = _epoch_everywhere(lab, devices)
        narrator.say(
            f"      epoch {epoch}: all {len(devices)} members acked the same epoch "
            f"authenticator {next(iter(authenticators)).hex()[:16]}..."
        )
        rec["epoch"] = epoch

    with narrator.step("an app on d0 encrypts; the others decrypt through their local APIs"):
        with devices[0].api() as api:
            blob = api.encrypt(GROUP, MESSAGE)
        narrator.say(f"      d0 sealed {len(MESSAGE)} bytes -> {len(blob)} bytes (AES-GCM, epoch)")
        for device in devices[1:]:
            with device.api() as api:
                plain = api.decrypt(GROUP, blob)
            _check(plain == MESSAGE, f"{device.name} decrypted something else")
            narrator.say(f"      {device.name} decrypted: {plain.decode()!r}")

    revoked = devices[4]
    with narrator.step(f"revoke {revoked.name}: it leaves the group by a commit of another member"):
        code, _ = _stream_cli(lab, narrator, "revoke", revoked.id, operator="op-admin")
        _check(code == 0, f"revoke exited {code}")
        members = devices[:4]
        epoch = _epoch_everywhere(lab, members)
        with devices[0].api() as api:
            fresh = api.encrypt(GROUP, b"after the revocation")
        refused = _decrypt_refusal(revoked, fresh)
        _check(refused is not None, "the revoked device decrypted data of the new epoch")
        narrator.say(f"      epoch {epoch}; {revoked.name} cannot decrypt new data: {refused}")
        summary["devices"][revoked.id]["state"] = "revoked"

    updated = devices[1]
    with narrator.step(
        f"firmware release 1.1 approved; {updated.name} updates and keeps its group"
    ):
        _update(lab, narrator, updated, devices[:4], blob)
        summary["devices"][updated.id]["release"] = "1.1"

    tampered = devices[3]
    with narrator.step(
        f"{tampered.name} reboots with a tampered kernel; attestation and quarantine"
    ):
        lab.reboot(tampered, tamper=("kernel",))
        held = _release(tampered).get("held")
        _check(bool(held), "the tampered device opened its state")
        narrator.say(f"      {tampered.name}: state stays sealed (release.unapproved): {held}")
        result = lab.op("attest", tampered.id, timeout=120)
        final = result.final or {}
        _check(result.returncode == 1, f"attest of tampered device exited {result.returncode}")
        narrator.say(f"      keyfleet attest {tampered.name}: {final.get('detail', final)}")
        _check("kernel" in json.dumps(final), "the verdict does not name the kernel")
        good = devices[:3]
        _wait(lambda: _member_count(lab) == len(good), 60, "quarantine did not remove the device")
        epoch = _epoch_everywhere(lab, good)
        narrator.say(f"      quarantined and removed: group {GROUP} at epoch {epoch}, 3 members")
        summary["devices"][tampered.id]["attestation"] = "untrusted (kernel)"
        summary["devices"][tampered.id]["state"] = "quarantined"

    fleet = {row["device_id"]: row for row in lab.fleet_devices()}
    for device_id, row in fleet.items():
        entry = summary["devices"].setdefault(device_id, {"name": names.get(device_id, "?")})
        entry["state"] = row.get("state")
        entry["attestation"] = row.get("attestation")
    summary["final_epoch"] = lab.ack_status(GROUP).epoch
    summary["audit_entries"] = lab.audit_head()
    summary["timings"] = {k: round(v, 2) for k, v in lab.timings.items()}


def _release(device: LabDevice) -> dict[str, Any]:
    entry = (device.status() or {}).get("release")
    return entry if isinstance(entry, dict) else {}


def _update(
    lab: Lab, narrator: Narrator, device: LabDevice, members: list[LabDevice], blob: bytes
) -> None:
    """Release 1.1 added and approved by the admin; the devices receive its signed PCR policy;
    ``device`` installs it and reboots: same group state, old data decrypts, attested on 1.1."""
    manifest = lab.workdir / "release-1.1.json"
    write_manifest(manifest, demo_manifest("1.1"))
    for args in (("add", str(manifest)), ("approve", "1.1")):
        result = lab.keyfleet("release", *args, operator="op-admin", timeout=120)
        _check(result.returncode == 0, f"keyfleet release {args[0]} failed:\n{result}")
    narrator.say("      keyfleet release add + approve 1.1 (op-admin): signed release bundle out")

    def sealed_for_11() -> bool:
        entries = [_release(d) for d in members]
        return all(
            (e.get("bundle_seq") or 0) >= 2 and e.get("sealed_generation") == e.get("generation")
            for e in entries
        )

    _wait(sealed_for_11, 60, "the devices did not take the bundle approving 1.1")
    epoch = device.epoch(GROUP)
    lab.install(device, "1.1")
    entry = _release(device)
    _check(entry.get("version") == "1.1" and not entry.get("held"), f"after the update: {entry}")
    _check(device.epoch(GROUP) == epoch, "the updated device lost its group state")
    with device.api() as api:
        plain = api.decrypt(GROUP, blob)
    _check(plain == MESSAGE, "the updated device decrypted something else")
    verdicts = _attest_all(lab, [device])
    narrator.say(
        f"      {device.name} rebooted into 1.1: group {GROUP} still at epoch {epoch}, data "
        f"from before the update decrypts; {verdicts[device.id]}"
    )


def _decrypt_refusal(device: LabDevice, blob: bytes) -> str | None:
    try:
        with device.api() as api:
            api.decrypt(GROUP, blob)
    except KeyfleetError as exc:
        return str(exc)
    return None


def _member_count(lab: Lab) -> int:
    return len(lab.ack_status(GROUP).members)


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise DemoFailed(what)


def print_summary(summary: dict[str, Any], out: TextIO = sys.stdout) -> None:
    print("\nSummary", file=out)
    print(f"  {'device':<22} {'name':<5} {'state':<12} {'attestation':<20} enrollment", file=out)
    for device_id, row in summary["devices"].items():
        enrolled = row.get("enrollment_s")
        print(
            f"  {device_id:<22} {row.get('name', ''):<5} {row.get('state') or '':<12} "
            f"{row.get('attestation') or '':<20} "
            f"{f'{enrolled:.2f} s' if enrolled is not None else ''}",
            file=out,
        )
    print(f"  group {summary['group']}: final epoch {summary.get('final_epoch')}", file=out)
    print(f"  audit log: {summary.get('audit_entries')} entries", file=out)
    for step in summary["steps"]:
        print(f"  {step['seconds']:>6.1f} s  {step['step']}", file=out)
    print(
        f"  total {summary['total_seconds']:.0f} s; everything stopped "
        f"({summary['stop_seconds']:.1f} s), no process left behind",
        file=out,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m firmware_sim.demo", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON summary only")
    parser.add_argument(
        "--workdir", type=Path, help="where to put the fleet (default: a new temporary directory)"
    )
    args = parser.parse_args(argv)
    narrator = Narrator(args.json)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="keyfleet-demo-"))
    try:
        summary = run_demo(workdir, narrator)
    except KeyfleetError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        print(f"logs: {workdir / 'logs'}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print_summary(summary)
        print(f"  logs and state: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
