"""`keyagent selftest`: the built-in known-answer tests and runs over published vector files,
through the library and through the installed console script."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent import selftest

pytestmark = pytest.mark.pure

TESTS_VECTORS = Path(__file__).parents[1] / "vectors"
PACKAGED_VECTORS = Path(selftest.__file__).parent / "vectors"
VECTOR_FILES = sorted(TESTS_VECTORS.glob("*.json"))
KEYAGENT = Path(sys.executable).parent / "keyagent"


def _keyagent(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert KEYAGENT.exists(), f"console script missing: {KEYAGENT} (is keyfleet installed?)"
    return subprocess.run(
        [str(KEYAGENT), *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def _load(name: str) -> Any:
    return json.loads((TESTS_VECTORS / name).read_text())


def _write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


def _flip_hex(value: str) -> str:
    """Flip the low bit of the last byte of a hex string."""
    raw = bytearray.fromhex(value)
    raw[-1] ^= 1
    return raw.hex()


def test_packaged_vectors_are_byte_identical_to_the_tests_copy() -> None:
    tests_names = sorted(p.name for p in TESTS_VECTORS.iterdir())
    packaged_names = sorted(p.name for p in PACKAGED_VECTORS.iterdir())
    assert tests_names == packaged_names
    for name in tests_names:
        assert (TESTS_VECTORS / name).read_bytes() == (PACKAGED_VECTORS / name).read_bytes(), name


def test_builtin_selftest_passes_every_shipped_file() -> None:
    start = time.perf_counter()
    report = selftest.run_builtin_selftests()
    elapsed = time.perf_counter() - start
    print(f"builtin selftest: {report.passed} checks in {elapsed * 1000:.1f} ms")
    assert report.ok, [f.failures for f in report.files]
    assert [f.name for f in report.files] == [p.name for p in VECTOR_FILES]
    formats = {f.name: f.format for f in report.files}
    assert formats == {
        "mls-crypto-basics-cs2.json": selftest.FORMAT_CRYPTO_BASICS,
        "mls-key-schedule-cs2.json": selftest.FORMAT_KEY_SCHEDULE,
        "mls-tree-math.json": selftest.FORMAT_TREE_MATH,
        "rfc9180-dhkem-p256-hkdf-sha256-aes128gcm-base.json": selftest.FORMAT_RFC9180,
    }
    crypto_basics = next(f for f in report.files if f.format == selftest.FORMAT_CRYPTO_BASICS)
    assert crypto_basics.passed == 6  # ref_hash, expand, derive, tree secret, sign, encrypt
    assert all(f.passed > 0 and f.failed == 0 and f.skipped == 0 for f in report.files)
    assert report.to_json()["ok"] is True


def _apart(patch: str) -> tuple[str, str]:
    """``run_builtin_selftests_apart()`` in a fresh interpreter (one thread: it forks), with
    ``run_builtin_selftests`` replaced by ``patch``; its answer and whether the replacement ran
    in this process or in the child."""
    code = (
        "import sys\nfrom agent import selftest\nran = []\n"
        f"{patch}\n"
        "answer = selftest.run_builtin_selftests_apart()\n"
        "print(answer, 'here' if ran else 'apart')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    answer, _, where = done.stdout.strip().rpartition(" ")
    return answer, where


def test_the_daemons_self_test_runs_in_a_child_and_its_answer_comes_back() -> None:
    assert _apart("") == ("(True, 0)", "apart")
    failing = (
        "real = selftest.run_builtin_selftests\n"
        "def fake():\n    ran.append(1)\n    report = real()\n"
        "    bad = dataclasses.replace(report.files[0], failed=3, failures=('x',) * 3)\n"
        "    return dataclasses.replace(report, files=(bad, *report.files[1:]))\n"
        "import dataclasses\nselftest.run_builtin_selftests = fake"
    )
    assert _apart(failing) == ("(False, 3)", "apart")
    # a child that dies before it answers is a failed self-test, not a pass
    dying = "import os\nselftest.run_builtin_selftests = lambda: os.kill(os.getpid(), 9)"
    assert _apart(dying) == ("(False, 0)", "apart")
    raising = "def boom():\n    raise MemoryError\nselftest.run_builtin_selftests = boom"
    assert _apart(raising) == ("(False, 0)", "apart")


def test_the_self_test_runs_in_process_beside_other_threads() -> None:
    patch = (
        "import threading\nthreading.Thread(target=__import__('time').sleep, args=(5,), "
        "daemon=True).start()\nreal = selftest.run_builtin_selftests\n"
        "def counted():\n    ran.append(1)\n    return real()\n"
        "selftest.run_builtin_selftests = counted"
    )
    assert _apart(patch) == ("(True, 0)", "here")


def test_cli_runs_the_shipped_vectors() -> None:
    result = _keyagent("selftest", "--vectors", *VECTOR_FILES)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith(str(TESTS_VECTORS))]
    assert len(lines) == len(VECTOR_FILES)
    for line in lines:
        assert line.endswith(", 0 failed"), line


def test_cli_builtin_and_json() -> None:
    result = _keyagent("selftest")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selftest ok" in result.stdout
    result = _keyagent("selftest", "--json")
    assert result.returncode == 0
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["failed"] == 0 and report["passed"] > 50
    print(f"builtin selftest via CLI: {report['elapsed_s'] * 1000:.1f} ms of checks")


def _corrupt_crypto_basics(data: Any) -> None:
    data[0]["ref_hash"]["out"] = _flip_hex(data[0]["ref_hash"]["out"])


def _corrupt_key_schedule(data: Any) -> None:
    epoch = data[0]["epochs"][0]
    epoch["init_secret"] = _flip_hex(epoch["init_secret"])  # must not cascade into epoch 1


def _corrupt_tree_math(data: Any) -> None:
    data[1]["parent"][0] += 2


def _corrupt_rfc9180(data: Any) -> None:
    data[0]["encryptions"][1]["ct"] = _flip_hex(data[0]["encryptions"][1]["ct"])


@pytest.mark.parametrize(
    ("name", "corrupt"),
    [
        ("mls-crypto-basics-cs2.json", _corrupt_crypto_basics),
        ("mls-key-schedule-cs2.json", _corrupt_key_schedule),
        ("mls-tree-math.json", _corrupt_tree_math),
        ("rfc9180-dhkem-p256-hkdf-sha256-aes128gcm-base.json", _corrupt_rfc9180),
    ],
)
def test_one_flipped_expected_value_is_one_failure(tmp_path: Path, name: str, corrupt: Any) -> None:
    data = _load(name)
    corrupt(data)
    path = _write(tmp_path / name, data)
    result = _keyagent("selftest", "--vectors", path)
    assert result.returncode == 1, result.stdout
    assert f"{path}: " in result.stdout
    summary = next(line for line in result.stdout.splitlines() if line.startswith(str(path)))
    assert summary.endswith(", 1 failed"), summary
    assert "FAILED" in result.stdout


def test_flipped_signature_and_ciphertext_fail(tmp_path: Path) -> None:
    data = _load("mls-crypto-basics-cs2.json")
    data[0]["sign_with_label"]["signature"] = _flip_hex(data[0]["sign_with_label"]["signature"])
    data[0]["encrypt_with_label"]["ciphertext"] = _flip_hex(
        data[0]["encrypt_with_label"]["ciphertext"]
    )
    result = selftest.run_vector_files([_write(tmp_path / "cb.json", data)])
    (file_result,) = result.files
    assert (file_result.passed, file_result.failed) == (4, 2)
    assert any("sign_with_label" in f and "CryptoError" in f for f in file_result.failures)
    assert any("encrypt_with_label" in f and "CryptoError" in f for f in file_result.failures)


def test_unimplemented_suites_and_modes_are_skipped_with_reason(tmp_path: Path) -> None:
    hpke_data = _load("rfc9180-dhkem-p256-hkdf-sha256-aes128gcm-base.json")
    psk_entry = copy.deepcopy(hpke_data[0]) | {"mode": 1}
    x25519_entry = copy.deepcopy(hpke_data[0]) | {"kem_id": 0x20}
    hpke_path = _write(tmp_path / "hpke.json", [*hpke_data, psk_entry, x25519_entry])
    basics = _load("mls-crypto-basics-cs2.json")
    basics_path = _write(tmp_path / "basics.json", [{**basics[0], "cipher_suite": 1}, *basics])
    schedule = _load("mls-key-schedule-cs2.json")
    schedule_path = _write(
        tmp_path / "schedule.json", [*schedule, {**schedule[0], "cipher_suite": 3}]
    )
    result = _keyagent("selftest", "--vectors", hpke_path, basics_path, schedule_path)
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert f"{hpke_path}: 12 passed, 0 failed, 2 skipped (HPKE mode 1 not implemented" in (lines[0])
    assert "HPKE suite kem 32 kdf 1 aead 1 not implemented" in lines[0]
    assert lines[1] == (
        f"{basics_path}: 6 passed, 0 failed, 1 skipped (MLS cipher_suite 1 not implemented)"
    )
    assert lines[2].endswith("0 failed, 1 skipped (MLS cipher_suite 3 not implemented)")


def test_unrecognised_unreadable_and_missing_files_fail(tmp_path: Path) -> None:
    other = _write(tmp_path / "other.json", {"not": "a vector file"})
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\xff{")
    missing = tmp_path / "missing.json"
    result = _keyagent("selftest", "--vectors", other, garbage, missing)
    assert result.returncode == 1
    for path in (other, garbage, missing):
        assert f"{path}: 0 passed, 1 failed" in result.stdout


def test_missing_fields_are_failures_not_crashes(tmp_path: Path) -> None:
    data = _load("mls-key-schedule-cs2.json")
    del data[0]["epochs"][1]["exporter"]
    del data[0]["epochs"][0]["membership_key"]
    report = selftest.run_vector_files([_write(tmp_path / "ks.json", data)])
    assert report.failed == 2 and not report.ok
    assert any("membership_key" in f and "KeyError" in f for f in report.files[0].failures)


def test_detect_format() -> None:
    for path in VECTOR_FILES:
        assert selftest.detect_format(json.loads(path.read_text())) is not None
    assert selftest.detect_format([]) is None
    assert selftest.detect_format({"cipher_suite": 2}) is None
    assert selftest.detect_format([{"cipher_suite": 2}]) is None
    assert selftest.detect_format([1, 2]) is None


def test_no_subcommand_is_a_usage_error() -> None:
    result = _keyagent()
    assert result.returncode == 2
    assert "selftest" in result.stderr


def test_crypto_basics_with_tls_encoded_keys_of_earlier_revisions(tmp_path: Path) -> None:
    """Earlier revisions of the published crypto-basics.json carry priv/pub as opaque<V>."""
    data = _load("mls-crypto-basics-cs2.json")
    for name in ("sign_with_label", "encrypt_with_label"):
        entry = data[0][name]
        entry["priv"] = "20" + entry["priv"]
        entry["pub"] = "4041" + entry["pub"]
    (result,) = selftest.run_vector_files([_write(tmp_path / "old.json", data)]).files
    assert (result.passed, result.failed) == (6, 0), result.failures
    data[0]["sign_with_label"]["pub"] = "4042" + data[0]["sign_with_label"]["pub"][4:] + "00"
    (result,) = selftest.run_vector_files([_write(tmp_path / "bad.json", data)]).files
    assert (result.passed, result.failed) == (5, 1)
