"""Issue 8, load: a group of 200 virtual devices under 20 consecutive rekeys while 5% of the
devices drop off the network and come back at random points.

Real parts: Mosquitto with mutual TLS and the product ACL, ``keyfleet serve`` on SQLite, the
operator's signed ``op.rekey`` commands (``provisioning.operator.OperatorClient``). The devices
are the virtual fleet (``firmware_sim.fleet``): 200 agent protocol cores with SOFTWARE keys, each
with its own DevID certificate and MQTT connection (200 swtpm and keyagent processes do not fit
on a 2-core machine). The group is built directly (``VirtualFleet.seed_group``, the simulation
bypass the benchmarks use: 199 adds would be O(N^2) member work); every rekey after that goes
through the real service.

Seeded (``RELIABILITY_SEED``): ten devices (5%) each drop off (``VirtualFleet.set_offline``:
disconnected, session gone, so what they miss is lost to them) at a random rekey and a random
moment within it, and come back at a later random one. The service keeps 6 epochs of commit log:
a device away for fewer epochs is caught up from the log (catch-up), one away longer is removed
and re-added with a fresh welcome (re-welcome). Each rekey is sent once the previous one is
committed and every online device holds it. At the end every device must hold the group's final
epoch with one epoch authenticator, the service's acks must say the same, and the commit log must
be contiguous with one commit per epoch. Counted: catch-ups, re-welcomes, rekey times, total.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select

from firmware_sim.fleet import open_registry
from firmware_sim.fleet.groups import founding_request
from provisioning import audit
from provisioning.db.schema import Device
from provisioning.operator import FINAL, OperatorClient
from provisioning.registry import Registry, run_in_transaction
from tests.fixtures.deployment import DeployFactory
from tests.reliability.conftest import SEED_ENV, Summary, reliability_seed, send_rekey
from tests.service_deployment import Deployment, adopt_standing_policy

pytestmark = [pytest.mark.e2e, pytest.mark.long]

DEVICES = 200
REKEYS = 20
DROPPING = DEVICES // 20  # 5%
RETENTION = 6
ACK_TIMEOUT = 10
G = "load"


@pytest.fixture
def installation(deploy: DeployFactory) -> Deployment:
    """Broker, service and operator as docs/service.md "A deployment" says
    (tests/service_deployment.py), on a SQLite file; the virtual fleet is the test's."""
    return deploy(
        "load test",
        instances=("load-test",),
        operator=("op-load", "admin"),
        groups=f"ack_timeout_seconds = {ACK_TIMEOUT}\ncommit_log_retention_epochs = {RETENTION}\n",
        service="commit_request_timeout_seconds = 3\n",
        device_prefix="dev-l",
        log_tail=5_000,
    )


def test_200_devices_20_rekeys_with_5_percent_dropping_off(
    installation: Deployment, summary: Summary
) -> None:
    seed = reliability_seed()
    rng = random.Random(seed)
    print(f"\nload: {DEVICES} devices, {REKEYS} rekeys, {SEED_ENV}={seed}")
    engine, sessions = open_registry(installation.db_url)

    def registry(work: Callable[[Registry], Any]) -> Any:
        return run_in_transaction(sessions, lambda session: work(Registry(session)))

    started = time.monotonic()
    fleet = installation.virtual_fleet(DEVICES)
    # the group founded with the operator's approval; devices that fall behind the commit log
    # are re-added by the service on its own, under a standing policy the admin signed
    founding = founding_request(fleet.devices, G, now=int(time.time()))
    fleet.seed_group(G, sessions, now=int(time.time()), authz=installation.approve(founding))
    adopt_standing_policy(installation.workdir, installation.operator_args)
    fleet.start(timeout=300)
    setup_seconds = time.monotonic() - started
    ids = [d.device_id for d in fleet.devices]
    # every device's start-up report processed, so the first rekey does not queue behind them
    deadline = time.monotonic() + 180
    while True:
        with sessions() as session:
            reported = session.scalar(
                select(func.count()).select_from(Device).where(Device.last_report_at.is_not(None))
            )
        if reported is not None and reported >= DEVICES:
            break
        assert time.monotonic() < deadline, f"service processed {reported}/{DEVICES} reports"
        time.sleep(0.2)

    # who drops off, at which rekey and moment, and when it comes back
    plan: dict[str, tuple[int, float, int, float]] = {}
    for device_id in rng.sample(ids, DROPPING):
        leave = rng.randrange(0, REKEYS - 1)
        back = rng.randrange(leave + 1, REKEYS + 1)
        plan[device_id] = (leave, rng.uniform(0.0, 0.5), back, rng.uniform(0.0, 0.5))
    away: set[str] = set()
    events: Counter[str] = Counter()
    rekey_seconds: list[float] = []
    results: Counter[str] = Counter()
    commands: list[bytes] = []
    first_epoch = registry(lambda r: r.group(G).epoch)
    rekeys_started = time.monotonic()
    try:
        assert installation.operator is not None
        with OperatorClient(installation.operator) as client:
            for index in range(REKEYS + 1):
                epoch = registry(lambda r: r.group(G).epoch)
                if index < REKEYS:
                    sent = time.monotonic()
                    commands.append(send_rekey(client, G))
                # drops and returns at random moments while this rekey runs
                moments = sorted(
                    [(p[1], d, True) for d, p in plan.items() if p[0] == index]
                    + [(p[3], d, False) for d, p in plan.items() if p[2] == index]
                )
                for at, device_id, leaving in moments:
                    time.sleep(max(0.0, at - (time.monotonic() - sent)))
                    fleet.set_offline(device_id, leaving)
                    (away.add if leaving else away.discard)(device_id)
                    events["dropped off" if leaving else "came back"] += 1
                if index == REKEYS:
                    break
                # the next rekey once this one is committed and every online device holds it
                deadline = time.monotonic() + 120
                while True:
                    now_epoch = registry(lambda r: r.group(G).epoch)
                    epochs = fleet.epochs(G)
                    online = [d for d in ids if d not in away]
                    if now_epoch > epoch and all((epochs[d] or -1) >= now_epoch for d in online):
                        break
                    assert time.monotonic() < deadline, (index, now_epoch, epoch)
                    time.sleep(0.02)
                rekey_seconds.append(time.monotonic() - sent)
            assert not away
            # every device back: all end in the final epoch, with one authenticator. A device
            # re-added last still commits its first self-update after its welcome, so one common
            # epoch alone is not the end: no member may still hold the leaf key it joined with
            deadline = time.monotonic() + 240
            while True:
                settled = fleet.wait_settled(G, timeout=max(1.0, deadline - time.monotonic()))
                status = registry(lambda r: r.ack_status(G))
                if status.agreed and status.epoch == settled:
                    break
                assert time.monotonic() < deadline, (status.stragglers, status.epoch, settled)
                time.sleep(0.2)
            total_seconds = time.monotonic() - rekeys_started
            final = status.epoch
            # the operator's results: every rekey ended (done, or timeout naming who was away)
            end = time.monotonic() + ACK_TIMEOUT + 30
            pending = set(commands)
            while pending and time.monotonic() < end:
                result = client.next_result(1.0)
                if result is not None and result.command_id in pending and result.status in FINAL:
                    pending.discard(result.command_id)
                    results[result.status.value] += 1
            assert not pending, f"{len(pending)} rekeys got no final result"
        views = fleet.authenticators(G)
        assert len({v for v in views.values()}) == 1, "the fleet does not agree"
        assert all(v is not None and v[0] == final for v in views.values())
        assert fleet.status().errors == 0
    finally:
        fleet.stop()
    with sessions() as session:
        entries = audit.entries(session)
    readds = [e for e in entries if e.action == "group.readd"]
    oldest = registry(lambda r: r.oldest_retained_epoch(G))
    log_epochs = registry(lambda r: [c.epoch for c in r.commits_from(G, oldest)])
    assert log_epochs == list(range(oldest, final)), log_epochs
    service_log = installation.logs["load-test"].read_text(errors="replace")
    catchups = service_log.count(f"is behind in {G}; replaying")
    engine.dispose()
    assert events["dropped off"] == DROPPING == events["came back"]
    assert final >= first_epoch + REKEYS + 2 * len(readds)
    rekey_seconds.sort()
    summary.record(
        "load_200_devices",
        {
            "seed": seed,
            "devices": DEVICES,
            "rekeys": REKEYS,
            "devices_dropping_off_and_back": DROPPING,
            "commit_log_retention_epochs": RETENTION,
            "epochs": [first_epoch, final],
            "catch_ups_replayed_from_the_log": catchups,
            "re_welcomes_after_retention": len(readds),
            "devices_at_final_epoch": DEVICES,
            "setup_seconds_identities_seed_connect": round(setup_seconds, 1),
            "rekey_seconds_median": round(rekey_seconds[len(rekey_seconds) // 2], 2),
            "rekey_seconds_max": round(rekey_seconds[-1], 2),
            "total_seconds_first_rekey_to_all_agreed": round(total_seconds, 1),
            "operator_results": dict(results),
            "lost_devices": 0,
        },
    )
