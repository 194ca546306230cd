"""The operator CLI's own logic without a broker: how results are shown (terminal bar, plain
lines, JSON lines), which exit code each outcome gives, and that a timeout names the stragglers.
The client is a FakeOperatorClient that replays scripted service results; the real client runs
against a real broker in tests/broker/test_service_mqtt.py."""

from __future__ import annotations

import io
import json
from collections import deque

import pytest

from agent.protocol.wire.messages.operator import AttestDevice, Rekey
from agent.protocol.wire.messages.result import OperatorResult, ResultStatus
from provisioning import cli
from provisioning.operator import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    Command,
    OperatorClient,
    Progress,
    run_commands,
)

pytestmark = pytest.mark.pure

CID = bytes(range(16))


def result(
    status: ResultStatus,
    acked: tuple[str, ...] = (),
    pending: tuple[str, ...] = (),
    detail: str = "d",
    epoch: int | None = 7,
) -> OperatorResult:
    return OperatorResult.of(CID, status, detail, acked=acked, pending=pending, epoch=epoch)


class FakeOperatorClient(OperatorClient):
    """Replays scripted results; records what was sent."""

    def __init__(self, script: list[OperatorResult]) -> None:
        self.script = deque(script)
        self.sent: list[Command] = []

    def send(self, body: Command) -> None:
        self.sent.append(body)

    def next_result(self, timeout: float) -> OperatorResult | None:
        return self.script.popleft() if self.script else None


def run(
    script: list[OperatorResult], *, json_lines: bool = False, tty: bool = False
) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    client = FakeOperatorClient(script)
    code = run_commands(
        client,
        [("rekey g1", Rekey(CID, "g1"))],
        timeout=0.5,
        progress=Progress(out, json_lines=json_lines, tty=tty),
        err=err,
    )
    assert [b.command_id for b in client.sent] == [CID]
    return code, out.getvalue(), err.getvalue()


def test_acks_arriving_then_done_exit_0() -> None:
    code, out, err = run(
        [
            result(ResultStatus.ACCEPTED, epoch=None),
            result(ResultStatus.IN_PROGRESS, ("dev-1",), ("dev-2", "dev-3")),
            result(ResultStatus.IN_PROGRESS, ("dev-1", "dev-2"), ("dev-3",)),
            result(ResultStatus.DONE, ("dev-1", "dev-2", "dev-3")),
        ]
    )
    assert code == EXIT_OK and err == ""
    lines = out.splitlines()
    assert len(lines) == 4
    assert lines[1] == (
        "rekey g1: in-progress epoch 7: d | 1 acked, 2 pending | stragglers: dev-2 dev-3"
    )
    assert lines[-1] == "rekey g1: done epoch 7: d | 3 acked, 0 pending"


def test_terminal_gets_a_bar_redrawn_in_place() -> None:
    code, out, _ = run(
        [
            result(ResultStatus.IN_PROGRESS, ("dev-1",), ("dev-2", "dev-3", "dev-4")),
            result(ResultStatus.IN_PROGRESS, ("dev-1", "dev-2"), ("dev-3", "dev-4")),
            result(ResultStatus.DONE, ("dev-1", "dev-2", "dev-3", "dev-4")),
        ],
        tty=True,
    )
    assert code == EXIT_OK
    first, rest = out.split("\n", 1)
    assert first.count("\r") == 2
    assert "[######..................] 1/4 acked epoch 7" in first
    assert "[############............] 2/4 acked epoch 7" in first
    assert rest.startswith("rekey g1: done")


def test_service_timeout_exit_3_names_stragglers() -> None:
    code, out, err = run(
        [
            result(ResultStatus.IN_PROGRESS, ("dev-1",), ("dev-2",)),
            result(ResultStatus.TIMEOUT, ("dev-1",), ("dev-2",), detail="no ack from dev-2"),
        ]
    )
    assert code == EXIT_TIMEOUT
    assert err == "keyfleet: rekey g1: timed out; stragglers: dev-2\n"
    assert out.splitlines()[-1].startswith("rekey g1: timeout")


def test_no_final_answer_is_a_timeout_naming_the_last_pending() -> None:
    code, _, err = run([result(ResultStatus.IN_PROGRESS, ("dev-1",), ("dev-9",))])
    assert code == EXIT_TIMEOUT
    assert "waiting for dev-9" in err
    code, _, err = run([])
    assert code == EXIT_TIMEOUT and "the service (no final answer)" in err


@pytest.mark.parametrize("status", [ResultStatus.REJECTED, ResultStatus.FAILED])
def test_refused_or_failed_exit_1(status: ResultStatus) -> None:
    code, _, err = run([result(status, detail="[op.role] needs admin")])
    assert code == EXIT_FAILED
    assert err == f"keyfleet: rekey g1: {status.value}: [op.role] needs admin\n"


def test_json_lines() -> None:
    code, out, _ = run(
        [
            result(ResultStatus.ACCEPTED, epoch=None),
            result(ResultStatus.DONE, ("dev-1", "dev-2")),
        ],
        json_lines=True,
    )
    assert code == EXIT_OK
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows[-1] == {
        "command": "rekey g1",
        "command_id": CID.hex(),
        "status": "done",
        "detail": "d",
        "acked": 2,
        "pending": 0,
        "failed": 0,
        "stragglers": [],
        "epoch": 7,
    }
    assert rows[0]["status"] == "accepted" and rows[0]["epoch"] is None


class ScriptedAttestClient(FakeOperatorClient):
    """A FakeOperatorClient that answers every AttestDevice it is sent with ``done``, or
    ``failed`` for the devices in ``untrusted``: what the service says, without a service."""

    def __init__(self, untrusted: set[str]) -> None:
        super().__init__([])
        self.untrusted = untrusted
        self._ids = iter(bytes([n]) * 16 for n in range(1, 100))

    def close(self) -> None:
        pass

    def new_command_id(self) -> bytes:
        return next(self._ids)

    def send(self, body: Command) -> None:
        super().send(body)
        assert isinstance(body, AttestDevice)
        bad = body.device_id in self.untrusted
        status = ResultStatus.FAILED if bad else ResultStatus.DONE
        verdict = f"{body.device_id} {'untrusted' if bad else 'trusted'}"
        self.script.append(OperatorResult.of(body.command_id, status, verdict))


def test_attest_several_devices_in_one_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clients: list[ScriptedAttestClient] = []

    def connect(settings: object) -> ScriptedAttestClient:
        clients.append(ScriptedAttestClient({"dev-2"}))
        return clients[-1]

    monkeypatch.setattr(cli, "OperatorClient", connect)
    connection = ["--broker", "b:1", "--ca", "c", "--cert", "o", "--key", "k"]
    argv = ["attest", "dev-1", "dev-2", "dev-1", "dev-3", *connection, "--service-cert", "s"]
    code = cli.main([*argv, "--json"])
    assert code == EXIT_FAILED  # the worst verdict wins
    (client,) = clients  # one connection for all of them
    sent = [body.device_id for body in client.sent if isinstance(body, AttestDevice)]
    assert sent == ["dev-1", "dev-2", "dev-3"]  # each device once, challenged together
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {row["command"]: row["status"] for row in rows} == {
        "attest dev-1": "done",
        "attest dev-2": "failed",
        "attest dev-3": "done",
    }
