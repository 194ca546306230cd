"""History that cannot be rewritten unnoticed, on a real deployment: Mosquitto with TLS,
``keyfleet serve`` with ``[audit] checkpoint_key`` on SQLite and on PostgreSQL, the operator CLI
as a subprocess.

The adversary is a database writer: after an operator synced a checkpoint (and a witness and an
export copied them, and while a witness keeps watching), it deletes one audit entry and
recomputes the chain after it, or cuts the last 10 entries off, and in both cases also deletes
the stored checkpoints so the service signs fresh ones of the rewritten log with its real
checkpoint key. ``keyfleet audit verify`` alone still says OK (the chain is consistent); the
operator's ``audit sync``, the witness and ``audit verify --checkpoint`` refuse it with the check
id, and the operator's remembered checkpoint and the witness's file are left as they were.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from provisioning import audit, pki
from provisioning.registry import Outcome
from tests.audit_tamper import delete_and_recompute, truncate
from tests.fixtures.deployment import DeployFactory
from tests.service_deployment import Deployment, keyfleet

pytestmark = pytest.mark.e2e
DATABASE_BACKENDS = ("sqlite", "postgresql")


class Audited:
    """A deployment whose service signs audit checkpoints, and the operator's files."""

    def __init__(self, deployment: Deployment, workdir: Path) -> None:
        self.d = deployment
        self.pub = workdir / "audit-checkpoint.pub"
        self.state = workdir / "operator-state"
        self.witness = workdir / "witness"
        self.export = workdir / "export.jsonl"

    def append(self, count: int) -> None:
        """``count`` more audit entries, as the local admin commands write them."""

        def work(session: Session) -> None:
            for i in range(count):
                audit.append(
                    session, now=1_800_000_000 + i, actor="local:admin", action="station.add",
                    target=f"station:s-{i}", outcome=Outcome.ACCEPTED, details={"i": i},
                )  # fmt: skip

        self.d.read(work)

    def sync(self, *extra: str) -> tuple[int, str, str]:
        done = self.d.cli(
            "audit", "sync", "--checkpoint-cert", str(self.pub), "--state-dir", str(self.state),
            "--json", "--timeout", "60", *extra,
        )  # fmt: skip
        return done.returncode, done.stdout, done.stderr

    def synced_count(self) -> int:
        status, out, err = self.sync()
        assert status == 0, out + err
        count: int = json.loads(out)["count"]
        return count

    def witness_once(self) -> tuple[int, str, str]:
        done = self.d.cli(
            "audit", "witness", "--to", str(self.witness), "--checkpoint-cert", str(self.pub),
            "--timeout", "60",
        )  # fmt: skip
        return done.returncode, done.stdout, done.stderr

    def verify(self, *extra: str) -> tuple[int, str]:
        done = self.local("audit", "verify", "--config", str(self.d.config), *extra)
        return done.returncode, done.stdout + done.stderr

    def local(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A command on the service host (database access, no operator connection)."""
        return keyfleet(*args, cwd=self.d.workdir)

    def remembered(self) -> dict[str, bytes]:
        return {path.name: path.read_bytes() for path in sorted(self.state.iterdir())}


@pytest.fixture
def audited(deploy: DeployFactory, database_url: str, tmp_path: Path) -> Audited:
    key = pki.generate_key()
    pki.write_private_key(tmp_path / "audit-checkpoint.key", key)
    (tmp_path / "audit-checkpoint.pub").write_bytes(pki.public_key_to_pem(key.public_key()))
    deployment = deploy(
        "audit",
        db_url=database_url,
        operator=("op-admin", "admin"),
        service='\n[audit]\ncheckpoint_key = "audit-checkpoint.key"\n'
        "checkpoint_interval_seconds = 10\n",
    )
    return Audited(deployment, tmp_path)


def seen_and_copied(audited: Audited) -> int:
    """The honest history: checkpoints at two lengths, synced by the operator, copied by the
    witness, exported; everything agrees. Returns the remembered count."""
    audited.append(10)
    first = audited.synced_count()
    status, out, err = audited.witness_once()
    assert status == 0 and "witnessed" in out, out + err
    audited.append(10)
    second = audited.synced_count()
    assert second >= first + 10
    status, out, err = audited.witness_once()
    assert status == 0 and "witnessed" in out, out + err
    done = audited.local(
        "audit", "checkpoint", "export", "--config", str(audited.d.config),
        "--checkpoint-cert", str(audited.pub), "--out", str(audited.export),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(audited.export.read_text().splitlines()) >= 2
    status, text = audited.verify(
        "--checkpoint", str(audited.export), "--checkpoint-cert", str(audited.pub)
    )
    assert status == 0 and "agree with the chain" in text, text
    return second


def test_deleted_entry_with_recomputed_chain_is_detected(audited: Audited) -> None:
    """Database writer: deletes entry 5 (say the group add that let someone in), recomputes the
    chain and deletes the stored checkpoints; the log then grows on."""
    remembered = seen_and_copied(audited)
    before = audited.remembered()
    witnessed = (audited.witness / "checkpoints.jsonl").read_bytes()
    running = audited.d.cli_async(
        "audit", "witness", "--to", str(audited.witness), "--every", "1",
        "--checkpoint-cert", str(audited.pub), "--timeout", "60",
    )  # fmt: skip
    try:
        time.sleep(3)
        assert running.poll() is None  # an honest log: the witness keeps watching
        audited.d.read(lambda session: delete_and_recompute(session, 5))
        audited.append(3)  # the log grows past the remembered count again
        _, alarm = running.communicate(timeout=120)
    finally:
        if running.poll() is None:
            running.kill()
            running.wait(10)
    assert running.returncode == 1, alarm
    assert "WITNESS ALARM" in alarm and "[audit.checkpoint.fork]" in alarm, alarm

    status, text = audited.verify()
    assert status == 0, text  # the chain alone cannot tell
    status, text = audited.verify(
        "--checkpoint", str(audited.export), "--checkpoint-cert", str(audited.pub)
    )
    assert status == 1, text
    assert "[audit.checkpoint.fork]" in text, text  # the checkpoint at the first sync's count

    status, out, err = audited.sync()
    assert status == 1, out + err
    assert "[audit.checkpoint.fork]" in err, err
    assert f"the checkpoint you saw before: {remembered} entries" in err, err
    assert audited.remembered() == before  # nothing changed

    status, out, err = audited.witness_once()
    assert status == 1 and "WITNESS ALARM" in err and "[audit.checkpoint.fork]" in err, err
    assert (audited.witness / "checkpoints.jsonl").read_bytes() == witnessed


def test_truncated_tail_is_detected_and_another_key_is_refused(audited: Audited) -> None:
    """Database writer: cuts the last 10 entries off and deletes the stored checkpoints. And a
    checkpoint checked against a key that is not the pinned one is refused."""
    remembered = seen_and_copied(audited)
    before = audited.remembered()
    witnessed = (audited.witness / "checkpoints.jsonl").read_bytes()
    audited.d.read(lambda session: truncate(session, 10))

    status, text = audited.verify()
    assert status == 0, text
    status, text = audited.verify(
        "--checkpoint", str(audited.export), "--checkpoint-cert", str(audited.pub)
    )
    assert status == 1, text
    assert "[audit.checkpoint.rollback]" in text, text

    status, out, err = audited.sync()
    assert status == 1, out + err
    assert "[audit.checkpoint.rollback]" in err, err
    assert f"from {remembered} entries to {remembered - 10}" in err, err
    assert audited.remembered() == before

    status, out, err = audited.witness_once()
    assert status == 1 and "[audit.checkpoint.rollback]" in err, err
    assert (audited.witness / "checkpoints.jsonl").read_bytes() == witnessed

    other = audited.pub.parent / "other.pub"
    other.write_bytes(pki.public_key_to_pem(pki.generate_key().public_key()))
    status, out, err = audited.sync(
        "--checkpoint-cert", str(other), "--state-dir", str(audited.state / "x")
    )
    assert status == 1 and "[audit.checkpoint.key]" in err, out + err
