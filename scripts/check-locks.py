"""Check that the lock files still match pyproject.toml: every dependency pyproject.toml declares
(run time, each extra, the build system's) is pinned, at a version it allows, in the lock file that
should hold it. A dependency added to pyproject.toml without `make lock` is reported here, not
later as a missing module. Exits 1 naming each gap; run with a Python that has `packaging`
(.venv's, after make setup installs the dev lock)."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def pins(lock: Path) -> dict[str, str]:
    """``name -> version`` of every ``name==version`` line of a pip-compile output file."""
    found = {}
    for line in lock.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        if match:
            found[canonicalize_name(match[1])] = match[2]
    return found


def gaps(root: Path = ROOT) -> list[str]:
    project = tomllib.loads((root / "pyproject.toml").read_text())
    runtime = project["project"]["dependencies"]
    extras = project["project"].get("optional-dependencies", {})
    wanted = {
        "requirements.lock": runtime,
        "requirements-dev.lock": runtime + extras.get("dev", []),
        "requirements-bench.lock": runtime + extras.get("dev", []) + extras.get("bench", []),
        "requirements-build.lock": project["build-system"]["requires"],
    }
    problems = []
    for name, requirements in wanted.items():
        lock = root / name
        if not lock.is_file():
            problems.append(f"{name}: missing")
            continue
        pinned = pins(lock)
        for line in requirements:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            version = pinned.get(canonicalize_name(req.name))
            if version is None:
                problems.append(f"{name}: {req.name} is not pinned (pyproject.toml: {line})")
            elif not req.specifier.contains(version, prereleases=True):
                problems.append(f"{name}: {req.name}=={version} does not satisfy {line}")
    return problems


def main() -> int:
    problems = gaps()
    for problem in problems:
        print(f"lock files out of date: {problem}", file=sys.stderr)
    if problems:
        print("run `make lock` and commit the lock files (docs/install.md)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
