"""Key packages received together, taken in one transaction (``on_key_packages``).

A group creation of N founders asks every joiner for a key package (``bulkadd``): N device
messages that arrive together, most for the same multi-add job. Taken one per transaction,
each paid its own replay-row lock and write, "heard from" write, commit, operation touch and
catch-up pass (about 10 ms of service each at N = 1,000, docs/bench/README.md "Group creation
by multi-add"). Here, as for acks (``acks.on_acks``): every sender's replay row is locked in
sorted order, each key package is judged alone against its sender's window under the lock
and handled by ``devices.on_key_package`` exactly as on its own, then the replay rows, "heard
from", one touch per operation and one start per group follow, and one catch-up pass.

A multi-add job the batch's key packages go to is read and its key-package map decoded once
for the batch (``devices.CollectedJobs``), and written once after the batch's last key
package (compare-and-set), not read, decoded, re-encoded and written again per key package:
that was O(joiners²) bytes per chunk of a creation.

A key package refused here is refused alone: ``devices.on_key_package`` keeps nothing before
its last check (a multi-add's key package joins the batch's map only once taken), and its
replay window is updated on a copy kept only when it is taken. If the transaction itself fails
(a lost compare-and-set on a job: another instance moved it), each is tried on its own
(``devices.on_device_message``).
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from agent.protocol.errors import ProtocolError
from agent.protocol.wire.messages.group import KeyPackageMessage
from agent.protocol.wire.replay import ReplayGuard
from provisioning.service import bulkadd, catchup, devices, execute, store, verify
from provisioning.service.context import Call
from provisioning.service.effects import Effect, StartNext, Touch


def on_key_packages(cx: Call, key_packages: list[verify.VerifiedReport], now: int) -> None:
    """Take the key packages received together (``key_packages`` is emptied): see the module
    docstring. One alone takes the ordinary path (``devices.on_device_message``)."""
    batch = devices.take_batch(cx, key_packages, now)
    if batch is None:
        return
    taken: list[verify.VerifiedReport] = []
    refused: list[tuple[verify.VerifiedReport, ProtocolError]] = []
    effects: list[Effect] = []  # the batch's, once per operation and group (``_once``)

    def work(session: Session) -> None:
        taken.clear()
        refused.clear()
        senders = sorted({m.sender for m in batch})
        stored = store.lock_guards(session, senders)
        # the senders' device rows in one query (the identity map answers the per-message
        # reads); ``held`` keeps them there
        held = store.load_ack_senders(session, senders, ())
        guards: dict[str, ReplayGuard] = {}
        found: list[Effect] = []
        collecting: devices.CollectedJobs = {}
        for report in batch:
            message = report.message
            sender = message.sender
            body = report.body
            guard = guards.get(sender)
            if guard is None:
                guard = store.load_guard(session, sender, memo=cx.guards, stored=stored)
            trial = guard.copy()
            try:
                trial.accept(message)
                if isinstance(body, KeyPackageMessage):
                    devices.check_not_quarantined(session, sender)
                    found.extend(
                        devices.on_key_package(
                            cx, session, sender, body, now, collecting=collecting
                        )
                    )
                else:
                    found.extend(devices.dispatch_device(cx, session, message, now))
            except ProtocolError as err:
                refused.append((report, err))
                continue
            guards[sender] = trial
            taken.append(report)
        took = {r.body.command_id for r in taken if isinstance(r.body, KeyPackageMessage)}
        for request_id, (job, have) in collecting.items():
            if request_id not in took:
                continue  # none of the batch's key packages was taken for it
            bulkadd.store_collected(job, have)
            if not store.save_job(session, job, cx.env.instance):
                # another instance moved the job meanwhile: each key package is then taken
                # (or refused) on its own
                raise ProtocolError(
                    "ds.key_package.unexpected", "the job moved meanwhile: send it again"
                )
        del held
        store.save_guards(session, guards, now=now, stored=stored)
        store.mark_heard(session, guards, now=now)
        effects[:] = _once(found)

    if not devices.take_together(cx, batch, now, work, what="a key package"):
        return
    alive = devices.refuse_all(cx, refused, now)
    for report in taken:
        cx.env.metrics.reports.inc(report.message.type)
        alive.append(report.sender)
    execute.run(cx, effects)
    catchup.catch_up_many(cx, list(dict.fromkeys(alive)), now)


def _once(effects: list[Effect]) -> list[Effect]:
    """The batch's effects with one ``Touch`` per operation (its last: the job as last saved)
    and one ``StartNext`` per group, in the order of their first occurrence."""
    touches: dict[bytes | None, Touch] = {}
    out: list[Effect] = []
    seen: set[object] = set()
    for effect in effects:
        if isinstance(effect, Touch):
            key = effect.job.command_id
            if key not in touches:
                out.append(effect)
            touches[key] = effect
            continue
        if isinstance(effect, StartNext):
            if effect.group_id in seen:
                continue
            seen.add(effect.group_id)
        out.append(effect)
    return [touches[e.job.command_id] if isinstance(e, Touch) else e for e in out]
