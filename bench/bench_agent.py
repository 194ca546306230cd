"""keyagent resident memory and cold start to READY.

Not a test: prints a JSON list of records to stdout (progress to stderr).

A real ``keyagent run`` process: its DevID key made in a swtpm (a bare one: no EK is needed
here), its DevID certificate from the fleet device CA and registered in the service's registry,
a TLS client certificate, talking to a real Mosquitto and ``keyfleet serve``
(bench/deployment.py). It runs under a minimal sd_notify supervisor (a Unix datagram socket in
``NOTIFY_SOCKET``), as systemd would run it (Type=notify).

- Cold start: process spawn -> ``READY=1``, STARTS times, each start a new process on the same
  state (the first start, which also seals a new state key, is reported separately).
- Resident memory: ``VmRSS`` from /proc/PID/status after READY, and after the agent founded a
  group with 9 virtual devices (one create and nine adds) and went through REKEYS rekeys, all
  driven by the service from operator commands.

The agent loads its modules from compiled bytecode, as an installed agent does (pip compiles every
module when scripts/install.sh installs the wheel). A source tree run with
``PYTHONDONTWRITEBYTECODE`` would compile the agent's own modules from source at every start,
which costs about 2 MB of resident memory more and is not what a device runs: the bench gives the
agent a bytecode cache of its own (``PYTHONPYCACHEPREFIX``), filled before the first start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.protocol.wire.messages.operator import Rekey
from agent.protocol.wire.messages.result import ResultStatus
from agent.tpm import KeyKind, TPMStore
from bench.bench_rekey import _await_final, create_group
from bench.deployment import Deployment, deployment
from firmware_sim.fleet import VirtualFleet, load_fleet_config, open_registry
from firmware_sim.swtpm import Swtpm
from provisioning import pki
from provisioning.operator import OperatorClient
from provisioning.registry import Registry, run_in_transaction

DEVICE = "dev-agent-bench"
STARTS = 5
REKEYS = 10
OTHERS = 9
RSS_TARGET_MB = 45.0
START_TARGET_S = 1.5
REPO = Path(__file__).resolve().parent.parent


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def _write_agent(base: Path, dep: Deployment, tcti: str) -> Path:
    files = dep.workdir / "pki"
    with TPMStore(tcti) as store:
        blob = store.create_key(KeyKind.DEVID)
        with store.load_key(blob) as key:
            devid_public = key.public_key()
    blob.save(base / "devid.key")
    now = datetime.now(UTC)
    device_ca = pki.CertificateAuthority(
        pki.cert_from_pem((files / "device-ca.pem").read_bytes()),
        pki.key_from_pem((files / "device-ca.key").read_bytes()),
    )
    devid_cert = pki.issue_devid_cert(
        device_ca,
        devid_public,
        device_id=DEVICE,
        hardware_serial="bench-0001",
        now=now,
        valid_for=timedelta(1),
    )
    pki.write_certificate(base / "devid.pem", devid_cert)
    tls_key = pki.generate_key()
    tls_cert = pki.issue_client_cert(
        device_ca,
        tls_key.public_key(),
        identity=DEVICE,
        role="device",
        now=now,
        valid_for=timedelta(1),
    )
    pki.write_certificate(base / "tls.pem", tls_cert)
    pki.write_private_key(base / "tls.key", tls_key)
    engine, sessions = open_registry(dep.db_url)
    try:
        run_in_transaction(
            sessions,
            lambda s: Registry(s).register_device(
                DEVICE,
                ek_cert_fingerprint="ab" * 32,
                devid_cert_pem=pki.cert_to_pem(devid_cert).decode(),
                now=int(time.time()),
            ),
        )
    finally:
        engine.dispose()
    # the fleet's own settings, as the virtual devices of the same deployment have them
    site = load_fleet_config(dep.fleet_config)
    assert site.operator_ca_cert is not None, "the bench deployment has an operator CA"
    config = base / "agent.toml"
    config.write_text(
        f"""
[tpm]
tcti = "{tcti}"
pcrs = [16]

[state]
dir = "{base / "state"}"

[identity]
device_id = "{DEVICE}"
devid_cert = "{base / "devid.pem"}"
devid_key = "{base / "devid.key"}"
tls_cert = "{base / "tls.pem"}"
tls_key = "{base / "tls.key"}"

[fleet]
service_cert = "{site.service_cert}"
trust_anchors = ["{site.device_ca_cert}"]
operator_anchors = ["{site.operator_ca_cert}"]
min_approvals = {site.min_approvals}

[broker]
host = "{dep.broker.host}"
port = {dep.broker.port}
ca = "{dep.broker.ca_file}"

[api]
socket = "{base / "api.sock"}"
"""
    )
    return config


class Supervised:
    """``keyagent run`` under a minimal sd_notify supervisor."""

    def __init__(self, config: Path, base: Path) -> None:
        self.config = config
        self.notify_path = base / f"notify-{os.getpid()}.sock"
        self.log = base / "agent.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("NOTIFY_", "WATCHDOG_")) and k != "PYTHONDONTWRITEBYTECODE"
        }
        self.env["PYTHONPYCACHEPREFIX"] = str(base / "pycache")

    def compile(self) -> None:
        """Fill the agent's bytecode cache, as installing the wheel does."""
        subprocess.run(
            [sys.executable, "-c", "import agent.cli"], cwd=REPO, env=self.env, check=True
        )

    def start(self) -> float:
        """Spawn and wait for READY=1; returns the seconds it took."""
        self.notify_path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.notify_path))
        self.sock.settimeout(0.2)
        env = dict(self.env, NOTIFY_SOCKET=str(self.notify_path))
        with open(self.log, "ab") as log:
            start = time.perf_counter()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config)],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"keyagent exited:\n{self.log.read_text()[-3000:]}"
                    ) from None
                continue
            if b"READY=1" in data.split(b"\n"):
                elapsed = time.perf_counter() - start
                # Keep reading, as systemd does: the agent's STATUS= messages after every epoch
                # change would otherwise fill the socket and block its sendto().
                threading.Thread(target=self._drain, args=(self.sock,), daemon=True).start()
                return elapsed
        raise RuntimeError("no READY=1 within 30 s")

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                with contextlib.suppress(TimeoutError):
                    sock.recv(4096)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                print("keyagent did not stop within 15 s of SIGTERM", file=sys.stderr)
                self.process.kill()
                self.process.wait(5)
            self.process = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def main() -> None:
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp, deployment(Path(tmp) / "site") as dep:
        base = Path(tmp) / "device"
        base.mkdir()
        (base / "tpm").mkdir()
        tpm = Swtpm(state_dir=base / "tpm", log_path=base / "swtpm.log")
        tpm.start()
        agent = Supervised(_write_agent(base, dep, tpm.tcti), base)
        fleet: VirtualFleet | None = None
        try:
            agent.compile()
            first = agent.start()
            agent.stop()
            starts = []
            for _ in range(STARTS):
                starts.append(agent.start())
                agent.stop()
            print(f"start to READY: first {first:.3f} s, then {starts}", file=sys.stderr)
            agent.start()
            time.sleep(1.0)  # its keys.report handled, the connection settled
            rss_ready = _rss_kb(agent.pid)
            fleet = VirtualFleet.from_config(
                load_fleet_config(dep.fleet_config), OTHERS, allow_insecure=True
            )
            fleet.start()
            with OperatorClient(dep.operator) as client:
                members = (DEVICE, *(d.device_id for d in fleet.devices))
                result, _ = create_group(client, "g-agent", members, timeout=300)
                if result.status is not ResultStatus.DONE:
                    raise RuntimeError(f"group create: {result.status}: {result.detail}")
                rss_group = _rss_kb(agent.pid)
                for _ in range(REKEYS):
                    rekey = Rekey(client.new_command_id(), "g-agent")
                    client.send(rekey)
                    result, _ = _await_final(client, rekey.command_id, timeout=300)
                    if result.status is not ResultStatus.DONE:
                        raise RuntimeError(f"rekey: {result.status}: {result.detail}")
            rss_after = _rss_kb(agent.pid)
            status = json.loads((base / "state" / "status.json").read_text())
            epoch = next(g["epoch"] for g in status["groups"] if g["group"] == "g-agent")
        except Exception:
            if agent.log.exists():
                print(f"keyagent's log:\n{agent.log.read_text()[-4000:]}", file=sys.stderr)
            raise
        finally:
            if fleet is not None:
                fleet.stop()
            agent.stop()
            tpm.stop()
    median_start = statistics.median(starts)
    peak = max(rss_ready, rss_group, rss_after) / 1024
    records: list[dict[str, Any]] = [
        {
            "name": "keyagent_rss",
            "value": round(peak, 1),
            "unit": "MB (VmRSS, highest sample)",
            "target": RSS_TARGET_MB,
            "met": peak <= RSS_TARGET_MB,
            "detail": (
                f"after READY {rss_ready / 1024:.1f} MB; after founding a group of "
                f"{OTHERS + 1} (create + {OTHERS} adds) {rss_group / 1024:.1f} MB; after "
                f"{REKEYS} rekeys (epoch {epoch}) {rss_after / 1024:.1f} MB"
            ),
        },
        {
            "name": "keyagent_start_to_ready",
            "value": round(median_start, 3),
            "unit": "s (median, spawn to READY=1)",
            "target": START_TARGET_S,
            "met": median_start <= START_TARGET_S,
            "detail": (
                f"{STARTS} starts on existing state (python start, self-tests, TPM, state key "
                f"unseal, state load, MQTT client started): {[round(s, 3) for s in starts]}; "
                f"first start ever (new state key sealed) {first:.3f} s"
            ),
        },
    ]
    print(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
