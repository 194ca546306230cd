"""One-time init keys, KeyPackage lifetimes and the joiner's first self-update
(agent.protocol.initkeys, docs/treekem.md "Joining"): the MLS rules with software keys, and the
agent core's use of them with ``FakeSoftwareKeys`` (tests/pure/test_agent_core.py). The swtpm
version of the attack is tests/tpm/test_attack_join_forward_secrecy.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.core import Outcome, leaf_name
from agent.protocol.errors import CryptoError, ProtocolError
from agent.protocol.hpke import serialize_public_key
from agent.protocol.initkeys import (
    JOIN_UPDATE_REASON,
    KEY_PACKAGE_LIFETIME,
    KEY_PACKAGE_REFRESH,
    init_key_name,
)
from agent.protocol.lifecycle import KeyKind, KeyState
from agent.protocol.mls.crypto import decrypt_with_label
from agent.protocol.mls.group import WELCOME_LABEL, Group
from agent.protocol.mls.messages import KEY_PACKAGE_VERSION, KeyPackage, Welcome
from agent.protocol.wire.messages.group import CommitMessage, UpdateRequest, WelcomeMessage
from agent.protocol.wire.messages.service import CommitAction, CommitRequest, WelcomeDelivery
from tests.device_certs import devid_cert_der
from tests.pure.test_agent_core import T0, FakeService, G, acks, cmd, group_of_two

pytestmark = pytest.mark.pure


def refused_with(outcome: Outcome) -> str | None:
    return None if outcome.refused is None else outcome.refused.check


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


class Device:
    def __init__(self, name: str) -> None:
        self.name = name.encode()
        self.devid, self.leaf, self.init = new_key(), new_key(), new_key()
        self.credential = devid_cert_der(self.name, self.devid)
        self._kp: KeyPackage | None = None

    def key_package(self, lifetime: tuple[int, int] | None = None) -> KeyPackage:
        """One package per device unless a lifetime is asked for (ECDSA is randomized: a
        second package would have another reference)."""
        if lifetime is None:
            if self._kp is None:
                self._kp = self.key_package((0, 1 << 40))
            return self._kp
        return KeyPackage.create(
            self.name,
            self.devid,
            self.leaf.public_key(),
            self.credential,
            init_key=self.init.public_key(),
            lifetime=lifetime,
        )


def added(creator: Device, joiner: Device) -> tuple[Group, Welcome]:
    group = Group.create(b"g", creator.key_package(), creator.leaf)
    result = group.add(creator.devid, [joiner.key_package()])
    assert result.welcome is not None
    return result.group, Welcome.decode(result.welcome.encode())


# -- MLS ---------------------------------------------------------------------------------------


def test_key_package_v2_carries_an_init_key_apart_from_the_leaf_and_a_lifetime() -> None:
    d = Device("dev-1")
    kp = d.key_package((100, 200))
    again = KeyPackage.decode(kp.encode())
    assert again == kp and KEY_PACKAGE_VERSION == 2
    again.verify()
    assert again.init_key == serialize_public_key(d.init.public_key()) != again.leaf_key
    assert (again.not_before, again.not_after) == (100, 200)
    # RFC 9420 §10: the init key must differ from the leaf key
    with pytest.raises(ProtocolError) as err:
        KeyPackage.create(
            d.name, d.devid, d.leaf.public_key(), d.credential, init_key=d.leaf.public_key()
        )
    assert err.value.check == "mls.init-key"
    with pytest.raises(ProtocolError) as err:
        replace(kp, init_key=kp.leaf_key).verify()
    assert err.value.check == "mls.init-key"
    with pytest.raises(ProtocolError) as err:
        d.key_package((200, 100))
    assert err.value.check == "mls.key-package.lifetime"


def test_key_package_lifetime_is_checked_at_both_ends() -> None:
    kp = Device("dev-1").key_package((100, 200))
    for now in (100, 150, 200):
        kp.check_lifetime(now)
    for now in (99, 201):
        with pytest.raises(ProtocolError) as err:
            kp.check_lifetime(now)
        assert err.value.check == "mls.key-package.expired"


def test_every_bit_of_init_key_and_lifetime_is_signed() -> None:
    d = Device("dev-1")
    kp = d.key_package((100, 200))
    other = serialize_public_key(new_key().public_key())
    for forged in (
        replace(kp, init_key=other),
        replace(kp, not_after=201),
        replace(kp, not_before=99),
        replace(kp, init_tpm_proof=b"x"),
    ):
        with pytest.raises(ProtocolError) as err:
            KeyPackage.decode(forged.encode()).verify()
        assert err.value.check == "mls.key-package.signature"
    # a flipped bit anywhere in the encoding: refused by the decoder or by a signature
    data = kp.encode()
    for i in range(0, len(data), 7):
        flipped = bytearray(data)
        flipped[i] ^= 0x01
        with pytest.raises(ProtocolError):
            KeyPackage.decode(bytes(flipped)).verify()
    # the version 1 format (no init key, no lifetime) is refused, not half-read
    obj = kp.to_obj()
    obj["v"] = 1
    with pytest.raises(ProtocolError) as err:
        KeyPackage.from_obj(obj)
    assert err.value.check == "mls.version"


def test_the_welcome_is_sealed_to_the_init_key_not_the_leaf_key() -> None:
    creator, joiner = Device("dev-0"), Device("dev-1")
    group, welcome = added(creator, joiner)
    kp = joiner.key_package()
    (entry,) = welcome.secrets
    # the leaf key opens nothing: holding it (the TPM that keeps it) does not open the Welcome
    with pytest.raises(CryptoError):
        decrypt_with_label(
            joiner.leaf,
            WELCOME_LABEL,
            welcome.encrypted_group_info,
            entry.kem_output,
            entry.ciphertext,
        )
    # Group.join refuses a key that is not the package's init key, or not its leaf key
    for init, leaf in ((joiner.leaf, joiner.leaf), (new_key(), joiner.leaf)):
        with pytest.raises(ProtocolError) as err:
            Group.join(welcome, kp, leaf, init_key=init)
        assert err.value.check == "mls.init-key"
    with pytest.raises(ProtocolError) as err:
        Group.join(welcome, kp, new_key(), init_key=joiner.init)
    assert err.value.check == "mls.leaf-key"
    joined = Group.join(welcome, kp, joiner.leaf, init_key=joiner.init)
    assert joined.epoch_authenticator == group.epoch_authenticator


# -- the agent core ------------------------------------------------------------------------------


def test_the_init_key_is_used_once_destroyed_and_a_replayed_welcome_is_refused() -> None:
    service = FakeService()
    service.core("dev-a")
    b = service.core("dev-b")
    service.create("dev-a")
    kp = KeyPackage.decode(service.key_package("dev-b"))
    init_public = kp.init_key
    # while the package is outstanding its init key is live state, in the ledger as an init key
    assert init_public in b.leaf_refs()
    record = b.ledger.get(init_key_name(init_public))
    assert record.kind is KeyKind.INIT and record.state is KeyState.ACTIVE
    assert record.note is not None and "flush" in record.note and "shred" in record.note
    commit, welcome = service.request_commit(
        "dev-a", CommitAction.ADD, member="dev-b", key_package=kp.encode()
    )
    assert isinstance(commit, CommitMessage) and isinstance(welcome, WelcomeMessage)
    acks(service, service.fan_out(service.order(commit), ["dev-a"]))
    acks(service, {"dev-b": service.deliver("dev-b", WelcomeDelivery(G, 1, welcome.welcome))})
    # spent: no state refers to it (the daemon flushes it and shreds its blob once saved), the
    # ledger says destroyed, the leaf key stays
    assert init_public not in b.leaf_refs() and kp.leaf_key in b.leaf_refs()
    assert b.ledger.get(init_key_name(init_public)).state is KeyState.DESTROYED
    # the same Welcome again, past the re-acknowledgement of a known epoch: its key is gone
    before = b.to_state()
    out = service.deliver("dev-b", WelcomeDelivery(G, 5, welcome.welcome))
    assert refused_with(out) == "mls.init-key"
    assert b.to_state()["groups"] == before["groups"]
    # and after a restart too (the used references are persisted)
    restarted = service.restarted(b)
    restarted.restore(b.to_state())
    service.devices["dev-b"] = restarted
    assert refused_with(service.deliver("dev-b", WelcomeDelivery(G, 6, welcome.welcome))) == (
        "mls.init-key"
    )


def test_the_joiners_first_act_is_a_self_update() -> None:
    service, a, b = group_of_two()
    (kp_leaf,) = b.leaf_refs()
    status = {g["group"]: g for g in b.status()["groups"]}
    assert status[G]["fresh_leaf_pending"] is True
    assert a.status()["groups"][0]["fresh_leaf_pending"] is False  # the creator's never was
    bodies = service.bodies("dev-b", b.tick(service.now))
    asks = [x for x in bodies if isinstance(x, UpdateRequest)]
    assert [(r.group_id, r.epoch, r.reason) for r in asks] == [(G, 1, JOIN_UPDATE_REASON)]
    assert not [
        x for x in service.bodies("dev-b", b.tick(service.now + 1)) if isinstance(x, UpdateRequest)
    ]  # asked already
    assert not [
        x for x in service.bodies("dev-a", a.tick(service.now)) if isinstance(x, UpdateRequest)
    ]
    (commit,) = service.request_commit("dev-b", CommitAction.UPDATE)
    assert isinstance(commit, CommitMessage)
    acks(service, service.fan_out(service.order(commit), ["dev-a", "dev-b"]))
    assert kp_leaf not in b.leaf_refs()
    assert b.ledger.get(leaf_name(kp_leaf)).state is KeyState.DESTROYED
    assert b.status()["groups"][0]["fresh_leaf_pending"] is False
    service.now += 10_000
    later = service.bodies("dev-b", b.tick(service.now))
    assert not [x for x in later if isinstance(x, UpdateRequest)]


def test_a_first_commit_that_is_not_the_update_still_replaces_the_joined_leaf() -> None:
    service, _, b = group_of_two()
    (kp_leaf,) = b.leaf_refs()
    c = service.core("dev-c")
    kp_c = service.key_package("dev-c")
    commit, welcome = service.request_commit(
        "dev-b", CommitAction.ADD, member="dev-c", key_package=kp_c
    )
    assert isinstance(commit, CommitMessage) and isinstance(welcome, WelcomeMessage)
    assert commit.commit and c.epoch(G) is None
    acks(service, service.fan_out(service.order(commit), ["dev-a", "dev-b"]))
    assert kp_leaf not in b.leaf_refs()
    assert b.status()["groups"][0]["fresh_leaf_pending"] is False


def test_another_members_commit_before_the_first_update_does_not_cancel_it() -> None:
    """A joiner that processes someone else's commit first (the next add of a group being built)
    still holds the leaf key it joined with: it keeps asking for its self-update."""
    service, _, b = group_of_two()
    (kp_leaf,) = b.leaf_refs()
    service.core("dev-c")
    kp_c = service.key_package("dev-c")
    commit, welcome = service.request_commit(
        "dev-a", CommitAction.ADD, member="dev-c", key_package=kp_c
    )
    assert isinstance(commit, CommitMessage) and isinstance(welcome, WelcomeMessage)
    acks(service, service.fan_out(service.order(commit), ["dev-a", "dev-b"]))
    assert b.epoch(G) == 2 and kp_leaf in b.leaf_refs()
    assert b.status()["groups"][0]["fresh_leaf_pending"] is True
    asks = [x for x in service.bodies("dev-b", b.tick(service.now)) if isinstance(x, UpdateRequest)]
    assert [(r.group_id, r.epoch, r.reason) for r in asks] == [(G, 2, JOIN_UPDATE_REASON)]
    # and after a restart in between
    restarted = service.restarted(b)
    restarted.restore(b.to_state())
    assert restarted.status()["groups"][0]["fresh_leaf_pending"] is True


def test_expired_key_packages_are_refused_by_committer_and_joiner_and_refreshed() -> None:
    service = FakeService()
    a, b = service.core("dev-a"), service.core("dev-b")
    service.create("dev-a")
    kp = service.key_package("dev-b")
    # the committer refuses a package past its lifetime
    service.now = T0 + KEY_PACKAGE_LIFETIME + 1
    a.set_time(service.now)
    authz = service.authorize("group.add", [("dev-b", KeyPackage.decode(kp).signature_key)])
    out = service.deliver(
        "dev-a",
        CommitRequest(cmd(), G, 0, CommitAction.ADD, member="dev-b", key_package=kp, authz=authz),
    )
    assert refused_with(out) == "mls.key-package.expired" and a.pending_commits(G) == 0
    # the joiner refuses a Welcome to its own package once that has expired
    service.now = T0
    kp = service.key_package("dev-b")
    commit, welcome = service.request_commit(
        "dev-a", CommitAction.ADD, member="dev-b", key_package=kp
    )
    assert isinstance(commit, CommitMessage) and isinstance(welcome, WelcomeMessage)
    acks(service, service.fan_out(service.order(commit), ["dev-a"]))
    service.now = T0 + KEY_PACKAGE_LIFETIME + 1
    out = service.deliver("dev-b", WelcomeDelivery(G, 1, welcome.welcome))
    assert refused_with(out) == "mls.key-package.expired" and b.epoch(G) is None
    # refreshed: the agent drops packages a day before their end, destroying both keys
    assert b.status()["key_packages_outstanding"] >= 1
    held = KeyPackage.decode(kp)
    b.tick(T0 + KEY_PACKAGE_LIFETIME - KEY_PACKAGE_REFRESH - 1)
    assert held.init_key in b.leaf_refs()
    assert b.tick(T0 + KEY_PACKAGE_LIFETIME - KEY_PACKAGE_REFRESH).changed
    assert b.status()["key_packages_outstanding"] == 0
    assert held.init_key not in b.leaf_refs() and held.leaf_key not in b.leaf_refs()
    assert b.ledger.get(init_key_name(held.init_key)).state is KeyState.DESTROYED
    # a fresh request gets a fresh package valid for the full lifetime from now
    service.now = T0 + KEY_PACKAGE_LIFETIME
    fresh = KeyPackage.decode(service.key_package("dev-b"))
    assert fresh.not_after == service.now + KEY_PACKAGE_LIFETIME
