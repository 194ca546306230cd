"""``keyfleet pki init`` and ``keyfleet pki issue`` (provisioning.pki_cli), run through the
``keyfleet`` entry point in-process: the files they write (modes, issuers, roles, SANs), that keys
are never printed, that nothing is overwritten, and the optional passphrase of the offline CAs.
The certificates are checked with the project's chain check and with ``openssl verify``."""

from __future__ import annotations

import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from agent.protocol.errors import ProtocolError
from provisioning import pki
from provisioning.cli import main

pytestmark = pytest.mark.pure

CA_FILES = ("tls-ca", "device-ca", "operator-ca", "station-ca")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def openssl_verify(ca: Path, cert: Path, purpose: str) -> None:
    result = subprocess.run(
        ["openssl", "verify", "-x509_strict", "-purpose", purpose, "-CAfile", str(ca), str(cert)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def fleet_pki(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    directory = tmp_path / "pki"
    status, _, err = run(capsys, "pki", "init", str(directory))
    assert status == 0, err
    return directory


def test_init_writes_four_cas_and_the_broker_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "pki"
    status, out, err = run(capsys, "pki", "init", str(directory), "--org", "acme")
    assert status == 0, err
    assert "PRIVATE KEY" not in out + err
    names = sorted(p.name for p in directory.iterdir())
    assert names == sorted(
        [f"{stem}{ext}" for stem in (*CA_FILES, "service-signing") for ext in (".pem", ".key")]
        + ["client-cas.pem"]
    )
    # the service's signing key: its own, certified by the TLS CA, apart from every CA key
    signing = pki.cert_from_pem((directory / "service-signing.pem").read_bytes())
    signing_key = pki.key_from_pem((directory / "service-signing.key").read_bytes())
    assert signing.public_key() == signing_key.public_key()
    assert mode(directory / "service-signing.key") == 0o600
    now = datetime.now(UTC)
    subjects = {}
    for stem in CA_FILES:
        assert mode(directory / f"{stem}.key") == 0o600
        assert mode(directory / f"{stem}.pem") == 0o644
        cert = pki.cert_from_pem((directory / f"{stem}.pem").read_bytes())
        key = pki.key_from_pem((directory / f"{stem}.key").read_bytes())
        assert cert.public_key() == key.public_key()
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert constraints.ca
        assert cert.not_valid_after_utc.year >= now.year + 9  # ten years by default
        subjects[stem] = pki.common_name(cert)
        assert f"wrote {directory / stem}.key (private key, 0600)" in out
    assert subjects == {
        "tls-ca": "acme TLS CA",
        "device-ca": "acme device CA",
        "operator-ca": "acme operator CA",
        "station-ca": "acme station CA",
    }
    bundle = pki.certs_from_pem((directory / "client-cas.pem").read_bytes())
    assert [pki.common_name(c) for c in bundle] == [
        "acme TLS CA",
        "acme device CA",
        "acme operator CA",
    ]


def test_init_refuses_to_overwrite_and_changes_nothing(
    fleet_pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(fleet_pki)
    status, _, err = run(capsys, "pki", "init", str(fleet_pki))
    assert status == 2
    assert "refusing to overwrite" in err and "nothing was written" in err
    assert snapshot(fleet_pki) == before
    # one leftover file is enough to refuse: a half-made PKI is never completed with new CAs
    other = fleet_pki.parent / "other"
    other.mkdir()
    (other / "station-ca.key").write_text("x")
    status, _, err = run(capsys, "pki", "init", str(other))
    assert status == 2 and "station-ca.key" in err
    assert sorted(p.name for p in other.iterdir()) == ["station-ca.key"]


@pytest.mark.parametrize("role", ["viewer", "operator", "admin"])
def test_issue_operator_puts_the_role_in_the_ou(
    fleet_pki: Path, capsys: pytest.CaptureFixture[str], role: str
) -> None:
    status, out, err = run(
        capsys, "pki", "issue", "operator", "op-alice", "--role", role, "--dir", str(fleet_pki)
    )
    assert status == 0, err
    assert "PRIVATE KEY" not in out + err
    assert f"operator op-alice (role {role})" in out
    cert_path, key_path = fleet_pki / "op-alice.pem", fleet_pki / "op-alice.key"
    assert mode(key_path) == 0o600
    cert = pki.cert_from_pem(cert_path.read_bytes())
    assert pki.common_name(cert) == "op-alice"
    assert pki.role_of(cert) == role
    assert cert.public_key() == pki.key_from_pem(key_path.read_bytes()).public_key()
    operator_ca = pki.cert_from_pem((fleet_pki / "operator-ca.pem").read_bytes())
    pki.verify_certificate(cert, operator_ca, now=datetime.now(UTC), purpose="client")
    openssl_verify(fleet_pki / "operator-ca.pem", cert_path, "sslclient")


def test_issue_operator_defaults_to_viewer_and_needs_an_op_name(
    fleet_pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_prefix = fleet_pki.parent / "elsewhere" / "bob"
    status, _, err = run(
        capsys,
        "pki",
        "issue",
        "operator",
        "op-bob",
        "--dir",
        str(fleet_pki),
        "--out",
        str(out_prefix),
    )
    assert status == 0, err
    cert = pki.cert_from_pem(out_prefix.with_name("bob.pem").read_bytes())
    assert pki.role_of(cert) == "viewer"  # least privilege unless asked
    before = snapshot(fleet_pki)
    for argv, expected in (
        (("operator", "alice"), "operator names start with 'op-'"),
        (("station", "line-1", "--role", "admin"), "--role applies to operators only"),
        (("operator", "op-x", "--dns", "h"), "--dns and --ip apply to server certificates only"),
        (("server", "mosquitto"), "needs --dns NAME or --ip ADDRESS"),
        (("server", "mosquitto", "--ip", "not-an-ip"), "server certificate for mosquitto"),
        (("station", "../escape"), "is not a usable name"),
    ):
        status, _, err = run(capsys, "pki", "issue", *argv, "--dir", str(fleet_pki))
        assert status == 2, argv
        assert expected in err, err
    assert snapshot(fleet_pki) == before


def test_issue_refuses_to_overwrite(fleet_pki: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "pki", "issue", "station", "line-1", "--dir", str(fleet_pki))[0] == 0
    before = snapshot(fleet_pki)
    status, _, err = run(capsys, "pki", "issue", "station", "line-1", "--dir", str(fleet_pki))
    assert status == 2 and "refusing to overwrite" in err
    assert snapshot(fleet_pki) == before


def test_issue_station_service_and_server_from_their_cas(
    fleet_pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(fleet_pki)
    assert run(capsys, "pki", "issue", "station", "line-1", "--dir", d)[0] == 0
    assert run(capsys, "pki", "issue", "service", "keyfleet-service", "--dir", d)[0] == 0
    status, _, err = run(
        capsys,
        "pki",
        "issue",
        "server",
        "mosquitto",
        "--dns",
        "localhost",
        "--dns",
        "mqtt.example.net",
        "--ip",
        "127.0.0.1",
        "--days",
        "30",
        "--dir",
        d,
    )
    assert status == 0, err
    now = datetime.now(UTC)

    def load(name: str) -> x509.Certificate:
        return pki.cert_from_pem((fleet_pki / f"{name}.pem").read_bytes())

    def ca(stem: str) -> x509.Certificate:
        return load(stem)

    station, service, server = load("line-1"), load("keyfleet-service"), load("mosquitto")
    pki.verify_certificate(station, ca("station-ca"), now=now, purpose="client")
    assert pki.role_of(station) == "station"
    pki.verify_certificate(service, ca("tls-ca"), now=now, purpose="client")
    assert pki.role_of(service) == "service"
    pki.verify_certificate(server, ca("tls-ca"), now=now, purpose="server")
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "mqtt.example.net"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert 29 <= (server.not_valid_after_utc - now).days <= 30
    openssl_verify(fleet_pki / "tls-ca.pem", fleet_pki / "mosquitto.pem", "sslserver")
    openssl_verify(fleet_pki / "station-ca.pem", fleet_pki / "line-1.pem", "sslclient")
    # the station CA does not vouch for the service, whatever the names say
    with pytest.raises(ProtocolError) as refused:
        pki.verify_certificate(service, ca("station-ca"), now=now)
    assert refused.value.check == "pki.issuer"
    assert "'CN=keyfleet TLS CA'" in str(refused.value)
    assert "'CN=keyfleet station CA'" in str(refused.value)


def test_offline_ca_keys_can_be_encrypted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret_file = tmp_path / "passphrase"
    secret_file.write_text("correct horse battery\n")
    directory = tmp_path / "pki"
    status, out, err = run(
        capsys, "pki", "init", str(directory), "--passphrase-file", str(secret_file)
    )
    assert status == 0, err
    assert "correct horse" not in out + err
    for stem in ("tls-ca", "operator-ca", "station-ca"):
        assert b"ENCRYPTED PRIVATE KEY" in (directory / f"{stem}.key").read_bytes()
    # the service reads the device CA key at every enrollment: it stays a plain PKCS#8 file
    device_key = (directory / "device-ca.key").read_bytes()
    assert device_key.startswith(b"-----BEGIN PRIVATE KEY-----")

    status, _, err = run(capsys, "pki", "issue", "operator", "op-a", "--dir", str(directory))
    assert status == 2 and "operator-ca.key is encrypted: give --passphrase-file" in err
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    status, _, err = run(
        capsys, "pki", "issue", "operator", "op-a", "--dir", str(directory),
        "--passphrase-file", str(wrong),
    )  # fmt: skip
    assert status == 2 and "wrong password" in err
    assert "nope" not in err
    assert not (directory / "op-a.pem").exists() and not (directory / "op-a.key").exists()
    status, _, err = run(
        capsys, "pki", "issue", "operator", "op-a", "--dir", str(directory),
        "--passphrase-file", str(secret_file),
    )  # fmt: skip
    assert status == 0, err
    # issued keys are for TLS libraries and the CLI: never encrypted
    assert (directory / "op-a.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_issue_without_a_pki_directory_says_where_it_looked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run(capsys, "pki", "issue", "station", "s1", "--dir", str(tmp_path / "none"))
    assert status == 2
    assert "cannot read the station CA" in err and "keyfleet pki init" in err
    assert not (tmp_path / "none").exists()


def test_devid_certificate_carries_serial_and_device_urn() -> None:
    now = datetime.now(UTC)
    ca = pki.create_ca("device CA", now=now, valid_for=timedelta(days=1))
    key = pki.generate_key()
    cert = pki.issue_devid_cert(
        ca,
        key.public_key(),
        device_id="dev-00112233",
        hardware_serial="ek-1f2e",
        now=now,
        valid_for=timedelta(days=1),
    )
    pki.verify_certificate(cert, ca.certificate, now=now, purpose="client")
    assert pki.common_name(cert) == "dev-00112233"
    assert pki.role_of(cert) == "device"
    assert pki.hardware_serial_of(cert) == "ek-1f2e"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:keyfleet:device:dev-00112233"
    ]
    # a serial outside PrintableString's alphabet is kept as it is (UTF8String), not altered
    odd = pki.issue_devid_cert(
        ca,
        key.public_key(),
        device_id="dev-1",
        hardware_serial="SN_42@line#3",
        now=now,
        valid_for=timedelta(days=1),
    )
    assert pki.hardware_serial_of(odd) == "SN_42@line#3"
    for bad_serial in ("", "S" * 65):
        with pytest.raises(ValueError, match="1 to 64 characters"):
            pki.issue_devid_cert(
                ca,
                key.public_key(),
                device_id="dev-1",
                hardware_serial=bad_serial,
                now=now,
                valid_for=timedelta(days=1),
            )


def test_a_write_that_fails_is_a_clear_error(
    fleet_pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    status, _, err = run(capsys, "pki", "init", str(blocker / "pki"))
    assert status == 2 and "cannot write" in err and "nothing was written" in err
    status, _, err = run(
        capsys, "pki", "issue", "station", "s1", "--dir", str(fleet_pki),
        "--out", str(blocker / "s1"),
    )  # fmt: skip
    assert status == 2 and "cannot write" in err
    assert blocker.read_text() == "not a directory"


def test_crl_of_the_operator_ca_verifies_and_is_numbered_above_the_previous(
    fleet_pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for number in (1, 2):
        status, out, err = run(capsys, "pki", "crl", "operator", "--dir", str(fleet_pki))
        assert status == 0, err
        assert f"CRL {number} of the operator CA" in out
    path = fleet_pki / "operator-ca.crl"
    assert mode(path) == 0o644
    crl = x509.load_pem_x509_crl(path.read_bytes())
    assert list(crl) == []
    checked = subprocess.run(
        ["openssl", "crl", "-in", str(path), "-CAfile", str(fleet_pki / "operator-ca.pem"),
         "-verify", "-noout"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert checked.returncode == 0 and "verify OK" in checked.stdout + checked.stderr


def test_device_ca_writes_the_next_device_ca_with_a_name_of_its_own(
    fleet_pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, "pki", "device-ca", str(fleet_pki / "device-ca-2"))
    assert status == 0, err
    cert_path, key_path = fleet_pki / "device-ca-2.pem", fleet_pki / "device-ca-2.key"
    assert mode(key_path) == 0o600 and "BEGIN" not in out
    new = pki.cert_from_pem(cert_path.read_bytes())
    old = pki.cert_from_pem((fleet_pki / "device-ca.pem").read_bytes())
    assert new.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert new.subject != old.subject  # the broker finds a CRL by its issuer's name
    assert pki.key_from_pem(key_path.read_bytes()).public_key() == new.public_key()
    before = snapshot(fleet_pki)
    status, _, err = run(capsys, "pki", "device-ca", str(fleet_pki / "device-ca-2"))
    assert status != 0 and "refusing to overwrite" in err
    assert snapshot(fleet_pki) == before


def test_operator_ca_writes_the_next_operator_ca_that_issue_and_crl_use(
    fleet_pki: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``pki operator-ca DIR2/operator-ca``: a new offline operator CA with a dated name of its
    own, its key encrypted with --passphrase-file; ``pki issue operator --dir DIR2`` issues
    from it and ``pki crl operator --dir DIR2`` writes its CRL."""
    passphrase = tmp_path / "pass"
    passphrase.write_text("correct horse\n")
    out_dir = tmp_path / "pki-2"
    status, out, err = run(
        capsys, "pki", "operator-ca", str(out_dir / "operator-ca"),
        "--passphrase-file", str(passphrase),
    )  # fmt: skip
    assert status == 0, err
    assert "BEGIN" not in out  # no key printed
    key_path = out_dir / "operator-ca.key"
    assert mode(key_path) == 0o600 and b"ENCRYPTED" in key_path.read_bytes()
    new = pki.cert_from_pem((out_dir / "operator-ca.pem").read_bytes())
    old = pki.cert_from_pem((fleet_pki / "operator-ca.pem").read_bytes())
    assert new.subject != old.subject and "operator CA" in new.subject.rfc4514_string()
    status, _, err = run(
        capsys, "pki", "issue", "operator", "op-newbie", "--role", "admin", "--dir",
        str(out_dir), "--passphrase-file", str(passphrase),
    )  # fmt: skip
    assert status == 0, err
    issued = pki.cert_from_pem((out_dir / "op-newbie.pem").read_bytes())
    pki.verify_certificate(issued, new, now=datetime.now(UTC), purpose="client")
    status, _, err = run(
        capsys, "pki", "crl", "operator", "--dir", str(out_dir),
        "--passphrase-file", str(passphrase),
    )  # fmt: skip
    assert status == 0, err
    crl = x509.load_pem_x509_crl((out_dir / "operator-ca.crl").read_bytes())
    assert crl.issuer == new.subject and crl.is_signature_valid(new.public_key())
    before = snapshot(out_dir)
    status, _, err = run(capsys, "pki", "operator-ca", str(out_dir / "operator-ca"))
    assert status != 0 and "refusing to overwrite" in err
    assert snapshot(out_dir) == before
