#!/usr/bin/env bash
# Install keyfleet on a device (the agent) or a service host (the fleet service and operator CLI):
# a virtual environment in /opt/keyfleet holding the hash-pinned run-time dependencies
# (requirements.lock) and the keyfleet wheel (make dist), the systemd units, the sysusers.d and
# tmpfiles.d files, and configuration examples in /etc. Never overwrites a configuration file and
# never enables or starts a unit. docs/install.md says what to do before and after.
#
#   scripts/install.sh [--root DIR] [--agent | --service] [--wheel FILE] [--python PYTHON]
#
# --root DIR  install under DIR instead of / (an image being built, a test): the programs are
#             written to run as /opt/keyfleet/bin/... once DIR is the system's root, and nothing
#             is asked of the running system (no systemd-sysusers, tmpfiles or daemon-reload).
# --agent     the device: keyagent.service and /etc/keyagent; --service: keyfleet.service,
#             keyfleet@.service and /etc/keyfleet. Neither: both.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
root=/
roles=()
wheel=
python=/usr/bin/python3
lock="$here/requirements.lock"

usage() { sed -n '9,15p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --root) root=${2:?--root needs a directory}; shift 2 ;;
        --agent) roles+=(agent); shift ;;
        --service) roles+=(service); shift ;;
        --wheel) wheel=${2:?--wheel needs a file}; shift 2 ;;
        --python) python=${2:?--python needs an interpreter}; shift 2 ;;
        -h|--help) usage ;;
        *) echo "install.sh: unknown argument $1" >&2; usage ;;
    esac
done
[ ${#roles[@]} -gt 0 ] || roles=(agent service)
if [ -z "$wheel" ]; then
    shopt -s nullglob
    wheels=("$here"/dist/keyfleet-*.whl)
    shopt -u nullglob
    if [ ${#wheels[@]} -ne 1 ]; then
        echo "install.sh: expected one dist/keyfleet-*.whl (found ${#wheels[@]}): run 'make dist' or pass --wheel" >&2
        exit 1
    fi
    wheel=${wheels[0]}
fi
for file in "$wheel" "$lock"; do
    [ -f "$file" ] || { echo "install.sh: $file not found" >&2; exit 1; }
done
command -v "$python" >/dev/null || { echo "install.sh: no interpreter $python" >&2; exit 1; }

root=$(realpath -m "$root")
[ "$root" = / ] && dest=/opt/keyfleet || dest="$root/opt/keyfleet"
etc="${root%/}/etc"

# The environment: created once, then updated in place (an upgrade is the same command).
mkdir -p "$(dirname "$dest")"
[ -x "$dest/bin/python" ] || "$python" -m venv "$dest"
"$here/scripts/install-tpm2-pytss.sh" "$dest/bin/python" "$lock"
"$dest/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes -r "$lock"
"$dest/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall "$wheel"
if [ "$root" != / ]; then
    # Scripts name their interpreter by absolute path: the one they will have on the target.
    grep -rlI --null "$dest" "$dest/bin" | xargs -0 -r sed -i "s#$dest#/opt/keyfleet#g"
fi

install -d -m 0755 "$etc/systemd/system" "$etc/sysusers.d" "$etc/tmpfiles.d"
install -m 0644 "$here/systemd/sysusers.d/keyfleet.conf" "$etc/sysusers.d/keyfleet.conf"
install -m 0644 "$here/systemd/tmpfiles.d/keyfleet.conf" "$etc/tmpfiles.d/keyfleet.conf"
units=()
for role in "${roles[@]}"; do
    case "$role" in
        agent)
            units+=(keyagent.service)
            install -d -m 0750 "$etc/keyagent"
            install -m 0644 "$here/packaging/agent.toml.example" "$etc/keyagent/agent.toml.example" ;;
        service)
            # the CRL units belong on the broker's host: installed, enabled there by hand
            # (docs/operations.md, "Revocation")
            units+=(keyfleet.service keyfleet@.service keyfleet-broker-crl.path keyfleet-broker-crl.service)
            install -d -m 0750 "$etc/keyfleet"
            install -m 0644 "$here/packaging/service.toml.example" "$etc/keyfleet/service.toml.example" ;;
    esac
done
for unit in "${units[@]}"; do
    install -m 0644 "$here/systemd/$unit" "$etc/systemd/system/$unit"
done

if [ "$root" = / ]; then
    systemd-sysusers
    systemd-tmpfiles --create /etc/tmpfiles.d/keyfleet.conf
    systemctl daemon-reload 2>/dev/null || true  # not booted with systemd (a container): nothing to reload
fi
echo "keyfleet $("$dest/bin/python" -c 'import importlib.metadata as m; print(m.version("keyfleet"))') installed in $dest; units: ${units[*]}"
echo "next: the configuration (docs/install.md), then: systemctl enable --now ${units[0]}"
