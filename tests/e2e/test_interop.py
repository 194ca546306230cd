"""docs/interop.md's commands, run as written: a device provisioned through the real enrollment
API (swtpm with EK certificates, factory console on a pty, HTTPS with mutual TLS, SQLite), then
`openssl verify` on its DevID chain, `tpm2_checkquote` on a quote its TPM made with its AK, and
tpm2-openssl loading its DevID blob and signing with it. The commands come from the doc's
``# check:`` blocks, so the doc cannot drift from what the tools accept."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.tpm import KeyBlob, TPMStore
from tests.e2e.test_provisioning_e2e import _provision, fleet, make_device
from tests.tpm.test_enroll import EnrollmentService

pytestmark = pytest.mark.e2e
__all__ = ["fleet", "make_device"]  # fixtures used by name

DOC = Path(__file__).resolve().parents[2] / "docs" / "interop.md"
PCRS = (0, 1, 4, 8, 9)


def doc_check(name: str) -> str:
    """The shell block of docs/interop.md whose first line is ``# check: NAME``."""
    blocks = re.findall(r"```sh\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    found: list[str] = [b for b in blocks if b.startswith(f"# check: {name}\n")]
    assert len(found) == 1, f"docs/interop.md: {len(found)} blocks '# check: {name}'"
    return found[0]


def run_check(name: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    for tool in ("openssl", "tpm2_checkquote"):
        assert shutil.which(tool), f"{tool} missing: scripts/install-deps.sh installs it"
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", doc_check(name)],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_doc_commands_accept_a_provisioned_device(
    fleet: EnrollmentService, make_device: Any, tmp_path: Path
) -> None:
    device = make_device()
    report = _provision(fleet, device)
    assert report.ok, report.to_json()
    state = device.state_dir

    chain = run_check("devid-chain", state)
    assert chain.returncode == 0 and chain.stdout == "identity/devid.pem: OK\n", chain

    # Stop the factory console: swtpm has no resource manager, one TPM user at a time.
    device.console.stop()
    device.store.close()
    nonce = os.urandom(32)
    with (
        TPMStore(device.swtpm.tcti) as store,
        store.load_key(KeyBlob.load(state / "keys" / "ak.tss")) as ak,
    ):
        values = store.pcr_read(PCRS)
        quote = store.quote(ak, nonce, PCRS)
        ak_pem = ak.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    work = tmp_path / "quote"
    work.mkdir()
    (work / "quote.bin").write_bytes(quote.attest)
    (work / "quote.sig").write_bytes(quote.signature)
    (work / "ak.pem").write_bytes(ak_pem)
    (work / "pcrs.bin").write_bytes(b"".join(values[i] for i in PCRS))
    assert quote.signature[0] == 0x30  # DER SEQUENCE, as the wire carries it
    checked = run_check("quote", work, NONCE=nonce.hex())
    assert checked.returncode == 0, checked
    # the same command refuses another nonce and other PCR values
    assert run_check("quote", work, NONCE=os.urandom(32).hex()).returncode != 0
    (work / "pcrs.bin").write_bytes(b"\x01" * 32 * len(PCRS))
    assert run_check("quote", work, NONCE=nonce.hex()).returncode != 0

    blob = run_check("blob", state, TCTI=device.swtpm.tcti)
    assert blob.returncode == 0 and "Verified OK" in blob.stdout, blob
