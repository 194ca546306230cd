"""What every message body shares: the base class and the field checks.

A body is a frozen dataclass. Its ``__post_init__`` checks every field (type and bounds), so a
body that exists is valid whether it came off the wire or was built by our own code, and there is
one validation path, not two. ``from_cbor_map`` only checks the set of keys (all required ones
present, no unknown ones), turns arrays into tuples and nested maps into nested dataclasses, and
calls the constructor.

Check ids: ``body.malformed`` (not a map, missing or unknown field), ``body.type`` (a field has the
wrong CBOR type), ``body.bounds`` (a field's length, range or enumeration value is wrong).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar, cast

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

from agent.protocol.errors import ProtocolError

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""Device, group, operator and service ids: safe as one MQTT topic level (no ``/``, ``+``, ``#``,
no leading ``$``), at most 64 characters."""

UINT64_MAX = (1 << 64) - 1
DEFAULT_MAX_MESSAGE_SIZE = 256 * 1024
MAX_WELCOME_MESSAGE_SIZE = 4 << 20
"""Welcomes of groups up to 256 members carry the whole tree (with every member's DevID
certificate); larger ones reference it by hash and the joiner fetches it in ``svc.tree_page``s
(at most ``MAX_TREE_PAGE_MESSAGE_SIZE``). Both may pass 256 KiB."""
MAX_TREE_PAGE = 1 << 20
"""Largest encoded node list of one ``svc.tree_page`` (agent.protocol.mls.treepages)."""
MAX_TREE_PAGE_MESSAGE_SIZE = MAX_TREE_PAGE + (64 << 10)
MAX_TREE_PAGES = 4096
MAX_AUTHORIZATION = 64 << 10
"""Largest operators' Authorization a leaf's admission hash may name (as the MLS layer's)."""
MAX_WELCOME_ADMISSIONS = 256
"""Authorizations a ``svc.welcome`` carries: those a tree of at most 256 leaves (one carried
inline in the Welcome) names, each once."""


def check_admissions(value: object, name: str, *, max_items: int, max_total: int) -> None:
    """Operators' Authorizations delivered by their hash (a leaf's admission hash): a tuple of
    distinct byte strings, each 1..``MAX_AUTHORIZATION`` bytes, at most ``max_total`` in all."""
    check_tuple(value, name, max_len=max_items)
    assert isinstance(value, tuple)
    total = 0
    for item in value:
        check_bytes(item, f"{name}[]", min_len=1, max_len=MAX_AUTHORIZATION)
        total += len(item)
    if total > max_total:
        raise ProtocolError("body.bounds", f"{name} holds more than {max_total} bytes")
    if len(set(value)) != len(value):
        raise ProtocolError("body.bounds", f"{name} holds duplicates")


MAX_TREE_WIDTH = 2 * (1 << 17) - 1
MAX_LIST = 4096
MAX_OPAQUE = 1 << 20
MAX_TEXT = 1024


class Record:
    """A frozen dataclass that maps to a CBOR map with text keys named like its fields.

    Fields whose default is ``None`` are optional on the wire (absent when ``None``); all other
    fields are required. ``NESTED`` names fields that hold a tuple of records (or one record),
    ``ENUMS`` fields that hold a ``StrEnum``. Subclasses check their values in ``__post_init__``.
    """

    NESTED: ClassVar[Mapping[str, type[Record]]] = {}
    ENUMS: ClassVar[Mapping[str, type[StrEnum]]] = {}

    def to_cbor_map(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for field in dataclasses.fields(cast("DataclassInstance", self)):
            value = getattr(self, field.name)
            if value is not None:
                out[field.name] = _to_cbor(value)
        return out

    @classmethod
    def from_cbor_map(cls, value: object) -> Self:
        required, optional = _field_names(cls)
        kwargs = fields(value, cls.__name__, required, optional)
        for name, item in kwargs.items():
            if name in cls.NESTED:
                nested = cls.NESTED[name]
                if isinstance(item, list):
                    kwargs[name] = tuple(nested.from_cbor_map(x) for x in item)
                else:
                    kwargs[name] = nested.from_cbor_map(item)
            elif name in cls.ENUMS:
                kwargs[name] = to_enum(cls.ENUMS[name], item, name)
            elif isinstance(item, list):
                kwargs[name] = tuple(item)
        return cls(**kwargs)


_FIELD_NAMES: dict[type[Record], tuple[frozenset[str], frozenset[str]]] = {}


def _field_names(cls: type[Record]) -> tuple[frozenset[str], frozenset[str]]:
    """A record class's (required, optional) field names: found once per class, not per map
    read."""
    found = _FIELD_NAMES.get(cls)
    if found is None:
        spec = dataclasses.fields(cast("type[DataclassInstance]", cls))
        found = (
            frozenset(f.name for f in spec if f.default is dataclasses.MISSING),
            frozenset(f.name for f in spec if f.default is not dataclasses.MISSING),
        )
        _FIELD_NAMES[cls] = found
    return found


def _to_cbor(value: object) -> object:
    if isinstance(value, Record):
        return value.to_cbor_map()
    if isinstance(value, StrEnum):
        return value.value
    if isinstance(value, tuple):
        return [_to_cbor(item) for item in value]
    return value


_E = TypeVar("_E", bound=StrEnum)


def to_enum(enum: type[_E], value: object, name: str) -> _E:
    """The member of ``enum`` whose value is ``value``; ``body.bounds`` if there is none."""
    if type(value) is not str:
        raise ProtocolError("body.type", f"{name} must be a text string")
    try:
        return enum(value)
    except ValueError:
        raise ProtocolError("body.bounds", f"{name}: unknown value") from None


def check_enum(value: object, name: str, enum: type[StrEnum]) -> None:
    if not isinstance(value, enum):
        raise ProtocolError("body.type", f"{name} must be a {enum.__name__}")


class Body(Record):
    """Base of every message body. Subclasses are frozen dataclasses with a ``TYPE`` string."""

    TYPE: ClassVar[str]
    MAX_MESSAGE_SIZE: ClassVar[int] = DEFAULT_MAX_MESSAGE_SIZE
    """The largest signed message (COSE_Sign1 bytes) of this type a receiver decodes."""

    def group_epoch(self) -> tuple[str, int] | None:
        """``(group id, epoch)`` when the message belongs to a group epoch (for rollback checks),
        else ``None``."""
        return None


def fields(
    value: object, cls_name: str, required: Collection[str], optional: Collection[str] = ()
) -> dict[str, Any]:
    """Check that ``value`` is a map whose keys are the ``required`` ones plus any of
    ``optional``, and return it as keyword arguments."""
    if not isinstance(value, Mapping):
        raise ProtocolError("body.malformed", f"{cls_name}: body must be a map")
    keys = set(value)
    missing = set(required) - keys
    if missing:
        raise ProtocolError("body.malformed", f"{cls_name}: missing {sorted(missing)}")
    unknown = keys - set(required) - set(optional)
    if unknown:
        names = sorted(str(key) for key in unknown)
        raise ProtocolError("body.malformed", f"{cls_name}: unknown fields {names}")
    return {str(key): item for key, item in value.items()}


def as_tuple(value: object, name: str) -> tuple[object, ...]:
    """An array field as a tuple (arrays decode to lists; frozen bodies hold tuples)."""
    if not isinstance(value, list | tuple):
        raise ProtocolError("body.type", f"{name} must be an array")
    return tuple(value)


def check_uint(value: object, name: str, *, maximum: int = UINT64_MAX, minimum: int = 0) -> None:
    if type(value) is not int:
        raise ProtocolError("body.type", f"{name} must be an unsigned integer")
    if not minimum <= value <= maximum:
        raise ProtocolError("body.bounds", f"{name} must be in [{minimum}, {maximum}]")


def check_bool(value: object, name: str) -> None:
    if type(value) is not bool:
        raise ProtocolError("body.type", f"{name} must be a boolean")


def check_bytes(value: object, name: str, *, min_len: int = 0, max_len: int = MAX_OPAQUE) -> None:
    if type(value) is not bytes:
        raise ProtocolError("body.type", f"{name} must be a byte string")
    if not min_len <= len(value) <= max_len:
        raise ProtocolError("body.bounds", f"{name} must be {min_len}..{max_len} bytes")


def check_text(value: object, name: str, *, min_len: int = 0, max_len: int = MAX_TEXT) -> None:
    if type(value) is not str:
        raise ProtocolError("body.type", f"{name} must be a text string")
    if not min_len <= len(value) <= max_len:
        raise ProtocolError("body.bounds", f"{name} must be {min_len}..{max_len} characters")


def check_id(value: object, name: str) -> None:
    if type(value) is not str:
        raise ProtocolError("body.type", f"{name} must be a text id")
    if ID_PATTERN.fullmatch(value) is None:
        raise ProtocolError("body.bounds", f"{name} is not a valid id")


def check_choice(value: object, name: str, choices: Collection[str]) -> None:
    if type(value) is not str:
        raise ProtocolError("body.type", f"{name} must be a text string")
    if value not in choices:
        raise ProtocolError("body.bounds", f"{name} must be one of {sorted(choices)}")


def check_tuple(value: object, name: str, *, min_len: int = 0, max_len: int = MAX_LIST) -> None:
    if type(value) is not tuple:
        raise ProtocolError("body.type", f"{name} must be a tuple")
    if not min_len <= len(value) <= max_len:
        raise ProtocolError("body.bounds", f"{name} must hold {min_len}..{max_len} items")


def check_ids(value: object, name: str, *, min_len: int = 0, unique: bool = True) -> None:
    """A tuple of ids (for example the members of a group)."""
    check_tuple(value, name, min_len=min_len)
    assert isinstance(value, tuple)
    for item in value:
        check_id(item, f"{name}[]")
    if unique and len(set(value)) != len(value):
        raise ProtocolError("body.bounds", f"{name} holds duplicates")


def check_epoch(value: object, name: str = "epoch") -> None:
    check_uint(value, name)


NONCE_MIN = 16
NONCE_MAX = 64
COMMAND_ID_MIN = 8
COMMAND_ID_MAX = 32
