#!/usr/bin/env bash
# Install the Debian packages keyfleet needs, only those that are missing.
# Runs apt-get directly as root, through sudo otherwise; says clearly when it can do neither.
set -euo pipefail

# systemd only for systemd-analyze (the unit checks); nothing here starts it.
# chromium, chromium-driver and libnss3-tools (certutil, pk12util) only for the dashboard's
# browser tests: Selenium drives Debian's Chromium with an operator certificate in an NSS database.
packages=(swtpm swtpm-tools libtss2-dev mosquitto socat pkg-config gcc python3-dev python3-venv systemd
    chromium chromium-driver libnss3-tools)
# postgresql: the tests start their own server from its binaries (tests/fixtures/postgres.py) to
# run the registry, migrations and the e2e tests on PostgreSQL as well as SQLite.
packages+=(postgresql)
# tpm2-tools, openssl and tpm2-openssl: the independent checkers of docs/interop.md
# (tpm2_checkquote, openssl verify, TPM key blobs through the tpm2 provider), run by the tests.
packages+=(tpm2-tools openssl tpm2-openssl)
# softhsm2: the PKCS#11 token (/usr/lib/softhsm/libsofthsm2.so) that holds the fleet's keys in the
# tests and the demo (provisioning/custody.py); production uses the HSM's own PKCS#11 library.
packages+=(softhsm2)

missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

echo "keyfleet: installing Debian packages: ${missing[*]}"
if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    echo "keyfleet: these Debian packages are missing: ${missing[*]}" >&2
    echo "keyfleet: run this as root, or give this user sudo, or install them yourself:" >&2
    echo "    apt-get install ${missing[*]}" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"

# The Debian mosquitto package starts a system broker on port 1883; keyfleet starts its own
# brokers on free loopback ports, so the system one is not needed (and is left as the admin set it).
