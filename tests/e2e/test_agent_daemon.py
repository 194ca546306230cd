"""``keyagent run`` as a real process against a real swtpm and a real Mosquitto. The test plays
the fleet service over MQTT with a software service key (a test harness, not a fake of any
component) and a software group member; it checks commits, acks and epoch agreement, kills the
agent with SIGKILL while it applies a commit (seeded timings) and restarts it, searches the state
directory for secrets it knows, checks that a restart resumes exactly (same epoch, the sequence
continues), drives the local API, speaks sd_notify as a supervisor (READY, STATUS, WATCHDOG at
the configured period, STOPPING), and detects a state key sealed to other measurements."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent.core import SERVICE_ID
from agent.localapi.client import LocalApiClient
from agent.localapi.protocol import app_signing_input
from agent.mqtt import MqttClient
from agent.protocol.dataseal import open_sealed
from agent.protocol.hpke import serialize_public_key
from agent.protocol.membership import ChangeAuthorization
from agent.protocol.mls import codec
from agent.protocol.mls import group as group_module
from agent.protocol.mls.group import Group, admissions_of
from agent.protocol.mls.messages import Commit, KeyPackage, Welcome
from agent.protocol.mls.treepages import TreePage as TreePageData
from agent.protocol.mls.treepages import paginate
from agent.protocol.wire.envelope import Signer, VerifiedMessage, encode_message, open_message
from agent.protocol.wire.messages.ack import Ack
from agent.protocol.wire.messages.base import Body
from agent.protocol.wire.messages.group import (
    CommitMessage,
    GroupCreated,
    KeyPackageMessage,
    TreeRequest,
    WelcomeMessage,
)
from agent.protocol.wire.messages.key_state import KeyStateReport
from agent.protocol.wire.messages.service import (
    CommitAction,
    CommitRequest,
    KeyPackageRequest,
    ReportRequest,
    TreePage,
    WelcomeDelivery,
)
from agent.tpm.store import TPMStore
from agent.tpm.templates import KeyKind
from firmware_sim.fleet.credentials import SimulatedAK
from firmware_sim.swtpm import tpm_command as _tpm_command
from provisioning import pki
from tests.device_certs import device_ca, devid_cert_der
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.swtpm import Swtpm
from tests.operator_certs import authorize, operator_ca

pytestmark = pytest.mark.e2e

DEVICE = "dev-0001"
G = "g1"
REPO = Path(__file__).resolve().parents[2]


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@dataclass
class AgentFiles:
    config: Path
    state_dir: Path
    socket: Path
    log: Path
    devid_public: ec.EllipticCurvePublicKey
    service_key: ec.EllipticCurvePrivateKey = field(repr=False)


def write_agent(
    tmp: Path, swtpm: Swtpm, broker: MosquittoBroker, *, pcrs: tuple[int, ...] = (16,)
) -> AgentFiles:
    """A provisioned device: DevID blob made in the swtpm, DevID certificate from a test device
    CA, TLS client files from the broker's PKI, the service's public key, an agent.toml."""
    tmp.mkdir(parents=True, exist_ok=True)
    with TPMStore(swtpm.tcti) as store:
        blob = store.create_key(KeyKind.DEVID)
        with store.load_key(blob) as key:
            devid_public = key.public_key()
    blob.save(tmp / "devid.key")
    now = datetime.now(UTC)
    # the tests' device and operator CAs (tests/device_certs.py, tests/operator_certs.py): the
    # software member's DevID certificate and the operators' approvals chain to them
    pki.write_certificate(tmp / "device-ca.pem", device_ca().certificate)
    pki.write_certificate(tmp / "operator-ca.pem", operator_ca().certificate)
    cert = pki.issue_devid_cert(
        device_ca(),
        devid_public,
        device_id=DEVICE,
        hardware_serial="SN-0001",
        now=now,
        valid_for=timedelta(days=1),
    )
    pki.write_certificate(tmp / "devid.pem", cert)
    service_key = new_key()
    (tmp / "service.pem").write_bytes(pki.public_key_to_pem(service_key.public_key()))
    tls = broker.client_files(DEVICE)
    state_dir = tmp / "state"
    sock = tmp / "api" / "api.sock"
    config = tmp / "agent.toml"
    config.write_text(
        f"""
[tpm]
tcti = "{swtpm.tcti}"
pcrs = {list(pcrs)}

[state]
dir = "{state_dir}"

[identity]
device_id = "{DEVICE}"
devid_cert = "{tmp / "devid.pem"}"
devid_key = "{tmp / "devid.key"}"
tls_cert = "{tls.cert_file}"
tls_key = "{tls.key_file}"

[fleet]
service_cert = "{tmp / "service.pem"}"
trust_anchors = ["{tmp / "device-ca.pem"}"]
operator_anchors = ["{tmp / "operator-ca.pem"}"]
min_approvals = 1

[broker]
host = "{broker.host}"
port = {broker.port}
ca = "{tls.ca_file}"
keepalive = 5

[api]
socket = "{sock}"

[[api.rules]]
uid = {os.getuid()}
operations = ["*"]
groups = ["*"]
"""
    )
    return AgentFiles(config, state_dir, sock, tmp / "agent.log", devid_public, service_key)


class AgentProcess:
    def __init__(self, files: AgentFiles, env: dict[str, str] | None = None) -> None:
        self.files = files
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
        env.update(self.env)
        log = open(self.files.log, "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(self.files.config)],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self.process = None

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(10)
        self.process = None
        return code

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.files.state_dir / "status.json").read_text())
        return data

    def log_text(self) -> str:
        return self.files.log.read_text(errors="replace") if self.files.log.exists() else ""


class ServiceHarness:
    """The fleet service's side of the wire, with a software key, over the real broker."""

    def __init__(self, broker: MosquittoBroker, files: AgentFiles) -> None:
        self.files = files
        self.seq = 1
        self.client = MqttClient(
            **broker.client_kwargs(SERVICE_ID),  # type: ignore[arg-type]
            client_id=f"{SERVICE_ID}-test",
            clean_start=True,
        )
        self.client.connect()
        self.client.subscribe(f"kf/v1/dev/{DEVICE}/report")
        self.received: list[VerifiedMessage] = []

    def close(self) -> None:
        self.client.close()

    def sign(self, body: Body, to: str) -> bytes:
        self.seq += 1
        return encode_message(
            body,
            key=self.files.service_key,
            sender=SERVICE_ID,
            to=to,
            seq=self.seq,
            time=int(time.time()),
        )

    def command(self, body: Body) -> None:
        self.client.publish(f"kf/v1/dev/{DEVICE}/cmd", self.sign(body, DEVICE))

    def relay(self, epoch: int, commit: bytes) -> None:
        self.client.publish(f"kf/v1/grp/{G}/commit", self.sign(CommitMessage(G, epoch, commit), G))

    def expect(self, kind: type[Body], timeout: float = 10.0, **match: object) -> VerifiedMessage:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            received = self.client.get(timeout=max(0.0, deadline - time.monotonic()))
            if received is None:
                break
            message = open_message(
                received.payload,
                lambda kid: Signer(DEVICE, self.files.devid_public),
                now=int(time.time()),
                recipients={SERVICE_ID},
            )
            self.received.append(message)
            if isinstance(message.body, kind) and all(
                getattr(message.body, k) == v for k, v in match.items()
            ):
                return message
        raise AssertionError(f"no {kind.__name__} {match} from the agent within {timeout}s")

    def drain(self, seconds: float) -> None:
        """Read (and keep) whatever the agent sends during ``seconds``."""
        with contextlib.suppress(AssertionError):
            self.expect(type(None), timeout=seconds)  # type: ignore[arg-type]

    def max_seq(self) -> int:
        return max(m.seq for m in self.received)


@dataclass
class SoftwareMember:
    """A second group member with software keys, played by the test."""

    device_id: bytes = b"dev-soft"
    signature_key: ec.EllipticCurvePrivateKey = field(default_factory=new_key)
    leaf_key: ec.EllipticCurvePrivateKey = field(default_factory=new_key)
    init_key: ec.EllipticCurvePrivateKey = field(default_factory=new_key)
    # its "TPM": a software AK its certificate names (firmware_sim's simulation), so the agent's
    # residency check of its KeyPackage passes as it would for a real device
    ak: SimulatedAK = field(default_factory=SimulatedAK.generate)
    group: Group | None = None

    def key_package(self) -> KeyPackage:
        return KeyPackage.create(
            self.device_id,
            self.signature_key,
            self.leaf_key.public_key(),
            devid_cert_der(self.device_id, self.signature_key, ak_name=self.ak.name),
            init_key=self.init_key.public_key(),
            tpm_proof=self.ak.prove_leaf(self.leaf_key.public_key()),
            init_tpm_proof=self.ak.prove_leaf(self.init_key.public_key()),
        )

    def point(self) -> bytes:
        return serialize_public_key(self.signature_key.public_key())

    def secrets(self) -> list[bytes]:
        """Every secret of this member's epoch that the agent also holds (or derives)."""
        assert self.group is not None
        state = self.group.to_state()
        found = [v for k, v in state["secrets"].items() if k != "epoch_authenticator"]  # type: ignore[union-attr]
        return [*found, self.group.data_key(16), self.group.data_key(32)]


@pytest.fixture
def env(
    tmp_path: Path, swtpm: Swtpm, mosquitto: MosquittoBroker
) -> Iterator[tuple[AgentProcess, ServiceHarness]]:
    files = write_agent(tmp_path / "device", swtpm, mosquitto)
    agent = AgentProcess(files)
    harness = ServiceHarness(mosquitto, files)
    try:
        yield agent, harness
    finally:
        if agent.process is not None:
            agent.terminate()
        harness.close()
        print(agent.log_text())


def create_request(files: AgentFiles) -> CommitRequest:
    """The service's request to found ``G``, with one operator's approval naming the device
    (``min_approvals`` 1 in the agent's configuration)."""
    point = serialize_public_key(files.devid_public)
    return CommitRequest(
        os.urandom(16),
        G,
        0,
        CommitAction.CREATE,
        authz=authorize("group.create", G, [(DEVICE, point)]),
    )


def form_group(agent: AgentProcess, harness: ServiceHarness) -> SoftwareMember:
    """create -> add the software member -> both in epoch 1 with one epoch authenticator."""
    harness.command(create_request(harness.files))
    created = harness.expect(GroupCreated).body
    assert isinstance(created, GroupCreated) and created.group_id == G
    member = SoftwareMember()
    kp = member.key_package()
    harness.command(
        CommitRequest(
            os.urandom(16),
            G,
            0,
            CommitAction.ADD,
            member="dev-soft",
            key_package=kp.encode(),
            authz=authorize("group.add", G, [("dev-soft", member.point())]),
        )
    )
    commit = harness.expect(CommitMessage).body
    welcome = harness.expect(WelcomeMessage).body
    assert isinstance(commit, CommitMessage) and isinstance(welcome, WelcomeMessage)
    harness.relay(0, commit.commit)
    ack = harness.expect(Ack, epoch=1).body
    assert isinstance(ack, Ack) and ack.command_id == commit.command_id  # the add's request
    # what the service delivers with the Welcome: the Authorizations its leaves record
    member.group = Group.join(
        Welcome.decode(welcome.welcome),
        kp,
        member.leaf_key,
        init_key=member.init_key,
        admissions=[a for a in (created.authz, Commit.decode(commit.commit).content.authz) if a],
    )
    assert member.group.epoch_authenticator == ack.epoch_authenticator
    return member


def member_update(member: SoftwareMember, harness: ServiceHarness) -> int:
    """The software member commits a self-update; the test relays it. Returns the new epoch."""
    assert member.group is not None
    result = member.group.update(member.signature_key, new_key())
    harness.relay(member.group.epoch, result.commit.encode())
    member.group = result.group
    return result.group.epoch


def assert_no_secret_on_disk(directory: Path, secrets: list[bytes]) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for secret in secrets:
                assert secret not in data, f"a known secret is in the clear in {path.name}"
                assert secret.hex().encode() not in data, f"a known secret (hex) is in {path.name}"


# -- the tests --------------------------------------------------------------------------------


def test_group_flow_local_api_restart_and_no_secret_on_disk(
    env: tuple[AgentProcess, ServiceHarness],
) -> None:
    agent, harness = env
    agent.start()
    harness.expect(KeyStateReport)  # connected, subscribed, reported
    member = form_group(agent, harness)
    assert member.group is not None

    epoch = member_update(member, harness)
    ack = harness.expect(Ack, epoch=epoch).body
    assert isinstance(ack, Ack) and ack.epoch_authenticator == member.group.epoch_authenticator

    # the agent commits a self-update on request; it moves only once the service relays it
    command_id = os.urandom(16)
    harness.command(CommitRequest(command_id, G, epoch, CommitAction.UPDATE))
    commit = harness.expect(CommitMessage).body
    assert isinstance(commit, CommitMessage) and commit.command_id == command_id
    member.group = member.group.process(Commit.decode(commit.commit))
    harness.relay(epoch, commit.commit)
    ack = harness.expect(Ack, epoch=epoch + 1).body
    assert isinstance(ack, Ack) and ack.command_id == command_id
    assert ack.epoch_authenticator == member.group.epoch_authenticator
    epoch += 1

    # apps: the data key is the group's; signatures are the DevID's; secrets sealed in the TPM
    with LocalApiClient(agent.files.socket) as api:
        blob = api.encrypt(G, b"sensor reading")
        group = member.group
        assert open_sealed(blob, lambda g, e: group.data_key(16), expected_group=G) == (
            b"sensor reading"
        )
        signature = api.sign(b"firmware manifest")
        agent.files.devid_public.verify(
            signature, app_signing_input(b"firmware manifest"), ec.ECDSA(hashes.SHA256())
        )
        api.seal("cloud-token", b"token-0123456789")
        assert api.unseal("cloud-token") == b"token-0123456789"
        names = {k["name"] for k in api.list_keys()}
        assert {"devid", f"epoch/{G}/{epoch}"} <= names

    assert agent.terminate() == 0
    status = agent.status()
    assert status["groups"][0]["epoch"] == epoch
    assert_no_secret_on_disk(agent.files.state_dir, [*member.secrets(), b"token-0123456789"])
    seq_before = harness.max_seq()

    # a restart resumes exactly: same epoch; the sequence goes on above the saved one and above
    # the clock's milliseconds (numbers a boot without this state may have used)
    agent.start()
    report = harness.expect(KeyStateReport)
    assert report.seq > seq_before
    assert report.seq >= (report.time - 5) * 1000
    assert isinstance(report.body, KeyStateReport)
    active = [r for r in report.body.keys if r.group == G and r.state.value == "active"]
    assert [r.epoch for r in active] == [epoch]
    epoch = member_update(member, harness)
    ack = harness.expect(Ack, epoch=epoch).body
    assert isinstance(ack, Ack) and ack.epoch_authenticator == member.group.epoch_authenticator
    harness.command(ReportRequest(os.urandom(16)))
    harness.expect(KeyStateReport)

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "status",
            "--config",
            str(agent.files.config),
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        check=True,
    )
    shown = json.loads(out.stdout)
    assert shown["groups"][0]["epoch"] == epoch and shown["device_id"] == DEVICE
    text = subprocess.run(
        [sys.executable, "-m", "agent.cli", "status", "--config", str(agent.files.config)],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    assert f"group {G}: epoch {epoch}" in text
    assert_no_secret_on_disk(agent.files.state_dir, member.secrets())


@pytest.mark.parametrize(
    ("point", "recognised"),
    [("before-persist", 0), ("after-persist", 1), ("after-publish", 1)],
)
def test_killed_at_each_point_of_applying_a_commit_resumes_consistently(
    env: tuple[AgentProcess, ServiceHarness], swtpm: Swtpm, point: str, recognised: int
) -> None:
    """SIGKILL (self-inflicted, see agent.daemon.FaultPoints) at the 2nd group.commit the agent
    handles: the member's update. After the restart the broker redelivers the commit: processed
    afresh if the state was not saved yet, else recognised as applied and answered again."""
    agent, harness = env
    agent.env = {"KEYAGENT_TEST_KILL_AT": f"{point}:group.commit:2"}
    agent.start()
    harness.expect(KeyStateReport)
    member = form_group(agent, harness)
    assert member.group is not None
    epoch = member_update(member, harness)
    assert agent.process is not None
    assert agent.process.wait(10) == -signal.SIGKILL
    agent.process = None
    flush_leftovers(swtpm)
    agent.env = {}
    agent.start()
    harness.expect(KeyStateReport)  # the restarted agent is connected
    wait_for_epoch(agent, epoch)
    deadline = time.monotonic() + 5
    while agent.status()["rejections"].get("replay.duplicate", 0) != recognised:
        assert time.monotonic() < deadline, agent.status()["rejections"]
        time.sleep(0.05)
    harness.drain(0.5)
    acks = [m for m in harness.received if isinstance(m.body, Ack) and m.body.epoch == epoch]
    for message in acks:
        assert isinstance(message.body, Ack)
        assert message.body.epoch_authenticator == member.group.epoch_authenticator
    # answered once before the kill and once more after it, or only after it; a second answer
    # is the very same envelope (same seq, same message id)
    assert len(acks) == (2 if point == "after-publish" else 1)
    assert len({m.message_id for m in acks}) == 1
    epoch = member_update(member, harness)
    ack = harness.expect(Ack, epoch=epoch).body
    assert isinstance(ack, Ack) and ack.epoch_authenticator == member.group.epoch_authenticator


def _handles(port: int, first: int) -> list[int]:
    body = struct.pack(">III", 0x00000001, first, 64)  # TPM_CAP_HANDLES
    response = _tpm_command(port, struct.pack(">HII", 0x8001, 10 + len(body), 0x17A) + body, 5)
    assert struct.unpack(">I", response[6:10])[0] == 0
    (count,) = struct.unpack(">I", response[15:19])
    handles = struct.unpack(f">{count}I", response[19 : 19 + 4 * count])
    return [h for h in handles if h >> 24 == first >> 24]


def flush_leftovers(swtpm: Swtpm) -> None:
    """What the kernel resource manager (/dev/tpmrm0) does when a process dies: flush its
    transient objects and sessions. swtpm has no resource manager, and power-cycling it instead
    would count as a non-orderly shutdown and soon put the TPM in dictionary-attack lockout."""
    for first in (0x80000000, 0x02000000, 0x03000000):
        for handle in _handles(swtpm.port, first):
            command = struct.pack(">HIII", 0x8001, 14, 0x165, handle)  # TPM2_FlushContext
            response = _tpm_command(swtpm.port, command, 5)
            assert struct.unpack(">I", response[6:10])[0] == 0


def wait_for_epoch(agent: AgentProcess, epoch: int) -> None:
    deadline = time.monotonic() + 10
    while agent.status()["groups"][0]["epoch"] != epoch:
        assert time.monotonic() < deadline, "agent did not reach the epoch after restart"
        time.sleep(0.05)


@pytest.mark.parametrize("seed", [1, 2])
def test_killed_at_random_moments_resumes_consistently(
    env: tuple[AgentProcess, ServiceHarness], swtpm: Swtpm, seed: int
) -> None:
    agent, harness = env
    rng = random.Random(seed)
    agent.start()
    harness.expect(KeyStateReport)
    member = form_group(agent, harness)
    assert member.group is not None
    for _round in range(3):
        epoch = member_update(member, harness)
        time.sleep(rng.uniform(0.0, 0.02))
        agent.kill()
        flush_leftovers(swtpm)
        agent.start()
        ack = harness.expect(Ack, epoch=epoch).body  # before the kill, or after the restart
        assert isinstance(ack, Ack) and ack.epoch_authenticator == member.group.epoch_authenticator
        wait_for_epoch(agent, epoch)
    epoch = member_update(member, harness)
    ack = harness.expect(Ack, epoch=epoch).body
    assert isinstance(ack, Ack) and ack.epoch_authenticator == member.group.epoch_authenticator
    by_seq: dict[int, set[bytes]] = {}
    for message in harness.received:
        by_seq.setdefault(message.seq, set()).add(message.message_id)
    assert all(len(ids) == 1 for ids in by_seq.values())  # a seq is never reused


def test_sd_notify_ready_status_watchdog_and_stopping(
    env: tuple[AgentProcess, ServiceHarness], tmp_path: Path
) -> None:
    agent, harness = env
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as supervisor:
        supervisor.bind(str(path))
        supervisor.settimeout(15)
        agent.env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "300000"}
        agent.start()
        started = time.monotonic()
        first = supervisor.recv(4096).decode()
        assert first.startswith("READY=1\nSTATUS="), first
        assert time.monotonic() - started < 10
        pings: list[float] = []
        others: list[str] = []
        harness.expect(KeyStateReport)
        harness.command(create_request(harness.files))
        harness.expect(GroupCreated)
        supervisor.settimeout(1)
        end = time.monotonic() + 1.6
        while time.monotonic() < end:
            data = supervisor.recv(4096).decode()
            if data == "WATCHDOG=1":
                pings.append(time.monotonic())
            else:
                others.append(data)
        assert "STATUS=g1@0" in others
        assert len(pings) >= 6, pings
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < 0.3  # WATCHDOG_USEC = 0.3 s: pinged every 0.15 s, never missed
        assert sorted(gaps)[len(gaps) // 2] == pytest.approx(0.15, abs=0.06)
        assert agent.terminate() == 0
        rest = []
        supervisor.settimeout(1)
        try:
            while True:
                rest.append(supervisor.recv(4096).decode())
        except TimeoutError:
            pass
        assert "STOPPING=1" in rest


def test_state_sealed_to_other_measurements_is_detected_and_reported(
    env: tuple[AgentProcess, ServiceHarness], swtpm: Swtpm
) -> None:
    agent, harness = env
    agent.start()
    harness.expect(KeyStateReport)
    form_group(agent, harness)
    assert agent.terminate() == 0
    with TPMStore(swtpm.tcti) as store:
        store.pcr_extend(16, bytes(range(32)))  # "the boot chain changed"
    agent.start()
    report = harness.expect(KeyStateReport).body
    assert isinstance(report, KeyStateReport)
    notes = [r.note for r in report.keys if r.kind.value == "state" and r.state.value == "active"]
    assert notes and "other measurements" in (notes[0] or "")
    status = agent.status()
    assert status["sealed_elsewhere"] is True and status["groups"] == []
    aside = [p.name for p in agent.files.state_dir.iterdir() if "sealed-elsewhere" in p.name]
    assert len(aside) == 2  # the old key blob and state file are kept, still encrypted
    assert "sealed to other measurements" in agent.log_text()


def test_state_restored_from_before_a_destruction_is_refused_as_rollback(
    env: tuple[AgentProcess, ServiceHarness],
) -> None:
    """Issue 17, attack 2. The adversary: whoever restores an old disk image (root on the
    device later, with the TPM). The state from before a destruction (an app secret re-sealed:
    the old one destroyed, the state key rotated) is put back: refused as state.rollback,
    reported (keys.report refused, status, ledger note, log), nothing of it loaded."""
    agent, harness = env
    agent.start()
    harness.expect(KeyStateReport)
    form_group(agent, harness)
    with LocalApiClient(agent.files.socket) as api:
        api.seal("cloud-token", b"token-one-0123456")
    assert agent.terminate() == 0
    state_dir = agent.files.state_dir
    backup = {name: (state_dir / name).read_bytes() for name in ("state-key.pem", "agent.state")}
    counter_before = agent.status()["state_counter"]
    agent.start()
    harness.expect(KeyStateReport)
    with LocalApiClient(agent.files.socket) as api:
        api.seal("cloud-token", b"token-two-0123456")  # the first secret's record: destroyed
        states = [k for k in api.list_keys() if k["kind"] == "state"]
    active = [k for k in states if k["state"] == "active"]
    assert len(active) == 1 and "counter advanced" in active[0]["note"]
    assert all(k["state"] == "destroyed" for k in states if k is not active[0])
    assert agent.terminate() == 0
    status = agent.status()
    assert status["state_counter"] == counter_before + 1 and status["state_rotations"] == 1
    for name, data in backup.items():
        (state_dir / name).write_bytes(data)
    agent.start()
    report = harness.expect(KeyStateReport).body
    assert isinstance(report, KeyStateReport)
    assert ("state.rollback", 1) in report.refused
    notes = [r.note for r in report.keys if r.kind.value == "state" and r.state.value == "active"]
    assert notes == [notes[0]] and "state.rollback" in (notes[0] or "")
    status = agent.status()
    assert status["state_rollback"] and "older state counter" in status["state_rollback"]
    assert status["groups"] == [] and status["state_counter"] == counter_before + 2
    assert "[state.rollback]" in agent.log_text()
    aside = [p.name for p in state_dir.iterdir() if ".rollback." in p.name]
    assert len(aside) == 2
    text = subprocess.run(
        [sys.executable, "-m", "agent.cli", "status", "--config", str(agent.files.config)],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    assert "WARNING: [state.rollback]" in text and f"state counter: {counter_before + 2}" in text


def test_software_devid_key_is_refused_without_the_explicit_flag(
    tmp_path: Path, swtpm: Swtpm, mosquitto: MosquittoBroker
) -> None:
    files = write_agent(tmp_path / "device", swtpm, mosquitto)
    (tmp_path / "device" / "devid.key").write_bytes(pki.key_to_pem(new_key()))
    files.config.write_text(
        files.config.read_text() + "\n[simulation]\ninsecure_software_keys = true\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(files.config)],
        cwd=REPO,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 1
    assert b"software key: refused" in out.stderr
    assert b"INSECURE" in out.stderr


def test_a_vanished_notify_socket_does_not_stop_the_agent(
    env: tuple[AgentProcess, ServiceHarness], tmp_path: Path
) -> None:
    agent, harness = env
    agent.env = {"NOTIFY_SOCKET": str(tmp_path / "gone.sock"), "WATCHDOG_USEC": "200000"}
    agent.start()
    harness.expect(KeyStateReport)
    harness.command(create_request(harness.files))
    harness.expect(GroupCreated)  # the STATUS= after the epoch change failed, quietly
    time.sleep(0.3)  # several watchdog pings into nowhere
    assert agent.process is not None and agent.process.poll() is None
    assert agent.terminate() == 0


def test_the_agent_joins_through_tree_pages_and_refuses_an_altered_page(
    env: tuple[AgentProcess, ServiceHarness], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real agent (swtpm keys, Mosquitto) added by the software member to a group whose
    Welcome carries no tree (the inline bound set to 0 in this process, where the member
    commits: what a group past 256 members does): it asks for the tree page by page
    (``group.tree_request``), refuses the tree when one page was altered
    (``mls.welcome.tree-hash``, no ack, no group), and joins when the Welcome comes again with
    the true pages: its ack's epoch authenticator is the member's."""
    agent, harness = env
    agent.start()
    harness.expect(KeyStateReport)
    monkeypatch.setattr(group_module, "INLINE_TREE_LEAVES", 0)
    member = SoftwareMember()
    created = ChangeAuthorization(
        authorize("group.create", G, [("dev-soft", member.point())])
    ).encode()
    member.group = Group.create(G.encode(), member.key_package(), member.leaf_key, authz=created)
    harness.command(KeyPackageRequest(os.urandom(16)))
    offered = harness.expect(KeyPackageMessage).body
    assert isinstance(offered, KeyPackageMessage)
    kp = KeyPackage.decode(offered.key_package)
    added = ChangeAuthorization(authorize("group.add", G, [(DEVICE, kp.signature_key)])).encode()
    result = member.group.add(member.signature_key, [kp], authz=added)
    assert result.welcome is not None
    member.group = result.group
    welcome = result.welcome.encode()
    # the pages carry the Authorizations the leaves record, as the service sends them
    pages = paginate(result.group.tree, max_bytes=1500, admissions=admissions_of([created, added]))
    assert len(pages) >= 2

    def serve(tree_pages: list[TreePageData]) -> None:
        harness.command(WelcomeDelivery(G, 1, welcome))
        for page in tree_pages:
            asked = harness.expect(TreeRequest).body
            assert isinstance(asked, TreeRequest)
            assert (asked.group_id, asked.epoch, asked.page) == (G, 1, page.index)
            harness.command(
                TreePage(
                    G,
                    1,
                    page.index,
                    page.count,
                    page.width,
                    page.start,
                    page.nodes,
                    page.admissions,
                )
            )

    items = codec.decode(pages[0].nodes, 1 << 20, "page")
    assert isinstance(items, list) and isinstance(items[0], dict)
    items[0] = {
        **items[0],
        "leaf": {**items[0]["leaf"], "enc": serialize_public_key(new_key().public_key())},
    }
    serve([replace(pages[0], nodes=codec.encode(items)), *pages[1:]])
    harness.drain(3.0)
    assert not any(isinstance(m.body, Ack) for m in harness.received)
    assert "mls.welcome.tree-hash" in agent.log_text()

    serve(pages)
    ack = harness.expect(Ack, epoch=1).body
    assert isinstance(ack, Ack) and ack.epoch_authenticator == member.group.epoch_authenticator
