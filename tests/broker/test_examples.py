"""The example files in docs/examples/ load where they are used, and the docs quote them exactly.

- ``service.toml`` through the service's loader (``provisioning.config.load_config``), against a
  PKI made by ``keyfleet pki init`` and ``keyfleet pki issue`` in the layout of
  docs/operations.md; ``golden.toml`` is the simulator's firmware release 1.0;
- ``agent.toml`` through the agent's loader (``agent.config.load_config``);
- ``acl`` is the product ACL (``firmware_sim.broker.ACL``);
- ``mosquitto.conf`` starts a real Mosquitto, rewritten only for the temporary directory and a
  free port, that lets the service and an operator connect (MQTT over mutual TLS) and refuses a
  certificate from a CA it does not trust;
- every block in docs/ marked ``<!-- example: PATH -->`` equals the file;
- ``keyfleet operator add`` with a certificate from another operator CA names both issuers.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import load_config as load_agent_config
from agent.mqtt import MqttClient
from agent.protocol.errors import KeyfleetError
from firmware_sim.boot import default_components
from firmware_sim.broker import ACL, mosquitto_binary
from firmware_sim.ports import free_port
from provisioning.cli import main
from provisioning.config import load_config
from provisioning.custody import FileKeyRef
from provisioning.policy import policy_from_components, write_policy

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"
EXAMPLE_LAB = "/var/tmp/kf-lab"
MARKER = re.compile(r"<!-- example: (?P<path>\S+) -->\n```[a-z]*\n(?P<body>.*?)```", re.DOTALL)


def make_lab_pki(lab: Path) -> Path:
    """What step 1 of docs/operations.md writes, through the same commands."""
    directory = lab / "pki"
    d = str(directory)
    for argv in (
        ("pki", "init", d),
        ("pki", "issue", "server", "mosquitto", "--dns", "localhost", "--ip", "127.0.0.1"),
        ("pki", "issue", "server", "keyfleet-enroll", "--dns", "localhost", "--ip", "127.0.0.1"),
        ("pki", "issue", "service", "keyfleet-service"),
        ("pki", "issue", "station", "line-1"),
        ("pki", "issue", "operator", "op-alice", "--role", "operator"),
    ):
        full = list(argv) if argv[1] == "init" else [*argv, "--dir", d]
        assert main(full) == 0, argv
    return directory


@pytest.mark.pure
def test_docs_quote_the_example_files_exactly() -> None:
    quoted: dict[str, int] = {}
    for page in sorted((ROOT / "docs").glob("*.md")):
        for match in MARKER.finditer(page.read_text()):
            path = match["path"]
            assert (ROOT / path).read_text() == match["body"], f"{page.name} quotes {path}"
            quoted[path] = quoted.get(path, 0) + 1
    for name in ("mosquitto.conf", "service.toml", "agent.toml"):
        assert quoted.get(f"docs/examples/{name}", 0) >= 1, f"docs/examples/{name} is not quoted"


@pytest.mark.pure
def test_acl_is_the_product_acl_and_golden_is_the_simulator_release(tmp_path: Path) -> None:
    assert (EXAMPLES / "acl").read_text() == ACL
    write_policy(policy_from_components(default_components()), tmp_path / "golden.toml")
    assert (EXAMPLES / "golden.toml").read_text() == (tmp_path / "golden.toml").read_text()


@pytest.mark.pure
def test_mosquitto_conf_has_no_trailing_comments() -> None:
    # Mosquitto takes everything after the option name as its value, "# ..." included.
    for number, line in enumerate((EXAMPLES / "mosquitto.conf").read_text().splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            assert "#" not in line, f"mosquitto.conf line {number}: {line!r}"


@pytest.fixture
def lab(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """docs/operations.md's $LAB after steps 1-3, with the example service files copied in."""
    lab = tmp_path / "lab"
    pki_dir = make_lab_pki(lab)
    # stands in for the manufacturer CAs that the first device boot produces (step 3)
    shutil.copy(pki_dir / "station-ca.pem", pki_dir / "manufacturer-cas.pem")
    (lab / "service").mkdir()
    for name in ("service.toml", "golden.toml"):
        shutil.copy(EXAMPLES / name, lab / "service" / name)
    capsys.readouterr()
    return lab


@pytest.mark.pure
def test_service_toml_loads_with_the_pki_commands_files(lab: Path) -> None:
    config = load_config(lab / "service" / "service.toml")
    pki_dir = (lab / "pki").resolve()
    assert config.broker.port == 8883
    assert config.broker.ca.resolve() == pki_dir / "tls-ca.pem"
    assert config.broker.client_cert.resolve() == pki_dir / "keyfleet-service.pem"
    assert isinstance(config.device_ca.key, FileKeyRef)
    assert config.device_ca.key.path.resolve() == pki_dir / "device-ca.key"
    assert isinstance(config.service.signing_key, FileKeyRef)
    assert config.service.signing_key.path.resolve() == pki_dir / "service-signing.key"
    assert config.signing_problems() == []
    assert config.operator_ca_cert.resolve() == pki_dir / "operator-ca.pem"
    assert config.http is not None
    assert (config.http.host, config.http.port) == ("127.0.0.1", 8443)
    assert config.http.tls_key.resolve() == pki_dir / "keyfleet-enroll.key"
    assert config.http.station_ca.resolve() == pki_dir / "station-ca.pem"
    assert config.database_url == f"sqlite:///{(lab / 'service' / 'fleet.db').resolve()}"


@pytest.mark.pure
def test_agent_toml_loads_with_the_agent_loader() -> None:
    config = load_agent_config(EXAMPLES / "agent.toml")
    assert config.identity is None  # the rules alone: a factory-mode file
    text = (EXAMPLES / "agent.toml").read_text()
    assert "[api]" not in text  # appended to a provisioned file that has its own [api] table
    assert "[[api.rules]]" in text


@pytest.mark.pure
def test_operator_add_refusal_names_both_issuers(
    lab: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(lab / "service" / "service.toml")
    other = tmp_path / "other"
    assert main(["pki", "init", str(other), "--org", "elsewhere"]) == 0
    assert main(["pki", "issue", "operator", "op-bob", "--dir", str(other)]) == 0
    capsys.readouterr()
    status = main(
        ["operator", "add", "op-bob", "--cert", str(other / "op-bob.pem"), "--config", config]
    )
    err = capsys.readouterr().err
    assert status == 2
    assert "[pki.issuer]" in err
    assert "'CN=elsewhere operator CA'" in err and "'CN=keyfleet operator CA'" in err
    # the fleet's own operator certificate is accepted with the role of its OU
    alice = str(lab / "pki" / "op-alice.pem")
    status = main(["operator", "add", "op-alice", "--cert", alice, "--config", config])
    assert status == 0
    assert "operator op-alice registered with role operator" in capsys.readouterr().out


# ---- Mosquitto with the example configuration -------------------------------------------------


@pytest.fixture
def example_broker(lab: Path) -> Iterator[tuple[Path, int]]:
    port = free_port()
    broker = lab / "broker"
    (broker / "persistence").mkdir(parents=True)
    text = (EXAMPLES / "mosquitto.conf").read_text()
    text = text.replace(EXAMPLE_LAB, str(lab)).replace("listener 8883 ", f"listener {port} ")
    (broker / "mosquitto.conf").write_text(text)
    shutil.copy(EXAMPLES / "acl", broker / "acl")
    out = (lab / "mosquitto.out").open("wb")
    process = subprocess.Popen(
        [mosquitto_binary(), "-c", str(broker / "mosquitto.conf")],
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        log = broker / "mosquitto.log"
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            if log.exists() and " running" in log.read_text():
                break
            time.sleep(0.05)
        assert process.poll() is None, (lab / "mosquitto.out").read_text()
        yield lab, port
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
        out.close()


def _connect(port: int, pki_dir: Path, identity: str, timeout: float) -> None:
    client = MqttClient(
        host="127.0.0.1",
        port=port,
        ca_file=str(pki_dir / "tls-ca.pem"),
        cert_file=str(pki_dir / f"{identity}.pem"),
        key_file=str(pki_dir / f"{identity}.key"),
        client_id=f"{identity}-example-test",
        timeout=timeout,
    )
    with client:
        client.connect()
        assert client.connected


@pytest.mark.broker
def test_example_mosquitto_conf_starts_and_requires_client_certificates(
    example_broker: tuple[Path, int],
) -> None:
    lab, port = example_broker
    pki_dir = lab / "pki"
    # the service (TLS CA) and an operator (operator CA) get in: client-cas.pem trusts both
    _connect(port, pki_dir, "keyfleet-service", timeout=10)
    _connect(port, pki_dir, "op-alice", timeout=10)
    # a station certificate is from a CA the broker does not trust
    with pytest.raises(KeyfleetError):
        _connect(port, pki_dir, "line-1", timeout=2)
    log = (lab / "broker" / "mosquitto.log").read_text()
    assert "New client connected" in log and "u'keyfleet-service'" in log, log
