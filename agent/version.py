"""``--version`` for every keyfleet command (``keyagent``, ``keyfleet``, ``keyprovision``,
``firmware-sim``): the version of the installed ``keyfleet`` distribution, read from its
metadata when asked (not at every start)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

DISTRIBUTION = "keyfleet"


def installed_version() -> str:
    # imported here: importlib.metadata costs every keyagent process about 0.6 MB of resident
    # memory (it loads zipfile and csv), for a number only --version prints
    from importlib import metadata  # noqa: PLC0415

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "(not installed: run from a source tree)"


class _ShowVersion(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(
            option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=kwargs.get("help")
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        print(f"{parser.prog} {installed_version()}", file=sys.stdout)
        parser.exit()


def add_version_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--version", action=_ShowVersion, help="print the installed keyfleet version and exit"
    )
