from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent import statefile
from agent.protocol.errors import StateError
from agent.protocol.secret import Secret
from agent.statefile import StateFile

pytestmark = pytest.mark.pure


def _key() -> Secret:
    return Secret(os.urandom(32))


def test_round_trip_and_no_plaintext_on_disk(tmp_path: Path) -> None:
    key = _key()
    marker = os.urandom(32)
    store = StateFile(tmp_path / "state", key)
    store.save({"epoch_secret": marker, "seq": 7})
    assert marker not in (tmp_path / "state").read_bytes()
    again = StateFile(tmp_path / "state", key)
    assert again.load() == {"epoch_secret": marker, "seq": 7}
    assert again.generation == 1
    again.save({"seq": 8})
    assert StateFile(tmp_path / "state", key).load() == {"seq": 8}
    assert "redacted" in repr(key) and marker.hex() not in repr(again)


@pytest.mark.parametrize("position", [0, 5, 10, 20, -1])
def test_any_flipped_byte_is_refused(tmp_path: Path, position: int) -> None:
    key = _key()
    StateFile(tmp_path / "state", key).save({"a": 1})
    blob = bytearray((tmp_path / "state").read_bytes())
    blob[position] ^= 0x01
    (tmp_path / "state").write_bytes(bytes(blob))
    with pytest.raises(StateError):
        StateFile(tmp_path / "state", key).load()


def test_wrong_key_truncated_missing(tmp_path: Path) -> None:
    StateFile(tmp_path / "state", _key()).save({"a": 1})
    with pytest.raises(StateError, match="does not authenticate"):
        StateFile(tmp_path / "state", _key()).load()
    (tmp_path / "short").write_bytes(b"KFST\x01")
    with pytest.raises(StateError, match="truncated"):
        StateFile(tmp_path / "short", _key()).load()
    with pytest.raises(StateError, match="no state file"):
        StateFile(tmp_path / "absent", _key()).load()
    with pytest.raises(StateError, match="32 bytes"):
        StateFile(tmp_path / "state", Secret(b"short"))


def test_a_state_over_the_load_limit_is_never_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A state the loader would refuse is refused by save instead: the file on disk stays the
    last state saved, which still loads."""
    path = tmp_path / "state.bin"
    f = StateFile(path, Secret(os.urandom(32)))
    f.save({"groups": {"g": b"x" * 1000}})
    before = path.read_bytes()
    monkeypatch.setattr(statefile, "MAX_STATE_BYTES", len(before) + 100)
    with pytest.raises(StateError, match="over the"):
        f.save({"groups": {"g": b"x" * 2000}})
    assert path.read_bytes() == before and f.generation == 1
    assert f.load() == {"groups": {"g": b"x" * 1000}}
