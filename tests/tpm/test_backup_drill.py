"""The restore drill against real SoftHSM2 tokens: the fleet's keys made in a token with backup
enabled, ``keyfleet backup create --shares 5 --threshold 3``, the token wiped (its directory
removed, a fresh token of the same label initialised), then ``keyfleet backup restore`` with two
shares (refused, the token stays empty) and with three: every key comes back non-extractable
under its label and id, and signs for the ORIGINAL public key (the one devices and certificates
hold): a service message signed with the restored signing key verifies as a device verifies it
(COSE_Sign1 under the signing certificate), and the restored operator CA issues certificates
that chain to the original CA certificate. tests/e2e/test_restore_drill_e2e.py runs the
service on a restored token and has enrolled devices follow a rekey under it.
Each step is audited in the service's database (a SQLite file) named by ``--config``.
"""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.protocol.wire import cose
from firmware_sim.softhsm import SoftToken
from provisioning import audit, backup, custody, pki
from provisioning.cli import main
from provisioning.registry import make_engine, session_factory

pytestmark = pytest.mark.tpm

FLEET = ("device-ca", "operator-ca", "service-signing")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def token_only(token: SoftToken) -> str:
    return f"pkcs11:token={token.label}?pin-source=file:{token.pin_file}"


def write_config(tmp_path: Path) -> Path:
    """A service configuration whose only use here is its database (the audit log)."""
    for name in ("ca.pem", "svc.pem", "dev-ca.pem", "op-ca.pem", "golden.toml", "mfr.pem"):
        (tmp_path / name).write_text("x\n")
    for name in ("svc.key", "dev-ca.key"):
        (tmp_path / name).write_text("x\n")
        (tmp_path / name).chmod(0o600)
    config = tmp_path / "keyfleet.toml"
    config.write_text(
        f'[database]\nurl = "sqlite:///{tmp_path / "fleet.db"}"\n'
        '[broker]\nhost = "localhost"\nca = "ca.pem"\nclient_cert = "svc.pem"\n'
        'client_key = "svc.key"\n'
        '[device_ca]\ncert = "dev-ca.pem"\nkey = "dev-ca.key"\n'
        '[operator_ca]\ncert = "op-ca.pem"\n'
        '[attestation]\nmanufacturer_cas = "mfr.pem"\ngolden_measurements = "golden.toml"\n'
    )
    return config


def wipe(token: SoftToken) -> SoftToken:
    """The token lost: its objects gone, a fresh empty token of the same label in its place."""
    custody.refresh_modules()  # sessions on the old token end here
    shutil.rmtree(token.directory / "tokens")
    return SoftToken.create(token.directory, label=token.label)


def test_restore_drill(
    softhsm_token: SoftToken, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki_dir, out_dir = tmp_path / "pki", tmp_path / "backup"
    out_dir.mkdir()
    (tmp_path / "service").mkdir()
    config = str(write_config(tmp_path / "service"))
    assert run(capsys, "db", "init", "--config", config)[0] == 0
    token = token_only(softhsm_token)
    status, _, err = run(capsys, "pki", "init", str(pki_dir), "--token", token, "--backup")
    assert status == 0, err
    status, _, err = run(
        capsys, "pki", "token-key", softhsm_token.uri("audit-checkpoint"), "--backup"
    )
    assert status == 0, err
    originals = {
        stem: pki.cert_from_pem((pki_dir / f"{stem}.pem").read_bytes()).public_key()
        for stem in FLEET
    }
    originals["audit-checkpoint"] = custody.load_private_key(
        softhsm_token.uri("audit-checkpoint")
    ).public_key()
    originals["tls-ca"] = pki.cert_from_pem((pki_dir / "tls-ca.pem").read_bytes()).public_key()

    status, out, err = run(
        capsys, "backup", "create", "--token", token,
        "--key-file", f"tls-ca={pki_dir / 'tls-ca.key'}",
        "--shares", "5", "--threshold", "3", "--out", str(out_dir), "--config", config,
    )  # fmt: skip
    assert status == 0, err
    backup_files = list(out_dir.glob("keyfleet-backup-*.json"))
    shares = sorted(out_dir.glob("keyfleet-share-*.json"))
    assert len(backup_files) == 1 and len(shares) == 5
    for path in [*backup_files, *shares]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "PRIVATE KEY" not in out + err and softhsm_token.pin() not in out + err
    backup_file = str(backup_files[0])

    ids = {
        label: custody.token_key_facts(custody.parse_token_uri(softhsm_token.uri(label))).key_id
        for label in (*FLEET, "audit-checkpoint")
    }
    fresh = wipe(softhsm_token)
    assert custody.token_key_labels(custody.parse_token_uri(fresh.uri("-"))) == []

    # two shares: refused before the token is touched, the token stays empty
    status, _, err = run(
        capsys, "backup", "restore", backup_file, "--token", token_only(fresh),
        "--share", str(shares[0]), "--share", str(shares[2]), "--config", config,
    )  # fmt: skip
    assert status != 0 and "backup.threshold" in err and "needs 3 of 5" in err
    assert custody.token_key_labels(custody.parse_token_uri(fresh.uri("-"))) == []

    status, out, err = run(
        capsys, "backup", "restore", backup_file, "--token", token_only(fresh),
        "--share", str(shares[0]), "--share", str(shares[2]), "--share", str(shares[4]),
        "--config", config,
    )  # fmt: skip
    assert status == 0, err
    assert set(custody.token_key_labels(custody.parse_token_uri(fresh.uri("-")))) == set(originals)
    for label, public in originals.items():
        key = custody.load_private_key(custody.parse_token_uri(fresh.uri(label)))
        assert isinstance(key, custody.TokenPrivateKey)
        assert key.public_key() == public
        facts = custody.token_key_facts(custody.parse_token_uri(fresh.uri(label)))
        assert facts.key_id == ids.get(label, label.encode())  # same CKA_ID (files: the label)
        message = f"signed by the restored {label}".encode()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(
            key.sign(message, ec.ECDSA(hashes.SHA256())), message, ec.ECDSA(hashes.SHA256())
        )
        key.close()
        # restored keys are not extractable: a second backup of them is refused, naming the key
        with pytest.raises(custody.CustodyError, match=f"{label}.*not extractable"):
            custody.wrap_token_key(custody.parse_token_uri(fresh.uri(label)), bytes(32))

    # what devices check: a service message signed with the restored signing key verifies under
    # the signing certificate devices were given at enrollment
    signing_cert = pki.cert_from_pem((pki_dir / "service-signing.pem").read_bytes())
    signing_key = custody.load_private_key(custody.parse_token_uri(fresh.uri("service-signing")))
    envelope = cose.sign1(b"after the restore", signing_key)
    public = signing_cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    cose.verify_sign1(cose.decode_sign1(envelope), public)
    assert isinstance(signing_key, custody.TokenPrivateKey)
    signing_key.close()
    # and the restored operator CA issues certificates that chain to the original CA certificate
    status, _, err = run(
        capsys, "pki", "issue", "operator", "op-carol", "--role", "admin",
        "--dir", str(pki_dir), "--ca-key", fresh.uri("operator-ca"),
    )  # fmt: skip
    assert status == 0, err
    pki.cert_from_pem((pki_dir / "op-carol.pem").read_bytes()).verify_directly_issued_by(
        pki.cert_from_pem((pki_dir / "operator-ca.pem").read_bytes())
    )

    # restoring again over the restored keys is refused, naming them
    status, _, err = run(
        capsys, "backup", "restore", backup_file, "--token", token_only(fresh),
        "--share", str(shares[1]), "--share", str(shares[2]), "--share", str(shares[3]),
        "--config", config,
    )  # fmt: skip
    assert status != 0 and "token.exists" in err and "device-ca" in err

    engine = make_engine(f"sqlite:///{tmp_path / 'service' / 'fleet.db'}")
    try:
        with session_factory(engine)() as session:
            entries = [e for e in audit.entries(session) if e.action.startswith("backup.")]
    finally:
        engine.dispose()
    ident = Path(backup_file).stem.removeprefix("keyfleet-backup-")
    assert [(e.action, e.outcome.value) for e in entries] == [
        ("backup.create", "accepted"),
        ("backup.restore", "refused"),
        ("backup.restore", "accepted"),
        ("backup.restore", "refused"),
    ]
    assert all(e.target == ident for e in entries)
    assert "[backup.threshold]" in entries[1].reason and "audit-checkpoint" in entries[2].details
    assert "[token.exists]" in entries[3].reason


def test_a_key_made_without_backup_is_named_and_nothing_is_written(
    softhsm_token: SoftToken, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run(capsys, "pki", "token-key", softhsm_token.uri("release-signing"))
    assert status == 0, err
    status, _, err = run(
        capsys, "pki", "token-key", softhsm_token.uri("audit-checkpoint"), "--backup"
    )
    assert status == 0, err
    status, _, err = run(
        capsys, "backup", "create", "--token", token_only(softhsm_token),
        "--shares", "3", "--threshold", "2", "--out", str(tmp_path),
    )  # fmt: skip
    assert status != 0
    assert "token.export" in err and "'release-signing'" in err and "--backup" in err
    assert not list(tmp_path.glob("keyfleet-*"))
    # naming only the key made with backup works
    status, _, err = run(
        capsys, "backup", "create", "--token", token_only(softhsm_token),
        "--label", "audit-checkpoint", "--shares", "3", "--threshold", "2", "--out", str(tmp_path),
    )  # fmt: skip
    assert status == 0, err
    (sealed_file,) = tmp_path.glob("keyfleet-backup-*.json")
    sealed = backup.parse_backup(sealed_file.read_bytes(), sealed_file.name)
    assert [k["label"] for k in sealed.header.keys] == ["audit-checkpoint"]


def test_a_restore_that_fails_half_way_leaves_the_token_empty(
    softhsm_token: SoftToken, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a backup whose second key is recorded with another key's public point: the first key goes
    # in, the second does not sign for its recorded key, and the first is taken out again
    data_key = backup.DataKey.new()
    first, second, stranger = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))

    def point(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)

    entries = [
        backup.KeyEntry("device-ca", b"device-ca", point(first),
                        backup.wrap_file_key(first, data_key.wrapping_key())),
        backup.KeyEntry("operator-ca", b"operator-ca", point(stranger),
                        backup.wrap_file_key(second, data_key.wrapping_key())),
    ]  # fmt: skip
    document, shares = backup.create_backup(
        entries, data_key, threshold=2, count=2, now=1_800_000_000
    )
    (tmp_path / "b.json").write_bytes(document)
    for share in shares:
        (tmp_path / f"s{share.index}.json").write_bytes(share.encode())
    status, _, err = run(
        capsys, "backup", "restore", str(tmp_path / "b.json"), "--token", token_only(softhsm_token),
        "--share", str(tmp_path / "s1.json"), "--share", str(tmp_path / "s2.json"),
    )  # fmt: skip
    assert status != 0 and "token.import" in err and "'operator-ca'" in err
    assert custody.token_key_labels(custody.parse_token_uri(softhsm_token.uri("-"))) == []
