"""docs/operations.md, "By hand, step by step", followed literally: the test takes the page's
``sh`` blocks in order and runs them as one bash script, so the page cannot drift from what
works. Only the installation directory (``LAB=/var/tmp/kf-lab``) and the two ports (8883 for
Mosquitto, 8443 for the enrollment API) are replaced, in the commands and in a copy of
docs/examples/. Everything else is the real thing: ``keyfleet pki``, Mosquitto with the example
configuration, ``keyfleet db init``/``operator add``/``station add``/``serve``, two
``firmware-sim`` devices with swtpm provisioned by ``keyprovision``, a group created and rekeyed
by the new operator, and an app on one device decrypting what the other encrypted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from firmware_sim.ports import free_port
from provisioning import pki

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "operations.md"
SECTION = "## By hand, step by step"
EXAMPLE_LAB = "/var/tmp/kf-lab"
PORTS = ("8883", "8443")
RUN_TIMEOUT = 420.0
_POLLING = re.compile(r"\++ \S+ (for _ in|grep -qsF|sleep 0\.1|return 0|seq 600)")
_SH_BLOCK = re.compile(r"^```sh\n(.*?)^```", re.DOTALL | re.MULTILINE)


def runbook_blocks() -> list[str]:
    """The ``sh`` blocks of the section, in order."""
    text = DOC.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return _SH_BLOCK.findall(text[start : end if end != -1 else len(text)])


def _pids(lab: Path) -> set[int]:
    """Every PID the runbook recorded: its pid files and what the devices' ready files name."""
    found: set[int] = set()
    for path in lab.rglob("*.pid"):
        with contextlib.suppress(ValueError, OSError):
            found.add(int(path.read_text().split()[0]))
    for path in (lab / "devices").glob("*.ready.json"):
        with contextlib.suppress(ValueError, OSError):
            info = json.loads(path.read_text())
            found |= {
                info[k] for k in ("pid", "swtpm_pid", "agent_pid") if isinstance(info.get(k), int)
            }
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Path]:
    lab = tmp_path / "lab"
    yield lab
    # whatever a failed run left: stop it by the PIDs it recorded
    for pid in _pids(lab):
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.pure
def test_runbook_blocks_are_found_and_use_no_python() -> None:
    blocks = runbook_blocks()
    assert len(blocks) >= 8
    script = "\n".join(blocks)
    for needed in (
        "keyfleet pki init",
        "keyfleet pki issue operator",
        "keyfleet pki issue station",
        "docs/examples/mosquitto.conf",
        "docs/examples/service.toml",
        "docs/examples/agent.toml",
        "keyfleet db init",
        "keyfleet operator add",
        "keyfleet station add",
        "keyfleet serve",
        "firmware-sim device",
        "keyprovision",
        "keyfleet group create",
        "keyfleet rekey",
    ):
        assert needed in script, needed
    assert "python" not in script


@pytest.mark.e2e
def test_operations_doc_followed_literally_gets_an_operator_a_station_and_two_devices_working(
    tmp_path: Path, lab: Path
) -> None:
    ports = {old: str(free_port()) for old in PORTS}
    while len(set(ports.values())) < len(PORTS):
        ports[PORTS[1]] = str(free_port())
    # a checkout as the commands expect it: docs/examples (ports replaced) and .venv
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "docs" / "examples", checkout / "docs" / "examples")
    for name in ("mosquitto.conf", "service.toml"):  # the files that name a port
        path = checkout / "docs" / "examples" / name
        text = path.read_text()
        for old, new in ports.items():
            text = text.replace(old, new)
        path.write_text(text)
    (checkout / ".venv").symlink_to(ROOT / ".venv")

    script = "\n".join(runbook_blocks())
    assert f"LAB={EXAMPLE_LAB}" in script
    script = script.replace(f"LAB={EXAMPLE_LAB}", f"LAB={lab}")
    for old, new in ports.items():
        script = script.replace(old, new)
    (tmp_path / "runbook.sh").write_text("PS4='+ $(date +%T.%3N) '\nset -x\n" + script)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYFLEET_", "KEYAGENT_"))}
    output = tmp_path / "runbook.out"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            ["bash", "-euo", "pipefail", str(tmp_path / "runbook.sh")],
            cwd=checkout,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            status = process.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = None
    log = output.read_text(errors="replace")

    def logs() -> str:
        # the trace without wait_for's polling lines, then the tail of every component's log
        trace = "\n".join(line for line in log.splitlines() if not _POLLING.match(line))
        parts = [f"---- runbook ----\n{trace[-8000:]}"]
        for path in sorted((lab / "logs").glob("*")) if (lab / "logs").is_dir() else []:
            parts.append(f"---- {path.name} ----\n{path.read_text(errors='replace')[-2500:]}")
        return "\n".join(parts)

    assert status == 0, logs()
    assert "operator op-alice registered with role operator" in log, logs()
    assert "station line-1 registered" in log, logs()
    # step 7: d1 decrypted what d0 encrypted for group g1
    assert re.search(r"^reading$", log, re.MULTILINE), logs()
    # step 8 stopped everything by PID
    left = [pid for pid in _pids(lab) if _alive(pid)]
    assert left == [], f"processes left: {left}\n{logs()}"

    # the devices' DevID certificates name them as docs/provisioning.md says
    device_ca = pki.cert_from_pem((lab / "pki" / "device-ca.pem").read_bytes())
    for name in ("d0", "d1"):
        info = json.loads((lab / "devices" / f"{name}.ready.json").read_text())
        devid = pki.cert_from_pem((lab / "devices" / name / "identity" / "devid.pem").read_bytes())
        assert pki.common_name(devid) == info["device_id"]
        assert pki.hardware_serial_of(devid)
        san = devid.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
            f"urn:keyfleet:device:{info['device_id']}"
        ]
        assert devid.issuer == device_ca.subject
