"""Attestation answers received together (``attest.report``), taken in one transaction.

The periodic schedule challenges the devices that are due in groups (``tasks.attest_tick``),
so their answers arrive together. Taken one per transaction, each paid its own replay-row
lock, read and write, its reads of the device row, the challenge and the waiting operation,
its audit head lock and read, its release record, its COMMIT and a catch-up session of its
own: many times the quote's verification (docs/bench/README.md, "Device messages"). Here, as
for key-state reports (``reports.on_reports``): every sender's replay row is locked in sorted
order (two instances locking overlapping sets cannot deadlock), the senders' device rows (as
plain columns, with their recorded keys unless the row's digest of them answers), the
challenges the answers name and which of them an operator waits for are read in one query
each, each answer is judged alone against its sender's window under the lock and handled by
``attestation.on_attest_report`` exactly as on its own (the same checks, the same verdict),
then the device rows, the challenges, the audit entries (one head lock, one insert of all),
the release records and the replay rows are written once for the batch, one COMMIT, and one
catch-up pass for the senders. The device rows of the steady answers (key states recorded, no
state change: ``AnswerBatch``) are written in one Core statement; a sender whose answer
changes its state or its key rows goes through the registry's ORM rows, loaded for the batch.

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
from provisioning.registry import KeyStateReport as KeyStateItem
from provisioning.registry import key_state_digest, key_state_items
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
        # Read once for the batch, as plain columns: the senders' rows and recorded keys, the
        # challenges the answers name. A sender whose answers all report recorded key states
        # and whose state no trusted verdict changes (the steady case: a scheduled round of
        # an active fleet) stays on them; the others' rows are loaded as objects for the
        # registry (the session's identity map then answers the per-answer reads without a
        # query; ``held`` keeps them there).
        # (a sender all of whose answers have its row's digest of recorded key states,
        # ``reported_keys``, is judged by it: its key rows are not read)
        reported = [key_state_items(_body(report).keys) for report in batch]
        digests = [key_state_digest(one) for one in reported]
        items: dict[str, list[tuple[list[KeyStateItem], bytes]]] = {}
        for report, one, digest in zip(batch, reported, digests, strict=True):
            items.setdefault(report.sender, []).append((one, digest))
        plain = store.attest_senders(
            session, senders, {s: {d for _, d in found} for s, found in items.items()}
        )
        for sender, found in list(plain.items()):
            if found.state in attestation.STATE_CHANGING or not all(
                found.reported.knows(i, d) for i, d in items[sender]
            ):
                del plain[sender]
        held = store.load_device_rows(session, [s for s in senders if s not in plain])
        facts = attestation.AnswerBatch(
            policy=releases.golden(cx, session),
            in_rollout=frozenset(rollouts.in_active(session, senders)),
            waited=frozenset(store.attest_operation_nonces(session, nonces)),
            challenges=store.ChallengeBook(session, nonces),
            plain=plain,
        )
        guards: dict[str, ReplayGuard] = {}
        for report, keys, digest in zip(batch, reported, digests, strict=True):
            sender = report.sender
            guard = guards.get(sender)
            if guard is None:
                guard = store.load_guard(session, sender, memo=cx.guards, stored=stored)
            trial = guard.copy()
            facts.changing = False
            try:
                trial.accept(report.message)
                effects = attestation.on_attest_report(
                    cx,
                    session,
                    _body(report),
                    report.message,
                    now=now,
                    batch=facts,
                    items=(keys, digest),
                )
            except ProtocolError as err:
                if facts.changing:
                    raise devices.BatchUndone(f"{sender}: [{err.check}]") from None
                refused.append((report, err))
                continue
            guards[sender] = trial
            taken.append((report, effects))
        facts.flush_audits(session, now)
        facts.flush(session, now)
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
