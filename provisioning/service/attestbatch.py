"""Attestation answers received together (``attest.report``), taken in one transaction.

The periodic schedule challenges the devices that are due in groups (``tasks.attest_tick``),
so their answers arrive together. Taken one per transaction, each paid its own replay-row
lock, read and write, its reads of the device row, the challenge and the waiting operation,
its audit head lock and read, its release record, its COMMIT and a catch-up session of its
own: many times the quote's verification (docs/bench/README.md, "Device messages"). Here, as
for key-state reports (``reports.on_reports``): every sender's replay row is locked in sorted
order (two instances locking overlapping sets cannot deadlock), the senders' device rows with
their keys and transitions, the challenges the answers name and which of them an operator
waits for are read in one query each, each answer is judged alone against its sender's window
under the lock and handled by ``attestation.on_attest_report`` exactly as on its own (the
same checks, the same verdict), then the device rows, the challenges, the audit entries (one
head lock, one insert of all), the release records and the replay rows are written once for
the batch, one COMMIT, and one catch-up pass for the senders.

An answer refused (replay, unknown device, no AK, a stored credential that does not check, a
nonce unknown, replayed or expired) is refused alone: all of those checks run before the
answer changes anything, and its replay window is updated on a copy kept only when it is
taken, so the others land and it changes nothing, as if it had been handled on its own. A
refusal after an answer started to change rows, or any failure, undoes the batch, and each
answer is then taken on its own (``devices.one_by_one``).
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from agent.protocol.errors import ProtocolError
from agent.protocol.wire.messages.attestation import AttestReport
from agent.protocol.wire.replay import ReplayGuard
from provisioning.service import attestation, catchup, devices, execute, releases, store, verify
from provisioning.service.context import Call
from provisioning.service.effects import Effects
from provisioning.service.store import releases as release_rows
from provisioning.service.store import rollouts


def _body(report: verify.VerifiedReport) -> AttestReport:
    body = report.body
    assert isinstance(body, AttestReport)
    return body


def on_answers(cx: Call, answers: list[verify.VerifiedReport], now: int) -> None:
    """Take the attestation answers received together (``answers`` is emptied) in one
    transaction; see the module docstring. One alone takes the ordinary path."""
    batch = devices.take_batch(cx, answers, now)
    if batch is None:
        return
    if cx.env.attestation is None:
        # each is refused on its own (``op.unsupported``)
        devices.one_by_one(cx, batch, now, what="an attestation answer")
        return
    taken: list[tuple[verify.VerifiedReport, Effects]] = []
    refused: list[tuple[verify.VerifiedReport, ProtocolError]] = []

    def work(session: Session) -> None:
        taken.clear()
        refused.clear()
        senders = sorted({m.sender for m in batch})
        nonces = [_body(m).nonce for m in batch]
        stored = store.lock_guards(session, senders)
        # Loaded once for the batch (the session's identity map then answers the per-answer
        # reads without a query); ``held`` keeps them there.
        held: list[object] = []
        held += store.load_report_senders(session, senders)
        held += store.load_challenges(session, nonces)
        facts = attestation.AnswerBatch(
            policy=releases.golden(cx, session),
            in_rollout=frozenset(rollouts.in_active(session, senders)),
            waited=frozenset(store.attest_operation_nonces(session, nonces)),
        )
        guards: dict[str, ReplayGuard] = {}
        for report in batch:
            sender = report.sender
            guard = guards.get(sender)
            if guard is None:
                guard = store.load_guard(session, sender, memo=cx.guards, stored=stored)
            trial = guard.copy()
            facts.changing = False
            try:
                trial.accept(report.message)
                effects = attestation.on_attest_report(
                    cx, session, _body(report), report.message, now=now, batch=facts
                )
            except ProtocolError as err:
                if facts.changing:
                    raise devices.BatchUndone(f"{sender}: [{err.check}]") from None
                refused.append((report, err))
                continue
            guards[sender] = trial
            taken.append((report, effects))
        facts.flush_audits(session, now)
        release_rows.record_device_releases(session, facts.releases, now)
        store.save_guards(session, guards, now=now, stored=stored)
        # "heard from" (``last_seen``) is in each taken answer's device row
        # (``Registry.record_attestation``), written by that flush with its verdict
        del held

    if not devices.take_together(cx, batch, now, work, what="an attestation answer"):
        return
    behind = devices.refuse_all(cx, refused, now)
    for report, effects in taken:
        cx.env.metrics.reports.inc(report.type)
        execute.run(cx, effects)
        behind.append(report.sender)
    catchup.catch_up_many(cx, list(dict.fromkeys(behind)), now)
