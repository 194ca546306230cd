"""The local key API over a real Unix socket: server thread, client library, access rules by
peer credentials, malformed input. The backend is FakeKeyBackend (in-memory data keys through
agent.protocol.dataseal and agent.protocol.lifecycle); the TPM-backed backend is the daemon's."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent.config import load_config
from agent.localapi.access import AccessDenied, AccessPolicy, AccessRule, PeerCredentials
from agent.localapi.client import LocalApiClient
from agent.localapi.protocol import LENGTH, MAX_MESSAGE, Request, app_signing_input
from agent.localapi.server import LocalApiServer
from agent.protocol import dataseal
from agent.protocol.errors import ProtocolError, StateError, TransportError
from agent.protocol.lifecycle import KeyKind, KeyLedger, KeyRecord, KeyState, epoch_key_name
from agent.protocol.secret import Secret
from agent.protocol.wire import cbor
from tests.fixtures.nobody import NobodyPython

pytestmark = pytest.mark.pure

GRACE = 600
ROOT = PeerCredentials(pid=1, uid=0, gid=0)
NOBODY = PeerCredentials(pid=2, uid=65534, gid=65534)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now


class FakeKeyBackend:
    """In-memory KeyBackend: epoch data keys in a dict, lifecycle in a real KeyLedger, a software
    DevID key. Only for pure tests."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.ledger = KeyLedger(clock)
        self.keys: dict[tuple[str, int], Secret] = {}
        self.sealed: dict[tuple[int, str], bytes] = {}
        self.devid = ec.generate_private_key(ec.SECP256R1())
        self.ledger.add("devid", KeyKind.DEVID, active=True)
        self.signed: list[bytes] = []
        self.fail_with: Exception | None = None

    def new_epoch(self, group: str, epoch: int) -> None:
        self.keys[(group, epoch)] = Secret(os.urandom(16))
        self.ledger.start_epoch(group, epoch)

    def destroy_expired(self) -> None:
        for record in self.ledger.due_for_destruction(GRACE, self.clock()):
            assert record.group is not None and record.epoch is not None
            self.keys.pop((record.group, record.epoch)).wipe()
            self.ledger.transition(record.name, KeyState.DESTROYED)

    def _data_key(self, group: str, epoch: int) -> Secret:
        self.ledger.check_decrypt(group, epoch, GRACE, self.clock())
        return self.keys[(group, epoch)]

    def encrypt(self, group: str, plaintext: bytes) -> bytes:
        if self.fail_with is not None:
            raise self.fail_with
        epoch = self.ledger.current_epoch(group).epoch
        assert epoch is not None
        return dataseal.seal(group, epoch, self.keys[(group, epoch)], plaintext)

    def decrypt(self, group: str, blob: bytes) -> bytes:
        return dataseal.open_sealed(blob, self._data_key, expected_group=group)

    def sign(self, message: bytes) -> bytes:
        self.signed.append(message)
        return self.devid.sign(message, ec.ECDSA(hashes.SHA256()))

    def seal(self, name: str, secret: bytes, caller_uid: int) -> None:
        ledger_name = f"app/{caller_uid}/{name}"
        if ledger_name not in self.ledger:
            self.ledger.add(ledger_name, KeyKind.APP_SEAL, owner=caller_uid, active=True)
        self.sealed[(caller_uid, name)] = secret

    def unseal(self, name: str, caller_uid: int) -> bytes:
        try:
            return self.sealed[(caller_uid, name)]
        except KeyError:
            raise ProtocolError("seal.unknown", f"no secret named {name!r} for this uid") from None

    def list_keys(self) -> list[KeyRecord]:
        return list(self.ledger)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A socket directory another uid can reach (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="kf-api-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def backend() -> FakeKeyBackend:
    fake = FakeKeyBackend(FakeClock())
    fake.new_epoch("g1", 1)
    fake.new_epoch("g2", 1)
    return fake


ROOT_G1 = AccessPolicy(
    [AccessRule(uid=0, gid=None, operations=frozenset({"*"}), groups=frozenset({"g1"}))]
)


@pytest.fixture
def server(sockdir: Path, backend: FakeKeyBackend) -> Iterator[LocalApiServer]:
    srv = LocalApiServer(sockdir / "api.sock", ROOT_G1, backend)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _raw(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(path))
    return sock


def _read_response(sock: socket.socket) -> dict[str, object]:
    def exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            assert chunk, "server closed the connection"
            buf += chunk
        return buf

    (length,) = LENGTH.unpack(exact(4))
    obj = cbor.decode(exact(length), max_size=MAX_MESSAGE)
    assert isinstance(obj, dict)
    return obj


def _error_check(response: dict[str, object]) -> str:
    assert response["ok"] is False
    error = response["error"]
    assert isinstance(error, dict)
    return str(error["check"])


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_round_trip_of_every_operation(server: LocalApiServer, backend: FakeKeyBackend) -> None:
    with LocalApiClient(server.socket_path) as client:
        blob = client.encrypt("g1", b"sensor reading 42")
        header, _ = dataseal.parse_header(blob)
        assert (header.group, header.epoch) == ("g1", 1)
        assert client.decrypt("g1", blob) == b"sensor reading 42"

        signature = client.sign(b"firmware digest")
        backend.devid.public_key().verify(
            signature, app_signing_input(b"firmware digest"), ec.ECDSA(hashes.SHA256())
        )
        assert backend.signed == [app_signing_input(b"firmware digest")]  # never the bare bytes

        client.seal("cloud-token", b"t0ken")
        assert client.unseal("cloud-token") == b"t0ken"
        with pytest.raises(ProtocolError) as info:
            client.unseal("other")
        assert info.value.check == "seal.unknown"

        keys = {k["name"]: k for k in client.list_keys()}
        assert keys["devid"]["state"] == "active"
        assert keys[epoch_key_name("g1", 1)]["kind"] == "epoch"
        assert keys["app/0/cloud-token"]["owner"] == 0
    counters = server.counters()
    assert counters["ok"] == 6 and counters["error.seal.unknown"] == 1


def test_old_epoch_decrypts_in_grace_then_expires(
    server: LocalApiServer, backend: FakeKeyBackend
) -> None:
    with LocalApiClient(server.socket_path) as client:
        old = client.encrypt("g1", b"before rekey")
        backend.new_epoch("g1", 2)
        new = client.encrypt("g1", b"after rekey")
        assert dataseal.parse_header(new)[0].epoch == 2
        backend.clock.now += GRACE - 1
        assert client.decrypt("g1", old) == b"before rekey"
        backend.clock.now += 1
        backend.destroy_expired()
        with pytest.raises(ProtocolError) as info:
            client.decrypt("g1", old)
        assert info.value.check == "data.epoch-expired"
        assert client.decrypt("g1", new) == b"after rekey"
        states = {k["name"]: k["state"] for k in client.list_keys()}
        assert states[epoch_key_name("g1", 1)] == "destroyed"


def test_group_rules_and_cross_group_blobs(
    server: LocalApiServer, backend: FakeKeyBackend, caplog: pytest.LogCaptureFixture
) -> None:
    g2_blob = dataseal.seal("g2", 1, backend.keys[("g2", 1)], b"g2 data")
    with LocalApiClient(server.socket_path) as client, caplog.at_level(logging.WARNING):
        with pytest.raises(AccessDenied) as denied:
            client.encrypt("g2", b"x")
        assert denied.value.check == "api.denied"
        # A g2 blob presented as g1 is refused before any key is used.
        with pytest.raises(ProtocolError) as info:
            client.decrypt("g1", g2_blob)
        assert info.value.check == "data.group-mismatch"
    assert server.counters()["refused.encrypt"] == 1
    (record,) = [r for r in caplog.records if r.name == "keyagent.localapi"]
    assert "uid=0" in record.getMessage() and "'g2'" in record.getMessage()


def test_acceptance_two_apps_under_different_uids(
    sockdir: Path,
    backend: FakeKeyBackend,
    caplog: pytest.LogCaptureFixture,
    nobody_python: NobodyPython,
) -> None:
    """Rules come from agent.toml: uid 0 may encrypt/decrypt on g1, nobody may not. The socket
    is group nogroup, mode 0660, so nobody reaches it and the refusal comes from the rules."""
    config_file = sockdir / "agent.toml"
    config_file.write_text(
        f"""
[api]
socket = "{sockdir / "api.sock"}"
socket_group = "nogroup"

[[api.rules]]
uid = 0
operations = ["encrypt", "decrypt"]
groups = ["g1"]
"""
    )
    config = load_config(config_file)
    srv = LocalApiServer(
        config.api.socket,
        config.api.policy,
        backend,
        socket_group=config.api.socket_group,
    )
    with srv, caplog.at_level(logging.INFO, logger="keyagent.localapi"):
        info = config.api.socket.stat()
        assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == 65534
        with LocalApiClient(config.api.socket) as client:
            blob = client.encrypt("g1", b"from root")
            assert client.decrypt("g1", blob) == b"from root"
        result = nobody_python.encrypt(config.api.socket, "g1")
        assert result.returncode == 7, result.stderr
        assert result.stdout.strip() == "DENIED api.denied"
        counters = srv.counters()
    assert counters["refused"] == 1 and counters["refused.encrypt"] == 1
    refusals = [
        r for r in caplog.records if r.name == "keyagent.localapi" and r.levelno == logging.WARNING
    ]
    assert len(refusals) == 1
    message = refusals[0].getMessage()
    assert "uid=65534" in message and "encrypt" in message and "'g1'" in message
    assert "from nobody" not in caplog.text  # payloads are never logged


def test_nobody_allowed_by_gid_rule(
    sockdir: Path, backend: FakeKeyBackend, nobody_python: NobodyPython
) -> None:
    policy = AccessPolicy(
        [
            AccessRule(
                uid=None, gid=65534, operations=frozenset({"encrypt"}), groups=frozenset({"*"})
            )
        ]
    )
    with LocalApiServer(sockdir / "api.sock", policy, backend, socket_mode=0o666) as srv:
        result = nobody_python.encrypt(srv.socket_path, "g2")
        assert result.stdout.strip() == "ENCRYPTED", result.stderr
        assert srv.counters().get("refused", 0) == 0


def test_seal_is_bound_to_the_caller_uid_and_listing_hides_other_apps(
    backend: FakeKeyBackend, sockdir: Path
) -> None:
    policy = AccessPolicy(
        [
            AccessRule(uid=None, gid=g, operations=frozenset({"*"}), groups=frozenset())
            for g in (0, 65534)
        ]
    )
    srv = LocalApiServer(sockdir / "unused.sock", policy, backend)

    def call(peer: PeerCredentials, request: Request) -> dict[str, object]:
        obj = cbor.decode(srv.handle(peer, cbor.encode(request.to_map()))[4:])
        assert isinstance(obj, dict)
        return obj

    assert call(ROOT, Request("seal", name="k", secret=b"root's"))["ok"] is True
    assert call(NOBODY, Request("seal", name="k", secret=b"nobody's"))["ok"] is True
    assert call(ROOT, Request("unseal", name="k"))["result"] == b"root's"
    assert call(NOBODY, Request("unseal", name="k"))["result"] == b"nobody's"
    listed = call(NOBODY, Request("list-keys"))["result"]
    assert isinstance(listed, list)
    names = {r["name"] for r in listed}
    assert "app/65534/k" in names and "app/0/k" not in names and "devid" in names
    # encrypt/decrypt need groups; this policy lists none
    assert _error_check(call(ROOT, Request("encrypt", group="g1", data=b""))) == "api.denied"


def _frame(obj: object) -> bytes:
    payload = cbor.encode(obj)
    return LENGTH.pack(len(payload)) + payload


@pytest.mark.parametrize(
    ("payload", "check"),
    [
        (b"\xff\xff", "cbor.type"),
        (b"\xa1\x61", "cbor.truncated"),
        (cbor.encode({"v": 1, "op": "sign", "data": b"x"}) + b"\x00", "cbor.trailing"),
        (b"\xc1\x00", "cbor.tag"),
        (cbor.encode([1, 2]), "api.request"),
        (cbor.encode({"op": "sign", "data": b"x"}), "api.version"),
        (cbor.encode({"v": 1, "op": "fly"}), "api.op-unknown"),
        (cbor.encode({"v": 1, "op": "sign", "data": "text, not bytes"}), "api.request"),
        (cbor.encode({"v": 1, "op": "sign", "data": b"x", "extra": 1}), "api.request"),
        (cbor.encode({"v": 1, "op": "encrypt", "group": "a/b", "data": b""}), "data.group"),
        (cbor.encode({"v": 1, "op": "seal", "name": "k", "secret": bytes(129)}), "api.too-large"),
        (cbor.encode({"v": 1, "op": "unseal", "name": "../etc"}), "api.name"),
    ],
)
def test_malformed_requests_get_an_error_and_the_connection_keeps_serving(
    server: LocalApiServer, payload: bytes, check: str
) -> None:
    with _raw(server.socket_path) as sock:
        sock.sendall(LENGTH.pack(len(payload)) + payload)
        assert _error_check(_read_response(sock)) == check
        sock.sendall(_frame({"v": 1, "op": "list-keys"}))
        assert _read_response(sock)["ok"] is True
    assert server.counters()[f"error.{check}"] == 1


@pytest.mark.parametrize(
    ("length", "check"), [(0, "api.frame-length"), (MAX_MESSAGE + 1, "api.too-large")]
)
def test_bad_frame_length_is_answered_then_closed(
    server: LocalApiServer, length: int, check: str
) -> None:
    with _raw(server.socket_path) as sock:
        sock.sendall(LENGTH.pack(length) + b"junk")
        assert _error_check(_read_response(sock)) == check
        assert _closed(sock)
    with LocalApiClient(server.socket_path) as client:  # and the server still serves
        assert client.list_keys()


def test_pipelined_requests_are_answered_in_order(server: LocalApiServer) -> None:
    with _raw(server.socket_path) as sock:
        sock.sendall(
            _frame({"v": 1, "op": "unseal", "name": "missing"})
            + _frame({"v": 1, "op": "list-keys"})
            + _frame({"v": 1, "op": "fly"})
        )
        assert _error_check(_read_response(sock)) == "seal.unknown"
        assert _read_response(sock)["ok"] is True
        assert _error_check(_read_response(sock)) == "api.op-unknown"


def test_stalled_and_idle_connections_are_closed(sockdir: Path, backend: FakeKeyBackend) -> None:
    srv = LocalApiServer(
        sockdir / "api.sock", ROOT_G1, backend, request_timeout=0.3, idle_timeout=0.6
    )
    with srv, _raw(srv.socket_path) as stalled, _raw(srv.socket_path) as idle:
        stalled.sendall(LENGTH.pack(100) + b"only part")
        start = time.monotonic()
        assert _closed(stalled)
        assert _closed(idle)
        assert time.monotonic() - start < 4
        assert srv.counters()["timeouts"] == 2


def test_too_many_connections_get_busy(sockdir: Path, backend: FakeKeyBackend) -> None:
    with LocalApiServer(sockdir / "api.sock", ROOT_G1, backend, max_connections=2) as srv:
        first, second = _raw(srv.socket_path), _raw(srv.socket_path)
        third = _raw(srv.socket_path)
        assert _error_check(_read_response(third)) == "api.busy"
        assert _closed(third)
        for sock in (first, second, third):
            sock.close()
        assert srv.counters()["busy"] == 1


def test_backend_failures_are_contained(
    server: LocalApiServer, backend: FakeKeyBackend, caplog: pytest.LogCaptureFixture
) -> None:
    with LocalApiClient(server.socket_path) as client:
        backend.fail_with = StateError("state file unavailable")
        with pytest.raises(ProtocolError) as info:
            client.encrypt("g1", b"x")
        assert info.value.check == "api.unavailable"
        backend.fail_with = RuntimeError("bug")
        with (
            caplog.at_level(logging.ERROR, logger="keyagent.localapi"),
            pytest.raises(ProtocolError) as info,
        ):
            client.encrypt("g1", b"x")
        assert info.value.check == "api.internal" and "bug" not in info.value.reason
        assert "internal error" in caplog.text
        backend.fail_with = None
        assert client.decrypt("g1", client.encrypt("g1", b"ok")) == b"ok"


def test_socket_file_handling(sockdir: Path, backend: FakeKeyBackend) -> None:
    path = sockdir / "sub" / "api.sock"
    with LocalApiServer(path, ROOT_G1, backend) as srv:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
        with pytest.raises(TransportError, match="another process is serving"):
            LocalApiServer(path, ROOT_G1, backend).bind()
        assert srv.counters().get("requests", 0) == 0
    assert not path.exists()  # removed on stop
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a crashed agent's socket file: replaced
    with LocalApiServer(path, ROOT_G1, backend), LocalApiClient(path) as client:
        assert client.list_keys()
    path.write_text("not a socket")
    with pytest.raises(TransportError, match="not a socket"):
        LocalApiServer(path, ROOT_G1, backend).bind()


def test_client_reports_an_absent_agent(sockdir: Path) -> None:
    with pytest.raises(TransportError, match="cannot reach keyagent"):
        LocalApiClient(sockdir / "absent.sock").list_keys()


def test_client_reconnects_after_the_server_closed(sockdir: Path, backend: FakeKeyBackend) -> None:
    path = sockdir / "api.sock"
    client = LocalApiClient(path, timeout=5)
    with LocalApiServer(path, ROOT_G1, backend):
        assert client.list_keys()
    with pytest.raises(TransportError):
        client.list_keys()
    with LocalApiServer(path, ROOT_G1, backend):
        assert client.list_keys()
    client.close()


def test_reprs_hold_no_payload() -> None:
    request = Request("seal", name="k", secret=b"TOPSECRET")
    assert "TOPSECRET" not in repr(request)
    assert "sensor" not in repr(Request("encrypt", group="g1", data=b"sensor"))
