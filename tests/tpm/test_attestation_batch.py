"""Attestation answers received together are taken in one transaction
(``attestbatch.on_answers``), and each is still judged alone, on SQLite and PostgreSQL: every
answer is a real swtpm quote (tests/tpm/test_attestation_service.py's members). In one batch a
good answer is trusted, a tampered boot's answer is an untrusted verdict (the device is
quarantined), and a replayed envelope, a replayed nonce, a nonce never issued, an expired
challenge and a device without its AK are each refused by their own check id and change
nothing; the batch's statements do not grow with its answers."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, select, update
from sqlalchemy.exc import OperationalError

from agent.protocol.lifecycle import KeyKind, KeyRecord, KeyState
from agent.protocol.wire.messages.attestation import AttestReport
from agent.protocol.wire.messages.operator import AttestDevice
from agent.protocol.wire.messages.result import ResultStatus
from firmware_sim.boot import tampered
from provisioning import audit
from provisioning.db.runtime import AttestChallengeRow, ReplayState
from provisioning.db.schema import Device
from provisioning.registry import (
    AttestationResult,
    DeviceState,
    Registry,
    key_state_digest,
    key_state_items,
)
from provisioning.service import attestbatch
from tests.fixtures.swtpm import SwtpmFactory
from tests.pure.test_service_core import Fleet, agreed, create_g1
from tests.service_members import Outgoing
from tests.tpm.test_attestation_service import GOOD, AttestingDevice, attesting_fleet

pytestmark = pytest.mark.tpm

DATABASE_BACKENDS = ("sqlite", "postgresql")
NAMES = ("dev-1", "dev-2", "dev-3", "dev-4", "dev-5", "dev-6")


def member(fleet: Fleet, name: str) -> AttestingDevice:
    device = fleet.devices[name]
    assert isinstance(device, AttestingDevice)
    return device


def answer(fleet: Fleet, name: str) -> Outgoing:
    """``name``'s answer to a fresh challenge of the service (not yet handed back)."""
    replies = fleet.deliver(fleet.service.challenge(name, fleet.now))
    assert len(replies) == 1
    return replies[0]


@contextmanager
def counted(fleet: Fleet) -> Iterator[list[int]]:
    """The SQL statements run on the fleet's engine inside the block."""
    engine = fleet.sessions.kw["bind"]
    assert isinstance(engine, Engine)
    count = [0]

    def one(*_args: Any) -> None:
        count[0] += 1

    event.listen(engine, "before_cursor_execute", one)
    try:
        yield count
    finally:
        event.remove(engine, "before_cursor_execute", one)


def snapshot(fleet: Fleet, name: str) -> tuple[object, ...]:
    """What an answer of ``name`` could change: its replay row, its verdict columns, state,
    "heard from", last report, and its challenges."""
    with fleet.sessions() as s:
        replay = s.get(ReplayState, name)
        device = Registry(s).device(name)
        challenges = s.execute(
            select(AttestChallengeRow.nonce, AttestChallengeRow.answered_at)
            .where(AttestChallengeRow.device_id == name)
            .order_by(AttestChallengeRow.nonce)
        ).all()
        return (
            None if replay is None else replay.state,
            device.attestation_result,
            device.attested_at,
            device.state,
            device.last_seen,
            device.last_report_at,
            tuple(tuple(c) for c in challenges),
        )


@pytest.fixture
def fleet(tmp_path: Path, swtpm_factory: SwtpmFactory, database_url: str) -> Iterator[Fleet]:
    url = None if database_url.startswith("sqlite") else database_url
    yield from attesting_fleet(tmp_path, swtpm_factory, quarantine=True, names=NAMES, url=url)


def test_a_batch_of_answers_lands_the_good_ones_and_refuses_each_bad_one_alone(
    fleet: Fleet,
) -> None:
    # first messages of each device (its replay row), so that "changes nothing" is visible
    fleet.service.handle_many([answer(fleet, n) for n in NAMES], fleet.now)
    fleet.now += 10
    member(fleet, "dev-3").boot(tampered(GOOD, "kernel"))
    good = {n: answer(fleet, n) for n in ("dev-1", "dev-2", "dev-3")}
    # dev-1 again: its answer's quote in a fresh envelope (new seq) - the nonce is spent
    again = member(fleet, "dev-1").report(member(fleet, "dev-1").reports[-1], fleet.now)
    # dev-4: a quote over a nonce the service never issued (its open challenge is left alone)
    answer(fleet, "dev-4")
    pcrs = member(fleet, "dev-4").reports[-1].pcrs
    unknown = member(fleet, "dev-4").report(
        member(fleet, "dev-4").quote(os.urandom(32), pcrs), fleet.now
    )
    # dev-5: an honest answer to a challenge that expired before it arrived
    stale = answer(fleet, "dev-5")
    stale_nonce = member(fleet, "dev-5").reports[-1].nonce
    with fleet.sessions.begin() as s:
        s.execute(
            update(AttestChallengeRow)
            .where(AttestChallengeRow.nonce == stale_nonce.hex())
            .values(expires_at=fleet.now)
        )
    # dev-6: an honest answer, but its registered AK was taken off its row meanwhile
    no_ak = answer(fleet, "dev-6")
    with fleet.sessions.begin() as s:
        s.execute(update(Device).where(Device.device_id == "dev-6").values(ak_public=None))
    bad = ("dev-4", "dev-5", "dev-6")
    before = {n: snapshot(fleet, n) for n in NAMES}
    audit_before = len(fleet.audit_entries())
    taken_before = fleet.service.metrics.reports.value("attest.report")
    batch = [good["dev-1"], good["dev-2"], good["dev-2"], again, good["dev-3"], unknown, stale]
    batch.append(no_ak)
    fleet.service.handle_many(batch, fleet.now)

    rejections = fleet.service.rejections
    assert rejections.count("replay.duplicate") == 1  # dev-2's envelope twice
    assert rejections.count("attest.nonce.replayed") == 1  # dev-1's second answer
    assert rejections.count("attest.nonce.unknown") == 1  # dev-4
    assert rejections.count("attest.nonce.expired") == 1  # dev-5
    assert rejections.count("attest.device.ak") == 1  # dev-6
    assert fleet.service.metrics.reports.value("attest.report") == taken_before + 3
    after = {n: snapshot(fleet, n) for n in NAMES}
    for name in bad:
        assert after[name] == before[name], name
    with fleet.sessions() as s:
        records = {n: Registry(s).device(n) for n in ("dev-1", "dev-2", "dev-3")}
    for name in ("dev-1", "dev-2"):
        assert records[name].attestation_result is AttestationResult.TRUSTED
        assert records[name].attested_at == fleet.now and records[name].last_seen == fleet.now
        assert records[name].state is DeviceState.ACTIVE
    # the tampered kernel is a verdict, not a refusal: recorded, and the device quarantined
    assert records["dev-3"].attestation_result is AttestationResult.UNTRUSTED
    assert str(records["dev-3"].attestation_reason).startswith("[attest.policy.digest] kernel")
    assert records["dev-3"].state is DeviceState.QUARANTINED
    # each taken answer's challenge answered; each sender's window at its last message taken
    for name in ("dev-1", "dev-2", "dev-3"):
        spent = [c for c in after[name][6] if c[0] == good_nonce(fleet, name)]
        assert spent and spent[0][1] == fleet.now
        assert after[name][0] != before[name][0]

    entries = fleet.audit_entries()[audit_before:]
    verdicts = [e for e in entries if e.action == "attest.verdict"]
    assert sorted(e.target for e in verdicts) == ["dev-1", "dev-2", "dev-3"]
    quarantine = next(e for e in entries if e.action == "device.quarantine")
    assert quarantine.target == "dev-3"
    # the state change's entry follows its verdict's
    assert entries.index(quarantine) > entries.index(
        next(e for e in verdicts if e.target == "dev-3")
    )
    with fleet.sessions() as s:  # the batch's entries (one insert) chain like single ones
        assert audit.verify_chain(s).ok
        assert audit.head(s) == (entries[-1].seq, entries[-1].entry_hash)
    refused = [e for e in entries if e.outcome.value == "refused"]
    reasons = sorted(str(e.reason).split("]")[0] + "]" for e in refused)
    assert reasons == [
        "[attest.device.ak]",
        "[attest.nonce.expired]",
        "[attest.nonce.replayed]",
        "[attest.nonce.unknown]",
    ]


def good_nonce(fleet: Fleet, name: str) -> str:
    reports: list[AttestReport] = member(fleet, name).reports
    return reports[-1].nonce.hex()


def test_a_batchs_statements_do_not_grow_with_its_answers(fleet: Fleet) -> None:
    """Two answers, then six: the same statements (one transaction, one read of each kind, one
    write of each kind, one catch-up pass), about what one answer taken alone costs."""
    fleet.service.handle_many([answer(fleet, n) for n in NAMES], fleet.now)
    spent: list[int] = []
    for names in (NAMES[:2], NAMES):
        fleet.now += 10
        answers = [answer(fleet, n) for n in names]
        with counted(fleet) as count:
            fleet.service.handle_many(answers, fleet.now)
        spent.append(count[0])
        with fleet.sessions() as s:
            assert all(Registry(s).device(n).attested_at == fleet.now for n in names)
    assert spent[1] == spent[0], spent
    assert spent[1] < 30, spent
    fleet.now += 10
    single = answer(fleet, "dev-1")
    with counted(fleet) as count:
        fleet.service.handle_many([single], fleet.now)
    # six answers together cost about what one costs alone
    assert spent[1] <= count[0] + 5, (count[0], spent)


def test_a_batch_that_fails_in_the_database_is_taken_one_by_one(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The batch's last write fails (a database error): its transaction is undone, and each
    answer is then taken on its own, once: one verdict each, every challenge answered."""
    fleet.service.handle_many([answer(fleet, n) for n in NAMES], fleet.now)
    fleet.now += 10
    answers = [answer(fleet, n) for n in NAMES]
    audit_before = len(fleet.audit_entries())
    failed: list[int] = []

    def broken(*_args: object) -> None:
        failed.append(1)
        raise OperationalError("UPDATE device_releases", {}, Exception("disk I/O error"))

    monkeypatch.setattr(attestbatch.release_rows, "record_device_releases", broken)
    with caplog.at_level(logging.INFO, logger="keyfleet.service"):
        fleet.service.handle_many(answers, fleet.now)
    assert failed == [1]
    assert [r for r in caplog.records if "one by one" in r.getMessage()]
    with fleet.sessions() as s:
        assert all(Registry(s).device(n).attested_at == fleet.now for n in NAMES)
    verdicts = [e for e in fleet.audit_entries()[audit_before:] if e.action == "attest.verdict"]
    assert sorted(e.target for e in verdicts) == list(NAMES)
    assert sum(fleet.service.rejections.snapshot().values()) == 0


def test_an_operators_answer_and_a_quarantine_in_one_batch(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    """In one batch: the answer an operator's ``op.attest`` waits for (its result is sent once
    the batch commits) and a tampered boot's answer from a group member, which is quarantined
    and removed from its group by another member's commit, as on its own."""
    create_g1(fleet, "dev-1", "dev-2", "dev-3")
    epoch = fleet.epoch("g1")
    command = AttestDevice(os.urandom(16), "dev-1")
    asked = fleet.service.handle_many(
        [fleet.operators["op-alice"].command(command, fleet.now)], fleet.now
    )
    waited = fleet.deliver(asked)  # the operator hears "accepted"; dev-1 answers
    assert len(waited) == 1
    member(fleet, "dev-3").boot(tampered(GOOD, "kernel"))
    batch = [*waited, answer(fleet, "dev-3"), answer(fleet, "dev-2")]
    with caplog.at_level(logging.INFO, logger="keyfleet.service"):
        publishes = fleet.service.handle_many(batch, fleet.now)
    assert not [r for r in caplog.records if "one by one" in r.getMessage()]
    fleet.send(*fleet.deliver(publishes))
    assert fleet.service.metrics.reports.value("attest.report") >= 3
    assert sum(fleet.service.rejections.snapshot().values()) == 0
    result = fleet.final(command.command_id)
    assert result.status is ResultStatus.DONE and "dev-1 trusted" in result.detail
    with fleet.sessions() as s:
        states = {n: Registry(s).device(n).state for n in ("dev-1", "dev-2", "dev-3")}
    assert states["dev-3"] is DeviceState.QUARANTINED
    assert states["dev-1"] is states["dev-2"] is DeviceState.ACTIVE
    assert fleet.members("g1") == ["dev-1", "dev-2"]
    assert fleet.epoch("g1") == epoch + 1 and len(agreed(fleet, "g1")) == 1


def test_a_device_trusted_then_untrusted_in_one_batch_ends_untrusted_and_quarantined(
    fleet: Fleet,
) -> None:
    """Two answers of one active device in one batch: a good boot's, then (rebooted with a
    tampered kernel) an untrusted one. The first is written with the batch's other plain
    answers, the second quarantines the device through its registry row: the device ends as
    the second answer left it, as if each had been taken on its own, and a third device's
    answer in the same batch is trusted."""
    fleet.service.handle_many([answer(fleet, n) for n in NAMES], fleet.now)  # all active
    fleet.now += 10
    first = answer(fleet, "dev-1")
    member(fleet, "dev-1").boot(tampered(GOOD, "kernel"))
    second = answer(fleet, "dev-1")
    nonces = [r.nonce.hex() for r in member(fleet, "dev-1").reports[-2:]]
    audit_before = len(fleet.audit_entries())
    fleet.service.handle_many([first, answer(fleet, "dev-2"), second], fleet.now)
    assert sum(fleet.service.rejections.snapshot().values()) == 0
    with fleet.sessions() as s:
        one, two = Registry(s).device("dev-1"), Registry(s).device("dev-2")
        answered = dict(
            s.execute(
                select(AttestChallengeRow.nonce, AttestChallengeRow.answered_at).where(
                    AttestChallengeRow.nonce.in_(nonces)
                )
            ).all()
        )
    assert one.attestation_result is AttestationResult.UNTRUSTED
    assert str(one.attestation_reason).startswith("[attest.policy.digest] kernel")
    assert one.state is DeviceState.QUARANTINED
    assert one.attested_at == one.last_seen == one.last_report_at == fleet.now
    assert answered == dict.fromkeys(nonces, fleet.now)
    assert two.attestation_result is AttestationResult.TRUSTED
    assert two.state is DeviceState.ACTIVE and two.attested_at == fleet.now
    entries = fleet.audit_entries()[audit_before:]
    assert [(e.action, e.target, json.loads(e.details).get("result")) for e in entries] == [
        ("attest.verdict", "dev-1", "trusted"),
        ("attest.verdict", "dev-2", "trusted"),
        ("attest.verdict", "dev-1", "untrusted"),
        ("device.quarantine", "dev-1", None),
    ]
    with fleet.sessions() as s:
        assert audit.verify_chain(s).ok


def test_an_answer_with_new_key_states_records_them_beside_plain_answers(fleet: Fleet) -> None:
    """In one batch of active devices: an answer whose key states are recorded already (none
    here) changes no key row; one that reports a key transition the registry has not seen
    records it (the registry's rows), and one whose key history the registry cannot take
    keeps its verdict and notes the refused keys in the verdict's audit entry."""
    fleet.service.handle_many([answer(fleet, n) for n in NAMES], fleet.now)  # all active
    fleet.now += 10
    history = ((KeyState.PRE_ACTIVATION, fleet.now - 100), (KeyState.ACTIVE, fleet.now - 99))
    new_keys = (KeyRecord("devid", KeyKind.DEVID, history),)
    with_keys = answer(fleet, "dev-1")
    dev1 = member(fleet, "dev-1")
    with_keys = dev1.report(replace(dev1.reports[-1], keys=new_keys), fleet.now)
    # dev-3: its key recorded (an answer taken alone), then a history that starts before it
    answer(fleet, "dev-3")
    dev3 = member(fleet, "dev-3")
    fleet.service.handle_many(
        [dev3.report(replace(dev3.reports[-1], keys=new_keys), fleet.now)], fleet.now
    )
    answer(fleet, "dev-3")
    backwards = (
        KeyRecord(
            "devid",
            KeyKind.DEVID,
            ((KeyState.PRE_ACTIVATION, fleet.now - 300), (KeyState.ACTIVE, fleet.now - 299)),
        ),
    )
    impossible = dev3.report(replace(dev3.reports[-1], keys=backwards), fleet.now)
    audit_before = len(fleet.audit_entries())
    fleet.service.handle_many([with_keys, answer(fleet, "dev-2"), impossible], fleet.now)
    rejections = fleet.service.rejections.snapshot()
    assert sum(rejections.values()) == 0, rejections
    with fleet.sessions() as s:
        registry = Registry(s)
        keys = {n: registry.key_states(n) for n in ("dev-1", "dev-2", "dev-3")}
        records = {n: registry.device(n) for n in ("dev-1", "dev-2", "dev-3")}
    assert [(k.key_name, k.state) for k in keys["dev-1"]] == [("devid", KeyState.ACTIVE)]
    assert keys["dev-2"] == []
    assert [(k.key_name, k.changed_at) for k in keys["dev-3"]] == [("devid", fleet.now - 99)]
    for name in ("dev-1", "dev-2", "dev-3"):
        assert records[name].attestation_result is AttestationResult.TRUSTED, name
        assert records[name].attested_at == records[name].last_seen == fleet.now
    verdicts = {
        e.target: json.loads(e.details)
        for e in fleet.audit_entries()[audit_before:]
        if e.action == "attest.verdict"
    }
    assert verdicts["dev-1"].get("keys") is None and verdicts["dev-2"].get("keys") is None
    assert str(verdicts["dev-3"].get("keys")).startswith("[registry.key.transition]")
    # the digest of a key state known to be recorded: an answer that recorded keys through
    # the registry's rows clears it, one whose keys were all recorded keeps its own
    assert reported_keys(fleet, "dev-1") is None
    assert reported_keys(fleet, "dev-2") == key_state_digest([])
    # dev-1 again with the same keys, now recorded: judged on its row, its digest kept
    fleet.now += 10
    answer(fleet, "dev-1")
    again = dev1.report(replace(dev1.reports[-1], keys=new_keys), fleet.now)
    fleet.service.handle_many([again, answer(fleet, "dev-2")], fleet.now)
    assert sum(fleet.service.rejections.snapshot().values()) == 0
    assert reported_keys(fleet, "dev-1") == key_state_digest(key_state_items(new_keys))
    with fleet.sessions() as s:
        assert Registry(s).device("dev-1").attested_at == fleet.now
        assert len(Registry(s).key_states("dev-1")) == 1


def reported_keys(fleet: Fleet, name: str) -> bytes | None:
    with fleet.sessions() as s:
        found = s.scalar(select(Device.reported_keys).where(Device.device_id == name))
        return None if found is None else bytes(found)
