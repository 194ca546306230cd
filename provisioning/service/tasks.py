"""Periodic work every instance's ``tick`` offers, done by one instance at a time: the attestation
schedule (every ``ATTEST_SCAN_SECONDS``: challenge the online devices whose last verdict or
challenge is an ``interval`` old, read by the ``devices.attest_due`` index, at most
``ATTEST_SCAN_BATCH`` looked at and ``challenges_per_second`` times ``ATTEST_SCAN_SECONDS``
challenged a scan, the longest due first, the rest left due for the next scans: a fleet back
from an outage is re-attested at that rate, not all at once; operator attestations without a
report end in ``timeout``),
pruning (once a minute fleet-wide: held halves nobody completed, ended jobs of ended operations,
operations finished a day ago) and the device CA's CRL (``crl_tick``: re-issued at half its
validity by one instance; every instance's ``[revocation] crl_file`` kept at the newest; a
revocation's CRL written ``CRL_WRITE_GRACE_MS`` after it was accepted).

Each task is claimed with a lease in the database (``store.claim_task``): the instance that
claims it runs it and sets when it is due next; a killed instance's task is taken over within a
few ticks, once its lease (``TASK_LEASE_SECONDS``) expired.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Final

from cryptography import x509
from sqlalchemy.orm import Session

from agent.protocol.errors import ProtocolError, StateError
from agent.protocol.wire.messages.result import ResultStatus
from provisioning import revocation
from provisioning.service import attestation, store
from provisioning.service.context import Call

log = logging.getLogger("keyfleet.service")

ATTEST_SCAN_SECONDS: Final = 5
# The most devices one scan looks at (the longest due first; the rest at the next scan), and
# how long an offline device waits before the schedule looks at it again: each scan reads
# only what is due (``devices.attest_due``), never the whole fleet.
ATTEST_SCAN_BATCH: Final = 512
OFFLINE_RECHECK_SECONDS: Final = 60
# How often an instance checks that the broker's CRL file holds the newest CRL and that the
# newest CRL is not past half its validity.
CRL_CHECK_SECONDS: Final = 30
# A revocation's CRL is written this long after it was accepted (at the next tick after it):
# the broker restarts on the file's change, and the publishes of the revoking call (the
# operator's result) should reach it before.
CRL_WRITE_GRACE_MS: Final = 1000
PRUNE_SECONDS: Final = 60
# How long a claimed periodic task stays with its instance: longer than one run takes, short
# enough that a killed instance's task is taken over within a few ticks.
TASK_LEASE_SECONDS: Final = 30


def attest_tick(cx: Call, now: int) -> None:
    """Operator attestations that got no report in time end in ``timeout`` (the instance
    that deletes the waiting row reports it); every ``ATTEST_SCAN_SECONDS`` one instance,
    the one that claims the ``attest.scan`` task, challenges the devices that are due."""
    expired = cx.env.read(lambda s: store.expired_attest_nonces(s, now=now))
    for nonce in expired:
        operation = cx.env.tx(partial(store.take_attest_operation, nonce=nonce))
        if operation is None:
            continue  # the report or another instance's tick came first
        attestation.attest_finish(
            cx,
            operation,
            ResultStatus.TIMEOUT,
            f"no attestation report from {operation.device_id} within "
            f"{cx.env.settings.ack_timeout}s",
            now,
            pending=(operation.device_id,),
        )
    if cx.env.attestation is None or not claim_task(cx, "attest.scan", now):
        return
    interval = cx.env.attestation.interval
    cap = scan_cap(cx.env.attestation.challenges_per_second)
    capped: list[int] = []  # the due time of the first device left for a later scan

    def due(session: Session) -> list[str]:
        store.forget_challenges(session, now=now)
        found: list[str] = []
        deferred: dict[str, int] = {}
        capped.clear()
        for device in store.attest_due(session, now=now, limit=ATTEST_SCAN_BATCH):
            if device.state not in attestation.ATTESTABLE or not device.has_ak:
                later = now + interval  # (a re-enrollment makes it due at once)
            elif (
                max(cx.env.last_heard.get(device.device_id, -1), device.last_seen or -1)
                < now - cx.env.settings.online_window
            ):
                # offline: the challenge would expire in its session queue
                later = now + min(interval, OFFLINE_RECHECK_SECONDS)
            elif device.attested_at is not None and now - device.attested_at < interval:
                later = device.attested_at + interval  # a verdict after its challenge
            elif len(found) >= cap:
                # this scan's share is taken: it and the rest stay due, in their order, for
                # the next scans (neither skipped nor moved: still shown as due)
                capped.append(device.attest_due)
                break
            else:
                found.append(device.device_id)  # challenging it sets when it is due next
                continue
            deferred[device.device_id] = later
        store.defer_attestations(session, deferred)
        return found

    try:
        chosen = cx.env.tx(due)
        if capped:
            cx.env.metrics.attest_backlog_scans.inc()
            log.info(
                "scheduled attestation: %d challenged (the most a scan), more due; the "
                "longest due for %ds",
                len(chosen),
                now - capped[0],
            )
        for device_id in chosen:
            try:
                challenged = attestation.challenge(cx, device_id, now, scheduled=True)
            except ProtocolError as err:
                log.warning("could not challenge %s: [%s] %s", device_id, err.check, err.reason)
                cx.env.tx(
                    partial(store.defer_attestation, device_id=device_id, until=now + interval)
                )
            else:
                if challenged:
                    log.info("scheduled attestation: challenged %s", device_id)
    finally:
        finish_task(cx, "attest.scan", now + ATTEST_SCAN_SECONDS)


def scan_cap(per_second: int) -> int:
    """The most devices one attestation scan challenges at ``per_second`` challenges a
    second (``[attestation] max_challenges_per_second``)."""
    return max(1, min(ATTEST_SCAN_BATCH, per_second * ATTEST_SCAN_SECONDS))


def claim_task(cx: Call, name: str, now: int) -> bool:
    # A read first: most ticks find the task not due, and a claim attempt would take the
    # database's write lock (all of SQLite) for nothing.
    row = cx.env.read(lambda s: store.task_lease(s, name))
    if row is not None and (
        row.due_at > now or (row.claimed_until > now and row.claimed_by != cx.env.instance)
    ):
        return False
    claimed = cx.env.tx(
        lambda s: store.claim_task(
            s, name, instance=cx.env.instance, now=now, lease=TASK_LEASE_SECONDS
        )
    )
    if claimed:
        cx.env.metrics.tasks.inc(name)
    return claimed


def finish_task(cx: Call, name: str, next_due: int) -> None:
    cx.env.tx(lambda s: store.finish_task(s, name, instance=cx.env.instance, next_due=next_due))


def prune_tick(cx: Call, now: int) -> None:
    """Once a minute fleet-wide: held halves nobody completed, ended jobs of ended
    operations, operations finished a day ago."""
    if not claim_task(cx, "service.prune", now):
        return

    def work(session: Session) -> None:
        store.prune(
            session,
            held_before=now - cx.env.settings.commit_request_timeout,
            operations_before=now - 86_400,
        )

    try:
        cx.env.tx(work)
    finally:
        finish_task(cx, "service.prune", now + PRUNE_SECONDS)


def write_crl(cx: Call) -> None:
    """Write the newest stored CRL to this instance's ``crl_file`` (if it holds an older one)."""
    settings = cx.env.revocation
    if settings is None or settings.crl_file is None:
        return
    row = cx.env.read(revocation.newest_crl)
    if row is None:
        return
    try:
        revocation.write_broker_crl(settings, x509.load_der_x509_crl(row.der))
    except StateError as exc:  # retried by the next crl_tick
        log.error("revocation.crl.file: %s", exc)


def crl_tick(cx: Call, now: int) -> None:
    """Every ``CRL_CHECK_SECONDS``: one instance re-issues the device CA's CRL when none exists,
    the newest is past half its validity or an older device CA signed it (after a device CA
    rollover, ``trustroll``); every instance brings its CRL file up to date
    (a revocation made by another instance, a file lost)."""
    settings = cx.env.revocation
    if settings is None:
        return
    if cx.env.crl_write_at_ms is not None and cx.clock.ms >= cx.env.crl_write_at_ms:
        cx.env.crl_write_at_ms = None
        write_crl(cx)
    if now - cx.env.crl_checked_at < CRL_CHECK_SECONDS:
        return
    cx.env.crl_checked_at = now
    if revocation.refresh_due(cx.env.read(revocation.newest_crl), now, settings) and claim_task(
        cx, "revocation.crl", now
    ):
        try:

            def issue(session: Session) -> None:
                if revocation.refresh_due(revocation.newest_crl(session), now, settings):
                    revocation.issue_crl(session, settings, now=now)

            cx.env.tx(issue)
        finally:
            finish_task(cx, "revocation.crl", now + CRL_CHECK_SECONDS)
    write_crl(cx)
