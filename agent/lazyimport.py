"""Standard library modules that a library imports at its top but the agent never uses.

Every module imported stays in the agent's memory for as long as it runs. paho-mqtt imports
``urllib.request`` (for proxies named in the environment, which it reads only when PySocks is
installed) and ``uuid`` (for a client id, which the agent always gives). ``urllib.request`` in
turn imports ``http.client``, ``email``'s parser, ``tempfile``, ``shutil``, ``bz2`` and ``lzma``.

``defer(name)`` puts a stand-in module under ``name`` in ``sys.modules``: an ``import name``
then binds the stand-in, and the first attribute read from it imports the real module and
copies the real module's names into the stand-in, so the caller sees no difference but the
time of the import. ``importlib.util.LazyLoader`` cannot do this on Python 3.11: the import
statement itself reads ``__spec__`` from the module it finds, which makes the lazy module load.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from typing import Any

_loading = threading.RLock()


class _Deferred(types.ModuleType):
    """The stand-in: a module whose missing attributes (``__file__`` too) load the real one."""

    def __getattr__(self, attr: str) -> Any:
        with _loading:
            real = sys.modules.get(self.__name__)
            if real is None or real is self:
                sys.modules.pop(self.__name__, None)
                real = importlib.import_module(self.__name__)
            for key, value in vars(real).items():
                self.__dict__.setdefault(key, value)
        return getattr(real, attr)


def defer(*names: str) -> tuple[str, ...]:
    """Put a stand-in under each of ``names`` not imported yet (see the module's text); returns
    the names deferred. A name that cannot be found is left alone: its import fails as before."""
    deferred = []
    for name in names:
        if name in sys.modules:
            continue
        parent_name, _, child = name.rpartition(".")
        if parent_name:
            importlib.import_module(parent_name)
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        stand_in = _Deferred(name)
        stand_in.__spec__ = spec
        sys.modules[name] = stand_in
        if parent_name:
            setattr(sys.modules[parent_name], child, stand_in)
        deferred.append(name)
    return tuple(deferred)
