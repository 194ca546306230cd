"""Device tags (provisioning/registry/tags.py, provisioning/service/devicetags.py): set and
taken off, listed and filtered by ``keyfleet devices``, resolved by a group request by tag to
the devices that may join (never a revoked one), an invalid tag refused by its check id with
nothing changed; and a ``group create --all-in TAG`` makes the same Request as the members file
of those devices. On a real SQLite file and a real PostgreSQL (tests/fixtures/postgres.py), with
test_service_core's fleet (software MLS members, a real operator CA)."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select

from agent.protocol import authz
from agent.protocol.errors import ProtocolError
from agent.protocol.wire.messages.operator import Propose, TagDevice
from agent.protocol.wire.messages.result import RequestsResult, ResultStatus
from provisioning import requests_cli
from provisioning.cli import build_parser
from provisioning.db.runtime import QuorumRequestRow
from provisioning.db.schema import Device
from provisioning.listings import list_devices
from provisioning.operator import EXIT_PENDING
from provisioning.registry import DeviceState, Registry, tags
from provisioning.requests_cli import read_members
from provisioning.station import main as keyprovision
from tests.pure.test_requests_cli import LoopClient
from tests.pure.test_service_core import Fleet, make_fleet
from tests.service_members import command_id

pytestmark = pytest.mark.pure

DATABASE_BACKENDS = ("sqlite", "postgresql")
DEVICES = ("dev-1", "dev-2", "dev-3", "dev-4")


@pytest.fixture
def fleet(tmp_path: Path, database_url: str) -> Iterator[Fleet]:
    url = None if database_url.startswith("sqlite") else database_url
    for made in make_fleet(tmp_path, DEVICES, url=url, min_approvals=2, request_ttl=600):
        made.record = True
        yield made


def held(fleet: Fleet) -> dict[str, list[str]]:
    with fleet.sessions() as session:
        return tags.tags_of(session)


def change(
    fleet: Fleet, device: str, *, add: tuple[str, ...] = (), remove: tuple[str, ...] = ()
) -> tuple[str, ...]:
    with fleet.sessions.begin() as session:
        return tags.change_tags(session, device, add=add, remove=remove, now=fleet.now)


def revoke(fleet: Fleet, device: str) -> None:
    with fleet.sessions.begin() as session:
        Registry(session).set_device_state(device, DeviceState.REVOKED, reason="t", now=fleet.now)


def tag_command(fleet: Fleet, operator: str, body: TagDevice) -> tuple[ResultStatus, str]:
    fleet.send(fleet.operators[operator].command(body, fleet.now))
    (result,) = fleet.results[body.command_id]
    return result.status, result.detail


def propose(fleet: Fleet, body: Propose) -> RequestsResult | str:
    """The service's answer to a proposal: the Request, or the refusal's detail."""
    fleet.send(fleet.operators["op-alice"].command(body, fleet.now))
    answers = fleet.request_results.get(body.command_id)
    if answers:
        return answers[-1]
    (result,) = fleet.results[body.command_id]
    assert result.status is ResultStatus.REJECTED
    return result.detail


def request_count(fleet: Fleet) -> int:
    with fleet.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(QuorumRequestRow)) or 0)


# -- the registry ---------------------------------------------------------------------------


def test_tags_are_added_taken_off_listed_and_filtered(fleet: Fleet) -> None:
    assert change(fleet, "dev-1", add=("plant-a", "line.3")) == ("line.3", "plant-a")
    assert change(fleet, "dev-2", add=("plant-a",)) == ("plant-a",)
    # adding a held tag or removing a missing one changes nothing
    assert change(fleet, "dev-2", add=("plant-a",), remove=("nope",)) == ("plant-a",)
    assert change(fleet, "dev-1", remove=("line.3",)) == ("plant-a",)
    assert held(fleet) == {"dev-1": ["plant-a"], "dev-2": ["plant-a"]}
    with fleet.sessions() as session:
        assert tags.tagged(session, "plant-a") == ("dev-1", "dev-2")
        rows = {r["device_id"]: r["tags"] for r in list_devices(session)}
        assert rows == {"dev-1": ["plant-a"], "dev-2": ["plant-a"], "dev-3": [], "dev-4": []}
        only = [r["device_id"] for r in list_devices(session, tag="plant-a")]
        assert only == ["dev-1", "dev-2"]
        assert list_devices(session, tag="line.3") == []


@pytest.mark.parametrize(
    "bad",
    ["Plant-A", "plant a", "-lead", ".hidden", "x" * 33, "", "plänt", "a/b", "a*"],
)
def test_an_invalid_tag_is_refused_and_nothing_changes(fleet: Fleet, bad: str) -> None:
    change(fleet, "dev-1", add=("plant-a",))
    with pytest.raises(ProtocolError) as err:
        change(fleet, "dev-1", add=("line-3", bad), remove=("plant-a",))
    assert err.value.check == "tag.invalid"
    assert held(fleet) == {"dev-1": ["plant-a"]}


def test_more_tags_than_a_device_holds_and_unknown_devices_are_refused(fleet: Fleet) -> None:
    change(fleet, "dev-1", add=tuple(f"t{i}" for i in range(16)))
    with pytest.raises(ProtocolError) as err:
        change(fleet, "dev-1", add=("one-more",))
    assert err.value.check == "tag.limit"
    assert len(held(fleet)["dev-1"]) == 16 and "one-more" not in held(fleet)["dev-1"]
    with pytest.raises(ProtocolError) as err:
        change(fleet, "dev-9", add=("plant-a",))
    assert err.value.check == "registry.device.unknown"
    assert "dev-9" not in held(fleet)


def test_a_tag_resolves_to_the_devices_that_may_join_never_a_revoked_one(fleet: Fleet) -> None:
    for device in DEVICES:
        change(fleet, device, add=("plant-a",))
    revoke(fleet, "dev-3")
    with fleet.sessions.begin() as session:
        Registry(session).set_device_state(
            "dev-4", DeviceState.QUARANTINED, reason="untrusted", now=fleet.now
        )
    with fleet.sessions() as session:
        assert tags.tagged(session, "plant-a") == DEVICES  # the listing shows them all
        assert tags.resolve(session, "plant-a") == ("dev-1", "dev-2")
        for tag in ("plant-b", "nobody"):
            with pytest.raises(ProtocolError) as err:
                tags.resolve(session, tag)
            assert err.value.check == "tag.empty"
        with pytest.raises(ProtocolError) as err:
            tags.resolve(session, "Plant-A")
        assert err.value.check == "tag.invalid"


def test_a_device_s_tags_go_with_it(fleet: Fleet) -> None:
    change(fleet, "dev-1", add=("plant-a",))
    change(fleet, "dev-2", add=("plant-a",))
    with fleet.sessions.begin() as session:  # ON DELETE CASCADE, by the database
        session.execute(delete(Device).where(Device.device_id == "dev-1"))
    assert held(fleet) == {"dev-2": ["plant-a"]}


# -- the operator command -------------------------------------------------------------------


def test_an_operator_tags_a_device_with_a_signed_command_audited(fleet: Fleet) -> None:
    status, detail = tag_command(
        fleet, "op-alice", TagDevice(command_id(), "dev-1", ("plant-a", "line-3"), ())
    )
    assert (status, detail) == (ResultStatus.DONE, "dev-1: tags line-3, plant-a")
    status, detail = tag_command(
        fleet, "op-alice", TagDevice(command_id(), "dev-1", ("ward-2",), ("line-3",))
    )
    assert (status, detail) == (ResultStatus.DONE, "dev-1: tags plant-a, ward-2")
    last = fleet.audit_entries()[-1]
    assert (last.action, last.target, last.outcome.value) == ("device.tag", "dev-1", "accepted")
    assert json.loads(last.details)["was"] == "line-3,plant-a"
    assert held(fleet) == {"dev-1": ["plant-a", "ward-2"]}


def test_a_viewer_or_an_unknown_device_is_refused_and_nothing_changes(fleet: Fleet) -> None:
    status, detail = tag_command(
        fleet, "op-viewer", TagDevice(command_id(), "dev-1", ("plant-a",), ())
    )
    assert status is ResultStatus.REJECTED and detail.startswith("[op.role]")
    status, detail = tag_command(
        fleet, "op-alice", TagDevice(command_id(), "dev-9", ("plant-a",), ())
    )
    assert status is ResultStatus.REJECTED and detail.startswith("[registry.device.unknown]")
    assert held(fleet) == {}


def test_a_command_carrying_an_invalid_tag_is_refused_by_its_check_id(fleet: Fleet) -> None:
    """Attack: a signed command whose tag our own CLI would never build (a forged body)."""
    change(fleet, "dev-1", add=("plant-a",))
    body = TagDevice(command_id(), "dev-1", ("line-3",), ("plant-a",))
    object.__setattr__(body, "add", ("line-3", "Bad Tag"))
    before = len(fleet.audit_entries())
    fleet.send(fleet.operators["op-alice"].command(body, fleet.now))
    entries = fleet.audit_entries()[before:]
    # refused as it is decoded, before its command id is read: audited, nothing answered
    assert [(e.action, e.outcome.value, e.reason.split("]")[0]) for e in entries] == [
        ("operator.command", "refused", "[tag.invalid")
    ]
    assert held(fleet) == {"dev-1": ["plant-a"]}


# -- group requests by tag ------------------------------------------------------------------


def test_create_by_tag_is_the_same_request_as_by_the_members_file(
    fleet: Fleet, tmp_path: Path
) -> None:
    for device in ("dev-1", "dev-2", "dev-3", "dev-4"):
        change(fleet, device, add=("plant-a",))
    revoke(fleet, "dev-4")  # left out of the tag's devices
    members_file = tmp_path / "plant-a.txt"
    members_file.write_text("# active plant-a devices\ndev-1\ndev-2\ndev-3\n")
    by_file = propose(
        fleet, Propose(command_id(), "group.create", read_members([str(members_file)]), "g1")
    )
    by_tag = propose(fleet, Propose(command_id(), "group.create", (), "g1", tag="plant-a"))
    assert isinstance(by_file, RequestsResult) and isinstance(by_tag, RequestsResult)
    from_file = authz.Request.decode(by_file.requests[0].request)
    from_tag = authz.Request.decode(by_tag.requests[0].request)
    # the same Request but for its random id: concrete devices with their DevID key hashes
    assert from_tag.id != from_file.id
    assert replace(from_tag, id=from_file.id) == from_file
    assert [m.device_id for m in from_tag.members] == ["dev-1", "dev-2", "dev-3"]
    last = fleet.audit_entries()[-1]
    details = json.loads(last.details)
    assert (last.action, details["tag"], details["members"]) == (
        "request.propose",
        "plant-a",
        "dev-1,dev-2,dev-3",
    )


def test_add_by_tag_names_the_tagged_devices_not_in_the_group(fleet: Fleet) -> None:
    for device in DEVICES:
        change(fleet, device, add=("plant-a",))
    # g1 with dev-1 and dev-2, by the quorum
    body = Propose(command_id(), "group.create", ("dev-1", "dev-2"), "g1")
    answer = propose(fleet, body)
    assert isinstance(answer, RequestsResult)
    request = answer.requests[0].request
    for operator in ("op-alice", "op-admin"):
        who = fleet.operators[operator]
        approval = authz.sign_approval(request, who.key, who.cert).encode()
        from agent.protocol.wire.messages.operator import Approve

        approve = Approve(command_id(), authz.Request.decode(request).id, approval)
        fleet.send(who.command(approve, fleet.now))
    assert fleet.members("g1") == ["dev-1", "dev-2"]
    answer = propose(fleet, Propose(command_id(), "group.add", (), "g1", tag="plant-a"))
    assert isinstance(answer, RequestsResult)
    added = authz.Request.decode(answer.requests[0].request)
    assert (added.op, added.group) == ("group.add", "g1")
    assert [m.device_id for m in added.members] == ["dev-3", "dev-4"]


def test_an_empty_tag_is_refused_clearly_and_no_request_is_stored(fleet: Fleet) -> None:
    change(fleet, "dev-1", add=("plant-a",))
    revoke(fleet, "dev-1")
    before = request_count(fleet)
    for tag in ("plant-a", "plant-b"):
        detail = propose(fleet, Propose(command_id(), "group.create", (), "g1", tag=tag))
        assert isinstance(detail, str) and detail.startswith("[tag.empty]")
        assert f"no device tagged {tag!r} can join" in detail
    assert request_count(fleet) == before
    last = fleet.audit_entries()[-1]
    assert last.outcome.value == "refused" and "tag.empty" in last.reason


# -- the command line -----------------------------------------------------------------------


def test_group_create_all_in_shows_the_devices_the_tag_stood_for(fleet: Fleet) -> None:
    """The operator's CLI against the service: it signs the request naming the tag's devices
    (not refused as another change than asked) after printing them; the second approver then
    sees those devices."""
    for device in ("dev-1", "dev-2", "dev-4"):
        change(fleet, device, add=("plant-a",))
    revoke(fleet, "dev-4")
    client = LoopClient(fleet, "op-alice")
    out = io.StringIO()
    proposal = requests_cli.create_proposal(client.new_command_id(), "g1", None, "plant-a")
    with contextlib.redirect_stdout(out):
        code = requests_cli.run_direct(client, [proposal], timeout=5, json_lines=False)
    assert code == EXIT_PENDING, out.getvalue()
    lines = out.getvalue().splitlines()
    assert lines[1:3] == [
        "  tag:      plant-a, now these devices:",
        "  members:  2, sorted ids SHA-256 "
        f"{requests_cli.members_digest(['dev-1', 'dev-2'])} (sort -u FILE | sha256sum)",
    ]
    assert lines[3:5] == ["  member:   dev-1", "  member:   dev-2"]
    assert "approved by op-alice (1 of 2)" in out.getvalue()


def test_the_command_line_parses_tags_and_refuses_bad_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = build_parser()
    args = parser.parse_args(["group", "create", "g1", "--all-in", "plant-a"])
    assert (args.group, args.all_in, args.members) == ("g1", "plant-a", None)
    args = parser.parse_args(["group", "create", "g1", "--members", "dev-1", "f.txt"])
    assert (args.all_in, args.members) == (None, ["dev-1", "f.txt"])
    args = parser.parse_args(["group", "add", "g1", "--all-in", "plant-a"])
    assert (args.devices, args.all_in) == ([], "plant-a")
    args = parser.parse_args(["propose", "group-create", "g1", "--all-in", "plant-a"])
    assert (args.all_in, args.member) == ("plant-a", None)
    args = parser.parse_args(
        ["device", "tag", "dev-1", "--add", "a", "--add", "b.c", "--remove", "d_e"]
    )
    assert (args.device, args.add, args.remove) == ("dev-1", ["a", "b.c"], ["d_e"])
    args = parser.parse_args(["devices", "--tag", "plant-a", "--db", "sqlite://"])
    assert args.tag == "plant-a"
    for argv in (
        ["group", "create", "g1", "--all-in", "Plant-A"],
        ["device", "tag", "dev-1", "--add", "a b"],
        ["devices", "--tag", "-x", "--db", "sqlite://"],
        # one or the other
        ["group", "create", "g1", "--all-in", "a", "--members", "dev-1"],
        ["group", "create", "g1"],
    ):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(argv)
        assert exit_.value.code == 2
    assert "[tag.invalid]" in capsys.readouterr().err
    # keyprovision --tag: refused before the station opens anything
    station = ["--port", "/nonexistent", "--fleet", "https://x", "--cert", "c", "--key", "k"]
    with pytest.raises(SystemExit) as exit_:
        keyprovision([*station, "--ca", "a", "--tag", "plant-a", "--tag", "Line 3"])
    assert exit_.value.code == 2 and "[tag.invalid]" in capsys.readouterr().err
