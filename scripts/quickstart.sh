#!/usr/bin/env bash
# Installs what breakwater needs, builds it, and starts it in the background on
# examples/breakwater.json with a demo upstream, so that this works at once:
#   curl -i http://127.0.0.1:8080/
# Stop both with: scripts/quickstart.sh stop
#
# BW_QUICKSTART_BUILD names another build directory (default: build).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
build=${BW_QUICKSTART_BUILD:-build}
run=$build/quickstart
mkdir -p "$run"

stop() {
    for f in "$run/breakwater.pid" "$run/upstream.pid"; do
        if [ -f "$f" ]; then
            kill "$(cat "$f")" 2>/dev/null || true
            rm -f "$f"
        fi
    done
}
if [ "${1:-}" = stop ]; then
    stop
    echo "stopped"
    exit 0
fi

scripts/deps.sh build
[ -f "$build/build.ninja" ] || meson setup "$build"
ninja -C "$build"
stop

python3 examples/demo_upstream.py 127.0.0.1 9001 >"$run/upstream.log" 2>&1 &
echo $! >"$run/upstream.pid"
"$build/breakwater" -t -c examples/breakwater.json
"$build/breakwater" -c examples/breakwater.json >"$run/access.log" 2>"$run/error.log" &
echo $! >"$run/breakwater.pid"

for _ in $(seq 1 100); do
    if curl -fsS -o /dev/null http://127.0.0.1:9901/healthz 2>/dev/null &&
       curl -fsS -o /dev/null http://127.0.0.1:9001/ 2>/dev/null; then
        cat <<MSG
breakwater is running (pid $(cat "$run/breakwater.pid")) with a demo upstream on 127.0.0.1:9001.
  curl -i http://127.0.0.1:8080/hello          proxied request
  curl -i http://127.0.0.1:9901/healthz        liveness (admin listener)
  logs: $run/access.log, $run/error.log
  stop: scripts/quickstart.sh stop
MSG
        exit 0
    fi
    sleep 0.1
done
echo "breakwater did not come up; see $run/error.log" >&2
cat "$run/error.log" >&2
exit 1
