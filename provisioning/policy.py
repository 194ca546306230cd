"""The golden-measurements policy: which firmware the fleet trusts.

For each firmware component (bootloader, kernel, ...) the policy says which PCR it is measured
into and which image digests are approved, each under the release version it belongs to. Several
versions may be approved at once (a fleet mid-update runs 1.0 and 1.1). The attestation verifier
(``provisioning.attestation``) checks every measured component against it.

File format (TOML, docs/attestation.md)::

    format = 1

    [components.kernel]
    pcr = 4

    [[components.kernel.approved]]
    version = "1.0"
    sha256 = "9f2c...64 hex digits"

An operator approves a firmware release with ``policy_from_components`` (a new policy) or
``GoldenPolicy.approve`` (add a release to the current one) and ``write_policy``. Every problem in
a file is reported at load, together, in one ``ConfigError`` naming the key.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from agent.fsio import atomic_write
from agent.protocol.errors import ConfigError, ProtocolError
from agent.protocol.eventlog import DIGEST_SIZE, PCR_COUNT, check_component_name, check_version

POLICY_FORMAT = 1
MAX_POLICY_SIZE = 1024 * 1024


class MeasuredComponent(Protocol):
    """What a policy needs of a firmware component (``firmware_sim.boot.FirmwareComponent`` is
    one); keeps the service from importing the simulator."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def pcr(self) -> int: ...
    def digest(self) -> bytes: ...


@dataclass(frozen=True)
class ApprovedRelease:
    version: str
    digest: bytes


@dataclass(frozen=True)
class ComponentPolicy:
    """The approved images of one component. ``version_of`` maps digest -> version."""

    name: str
    pcr: int
    approved: tuple[ApprovedRelease, ...]
    version_of: Mapping[bytes, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "version_of", {r.digest: r.version for r in self.approved})

    @property
    def versions(self) -> tuple[str, ...]:
        return tuple(r.version for r in self.approved)


@dataclass(frozen=True)
class GoldenPolicy:
    components: Mapping[str, ComponentPolicy]

    @property
    def pcrs(self) -> tuple[int, ...]:
        """The PCRs the policy's components live in: the selection the service quotes."""
        return tuple(sorted({c.pcr for c in self.components.values()}))

    def approve(self, components: Iterable[MeasuredComponent]) -> GoldenPolicy:
        """This policy plus the images of ``components`` (an approved firmware release).

        Refused with ``ConfigError``: a component moving to another PCR, or a version that is
        already approved with a different digest (one version must mean one image)."""
        merged: dict[str, ComponentPolicy] = dict(self.components)
        for component in components:
            digest = component.digest()
            current = merged.get(component.name)
            if current is None:
                merged[component.name] = ComponentPolicy(
                    component.name, component.pcr, (ApprovedRelease(component.version, digest),)
                )
                continue
            if current.pcr != component.pcr:
                raise ConfigError(
                    f"components.{component.name}.pcr: policy says {current.pcr}, "
                    f"release {component.version} measures into {component.pcr}"
                )
            known = [r for r in current.approved if r.version == component.version]
            if known and known[0].digest != digest:
                raise ConfigError(
                    f"components.{component.name}: version {component.version} is already "
                    "approved with another digest"
                )
            if not known:
                merged[component.name] = ComponentPolicy(
                    current.name,
                    current.pcr,
                    (*current.approved, ApprovedRelease(component.version, digest)),
                )
        return GoldenPolicy(dict(sorted(merged.items())))

    def to_toml(self) -> str:
        lines = [
            "# keyfleet golden measurements: the approved firmware images per component",
            f"format = {POLICY_FORMAT}",
        ]
        for name, component in sorted(self.components.items()):
            lines += ["", f"[components.{name}]", f"pcr = {component.pcr}"]
            for release in component.approved:
                lines += [
                    "",
                    f"[[components.{name}.approved]]",
                    f'version = "{release.version}"',
                    f'sha256 = "{release.digest.hex()}"',
                ]
        return "\n".join(lines) + "\n"


def policy_from_components(components: Iterable[MeasuredComponent]) -> GoldenPolicy:
    """A policy approving exactly the images of ``components``."""
    return GoldenPolicy({}).approve(components)


def write_policy(policy: GoldenPolicy, path: str | os.PathLike[str]) -> None:
    """Write the policy file atomically (mode 0644: it holds digests, nothing secret)."""
    atomic_write(path, policy.to_toml().encode(), mode=0o644)


def parse_policy(text: str, source: str = "<policy>") -> GoldenPolicy:
    """Validate a policy document; every problem is named in one ``ConfigError``."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    problems: list[str] = []
    unknown = sorted(set(document) - {"format", "components"})
    problems += [f"{key}: unknown key" for key in unknown]
    if document.get("format") != POLICY_FORMAT or type(document.get("format")) is not int:
        problems.append(f"format: found {document.get('format')!r}, expected {POLICY_FORMAT}")
    raw_components = document.get("components")
    components: dict[str, ComponentPolicy] = {}
    if not isinstance(raw_components, dict) or not raw_components:
        problems.append("components: missing or empty; expected at least one [components.NAME]")
        raw_components = {}
    for name, raw in raw_components.items():
        parsed = _parse_component(name, raw, problems)
        if parsed is not None:
            components[name] = parsed
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return GoldenPolicy(dict(sorted(components.items())))


def _parse_component(name: str, raw: object, problems: list[str]) -> ComponentPolicy | None:
    key = f"components.{name}"
    count = len(problems)
    try:
        check_component_name(name)
    except ProtocolError:
        problems.append(f"{key}: name must be [a-z][a-z0-9-]* (at most 32 characters)")
    if not isinstance(raw, dict):
        problems.append(f"{key}: expected a table")
        return None
    problems += [f"{key}.{k}: unknown key" for k in sorted(set(raw) - {"pcr", "approved"})]
    pcr = raw.get("pcr")
    if type(pcr) is not int or not 0 <= pcr < PCR_COUNT or pcr == 16:
        problems.append(f"{key}.pcr: found {pcr!r}, expected a PCR index 0..23 other than 16")
    approved = raw.get("approved")
    releases: list[ApprovedRelease] = []
    if not isinstance(approved, list) or not approved:
        problems.append(f"{key}.approved: missing or empty; expected [[{key}.approved]] entries")
        approved = []
    for i, entry in enumerate(approved):
        where = f"{key}.approved[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected a table")
            continue
        problems += [
            f"{where}.{k}: unknown key" for k in sorted(set(entry) - {"version", "sha256"})
        ]
        version = entry.get("version")
        try:
            check_version(version)
        except ProtocolError:
            problems.append(f"{where}.version: found {version!r}, expected [A-Za-z0-9._+-]+")
            version = None
        hex_digest = entry.get("sha256")
        digest: bytes | None = None
        if isinstance(hex_digest, str) and len(hex_digest) == 2 * DIGEST_SIZE:
            try:
                digest = bytes.fromhex(hex_digest)
            except ValueError:
                digest = None
        if digest is None:
            problems.append(f"{where}.sha256: found {hex_digest!r}, expected 64 hex digits")
        if isinstance(version, str) and digest is not None:
            releases.append(ApprovedRelease(version, digest))
    versions = [r.version for r in releases]
    for dup in sorted({v for v in versions if versions.count(v) > 1}):
        problems.append(f"{key}.approved: version {dup} listed twice")
    digests = [r.digest for r in releases]
    for dup_digest in sorted({d for d in digests if digests.count(d) > 1}):
        problems.append(f"{key}.approved: digest {dup_digest.hex()[:16]}… listed twice")
    if len(problems) != count:
        return None
    assert type(pcr) is int
    return ComponentPolicy(name, pcr, tuple(releases))


def load_policy(path: str | os.PathLike[str]) -> GoldenPolicy:
    """Read and validate the policy file at ``path``."""
    target = Path(path)
    try:
        with open(target, "rb") as handle:
            data = handle.read(MAX_POLICY_SIZE + 1)
    except OSError as exc:
        raise ConfigError(f"{target}: cannot read policy: {exc.strerror or exc}") from None
    if len(data) > MAX_POLICY_SIZE:
        raise ConfigError(f"{target}: policy file larger than {MAX_POLICY_SIZE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{target}: policy file is not UTF-8") from None
    return parse_policy(text, str(target))
