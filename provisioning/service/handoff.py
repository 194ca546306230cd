"""The Authorizations members hand over once after an upgrade (``group.admissions``;
docs/treekem.md, "Admissions delivered by the service"): a member whose saved group state still
held the operators' Authorizations its tree names (members keep none since) sends them, and
the service keeps those whose SHA-256 a leaf of the group's current tree records, so that it
can deliver them to joiners of a group it kept none of. The rest are ignored: nothing is
looked up but by a leaf's hash, so the sender is not trusted with them; only a member with a
leaf may hand them over (``ds.group.member``).
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from agent.protocol.errors import ProtocolError
from agent.protocol.mls.public import admission_hash
from agent.protocol.wire.messages.group import GroupAdmissions
from provisioning.service import store
from provisioning.service.commits import load_public
from provisioning.service.context import Call
from provisioning.service.effects import Effects, Log
from provisioning.service.store import admissions


def on_group_admissions(
    cx: Call, session: Session, sender: str, body: GroupAdmissions, now: int
) -> Effects:
    """Keep the handed-over Authorizations the group's current tree names (module docstring)."""
    held = store.memberships(session, [sender]).get(sender, [])
    if not any(m.group_id == body.group_id and m.leaf_index is not None for m in held):
        raise ProtocolError(
            "ds.group.member", f"{sender!r} is not a member of group {body.group_id!r}"
        )
    public, epoch = load_public(session, body.group_id, cx.env.groups)
    named = [a for a in body.admissions if public.tree.admission_in_use(admission_hash(a))]
    admissions.keep(session, body.group_id, named, epoch=epoch)
    return [
        Log(
            logging.INFO,
            "group %s: kept %d of the %d Authorizations %s handed over",
            (body.group_id, len(named), len(body.admissions), sender),
        )
    ]
