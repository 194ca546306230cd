"""Issue 4 acceptance, end to end on a whole local installation (``firmware_sim.lab``): a real
Mosquitto with mutual TLS and the product ACL, ``keyfleet serve`` on a real SQLite file, four
``firmware-sim device`` processes (one swtpm each, measured boot, provisioned by the station
over their pty) running ``keyagent run``, operators driving the ``keyfleet`` CLI, apps using
each device's local API.

One lab for the whole module (start-up ~6-10 s). The tests run in file order and build on each
other's state, which is what they check:

1. group ``g1`` with all four devices, rekeyed: every member acks one authenticator, data
   crosses between all of them;
   ``keyfleet devices --keys`` shows a rekey's new epoch keys within seconds, KIND filled;
   ``keyfleet rekey --full`` replaces every member's leaf key in one commit;
2. two rekeys at once: ``g1`` moves epochs without forking;
3. forged, replayed, stale and wrong-role operator commands: refused, audited, ``g1`` unchanged;
4. the service's database and logs hold none of the agents' secrets (agents stopped one at a
   time to read their state through their TPM, then rebooted);
5. an agent killed (SIGKILL) while applying a commit, at each fault point and at seeded random
   moments, comes back consistent and acks;
6. revocation (last: it takes a device out of ``g1`` for good).
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.core import KEY_CHANGE_REPORT_DELAY, KEY_CHANGE_REPORT_SPREAD
from agent.mqtt import MqttClient, ReceivedMessage
from agent.protocol.dataseal import open_sealed
from agent.protocol.errors import ProtocolError
from agent.protocol.secret import Secret
from agent.protocol.topics import SERVICE_ID, operator_cmd_topic, operator_result_topic
from agent.protocol.wire.envelope import encode_message
from agent.protocol.wire.messages.operator import Rekey, Revoke
from firmware_sim.lab import Lab, LabDevice
from provisioning import pki
from provisioning.service.commits import load_public
from tests.fixtures.fleet import refusals_since, service_tap
from tests.fixtures.postgres import dump_rows

pytestmark = pytest.mark.e2e
# the whole module once on a SQLite file and once on PostgreSQL (tests/fixtures/postgres.py)
DATABASE_BACKENDS = ("sqlite", "postgresql")

LAB_OPTIONS = {"devices": 4, "ack_timeout": 20, "commit_request_timeout": 3}
G = "g1"
MEASURED: dict[str, Any] = {}


def current_epoch(lab: Lab) -> int:
    return int(next(row for row in lab.groups() if row["group_id"] == G)["epoch"])


def assert_agreed(lab: Lab, members: list[LabDevice] | None = None) -> bytes:
    """The registry's view (``keyfleet groups --json`` and ``ack_status``): every member acked
    the current epoch with one authenticator; the agents' status files show that epoch."""
    members = lab.devices if members is None else members
    row = next(row for row in lab.groups() if row["group_id"] == G)
    assert row["agreed"] is True and row["stragglers"] == [], row
    assert sorted(row["members"]) == sorted(d.id for d in members), row
    status = lab.ack_status(G)
    assert status.agreed and len(status.by_authenticator) == 1, status
    (authenticator, acked), *_ = status.by_authenticator.items()
    assert sorted(acked) == sorted(d.id for d in members)
    lab.wait_epoch(G, int(row["epoch"]), members, timeout=30)
    return bytes(authenticator)


def cross_decrypt(lab: Lab, source: LabDevice, targets: list[LabDevice]) -> bytes:
    """Encrypt on ``source`` through its local API; every target decrypts it."""
    plaintext = os.urandom(48)
    with source.api() as api:
        blob = api.encrypt(G, plaintext)
    for target in targets:
        with target.api() as api:
            assert api.decrypt(G, blob) == plaintext, target.name
    return blob


def rekey(lab: Lab, operator: str = "op-ops") -> dict[str, Any]:
    result = lab.op("rekey", "--group", G, operator=operator, timeout=120)
    assert result.returncode == 0, str(result)
    final = result.final
    assert final is not None and final["status"] == "done", str(result)
    return final


@pytest.fixture(scope="module")
def lab(fleet_lab: Lab) -> Lab:
    return fleet_lab


# ---- 1. group, rekey, data across members -------------------------------------------------


def test_group_rekey_every_member_acks_one_authenticator_and_data_crosses(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    assert len(lab.devices) >= 4
    created = lab.op("group", "create", G, "--members", *lab.device_ids, timeout=120)
    assert created.returncode == 0, str(created)
    assert created.final is not None and created.final["status"] == "done"
    # create, then one commit adding every other founder (docs/operations.md, "Creating a large
    # group"); each joiner's first commit carries a new leaf key (the self-update it asks for,
    # or whatever else it is asked to commit first: docs/treekem.md "Joining"), so how many
    # epochs the group is at once settled depends on who was asked
    assert created.final["epoch"] >= 1
    assert created.final["acked"] == len(lab.device_ids)
    settled = lab.wait_settled(G, timeout=60)
    before = assert_agreed(lab)

    latencies = []
    for _ in range(3):
        started = time.monotonic()
        final = rekey(lab)
        latencies.append(time.monotonic() - started)
        assert final["acked"] == len(lab.device_ids) and final["pending"] == 0
    MEASURED["rekey_cli_seconds"] = [round(x, 3) for x in latencies]
    with capsys.disabled():
        print(f"\nlab start-up, {len(lab.devices)} devices (s): {lab.timings}")
        print(f"rekey, CLI start to every ack (s): {MEASURED['rekey_cli_seconds']}")
    after = assert_agreed(lab)
    assert after != before
    assert current_epoch(lab) == settled + 3

    # data encrypted with one member's key decrypts at every other member
    for source in lab.devices:
        cross_decrypt(lab, source, [d for d in lab.devices if d is not source])


def device_keys_table(lab: Lab) -> list[dict[str, str]]:
    """``keyfleet devices --keys`` as people read it: columns apart by two spaces or more."""
    listed = lab.keyfleet("devices", "--keys", "--config", str(lab.service_config))
    assert listed.returncode == 0, str(listed)
    header, *lines = listed.stdout.splitlines()
    names = re.split(r"\s{2,}", header)
    return [dict(zip(names, re.split(r"\s{2,}", line), strict=True)) for line in lines]


REPORTED_WITHIN = KEY_CHANGE_REPORT_DELAY + KEY_CHANGE_REPORT_SPREAD + 10


def test_devices_keys_shows_the_new_epoch_within_seconds_with_its_kind(lab: Lab) -> None:
    """The agents report their key states shortly after each epoch change (not only at connect
    and attestation, hourly): the listing follows a rekey within seconds, KIND filled. Each
    device reports within KEY_CHANGE_REPORT_DELAY + KEY_CHANGE_REPORT_SPREAD (its own offset,
    so that a fleet's reports do not all arrive in one second)."""
    audit_seq = lab.audit_head()
    epoch = int(rekey(lab)["epoch"])
    acked = time.monotonic()
    current = f"epoch/{G}/{epoch}"

    def rows_when_listed() -> list[dict[str, str]] | None:
        rows = device_keys_table(lab)
        active = {r["DEVICE_ID"] for r in rows if r["KEY"] == current and r["STATE"] == "active"}
        return rows if active == set(lab.device_ids) else None

    rows = None
    while rows is None:
        rows = rows_when_listed()
        assert rows is not None or time.monotonic() - acked < REPORTED_WITHIN, device_keys_table(
            lab
        )
        if rows is None:
            time.sleep(0.3)
    MEASURED["keys_listed_after_ack_seconds"] = round(time.monotonic() - acked, 2)
    by_device: dict[str, dict[str, dict[str, str]]] = {}
    for row in rows:
        by_device.setdefault(row["DEVICE_ID"], {})[row["KEY"]] = row
    for device_id, keys in by_device.items():
        assert keys[f"epoch/{G}/{epoch - 1}"]["STATE"] == "deactivated", device_id
        leaves = [k for name, k in keys.items() if name.startswith("leaf/")]
        assert any(k["STATE"] == "active" for k in leaves), device_id
        for name, key in keys.items():
            kind = name.split("/")[0] if name.startswith(("epoch/", "leaf/")) else None
            if kind is not None:
                assert key["KIND"] == kind, (device_id, key)
            assert key["KIND"] != "-", (device_id, key)
            assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", key["SINCE"]), key
    # what the listing shows came from the agents' keys.report, not from an attestation
    assert [e.action for e in lab.audit(audit_seq + 1) if e.action.startswith("attest")] == []


def leaf_keys(lab: Lab) -> dict[str, bytes]:
    """Each member's leaf public key in the service's public tree of ``G``."""

    with lab.session() as session:
        tree = load_public(session, G)[0].tree
    return {leaf.device_id.decode(): leaf.encryption_key for _, leaf in tree.members()}


def test_full_rekey_replaces_every_leaf_key_in_one_commit(lab: Lab) -> None:
    """``rekey --full`` on agents with their keys in swtpm: every member proposes a new TPM leaf
    key, one member commits them all (one epoch for four members), everyone agrees, and data
    still crosses."""
    epoch = current_epoch(lab)
    before = leaf_keys(lab)
    result = lab.op("rekey", "--group", G, "--full", operator="op-ops", timeout=180)
    assert result.returncode == 0, str(result)
    assert result.final is not None and result.final["status"] == "done", str(result)
    lab.wait_settled(G, timeout=60)
    assert_agreed(lab)
    after = leaf_keys(lab)
    assert sorted(after) == sorted(lab.device_ids)
    assert [d for d in after if after[d] == before[d]] == []
    assert current_epoch(lab) == epoch + 1
    cross_decrypt(lab, lab.devices[0], lab.devices[1:])


# ---- 2. two rekeys at once ---------------------------------------------------------------------


def test_two_rekeys_at_once_one_commit_per_epoch_no_fork(lab: Lab) -> None:
    epoch = current_epoch(lab)
    # Hold every agent (SIGSTOP) so that neither rekey can finish before the other arrives:
    # both requests are then in the service at the same time, whatever the CLI start-up costs.
    head = lab.audit_head()
    for device in lab.devices:
        lab.pause_agent(device)
    try:
        runs = [
            lab.keyfleet_start("rekey", "--group", G, "--json", operator="op-ops") for _ in "ab"
        ]
        deadline = time.monotonic() + 30
        while len([e for e in lab.audit(head + 1) if e.action == "op.rekey"]) < 2:
            assert time.monotonic() < deadline, "the service did not receive both rekeys"
            time.sleep(0.05)
    finally:
        for device in lab.devices:
            lab.resume_agent(device)
    results = [run.wait(180) for run in runs]
    finals = [r.final for r in results]
    assert all(f is not None for f in finals), [str(r) for r in results]
    statuses = sorted(f["status"] for f in finals if f is not None)
    # Each request is either done (the second one queued behind the first, one more epoch) or
    # refused clearly; never both applied to the same epoch.
    done = [f for f in finals if f is not None and f["status"] == "done"]
    refused = [f for f in finals if f is not None and f["status"] == "rejected"]
    assert len(done) + len(refused) == 2, statuses
    assert done, statuses
    for final in refused:
        assert "in progress" in final["detail"] or "queued" in final["detail"], final
    assert len({f["epoch"] for f in done}) == len(done)  # distinct epochs
    if len(done) == 2:  # the second was queued behind the first, and said so
        accepted = [r.results[0]["detail"] for r in results]
        assert any("queued behind 1" in detail for detail in accepted), accepted
    assert current_epoch(lab) == epoch + len(done)
    # one commit per epoch in the log, the whole history without a gap
    commits = lab.registry(lambda r: r.commits_from(G, epoch))
    assert [c.epoch for c in commits] == list(range(epoch, epoch + len(done)))
    assert_agreed(lab)
    cross_decrypt(lab, lab.devices[-1], lab.devices[:-1])


# ---- 3. refused operator commands --------------------------------------------------------------


class Capture:
    """Listens as the service's identity (another client id, no shared subscription) to every
    operator command on the broker: what a wire tap at the broker would see."""

    def __init__(self, lab: Lab) -> None:
        self.messages: list[ReceivedMessage] = []
        self._lock = threading.Lock()
        self.client = service_tap(lab, "lab-wiretap", on_message=self._on)
        self.client.subscribe("kf/v1/ops/+/cmd")

    def _on(self, message: ReceivedMessage) -> None:
        with self._lock:
            self.messages.append(message)

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def operator_client(lab: Lab) -> Iterator[MqttClient]:
    """A raw MQTT connection with op-ops's own certificate (the broker lets it publish only on
    its own command topic), subscribed to its results."""
    assert lab.pki is not None and lab.broker is not None
    identity = lab.pki.operators["op-ops"]
    client = MqttClient(
        host=lab.broker.host,
        port=lab.broker.port,
        ca_file=lab.pki.tls_ca,
        cert_file=identity.cert,
        key_file=identity.key,
        client_id="op-ops-raw",
        clean_start=True,
        session_expiry=0,
    )
    client.connect()
    client.subscribe(operator_result_topic("op-ops"))
    yield client
    client.close()


def wait_refusal(lab: Lab, seq: int, actor: str, check: str) -> list[str]:
    deadline = time.monotonic() + 15
    while True:
        found = refusals_since(lab, seq, actor)
        if any(f"[{check}]" in line for line in found):
            return found
        assert time.monotonic() < deadline, (check, found)
        time.sleep(0.1)


def test_forged_replayed_stale_and_wrong_role_commands_are_refused_audited_and_change_nothing(
    lab: Lab, operator_client: MqttClient
) -> None:
    epoch = current_epoch(lab)
    authenticator = assert_agreed(lab)
    assert lab.pki is not None
    op_key = pki.key_from_pem(lab.pki.operators["op-ops"].key.read_bytes())
    actor = "operator:op-ops"

    # a viewer may not rekey
    head = lab.audit_head()
    viewer = lab.op("rekey", "--group", G, operator="op-view", timeout=60)
    assert viewer.returncode == 1, str(viewer)
    assert viewer.final is not None and viewer.final["status"] == "rejected"
    assert "[op.role]" in viewer.final["detail"]
    assert any("[op.role]" in r for r in refusals_since(lab, head, "operator:op-view"))
    # an operator may not revoke (admin only)
    head = lab.audit_head()
    wrong = lab.op("revoke", lab.devices[0].id, operator="op-ops", timeout=60)
    assert wrong.returncode == 1 and wrong.final is not None, str(wrong)
    assert "[op.role]" in wrong.final["detail"]
    assert any("[op.role]" in r for r in refusals_since(lab, head, actor))

    # replayed: a real rekey captured on the wire, then sent again verbatim
    tap = Capture(lab)
    try:
        rekey(lab)
        deadline = time.monotonic() + 5
        while not [m for m in tap.messages if m.topic == operator_cmd_topic("op-ops")]:
            assert time.monotonic() < deadline, "the wiretap saw no command"
            time.sleep(0.05)
    finally:
        tap.close()
    captured = [m for m in tap.messages if m.topic == operator_cmd_topic("op-ops")][-1]
    epoch += 1
    authenticator = assert_agreed(lab)
    head = lab.audit_head()
    operator_client.publish(operator_cmd_topic("op-ops"), captured.payload)
    found = wait_refusal(lab, head, actor, "replay.duplicate")
    assert len(found) == 1, found

    # signed by a key the service does not know, claiming to be op-ops
    head = lab.audit_head()
    forger = ec.generate_private_key(ec.SECP256R1())
    forged = encode_message(
        Rekey(os.urandom(16), G),
        key=forger,
        sender="op-ops",
        to=SERVICE_ID,
        seq=int(time.time() * 1_000_000) + 10_000,
        time=int(time.time()),
    )
    operator_client.publish(operator_cmd_topic("op-ops"), forged)
    wait_refusal(lab, head, actor, "cose.kid-unknown")

    # genuinely signed, but ten minutes old
    head = lab.audit_head()
    stale = encode_message(
        Rekey(os.urandom(16), G),
        key=op_key,
        sender="op-ops",
        to=SERVICE_ID,
        seq=int(time.time() * 1_000_000) + 20_000,
        time=int(time.time()) - 600,
    )
    operator_client.publish(operator_cmd_topic("op-ops"), stale)
    wait_refusal(lab, head, actor, "envelope.stale")

    # a revoke signed by op-ops's real key, fresh: the role decides, not the signature
    head = lab.audit_head()
    operator_client.publish(
        operator_cmd_topic("op-ops"),
        encode_message(
            Revoke(os.urandom(16), lab.devices[1].id, "forged revoke"),
            key=op_key,
            sender="op-ops",
            to=SERVICE_ID,
            seq=int(time.time() * 1_000_000) + 30_000,
            time=int(time.time()),
        ),
    )
    wait_refusal(lab, head, actor, "op.role")

    time.sleep(1.5)  # anything wrongly accepted would have moved the group by now
    assert current_epoch(lab) == epoch
    assert assert_agreed(lab) == authenticator
    assert all(d["state"] != "revoked" for d in lab.fleet_devices())
    verify = lab.keyfleet("audit", "verify", "--config", str(lab.service_config))
    assert verify.returncode == 0, str(verify)


# ---- 4. no agent secret at the service ---------------------------------------------------------


def test_service_database_and_logs_hold_none_of_the_agents_secrets(lab: Lab) -> None:
    epoch = current_epoch(lab)
    blob = cross_decrypt(lab, lab.devices[0], lab.devices[1:])
    secrets: list[Secret] = []
    for device in lab.devices:
        lab.stop_agent(device)
        found = lab.agent_secrets(device)
        state = lab.agent_state(device)
        data_keys = state["data_keys"][G]
        assert epoch in data_keys
        # the secrets are the real ones: this epoch's data key opens data sealed on d0
        key = Secret(data_keys[epoch])
        assert len(open_sealed(blob, lambda _g, _e, k=key: k, expected_group=G)) == 48
        secrets.extend(found)
        lab.reboot(device)
    assert len(secrets) >= 4 * 5, len(secrets)

    if lab.database_url.startswith("sqlite"):
        service_dir = lab.database.parent
        stored = {p.name: p.read_bytes() for p in service_dir.iterdir()}
        stored = {n: data for n, data in stored.items() if n.startswith(lab.database.name)}
        assert stored
    else:  # every value of every table the service wrote
        stored = {"postgresql rows": dump_rows(lab.database_url)}
        assert b"accepted" in stored["postgresql rows"]
    assert lab.broker is not None
    haystacks = {
        **stored,
        "service.log": lab.service_log.read_bytes(),
        "mosquitto.log": lab.broker.log_path.read_bytes(),
        "keyfleet-cli.log": lab.cli_log.read_bytes(),
    }
    assert b"accepted the commit" in haystacks["service.log"]
    for secret in secrets:
        raw = secret.reveal()
        for name, data in haystacks.items():
            assert raw not in data, f"an agent secret is in {name}"
            assert raw.hex().encode() not in data, f"an agent secret (hex) is in {name}"
            assert raw.hex().upper().encode() not in data, f"an agent secret (HEX) is in {name}"
    # the rebooted agents are back in the same epoch and still agree
    assert current_epoch(lab) == epoch
    assert_agreed(lab)


# ---- 5. SIGKILL while applying a commit --------------------------------------------------------


@pytest.mark.parametrize("point", ["before-persist", "after-persist", "after-publish"])
def test_agent_killed_at_a_fault_point_of_a_commit_comes_back_consistent(
    lab: Lab, point: str
) -> None:
    victim = lab.devices[2]
    lab.reboot(victim, env={"KEYAGENT_TEST_KILL_AT": f"{point}:group.commit:1"})
    epoch = current_epoch(lab)
    agent_pid = victim.agent_pid
    assert agent_pid is not None
    run = lab.keyfleet_start("rekey", "--group", G, "--json", operator="op-ops")
    deadline = time.monotonic() + 30
    while victim.agent_running:  # it kills itself when the relayed commit reaches the point
        assert time.monotonic() < deadline, "the fault point was never reached"
        time.sleep(0.02)
    assert f"fault injection: SIGKILL at {point} of group.commit" in victim.agent_log.read_text()
    lab.reboot(victim)  # a power cycle (swtpm restarted: nothing of the dead agent stays loaded)
    result = run.wait(120)
    assert result.returncode == 0, str(result)
    assert result.final is not None and result.final["epoch"] == epoch + 1
    assert_agreed(lab)
    cross_decrypt(lab, victim, [d for d in lab.devices if d is not victim])


@pytest.mark.parametrize("seed", [4, 7])
def test_agent_killed_at_random_moments_during_rekeys_comes_back_consistent(
    lab: Lab, seed: int
) -> None:
    rng = random.Random(seed)
    victim = lab.devices[rng.randrange(len(lab.devices))]
    for _round in range(2):
        run = lab.keyfleet_start("rekey", "--group", G, "--json", operator="op-ops")
        time.sleep(rng.uniform(0.3, 0.9))  # CLI start-up is ~0.3 s; the rekey takes ~0.1-0.5 s
        lab.stop_agent(victim, kill=True)
        lab.reboot(victim)
        result = run.wait(120)
        # done, or at worst a clean timeout if the victim was the committer and died before
        # committing; never a fork
        assert result.returncode in (0, 3), str(result)
        status = lab.ack_status(G)
        deadline = time.monotonic() + 30
        while not status.agreed:
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
            status = lab.ack_status(G)
    rekey(lab)
    assert_agreed(lab)
    cross_decrypt(lab, victim, [d for d in lab.devices if d is not victim])


# ---- 6. revocation -----------------------------------------------------------------------------


def test_revoked_device_cannot_read_the_next_epoch_and_is_refused_and_audited(lab: Lab) -> None:
    revoked, staying = lab.devices[-1], lab.devices[:-1]
    epoch = current_epoch(lab)
    head = lab.audit_head()
    result = lab.op("revoke", revoked.id, "--reason", "lab: stolen", operator="op-admin")
    assert result.returncode == 0, str(result)
    assert result.final is not None and result.final["status"] == "done"
    assert current_epoch(lab) == epoch + 1
    assert_agreed(lab, staying)
    assert [d["state"] for d in lab.fleet_devices() if d["device_id"] == revoked.id] == ["revoked"]

    # data of the new epoch: every remaining member reads it, the revoked device does not
    blob = cross_decrypt(lab, staying[0], staying[1:])
    with revoked.api() as api, pytest.raises(ProtocolError) as refused:
        api.decrypt(G, blob)
    assert refused.value.check.startswith("data."), refused.value.check

    # its later messages are refused and audited: a reboot makes it report to the service
    lab.reboot(revoked)
    actor = f"device:{revoked.id}"
    found = wait_refusal(lab, head, actor, "ds.device.revoked")
    assert found
    # it changed nothing: same epoch, the others still agree
    time.sleep(1.0)
    assert current_epoch(lab) == epoch + 1
    assert_agreed(lab, staying)
    assert any(
        revoked.id in line and "ds.device.revoked" in line
        for line in lab.service_log.read_text().splitlines()
    ), "the service log does not name the refused revoked device"
    accepted = [
        e
        for e in lab.audit(head + 1)
        if e.actor == "operator:op-admin"
        and e.outcome.value == "accepted"
        and e.target == revoked.id
    ]
    assert accepted, "the revocation itself is not in the audit log"
