"""Key-state reports received together are taken in one transaction (``reports.on_reports``),
and each is still judged alone: a replayed report, a quarantined sender's report and a report
whose key history the registry refuses are refused by their own check, leave no trace, and the
others of the batch are taken. The stored DevID certificate is checked at use even when its
result is remembered (``credentials.StoredDevices``), and a remembered key never speaks for a
revoked device or for a certificate the device's row no longer holds."""

from __future__ import annotations

from pathlib import Path

import cbor2
import pytest
from sqlalchemy import select, update

from agent.protocol.lifecycle import KeyKind, KeyRecord, KeyState
from agent.protocol.wire import cbor, cose
from agent.protocol.wire.messages.key_state import KeyStateReport
from agent.protocol.wire.replay import PACKED_VERSION, ReplayGuard
from provisioning.db.runtime import ReplayState, RevocationFeedSeen
from provisioning.db.schema import Device
from provisioning.registry import DeviceState, Registry, key_state_digest, key_state_items
from provisioning.service import store
from provisioning.service.credentials import StoredDevices
from tests.pure.test_service_core import T0, Fleet, make_fleet
from tests.service_members import SoftDevice, utc

pytestmark = pytest.mark.pure

NAMES = ("dev-1", "dev-2", "dev-3", "dev-4")


def report(*, at: int = T0, state: KeyState = KeyState.ACTIVE) -> KeyStateReport:
    history = ((KeyState.PRE_ACTIVATION, T0), (state, at))
    return KeyStateReport((KeyRecord("devid", KeyKind.DEVID, history),), feed=0)


def seqs(fleet: Fleet) -> dict[str, int | None]:
    with fleet.sessions() as s:
        return {n: store.load_guard(s, n).highest_seq(n) for n in NAMES}


def keys(fleet: Fleet) -> dict[str, list[tuple[str, KeyState]]]:
    with fleet.sessions() as s:
        registry = Registry(s)
        return {n: [(k.key_name, k.state) for k in registry.key_states(n)] for n in NAMES}


def test_a_batch_of_reports_is_taken_and_a_replay_in_it_is_refused_alone(tmp_path: Path) -> None:
    for fleet in make_fleet(tmp_path, NAMES):
        batch = [fleet.devices[n].report(report(), fleet.now) for n in NAMES]
        fleet.service.handle_many([*batch, batch[1]], fleet.now)
        assert fleet.service.rejections.count("replay.duplicate") == 1
        assert fleet.service.metrics.reports.value("keys.report") == len(NAMES)
        assert all(k == [("devid", KeyState.ACTIVE)] for k in keys(fleet).values())
        assert seqs(fleet) == {n: fleet.devices[n].seq for n in NAMES}
        with fleet.sessions() as s:
            assert {n: Registry(s).device(n).last_seen for n in NAMES} == dict.fromkeys(
                NAMES, fleet.now
            )


def test_a_quarantined_senders_report_in_a_batch_is_refused_and_changes_nothing(
    tmp_path: Path,
) -> None:
    for fleet in make_fleet(tmp_path, NAMES):
        with fleet.sessions.begin() as s:
            Registry(s).set_device_state(
                "dev-2", DeviceState.QUARANTINED, reason="test", now=fleet.now
            )
        before = seqs(fleet)
        batch = [fleet.devices[n].report(report(), fleet.now) for n in NAMES]
        fleet.service.handle_many(batch, fleet.now)
        assert fleet.service.rejections.count("ds.device.quarantined") == 1
        assert keys(fleet)["dev-2"] == []
        assert seqs(fleet)["dev-2"] == before["dev-2"]
        assert all(keys(fleet)[n] == [("devid", KeyState.ACTIVE)] for n in NAMES if n != "dev-2")
        entry = fleet.audit_entries()[-1]
        assert entry.actor == "device:dev-2" and entry.outcome.value == "refused"


def test_a_refused_key_history_in_a_batch_leaves_no_partial_change(tmp_path: Path) -> None:
    """The registry refuses a history that goes back in time (after the batch's transaction
    wrote the others' changes: the batch is then taken report by report); that report changes
    nothing (its sender's window included) and the others of the batch are taken."""
    for fleet in make_fleet(tmp_path, NAMES):
        fleet.service.handle_many(
            [fleet.devices[n].report(report(at=T0 + 5), fleet.now) for n in NAMES], fleet.now
        )
        fleet.now += 10
        before = seqs(fleet)
        with fleet.sessions() as s:
            row = s.get(Device, "dev-3")
            assert row is not None
            last_report = row.last_report
        bad = report(at=T0 + 1)  # active since before the stored change: back in time
        batch = [
            fleet.devices[n].report(bad if n == "dev-3" else report(at=T0 + 5), fleet.now)
            for n in NAMES
        ]
        fleet.service.handle_many(batch, fleet.now)
        assert fleet.service.rejections.count("registry.key.transition") == 1
        after = seqs(fleet)
        assert after["dev-3"] == before["dev-3"]
        assert all(after[n] == fleet.devices[n].seq for n in NAMES if n != "dev-3")
        with fleet.sessions() as s:
            row = s.get(Device, "dev-3")
            assert row is not None and row.last_report == last_report
            assert Registry(s).device("dev-1").last_seen == fleet.now


def test_a_swapped_certificate_row_is_refused_though_the_good_one_is_remembered(
    tmp_path: Path,
) -> None:
    """The remembered result is keyed by a digest of the stored certificate: another device's
    certificate filed under dev-1 is validated at use and refused (``cred.stored``), also once
    the whole result was dropped from the small memo and only the compact one holds it."""
    for fleet in make_fleet(tmp_path, NAMES):
        fleet.service._env.devices = StoredDevices(
            fleet.service._env.devices.device_ca, memo_size=1, compact_size=8
        )
        fleet.service.handle_many(
            [fleet.devices[n].report(report(), fleet.now) for n in NAMES], fleet.now
        )
        validations = fleet.service._env.devices.validations
        assert validations == len(NAMES)
        fleet.now += 1
        fleet.service.handle_many(
            [fleet.devices[n].report(report(), fleet.now) for n in NAMES], fleet.now
        )
        # remembered (compact tier): no chain validated again
        assert fleet.service._env.devices.validations == validations
        with fleet.sessions.begin() as s:
            other = s.get(Device, "dev-2")
            assert other is not None
            s.execute(
                update(Device)
                .where(Device.device_id == "dev-1")
                .values(devid_cert_pem=other.devid_cert_pem)
            )
        before = seqs(fleet)["dev-1"]
        fleet.now += 1
        fleet.service.handle_many([fleet.devices["dev-1"].report(report(), fleet.now)], fleet.now)
        assert fleet.service.rejections.count("cred.stored") == 1
        assert seqs(fleet)["dev-1"] == before


def _device_row(fleet: Fleet, name: str) -> tuple[int | None, bytes | None]:
    with fleet.sessions() as s:
        row = s.get(Device, name)
        assert row is not None
        return row.last_seen, row.last_report


def test_a_remembered_key_is_not_used_for_a_revoked_device(tmp_path: Path) -> None:
    """The device's checked DevID key is remembered from its earlier reports, yet once the
    registry says revoked its next report (in a batch with others) is refused
    (``ds.device.revoked``) and changes nothing: its state comes from the batch's read of the
    device rows, never from the memo."""
    for fleet in make_fleet(tmp_path, NAMES):
        fleet.service.handle_many(
            [fleet.devices[n].report(report(), fleet.now) for n in NAMES], fleet.now
        )
        validations = fleet.service._env.devices.validations
        with fleet.sessions.begin() as s:
            Registry(s).set_device_state("dev-2", DeviceState.REVOKED, reason="test", now=fleet.now)
        before, row_before = seqs(fleet), _device_row(fleet, "dev-2")
        fleet.now += 5
        fleet.service.handle_many(
            [fleet.devices[n].report(report(), fleet.now) for n in NAMES], fleet.now
        )
        assert fleet.service.rejections.count("ds.device.revoked") == 1
        after = seqs(fleet)
        assert after["dev-2"] == before["dev-2"]
        assert _device_row(fleet, "dev-2") == row_before
        assert all(after[n] == fleet.devices[n].seq for n in NAMES if n != "dev-2")
        assert fleet.service._env.devices.validations == validations  # the others remembered


def test_a_remembered_key_is_not_used_once_the_device_has_a_new_certificate(
    tmp_path: Path,
) -> None:
    """A device enrolled again (a new DevID key and certificate under its row): a report signed
    with the old key, whose checked certificate the service remembers, is refused
    (``cose.kid-unknown``) and changes nothing; the new key's report is taken after its
    certificate is checked."""
    for fleet in make_fleet(tmp_path, NAMES):
        fleet.service.handle_many(
            [fleet.devices[n].report(report(), fleet.now) for n in NAMES], fleet.now
        )
        old = fleet.devices["dev-1"]
        assert fleet.device_ca is not None
        new = SoftDevice.create("dev-1", fleet.device_ca, old.service_key, utc(fleet.now))
        new.seq = old.seq
        with fleet.sessions.begin() as s:
            s.execute(
                update(Device)
                .where(Device.device_id == "dev-1")
                .values(devid_cert_pem=new.cert_pem)
            )
        before, row_before = seqs(fleet), _device_row(fleet, "dev-1")
        validations = fleet.service._env.devices.validations
        fleet.now += 5
        fleet.service.handle_many(
            [old.report(report(), fleet.now), *(fleet.devices[n].report(report(), fleet.now)
                                                for n in NAMES[1:])],
            fleet.now,
        )  # fmt: skip
        assert fleet.service.rejections.count("cose.kid-unknown") == 1
        assert seqs(fleet)["dev-1"] == before["dev-1"]
        assert _device_row(fleet, "dev-1") == row_before
        assert fleet.service._env.devices.validations == validations + 1  # the new certificate
        fleet.now += 1
        fleet.service.handle_many([new.report(report(), fleet.now)], fleet.now)
        assert seqs(fleet)["dev-1"] == new.seq
        assert fleet.service.rejections.count("cose.kid-unknown") == 1


def _stored(fleet: Fleet) -> dict[str, bytes]:
    with fleet.sessions() as s:
        rows = s.scalars(select(ReplayState).where(ReplayState.sender.in_(NAMES)))
        return {row.sender: row.state for row in rows}


def test_a_window_stored_in_the_cbor_form_is_read_and_rewritten_packed(tmp_path: Path) -> None:
    """A row written before the packed form (CBOR) is read, keeps its refusals (a replay of a
    message it remembers is still refused) and is written in the packed form by the next
    message taken."""
    for fleet in make_fleet(tmp_path, NAMES):
        first = [fleet.devices[n].report(report(), fleet.now) for n in NAMES]
        fleet.service.handle_many(first, fleet.now)
        with fleet.sessions.begin() as s:
            for row in s.scalars(select(ReplayState).where(ReplayState.sender.in_(NAMES))):
                row.state = cbor.encode(ReplayGuard.from_bytes(row.state).to_cbor_map())
        assert all(data[0] != PACKED_VERSION for data in _stored(fleet).values())
        fleet.service.handle_many([first[0], first[2]], fleet.now)
        assert fleet.service.rejections.count("replay.duplicate") == 2
        fleet.now += 1
        fleet.service.handle_many(
            [fleet.devices[n].report(report(), fleet.now) for n in NAMES], fleet.now
        )
        stored = _stored(fleet)
        assert all(data[0] == PACKED_VERSION for data in stored.values())
        assert seqs(fleet) == {n: fleet.devices[n].seq for n in NAMES}


def test_a_corrupt_stored_window_refuses_its_senders_report_alone(tmp_path: Path) -> None:
    """A stored window that does not decode (here a packed one cut short) is not taken as an
    empty window: its sender's report is not taken and its row and keys are left as they are,
    and the other reports of the batch are taken."""
    for fleet in make_fleet(tmp_path, NAMES):
        fleet.service.handle_many(
            [fleet.devices[n].report(report(at=T0 + 5), fleet.now) for n in NAMES], fleet.now
        )
        with fleet.sessions.begin() as s:
            row = s.get(ReplayState, "dev-2")
            assert row is not None
            row.state = row.state[:-1]
        before, keys_before = _stored(fleet), keys(fleet)
        fleet.now += 1
        fleet.service.handle_many(
            [fleet.devices[n].report(report(at=T0 + 5), fleet.now) for n in NAMES], fleet.now
        )
        after = _stored(fleet)
        assert after["dev-2"] == before["dev-2"] and keys(fleet)["dev-2"] == keys_before["dev-2"]
        assert all(after[n] != before[n] for n in NAMES if n != "dev-2")
        assert fleet.service.metrics.reports.value("keys.report") == 2 * len(NAMES) - 1


def test_a_non_canonical_envelope_in_a_batch_is_refused_by_its_check(tmp_path: Path) -> None:
    """The envelope is decoded once, and its canonical form is still enforced: a report whose
    signed payload is not the deterministic encoding (its map's keys in another order, signed
    by the device's own key) is refused (``cbor.noncanonical``) and changes nothing; the rest
    of the batch is taken."""
    for fleet in make_fleet(tmp_path, NAMES):
        before, keys_before = seqs(fleet), keys(fleet)
        batch = [fleet.devices[n].report(report(), fleet.now) for n in NAMES]
        topic, data = batch[1]
        payload = cose.decode_sign1(data).payload
        envelope = cbor.decode(payload)
        assert isinstance(envelope, dict)
        shuffled = cbor2.dumps(dict(reversed(list(envelope.items()))))
        assert shuffled != payload and cbor2.loads(shuffled) == envelope
        batch[1] = (topic, cose.sign1(shuffled, fleet.devices["dev-2"].devid))
        fleet.service.handle_many(batch, fleet.now)
        assert fleet.service.rejections.count("cbor.noncanonical") == 1
        assert seqs(fleet)["dev-2"] == before["dev-2"]
        assert keys(fleet)["dev-2"] == keys_before["dev-2"]
        assert fleet.service.metrics.reports.value("keys.report") == len(NAMES) - 1


DATABASE_BACKENDS = ("sqlite", "postgresql")


def test_steady_batches_on_each_backend(tmp_path: Path, database_url: str) -> None:
    """On SQLite and PostgreSQL (the replay rows read as columns under ``FOR UPDATE``, written
    in one statement): a first batch of reports, then a steady one holding a replay, then a key
    change; each is taken, the replay refused, every window stored packed at the last seq."""
    url = None if database_url.startswith("sqlite") else database_url
    for fleet in make_fleet(tmp_path, NAMES, url=url):
        fleet.service.handle_many(
            [fleet.devices[n].report(report(at=T0 + 5), fleet.now) for n in NAMES], fleet.now
        )
        fleet.now += 1
        steady = [fleet.devices[n].report(report(at=T0 + 5), fleet.now) for n in NAMES]
        fleet.service.handle_many([*steady, steady[2]], fleet.now)
        assert fleet.service.rejections.count("replay.duplicate") == 1
        with fleet.sessions() as s:
            assert all(Registry(s).device(n).last_seen == fleet.now for n in NAMES)
        fleet.now += 1
        history = ((KeyState.PRE_ACTIVATION, T0), (KeyState.ACTIVE, T0 + 5))
        history += ((KeyState.SUSPENDED, T0 + 7),)
        moved = KeyStateReport((KeyRecord("devid", KeyKind.DEVID, history),), feed=0)
        fleet.service.handle_many(
            [fleet.devices[n].report(moved, fleet.now) for n in NAMES], fleet.now
        )
        assert all(k == [("devid", KeyState.SUSPENDED)] for k in keys(fleet).values())
        assert seqs(fleet) == {n: fleet.devices[n].seq for n in NAMES}
        assert all(data[0] == PACKED_VERSION for data in _stored(fleet).values())
        assert fleet.service.metrics.reports.value("keys.report") == 3 * len(NAMES)


def test_a_moved_feed_seq_in_a_steady_batch_is_recorded(tmp_path: Path, database_url: str) -> None:
    """The feed rows of a steady batch are read as columns: a report naming the recorded seq
    changes nothing (not even its ``reported_at``), one naming another seq is written, on
    SQLite and PostgreSQL."""
    url = None if database_url.startswith("sqlite") else database_url
    for fleet in make_fleet(tmp_path, NAMES, url=url):
        fleet.service.handle_many(
            [fleet.devices[n].report(report(), fleet.now) for n in NAMES], fleet.now
        )
        first = fleet.now
        fleet.now += 1
        moved = {"dev-2", "dev-4"}
        batch = []
        for n in NAMES:
            body = report()
            if n in moved:
                body = KeyStateReport(body.keys, feed=1)
            batch.append(fleet.devices[n].report(body, fleet.now))
        fleet.service.handle_many(batch, fleet.now)
        assert fleet.service.metrics.reports.value("keys.report") == 2 * len(NAMES)
        with fleet.sessions() as s:
            rows = {
                r.device_id: (r.seq, r.reported_at) for r in s.scalars(select(RevocationFeedSeen))
            }
        assert rows == {n: (1, fleet.now) if n in moved else (0, first) for n in NAMES}


def _digests(fleet: Fleet) -> dict[str, bytes | None]:
    with fleet.sessions() as s:
        rows = s.execute(
            select(Device.device_id, Device.reported_keys).where(Device.device_id.in_(NAMES))
        )
        return {device_id: None if value is None else bytes(value) for device_id, value in rows}


def test_a_key_state_changed_after_its_digest_was_stored_is_still_recorded(
    tmp_path: Path, database_url: str
) -> None:
    """A steady report is judged by the device row's ``reported_keys`` digest alone; a key
    state changed after it was stored (a new transition reported, keys compromised by the
    service) is still recorded, and the report that comes back to the old state changes
    nothing it should not, on SQLite and PostgreSQL."""
    url = None if database_url.startswith("sqlite") else database_url
    for fleet in make_fleet(tmp_path, NAMES, url=url):
        steady = report(at=T0 + 5)
        fleet.service.handle_many(
            [fleet.devices[n].report(steady, fleet.now) for n in NAMES], fleet.now
        )
        digest = key_state_digest(key_state_items(steady.keys))
        assert _digests(fleet) == dict.fromkeys(NAMES, digest)
        fleet.now += 1
        fleet.service.handle_many(
            [fleet.devices[n].report(steady, fleet.now) for n in NAMES], fleet.now
        )
        assert _digests(fleet) == dict.fromkeys(NAMES, digest)
        with fleet.sessions() as s:
            Registry(s).compromise_keys("dev-1", now=fleet.now)
            s.commit()
        fleet.now += 1
        history = ((KeyState.PRE_ACTIVATION, T0), (KeyState.ACTIVE, T0 + 5))
        history += ((KeyState.SUSPENDED, T0 + 7),)
        moved = KeyStateReport((KeyRecord("devid", KeyKind.DEVID, history),), feed=0)
        bodies = {"dev-1": steady, "dev-2": moved, "dev-3": steady, "dev-4": moved}
        fleet.service.handle_many(
            [fleet.devices[n].report(bodies[n], fleet.now) for n in NAMES], fleet.now
        )
        assert keys(fleet) == {
            "dev-1": [("devid", KeyState.COMPROMISED)],
            "dev-2": [("devid", KeyState.SUSPENDED)],
            "dev-3": [("devid", KeyState.ACTIVE)],
            "dev-4": [("devid", KeyState.SUSPENDED)],
        }
        # the moved reports were recorded through the registry (no digest), the steady one of
        # dev-1 is known again (the compromise added a transition, removed none)
        moved_digest = key_state_digest(key_state_items(moved.keys))
        assert _digests(fleet) == {
            "dev-1": digest,
            "dev-2": None,
            "dev-3": digest,
            "dev-4": None,
        }
        fleet.now += 1
        fleet.service.handle_many(
            [fleet.devices[n].report(bodies[n], fleet.now) for n in NAMES], fleet.now
        )
        assert _digests(fleet)["dev-2"] == moved_digest
        assert keys(fleet)["dev-2"] == [("devid", KeyState.SUSPENDED)]
        assert fleet.service.metrics.reports.value("keys.report") == 4 * len(NAMES)
