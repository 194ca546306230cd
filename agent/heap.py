"""Returning the C heap's free pages to the system after the agent's bursts of work.

The agent's start-up (imports, TLS, the TPM session, the state) and each burst of messages
leave free memory inside the C heap that ``free`` keeps: glibc gives memory back on its own only
from the top of the heap. ``malloc_trim(0)`` gives back every whole free page, wherever it is
(about 0.8 MB after start-up, measured in docs/bench/README.md, "keyagent memory and start").

It is called through cffi's backend, which the TPM binding (tpm2-pytss) has already loaded:
``ctypes`` would cost about 1.3 MB of resident memory of its own, more than the trim gives back.
On a C library without ``malloc_trim`` (musl) ``release_free_pages`` does nothing.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from typing import cast

log = logging.getLogger("keyagent.heap")


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
