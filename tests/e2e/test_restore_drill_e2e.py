"""The restore drill to its end, on real devices: a lab whose service keys (device CA, service
signing, release signing) live in a SoftHSM2 token made with backup enabled, two swtpm devices
enrolled and in a group; ``keyfleet backup create --shares 5 --threshold 3``; the service stopped
and its token wiped; ``keyfleet backup restore`` with three of the shares into the fresh token;
``keyfleet serve`` started again on the same configuration; and the devices enrolled before the
loss follow a rekey: each agent verified the service's commit requests, signed in the restored
token, under the signing certificate it was given at enrollment. Nothing about the fleet changed:
not a certificate, not a device's configuration. (tests/tpm/test_backup_drill.py covers the
refusals: too few shares, a corrupted share, a restore over keys already there.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from firmware_sim.lab import Lab
from provisioning import custody
from tests.tpm.test_backup_drill import token_only, wipe

pytestmark = pytest.mark.e2e

LAB_OPTIONS = {"devices": 2, "token": True, "token_backup": True}
G = "g-restore"
TOKEN_KEYS = {"device-ca", "service-signing", "release-signing"}


def signing_kids(log: Path) -> list[str]:
    marker = "service signing kid "
    return [
        line.split(marker, 1)[1].split()[0]
        for line in log.read_text().splitlines()
        if marker in line
    ]


def test_the_fleet_runs_on_after_its_token_is_restored_from_three_shares(
    fleet_lab: Lab, tmp_path: Path
) -> None:
    lab = fleet_lab
    assert lab.pki is not None and lab.pki.token is not None
    token = lab.pki.token
    created = lab.op("group", "create", G, "--members", *lab.device_ids, timeout=240)
    assert created.returncode == 0, str(created)
    before = lab.wait_settled(G, timeout=180)

    out = tmp_path / "backup"
    out.mkdir()
    config = str(lab.service_config)
    made = lab.keyfleet(
        "backup", "create", "--token", token_only(token), "--shares", "5", "--threshold", "3",
        "--out", str(out), "--config", config,
    )  # fmt: skip
    assert made.returncode == 0, str(made)
    (backup_file,) = out.glob("keyfleet-backup-*.json")
    shares = sorted(out.glob("keyfleet-share-*.json"))
    assert len(shares) == 5

    # the token is lost while the service is down
    lab.stop_service()
    fresh = wipe(token)
    assert custody.token_key_labels(custody.parse_token_uri(fresh.uri("-"))) == []
    restored = lab.keyfleet(
        "backup", "restore", str(backup_file), "--token", token_only(fresh),
        "--share", str(shares[4]), "--share", str(shares[1]), "--share", str(shares[2]),
        "--config", config,
    )  # fmt: skip
    assert restored.returncode == 0, str(restored)
    assert set(custody.token_key_labels(custody.parse_token_uri(fresh.uri("-")))) == TOKEN_KEYS

    # the same configuration and pkcs11: URIs: the service signs with the restored key
    lab.start_service()
    kids = signing_kids(lab.service_log)
    assert len(kids) == 2 and kids[0] == kids[1], kids
    rekeyed = lab.op("rekey", "--group", G, timeout=120)
    assert rekeyed.returncode == 0, str(rekeyed)
    after = lab.ack_status(G).epoch
    assert after > before
    lab.wait_epoch(G, after, timeout=60)
