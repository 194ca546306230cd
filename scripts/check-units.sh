#!/usr/bin/env bash
# Verify the systemd units and hold keyagent.service to an exposure of at most 2.0.
# systemd-analyze verify wants ExecStart to exist, so the check runs on copies whose ExecStart
# points at this checkout's installed console scripts instead of /opt/keyfleet/bin (where
# scripts/install.sh puts them; tests/test_install.py verifies the units installed there).
# The template keyfleet@.service is checked as the instance keyfleet@check.service, and held to
# being keyfleet.service apart from the instance's names.
set -euo pipefail
cd "$(dirname "$0")/.."
max_exposure=${MAX_EXPOSURE:-2.0}
bindir=$(realpath .venv/bin)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for unit in systemd/keyagent.service systemd/keyfleet.service; do
    sed "s#/opt/keyfleet/bin/#$bindir/#" "$unit" > "$work/$(basename "$unit")"
done
sed "s#/opt/keyfleet/bin/#$bindir/#" systemd/keyfleet@.service > "$work/keyfleet@check.service"

out=$(systemd-analyze verify "$work"/*.service 2>&1 || true)
if [ -n "$out" ]; then
    echo "systemd-analyze verify found problems:" >&2
    echo "$out" >&2
    exit 1
fi

# The template differs from keyfleet.service only in the lines that name the instance (comments
# aside: the template's header says what it is).
template_diff=$(diff <(grep -v '^#' systemd/keyfleet@.service \
        | sed -e 's/, instance %i (/ (/' -e 's#service-%i\.toml#service.toml#g' \
              -e 's#^StateDirectory=keyfleet/%i$#StateDirectory=keyfleet#') \
    <(grep -v '^#' systemd/keyfleet.service) || true)
if [ -n "$template_diff" ]; then
    echo "keyfleet@.service differs from keyfleet.service beyond the instance's names:" >&2
    echo "$template_diff" >&2
    exit 1
fi

for unit in keyagent.service keyfleet.service keyfleet@check.service; do
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
