#!/usr/bin/env bash
# The whole test suite, as `make test` runs it: three pytest sessions at the same time.
#
# The tiers with real components (tpm, broker, e2e) spend most of their time waiting: on swtpm, the
# broker, subprocesses starting, agents acking. Run one after the other they take their sum; run
# side by side they take little more than the longest. So the suite is three sessions:
#   - the end-to-end modules (tests/e2e), printed live;
#   - the other modules with real components (tests/tpm, tests/broker, tests/reliability, and a
#     few end-to-end modules named below, to even out the two sessions);
#   - the pure tier, CPU-bound unit tests and fuzzing, niced so that it only takes CPU the other
#     two leave idle.
# Every session has its own temporary directory and its own leak check, and prints its 30 slowest
# steps (to see where the suite's time goes). The two background sessions' output follows the
# live one's; the exit status is the first failure of the three.
# Arguments (such as -x or -q) go to all three. `make pytest PYTEST_ARGS=...` runs one plain
# pytest instead.
set -uo pipefail
PY=${PY:-.venv/bin/python}
logs=$(mktemp -d "${TMPDIR:-/tmp}/keyfleet-suite.XXXXXX")
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
    rm -rf "$logs"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

run() { "$PY" -m pytest -p no:cacheprovider --durations=30 "$@"; }

nice -n 15 "$PY" -m pytest -m pure -p no:cacheprovider --durations=30 "$@" >"$logs/pure" 2>&1 &
pids+=($!)
# End-to-end modules that run beside the component tiers instead of in the e2e session, so that
# the two sessions with real components take about as long as each other (each module starts its
# own lab or deployment, so where it runs changes nothing else).
moved=(
    tests/e2e/test_renewal_e2e.py
    tests/e2e/test_renewal_expired_e2e.py
    tests/e2e/test_replace_e2e.py
    tests/e2e/test_trust_rollover_e2e.py
    tests/e2e/test_trust_agent_e2e.py
    tests/e2e/test_trust_device_ca_e2e.py
    tests/e2e/test_restore_drill_e2e.py
)
ignored=()
for module in "${moved[@]}"; do ignored+=(--ignore "$module"); done
run -m "not pure" tests/tpm tests/broker tests/reliability "${moved[@]}" "$@" >"$logs/components" 2>&1 &
pids+=($!)
run -m "not pure" tests/e2e "${ignored[@]}" "$@"
status=$?
names=(pure components)
titles=("pure tier" "tpm, broker and reliability modules")
for i in 0 1; do
    wait "${pids[$i]}"
    code=$?
    echo
    echo "=================== ${titles[$i]} (ran beside tests/e2e) ==================="
    cat "$logs/${names[$i]}"
    if [ "$status" -eq 0 ]; then status=$code; fi
done
pids=()
exit "$status"
