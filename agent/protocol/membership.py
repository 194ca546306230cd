"""What a device checks before a member enters or leaves one of its groups (docs/authorization.md).

The fleet service only relays and orders: nothing it says makes a device accept a member. A
device accepts

- a **leaf** only with a DevID certificate that chains to the device CA it got at enrollment,
  names the leaf's device id (SAN ``urn:keyfleet:device:<id>``) and holds the leaf's signature
  key (``leaf_check``: every added leaf, every committer's new leaf, every leaf of a Welcome);
- a **KeyPackage** to add only with, in addition, a TPM2_Certify of its leaf key by the AK the
  DevID certificate names (``tpm.*``: the key was created in that device's TPM and cannot leave it);
- a **membership change** (a commit that adds or removes) only with an operator Authorization
  for exactly that change whose approvals meet the quorum policy (``commit_check``): a committer
  checks it fresh; members that process the commit check it historically (a device that comes back
  after the request expired must still follow its group); automatic removals and same-identity
  re-adds run under the standing quorum policy (``auto.remove`` / ``auto.readd`` scopes) and can
  never add an identity that was not in the group;
- a **Welcome** only if every leaf of its tree was admitted by such an Authorization (historical)
  and its own leaf by a fresh one it has not used before, or by a same-identity re-add under the
  standing policy (``admission_check``).

- **no** leaf, KeyPackage or committer whose identity (device id and DevID key) the revocation
  feed it keeps names (``cred.revoked``; ``agent.protocol.feed``), even with a valid quorum for
  the add: the revocation is the later, stronger fact;
- **no** approval by an operator certificate the feed names as removed by the quorum, in any
  Authorization it checks (changes, admissions, policies, releases, later feed entries), for a
  request judged at or after the removal (``operator.removed``).

The quorum policy a device applies is the newest one it has verified. Policies form a chain: the
first is approved under ``QuorumPolicy.initial(min_approvals)`` (``min_approvals`` fixed at
enrollment), each later one under the one before it, with a higher serial. The service sends the
chain with every commit request; the committer puts it into the change's envelope
(``ChangeAuthorization``), so the committer and every member judge a commit under the same
policy, and a member that missed a policy catches up from the chain.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from cryptography import x509

from agent.protocol import authz as az
from agent.protocol import feed as revocation_feed
from agent.protocol import trust
from agent.protocol.credentials import CredentialVerifier, verify_tpm_residency
from agent.protocol.errors import ProtocolError
from agent.protocol.mls import codec
from agent.protocol.mls.messages import CommitContent, KeyPackage
from agent.protocol.mls.tree import LeafNode, RatchetTree
from agent.protocol.wire.messages.feed import RevocationFeed
from agent.protocol.wire.messages.service import MAX_POLICIES, MAX_POLICY_AUTHZ

ENVELOPE_VERSION = 1
MAX_ENVELOPE = az.MAX_AUTHORIZATION + MAX_POLICIES * MAX_POLICY_AUTHZ + 256
MAX_CONSUMED = 4096


@dataclass(frozen=True)
class ChangeAuthorization:
    """What a commit's ``authz`` field carries: the Authorization of the change and the chain of
    signed quorum policies it is judged under, oldest first (empty: the initial policy)."""

    authz: bytes
    policies: tuple[bytes, ...] = ()

    def encode(self) -> bytes:
        return codec.encode(
            {"v": ENVELOPE_VERSION, "authz": self.authz, "policies": list(self.policies)}
        )

    @classmethod
    def decode(cls, data: bytes) -> ChangeAuthorization:
        m = codec.as_map(
            codec.decode(data, MAX_ENVELOPE, "change_authorization"),
            "change_authorization",
            {"v", "authz", "policies"},
        )
        if m["v"] != ENVELOPE_VERSION:
            raise ProtocolError("authz.version", f"change authorization version {m['v']!r}")
        return cls(
            codec.as_bytes(m["authz"], "change_authorization.authz", 1, az.MAX_AUTHORIZATION),
            _chain(m["policies"], "change_authorization.policies"),
        )

    @property
    def op(self) -> str:
        return az.Request.decode(az.Authorization.decode(self.authz).request).op

    def standing(self) -> None:
        """An automatic change names the newest policy of its chain as its authorization."""
        if not self.policies or self.policies[-1] != self.authz:
            raise ProtocolError(
                "authz.scope", "an automatic change must name the newest policy of its chain"
            )


def _chain(value: object, what: str) -> tuple[bytes, ...]:
    return tuple(
        codec.as_list(
            value, what, MAX_POLICIES, lambda v, w: codec.as_bytes(v, w, 1, MAX_POLICY_AUTHZ)
        )
    )


@dataclass(frozen=True)
class MembershipState:
    """A device's membership trust state as read back from its state file."""

    policy: az.QuorumPolicy
    policies: tuple[bytes, ...]
    consumed: tuple[tuple[bytes, int], ...]
    readdable: tuple[tuple[tuple[str, str], bytes], ...]
    revocations: revocation_feed.FeedState


class Membership:
    """A device's trust for group membership: device CA, operator CA, the quorum policy it holds
    and the admissions it has used. Pure: ``now`` comes from the caller."""

    def __init__(
        self,
        *,
        device_cas: Sequence[x509.Certificate],
        operator_cas: Sequence[x509.Certificate],
        min_approvals: int,
        require_tpm: bool = True,
    ) -> None:
        self.base_device_cas = tuple(device_cas)  # the configuration's (trust bundle 0)
        self.credentials = CredentialVerifier(device_cas)
        # no operator CA configured: every membership change is refused (authz.chain)
        self._base_approvals = az.AuthzVerifier(operator_cas) if operator_cas else None
        self._approvals = self._base_approvals
        # an operator CA section's encoding -> its verifier (the held bundle's, and the one
        # before a link a device checks: ``check_trust_approval``)
        self._section_approvals: dict[bytes, az.AuthzVerifier] = {}
        self.base = az.QuorumPolicy.initial(min_approvals)
        self.policy = self.base
        self.policies: tuple[bytes, ...] = ()  # the verified chain behind ``policy``
        self.require_tpm = require_tpm
        # request id -> expiry of admissions this device joined with: never twice
        self.consumed: OrderedDict[bytes, int] = OrderedDict()
        # (group, device id) -> DevID key hash of members removed under the standing policy:
        # the only identities it may re-add (noted when the removal is checked, inside the
        # caller's ``transaction``).
        self.readdable: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        # the revocation feed as far as we verified it (revoked identities)
        self.revocations = revocation_feed.FeedState()

    def use_device_cas(
        self, device_cas: Sequence[x509.Certificate] | None, ends: Mapping[bytes, int]
    ) -> None:
        """Check members' credentials against the device CAs a trust bundle lists (``ends``:
        certificate DER -> until when a CA is accepted); None: the configuration's."""
        if device_cas is None:
            self.credentials = CredentialVerifier(self.base_device_cas)
        else:
            self.credentials = CredentialVerifier(device_cas, ends=ends)

    def use_operator_cas(self, bundle: trust.TrustBundle) -> None:
        """Check approvals against the operator CAs ``bundle`` lists, each until its end (a
        bundle without an operator CA section: the configuration's)."""
        self._approvals = self._approvals_under(bundle)

    def _approvals_under(self, bundle: trust.TrustBundle) -> az.AuthzVerifier | None:
        if bundle.operator_ca is None:
            return self._base_approvals
        key = codec.encode([[c.cert, c.until] for c in bundle.operator_ca])
        verifier = self._section_approvals.get(key)
        if verifier is None:
            verifier = az.AuthzVerifier(
                [c.certificate for c in bundle.operator_ca], ends=bundle.operator_ca_ends()
            )
            if len(self._section_approvals) >= 4:
                self._section_approvals.pop(next(iter(self._section_approvals)))
            self._section_approvals[key] = verifier
        return verifier

    @property
    def approvals(self) -> az.AuthzVerifier:
        if self._approvals is None:
            raise ProtocolError(
                "authz.chain", "no operator CA configured: no approval can be checked"
            )
        return self._approvals

    def __repr__(self) -> str:
        return (
            f"Membership(policy serial {self.policy.serial}, {len(self.consumed)} used, "
            f"feed {self.revocations.seq})"
        )

    # -- state (kept in the agent's encrypted state file) ------------------------------------

    def to_state(self) -> dict[str, object]:
        return {
            "policies": list(self.policies),
            "consumed": [[request_id, exp] for request_id, exp in self.consumed.items()],
            "readdable": [[g, d, key] for (g, d), key in self.readdable.items()],
            "revocations": self.revocations.to_state(),
        }

    def parse_state(self, value: object, held: trust.TrustBundle | None = None) -> MembershipState:
        """Check a ``to_state()`` map (the policy chain verifies again) without applying it. A
        state written before devices kept the revocation feed has no ``revocations``: it starts
        from an empty feed (the device catches up from the service's head)."""
        m = codec.as_map(
            value, "membership", {"policies", "consumed", "readdable"}, {"revocations"}
        )
        # the chain verifies again as it was adopted: a link adopted before the device learned
        # of a removal stays adopted (nothing executed is undone), so no removals apply here
        # under the operator CAs of the trust bundle the state holds (``held``)
        policy, policies = self._follow(
            self.base,
            (),
            _chain(m["policies"], "membership.policies"),
            {},
            verifier=None if held is None else self._approvals_under(held),
        )
        consumed = codec.as_list(
            m["consumed"],
            "membership.consumed",
            MAX_CONSUMED,
            lambda v, w: codec.as_list(v, w, 2, lambda x, y: x),
        )
        pairs = tuple(
            (
                codec.as_bytes(
                    pair[0], "membership.consumed.id", az.REQUEST_ID_SIZE, az.REQUEST_ID_SIZE
                ),
                codec.as_uint(pair[1], "membership.consumed.exp", az.MAX_TIME),
            )
            for pair in consumed
        )
        readdable = tuple(
            (
                (
                    _text(t[0], "membership.readdable.group"),
                    _text(t[1], "membership.readdable.id"),
                ),
                codec.as_bytes(t[2], "membership.readdable.key", 32, 32),
            )
            for t in codec.as_list(
                m["readdable"],
                "membership.readdable",
                MAX_CONSUMED,
                lambda v, w: codec.as_list(v, w, 3, lambda x, y: x),
            )
        )
        revocations = (
            revocation_feed.FeedState.parse_state(m["revocations"])
            if "revocations" in m
            else revocation_feed.FeedState()
        )
        return MembershipState(policy, policies, pairs, readdable, revocations)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Changes made inside (a policy followed, an admission spent, an identity noted as
        re-addable) are undone if it raises: a refused message changes nothing."""
        saved = (
            self.policy,
            self.policies,
            OrderedDict(self.consumed),
            OrderedDict(self.readdable),
        )
        revocations = self.revocations
        try:
            yield
        except BaseException:
            self.policy, self.policies = saved[0], saved[1]
            self.consumed, self.readdable = saved[2], saved[3]
            self.revocations = revocations
            raise

    def restore(self, state: MembershipState) -> None:
        self.policy, self.policies = state.policy, state.policies
        self.consumed = OrderedDict(state.consumed)
        self.readdable = OrderedDict(state.readdable)
        self.revocations = state.revocations

    # -- the revocation feed --------------------------------------------------------------------

    def follow_feed(self, head: RevocationFeed) -> bool:
        """Advance the revocation feed to ``head`` (a verified ``revocation.feed`` body): each
        new entry's Authorization is checked as a fleet-wide ``device.revoke`` (or the
        ``device.replace`` that revoked a replaced device) or ``operator.remove``, or as the
        ``group.delete`` of the group it names, under our quorum policy, historically. True if
        the feed moved; ``revocation.*`` refusals change nothing
        (``agent.protocol.feed.advance``)."""

        def check(
            signed: bytes, op: str, group: str | None, removed: Mapping[bytes, int]
        ) -> az.VerifiedAuthorization:
            return self.approvals.verify(
                signed, policy=self.policy, now=None, op=op, group=group, removed=removed
            )

        advanced = revocation_feed.advance(self.revocations, head, check)
        if advanced is None:
            return False
        self.revocations = advanced
        return True

    def check_release_approval(self, signed: bytes) -> az.VerifiedAuthorization:
        """A release's ``release.approve`` Authorization (``agent.protocol.releaseproof``),
        checked like a feed entry: fleet-wide, under our quorum policy, historically (a release
        outlives its request's window)."""
        return self.approvals.verify(
            signed,
            policy=self.policy,
            now=None,
            op=az.OP_RELEASE_APPROVE,
            group=None,
            removed=self.revocations.removed_operators(),
        )

    def check_trust_approval(
        self, signed: bytes, under: trust.TrustBundle | None = None
    ) -> az.VerifiedAuthorization:
        """A trust bundle's ``trust.rotate`` Authorization (``agent.protocol.trust``): fleet-wide,
        under our quorum policy, historically (a device offline for weeks still catches up), by
        operators not removed before the request's time (the revocation feed), of the operator
        CAs of ``under`` (the bundle before the link; None: those in force)."""
        approvals = self.approvals if under is None else self._approvals_under(under)
        if approvals is None:
            raise ProtocolError(
                "authz.chain", "no operator CA configured: no approval can be checked"
            )
        return approvals.verify(
            signed,
            policy=self.policy,
            now=None,
            op=az.OP_TRUST_ROTATE,
            group=None,
            removed=self.revocations.removed_operators(),
        )

    # -- policy ---------------------------------------------------------------------------------

    def _follow(
        self,
        policy: az.QuorumPolicy,
        known: tuple[bytes, ...],
        chain: tuple[bytes, ...],
        removed: Mapping[bytes, int],
        *,
        verifier: az.AuthzVerifier | None = None,
    ) -> tuple[az.QuorumPolicy, tuple[bytes, ...]]:
        """Follow ``chain`` (oldest first) on from ``policy`` (whose chain is ``known``): links
        already known are skipped, each new one must be approved under the one before it, by
        operators not ``removed`` when it was made."""
        for signed in chain:
            if signed in known:
                continue
            policy = (verifier or self.approvals).verify_policy_update(
                signed, current=policy, now=None, removed=removed
            )
            known = (*known, signed)
        return policy, known[-MAX_POLICIES:]

    def adopt_policies(self, chain: tuple[bytes, ...]) -> None:
        """Follow the service's chain of signed policies (``authz.*`` if a link does not
        verify; then nothing changes)."""
        self.policy, self.policies = self._follow(
            self.policy, self.policies, chain, self.revocations.removed_operators()
        )

    def envelope(self, authz: bytes) -> bytes:
        """A committer's ``authz`` field: the change's Authorization with our policy chain."""
        return ChangeAuthorization(authz, self.policies).encode()

    def _judged(self, envelope: ChangeAuthorization) -> az.QuorumPolicy:
        """The policy a change is judged under: ours, followed along the chain it carries."""
        policy, _ = self._follow(
            self.policy, self.policies, envelope.policies, self.revocations.removed_operators()
        )
        return policy

    # -- leaves and key packages ----------------------------------------------------------------

    def check_leaf(self, leaf: LeafNode, now: int) -> None:
        if self.revocations.is_revoked(
            leaf.device_id.decode(errors="replace"), az.member_key(leaf.signature_key)
        ):
            raise ProtocolError(
                "cred.revoked",
                f"the revocation feed names device {leaf.device_id!r} with this DevID key",
            )
        device = self.credentials.verify(leaf.credential, now)
        if device.device_id.encode() != leaf.device_id:
            raise ProtocolError(
                "cred.device-id", "the leaf's device id is not the one its certificate names"
            )
        if device.signature_key != leaf.signature_key:
            raise ProtocolError("cred.key", "the leaf's signature key is not its certificate's")

    def check_key_package(self, key_package: KeyPackage, now: int) -> None:
        """Credential and TPM residency of a KeyPackage's leaf key and init key (before it is
        committed)."""
        key_package.verify()
        self.check_leaf(key_package.leaf, now)
        if not self.require_tpm:
            return
        if key_package.tpm_proof is None:
            raise ProtocolError(
                "tpm.proof.missing", "the KeyPackage does not prove that its key is in a TPM"
            )
        device = self.credentials.verify(key_package.leaf.credential, now)
        if device.ak_name is None:
            raise ProtocolError(
                "tpm.proof.ak", "the device's certificate names no AK to check the proof with"
            )
        verify_tpm_residency(key_package.tpm_proof, key_package.leaf.encryption_key, device.ak_name)
        if key_package.init_tpm_proof is None:
            raise ProtocolError(
                "tpm.proof.missing", "the KeyPackage does not prove that its init key is in a TPM"
            )
        verify_tpm_residency(key_package.init_tpm_proof, key_package.init_key, device.ak_name)

    # -- commits --------------------------------------------------------------------------------

    def check_commit(
        self, group: str, content: CommitContent, tree: RatchetTree, now: int, *, fresh: bool
    ) -> None:
        """A commit's membership change against its authorization (``fresh``: we commit it, so
        the request must be valid now; otherwise it is checked historically)."""
        removed: dict[str, LeafNode] = {}
        for index in content.removes:
            leaf = tree.leaf(index)
            if leaf is None:
                raise ProtocolError("mls.remove.blank", "the commit removes an empty leaf")
            removed[leaf.device_id.decode()] = leaf
        adds = [(kp.leaf.device_id.decode(), kp.leaf.signature_key) for kp in content.adds]
        for key_package in content.adds:
            self.check_key_package(key_package, now)
            if fresh:  # we add it now; others check the commit later, when it may have expired
                key_package.check_lifetime(now)
        if not adds and not removed:
            return  # a self-update changes no membership
        if content.authz is None:
            raise ProtocolError(
                "authz.missing", "a membership change without an operator authorization"
            )
        envelope = ChangeAuthorization.decode(content.authz)
        policy = self._judged(envelope)
        op = envelope.op
        if op == az.OP_POLICY:
            envelope.standing()
            self._check_automatic(group, policy, adds, removed)
            return
        verified = self.approvals.verify(
            envelope.authz,
            policy=policy,
            now=now if fresh else None,
            op=op,
            group=None if op in az.FLEET_OPS else group,
            removed=self.revocations.removed_operators(),
        )
        if op == az.OP_DEVICE_REPLACE and adds:
            _check_replaced_group(verified, group)
        if op == az.OP_GROUP_CREATE:
            # a new group's founders come in one add each under its creation request
            named = {m.device_id: m.key for m in verified.request.members}
            if removed or any(named.get(d) != az.member_key(k) for d, k in adds):
                raise ProtocolError(
                    "authz.members", "the commit changes members its creation did not name"
                )
            return
        az.members_match(verified, adds=adds, removes=list(removed))

    def _check_automatic(
        self,
        group: str,
        policy: az.QuorumPolicy,
        adds: list[tuple[str, bytes]],
        removed: dict[str, LeafNode],
    ) -> None:
        """A change under the standing policy: removals where it allows them (noted as
        re-addable); a re-add, where it allows that, only of an identity (device id and DevID
        key) it removed before."""
        if adds:
            if not policy.allows_auto_readd(group):
                raise ProtocolError(
                    "authz.scope", f"the standing policy allows no automatic re-add in {group!r}"
                )
            for device_id, key in adds:
                if self.readdable.get((group, device_id)) != az.member_key(key):
                    raise ProtocolError(
                        "authz.members",
                        "an automatic re-add may only bring back an identity the standing "
                        "policy removed",
                    )
        if removed and not policy.allows_auto_remove(group):
            raise ProtocolError(
                "authz.scope", f"the standing policy allows no automatic removal in {group!r}"
            )
        for device_id, leaf in removed.items():
            self.readdable[(group, device_id)] = az.member_key(leaf.signature_key)
        while len(self.readdable) > MAX_CONSUMED:
            self.readdable.popitem(last=False)

    # -- welcomes -------------------------------------------------------------------------------

    def check_admission(
        self, group: str, leaf: LeafNode, signed: bytes | None, is_own: bool, now: int
    ) -> None:
        """One leaf of a Welcome's tree (or a founder's own leaf): admitted by an Authorization
        naming it (our own leaf: fresh and not used before), or a same-identity re-add under the
        standing policy."""
        if signed is None:
            raise ProtocolError(
                "authz.missing", f"leaf {leaf.device_id!r} was admitted by no authorization"
            )
        envelope = ChangeAuthorization.decode(signed)
        policy = self._judged(envelope)
        op = envelope.op
        if op == az.OP_POLICY:
            envelope.standing()
            if not policy.allows_auto_readd(group):
                raise ProtocolError(
                    "authz.scope", f"the standing policy allows no re-add in {group!r}"
                )
            return
        if op not in (az.OP_GROUP_CREATE, az.OP_GROUP_ADD, az.OP_DEVICE_REPLACE):
            raise ProtocolError("authz.scope", f"{op!r} admits no member")
        verified = self.approvals.verify(
            envelope.authz,
            policy=policy,
            now=now if is_own else None,
            op=op,
            group=None if op in az.FLEET_OPS else group,
            removed=self.revocations.removed_operators(),
            executed=True,  # the committer made the add: judged at the request's time
        )
        members = verified.request.members
        if op == az.OP_DEVICE_REPLACE:
            _check_replaced_group(verified, group)
        # a replacement admits its new identity only, never the old one it replaces
        admitted = members[1:] if op == az.OP_DEVICE_REPLACE else members
        named = {m.device_id: m.key for m in admitted}
        if named.get(leaf.device_id.decode()) != az.member_key(leaf.signature_key):
            raise ProtocolError(
                "authz.members", f"the admission does not name leaf {leaf.device_id!r}"
            )
        if is_own and verified.request.id in self.consumed:
            raise ProtocolError(
                "authz.replayed", "this device already joined with that authorization"
            )

    def consume(self, signed: bytes | None, now: int) -> None:
        """Remember the admission we joined with (until it expires) so that it cannot bring us
        into a group a second time."""
        if signed is None:
            return
        envelope = ChangeAuthorization.decode(signed)
        request = az.Request.decode(az.Authorization.decode(envelope.authz).request)
        if request.op == az.OP_POLICY:
            return
        self.consumed[request.id] = request.exp
        for request_id, exp in list(self.consumed.items()):
            if exp < now:
                del self.consumed[request_id]
        while len(self.consumed) > MAX_CONSUMED:
            self.consumed.popitem(last=False)


def _text(value: object, what: str) -> str:
    if type(value) is not str or not 0 < len(value) <= 255:
        raise codec.fail(what, "expected text of 1..255 characters")
    return value


def _check_replaced_group(verified: az.VerifiedAuthorization, group: str) -> None:
    """A replacement adds its new identity only to the groups its subject names (those the old
    identity was in when operators approved): ``authz.members`` otherwise."""
    if group not in az.replaced_groups(verified.request.subject):
        old, new = (m.device_id for m in verified.request.members)
        raise ProtocolError(
            "authz.members", f"the replacement of {old!r} by {new!r} does not name group {group!r}"
        )
