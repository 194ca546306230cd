"""The agent's configuration: one TOML file, validated completely before anything starts.

Default path ``/etc/keyagent/agent.toml``; ``KEYAGENT_CONFIG`` or the caller's ``path`` overrides
it. ``load_config`` either returns a frozen ``AgentConfig`` or raises ``ConfigProblems`` (a
``ConfigError``) listing every problem, one line each, naming the key, the value, its type and
what was expected. The reference for every key is docs/agent.md.

Two modes, decided by the file:

- factory (before provisioning): no ``[identity]``, ``[fleet]`` or ``[broker]``. The device has no
  certificate yet; the daemon serves the factory port and the local API (list-keys) only.
- provisioned: all three present. A file with some but not all of them is refused: it is what a
  half-finished provisioning write looks like, and guessing would start a device that cannot
  authenticate or cannot verify its service.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from agent.configschema import (
    INVALID,
    AbsPath,
    Bool,
    Check,
    ConfigProblems,
    Field,
    Int,
    List,
    MapOf,
    OneOf,
    Parse,
    Predicate,
    Problems,
    ReadableFile,
    Str,
    Table,
    https_url,
    load_pem_certificates,
    pem_certificates_problem,
    read_toml,
)
from agent.localapi.access import ANY, GROUP_SCOPED, OPERATIONS, AccessPolicy, AccessRule
from agent.localapi.protocol import DEFAULT_API_SOCKET
from agent.protocol.dataseal import GROUP_NAME
from agent.protocol.errors import StateError
from agent.protocol.lifecycle import AES_GCM_RANDOM_NONCE_LIMIT, RotationPolicy
from agent.protocol.membership import Membership
from agent.protocol.renewal import DEFAULT_FRACTION, Ratio
from agent.tpm.blob import KeyBlob

log = logging.getLogger("keyagent.config")

DEFAULT_CONFIG_PATH = Path("/etc/keyagent/agent.toml")
CONFIG_ENV = "KEYAGENT_CONFIG"
DEFAULT_TCTI = "device:/dev/tpmrm0"
DEFAULT_PCRS = (0, 2, 4, 7)
DEFAULT_STATE_DIR = Path("/var/lib/keyagent")
TCTI_NAMES = ("device", "swtpm", "mssim", "tabrmd")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAX_SECONDS = 10 * 365 * 24 * 3600


# -- the typed result ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CertFile:
    """A PEM file of one or more X.509 certificates, parsed at load time."""

    path: Path
    certificates: tuple[x509.Certificate, ...] = field(compare=False, repr=False)


@dataclass(frozen=True)
class TpmConfig:
    tcti: str = DEFAULT_TCTI
    pcrs: tuple[int, ...] = DEFAULT_PCRS


@dataclass(frozen=True)
class StateConfig:
    dir: Path = DEFAULT_STATE_DIR


@dataclass(frozen=True)
class IdentityConfig:
    device_id: str
    devid_cert: CertFile
    devid_key: Path
    tls_cert: CertFile
    tls_key: Path
    ak_key: Path | None = None  # the AK's TPM blob: quotes for runtime attestation


@dataclass(frozen=True)
class AttestationConfig:
    """[attestation]: where the firmware's measured-boot event log is (written at each boot);
    the agent sends it with every quote."""

    event_log: Path | None = None


@dataclass(frozen=True)
class RenewalConfig:
    """[renewal]: the agent renews its DevID and TLS certificates when ``fraction`` of their
    lifetime has passed (``agent.protocol.renewal``); ``enabled = false`` never asks. ``url``:
    the fleet service's HTTPS renewal listener (``https://host:port``), used when the
    certificates have expired (MQTT is closed to them; docs/attestation.md, "Certificate
    renewal"); ``ca``: the CA(s) its server certificate chains to (absent: ``[broker] ca``)."""

    enabled: bool = True
    fraction: Ratio = DEFAULT_FRACTION
    url: str | None = None
    ca: CertFile | None = None


def _fraction(value: str) -> Ratio:
    fraction = Ratio.parse(value)  # ValueError("not a fraction")
    if not fraction.within(Ratio(1, 10), Ratio(19, 20)):
        raise ValueError("outside 1/10 .. 19/20")
    return fraction


@dataclass(frozen=True)
class ReleasesConfig:
    """[releases]: the fleet's release-signing public key (from enrollment). With it the state
    key is sealed for the releases the key approves (``agent.releasestate``); without it, to the
    PCRs as before."""

    key_file: Path | None = None
    key: ec.EllipticCurvePublicKey | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class FleetConfig:
    service_cert: Path
    service_key: ec.EllipticCurvePublicKey = field(compare=False, repr=False)
    trust_anchors: tuple[CertFile, ...] = ()
    # The operator CA(s): membership changes must carry approvals by operators chained to them.
    operator_anchors: tuple[CertFile, ...] = ()
    # Approvals a membership change needs until the operators sign a quorum policy.
    min_approvals: int = 2

    def membership(self) -> Membership:
        """The device's membership trust: members' credentials chain to ``trust_anchors`` (the
        device CA), approvals to ``operator_anchors``; KeyPackages must prove TPM residency."""
        return Membership(
            device_cas=tuple(c for f in self.trust_anchors for c in f.certificates),
            operator_cas=tuple(c for f in self.operator_anchors for c in f.certificates),
            min_approvals=self.min_approvals,
        )


@dataclass(frozen=True)
class BrokerConfig:
    host: str
    ca: CertFile
    port: int = 8883
    keepalive: int = 60
    session_expiry: int = 7 * 24 * 3600


@dataclass(frozen=True)
class ApiConfig:
    socket: Path = DEFAULT_API_SOCKET
    socket_group: int | None = None
    policy: AccessPolicy = field(default_factory=AccessPolicy)


@dataclass(frozen=True)
class RotationConfig:
    default: RotationPolicy = field(default_factory=RotationPolicy)
    groups: Mapping[str, RotationPolicy] = field(default_factory=dict)

    def for_group(self, group: str) -> RotationPolicy:
        return self.groups.get(group, self.default)


@dataclass(frozen=True)
class SimulationConfig:
    insecure_software_keys: bool = False


@dataclass(frozen=True)
class InstallConfig:
    """[releases] install_command / install_timeout: the device's update hook, what a staged
    rollout's ``release.install`` runs (the place Mender, SWUpdate or RAUC is called; keyfleet is
    not the update client). ``command`` is an argv, run without a shell, every ``{version}`` in
    it replaced by the release version (checked: letters, digits, ``.``, ``_``, ``-``)."""

    command: tuple[str, ...]
    timeout: int = 600

    def argv(self, version: str) -> list[str]:
        return [part.replace(VERSION_PLACEHOLDER, version) for part in self.command]


VERSION_PLACEHOLDER = "{version}"


def _install_command_problem(argv: list[str]) -> str | None:
    if VERSION_PLACEHOLDER in argv[0]:
        return "the program (first item) must not hold {version}"
    if not any(VERSION_PLACEHOLDER in part for part in argv[1:]):
        return "no argument holds {version}: the hook would not know what to install"
    return None


@dataclass(frozen=True)
class AgentConfig:
    source: Path
    tpm: TpmConfig
    state: StateConfig
    api: ApiConfig
    rotation: RotationConfig
    simulation: SimulationConfig
    identity: IdentityConfig | None = None
    attestation: AttestationConfig = field(default_factory=AttestationConfig)
    renewal: RenewalConfig = field(default_factory=RenewalConfig)
    releases: ReleasesConfig = field(default_factory=ReleasesConfig)
    fleet: FleetConfig | None = None
    broker: BrokerConfig | None = None
    install: InstallConfig | None = None  # [releases] install_command: absent, no update hook

    @property
    def provisioned(self) -> bool:
        return self.identity is not None


# -- the schema ---------------------------------------------------------------------------------


def _tcti_problem(value: str) -> str | None:
    name = value.split(":", 1)[0]
    if name not in TCTI_NAMES:
        return f"TCTI name {name!r} is not one of {', '.join(TCTI_NAMES)}"
    return None


def _pem_block_problem(allowed: tuple[bytes, ...]) -> Callable[[bytes], str | None]:
    def problem(data: bytes) -> str | None:
        head = data.lstrip()[:64]
        if not any(head.startswith(b"-----BEGIN " + label + b"-----") for label in allowed):
            return "not a PEM " + " or ".join(label.decode() for label in allowed) + " file"
        return None

    return problem


def _devid_key_problem(data: bytes) -> str | None:
    if _is_software_key(data):
        return None  # allowed only in simulation: checked once the whole file is known
    try:
        KeyBlob.from_pem(data)
    except StateError as exc:
        return str(exc)
    return None


def _tss2_blob_problem(data: bytes) -> str | None:
    try:
        KeyBlob.from_pem(data)
    except StateError as exc:
        return str(exc)
    return None


def _is_software_key(data: bytes) -> bool:
    return data.lstrip().startswith((b"-----BEGIN PRIVATE KEY-----", b"-----BEGIN EC PRIVATE KEY"))


def _service_key_problem(data: bytes) -> str | None:
    try:
        _load_service_key(data)
    except ValueError as exc:
        return str(exc)
    return None


def _release_key_problem(data: bytes) -> str | None:
    try:
        _load_release_key(data)
    except ValueError as exc:
        return str(exc)
    return None


def _load_release_key(data: bytes) -> ec.EllipticCurvePublicKey:
    try:
        key = load_pem_public_key(data)
    except ValueError:
        raise ValueError("not a PEM public key (SubjectPublicKeyInfo)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("the release key must be ECC P-256")
    return key


def _load_service_key(data: bytes) -> ec.EllipticCurvePublicKey:
    if b"-----BEGIN CERTIFICATE-----" in data:
        try:
            key: object = x509.load_pem_x509_certificate(data).public_key()
        except ValueError:
            raise ValueError("the PEM certificate does not parse as X.509") from None
    else:
        try:
            key = load_pem_public_key(data)
        except ValueError:
            raise ValueError("neither a PEM certificate nor a PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("the service key must be ECC P-256 (ES256)")
    return key


_CERT = "a PEM X.509 certificate file"


def _cert(what: str = _CERT) -> ReadableFile:
    return ReadableFile(what, parse=pem_certificates_problem)


class _Principal(Check):
    """A uid/gid given as a number or a name, resolved now so the server compares numbers."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.expected = f"a {kind} name or a numeric {'uid' if kind == 'user' else 'gid'}"

    def check(self, key: str, value: object, problems: Problems) -> object:
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32 - 1:
            return value
        if isinstance(value, str) and value:
            try:
                if self.kind == "user":
                    return pwd.getpwnam(value).pw_uid
                return grp.getgrnam(value).gr_gid
            except (KeyError, ValueError):  # ValueError: a NUL in the name
                return problems.bad(key, value, f"an existing {self.kind} (no such {self.kind})")
        return problems.bad(key, value, self.expected)


_NAME_OR_ANY = Predicate(
    Str('a group name or "*"'),
    lambda v: None if v == ANY or GROUP_NAME.fullmatch(v) else "bad group name",
    'a group name ([A-Za-z0-9][A-Za-z0-9._-]{0,63}) or "*"',
)


def _rule_problem(rule: dict[str, Any]) -> str | None:
    if rule["uid"] is None and rule["gid"] is None:
        return "a rule must name a uid, a gid, or both"
    ops = set(rule["operations"])
    scoped = GROUP_SCOPED if ANY in ops else ops & GROUP_SCOPED
    if scoped and not rule["groups"]:
        return f"groups must be listed because operations include {', '.join(sorted(scoped))}"
    return None


_RULE = Predicate(
    Table(
        {
            "uid": Field(_Principal("user")),
            "gid": Field(_Principal("group")),
            "operations": Field(
                List(OneOf((*OPERATIONS, ANY)), min_items=1, unique=True), required=True
            ),
            "groups": Field(List(_NAME_OR_ANY, unique=True), default=[]),
        },
        "a table {uid and/or gid, operations, groups}",
    ),
    _rule_problem,
    "a table {uid and/or gid, operations, groups}",
)


def _rotation_table(with_defaults: bool) -> Table:
    policy = RotationPolicy()
    return Table(
        {
            "max_epoch_age": Field(
                Int(0, _MAX_SECONDS, "seconds, 0 = no limit"),
                default=policy.max_epoch_age if with_defaults else None,
            ),
            "max_messages_per_epoch": Field(
                Int(0, AES_GCM_RANDOM_NONCE_LIMIT, "0 = only the AES-GCM limit of 2**32"),
                default=policy.max_messages_per_epoch if with_defaults else None,
            ),
            "grace_period": Field(
                Int(0, _MAX_SECONDS, "seconds"),
                default=policy.grace_period if with_defaults else None,
            ),
        }
    )


_ROTATION = _rotation_table(with_defaults=True)
_ROTATION_TOP = Table(
    {
        **_ROTATION.fields,
        "groups": Field(
            MapOf(
                lambda n: GROUP_NAME.fullmatch(n) is not None,
                "a group name",
                _rotation_table(with_defaults=False),
            ),
            default={},
        ),
    }
)

SCHEMA = Table(
    {
        "tpm": Field(
            Table(
                {
                    "tcti": Field(
                        Predicate(Str(), _tcti_problem, 'a TCTI string like "device:/dev/tpmrm0"'),
                        default=DEFAULT_TCTI,
                    ),
                    "pcrs": Field(
                        List(Int(0, 23, "PCR index"), min_items=1, max_items=24, unique=True),
                        default=list(DEFAULT_PCRS),
                    ),
                }
            ),
            default={},
        ),
        "state": Field(
            Table({"dir": Field(AbsPath(), default=str(DEFAULT_STATE_DIR))}), default={}
        ),
        "identity": Field(
            Table(
                {
                    "device_id": Field(
                        Predicate(
                            Str(),
                            lambda v: None if _ID.fullmatch(v) else "bad device id",
                            "a device id ([A-Za-z0-9][A-Za-z0-9._-]{0,63})",
                        ),
                        required=True,
                    ),
                    "devid_cert": Field(_cert(), required=True),
                    "devid_key": Field(
                        ReadableFile(
                            "a TSS2 PRIVATE KEY PEM file (TPM-wrapped DevID key blob)",
                            private=True,
                            parse=_devid_key_problem,
                        ),
                        required=True,
                    ),
                    "ak_key": Field(
                        ReadableFile(
                            "a TSS2 PRIVATE KEY PEM file (TPM-wrapped AK blob)",
                            private=True,
                            parse=_tss2_blob_problem,
                        )
                    ),
                    "tls_cert": Field(_cert(), required=True),
                    "tls_key": Field(
                        ReadableFile(
                            "a PEM private key file readable only by its owner",
                            private=True,
                            parse=_pem_block_problem(
                                (b"PRIVATE KEY", b"EC PRIVATE KEY", b"RSA PRIVATE KEY")
                            ),
                        ),
                        required=True,
                    ),
                }
            )
        ),
        "fleet": Field(
            Table(
                {
                    "service_cert": Field(
                        ReadableFile(
                            "a PEM certificate or public key (ECC P-256) of the fleet service",
                            parse=_service_key_problem,
                        ),
                        required=True,
                    ),
                    "trust_anchors": Field(
                        List(_cert("a PEM X.509 certificate file"), min_items=1), required=True
                    ),
                    "operator_anchors": Field(
                        List(_cert("a PEM X.509 certificate file of the operator CA")),
                        default=[],
                    ),
                    "min_approvals": Field(Int(1, 16, "operators"), default=2),
                }
            )
        ),
        "broker": Field(
            Table(
                {
                    "host": Field(Str("a host name or address"), required=True),
                    "port": Field(Int(1, 65535), default=8883),
                    "ca": Field(_cert(), required=True),
                    "keepalive": Field(Int(5, 3600, "seconds"), default=60),
                    "session_expiry": Field(Int(0, 2**32 - 1, "seconds"), default=7 * 24 * 3600),
                }
            )
        ),
        "api": Field(
            Table(
                {
                    "socket": Field(AbsPath(), default=str(DEFAULT_API_SOCKET)),
                    "socket_group": Field(_Principal("group")),
                    "rules": Field(List(_RULE), default=[]),
                }
            ),
            default={},
        ),
        "rotation": Field(_ROTATION_TOP, default={}),
        "simulation": Field(
            Table({"insecure_software_keys": Field(Bool(), default=False)}), default={}
        ),
        "attestation": Field(Table({"event_log": Field(AbsPath())}), default={}),
        "renewal": Field(
            Table(
                {
                    "enabled": Field(Bool(), default=True),
                    "fraction": Field(
                        Parse(
                            Str(),
                            _fraction,
                            'a fraction of the certificates\' lifetime such as "2/3" or "0.75"',
                        ),
                        default="2/3",
                    ),
                    "url": Field(
                        Parse(
                            Str(),
                            https_url,
                            "an https:// URL such as https://fleet.example.net:8445",
                        )
                    ),
                    "ca": Field(_cert()),
                }
            ),
            default={},
        ),
        "releases": Field(
            Table(
                {
                    "key": Field(
                        ReadableFile(
                            "a PEM public key (ECC P-256) of the fleet's release signing key",
                            parse=_release_key_problem,
                        )
                    ),
                    # the staged rollout's update hook (InstallConfig)
                    "install_command": Field(
                        Predicate(
                            List(Str("a non-empty string"), min_items=1, max_items=64),
                            _install_command_problem,
                            "an argv list with a {version} placeholder",
                        )
                    ),
                    "install_timeout": Field(Int(1, 24 * 3600, "seconds"), default=600),
                }
            ),
            default={},
        ),
    }
)


# -- loading ------------------------------------------------------------------------------------


def config_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The file to read: ``path`` if given, else ``$KEYAGENT_CONFIG``, else the default."""
    if path is not None:
        return Path(path)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH


def load_config(
    path: str | os.PathLike[str] | None = None, *, require_provisioned: bool = False
) -> AgentConfig:
    """Read and validate the configuration; raise ``ConfigProblems`` with every problem found.

    ``require_provisioned`` makes a factory-mode file (no identity) a problem too, for commands
    that cannot work without an identity."""
    source = config_path(path)
    document = read_toml(source)
    return parse_config(document, source, require_provisioned=require_provisioned)


def parse_config(
    document: Mapping[str, Any], source: Path, *, require_provisioned: bool = False
) -> AgentConfig:
    problems = Problems()
    checked = SCHEMA.check("", dict(document), problems)
    # Defaults are filled in for absent optional sections so later checks can look at them even
    # when another section is broken; a broken section is skipped, its problems already listed.
    sections = cast(dict[str, Any], checked) if checked is not INVALID else {}
    _check_modes(document, problems, require_provisioned)
    if checked is not INVALID:
        _check_software_keys(sections, problems)
    if problems.lines:
        raise ConfigProblems(str(source), problems.lines)
    config = _build(sections, source)
    if config.simulation.insecure_software_keys:
        log.warning(
            "INSECURE: simulation.insecure_software_keys = true in %s: keys are software keys, "
            "not TPM keys. Never use this on a real device.",
            source,
        )
    return config


def _check_software_keys(sections: dict[str, Any], problems: Problems) -> None:
    identity = sections["identity"]
    if identity is None or sections["simulation"]["insecure_software_keys"]:
        return
    path = identity["devid_key"]
    if _is_software_key(path.read_bytes()):
        problems.bad(
            "identity.devid_key",
            str(path),
            "a TSS2 PRIVATE KEY PEM file (this is a software private key, accepted only with "
            "simulation.insecure_software_keys = true)",
        )


def _check_modes(document: Mapping[str, Any], problems: Problems, require: bool) -> None:
    trio = ("identity", "fleet", "broker")
    present = [name for name in trio if name in document]
    if present and len(present) < len(trio):
        for name in trio:
            if name not in document:
                problems.missing(
                    name,
                    f"the [{name}] table: a provisioned device needs [identity], [fleet] and "
                    f"[broker] together (found [{'], ['.join(present)}])",
                )
    elif not present and require:
        problems.missing(
            "identity", "the [identity] table: this command needs a provisioned device"
        )


def _policy(raw: dict[str, Any]) -> RotationPolicy:
    return RotationPolicy(
        max_epoch_age=raw["max_epoch_age"] or None,
        max_messages_per_epoch=raw["max_messages_per_epoch"] or None,
        grace_period=raw["grace_period"],
    )


def _merge(default: RotationPolicy, raw: dict[str, Any]) -> RotationPolicy:
    return RotationPolicy(
        max_epoch_age=default.max_epoch_age
        if raw["max_epoch_age"] is None
        else raw["max_epoch_age"] or None,
        max_messages_per_epoch=default.max_messages_per_epoch
        if raw["max_messages_per_epoch"] is None
        else raw["max_messages_per_epoch"] or None,
        grace_period=default.grace_period if raw["grace_period"] is None else raw["grace_period"],
    )


def _cert_file(path: Path) -> CertFile:
    return CertFile(path, load_pem_certificates(path))


def _build(s: dict[str, Any], source: Path) -> AgentConfig:
    identity = fleet = broker = None
    if s["identity"] is not None:
        i = s["identity"]
        identity = IdentityConfig(
            device_id=i["device_id"],
            devid_cert=_cert_file(i["devid_cert"]),
            devid_key=i["devid_key"],
            tls_cert=_cert_file(i["tls_cert"]),
            tls_key=i["tls_key"],
            ak_key=i["ak_key"],
        )
    if s["fleet"] is not None:
        f = s["fleet"]
        fleet = FleetConfig(
            service_cert=f["service_cert"],
            service_key=_load_service_key(f["service_cert"].read_bytes()),
            trust_anchors=tuple(_cert_file(p) for p in f["trust_anchors"]),
            operator_anchors=tuple(_cert_file(p) for p in f["operator_anchors"]),
            min_approvals=f["min_approvals"],
        )
    if s["broker"] is not None:
        b = s["broker"]
        broker = BrokerConfig(
            host=b["host"],
            ca=_cert_file(b["ca"]),
            port=b["port"],
            keepalive=b["keepalive"],
            session_expiry=b["session_expiry"],
        )
    rules = [
        AccessRule(
            uid=r["uid"],
            gid=r["gid"],
            operations=frozenset(r["operations"]),
            groups=frozenset(r["groups"]),
        )
        for r in s["api"]["rules"]
    ]
    rot = s["rotation"]
    default = _policy(rot)
    return AgentConfig(
        source=source,
        tpm=TpmConfig(tcti=s["tpm"]["tcti"], pcrs=tuple(sorted(s["tpm"]["pcrs"]))),
        state=StateConfig(dir=s["state"]["dir"]),
        api=ApiConfig(
            socket=s["api"]["socket"],
            socket_group=s["api"]["socket_group"],
            policy=AccessPolicy(rules),
        ),
        rotation=RotationConfig(
            default=default,
            groups={name: _merge(default, raw) for name, raw in rot["groups"].items()},
        ),
        simulation=SimulationConfig(s["simulation"]["insecure_software_keys"]),
        identity=identity,
        fleet=fleet,
        broker=broker,
        attestation=AttestationConfig(event_log=s["attestation"]["event_log"]),
        renewal=RenewalConfig(
            s["renewal"]["enabled"],
            s["renewal"]["fraction"],
            url=s["renewal"].get("url"),
            ca=None if s["renewal"].get("ca") is None else _cert_file(s["renewal"]["ca"]),
        ),
        releases=_releases(s["releases"]["key"]),
        install=_install(s["releases"]),
    )


def _releases(path: Path | None) -> ReleasesConfig:
    if path is None:
        return ReleasesConfig()
    return ReleasesConfig(key_file=path, key=_load_release_key(path.read_bytes()))


def _install(raw: dict[str, Any]) -> InstallConfig | None:
    command = raw["install_command"]
    if command is None:
        return None
    return InstallConfig(command=tuple(command), timeout=raw["install_timeout"])
