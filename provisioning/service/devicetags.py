"""``op.device_tag``: an operator adds tags to a device or takes them off
(``keyfleet device tag DEVICE --add T --remove T``), answered at once and audited.

Why one operator's signed command is enough (no dual control): a tag changes no key and no
membership. It only selects devices for a later ``group create``/``group add`` by tag, and that
request names the devices themselves and needs the quorum the policy asks for: its approvers
see the concrete list (``provisioning.service.requests``), so a wrongly tagged device is in
front of them before it joins anything.
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from agent.protocol.topics import operator_result_topic
from agent.protocol.wire.messages.operator import TagDevice
from agent.protocol.wire.messages.result import OperatorResult, ResultStatus
from provisioning import audit
from provisioning.registry import Outcome, Registry, tags
from provisioning.service.effects import Effects, Log, Send


def on_tag(
    session: Session, body: TagDevice, *, operator: str, command_id: bytes, now: int
) -> Effects:
    Registry(session).device(body.device_id)  # registry.device.unknown if there is none
    before = tags.device_tags(session, body.device_id)
    after = tags.change_tags(session, body.device_id, add=body.add, remove=body.remove, now=now)
    audit.append(
        session,
        now=now,
        actor=f"operator:{operator}",
        action="device.tag",
        target=body.device_id,
        outcome=Outcome.ACCEPTED,
        details={
            "command_id": command_id.hex(),
            "add": ",".join(body.add),
            "remove": ",".join(body.remove),
            "was": ",".join(before),
            "tags": ",".join(after),
        },
    )
    detail = f"{body.device_id}: tags {', '.join(after) or '(none)'}"
    return [
        Log(logging.INFO, "tags of %s set by %s: %s", (body.device_id, operator, detail)),
        Send(
            operator_result_topic(operator),
            OperatorResult.of(command_id, ResultStatus.DONE, detail),
            operator,
        ),
    ]
