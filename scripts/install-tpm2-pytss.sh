#!/usr/bin/env bash
# Install tpm2-pytss, at the version and hashes LOCK pins, built without the TSS's FAPI:
#
#   scripts/install-tpm2-pytss.sh PYTHON LOCK
#
# tpm2-pytss is built from source on the machine, against the libtss2 it finds with pkg-config,
# and it links every part it finds. keyfleet uses ESAPI only. Linking FAPI also loads libcurl,
# GnuTLS, Kerberos, LDAP and about 30 other libraries into every keyagent process, about 4 MB of
# its resident memory (docs/bench/README.md, "keyagent resident memory"). The build therefore
# sees a pkg-config search path with every .pc file of the system except tss2-fapi.pc, and the
# binding is built without FAPI, as tpm2-pytss supports. pip's own wheel cache is not used (a wheel
# it cached from an earlier build may link FAPI): the wheel is built from the hash-checked source
# into a cache of its own, $KEYFLEET_CACHE (default ~/.cache/keyfleet), and installed from there.
# The lock install that follows finds the requirement satisfied and leaves the binding alone.
set -euo pipefail

python=${1:?usage: install-tpm2-pytss.sh PYTHON LOCK}
lock=${2:?usage: install-tpm2-pytss.sh PYTHON LOCK}
command -v pkg-config >/dev/null || { echo "install-tpm2-pytss.sh: pkg-config is missing (scripts/install-deps.sh installs it)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/pc"
IFS=: read -r -a dirs <<<"$(pkg-config --variable pc_path pkg-config)"
for dir in "${dirs[@]}"; do
    [ -d "$dir" ] || continue
    for pc in "$dir"/*.pc; do
        name=$(basename "$pc")
        # The first directory that has a name wins, as in pkg-config's own search.
        [ "$name" = tss2-fapi.pc ] || [ -e "$work/pc/$name" ] || ln -s "$pc" "$work/pc/$name"
    done
done

# The lock's tpm2-pytss entry: its name==version line and the hash lines that continue it.
awk '/^tpm2-pytss==/ { found = 1 } found { print; if ($0 !~ /\\$/) exit }' "$lock" >"$work/req.txt"
[ -s "$work/req.txt" ] || { echo "install-tpm2-pytss.sh: $lock pins no tpm2-pytss" >&2; exit 1; }

version=$(sed -n '1s/^tpm2-pytss==\([^ ]*\).*/\1/p' "$work/req.txt")
# keyed by the pinned source and the libtss2 it is built against
sum=$( (cat "$work/req.txt"; pkg-config --modversion tss2-esys) | sha256sum | cut -c1-16)
cache="${KEYFLEET_CACHE:-$HOME/.cache/keyfleet}/tpm2-pytss-esapi/$version-$sum"
wheels=("$cache"/tpm2_pytss-*.whl)
if [ ! -f "${wheels[0]}" ]; then
    rm -rf "$cache" && mkdir -p "$cache"
    PKG_CONFIG_LIBDIR="$work/pc" "$python" -m pip wheel --quiet --disable-pip-version-check \
        --require-hashes --no-deps --no-cache-dir --wheel-dir "$work/wheel" -r "$work/req.txt"
    mv "$work"/wheel/tpm2_pytss-*.whl "$cache/"
    fi
installed=$("$python" -c 'import importlib.metadata as m; print(m.version("tpm2-pytss"))' 2>/dev/null || true)
if [ "$installed" != "$version" ] || "$python" -c 'import tpm2_pytss.FAPI' 2>/dev/null; then
    # by name from the cache (not by file), so that pip records it as the pinned version
    "$python" -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall \
        --no-index --find-links "$cache" "tpm2-pytss==$version"
fi
if "$python" -c 'import tpm2_pytss.FAPI' 2>/dev/null; then
    echo "install-tpm2-pytss.sh: the installed tpm2-pytss still links FAPI" >&2
    exit 1
fi
