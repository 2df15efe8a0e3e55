#!/usr/bin/env bash
# Installs the Debian bookworm packages breakwater needs.
#   scripts/deps.sh build   what building and running needs
#   scripts/deps.sh test    that, plus what the test suite needs (servers it starts, cmocka, pytest)
set -euo pipefail

build_pkgs=(gcc meson ninja-build pkg-config libevent-dev libssl-dev libcjson-dev
            libhiredis-dev libevhtp-dev libonig-dev python3 curl ca-certificates)
test_pkgs=(libcmocka-dev python3-pytest python3-redis python3-yaml redis-server redis-sentinel
           openssl prometheus chromium clang clang-format libclang-rt-dev util-linux faketime)

want=("${build_pkgs[@]}")
[ "${1:-build}" = test ] && want+=("${test_pkgs[@]}")

missing=()
for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

as_root=()
[ "$(id -u)" -ne 0 ] && as_root=(sudo)
echo "installing: ${missing[*]}"
"${as_root[@]}" apt-get update -qq
# Packaged services (redis, prometheus) must not start on their default ports: the tests start
# their own instances on free ports.
DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 "${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
