"""Two ``keyfleet serve`` processes against one database and one Mosquitto (shared
subscriptions), a virtual fleet (agent cores with software keys, one MQTT connection each) and
the operator CLI as subprocesses: concurrent rekeys of several groups end with one valid chain per
group, an instance killed with SIGKILL in the middle of a rekey leaves it to the other, the audit
chain verifies, and each instance serves Prometheus metrics that show the split.

Runs on SQLite (one file in WAL mode, both processes writing) and, when the PostgreSQL fixture
is available, on PostgreSQL.
"""

from __future__ import annotations

import signal
import time
import urllib.request

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from provisioning.db.runtime import OperationRow
from provisioning.db.schema import CommitLogEntry, Group
from provisioning.registry import make_engine, session_factory
from tests.fixtures.deployment import DeployFactory
from tests.service_deployment import Deployment, keyfleet

pytestmark = pytest.mark.e2e
# tests/fixtures/postgres.py: every test runs on a SQLite file and on a fresh PostgreSQL database
DATABASE_BACKENDS = ("sqlite", "postgresql")

DEVICES = 12
INSTANCES = ("a", "b")


@pytest.fixture
def cluster(deploy: DeployFactory, database_url: str) -> Deployment:
    # One operator for every concurrent CLI: its commands arrive out of order, inside the
    # operator replay window (tests/e2e/test_replay_operator_e2e.py).
    return deploy(
        "scale-out",
        db_url=database_url,
        instances=INSTANCES,
        operator=("op-scale", "admin"),
        groups="ack_timeout_seconds = 60\n",
        service="commit_request_timeout_seconds = 3\nsession_expiry_seconds = 0\n",
        metrics=True,
        device_prefix="dev-s",
        devices=DEVICES,
    )


def scrape(cluster: Deployment, name: str) -> dict[str, float]:
    """The instance's /metrics as {sample line name+labels: value}."""
    url = f"http://127.0.0.1:{cluster.metrics_ports[name]}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def chain(cluster: Deployment, group_id: str) -> tuple[list[int], int]:
    """The epochs in the group's commit log, and the group's epoch."""

    def read(s: Session) -> tuple[list[int], int]:
        epochs = s.scalars(
            select(CommitLogEntry.epoch)
            .where(CommitLogEntry.group_id == group_id)
            .order_by(CommitLogEntry.epoch)
        )
        group = s.get(Group, group_id)
        assert group is not None
        return list(epochs), group.epoch

    return cluster.read(read)


def members_agree(cluster: Deployment, group_id: str, epoch: int) -> None:
    assert cluster.fleet is not None
    views = {d: v for d, v in cluster.fleet.authenticators(group_id).items() if v is not None}
    assert views and {v[0] for v in views.values()} == {epoch}, views
    assert len({v[1] for v in views.values()}) == 1, views


def ids(cluster: Deployment, first: int, count: int) -> list[str]:
    assert cluster.fleet is not None
    return [d.device_id for d in cluster.fleet.devices[first : first + count]]


def test_concurrent_rekeys_of_several_groups_keep_one_chain_each(cluster: Deployment) -> None:
    groups = {f"g{i}": ids(cluster, 4 * i, 4) for i in range(3)}
    creates = [cluster.cli_async("group", "create", g, "--members", *m) for g, m in groups.items()]
    for process in creates:
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0, out + err
    # the joiners' first self-updates (docs/treekem.md "Joining") before the rekeys are counted
    assert cluster.fleet is not None
    settled = {g: cluster.fleet.wait_settled(g, timeout=60, members=m) for g, m in groups.items()}
    # two rekeys per group, all six at once, all from one operator
    rekeys = [cluster.cli_async("rekey", "--group", g) for g in [*groups, *groups]]
    for process in rekeys:
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0, out + err
        assert "done epoch" in out.splitlines()[-1], out
    commits = 0
    for group_id in groups:
        epochs, current = chain(cluster, group_id)
        commits += current
        # create (epoch 0), 3 adds, the joiners' updates, 2 rekeys: no gap, no duplicate
        assert current == settled[group_id] + 2, (group_id, settled, current)
        assert epochs == list(range(current)), (group_id, epochs, current)
        deadline = time.monotonic() + 30
        while True:
            try:
                members_agree(cluster, group_id, current)
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    scraped = {name: scrape(cluster, name) for name in INSTANCES}
    for name, samples in scraped.items():
        # the shared subscription gave each instance a share of the device reports
        handled = sum(v for k, v in samples.items() if k.startswith("keyfleet_reports_handled"))
        assert handled > 0, (name, samples)
        assert f'keyfleet_instance_info{{instance_id="{name}"}}' in samples
    accepted = sum(s.get('keyfleet_commits_total{outcome="accepted"}', 0) for s in scraped.values())
    assert accepted == commits  # every commit in the logs, nothing else (3 adds, 2 rekeys and
    # the joiners' updates per group)
    acks = sum(s.get("keyfleet_ack_latency_seconds_count", 0) for s in scraped.values())
    assert acks >= 3 * 4 * 2  # at least every member's ack of both rekeys
    verify = keyfleet("audit", "verify", "--db", cluster.db_url, cwd=cluster.workdir, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_an_instance_killed_mid_rekey_leaves_the_rekey_to_the_other(cluster: Deployment) -> None:
    members = ids(cluster, 0, 6)
    created = cluster.cli("group", "create", "g1", "--members", *members)
    assert created.returncode == 0, created.stdout + created.stderr
    assert cluster.fleet is not None
    cluster.fleet.wait_settled("g1", timeout=60, members=members)  # the joiners' updates
    _, before = chain(cluster, "g1")

    rekey = cluster.cli_async("rekey", "--group", "g1")
    engine = make_engine(cluster.db_url)
    victim = None
    try:
        deadline = time.monotonic() + 60
        while victim is None:
            assert time.monotonic() < deadline, "the rekey never reached the database"
            with session_factory(engine)() as s:
                victim = s.scalar(
                    select(OperationRow.accepted_by).where(OperationRow.type == "op.rekey")
                )
            if victim is None:
                time.sleep(0.005)
    finally:
        engine.dispose()
    # SIGKILL: no goodbye, no flushing; whatever it had in flight is in the database only.
    cluster.services[victim].send_signal(signal.SIGKILL)
    cluster.services[victim].wait(10)
    survivor = next(name for name in INSTANCES if name != victim)

    out, err = rekey.communicate(timeout=240)
    assert rekey.returncode == 0, out + err
    assert out.splitlines()[-1].startswith(f"rekey g1: done epoch {before + 1}"), out
    epochs, current = chain(cluster, "g1")
    assert epochs == list(range(before + 1)) and current == before + 1
    members_agree(cluster, "g1", current)
    # the survivor still works for the next change, alone
    again = cluster.cli("rekey", "--group", "g1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert chain(cluster, "g1")[1] == before + 2
    assert cluster.services[survivor].poll() is None
    listing = keyfleet("groups", "--db", cluster.db_url, cwd=cluster.workdir)
    assert listing.returncode == 0 and "g1" in listing.stdout
    verify = keyfleet("audit", "verify", "--db", cluster.db_url, cwd=cluster.workdir, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
