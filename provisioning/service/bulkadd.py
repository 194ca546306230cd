"""Many members added by one commit (a *multi-add* job): how a group creation or a group add of
several devices is cut into commits, and the joiners' key packages collected for each.

A multi-add job is a ``Job`` of action ``add`` with no ``member``: its joiners are its
``candidates`` (in order) and ``key_package`` holds the key packages received so far, a
deterministic CBOR map device id -> encoded KeyPackage. The service asks every joiner for a key
package under the job's request id, asks again those that have not answered at each
``commit_request_timeout``, and asks one member to commit all of them in one commit
(``svc.commit_request`` with ``key_packages``) once every joiner answered; the job ends with
that commit (one Welcome for all joiners). A chunk of a group creation does not wait longer
than one ``commit_request_timeout`` for a silent founder: it commits the joiners it has and
the others go on in a follow-up multi-add of the same operation (``split_off_missing``); a
``group.add`` of several devices adds exactly the named set (devices check it), so it waits.
Docs: docs/treekem.md "Many members in one commit", docs/operations.md "Creating a large
group".

How many joiners per commit: the commit carries every added KeyPackage and the operators'
Authorization, and a ``group.commit`` (like the ``svc.commit_request`` before it and the relayed
commit after it) is at most 256 KiB. ``adds_per_commit`` budgets ``KEY_PACKAGE_ROOM`` bytes
per KeyPackage (a DevID certificate and two TPM residency proofs: about 1.5 KB) in what is
left of the frame after the Authorization and ``OTHER_ROOM`` (UpdatePath, policy chain,
envelope). A 1,000-member creation with short device ids (an Authorization of about 55 to 60
KB) gets 86 to 88 joiners per commit: 12 commits. Measured: the virtual fleet's key packages
(a certificate and two simulated TPM proofs) are about 1.9 KB, so a commit of 107 joiners
with a 300-member Authorization is 225 KB. The Welcome is never the bound: it carries the tree
(about 850 bytes per member) only up to 256 members, past that the tree's hash, and joiners
fetch the tree in pages (docs/treekem.md, "Joining a large group").
"""

from __future__ import annotations

from typing import Final

from agent.protocol.errors import ProtocolError
from agent.protocol.mls.messages import MAX_ADDS
from agent.protocol.wire import cbor
from agent.protocol.wire.messages.base import DEFAULT_MAX_MESSAGE_SIZE
from agent.protocol.wire.messages.service import CommitAction
from provisioning.service.model import Job

FIRST_UPDATES_BATCH_MIN: Final = 16
"""A creation with at least this many joiners ends with a full-rekey job
(``fullrekey.first_updates``): every joiner's first update as an Update proposal, a few
commits for all of them. Below it each joiner makes its own first self-update, one commit
each, as after a single add (docs/treekem.md "Joining"); above it those N - 1 commits, each
processed by every member, would cost O(N^2) and, one per device tick, minutes."""
KEY_PACKAGE_ROOM: Final = 2048
OTHER_ROOM: Final = 24 * 1024
PATH_ROOM: Final = 8 * 1024  # UpdatePath (~2.5 KB at 4,096 members), envelope, CBOR
MAX_JOINERS: Final = MAX_ADDS


def adds_per_commit(authz_size: int) -> int:
    """Joiners one commit may add when it carries an Authorization of ``authz_size`` bytes.
    ``ds.add.frame`` when not even one fits."""
    room = DEFAULT_MAX_MESSAGE_SIZE - OTHER_ROOM - authz_size
    count = min(MAX_JOINERS, room // KEY_PACKAGE_ROOM)
    if count < 1:
        raise ProtocolError(
            "ds.add.frame",
            f"an authorization of {authz_size} bytes leaves no room for a key package in a commit",
        )
    return count


def estimated_authz_size(members: int) -> int:
    """A generous estimate of the Authorization of a request naming ``members`` devices
    (each about 50 to 110 bytes, with two approvals and the policy chain in ``OTHER_ROOM``),
    for refusing at proposal time what could not be carried out."""
    return 4096 + 110 * members


def check_fits(
    key_packages: tuple[bytes, ...], authz: bytes | None, policies: tuple[bytes, ...]
) -> None:
    """``ds.add.frame`` unless a commit adding ``key_packages`` under ``authz`` (the larger
    of what the job's chunking assumed) still fits a frame: the KeyPackages turned out larger
    than ``KEY_PACKAGE_ROOM`` each. The job fails rather than have the committer's commit
    refused as oversize."""
    size = sum(map(len, key_packages)) + len(authz or b"") + sum(map(len, policies))
    if size > DEFAULT_MAX_MESSAGE_SIZE - PATH_ROOM:
        raise ProtocolError(
            "ds.add.frame",
            f"{len(key_packages)} key packages and the authorization take {size} bytes: "
            "more than a commit may carry",
        )


def chunks(members: tuple[str, ...], size: int) -> list[tuple[str, ...]]:
    return [members[i : i + size] for i in range(0, len(members), size)]


def is_multi(job: Job) -> bool:
    return job.action is CommitAction.ADD and job.member is None


def joiners(job: Job) -> tuple[str, ...]:
    return job.candidates


def collected(job: Job) -> dict[str, bytes]:
    """The key packages received so far, by device id."""
    if job.key_package is None:
        return {}
    value = cbor.decode(job.key_package)
    assert isinstance(value, dict)
    return {str(k): bytes(v) for k, v in value.items()}


def missing(job: Job) -> list[str]:
    have = collected(job)
    return [d for d in joiners(job) if d not in have]


def store_collected(job: Job, have: dict[str, bytes]) -> None:
    """Put the key packages collected (``collected``, with more added) back into ``job``."""
    job.key_package = cbor.encode(have) if have else None


def key_packages(job: Job) -> tuple[bytes, ...]:
    """Every joiner's key package, in joiner order (the job must be complete)."""
    have = collected(job)
    return tuple(have[d] for d in joiners(job))


def new_job(group_id: str, members: tuple[str, ...], request_id: bytes) -> Job:
    return Job(CommitAction.ADD, group_id, None, request_id, candidates=members)


def leave_out(job: Job, device_id: str) -> None:
    """Drop ``device_id`` from the job's joiners and from the key packages collected."""
    have = collected(job)
    have.pop(device_id, None)
    job.candidates = tuple(d for d in joiners(job) if d != device_id)
    store_collected(job, have)


def split_off_missing(job: Job, request_id: bytes) -> Job | None:
    """A creation's chunk whose key-package wait passed its deadline: keep the joiners whose
    key package is in (the chunk commits them now) and return a follow-up multi-add of the
    others, of the same operation. None when nothing is in yet or nothing is missing.
    Only for a creation: devices accept a commit adding any of the founders its
    Authorization names, but exactly the named devices of a ``group.add``."""
    have = collected(job)
    late = tuple(missing(job))
    if not have or not late:
        return None
    job.candidates = tuple(d for d in joiners(job) if d in have)
    follow_up = new_job(job.group_id, late, request_id)
    follow_up.command_id = job.command_id
    return follow_up
