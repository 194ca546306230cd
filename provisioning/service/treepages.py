"""Tree pages for joiners (docs/treekem.md, "Joining a large group"; docs/service.md): a
Welcome into a group larger than ``agent.protocol.mls.group.INLINE_TREE_LEAVES`` carries only
the tree hash; the joiner asks for the tree page by page (``group.tree_request``) and the
service answers each with a ``svc.tree_page`` cut from the public tree it holds
(``agent.protocol.mls.treepages.paginate``: every page at most 1 MiB of nodes).

Only a member of the group (one with a leaf: its add was committed) gets pages
(``ds.group.member``), only pages that exist (``ds.tree.page``), only of a tree this instance
has: the group's current one (from its row), or one of its recent epochs whose commit added
members, kept when this instance accepted that commit (``groupcache.TreePageCache``), so joiners
of one chunk of a large creation still get their epoch's tree while the next chunks commit.
Otherwise ``ds.tree.epoch``: the joiner asks again after ``agent.protocol.treefetch.RETRY``
seconds (maybe reaching the instance that keeps the tree) until its fetch times out.
The joiner checks everything against the signed tree hash: the service is not trusted here.

"""

from __future__ import annotations

from sqlalchemy.orm import Session

from agent.protocol.errors import ProtocolError
from agent.protocol.topics import device_cmd_topic
from agent.protocol.wire.messages.group import TreeRequest
from agent.protocol.wire.messages.service import TreePage
from provisioning.registry import Registry
from provisioning.service import store
from provisioning.service.commits import load_public
from provisioning.service.context import Call
from provisioning.service.effects import Effects, Send


def on_tree_request(
    cx: Call, session: Session, sender: str, body: TreeRequest, now: int
) -> Effects:
    """Answer one page of the group's tree at its current epoch (module docstring)."""
    if not any(
        m.group_id == body.group_id and m.leaf_index is not None
        for m in store.memberships(session, [sender]).get(sender, [])
    ):
        raise ProtocolError(
            "ds.group.member", f"{sender!r} is not a member of group {body.group_id!r}"
        )
    group = Registry(session).group(body.group_id)
    tree = cx.env.tree_pages.tree(body.group_id, body.epoch)
    if tree is None and group.epoch == body.epoch:
        tree = load_public(session, body.group_id, cx.env.groups)[0].tree
    if tree is None:
        raise ProtocolError(
            "ds.tree.epoch",
            f"no tree of group {body.group_id!r} at epoch {body.epoch} here "
            f"(the group is at epoch {group.epoch})",
        )
    pages = cx.env.tree_pages.pages(body.group_id, body.epoch, tree)
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
