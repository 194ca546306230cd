"""A firmware update that keeps trust, end to end (docs/releases.md): Mosquitto, ``keyfleet serve``
with its signing, device CA and release-signing keys in a SoftHSM2 token, three ``firmware-sim
device`` processes (swtpm, measured boot) enrolled with the release key, and the operator CLI.

1. Enrolled devices receive the retained release bundle (the imported release 1.0) and seal their
   state key for it (PolicyAuthorize under the release key).
2. An admin adds release 1.1 (its manifest from ``firmware-sim release manifest``) and approves
   it; every device receives the new bundle.
3. One device installs 1.1 and reboots into it: its state opens (same group epoch, no re-add),
   app data encrypted before the update decrypts after it, it attests trusted, it acks the next
   rekey.
4. Another device boots an image nobody approved (a kernel with one byte flipped): its state is
   held (``release.unapproved``, nothing moved), attestation names the kernel. Rebooted into the
   approved release, it opens the same state again and acks the next rekey.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from firmware_sim.lab import Lab, LabDevice
from firmware_sim.release import demo_manifest, write_manifest

pytestmark = pytest.mark.e2e

LAB_OPTIONS = {"devices": 3, "releases": True, "token": True}
G = "g-update"
T = TypeVar("T")


def eventually(probe: Callable[[], T | None], what: str, timeout: float = 60.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found is not None:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s")


def release_status(device: LabDevice) -> dict[str, Any]:
    status = device.status() or {}
    entry = status.get("release")
    assert isinstance(entry, dict), f"{device.name}: no release entry in {status}"
    return entry


def sealed_for(device: LabDevice, seq: int) -> dict[str, Any] | None:
    """The device's release entry once it holds bundle ``seq`` and sealed its key for it."""
    entry = release_status(device)
    if (entry.get("bundle_seq") or 0) < seq:
        return None
    if entry.get("sealed_generation") != entry.get("generation"):
        return None
    return entry


@pytest.fixture(scope="module")
def lab(fleet_lab: Lab) -> Lab:
    created = fleet_lab.op("group", "create", G, "--members", *fleet_lab.device_ids, timeout=240)
    assert created.returncode == 0, str(created)
    fleet_lab.wait_settled(G, timeout=180)
    return fleet_lab


def rekey_acked_by_all(lab: Lab) -> int:
    result = lab.op("rekey", "--group", G, timeout=120)
    assert result.returncode == 0, str(result)
    epoch = lab.ack_status(G).epoch
    lab.wait_epoch(G, epoch, timeout=60)
    return epoch


def test_an_approved_update_keeps_the_group_and_an_unapproved_image_is_held(lab: Lab) -> None:
    first = eventually(
        lambda: (
            [sealed_for(d, 1) for d in lab.devices]
            if all(sealed_for(d, 1) for d in lab.devices)
            else None
        ),
        "every device sealed its state for the first release bundle",
    )
    assert {e["version"] for e in first} == {"1.0"}
    assert all(e["held"] is None for e in first)

    with lab.devices[0].api() as api:
        before_update = api.encrypt(G, b"encrypted on release 1.0")

    manifest = lab.workdir / "release-1.1.json"
    write_manifest(manifest, demo_manifest("1.1"))
    added = lab.keyfleet("release", "add", str(manifest), operator="op-admin")
    assert added.returncode == 0, str(added)
    approved = lab.keyfleet("release", "approve", "1.1", operator="op-admin")
    assert approved.returncode == 0, str(approved)
    seq = first[0]["bundle_seq"] + 1
    eventually(
        lambda: all(sealed_for(d, seq) for d in lab.devices) or None,
        "every device holds the bundle approving 1.1",
    )

    # an approved update: the state opens on 1.1, nothing to re-add
    updated = lab.devices[1]
    epoch = updated.epoch(G)
    lab.install(updated, "1.1")
    entry = release_status(updated)
    assert (entry["version"], entry["held"]) == ("1.1", None), entry
    assert updated.epoch(G) == epoch
    with updated.api() as api:
        assert api.decrypt(G, before_update) == b"encrypted on release 1.0"
    attested = lab.op("attest", updated.id, timeout=120)
    assert attested.returncode == 0, str(attested)
    assert "trusted" in str(attested.final), str(attested)
    epoch = rekey_acked_by_all(lab)
    assert updated.epoch(G) == epoch

    # an image nobody approved: the state is held, attestation names the component
    victim = lab.devices[2]
    lab.reboot(victim, tamper=["kernel"])
    held = eventually(lambda: release_status(victim)["held"], "the tampered device is held")
    assert "4" in str(held), held  # the kernel's PCR is named
    assert victim.epoch(G) is None  # no group state while held
    refused = lab.op("attest", victim.id, timeout=120)
    assert refused.returncode != 0
    assert "kernel" in str(refused.results), str(refused)

    # back on the approved release: the same state, and it follows the group again
    lab.reboot(victim)
    entry = release_status(victim)
    assert (entry["version"], entry["held"]) == ("1.0", None), entry
    assert victim.epoch(G) == epoch
    assert rekey_acked_by_all(lab) == epoch + 1
