"""The dual-control CLI (provisioning/requests_cli.py) against the real sans-I/O service: a
``LoopClient`` hands each signed command to test_service_core's fleet (real SQLite file, software
MLS members, a real operator CA) and returns the service's verified results in the order they
were sent, so what the CLI shows, signs and exits with is checked end to end without a broker
(tests/broker/test_quorum_mqtt.py runs the same over Mosquitto with the CLI as a subprocess)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.protocol import authz
from agent.protocol.errors import ConfigError, ProtocolError
from agent.protocol.wire.messages.key_state import KeyStateReport
from agent.protocol.wire.messages.operator import Propose
from agent.protocol.wire.messages.result import OperatorResult, RequestsResult
from provisioning import cli, requests_cli
from provisioning.operator import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PENDING,
    Command,
    OperatorClient,
    OperatorIdentity,
    Reply,
)
from provisioning.registry import Registry
from tests.pure.test_service_core import Fleet, make_fleet

pytestmark = pytest.mark.pure


class LoopClient(OperatorClient):
    """An operator's client whose broker is the test's fleet loop (a named test fake)."""

    def __init__(self, fleet: Fleet, name: str) -> None:
        operator = fleet.operators[name]
        self.fleet = fleet
        self.operator = operator
        self.identity = OperatorIdentity(
            name, operator.key, fleet.service._env.key.public_key(), operator.cert
        )
        self._rng = os.urandom
        self._clock = lambda: float(fleet.now)
        self._backlog: list[Reply] = []
        self.queue: deque[Reply] = deque()
        self.sent: list[Command] = []

    def send(self, body: Command) -> None:
        self.sent.append(body)
        start = len(self.fleet.to_operators)
        self.fleet.send(self.operator.command(body, self.fleet.now))
        for to, reply in self.fleet.to_operators[start:]:
            if to == self.identity.name:
                assert isinstance(reply, OperatorResult | RequestsResult)
                self.queue.append(reply)

    def next_result(self, timeout: float) -> Reply | None:
        if self._backlog:
            return self._backlog.pop(0)
        return self.queue.popleft() if self.queue else None


def fleet_with(tmp_path: Path, k: int) -> Iterator[Fleet]:
    yield from make_fleet(tmp_path, ("dev-1", "dev-2", "dev-3"), min_approvals=k)


@pytest.fixture
def dual(tmp_path: Path) -> Iterator[Fleet]:
    yield from fleet_with(tmp_path, 2)


@pytest.fixture
def single(tmp_path: Path) -> Iterator[Fleet]:
    yield from fleet_with(tmp_path, 1)


def direct(
    fleet: Fleet, operator: str, op: str, *members: str, group: str | None
) -> tuple[int, str]:
    client = LoopClient(fleet, operator)
    out = io.StringIO()
    body = Propose(client.new_command_id(), op, members, group)
    label = f"{op} {group or ''}".strip()
    with contextlib.redirect_stdout(out):
        code = requests_cli.run_direct(client, [(label, body)], timeout=5, json_lines=False)
    return code, out.getvalue()


def approve_cli(
    fleet: Fleet, operator: str, request_id: str, *, yes: bool = True, answer: str = ""
) -> tuple[int, str, str]:
    client = LoopClient(fleet, operator)
    args = argparse.Namespace(request_id=request_id, yes=yes, json=False, timeout=5)
    out, err = io.StringIO(), io.StringIO()
    stdin = io.StringIO(answer)
    with (
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        pytest.MonkeyPatch.context() as patch,
    ):
        patch.setattr("sys.stdin", stdin)
        code = requests_cli.run_approve(client, args)
    return code, out.getvalue(), err.getvalue()


def test_a_direct_command_runs_at_once_where_one_operator_decides(single: Fleet) -> None:
    code, out = direct(single, "op-alice", "group.create", "dev-1", "dev-2", group="g1")
    assert code == EXIT_OK, out
    lines = out.splitlines()
    assert lines[0] == "group.create g1: request 00000000000000000000000000000001"
    assert lines[1].startswith("  members:  2, sorted ids SHA-256 ")
    assert lines[1].split()[5] == requests_cli.members_digest(["dev-2", "dev-1"])
    assert lines[2].startswith("group.create g1: accepted")
    assert lines[-1].startswith("group.create g1: done epoch 1")
    assert single.members("g1") == ["dev-1", "dev-2"]


def test_a_direct_command_waits_for_a_second_operator_who_approves_after_seeing_it(
    dual: Fleet,
) -> None:
    code, out = direct(dual, "op-alice", "group.create", "dev-1", "dev-2", group="g1")
    assert code == EXIT_PENDING, out
    assert "approved by op-alice (1 of 2); needs 1 more: keyfleet approve " in out
    request_id = out.rsplit("keyfleet approve ", 1)[1].split()[0]
    with dual.sessions() as s:
        assert "g1" not in {g.group_id for g in Registry(s).groups()}

    # Asked, the operator says no: nothing is signed.
    code, shown, err = approve_cli(dual, "op-admin", request_id, yes=False, answer="n\n")
    assert code == EXIT_FAILED and "not approved" in err
    assert "op:       group.create" in shown and "member:   dev-1 (DevID key SHA-256" in shown
    assert "state:    pending (1 of 2 approvals: op-alice)" in shown

    code, shown, err = approve_cli(dual, "op-admin", request_id, yes=False, answer="y\n")
    assert code == EXIT_OK, shown + err
    assert shown.splitlines()[-1].startswith(f"approve {request_id}: done epoch 1")
    assert dual.members("g1") == ["dev-1", "dev-2"]

    # Done: approving again says so and signs nothing.
    code, _, err = approve_cli(dual, "op-alice", request_id)
    assert code == EXIT_FAILED and "the request is executed" in err


def test_a_refused_proposal_shows_the_service_reason(dual: Fleet) -> None:
    code, out = direct(dual, "op-alice", "device.revoke", "dev-1", group=None)
    assert code == EXIT_FAILED
    assert "rejected: [op.role]" in out


def test_the_cli_signs_nothing_the_service_changed() -> None:
    asked = Propose(bytes(16), "group.add", ("dev-3",), "g1")
    member = authz.Member("dev-4", bytes(32))
    request = authz.Request(bytes(16), "group.add", "g1", (member,), None, 100, 200, "op-alice")
    with pytest.raises(ProtocolError) as err:
        requests_cli.check_proposed(request, asked, "op-alice", 150)
    assert err.value.check == "quorum.mismatch"
    right = authz.Request(
        bytes(16),
        "group.add",
        "g1",
        (authz.Member("dev-3", bytes(32)),),
        None,
        100,
        200,
        "op-alice",
    )
    requests_cli.check_proposed(right, asked, "op-alice", 150)
    for who, now in (("op-bob", 150), ("op-alice", 201)):
        with pytest.raises(ProtocolError):
            requests_cli.check_proposed(right, asked, who, now)


def test_a_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "quorum.toml"
    path.write_text(
        'serial = 3\n[default]\n"*" = 2\n[groups.lab]\n"group.add" = 1\n'
        '[auto]\nremove = ["*"]\nreadd = []\n'
    )
    policy = requests_cli.load_policy_file(path)
    assert policy.serial == 3 and policy.required("group.add", "lab") == 1
    assert policy.required("group.add", "prod") == 2 and policy.allows_auto_remove("x")
    path.write_text('serial = 3\n[default]\n"group.add" = 1\n')  # no "*": refused
    with pytest.raises(ConfigError):
        requests_cli.load_policy_file(path)
    path.write_text('serial = 3\nextra = 1\n[default]\n"*" = 1\n')
    with pytest.raises(ConfigError, match="unknown keys"):
        requests_cli.load_policy_file(path)


def test_requests_lists_what_waits_for_people_and_as_json(dual: Fleet) -> None:
    code, out = direct(dual, "op-alice", "group.add", "dev-3", group="g9")
    assert code == EXIT_FAILED  # no group g9: refused at the proposal, nothing pending
    code, out = direct(dual, "op-alice", "group.create", "dev-1", "dev-2", group="g1")
    assert code == EXIT_PENDING
    request_id = out.rsplit("keyfleet approve ", 1)[1].split()[0]
    for as_json in (False, True):
        client = LoopClient(dual, "op-viewer")
        shown = io.StringIO()
        with contextlib.redirect_stdout(shown):
            code = requests_cli.run_requests(client, argparse.Namespace(json=as_json))
        assert code == EXIT_OK
        if as_json:
            (row,) = json.loads(shown.getvalue())
            assert row["request_id"] == request_id and row["members"] == ["dev-1", "dev-2"]
            assert row["approvers"] == ["op-alice"] and row["required"] == 2
            assert row["state"] == "pending" and len(row["member_keys"][0]) == 64
        else:
            (line,) = shown.getvalue().splitlines()
            assert line.startswith(f"{request_id}  group.create  g1 dev-1 dev-2")
            assert "by op-alice" in line and "1/2 approvals (op-alice)" in line


def test_propose_reenroll_names_the_revoked_device_and_no_group() -> None:
    args = argparse.Namespace(propose_command="reenroll", device="dev-1")
    label, body = requests_cli.proposal(args, bytes(16))
    assert label == "propose reenroll dev-1"
    assert (body.op, body.members, body.group_id) == ("device.reenroll", ("dev-1",), None)


class FeedReportingClient(LoopClient):
    """A loop client whose fleet's members report the revocation feed at ``seq`` once the
    service has nothing more to say (software members do not follow the feed themselves)."""

    def __init__(self, fleet: Fleet, name: str, seq: int) -> None:
        super().__init__(fleet, name)
        self.seq = seq
        self.reported = False

    def next_result(self, timeout: float) -> Reply | None:
        result = super().next_result(timeout)
        if result is None and not self.reported:
            self.reported = True
            start = len(self.fleet.to_operators)
            for device in self.fleet.devices.values():
                report = KeyStateReport(keys=(), feed=self.seq)
                self.fleet.send(device.report(report, self.fleet.now))
            for to, reply in self.fleet.to_operators[start:]:
                if to == self.identity.name:
                    assert isinstance(reply, OperatorResult | RequestsResult)
                    self.queue.append(reply)
            result = super().next_result(timeout)
        return result


def test_group_delete_proposes_the_deletion_and_follows_the_members(single: Fleet) -> None:
    code, out = direct(single, "op-admin", "group.create", "dev-1", "dev-2", group="g1")
    assert code == EXIT_OK, out
    client = FeedReportingClient(single, "op-admin", seq=1)
    args = argparse.Namespace(command="group", group_command="delete", group="g1")
    proposals = cli._direct_proposals(args, client)
    assert [(label, body.op, body.members, body.group_id) for label, body in proposals] == [
        ("delete g1", "group.delete", (), "g1")
    ]
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        code = requests_cli.run_direct(client, proposals, timeout=5, json_lines=False)
    lines = shown.getvalue().splitlines()
    assert code == EXIT_OK, lines
    assert lines[0].startswith("delete g1: accepted") and "feed entry 1" in lines[0]
    assert lines[-1].startswith("delete g1: done")
    assert "every member (2) destroyed the group's keys (feed entry 1)" in lines[-1]
    with single.sessions() as s:
        assert Registry(s).group("g1").deleted_seq == 1


def test_approving_a_deletion_shows_what_it_destroys(dual: Fleet) -> None:
    code, out = direct(dual, "op-alice", "group.create", "dev-1", "dev-2", group="g1")
    request_id = out.rsplit("keyfleet approve ", 1)[1].split()[0]
    assert approve_cli(dual, "op-admin", request_id)[0] == EXIT_OK
    code, out = direct(dual, "op-admin", "group.delete", group="g1")
    assert code == EXIT_PENDING, out
    request_id = out.rsplit("keyfleet approve ", 1)[1].split()[0]
    code, shown, err = approve_cli(dual, "op-admin", request_id, yes=False, answer="n\n")
    assert code == EXIT_FAILED and "not approved" in err
    assert "op:       group.delete" in shown and "group:    g1" in shown
    assert "delete:   every member destroys g1's keys; the id is never used again" in shown
