#!/usr/bin/env bash
# The whole test suite, as `make test` runs it: two pytest runs at the same time.
#
# The tiers with real components (tpm, broker, e2e) spend most of their time waiting: on swtpm, the
# broker, subprocesses starting, agents acking. The pure tier is the opposite, CPU-bound unit tests
# and fuzzing. Run one after the other they take their sum; run side by side they take little
# more than the longer one. The pure run is niced so that it only takes CPU the others leave idle:
# the timing of the tests with real components stays as it is when they run alone.
#
# Each run is a pytest session of its own (own temporary directory, own leak check); the pure
# run's output is printed after the other's, and the exit status is the first failure of the two.
# Arguments are passed to both runs. `make pytest PYTEST_ARGS=...` runs one plain pytest instead.
set -uo pipefail
PY=${PY:-.venv/bin/python}
log=$(mktemp "${TMPDIR:-/tmp}/keyfleet-pure-tier.XXXXXX")
pure=
cleanup() {
    if [ -n "$pure" ]; then kill "$pure" 2>/dev/null; fi
    rm -f "$log"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

nice -n 15 "$PY" -m pytest -m pure -p no:cacheprovider --durations=30 "$@" >"$log" 2>&1 &
pure=$!
"$PY" -m pytest -m "not pure" --durations=30 "$@"
rest=$?
wait "$pure"
pure_status=$?
pure=
echo
echo "=================== pure tier (ran beside the tiers above) ==================="
cat "$log"
if [ "$rest" -ne 0 ]; then exit "$rest"; fi
exit "$pure_status"
