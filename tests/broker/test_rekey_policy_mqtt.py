"""Every member's key moves, over a real Mosquitto with ``keyfleet serve`` as a subprocess and
software MLS members on their own DevID client certificates (tests/broker/test_service_mqtt.py's
deployment, SQLite): a passive member's leaf key is replaced within the group's rekey policy,
asked for by the service, and ``keyfleet rekey --full`` replaces every member's leaf key.

Adversary: root on a device later, with the TPM and the commit log. What was sealed to a leaf
key can be reopened while the key lives; the tests assert the key is replaced, not kept."""

from __future__ import annotations

import time

import pytest

from tests.broker.test_service_mqtt import DEVICES, Deployment, deployment  # noqa: F401

pytestmark = pytest.mark.broker


def leaf_key(d: Deployment, name: str, of: str | None = None) -> bytes:
    """The leaf encryption key of ``of`` (default: ``name`` itself) in ``name``'s tree."""
    group = d.members[name].device.groups["g1"]
    tree = group.public_group().tree
    target = (of or name).encode()
    for index in range(tree.n_leaves):
        leaf = tree.leaf(index)
        if leaf is not None and leaf.device_id == target:
            return leaf.encryption_key
    raise AssertionError(f"{of or name} has no leaf in {name}'s tree")


def wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout:g}s: {what}")


def test_a_passive_member_is_rekeyed_within_the_policy_and_full_rekey_moves_every_leaf(
    deployment: Deployment,  # noqa: F811 - the fixture imported above
) -> None:
    created = deployment.cli("group", "create", "g1", "--members", *DEVICES)
    assert created.returncode == 0, created.stdout + created.stderr
    policy = deployment.cli("group", "policy", "g1", "--max-age", "off", "--max-epochs", "2")
    assert policy.returncode == 0, policy.stdout + policy.stderr
    assert "max age off, max epochs 2" in policy.stdout

    passive = deployment.members["dev-c"].device
    before = leaf_key(deployment, "dev-a", "dev-c")
    # it commits none of the two rekeys (the service asks it first, then another member
    # commits), and answers every request from then on, as every agent does: the policy tick may
    # ask it the moment the second rekey is done, so no step of this test may stand between
    start = deployment.members["dev-a"].device.groups["g1"].epoch
    passive.commits_from_epoch = start + 2
    for _ in range(2):
        rekeyed = deployment.cli("rekey", "--group", "g1")
        assert rekeyed.returncode == 0, rekeyed.stdout + rekeyed.stderr
    # its leaf is due after 2 epochs: the service's policy tick (every 10 s) asks it; its only
    # commit is the one the policy asks for (the rekeys' epochs are below commits_from_epoch)
    wait_for(
        lambda: leaf_key(deployment, "dev-a", "dev-c") != before,
        40,
        "the service asked the passive member for a self-update",
    )
    wait_for(
        lambda: leaf_key(deployment, "dev-c") == leaf_key(deployment, "dev-a", "dev-c"),
        10,
        "the passive member holds its own new leaf",
    )

    keys = {name: leaf_key(deployment, "dev-a", name) for name in DEVICES}
    full = deployment.cli("rekey", "--group", "g1", "--full", "--json", timeout=120)
    assert full.returncode == 0, full.stdout + full.stderr
    wait_for(
        lambda: all(leaf_key(deployment, "dev-a", n) != keys[n] for n in DEVICES),
        10,
        "every leaf key changed",
    )
    epochs = {m.device.groups["g1"].epoch for m in deployment.members.values()}
    auths = {m.device.groups["g1"].epoch_authenticator for m in deployment.members.values()}
    assert len(epochs) == 1 and len(auths) == 1
