"""Crash-safe file writes: every piece of state keyfleet keeps on disk goes through here."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from agent.protocol.errors import StateError

_TEMP_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_TEMP_ATTEMPTS = 100


def _new_temp_file(directory: Path, name: str) -> tuple[int, str]:
    """A new file ``.NAME.RANDOM.tmp`` in ``directory``, created exclusively with mode 0600, as
    ``tempfile.mkstemp`` makes it: ``tempfile`` itself would keep ``shutil``, ``bz2`` and ``lzma``
    in the agent's memory for this one call."""
    for _ in range(_TEMP_ATTEMPTS):
        tmp_name = os.path.join(directory, f".{name}.{os.urandom(6).hex()}.tmp")
        try:
            return os.open(tmp_name, _TEMP_FLAGS, 0o600), tmp_name
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {name} in {directory}")


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` so that a crash at any point leaves either the old file or the
    new one, never a mix: temp file in the same directory, fsync, rename, fsync the directory.

    On failure (disk full, permission) the old file is untouched and ``StateError`` names the path.
    """
    target = Path(path)
    directory = target.parent
    fd, tmp_name = _new_temp_file(directory, target.name)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_name, target)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise StateError(f"could not write {target}: {exc.strerror or exc}") from None
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def shred(path: str | os.PathLike[str]) -> None:
    """Overwrite a file with zeros, fsync, then delete it. On flash and copy-on-write file systems
    overwriting is not a guarantee; the real protection is that keyfleet never writes a secret in
    the clear (blobs are TPM-wrapped, state is encrypted), so this is defence in depth."""
    target = Path(path)
    try:
        size = target.stat().st_size
        with open(target, "r+b", buffering=0) as handle:
            handle.write(bytes(size))
            os.fsync(handle.fileno())
        target.unlink()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StateError(f"could not destroy {target}: {exc.strerror or exc}") from None
