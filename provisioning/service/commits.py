"""Commits: the public checks of a member's commit, the pairing of a commit that adds
members with its welcome, and acceptance.

The service checks in public what it can (``agent.protocol.mls.public.PublicGroup``): committer
signature, epoch, tree shape, that the committer is the envelope's signer, that the service
asked it for this commit (``recovery.check_solicited``: unsolicited commits are refused unless
``[groups] member_updates`` allows them, and then rate-limited), that add/remove match
the job in flight, that key packages carry the added device's registered DevID key, that a
Welcome has one entry per add. It never holds a private group key: it cannot. Stage types:
``CheckedCommit`` (every check short of acceptance passed) and ``AcceptedCommit`` (recorded in
the registry; its ``effects`` relay it).

Ordering: the database's UNIQUE(group, epoch) is the final guard: the first valid commit per
epoch wins, any other is refused with ``ds.commit.epoch_taken``. A commit that adds members is
accepted only together with its welcome; whichever half comes first is held in the database
(``service_held``), so the other half may reach another instance: whoever takes both held rows
accepts the pair (``accept_held``), anyone else finds nothing. An accepted commit is relayed on
``grp/{G}/commit`` and its welcome to each new member on ``dev/{new}/cmd``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.orm import Session

from agent.protocol.errors import ProtocolError
from agent.protocol.hpke import serialize_public_key
from agent.protocol.mls.group import inline_tree
from agent.protocol.mls.messages import Commit, Welcome
from agent.protocol.mls.public import PublicGroup, VerifiedCommit
from agent.protocol.mls.tree import RatchetTree
from agent.protocol.topics import device_cmd_topic, group_commit_topic
from agent.protocol.wire.messages.base import MAX_WELCOME_MESSAGE_SIZE
from agent.protocol.wire.messages.group import CommitMessage, WelcomeMessage
from agent.protocol.wire.messages.service import CommitAction, WelcomeDelivery
from provisioning import audit
from provisioning.db.schema import Group
from provisioning.registry import Outcome, Registry, new_state_token
from provisioning.service import (
    bulkadd,
    execute,
    fullrekey,
    groupcache,
    groupdelete,
    recovery,
    rekeypolicy,
    store,
    verify,
)
from provisioning.service.context import Call
from provisioning.service.effects import (
    AcceptHeld,
    AskAgain,
    Count,
    Effects,
    GroupChanged,
    JobEnded,
    Log,
    Send,
)
from provisioning.service.groupcache import GroupCache
from provisioning.service.model import Job, JobState
from provisioning.service.store import admissions, trees
from provisioning.service.store import wedge as wedge_store

log = logging.getLogger("keyfleet.service")


class _NothingHeld(Exception):
    """Rolls back an attempt to accept a held commit whose welcome is not there."""


@dataclass(frozen=True)
class CheckedCommit:
    """A commit that passed every check short of acceptance, with what it changes."""

    commit: Commit
    public: PublicGroup
    adds: list[str]
    removes: list[str]
    job: Job | None
    updated: tuple[str, ...] = ()  # members whose Updates it commits
    verified: VerifiedCommit | None = None  # what ``public.verify`` returned: the next state
    # the group's head job as the checks read it (``job`` is None when the commit fulfils
    # none: then nothing in acceptance changes the jobs and this is still the head)
    head: Job | None = None
    # the group's row, held so that the session keeps it (its identity map holds rows
    # weakly): acceptance reads it again without another query
    row: Group | None = None


@dataclass(frozen=True)
class AcceptedCommit:
    """A commit the registry took (its transaction may still be open): what to relay, the job
    it ended (if it fulfilled one) or else the group's head job, which may need asking again."""

    sender: str
    relay: CommitMessage
    adds: list[str]
    removes: list[str]
    welcome: bytes | None
    finished: Job | None
    head: Job | None
    # the Authorizations the welcome's inline tree names (none for a tree fetched in pages,
    # whose pages carry them: ``welcome_admissions``)
    admissions: tuple[bytes, ...] = ()

    def effects(self) -> Effects:
        group_id, epoch = self.relay.group_id, self.relay.epoch
        out: Effects = [
            Count("commits", "accepted"),
            Log(
                logging.INFO,
                "accepted the commit of %s for %s epoch %s -> %s (adds %s, removes %s)",
                (self.sender, group_id, epoch, epoch + 1, self.adds or "-", self.removes or "-"),
            ),
            Send(group_commit_topic(group_id), self.relay, group_id),
        ]
        if self.welcome is not None:
            out += [
                Send(
                    device_cmd_topic(device_id),
                    WelcomeDelivery(group_id, epoch + 1, self.welcome, self.admissions),
                    device_id,
                )
                for device_id in self.adds
            ]
        if self.finished is not None:
            out.append(JobEnded(self.finished))
        elif self.head is not None and self.head.state is JobState.REQUESTED:
            # Another member's self-update won the epoch the request was made for: ask
            # again at the new epoch.
            out.append(AskAgain(self.head))
        out.append(GroupChanged(group_id))
        return out


def load_public(
    session: Session, group_id: str, cache: GroupCache | None = None
) -> tuple[PublicGroup, int]:
    """The group's public state as its row holds it, and its epoch: from ``cache`` if it holds
    the copy made for the row's state token, or a copy a few commits behind that replaying
    them brings to the row's state (``groupcache``); else decoded (and kept there)."""
    registry = Registry(session)
    group = registry.group(group_id)
    if cache is not None:
        hit = cache.get(group_id, group.state_token)
        if hit is not None:
            return hit, group.epoch
        behind = cache.peek(group_id)
        if behind is not None and 0 < group.epoch - behind.epoch <= groupcache.MAX_REPLAY:
            try:
                log = [c.commit for c in registry.commits_from(group_id, behind.epoch)]
            except ProtocolError:  # pruned: decode the row
                log = []
            caught_up = log and groupcache.replay(
                behind, log, head=group.public_tree, group_context=group.group_context
            )
            if caught_up:
                cache.replayed()
                cache.put(group_id, group.state_token, caught_up)
                return caught_up, group.epoch
    public = trees.load(session, group_id, group.public_tree)
    if cache is not None:
        cache.put(group_id, group.state_token, public)
    return public, group.epoch


def check_commit(
    cx: Call, session: Session, sender: str, body: CommitMessage, now: int
) -> CheckedCommit:
    """Every check before acceptance; returns the commit, the group's public view, the
    device ids it adds and removes, and the job it fulfils."""
    row = session.get(Group, body.group_id)
    groupdelete.check_live(session, body.group_id)
    public, epoch = load_public(session, body.group_id, cx.env.groups)
    commit = Commit.decode(body.commit)
    if commit.content.epoch != body.epoch:
        raise ProtocolError("ds.commit.epoch_mismatch", "envelope and commit epochs differ")
    if body.epoch < epoch:
        raise ProtocolError(
            "ds.commit.epoch_taken",
            f"group {body.group_id!r}: epoch {body.epoch} already has an accepted commit; "
            f"the group is at epoch {epoch}",
        )
    verified = public.verify(commit)
    registry = Registry(session)
    leaf = public.tree.leaf(commit.content.sender)
    devid = serialize_public_key(verify.devid_public_key(cx, registry.device(sender), now))
    if leaf is None or leaf.device_id != sender.encode() or leaf.signature_key != devid:
        raise ProtocolError(
            "ds.commit.sender", "the commit's committer leaf is not the signing device"
        )
    adds = [kp.device_id.decode() for kp in commit.content.adds]
    removes = []
    for index in commit.content.removes:
        removed_leaf = public.tree.leaf(index)
        assert removed_leaf is not None  # verify() refused blank removes
        removes.append(removed_leaf.device_id.decode())
    for kp in commit.content.adds:
        added = registry.device(kp.device_id.decode())
        if kp.signature_key != serialize_public_key(verify.devid_public_key(cx, added, now)):
            raise ProtocolError(
                "ds.commit.key_package", "an added key package is not the device's DevID key"
            )
    head = store.head_job(session, body.group_id)
    job = recovery.check_solicited(
        cx.env.settings,
        head,
        group_id=body.group_id,
        sender=sender,
        epoch=body.epoch,
        changes_members=bool(adds or removes),
        answered=None
        if body.command_id is None
        else store.job_by_request(session, body.command_id),
        last_commit_at=store.last_commit_at(session, body.group_id, sender),
        now=now,
    )
    if adds or removes:
        assert job is not None  # check_solicited refused an unasked membership change
        authorized = (
            (
                bulkadd.is_multi(job)
                and not removes
                and not bulkadd.missing(job)
                and sorted(kp.encode() for kp in commit.content.adds)
                == sorted(bulkadd.key_packages(job))
            )
            or (
                job.action is CommitAction.ADD
                and job.member is not None
                and not removes
                and len(commit.content.adds) == 1
                and commit.content.adds[0].encode() == job.key_package
            )
            or (job.action is CommitAction.REMOVE and not adds and removes == [job.member])
        )
        if not authorized:
            raise ProtocolError(
                "ds.commit.unauthorized",
                "the commit adds or removes members nobody asked to add or remove",
            )
    if job is not None and rekeypolicy.is_aimed(job) and sender not in job.candidates:
        job = None  # a self-update asked of one member is fulfilled only by that member
    fullrekey.check_updates(session, job, commit, body.epoch)
    updated = []
    for update in commit.content.updates:
        updated_leaf = public.tree.leaf(update.leaf_index)
        assert updated_leaf is not None  # verify() refused Updates of blank leaves
        updated.append(updated_leaf.device_id.decode())
    return CheckedCommit(
        commit, public, adds, removes, job, tuple(updated), verified, head=head, row=row
    )


def on_commit(cx: Call, session: Session, sender: str, body: CommitMessage, now: int) -> Effects:
    checked = check_commit(cx, session, sender, body, now)
    if checked.adds:
        welcome = store.take_held_welcome(session, body.group_id, body.epoch, sender)
        if welcome is None:
            # Held in the database: its welcome may reach another instance.
            store.hold_commit(session, sender, body, now=now)
            return [
                Log(
                    logging.INFO,
                    "commit for %s epoch %s from %s holds until its welcome arrives",
                    (body.group_id, body.epoch, sender),
                ),
                # The welcome may have been held by another instance meanwhile.
                AcceptHeld(body.group_id, body.epoch, sender),
            ]
        return accept_commit(cx, session, sender, body, checked, welcome=welcome, now=now).effects()
    return accept_commit(cx, session, sender, body, checked, welcome=None, now=now).effects()


def on_welcome(cx: Call, session: Session, sender: str, body: WelcomeMessage, now: int) -> Effects:
    groupdelete.check_live(session, body.group_id)
    commit_epoch = body.epoch - 1 if body.epoch > 0 else -1
    held = store.take_held_commit(session, body.group_id, commit_epoch, sender)
    if held is None:
        # The welcome came first (or the commit is at another instance): keep it briefly.
        store.hold_welcome(session, sender, body, commit_epoch=commit_epoch, now=now)
        return [AcceptHeld(body.group_id, commit_epoch, sender)]
    checked = check_commit(cx, session, sender, held, now)
    return accept_commit(cx, session, sender, held, checked, welcome=body, now=now).effects()


def accept_held(cx: Call, group_id: str, epoch: int, sender: str, now: int) -> None:
    """Both halves held (they reached two instances at once): whoever takes both rows
    accepts the commit; anyone else finds nothing."""

    def work(session: Session) -> Effects:
        commit = store.take_held_commit(session, group_id, epoch, sender)
        if commit is None:
            return []
        welcome = store.take_held_welcome(session, group_id, epoch, sender)
        if welcome is None:
            raise _NothingHeld  # roll back: the commit stays held
        checked = check_commit(cx, session, sender, commit, now)
        return accept_commit(
            cx, session, sender, commit, checked, welcome=welcome, now=now
        ).effects()

    try:
        effects = cx.env.tx(work)
    except _NothingHeld:
        return
    except ProtocolError as err:
        verify.refuse(
            cx,
            err,
            actor=f"device:{sender}",
            action=CommitMessage.TYPE,
            target=group_id,
            now=now,
            details={"epoch": epoch},
        )
        return
    execute.run(cx, effects)


def accept_commit(
    cx: Call,
    session: Session,
    sender: str,
    body: CommitMessage,
    checked: CheckedCommit,
    *,
    welcome: WelcomeMessage | None,
    now: int,
) -> AcceptedCommit:
    """Accept ``checked``: the registry moves the group to the next epoch (the database's
    UNIQUE(group, epoch) refuses a second commit for the epoch), the commit log keeps it, the
    job it fulfils ends in the same transaction."""
    commit, public, adds, removes, job = (
        checked.commit,
        checked.public,
        checked.adds,
        checked.removes,
        checked.job,
    )
    if welcome is not None:
        if welcome.epoch != body.epoch + 1 or sorted(welcome.new_members) != sorted(adds):
            raise ProtocolError(
                "ds.welcome.members", "the welcome does not match the commit's adds and epoch"
            )
        public.check_welcome(commit, Welcome.decode(welcome.welcome))
    # verified once, by check_commit, in this transaction against this state
    verified = checked.verified if checked.verified is not None else public.verify(commit)
    following = PublicGroup(verified.next_state())
    added = {
        kp.device_id.decode(): leaf
        for kp, leaf in zip(commit.content.adds, verified.added, strict=True)
    }
    registry = Registry(session)
    token = new_state_token()
    # the tree rows this commit rewrites (O(log N)), and what they hold now
    rows, before = trees.plan(session, body.group_id, public, following)
    row = checked.row if checked.row is not None else session.get(Group, body.group_id)
    if row is not None and not trees.holds_head(row.public_tree):
        # a whole-state row: its undo rows (below) cannot rebuild it for a rollback; any other
        # commit's rollback restores its undo rows (store.wedge)
        wedge_store.save_previous(session, body.group_id, before)
    registry.append_commit(
        body.group_id,
        epoch=body.epoch,
        committer=sender,
        commit=body.commit,
        welcome=None if welcome is None else welcome.welcome,
        public_tree=trees.head(following.state),
        group_context=following.state.group_context(),
        added=added,
        removed=removes,
        now=now,
        now_ms=cx.clock.ms,
        state_token=token,
    )
    # what rebuilds this epoch's tree for its joiners while the commit is kept (treepages) and
    # what a rollback restores if members cannot process this commit (recovery, rollback);
    # after the commit log's row, whose key decides a race for the epoch (EpochConflict)
    trees.save_undo(session, body.group_id, public, before)
    trees.write(session, body.group_id, rows)
    # The next commit starts from this copy if the row still has this token then (a rollback
    # of this transaction leaves a token no row has: the copy is never used).
    cx.env.groups.put(body.group_id, token, following)
    if welcome is not None:
        # its joiners may ask for this epoch's tree after the group has moved on (treepages)
        cx.env.tree_pages.keep(body.group_id, following.epoch, following.tree)
    delivered: tuple[bytes, ...] = ()
    if commit.content.adds and commit.content.authz is not None:
        # the added leaves record its hash; joiners get it from us (members keep none)
        admissions.keep(session, body.group_id, [commit.content.authz], epoch=following.epoch)
    if welcome is not None:
        delivered = welcome_admissions(session, body.group_id, following.tree, welcome.welcome)
    rekeypolicy.record_commit(
        session,
        body.group_id,
        committer=sender,
        epoch=body.epoch,
        added=adds,
        removed=removes,
        updated=checked.updated,
        now=now,
        bounds=rekeypolicy.row_bounds(cx, session, body.group_id),
    )
    below = body.epoch + 1 - cx.env.settings.retention_epochs
    if below > 0:
        registry.prune_commit_log(body.group_id, below)
        trees.drop_undo(session, body.group_id, below=below)
    details: dict[str, str | int | None] = {
        "epoch": body.epoch,
        "new_epoch": body.epoch + 1,
        "adds": ",".join(adds),
        "removes": ",".join(removes),
        "command_id": None if body.command_id is None else body.command_id.hex(),
    }
    audit.append(
        session,
        now=now,
        actor=f"device:{sender}",
        action="group.commit",
        target=body.group_id,
        outcome=Outcome.ACCEPTED,
        details=details,
    )
    store.drop_held(session, body.group_id, body.epoch)
    # The job ends in the commit's own transaction: no instance can see the epoch moved
    # and the job still in flight.
    if (
        job is not None
        and fullrekey.is_batch(job)
        and fullrekey.after_commit(session, job, sender, list(checked.updated))
        and store.save_job(session, job, cx.env.instance)
    ):
        # a full rekey with proposals left: it keeps the slot, its next batch goes out next
        finished: Job | None = None
        head: Job | None = job
    else:
        if job is not None and fullrekey.is_batch(job):
            fullrekey.forget(session, job)
        finished = job if job is not None and store.end_job(session, job, JobState.DONE) else None
        if finished is not None:
            head = None
        elif job is None:
            head = checked.head  # no job changed since the checks read it
        else:
            head = store.head_job(session, body.group_id)
    return AcceptedCommit(
        sender,
        CommitMessage(body.group_id, body.epoch, body.commit, body.command_id),
        adds,
        removes,
        None if welcome is None else welcome.welcome,
        finished,
        head,
        delivered,
    )


WELCOME_FRAME_MARGIN = 64 << 10
"""What a ``svc.welcome`` frame needs besides its Welcome and Authorizations (envelope, ids,
CBOR headers), with room to spare."""


def welcome_admissions(
    session: Session, group_id: str, tree: RatchetTree, welcome: bytes
) -> tuple[bytes, ...]:
    """The Authorizations a Welcome's joiners get with it: every one the tree's leaves name,
    when the Welcome carries the tree (``inline_tree``: at most 256 leaves, so at most 256
    Authorizations) and they fit its frame; else none, and the joiner fetches the tree's pages,
    which carry them (docs/treekem.md, "Admissions delivered by the service")."""
    if not inline_tree(tree):
        return ()
    found = admissions.load(session, group_id, tree.admission_hashes())
    carried = tuple(a for _, a in sorted(found.items()))
    if len(welcome) + sum(len(a) for a in carried) + WELCOME_FRAME_MARGIN > (
        MAX_WELCOME_MESSAGE_SIZE
    ):
        log.warning(
            "group %s: the Authorizations of the welcome's tree do not fit its frame: its "
            "joiners fetch them with the tree's pages",
            group_id,
        )
        return ()
    return carried
