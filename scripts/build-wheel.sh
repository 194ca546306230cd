#!/usr/bin/env bash
# Build the keyfleet wheel into OUTDIR (default dist/) from a clean copy of the sources, so that
# nothing left in the checkout (build/, stale modules, __pycache__) ends up in the wheel.
# The build uses setuptools and wheel from requirements-build.lock, already in the environment of
# $PYTHON (default .venv/bin/python, which make setup fills): no build dependency is fetched.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$here/dist}")
python=${PYTHON:-$here/.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

tar -C "$here" --exclude=__pycache__ --exclude='*.egg-info' \
    -cf - pyproject.toml README.md agent provisioning firmware-sim | tar -C "$work" -xf -
mkdir -p "$out"
"$python" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation \
    --wheel-dir "$out" "$work"
ls "$out"/keyfleet-*.whl
