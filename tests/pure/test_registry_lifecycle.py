"""Registry side of the key lifecycle (issue 6): key kinds recorded from reports, a device's keys
destroyed together, any identity destroyable, and re-enrollment of a destroyed or revoked
identity under the same device id (SQLite file, in-process: tier pure)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from agent.protocol.errors import ProtocolError
from provisioning.db.schema import Device
from provisioning.registry import (
    DeviceState,
    KeyState,
    KeyStateReport,
    Registry,
    key_state_digest,
)
from tests.pure.test_registry import T0, enroll, fp

pytestmark = pytest.mark.pure

HISTORY = [
    KeyStateReport("devid", KeyState.PRE_ACTIVATION, T0, "devid"),
    KeyStateReport("devid", KeyState.ACTIVE, T0, "devid"),
    KeyStateReport("epoch/g1/0", KeyState.PRE_ACTIVATION, T0 + 1, "epoch"),
    KeyStateReport("epoch/g1/0", KeyState.ACTIVE, T0 + 1, "epoch"),
    KeyStateReport("epoch/g1/0", KeyState.DEACTIVATED, T0 + 5, "epoch"),
    KeyStateReport("epoch/g1/1", KeyState.PRE_ACTIVATION, T0 + 5, "epoch"),
    KeyStateReport("epoch/g1/1", KeyState.ACTIVE, T0 + 5, "epoch"),
]


@pytest.mark.parametrize(
    "state", [DeviceState.REGISTERED, DeviceState.ACTIVE, DeviceState.QUARANTINED]
)
def test_any_live_identity_may_be_destroyed_and_destroyed_is_final(
    sessions: sessionmaker[Session], state: DeviceState
) -> None:
    with sessions.begin() as s:
        reg = Registry(s)
        enroll(reg, "d")
        if state is not DeviceState.REGISTERED:
            reg.set_device_state("d", state, reason="x", now=T0 + 1)
        rec = reg.set_device_state("d", DeviceState.DESTROYED, reason="factory reset", now=T0 + 2)
        assert rec.state is DeviceState.DESTROYED
        for back in (DeviceState.ACTIVE, DeviceState.REVOKED, DeviceState.REGISTERED):
            with pytest.raises(ProtocolError) as err:
                reg.set_device_state("d", back, reason="", now=T0 + 3)
            assert err.value.check == "registry.device.transition"


def test_compromise_keys_marks_every_key_but_the_destroyed_ones_once(
    sessions: sessionmaker[Session],
) -> None:
    """A revoked device's keys: each live or deactivated key compromised (its transition
    recorded at the later of now and its last change), a destroyed key left destroyed, and a
    second call changes nothing."""
    with sessions.begin() as s:
        reg = Registry(s)
        enroll(reg, "d")
        reg.record_report(
            "d",
            b"r",
            [*HISTORY, KeyStateReport("epoch/g1/0", KeyState.DESTROYED, T0 + 20, "epoch")],
            now=T0 + 20,
        )
        # now = T0 + 3: epoch/g1/1 changed last at T0 + 5, so its transition is at T0 + 5
        assert reg.compromise_keys("d", now=T0 + 3) == ["devid", "epoch/g1/1"]
        states = {k.key_name: (k.state, k.changed_at) for k in reg.key_states("d")}
        assert states == {
            "devid": (KeyState.COMPROMISED, T0 + 3),
            "epoch/g1/0": (KeyState.DESTROYED, T0 + 20),
            "epoch/g1/1": (KeyState.COMPROMISED, T0 + 5),
        }
        steps = reg.key_history("d", "epoch/g1/1")
        assert [(t.from_state, t.to_state, t.at, t.recorded_at) for t in steps][-1] == (
            KeyState.ACTIVE,
            KeyState.COMPROMISED,
            T0 + 5,
            T0 + 3,
        )
        assert reg.compromise_keys("d", now=T0 + 11) == []


def test_kinds_are_kept_and_destroy_keys_destroys_every_live_key(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as s:
        reg = Registry(s)
        enroll(reg, "d")
        reg.record_report("d", b"r", HISTORY, now=T0 + 6)
        kinds = {k.key_name: k.kind for k in reg.key_states("d")}
        assert kinds == {"devid": "devid", "epoch/g1/0": "epoch", "epoch/g1/1": "epoch"}
        # an old report without kinds does not erase them
        reg.record_report("d", b"r", [KeyStateReport("devid", KeyState.ACTIVE, T0)], now=T0 + 7)
        assert {k.kind for k in reg.key_states("d")} == {"devid", "epoch"}
        changed = reg.destroy_keys("d", now=T0 + 10)
        assert changed == ["devid", "epoch/g1/0", "epoch/g1/1"]
        assert {k.state for k in reg.key_states("d")} == {KeyState.DESTROYED}
        steps = reg.key_history("d", "epoch/g1/0")
        assert [(t.from_state, t.to_state, t.at) for t in steps][-1] == (
            KeyState.DEACTIVATED,
            KeyState.DESTROYED,
            T0 + 10,
        )
        assert reg.destroy_keys("d", now=T0 + 11) == []  # idempotent
        # a destroyed key never comes back, whatever a report says
        with pytest.raises(ProtocolError) as err:
            reg.record_report(
                "d", b"r", [KeyStateReport("devid", KeyState.ACTIVE, T0 + 12)], now=T0 + 12
            )
        assert err.value.check == "registry.key.transition"


def test_reenrollment_only_of_a_destroyed_or_revoked_identity_out_of_its_groups(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as s:
        reg = Registry(s)
        enroll(reg, "d")
        enroll(reg, "e")
        reg.record_report("d", b"r", HISTORY, now=T0 + 6)
        reg.create_group("g1", creator="d", public_tree=b"t", group_context=b"c", now=T0)
        with pytest.raises(ProtocolError) as live:
            reg.reenroll_device("d", ek_cert_fingerprint=fp("ek-d"), devid_cert_pem="P2", now=T0)
        assert live.value.check == "registry.device.transition"
        reg.set_device_state("d", DeviceState.DESTROYED, reason="reset", now=T0 + 7)
        with pytest.raises(ProtocolError) as held:
            reg.reenroll_device("d", ek_cert_fingerprint=fp("ek-d"), devid_cert_pem="P2", now=T0)
        assert held.value.check == "registry.device.in_groups"
        assert "g1" in held.value.reason
        with pytest.raises(ProtocolError) as other_ek:
            reg.reenroll_device("d", ek_cert_fingerprint=fp("ek-e"), devid_cert_pem="P2", now=T0)
        assert other_ek.value.check == "registry.device.ek_mismatch"
    with sessions.begin() as s:
        # the removal committed (simulated here by the membership row going away)
        from provisioning.db.schema import GroupMember

        s.delete(s.get(GroupMember, ("g1", "d")))
    with sessions.begin() as s:
        reg = Registry(s)
        rec = reg.reenroll_device(
            "d", ek_cert_fingerprint=fp("ek-d"), devid_cert_pem="PEM new", now=T0 + 20
        )
        assert (rec.state, rec.devid_cert_pem, rec.state_reason) == (
            DeviceState.REGISTERED,
            "PEM new",
            "re-enrolled",
        )
        assert reg.key_states("d") == []  # the new identity starts with no key history
        # the new identity's fresh keys are accepted (the old "devid" record was destroyed)
        reg.record_report("d", b"r", HISTORY[:2], now=T0 + 21)
        assert [(k.key_name, k.state) for k in reg.key_states("d")] == [("devid", KeyState.ACTIVE)]
        reg.set_device_state("e", DeviceState.REVOKED, reason="lost", now=T0 + 22)
        assert (
            reg.reenroll_device(
                "e", ek_cert_fingerprint=fp("ek-e"), devid_cert_pem="P", now=T0 + 23
            ).state
            is DeviceState.REGISTERED
        )


def test_a_kind_is_learned_from_a_later_report_of_known_transitions(
    sessions: sessionmaker[Session],
) -> None:
    """An attestation's key list carries no kinds; the device's next keys.report, whose
    transitions the registry already has, still fills the KIND of ``keyfleet devices --keys``."""
    without_kinds = [replace(item, kind=None) for item in HISTORY]
    with sessions.begin() as s:
        reg = Registry(s)
        enroll(reg, "d")
        reg.record_report("d", b"attest", without_kinds, now=T0 + 6)
        assert {k.key_name: k.kind for k in reg.key_states("d")} == {
            "devid": None,
            "epoch/g1/0": None,
            "epoch/g1/1": None,
        }
        reg.record_report("d", b"keys", HISTORY, now=T0 + 7)
        assert {k.key_name: k.kind for k in reg.key_states("d")} == {
            "devid": "devid",
            "epoch/g1/0": "epoch",
            "epoch/g1/1": "epoch",
        }
        assert len(reg.key_history("d", "epoch/g1/0")) == 3  # no transition recorded twice
        reg.record_report("d", b"attest", without_kinds, now=T0 + 8)  # no kind: kept
        assert reg.key_states("d")[1].kind == "epoch"


def test_keyfleet_devices_keys_lists_kind_state_since_and_transitions(
    sessions: sessionmaker[Session], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json
    import re

    from provisioning.cli import main

    with sessions.begin() as s:
        reg = Registry(s)
        enroll(reg, "d")
        reg.record_report("d", b"r", HISTORY, now=T0 + 6)
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    assert main(["devices", "--keys", "--db", url, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_key = {row["key"]: row for row in rows}
    assert by_key["epoch/g1/0"] == {
        "device_id": "d",
        "device_state": "registered",
        "key": "epoch/g1/0",
        "kind": "epoch",
        "state": "deactivated",
        "since": T0 + 5,
        "transitions": [["pre-activation", T0 + 1], ["active", T0 + 1], ["deactivated", T0 + 5]],
    }
    assert main(["devices", "--keys", "--db", url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["DEVICE_ID", "KEY", "KIND", "STATE", "SINCE", "TRANSITIONS"]
    # times for people in ISO-8601 UTC (T0 = 2023-11-14 22:13:20Z), raw seconds in --json
    assert re.split(r"\s{2,}", lines[2]) == [
        "d",
        "epoch/g1/0",
        "epoch",
        "deactivated",
        "2023-11-14 22:13:25Z",
        "pre-activation@2023-11-14T22:13:21Z active@2023-11-14T22:13:21Z "
        "deactivated@2023-11-14T22:13:25Z",
    ]


def test_every_write_of_key_rows_forgets_the_reported_key_digest(
    sessions: sessionmaker[Session],
) -> None:
    """``Device.reported_keys`` lets a steady report be judged without the key rows: a report
    recorded through the registry, keys compromised or destroyed, and a re-enrolment (its key
    rows cleared) each set it to NULL, so that no report is judged by a stale digest."""
    digest = key_state_digest(list(HISTORY))

    def stored(s: Session) -> bytes | None:
        return s.scalar(select(Device.reported_keys).where(Device.device_id == "d"))

    def set_digest(s: Session) -> None:
        s.flush()
        s.execute(update(Device).where(Device.device_id == "d").values(reported_keys=digest))
        s.expire_all()

    with sessions.begin() as s:
        reg = Registry(s)
        enroll(reg, "d")
        set_digest(s)
        reg.record_report("d", b"r", HISTORY, now=T0 + 6)
        assert stored(s) is None
        set_digest(s)
        assert stored(s) == digest
        assert reg.compromise_keys("d", now=T0 + 7)
        assert stored(s) is None
        set_digest(s)
        reg.destroy_keys("d", now=T0 + 8)
        assert stored(s) is None
        reg.set_device_state("d", DeviceState.DESTROYED, reason="reset", now=T0 + 9)
        set_digest(s)
        reg.reenroll_device("d", ek_cert_fingerprint=fp("ek-d"), devid_cert_pem="P2", now=T0 + 10)
        assert stored(s) is None
        assert reg.key_states("d") == []
