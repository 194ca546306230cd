"""Attestation verifier throughput: quotes verified per second on one core.

Not a test: prints a JSON list of records to stdout (progress to stderr).

The quotes are real: a bare swtpm is started once, firmware_sim's measured boot extends the default
components into it, and its AK quotes the policy's PCRs over a few hundred distinct nonces. Then the
verifier runs the whole service-side path for each report, many times over: NonceBook.issue (its rng
hands out the quote's nonce, so the challenge is a real open one), NonceBook.consume (single use,
expiry), event log decode, unquoted/duplicate checks, replay, ``agent.protocol.attest.verify_quote``
(ECDSA P-256 verification by pyca, TPMS_ATTEST parsing, nonce, selection, PCR digest) and the golden
policy. Nothing is cached between iterations.

Breakdown records time the AK signature check alone and the event log decode + replay alone.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol.eventlog import decode_event_log, replay
from agent.tpm import KeyKind, TPMStore
from firmware_sim.boot import default_components, measured_boot
from firmware_sim.ports import free_port
from provisioning.attestation import AttestationVerifier, Evidence, NonceBook
from provisioning.policy import policy_from_components

TARGET = 3000.0
QUOTES = 256
ROUNDS = 40  # every quote verified ROUNDS times: 10,240 verifications
PASSES = 5  # the median pass is reported (shared machines are noisy)


@contextmanager
def swtpm() -> Iterator[str]:
    """A bare swtpm (no EK needed here) in a temporary state directory; stopped by its PID."""
    binary = shutil.which("swtpm")
    if binary is None:
        raise SystemExit("swtpm is not installed (Debian package swtpm)")
    with tempfile.TemporaryDirectory() as state:
        port = free_port(2)
        process = subprocess.Popen(
            [
                binary,
                "socket",
                "--tpm2",
                "--server",
                f"type=tcp,port={port},bindaddr=127.0.0.1",
                "--ctrl",
                f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                "--tpmstate",
                f"dir={state}",
                "--flags",
                "not-need-init,startup-clear",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 5
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                        break
                except OSError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise RuntimeError("swtpm did not start") from None
                    time.sleep(0.01)
            yield f"swtpm:host=127.0.0.1,port={port}"
        finally:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def _rate(label: str, count: int, run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    elapsed = time.perf_counter() - start
    print(f"{label}: {count} in {elapsed:.3f} s", file=sys.stderr)
    return count / elapsed


def main() -> None:
    components = default_components("1.0")
    policy = policy_from_components(components)
    pcrs = policy.pcrs
    nonces = [os.urandom(32) for _ in range(QUOTES)]
    print(f"making {QUOTES} quotes in swtpm ...", file=sys.stderr)
    with swtpm() as tcti, TPMStore(tcti) as store, store.create_and_load(KeyKind.AK) as ak:
        log = measured_boot(store, components).encode()
        quotes = [store.quote(ak, nonce, pcrs) for nonce in nonces]
        ak_public = ak.public_key()
    reports = [Evidence(n, q, pcrs, log) for n, q in zip(nonces, quotes, strict=True)]

    next_nonce = itertools.cycle(nonces)
    book = NonceBook(rng=lambda size: next(next_nonce))
    verifier = AttestationVerifier(policy, book)
    total = QUOTES * ROUNDS
    now = 1_700_000_000

    def full() -> None:
        for i in range(total):
            report = reports[i % QUOTES]
            challenge = verifier.challenge("dev-0001", now)
            if challenge.nonce != report.nonce:
                raise RuntimeError("bench bookkeeping broke")
            verdict = verifier.verify("dev-0001", report, ak_public, now + 1)
            if not verdict.trusted:
                raise RuntimeError(verdict.summary)

    def signatures() -> None:
        algorithm = ec.ECDSA(hashes.SHA256())
        for i in range(total):
            quote = reports[i % QUOTES].quote
            ak_public.verify(quote.signature, quote.attest, algorithm)

    def logs() -> None:
        for _ in range(total):
            replay(decode_event_log(log), pcrs)

    full()  # warm-up pass, and proof that every report verifies
    passes = sorted(_rate("full verification", total, full) for _ in range(PASSES))
    full_rate = passes[len(passes) // 2]
    signature_rate = _rate("AK signature only", total, signatures)
    log_rate = _rate("event log decode + replay only", total, logs)

    records: list[dict[str, Any]] = [
        {
            "name": "attestation_verify_per_core",
            "value": round(full_rate),
            "unit": "quotes/s",
            "target": TARGET,
            "met": full_rate >= TARGET,
            "detail": (
                f"{total} verifications of {QUOTES} real swtpm quotes over PCRs {list(pcrs)}, "
                f"{len(components)}-event log ({len(log)} bytes); nonce issue+consume, "
                "decode, replay, verify_quote, policy per quote; median of "
                f"{PASSES} passes (min {passes[0]:.0f}, max {passes[-1]:.0f})"
            ),
        },
        {
            "name": "attestation_ak_signature_only",
            "value": round(signature_rate),
            "unit": "verifications/s",
            "target": None,
            "met": None,
        },
        {
            "name": "attestation_eventlog_decode_replay_only",
            "value": round(log_rate),
            "unit": "logs/s",
            "target": None,
            "met": None,
        },
    ]
    print(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
