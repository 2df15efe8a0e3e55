#!/usr/bin/env bash
# What Redis synchronisation costs in throughput. Not a test: it prints figures.
#
# Two breakwater instances with the same configuration (1 worker, one rate-limited route in
# front of a fast nginx upstream), except that one has a "redis" section (sync every 100 ms to a
# local redis-server) and the other has none. The policy is generous enough that every request
# is accepted, so every request takes a token that the synchronised instance must send to Redis.
# --keys 1 drives one client key (one X-Api-Key value); --keys N > 1 sends N distinct keys (a
# different X-Api-Key on every request, cycling), so each sync round carries many keys.
#
# Runs alternate (sync on, sync off, on, off, ...) and the median req/s of --rounds runs is
# reported for each, with their ratio. Everything listens on free loopback ports and lives in a
# temporary directory removed on exit, after every process this script started is stopped.

set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

duration=10
warmup=2
rounds=3
conns=64
keys=1
interval=100
bin="$repo/build/breakwater"
keep=0
pin=auto

usage() {
    cat <<EOF
usage: $(basename "$0") [options]

  --duration S     measured seconds per run (default $duration)
  --warmup S       warm-up seconds before each run (default $warmup; 0 disables)
  --rounds N       measured runs per configuration, alternating; median shown (default $rounds)
  --connections N  wrk connections (default $conns)
  --keys N         distinct client keys (default $keys: one key)
  --interval MS    redis.sync_interval_ms of the synchronised instance (default $interval)
  --bin PATH       breakwater binary (default <repo>/build/breakwater)
  --no-pin         do not pin the proxies to CPU 0 and the load to the other CPUs
  --keep           keep the temporary directory (configurations, logs, raw wrk output)
  -h, --help       this text
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --duration) duration="$2"; shift 2 ;;
        --warmup) warmup="$2"; shift 2 ;;
        --rounds) rounds="$2"; shift 2 ;;
        --connections) conns="$2"; shift 2 ;;
        --keys) keys="$2"; shift 2 ;;
        --interval) interval="$2"; shift 2 ;;
        --bin) bin="$2"; shift 2 ;;
        --no-pin) pin=no; shift ;;
        --keep) keep=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "redis_overhead.sh: unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
done

fail() { echo "redis_overhead.sh: $*" >&2; exit 1; }
note() { echo "-- $*" >&2; }
is_count() { case "$1" in ''|*[!0-9]*) return 1 ;; *) return 0 ;; esac; }
is_count "$duration" && [ "$duration" -ge 1 ] || fail "--duration: a whole number >= 1"
is_count "$warmup" || fail "--warmup: a whole number"
is_count "$rounds" && [ "$rounds" -ge 1 ] || fail "--rounds: a whole number >= 1"
is_count "$conns" && [ "$conns" -ge 1 ] || fail "--connections: a whole number >= 1"
is_count "$keys" && [ "$keys" -ge 1 ] || fail "--keys: a whole number >= 1"
is_count "$interval" && [ "$interval" -ge 1 ] || fail "--interval: a whole number >= 1"

for tool in wrk nginx redis-server redis-cli curl python3; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool not found in PATH"
done
[ -x "$bin" ] || fail "breakwater binary not found at $bin (ninja -C build, or --bin)"
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

proxy_cpu=()
load_cpu=()
if [ "$pin" = auto ] && command -v taskset >/dev/null 2>&1 && [ "$(nproc)" -ge 2 ]; then
    proxy_cpu=(taskset -c 0)
    load_cpu=(taskset -c "1-$(($(nproc) - 1))")
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/breakwater-redis-overhead.XXXXXX")"
pids=()

. "$here/lib.sh"

on_exit() {
    local rc=$? i
    trap - EXIT INT TERM
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do stop_pid "${pids[$i]}"; done
    if [ "$keep" = 1 ]; then echo "redis_overhead.sh: kept $work" >&2; else rm -rf "$work"; fi
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

read -r up_port redis_port on_port on_admin off_port off_admin <<<"$(free_ports 6)"

await_200() { # what url pid logfile
    local n
    for n in $(seq 100); do
        alive "$3" || { tail -n 20 "$4" >&2; fail "$1 exited during start-up"; }
        [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$2" 2>/dev/null)" = 200 ] && return 0
        sleep 0.1
    done
    tail -n 20 "$4" >&2
    fail "$1 did not answer 200 at $2 within 10 s"
}

# --- the upstream: nginx with a fixed answer --------------------------------------------------
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
"${load_cpu[@]}" nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" >"$work/nginx/stderr.log" 2>&1 &
pids+=($!)
await_200 nginx "http://127.0.0.1:$up_port/" "${pids[-1]}" "$work/nginx/stderr.log"

# --- Redis ----------------------------------------------------------------------------------
"${load_cpu[@]}" redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$work" --logfile "$work/redis.log" --daemonize no >/dev/null 2>&1 &
pids+=($!)
for n in $(seq 100); do
    [ "$(redis-cli -p "$redis_port" PING 2>/dev/null)" = PONG ] && break
    alive "${pids[-1]}" || fail "redis-server exited during start-up: $(tail -n 5 "$work/redis.log")"
    sleep 0.1
done
[ "$(redis-cli -p "$redis_port" PING 2>/dev/null)" = PONG ] || fail "redis-server does not answer"

# --- the two proxies ------------------------------------------------------------------------
proxy_config() { # file port admin_port extra
    cat >"$1" <<EOF
{
  "workers": 1,
  "listeners": [{"address": "127.0.0.1:$2"}],
  "admin": {"address": "127.0.0.1:$3"},
  "upstreams": {"bench": {"servers": ["127.0.0.1:$up_port"], "keepalive_max_idle": 1024}},
  "routes": [{"path_prefix": "/", "upstream": "bench", "rate_limit": "per_key"}],
  "rate_limits": {"per_key": {"key": "header:X-Api-Key", "capacity": 1000000000,
                              "refill_per_sec": 1000000000}},
  "rate_limit_table_size": 65536,
  "log": {"access_log": "off", "error_log": "$work/$(basename "$1" .json).log"},
  "shutdown_timeout_ms": 2000$4
}
EOF
}
proxy_config "$work/sync-on.json" "$on_port" "$on_admin" ",
  \"redis\": {\"url\": \"redis://127.0.0.1:$redis_port\", \"key_prefix\": \"bench\",
            \"sync_interval_ms\": $interval}"
proxy_config "$work/sync-off.json" "$off_port" "$off_admin" ""

for side in on off; do
    conf="$work/sync-$side.json"
    "$bin" -t -c "$conf" >/dev/null 2>&1 || { "$bin" -t -c "$conf" >&2 || true; fail "invalid $conf"; }
    "${proxy_cpu[@]}" "$bin" -c "$conf" >"$work/sync-$side.stdout" 2>"$work/sync-$side.stderr" &
    pids+=($!)
    port_var="${side}_port"
    await_200 "breakwater (sync $side)" "http://127.0.0.1:${!port_var}/" "${pids[-1]}" \
        "$work/sync-$side.stderr"
done
if ! curl -s "http://127.0.0.1:$on_admin/metrics" | grep -q '^breakwater_redis_up 1'; then
    note "warning: the synchronised instance does not report breakwater_redis_up 1 yet"
fi

# --- wrk: one key, or a different key on every request --------------------------------------
cat >"$work/keys.lua" <<EOF
local n, i = $keys, 0
request = function()
    i = i + 1
    if i > n then i = 1 end
    return wrk.format("GET", "/", { ["X-Api-Key"] = "bench-client-" .. i })
end
EOF

# One measured run: label url; appends "label req/s non2xx socket_errors" to results.
results="$work/results.txt"
: >"$results"
measure() {
    local label="$1" url="$2" out
    out="$work/wrk-$label-$(date +%s%N).txt"
    if [ "$warmup" -gt 0 ]; then
        "${load_cpu[@]}" wrk -t 1 -c "$conns" -d "${warmup}s" -s "$work/keys.lua" "$url" \
            >/dev/null 2>&1 || true
    fi
    "${load_cpu[@]}" wrk -t 1 -c "$conns" -d "${duration}s" -s "$work/keys.lua" "$url" \
        >"$out" 2>&1 || fail "wrk failed against $label: $(tail -n 3 "$out")"
    python3 - "$label" "$out" >>"$results" <<'EOF'
import re, sys
label, text = sys.argv[1], open(sys.argv[2]).read()
rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
print(label, rps.group(1) if rps else "nan", non2xx.group(1) if non2xx else 0,
      sum(int(x) for x in errs.groups()) if errs else 0)
EOF
    note "$(tail -n 1 "$results")"
}

echo "breakwater: $("$bin" -V 2>&1 | head -n 1); 1 worker; wrk 1 thread, $conns connections," \
     "${duration} s x $rounds rounds; $keys key(s); sync interval $interval ms;" \
     "pinning: ${proxy_cpu[*]:-none}"
for r in $(seq "$rounds"); do
    measure sync-on "http://127.0.0.1:$on_port/"
    measure sync-off "http://127.0.0.1:$off_port/"
done

pending="$(curl -s "http://127.0.0.1:$on_admin/metrics" | awk '$1 == "breakwater_redis_pending_deltas" {print $2}')"
errors="$(curl -s "http://127.0.0.1:$on_admin/metrics" | awk '$1 == "breakwater_redis_errors_total" {print $2}')"

python3 - "$results" "${pending:-?}" "${errors:-?}" <<'EOF'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1]) if line.strip()]
def med(label):
    return statistics.median(float(r[1]) for r in rows if r[0] == label)
on, off = med("sync-on"), med("sync-off")
bad = sum(int(r[2]) + int(r[3]) for r in rows)
print("%-10s %12s" % ("config", "req/s (median)"))
print("%-10s %12.0f" % ("sync on", on))
print("%-10s %12.0f" % ("sync off", off))
print("ratio on/off: %.3f (%+.1f %%)" % (on / off, (on / off - 1) * 100))
print("redis: pending deltas at the end %s, errors %s" % (sys.argv[2], sys.argv[3]))
if bad:
    print("INVALID: %d non-2xx responses or socket errors" % bad)
    sys.exit(1)
EOF
