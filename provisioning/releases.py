"""Firmware releases as the service keeps them: the manifest, what it implies, and what a quorum
request about it approves (docs/operations.md, "Releases").

A **manifest** names a release version and its components, each measured into one PCR::

    {"version": "1.1", "components": [
        {"name": "bootloader", "version": "1.0", "pcr": 0, "sha256": "64 hex digits"}, ...]}

The components are in boot order: the release's **expected PCR values** are the replay of their
digests from zero (``expected_pcrs``), which is what a device booted into the release shows.
``canonical`` is the one byte string a manifest has (sorted keys, no spaces, components in
their order); its SHA-256 is what an approval binds (``agent.protocol.releaseproof.subject``:
devices read it too), so no database writer can swap a component
under an approval. The golden policy attestation checks is the union of the approved releases'
components (``golden_policy``).

Pure: no I/O, no clock. Refusals of a manifest are ``ConfigError`` naming every problem.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from agent.protocol.errors import ConfigError, ProtocolError
from agent.protocol.eventlog import (
    DIGEST_SIZE,
    PCR_COUNT,
    check_component_name,
    check_version,
    extend,
)
from agent.protocol.mls import codec
from provisioning.policy import GoldenPolicy

MAX_MANIFEST: Final = 64 * 1024
MAX_COMPONENTS: Final = 64
_ZERO: Final = bytes(DIGEST_SIZE)


@dataclass(frozen=True)
class Component:
    name: str
    version: str
    pcr: int
    sha256: bytes

    def digest(self) -> bytes:
        """The image digest (``provisioning.policy.MeasuredComponent``)."""
        return self.sha256


@dataclass(frozen=True)
class Manifest:
    """A validated release manifest; build one with ``parse_manifest`` or ``from_components``."""

    version: str
    components: tuple[Component, ...]

    def to_obj(self) -> dict[str, object]:
        return {
            "version": self.version,
            "components": [
                {"name": c.name, "version": c.version, "pcr": c.pcr, "sha256": c.sha256.hex()}
                for c in self.components
            ],
        }

    @property
    def canonical(self) -> bytes:
        return json.dumps(self.to_obj(), sort_keys=True, separators=(",", ":")).encode()

    @property
    def sha256(self) -> bytes:
        return hashlib.sha256(self.canonical).digest()

    @property
    def pcrs(self) -> tuple[int, ...]:
        return tuple(sorted({c.pcr for c in self.components}))


def parse_manifest(data: bytes, source: str = "<manifest>") -> Manifest:
    """A manifest from JSON bytes, validated strictly: unknown or missing keys, a bad name,
    version, PCR (0..23, not 16) or digest, a component named twice, and a component name that
    another component of the manifest measures into another PCR are all refused together."""
    if len(data) > MAX_MANIFEST:
        raise ConfigError(f"{source}: manifest larger than {MAX_MANIFEST} bytes")
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{source}: not a JSON manifest: {exc}") from None
    problems: list[str] = []
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: expected a JSON object {{version, components}}")
    problems += [f"{k}: unknown key" for k in sorted(set(document) - {"version", "components"})]
    version = document.get("version")
    try:
        check_version(version)
    except ProtocolError:
        problems.append(f"version: found {version!r}, expected [A-Za-z0-9][A-Za-z0-9._+-]*")
    raw = document.get("components")
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_COMPONENTS:
        problems.append(f"components: expected a list of 1 to {MAX_COMPONENTS} components")
        raw = []
    components = [c for i, item in enumerate(raw) if (c := _component(i, item, problems))]
    names = [c.name for c in components]
    problems += [
        f"components: {name} listed twice"
        for name in sorted({n for n in names if names.count(n) > 1})
    ]
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    assert isinstance(version, str)
    return Manifest(version, tuple(components))


def _component(i: int, item: object, problems: list[str]) -> Component | None:
    where = f"components[{i}]"
    if not isinstance(item, dict):
        problems.append(f"{where}: expected an object {{name, version, pcr, sha256}}")
        return None
    count = len(problems)
    keys = {"name", "version", "pcr", "sha256"}
    problems += [f"{where}.{k}: unknown key" for k in sorted(set(item) - keys)]
    problems += [f"{where}.{k}: missing" for k in sorted(keys - set(item))]
    name, version, pcr, digest_hex = (item.get(k) for k in ("name", "version", "pcr", "sha256"))
    try:
        check_component_name(name)
    except ProtocolError:
        problems.append(f"{where}.name: found {name!r}, expected [a-z][a-z0-9-]* (<= 32)")
    try:
        check_version(version)
    except ProtocolError:
        problems.append(f"{where}.version: found {version!r}, expected a version")
    if type(pcr) is not int or not 0 <= pcr < PCR_COUNT or pcr == 16:
        problems.append(f"{where}.pcr: found {pcr!r}, expected a PCR index 0..23 other than 16")
    digest: bytes | None = None
    if isinstance(digest_hex, str) and len(digest_hex) == 2 * DIGEST_SIZE:
        try:
            digest = bytes.fromhex(digest_hex)
        except ValueError:
            digest = None
    if digest is None or not isinstance(digest_hex, str) or digest_hex != digest_hex.lower():
        problems.append(f"{where}.sha256: found {digest_hex!r}, expected 64 lowercase hex digits")
    if len(problems) != count:
        return None
    assert isinstance(name, str) and isinstance(version, str) and type(pcr) is int
    assert digest is not None
    return Component(name, version, pcr, digest)


def expected_pcrs(manifest: Manifest) -> dict[int, bytes]:
    """The PCR values a device booted into the release shows: its components' digests
    extended from zero in boot order."""
    values: dict[int, bytes] = {}
    for component in manifest.components:
        values[component.pcr] = extend(values.get(component.pcr, _ZERO), component.sha256)
    return dict(sorted(values.items()))


def encode_pcrs(values: Mapping[int, bytes]) -> bytes:
    return codec.encode({pcr: value for pcr, value in sorted(values.items())})


def decode_pcrs(data: bytes) -> dict[int, bytes]:
    try:
        decoded = codec.decode(data, 4096, "release pcrs")
    except ProtocolError:
        decoded = None
    if not isinstance(decoded, dict) or not all(
        type(k) is int and type(v) is bytes and len(v) == DIGEST_SIZE for k, v in decoded.items()
    ):
        raise ProtocolError("release.stored", "expected PCR values unreadable")
    return dict(decoded)


def golden_policy(manifests: Iterable[Manifest]) -> GoldenPolicy:
    """The policy approving exactly the images of ``manifests`` (the approved releases).
    ``ConfigError`` if two of them disagree (a component in two PCRs, one component version
    with two digests)."""
    policy = GoldenPolicy({})
    for manifest in manifests:
        policy = policy.approve(manifest.components)
    return policy


def from_policy(policy: GoldenPolicy) -> list[Manifest]:
    """The releases a golden-measurements file approves, one per version (the initial import):
    each version's components, in PCR order then name (the file keeps no boot order)."""
    by_version: dict[str, list[Component]] = {}
    for component in policy.components.values():
        for release in component.approved:
            by_version.setdefault(release.version, []).append(
                Component(component.name, release.version, component.pcr, release.digest)
            )
    return [
        Manifest(version, tuple(sorted(parts, key=lambda c: (c.pcr, c.name))))
        for version, parts in sorted(by_version.items())
    ]


def covered_by(manifest: Manifest, policy: GoldenPolicy) -> bool:
    """Every component of ``manifest`` is approved, with its digest and PCR, by ``policy``."""
    for component in manifest.components:
        known = policy.components.get(component.name)
        if (
            known is None
            or known.pcr != component.pcr
            or known.version_of.get(component.sha256) != component.version
        ):
            return False
    return True


def release_toml(policy: GoldenPolicy) -> str:
    """The golden policy the approved releases imply, as a ``golden_measurements`` file."""
    return policy.to_toml()
