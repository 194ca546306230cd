"""A SoftHSM2 token of its own, for the lab, the demo and the tests: the PKCS#11 token that holds
the service's keys there (a real HSM in production, docs/operations.md).

``SoftToken.create(directory, label)`` writes a SoftHSM2 configuration whose token directory is
``directory/tokens`` (never the system one, which is root-only and shared), random SO and user
PINs (the user PIN in ``directory/user.pin``, mode 0600, the SO PIN only in memory) and
initialises one token with ``softhsm2-util --init-token --free``. A process reaches it with
``SOFTHSM2_CONF`` set to ``conf`` (``env()``); ``uri(label)`` is the ``pkcs11:`` reference of a
key in it, with the PIN file as its ``pin-source``. A missing softhsm2 is an error, never a skip.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from agent.fsio import atomic_write
from agent.protocol.errors import StateError
from provisioning.custody import DEFAULT_MODULE, refresh_modules

SOFTHSM2_UTIL = "softhsm2-util"
CONF_ENV = "SOFTHSM2_CONF"


@dataclass(frozen=True)
class SoftToken:
    """One initialised SoftHSM2 token in ``directory``; ``label`` is its token label."""

    directory: Path
    label: str
    conf: Path
    pin_file: Path
    so_pin: str = field(repr=False)
    module: Path = DEFAULT_MODULE

    @classmethod
    def create(cls, directory: Path, label: str = "keyfleet") -> SoftToken:
        util = shutil.which(SOFTHSM2_UTIL)
        if util is None or not DEFAULT_MODULE.is_file():
            raise StateError(
                "softhsm2 is not installed: install the Debian package softhsm2 "
                "(scripts/install-deps.sh)"
            )
        directory.mkdir(parents=True, exist_ok=True)
        tokens = directory / "tokens"
        tokens.mkdir(mode=0o700, exist_ok=True)
        conf = directory / "softhsm2.conf"
        atomic_write(
            conf,
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
            "slots.removable = false\n".encode(),
            mode=0o600,
        )
        pin = secrets.token_hex(8)
        so_pin = secrets.token_hex(8)
        pin_file = directory / "user.pin"
        atomic_write(pin_file, pin.encode() + b"\n", mode=0o600)
        token = cls(directory, label, conf, pin_file, so_pin)
        # PINs go to softhsm2-util on its command line: only in this short-lived child, in a
        # directory of the caller's own; its output is not echoed anywhere.
        done = subprocess.run(
            [util, "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", so_pin],
            env=token.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise StateError(f"softhsm2-util --init-token failed (exit {done.returncode})")
        # a process that already loaded the library sees the new token only after re-init
        if os.environ.get(CONF_ENV) == str(conf):
            refresh_modules()
        return token

    def env(self) -> dict[str, str]:
        """The environment of a process that should see this token."""
        return {**os.environ, CONF_ENV: str(self.conf)}

    def uri(self, key_label: str) -> str:
        """The ``pkcs11:`` reference of the key labelled ``key_label``, PIN from the PIN file."""
        return (
            f"pkcs11:token={quote(self.label, safe='')};object={quote(key_label, safe='')}"
            f"?pin-source=file:{self.pin_file}&module-path={self.module}"
        )

    def pin(self) -> str:
        return self.pin_file.read_text().strip()
