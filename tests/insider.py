"""A compromised member, for the wedge tests (docs/threat-model.md, "An insider wedging a group").

``junk_encrypt(real)``: ``agent.protocol.mls.group.encrypt_with_label`` as a compromised member's
software runs it: the KEM output is real, the ciphertext is zeros of the right length. A commit
made with it is validly signed (with the member's real DevID key) and passes every public check,
and nobody but its committer can decrypt its path secrets (``mls.path.decrypt``).
tests/pure/test_wedge.py installs it with ``monkeypatch``.

``compromise(control)``: the same, installed into a real agent process (``keyagent run``) on a
real device, with two attacker switches the test flips by creating files in ``control``:

- ``ask-update``: the agent asks the service for a self-update (``group.update_request``, as any
  member whose epoch reached its rotation limit does) on its next tick; the service asks it to
  commit and it answers with junk.
- ``commit-unasked``: the agent commits a junk self-update in each of its groups on its next
  tick without being asked (under a command id the service never issued) and forgets it.

Each switch fires once (its file is removed). ``SITECUSTOMIZE`` is the file that puts it into
the agent's process: the test writes it as ``sitecustomize.py`` into a directory it puts on the
device's ``PYTHONPATH`` (``INSIDER_ENV`` names the control directory), and reboots the device;
the TPM, its DevID key and the agent's state stay the device's own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

INSIDER_ENV = "KEYFLEET_TEST_INSIDER"
ASK_UPDATE = "ask-update"
COMMIT_UNASKED = "commit-unasked"

SITECUSTOMIZE = """\
# written by tests/insider.py: this process runs a compromised member's software
import os, sys
if os.environ.get({env!r}):
    sys.path.insert(0, {root!r})
    from tests.insider import compromise
    compromise(os.environ[{env!r}])
"""

log = logging.getLogger("keyfleet.insider")

Encrypt = Callable[..., tuple[bytes, bytes]]


def junk_encrypt(real: Encrypt) -> Encrypt:
    """``real`` with every ciphertext replaced by zeros of its length."""

    def junk(*args: Any, **kwargs: Any) -> tuple[bytes, bytes]:
        kem, ct = real(*args, **kwargs)
        return kem, bytes(len(ct))

    return junk


def sitecustomize(directory: Path) -> Path:
    """Write the ``sitecustomize.py`` that compromises an agent started with ``directory`` on its
    ``PYTHONPATH`` and ``INSIDER_ENV`` set; return ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    root = str(Path(__file__).resolve().parents[1])
    (directory / "sitecustomize.py").write_text(SITECUSTOMIZE.format(env=INSIDER_ENV, root=root))
    return directory


def _fire(control: Path, switch: str) -> bool:
    try:
        (control / switch).unlink()
    except FileNotFoundError:
        return False
    log.warning("insider: %s", switch)
    return True


def compromise(control_dir: str) -> None:
    """Patch this process's agent: junk path ciphertexts, and the two switches (module doc)."""
    from agent import core
    from agent.protocol.mls import group as mls_group
    from agent.protocol.wire.messages.service import CommitAction, CommitRequest

    control = Path(control_dir)
    mls_group.encrypt_with_label = junk_encrypt(mls_group.encrypt_with_label)  # type: ignore[assignment]

    real_rotation_due = core.rotation_due

    def rotation_due(*args: Any, **kwargs: Any) -> Any:
        if _fire(control, ASK_UPDATE):
            return "max-epoch-age"
        return real_rotation_due(*args, **kwargs)

    core.rotation_due = rotation_due  # type: ignore[assignment]

    real_tick = core.AgentCore.tick

    def tick(self: core.AgentCore, now: int) -> core.Outcome:
        outcome = real_tick(self, now)
        if not _fire(control, COMMIT_UNASKED):
            return outcome
        for name, entry in list(self._groups.items()):
            request = CommitRequest(os.urandom(16), name, entry.group.epoch, CommitAction.UPDATE)
            made = self._on_commit_request(request)
            entry.pending.clear()  # nothing will come of it: do not wait for it
            outcome.publishes.extend(made.publishes)
            outcome.changed = True
        return outcome

    core.AgentCore.tick = tick  # type: ignore[method-assign]
