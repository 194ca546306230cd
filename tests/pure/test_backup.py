"""Backups of the fleet's keys, the pure part: the GF(2^8) Shamir sharing (any K of N recover,
K-1 leave every secret byte possible, a fixed vector), the backup container (round trip,
deterministic given its randomness), and the refusals: fewer than K shares, a corrupted share and
another backup's share named by file, a tampered backup file (GCM tag). Keys here are pyca keys
wrapped in memory (``wrap_file_key``); the token side is tests/tpm/test_backup_drill.py."""

from __future__ import annotations

import itertools
import json
import random
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from provisioning import backup, pki, shamir
from provisioning.cli import main

pytestmark = pytest.mark.pure


def slow_mul(a: int, b: int) -> int:
    """GF(2^8) product by shift-and-add, reduced by x^8 + x^4 + x^3 + x + 1."""
    product = 0
    while b:
        if b & 1:
            product ^= a
        a <<= 1
        if a & 0x100:
            a ^= 0x11B
        b >>= 1
    return product


def test_field_multiplication_matches_the_reference() -> None:
    for a, b in itertools.product(range(256), repeat=2):
        assert shamir._mul(a, b) == slow_mul(a, b)
    for a in range(1, 256):
        assert shamir._mul(shamir._div(1, a), a) == 1


def counter_random(seed: int) -> Callable[[int], bytes]:
    rng = random.Random(seed)
    return lambda n: bytes(rng.randrange(256) for _ in range(n))


def test_a_fixed_vector() -> None:
    # secret 0x01, threshold 2, coefficient 0x02: share(x) = 2*x + 1 in GF(2^8)
    shares = shamir.split(b"\x01", threshold=2, count=3, random_bytes=lambda n: b"\x02" * n)
    assert shares == {1: b"\x03", 2: b"\x05", 3: b"\x07"}
    assert shamir.combine({2: b"\x05", 3: b"\x07"}) == b"\x01"


@settings(max_examples=60, deadline=None)
@given(
    secret=st.binary(min_size=1, max_size=40),
    threshold=st.integers(2, 6),
    extra=st.integers(0, 4),
    data=st.data(),
)
def test_any_threshold_of_the_shares_recover_the_secret(
    secret: bytes, threshold: int, extra: int, data: st.DataObject
) -> None:
    shares = shamir.split(secret, threshold=threshold, count=threshold + extra)
    chosen = data.draw(st.lists(st.sampled_from(sorted(shares)), min_size=threshold, unique=True))
    assert shamir.combine({i: shares[i] for i in chosen}) == secret


@pytest.mark.parametrize("secret", [0x00, 0xAB])
def test_threshold_minus_one_shares_are_independent_of_the_secret(secret: int) -> None:
    # 2 of a 3-of-3 sharing, over every choice of the two random coefficients: each pair of
    # share values comes out exactly once, whatever the secret, so 2 shares say nothing of it
    seen: set[tuple[bytes, bytes]] = set()
    for c1, c2 in itertools.product(range(256), repeat=2):
        coefficients = iter((bytes([c1]), bytes([c2])))
        shares = shamir.split(
            bytes([secret]),
            threshold=3,
            count=3,
            random_bytes=lambda _n, it=coefficients: next(it),
        )
        seen.add((shares[1], shares[2]))
    assert len(seen) == 256 * 256


def test_sharing_parameters_are_checked() -> None:
    for threshold, count in ((1, 3), (4, 3), (2, 256)):
        with pytest.raises(shamir.SharingError):
            shamir.split(b"s", threshold=threshold, count=count)
    with pytest.raises(shamir.SharingError):
        shamir.combine({1: b"a", 2: b"bc"})


# ---- the backup container --------------------------------------------------------------------


def make_backup(
    seed: int = 1, labels: tuple[str, ...] = ("device-ca", "service-signing")
) -> tuple[bytes, list[backup.Share], dict[str, ec.EllipticCurvePrivateKey]]:
    rand = counter_random(seed)
    data_key = backup.DataKey.new(rand)
    keys = {
        label: ec.derive_private_key(int.from_bytes(rand(31)) + 1, ec.SECP256R1())
        for label in labels
    }
    entries = [
        backup.KeyEntry(
            label,
            label.encode(),
            key.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            ),
            backup.wrap_file_key(key, data_key.wrapping_key()),
        )
        for label, key in keys.items()
    ]
    document, shares = backup.create_backup(
        entries, data_key, threshold=3, count=5, now=1_800_000_000, random_bytes=rand
    )
    return document, shares, keys


def share_files(shares: list[backup.Share], *indices: int) -> dict[str, backup.Share]:
    return {
        f"share-{i}.json": backup.parse_share(shares[i - 1].encode(), f"share-{i}.json")
        for i in indices
    }


def test_round_trip_with_any_three_of_five() -> None:
    document, shares, keys = make_backup()
    sealed = backup.parse_backup(document, "b.json")
    assert [k["label"] for k in sealed.header.keys] == list(keys)
    for chosen in itertools.combinations(range(1, 6), 3):
        data_key, entries = backup.open_backup(sealed, share_files(shares, *chosen))
        for entry in entries:
            restored = backup.unwrap_to_private_key(entry, data_key.wrapping_key())
            assert restored.private_numbers() == keys[entry.label].private_numbers()
            assert entry.key_id == entry.label.encode()
    # four or five work as well
    backup.open_backup(sealed, share_files(shares, 1, 2, 3, 4, 5))


def test_the_container_is_deterministic_given_its_randomness() -> None:
    assert make_backup(7)[0] == make_backup(7)[0]
    assert make_backup(7)[0] != make_backup(8)[0]
    document = json.loads(make_backup(7)[0])
    assert set(document) >= {"backup_id", "created", "keys", "sealed", "threshold", "shares"}
    assert document["created"] == 1_800_000_000


def test_fewer_than_threshold_are_refused_before_combining() -> None:
    document, shares, _ = make_backup()
    sealed = backup.parse_backup(document, "b.json")
    with pytest.raises(backup.BackupError, match=r"2 share\(s\) given.*needs 3 of 5") as err:
        backup.open_backup(sealed, share_files(shares, 2, 5))
    assert err.value.check == "backup.threshold"
    # the same share twice is not two shares
    twice = share_files(shares, 1, 2) | {"copy.json": shares[0]}
    with pytest.raises(backup.BackupError, match=r"copy\.json: share 1 again"):
        backup.open_backup(sealed, twice)


def test_a_corrupted_share_is_named() -> None:
    document, shares, _ = make_backup()
    sealed = backup.parse_backup(document, "b.json")
    text = json.loads(shares[1].encode())
    text["value"] = ("0" if text["value"][0] != "0" else "1") + text["value"][1:]
    damaged = json.dumps(text).encode()
    with pytest.raises(backup.BackupError, match=r"share-2\.json: corrupted \(its checksum"):
        backup.parse_share(damaged, "share-2.json")
    with pytest.raises(backup.BackupError, match=r"torn\.json: corrupted"):
        backup.parse_share(shares[1].encode()[:40], "torn.json")
    # a share changed with a matching checksum: the backup's record of it names it
    forged = backup.Share(shares[1].backup_id, 2, 3, 5, bytes(a ^ 1 for a in shares[1].value))
    files = share_files(shares, 1, 3) | {"share-2.json": forged}
    with pytest.raises(backup.BackupError, match=r"share-2\.json: share 2 is not the one") as err:
        backup.open_backup(sealed, files)
    assert err.value.check == "backup.share"


def test_a_share_of_another_backup_is_named() -> None:
    document, shares, _ = make_backup(1)
    _, other_shares, _ = make_backup(2)
    sealed = backup.parse_backup(document, "b.json")
    files = share_files(shares, 1, 2) | {"other.json": other_shares[2]}
    with pytest.raises(backup.BackupError, match=r"other\.json: a share of another backup"):
        backup.open_backup(sealed, files)


def test_a_tampered_backup_file_is_refused() -> None:
    document, shares, _ = make_backup()
    good = share_files(shares, 1, 2, 3)
    parsed = json.loads(document)
    ciphertext = bytearray(backup.base64.b64decode(parsed["sealed"]["ciphertext"]))
    ciphertext[5] ^= 0x01
    parsed["sealed"]["ciphertext"] = backup.base64.b64encode(bytes(ciphertext)).decode()
    with pytest.raises(backup.BackupError, match=r"does not authenticate") as err:
        backup.open_backup(backup.parse_backup(json.dumps(parsed).encode(), "b.json"), good)
    assert err.value.check == "backup.tampered"
    # the header is authenticated too: a renamed key is refused
    parsed = json.loads(document)
    parsed["keys"][0]["label"] = "operator-ca"
    with pytest.raises(backup.BackupError, match=r"does not authenticate"):
        backup.open_backup(backup.parse_backup(json.dumps(parsed).encode(), "b.json"), good)
    with pytest.raises(backup.BackupError, match=r"b\.json: malformed"):
        backup.parse_backup(document[:100], "b.json")


def test_no_secret_in_reprs() -> None:
    _, shares, _ = make_backup()
    data_key = backup.DataKey(b"\x42" * 32)
    assert "42" not in repr(data_key)
    assert shares[0].value.hex() not in repr(shares[0])
    entry = backup.KeyEntry("x", b"x", b"\x04" + b"\x01" * 64, b"\x99" * 40)
    assert "\\x99" not in repr(entry) and "9999" not in repr(entry)


# ---- the command line, file keys only (no token) -----------------------------------------------


def test_create_from_key_files_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in ("tls-ca", "station-ca")}
    for name, key in keys.items():
        pki.write_private_key(tmp_path / f"{name}.key", key)
    out = tmp_path / "out"
    out.mkdir()
    args = ["backup", "create", "--shares", "3", "--threshold", "2", "--out", str(out)]
    files = [f"--key-file={n}={tmp_path / f'{n}.key'}" for n in keys]
    assert main([*args, *files]) == 0
    printed = capsys.readouterr()
    assert "PRIVATE KEY" not in printed.out + printed.err
    (backup_file,) = out.glob("keyfleet-backup-*.json")
    share_paths = sorted(out.glob("keyfleet-share-*.json"))
    assert len(share_paths) == 3
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in [backup_file, *share_paths])
    sealed = backup.parse_backup(backup_file.read_bytes(), "b")
    shares = {str(p): backup.parse_share(p.read_bytes(), str(p)) for p in share_paths[1:]}
    data_key, entries = backup.open_backup(sealed, shares)
    for entry in entries:
        restored = backup.unwrap_to_private_key(entry, data_key.wrapping_key())
        assert restored.private_numbers() == keys[entry.label].private_numbers()

    assert main(["backup", "show", str(backup_file)]) == 0
    shown = capsys.readouterr().out
    assert "2 of 3 shares" in shown and "tls-ca" in shown and "station-ca" in shown

    # an RSA key file is named, and nothing is written
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "rsa.key").write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = ["backup", "create", "--shares", "3", "--threshold", "2", "--out", str(empty)]
    assert main([*bad, f"--key-file=web={tmp_path / 'rsa.key'}"]) != 0
    err = capsys.readouterr().err
    assert "--key-file web=" in err and "pki.key_type" in err
    assert not list(empty.iterdir())
    too_many = ["backup", "create", "--shares", "2", "--threshold", "3", "--out", str(empty)]
    assert main([*too_many, *files]) != 0
    assert "[backup.shares] --threshold 3 is more than --shares 2" in capsys.readouterr().err
    assert not list(empty.iterdir())
