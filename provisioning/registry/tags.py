"""Device tags in the registry: set at enrollment (``keyprovision --tag``) or by an operator
(``keyfleet device tag DEVICE --add T --remove T``), listed by ``keyfleet devices``, and
resolved to devices by a group request (``keyfleet group create G --all-in TAG``).

A tag only selects devices: the group request built from it names the devices themselves (with
their DevID key hashes) and goes through dual control, so approvers approve concrete devices,
not a tag whose devices may change after they looked. Functions over a caller's Session, like
``Registry``; they never commit. Refusals: ``tag.invalid`` (syntax,
``agent.protocol.wire.messages.operator.TAG_PATTERN``), ``tag.limit`` (more than ``MAX_TAGS``
on one device), ``tag.empty`` (a tag that resolves to no device); each checked before anything
is written.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from agent.protocol.errors import ProtocolError
from agent.protocol.wire.messages.operator import MAX_TAGS, check_tag
from provisioning.db.schema import Device, DeviceState, DeviceTag, GroupMember
from provisioning.registry.repository import Registry

# The devices a tag resolves to for a group: those that may be given a leaf. Revoked and
# destroyed ones never will; a quarantined one not until it attests trusted again.
JOINABLE = frozenset({DeviceState.REGISTERED, DeviceState.ACTIVE})


def check_tags(tags: Iterable[str]) -> tuple[str, ...]:
    """The tags, each checked (``tag.invalid``), each once, in the order given."""
    out = tuple(dict.fromkeys(tags))
    for tag in out:
        check_tag(tag)
    return out


def tags_of(session: Session, device_ids: Collection[str] | None = None) -> dict[str, list[str]]:
    """Each tagged device's tags, sorted (all devices, or only ``device_ids``)."""
    query = select(DeviceTag.device_id, DeviceTag.tag).order_by(DeviceTag.device_id, DeviceTag.tag)
    if device_ids is not None:
        query = query.where(DeviceTag.device_id.in_(list(device_ids)))
    out: dict[str, list[str]] = {}
    for device_id, tag in session.execute(query):
        out.setdefault(device_id, []).append(tag)
    return out


def device_tags(session: Session, device_id: str) -> tuple[str, ...]:
    return tuple(tags_of(session, (device_id,)).get(device_id, ()))


def change_tags(
    session: Session,
    device_id: str,
    *,
    add: Iterable[str] = (),
    remove: Iterable[str] = (),
    now: int,
) -> tuple[str, ...]:
    """Add ``add`` to ``device_id``'s tags and take ``remove`` off; adding a tag it has or
    removing one it lacks changes nothing. Returns its tags afterwards. Raises
    ``registry.device.unknown``, ``tag.invalid`` or ``tag.limit`` before writing anything."""
    Registry(session).device(device_id)
    adding, removing = check_tags(add), check_tags(remove)
    if set(adding) & set(removing):
        raise ProtocolError("tag.invalid", "a tag is both added and removed")
    held = set(device_tags(session, device_id))
    after = (held - set(removing)) | set(adding)
    if len(after) > MAX_TAGS:
        raise ProtocolError(
            "tag.limit", f"{device_id} would hold {len(after)} tags; at most {MAX_TAGS}"
        )
    gone = held & set(removing)
    if gone:
        session.execute(
            delete(DeviceTag).where(DeviceTag.device_id == device_id, DeviceTag.tag.in_(gone))
        )
    for tag in adding:
        if tag not in held:
            session.add(DeviceTag(device_id=device_id, tag=tag, added_at=now))
    session.flush()
    return tuple(sorted(after))


def tagged(session: Session, tag: str) -> tuple[str, ...]:
    """Every device holding ``tag``, whatever its state, by device id."""
    check_tag(tag)
    rows = session.scalars(
        select(DeviceTag.device_id).where(DeviceTag.tag == tag).order_by(DeviceTag.device_id)
    )
    return tuple(rows)


def resolve(session: Session, tag: str, *, group: str | None = None) -> tuple[str, ...]:
    """The devices a group request by ``tag`` names, by device id: those holding the tag that
    may join a group (``JOINABLE``: not revoked, destroyed or quarantined) and, with
    ``group``, are not in it yet (nor being added). ``tag.empty`` if that leaves none."""
    check_tag(tag)
    query = (
        select(DeviceTag.device_id)
        .join(Device, Device.device_id == DeviceTag.device_id)
        .where(DeviceTag.tag == tag, Device.state.in_(list(JOINABLE)))
        .order_by(DeviceTag.device_id)
    )
    if group is not None:
        inside = select(GroupMember.device_id).where(GroupMember.group_id == group)
        query = query.where(DeviceTag.device_id.not_in(inside))
    found = tuple(session.scalars(query))
    if not found:
        where = "" if group is None else f" outside group {group!r}"
        raise ProtocolError(
            "tag.empty",
            f"no device tagged {tag!r} can join{where} (none holds the tag, or those that do "
            "are revoked, destroyed, quarantined or members already)",
        )
    return found
