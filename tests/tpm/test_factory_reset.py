"""``keyagent factory-reset`` against a real swtpm, without a reachable broker: the keys are
destroyed anyway and the command says (exit 1) that the service was not told; a live agent
(its API socket accepts connections) makes it refuse before touching anything."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.reset import AgentRunning, factory_reset
from agent.tpm.blob import KeyBlob
from agent.tpm.parents import RING, ParentRing
from agent.tpm.store import ParentEvicted, TPMStore
from agent.tpm.templates import KeyKind
from firmware_sim.swtpm import free_port_pair
from provisioning import pki
from tests.fixtures.swtpm import Swtpm

pytestmark = pytest.mark.tpm

ROOT = Path(__file__).resolve().parents[2]


def provisioned(tmp: Path, swtpm: Swtpm, port: int) -> Path:
    now = datetime.now(UTC)
    ca = pki.create_ca("reset test CA", now=now, valid_for=timedelta(days=1))
    with TPMStore(swtpm.tcti) as store:
        blob = store.create_key(KeyKind.DEVID)
        with store.load_key(blob) as key:
            devid_public = key.public_key()
    blob.save(tmp / "devid.key")
    cert = pki.issue_client_cert(
        ca, devid_public, identity="dev-r", role="device", now=now, valid_for=timedelta(1)
    )
    pki.write_certificate(tmp / "devid.pem", cert)
    pki.write_certificate(tmp / "ca.pem", ca.certificate)
    tls_key = pki.generate_key()
    pki.write_private_key(tmp / "tls.key", tls_key)
    tls = pki.issue_client_cert(
        ca, tls_key.public_key(), identity="dev-r", role="device", now=now, valid_for=timedelta(1)
    )
    pki.write_certificate(tmp / "tls.pem", tls)
    service = pki.generate_key()
    (tmp / "service.pem").write_bytes(pki.public_key_to_pem(service.public_key()))
    state = tmp / "state"
    (state / "leaves").mkdir(parents=True)
    with TPMStore(swtpm.tcti) as store:
        parent = ParentRing(store).ensure()  # leaf keys live under a rotating parent
        store.create_key(KeyKind.LEAF, parent=parent).save(state / "leaves" / "leaf.pem")
        store.seal(b"\x01" * 32, (16,)).save(state / "state-key.pem")
    (state / "agent.state").write_bytes(b"KFST encrypted state stands in here")
    config = tmp / "agent.toml"
    config.write_text(
        f"""
[tpm]
tcti = "{swtpm.tcti}"
pcrs = [16]
[state]
dir = "{state}"
[identity]
device_id = "dev-r"
devid_cert = "{tmp / "devid.pem"}"
devid_key = "{tmp / "devid.key"}"
tls_cert = "{tmp / "tls.pem"}"
tls_key = "{tmp / "tls.key"}"
[fleet]
service_cert = "{tmp / "service.pem"}"
trust_anchors = ["{tmp / "ca.pem"}"]
[broker]
host = "127.0.0.1"
port = {port}
ca = "{tmp / "ca.pem"}"
[api]
socket = "{tmp / "api.sock"}"
"""
    )
    return config


def test_unreachable_service_still_destroys_and_exits_1(tmp_path: Path, swtpm: Swtpm) -> None:
    closed_port = free_port_pair()  # nothing listens there
    config = provisioned(tmp_path, swtpm, closed_port)
    files = [
        tmp_path / "devid.key",
        tmp_path / "tls.key",
        tmp_path / "devid.pem",
        tmp_path / "tls.pem",
        tmp_path / "state" / "leaves" / "leaf.pem",
        tmp_path / "state" / "state-key.pem",
        tmp_path / "state" / "agent.state",
    ]
    assert all(p.exists() for p in files)
    leaf_copy = (tmp_path / "state" / "leaves" / "leaf.pem").read_bytes()  # a backup
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "factory-reset",
            "--yes",
            "--timeout",
            "2",
            "--config",
            str(config),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the service was NOT told" in result.stdout
    assert "WARNING: the service was not told" in result.stdout
    for path in files:
        assert not path.exists(), path
        assert f"destroyed {path}" in result.stdout
    assert config.exists()  # a hand-written configuration is not the reset's to delete
    assert not (tmp_path / "state" / "leaves").exists()
    assert "evicted the rotating parents of leaf and init keys: 0x81004b40" in result.stdout
    with TPMStore(swtpm.tcti) as store:  # the backup of the leaf blob is dead too
        with pytest.raises(ParentEvicted):
            store.load_key(KeyBlob.from_pem(leaf_copy))
        assert not set(store.persistent_handles()) & set(RING)
    # run again: the configuration no longer loads; still nothing to sign with, still exit 1
    again = factory_reset(config, timeout=1)
    assert again.exit_code == 1 and "no longer loads" in again.service_note
    assert again.destroyed == []


def test_refuses_while_the_agent_api_socket_answers(tmp_path: Path, swtpm: Swtpm) -> None:
    config = provisioned(tmp_path, swtpm, free_port_pair())
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "api.sock"))
    listener.listen(1)
    try:
        with pytest.raises(AgentRunning) as err:
            factory_reset(config, timeout=1)
        assert "api.sock" in str(err.value)
    finally:
        listener.close()
    assert (tmp_path / "devid.key").exists() and (tmp_path / "state" / "agent.state").exists()
    os.unlink(tmp_path / "api.sock")  # a stale socket file alone does not block a reset
    report = factory_reset(config, timeout=1)
    assert report.exit_code == 1 and not (tmp_path / "devid.key").exists()
