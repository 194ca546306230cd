"""A small declarative validator for TOML configuration files.

Why not a library: the rules are few and the one thing that matters is the error report. Every
problem is collected (not just the first), and each is one line that names the dotted key, the
value found, its TOML type, and what was expected::

    broker.port: got "8883" (string), expected an integer from 1 to 65535

A schema is a tree of ``Check`` objects. ``Table`` maps key names to ``Field``s (a check, whether
it is required, a default) and names unknown keys. A check returns the converted value, or
``INVALID`` after recording a problem; the caller builds its own typed objects from the result.
Values are printed (truncated) because a configuration holds names, numbers and paths, never
secrets; file contents are never printed, only whether a file could be read and parsed. A value
that may carry a secret (a database URL with a password) is shown through ``Parse(shown=...)``.
"""

from __future__ import annotations

import copy
import os
import stat
import tomllib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from cryptography import x509

from agent.protocol.errors import ConfigError

MAX_CONFIG_BYTES = 1024 * 1024
_MAX_SHOWN = 240  # long enough for real paths, short enough for a log line


class _Invalid:
    def __repr__(self) -> str:
        return "INVALID"


INVALID: Final = _Invalid()
"""Returned by a check that recorded a problem."""


class ConfigProblems(ConfigError):
    """A configuration file was refused. ``problems`` holds one line per problem; the message is a
    heading naming the file followed by those lines."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        count = f"{len(problems)} problem" + ("" if len(problems) == 1 else "s")
        lines = [f"invalid configuration {source} ({count}):", *(f"  {p}" for p in problems)]
        super().__init__("\n".join(lines))
        self.source = source
        self.problems = list(problems)


def toml_type(value: object) -> str:
    """The TOML name of a parsed value's type, for problem lines."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return "date/time"


def show(value: object) -> str:
    """A short rendering of a value: strings quoted, tables and long values elided."""
    if isinstance(value, dict):
        return "{...}"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = f'"{value}"' if isinstance(value, str) else repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


class Problem(str):
    """One problem line, which also keeps its parts (the dotted key, the value as shown, what was
    expected) for callers and tests that look at one part. A ``str`` so that lists of problems
    print, join and compare as the lines they are."""

    key: str
    value: str
    expected: str

    def __new__(cls, key: str, value: str, expected: str, line: str) -> Problem:
        problem = super().__new__(cls, line)
        problem.key, problem.value, problem.expected = key, value, expected
        return problem


class Problems:
    """Collects problem lines while a document is checked."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def bad(self, key: str, value: object, expected: str, *, shown: str | None = None) -> _Invalid:
        """``shown`` replaces the rendering of a value that must not be printed as it is."""
        got = f"{show(value) if shown is None else shown} ({toml_type(value)})"
        self.lines.append(Problem(key, got, expected, f"{key}: got {got}, expected {expected}"))
        return INVALID

    def missing(self, key: str, expected: str) -> _Invalid:
        self.lines.append(Problem(key, "missing", expected, f"{key}: missing, expected {expected}"))
        return INVALID

    def unknown(self, key: str, value: object, known: str) -> _Invalid:
        got = f"{show(value)} ({toml_type(value)})"
        expected = f"one of: {known}"
        self.lines.append(Problem(key, got, expected, f"{key}: unknown key, expected {expected}"))
        return INVALID

    def note(self, key: str, text: str) -> _Invalid:
        self.lines.append(Problem(key, "", text, f"{key}: {text}"))
        return INVALID


class Check(ABC):
    """Base of all checks: ``check(key, value, problems)`` returns the value or ``INVALID``."""

    expected: str = "a value"

    @abstractmethod
    def check(self, key: str, value: object, problems: Problems) -> object: ...


@dataclass(frozen=True)
class Field:
    check: Check
    required: bool = False
    default: object = None


class Str(Check):
    def __init__(self, expected: str = "a string", *, non_empty: bool = True) -> None:
        self.expected = expected
        self.non_empty = non_empty

    def check(self, key: str, value: object, problems: Problems) -> object:
        if not isinstance(value, str) or (self.non_empty and not value):
            return problems.bad(key, value, self.expected)
        return value


class Bool(Check):
    expected = "true or false"

    def check(self, key: str, value: object, problems: Problems) -> object:
        if not isinstance(value, bool):
            return problems.bad(key, value, self.expected)
        return value


class Int(Check):
    def __init__(self, low: int, high: int, unit: str = "") -> None:
        self.low, self.high = low, high
        suffix = f" ({unit})" if unit else ""
        self.expected = f"an integer from {low} to {high}{suffix}"

    def check(self, key: str, value: object, problems: Problems) -> object:
        if isinstance(value, bool) or not isinstance(value, int):
            return problems.bad(key, value, self.expected)
        if not self.low <= value <= self.high:
            return problems.bad(key, value, self.expected)
        return value


class OneOf(Check):
    def __init__(self, choices: Sequence[str]) -> None:
        self.choices = tuple(choices)
        self.expected = "one of " + ", ".join(f'"{c}"' for c in choices)

    def check(self, key: str, value: object, problems: Problems) -> object:
        if not isinstance(value, str) or value not in self.choices:
            return problems.bad(key, value, self.expected)
        return value


class Parse(Check):
    """Convert a value that passed ``base`` with ``parse``, which raises ``ValueError`` (its
    message, if any, is the reason) for a value it refuses. ``shown`` renders the value in
    problems when it may carry a secret."""

    def __init__(
        self,
        base: Check,
        parse: Callable[[Any], object],
        expected: str,
        *,
        shown: Callable[[Any], str] | None = None,
    ) -> None:
        self.base = base
        self.parse = parse
        self.expected = expected
        self.shown = shown

    def check(self, key: str, value: object, problems: Problems) -> object:
        got = self.base.check(key, value, problems)
        if got is INVALID:
            return INVALID
        try:
            return self.parse(got)
        except ValueError as exc:
            reason = f" ({exc})" if str(exc) else ""
            shown = None if self.shown is None else self.shown(value)
            return problems.bad(key, value, f"{self.expected}{reason}", shown=shown)


class Predicate(Parse):
    """Wrap a base check with an extra condition: ``test(value) -> None`` or a reason string."""

    def __init__(self, base: Check, test: Callable[[Any], str | None], expected: str) -> None:
        def accept(value: Any) -> Any:
            reason = test(value)
            if reason is not None:
                raise ValueError(reason)
            return value

        super().__init__(base, accept, expected)


class List(Check):
    def __init__(
        self, item: Check, *, min_items: int = 0, max_items: int = 1000, unique: bool = False
    ) -> None:
        self.item = item
        self.min_items, self.max_items, self.unique = min_items, max_items, unique
        self.expected = f"an array of {item.expected}"
        if min_items:
            self.expected += f" (at least {min_items})"

    def check(self, key: str, value: object, problems: Problems) -> object:
        if not isinstance(value, list):
            return problems.bad(key, value, self.expected)
        if not self.min_items <= len(value) <= self.max_items:
            return problems.bad(
                key, value, f"{self.expected}, {self.min_items} to {self.max_items} items"
            )
        out: list[object] = []
        ok = True
        for i, item in enumerate(value):
            got = self.item.check(f"{key}[{i}]", item, problems)
            ok = ok and got is not INVALID
            out.append(got)
        if ok and self.unique and len({repr(v) for v in out}) != len(out):
            return problems.bad(key, value, f"{self.expected} without duplicates")
        return out if ok else INVALID


class Table(Check):
    """A TOML table with known keys; unknown keys are problems (a typo must not be ignored)."""

    def __init__(self, fields: Mapping[str, Field], expected: str = "a table") -> None:
        self.fields = dict(fields)
        self.expected = expected

    def check(self, key: str, value: object, problems: Problems) -> object:
        if not isinstance(value, dict):
            return problems.bad(key, value, self.expected)
        prefix = f"{key}." if key else ""
        known = ", ".join(self.fields) or "nothing"
        out: dict[str, object] = {}
        ok = True
        for name in value:
            if name not in self.fields:
                problems.unknown(f"{prefix}{name}", value[name], known)
                ok = False
        for name, spec in self.fields.items():
            if name not in value:
                if spec.required:
                    problems.missing(f"{prefix}{name}", spec.check.expected)
                    ok = False
                elif spec.default is None:
                    out[name] = None
                else:
                    # Defaults go through the same check, so they are converted like given
                    # values (a default table gets its own defaults filled in).
                    got = spec.check.check(f"{prefix}{name}", copy.deepcopy(spec.default), problems)
                    ok = ok and got is not INVALID
                    out[name] = got
                continue
            got = spec.check.check(f"{prefix}{name}", value[name], problems)
            ok = ok and got is not INVALID
            out[name] = got
        return out if ok else INVALID


class MapOf(Check):
    """A table whose keys are names chosen by the user (e.g. per-group overrides)."""

    def __init__(self, name_check: Callable[[str], bool], name_expected: str, item: Check) -> None:
        self.name_check = name_check
        self.name_expected = name_expected
        self.item = item
        self.expected = f"a table of {name_expected} -> {item.expected}"

    def check(self, key: str, value: object, problems: Problems) -> object:
        if not isinstance(value, dict):
            return problems.bad(key, value, self.expected)
        out: dict[str, object] = {}
        ok = True
        for name, item in value.items():
            if not self.name_check(name):
                problems.note(f"{key}.{name}", f"bad name, expected {self.name_expected}")
                ok = False
                continue
            got = self.item.check(f"{key}.{name}", item, problems)
            ok = ok and got is not INVALID
            out[name] = got
        return out if ok else INVALID


# -- files ----------------------------------------------------------------------------------


def _file_problem(path: Path, *, private: bool) -> str | None:
    """None if ``path`` is a regular file this process can read, else a reason."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return "file not found"
    except OSError as exc:
        return f"cannot stat: {exc.strerror}"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if not os.access(path, os.R_OK):
        return "not readable by this process"
    if private and info.st_mode & 0o077:
        return (
            f"private key file has mode {stat.S_IMODE(info.st_mode):04o}, must be 0600 or stricter"
        )
    return None


class AbsPath(Check):
    """An absolute path (existence not required: the daemon creates directories it owns)."""

    def __init__(self, expected: str = "an absolute path") -> None:
        self.expected = expected

    def check(self, key: str, value: object, problems: Problems) -> object:
        if not isinstance(value, str) or not value or not os.path.isabs(value) or "\0" in value:
            return problems.bad(key, value, self.expected)
        return Path(value)


class ReadableFile(Check):
    """A readable regular file, optionally private (no group/other permission bits) and with
    content checked by ``parse(bytes) -> reason | None``. The content is never shown. A relative
    path is refused, or resolved against ``base`` when one is given (e.g. the directory of the
    configuration file, so that a file and its certificates can move together)."""

    def __init__(
        self,
        expected: str,
        *,
        private: bool = False,
        parse: Callable[[bytes], str | None] | None = None,
        base: Path | None = None,
    ) -> None:
        self.expected = expected
        self.private = private
        self.parse = parse
        self.base = base

    def check(self, key: str, value: object, problems: Problems) -> object:
        if not isinstance(value, str) or not value or "\0" in value:
            return problems.bad(key, value, self.expected)
        path = Path(value)
        if not path.is_absolute():
            if self.base is None:
                return problems.bad(key, value, f"{self.expected} given as an absolute path")
            path = self.base / path
        reason = _file_problem(path, private=self.private)
        if reason is None and self.parse is not None:
            try:
                data = path.read_bytes()
            except OSError as exc:
                reason = f"cannot read: {exc.strerror}"
            else:
                reason = self.parse(data)
        if reason is not None:
            if path != Path(value):  # a relative path: say where it was looked for
                reason = f"{reason}: {path}"
            return problems.bad(key, value, f"{self.expected} ({reason})")
        return path


def pem_certificates_problem(data: bytes) -> str | None:
    """None if ``data`` holds one or more PEM X.509 certificates and nothing else unparsable."""
    if b"-----BEGIN CERTIFICATE-----" not in data:
        return "no PEM certificate in the file"
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        return "the PEM certificate does not parse as X.509"
    return None


def load_pem_certificates(path: Path) -> tuple[x509.Certificate, ...]:
    """Certificates of a file that already passed ``pem_certificates_problem``."""
    return tuple(x509.load_pem_x509_certificates(path.read_bytes()))


# -- documents ------------------------------------------------------------------------------


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file or raise ``ConfigProblems`` naming the file and what went wrong."""
    source = str(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigProblems(
            source, [f"{source}: file not found, expected a TOML configuration file"]
        ) from None
    except OSError as exc:
        raise ConfigProblems(
            source, [f"{source}: cannot read ({exc.strerror}), expected a readable TOML file"]
        ) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigProblems(source, [f"{source}: over {MAX_CONFIG_BYTES} bytes"])
    try:
        text = data.decode("utf-8")
        return tomllib.loads(text)
    except UnicodeDecodeError:
        raise ConfigProblems(source, [f"{source}: not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib's messages give the position, not the offending text.
        raise ConfigProblems(source, [f"{source}: not valid TOML: {exc}"]) from None
    except RecursionError:
        # tomllib parses nested arrays/inline tables recursively: a few hundred levels exhaust
        # the interpreter's stack (found by tests/reliability/test_fuzz_local.py).
        raise ConfigProblems(
            source, [f"{source}: not valid TOML: arrays or tables nested too deeply"]
        ) from None


@dataclass
class Validation:
    """The result of checking a document: converted values (or INVALID) and problem lines."""

    value: object
    problems: list[str] = field(default_factory=list)


def validate(document: Mapping[str, Any], schema: Table) -> Validation:
    problems = Problems()
    value = schema.check("", dict(document), problems)
    return Validation(value, problems.lines)


def https_url(value: str) -> str:
    """An ``https://host[:port][/path]`` URL (no query, fragment or credentials), without a
    trailing slash; ``ValueError`` otherwise."""
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError("not an https:// URL with a host")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ValueError("bad port") from None
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("no query, fragment or credentials")
    return value.rstrip("/")
