"""The operators' Authorizations delivered by the service (docs/treekem.md, "Admissions delivered
by the service"): members keep none and a Welcome carries none, so a group grown by one add
request per member (one distinct Authorization per leaf) still gets Welcomes of a few KB and
member states that do not grow with the Authorizations; the joiner gets them with the tree's
pages (or, for a tree of at most 256 leaves, with the ``svc.welcome``) and takes each by the
admission hash a leaf records.

The service side on a real SQLite registry (tests/service_members.py members): it keeps the
creation's and every add's Authorization, sends those an inline tree names with the Welcome,
and refuses a founder that names another creation Authorization than its leaf records
(``ds.create.admission``, nothing created)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import delete

from agent.protocol.errors import ProtocolError
from agent.protocol.mls import codec
from agent.protocol.mls.group import Group, admissions_of
from agent.protocol.mls.messages import Welcome
from agent.protocol.mls.public import admission_hash
from agent.protocol.mls.tree import LeafNode
from agent.protocol.mls.treepages import MAX_PAGE_BYTES, TreeCollector, paginate
from agent.protocol.mls.treepages import TreePage as Page
from agent.protocol.wire.envelope import Signer, encode_message, open_message
from agent.protocol.wire.messages.base import MAX_WELCOME_MESSAGE_SIZE, Body
from agent.protocol.wire.messages.group import GroupAdmissions
from agent.protocol.wire.messages.result import ResultStatus
from agent.protocol.wire.messages.service import TreePage, WelcomeDelivery
from provisioning.db.schema import Group as GroupRow
from provisioning.db.schema import GroupAdmission
from provisioning.service import commits
from tests.pure.test_agent_core import G, group_of_two
from tests.pure.test_mls_welcome_pages import _Joiner, _members
from tests.pure.test_service_core import Fleet, create_g1, make_fleet
from tests.service_members import group_add, group_create

pytestmark = pytest.mark.pure

N = 2100
"""Members, each admitted by its own add request: past the ~2,000 at which the Authorizations
alone (2 KiB each) would no longer fit a 4 MiB Welcome."""
AUTHZ_BYTES = 2048
"""About the size of an operators' Authorization with its policy chain."""


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


class Grown:
    """A group of ``N`` members at epoch ``N``, member i admitted by ``authorizations[i]``, and
    the Welcome of one more member (admitted by ``added``) made by member 100."""

    def __init__(self) -> None:
        self.members = _members(N, "grown")
        self.authorizations = [os.urandom(AUTHZ_BYTES) for _ in range(N)]
        self.groups = Group.assemble(
            b"grown", self.members, epoch=N, authorizations=self.authorizations
        )
        self.joiner = _Joiner()
        self.added = os.urandom(AUTHZ_BYTES)
        result = self.groups[100].add(self.members[100][2], [self.joiner.kp], authz=self.added)
        assert result.welcome is not None
        self.welcome = result.welcome.encode()
        self.committed = result.group
        # what the service keeps for the group: every Authorization it accepted
        self.stored = admissions_of([*self.authorizations, self.added])


@pytest.fixture(scope="module")
def grown() -> Grown:
    return Grown()


def _wire(body: Body, key: ec.EllipticCurvePrivateKey) -> Body:
    """``body`` signed as the service sends it and opened as the device does (the message's own
    size limit checked on the way)."""
    data = encode_message(body, key=key, sender="service", to="joiner", seq=1, time=1_700_000_000)
    assert len(data) <= type(body).MAX_MESSAGE_SIZE
    return open_message(
        data,
        lambda kid: Signer("service", key.public_key()),
        now=1_700_000_000,
        recipients={"joiner"},
    ).body


def test_a_welcome_into_a_group_grown_one_add_at_a_time_stays_small_and_joins_through_pages(
    grown: Grown,
) -> None:
    service_key = _key()
    authorizations = sum(len(a) for a in grown.stored.values())
    # carried in the Welcome, the Authorizations alone would pass its frame
    assert authorizations > MAX_WELCOME_MESSAGE_SIZE
    delivered = _wire(WelcomeDelivery("grown", N + 1, grown.welcome), service_key)
    assert isinstance(delivered, WelcomeDelivery)
    assert len(grown.welcome) < 2048
    assert not any(a in grown.welcome for a in grown.authorizations[:50])
    opened = Group.open_welcome(
        Welcome.decode(delivered.welcome),
        grown.joiner.kp,
        grown.joiner.leaf,
        init_key=grown.joiner.init,
    )
    assert opened.info.tree is None
    pages = paginate(grown.committed.tree, admissions=grown.stored)
    # every page with its Authorizations under the page limit; each Authorization once
    assert all(p.size <= MAX_PAGE_BYTES for p in pages)
    carried = [a for p in pages for a in p.admissions]
    assert len(carried) == len(set(carried)) == N + 1
    assert len(pages) >= 4  # ~2.7 MB of tree and ~4.3 MB of Authorizations
    collector = TreeCollector("grown", N + 1, opened.info.tree_hash)
    for p in pages:
        page = _wire(
            TreePage("grown", N + 1, p.index, p.count, p.width, p.start, p.nodes, p.admissions),
            service_key,
        )
        assert isinstance(page, TreePage)
        collector.add(
            page.group_id,
            page.epoch,
            Page(page.page, page.pages, page.width, page.start, page.nodes, page.admissions),
        )
    tree = collector.tree()
    seen: dict[bytes, bytes | None] = {}

    def record(leaf: LeafNode, authz: bytes | None, is_own: bool) -> None:
        seen[leaf.device_id] = authz

    joined = Group.join_opened(
        opened,
        grown.joiner.kp,
        grown.joiner.leaf,
        tree=tree,
        admissions=collector.admissions(tree),
        admission_check=record,
    )
    assert joined.epoch_authenticator == grown.committed.epoch_authenticator
    assert joined.tree.member_count() == N + 1
    # every member was judged with its own Authorization
    assert seen[b"grown-000007"] == grown.authorizations[7]
    assert seen[b"joiner"] == grown.added
    assert len(set(seen.values())) == N + 1


def test_a_members_state_does_not_grow_with_the_distinct_authorizations(grown: Grown) -> None:
    """The same members assembled under one Authorization: every member's state is the same
    size (within a few bytes of signature encodings) as with one Authorization each, and holds
    none of them."""
    one = Group.assemble(b"grown", grown.members, epoch=N, authz=os.urandom(AUTHZ_BYTES))
    for i in (0, 100, N - 1):
        distinct = codec.encode(grown.groups[i].to_state())
        single = codec.encode(one[i].to_state())
        # the same but for signature lengths (DER) and the like; 2,100 Authorizations would
        # add 4.3 MB
        assert abs(len(distinct) - len(single)) < 1024
        assert grown.authorizations[i] not in distinct
    joined_state = codec.encode(grown.committed.to_state())
    assert grown.added not in joined_state


def test_withheld_or_swapped_authorizations_in_the_pages_are_refused(grown: Grown) -> None:
    """Attack: the service leaves one member's Authorization out of the pages, or sends
    another one under its hash: ``mls.welcome.admission``, nothing joins."""
    opened = Group.open_welcome(
        Welcome.decode(grown.welcome),
        grown.joiner.kp,
        grown.joiner.leaf,
        init_key=grown.joiner.init,
    )
    victim = admission_hash(grown.authorizations[1234])
    withheld = {h: a for h, a in grown.stored.items() if h != victim}
    swapped = {**grown.stored, victim: os.urandom(AUTHZ_BYTES)}
    for stored in (withheld, swapped):
        collector = TreeCollector("grown", N + 1, opened.info.tree_hash)
        for p in paginate(grown.committed.tree, admissions=stored):
            collector.add("grown", N + 1, p)
        tree = collector.tree()
        with pytest.raises(ProtocolError) as err:
            Group.join_opened(
                opened,
                grown.joiner.kp,
                grown.joiner.leaf,
                tree=tree,
                admissions=collector.admissions(tree),
            )
        assert err.value.check == "mls.welcome.admission"


# -- the service ---------------------------------------------------------------------------------


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    yield from make_fleet(tmp_path)


def test_the_service_keeps_each_authorization_and_sends_an_inline_trees_with_the_welcome(
    fleet: Fleet,
) -> None:
    fleet.record = True
    create_g1(fleet, "dev-1", "dev-2")
    kept = fleet.admissions("g1")
    assert len(kept) == 2  # the creation's and dev-2's add
    assert all(admission_hash(a) == h for h, a in kept.items())
    welcomes = [b for to, b in fleet.to_devices if isinstance(b, WelcomeDelivery)]
    assert [set(w.admissions) for w in welcomes] == [set(kept.values())]
    fleet.to_devices.clear()
    cid = fleet.command("op-alice", group_add("g1", "dev-3"))
    assert fleet.final(cid).status is ResultStatus.DONE
    kept = fleet.admissions("g1")
    assert len(kept) == 3
    (welcome,) = [b for to, b in fleet.to_devices if isinstance(b, WelcomeDelivery)]
    assert set(welcome.admissions) == set(kept.values())
    # no member keeps them: its state holds none
    for device in fleet.devices.values():
        state = codec.encode(device.groups["g1"].to_state())
        assert not any(a in state for a in kept.values())
    assert len({d.groups["g1"].epoch_authenticator for d in fleet.devices.values()}) == 1


@pytest.mark.parametrize("forgery", ["another", "none"])
def test_a_founder_naming_another_or_no_creation_authorization_is_refused(
    fleet: Fleet, forgery: str
) -> None:
    """Attack: the founder's ``group.created`` names an Authorization its leaf does not record,
    or none (the service would deliver the wrong one, or none, to every joiner):
    ``ds.create.admission``, no group is created and nothing is kept."""
    if forgery == "none":
        fleet.devices["dev-1"].omit_created_authz = True
    else:
        fleet.devices["dev-1"].created_authz = b"another creation authorization"
    before = fleet.service.rejections.count("ds.create.admission")
    fleet.command("op-alice", group_create("g1", "dev-1", "dev-2"))
    assert fleet.service.rejections.count("ds.create.admission") == before + 1
    with fleet.sessions() as s:
        assert s.get(GroupRow, "g1") is None
    assert fleet.admissions("g1") == {}


def test_authorizations_that_do_not_fit_the_welcomes_frame_come_with_the_pages(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An inline tree's Authorizations too large for the ``svc.welcome`` frame (a frame this
    small stands in for 256 Authorizations of 16 KiB and more): the service sends the Welcome
    without them, the joiner fetches the tree's pages, which carry them, and joins."""
    create_g1(fleet, "dev-1", "dev-2")
    fleet.record = True
    monkeypatch.setattr(commits, "MAX_WELCOME_MESSAGE_SIZE", commits.WELCOME_FRAME_MARGIN + 1024)
    cid = fleet.command("op-alice", group_add("g1", "dev-3"))
    assert fleet.final(cid).status is ResultStatus.DONE
    (welcome,) = [b for to, b in fleet.to_devices if isinstance(b, WelcomeDelivery)]
    assert welcome.admissions == ()
    pages = [b for to, b in fleet.to_devices if to == "dev-3" and isinstance(b, TreePage)]
    assert pages and {a for p in pages for a in p.admissions} == set(
        fleet.admissions("g1").values()
    )
    assert len({d.groups["g1"].epoch_authenticator for d in fleet.devices.values()}) == 1


# -- the handover after an upgrade ---------------------------------------------------------------


def test_members_hand_over_the_authorizations_their_old_states_held(fleet: Fleet) -> None:
    """A group the service kept no Authorization of (made before it did): a member hands over
    those its version-2 state held (``group.admissions``); the service keeps the ones a leaf
    names and ignores the rest, refuses a non-member (``ds.group.member``), and a new member
    then joins."""
    create_g1(fleet, "dev-1", "dev-2")
    kept = fleet.admissions("g1")
    assert len(kept) == 2
    with fleet.sessions.begin() as s:
        s.execute(delete(GroupAdmission))
    assert fleet.admissions("g1") == {}
    stray = b"an Authorization no leaf names"
    before = fleet.service.rejections.count("ds.group.member")
    handed = GroupAdmissions("g1", (*kept.values(), stray))
    fleet.send(fleet.devices["dev-3"].report(handed, fleet.now))
    assert fleet.service.rejections.count("ds.group.member") == before + 1
    assert fleet.admissions("g1") == {}
    fleet.send(fleet.devices["dev-2"].report(handed, fleet.now))
    assert fleet.admissions("g1") == kept
    cid = fleet.command("op-alice", group_add("g1", "dev-3"))
    assert fleet.final(cid).status is ResultStatus.DONE
    assert len({d.groups["g1"].epoch_authenticator for d in fleet.devices.values()}) == 1


def test_an_agent_restored_from_a_version_2_state_hands_its_authorizations_over_once() -> None:
    service, a, _ = group_of_two()
    held = tuple(service.authorizations[G].values())
    state = a.to_state()
    group_state = state["groups"][G]["group"]
    state["groups"][G]["group"] = {**group_state, "v": 2, "admissions": list(held)}
    restored = service.restarted(a)
    restored.restore(state)
    service.devices["dev-a"] = restored
    out = restored.tick(service.now)
    handed = [b for b in service.bodies("dev-a", out) if isinstance(b, GroupAdmissions)]
    assert [(h.group_id, set(h.admissions)) for h in handed] == [(G, set(held))]
    again = restored.tick(service.now + 1)
    assert not [b for b in service.bodies("dev-a", again) if isinstance(b, GroupAdmissions)]
    # what it saves now is version 3: nothing to hand over after the next restart
    saved = restored.to_state()
    assert saved["groups"][G]["group"]["v"] == 3
    later = service.restarted(restored)
    later.restore(saved)
    assert not [
        b
        for b in service.bodies("dev-a", later.tick(service.now + 2))
        if isinstance(b, GroupAdmissions)
    ]
