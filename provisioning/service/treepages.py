"""Tree pages for joiners (docs/treekem.md, "Joining a large group"; docs/service.md): a
Welcome into a group larger than ``agent.protocol.mls.group.INLINE_TREE_LEAVES`` carries only
the tree hash; the joiner asks for the tree page by page (``group.tree_request``) and the
service answers each with a ``svc.tree_page`` cut from the public tree it holds
(``agent.protocol.mls.treepages.paginate``: every page at most 1 MiB of nodes).

A device gets at most ``[groups] tree_request_burst`` requests at once and then
``tree_requests_per_minute`` a minute at each instance (``groupcache.RequestBuckets``); past
that, ``ds.tree.rate`` (before anything is read). Only a member of the group (one with a leaf:
its add was committed) gets pages (``ds.group.member``), only pages that exist
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
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from agent.protocol.errors import ProtocolError
from agent.protocol.mls.tree import RatchetTree
from agent.protocol.mls.treepages import TreePage as Page
from agent.protocol.topics import device_cmd_topic
from agent.protocol.wire.messages.group import TreeRequest
from agent.protocol.wire.messages.service import TreePage
from provisioning.db.runtime import GroupTreeEpochRow
from provisioning.registry import Registry
from provisioning.service import store
from provisioning.service.commits import load_public
from provisioning.service.context import Call
from provisioning.service.effects import Effects, Send
from provisioning.service.store import trees

log = logging.getLogger(__name__)


def on_tree_request(
    cx: Call, session: Session, sender: str, body: TreeRequest, now: int
) -> Effects:
    """Answer one page of the group's tree at the epoch asked for (module docstring)."""
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
    member = next(
        (
            m
            for m in store.memberships(session, [sender]).get(sender, [])
            if m.group_id == body.group_id and m.leaf_index is not None
        ),
        None,
    )
    if member is None:
        raise ProtocolError(
            "ds.group.member", f"{sender!r} is not a member of group {body.group_id!r}"
        )
    group = Registry(session).group(body.group_id)
    if body.epoch not in (group.epoch, member.joined_epoch):
        # an epoch the group has left is a joiner's, and only its own: a member cannot make an
        # instance rebuild trees it never joined with
        raise ProtocolError(
            "ds.tree.epoch",
            f"{sender!r} joined {body.group_id!r} at epoch {member.joined_epoch}, not "
            f"{body.epoch} (the group is at epoch {group.epoch})",
        )
    pages: list[Page] | None = None
    tree = cx.env.tree_pages.tree(body.group_id, body.epoch)
    if tree is None and group.epoch == body.epoch:
        tree = load_public(session, body.group_id, cx.env.groups)[0].tree
    if tree is not None:
        pages = cx.env.tree_pages.pages(body.group_id, body.epoch, tree)
    elif body.epoch < group.epoch:
        pages = _rebuilt(cx, session, body.group_id, body.epoch)
    if pages is None:
        raise ProtocolError(
            "ds.tree.epoch",
            f"no tree of group {body.group_id!r} at epoch {body.epoch} is kept "
            f"(the group is at epoch {group.epoch})",
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
    )
    return [Send(device_cmd_topic(sender), answer, sender)]


def _rebuilt(cx: Call, session: Session, group_id: str, epoch: int) -> list[Page] | None:
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

    return cx.env.tree_pages.rebuilt_pages(group_id, epoch, kept.group_context, rebuild)
