"""Dual control on the operator's side: ``keyfleet propose``, ``keyfleet approve``,
``keyfleet requests``, and the direct membership commands (``group create``, ``group add``,
``revoke``) as a proposal and its first approval in one go (docs/operations.md, "Dual control").

An operator signs only bytes its own tool decoded and showed. ``propose`` asks the service to
build the Request (the service adds the members' DevID key hashes from its registry), checks
that the answer is the change it asked for (op, group, members, proposer, a window that is
open), prints it and sends the first approval. ``approve ID`` fetches the request, prints it
decoded, asks (unless ``--yes``) and sends the approval. The approval that completes the quorum
starts the change; its progress is then shown as a direct command's is. The direct commands do
the same without a prompt; where the quorum policy needs more than one operator they print the
request id and exit 4 (``EXIT_PENDING``).

Approvals are made with ``agent.protocol.authz.sign_approval``: the operator's key (the same file
as its TLS and command key) over the label and SHA-256 of the exact request bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tomllib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from agent.protocol import authz, trust
from agent.protocol.errors import ConfigError, ProtocolError
from agent.protocol.releaseproof import read_subject as release_subject
from agent.protocol.wire.messages.operator import (
    ROTATE_BROKER_CA,
    ROTATE_DEVICE_CA,
    ROTATE_OPERATOR_CA,
    ROTATE_TARGETS,
    Approve,
    ListRequests,
    Propose,
    check_tag,
)
from agent.protocol.wire.messages.result import (
    OperatorResult,
    RequestInfo,
    RequestsResult,
    RequestState,
)
from provisioning.operator import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PENDING,
    EXIT_TIMEOUT,
    OperatorClient,
    Progress,
    follow,
)
from provisioning.service import operatorops, trustroll

# How long one request/answer exchange with the service may take.
EXCHANGE_TIMEOUT = 30.0


def members_digest(device_ids: Sequence[str]) -> str:
    """SHA-256 of the sorted device ids, one a line: what ``sort -u FILE | sha256sum`` prints
    for a members file, so an approver can check a large request against the list it was
    given without reading a thousand lines."""
    text = "".join(f"{d}\n" for d in sorted(set(device_ids)))
    return hashlib.sha256(text.encode()).hexdigest()


def read_members(values: Sequence[str]) -> tuple[str, ...]:
    """Device ids from ``--members``/``--member``: each value is a device id, or the path of
    an existing file holding one device id a line (blank lines and ``#`` comments skipped).
    Each device once, in the order given."""
    out: list[str] = []
    for value in values:
        path = Path(value)
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                device_id = line.split("#", 1)[0].strip()
                if device_id:
                    out.append(device_id)
        else:
            out.append(value)
    if not out:
        raise ConfigError("no members: the members file is empty")
    return tuple(dict.fromkeys(out))


def create_proposal(
    command_id: bytes, group: str, members: Sequence[str] | None, tag: str | None
) -> tuple[str, Propose]:
    """``group create G --members ...`` or ``--all-in TAG`` (the service names the tagged
    devices in the request)."""
    if tag is not None:
        return f"create {group}", Propose(command_id, authz.OP_GROUP_CREATE, (), group, tag=tag)
    assert members is not None
    body = Propose(command_id, authz.OP_GROUP_CREATE, read_members(members), group)
    return f"create {group}", body


def add_proposal(
    command_id: bytes, group: str, devices: Sequence[str], tag: str | None
) -> tuple[str, Propose]:
    """``group add G DEVICE...`` (several: one request, one commit) or ``--all-in TAG`` (the
    tagged devices not in the group yet)."""
    if tag is not None:
        if devices:
            raise ConfigError("group add: name devices or --all-in TAG, not both")
        label = f"add tag {tag} to {group}"
        return label, Propose(command_id, authz.OP_GROUP_ADD, (), group, tag=tag)
    if not devices:
        raise ConfigError("group add: name devices (or files of device ids) or --all-in TAG")
    listed = read_members(devices)
    label = f"add {listed[0]} to {group}" if len(listed) == 1 else f"add {group}"
    return label, Propose(command_id, authz.OP_GROUP_ADD, listed, group)


def tag_argument(value: str) -> str:
    """argparse type of ``--all-in``/``--add``/``--remove``: a tag (``tag.invalid`` otherwise,
    before anything is sent)."""
    try:
        check_tag(value)
    except ProtocolError as err:
        raise argparse.ArgumentTypeError(f"[{err.check}] {err.reason}") from None
    return value


def add_tag_option(
    parser: argparse.ArgumentParser | argparse._MutuallyExclusiveGroup, what: str
) -> None:
    parser.add_argument(
        "--all-in",
        type=tag_argument,
        metavar="TAG",
        help=f"{what}; the request names those devices (approvers approve them, not the tag)",
    )


def members_line(request: authz.Request) -> str:
    listed = members_digest([m.device_id for m in request.members])
    return (
        f"  members:  {len(request.members)}, sorted ids SHA-256 {listed} "
        "(sort -u FILE | sha256sum)"
    )


def describe(request: authz.Request) -> list[str]:
    """The request as a person reads it before signing."""
    when = datetime.fromtimestamp(request.exp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [
        f"request {request.id.hex()}",
        f"  op:       {request.op}",
    ]
    if request.group is not None:
        lines.append(f"  group:    {request.group}")
    if len(request.members) > 1:
        lines.append(members_line(request))
    for member in request.members:
        lines.append(f"  member:   {member.device_id} (DevID key SHA-256 {member.key.hex()})")
    if request.policy is not None:
        policy = authz.QuorumPolicy.decode(request.policy)
        lines.append(f"  policy:   {json.dumps(policy_json(policy), sort_keys=True)}")
    if request.subject is not None and request.op in authz.OPERATOR_OPS:
        lines.append(operatorops.describe_subject(request.subject))
    elif request.op == authz.OP_DEVICE_REPLACE:
        old, new = (m.device_id for m in request.members)
        groups = ", ".join(authz.replaced_groups(request.subject)) or "(none)"
        lines.append(f"  replace:  {old} by {new}; {new} joins {groups}; {old} is revoked")
    elif request.op == authz.OP_GROUP_DELETE:
        lines.append(
            f"  delete:   every member destroys {request.group}'s keys; the id is never used again"
        )
    elif request.subject is not None and request.op == authz.OP_TRUST_ROTATE:
        lines += describe_trust(request.subject)
    elif request.subject is not None:
        version, digest = release_subject(request.subject)
        lines.append(f"  release:  {version} (manifest SHA-256 {digest.hex()})")
    lines += [f"  proposer: {request.by}", f"  expires:  {when}"]
    return lines


def describe_trust(subject: bytes) -> list[str]:
    """The trust bundle a ``trust.rotate`` request names, as an approver reads it: each key's
    SHA-256 (of its SubjectPublicKeyInfo: what ``openssl pkey -pubin -outform DER | sha256sum``
    prints for the certificate's key) and until when it is accepted."""
    bundle = trust.read_subject(subject)
    lines = [f"  trust bundle: {bundle.seq}"]
    for key in bundle.service:
        if key.until is None:
            until = "no end (the service signs with it from then on)"
        else:
            stamp = datetime.fromtimestamp(key.until, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
            until = f"until {stamp}"
        lines.append(f"  service key: SHA-256 {key.kid.hex()}, {until}")
    for what, cas, current in (
        ("device CA", bundle.device_ca, "the service issues device certificates from it"),
        ("broker CA", bundle.broker_ca, "the broker's certificate is to chain to it"),
        ("operator CA", bundle.operator_ca, "new operator certificates come from it"),
    ):
        for ca in cas or ():
            if ca.until is None:
                until = f"no end ({current})"
            else:
                stamp = datetime.fromtimestamp(ca.until, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
                until = f"until {stamp}"
            name = ca.certificate.subject.rfc4514_string()
            lines.append(f"  {what}: {name}, certificate SHA-256 {ca.fingerprint.hex()}, {until}")
    return lines


def policy_json(policy: authz.QuorumPolicy) -> dict[str, object]:
    return {
        "serial": policy.serial,
        "default": dict(policy.default),
        "groups": {g: dict(ops) for g, ops in policy.groups.items()},
        "auto": {"remove": sorted(policy.auto_remove), "readd": sorted(policy.auto_readd)},
    }


def load_policy_file(path: Path) -> authz.QuorumPolicy:
    """A quorum policy from a TOML file: ``serial``, ``[default]`` (op or "*" = k),
    ``[groups.NAME]`` tables, ``[auto] remove = [...]``, ``readd = [...]``."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    unknown = set(data) - {"serial", "default", "groups", "auto"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}")
    auto = data.get("auto", {})
    if not isinstance(auto, dict) or set(auto) - {"remove", "readd"}:
        raise ConfigError(f"{path}: [auto] holds remove and readd lists only")
    try:
        return authz.QuorumPolicy(
            serial=data.get("serial"),  # type: ignore[arg-type]  # checked by the constructor
            default=data.get("default", {}),
            groups=data.get("groups", {}),
            auto_remove=frozenset(auto.get("remove", ())),
            auto_readd=frozenset(auto.get("readd", ())),
        )
    except (ProtocolError, TypeError) as exc:
        raise ConfigError(f"{path}: not a quorum policy: {exc}") from None


def check_proposed(request: authz.Request, asked: Propose, operator: str, now: int) -> None:
    """The service's Request is the change ``asked`` for, proposed by us, and open now."""
    members = tuple(m.device_id for m in request.members)
    # a replacement's subject is the groups the service found the old device in (shown before
    # signing); a release's or an operator's is what was asked for
    subject_asked = (
        asked.release is not None
        or asked.operator is not None
        or asked.op in {authz.OP_DEVICE_REPLACE, authz.OP_TRUST_ROTATE}
    )
    if (
        request.op != asked.op
        or request.group != asked.group_id
        # by tag: the devices the service resolved it to (shown before anyone approves)
        or (members != asked.members if asked.tag is None else not members)
        or request.policy != asked.policy
        or (request.subject is not None) != subject_asked
        or (
            request.subject is not None
            and asked.release is not None
            and release_subject(request.subject)[0] != asked.release
        )
        or (
            request.subject is not None
            and asked.operator is not None
            and not operatorops.subject_matches(request.subject, asked)
        )
        or (
            request.subject is not None
            and asked.op == authz.OP_TRUST_ROTATE
            and not trust_subject_matches(request, asked)
        )
        or request.by != operator
        or not request.nbf <= now + 60  # a little clock skew
        or request.exp < now
    ):
        raise ProtocolError(
            "quorum.mismatch", "the service's request is not the change proposed; not signed"
        )


def trust_subject_matches(request: authz.Request, asked: Propose) -> bool:
    """A ``trust.rotate``'s bundle makes the certificate's key the one without an end and keeps
    every other key at least ``overlap`` seconds past the request's window."""
    assert request.subject is not None and asked.cert is not None and asked.overlap is not None
    if asked.rotate in ROTATE_TARGETS:
        return _ca_matches(request, asked)
    try:
        bundle = trust.read_subject(request.subject)
        spki = trust.key_der(trustroll.public_key_of(asked.cert))
    except ProtocolError:
        return False
    ends = [k.until for k in bundle.service if k.until is not None]
    return bundle.current.key == spki and all(e >= request.exp + asked.overlap for e in ends)


def _ca_matches(request: authz.Request, asked: Propose) -> bool:
    """A device, broker or operator CA rollover's bundle makes the asked CA the one of its section
    without an end, and keeps every other CA of it at least ``overlap`` seconds past the
    request's window (the service checks the rest)."""
    assert request.subject is not None and asked.cert is not None and asked.overlap is not None
    try:
        bundle = trust.read_subject(request.subject)
    except ProtocolError:
        return False
    cas = {
        ROTATE_DEVICE_CA: bundle.device_ca,
        ROTATE_BROKER_CA: bundle.broker_ca,
        ROTATE_OPERATOR_CA: bundle.operator_ca,
    }.get(asked.rotate or "")
    current = [c for c in cas or () if c.until is None]
    if [c.cert for c in current] != [asked.cert]:
        return False
    ends = [c.until for c in cas or () if c.until is not None]
    return all(e >= request.exp + asked.overlap for e in ends)


class RequestSession:
    """Proposals and approvals over one operator client."""

    def __init__(
        self,
        client: OperatorClient,
        *,
        out: TextIO | None = None,
        err: TextIO | None = None,
        json_lines: bool = False,
    ) -> None:
        self.client = client
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.json = json_lines

    def _reply(self, body: Propose | Approve | ListRequests, label: str) -> RequestsResult | None:
        reply = self.client.exchange(body, EXCHANGE_TIMEOUT)
        if reply is None:
            print(f"keyfleet: {label}: no answer from the service", file=self.err)
            return None
        if isinstance(reply, OperatorResult):
            Progress(self.out, json_lines=self.json).show(label, reply)
            if not self.json:
                print(f"keyfleet: {label}: {reply.status.value}: {reply.detail}", file=self.err)
            return None
        return reply if isinstance(reply, RequestsResult) else None

    def propose(self, body: Propose, label: str) -> authz.Request | None:
        """Ask for the Request of ``body``; check it is the change asked for."""
        reply = self._reply(body, label)
        if reply is None:
            return None
        (info,) = reply.requests
        request = authz.Request.decode(info.request)
        check_proposed(request, body, self.client.identity.name, self.client.now())
        return request

    def fetch(self, request_id: bytes, label: str) -> RequestInfo | None:
        body = ListRequests(self.client.new_command_id(), request_id)
        reply = self._reply(body, label)
        if reply is None:
            return None
        (info,) = reply.requests
        if authz.Request.decode(info.request).id != request_id:
            raise ProtocolError("quorum.mismatch", "the service answered with another request")
        return info

    def approve(self, request: bytes, label: str) -> tuple[RequestInfo, bytes] | None:
        """Sign and send the approval of ``request``; the service's answer and the command id
        under which a change it starts is reported."""
        identity = self.client.identity
        if identity.cert is None:  # pragma: no cover - OperatorIdentity.load sets it
            raise ConfigError("the operator certificate is needed to approve")
        approval = authz.sign_approval(request, identity.key, identity.cert)
        body = Approve(
            self.client.new_command_id(), authz.Request.decode(request).id, approval.encode()
        )
        reply = self._reply(body, label)
        if reply is None:
            return None
        (info,) = reply.requests
        return info, body.command_id

    def outcome(
        self, info: RequestInfo, command_id: bytes, label: str, *, timeout: float, direct: bool
    ) -> int:
        """What an approval led to: the change followed to its end, still pending, refused."""
        request = authz.Request.decode(info.request)
        if info.state is RequestState.EXECUTED:
            if request.op == authz.OP_POLICY:
                self.note(label, info, f"adopted: {info.detail}")
                return EXIT_OK
            if request.op in authz.SUBJECT_OPS:
                self.note(label, info, f"done: {info.detail}")
                return EXIT_OK
            progress = Progress(self.out, json_lines=self.json)
            return follow(
                self.client, {command_id: label}, timeout=timeout, progress=progress, err=self.err
            )
        if info.state is RequestState.APPROVED and request.op == authz.OP_DEVICE_REENROLL:
            # nothing runs now: the TPM may enroll once (docs/operations.md, "Revocation")
            self.note(label, info, f"approved: {info.detail}")
            return EXIT_OK
        if info.state is RequestState.PENDING:
            missing = info.required - len(info.approvers)
            self.note(
                label,
                info,
                f"approved by {', '.join(info.approvers)} ({len(info.approvers)} of "
                f"{info.required}); needs {missing} more: keyfleet approve {request.id.hex()}",
            )
            return EXIT_PENDING if direct else EXIT_OK
        self.note(label, info, f"{info.state.value}: {info.detail}")
        return EXIT_FAILED

    def note(self, label: str, info: RequestInfo, text: str) -> None:
        request = authz.Request.decode(info.request)
        if self.json:
            line = {"command": label, "request": request_json(info), "detail": text}
            print(json.dumps(line, sort_keys=True), file=self.out)
        else:
            print(f"{label}: request {request.id.hex()}: {text}", file=self.out)
        self.out.flush()


def request_json(info: RequestInfo) -> dict[str, object]:
    request = authz.Request.decode(info.request)
    return {
        "request_id": request.id.hex(),
        "op": request.op,
        "group": request.group,
        "members": [m.device_id for m in request.members],
        "member_keys": [m.key.hex() for m in request.members],
        "policy": None
        if request.policy is None
        else policy_json(authz.QuorumPolicy.decode(request.policy)),
        "release": release_subject(request.subject)[0]
        if request.subject is not None and request.op in authz.SUBJECT_OPS - authz.OPERATOR_OPS
        else None,
        "groups": list(authz.replaced_groups(request.subject))
        if request.op == authz.OP_DEVICE_REPLACE
        else None,
        "operator": operatorops.subject_json(request.subject)
        if request.subject is not None and request.op in authz.OPERATOR_OPS
        else None,
        "proposer": request.by,
        "not_before": request.nbf,
        "expires": request.exp,
        "state": info.state.value,
        "approvers": list(info.approvers),
        "required": info.required,
        "detail": info.detail,
    }


# -- commands -----------------------------------------------------------------------------------


def proposal(args: argparse.Namespace, command_id: bytes) -> tuple[str, Propose]:
    kind = args.propose_command
    if kind == "group-create":
        label, body = create_proposal(command_id, args.group, args.member, args.all_in)
        return f"propose {label}", body
    if kind == "group-add":
        label, body = add_proposal(command_id, args.group, args.device, args.all_in)
        if body.tag is None:  # each device named, as a proposal always showed them
            label = f"add {' '.join(body.members)} to {args.group}"
        return f"propose {label}", body
    if kind == "group-remove":
        return f"propose remove {args.device} from {args.group}", Propose(
            command_id, authz.OP_GROUP_REMOVE, (args.device,), args.group
        )
    if kind == "group-delete":
        return f"propose delete {args.group}", delete_proposal(command_id, args.group)
    if kind == "revoke":
        devices = read_members(args.device)
        return f"propose revoke {' '.join(devices)}", Propose(
            command_id, authz.OP_DEVICE_REVOKE, devices, reason=args.reason
        )
    if kind == "replace":
        return replace_proposal(command_id, args.old, args.new, args.reason, label="propose ")
    if kind == "reenroll":
        return f"propose reenroll {args.device}", Propose(
            command_id, authz.OP_DEVICE_REENROLL, (args.device,)
        )
    policy = load_policy_file(Path(args.file))
    return f"propose policy serial {policy.serial}", Propose(
        command_id, authz.OP_POLICY, (), None, policy.encode()
    )


def delete_proposal(command_id: bytes, group: str) -> Propose:
    """``group delete GROUP`` / ``propose group-delete GROUP``: every member destroys the
    group's keys once the quorum approved; the id is never used again."""
    return Propose(command_id, authz.OP_GROUP_DELETE, (), group)


def replace_proposal(
    command_id: bytes, old: str, new: str, reason: str | None, *, label: str = ""
) -> tuple[str, Propose]:
    """``device replace OLD NEW`` / ``propose replace OLD NEW``: ``replace.same`` when they are
    one device (the service refuses that too)."""
    if old == new:
        raise ProtocolError("replace.same", f"{old!r} cannot replace itself")
    body = Propose(command_id, authz.OP_DEVICE_REPLACE, (old, new), reason=reason)
    return f"{label}replace {old} by {new}", body


def run_propose(client: OperatorClient, args: argparse.Namespace) -> int:
    label, body = proposal(args, client.new_command_id())
    return propose_and_approve(client, body, label, json_lines=args.json, timeout=args.timeout)


def propose_and_approve(
    client: OperatorClient, body: Propose, label: str, *, json_lines: bool, timeout: float
) -> int:
    """Send a proposal, show the request the service made of it, approve it as the proposer
    and follow it to its outcome (``keyfleet request ...``, ``release approve|revoke``)."""
    session = RequestSession(client, json_lines=json_lines)
    request = session.propose(body, label)
    if request is None:
        return EXIT_FAILED
    if not json_lines:
        print("\n".join(describe(request)), file=session.out)
    approved = session.approve(request.encode(), label)
    if approved is None:
        return EXIT_FAILED
    info, command_id = approved
    return session.outcome(info, command_id, label, timeout=timeout, direct=False)


def confirm(question: str) -> bool:
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def run_approve(client: OperatorClient, args: argparse.Namespace) -> int:
    try:
        request_id = bytes.fromhex(args.request_id)
    except ValueError:
        raise ConfigError(f"{args.request_id!r} is not a request id (32 hex digits)") from None
    if len(request_id) != authz.REQUEST_ID_SIZE:
        raise ConfigError(f"{args.request_id!r} is not a request id (32 hex digits)")
    session = RequestSession(client, json_lines=args.json)
    label = f"approve {args.request_id}"
    info = session.fetch(request_id, label)
    if info is None:
        return EXIT_FAILED
    request = authz.Request.decode(info.request)
    approvers = f": {', '.join(info.approvers)}" if info.approvers else ""
    lines = [
        *describe(request),
        f"  state:    {info.state.value} ({len(info.approvers)} of {info.required} approvals"
        f"{approvers})",
    ]
    print("\n".join(lines), file=sys.stderr if args.json else session.out)
    if info.state is not RequestState.PENDING:
        print(f"keyfleet: {label}: the request is {info.state.value}", file=session.err)
        return EXIT_FAILED
    if not args.yes and not confirm("Approve this request?"):
        print(f"keyfleet: {label}: not approved", file=session.err)
        return EXIT_FAILED
    approved = session.approve(info.request, label)
    if approved is None:
        return EXIT_FAILED
    info, command_id = approved
    return session.outcome(info, command_id, label, timeout=args.timeout, direct=False)


def run_requests(client: OperatorClient, args: argparse.Namespace) -> int:
    body = ListRequests(client.new_command_id())
    reply = client.exchange(body, EXCHANGE_TIMEOUT)
    if reply is None:
        print("keyfleet: requests: no answer from the service", file=sys.stderr)
        return EXIT_TIMEOUT
    if isinstance(reply, OperatorResult):
        print(f"keyfleet: requests: {reply.status.value}: {reply.detail}", file=sys.stderr)
        return EXIT_FAILED
    if not isinstance(reply, RequestsResult):
        print("keyfleet: requests: the service answered with another message", file=sys.stderr)
        return EXIT_FAILED
    rows = [request_json(info) for info in reply.requests]
    if args.json:
        print(json.dumps(rows, sort_keys=True))
        return EXIT_OK
    if not rows:
        print("no pending requests")
        return EXIT_OK
    for row in rows:
        expires = datetime.fromtimestamp(int(str(row["expires"])), UTC).strftime(
            "%Y-%m-%d %H:%M UTC"
        )
        approvers = [str(a) for a in row["approvers"]]  # type: ignore[attr-defined]
        members = [str(m) for m in row["members"]]  # type: ignore[attr-defined]
        target = " ".join(
            ([str(row["group"])] if row["group"] else [])
            + members
            + ([f"release {row['release']}"] if row["release"] else [])
        )
        print(
            f"{row['request_id']}  {row['op']:<13} {target:<30} by {row['proposer']:<12} "
            f"{len(approvers)}/{row['required']} approvals"
            + (f" ({', '.join(approvers)})" if approvers else "")
            + f"  expires {expires}"
        )
    return EXIT_OK


def run_direct(
    client: OperatorClient,
    proposals: Sequence[tuple[str, Propose]],
    *,
    timeout: float,
    json_lines: bool,
) -> int:
    """``group create``/``group add``/``revoke``: propose and approve each change; follow the
    ones the approval started (all together); the others wait for more approvals."""
    session = RequestSession(client, json_lines=json_lines)
    codes: list[int] = []
    started: dict[bytes, str] = {}
    for label, body in proposals:
        request = session.propose(body, label)
        if request is not None and not json_lines and body.tag is not None:
            print(f"{label}: request {request.id.hex()}", file=session.out)
            print(f"  tag:      {body.tag}, now these devices:", file=session.out)
            print(members_line(request), file=session.out)
            for member in request.members:
                print(f"  member:   {member.device_id}", file=session.out)
        elif request is not None and len(request.members) > 1 and not json_lines:
            print(f"{label}: request {request.id.hex()}", file=session.out)
            print(members_line(request), file=session.out)
        approved = None if request is None else session.approve(request.encode(), label)
        if approved is None:
            codes.append(EXIT_FAILED)
            continue
        info, command_id = approved
        if info.state is RequestState.EXECUTED:
            started[command_id] = label
        else:
            codes.append(session.outcome(info, command_id, label, timeout=timeout, direct=True))
    if started:
        progress = Progress(session.out, json_lines=json_lines)
        codes.append(follow(client, started, timeout=timeout, progress=progress, err=session.err))
    return max(codes, default=EXIT_OK)


def add_request_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    add_operator_options: Callable[[argparse.ArgumentParser], None],
    handler: Callable[[argparse.Namespace], int],
) -> None:
    """``propose``, ``approve`` and ``requests``; ``handler`` runs them with a client."""
    propose = commands.add_parser(
        "propose", help="propose a membership change or a quorum policy (dual control)"
    )
    kinds = propose.add_subparsers(dest="propose_command", required=True)
    create = kinds.add_parser("group-create", help="create GROUP with its members")
    create.add_argument("group")
    founders = create.add_mutually_exclusive_group(required=True)
    founders.add_argument(
        "--member",
        action="extend",
        nargs="+",
        metavar="DEVICE|FILE",
        help="founders: device ids, or files with one device id a line",
    )
    add_tag_option(founders, "the founders: every device tagged TAG that may join, now")
    add = kinds.add_parser(
        "group-add",
        help="add DEVICEs to GROUP (several: one commit; files: one id a line) or --all-in TAG",
    )
    add.add_argument("group")
    add.add_argument("device", nargs="*", metavar="DEVICE|FILE")
    add_tag_option(add, "the devices tagged TAG that may join and are not in GROUP, now")
    remove = kinds.add_parser("group-remove", help="remove DEVICE from GROUP")
    remove.add_argument("group")
    remove.add_argument("device")
    delete = kinds.add_parser(
        "group-delete", help="delete GROUP: every member destroys its keys (admins)"
    )
    delete.add_argument("group")
    revoke = kinds.add_parser("revoke", help="revoke DEVICEs (admins; several: one request)")
    revoke.add_argument("device", nargs="+", metavar="DEVICE|FILE")
    revoke.add_argument("--reason", help="recorded with the revocation")
    reenroll = kinds.add_parser(
        "reenroll", help="let revoked DEVICE's TPM enroll once more (admins)"
    )
    reenroll.add_argument("device")
    replace = kinds.add_parser(
        "replace", help="NEW takes OLD's place in its groups, OLD is revoked (admins; RMA)"
    )
    replace.add_argument("old", metavar="OLD")
    replace.add_argument("new", metavar="NEW")
    replace.add_argument("--reason", help="recorded with OLD's revocation")
    policy = kinds.add_parser("policy", help="a new quorum policy from a TOML FILE (admins)")
    policy.add_argument("file", metavar="FILE")
    for parser in (create, add, remove, delete, revoke, reenroll, replace, policy):
        add_operator_options(parser)
        parser.set_defaults(handler=handler, request_command="propose")

    approve = commands.add_parser("approve", help="show a request and approve it")
    approve.add_argument("request_id", metavar="ID")
    approve.add_argument("--yes", action="store_true", help="approve without asking")
    add_operator_options(approve)
    approve.set_defaults(handler=handler, request_command="approve")

    listing = commands.add_parser("requests", help="list the pending requests")
    add_operator_options(listing)
    listing.set_defaults(handler=handler, request_command="requests")


def run_request_command(client: OperatorClient, args: argparse.Namespace) -> int:
    if args.request_command == "propose":
        return run_propose(client, args)
    if args.request_command == "approve":
        return run_approve(client, args)
    return run_requests(client, args)
