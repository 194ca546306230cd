"""Software fleet members for the delivery-service tests: real MLS groups
(agent.protocol.mls.group.Group)
with software DevID and leaf keys, speaking the real wire protocol (signed envelopes) the way
FLOWS.md says a keyagent does. Used by tests/pure/test_service_core.py (driven in-process) and
tests/broker/test_service_mqtt.py (driven over a real Mosquitto).

Not a fake of the service: these are the *devices* the service talks to, built from the same
protocol code as keyagent; only the keys live in software instead of a TPM.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.orm import Session, sessionmaker

from agent.protocol.errors import ProtocolError
from agent.protocol.mls import codec
from agent.protocol.mls.group import CommitResult, Group, OpenedWelcome
from agent.protocol.mls.messages import Commit, KeyPackage, Update, Welcome
from agent.protocol.mls.tree import RatchetTree
from agent.protocol.mls.treepages import admissions_missing
from agent.protocol.topics import SERVICE_ID, device_report_topic, operator_cmd_topic
from agent.protocol.treefetch import TreeFetches
from agent.protocol.wire.cose import key_id
from agent.protocol.wire.envelope import Signer, VerifiedMessage, encode_message, open_message
from agent.protocol.wire.messages.ack import Ack
from agent.protocol.wire.messages.base import Body
from agent.protocol.wire.messages.group import (
    REFUSAL_CHECKS,
    CommitMessage,
    CommitRefused,
    GroupCreated,
    KeyPackageMessage,
    UpdateProposal,
    WelcomeMessage,
)
from agent.protocol.wire.messages.operator import GroupAdd, GroupCreate, Rekey, Revoke
from agent.protocol.wire.messages.service import (
    CommitAction,
    CommitRequest,
    KeyPackageRequest,
    TreePage,
    UpdateProposalRequest,
    WelcomeDelivery,
)
from provisioning import pki
from provisioning.registry import Registry, run_in_transaction
from tests.device_certs import devid_cert_der

Outgoing = tuple[str, bytes]


def device_ca(now: datetime) -> pki.CertificateAuthority:
    return pki.create_ca("keyfleet test device CA", now=now, valid_for=timedelta(days=2))


def _admission(request: CommitRequest) -> bytes:
    """What a create or add by these members records as its admission: the operators'
    Authorization as it came (an agent wraps it with its policy chain), or, where the fleet
    runs without one, a stand-in naming the request (these members check no Authorization;
    the service keeps and delivers either by its hash all the same)."""
    if request.authz is not None:
        return request.authz
    return b"stand-in authorization of request " + request.command_id.hex().encode()


@dataclass
class SoftDevice:
    """One device: DevID key + certificate, its groups, the key packages it handed out."""

    device_id: str
    devid: ec.EllipticCurvePrivateKey = field(repr=False)
    cert_pem: str
    service_key: ec.EllipticCurvePublicKey = field(repr=False)
    groups: dict[str, Group] = field(default_factory=dict, repr=False)
    pending: dict[tuple[str, int], CommitResult] = field(default_factory=dict, repr=False)
    key_packages: dict[
        bytes, tuple[KeyPackage, ec.EllipticCurvePrivateKey, ec.EllipticCurvePrivateKey]
    ] = field(default_factory=dict, repr=False)
    # Update proposals made for a full rekey, not committed yet (their new leaf keys)
    proposals: list[ec.EllipticCurvePrivateKey] = field(default_factory=list, repr=False)
    seq: int = 0
    silent: bool = False  # receives, never answers (a member that is offline for commits)
    ignore_commit_requests: bool = False  # acks commits, never makes one
    # acks commits, makes none for an epoch below this one (a member passive for a while that
    # answers from then on, whenever the service asks: no race with the test's own steps)
    commits_from_epoch: int = 0
    ignore_proposal_requests: bool = False  # never proposes an Update for a full rekey
    drop_updates: int = 0  # a compromised committer: commits this many fewer Updates than asked
    # a forging founder: names this Authorization in its group.created, not the one its leaf
    # records (``omit_created_authz``: names none)
    created_authz: bytes | None = None
    omit_created_authz: bool = False
    refusals: list[str] = field(default_factory=list)
    # joins of large groups waiting for their tree's pages, and how many pages were taken
    tree_fetches: TreeFetches = field(default_factory=TreeFetches, repr=False)
    tree_pages: int = 0

    @classmethod
    def create(
        cls,
        device_id: str,
        ca: pki.CertificateAuthority,
        service_key: ec.EllipticCurvePublicKey,
        now: datetime,
    ) -> SoftDevice:
        key = pki.generate_key()
        # the DevID certificate enrollment issues (the service checks it at use)
        cert = pki.issue_devid_cert(
            ca,
            key.public_key(),
            device_id=device_id,
            hardware_serial=f"SN-{device_id}",
            now=now,
            valid_for=timedelta(days=1),
        )
        return cls(device_id, key, pki.cert_to_pem(cert).decode(), service_key)

    def register(self, sessions: sessionmaker[Session], now: int) -> None:
        fingerprint = hashlib.sha256(b"ek-" + self.device_id.encode()).hexdigest()

        def work(session: Session) -> None:
            Registry(session).register_device(
                self.device_id,
                ek_cert_fingerprint=fingerprint,
                devid_cert_pem=self.cert_pem,
                now=now,
            )

        run_in_transaction(sessions, work)

    # -- sending -------------------------------------------------------------------------------

    def envelope(self, body: Body, now: int) -> bytes:
        self.seq += 1
        return encode_message(
            body, key=self.devid, sender=self.device_id, to=SERVICE_ID, seq=self.seq, time=now
        )

    def report(self, body: Body, now: int) -> Outgoing:
        return device_report_topic(self.device_id), self.envelope(body, now)

    # -- receiving -------------------------------------------------------------------------------

    def _resolve(self, kid: bytes) -> Signer:
        if kid != key_id(self.service_key):
            raise LookupError("not the service")
        return Signer(SERVICE_ID, self.service_key)

    def receive(self, topic: str, payload: bytes, now: int) -> list[Outgoing]:
        """Handle one service message as a keyagent would; returns the reports to send."""
        try:
            message = open_message(
                payload,
                self._resolve,
                now=now,
                recipients={self.device_id, *self.groups},
                max_age=86_400,
            )
        except ProtocolError as err:
            if err.check != "envelope.recipient":  # other groups' commits: not for us
                self.refusals.append(err.check)
            return []
        try:
            out = self._handle(message, now)
        except ProtocolError as err:
            self.refusals.append(err.check)
            return []
        return [] if self.silent else out

    def _handle(self, message: VerifiedMessage, now: int) -> list[Outgoing]:
        body = message.body
        if isinstance(body, KeyPackageRequest):
            leaf = ec.generate_private_key(ec.SECP256R1())
            init = ec.generate_private_key(ec.SECP256R1())
            kp = KeyPackage.create(
                self.device_id.encode(),
                self.devid,
                leaf.public_key(),
                devid_cert_der(self.device_id, self.devid),
                init_key=init.public_key(),
            )
            self.key_packages[kp.ref()] = (kp, leaf, init)
            return [self.report(KeyPackageMessage(kp.encode(), body.command_id), now)]
        if isinstance(body, CommitRequest):
            if self.ignore_commit_requests or body.epoch < self.commits_from_epoch:
                return []
            return self._commit(body, now)
        if isinstance(body, UpdateProposalRequest):
            if self.ignore_proposal_requests:
                return []
            group = self.groups[body.group_id]
            leaf = ec.generate_private_key(ec.SECP256R1())
            self.proposals.append(leaf)
            update = group.propose_update(self.devid, leaf.public_key())
            proposal = UpdateProposal(body.command_id, body.group_id, body.epoch, update.encode())
            return [self.report(proposal, now)]
        if isinstance(body, CommitMessage):
            return self._process(body, now)
        if isinstance(body, WelcomeDelivery):
            welcome = Welcome.decode(body.welcome)
            for entry in welcome.secrets:
                held = self.key_packages.get(entry.key_package_ref)
                if held is not None:
                    opened = Group.open_welcome(welcome, held[0], held[1], init_key=held[2])
                    if opened.info.tree is None or admissions_missing(
                        opened.info.tree, body.admissions
                    ):
                        # a large group's Welcome: fetch the tree in pages (treefetch), which
                        # carry the Authorizations too
                        request = self.tree_fetches.start(
                            body.group_id,
                            body.epoch,
                            opened,
                            leaf_public=held[0].leaf_key,
                            key_package=held[0],
                            now=now,
                            delivered=body.admissions,
                        )
                        return [self.report(request, now)]
                    return self._joined(
                        body.group_id, opened, held, None, admissions=body.admissions, now=now
                    )
            raise ProtocolError("test.welcome", "no key package of ours")
        if isinstance(body, TreePage):
            fetch, tree, request = self.tree_fetches.page(body, now)
            if request is not None:
                return [self.report(request, now)]
            self.tree_pages += body.pages
            held = self.key_packages[fetch.key_package.ref()]
            return self._joined(
                body.group_id, fetch.opened, held, tree, admissions=fetch.admissions(tree), now=now
            )
        return []

    def _joined(
        self,
        gid: str,
        opened: OpenedWelcome,
        held: tuple[KeyPackage, ec.EllipticCurvePrivateKey, ec.EllipticCurvePrivateKey],
        tree: RatchetTree | None,
        *,
        admissions: tuple[bytes, ...],
        now: int,
    ) -> list[Outgoing]:
        self.groups[gid] = Group.join_opened(
            opened, held[0], held[1], tree=tree, admissions=admissions
        )
        del self.key_packages[held[0].ref()]
        return [self._ack(gid, now)]

    def _commit(self, request: CommitRequest, now: int) -> list[Outgoing]:
        gid = request.group_id
        if request.action is CommitAction.CREATE:
            leaf = ec.generate_private_key(ec.SECP256R1())
            kp = KeyPackage.create(
                self.device_id.encode(),
                self.devid,
                leaf.public_key(),
                devid_cert_der(self.device_id, self.devid),
                init_key=ec.generate_private_key(ec.SECP256R1()).public_key(),
            )
            authz = _admission(request)
            group = Group.create(gid.encode(), kp, leaf, authz=authz)
            self.groups[gid] = group
            public = codec.encode(group.public_group().to_state())
            named = authz if self.created_authz is None else self.created_authz
            if self.omit_created_authz:
                named = None
            created = GroupCreated(gid, public, request.command_id, named)
            return [self.report(created, now)]
        group = self.groups[gid]
        if group.epoch != request.epoch:
            raise ProtocolError("test.epoch", f"asked for epoch {request.epoch}, at {group.epoch}")
        if request.action is CommitAction.UPDATE:
            result = group.commit(
                self.devid,
                updates=[Update.decode(u) for u in request.updates or ()][self.drop_updates :],
                new_leaf_key=ec.generate_private_key(ec.SECP256R1()),
            )
        elif request.action is CommitAction.ADD and request.key_packages is not None:
            result = group.add(
                self.devid,
                [KeyPackage.decode(k) for k in request.key_packages],
                authz=_admission(request),
            )
        elif request.action is CommitAction.ADD:
            assert request.key_package is not None
            result = group.add(
                self.devid, [KeyPackage.decode(request.key_package)], authz=_admission(request)
            )
        else:
            leaf_index = next(i for i, d in group.members() if d.decode() == request.member)
            result = group.remove(self.devid, [leaf_index])
        return self.commit_result(gid, result, request.command_id, now)

    def commit_result(
        self, gid: str, result: CommitResult, command_id: bytes | None, now: int
    ) -> list[Outgoing]:
        epoch = result.group.epoch - 1
        self.pending[(gid, epoch)] = result
        out = [self.report(CommitMessage(gid, epoch, result.commit.encode(), command_id), now)]
        if result.welcome is not None:
            added = tuple(kp.device_id.decode() for kp in result.commit.content.adds)
            out.append(
                self.report(WelcomeMessage(gid, epoch + 1, result.welcome.encode(), added), now)
            )
        return out

    def _process(self, body: CommitMessage, now: int) -> list[Outgoing]:
        gid = body.group_id
        group = self.groups.get(gid)
        if group is None or body.epoch != group.epoch:
            return []  # not ours, or already past it
        own = self.pending.pop((gid, body.epoch), None)
        if own is not None and own.commit.encode() == body.commit:
            self.groups[gid] = own.group
        else:
            commit = Commit.decode(body.commit)
            if self.device_id.encode() in [
                d for i, d in group.members() if i in commit.content.removes
            ]:
                del self.groups[gid]
                return []
            try:
                self.groups[gid] = group.process(commit, proposed_leaf_keys=self.proposals)
            except ProtocolError as exc:
                if exc.check not in REFUSAL_CHECKS:
                    raise
                # as the agent does: report it, stay at the commit's epoch
                digest = hashlib.sha256(body.commit).digest()
                return [self.report(CommitRefused(gid, body.epoch, digest, exc.check), now)]
        self.pending = {k: v for k, v in self.pending.items() if k[0] != gid or k[1] > body.epoch}
        return [self._ack(gid, now)]

    def _ack(self, gid: str, now: int) -> Outgoing:
        group = self.groups[gid]
        return self.report(Ack(gid, group.epoch, group.epoch_authenticator), now)

    def secrets(self) -> list[bytes]:
        """Every group secret this member holds (for the tests that search the service's files
        for them): data keys, epoch authenticators excluded (they are public by design)."""
        found: list[bytes] = []
        for group in self.groups.values():
            found.append(group.data_key())
            state = group.to_state()
            secrets = state["secrets"]
            assert isinstance(secrets, dict)
            found.extend(v for k, v in secrets.items() if k != "epoch_authenticator")
            nodes = state["nodes"]
            assert isinstance(nodes, dict)
            found.extend(nodes.values())
        return found


@dataclass
class SoftOperator:
    """An operator: its key and certificate from the operator CA, signing commands."""

    name: str
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    cert: pki.x509.Certificate
    seq: int = 0

    @classmethod
    def create(
        cls, name: str, role: str, ca: pki.CertificateAuthority, now: datetime
    ) -> SoftOperator:
        key = pki.generate_key()
        cert = pki.issue_client_cert(
            ca, key.public_key(), identity=name, role=role, now=now, valid_for=timedelta(days=1)
        )
        return cls(name, key, cert)

    def command(self, body: Body, now: int, *, seq: int | None = None) -> Outgoing:
        self.seq = self.seq + 1 if seq is None else seq
        payload = encode_message(
            body, key=self.key, sender=self.name, to=SERVICE_ID, seq=self.seq, time=now
        )
        return operator_cmd_topic(self.name), payload


def command_id() -> bytes:
    return os.urandom(16)


def rekey(group_id: str) -> Rekey:
    return Rekey(command_id(), group_id)


def revoke(device_id: str) -> Revoke:
    return Revoke(command_id(), device_id)


def group_create(group_id: str, *members: str) -> GroupCreate:
    return GroupCreate(command_id(), group_id, tuple(members))


def group_add(group_id: str, device_id: str) -> GroupAdd:
    return GroupAdd(command_id(), group_id, device_id)


def utc(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)
