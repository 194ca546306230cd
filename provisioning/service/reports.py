"""Key-state reports received together (``keys.report``), taken in one transaction.

After a fleet-wide reconnect nearly all the traffic is reports, and one transaction per report
(its lock, its reads of the sender's rows, its COMMIT, a catch-up session of its own) cost
many times the signature check. ``on_reports`` takes the reports of a batch the way
``acks.on_acks`` takes acks: every sender's replay row is locked in sorted order (two instances
locking overlapping sets cannot deadlock), the senders' device rows with their keys and
transitions and their feed rows are loaded in one query each, each report is judged alone
against its sender's window under the lock, then one COMMIT and one catch-up pass for the
senders.

A report refused by its replay window or because its sender is quarantined is refused alone,
before it writes anything (its window is updated on a copy kept only when the report is
taken). Any other refusal (a key history the registry cannot take, ...) or failure aborts the
batch, and each report is then taken on its own (``devices.one_by_one``), so that a
refused report never leaves a partial change behind in a shared transaction.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from agent.protocol.errors import ProtocolError
from agent.protocol.wire.messages.key_state import KeyStateReport
from agent.protocol.wire.replay import ReplayGuard
from provisioning.registry import KeyStateReport as KeyStateItem
from provisioning.registry import key_state_digest, key_state_items
from provisioning.service import catchup, devices, execute, store, verify
from provisioning.service.context import Call
from provisioning.service.effects import Effects


def _items(report: verify.VerifiedReport) -> list[KeyStateItem]:
    body = report.body
    assert isinstance(body, KeyStateReport)
    return key_state_items(body.keys)


def on_reports(cx: Call, reports: list[verify.VerifiedReport], now: int) -> None:
    """Take the key-state reports received together (``reports`` is emptied) in one
    transaction; see the module docstring."""
    batch = devices.take_batch(cx, reports, now)
    if batch is None:
        return
    taken: list[tuple[verify.VerifiedReport, Effects]] = []
    refused: list[tuple[verify.VerifiedReport, ProtocolError]] = []

    def work(session: Session) -> None:
        taken.clear()
        refused.clear()
        senders = sorted({m.sender for m in batch})
        # Loaded once for the batch (the session's identity map then answers the per-report
        # reads without a query); ``held`` keeps them there.
        stored = store.lock_guards(session, senders)
        # first messages (a burst after a fleet-wide reconnect): their rows in one statement
        new = sorted(set(senders) - set(stored))
        stored.update(store.claim_guards(session, new, now=now))
        held: list[object] = []
        # The steady case (every transition of every report of a sender recorded already: a
        # reconnect) is judged on plain columns and written in one Core statement; the other
        # senders' rows are loaded as objects for ``Registry.record_report``.
        # A sender whose reports all have its row's ``reported_keys`` digest (the key state it
        # reported last, recorded) is judged by that column, its key rows not read.
        items = [_items(r) for r in batch]
        digests = [key_state_digest(i) for i in items]
        by_sender: dict[str, set[bytes]] = {}
        for report, digest in zip(batch, digests, strict=True):
            by_sender.setdefault(report.sender, set()).add(digest)
        known = store.reported_devices(session, senders, by_sender)
        unknown = {r.sender for r in batch if r.sender not in known}
        unknown |= {
            r.sender
            for r, i, d in zip(batch, items, digests, strict=True)
            if r.sender not in unknown and not known[r.sender].knows(i, d)
        }
        steady = set(known) - unknown
        # Devices without any key row (their first report) get theirs as plain rows, in one
        # Core insert per table (``store.FirstKeys``), and their device rows written as the
        # steady senders' are: no ORM objects for them either.
        fresh = store.keyless(
            session, sorted(s for s in unknown if s in known and not known[s].keys)
        )
        first_keys = store.FirstKeys()
        plain = steady | fresh
        held += store.load_report_senders(session, [s for s in senders if s not in plain])
        held += store.load_feed_seen(session, sorted(plain))
        facts = devices.BatchFacts.read(session, senders)
        if not facts.deletions_open:
            # first reports' feed rows as plain values, inserted together below (nothing
            # reads them meanwhile: no group deletion open)
            store.defer_new_seen(session)
        online_since = now - cx.env.settings.online_window
        written: dict[str, dict[str, object]] = {}
        guards: dict[str, ReplayGuard] = {}
        for report, reported, digest in zip(batch, items, digests, strict=True):
            sender = report.sender
            body = report.body
            assert isinstance(body, KeyStateReport)
            guard = guards.get(sender)
            if guard is None:
                guard = store.load_guard(session, sender, memo=cx.guards, stored=stored)
            trial = guard.copy()
            row = known.get(sender)
            state = None if row is None else row.state
            try:
                trial.accept(report.message)
                devices.check_state(sender, state)
            except ProtocolError as err:
                refused.append((report, err))
                continue
            try:
                if sender in fresh:
                    first_keys.record(sender, reported, now=now)
                effects = devices.on_key_states(
                    cx,
                    session,
                    sender,
                    body,
                    report.message,
                    now=now,
                    facts=facts,
                    recorded=sender in plain,
                )
            except ProtocolError as err:
                raise devices.BatchUndone(f"{sender}: [{err.check}]") from None
            if row is not None and sender in plain:
                back = row.last_seen is None or row.last_seen < online_since
                written[sender] = {
                    "device": sender,
                    "report": report.message.message_id,
                    "report_at": now,
                    "seen": now,
                    "due": min(row.attest_due, now) if back else row.attest_due,
                    "keys": digest,
                }
            guards[sender] = trial
            taken.append((report, effects))
        store.drop_claims(session, set(new) - set(guards))
        first_keys.insert(session)
        store.insert_new_seen(session)
        store.number_new_key_rows(session)
        store.write_reports(session, [written[s] for s in sorted(written)])
        store.save_guards(session, guards, now=now, stored=stored)
        # ``last_seen`` ("heard from") was written by each report's registry row update

    if not devices.take_together(cx, batch, now, work, what="a report"):
        return
    behind = devices.refuse_all(cx, refused, now)
    for report, effects in taken:
        cx.env.metrics.reports.inc(report.type)
        execute.run(cx, effects)
        behind.append(report.sender)
    catchup.catch_up_many(cx, list(dict.fromkeys(behind)), now)
