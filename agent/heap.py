"""Returning memory to the system: the C heap's free pages after the agent's bursts of work,
and the library pages only its start-up used.

The agent's start-up (imports, TLS, the TPM session, the state) and each burst of messages
leave free memory inside the C heap that ``free`` keeps: glibc gives memory back on its own only
from the top of the heap. ``malloc_trim(0)`` gives back every whole free page, wherever it is
(about 0.8 MB after start-up, measured in docs/bench/README.md, "keyagent memory and start").

It is called through cffi's backend, which the TPM binding (tpm2-pytss) has already loaded:
``ctypes`` would cost about 1.3 MB of resident memory of its own, more than the trim gives back.
On a C library without ``malloc_trim`` (musl) ``release_free_pages`` does nothing.

The start-up also touches library code that the running agent does not run again: the imports'
initialisation, the self-test's parent side, the TLS handshake, the TPM session's set-up, the
state's unsealing. Every page once touched stays in the agent's resident set, and the kernel
maps 64 KB around each page touched. ``release_library_pages``, called once just before READY,
gives back the pages of every mapping of a file that is private, read-only and holds no page of
the agent's own (no copied, relocated page): ``MADV_PAGEOUT`` (Linux 5.4) first, which drops from
memory the pages no other process maps, then ``MADV_DONTNEED``, which unmaps from the agent the
ones that another process maps as well (those stay in memory for it). Nothing is lost: such a
page is a clean copy of the file, the kernel drops it on its own under memory pressure, and
the agent's next touch of it reads it again (from the file, or from memory if another process
has it). What the agent uses after start-up comes back on its first use; about 6 MB of
library pages that only the start-up used stay out (docs/bench/README.md). Mappings that are
writable, shared or hold a page of the agent's own are left alone, and so is everything on a
kernel or C library without these calls.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
from collections.abc import Callable
from typing import cast

log = logging.getLogger("keyagent.heap")

MADV_DONTNEED = 4  # <linux/mman.h>
MADV_PAGEOUT = 21  # Linux 5.4
_MAPPING = re.compile(r"([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+ *(.*)")


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        backend = importlib.import_module("_cffi_backend")
        function = backend.new_function_type(
            (backend.new_primitive_type("size_t"),), backend.new_primitive_type("int"), False
        )
        trim = backend.load_library(None).load_function(function, "malloc_trim")
    except (ImportError, AttributeError, OSError) as exc:
        log.debug("no malloc_trim here (%s): the heap is not trimmed", type(exc).__name__)
        return None
    return cast("Callable[[int], int]", trim)


def release_free_pages() -> bool:
    """Give every whole free page of the C heap back to the system. True if the C library has
    the call (glibc), whether or not there was anything to give back."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def clean_library_ranges(smaps: str) -> list[tuple[int, int, int]]:
    """The mappings of a ``/proc/PID/smaps`` text whose pages may be given back with nothing
    lost: a file's private, read-only mapping with resident pages and no anonymous (copied) page.
    Returns (start, length, resident bytes) for each."""
    ranges: list[tuple[int, int, int]] = []
    current: tuple[int, int] | None = None
    rss = anonymous = 0

    def close() -> None:
        if current is not None and rss > 0 and anonymous == 0:
            ranges.append((*current, rss * 1024))

    for line in smaps.splitlines():
        header = _MAPPING.fullmatch(line)
        if header is not None:
            close()
            start, end, perms, path = header.groups()
            current = None
            rss = anonymous = 0
            if path.startswith("/") and perms[1] == "-" and perms[3] == "p":
                current = (int(start, 16), int(end, 16) - int(start, 16))
        elif line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("Anonymous:"):
            anonymous = int(line.split()[1])
    close()
    return ranges


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    try:
        backend = importlib.import_module("_cffi_backend")
        function = backend.new_function_type(
            (
                backend.new_primitive_type("uintptr_t"),
                backend.new_primitive_type("size_t"),
                backend.new_primitive_type("int"),
            ),
            backend.new_primitive_type("int"),
            False,
        )
        madvise = backend.load_library(None).load_function(function, "madvise")
    except (ImportError, AttributeError, OSError) as exc:
        log.debug("no madvise here (%s): library pages stay", type(exc).__name__)
        return None
    return cast("Callable[[int, int, int], int]", madvise)


def release_library_pages(smaps_path: str = "/proc/self/smaps") -> int:
    """Give back the clean library pages the start-up left resident (see the module's text).
    Returns how many resident bytes the agent gave back (0 where it cannot)."""
    madvise = _madvise()
    if madvise is None:
        return 0
    try:
        with open(smaps_path, encoding="ascii", errors="replace") as file:
            ranges = clean_library_ranges(file.read())
    except OSError as exc:
        log.debug("%s not readable (%s): library pages stay", smaps_path, type(exc).__name__)
        return 0
    released = 0
    for start, length, resident in ranges:
        madvise(start, length, MADV_PAGEOUT)  # EINVAL before Linux 5.4: then only unmapped
        if madvise(start, length, MADV_DONTNEED) != 0:
            log.debug("MADV_DONTNEED refused: library pages stay")
            break
        released += resident
    log.debug("library pages given back: %d KB", released // 1024)
    return released
