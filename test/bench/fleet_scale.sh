#!/usr/bin/env bash
# Fleet state at scale: what Redis synchronisation costs with many active client keys, and how
# accurate fleet-wide limits are. Not a test: it prints figures (docs/performance.md).
#
#   test/bench/fleet_scale.sh scale     # 100,000 keys over 4 instances, sync every 100 ms
#   test/bench/fleet_scale.sh accuracy  # 1,000 hot keys over 3 instances for 10 s
#
# scale: N instances (1 worker each) in front of a fast nginx upstream share one redis-server;
# test/bench/keyload.c sends --rate requests/s spread over the instances, with the key taken in
# turn from --keys distinct X-Api-Key values, for --duration s. The policy admits everything,
# so every request takes a token the instance must account for in Redis. Reported: req/s
# achieved, distinct keys that consumed during the run, Redis CPU (used_cpu_user+sys from INFO,
# as a share of one core), each instance's breakwater_redis_sync_age_seconds (sampled every
# 0.5 s: mean and max, in sync intervals), master CPU (share of a core, from /proc) and RSS.
#
# accuracy: the same set-up with a limiting policy (capacity C, refill R per s); each of --keys
# keys is driven well above its limit through every instance at once. Over T s the fleet should
# accept C + R*T per key: reported is the total accepted against keys*(C + R*T) and the per-key
# ratio at the 1st and 99th percentiles.
#
# Everything listens on free loopback ports and lives in a temporary directory removed on exit,
# after every process this script started is stopped.

set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

mode="${1:-}"
[ $# -gt 0 ] && shift
bin="$repo/build/breakwater"
interval=100
keep=0
case "$mode" in
    scale) instances=4 keys=100000 rate=10000 duration=20 capacity=1000000000 refill=1000000000 ;;
    accuracy) instances=3 keys=1000 rate=12000 duration=10 capacity=20 refill=5 ;;
    *) echo "usage: $(basename "$0") scale|accuracy [--instances N] [--keys N] [--rate R]" \
            "[--duration S] [--capacity C] [--refill R] [--interval MS] [--bin PATH] [--keep]" >&2
       exit 2 ;;
esac
while [ $# -gt 0 ]; do
    case "$1" in
        --instances) instances="$2"; shift 2 ;;
        --keys) keys="$2"; shift 2 ;;
        --rate) rate="$2"; shift 2 ;;
        --duration) duration="$2"; shift 2 ;;
        --capacity) capacity="$2"; shift 2 ;;
        --refill) refill="$2"; shift 2 ;;
        --interval) interval="$2"; shift 2 ;;
        --bin) bin="$2"; shift 2 ;;
        --keep) keep=1; shift ;;
        *) echo "fleet_scale.sh: unknown option: $1" >&2; exit 2 ;;
    esac
done

fail() { echo "fleet_scale.sh: $*" >&2; exit 1; }
note() { echo "-- $*" >&2; }
for tool in nginx redis-server redis-cli curl python3 cc; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool not found in PATH"
done
[ -x "$bin" ] || fail "breakwater binary not found at $bin (ninja -C build, or --bin)"
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

work="$(mktemp -d "${TMPDIR:-/tmp}/breakwater-fleet-scale.XXXXXX")"
pids=()
. "$here/lib.sh"
on_exit() {
    local rc=$? i
    trap - EXIT INT TERM
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do stop_pid "${pids[$i]}"; done
    if [ "$keep" = 1 ]; then echo "fleet_scale.sh: kept $work" >&2; else rm -rf "$work"; fi
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cc -O2 -std=c11 -D_GNU_SOURCE "$here/keyload.c" -o "$work/keyload" || fail "cannot build keyload.c"

read -r -a ports <<<"$(free_ports $((2 + 2 * instances)))"
up_port=${ports[0]}
redis_port=${ports[1]}

# --- upstream and Redis ---------------------------------------------------------------------
mkdir -p "$work/nginx"
as_root=""
[ "$(id -u)" = 0 ] && as_root="user root;"
cat >"$work/nginx/nginx.conf" <<EOF
$as_root
daemon off;
worker_processes 1;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 100000000;
    client_body_temp_path $work/nginx/tmp-body;
    proxy_temp_path $work/nginx/tmp-proxy;
    fastcgi_temp_path $work/nginx/tmp-fastcgi;
    uwsgi_temp_path $work/nginx/tmp-uwsgi;
    scgi_temp_path $work/nginx/tmp-scgi;
    server {
        listen 127.0.0.1:$up_port backlog=4096;
        location / { default_type text/plain; return 200 "fast upstream\n"; }
    }
}
EOF
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" >"$work/nginx/stderr.log" 2>&1 &
pids+=($!)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$work" --logfile "$work/redis.log" --daemonize no >/dev/null 2>&1 &
redis_pid=$!
pids+=($redis_pid)
for n in $(seq 100); do
    [ "$(redis-cli -p "$redis_port" PING 2>/dev/null)" = PONG ] && break
    sleep 0.1
done
[ "$(redis-cli -p "$redis_port" PING 2>/dev/null)" = PONG ] || fail "redis-server does not answer"

# --- the instances --------------------------------------------------------------------------
targets=()
masters=()
admins=()
table=$((keys * 2 > 65536 ? keys * 2 : 65536))
for i in $(seq 0 $((instances - 1))); do
    port=${ports[$((2 + 2 * i))]}
    admin=${ports[$((3 + 2 * i))]}
    conf="$work/bw$i.json"
    cat >"$conf" <<EOF
{
  "workers": 1,
  "listeners": [{"address": "127.0.0.1:$port"}],
  "admin": {"address": "127.0.0.1:$admin"},
  "upstreams": {"bench": {"servers": ["127.0.0.1:$up_port"], "keepalive_max_idle": 1024}},
  "routes": [{"path_prefix": "/", "upstream": "bench", "rate_limit": "per_key"}],
  "rate_limits": {"per_key": {"key": "header:X-Api-Key", "capacity": $capacity,
                              "refill_per_sec": $refill}},
  "rate_limit_table_size": $table,
  "log": {"access_log": "off", "error_log": "$work/bw$i.log"},
  "redis": {"url": "redis://127.0.0.1:$redis_port", "key_prefix": "bench",
            "sync_interval_ms": $interval},
  "shutdown_timeout_ms": 2000
}
EOF
    "$bin" -t -c "$conf" >/dev/null 2>&1 || { "$bin" -t -c "$conf" >&2 || true; fail "invalid $conf"; }
    "$bin" -c "$conf" >"$work/bw$i.stdout" 2>"$work/bw$i.stderr" &
    pids+=($!)
    masters+=($!)
    targets+=("127.0.0.1:$port")
    admins+=("$admin")
done
for i in $(seq 0 $((instances - 1))); do
    for n in $(seq 150); do
        # Connected and through a first full round (the sync age is finite).
        curl -s "http://127.0.0.1:${admins[$i]}/metrics" 2>/dev/null |
            awk '$1 == "breakwater_redis_sync_age_seconds" && $2 != "+Inf" {ok = 1} END {exit !ok}' &&
            break
        alive "${masters[$i]}" || fail "instance $i exited: $(tail -n 5 "$work/bw$i.stderr")"
        sleep 0.1
    done
done

# --- measurement ----------------------------------------------------------------------------
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kb() { awk '$1 == "VmRSS:" {print $2}' "/proc/$1/status"; }
redis_cpu() { redis-cli -p "$redis_port" INFO cpu | tr -d '\r' |
    awk -F: '$1 == "used_cpu_user" || $1 == "used_cpu_sys" {s += $2} END {printf "%.3f", s}'; }
hz=$(getconf CLK_TCK)

sampler() { # writes "instance age" lines every 0.5 s until killed
    while true; do
        for i in $(seq 0 $((instances - 1))); do
            age=$(curl -s --max-time 1 "http://127.0.0.1:${admins[$i]}/metrics" |
                awk '$1 == "breakwater_redis_sync_age_seconds" {print $2}')
            echo "$i ${age:-nan}"
        done
        sleep 0.5
    done
}

r0=$(redis_cpu)
m0=()
for p in "${masters[@]}"; do m0+=("$(cpu_ticks "$p")"); done
t0=$(date +%s.%N)
sampler >"$work/ages.txt" 2>/dev/null &
sampler_pid=$!
pids+=($sampler_pid)
per_key=()
[ "$mode" = accuracy ] && per_key=(--per-key "$work/per-key.txt")
"$work/keyload" --rate "$rate" --keys "$keys" --seconds "$duration" --conns 16 \
    "${per_key[@]}" "${targets[@]}" >"$work/load.txt"
t1=$(date +%s.%N)
stop_pid "$sampler_pid"
r1=$(redis_cpu)
m1=()
rss=()
for p in "${masters[@]}"; do m1+=("$(cpu_ticks "$p")"); rss+=("$(rss_kb "$p")"); done
distinct=$(redis-cli -p "$redis_port" --scan --pattern 'bench:rate-limit:*' | wc -l)

python3 - "$mode" "$work/load.txt" "$work/ages.txt" "$t0" "$t1" "$r0" "$r1" "$hz" \
    "$interval" "$instances" "$keys" "$rate" "$capacity" "$refill" "$distinct" \
    "${m0[*]}" "${m1[*]}" "${rss[*]}" "$work/per-key.txt" <<'EOF'
import math, sys
(mode, load, ages, t0, t1, r0, r1, hz, interval, n, keys, rate, cap, refill, distinct,
 m0, m1, rss, per_key) = sys.argv[1:]
t = float(t1) - float(t0)
f = dict(zip(*[iter(open(load).read().split())] * 2))
print("load: %s req/s offered, %.0f req/s sent over %.1f s to %s instances; ok %s, 429 %s, "
      "other %s, errors %s" % (rate, int(f["sent"]) / float(f["elapsed"]), float(f["elapsed"]), n,
                               f["ok"], f["limited"], f["other"], f["errors"]))
print("keys: %s in the key space, %s with a fleet hash in Redis" % (keys, distinct))
print("redis CPU: %.1f %% of one core" % ((float(r1) - float(r0)) / t * 100))
m0, m1 = [int(x) for x in m0.split()], [int(x) for x in m1.split()]
for i, (a, b, r) in enumerate(zip(m0, m1, rss.split())):
    print("instance %d master: CPU %.1f %% of one core, RSS %.1f MB"
          % (i, (b - a) / float(hz) / t * 100, int(r) / 1024.0))
per = {}
for line in open(ages):
    i, age = line.split()
    if age != "nan":
        per.setdefault(i, []).append(float(age))
iv = float(interval) / 1000.0
for i in sorted(per):
    v = per[i]
    print("instance %s sync age: mean %.3f s (%.2f intervals), max %.3f s (%.2f intervals)"
          % (i, sum(v) / len(v), sum(v) / len(v) / iv, max(v), max(v) / iv))
if mode == "accuracy":
    counts = sorted(int(l.split()[1]) for l in open(per_key))
    want = float(cap) + float(refill) * float(f["elapsed"])
    total = sum(counts)
    def pct(p):
        return counts[min(len(counts) - 1, int(math.ceil(p / 100.0 * len(counts))) - 1)]
    print("accuracy: %d accepted against %.0f expected (C + R*T per key x %d keys): %+.2f %%"
          % (total, want * len(counts), len(counts), (total / (want * len(counts)) - 1) * 100))
    print("per key: p1 %d (%+.1f %%), median %d, p99 %d (%+.1f %%) of %.1f"
          % (pct(1), (pct(1) / want - 1) * 100, pct(50), pct(99), (pct(99) / want - 1) * 100,
             want))
EOF
