"""Signed audit checkpoints (provisioning/checkpoint.py): the format, the signature under the
pinned key, the extension check with hostile inputs (bit flips, another key, a count that goes
back, entries that do not hash to the head), checkpoint files, and the service's side
(provisioning/service/checkpoints.py) on a real SQLite file."""

from __future__ import annotations

import argparse
import base64
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from agent.protocol.errors import ConfigError
from agent.protocol.wire import cbor, cose
from agent.protocol.wire.messages.operator import AuditSync
from agent.protocol.wire.messages.result import AuditCheckpointResult
from provisioning import audit, cli, pki
from provisioning.audit_cli import CheckpointMemory, fetch, memory_path, warn_if_stale
from provisioning.checkpoint import (
    CHECKPOINT_AAD,
    ChainExtension,
    Checkpoint,
    CheckpointError,
    VerifiedCheckpoint,
    check_extends,
    file_line,
    parse_file,
    sign_checkpoint,
    verify_checkpoint,
)
from provisioning.config import AuditConfig, load_config
from provisioning.custody import FileKeyRef
from provisioning.metrics import ServiceMetrics
from provisioning.registry import Outcome
from provisioning.service import checkpoints, store
from provisioning.service.context import Call, Clock, Env
from provisioning.service.credentials import StoredDevices
from provisioning.service.model import ServiceSettings
from provisioning.service.mqtt import load_checkpoint_key
from tests.audit_tamper import delete_and_recompute, truncate
from tests.pure.test_service_config import FILES, GOOD, write

pytestmark = pytest.mark.pure

T0 = 1_700_000_000
KEY = pki.generate_key()
OTHER = pki.generate_key()


def fill(sessions: sessionmaker[Session], first: int, last: int) -> None:
    for i in range(first, last + 1):
        audit.record(
            sessions,
            now=T0 + i,
            actor="operator:op-alice",
            action="group.add",
            target=f"g-{i}",
            outcome=Outcome.ACCEPTED,
            details={"n": i},
        )


def links(sessions: sessionmaker[Session], after: int = 0) -> list[tuple[int, bytes]]:
    with sessions() as session:
        return [
            (link.seq, link.preimage)
            for link in checkpoints.links(session, after=after, upto=10**9)
        ]


def signed_head(sessions: sessionmaker[Session]) -> VerifiedCheckpoint:
    """The real key's checkpoint of the log's current head."""
    with sessions() as session:
        count, head = audit.head(session)
    return verified(Checkpoint(count, head, T0, "a"))


def verified(item: Checkpoint) -> VerifiedCheckpoint:
    return verify_checkpoint(sign_checkpoint(item, KEY), KEY.public_key())


# ---- format and signature ----------------------------------------------------------------------


def test_round_trip_and_deterministic_body() -> None:
    item = Checkpoint(7, bytes(range(32)), T0, "svc-1")
    raw = sign_checkpoint(item, KEY)
    verified = verify_checkpoint(raw, KEY.public_key())
    assert verified.checkpoint == item and verified.signed == raw
    assert cbor.decode(item.payload()) == {
        "type": "kf.audit.checkpoint",
        "v": 1,
        "count": 7,
        "head": bytes(range(32)),
        "time": T0,
        "instance": "svc-1",
    }
    assert item.payload() == Checkpoint(7, bytes(range(32)), T0, "svc-1").payload()


def test_signed_by_another_key_is_refused() -> None:
    raw = sign_checkpoint(Checkpoint(3, bytes(32 * [1]), T0, "a"), OTHER)
    with pytest.raises(CheckpointError) as caught:
        verify_checkpoint(raw, KEY.public_key())
    assert caught.value.check == "audit.checkpoint.key"


def test_another_key_claiming_the_pinned_kid_is_refused() -> None:
    """The kid is only a hint: a forger who copies the pinned key's kid still fails."""
    payload = Checkpoint(3, bytes(32 * [1]), T0, "a").payload()
    forged = sign_checkpoint(Checkpoint(3, bytes(32 * [1]), T0, "a"), OTHER)
    message = cose.decode_sign1(forged)
    protected = cose.protected_header(cose.key_id(KEY.public_key()))
    raw = bytes([0xD2]) + cbor.encode([protected, {}, payload, message.signature])
    with pytest.raises(CheckpointError) as caught:
        verify_checkpoint(raw, KEY.public_key())
    assert caught.value.check == "audit.checkpoint.signature"


def test_other_signed_objects_are_not_checkpoints() -> None:
    """The type tag and the AAD: the same payload signed as an envelope is (no AAD) refused, and
    a checkpoint-AAD signature over a body of another type is refused too."""
    item = Checkpoint(3, bytes(32 * [1]), T0, "a")
    no_aad = cose.sign1(item.payload(), KEY)
    with pytest.raises(CheckpointError) as caught:
        verify_checkpoint(no_aad, KEY.public_key())
    assert caught.value.check == "audit.checkpoint.signature"
    body = AuditSync(bytes(16), 0).to_cbor_map()
    other = cose.sign1(
        cbor.encode({"type": "op.audit_sync", **body}), KEY, external_aad=CHECKPOINT_AAD
    )
    with pytest.raises(CheckpointError) as caught:
        verify_checkpoint(other, KEY.public_key())
    assert caught.value.check == "audit.checkpoint.malformed"


def test_every_bit_flip_is_refused() -> None:
    raw = sign_checkpoint(Checkpoint(12, bytes(range(32)), T0, "a"), KEY)
    for index in range(len(raw)):
        for bit in range(8):
            flipped = bytearray(raw)
            flipped[index] ^= 1 << bit
            with pytest.raises(CheckpointError):
                verify_checkpoint(bytes(flipped), KEY.public_key())


@pytest.mark.parametrize(
    "fields",
    [
        {"count": -1},
        {"count": "3"},
        {"head": b"short"},
        {"time": -5},
        {"instance": "a/b"},
        {"count": 0, "head": bytes(32 * [9])},
    ],
)
def test_bad_fields_are_malformed(fields: dict[str, object]) -> None:
    values: dict[str, object] = {"count": 3, "head": bytes(32 * [1]), "time": T0, "instance": "a"}
    values.update(fields)
    with pytest.raises(CheckpointError) as caught:
        Checkpoint(**values)  # type: ignore[arg-type]
    assert caught.value.check == "audit.checkpoint.malformed"
    payload = cbor.encode({"type": "kf.audit.checkpoint", "v": 1, **values})
    raw = cose.sign1(payload, KEY, external_aad=CHECKPOINT_AAD)
    with pytest.raises(CheckpointError) as caught:
        verify_checkpoint(raw, KEY.public_key())
    assert caught.value.check == "audit.checkpoint.malformed"


def test_extra_or_missing_fields_are_malformed() -> None:
    good = cbor.decode(Checkpoint(3, bytes(32 * [1]), T0, "a").payload())
    assert isinstance(good, dict)
    for changed in ({**good, "extra": 1}, {k: v for k, v in good.items() if k != "time"}):
        raw = cose.sign1(cbor.encode(changed), KEY, external_aad=CHECKPOINT_AAD)
        with pytest.raises(CheckpointError) as caught:
            verify_checkpoint(raw, KEY.public_key())
        assert caught.value.check == "audit.checkpoint.malformed"


# ---- extension ---------------------------------------------------------------------------------


def test_an_honest_log_extends_in_pages(sessions: sessionmaker[Session]) -> None:
    fill(sessions, 1, 5)
    first = signed_head(sessions)
    check_extends(None, first, links(sessions))
    fill(sessions, 6, 20)
    second = signed_head(sessions)
    all_links = links(sessions, after=5)
    extension = ChainExtension(first, second)
    for start in range(0, len(all_links), 4):
        extension.feed(all_links[start : start + 4])
    extension.finish()
    check_extends(second, second, [])


def test_count_going_back_is_a_rollback(sessions: sessionmaker[Session]) -> None:
    fill(sessions, 1, 5)
    earlier = signed_head(sessions)
    fill(sessions, 6, 8)
    later = signed_head(sessions)
    with pytest.raises(CheckpointError) as caught:
        check_extends(later, earlier, [])
    assert caught.value.check == "audit.checkpoint.rollback"


def test_same_count_other_head_is_a_fork() -> None:
    a = verified(Checkpoint(4, bytes(32 * [1]), T0, "a"))
    b = verified(Checkpoint(4, bytes(32 * [2]), T0, "a"))
    with pytest.raises(CheckpointError) as caught:
        check_extends(a, b, [])
    assert caught.value.check == "audit.checkpoint.fork"


def test_entries_that_do_not_hash_to_the_head_are_a_fork(sessions: sessionmaker[Session]) -> None:
    fill(sessions, 1, 6)
    target = signed_head(sessions)
    given = links(sessions)
    seq, preimage = given[2]
    for index in range(len(preimage)):
        flipped = bytearray(preimage)
        flipped[index] ^= 0x01
        tampered = [*given[:2], (seq, bytes(flipped)), *given[3:]]
        with pytest.raises(CheckpointError) as caught:
            check_extends(None, target, tampered)
        assert caught.value.check == "audit.checkpoint.fork"


@pytest.mark.parametrize("how", ["missing", "gap", "repeat", "beyond", "reordered"])
def test_entries_that_are_not_the_ones_between_are_refused(
    sessions: sessionmaker[Session], how: str
) -> None:
    fill(sessions, 1, 6)
    target = signed_head(sessions)
    given = links(sessions)
    offered = {
        "missing": given[:-1],
        "gap": given[:2] + given[3:],
        "repeat": given[:3] + given[2:],
        "beyond": [*given, (7, b"\x80")],
        "reordered": [given[1], given[0], *given[2:]],
    }[how]
    with pytest.raises(CheckpointError) as caught:
        check_extends(None, target, offered)
    assert caught.value.check == "audit.checkpoint.entries"


def test_a_rewritten_log_does_not_extend_the_remembered_checkpoint(
    sessions: sessionmaker[Session],
) -> None:
    """Database writer: deletes entry 3 and recomputes the chain, then the log grows past the
    remembered count; a checkpoint of the new log signed by the real key does not extend."""
    fill(sessions, 1, 8)
    remembered = signed_head(sessions)
    with sessions.begin() as session:
        delete_and_recompute(session, 3)
    with sessions() as session:
        assert audit.verify_chain(session).ok  # the chain alone looks fine
    fill(sessions, 9, 12)
    rewritten = signed_head(sessions)
    assert rewritten.count > remembered.count
    with pytest.raises(CheckpointError) as caught:
        check_extends(remembered, rewritten, links(sessions, after=remembered.count))
    assert caught.value.check == "audit.checkpoint.fork"


# ---- checkpoint files --------------------------------------------------------------------------


def test_checkpoint_file_round_trip_and_tampering() -> None:
    items = [verified(Checkpoint(n, bytes(32 * [n]), T0 + n, "a")) for n in (1, 2, 3)]
    text = "".join(file_line(item) for item in items)
    assert parse_file(text, KEY.public_key()) == items
    record = json.loads(text.splitlines()[1])
    record["count"] = 9
    edited = "\n".join([text.splitlines()[0], json.dumps(record)])
    with pytest.raises(CheckpointError) as caught:
        parse_file(edited, KEY.public_key())
    assert caught.value.check == "audit.checkpoint.malformed" and "line 2" in caught.value.reason
    foreign = sign_checkpoint(Checkpoint(4, bytes(32 * [4]), T0, "a"), OTHER)
    record["signed"] = base64.b64encode(foreign).decode()
    with pytest.raises(CheckpointError) as caught:
        parse_file(json.dumps(record), KEY.public_key())
    assert caught.value.check == "audit.checkpoint.key"
    with pytest.raises(CheckpointError) as caught:
        parse_file("not json\n", KEY.public_key())
    assert caught.value.check == "audit.checkpoint.malformed"


# ---- the service's side ------------------------------------------------------------------------


def call(sessions: sessionmaker[Session], key: ec.EllipticCurvePrivateKey | None) -> Call:
    ca = pki.create_ca(
        "test operator CA", now=datetime.fromtimestamp(T0, UTC), valid_for=timedelta(days=1)
    )
    env = Env(
        sessions=sessions,
        key=pki.generate_key(),
        operator_ca=ca.certificate,
        devices=StoredDevices(ca.certificate),
        settings=ServiceSettings(checkpoint_interval=300),
        attestation=None,
        metrics=ServiceMetrics(),
        instance="svc-a",
        checkpoint_key=key,
    )
    return Call(env, Clock.reading(T0))


def test_service_checkpoints_on_schedule_only_when_the_head_moved(
    sessions: sessionmaker[Session],
) -> None:
    cx = call(sessions, KEY)
    checkpoints.checkpoint_tick(cx, T0)  # empty log: nothing to sign
    with sessions() as session:
        assert store.all_checkpoints(session) == []
    fill(sessions, 1, 3)
    checkpoints.checkpoint_tick(cx, T0 + 1)  # not due yet (the empty run set the next time)
    checkpoints.checkpoint_tick(cx, T0 + 301)
    fill(sessions, 4, 4)
    checkpoints.checkpoint_tick(cx, T0 + 400)  # due only at T0 + 601
    with sessions() as session:
        (only,) = store.all_checkpoints(session)
    first = verify_checkpoint(only, KEY.public_key())
    assert (first.count, first.checkpoint.time, first.checkpoint.instance) == (3, T0 + 301, "svc-a")
    checkpoints.checkpoint_tick(cx, T0 + 601)
    checkpoints.checkpoint_tick(cx, T0 + 901)  # the head did not move: no new checkpoint
    with sessions() as session:
        stored = [verify_checkpoint(s, KEY.public_key()) for s in store.all_checkpoints(session)]
    assert [s.count for s in stored] == [3, 4]
    check_extends(stored[0], stored[1], links(sessions, after=3))


def test_service_without_a_checkpoint_key_makes_none(sessions: sessionmaker[Session]) -> None:
    fill(sessions, 1, 2)
    cx = call(sessions, None)
    checkpoints.checkpoint_tick(cx, T0 + 1000)
    with sessions() as session:
        assert checkpoints.make_checkpoint(cx, session, T0) is None
        assert store.all_checkpoints(session) == []


def test_links_are_bounded_by_the_answer_size(sessions: sessionmaker[Session]) -> None:
    for i in range(1, 41):
        audit.record(
            sessions, now=T0 + i, actor="service", action="big", target="t",
            outcome=Outcome.ACCEPTED, details={"blob": "x" * 8000},
        )  # fmt: skip
    with sessions() as session:
        page = checkpoints.links(session, after=0, upto=40)
    assert 1 <= len(page) < 40
    assert sum(len(link.preimage) for link in page) <= checkpoints.PAGE_BYTES


def test_checkpoint_key_must_not_be_the_signing_or_tls_key() -> None:
    with pytest.raises(ConfigError, match=r"audit\.checkpoint\.key-reuse"):
        checkpoints.require_distinct(KEY, [("the service signing key", KEY.public_key())])
    checkpoints.require_distinct(KEY, [("the service signing key", OTHER.public_key())])


def test_state_file_path_is_named_after_the_key(tmp_path: Path) -> None:
    path = memory_path(tmp_path, KEY.public_key())
    memory = CheckpointMemory(path, KEY.public_key())
    assert memory.load() is None
    item = verified(Checkpoint(2, bytes(32 * [2]), T0, "a"))
    memory.save(item)
    assert memory.load() == item
    assert path.stat().st_mode & 0o777 == 0o600
    assert memory_path(tmp_path, OTHER.public_key()) != path


# ---- audit verify --checkpoint and the staleness warning --------------------------------------


def test_audit_verify_checks_the_chain_against_a_checkpoint_file(
    engine: Engine,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Database writer: cuts the last 10 entries off, then deletes an entry and recomputes; a
    checkpoint file exported before finds both, the plain chain check neither."""
    fill(sessions, 1, 12)
    early = signed_head(sessions)
    fill(sessions, 13, 25)
    late = signed_head(sessions)
    file = tmp_path / "checkpoints.jsonl"
    file.write_text(file_line(early) + file_line(late))
    pub = tmp_path / "checkpoint.pub"
    pub.write_bytes(pki.public_key_to_pem(KEY.public_key()))
    url = str(engine.url)
    argv = [
        "audit",
        "verify",
        "--db",
        url,
        "--checkpoint",
        str(file),
        "--checkpoint-cert",
        str(pub),
    ]
    assert cli.main(argv) == 0
    assert "2 checkpoint(s) agree" in capsys.readouterr().out

    with sessions.begin() as session:
        truncate(session, 10)
    assert cli.main(["audit", "verify", "--db", url]) == 0
    capsys.readouterr()
    assert cli.main(argv) == 1
    out = capsys.readouterr().out
    assert "MISMATCH [audit.checkpoint.rollback]" in out and "only 15 entries" in out, out

    with sessions.begin() as session:
        delete_and_recompute(session, 4)
    assert cli.main(["audit", "verify", "--db", url]) == 0
    capsys.readouterr()
    assert cli.main(argv) == 1
    out = capsys.readouterr().out
    assert "MISMATCH [audit.checkpoint.fork]" in out and "entry 12 of the chain" in out, out

    other = tmp_path / "other.pub"
    other.write_bytes(pki.public_key_to_pem(OTHER.public_key()))
    assert cli.main([*argv[:-1], str(other)]) == 2
    assert "audit.checkpoint.key" in capsys.readouterr().err


def test_other_commands_warn_when_the_remembered_checkpoint_is_old(tmp_path: Path) -> None:
    args = argparse.Namespace(state_dir=str(tmp_path), cert=None)
    err = io.StringIO()
    warn_if_stale(args, err=err)
    assert err.getvalue() == ""  # nothing remembered: nothing to say
    path = memory_path(tmp_path, KEY.public_key())
    CheckpointMemory(path, KEY.public_key()).save(verified(Checkpoint(2, bytes(32 * [2]), T0, "a")))
    warn_if_stale(args, err=err, now=path.stat().st_mtime + 3600)
    assert err.getvalue() == ""
    warn_if_stale(args, err=err, now=path.stat().st_mtime + 3 * 86_400)
    assert "audit.checkpoint.stale" in err.getvalue() and "3.0 days" in err.getvalue()


# ---- the operator's fetch, paged (a fake client answering from a real SQLite file) -------------


class FakeSyncClient:
    """Fake of ``OperatorClient.exchange`` for ``op.audit_sync`` only: answers from the log in
    ``sessions`` with pages of at most ``page`` entries; ``heads`` overrides the head signed
    per request number (a service that signs two heads for one count)."""

    def __init__(self, sessions: sessionmaker[Session], *, page: int) -> None:
        self.sessions = sessions
        self.page = page
        self.asked: list[AuditSync] = []
        self.heads: dict[int, bytes] = {}

    def new_command_id(self) -> bytes:
        return len(self.asked).to_bytes(16, "big")

    def exchange(self, body: AuditSync, timeout: float) -> AuditCheckpointResult:
        self.asked.append(body)
        with self.sessions() as session:
            count, head = audit.head(session)
            upto = count if body.count is None else body.count
            page = checkpoints.links(session, after=body.after, upto=upto)[: self.page]
        head = self.heads.get(len(self.asked), head)
        signed = sign_checkpoint(Checkpoint(upto, head, T0, "a"), KEY)
        return AuditCheckpointResult(body.command_id, signed, tuple(page))


def test_fetch_walks_the_log_in_pages_and_refuses_two_heads_for_one_count(
    sessions: sessionmaker[Session],
) -> None:
    fill(sessions, 1, 23)
    client = FakeSyncClient(sessions, page=5)
    first = fetch(client, KEY.public_key(), None, timeout=1)  # type: ignore[arg-type]
    assert first.count == 23 and len(client.asked) == 5
    assert [(b.after, b.count) for b in client.asked] == [
        (0, None),
        (5, 23),
        (10, 23),
        (15, 23),
        (20, 23),
    ]
    fill(sessions, 24, 30)
    client = FakeSyncClient(sessions, page=5)
    second = fetch(client, KEY.public_key(), first, timeout=1)  # type: ignore[arg-type]
    assert second.count == 30 and [b.after for b in client.asked] == [23, 28]

    fill(sessions, 31, 40)
    client = FakeSyncClient(sessions, page=5)
    client.heads[2] = bytes(32 * [7])  # the second page comes with another head for 40
    with pytest.raises(CheckpointError) as caught:
        fetch(client, KEY.public_key(), second, timeout=1)  # type: ignore[arg-type]
    assert caught.value.check == "audit.checkpoint.fork"

    client = FakeSyncClient(sessions, page=0)  # a service that sends no entries
    with pytest.raises(CheckpointError) as caught:
        fetch(client, KEY.public_key(), second, timeout=1)  # type: ignore[arg-type]
    assert caught.value.check == "audit.checkpoint.entries"


# ---- [audit] in the configuration, and the key of its own -------------------------------------


def test_audit_config_and_a_checkpoint_key_that_is_the_signing_or_tls_key(tmp_path: Path) -> None:
    config_dir = tmp_path
    for name, mode in FILES.items():  # test_service_config's files, certificates made real below
        (config_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (config_dir / name).write_text(f"contents of {name}\n")
        (config_dir / name).chmod(mode)
    now = datetime.fromtimestamp(T0, UTC)
    ca = pki.create_ca("broker CA", now=now, valid_for=timedelta(days=1))
    tls_key, signing, own = pki.generate_key(), pki.generate_key(), pki.generate_key()
    tls_cert = pki.issue_client_cert(
        ca, tls_key.public_key(), identity="keyfleet-service", role="service", now=now,
        valid_for=timedelta(days=1),
    )  # fmt: skip
    pki.write_certificate(config_dir / "pki/service.pem", tls_cert)
    pki.write_certificate(config_dir / "pki/enroll.pem", ca.certificate)
    (config_dir / "pki/service.key").unlink()
    pki.write_private_key(config_dir / "pki/service.key", tls_key)
    pki.write_private_key(config_dir / "pki/audit.key", own)
    assert load_config(write(config_dir, GOOD)).audit == AuditConfig(None, 300)
    assert load_checkpoint_key(load_config(write(config_dir, GOOD)), signing.public_key()) is None

    audit_table = '\n[audit]\ncheckpoint_key = "{}"\ncheckpoint_interval_seconds = 60\n'
    config = load_config(write(config_dir, GOOD + audit_table.format("pki/audit.key")))
    assert config.audit == AuditConfig(FileKeyRef(config_dir / "pki/audit.key"), 60)
    key = load_checkpoint_key(config, signing.public_key())
    assert key is not None and key.public_key() == own.public_key()
    with pytest.raises(ConfigError, match=r"service signing key.*audit\.checkpoint\.key-reuse"):
        load_checkpoint_key(config, own.public_key())
    config = load_config(write(config_dir, GOOD + audit_table.format("pki/service.key")))
    with pytest.raises(ConfigError, match=r"broker client_cert's key.*key-reuse"):
        load_checkpoint_key(config, signing.public_key())
