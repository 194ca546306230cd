"""Device messages at the service: what one key-state report (``keys.report``), one group ack
and one attestation answer cost, as a ratio to one ECDSA P-256 verify timed in the same run, on
a SQLite file and on PostgreSQL, with 1,000 and 10,000 registered devices; and a burst of
100,000 signed reports from 100,000 distinct registered devices (docs/bench/README.md, "Device
messages").

Not a test: prints a JSON list of records to stdout (progress to stderr).

Set-up, per backend and N: N software devices, each a registered device with its real DevID
certificate (from the test device CA), in groups of ``GROUP_SIZE`` members (group rows and
member rows as the service stores them; no tree: neither path reads it), the real delivery
service (``DeliveryService``) on the database. Every message is a real signed envelope
(``encode_message`` with the device's DevID key), handed to ``DeliveryService.handle_many`` in
batches of ``BATCH`` as ``keyfleet serve`` hands them over. Not timed: every device acks the
group's epoch once and sends one report (its first messages: its DevID certificate checked,
its replay row and key rows made). Timed, in this order:

- ``report``: every device's next ``keys.report``, the one a device sends at each reconnect
  (same keys, same states: what a fleet-wide reconnect sends);
- ``ack``: every device's ack of the group's next epoch (the group moved on one epoch);
- ``attest``: attestation answers (``attest.report``) of the first ``ATTESTED`` devices, each a
  real swtpm quote over the challenge's nonce with the measured-boot event log and the device's
  key states, answering an open challenge of its own. Two rounds: the first (each device's
  first answer to the instance: its certificate is checked with its AK, ``first_attest_ms``),
  then the timed one. The quotes are made before any clock starts (``make_evidence``: one AK in
  one swtpm, which every device's certificate names; ``bench_attestation`` makes its quotes the
  same way), the challenges are written as ``attestation.challenge`` records them.

Each figure is the wall time of the batches over the number of messages, with the SQL
statements per message counted on the engine, and its ratio to one ECDSA verify timed just
before and just after that run (``timed``: the machine's load moves, and a verify timed once at
the start made the ratios of later runs flatter or worse than they were). Before each timed
run the objects that exist (mostly the virtual fleet's keys and pre-signed messages) are frozen
out of the garbage collector's generations (``gc.freeze``): otherwise its full collections,
which walk them, charge the service about 0.3 ms per report for objects it would not hold.

The burst (``python -m bench.bench_device_messages burst [N]``, and in the default run): 100,000
devices on SQLite, each one report pre-signed before the clock starts, all through
``handle_many`` in batches of ``BATCH``, in this one process (no broker).
"""

from __future__ import annotations

import cProfile
import gc
import io
import json
import logging
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import event, func, insert, select, update
from sqlalchemy.engine import Engine

from agent.protocol.attest import public_key_from_area, tpm_name
from agent.protocol.lifecycle import KeyKind, KeyRecord, KeyState
from agent.protocol.topics import SERVICE_ID, device_report_topic
from agent.protocol.wire.envelope import encode_message
from agent.protocol.wire.messages.ack import Ack
from agent.protocol.wire.messages.attestation import AttestReport
from agent.protocol.wire.messages.base import Body
from agent.protocol.wire.messages.key_state import KeyStateReport
from agent.tpm import KeyKind as TpmKeyKind
from agent.tpm import TPMStore
from bench.bench_attestation import swtpm
from bench.bench_scale import (
    T0,
    _ecdsa_verify_ms,
    progress,
    seed_device_rows,
    seed_member_rows,
)
from firmware_sim.boot import default_components, measured_boot
from provisioning import pki
from provisioning.attestation import Challenge, Evidence, verify_evidence
from provisioning.db.runtime import AttestChallengeRow, create_service_schema
from provisioning.db.schema import AttestationResult, Group
from provisioning.db.schema import Device as DeviceRow
from provisioning.policy import policy_from_components
from provisioning.registry import create_schema, make_engine, session_factory
from provisioning.service.core import AttestationSettings, DeliveryService, ServiceSettings
from tests.device_certs import device_ca as test_device_ca
from tests.device_certs import devid_cert_der
from tests.fixtures.postgres import PostgresServer

SIZES = (1_000, 10_000)
BURST = 100_000
BATCH = 200  # messages keyfleet serve hands the service at once
GROUP_SIZE = 1_000
EPOCH = 2
TARGET_SQLITE = 5.0  # verify times per message
TARGET_POSTGRESQL = 8.0
BURST_TARGET_S = 60.0
VERIFY_ROUNDS = 500  # verifies timed before and after each timed run
ATTESTED = 200  # devices that answer a challenge (two rounds), at every N
ATTEST_TTL = 3600  # the challenges stay open while the answers are made and taken

Device_ = tuple[str, ec.EllipticCurvePrivateKey]


def make_fleet(n: int, *, ak_name: bytes | None = None) -> tuple[list[Device_], list[str]]:
    """``n`` software devices and their DevID certificates (PEM), naming the AK ``ak_name``
    if given (as enrollment issues them; the service checks it before it takes a quote)."""
    ca = test_device_ca()
    devices: list[Device_] = []
    pems: list[str] = []
    for i in range(n):
        device_id = f"dev-{i:06}"
        key = ec.generate_private_key(ec.SECP256R1())
        der = devid_cert_der(device_id, key, ca=ca, ak_name=ak_name)
        pems.append(
            x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()
        )
        devices.append((device_id, key))
        if i and i % 20_000 == 0:
            progress(f"  {i} devices made")
    return devices, pems


def group_of(i: int) -> str:
    return f"g-{i // GROUP_SIZE:03}"


def seed(
    engine: Engine,
    fleet: list[Device_],
    pems: list[str],
    *,
    now: int,
    ak_public: bytes | None = None,
) -> None:
    """Every device registered with its real DevID certificate (and ``ak_public`` as its AK,
    if given: the one its certificate names) and a member of its group."""
    with engine.begin() as connection:
        each = None if ak_public is None else (lambda i: {"ak_public": ak_public})
        devices = [(device_id, pem) for (device_id, _), pem in zip(fleet, pems, strict=True)]
        seed_device_rows(connection, devices, now=now, each=each)
        groups = sorted({group_of(i) for i in range(len(fleet))})
        connection.execute(
            insert(Group),
            [
                {
                    "group_id": g,
                    "epoch": EPOCH,
                    "public_tree": b"bench",
                    "group_context": b"bench",
                    "created_at": now,
                    "updated_at": now,
                    "state_token": b"bench-seeded",
                }
                for g in groups
            ],
        )
        # joined at the group's epoch: up to date, as a member that acked it
        members = [(group_of(i), fleet[i][0], i % GROUP_SIZE) for i in range(len(fleet))]
        seed_member_rows(connection, members, epoch=EPOCH, now=now)


@dataclass(frozen=True)
class TpmEvidence:
    """Real attestation answers: one AK in a swtpm, one measured boot, and one quote per
    nonce (``bench_attestation``'s way), made before any clock starts. Every device's
    certificate names this one AK (a bench shortcut: one TPM for the fleet); each challenge
    has its own nonce, so each answer is its own quote."""

    ak_public: bytes
    event_log: bytes
    pcrs: tuple[int, ...]
    quotes: list[tuple[bytes, bytes, bytes]]  # nonce, quote (TPMS_ATTEST), signature


def make_evidence(count: int) -> TpmEvidence:
    components = default_components("1.0")
    pcrs = policy_from_components(components).pcrs
    nonces = [i.to_bytes(8, "big") + os.urandom(24) for i in range(count)]
    begin = time.monotonic()
    with swtpm() as tcti, TPMStore(tcti) as store, store.create_and_load(TpmKeyKind.AK) as ak:
        log = measured_boot(store, components).encode()
        quotes = []
        for nonce in nonces:
            quote = store.quote(ak, nonce, pcrs)
            quotes.append((nonce, quote.attest, quote.signature))
        ak_public = ak.public_area
    progress(f"  {count} swtpm quotes in {time.monotonic() - begin:.0f} s")
    return TpmEvidence(ak_public, log, pcrs, quotes)


def open_challenges(
    engine: Engine,
    fleet: list[Device_],
    quotes: list[tuple[bytes, bytes, bytes]],
    now: int,
    evidence: TpmEvidence,
) -> None:
    """Device ``i``'s open challenge for ``quotes[i]``'s nonce, as ``attestation.challenge``
    records it (not timed: what is measured is the answer)."""
    with engine.begin() as connection:
        connection.execute(
            insert(AttestChallengeRow),
            [
                {
                    "nonce": nonce.hex(),
                    "device_id": device_id,
                    "pcrs": ",".join(str(p) for p in evidence.pcrs),
                    "issued_at": now,
                    "expires_at": now + ATTEST_TTL,
                    "answered_at": None,
                }
                for (device_id, _), (nonce, _, _) in zip(fleet, quotes, strict=False)
            ],
        )


def attest_body(evidence: TpmEvidence, i: int) -> AttestReport:
    nonce, quote, signature = evidence.quotes[i]
    return AttestReport(
        nonce=nonce,
        quote=quote,
        signature=signature,
        pcr_bank="sha256",
        pcrs=evidence.pcrs,
        event_log=evidence.event_log,
        keys=report_body().keys,
    )


def report_body() -> KeyStateReport:
    history = ((KeyState.PRE_ACTIVATION, T0 - 1000), (KeyState.ACTIVE, T0 - 999))
    return KeyStateReport(
        keys=(
            KeyRecord("ak", KeyKind.AK, history),
            KeyRecord("devid", KeyKind.DEVID, history),
        ),
        feed=0,
    )


@contextmanager
def service_at(url: str) -> Iterator[tuple[Engine, DeliveryService, list[int]]]:
    """The service on ``url`` (schema created) and a counter of SQL statements run."""
    engine = make_engine(url)
    create_schema(engine)
    create_service_schema(engine)
    statements = [0]

    @event.listens_for(engine, "before_cursor_execute")
    def count(*_args: Any) -> None:
        statements[0] += 1

    now_dt = datetime.fromtimestamp(T0, UTC)
    operator_ca = pki.create_ca("bench operator CA", now=now_dt, valid_for=timedelta(days=2))
    counter = iter(range(1, 1 << 40))
    service = DeliveryService(
        session_factory(engine),
        signing_key=pki.generate_key(),
        operator_ca=operator_ca.certificate,
        device_ca=test_device_ca().certificate,
        settings=ServiceSettings(min_approvals=1),
        rng=lambda n: next(counter).to_bytes(n, "big"),
        attestation=AttestationSettings(
            policy=policy_from_components(default_components("1.0")), nonce_ttl=ATTEST_TTL
        ),
    )
    try:
        yield engine, service, statements
    finally:
        engine.dispose()


class Signer:
    """Each device's envelopes, with its own sequence numbers."""

    def __init__(self, fleet: list[Device_]) -> None:
        self.fleet = fleet
        self.seqs = [0] * len(fleet)

    def sign(self, i: int, body: Body, now: int) -> tuple[str, bytes]:
        self.seqs[i] += 1
        device_id, key = self.fleet[i]
        payload = encode_message(
            body, key=key, sender=device_id, to=SERVICE_ID, seq=self.seqs[i], time=now
        )
        return device_report_topic(device_id), payload


def take(
    service: DeliveryService, messages: list[tuple[str, bytes]], now: int
) -> tuple[float, int]:
    """``messages`` through ``handle_many`` in batches: (wall seconds, refusals counted).
    What exists before (the virtual fleet's keys, the pre-signed messages: objects a real
    service does not hold) is moved out of the garbage collector's way first (``gc.freeze``),
    so that its collections do not charge the service for the bench's own objects."""
    gc.collect()
    gc.freeze()
    refused = sum(service.rejections.snapshot().values())
    begin = time.perf_counter()
    for start in range(0, len(messages), BATCH):
        service.handle_many(messages[start : start + BATCH], now)
    spent = time.perf_counter() - begin
    return spent, sum(service.rejections.snapshot().values()) - refused


def timed(
    service: DeliveryService, messages: list[tuple[str, bytes]], now: int
) -> tuple[float, int, float]:
    """``take``, and one ECDSA verify's time measured just before and just after it (the mean):
    on a shared machine whose load moves, the ratio is then to a verify timed under the same
    load as the messages."""
    before = _ecdsa_verify_ms(VERIFY_ROUNDS)
    spent, refused = take(service, messages, now)
    return spent, refused, (before + _ecdsa_verify_ms(VERIFY_ROUNDS)) / 2


def profiled(work: Callable[[], Any], limit: int = 25) -> str:
    profile = cProfile.Profile()
    profile.enable()
    work()
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(limit)
    return out.getvalue()


def run(
    url: str,
    backend: str,
    fleet: list[Device_],
    pems: list[str],
    evidence: TpmEvidence,
    *,
    only_attest: bool = False,
) -> dict[str, Any]:
    """The figures of one backend and N; ``only_attest``: the attestation rounds alone (after
    the same warm-up), the timed round profiled on SQLite if ``BENCH_PROFILE`` is set."""
    n = len(fleet)
    signer = Signer(fleet)
    with service_at(url) as (engine, service, statements):
        seed(engine, fleet, pems, now=T0, ak_public=evidence.ak_public)
        now = T0 + 10
        warm = [signer.sign(i, Ack(group_of(i), EPOCH, b"\x01" * 32), now) for i in range(n)]
        warm += [signer.sign(i, report_body(), now) for i in range(n)]
        _, refused = take(service, warm, now)
        if refused:
            raise RuntimeError(f"{backend} N={n}: {refused} warm-up messages refused")
        figures: dict[str, Any] = {}
        quote_ms: dict[str, float] = {}
        if not only_attest:
            timed_reports_acks(engine, service, statements, signer, figures)
        # two rounds of attestation answers from the first ATTESTED devices: the first (a
        # device's first answer to this instance: its certificate is checked with its AK) and
        # the next one, timed like the others
        attested = min(n, ATTESTED)
        for kind, now in (("attest_first", T0 + 40), ("attest", T0 + 45)):
            first = 0 if kind == "attest_first" else attested
            open_challenges(engine, fleet[:attested], evidence.quotes[first:], now - 5, evidence)
            answers = [
                signer.sign(i, attest_body(evidence, first + i), now) for i in range(attested)
            ]
            before = statements[0]
            checks = service._env.devices.validations
            taken = service.metrics.reports.value("attest.report")
            profile = only_attest and backend == "sqlite" and os.environ.get("BENCH_PROFILE")
            if kind == "attest" and profile:
                progress(profiled(partial(take, service, answers, now), limit=60))
                continue
            spent, refused, verify = timed(service, answers, now)
            if kind == "attest":
                quote_ms[backend] = quote_check_ms(evidence, fleet[:attested], first, now)
            checks = service._env.devices.validations - checks
            if service.metrics.reports.value("attest.report") - taken != attested:
                raise RuntimeError(f"{backend} N={n}: not every attestation answer was taken")
            with engine.connect() as connection:
                trusted = connection.execute(
                    select(func.count())
                    .select_from(DeviceRow)
                    .where(
                        DeviceRow.attestation_result == AttestationResult.TRUSTED,
                        DeviceRow.attested_at == now,
                    )
                ).scalar_one()
            if trusted != attested:
                raise RuntimeError(f"{backend} N={n}: {attested - trusted} answers not trusted")
            figures[kind] = (spent, statements[0] - before, refused, checks, attested, verify)
        out: dict[str, Any] = {}
        for kind, (spent, sql, refused, checks, count, verify) in figures.items():
            if refused:
                raise RuntimeError(f"{backend} N={n}: {refused} {kind} messages refused")
            out[kind] = {
                "ms": spent * 1000 / count,
                "sql_per_message": sql / count,
                "certificate_checks": checks,
                "messages": count,
                "verify_ms": verify,
            }
        if "attest" in out and backend in quote_ms:
            out["attest"]["quote_check_ms"] = quote_ms[backend]
        if not only_attest and n == min(n, SIZES[0]) and backend == "sqlite":
            now = T0 + 60
            more = [signer.sign(i, report_body(), now) for i in range(n)]
            out["profile"] = profiled(lambda: take(service, more, now))
        return out


def quote_check_ms(evidence: TpmEvidence, fleet: list[Device_], first: int, now: int) -> float:
    """What the quote check alone costs per answer (``verify_evidence``: the AK's signature
    over the quote, the nonce, the PCR selection and digest, the event log replayed against
    the golden policy), timed over the round's answers right after it: the part of an answer
    that is not the service's bookkeeping."""
    policy = policy_from_components(default_components("1.0"))
    ak_public = public_key_from_area(evidence.ak_public)
    cases = []
    for i, (device_id, _) in enumerate(fleet):
        body = attest_body(evidence, first + i)
        challenge = Challenge(device_id, body.nonce, evidence.pcrs, now - 5, now + ATTEST_TTL)
        cases.append((Evidence.from_report(body), challenge))
    begin = time.perf_counter()
    for found, challenge in cases:
        if not verify_evidence(
            found, ak_public=ak_public, challenge=challenge, policy=policy
        ).trusted:
            raise RuntimeError("a bench quote is not trusted")
    return (time.perf_counter() - begin) * 1000 / len(cases)


def timed_reports_acks(
    engine: Engine,
    service: DeliveryService,
    statements: list[int],
    signer: Signer,
    figures: dict[str, Any],
) -> None:
    """The timed rounds of reports and acks (``figures["report"]``, ``figures["ack"]``)."""
    n = len(signer.fleet)
    now = T0 + 20
    reports = [signer.sign(i, report_body(), now) for i in range(n)]
    before = statements[0]
    checks = service._env.devices.validations
    spent, refused, verify = timed(service, reports, now)
    checks = service._env.devices.validations - checks
    figures["report"] = (spent, statements[0] - before, refused, checks, n, verify)
    with engine.begin() as connection:
        connection.execute(update(Group).values(epoch=EPOCH + 1))
    now = T0 + 30
    acks = [signer.sign(i, Ack(group_of(i), EPOCH + 1, b"\x02" * 32), now) for i in range(n)]
    before = statements[0]
    checks = service._env.devices.validations
    spent, refused, verify = timed(service, acks, now)
    checks = service._env.devices.validations - checks
    figures["ack"] = (spent, statements[0] - before, refused, checks, n, verify)


def records(rows: list[tuple[str, int, dict[str, Any]]], verify_ms: float) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for backend, n, figures in rows:
        target = TARGET_SQLITE if backend == "sqlite" else TARGET_POSTGRESQL
        for kind in ("report", "ack", "attest"):
            if kind not in figures:
                continue
            ms = figures[kind]["ms"]
            verify = figures[kind]["verify_ms"]
            ratio = ms / verify
            out.append(
                {
                    "name": f"device_{kind}_verify_ratio_{backend}_n{n // 1000}k",
                    "value": round(ratio, 2),
                    "unit": "ECDSA verifies",
                    "target": target,
                    "met": ratio <= target,
                    "ms_per_message": round(ms, 3),
                    "verify_ms": round(verify, 4),
                    "verify_ms_at_start": round(verify_ms, 4),
                    "sql_per_message": round(figures[kind]["sql_per_message"], 2),
                    "certificate_checks": figures[kind]["certificate_checks"],
                    "messages": figures[kind]["messages"],
                    "first_attest_ms": (
                        round(figures["attest_first"]["ms"], 3) if kind == "attest" else None
                    ),
                    "quote_check_ms": (
                        round(figures[kind]["quote_check_ms"], 4)
                        if "quote_check_ms" in figures[kind]
                        else None
                    ),
                }
            )
    return out


def burst(directory: Path, n: int = BURST) -> dict[str, Any]:
    """``n`` registered devices, one pre-signed report each, through ``handle_many``."""
    begin = time.monotonic()
    fleet, pems = make_fleet(n)
    progress(f"burst: {n} devices made in {time.monotonic() - begin:.0f} s")
    signer = Signer(fleet)
    with service_at(f"sqlite:///{directory / 'burst.db'}") as (engine, service, statements):
        seed(engine, fleet, pems, now=T0)
        del pems
        now = T0 + 10
        reports = [signer.sign(i, report_body(), now) for i in range(n)]
        progress("burst: reports signed")
        cpu = time.process_time()
        spent, refused = take(service, reports, now)
        cpu = time.process_time() - cpu
        if refused:
            raise RuntimeError(f"burst: {refused} reports refused")
        return {
            "name": "device_report_burst_100k_s",
            "value": round(spent, 1),
            "unit": "s",
            "target": BURST_TARGET_S,
            "met": spent <= BURST_TARGET_S,
            "reports": n,
            "sql_per_report": round(statements[0] / n, 2),
            "cpu_ms_per_report": round(cpu / n * 1000, 4),
            "certificate_checks": service._env.devices.validations,
            "how": "in-process, handle_many in batches of 200, SQLite file, first report each",
        }


def main() -> None:
    logging.getLogger("keyfleet").setLevel(logging.ERROR)
    mode = sys.argv[1] if len(sys.argv) > 1 else "all"
    if mode == "burst-broker":
        from bench.burst_broker import burst_broker  # noqa: PLC0415 (it imports this module)

        n = int(sys.argv[2]) if len(sys.argv) > 2 else BURST
        json.dump([burst_broker(n)], sys.stdout, indent=2)
        print()
        return
    verify_ms = _ecdsa_verify_ms(2000)
    progress(f"ECDSA P-256 verify: {verify_ms:.4f} ms")
    out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        if mode in ("all", "messages", "sqlite", "attest", "attest-sqlite"):
            # "attest" / "attest-sqlite": the attestation rounds alone (on both backends / on
            # SQLite); with BENCH_PROFILE set, the timed round on SQLite is profiled instead
            rows: list[tuple[str, int, dict[str, Any]]] = []
            backends = ("sqlite",) if mode.endswith("sqlite") else ("sqlite", "postgresql")
            only_attest = mode.startswith("attest")
            postgres = None
            if "postgresql" in backends:
                postgres = PostgresServer()
                postgres.start()
            try:
                sizes = tuple(int(a) for a in sys.argv[2:]) or SIZES
                evidence = make_evidence(2 * min(max(sizes), ATTESTED))
                for n in sizes:
                    fleet, pems = make_fleet(n, ak_name=tpm_name(evidence.ak_public))
                    for backend in backends:
                        if backend == "sqlite":
                            url = f"sqlite:///{directory / f'fleet-{n}.db'}"
                        else:
                            assert postgres is not None
                            url = postgres.create_database()
                        figures = run(url, backend, fleet, pems, evidence, only_attest=only_attest)
                        profile = figures.pop("profile", None)
                        if profile is not None:
                            progress(profile)
                        progress(f"{backend} N={n}: {json.dumps(figures)}")
                        rows.append((backend, n, figures))
            finally:
                if postgres is not None:
                    postgres.stop()
            out += records(rows, verify_ms)
        if mode in ("all", "burst"):
            # "burst N": N devices instead of 100,000 (the same first reports, in process)
            n = int(sys.argv[2]) if mode == "burst" and len(sys.argv) > 2 else BURST
            out.append(burst(directory, n) | {"verify_ms": round(verify_ms, 4)})
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
