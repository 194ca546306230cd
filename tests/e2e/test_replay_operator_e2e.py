"""One operator, many CLI runs at once, against two real ``keyfleet serve`` instances sharing a
database and one Mosquitto (shared subscriptions) and a virtual fleet: every command is taken.

An operator's envelope seqs are its CLI's clock in microseconds, one process per command, so its
commands reach the service out of order whenever several run at once. The service's replay
window for operators spans the commands' freshness (``store.operator_replay_window``), not 32 seq
values: nothing here may be refused as ``replay.seq-old``.

The first test makes the reordering certain instead of likely: operator clients (the CLI's own
``OperatorClient``, each with its own broker connection, as separate processes would have) whose
clocks run 2 s apart send in the order of *decreasing* seq, each after the previous command is
done. With the window of 32 every command after the first was refused. The second runs six real
CLI processes of the one operator at once.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy.orm import Session

from agent.protocol.wire.messages.operator import Rekey
from agent.protocol.wire.messages.result import OperatorResult, ResultStatus
from provisioning import audit
from provisioning.db.schema import Group
from provisioning.operator import FINAL, OperatorClient
from provisioning.service import store
from tests.fixtures.deployment import DeployFactory
from tests.service_deployment import Deployment

pytestmark = pytest.mark.e2e

DEVICES = 6
INSTANCES = ("a", "b")
OPERATOR = "op-batch"


@pytest.fixture
def deployment(deploy: DeployFactory, database_url: str) -> Deployment:
    return deploy(
        "replay",
        db_url=database_url,
        instances=INSTANCES,
        operator=(OPERATOR, "operator"),
        groups="ack_timeout_seconds = 60\n",
        service="commit_request_timeout_seconds = 3\nsession_expiry_seconds = 0\n",
        device_prefix="dev-r",
        devices=DEVICES,
    )


def epoch(deployment: Deployment, group_id: str) -> int:
    def read(s: Session) -> int:
        group = s.get(Group, group_id)
        assert group is not None
        return group.epoch

    return deployment.read(read)


def operator_seqs(deployment: Deployment) -> tuple[int | None, int]:
    """The operator's highest seq and how many seqs its stored guard remembers."""

    def read(s: Session) -> tuple[int | None, int]:
        guard = store.load_guard(s, OPERATOR, window=store.operator_replay_window(300))
        return guard.highest_seq(OPERATOR), guard.remembered(OPERATOR)

    return deployment.read(read)


def seq_refusals(deployment: Deployment) -> list[str]:
    """The refusals the audit chain recorded for a seq (``replay.seq-old``,
    ``replay.seq-reused``): what one operator's concurrent CLIs used to run into."""
    return deployment.read(
        lambda s: [
            f"{e.actor} {e.action}: {e.reason}"
            for e in audit.entries(s)
            if e.outcome.value == "refused" and "replay.seq-" in e.reason
        ]
    )


def device_ids(deployment: Deployment, first: int, count: int) -> list[str]:
    assert deployment.fleet is not None
    return [d.device_id for d in deployment.fleet.devices[first : first + count]]


def final_result(client: OperatorClient, command_id: bytes, timeout: float) -> OperatorResult:
    deadline = time.monotonic() + timeout
    while True:
        result = client.next_result(max(0.0, deadline - time.monotonic()))
        assert result is not None, "no final result in time"
        if result.command_id == command_id and result.status in FINAL:
            return result


def settled(deployment: Deployment, group_id: str, members: list[str]) -> None:
    """The joiners' first self-updates are done (docs/treekem.md "Joining"): the epochs counted
    from here are the operator's rekeys only."""
    assert deployment.fleet is not None
    deployment.fleet.wait_settled(group_id, timeout=60, members=members)


def test_commands_arriving_in_decreasing_seq_order_are_all_taken(deployment: Deployment) -> None:
    members = device_ids(deployment, 0, 3)
    created = deployment.cli("group", "create", "g1", "--members", *members)
    assert created.returncode == 0, created.stdout + created.stderr
    settled(deployment, "g1", members)
    before = epoch(deployment, "g1")
    settings = deployment.operator
    assert settings is not None
    highest, _ = operator_seqs(deployment)
    assert highest is not None
    seqs = []
    for i in range(6):
        lag = 2.0 * i  # this "process" read its clock 2 s before the previous one

        def clock(lag: float = lag) -> float:
            return time.time() - lag

        with OperatorClient(settings, clock=clock) as client:
            body = Rekey(client.new_command_id(), "g1")
            client.send(body)
            result = final_result(client, body.command_id, timeout=120)
        assert result.status is ResultStatus.DONE, (i, result.status, result.detail)
        seq, remembered = operator_seqs(deployment)
        assert seq is not None
        seqs.append(seq)
        # Each command's seq is about 2 s = 2,000,000 below the first one's, which stays the
        # highest: the window of 32 refused every one of these as replay.seq-old.
        # the group create's two (its proposal and its approval: dual control) and each rekey's
        assert remembered == 3 + i
    assert seqs[0] > highest and len(set(seqs)) == 1
    assert epoch(deployment, "g1") == before + 6
    assert seq_refusals(deployment) == []


def test_six_cli_processes_of_one_operator_at_once_are_all_taken(deployment: Deployment) -> None:
    groups = {f"g{i}": device_ids(deployment, 2 * i, 2) for i in range(3)}
    creates = [
        deployment.cli_async("group", "create", g, "--members", *m) for g, m in groups.items()
    ]
    for process in creates:
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0, out + err
    for group_id, members in groups.items():
        settled(deployment, group_id, members)
    created = {g: epoch(deployment, g) for g in groups}
    rekeys = [deployment.cli_async("rekey", "--group", g) for g in [*groups, *groups]]
    for process in rekeys:
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0, out + err
        assert "done epoch" in out.splitlines()[-1], out
    for group_id in groups:
        assert epoch(deployment, group_id) == created[group_id] + 2  # both rekeys
    _, remembered = operator_seqs(deployment)
    # every command's seq, none forgotten: each create is a proposal and its approval
    assert remembered == 3 * 2 + 6
    assert seq_refusals(deployment) == []
