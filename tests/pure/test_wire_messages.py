"""Message bodies: round trips for every family, strict refusal of unknown fields, wrong types and
out-of-bounds values. ``SAMPLES`` (one valid body per type) is shared with the fuzz tests."""

from __future__ import annotations

from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol.errors import ProtocolError
from agent.protocol.lifecycle import KeyKind, KeyRecord, KeyState
from agent.protocol.wire import cbor
from agent.protocol.wire.envelope import encode_message
from agent.protocol.wire.messages.ack import Ack
from agent.protocol.wire.messages.attestation import AttestChallenge, AttestReport
from agent.protocol.wire.messages.base import Body
from agent.protocol.wire.messages.feed import RevocationFeed
from agent.protocol.wire.messages.group import (
    CommitMessage,
    CommitRefused,
    GroupAdmissions,
    GroupCreated,
    KeyPackageMessage,
    TreeRequest,
    UpdateProposal,
    UpdateRequest,
    WelcomeMessage,
)
from agent.protocol.wire.messages.key_state import DeviceDestroyed, KeyStateReport
from agent.protocol.wire.messages.operator import (
    Approve,
    AttestDevice,
    AuditSync,
    GroupAdd,
    GroupCreate,
    GroupPolicy,
    ListRequests,
    Propose,
    Rekey,
    ReleaseAdd,
    Revoke,
    TagDevice,
)
from agent.protocol.wire.messages.registry import BODY_CLASSES, REGISTRY, parse_body
from agent.protocol.wire.messages.release import (
    InstallResult,
    InstallState,
    ReleaseBundleMessage,
    ReleaseInstall,
    RolloutAbort,
    RolloutStart,
)
from agent.protocol.wire.messages.renewal import (
    RenewAnswer,
    RenewChallenge,
    RenewIssued,
    RenewRequest,
)
from agent.protocol.wire.messages.result import (
    MAX_STRAGGLERS,
    AuditCheckpointResult,
    AuditLink,
    OperatorResult,
    RequestInfo,
    RequestsResult,
    RequestState,
    ResultStatus,
)
from agent.protocol.wire.messages.service import (
    AttestRequest,
    CommitAction,
    CommitRequest,
    KeyPackageRequest,
    ReportRequest,
    TreePage,
    UpdateProposalRequest,
    WelcomeDelivery,
)

pytestmark = pytest.mark.pure

CMD = bytes(range(16))
NONCE = bytes(range(100, 132))

DEVID = KeyRecord(
    name="devid",
    kind=KeyKind.DEVID,
    transitions=((KeyState.PRE_ACTIVATION, 100), (KeyState.ACTIVE, 101)),
)
LEAF = KeyRecord(
    name="leaf/g1",
    kind=KeyKind.LEAF,
    transitions=(
        (KeyState.PRE_ACTIVATION, 200),
        (KeyState.ACTIVE, 200),
        (KeyState.DEACTIVATED, 300),
        (KeyState.DESTROYED, 301),
    ),
    group="g1",
)

SAMPLES: list[Body] = [
    AttestChallenge(nonce=NONCE, pcrs=(0, 1, 2, 3, 7)),
    AttestReport(
        nonce=NONCE,
        quote=b"\xff\x54\x43\x47quote",
        signature=b"tpmt-signature",
        pcr_bank="sha256",
        pcrs=(0, 1, 2, 3, 7),
        event_log=b"event-log",
        keys=(DEVID, LEAF),
    ),
    KeyStateReport(keys=(DEVID, LEAF)),
    KeyStateReport(keys=()),
    KeyPackageMessage(key_package=cbor.encode({"leaf": b"pub", "sig": b"s"})),
    CommitMessage(group_id="g1", epoch=4, commit=b"commit-bytes", command_id=CMD),
    CommitMessage(group_id="g1", epoch=0, commit=b"commit-bytes"),
    WelcomeMessage(group_id="g1", epoch=5, welcome=b"welcome", new_members=("dev-2",)),
    Ack(group_id="g1", epoch=5, epoch_authenticator=bytes(range(32)), command_id=CMD),
    CommitRequest(
        command_id=CMD,
        group_id="g1",
        epoch=4,
        action=CommitAction.ADD,
        member="dev-2",
        key_package=b"kp",
    ),
    CommitRequest(
        command_id=CMD, group_id="g1", epoch=4, action=CommitAction.REMOVE, member="dev-3"
    ),
    CommitRequest(
        command_id=CMD,
        group_id="g1",
        epoch=4,
        action=CommitAction.ADD,
        key_packages=(b"kp-2", b"kp-3"),
    ),
    WelcomeMessage(group_id="g1", epoch=5, welcome=b"welcome", new_members=("dev-2", "dev-3")),
    CommitRequest(command_id=CMD, group_id="g1", epoch=4, action=CommitAction.UPDATE),
    CommitRequest(
        command_id=CMD,
        group_id="g1",
        epoch=4,
        action=CommitAction.UPDATE,
        updates=(b"\x83\x01" + bytes(100), b"\x83\x02" + bytes(100)),
    ),
    UpdateProposalRequest(command_id=CMD, group_id="g1", epoch=4),
    UpdateProposal(command_id=CMD, group_id="g1", epoch=4, update=b"\x83\x01" + bytes(100)),
    ReportRequest(command_id=CMD),
    WelcomeDelivery(group_id="g1", epoch=5, welcome=b"welcome"),
    Rekey(command_id=CMD, group_id="g1"),
    Rekey(command_id=CMD, group_id="g1", full=True),
    GroupPolicy(command_id=CMD, group_id="g1", max_age=604_800, max_epochs=100),
    ReleaseAdd(command_id=CMD, manifest=b'{"version": "1.1", "components": []}'),
    Revoke(command_id=CMD, device_id="dev-3", reason="lost"),
    Revoke(command_id=CMD, device_id="dev-3"),
    GroupCreate(command_id=CMD, group_id="g9", members=("dev-1", "dev-2")),
    GroupAdd(command_id=CMD, group_id="g1", device_id="dev-4"),
    AttestDevice(command_id=CMD, device_id="dev-1"),
    OperatorResult(
        command_id=CMD,
        status=ResultStatus.TIMEOUT,
        detail="2 of 3 members acked",
        acked=2,
        pending=1,
        failed=0,
        stragglers=("dev-3",),
        epoch=6,
    ),
    KeyPackageMessage(key_package=b"kp", command_id=CMD),
    GroupCreated(group_id="g1", public_group=b"public-group", command_id=CMD),
    GroupCreated(group_id="g1", public_group=b"public-group", command_id=CMD, authz=b"authz"),
    GroupAdmissions(group_id="g1", admissions=(b"authz-1", b"authz-2")),
    CommitRequest(command_id=CMD, group_id="g1", epoch=0, action=CommitAction.CREATE),
    KeyPackageRequest(command_id=CMD),
    UpdateRequest(group_id="g1", epoch=4, reason="max-epoch-age"),
    TreeRequest(group_id="g1", epoch=5, page=2),
    TreePage(group_id="g1", epoch=5, page=2, pages=3, width=7, start=5, nodes=b"\x82\xf6\xf6"),
    TreePage(
        group_id="g1",
        epoch=5,
        page=0,
        pages=3,
        width=7,
        start=0,
        nodes=b"\x82\xf6\xf6",
        admissions=(b"authz-1", b"authz-2"),
    ),
    CommitRefused(group_id="g1", epoch=4, commit_hash=b"h" * 32, check="mls.path.decrypt"),
    DeviceDestroyed(reason="factory reset"),
    CommitRequest(
        command_id=CMD,
        group_id="g1",
        epoch=4,
        action=CommitAction.ADD,
        member="dev-2",
        key_package=b"kp",
        authz=b"authz",
    ),
    WelcomeDelivery(group_id="g1", epoch=5, welcome=b"welcome"),
    WelcomeDelivery(group_id="g1", epoch=5, welcome=b"welcome", admissions=(b"a1", b"a2")),
    Propose(command_id=CMD, op="group.add", members=("dev-4",), group_id="g1"),
    Propose(command_id=CMD, op="group.add", members=("dev-4", "dev-5"), group_id="g1"),
    Propose(command_id=CMD, op="group.create", members=("dev-1", "dev-2"), group_id="g9"),
    Propose(command_id=CMD, op="group.delete", members=(), group_id="g1"),
    Propose(command_id=CMD, op="group.create", members=(), group_id="g9", tag="plant-a"),
    Propose(command_id=CMD, op="group.add", members=(), group_id="g9", tag="line.3"),
    TagDevice(command_id=CMD, device_id="dev-1", add=("plant-a", "line.3"), remove=("old_x",)),
    TagDevice(command_id=CMD, device_id="dev-1", add=(), remove=("plant-a",)),
    Propose(command_id=CMD, op="device.revoke", members=("dev-3",)),
    Propose(command_id=CMD, op="device.revoke", members=("dev-3",), reason="lost"),
    Propose(command_id=CMD, op="device.replace", members=("dev-3", "dev-9"), reason="rma"),
    Propose(command_id=CMD, op="policy", members=(), policy=b"policy"),
    Propose(command_id=CMD, op="operator.add", members=(), operator="op-carol", cert=b"\x30\x82"),
    Propose(command_id=CMD, op="operator.remove", members=(), operator="op-carol"),
    Propose(command_id=CMD, op="operator.role", members=(), operator="op-carol", role="viewer"),
    Propose(
        command_id=CMD,
        op="trust.rotate",
        members=(),
        cert=b"\x30\x82",
        key_ref="pkcs11:token=keyfleet;object=service-signing-2",
        overlap=86400,
    ),
    Propose(
        command_id=CMD,
        op="trust.rotate",
        members=(),
        cert=b"\x30\x82",
        key_ref="pkcs11:token=keyfleet;object=device-ca-2",
        overlap=0,
        rotate="device-ca",
    ),
    Propose(
        command_id=CMD,
        op="trust.rotate",
        members=(),
        cert=b"\x30\x82",
        overlap=600,
        rotate="broker-ca",
    ),
    Propose(
        command_id=CMD,
        op="trust.rotate",
        members=(),
        cert=b"\x30\x82",
        overlap=600,
        rotate="operator-ca",
    ),
    Approve(command_id=CMD, request_id=bytes(16), approval=b"approval"),
    ListRequests(command_id=CMD),
    ListRequests(command_id=CMD, request_id=bytes(16)),
    RequestsResult(
        command_id=CMD,
        requests=(
            RequestInfo(
                request=b"request",
                state=RequestState.PENDING,
                approvers=("op-alice",),
                required=2,
                detail="",
            ),
        ),
    ),
    RequestsResult(command_id=CMD, requests=()),
    RevocationFeed(seq=3, head=bytes(range(32)), time=1_700_000_000, entries=(b"e2", b"e3")),
    RevocationFeed(seq=3, head=bytes(32), time=1_700_000_000),
    ReleaseBundleMessage(bundle=b"\xd2cose"),
    KeyStateReport(keys=(), feed=7),
    KeyStateReport(keys=(), trust_seq=2),
    KeyStateReport(keys=(), release_seq=3, release_generation=2, release_version="1.1"),
    ReleaseInstall(rollout="ro-1", version="1.1"),
    RolloutStart(command_id=CMD, version="1.1", group_id="g", waves=("1", "50%", "100%")),
    RolloutStart(command_id=CMD, version="1.1", group_id="g", waves=("5%",), rollback=True),
    RolloutAbort(command_id=CMD, rollout="ro-1"),
    KeyStateReport(keys=(), install=InstallResult("ro-1", "1.1", InstallState.DONE)),
    KeyStateReport(
        keys=(),
        install=InstallResult("ro-1", "1.1", InstallState.FAILED, "release.install.failed"),
    ),
    AuditSync(command_id=CMD, after=0),
    AuditSync(command_id=CMD, after=10, count=12),
    AuditCheckpointResult(
        command_id=CMD,
        checkpoint=b"\xd2signed",
        entries=(AuditLink(seq=11, preimage=b"\x89"), AuditLink(seq=12, preimage=b"\x89")),
    ),
    RenewRequest(not_after=1_700_000_000),
    RenewChallenge(nonce=NONCE, pcrs=(0, 1, 2, 3, 7)),
    RenewAnswer(
        nonce=NONCE,
        quote=b"\xffTCG-quote",
        signature=b"\x30sig",
        pcr_bank="sha256",
        pcrs=(0, 1, 2, 3, 7),
        event_log=b"log",
        devid_public=b"\x00\x58public",
        devid_certify=b"\xffTCG-certify",
        devid_certify_signature=b"\x30ak-sig",
        tls_cert=b"\x30\x82tls",
        tls_proof=b"\x30tls-sig",
    ),
    RenewIssued(nonce=NONCE, devid_cert=b"\x30\x82devid", tls_cert=b"\x30\x82tls"),
]


def test_samples_cover_every_registered_type() -> None:
    assert {type(body) for body in SAMPLES} == set(BODY_CLASSES)
    assert set(REGISTRY) == {cls.TYPE for cls in BODY_CLASSES}
    assert len(REGISTRY) == len(BODY_CLASSES)  # no two classes share a type string


def test_attest_request_is_the_attestation_challenge() -> None:
    assert AttestRequest is AttestChallenge


@pytest.mark.parametrize("body", SAMPLES, ids=lambda b: type(b).__name__)
def test_round_trip_through_cbor(body: Body) -> None:
    wire = cbor.encode(body.to_cbor_map())
    again = parse_body(body.TYPE, cbor.decode(wire))
    assert again == body
    assert cbor.encode(again.to_cbor_map()) == wire


@pytest.mark.parametrize("body", SAMPLES, ids=lambda b: type(b).__name__)
def test_unknown_field_is_refused(body: Body) -> None:
    fields = body.to_cbor_map()
    fields["extra"] = 1
    with pytest.raises(ProtocolError) as err:
        type(body).from_cbor_map(fields)
    assert err.value.check == "body.malformed"


@pytest.mark.parametrize("body", SAMPLES, ids=lambda b: type(b).__name__)
def test_missing_required_field_is_refused(body: Body) -> None:
    fields = body.to_cbor_map()
    first = next(iter(fields))
    del fields[first]
    with pytest.raises(ProtocolError) as err:
        type(body).from_cbor_map(fields)
    assert err.value.check in {"body.malformed", "key.record"}


@pytest.mark.parametrize("body", SAMPLES, ids=lambda b: type(b).__name__)
def test_every_field_with_a_wrong_type_is_refused(body: Body) -> None:
    fields = body.to_cbor_map()
    for name, value in fields.items():
        # A value of another CBOR type than the right one (bool for everything but bools).
        wrong: object = True if type(value) is not bool else "yes"
        with pytest.raises(ProtocolError) as err:
            type(body).from_cbor_map({**fields, name: wrong})
        assert err.value.check in {"body.type", "body.malformed"}, name


def test_body_is_not_a_map() -> None:
    for value in ([], b"", "x", 1, None):
        with pytest.raises(ProtocolError) as err:
            Rekey.from_cbor_map(value)
        assert err.value.check == "body.malformed"


@pytest.mark.parametrize(
    ("make", "check"),
    [
        (lambda: Rekey(command_id=b"short", group_id="g1"), "body.bounds"),
        (lambda: Rekey(command_id=CMD, group_id="g/1"), "body.bounds"),
        (lambda: Rekey(command_id=CMD, group_id="+"), "body.bounds"),
        (lambda: Rekey(command_id=CMD, group_id="x" * 65), "body.bounds"),
        (lambda: Rekey(command_id=CMD, group_id="g1", full=1), "body.type"),  # type: ignore[arg-type]
        (lambda: GroupPolicy(CMD, "g1", 367 * 86_400, 0), "body.bounds"),
        (lambda: GroupPolicy(CMD, "g1", 0, -1), "body.bounds"),
        (lambda: AttestChallenge(nonce=bytes(8), pcrs=(0,)), "body.bounds"),
        (lambda: AttestChallenge(nonce=NONCE, pcrs=(1, 0)), "body.bounds"),
        (lambda: AttestChallenge(nonce=NONCE, pcrs=(0, 0)), "body.bounds"),
        (lambda: AttestChallenge(nonce=NONCE, pcrs=(24,)), "body.bounds"),
        (lambda: AttestChallenge(nonce=NONCE, pcrs=()), "body.bounds"),
        (lambda: AttestChallenge(nonce=NONCE, pcrs=(True,)), "body.type"),
        (lambda: Ack(group_id="g1", epoch=-1, epoch_authenticator=bytes(32)), "body.bounds"),
        (lambda: Ack(group_id="g1", epoch=1 << 64, epoch_authenticator=bytes(32)), "body.bounds"),
        (lambda: Ack(group_id="g1", epoch=1, epoch_authenticator=bytes(31)), "body.bounds"),
        (lambda: GroupCreate(command_id=CMD, group_id="g", members=("a", "a")), "body.bounds"),
        (lambda: GroupCreate(command_id=CMD, group_id="g", members=()), "body.bounds"),
        (
            lambda: CommitRequest(
                command_id=CMD, group_id="g", epoch=1, action=CommitAction.ADD, member="d"
            ),
            "body.malformed",
        ),
        (
            lambda: CommitRequest(
                command_id=CMD, group_id="g", epoch=1, action=CommitAction.UPDATE, member="d"
            ),
            "body.malformed",
        ),
        (
            lambda: CommitRequest(
                command_id=CMD, group_id="g", epoch=1, action=CommitAction.ADD, key_packages=()
            ),
            "body.malformed",
        ),
        (
            lambda: CommitRequest(
                command_id=CMD,
                group_id="g",
                epoch=1,
                action=CommitAction.ADD,
                member="d",
                key_packages=(b"k",),
            ),
            "body.malformed",
        ),
        (
            lambda: CommitRequest(
                command_id=CMD,
                group_id="g",
                epoch=1,
                action=CommitAction.REMOVE,
                key_packages=(b"k",),
            ),
            "body.malformed",
        ),
        (
            lambda: CommitRequest(
                command_id=CMD,
                group_id="g",
                epoch=1,
                action=CommitAction.REMOVE,
                member="d",
                key_package=b"k",
            ),
            "body.malformed",
        ),
        (
            lambda: CommitRequest(
                command_id=CMD,
                group_id="g",
                epoch=1,
                action=CommitAction.REMOVE,
                member="d",
                updates=(b"u",),
            ),
            "body.malformed",
        ),
        (
            lambda: CommitRequest(
                command_id=CMD, group_id="g", epoch=1, action=CommitAction.UPDATE, updates=()
            ),
            "body.malformed",
        ),
        (
            lambda: CommitRequest(
                command_id=CMD,
                group_id="g",
                epoch=1,
                action=CommitAction.UPDATE,
                updates=(b"u",) * 1025,
            ),
            "body.bounds",
        ),
        (
            lambda: CommitRequest(
                command_id=CMD,
                group_id="g",
                epoch=1,
                action=CommitAction.UPDATE,
                updates=(bytes(257),),
            ),
            "body.bounds",
        ),
        (lambda: UpdateProposal(command_id=CMD, group_id="g", epoch=1, update=b""), "body.bounds"),
        (
            lambda: UpdateProposal(command_id=CMD, group_id="g", epoch=1, update=bytes(257)),
            "body.bounds",
        ),
        (lambda: KeyStateReport(keys=(DEVID, DEVID)), "body.bounds"),
        (lambda: ReleaseInstall(rollout="ro/1", version="1.1"), "body.bounds"),
        (lambda: ReleaseInstall(rollout="ro-1", version="1 1"), "body.bounds"),
        (lambda: InstallResult("ro-1", "1.1", InstallState.DONE, "x.y"), "body.bounds"),
        (lambda: InstallResult("ro-1", "1.1", InstallState.FAILED), "body.bounds"),
        (
            lambda: RolloutStart(command_id=CMD, version="1.1", group_id="g", waves=("101%",)),
            "body.bounds",
        ),
        (
            lambda: RolloutStart(command_id=CMD, version="1.1", group_id="g", waves=("0",)),
            "body.bounds",
        ),
        (
            lambda: RolloutStart(command_id=CMD, version="1.1", group_id="g", waves=()),
            "body.bounds",
        ),
        (lambda: Propose(command_id=CMD, op="group.rekey", members=()), "body.bounds"),
        (lambda: Propose(command_id=CMD, op="device.replace", members=("d",)), "body.malformed"),
        (
            lambda: Propose(command_id=CMD, op="operator.add", members=(), operator="op-c"),
            "body.malformed",
        ),
        (
            lambda: Propose(
                command_id=CMD, op="operator.remove", members=(), operator="op-c", role="admin"
            ),
            "body.malformed",
        ),
        (
            lambda: Propose(
                command_id=CMD, op="operator.role", members=(), operator="op-c", role="root"
            ),
            "body.bounds",
        ),
        (
            lambda: Propose(
                command_id=CMD, op="group.add", members=("d",), group_id="g", operator="op-c"
            ),
            "body.malformed",
        ),
        (lambda: Propose(command_id=CMD, op="group.add", members=("d",)), "body.malformed"),
        (
            lambda: Propose(command_id=CMD, op="trust.rotate", members=(), cert=b"c", overlap=1),
            "body.type",
        ),
        (
            lambda: Propose(
                command_id=CMD,
                op="trust.rotate",
                members=(),
                cert=b"c",
                key_ref="k",
                overlap=1,
                group_id="g",
            ),
            "body.malformed",
        ),
        (  # the operator CA is offline: its rollover names no key
            lambda: Propose(
                command_id=CMD,
                op="trust.rotate",
                members=(),
                cert=b"c",
                key_ref="k",
                overlap=1,
                rotate="operator-ca",
            ),
            "body.malformed",
        ),
        (
            lambda: Propose(
                command_id=CMD, op="device.revoke", members=("d",), key_ref="k", overlap=1
            ),
            "body.malformed",
        ),
        (
            lambda: Propose(command_id=CMD, op="group.remove", members=("d", "e"), group_id="g"),
            "body.malformed",
        ),
        (
            lambda: Propose(command_id=CMD, op="group.add", members=(), group_id="g"),
            "body.malformed",
        ),
        (
            lambda: Propose(command_id=CMD, op="group.create", members=(), group_id="g"),
            "body.malformed",
        ),
        (
            lambda: Propose(command_id=CMD, op="device.revoke", members=("d",), group_id="g"),
            "body.malformed",
        ),
        (
            lambda: Propose(command_id=CMD, op="policy", members=("d",), policy=b"p"),
            "body.malformed",
        ),
        (lambda: Propose(command_id=CMD, op="policy", members=()), "body.malformed"),
        (
            lambda: Propose(
                command_id=CMD, op="group.add", members=("d",), group_id="g", policy=b"p"
            ),
            "body.malformed",
        ),
        (
            lambda: Propose(CMD, "group.create", (), "g", tag="Plant-A"),
            "tag.invalid",
        ),
        (
            lambda: Propose(CMD, "group.create", ("d",), "g", tag="plant-a"),
            "body.malformed",
        ),
        (lambda: Propose(CMD, "device.revoke", (), tag="plant-a"), "body.malformed"),
        (lambda: Propose(CMD, "group.remove", (), "g", tag="plant-a"), "body.malformed"),
        (lambda: TagDevice(CMD, "dev-1", (), ()), "body.malformed"),
        (lambda: TagDevice(CMD, "dev-1", ("a",), ("a",)), "body.malformed"),
        (lambda: TagDevice(CMD, "dev-1", ("a", "a"), ()), "body.bounds"),
        (lambda: TagDevice(CMD, "dev-1", tuple(f"t{i}" for i in range(17)), ()), "body.bounds"),
        (lambda: TagDevice(CMD, "dev-1", ("a" * 33,), ()), "tag.invalid"),
        (lambda: TagDevice(CMD, "dev-1", (), ("_a",)), "tag.invalid"),
        (lambda: TagDevice(CMD, "dev/1", ("a",), ()), "body.bounds"),
        (lambda: Approve(command_id=CMD, request_id=bytes(15), approval=b"a"), "body.bounds"),
        (lambda: Approve(command_id=CMD, request_id=bytes(16), approval=b""), "body.bounds"),
        (lambda: ListRequests(command_id=CMD, request_id=bytes(17)), "body.bounds"),
        (lambda: AuditSync(command_id=CMD, after=5, count=4), "body.bounds"),
        (lambda: AuditSync(command_id=CMD, after=0, count=0), "body.bounds"),
        (lambda: AuditLink(seq=0, preimage=b"p"), "body.bounds"),
        (
            lambda: OperatorResult(CMD, ResultStatus.DONE, "", 0, 1, 0, ("d1", "d2")),
            "body.bounds",
        ),
        (
            lambda: OperatorResult(
                CMD, ResultStatus.DONE, "", 0, 65, 0, tuple(f"d{i}" for i in range(65))
            ),
            "body.bounds",
        ),
        (lambda: AuditCheckpointResult(command_id=CMD, checkpoint=b"", entries=()), "body.bounds"),
        (lambda: TreeRequest(group_id="g", epoch=1, page=4096), "body.bounds"),
        (lambda: WelcomeDelivery("g", 1, b"w", admissions=(b"a", b"a")), "body.bounds"),
        (lambda: WelcomeDelivery("g", 1, b"w", admissions=(b"",)), "body.bounds"),
        (
            lambda: WelcomeDelivery("g", 1, b"w", admissions=(b"a" * (64 << 10) + b"a",)),
            "body.bounds",
        ),
        (
            lambda: WelcomeDelivery("g", 1, b"w", admissions=tuple(b"%d" % i for i in range(257))),
            "body.bounds",
        ),
        (
            lambda: TreePage(
                "g",
                1,
                0,
                1,
                1,
                0,
                b"x" * (1 << 19),
                tuple(bytes([i]) * (64 << 10) for i in range(9)),
            ),
            "body.bounds",
        ),
        (lambda: GroupCreated("g", b"p", CMD, authz=b""), "body.bounds"),
        (lambda: GroupAdmissions("g", ()), "body.bounds"),
        (lambda: GroupAdmissions("g", (b"a", b"a")), "body.bounds"),
        (
            lambda: GroupAdmissions("g", tuple(bytes([i]) * (64 << 10) for i in range(4))),
            "body.bounds",
        ),
        (
            lambda: TreePage(group_id="g", epoch=1, page=3, pages=3, width=7, start=0, nodes=b"x"),
            "body.bounds",
        ),
        (
            lambda: TreePage(group_id="g", epoch=1, page=0, pages=1, width=7, start=7, nodes=b"x"),
            "body.bounds",
        ),
        (
            lambda: RequestInfo(
                request=b"r", state=RequestState.PENDING, approvers=(), required=0, detail=""
            ),
            "body.bounds",
        ),
        (
            lambda: CommitRequest(
                command_id=CMD, group_id="g", epoch=1, action=CommitAction.UPDATE, authz=b""
            ),
            "body.bounds",
        ),
    ],
)
def test_bounds_and_consistency(make: object, check: str) -> None:
    assert callable(make)
    with pytest.raises(ProtocolError) as err:
        make()
    assert err.value.check == check


def test_unknown_enum_value_is_refused() -> None:
    fields = CommitRequest(
        command_id=CMD, group_id="g1", epoch=1, action=CommitAction.UPDATE
    ).to_cbor_map()
    with pytest.raises(ProtocolError) as err:
        CommitRequest.from_cbor_map({**fields, "action": "merge"})
    assert err.value.check == "body.bounds"


def test_key_report_refuses_an_impossible_history() -> None:
    record = DEVID.to_cbor_map()
    record["transitions"] = [["pre-activation", 1], ["destroyed", 2], ["active", 3]]
    record["state"] = "active"
    with pytest.raises(ProtocolError) as err:
        KeyStateReport.from_cbor_map({"keys": [record]})
    assert err.value.check == "key.record"


def test_key_report_refuses_integer_keys_in_a_record() -> None:
    record: dict[object, object] = dict(DEVID.to_cbor_map())
    record[1] = 0
    with pytest.raises(ProtocolError) as err:
        KeyStateReport.from_cbor_map({"keys": [record]})
    assert err.value.check == "body.type"


def test_group_epoch_only_for_group_messages() -> None:
    with_epoch = {type(b).__name__ for b in SAMPLES if b.group_epoch() is not None}
    assert with_epoch == {
        "CommitMessage",
        "WelcomeMessage",
        "Ack",
        "CommitRequest",
        "WelcomeDelivery",
        "UpdateRequest",
        "CommitRefused",
        "UpdateProposalRequest",
        "UpdateProposal",
    }
    commit = replace(SAMPLES[10])
    assert commit.group_epoch() == ("g1", 4)


def test_a_progress_result_of_a_100k_member_group_fits_its_frame() -> None:
    """Counts plus at most 64 stragglers: the signed result of a 100,000-member rekey with
    half the members pending is as small as a small group's, far under its frame limit."""
    members = [f"device-{i:06}-{'x' * 40}" for i in range(100_000)]
    body = OperatorResult.of(
        CMD,
        ResultStatus.IN_PROGRESS,
        "50000/100000 acked epoch 9",
        acked=members[:50_000],
        pending=members[50_000:],
        epoch=9,
    )
    assert (body.acked, body.pending, body.failed) == (50_000, 50_000, 0)
    assert body.stragglers == tuple(members[50_000 : 50_000 + MAX_STRAGGLERS])
    key = ec.generate_private_key(ec.SECP256R1())
    frame = encode_message(body, key=key, sender="keyfleet-service", to="op-a", seq=1, time=1)
    assert len(frame) < 8 * 1024 < OperatorResult.MAX_MESSAGE_SIZE
    assert parse_body(body.TYPE, cbor.decode(cbor.encode(body.to_cbor_map()))) == body
