"""A group of 5,000 members rekeys to ``done`` (not timed): the operator's result counts every
member's ack, names no straggler and stays far under its frame limit.

Real delivery service on a real SQLite file; 5,000 software members built in one step and
seeded into the store (tests/big_groups.py). The commit is real MLS, made by the member the
service asks; ``PROCESSING`` members spread over the tree process it with MLS and must agree on
the new epoch; the others ack with the authenticator those reached, each ack a signed envelope
from its own DevID key, checked by the service like any other. Marked ``long``: about 40 s on a
loaded 2-core machine, most of it making 5,000 members and the service taking 5,000 acks."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from agent.protocol.wire.messages.result import OperatorResult, ResultStatus
from provisioning.db.schema import Ack as AckRow
from tests.big_groups import Clocks, big_fleet, build, command
from tests.service_members import rekey

pytestmark = [pytest.mark.pure, pytest.mark.long]

N = 5_000
PROCESSING = 8


def test_a_group_of_5000_members_rekeys_to_done(tmp_path: Path) -> None:
    for fleet in big_fleet(tmp_path):
        group = build(fleet, "g-big", N, processing=PROCESSING)
        assert fleet.epoch("g-big") == 1 and len(fleet.members("g-big")) == N
        clocks = Clocks()

        cid = command(fleet, "op-alice", rekey("g-big"), clocks)

        final = fleet.final(cid)  # ended without a tick: no timeout involved
        assert final.status is ResultStatus.DONE, final.detail
        assert final.epoch == 2 and fleet.epoch("g-big") == 2
        assert (final.acked, final.pending, final.failed, final.stragglers) == (N, 0, 0, ())
        assert final.detail == "every member agrees on epoch 2"
        # every member's own ack counted, once
        with fleet.sessions() as s:
            acks = s.scalar(
                select(func.count()).where(AckRow.group_id == "g-big", AckRow.epoch == 2)
            )
        assert acks == N
        assert fleet.service.rejections.total == 0
        # the members that processed the commit with MLS agree (with the committer)
        assert len({d.groups["g-big"].epoch_authenticator for d in group.processing}) == 1
        assert all(d.groups["g-big"].epoch == 2 for d in group.processing)
        assert not any(d.refusals for d in fleet.devices.values())
        # the results stay far under their frame limit
        assert 0 < clocks.largest_result < OperatorResult.MAX_MESSAGE_SIZE // 64
        statuses = [r.status for r in fleet.results[cid]]
        assert statuses[0] is ResultStatus.ACCEPTED and statuses.count(ResultStatus.DONE) == 1
