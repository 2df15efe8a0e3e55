#!/usr/bin/env bash
# Passive outlier ejection under load: what one dead server costs once it is ejected, and what
# the per-server bookkeeping costs when nothing fails.
#
# Three breakwater configurations in front of nginx upstreams answering a fixed 128-byte body:
#   healthy   two live servers, outlier detection on (the defaults)
#   off       the same two, "outlier_detection": {"consecutive_failures": 0}
#   ejected   one live server and one refusing port; the warm-up ejects the dead one
# Each is driven by wrk (keep-alive, --latency) in turn, --rounds times, interleaved so that
# background load hits all alike; the medians are compared:
#   p99(ejected) / p99(healthy)   target <= 1.2
#   req/s(healthy) / req/s(off)   target >= 0.99 (bookkeeping costs at most 1 %)
#
#   test/bench/outlier.sh [--duration S] [--rounds N] [--connections C] [--workers N] [--bin PATH]
#
# Everything lives in a temporary directory removed on exit, after every started process is
# stopped; only loopback addresses are used. Needs wrk, nginx, python3.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
duration=5
rounds=3
connections=32
workers=1
bin="$repo/build/breakwater"
while [ $# -gt 0 ]; do
    case "$1" in
    --duration) duration="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --connections) connections="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --bin) bin="$2"; shift 2 ;;
    *) echo "outlier.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
for tool in wrk nginx python3; do
    command -v "$tool" >/dev/null || { echo "outlier.sh: $tool is needed" >&2; exit 2; }
done
[ -x "$bin" ] || { echo "outlier.sh: no breakwater binary at $bin (build it first)" >&2; exit 2; }

. "$here/lib.sh"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/breakwater-outlier.XXXXXX")"
started=()
cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    for ((i = ${#started[@]} - 1; i >= 0; i--)); do stop_pid "${started[$i]}"; done
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

read -r up1 up2 dead bw_port admin_port <<<"$(free_ports 5)"
body="$(head -c 128 /dev/zero | tr '\0' 'b')"
nginx_user=""
[ "$(id -u)" = 0 ] && nginx_user="user root;"
for port in "$up1" "$up2"; do
    d="$tmp/up-$port"
    mkdir -p "$d"
    sed -e "s|@TMP@/upstream|$d|g" -e "s|@UP_PORT@|$port|g" -e "s|@BODY@|$body|g" \
        -e "s|@NGINX_USER@|$nginx_user|g" "$here/conf/upstream-nginx.conf" >"$d/nginx.conf"
    nginx -c "$d/nginx.conf" -p "$d" >"$d/stdout.log" 2>&1 &
    started+=($!)
done
# The dead server: a port bound but not listening, so connects are refused at once.
python3 -c "import socket,sys,time; s=socket.socket(); s.bind(('127.0.0.1', $dead)); time.sleep(86400)" &
started+=($!)

wait_port() {
    local i
    for i in $(seq 1 100); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1', $1), 0.2).close()" \
            2>/dev/null && return 0
        sleep 0.05
    done
    echo "outlier.sh: nothing listens on port $1" >&2
    return 1
}
wait_port "$up1"
wait_port "$up2"

config() { # name servers-json outlier-json
    cat >"$tmp/$1.json" <<JSON
{
  "workers": $workers,
  "listeners": [{"address": "127.0.0.1:$bw_port"}],
  "admin": {"address": "127.0.0.1:$admin_port"},
  "upstreams": {"api": {"servers": $2, "keepalive_max_idle": 1024, "retries": 1,
                        "outlier_detection": $3,
                        "circuit_breaker": {"failure_threshold": 1000000}}},
  "routes": [{"path_prefix": "/", "upstream": "api"}],
  "log": {"access_log": "off"}
}
JSON
}
config healthy "[\"127.0.0.1:$up1\", \"127.0.0.1:$up2\"]" '{}'
config off "[\"127.0.0.1:$up1\", \"127.0.0.1:$up2\"]" '{"consecutive_failures": 0}'
config ejected "[\"127.0.0.1:$up1\", \"127.0.0.1:$dead\"]" '{"base_ejection_ms": 600000}'

run() { # name round
    "$bin" -c "$tmp/$1.json" >"$tmp/$1.log" 2>&1 &
    local pid=$!
    wait_port "$bw_port"
    wrk -t1 -c"$connections" -d2s http://127.0.0.1:"$bw_port"/ >/dev/null 2>&1 # warm-up
    wrk -t1 -c"$connections" -d"${duration}s" --latency http://127.0.0.1:"$bw_port"/ \
        >"$tmp/$1.$2.wrk" 2>&1
    stop_pid "$pid"
}
for r in $(seq 1 "$rounds"); do
    for name in healthy off ejected; do run "$name" "$r"; done
done

python3 - "$tmp" "$rounds" <<'PY'
import re, statistics, sys
tmp, rounds = sys.argv[1], int(sys.argv[2])
unit = {"us": 1e-3, "ms": 1.0, "s": 1e3}
def parse(path):
    text = open(path).read()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)", text)
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    return rps, float(m.group(1)) * unit[m.group(2)], int(bad.group(1)) if bad else 0
res = {n: [parse("%s/%s.%d.wrk" % (tmp, n, r)) for r in range(1, rounds + 1)]
       for n in ("healthy", "off", "ejected")}
med = {n: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v),
           sum(x[2] for x in v)) for n, v in res.items()}
print("| configuration | req/s (median) | p99 ms (median) | non-2xx |")
print("| --- | ---: | ---: | ---: |")
for n in ("healthy", "off", "ejected"):
    print("| %s | %.0f | %.3f | %d |" % (n, med[n][0], med[n][1], med[n][2]))
p99_ratio = med["ejected"][1] / med["healthy"][1]
cost = med["healthy"][0] / med["off"][0]
print()
print("p99 with one server ejected / healthy pool: %.2f (target <= 1.2)" % p99_ratio)
print("req/s with outlier detection / without:     %.3f (target >= 0.99)" % cost)
PY
