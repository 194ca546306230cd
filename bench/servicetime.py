"""The time an in-process service spends inside its entry points, for the benches that drive
the sans-I/O ``DeliveryService`` with software members in one process (bench_bulk_create's
``inproc`` runs, bench_full_rekey part 1): the members' work is left out."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class ServiceTime:
    """Wraps the named methods of ``service`` (``handle``, ``handle_many``, ``tick``...) so
    that ``total`` adds up the seconds spent inside them (wall time) and ``cpu`` this thread's
    CPU time in them (what other processes on a loaded machine do not inflate); set both to 0
    to start over."""

    def __init__(self, service: Any, *methods: str) -> None:
        self.total = 0.0
        self.cpu = 0.0
        for name in methods:
            setattr(service, name, self._timed(getattr(service, name)))

    def _timed(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return method(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - start
                self.cpu += time.thread_time() - cpu

        return timed
