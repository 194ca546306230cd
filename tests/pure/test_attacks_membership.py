"""Members decide who joins: the attacks of the trust model played against device cores (pure,
software keys; the same attacks over swtpm, Mosquitto and a real service are in
tests/e2e/test_attacks_membership_e2e.py).

The rogue here holds everything the service host holds: the service's signing key (it signs
commands devices accept as the service's) and the device CA key (it mints DevID certificates for
devices that do not exist). It does not hold a quorum of operator keys. Each attack is refused
by the device with a check id, counted, and changes nothing; the attacker's keys open nothing
the members send.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.core import AgentCore, Outcome
from agent.protocol import authz as az
from agent.protocol.dataseal import open_sealed
from agent.protocol.errors import ProtocolError
from agent.protocol.hpke import serialize_public_key
from agent.protocol.membership import ChangeAuthorization
from agent.protocol.mls.group import Group, admissions_of
from agent.protocol.mls.messages import KeyPackage
from agent.protocol.secret import Secret
from agent.protocol.wire.messages.group import CommitMessage, KeyPackageMessage, WelcomeMessage
from agent.protocol.wire.messages.key_state import KeyStateReport
from agent.protocol.wire.messages.service import (
    CommitAction,
    CommitRequest,
    KeyPackageRequest,
    WelcomeDelivery,
)
from firmware_sim.fleet.credentials import SimulatedAK
from provisioning.pki import create_ca, issue_client_cert
from tests.device_certs import VALID_FOR, VALID_FROM, devid_cert_der
from tests.operator_certs import authorize, membership
from tests.pure.test_agent_core import (
    T0,
    FakeService,
    G,
    acks,
    cmd,
    new_key,
    refused_without_change,
    state_bytes,
)

pytestmark = pytest.mark.pure


def point(key: ec.EllipticCurvePrivateKey) -> bytes:
    return serialize_public_key(key.public_key())


def members(service: FakeService, *names: str, **kwargs: object) -> list[AgentCore]:
    """Cores in group ``G``, created by the first and joined in order, every change authorized
    by one operator (the cores' policy is ``kwargs`` or min_approvals 1)."""
    cores = [service.core(name, **kwargs) for name in names]  # type: ignore[arg-type]
    service.approvers = ("op-alice", "op-bob")
    service.create(names[0])
    for name in names[1:]:
        kp = service.key_package(name)
        commit, welcome = service.request_commit(
            names[0], CommitAction.ADD, member=name, key_package=kp
        )
        assert isinstance(commit, CommitMessage) and isinstance(welcome, WelcomeMessage)
        relay = service.order(commit)
        joined = [n for n in names if n != name and cores[names.index(n)].epoch(G) is not None]
        acks(service, service.fan_out(relay, joined))
        delivered = service.deliver(name, WelcomeDelivery(G, welcome.epoch, welcome.welcome))
        acks(service, {name: delivered})
    return cores


def phantom(ak: SimulatedAK | None = None, device_id: str = "dev-phantom") -> KeyPackage:
    """A KeyPackage the rogue makes for a device that does not exist, with a DevID certificate it
    minted with the device CA key the service host holds."""
    devid, leaf, init = new_key(), new_key(), new_key()
    credential = devid_cert_der(device_id, devid, ak_name=None if ak is None else ak.name)
    proof = None if ak is None else ak.prove_leaf(leaf.public_key())
    init_proof = None if ak is None else ak.prove_leaf(init.public_key())
    return KeyPackage.create(
        device_id.encode(),
        devid,
        leaf.public_key(),
        credential,
        init_key=init.public_key(),
        tpm_proof=proof,
        init_tpm_proof=init_proof,
    )


def ask_add(service: FakeService, committer: str, kp: KeyPackage, authz: bytes | None) -> str:
    core = service.devices[committer]
    body = CommitRequest(
        cmd(),
        G,
        service.public[G].epoch,
        CommitAction.ADD,
        member=kp.device_id.decode(),
        key_package=kp.encode(),
        authz=authz,
    )
    payload, topic = service.command(committer, body)
    check = refused_without_change(core, payload, topic, service.now)
    assert core.rejections.count(check) >= 1  # counted, and reported with keys.report
    return check


def test_phantom_member_through_the_service_key_is_refused_by_the_committer() -> None:
    service = FakeService()
    a, b = members(service, "dev-a", "dev-b", membership=membership(min_approvals=2))
    kp = phantom()
    rogue_ca = create_ca("keyfleet test operator CA", now=VALID_FROM, valid_for=VALID_FOR)
    one = authorize("group.add", G, [("dev-phantom", kp.signature_key)], now=T0)
    two = authorize(
        "group.add",
        G,
        [("dev-phantom", kp.signature_key)],
        approvers=("op-alice", "op-bob"),
        now=T0,
    )
    # no authorization; a single operator where the policy needs two; operators' approvals
    # for another device; two approvals by the same operator
    assert ask_add(service, "dev-a", kp, None) == "authz.missing"
    assert ask_add(service, "dev-a", kp, one) == "authz.quorum"
    other = authorize(
        "group.add", G, [("dev-c", point(new_key()))], approvers=("op-alice", "op-bob"), now=T0
    )
    assert ask_add(service, "dev-a", kp, other) == "authz.members"
    twice = authorize(
        "group.add",
        G,
        [("dev-phantom", kp.signature_key)],
        approvers=("op-alice", "op-alice"),
        now=T0,
    )
    assert ask_add(service, "dev-a", kp, twice) == "authz.quorum"
    # approvals by "operators" of a CA the rogue made under the operator CA's name
    request = az.Authorization.decode(two).request
    rogue = []
    for name in ("op-alice", "op-bob"):
        key = new_key()
        cert = issue_client_cert(
            rogue_ca,
            key.public_key(),
            identity=name,
            role="operator",
            now=VALID_FROM,
            valid_for=VALID_FOR,
        )
        rogue.append(az.sign_approval(request, key, cert))
    forged = az.Authorization(request, tuple(rogue)).encode()
    assert ask_add(service, "dev-a", kp, forged) == "authz.chain"
    assert a.epoch(G) == b.epoch(G) == service.public[G].epoch
    # the device tells the fleet what it refused, with its next keys.report, within seconds
    assert a.report_due is not None and a.report_due <= service.now + 2
    (report,) = service.bodies("dev-a", a.report(service.now))
    assert isinstance(report, KeyStateReport)
    refused = dict(report.refused)
    assert refused["authz.missing"] == 1 and refused["authz.quorum"] == 2
    assert refused["authz.members"] == 1 and refused["authz.chain"] == 1
    names = {m.decode() for m in (leaf.device_id for _, leaf in a.groups()[G].tree.members())}
    assert names == {"dev-a", "dev-b"}


def test_a_compromised_member_cannot_add_a_phantom_its_peers_process() -> None:
    """dev-b is compromised (its keys and code are the attacker's): it commits an add without an
    authorization and the rogue service orders it. Its peers refuse the commit by check id."""
    service = FakeService()
    a, b, c = members(service, "dev-a", "dev-b", "dev-c")
    kp = phantom()
    group_b = b.groups()[G]
    result = group_b.add(b._keys.devid, [kp])  # no authz: the member's own MLS lets it
    assert result.welcome is not None
    relay = service.sign(CommitMessage(G, group_b.epoch, result.commit.encode(), None), G)
    for core in (a, c):
        check = refused_without_change(core, relay, f"kf/v1/grp/{G}/commit", service.now)
        assert check == "authz.missing"
    # with an authorization for another change (the add of a real device, replayed)
    real = authorize("group.add", G, [("dev-z", point(new_key()))], now=T0)
    forged = group_b.add(b._keys.devid, [kp], authz=a.membership.envelope(real))
    relay = service.sign(CommitMessage(G, group_b.epoch, forged.commit.encode(), None), G)
    assert refused_without_change(a, relay, f"kf/v1/grp/{G}/commit", T0) == "authz.members"
    # and the phantom's keys open nothing the honest members send
    blob = a.encrypt(G, b"meter 7", service.now)
    assert c.decrypt(G, blob, service.now) == b"meter 7"
    with pytest.raises(ProtocolError):
        open_sealed(blob, lambda name, epoch: Secret(result.group.data_key(32)))


def test_a_key_package_whose_key_is_not_in_a_tpm_is_refused() -> None:
    service = FakeService()
    a, _ = members(service, "dev-a", "dev-b")
    a.membership.require_tpm = True  # the committer checks TPM residency (as every daemon does)
    ak = SimulatedAK.generate()
    # no proof at all
    kp = phantom()
    authz = authorize("group.add", G, [("dev-phantom", kp.signature_key)], now=T0)
    assert ask_add(service, "dev-a", kp, authz) == "tpm.proof.missing"
    # a proof by an AK its certificate does not name
    kp = phantom(SimulatedAK.generate())
    devid, leaf, init = new_key(), new_key(), new_key()
    kp = KeyPackage.create(
        b"dev-phantom",
        devid,
        leaf.public_key(),
        devid_cert_der("dev-phantom", devid, ak_name=ak.name),
        init_key=init.public_key(),
        tpm_proof=SimulatedAK.generate().prove_leaf(leaf.public_key()),
    )
    authz = authorize("group.add", G, [("dev-phantom", kp.signature_key)], now=T0)
    assert ask_add(service, "dev-a", kp, authz) == "tpm.proof.ak"
    # a proof of another key (the attacker's software key is not the certified one)
    kp = KeyPackage.create(
        b"dev-phantom",
        devid,
        new_key().public_key(),
        devid_cert_der("dev-phantom", devid, ak_name=ak.name),
        init_key=init.public_key(),
        tpm_proof=ak.prove_leaf(leaf.public_key()),
    )
    authz = authorize("group.add", G, [("dev-phantom", kp.signature_key)], now=T0)
    assert ask_add(service, "dev-a", kp, authz) == "tpm.proof.key"
    # the honest case passes the same checks: the committer commits
    kp = KeyPackage.create(
        b"dev-phantom",
        devid,
        leaf.public_key(),
        devid_cert_der("dev-phantom", devid, ak_name=ak.name),
        init_key=init.public_key(),
        tpm_proof=ak.prove_leaf(leaf.public_key()),
        init_tpm_proof=ak.prove_leaf(init.public_key()),
    )
    authz = authorize("group.add", G, [("dev-phantom", kp.signature_key)], now=T0)
    commit, welcome = service.request_commit(
        "dev-a", CommitAction.ADD, member="dev-phantom", key_package=kp.encode(), authz=authz
    )
    assert isinstance(commit, CommitMessage) and isinstance(welcome, WelcomeMessage)


def fake_group(
    service: FakeService, victim: str, *, epoch: int, admit: bytes | None
) -> WelcomeMessage:
    """The rogue builds its own group under the real group's name: a leaf named like a real
    member (a certificate it minted for ``dev-a`` with its own key), updated to ``epoch``, and
    adds ``victim`` with a KeyPackage it asked the victim for, admitted by ``admit``."""
    devid, leaf = new_key(), new_key()
    own = KeyPackage.create(
        b"dev-a",
        devid,
        leaf.public_key(),
        devid_cert_der("dev-a", devid),
        init_key=new_key().public_key(),
    )
    envelope = None if admit is None else ChangeAuthorization(admit).encode()
    group = Group.create(G.encode(), own, leaf, authz=envelope)
    while group.epoch < epoch - 1:
        group = group.update(devid, new_key()).group
    out = service.deliver(victim, KeyPackageRequest(cmd()))
    (message,) = service.bodies(victim, out)
    assert isinstance(message, KeyPackageMessage)
    kp = KeyPackage.decode(message.key_package)
    result = group.add(devid, [kp], authz=envelope)
    assert result.welcome is not None and result.group.epoch == epoch
    return WelcomeMessage(G, epoch, result.welcome.encode(), (victim,))


def deliver_refused(
    service: FakeService, core: AgentCore, welcome: WelcomeMessage, admit: bytes | None = None
) -> str:
    """Deliver ``welcome`` with the Authorizations the service kept for the group and the
    rogue's ``admit`` (as its envelope): refused, nothing changed; the refusal's check id."""
    kept = dict(service.authorizations.get(G, {}))
    if admit is not None:
        kept.update(admissions_of([ChangeAuthorization(admit).encode()]))
    payload, topic = service.command(
        core.device_id, WelcomeDelivery(G, welcome.epoch, welcome.welcome, tuple(kept.values()))
    )
    return refused_without_change(core, payload, topic, service.now)


def test_a_fake_welcome_at_a_higher_epoch_does_not_replace_the_real_group() -> None:
    service = FakeService()
    a, b, _ = members(service, "dev-a", "dev-b", "dev-c")
    real_epoch = b.epoch(G)
    assert real_epoch is not None
    # 1. no admission at all for the rogue's own leaf
    welcome = fake_group(service, "dev-b", epoch=real_epoch + 5, admit=None)
    assert deliver_refused(service, b, welcome) == "authz.missing"
    # 2. the authorization that once admitted dev-b, replayed (it is public: commits carry it)
    replayed = authorize("group.add", G, [("dev-b", point(b._keys.devid))], now=T0)
    welcome = fake_group(service, "dev-b", epoch=real_epoch + 5, admit=replayed)
    # the rogue's own leaf is not named by it
    assert deliver_refused(service, b, welcome, replayed) == "authz.members"
    assert b.epoch(G) == real_epoch
    # data still flows in the real group, and the fake group's key opens none of it
    blob = b.encrypt(G, b"valve open", service.now)
    assert a.decrypt(G, blob, service.now) == b"valve open"


def test_a_fake_welcome_for_a_group_the_device_does_not_hold_is_refused() -> None:
    service = FakeService()
    members(service, "dev-a", "dev-b")
    d = service.core("dev-d")
    welcome = fake_group(service, "dev-d", epoch=3, admit=None)
    assert deliver_refused(service, d, welcome) == "authz.missing"
    assert d.groups() == {}


def test_a_device_joins_once_per_authorization() -> None:
    """The admission a device joined with is spent. After its removal, a compromised member that
    kept the add's Authorization (public: the add commit carries it) re-adds it while the
    request is still valid: the device refuses the Welcome, also after a restart."""
    service = FakeService()
    a, b = service.core("dev-a"), service.core("dev-b")
    service.create("dev-a")
    kp = KeyPackage.decode(service.key_package("dev-b"))
    add = service.authorize("group.add", [("dev-b", kp.signature_key)])
    commit, welcome = service.request_commit(
        "dev-a", CommitAction.ADD, member="dev-b", key_package=kp.encode(), authz=add
    )
    assert isinstance(commit, CommitMessage) and isinstance(welcome, WelcomeMessage)
    acks(service, service.fan_out(service.order(commit), ["dev-a"]))
    acks(service, {"dev-b": service.deliver("dev-b", WelcomeDelivery(G, 1, welcome.welcome))})
    (commit,) = service.request_commit("dev-a", CommitAction.REMOVE, member="dev-b")
    assert isinstance(commit, CommitMessage)
    relay = service.order(commit)
    acks(service, service.fan_out(relay, ["dev-a"]))
    assert b.handle(relay, f"kf/v1/grp/{G}/commit", service.now).refused is None
    assert b.groups() == {}
    restarted = service.restarted(b)
    restarted.restore(b.to_state())
    service.devices["dev-b"] = restarted
    again = KeyPackage.decode(service.key_package("dev-b"))
    group = a.groups()[G]
    readd = group.add(a._keys.devid, [again], authz=a.membership.envelope(add))
    assert readd.welcome is not None
    message = WelcomeMessage(G, readd.group.epoch, readd.welcome.encode(), ("dev-b",))
    assert deliver_refused(service, restarted, message) == "authz.replayed"
    assert restarted.groups() == {}


def test_one_operator_cannot_revoke_where_the_policy_needs_two() -> None:
    service = FakeService()
    members(service, "dev-a", "dev-b", "dev-c", membership=membership(min_approvals=2))
    target = service.devices["dev-c"]
    revoke = authorize("device.revoke", None, [("dev-c", point(target._keys.devid))], now=T0)
    body = CommitRequest(
        cmd(), G, service.public[G].epoch, CommitAction.REMOVE, member="dev-c", authz=revoke
    )
    payload, topic = service.command("dev-a", body)
    assert refused_without_change(service.devices["dev-a"], payload, topic, T0) == "authz.quorum"
    both = authorize(
        "device.revoke",
        None,
        [("dev-c", point(target._keys.devid))],
        approvers=("op-alice", "op-bob"),
        now=T0,
    )
    (commit,) = service.request_commit("dev-a", CommitAction.REMOVE, member="dev-c", authz=both)
    assert isinstance(commit, CommitMessage)


def standing(auto: bool, *, serial: int = 1) -> bytes:
    """A quorum policy signed by the admin (the initial policy needs one approval here) that
    allows, or not, the service's automatic removals and re-adds in every group."""
    scopes = frozenset({"*"}) if auto else frozenset()
    policy = az.QuorumPolicy(serial, {"*": 1}, auto_remove=scopes, auto_readd=scopes)
    return authorize("policy", None, [], approvers=("op-root",), now=T0, policy=policy)


def automatic(service: FakeService, committer: str, body: CommitRequest) -> Outcome:
    """Deliver an automatic change (no operators' request) to ``committer``; a refusal changes
    nothing."""
    core = service.devices[committer]
    payload, topic = service.command(committer, body)
    before = state_bytes(core)
    out = core.handle(payload, topic, service.now)
    if out.refused is not None:
        assert state_bytes(core) == before and out.publishes == []
    return out


def test_automatic_removals_and_re_adds_only_where_the_signed_policy_allows_them() -> None:
    service = FakeService()
    _, b, c = members(service, "dev-a", "dev-b", "dev-c")
    epoch = service.public[G].epoch

    def change(action: CommitAction, policy: bytes, **kw: object) -> CommitRequest:
        return CommitRequest(
            cmd(),
            G,
            epoch,
            action,
            authz=policy,
            policies=(policy,),
            **kw,  # type: ignore[arg-type]
        )

    def refusal(out: Outcome) -> str | None:
        return None if out.refused is None else out.refused.check

    # a policy without automatic changes: the quarantine removal is refused
    closed = standing(False)
    assert (
        refusal(automatic(service, "dev-a", change(CommitAction.REMOVE, closed, member="dev-c")))
        == "authz.scope"
    )
    # a policy signed by an operator (policies need admins)
    forged = authorize(
        "policy",
        None,
        [],
        now=T0,
        policy=az.QuorumPolicy(1, {"*": 1}, auto_remove=frozenset({"*"})),
    )
    assert (
        refusal(automatic(service, "dev-a", change(CommitAction.REMOVE, forged, member="dev-c")))
        == "authz.role"
    )
    # a policy that allows them: dev-a commits the removal, dev-b follows it
    opened = standing(True)
    out = automatic(service, "dev-a", change(CommitAction.REMOVE, opened, member="dev-c"))
    assert out.refused is None
    (commit,) = service.bodies("dev-a", out)
    assert isinstance(commit, CommitMessage)
    relay = service.order(commit)
    acks(service, service.fan_out(relay, ["dev-a", "dev-b"]))
    assert c.handle(relay, f"kf/v1/grp/{G}/commit", service.now).refused is None
    assert c.groups() == {}
    epoch = service.public[G].epoch
    # a re-add under the policy: never a new identity ...
    kp = phantom(device_id="dev-c")
    out = automatic(
        service,
        "dev-a",
        change(CommitAction.ADD, opened, member="dev-c", key_package=kp.encode()),
    )
    assert refusal(out) == "authz.members"
    # ... only the identity it removed
    kp = KeyPackage.decode(service.key_package("dev-c"))
    out = automatic(
        service,
        "dev-a",
        change(CommitAction.ADD, opened, member="dev-c", key_package=kp.encode()),
    )
    assert out.refused is None
    commit, welcome = service.bodies("dev-a", out)
    assert isinstance(commit, CommitMessage) and isinstance(welcome, WelcomeMessage)
    relay = service.order(commit)
    acks(service, service.fan_out(relay, ["dev-a", "dev-b"]))
    joined = service.deliver("dev-c", WelcomeDelivery(G, welcome.epoch, welcome.welcome))
    acks(service, {"dev-c": joined})
    blob = c.encrypt(G, b"back", service.now)
    assert b.decrypt(G, blob, service.now) == b"back"


def test_a_replacement_admits_only_its_new_identity_only_into_the_groups_it_names() -> None:
    """RMA: operators approved ``device.replace`` of dev-c (its TPM failed) by dev-n in group G.
    The rogue service reuses that Authorization for another group, a phantom, another member's
    removal; one operator's approval is not the quorum. Then the real change: dev-c's leaf
    removed, dev-n added, every member (and dev-n) at the same epoch with the same secret."""
    service = FakeService()
    a, b, c = members(service, "dev-a", "dev-b", "dev-c", membership=membership(min_approvals=2))
    n = service.core("dev-n", membership=membership(min_approvals=2))
    kp = KeyPackage.decode(service.key_package("dev-n"))
    old, new = ("dev-c", point(c._keys.devid)), ("dev-n", kp.signature_key)

    def replace(groups: list[str], approvers: tuple[str, ...] = ("op-alice", "op-bob")) -> bytes:
        subject = az.replace_subject(groups)
        return authorize(
            "device.replace", None, [old, new], approvers=approvers, now=T0, subject=subject
        )

    good = replace([G])
    assert ask_add(service, "dev-a", kp, replace([G], ("op-alice",))) == "authz.quorum"
    assert ask_add(service, "dev-a", kp, replace(["other-group"])) == "authz.members"
    assert ask_add(service, "dev-a", phantom(), good) == "authz.members"
    body = CommitRequest(
        cmd(), G, service.public[G].epoch, CommitAction.REMOVE, member="dev-b", authz=good
    )
    payload, topic = service.command("dev-a", body)
    assert refused_without_change(a, payload, topic, service.now) == "authz.members"

    (commit,) = service.request_commit("dev-a", CommitAction.REMOVE, member="dev-c", authz=good)
    assert isinstance(commit, CommitMessage)
    acks(service, service.fan_out(service.order(commit), ["dev-a", "dev-b"]))
    commit, welcome = service.request_commit(
        "dev-a", CommitAction.ADD, member="dev-n", key_package=kp.encode(), authz=good
    )
    assert isinstance(commit, CommitMessage) and isinstance(welcome, WelcomeMessage)
    outcomes = service.fan_out(service.order(commit), ["dev-a", "dev-b"])
    assert all(o.refused is None for o in outcomes.values())  # dev-b checked it historically
    acks(service, outcomes)
    joined = service.deliver("dev-n", WelcomeDelivery(G, welcome.epoch, welcome.welcome))
    assert joined.refused is None
    acks(service, {"dev-n": joined})
    assert a.epoch(G) == b.epoch(G) == n.epoch(G) == service.public[G].epoch
    secrets = {core.groups()[G].epoch_authenticator for core in (a, b, n)}
    assert len(secrets) == 1
    names = {m.decode() for m in (leaf.device_id for _, leaf in a.groups()[G].tree.members())}
    assert names == {"dev-a", "dev-b", "dev-n"}
