from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.fsio import atomic_write, shred
from agent.protocol.errors import StateError

pytestmark = pytest.mark.pure


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert oct(target.stat().st_mode & 0o777) == oct(0o600)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]


def test_failed_write_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    atomic_write(target, b"old")
    target_dir_mode = tmp_path.stat().st_mode
    os.chmod(tmp_path, 0o500)
    try:
        if os.geteuid() == 0:
            # root ignores directory modes: make the rename fail with a directory in the way
            os.chmod(tmp_path, target_dir_mode)
            blocker = tmp_path / "dir"
            blocker.mkdir()
            (blocker / "x").write_bytes(b"")
            with pytest.raises(StateError, match="could not write"):
                atomic_write(blocker, b"new")
            assert (blocker / "x").exists()
        else:
            with pytest.raises(StateError, match="could not write"):
                atomic_write(target, b"new")
    finally:
        os.chmod(tmp_path, target_dir_mode)
    assert target.read_bytes() == b"old"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_shred_removes(tmp_path: Path) -> None:
    target = tmp_path / "blob"
    target.write_bytes(b"x" * 100)
    shred(target)
    assert not target.exists()
    shred(target)  # gone already: nothing to do


def test_a_name_in_the_way_of_the_temp_file_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the first two draws name a link planted to a victim file: it is neither followed nor
    # replaced, the write goes through the third name
    victim = tmp_path / "victim"
    victim.write_bytes(b"victim")
    draws = iter([b"\x01" * 6, b"\x01" * 6, b"\x02" * 6])
    monkeypatch.setattr(os, "urandom", lambda n: next(draws))
    taken = tmp_path / f".state.bin.{'01' * 6}.tmp"
    taken.symlink_to(victim)
    atomic_write(tmp_path / "state.bin", b"new")
    assert (tmp_path / "state.bin").read_bytes() == b"new"
    assert victim.read_bytes() == b"victim"
    assert taken.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["state.bin", "victim", taken.name])
