"""Signed audit checkpoints (docs/operations.md, "Audit checkpoints"): the service signs the
audit chain's head with the audit checkpoint key on a schedule and on demand, keeps the
checkpoints, and serves them to operators with the entries between.

- ``checkpoint_tick``: every ``checkpoint_interval`` seconds one instance (the one that claims
  the ``audit.checkpoint`` task) checkpoints the head if it moved since the newest checkpoint.
- ``on_sync`` (``op.audit_sync``, viewers and up): the checkpoint asked for (absent: the newest,
  made now if the head moved) and the entries after ``after`` up to it, each as seq and hash
  preimage, as many as fit one answer; the operator asks again from the last one it got. Read
  only: nothing is audited (a refusal is, by the caller).

Without ``[audit] checkpoint_key`` the service makes none and refuses ``op.audit_sync`` with
``audit.checkpoint.none``. The key must not be the service's message-signing key or a TLS key
(``require_distinct``): whoever holds those (a stolen service host's files) must not also be
able to vouch for a rewritten history with the same key operators pin for it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.orm import Session

from agent.protocol.errors import ConfigError, ProtocolError
from agent.protocol.topics import operator_result_topic
from agent.protocol.wire.cose import key_id
from agent.protocol.wire.messages.operator import AuditSync
from agent.protocol.wire.messages.result import MAX_AUDIT_LINKS, AuditCheckpointResult, AuditLink
from provisioning import audit
from provisioning.checkpoint import Checkpoint, sign_checkpoint
from provisioning.service import store, tasks
from provisioning.service.context import Call
from provisioning.service.effects import Effects, Send

log = logging.getLogger("keyfleet.service")

TASK = "audit.checkpoint"
# What one answer's entries take at most (a service message is at most 256 KiB).
PAGE_BYTES = 160 * 1024


def require_distinct(
    checkpoint_key: ec.EllipticCurvePrivateKey,
    others: Iterable[tuple[str, ec.EllipticCurvePublicKey]],
) -> None:
    """Refuse an audit checkpoint key that is also one of ``others`` (name, public key): the
    service's signing key or a TLS key."""
    mine = key_id(checkpoint_key.public_key())
    for name, public in others:
        if key_id(public) == mine:
            raise ConfigError(
                f"[audit] checkpoint_key is the same key as {name}: checkpoints must be signed "
                "by a key of their own, so that the files that let someone act as the service "
                "do not also let them vouch for a rewritten audit log "
                '(audit.checkpoint.key-reuse; docs/operations.md, "Audit checkpoints")'
            )


def make_checkpoint(cx: Call, session: Session, now: int) -> bytes | None:
    """The signed checkpoint of the current head: the stored one if the head has not moved
    since, else a new one, stored. None for an empty log or without a checkpoint key."""
    key = cx.env.checkpoint_key
    if key is None:
        return None
    count, head = audit.head(session)
    if count == 0:
        return None
    newest = store.newest_checkpoint_count(session)
    if newest is not None and newest > count:
        log.error(
            "the audit log ends at entry %d but entry %d was checkpointed: entries were cut "
            "off the end (operators who saw the later checkpoint will refuse this one)",
            count,
            newest,
        )
    existing = store.checkpoint_row(session, count)
    if existing is not None:
        stored_head, stored = existing
        if stored_head != head:
            log.error(
                "audit entry %d hashed to %s when it was checkpointed and to %s now: the log "
                "was rewritten",
                count,
                stored_head.hex(),
                head.hex(),
            )
        return stored
    signed = sign_checkpoint(Checkpoint(count, head, now, cx.env.instance), key)
    if not store.store_checkpoint(
        session, count=count, head=head, time=now, instance=cx.env.instance, signed=signed
    ):
        return store.checkpoint_at(session, count)
    log.info("audit checkpoint %d:%s signed", count, head.hex()[:16])
    return signed


def checkpoint_tick(cx: Call, now: int) -> None:
    """One instance, every ``checkpoint_interval`` seconds: checkpoint the head if it moved."""
    if cx.env.checkpoint_key is None or not tasks.claim_task(cx, TASK, now):
        return
    try:
        cx.env.tx(lambda session: make_checkpoint(cx, session, now))
    finally:
        tasks.finish_task(cx, TASK, now + cx.env.settings.checkpoint_interval)


def links(session: Session, *, after: int, upto: int) -> list[AuditLink]:
    """Entries ``after + 1 .. upto`` (fewer if they do not fit one answer) as seq + preimage.
    A gap left by a deleted entry shows as a missing seq, which the operator refuses."""
    found: list[AuditLink] = []
    size = 0
    limit = min(upto - after, MAX_AUDIT_LINKS)
    if limit <= 0:
        return found
    for entry in audit.entries(session, from_seq=after + 1, limit=limit):
        if entry.seq > upto:
            break
        preimage = audit.entry_preimage(
            seq=entry.seq,
            time=entry.time,
            actor=entry.actor,
            action=entry.action,
            target=entry.target,
            outcome=entry.outcome.value,
            reason=entry.reason,
            details=entry.details,
        )
        size += len(preimage) + 16
        if found and size > PAGE_BYTES:
            break
        found.append(AuditLink(entry.seq, preimage))
    return found


def on_sync(cx: Call, session: Session, operator: str, body: AuditSync, now: int) -> Effects:
    if cx.env.checkpoint_key is None:
        raise ProtocolError(
            "audit.checkpoint.none", "this service has no [audit] checkpoint_key configured"
        )
    if body.count is None:
        signed = make_checkpoint(cx, session, now)
        if signed is None:
            raise ProtocolError("audit.checkpoint.none", "the audit log is empty")
        count = audit.head(session)[0]
    else:
        found = store.checkpoint_at(session, body.count)
        if found is None:
            raise ProtocolError("audit.checkpoint.unknown", f"no checkpoint at {body.count}")
        signed, count = found, body.count
    page = links(session, after=body.after, upto=count)
    result = AuditCheckpointResult(body.command_id, signed, tuple(page))
    return [Send(operator_result_topic(operator), result, operator)]
