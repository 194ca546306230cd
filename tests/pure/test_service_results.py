"""What the operator is told about an operation: a result the service cannot build (too large
for its frame, or refused by the body's own checks) ends the operation ``failed`` with the
reason (``ds.result.build``), audited, instead of being dropped and leaving the operation to
time out. Real service, real SQLite file, real software MLS members (tests/pure/
test_service_core.py); the unbuildable result is a fault injected into ``build_result``."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.protocol.errors import ProtocolError
from agent.protocol.wire.messages.result import ResultStatus
from provisioning.service import operations
from tests.pure.test_service_core import create_g1, make_fleet
from tests.service_members import rekey

pytestmark = pytest.mark.pure


@pytest.mark.parametrize("unbuildable", [ResultStatus.IN_PROGRESS, ResultStatus.DONE])
def test_a_result_that_cannot_be_built_fails_the_operation_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unbuildable: ResultStatus
) -> None:
    real = operations.build_result

    def fault_injected(
        operation: operations.Operation, status: ResultStatus, detail: str, **kw: object
    ) -> operations.OperatorResult:
        if status is unbuildable and kw.get("acked"):
            raise ProtocolError("body.bounds", "acked must hold 0..4096 items")
        return real(operation, status, detail, **kw)  # type: ignore[arg-type]

    for fleet in make_fleet(tmp_path):
        create_g1(fleet)
        monkeypatch.setattr(operations, "build_result", fault_injected)
        if unbuildable is ResultStatus.IN_PROGRESS:
            fleet.devices["dev-1"].silent = True  # its ack stays pending: an in-progress view
        cid = fleet.command("op-alice", rekey("g1"))

        final = fleet.final(cid)  # no tick: ended without waiting for a timeout
        assert final.status is ResultStatus.FAILED
        assert final.detail.startswith(
            f"[ds.result.build] the {unbuildable.value} result could not be built: [body.bounds]"
        )
        assert [r.status for r in fleet.results[cid]].count(ResultStatus.FAILED) == 1
        ends = [
            e
            for e in fleet.audit_entries()
            if e.action == "op.rekey.result" and e.details_dict().get("command_id") == cid.hex()
        ]
        assert len(ends) == 1
        assert ends[0].reason.startswith("failed: [ds.result.build]")
        # Ended once: a later tick neither times it out nor tells the operator again.
        fleet.tick(60)
        assert fleet.final(cid) == final
