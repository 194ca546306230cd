"""Keys apart from files on the command line, against a real SoftHSM2 token: ``keyfleet pki init
--token`` makes the device CA, operator CA and service signing keys inside the token (no key file
for them), ``pki issue --ca-key`` issues an operator certificate with the token's operator CA key,
``pki token-key`` makes one more key; ``pki encrypt-key`` encrypts an operator key; and the
operator CLI loads an encrypted key (passphrase from a file or the environment), a token key, or
a plain file (with a warning), saying on stderr which one it uses."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from firmware_sim.softhsm import SoftToken
from provisioning import custody, pki
from provisioning.cli import main
from provisioning.custody import TokenPrivateKey
from provisioning.operator import OperatorIdentity, OperatorSettings

pytestmark = pytest.mark.tpm


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def token_only(token: SoftToken) -> str:
    return f"pkcs11:token={token.label}?pin-source=file:{token.pin_file}"


def test_pki_init_with_a_token_writes_no_key_of_the_token_cas(
    softhsm_token: SoftToken, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "pki"
    status, out, err = run(
        capsys, "pki", "init", str(directory), "--token", token_only(softhsm_token)
    )
    assert status == 0, err
    names = {p.name for p in directory.iterdir()}
    for stem in ("device-ca", "operator-ca", "service-signing"):
        assert f"{stem}.pem" in names and f"{stem}.key" not in names
        assert f"made {stem} in the token" in out
    assert {"tls-ca.key", "station-ca.key"} <= names  # the offline CAs stay files (encryptable)
    assert "PRIVATE KEY" not in out + err and softhsm_token.pin() not in out + err

    for stem in ("device-ca", "operator-ca", "service-signing"):
        key = custody.load_private_key(custody.parse_token_uri(softhsm_token.uri(stem)))
        assert isinstance(key, TokenPrivateKey)
        cert = pki.cert_from_pem((directory / f"{stem}.pem").read_bytes())
        assert cert.public_key() == key.public_key()

    # an operator certificate issued with the operator CA key in the token
    operator_ca = softhsm_token.uri("operator-ca")
    status, out, err = run(
        capsys, "pki", "issue", "operator", "op-alice", "--role", "admin",
        "--dir", str(directory), "--ca-key", operator_ca,
    )  # fmt: skip
    assert status == 0, err
    issued = pki.cert_from_pem((directory / "op-alice.pem").read_bytes())
    issued.verify_directly_issued_by(
        pki.cert_from_pem((directory / "operator-ca.pem").read_bytes())
    )
    # the wrong CA key for the directory's certificate is refused, nothing written
    status, _, err = run(
        capsys, "pki", "issue", "operator", "op-bob", "--dir", str(directory),
        "--ca-key", softhsm_token.uri("device-ca"),
    )  # fmt: skip
    assert status != 0 and "is not the key of" in err
    assert not (directory / "op-bob.pem").exists()


def test_token_key_command(softhsm_token: SoftToken, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "pki", "token-key", softhsm_token.uri("audit-checkpoint"))
    assert status == 0, err
    assert "BEGIN PUBLIC KEY" in out and "not extractable" in out
    status, _, err = run(capsys, "pki", "token-key", softhsm_token.uri("audit-checkpoint"))
    assert status != 0 and "token.exists" in err


def operator_files(directory: Path) -> tuple[Path, Path]:
    ca = pki.create_ca("op CA", now=pki_now(), valid_for=pki_days(1))
    key = pki.generate_key()
    cert = pki.issue_client_cert(
        ca, key.public_key(), identity="op-x", role="admin", now=pki_now(), valid_for=pki_days(1)
    )
    pki.write_certificate(directory / "op.pem", cert)
    pki.write_private_key(directory / "op.key", key)
    pki.write_certificate(directory / "service.pem", cert)  # any certificate: only its key is read
    return directory / "op.pem", directory / "op.key"


def pki_now() -> datetime:
    return datetime.now(UTC)


def pki_days(days: int) -> timedelta:
    return timedelta(days=days)


def settings(directory: Path, key: str, **more: object) -> OperatorSettings:
    return OperatorSettings(
        host="127.0.0.1", port=8883, ca=directory / "op.pem", cert=directory / "op.pem",
        key=key, service_cert=directory / "service.pem", **more,  # type: ignore[arg-type]
    )  # fmt: skip


def test_operator_key_kinds(
    softhsm_token: SoftToken,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cert, key = operator_files(tmp_path)
    public = pki.key_from_pem(key.read_bytes()).public_key()

    # plain file: works, and says so as a warning
    identity = OperatorIdentity.load(settings(tmp_path, str(key)))
    err = capsys.readouterr().err
    assert identity.key.public_key() == public
    assert err.count("\n") == 1 and "WARNING" in err and "unencrypted" in err

    # encrypted in place by the CLI; then the passphrase comes from a file or the environment
    passphrase = tmp_path / "pass"
    passphrase.write_text("correct horse\n")
    status, _, err = run(
        capsys, "pki", "encrypt-key", str(key), "--passphrase-file", str(passphrase)
    )
    assert status == 0, err
    assert b"ENCRYPTED PRIVATE KEY" in key.read_bytes()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    identity = OperatorIdentity.load(settings(tmp_path, str(key), passphrase_file=passphrase))
    err = capsys.readouterr().err
    assert identity.key.public_key() == public and "passphrase-encrypted" in err
    assert "WARNING" not in err and "correct horse" not in err
    assert identity.loaded is not None and identity.loaded.tls_password == "correct horse"
    assert "correct horse" not in repr(identity)
    monkeypatch.setenv("KEYFLEET_KEY_PASSPHRASE", "correct horse")
    assert OperatorIdentity.load(settings(tmp_path, str(key))).key.public_key() == public
    monkeypatch.setenv("KEYFLEET_KEY_PASSPHRASE", "wrong")
    with pytest.raises(Exception, match="wrong password"):
        OperatorIdentity.load(settings(tmp_path, str(key)))
    monkeypatch.delenv("KEYFLEET_KEY_PASSPHRASE")
    capsys.readouterr()

    # a token key signs; TLS needs a file identity of its own
    uri = softhsm_token.uri("op-x")
    token_public = custody.generate_token_key(custody.parse_token_uri(uri))
    ca = pki.create_ca("op CA 2", now=pki_now(), valid_for=pki_days(1))
    signing_cert = pki.issue_client_cert(
        ca, token_public, identity="op-x", role="admin", now=pki_now(), valid_for=pki_days(1)
    )
    pki.write_certificate(tmp_path / "op-token.pem", signing_cert)
    token_settings = settings(tmp_path, uri)
    token_settings = OperatorSettings(
        **{**token_settings.__dict__, "cert": tmp_path / "op-token.pem"}
    )
    with pytest.raises(Exception, match="--tls-cert"):
        OperatorIdentity.load(token_settings)
    with_tls = OperatorSettings(**{**token_settings.__dict__, "tls_cert": cert, "tls_key": key})
    identity = OperatorIdentity.load(with_tls)
    err = capsys.readouterr().err
    assert isinstance(identity.key, TokenPrivateKey) and "PKCS#11 token" in err
    assert identity.loaded is not None and identity.loaded.tls_key == key
