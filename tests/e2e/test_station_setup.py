"""``keyprovision`` before it provisions: its own TLS files checked one by one (pure, files on
disk only), then one request to the real enrollment API over HTTPS with mutual TLS (uvicorn on a
loopback port, a SQLite registry) that tells an unreachable service from one whose certificate
does not verify against ``--ca`` and from one that refuses the station certificate. A wrong file
stops the station before it writes a byte to the device's serial port (a real pty here)."""

from __future__ import annotations

import io
import os
import select
import tty
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.protocol.errors import ConfigError, TransportError
from firmware_sim.ports import free_port
from provisioning.enroll import Enrollment
from provisioning.http import EnrollmentServer, build_app, start_enrollment_server
from provisioning.pki import (
    create_ca,
    generate_key,
    issue_client_cert,
    write_certificate,
    write_private_key,
)
from provisioning.station import EXIT_ERROR, FleetClient, check_tls_files, main
from tests.fixtures.swtpm import ManufacturerCA
from tests.tpm.test_enroll import FleetPKI, make_pki, make_registry, make_settings

NOW = datetime.now(UTC)
DAY = timedelta(days=1)


def _station_files(directory: Path) -> tuple[Path, Path, Path]:
    """A station certificate and key from a station CA, and a CA file (another CA)."""
    directory.mkdir(parents=True, exist_ok=True)
    station_ca = create_ca("station-ca", now=NOW, valid_for=30 * DAY)
    server_ca = create_ca("server-ca", now=NOW, valid_for=30 * DAY)
    key = generate_key()
    cert = issue_client_cert(
        station_ca, key.public_key(), identity="st-1", role="station", now=NOW, valid_for=DAY
    )
    paths = directory / "station.pem", directory / "station.key", directory / "ca.pem"
    write_certificate(paths[0], cert)
    write_private_key(paths[1], key)
    write_certificate(paths[2], server_ca.certificate)
    return paths


@pytest.mark.pure
def test_good_files_pass(tmp_path: Path) -> None:
    check_tls_files(*_station_files(tmp_path))


@pytest.mark.pure
@pytest.mark.parametrize("which", [0, 1, 2])
def test_a_missing_file_is_named_with_its_flag(tmp_path: Path, which: int) -> None:
    files = list(_station_files(tmp_path))
    files[which] = tmp_path / "mistyped.pem"
    flag = ("--cert", "--key", "--ca")[which]
    with pytest.raises(ConfigError) as err:
        check_tls_files(*files)
    assert str(err.value) == f"{flag} {tmp_path / 'mistyped.pem'}: no such file"


@pytest.mark.pure
def test_a_directory_is_not_a_file(tmp_path: Path) -> None:
    cert, key, _ = _station_files(tmp_path)
    with pytest.raises(ConfigError, match=r"^--ca .*: is a directory, not a file$"):
        check_tls_files(cert, key, tmp_path)


@pytest.mark.pure
def test_unparsable_files_are_named(tmp_path: Path) -> None:
    cert, key, ca = _station_files(tmp_path)
    with pytest.raises(ConfigError, match=r"^--cert .*station\.key: not a PEM certificate"):
        check_tls_files(key, key, ca)  # the key given as the certificate
    with pytest.raises(ConfigError, match=r"^--key .*station\.pem: not a PEM private key"):
        check_tls_files(cert, cert, ca)  # the certificate given as the key
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match=r"^--ca .*garbage\.pem: not a PEM certificate"):
        check_tls_files(cert, key, garbage)


@pytest.mark.pure
def test_an_encrypted_key_is_named_and_not_echoed(tmp_path: Path) -> None:
    cert, _, ca = _station_files(tmp_path)
    encrypted = tmp_path / "encrypted.key"
    write_private_key(encrypted, generate_key(), password=b"passphrase")
    with pytest.raises(ConfigError) as err:
        check_tls_files(cert, encrypted, ca)
    assert str(err.value).startswith(f"--key {encrypted}: the private key is encrypted")
    assert "PRIVATE" not in str(err.value)


@pytest.mark.pure
def test_a_key_of_another_certificate_is_refused(tmp_path: Path) -> None:
    cert, _, ca = _station_files(tmp_path)
    other = tmp_path / "other.key"
    write_private_key(other, generate_key())
    with pytest.raises(ConfigError) as err:
        check_tls_files(cert, other, ca)
    assert str(err.value) == (
        f"--key {other} is not the key of --cert {cert} (OU=station,CN=st-1): "
        "their public keys differ"
    )


@pytest.mark.pure
def test_an_expired_certificate_is_named(tmp_path: Path) -> None:
    files = _station_files(tmp_path)
    with pytest.raises(ConfigError, match=r"^--cert .*station\.pem: expired on 20"):
        check_tls_files(*files, now=NOW + 2 * DAY)
    with pytest.raises(ConfigError, match=r"^--cert .*station\.pem: not valid before 20"):
        check_tls_files(*files, now=NOW - DAY)


# ---- against the real enrollment API ---------------------------------------------------------


@pytest.fixture
def service(tmp_path: Path, manufacturer_ca: ManufacturerCA) -> Iterator[tuple[FleetPKI, str]]:
    pki = make_pki(tmp_path / "pki")
    sessions = make_registry(tmp_path / "fleet.db", pki)
    server: EnrollmentServer = start_enrollment_server(
        build_app(Enrollment(make_settings(pki, manufacturer_ca), sessions)),
        server_cert=pki.server_cert_path,
        server_key=pki.server_key_path,
        station_ca=pki.station_ca_path,
    )
    try:
        yield pki, server.url
    finally:
        server.stop()
        sessions.kw["bind"].dispose()


@pytest.mark.e2e
def test_probe_passes_with_the_right_files(service: tuple[FleetPKI, str]) -> None:
    pki, url = service
    FleetClient(
        url, cert=pki.station_cert_path, key=pki.station_key_path, ca=pki.server_ca_path
    ).probe()


@pytest.mark.e2e
def test_wrong_ca_says_reached_but_not_verified(service: tuple[FleetPKI, str]) -> None:
    pki, url = service
    wrong_ca = pki.station_ca_path  # a CA, but not the one of the service's certificate
    client = FleetClient(url, cert=pki.station_cert_path, key=pki.station_key_path, ca=wrong_ca)
    with pytest.raises(TransportError) as err:
        client.probe()
    host_port = url.removeprefix("https://")
    assert str(err.value) == (
        f"fleet service {host_port} reached, but its certificate does not verify against "
        f"--ca {wrong_ca}: unable to get local issuer certificate"
    )
    assert "unreachable" not in str(err.value)


@pytest.mark.e2e
def test_a_station_certificate_of_another_ca_is_refused_by_the_service(
    service: tuple[FleetPKI, str], tmp_path: Path
) -> None:
    pki, url = service
    cert, key, _ = _station_files(tmp_path / "stranger")  # valid, but from another station CA
    client = FleetClient(url, cert=cert, key=key, ca=pki.server_ca_path, retries=0)
    with pytest.raises(TransportError) as err:
        client.probe()
    host_port = url.removeprefix("https://")
    assert str(err.value) == (
        f"fleet service {host_port} reached, but it closed the connection without an answer: "
        f"most likely it refused the station certificate --cert {cert} (is it issued by the "
        "service's station CA?)"
    )


@pytest.mark.pure
def test_nothing_listening_is_unreachable(tmp_path: Path) -> None:
    cert, key, ca = _station_files(tmp_path)
    port = free_port()
    client = FleetClient(f"https://127.0.0.1:{port}", cert=cert, key=key, ca=ca, retries=0)
    with pytest.raises(TransportError) as err:
        client.probe()
    assert str(err.value) == f"fleet service 127.0.0.1:{port} unreachable: Connection refused"


@pytest.fixture
def pty_port() -> Iterator[tuple[int, str]]:
    """A real pty: the station opens the slave as its serial port; the test reads the master,
    where the device would read the station's requests."""
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        yield master, os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)


def _bytes_sent_to(master: int) -> bytes:
    ready, _, _ = select.select([master], [], [], 0.3)
    return os.read(master, 4096) if ready else b""


@pytest.mark.e2e
def test_keyprovision_stops_before_the_device_on_a_wrong_ca(
    service: tuple[FleetPKI, str],
    pty_port: tuple[int, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    pki, url = service
    master, port = pty_port
    argv = ["--port", port, "--fleet", url, "--cert", str(pki.station_cert_path)]
    argv += ["--key", str(pki.station_key_path), "--ca", str(pki.station_ca_path)]
    assert main(argv) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "reached, but its certificate does not verify against --ca" in err
    assert _bytes_sent_to(master) == b""


@pytest.mark.pure
def test_keyprovision_names_a_mistyped_cert_before_the_device(
    tmp_path: Path, pty_port: tuple[int, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, key, ca = _station_files(tmp_path)
    master, port = pty_port
    typo = tmp_path / "staton.pem"
    argv = ["--port", port, "--fleet", "https://127.0.0.1:9", "--cert", str(typo)]
    argv += ["--key", str(key), "--ca", str(ca), "--json"]
    out = io.StringIO()
    assert main(argv, out=out) == EXIT_ERROR
    assert f'"reason": "--cert {typo}: no such file"' in out.getvalue()
    assert _bytes_sent_to(master) == b""
    assert capsys.readouterr().err == ""
