"""What keeping the service's keys in a PKCS#11 token costs: signatures per second of a token key
against a software key, timed in the same run.

Not a test: prints a JSON list of records to stdout (progress to stderr).

The token is SoftHSM2 (``firmware_sim.softhsm.SoftToken``, the one the lab and the demo use); the
key is made inside it and used through ``provisioning.custody`` exactly as ``keyfleet serve``
uses its signing key: ``agent.protocol.wire.cose.sign1`` over an envelope-sized payload, from one
thread and from several at once (the service signs from its loop and from its HTTP threads; the
token key serializes them on one session). The software key is a pyca key signing the same
payload. The ratio is the figure that matters: how many times slower each envelope the service
sends is signed. A real HSM's rate is its vendor's figure; SoftHSM2 shows the cost of the
PKCS#11 path itself.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from agent.protocol.wire import cose
from firmware_sim.softhsm import CONF_ENV, SoftToken
from provisioning import custody, pki

PAYLOAD = bytes(range(256)) * 2  # a report-sized envelope body
ROUNDS = 5
SIGNATURES = 400
THREADS = 4
RATIO_TARGET = 10.0  # a token signature may cost at most ten software ones


def _rate(sign: Any, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        sign(PAYLOAD)
    return count / (time.perf_counter() - start)


def _threaded_rate(sign: Any, count: int, threads: int) -> float:
    def work() -> None:
        for _ in range(count // threads):
            sign(PAYLOAD)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return (count // threads * threads) / (time.perf_counter() - start)


def run(directory: Path) -> list[dict[str, Any]]:
    token = SoftToken.create(directory, label="bench")
    os.environ[CONF_ENV] = str(token.conf)
    custody.refresh_modules()
    ref = custody.parse_token_uri(token.uri("service-signing"))
    custody.generate_token_key(ref)
    token_key = custody.load_private_key(ref, role="service signing")
    software_key = pki.generate_key()
    public = token_key.public_key()
    # the token's signatures verify like any other (a bench of a broken key would be meaningless)
    cose.verify_sign1(cose.decode_sign1(cose.sign1(PAYLOAD, token_key)), public)

    soft, hard, hard_threads = [], [], []
    for round_ in range(ROUNDS):
        soft.append(_rate(lambda p: cose.sign1(p, software_key), SIGNATURES))
        hard.append(_rate(lambda p: cose.sign1(p, token_key), SIGNATURES))
        hard_threads.append(_threaded_rate(lambda p: cose.sign1(p, token_key), SIGNATURES, THREADS))
        print(f"round {round_ + 1}/{ROUNDS}: software {soft[-1]:.0f}/s, token {hard[-1]:.0f}/s",
              file=sys.stderr, flush=True)  # fmt: skip
    soft_rate = statistics.median(soft)
    token_rate = statistics.median(hard)
    ratio = soft_rate / token_rate
    return [
        {"name": "envelope_sign_software_per_s", "value": round(soft_rate), "unit": "sig/s",
         "target": None, "met": None},
        {"name": "envelope_sign_token_per_s", "value": round(token_rate), "unit": "sig/s",
         "target": None, "met": None},
        {"name": f"envelope_sign_token_{THREADS}_threads_per_s",
         "value": round(statistics.median(hard_threads)), "unit": "sig/s", "target": None,
         "met": None},
        {"name": "envelope_sign_token_vs_software_ratio", "value": round(ratio, 2), "unit": "x",
         "target": RATIO_TARGET, "met": ratio <= RATIO_TARGET},
    ]  # fmt: skip


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="kf-bench-token-") as tmp:
        print(json.dumps(run(Path(tmp)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
