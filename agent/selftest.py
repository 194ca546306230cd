"""Known-answer self-tests: the published RFC 9180 and RFC 9420 test vectors, run through
keyfleet's own code.

``run_builtin_selftests()`` runs the copies shipped inside the package (``agent/vectors/``), the
way a FIPS-style power-on self-test does: the daemon calls it at start and refuses to run on a
failure. ``run_vector_files()`` runs any file in the published formats, detected from content:

- RFC 9180 (CFRG ``test-vectors.json``): a list of entries with ``mode``/``kem_id``/...
- mls-implementations ``tree-math.json``, ``crypto-basics.json``, ``key-schedule.json``.

What is counted is a *check*: one function of one entry (for example ``ref_hash`` of the
cipher-suite-2 entry, or ``sender_data_secret`` of epoch 3). Entries for cipher suites or HPKE
modes keyfleet does not implement are skipped, once each, with the reason. Messages name the
check, never the bytes (the vectors are public, but the habit is what keeps real secrets out of
logs).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol import hpke
from agent.protocol.errors import KeyfleetError
from agent.protocol.mls import crypto, key_schedule
from agent.protocol.mls.tls import Reader

FORMAT_RFC9180 = "rfc9180"
FORMAT_TREE_MATH = "mls-tree-math"
FORMAT_CRYPTO_BASICS = "mls-crypto-basics"
FORMAT_KEY_SCHEDULE = "mls-key-schedule"

MLS_CIPHER_SUITE = 2

# Vector files are a few kB; refuse to parse anything absurd before reading it all.
MAX_VECTOR_FILE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class FileResult:
    """The outcome of one vector file. ``failures`` and ``skip_reasons`` name checks/entries."""

    name: str
    format: str | None
    passed: int
    failed: int
    skipped: int
    failures: tuple[str, ...] = ()
    skip_reasons: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def summary(self) -> str:
        """``FILE: N passed, M failed`` plus ``, K skipped (reasons)`` when something was."""
        line = f"{self.name}: {self.passed} passed, {self.failed} failed"
        if self.skipped:
            line += f", {self.skipped} skipped ({'; '.join(self.skip_reasons)})"
        return line


@dataclass(frozen=True)
class SelftestReport:
    files: tuple[FileResult, ...]
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.files) and bool(self.files)

    @property
    def passed(self) -> int:
        return sum(f.passed for f in self.files)

    @property
    def failed(self) -> int:
        return sum(f.failed for f in self.files)

    @property
    def skipped(self) -> int:
        return sum(f.skipped for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "passed": self.passed,
            "failed": self.failed,
            "skipped": self.skipped,
            "elapsed_s": self.elapsed_s,
            "files": [
                dataclasses.asdict(f) | {"summary": f.summary(), "ok": f.ok} for f in self.files
            ],
        }


class _Tally:
    """Collects check outcomes; a check is a callable that raises (AssertionError or anything
    else) on failure, so an exception from deep inside the library counts as a failure with its
    type named instead of aborting the file."""

    def __init__(self) -> None:
        self.passed = 0
        self.failures: list[str] = []
        self.skip_reasons: dict[str, int] = {}

    def check(self, name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except AssertionError as exc:
            self.failures.append(f"{name}: {exc or 'mismatch'}")
        except Exception as exc:  # a malformed vector or a library error is a failed check
            self.failures.append(f"{name}: {type(exc).__name__}: {exc}")
        else:
            self.passed += 1

    def skip(self, reason: str) -> None:
        self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + 1

    def result(self, name: str, fmt: str | None) -> FileResult:
        return FileResult(
            name=name,
            format=fmt,
            passed=self.passed,
            failed=len(self.failures),
            skipped=sum(self.skip_reasons.values()),
            failures=tuple(self.failures),
            skip_reasons=tuple(
                f"{reason} x{count}" if count > 1 else reason
                for reason, count in self.skip_reasons.items()
            ),
        )


def _h(value: Any) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"expected a hex string, got {type(value).__name__}")
    return bytes.fromhex(value)


def _equal(actual: object, expected: object, what: str) -> None:
    if actual != expected:
        raise AssertionError(f"{what} differs from the expected value")


def _expect_hex(actual: bytes, record: dict[str, Any], key: str) -> None:
    _equal(actual, _h(record[key]), key)


def _scalar(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_numbers().private_value.to_bytes(32, "big")


def _private_key(scalar: bytes) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP256R1())


def _unprefixed(raw: bytes, size: int) -> bytes:
    """Earlier revisions of crypto-basics.json TLS-encode keys (``opaque<V>``: 0x20 + 32-byte
    scalar, 0x4041 + 65-byte point); later ones give them raw. The sizes make it unambiguous."""
    if len(raw) == size:
        return raw
    reader = Reader(raw)
    key = reader.opaque_v()
    reader.finish()
    if len(key) != size:
        raise ValueError(f"expected a {size}-byte key, got {len(key)}")
    return key


def _mls_private_key(hex_value: Any) -> ec.EllipticCurvePrivateKey:
    return _private_key(_unprefixed(_h(hex_value), hpke.N_SK))


def _mls_public_key(hex_value: Any) -> bytes:
    return _unprefixed(_h(hex_value), hpke.N_PK)


def detect_format(data: object) -> str | None:
    """The published format ``data`` (parsed JSON) is in, or None."""
    if not isinstance(data, list) or not data or not all(isinstance(e, dict) for e in data):
        return None
    keys = set().union(*(e.keys() for e in data))
    if {"mode", "kem_id", "kdf_id", "aead_id"} <= keys:
        return FORMAT_RFC9180
    if {"n_leaves", "root", "parent", "sibling"} <= keys:
        return FORMAT_TREE_MATH
    if {"cipher_suite", "ref_hash", "expand_with_label"} <= keys:
        return FORMAT_CRYPTO_BASICS
    if {"cipher_suite", "epochs", "initial_init_secret"} <= keys:
        return FORMAT_KEY_SCHEDULE
    return None


# --- RFC 9180 ---------------------------------------------------------------------------------


def _run_rfc9180(entries: list[dict[str, Any]], tally: _Tally) -> None:
    suite = (hpke.KEM_ID, hpke.KDF_ID, hpke.AEAD_ID)
    for index, e in enumerate(entries):
        their_suite = (e.get("kem_id"), e.get("kdf_id"), e.get("aead_id"))
        if their_suite != suite:
            kem, kdf, aead = their_suite
            tally.skip(f"HPKE suite kem {kem} kdf {kdf} aead {aead} not implemented")
            continue
        if e.get("mode") != hpke.MODE_BASE:
            tally.skip(f"HPKE mode {e.get('mode')} not implemented (base mode only)")
            continue
        _run_rfc9180_entry(f"entry {index}", e, tally)


def _run_rfc9180_entry(where: str, e: dict[str, Any], tally: _Tally) -> None:
    def keys() -> None:
        sk_e, sk_r = hpke.derive_key_pair(_h(e["ikmE"])), hpke.derive_key_pair(_h(e["ikmR"]))
        _equal(_scalar(sk_e), _h(e["skEm"]), "skEm")
        _equal(hpke.serialize_public_key(sk_e.public_key()), _h(e["pkEm"]), "pkEm")
        _equal(_scalar(sk_r), _h(e["skRm"]), "skRm")
        _equal(hpke.serialize_public_key(sk_r.public_key()), _h(e["pkRm"]), "pkRm")

    def encap_decap() -> None:
        pk_r = hpke.deserialize_public_key(_h(e["pkRm"]))
        shared_secret, enc = hpke.encap(pk_r, rng=lambda n: _h(e["ikmE"]))
        _equal(enc, _h(e["enc"]), "enc")
        _equal(shared_secret, _h(e["shared_secret"]), "shared_secret (encap)")
        decapped = hpke.decap(_h(e["enc"]), _private_key(_h(e["skRm"])))
        _equal(decapped, _h(e["shared_secret"]), "shared_secret (decap)")

    def schedule() -> None:
        ctx = hpke.key_schedule_base(_h(e["shared_secret"]), _h(e["info"]))
        _equal(ctx.key, _h(e["key"]), "key")
        _equal(ctx.base_nonce, _h(e["base_nonce"]), "base_nonce")
        _equal(ctx.exporter_secret, _h(e["exporter_secret"]), "exporter_secret")

    tally.check(f"{where} derive_key_pair", keys)
    tally.check(f"{where} encap/decap", encap_decap)
    tally.check(f"{where} key_schedule", schedule)

    for i, enc_entry in enumerate(e.get("encryptions", [])):

        def seal_open(i: int = i, v: dict[str, Any] = enc_entry) -> None:
            seq = v.get("seq", i)  # the CFRG file lists them in order without a seq field
            sender = hpke.key_schedule_base(_h(e["shared_secret"]), _h(e["info"]))
            receiver = hpke.key_schedule_base(_h(e["shared_secret"]), _h(e["info"]))
            sender.seq = receiver.seq = seq
            aad, pt, ct = _h(v["aad"]), _h(v["pt"]), _h(v["ct"])
            _equal(sender.seal(aad, pt), ct, "ct")
            _equal(receiver.open(aad, ct), pt, "pt")

        tally.check(f"{where} encryption {i}", seal_open)

    for i, exp_entry in enumerate(e.get("exports", [])):

        def export(v: dict[str, Any] = exp_entry) -> None:
            ctx = hpke.key_schedule_base(_h(e["shared_secret"]), _h(e["info"]))
            out = ctx.export(_h(v["exporter_context"]), v["L"])
            _equal(out, _h(v["exported_value"]), "exported_value")

        tally.check(f"{where} export {i}", export)


# --- RFC 9420 tree math -----------------------------------------------------------------------


def _node_or_none(function: Callable[[int, int], int | None], x: int, n: int) -> int | None:
    # The vectors write null where the RFC's function is undefined (a leaf's child, the root's
    # parent); refusing such an input is as right as answering None.
    try:
        return function(x, n)
    except (ValueError, IndexError, KeyfleetError):
        return None


def _run_tree_math(entries: list[dict[str, Any]], tally: _Tally) -> None:
    try:
        from agent.protocol.mls import tree_math  # noqa: PLC0415  (written alongside; absent = failure)
    except ImportError as exc:
        tally.failures.append(f"tree math: agent.protocol.mls.tree_math unavailable ({exc})")
        return

    for e in entries:
        n = e["n_leaves"]
        where = f"n_leaves {n}"

        def root(e: dict[str, Any] = e, n: int = n) -> None:
            _equal(tree_math.root(n), e["root"], "root")
            _equal(tree_math.node_width(n), e["n_nodes"], "node_width")

        tally.check(f"{where} root", root)
        table: dict[str, Callable[[int, int], int | None]] = {
            "left": lambda x, n: tree_math.left(x),
            "right": lambda x, n: tree_math.right(x),
            "parent": tree_math.parent,
            "sibling": tree_math.sibling,
        }
        for name, function in table.items():

            def each_node(
                e: dict[str, Any] = e,
                n: int = n,
                name: str = name,
                function: Callable[[int, int], int | None] = function,
            ) -> None:
                expected = e[name]
                _equal(len(expected), e["n_nodes"], f"{name} table length")
                for x, want in enumerate(expected):
                    got = _node_or_none(function, x, n)
                    _equal(got, want, f"{name}({x})")

            tally.check(f"{where} {name}", each_node)


# --- RFC 9420 crypto-basics and key schedule ---------------------------------------------------


def _run_crypto_basics(entries: list[dict[str, Any]], tally: _Tally) -> None:
    for e in entries:
        if e.get("cipher_suite") != MLS_CIPHER_SUITE:
            tally.skip(f"MLS cipher_suite {e.get('cipher_suite')} not implemented")
            continue
        where = f"cipher_suite {MLS_CIPHER_SUITE}"
        for name, fn in _crypto_basics_checks(e):
            tally.check(f"{where} {name}", fn)


def _crypto_basics_checks(e: dict[str, Any]) -> Iterator[tuple[str, Callable[[], None]]]:
    def ref_hash() -> None:
        v = e["ref_hash"]
        _equal(crypto.ref_hash(v["label"].encode(), _h(v["value"])), _h(v["out"]), "out")

    def expand_with_label() -> None:
        v = e["expand_with_label"]
        out = crypto.expand_with_label(
            _h(v["secret"]), v["label"].encode(), _h(v["context"]), v["length"]
        )
        _equal(out, _h(v["out"]), "out")

    def derive_secret() -> None:
        v = e["derive_secret"]
        _equal(crypto.derive_secret(_h(v["secret"]), v["label"].encode()), _h(v["out"]), "out")

    def derive_tree_secret() -> None:
        v = e["derive_tree_secret"]
        out = crypto.derive_tree_secret(
            _h(v["secret"]), v["label"].encode(), v["generation"], v["length"]
        )
        _equal(out, _h(v["out"]), "out")

    def sign_with_label() -> None:
        v = e["sign_with_label"]
        label, content = v["label"].encode(), _h(v["content"])
        priv = _mls_private_key(v["priv"])
        pub = hpke.deserialize_public_key(_mls_public_key(v["pub"]))
        _equal(hpke.serialize_public_key(priv.public_key()), _mls_public_key(v["pub"]), "pub")
        crypto.verify_with_label(pub, label, content, _h(v["signature"]))
        crypto.verify_with_label(pub, label, content, crypto.sign_with_label(priv, label, content))

    def encrypt_with_label() -> None:
        v = e["encrypt_with_label"]
        label, context = v["label"].encode(), _h(v["context"])
        priv = _mls_private_key(v["priv"])
        _equal(hpke.serialize_public_key(priv.public_key()), _mls_public_key(v["pub"]), "pub")
        pt = crypto.decrypt_with_label(
            priv, label, context, _h(v["kem_output"]), _h(v["ciphertext"])
        )
        _equal(pt, _h(v["plaintext"]), "plaintext")
        kem_output, ct = crypto.encrypt_with_label(
            hpke.deserialize_public_key(_mls_public_key(v["pub"])), label, context, pt
        )
        _equal(crypto.decrypt_with_label(priv, label, context, kem_output, ct), pt, "round trip")

    yield "ref_hash", ref_hash
    yield "expand_with_label", expand_with_label
    yield "derive_secret", derive_secret
    yield "derive_tree_secret", derive_tree_secret
    yield "sign_with_label", sign_with_label
    yield "encrypt_with_label", encrypt_with_label


# The published key-schedule format carries every EpochSecrets field but epoch_secret itself.
_EPOCH_FIELDS = tuple(
    f.name for f in dataclasses.fields(key_schedule.EpochSecrets) if f.name != "epoch_secret"
)


def _run_key_schedule(entries: list[dict[str, Any]], tally: _Tally) -> None:
    for e in entries:
        if e.get("cipher_suite") != MLS_CIPHER_SUITE:
            tally.skip(f"MLS cipher_suite {e.get('cipher_suite')} not implemented")
            continue
        _run_key_schedule_chain(e, tally)


def _run_key_schedule_chain(e: dict[str, Any], tally: _Tally) -> None:
    where = f"cipher_suite {MLS_CIPHER_SUITE}"
    try:
        group_id, init_secret = _h(e["group_id"]), _h(e["initial_init_secret"])
        epochs = list(e["epochs"])
    except (KeyError, TypeError, ValueError) as exc:
        tally.failures.append(f"{where}: malformed entry ({type(exc).__name__})")
        return
    for index, epoch in enumerate(epochs):
        at = f"{where} epoch {index}"
        try:
            context = key_schedule.group_context_bytes(
                group_id, index, _h(epoch["tree_hash"]), _h(epoch["confirmed_transcript_hash"])
            )
            secrets = key_schedule.derive_epoch(
                init_secret, _h(epoch["commit_secret"]), context, _h(epoch["psk_secret"])
            )
        except Exception as exc:  # malformed inputs: the rest of the chain cannot be computed
            tally.failures.append(f"{at}: inputs unusable ({type(exc).__name__}: {exc})")
            return
        tally.check(f"{at} group_context", partial(_expect_hex, context, epoch, "group_context"))
        for name in _EPOCH_FIELDS:
            tally.check(f"{at} {name}", partial(_expect_hex, getattr(secrets, name), epoch, name))

        def external_pub(
            epoch: dict[str, Any] = epoch, secrets: key_schedule.EpochSecrets = secrets
        ) -> None:
            key = crypto.derive_key_pair(secrets.external_secret)
            _equal(hpke.serialize_public_key(key.public_key()), _h(epoch["external_pub"]), "pub")

        def exporter(
            epoch: dict[str, Any] = epoch, secrets: key_schedule.EpochSecrets = secrets
        ) -> None:
            v = epoch["exporter"]
            # The one exception to "hex strings are bytes": the published generators use the
            # exporter label as a string, so its bytes are the hex text itself.
            out = key_schedule.mls_exporter(
                secrets.exporter_secret, v["label"].encode(), _h(v["context"]), v["length"]
            )
            _equal(out, _h(v["secret"]), "exported secret")

        tally.check(f"{at} external_pub", external_pub)
        tally.check(f"{at} exporter", exporter)
        # Chain on our own result so one wrong expected value fails one check, not the rest.
        init_secret = secrets.init_secret


_RUNNERS: dict[str, Callable[[list[dict[str, Any]], _Tally], None]] = {
    FORMAT_RFC9180: _run_rfc9180,
    FORMAT_TREE_MATH: _run_tree_math,
    FORMAT_CRYPTO_BASICS: _run_crypto_basics,
    FORMAT_KEY_SCHEDULE: _run_key_schedule,
}


def run_vector_data(name: str, raw: bytes) -> FileResult:
    """Run one vector file's content. An unreadable or unrecognised file is one failure."""
    tally = _Tally()
    if len(raw) > MAX_VECTOR_FILE_BYTES:
        tally.failures.append(f"file larger than {MAX_VECTOR_FILE_BYTES} bytes")
        return tally.result(name, None)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        tally.failures.append(f"not JSON ({exc})")
        return tally.result(name, None)
    fmt = detect_format(data)
    if fmt is None:
        tally.failures.append("not a recognised test-vector format")
        return tally.result(name, None)
    _RUNNERS[fmt](data, tally)
    return tally.result(name, fmt)


def run_vector_files(paths: Iterable[str | Path]) -> SelftestReport:
    """Run the named files; a file that cannot be read is one failure."""
    start = time.perf_counter()
    results = []
    for path in paths:
        try:
            if Path(path).stat().st_size > MAX_VECTOR_FILE_BYTES:
                results.append(FileResult(str(path), None, 0, 1, 0, failures=("file too large",)))
                continue
            raw = Path(path).read_bytes()
        except OSError as exc:
            results.append(
                FileResult(str(path), None, 0, 1, 0, failures=(f"unreadable ({exc.strerror})",))
            )
            continue
        results.append(run_vector_data(str(path), raw))
    return SelftestReport(tuple(results), time.perf_counter() - start)


# The packaged vectors, read as files beside this module (the wheel installs them so). Not
# through importlib.resources: its readers load zipfile, about 0.4 MB of every agent's resident
# memory for a power-on self-test.
BUILTIN_VECTORS = Path(__file__).resolve().parent / "vectors"


def builtin_vector_names() -> list[str]:
    """The vector files packaged in ``agent/vectors``."""
    return sorted(p.name for p in BUILTIN_VECTORS.iterdir() if p.name.endswith(".json"))


def run_builtin_selftests() -> SelftestReport:
    """The power-on self-test: every packaged vector file. ``report.ok`` must be true to run."""
    start = time.perf_counter()
    results = tuple(
        run_vector_data(name, (BUILTIN_VECTORS / name).read_bytes())
        for name in builtin_vector_names()
    )
    return SelftestReport(results, time.perf_counter() - start)


def run_builtin_selftests_apart() -> tuple[bool, int]:
    """The power-on self-test of ``keyagent run``: ``(ok, failed checks)``.

    Run in a forked child when this process has no other thread (the daemon before it starts
    any): the child's objects, its heap and the code pages only the vectors touch never become
    the daemon's resident memory (about 0.8 MB, docs/bench/README.md). The child runs the same
    loaded code on a copy of this process, so the checks are the same. With other threads (the
    daemon inside a test process) a fork could copy a lock another thread holds: the test runs
    here instead. A child that dies or answers nothing is a failed self-test."""
    if threading.active_count() > 1 or not hasattr(os, "fork"):
        report = run_builtin_selftests()
        return report.ok, report.failed
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; its answer is checked by the parent
        try:
            os.close(read_end)
            report = run_builtin_selftests()
            os.write(write_end, f"{int(report.ok)} {report.failed}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answer:
        data = answer.read(64)
    _, status = os.waitpid(pid, 0)
    ok, _, failed = data.decode("ascii", "replace").partition(" ")
    if status != 0 or ok not in ("0", "1") or not failed.isdecimal():
        return False, 0
    return ok == "1", int(failed)
