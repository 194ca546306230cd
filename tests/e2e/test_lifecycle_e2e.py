"""Key lifecycle end to end (issue 6): real ``keyagent run`` processes on their own swtpm, a real
``keyfleet serve`` and a real Mosquitto (mutual TLS, product ACL), the operator CLI.

- rotation with no operator: an epoch past ``rotation.max_epoch_age`` makes the agent send
  ``group.update_request``; the service has it self-update; the group's epoch advances;
- grace: data sealed in epoch e stops decrypting (``data.epoch-expired``) after the rotation and
  the grace period, and the epoch's data key and secrets are gone from the state file (the test
  unseals the state key in the TPM and decrypts the state file before and after);
- the local API across uids (uid 0 allowed, uid 65534 refused and logged) and ciphertext made on
  device A opened on device B of the same group;
- ``keyfleet devices --keys`` shows the states and transitions the real agent reported;
- ``keyagent factory-reset``: refused while the agent runs; then the service is told (device and
  keys destroyed, removed from its group by the other member's commit), every file is gone,
  saved copies of leaf blobs no longer load (their rotating parents are evicted), a saved copy
  of the DevID blob still loads on the same TPM until ``--clear-tpm``, after which no copy does
  (and the EK is unchanged).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
import pytest

from agent.localapi.client import LocalApiClient
from agent.protocol.attest import tpm_name
from agent.protocol.errors import ProtocolError, TPMError
from agent.staterotation import read_state
from agent.tpm.blob import KeyBlob
from agent.tpm.store import TPMStore
from agent.tpm.templates import KeyKind
from provisioning import audit, pki
from provisioning.registry import (
    DeviceState,
    KeyState,
    Registry,
    create_schema,
    make_engine,
    run_in_transaction,
    session_factory,
)
from tests.fixtures.mosquitto import DEFAULT_LOG_TYPES, BrokerPKI, MosquittoBroker
from tests.fixtures.nobody import NobodyPython
from tests.fixtures.swtpm import Swtpm, SwtpmFactory
from tests.service_deployment import (
    add_operator,
    adopt_standing_policy,
    deployment_pki,
    operator_args,
    service_config,
    start_serve,
    write_operator,
)

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
G = "g1"


def run(*argv: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@dataclass
class Device:
    name: str
    swtpm: Swtpm
    config: Path
    state_dir: Path
    socket: Path
    log: Path
    devid_blob: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config)],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()
        wait_for(f"{self.name}'s API socket", self.socket.exists, 30)

    def stop(self) -> None:
        assert self.process is not None
        self.process.terminate()
        assert self.process.wait(15) == 0, self.log_text()[-3000:]
        self.process = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.state_dir / "status.json").read_text())
        return data

    def state(self) -> dict[str, Any]:
        """The decrypted state file (agent stopped): unseal the state key in the TPM."""
        with TPMStore(self.swtpm.tcti) as store:
            return read_state(store, self.state_dir)

    def state_plaintext(self) -> bytes:
        with TPMStore(self.swtpm.tcti) as store:
            state = read_state(store, self.state_dir)
        return bytes(cbor2.dumps(state, canonical=True))


@dataclass
class Lab:
    tmp: Path
    service_config: Path
    db: Path
    service_log: Path
    service: subprocess.Popen[bytes]
    devices: dict[str, Device]
    operator_args: list[str]

    def keyfleet(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run("provisioning.cli", *args, cwd=self.tmp, timeout=timeout)

    def operator(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.keyfleet(*args, *self.operator_args)

    def registry(self, work: Callable[[Registry], Any]) -> Any:
        engine = make_engine(f"sqlite:///{self.db}")
        try:
            return run_in_transaction(session_factory(engine), lambda s: work(Registry(s)))
        finally:
            engine.dispose()

    def epoch(self) -> int:
        value: int = self.registry(lambda r: r.group(G).epoch)
        return value

    def audit_entries(self) -> list[audit.AuditRecord]:
        engine = make_engine(f"sqlite:///{self.db}")
        try:
            with session_factory(engine)() as session:
                return audit.entries(session)
        finally:
            engine.dispose()

    def device_keys(self) -> list[dict[str, Any]]:
        listed = self.keyfleet("devices", "--keys", "--json", "--db", f"sqlite:///{self.db}")
        assert listed.returncode == 0, listed.stderr
        rows: list[dict[str, Any]] = json.loads(listed.stdout)
        return rows


def make_device(
    name: str,
    *,
    tmp: Path,
    swtpm: Swtpm,
    broker: MosquittoBroker,
    broker_pki: BrokerPKI,
    device_ca: pki.CertificateAuthority,
    operator_ca: pki.CertificateAuthority,
    service_cert: Path,
    sessions: Any,
    now: datetime,
) -> Device:
    """A provisioned device: DevID made in its swtpm, certified by the fleet's device CA and
    registered; TLS client files from the same CA; rotation limits short enough for a test."""
    home = tmp / name
    home.mkdir()
    with TPMStore(swtpm.tcti) as store:
        blob = store.create_key(KeyKind.DEVID)
        with store.load_key(blob) as key:
            devid_public = key.public_key()
        # its AK: the DevID certificate names it, and it certifies the leaf keys the device's
        # KeyPackages offer (members check that they live in this TPM)
        ak_blob = store.create_key(KeyKind.AK)
    devid_blob = home / "devid.key"
    blob.save(devid_blob)
    ak_blob.save(home / "ak.key")
    cert = pki.issue_devid_cert(
        device_ca,
        devid_public,
        device_id=name,
        hardware_serial=f"SN-{name}",
        now=now,
        valid_for=timedelta(1),
        ak_name=tpm_name(ak_blob.public),
    )
    pki.write_certificate(home / "devid.pem", cert)
    pki.write_certificate(home / "device-ca.pem", device_ca.certificate)
    pki.write_certificate(home / "operator-ca.pem", operator_ca.certificate)
    tls = broker_pki.client(name, role="device", ca=device_ca)

    def register(session: Any) -> None:
        Registry(session).register_device(
            name,
            ek_cert_fingerprint=pki_fingerprint(name),
            devid_cert_pem=pki.cert_to_pem(cert).decode(),
            now=int(now.timestamp()),
        )

    run_in_transaction(sessions, register)
    # nobody (uid 65534) must reach the socket for the refusal to come from the rules
    sockdir = Path(tempfile.mkdtemp(prefix=f"kf-{name}-"))
    os.chmod(sockdir, 0o755)
    socket_path = sockdir / "api.sock"
    config = home / "agent.toml"
    config.write_text(
        f"""
[tpm]
tcti = "{swtpm.tcti}"
pcrs = [16]

[state]
dir = "{home / "state"}"

[identity]
device_id = "{name}"
devid_cert = "{home / "devid.pem"}"
devid_key = "{devid_blob}"
ak_key = "{home / "ak.key"}"
tls_cert = "{tls.cert_file}"
tls_key = "{tls.key_file}"

[fleet]
service_cert = "{service_cert}"
trust_anchors = ["{home / "device-ca.pem"}"]
operator_anchors = ["{home / "operator-ca.pem"}"]
min_approvals = 1

[broker]
host = "{broker.host}"
port = {broker.port}
ca = "{broker.ca_file}"
keepalive = 5

[api]
socket = "{socket_path}"
socket_group = "nogroup"

[[api.rules]]
uid = 0
operations = ["encrypt", "decrypt", "list-keys"]
groups = ["{G}"]

[rotation]
max_epoch_age = 600
grace_period = 600

[rotation.groups.{G}]
max_epoch_age = 4
grace_period = 3
"""
    )
    return Device(name, swtpm, config, home / "state", socket_path, home / "agent.log", devid_blob)


def pki_fingerprint(name: str) -> str:
    return hashlib.sha256(b"ek-" + name.encode()).hexdigest()


@pytest.fixture
def lab(
    tmp_path: Path,
    broker_pki: BrokerPKI,
    mosquitto_factory: Any,
    swtpm_factory: SwtpmFactory,
) -> Iterator[Lab]:
    fleet = deployment_pki(
        tmp_path, "lifecycle", broker_pki, mosquitto_factory, log_types=DEFAULT_LOG_TYPES
    )
    now, device_ca, operator_ca = fleet.now, fleet.device_ca, fleet.operator_ca
    broker, service_files, files = fleet.broker, fleet.service, fleet.files
    db = tmp_path / "fleet.db"
    config = tmp_path / "keyfleet.toml"
    config.write_text(
        service_config(
            db_url=f"sqlite:///{db}",
            broker=broker,
            client=service_files,
            instance="lifecycle",
            groups="ack_timeout_seconds = 20\n",
            service="commit_request_timeout_seconds = 5\n",
        )
    )
    engine = make_engine(f"sqlite:///{db}")
    create_schema(engine)
    sessions = session_factory(engine)
    devices = {
        name: make_device(
            name,
            tmp=tmp_path,
            swtpm=swtpm_factory.start(fresh=False),
            broker=broker,
            broker_pki=broker_pki,
            device_ca=device_ca,
            operator_ca=operator_ca,
            service_cert=fleet.signing_cert,
            sessions=sessions,
            now=now,
        )
        for name in ("dev-a", "dev-b")
    }
    engine.dispose()
    write_operator(files, operator_ca, "op-alice", role="admin", now=now, stem="op-alice")
    add_operator("op-alice", "pki/op-alice.pem", config=config, cwd=tmp_path)
    service_log = tmp_path / "serve.log"
    service = start_serve(config, cwd=tmp_path, log=service_log, timeout=30)
    cli_args = operator_args(
        broker, cert="pki/op-alice.pem", key="pki/op-alice.key",
        service_cert=fleet.signing_cert,
    )  # fmt: skip
    lab = Lab(tmp_path, config, db, service_log, service, devices, cli_args)
    # a factory-reset device is removed by the service on its own: under a signed policy
    adopt_standing_policy(tmp_path, cli_args)
    try:
        for device in devices.values():
            device.start()
        yield lab
    finally:
        for device in devices.values():
            if device.process is not None:
                device.process.terminate()  # a clean stop flushes its TPM objects
                try:
                    device.process.wait(15)
                except subprocess.TimeoutExpired:
                    device.process.kill()
                    device.process.wait(10)
            print(f"---- {device.name} log ----\n{device.log_text()[-6000:]}")
        service.terminate()
        service.wait(15)
        print(f"---- service log ----\n{service_log.read_text(errors='replace')[-12000:]}")


def create_group(lab: Lab) -> None:
    created = lab.operator("group", "create", G, "--members", "dev-a", "dev-b", "--json")
    assert created.returncode == 0, created.stdout + created.stderr


def decrypt_on(device: Device, blob: bytes, timeout: float = 20.0) -> bytes:
    """Decrypt through the device's API, waiting while it is still catching up to the epoch."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with LocalApiClient(device.socket) as api:
                return api.decrypt(G, blob)
        except ProtocolError as exc:
            if exc.check != "data.epoch-unknown" or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_rotation_grace_cross_device_cross_uid_and_key_listing(
    lab: Lab, nobody_python: NobodyPython
) -> None:
    a, b = lab.devices["dev-a"], lab.devices["dev-b"]
    create_group(lab)
    wait_for("the joiner's first self-update", lambda: lab.epoch() >= 2, 60)

    # two apps under different uids on device A: uid 0 encrypts, nobody is refused and logged
    with LocalApiClient(a.socket) as api:
        blob = api.encrypt(G, b"reading 42")
    sealed_epoch = int.from_bytes(blob[5 + len(G) : 13 + len(G)], "big")
    nobody = nobody_python.encrypt(a.socket, G)
    assert nobody.returncode == 7 and nobody.stdout.strip() == "DENIED api.denied", nobody.stderr
    refusal = [line for line in a.log_text().splitlines() if "uid=65534" in line]
    assert refusal and "encrypt" in refusal[0] and G in refusal[0]
    assert "from nobody" not in a.log_text()

    # ciphertext made on device A opens on device B of the same group
    assert decrypt_on(b, blob) == b"reading 42"

    # capture epoch e's data key and group secrets from A's state file (agent stopped)
    a.stop()
    before = a.state()
    data_key = before["data_keys"][G][sealed_epoch]
    assert isinstance(data_key, bytes) and len(data_key) == 16
    group_state = before["groups"][G]["group"]
    epoch_secrets = [
        v
        for k, v in group_state["secrets"].items()
        if k != "epoch_authenticator" and isinstance(v, bytes)
    ]
    assert epoch_secrets  # the epoch secrets of the epoch A was in when stopped (>= e)
    assert data_key in a.state_plaintext()
    a.start()

    # no operator from here on: the epoch ages out, the agents ask, the service rotates
    wait_for("an automatic rotation", lambda: lab.epoch() > sealed_epoch, 60)
    assert "asking for an update" in a.log_text() + b.log_text()
    audit = lab.keyfleet("audit", "verify", "--db", f"sqlite:///{lab.db}")
    assert audit.returncode == 0, audit.stdout
    rotated = [
        e.reason or ""
        for e in lab.audit_entries()
        if e.action == "group.rotate" and "first-update-after-join" not in (e.reason or "")
    ]
    assert rotated and rotated[0].startswith("automatic rotation: max-epoch-age")

    # past the grace period the old epoch's data no longer decrypts, on either device
    def expired() -> bool:
        try:
            with LocalApiClient(a.socket) as api:
                api.decrypt(G, blob)
        except ProtocolError as exc:
            return exc.check == "data.epoch-expired"
        return False

    wait_for("the grace period to end", expired, 30)
    # refused from the end of the grace period on; erased at the agent's next tick (<= 1 s)
    wait_for(
        "the erasure of the epoch key",
        lambda: f"destroyed data key epoch/{G}/{sealed_epoch} " in a.log_text(),
        10,
    )
    with pytest.raises(ProtocolError) as on_b, LocalApiClient(b.socket) as api_b:
        api_b.decrypt(G, blob)
    # "unknown" once B has reported the destruction and dropped the record (see docs/agent.md)
    assert on_b.value.check in ("data.epoch-expired", "data.epoch-unknown")

    # ... and its secrets are gone from the state file, not only marked destroyed
    a.stop()
    after = a.state()
    plaintext = a.state_plaintext()
    assert sealed_epoch not in after["data_keys"].get(G, {})
    assert data_key not in plaintext
    for secret in epoch_secrets:
        assert secret not in plaintext
    ledger = {k["name"]: k for k in after["ledger"]["keys"]}
    record = ledger.get(f"epoch/{G}/{sealed_epoch}")
    if record is not None:  # dropped once reported; then the service has the destruction
        assert record["state"] == "destroyed"
    a.start()

    # the service shows what the real agent reported: kind, state, since, transitions
    def destroyed_listed() -> dict[str, Any] | None:
        for row in lab.device_keys():
            if row["device_id"] == "dev-a" and row["key"] == f"epoch/{G}/{sealed_epoch}":
                return row if row["state"] == "destroyed" else None
        return None

    row = wait_for("dev-a's report of the destroyed epoch key", destroyed_listed, 30)
    assert row["kind"] == "epoch"
    assert [s for s, _ in row["transitions"]] == [
        "pre-activation",
        "active",
        "deactivated",
        "destroyed",
    ]
    times = [t for _, t in row["transitions"]]
    assert times == sorted(times) and row["since"] == times[-1]
    assert times[-1] - times[2] >= 3  # destroyed no earlier than the grace period after
    kinds = {r["kind"] for r in lab.device_keys() if r["device_id"] == "dev-a"}
    assert {"devid", "state", "leaf", "epoch"} <= kinds
    listed = lab.keyfleet("devices", "--keys", "--db", f"sqlite:///{lab.db}")
    assert listed.returncode == 0 and f"epoch/{G}/{sealed_epoch}" in listed.stdout


def blob_loads(tcti: str, blob: KeyBlob) -> bool:
    with TPMStore(tcti) as store:
        try:
            store.load_key(blob).close()
        except TPMError:
            return False
    return True


def test_factory_reset_tells_the_service_and_leaves_no_loadable_key(lab: Lab) -> None:
    a, b = lab.devices["dev-a"], lab.devices["dev-b"]
    create_group(lab)
    epoch = lab.epoch()

    # refused while the agent runs: nothing is touched
    busy = run("agent.cli", "factory-reset", "--yes", "--config", str(b.config), cwd=ROOT)
    assert busy.returncode == 2 and "running" in busy.stderr, busy.stdout + busy.stderr
    assert (b.state_dir / "agent.state").exists() and b.devid_blob.exists()

    b.stop()
    leaves = sorted((b.state_dir / "leaves").glob("*.pem"))
    assert leaves
    copies = [KeyBlob.load(b.devid_blob), *(KeyBlob.load(p) for p in leaves)]
    with TPMStore(b.swtpm.tcti) as store:
        ek_before = store.ek_public_area("rsa"), store.ek_public_area("ecc")
    files_before = sorted(p for p in b.state_dir.rglob("*") if p.is_file())

    reset = run("agent.cli", "factory-reset", "--yes", "--config", str(b.config), cwd=ROOT)
    assert reset.returncode == 0, reset.stdout + reset.stderr
    assert "the service was told" in reset.stdout
    for path in [*files_before, b.devid_blob]:
        assert not path.exists(), path
        assert f"destroyed {path}" in reset.stdout
    assert not any(p.is_file() for p in b.state_dir.rglob("*"))

    # the service: destroyed identity, destroyed keys, out of the group by dev-a's commit
    def destroyed() -> bool:
        return bool(lab.registry(lambda r: r.device("dev-b").state is DeviceState.DESTROYED))

    wait_for("the service to record the destruction", destroyed, 20)
    listed = lab.keyfleet("devices", "--json", "--db", f"sqlite:///{lab.db}")
    rows = {row["device_id"]: row for row in json.loads(listed.stdout)}
    assert rows["dev-b"]["state"] == "destroyed"
    states = {k.key_name: k.state for k in lab.registry(lambda r: r.key_states("dev-b"))}
    assert states and set(states.values()) == {KeyState.DESTROYED}
    wait_for(
        "dev-b's removal",
        lambda: [m.device_id for m in lab.registry(lambda r: r.members(G))] == ["dev-a"],
        30,
    )
    assert lab.epoch() > epoch

    # the leaf keys' rotating parents were evicted: no copy of a leaf blob loads any more
    assert "evicted the rotating parents of leaf and init keys: 0x81004b4" in reset.stdout
    devid_copy, leaf_copies = copies[0], copies[1:]
    assert all(c.parent != 0x40000001 for c in leaf_copies)
    assert not any(blob_loads(b.swtpm.tcti, c) for c in leaf_copies)
    # honest limit: a copy of the DevID blob taken before still loads under the same SRK ...
    assert blob_loads(b.swtpm.tcti, devid_copy)
    # ... until the owner hierarchy is cleared: then no copy loads, and the EK is the same
    cleared = run(
        "agent.cli", "factory-reset", "--yes", "--clear-tpm", "--config", str(b.config), cwd=ROOT
    )
    assert cleared.returncode == 1, cleared.stdout + cleared.stderr  # config no longer loads
    assert "TPM2_Clear done" in cleared.stdout and "re-created (same key)" in cleared.stdout
    assert not any(blob_loads(b.swtpm.tcti, c) for c in copies)
    with TPMStore(b.swtpm.tcti) as store:
        assert (store.ek_public_area("rsa"), store.ek_public_area("ecc")) == ek_before
    assert not (b.state_dir / "state-key.pem").exists()
    assert a.process is not None and a.process.poll() is None
