"""Tree pages for joiners (docs/treekem.md, "Joining a large group"; docs/service.md): a
Welcome into a group larger than ``agent.protocol.mls.group.INLINE_TREE_LEAVES`` carries only
the tree hash; the joiner asks for the tree page by page (``group.tree_request``) and the
service answers each with a ``svc.tree_page`` cut from the public tree it holds
(``agent.protocol.mls.treepages.paginate``: every page at most 1 MiB of nodes and the
operators' Authorizations its leaves name that no earlier page carries, from
``store.admissions``: members keep none, docs/treekem.md "Admissions delivered by the
service").

A device gets at most ``[groups] tree_request_burst`` requests at once and then
``tree_requests_per_minute`` a minute at each instance (``groupcache.RequestBuckets``); past
that, ``ds.tree.rate`` (before any tree is read or cut). Only a member of the group (one with
a leaf: its add was committed) gets pages (``ds.group.member``), only pages that exist
(``ds.tree.page``), only of the group's current epoch or the epoch the member joined at (its
Welcome's: a member cannot have instances rebuild other epochs' trees), and only of a tree the
database still keeps:

- the group's current epoch (from its row, or this instance's copy: ``groupcache``);
- an epoch whose commit added members, kept by the instance that accepted it
  (``groupcache.TreePageCache.keep``: a copy sharing all but O(log N) nodes with the live
  tree), so joiners of one chunk of a large creation get their tree while the next chunks
  commit without a rebuild;
- any other epoch the group has left whose commit the commit log still keeps: rebuilt from the
  database (``store.trees.load_at``: the current node rows and what each later commit rewrote,
  checked against the GroupContext kept for that epoch), by any instance, after any restart,
  and cut into pages once per instance while it is among the ``[groups] tree_pages_kept``
  trees last cut there (``groupcache.TreePageCache``).

Otherwise ``ds.tree.epoch``: the epoch is ahead of the group, is not the member's join epoch,
or retention dropped it (the joiner's fetch times out and the member gets back in through a
fresh Welcome). The joiner
checks everything against the signed tree hash: the service is not trusted here.

Requests received together are answered in one transaction (``on_tree_requests``), each
checked as on its own and refused alone (docs/service.md, "What the delivery service
does").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy.orm import Session

from agent.protocol.errors import ProtocolError
from agent.protocol.mls.tree import RatchetTree
from agent.protocol.mls.treepages import TreePage as Page
from agent.protocol.topics import device_cmd_topic
from agent.protocol.wire.messages.group import TreeRequest
from agent.protocol.wire.messages.service import TreePage
from agent.protocol.wire.replay import ReplayGuard
from provisioning.db.runtime import GroupTreeEpochRow
from provisioning.registry import Registry
from provisioning.service import catchup, devices, execute, store, verify
from provisioning.service.commits import load_public
from provisioning.service.context import Call
from provisioning.service.effects import Effects, Send
from provisioning.service.groupcache import Admissions
from provisioning.service.store import Membership, admissions, trees

log = logging.getLogger(__name__)


def on_tree_request(
    cx: Call, session: Session, sender: str, body: TreeRequest, now: int
) -> Effects:
    """Answer one page of the group's tree at the epoch asked for (module docstring)."""
    _take_rate(cx, sender, now)
    member = _member(store.memberships(session, [sender]).get(sender, []), sender, body)
    group_epoch = Registry(session).group(body.group_id).epoch
    return [
        _answer(
            cx, session, sender, body, joined_epoch=member.joined_epoch, group_epoch=group_epoch
        )
    ]


def on_tree_requests(cx: Call, requests: list[verify.VerifiedReport], now: int) -> None:
    """Take the tree requests received together (``requests`` is emptied) in one transaction:
    the same checks per request as ``verify.accept_and`` + ``dispatch_device`` +
    ``on_tree_request``, with the senders' replay rows locked in sorted order
    (``store.lock_guards``) and their states, memberships and groups' epochs read once for the
    batch. A request refused here (replay, rate, not a member, epoch, page, quarantined sender)
    is refused alone, its replay window updated on a copy kept only when it is answered. A
    request is read-only: an answered one needs no catch-up pass (its sender is joining; its
    ack of the join brings one), a refused one (but a replay) still gets one. If the
    transaction fails, each request is taken on its own; one request alone takes the ordinary
    path (``devices.take_batch``)."""
    batch = devices.take_batch(cx, requests, now)
    if batch is None:
        return
    answered: list[tuple[verify.VerifiedReport, Send]] = []
    refused: list[tuple[verify.VerifiedReport, ProtocolError]] = []

    def work(session: Session) -> None:
        answered.clear()
        refused.clear()
        senders = sorted({m.sender for m in batch})
        stored = store.lock_guards(session, senders)
        bodies = [m.body for m in batch if isinstance(m.body, TreeRequest)]
        rows = store.load_ack_senders(session, senders, {b.group_id for b in bodies})
        memberships = store.memberships(session, senders)
        guards: dict[str, ReplayGuard] = {}
        for message, body in zip(batch, bodies, strict=True):
            sender = message.sender
            guard = guards.get(sender)
            if guard is None:
                guard = store.load_guard(session, sender, memo=cx.guards, stored=stored)
            trial = guard.copy()
            try:
                trial.accept(message.message)
                state = rows.states.get(sender)
                devices.check_state(sender, state)
                _take_rate(cx, sender, now)
                member = _member(memberships.get(sender, []), sender, body)
                send = _answer(
                    cx,
                    session,
                    sender,
                    body,
                    joined_epoch=member.joined_epoch,
                    group_epoch=rows.epochs[body.group_id],
                )
            except ProtocolError as err:
                refused.append((message, err))
                continue
            guards[sender] = trial
            answered.append((message, send))
        store.save_guards(session, guards, now=now, stored=stored)
        store.mark_heard(session, guards, now=now)

    if not devices.take_together(cx, batch, now, work, what="a tree request"):
        return
    behind = devices.refuse_all(cx, refused, now)
    for message, _ in answered:
        cx.env.metrics.reports.inc(message.type)
    execute.run(cx, [send for _, send in answered])
    catchup.catch_up_many(cx, list(dict.fromkeys(behind)), now)


def _take_rate(cx: Call, sender: str, now: int) -> None:
    settings = cx.env.settings
    if not cx.env.tree_requests.take(
        sender,
        now,
        per_minute=settings.tree_requests_per_minute,
        burst=settings.tree_request_burst,
    ):
        raise ProtocolError(
            "ds.tree.rate",
            f"{sender!r} asked for tree pages faster than {settings.tree_requests_per_minute} "
            f"a minute (burst {settings.tree_request_burst})",
        )


def _member(memberships: list[Membership], sender: str, body: TreeRequest) -> Membership:
    member = next(
        (m for m in memberships if m.group_id == body.group_id and m.leaf_index is not None),
        None,
    )
    if member is None:
        raise ProtocolError(
            "ds.group.member", f"{sender!r} is not a member of group {body.group_id!r}"
        )
    return member


def _answer(
    cx: Call,
    session: Session,
    sender: str,
    body: TreeRequest,
    *,
    joined_epoch: int | None,
    group_epoch: int,
) -> Send:
    if body.epoch not in (group_epoch, joined_epoch):
        # an epoch the group has left is a joiner's, and only its own: a member cannot make an
        # instance rebuild trees it never joined with
        raise ProtocolError(
            "ds.tree.epoch",
            f"{sender!r} joined {body.group_id!r} at epoch {joined_epoch}, not "
            f"{body.epoch} (the group is at epoch {group_epoch})",
        )
    pages: list[Page] | None = None

    def stored(digests: Sequence[bytes]) -> dict[bytes, bytes]:
        return admissions.load(session, body.group_id, digests)

    tree = cx.env.tree_pages.tree(body.group_id, body.epoch)
    if tree is None and group_epoch == body.epoch:
        tree = load_public(session, body.group_id, cx.env.groups)[0].tree
    if tree is not None:
        pages = cx.env.tree_pages.pages(body.group_id, body.epoch, tree, stored)
    elif body.epoch < group_epoch:
        pages = _rebuilt(cx, session, body.group_id, body.epoch, stored)
    if pages is None:
        raise ProtocolError(
            "ds.tree.epoch",
            f"no tree of group {body.group_id!r} at epoch {body.epoch} is kept "
            f"(the group is at epoch {group_epoch})",
        )
    if body.page >= len(pages):
        raise ProtocolError("ds.tree.page", f"the tree of {body.group_id!r} has {len(pages)} pages")
    page = pages[body.page]
    answer = TreePage(
        group_id=body.group_id,
        epoch=body.epoch,
        page=page.index,
        pages=page.count,
        width=page.width,
        start=page.start,
        nodes=page.nodes,
        admissions=page.admissions,
    )
    return Send(device_cmd_topic(sender), answer, sender)


def _rebuilt(
    cx: Call, session: Session, group_id: str, epoch: int, stored: Admissions
) -> list[Page] | None:
    """The pages of the group's tree at ``epoch`` (one it has left), rebuilt from the database
    unless this instance already cut them; None if the database no longer keeps it."""
    kept = session.get(GroupTreeEpochRow, (group_id, epoch))
    if kept is None:
        return None

    def rebuild() -> RatchetTree | None:
        log.info("group %s: rebuilding the tree of epoch %d from the database", group_id, epoch)
        public = trees.load_at(session, group_id, epoch)
        if public is None:
            log.warning("group %s: the kept rows do not rebuild epoch %d", group_id, epoch)
            return None
        return public.tree

    return cx.env.tree_pages.rebuilt_pages(group_id, epoch, kept.group_context, rebuild, stored)
