"""``keyagent api ...`` against a real local API server (FakeKeyBackend) in this process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent.localapi.access import AccessPolicy, AccessRule
from agent.localapi.protocol import app_signing_input
from agent.localapi.server import LocalApiServer
from tests.pure.test_localapi import FakeClock, FakeKeyBackend

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[LocalApiServer, FakeKeyBackend]]:
    backend = FakeKeyBackend(FakeClock())
    backend.new_epoch("g1", 3)
    policy = AccessPolicy(
        [
            AccessRule(
                uid=0,
                gid=None,
                operations=frozenset({"encrypt", "decrypt", "sign", "seal", "unseal", "list-keys"}),
                groups=frozenset({"g1"}),
            )
        ]
    )
    with LocalApiServer(tmp_path / "api.sock", policy, backend) as server:
        yield server, backend


def keyagent(socket: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "api", "--socket", str(socket), *args],
        input=stdin,
        capture_output=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def test_shell_round_trip(api: tuple[LocalApiServer, FakeKeyBackend]) -> None:
    server, backend = api
    sealed = keyagent(server.socket_path, "encrypt", "--group", "g1", stdin=b"hello\x00world")
    assert sealed.returncode == 0, sealed.stderr
    assert sealed.stdout.startswith(b"KFD\x01")
    opened = keyagent(server.socket_path, "decrypt", "--group", "g1", stdin=sealed.stdout)
    assert opened.stdout == b"hello\x00world"

    signature = keyagent(server.socket_path, "sign", stdin=b"image").stdout
    backend.devid.public_key().verify(
        signature, app_signing_input(b"image"), ec.ECDSA(hashes.SHA256())
    )

    assert keyagent(server.socket_path, "seal", "token", stdin=b"s3cret").returncode == 0
    assert keyagent(server.socket_path, "unseal", "token").stdout == b"s3cret"

    table = keyagent(server.socket_path, "keys").stdout.decode()
    assert table.splitlines()[0].split() == ["NAME", "KIND", "STATE", "SINCE"]
    assert any(line.split()[:3] == ["epoch/g1/3", "epoch", "active"] for line in table.splitlines())
    records = json.loads(keyagent(server.socket_path, "keys", "--json").stdout)
    assert {r["name"] for r in records} == {"devid", "epoch/g1/3", "app/0/token"}


def test_refusals_and_absent_agent_have_distinct_exit_codes(
    api: tuple[LocalApiServer, FakeKeyBackend], tmp_path: Path
) -> None:
    server, _ = api
    refused = keyagent(server.socket_path, "encrypt", "--group", "g2", stdin=b"x")
    assert refused.returncode == 1 and refused.stdout == b""
    assert refused.stderr.decode().startswith("keyagent api: refused [api.denied] uid=0")
    too_big = keyagent(server.socket_path, "seal", "token", stdin=bytes(200))
    assert too_big.returncode == 1 and b"[api.too-large]" in too_big.stderr
    absent = keyagent(tmp_path / "absent.sock", "keys")
    assert absent.returncode == 3 and b"cannot reach keyagent" in absent.stderr
