#!/usr/bin/env bash
# Verify the systemd units and hold keyagent.service to an exposure of at most 2.0.
# systemd-analyze verify wants ExecStart to exist, so the check runs on copies whose ExecStart
# points at this checkout's installed console scripts.
set -euo pipefail
cd "$(dirname "$0")/.."
max_exposure=${MAX_EXPOSURE:-2.0}
bindir=$(realpath .venv/bin)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for unit in systemd/keyagent.service systemd/keyfleet.service; do
    sed "s#/usr/bin/#$bindir/#" "$unit" > "$work/$(basename "$unit")"
done
out=$(systemd-analyze verify "$work"/*.service 2>&1 || true)
if [ -n "$out" ]; then
    echo "systemd-analyze verify found problems:" >&2
    echo "$out" >&2
    exit 1
fi
for unit in keyagent.service keyfleet.service; do
    exposure=$(systemd-analyze security --offline=true "$work/$unit" 2>&1 \
        | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
    if [ -z "$exposure" ]; then
        echo "could not read the exposure of $unit" >&2
        exit 1
    fi
    echo "$unit: exposure $exposure"
    if [ "$unit" = keyagent.service ] && awk -v e="$exposure" -v m="$max_exposure" 'BEGIN{exit !(e>m)}'; then
        echo "keyagent.service exposure $exposure is above $max_exposure" >&2
        exit 1
    fi
done
echo "systemd units: verify clean"
