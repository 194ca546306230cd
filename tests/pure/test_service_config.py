"""The fleet service's TOML configuration: a good file loads, every kind of mistake is named with
its key, value and expectation, and all mistakes come back together."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.protocol.errors import ConfigError
from firmware_sim.boot import default_components
from provisioning.cli import main
from provisioning.config import InvalidConfig, ServiceConfig, load_config
from provisioning.custody import FileKeyRef, TokenKeyRef
from provisioning.policy import policy_from_components, write_policy
from provisioning.service.mqtt import attestation_from, settings_from

pytestmark = pytest.mark.pure

FILES = {
    "pki/broker-ca.pem": 0o644,
    "pki/service.pem": 0o644,
    "pki/service.key": 0o600,
    "pki/device-ca.pem": 0o644,
    "pki/device-ca.key": 0o600,
    "pki/operator-ca.pem": 0o644,
    "pki/manufacturer-cas.pem": 0o644,
    "policy/golden.toml": 0o644,
    "pki/enroll.pem": 0o644,
    "pki/enroll.key": 0o600,
    "pki/station-ca.pem": 0o644,
}

SECTIONS = {
    "database": '[database]\nurl = "sqlite:///fleet.db"\n',
    "broker": (
        '[broker]\nhost = "127.0.0.1"\nport = 18883\nca = "pki/broker-ca.pem"\n'
        'client_cert = "pki/service.pem"\nclient_key = "pki/service.key"\n'
    ),
    "device_ca": '[device_ca]\ncert = "pki/device-ca.pem"\nkey = "pki/device-ca.key"\n',
    "operator_ca": '[operator_ca]\ncert = "pki/operator-ca.pem"\n',
    "attestation": (
        '[attestation]\nmanufacturer_cas = "pki/manufacturer-cas.pem"\n'
        'golden_measurements = "policy/golden.toml"\ninterval_seconds = 600\n'
        "max_challenges_per_second = 12\n"
    ),
    "groups": "[groups]\ncommit_log_retention_epochs = 16\nack_timeout_seconds = 20\n"
    "tree_requests_per_minute = 30\ntree_request_burst = 8\ntree_pages_kept = 4\n",
    "http": (
        '[http]\nlisten = "127.0.0.1:8443"\ntls_cert = "pki/enroll.pem"\n'
        'tls_key = "pki/enroll.key"\nstation_ca = "pki/station-ca.pem"\n'
    ),
}
GOOD = "\n".join(SECTIONS.values())


def without(*names: str) -> str:
    return "\n".join(text for name, text in SECTIONS.items() if name not in names)


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    for name, mode in FILES.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"contents of {name}\n")
        path.chmod(mode)
    return tmp_path


def write(config_dir: Path, text: str) -> Path:
    path = config_dir / "keyfleet.toml"
    path.write_text(text)
    return path


def problems_of(path: Path) -> dict[str, tuple[str, str]]:
    with pytest.raises(InvalidConfig) as caught:
        load_config(path)
    assert isinstance(caught.value, ConfigError)
    for problem in caught.value.problems:
        assert str(problem) in str(caught.value)  # the message carries every problem
    return {p.key: (p.value, p.expected) for p in caught.value.problems}


def test_good_file_loads_into_a_frozen_dataclass(config_dir: Path) -> None:
    config = load_config(write(config_dir, GOOD))
    assert isinstance(config, ServiceConfig)
    assert config.database_url == f"sqlite:///{config_dir / 'fleet.db'}"
    assert config.broker.host == "127.0.0.1" and config.broker.port == 18883
    assert config.broker.client_key == config_dir / "pki/service.key"
    assert config.device_ca.key == FileKeyRef(config_dir / "pki/device-ca.key")
    assert config.operator_ca_cert == config_dir / "pki/operator-ca.pem"
    assert config.attestation.golden_measurements == config_dir / "policy/golden.toml"
    assert config.attestation.interval_seconds == 600
    assert config.attestation.max_challenges_per_second == 12
    write_policy(
        policy_from_components(default_components("1.0")), config.attestation.golden_measurements
    )
    assert attestation_from(config).challenges_per_second == 12  # the schedule's rate
    assert (config.groups.commit_log_retention_epochs, config.groups.ack_timeout_seconds) == (
        16,
        20,
    )
    assert (config.groups.tree_requests_per_minute, config.groups.tree_request_burst) == (30, 8)
    assert config.groups.tree_pages_kept == 4
    assert settings_from(config).tree_pages_kept == 4  # what the service's tree cache keeps
    assert config.http is not None and (config.http.host, config.http.port) == ("127.0.0.1", 8443)
    with pytest.raises(AttributeError):
        config.broker.port = 1  # type: ignore[misc]


def test_defaults_for_optional_tables_and_keys(config_dir: Path) -> None:
    text = without("database", "groups", "http").replace("port = 18883\n", "")
    text = text.replace("interval_seconds = 600\n", "")
    text = text.replace("max_challenges_per_second = 12\n", "")
    config = load_config(write(config_dir, text))
    assert config.database_url == f"sqlite:///{config_dir / 'keyfleet.db'}"
    assert config.broker.port == 8883
    assert config.attestation.interval_seconds == 3600
    assert config.attestation.max_challenges_per_second == 50
    assert (config.groups.commit_log_retention_epochs, config.groups.ack_timeout_seconds) == (
        64,
        30,
    )
    assert (config.groups.tree_requests_per_minute, config.groups.tree_request_burst) == (120, 256)
    assert config.groups.tree_pages_kept == 2
    assert config.http is None


def test_unknown_keys_and_tables_are_errors(config_dir: Path) -> None:
    text = GOOD.replace('host = "127.0.0.1"', 'host = "127.0.0.1"\nhots = "typo"') + (
        "\n[telemetry]\nport = 9100\n"
    )
    found = problems_of(write(config_dir, text))
    assert set(found) == {"broker.hots", "telemetry"}
    assert found["broker.hots"] == (
        '"typo" (string)',
        "one of: host, port, ca, client_cert, client_key",
    )
    assert found["telemetry"][1].startswith("one of: database, broker")


def test_wrong_types_and_ranges(config_dir: Path) -> None:
    text = (
        GOOD.replace("port = 18883", 'port = "18883"')
        .replace("interval_seconds = 600", "interval_seconds = true")
        .replace("ack_timeout_seconds = 20", "ack_timeout_seconds = 0")
        .replace("commit_log_retention_epochs = 16", "commit_log_retention_epochs = 2.5")
        .replace('listen = "127.0.0.1:8443"', 'listen = "127.0.0.1:99999"')
        .replace('host = "127.0.0.1"', "host = 42")
        .replace("tree_pages_kept = 4", "tree_pages_kept = 17")
        .replace("max_challenges_per_second = 12", "max_challenges_per_second = 101")
    )
    found = problems_of(write(config_dir, text))
    assert found == {
        "broker.port": ('"18883" (string)', "an integer from 1 to 65535"),
        "broker.host": ("42 (integer)", "a non-empty string"),
        "attestation.interval_seconds": (
            "true (boolean)",
            "an integer from 10 to 604800 (seconds)",
        ),
        "groups.ack_timeout_seconds": ("0 (integer)", "an integer from 1 to 86400 (seconds)"),
        "groups.commit_log_retention_epochs": (
            "2.5 (float)",
            "an integer from 1 to 1000000 (epochs)",
        ),
        "groups.tree_pages_kept": ("17 (integer)", "an integer from 1 to 16 (trees)"),
        "attestation.max_challenges_per_second": (
            "101 (integer)",
            "an integer from 1 to 100 (challenges)",
        ),
        "http.listen": (
            '"127.0.0.1:99999" (string)',
            "HOST:PORT with a port from 1 to 65535, e.g. 127.0.0.1:8443 or [::1]:8443",
        ),
    }


def test_missing_required_keys_and_tables(config_dir: Path) -> None:
    text = without("attestation", "operator_ca").replace('ca = "pki/broker-ca.pem"\n', "")
    text = text.replace('listen = "127.0.0.1:8443"', "")
    found = problems_of(write(config_dir, text))
    assert found["broker.ca"] == ("missing", "a readable file")
    assert found["http.listen"] == (  # [http] given, so needed
        "missing",
        "HOST:PORT with a port from 1 to 65535, e.g. 127.0.0.1:8443 or [::1]:8443",
    )
    assert found["attestation"] == (
        "missing",
        "a table with manufacturer_cas, golden_measurements, interval_seconds, quarantine, "
        "manufacturer_crls, max_challenges_per_second",
    )
    assert found["operator_ca"] == ("missing", "a table with cert")
    assert len(found) == 4


def test_missing_unreadable_and_wrong_files(config_dir: Path) -> None:
    (config_dir / "pki/operator-ca.pem").unlink()
    (config_dir / "pki/device-ca.key").chmod(0o644)
    (config_dir / "policy/golden.toml").unlink()
    (config_dir / "policy/golden.toml").mkdir()
    text = GOOD.replace('url = "sqlite:///fleet.db"', 'url = "sqlite:///no/such/dir/fleet.db"')
    found = problems_of(write(config_dir, text))
    assert found["operator_ca.cert"][1] == (
        f"a readable file (file not found: {config_dir / 'pki/operator-ca.pem'})"
    )
    assert found["device_ca.key"] == (
        '"pki/device-ca.key" (string)',
        "a private key file readable only by its owner (private key file has mode 0644, "
        "must be 0600 or "
        f"stricter: {config_dir / 'pki/device-ca.key'})",
    )
    assert "(not a regular file" in found["attestation.golden_measurements"][1]
    no_dir = f"(no directory {config_dir / 'no/such/dir'} for the SQLite file)"
    assert no_dir in found["database.url"][1]
    assert len(found) == 4  # the good keys are not reported


def test_database_url_is_checked_and_its_password_never_shown(config_dir: Path) -> None:
    text = GOOD.replace(
        'url = "sqlite:///fleet.db"', 'url = "mysql://keyfleet:hunter2@db/keyfleet"'
    )
    with pytest.raises(InvalidConfig) as caught:
        load_config(write(config_dir, text))
    assert "hunter2" not in str(caught.value)
    assert 'database.url: got "mysql://keyfleet:***@db/keyfleet" (string)' in str(caught.value)
    pg = GOOD.replace('url = "sqlite:///fleet.db"', 'url = "postgresql://kf:hunter2@db/kf"')
    config = load_config(write(config_dir, pg))
    assert config.database_url == "postgresql://kf:hunter2@db/kf"
    assert "hunter2" not in repr(config)
    assert config.database_url_redacted == "postgresql://kf:***@db/kf"
    memory = GOOD.replace('url = "sqlite:///fleet.db"', 'url = "sqlite://"')
    assert "in-memory" in problems_of(write(config_dir, memory))["database.url"][1]


def test_file_level_errors(config_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"absent\.toml: file not found"):
        load_config(config_dir / "absent.toml")
    with pytest.raises(ConfigError, match=r"not valid TOML: .*line 2"):
        load_config(write(config_dir, "[broker]\nhost = \n"))
    (config_dir / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(config_dir / "bin.toml")


def test_a_blank_name_is_refused(config_dir: Path) -> None:
    text = GOOD.replace('host = "127.0.0.1"', 'host = "   "')
    assert problems_of(write(config_dir, text)) == {
        "broker.host": ('"   " (string)', "a non-empty string (not only spaces)")
    }


# ---- key references and the service's own signing key ------------------------------------------

TOKEN_URI = "pkcs11:token=keyfleet;object=device-ca?pin-source=file:pki/token.pin"


def test_a_key_may_be_a_token_reference(config_dir: Path) -> None:
    text = GOOD.replace('key = "pki/device-ca.key"', f'key = "{TOKEN_URI}"')
    config = load_config(write(config_dir, text))
    key = config.device_ca.key
    assert isinstance(key, TokenKeyRef)
    assert (key.token, key.label) == ("keyfleet", "device-ca")
    assert key.pin is not None and key.pin.where == str(config_dir / "pki/token.pin")


@pytest.mark.parametrize(
    "value",
    [
        "pkcs11:token=keyfleet;object=device-ca",  # no PIN source
        "pkcs11:token=keyfleet;object=device-ca?pin-value=123456",  # a PIN in clear
        "pkcs11:object=device-ca?pin-source=env:PIN",  # no token
    ],
)
def test_a_bad_token_reference_is_a_config_problem(config_dir: Path, value: str) -> None:
    text = GOOD.replace('key = "pki/device-ca.key"', f'key = "{value}"')
    with pytest.raises(InvalidConfig) as caught:
        load_config(write(config_dir, text))
    assert "device_ca.key" in str(caught.value)
    assert "123456" not in str(caught.value)


def test_serving_needs_a_signing_key_of_its_own(config_dir: Path) -> None:
    """token.signing_key.absent / token.signing_key.tls: the service refuses to sign with nothing
    or with its MQTT or HTTPS TLS key."""
    config = load_config(write(config_dir, GOOD))
    with pytest.raises(InvalidConfig, match=r"token\.signing_key\.absent"):
        config.require_signing()
    for tls_key in ("pki/service.key", "pki/enroll.key"):
        text = GOOD + f'\n[service]\nsigning_key = "{tls_key}"\nsigning_cert = "pki/service.pem"\n'
        config = load_config(write(config_dir, text))
        with pytest.raises(InvalidConfig, match=r"token\.signing_key\.tls"):
            config.require_signing()
    text = GOOD + f'\n[service]\nsigning_key = "{TOKEN_URI}"\nsigning_cert = "pki/service.pem"\n'
    assert load_config(write(config_dir, text)).signing_problems() == []


def test_serve_refuses_to_start_without_a_signing_key_of_its_own(
    config_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for extra in (
        "",
        '\n[service]\nsigning_key = "pki/service.key"\nsigning_cert = "pki/service.pem"\n',
    ):
        path = write(config_dir, GOOD + extra)
        assert main(["serve", "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert "token.signing_key" in err and "[service] signing_key" in err
        assert not (config_dir / "fleet.db").exists()  # refused before touching the database


def test_a_signing_certificate_of_another_key_is_refused(config_dir: Path) -> None:
    """token.signing_cert.mismatch: devices would refuse every message the service signs."""
    from datetime import UTC, datetime, timedelta

    from provisioning import pki
    from provisioning.service.mqtt import load_signing_key

    ca = pki.create_ca("test CA", now=datetime.now(UTC), valid_for=timedelta(days=1))
    key, other = pki.generate_key(), pki.generate_key()
    pki.write_private_key(config_dir / "pki/signing.key", key)
    for name, public in (("right", key.public_key()), ("wrong", other.public_key())):
        cert = pki.issue_client_cert(
            ca, public, identity="keyfleet-service-signing", role="service",
            now=datetime.now(UTC), valid_for=timedelta(days=1),
        )  # fmt: skip
        pki.write_certificate(config_dir / f"pki/{name}.pem", cert)
    service = '\n[service]\nsigning_key = "pki/signing.key"\nsigning_cert = "pki/{}.pem"\n'
    good = load_config(write(config_dir, GOOD + service.format("right")))
    assert load_signing_key(good).public_key() == key.public_key()
    bad = load_config(write(config_dir, GOOD + service.format("wrong")))
    with pytest.raises(InvalidConfig, match=r"token\.signing_cert\.mismatch"):
        load_signing_key(bad)


def test_enrollment_certificate_lifetime_defaults_to_a_year_and_has_a_floor(
    config_dir: Path,
) -> None:
    assert load_config(write(config_dir, GOOD)).enrollment.certificate_validity_seconds == (
        365 * 86400
    )
    short = GOOD + "\n[enrollment]\ncertificate_validity_seconds = 60\n"
    assert load_config(write(config_dir, short)).enrollment.certificate_validity_seconds == 60
    too_short = GOOD + "\n[enrollment]\ncertificate_validity_seconds = 59\n"
    assert "enrollment.certificate_validity_seconds" in problems_of(write(config_dir, too_short))


def test_renewal_after_expiry_is_refused_by_default_and_needs_its_listener(
    config_dir: Path,
) -> None:
    default = load_config(write(config_dir, GOOD)).renewal
    assert (default.expired, default.max_expired_seconds) == ("refuse", 90 * 86400)
    assert not default.allows_expired and default.host is None
    allowed = GOOD + (
        '\n[renewal]\nexpired = "allow"\nmax_expired_seconds = 3600\nlisten = "0.0.0.0:8445"\n'
        'tls_cert = "pki/enroll.pem"\ntls_key = "pki/enroll.key"\n'
        'url = "https://fleet.example.net:8445"\n'
    )
    renewal = load_config(write(config_dir, allowed)).renewal
    assert renewal.allows_expired and renewal.max_expired_seconds == 3600
    assert (renewal.host, renewal.port) == ("0.0.0.0", 8445)
    assert renewal.tls_cert == config_dir / "pki/enroll.pem"
    assert renewal.url == "https://fleet.example.net:8445"
    # "allow" without the listener: the device could not reach the service at all
    no_listener = GOOD + '\n[renewal]\nexpired = "allow"\n'
    with pytest.raises(InvalidConfig) as caught:
        load_config(write(config_dir, no_listener))
    assert "listen, tls_cert and tls_key" in str(caught.value)
    wrong = GOOD + (
        '\n[renewal]\nexpired = "sometimes"\nmax_expired_seconds = -1\nurl = "http://x"\n'
    )
    assert {"renewal.expired", "renewal.max_expired_seconds", "renewal.url"} <= set(
        problems_of(write(config_dir, wrong))
    )
