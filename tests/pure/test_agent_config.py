"""The agent's configuration file: typed result, defaults, and refusal of bad files with one line
per problem naming the key."""

from __future__ import annotations

import datetime
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import (
    CONFIG_ENV,
    DEFAULT_API_SOCKET,
    DEFAULT_TCTI,
    AgentConfig,
    RenewalConfig,
    config_path,
    load_config,
    parse_config,
)
from agent.configschema import ConfigProblems
from agent.localapi.access import PeerCredentials
from agent.protocol.errors import ConfigError
from agent.protocol.lifecycle import RotationPolicy
from agent.protocol.renewal import Ratio
from agent.tpm.blob import KeyBlob
from tests.fixtures.nobody import NobodyPython

pytestmark = pytest.mark.pure

SECRET_MARKER = "c2VjcmV0LW1hcmtlci1kby1ub3QtcHJpbnQ"


def _cert(path: Path, curve: ec.EllipticCurve | None = None) -> Path:
    key = ec.generate_private_key(curve or ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, path.stem)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def agent_files(directory: Path) -> dict[str, Path]:
    """The certificate and key files an agent configuration names, made in ``directory``
    (self-signed throwaway certificates; the DevID key is a dummy TPM blob)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "devid_cert": _cert(directory / "devid.pem"),
        "tls_cert": _cert(directory / "tls.pem"),
        "service_cert": _cert(directory / "service.pem"),
        "anchor": _cert(directory / "device-ca.pem"),
        "ca": _cert(directory / "broker-ca.pem"),
    }
    devid_key = directory / "devid.tss2.pem"
    devid_key.write_bytes(KeyBlob(public=b"\x00\x04abcd", private=b"\x00\x04wxyz").to_pem())
    tls_key = directory / "tls.key"
    tls_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    for key in (devid_key, tls_key):
        key.chmod(0o600)
    files["devid_key"] = devid_key
    files["tls_key"] = tls_key
    return files


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    return agent_files(tmp_path)


def _provisioned_toml(pki: dict[str, Path], **extra: str) -> str:
    text = f"""
[tpm]
tcti = "swtpm:host=127.0.0.1,port=2321"
pcrs = [7, 0, 1]

[state]
dir = "/var/lib/keyagent-test"

[identity]
device_id = "dev-0001"
devid_cert = "{pki["devid_cert"]}"
devid_key = "{pki["devid_key"]}"
tls_cert = "{pki["tls_cert"]}"
tls_key = "{pki["tls_key"]}"

[fleet]
service_cert = "{pki["service_cert"]}"
trust_anchors = ["{pki["anchor"]}"]

[broker]
host = "broker.example"
port = 8884
ca = "{pki["ca"]}"

[api]
socket = "/run/keyagent-test/api.sock"
socket_group = "nogroup"

[[api.rules]]
uid = "root"
operations = ["encrypt", "decrypt"]
groups = ["g1"]

[[api.rules]]
gid = 65534
operations = ["sign", "list-keys"]

[rotation]
max_epoch_age = 3600
max_messages_per_epoch = 1000
grace_period = 600

[rotation.groups.g1]
max_epoch_age = 60

[rotation.groups.g2]
max_messages_per_epoch = 0
"""
    for section, body in extra.items():
        text += f"\n[{section}]\n{body}\n"
    return text


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def _problems(path: Path, **kwargs: bool) -> list[str]:
    with pytest.raises(ConfigProblems) as info:
        load_config(path, **kwargs)
    assert isinstance(info.value, ConfigError)
    assert str(path) in str(info.value).splitlines()[0]
    assert str(info.value).splitlines()[1:] == [f"  {p}" for p in info.value.problems]
    return info.value.problems


def test_empty_file_is_a_factory_mode_config_with_defaults(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, ""))
    assert not config.provisioned
    assert config.identity is config.fleet is config.broker is None
    assert config.tpm.tcti == DEFAULT_TCTI and config.tpm.pcrs == (0, 2, 4, 7)
    assert config.api.socket == DEFAULT_API_SOCKET and config.api.policy.rules == ()
    assert config.rotation.default == RotationPolicy()
    assert not config.simulation.insecure_software_keys


def test_provisioned_file_gives_typed_values(tmp_path: Path, pki: dict[str, Path]) -> None:
    config = load_config(_write(tmp_path, _provisioned_toml(pki)))
    assert isinstance(config, AgentConfig) and config.provisioned
    assert config.tpm.pcrs == (0, 1, 7)
    assert config.state.dir == Path("/var/lib/keyagent-test")
    assert config.identity is not None and config.fleet is not None and config.broker is not None
    assert config.identity.device_id == "dev-0001"
    assert config.identity.devid_cert.path == pki["devid_cert"]
    assert len(config.identity.devid_cert.certificates) == 1
    assert config.fleet.service_key.curve.name == "secp256r1"
    assert [a.path for a in config.fleet.trust_anchors] == [pki["anchor"]]
    assert (config.broker.host, config.broker.port, config.broker.keepalive) == (
        "broker.example",
        8884,
        60,
    )
    assert config.api.socket_group == 65534
    root, nobody = PeerCredentials(1, 0, 0), PeerCredentials(2, 65534, 65534)
    config.api.policy.check(root, "encrypt", "g1")
    config.api.policy.check(nobody, "sign", None)
    assert config.rotation.default == RotationPolicy(3600, 1000, 600)
    assert config.rotation.for_group("g1") == RotationPolicy(60, 1000, 600)
    assert config.rotation.for_group("g2") == RotationPolicy(3600, None, 600)
    assert config.rotation.for_group("other") == config.rotation.default


def test_acceptance_wrong_type_names_the_key(tmp_path: Path, pki: dict[str, Path]) -> None:
    text = _provisioned_toml(pki).replace("port = 8884", 'port = "8884"')
    assert _problems(_write(tmp_path, text)) == [
        'broker.port: got "8884" (string), expected an integer from 1 to 65535'
    ]


def test_acceptance_unknown_key_is_named(tmp_path: Path) -> None:
    problems = _problems(_write(tmp_path, "[tpm]\ntcti = 'device:/dev/tpm0'\npcr = [7]\n"))
    assert problems == ["tpm.pcr: unknown key, expected one of: tcti, pcrs"]
    assert _problems(_write(tmp_path, "[tmp]\n")) == [
        "tmp: unknown key, expected one of: tpm, state, identity, fleet, broker, api, rotation, "
        "simulation, attestation, renewal, releases"
    ]


def test_acceptance_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert _problems(missing) == [f"{missing}: file not found, expected a TOML configuration file"]


def test_acceptance_unreadable_certificate_is_named(tmp_path: Path, pki: dict[str, Path]) -> None:
    pki["devid_cert"].write_text(f"-----BEGIN CERTIFICATE-----\n{SECRET_MARKER}\n")
    pki["ca"].unlink()
    pki["anchor"].write_text("just text\n")
    problems = _problems(_write(tmp_path, _provisioned_toml(pki)))
    assert problems == [
        f'identity.devid_cert: got "{pki["devid_cert"]}" (string), expected a PEM X.509 '
        "certificate file (the PEM certificate does not parse as X.509)",
        f'fleet.trust_anchors[0]: got "{pki["anchor"]}" (string), expected a PEM X.509 '
        "certificate file (no PEM certificate in the file)",
        f'broker.ca: got "{pki["ca"]}" (string), expected a PEM X.509 certificate file '
        "(file not found)",
    ]
    assert all(SECRET_MARKER not in p for p in problems)  # file contents are never printed


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory another uid can enter (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="kf-config-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


def test_acceptance_certificate_unreadable_by_the_agent_user(
    world_dir: Path, nobody_python: NobodyPython
) -> None:
    """Root reads everything, so permission is checked from a process running as nobody."""
    cert = _cert(world_dir / "ca.pem")
    cert.chmod(0o600)
    config = world_dir / "agent.toml"
    config.write_text(f'[broker]\nhost = "b"\nca = "{cert}"\n')
    config.chmod(0o644)
    code = (
        "from agent.config import load_config\n"
        "from agent.configschema import ConfigProblems\n"
        f"try:\n    load_config({str(config)!r})\n"
        "except ConfigProblems as e:\n    print('\\n'.join(e.problems))\n"
    )
    result = nobody_python.run(code)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert (
        f'broker.ca: got "{cert}" (string), expected a PEM X.509 certificate file '
        "(not readable by this process)"
    ) in out


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = """
[tpm]
tcti = "bogus:x"
pcrs = [0, 24, "7"]
[state]
dir = "relative/dir"
[[api.rules]]
uid = "no-such-user-kf"
operations = ["encrypt", "fly"]
[[api.rules]]
uid = 0
operations = ["decrypt"]
[rotation]
grace_period = -1
max_messages_per_epoch = 4294967297
[simulation]
insecure_software_keys = "yes"
"""
    problems = _problems(_write(tmp_path, text))
    assert problems == [
        'tpm.tcti: got "bogus:x" (string), expected a TCTI string like "device:/dev/tpmrm0" '
        "(TCTI name 'bogus' is not one of device, swtpm, mssim, tabrmd)",
        "tpm.pcrs[1]: got 24 (integer), expected an integer from 0 to 23 (PCR index)",
        'tpm.pcrs[2]: got "7" (string), expected an integer from 0 to 23 (PCR index)',
        'state.dir: got "relative/dir" (string), expected an absolute path',
        'api.rules[0].uid: got "no-such-user-kf" (string), expected an existing user '
        "(no such user)",
        'api.rules[0].operations[1]: got "fly" (string), expected one of "encrypt", "decrypt", '
        '"sign", "seal", "unseal", "list-keys", "*"',
        "api.rules[1]: got {...} (table), expected a table {uid and/or gid, operations, groups} "
        "(groups must be listed because operations include decrypt)",
        "rotation.max_messages_per_epoch: got 4294967297 (integer), expected an integer from 0 "
        "to 4294967296 (0 = only the AES-GCM limit of 2**32)",
        "rotation.grace_period: got -1 (integer), expected an integer from 0 to 315360000 "
        "(seconds)",
        'simulation.insecure_software_keys: got "yes" (string), expected true or false',
    ]


def test_half_provisioned_file_is_refused(tmp_path: Path, pki: dict[str, Path]) -> None:
    text = f'[broker]\nhost = "b"\nca = "{pki["ca"]}"\n'
    problems = _problems(_write(tmp_path, text))
    assert [p.split(":")[0] for p in problems] == ["identity", "fleet"]
    assert "needs [identity], [fleet] and [broker] together (found [broker])" in problems[0]
    assert _problems(_write(tmp_path, ""), require_provisioned=True) == [
        "identity: missing, expected the [identity] table: this command needs a provisioned device"
    ]


def test_rules_need_a_principal_and_groups(tmp_path: Path) -> None:
    text = '[[api.rules]]\noperations = ["*"]\ngroups = ["g1", "bad/name"]\n'
    assert _problems(_write(tmp_path, text)) == [
        'api.rules[0].groups[1]: got "bad/name" (string), expected a group name '
        '([A-Za-z0-9][A-Za-z0-9._-]{0,63}) or "*" (bad group name)'
    ]
    text = '[[api.rules]]\noperations = ["*"]\ngroups = ["*"]\n'
    assert _problems(_write(tmp_path, text)) == [
        "api.rules[0]: got {...} (table), expected a table {uid and/or gid, operations, groups} "
        "(a rule must name a uid, a gid, or both)"
    ]


def test_private_key_files_must_be_private(tmp_path: Path, pki: dict[str, Path]) -> None:
    pki["tls_key"].chmod(0o644)
    assert _problems(_write(tmp_path, _provisioned_toml(pki))) == [
        f'identity.tls_key: got "{pki["tls_key"]}" (string), expected a PEM private key file '
        "readable only by its owner (private key file has mode 0644, must be 0600 or stricter)"
    ]


def test_devid_key_must_be_a_tss2_blob_unless_simulating(
    tmp_path: Path, pki: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    pki["devid_key"].write_bytes(pki["tls_key"].read_bytes())  # a software key
    problems = _problems(_write(tmp_path, _provisioned_toml(pki)))
    assert len(problems) == 1 and problems[0].startswith("identity.devid_key: got")
    assert "accepted only with simulation.insecure_software_keys = true" in problems[0]
    with caplog.at_level(logging.WARNING, logger="keyagent.config"):
        config = load_config(
            _write(tmp_path, _provisioned_toml(pki, simulation="insecure_software_keys = true"))
        )
    assert config.simulation.insecure_software_keys
    assert any("INSECURE" in r.getMessage() for r in caplog.records)
    pki["devid_key"].write_text(
        "-----BEGIN TSS2 PRIVATE KEY-----\nAAAA\n-----END TSS2 PRIVATE KEY-----\n"
    )
    (problem,) = _problems(_write(tmp_path, _provisioned_toml(pki)))
    assert problem.startswith("identity.devid_key: got") and "malformed" in problem


def test_service_key_must_be_p256(tmp_path: Path, pki: dict[str, Path]) -> None:
    _cert(pki["service_cert"], ec.SECP384R1())
    (problem,) = _problems(_write(tmp_path, _provisioned_toml(pki)))
    assert problem.startswith("fleet.service_cert: got") and "ECC P-256" in problem
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    pki["service_cert"].write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    config = load_config(_write(tmp_path, _provisioned_toml(pki)))
    assert config.fleet is not None and config.fleet.service_key == public


def test_release_key_is_optional_and_must_be_a_p256_public_key(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    config = load_config(_write(tmp_path, _provisioned_toml(pki)))
    assert config.releases.key is None and config.releases.key_file is None
    key_file = tmp_path / "release-key.pem"
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    key_file.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    text = _provisioned_toml(pki, releases=f'key = "{key_file}"')
    config = load_config(_write(tmp_path, text))
    assert config.releases.key == public and config.releases.key_file == key_file
    key_file.write_bytes(
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (problem,) = _problems(_write(tmp_path, text))
    assert problem.startswith("releases.key: got") and "ECC P-256" in problem
    key_file.write_bytes(b"not a key")
    (problem,) = _problems(_write(tmp_path, text))
    assert problem.startswith("releases.key: got") and "PEM public key" in problem


def test_bad_toml_and_path_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "[tpm\n")
    (problem,) = _problems(path)
    assert problem.startswith(f"{path}: not valid TOML:") and "line 1" in problem
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "env.toml"))
    assert config_path() == tmp_path / "env.toml"
    assert config_path(tmp_path / "x.toml") == tmp_path / "x.toml"
    monkeypatch.delenv(CONFIG_ENV)
    assert config_path() == Path("/etc/keyagent/agent.toml")


_toml_values = st.recursive(
    st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8) | st.floats(),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["tcti", "pcrs", "dir", "socket", "rules", "uid", "operations", "x"]),
            inner,
            max_size=3,
        )
    ),
    max_leaves=8,
)


@settings(max_examples=1500, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["tpm", "state", "api", "rotation", "simulation", "broker", "zzz"]),
        _toml_values,
        max_size=4,
    )
)
def test_any_document_gives_a_config_or_config_problems(document: dict[str, object]) -> None:
    try:
        parse_config(document, Path("/fuzz.toml"))
    except ConfigProblems as exc:
        assert exc.problems and all(":" in p for p in exc.problems)


def test_file_mode_of_config_is_not_required(tmp_path: Path) -> None:
    """The config file itself holds no secrets (paths only), so a 0644 file is fine."""
    path = _write(tmp_path, "")
    os.chmod(path, 0o644)
    assert not load_config(path).provisioned


def test_releases_install_command_is_an_argv_with_a_version_placeholder(tmp_path: Path) -> None:
    """[releases] install_command: the staged rollout's update hook (agent.config.InstallConfig)."""
    base = {"tpm": {"tcti": "swtpm:port=2321"}, "state": {"dir": str(tmp_path)}}
    assert parse_config(base, tmp_path / "a.toml").install is None
    config = parse_config(
        {**base, "releases": {"install_command": ["/usr/bin/update", "--to", "v{version}"]}},
        tmp_path / "a.toml",
    )
    assert config.install is not None and config.install.timeout == 600
    assert config.install.argv("1.1") == ["/usr/bin/update", "--to", "v1.1"]
    for bad in (["/usr/bin/update"], ["{version}", "x"], [], "update {version}"):
        with pytest.raises(ConfigProblems, match=r"releases\.install_command"):
            parse_config({**base, "releases": {"install_command": bad}}, tmp_path / "a.toml")


def test_renewal_fraction_defaults_to_two_thirds_and_is_bounded(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "")).renewal == RenewalConfig(True, Ratio(2, 3))
    config = load_config(_write(tmp_path, '[renewal]\nfraction = "0.75"\nenabled = false\n'))
    assert config.renewal == RenewalConfig(False, Ratio(3, 4))
    for bad in ('"1"', '"0"', '"x"', "0.5"):
        problems = _problems(_write(tmp_path, f"[renewal]\nfraction = {bad}\n"))
        assert len(problems) == 1 and problems[0].startswith("renewal.fraction"), problems


def test_renewal_url_is_an_https_url_and_its_ca_a_certificate_file(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, '[renewal]\nurl = "https://fleet.example.net:8445/"\n'))
    assert config.renewal.url == "https://fleet.example.net:8445" and config.renewal.ca is None
    for bad in ('"http://fleet.example.net"', '"https://"', '"https://h:99999"', '"https://u@h"'):
        problems = _problems(_write(tmp_path, f"[renewal]\nurl = {bad}\n"))
        assert len(problems) == 1 and problems[0].startswith("renewal.url"), problems
    not_a_cert = tmp_path / "ca.pem"
    not_a_cert.write_text("not a certificate\n")
    problems = _problems(_write(tmp_path, f'[renewal]\nca = "{not_a_cert}"\n'))
    assert len(problems) == 1 and problems[0].startswith("renewal.ca"), problems
