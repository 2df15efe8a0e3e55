#!/usr/bin/env bash
# What circuit breakers, metrics and rate limits cost per request. Not a test: it prints figures.
#
# (a) breaker + metrics: breakwater (1 worker) in front of a small nginx that answers 200, the
#     same configuration run by two release builds of the same source: the normal one, and one
#     configured with -Dinstrumentation=false, whose request path skips breaker admission,
#     outcome recording and every metric counter. The script builds both (build-bench-on and
#     build-bench-off under the repository) unless --bin and --bin-off are given.
# (b) rate limiting with many distinct client keys: wrk sends a different X-Forwarded-For
#     address on every request (overhead/xff.lua), from 127.0.0.1, which the proxy trusts;
#     policy capacity 100, refill 100/s; the same route with and without its rate_limit. It also
#     prints the worker's memory before and after (the table is fixed-size: it must not grow).
#
# Runs are interleaved (A, B, A, B, ...) and the median of --rounds is reported, so that a change
# in background load hits both sides alike. Everything listens on free loopback ports and lives in
# a temporary directory removed on exit, after every process this script started is stopped.

set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

duration=10
warmup=2
rounds=3
conns=64
keys=1000000
table=1048576
bin=""
bin_off=""
parts="breaker ratelimit"
keep=0
pin=auto

usage() {
    cat <<EOF
usage: $(basename "$0") [options]

  --duration S     measured seconds per run (default $duration)
  --warmup S       warm-up seconds before each run (default $warmup; 0 disables)
  --rounds N       measured runs per configuration, interleaved; the median is shown (default $rounds)
  --connections N  wrk connections (default $conns)
  --keys N         distinct client addresses for the rate-limit part (default $keys, at most 4194304)
  --table N        rate_limit_table_size for the rate-limit part (default $table)
  --only PART      breaker or ratelimit (default: both)
  --bin PATH       breakwater binary (default: a release build in <repo>/build-bench-on)
  --bin-off PATH   binary built with -Dinstrumentation=false (default: <repo>/build-bench-off)
  --no-pin         do not pin the proxy to CPU 0 and the load to the other CPUs
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
        --table) table="$2"; shift 2 ;;
        --bin-off) bin_off="$2"; shift 2 ;;
        --only) parts="$2"; shift 2 ;;
        --bin) bin="$2"; shift 2 ;;
        --no-pin) pin=no; shift ;;
        --keep) keep=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "overhead.sh: unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
done

die() { echo "overhead.sh: $*" >&2; exit 1; }
say() { echo "== $*" >&2; }
uint() { case "$1" in ''|*[!0-9]*) return 1 ;; *) return 0 ;; esac; }
uint "$duration" && [ "$duration" -ge 1 ] || die "--duration must be a whole number >= 1"
uint "$warmup" || die "--warmup must be a whole number"
uint "$rounds" && [ "$rounds" -ge 1 ] || die "--rounds must be >= 1"
uint "$conns" && [ "$conns" -ge 1 ] || die "--connections must be >= 1"
uint "$keys" && [ "$keys" -ge 1 ] && [ "$keys" -le 4194304 ] || die "--keys must be 1..4194304"
uint "$table" && [ "$table" -ge 16 ] || die "--table must be >= 16"
case "$parts" in breaker|ratelimit|"breaker ratelimit") ;; *) die "--only: breaker or ratelimit" ;; esac

for tool in wrk nginx curl python3; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found in PATH"
done
# Release builds of the same source, with and without the breaker and metrics path.
release_build() { # dir [meson options...]
    local dir="$repo/$1"
    shift
    if [ ! -f "$dir/build.ninja" ]; then
        meson setup "$dir" --buildtype=release "$@" >/dev/null || die "meson setup $dir failed"
    fi
    ninja -C "$dir" breakwater >/dev/null || die "building $dir failed"
    echo "$dir/breakwater"
}
[ -n "$bin" ] || bin="$(release_build build-bench-on)"
if [[ " $parts " == *" breaker "* ]] && [ -z "$bin_off" ]; then
    bin_off="$(release_build build-bench-off -Dinstrumentation=false)"
fi
[ -x "$bin" ] || die "breakwater binary not found at $bin"
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
nginx_bin="$(command -v nginx)"
clk_tck="$(getconf CLK_TCK)"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# The proxy gets CPU 0; nginx and wrk share the others.
on_proxy=()
on_load=()
if [ "$pin" = auto ] && command -v taskset >/dev/null 2>&1 && [ "$(nproc)" -ge 2 ]; then
    on_proxy=(taskset -c 0)
    on_load=(taskset -c "1-$(($(nproc) - 1))")
fi

tmp="$(mktemp -d "${TMPDIR:-/tmp}/breakwater-overhead.XXXXXX")"
started=()

. "$here/lib.sh"

cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    for ((i = ${#started[@]} - 1; i >= 0; i--)); do stop_pid "${started[$i]}"; done
    if [ "$keep" = 1 ]; then echo "overhead.sh: kept $tmp" >&2; else rm -rf "$tmp"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

read -r up_port a_port a_admin b_port b_admin <<<"$(free_ports 5)"

# Waits until URL answers 200.
wait_200() { # name url pid log
    local i
    for i in $(seq 1 100); do
        alive "$3" || { tail -n 20 "$4" >&2; die "$1 exited during start-up"; }
        [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$2" 2>/dev/null)" = 200 ] && return 0
        sleep 0.1
    done
    tail -n 20 "$4" >&2
    die "$1 did not answer 200 on $2 within 10 s"
}

# --- upstream: nginx answering a fixed body -------------------------------------------------
mkdir -p "$tmp/nginx"
nginx_user=""
[ "$(id -u)" = 0 ] && nginx_user="user root;"
cat >"$tmp/nginx/nginx.conf" <<EOF
$nginx_user
worker_processes 1;
daemon off;
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $tmp/nginx/body;
    proxy_temp_path $tmp/nginx/proxy;
    fastcgi_temp_path $tmp/nginx/fastcgi;
    uwsgi_temp_path $tmp/nginx/uwsgi;
    scgi_temp_path $tmp/nginx/scgi;
    keepalive_requests 100000000;
    server {
        listen 127.0.0.1:$up_port backlog=4096;
        location / { default_type text/plain; return 200 "ok from the bench upstream\n"; }
    }
}
EOF
"${on_load[@]}" "$nginx_bin" -p "$tmp/nginx" -c "$tmp/nginx/nginx.conf" >"$tmp/nginx/stderr.log" 2>&1 &
up_pid=$!
started+=("$up_pid")
wait_200 nginx "http://127.0.0.1:$up_port/" "$up_pid" "$tmp/nginx/stderr.log"

# --- helpers ----------------------------------------------------------------------------------
# breakwater configuration: name port admin_port breaker_json route_extra top_extra
write_config() {
    cat >"$tmp/$1.json" <<EOF
{
  "workers": 1,
  "listeners": [{"address": "127.0.0.1:$2"}],
  "admin": {"address": "127.0.0.1:$3"},
  "upstreams": {
    "bench": {"servers": ["127.0.0.1:$up_port"], "keepalive_max_idle": 1024,
              "circuit_breaker": $4}
  },
  "routes": [{"path_prefix": "/", "upstream": "bench", "name": "bench"$5}]$6,
  "log": {"access_log": "off"},
  "shutdown_timeout_ms": 2000
}
EOF
    "$bin" -t -c "$tmp/$1.json" >"$tmp/$1.check" 2>&1
}

declare -A pid_of
start_bw() { # name port [binary]
    "${on_proxy[@]}" "${3:-$bin}" -c "$tmp/$1.json" >"$tmp/$1.log" 2>&1 &
    pid_of[$1]=$!
    started+=("${pid_of[$1]}")
    wait_200 "breakwater ($1)" "http://127.0.0.1:$2/" "${pid_of[$1]}" "$tmp/$1.log"
}

stop_bw() { stop_pid "${pid_of[$1]}"; }

# utime + stime (clock ticks) of a process and its children.
ticks() {
    local total=0 p rest
    for p in "$1" $(pgrep -P "$1" 2>/dev/null || true); do
        rest="$(cat "/proc/$p/stat" 2>/dev/null)" || continue
        rest="${rest##*) }"
        # shellcheck disable=SC2086
        set -- $rest
        total=$((total + ${12} + ${13}))
    done
    echo "$total"
}

worker_of() { pgrep -P "$1" | head -n 1; }

mem() { # "VmRSS RssAnon RssShmem" in kB of a process
    awk '/^VmRSS:/ {r=$2} /^RssAnon:/ {a=$2} /^RssShmem:/ {s=$2} END {print r, a, s}' \
        "/proc/$1/status"
}

# One wrk run: name url [script [script args...]]; appends
# "name rps cpu_us_per_req non2xx errors" to the results.
results="$tmp/results.txt"
: >"$results"
run_wrk() {
    local name="$1" url="$2" out t0 t1 script=()
    shift 2
    if [ $# -gt 0 ]; then script=(-s "$1"); shift; fi
    out="$tmp/wrk-$name-$(date +%s%N).txt"
    if [ "$warmup" -gt 0 ]; then
        "${on_load[@]}" wrk -t 1 -c "$conns" -d "${warmup}s" "${script[@]}" "$url" "$@" >/dev/null 2>&1 || true
    fi
    t0="$(ticks "${pid_of[$name]}")"
    "${on_load[@]}" wrk -t 1 -c "$conns" -d "${duration}s" "${script[@]}" "$url" "$@" >"$out" 2>&1 ||
        die "wrk failed against $name: $(tail -n 3 "$out")"
    t1="$(ticks "${pid_of[$name]}")"
    last_requests="$(sed -n 's/^ *\([0-9][0-9]*\) requests in.*/\1/p' "$out")"
    python3 - "$name" "$out" "$((t1 - t0))" "$clk_tck" >>"$results" <<'EOF'
import re, sys
name, path, ticks, hz = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
text = open(path).read()
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
reqs = int(re.search(r"(\d+) requests in", text).group(1))
non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
errors = sum(int(x) for x in errs.groups()) if errs else 0
cpu_us = ticks * 1e6 / hz / reqs if reqs else float("nan")
print(name, "%.0f" % rps, "%.2f" % cpu_us, non2xx.group(1) if non2xx else 0, errors)
EOF
    say "$(tail -n 1 "$results" | awk '{printf "%-14s %10s req/s  %6s us CPU/req  non-2xx %s  errors %s", $1, $2, $3, $4, $5}')"
}

# Prints the median of both configurations and their ratio.
summary() { # title a b
    python3 - "$results" "$2" "$3" "$1" <<'EOF'
import statistics, sys
path, a, b, title = sys.argv[1:5]
rows = [l.split() for l in open(path) if l.strip()]
def med(name, col):
    return statistics.median(float(r[col]) for r in rows if r[0] == name)
def bad(name):
    return sum(int(r[3]) + int(r[4]) for r in rows if r[0] == name)
print()
print(title)
print("  %-14s %12s %14s %10s" % ("config", "req/s", "CPU us/req", "bad resp"))
for n in (a, b):
    print("  %-14s %12.0f %14.2f %10d" % (n, med(n, 1), med(n, 2), bad(n)))
print("  %s / %s: throughput %.3f, CPU per request %.3f"
      % (a, b, med(a, 1) / med(b, 1), med(a, 2) / med(b, 2)))
EOF
}

echo "load average before the runs: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "breakwater: $("$bin" -V 2>&1 | head -n 1); wrk: 1 thread, $conns connections;" \
    "${duration}s per run, $rounds round(s), warm-up ${warmup}s;" \
    "placement: ${on_proxy[*]:-not pinned}"

# --- (a) breaker + metrics ------------------------------------------------------------------
if [[ " $parts " == *" breaker "* ]]; then
    write_config on "$a_port" "$a_admin" '{}' '' '' || die "configuration refused: $(cat "$tmp/on.check")"
    write_config off "$b_port" "$b_admin" '{}' '' '' || die "configuration refused: $(cat "$tmp/off.check")"
    start_bw on "$a_port"
    start_bw off "$b_port" "$bin_off"
    for r in $(seq 1 "$rounds"); do
        run_wrk on "http://127.0.0.1:$a_port/"
        run_wrk off "http://127.0.0.1:$b_port/"
    done
    stop_bw on
    stop_bw off
    summary "(a) breakers + metrics on every request (on) vs a build without them (off)" on off
    : >"$results"
fi

# --- (b) rate limiting with many distinct keys ----------------------------------------------
if [[ " $parts " == *" ratelimit "* ]]; then
    policy='"rate_limits": {"per_client": {"key": "client_ip", "capacity": 100, "refill_per_sec": 100}},
  "trusted_proxies": ["127.0.0.1/32"],
  "rate_limit_table_size": '"$table"
    write_config limited "$a_port" "$a_admin" '{}' ', "rate_limit": "per_client"' ",
  $policy" || die "configuration refused: $(cat "$tmp/limited.check")"
    write_config unlimited "$b_port" "$b_admin" '{}' '' ",
  $policy" || die "configuration refused: $(cat "$tmp/unlimited.check")"
    start_bw limited "$a_port"
    start_bw unlimited "$b_port"
    w_lim="$(worker_of "${pid_of[limited]}")"
    read -r rss0 anon0 shm0 <<<"$(mem "$w_lim")"
    per_round=""
    sent=0  # each run continues through the key space where the previous one stopped
    for r in $(seq 1 "$rounds"); do
        run_wrk limited "http://127.0.0.1:$a_port/" "$here/overhead/xff.lua" "$keys" \
            "$((sent % keys))"
        sent=$((sent + ${last_requests:-0}))
        per_round="$per_round
    round $r ($sent requests so far): $(mem "$w_lim" | awk '{print "VmRSS " $1 " RssAnon " $2 " RssShmem " $3}')"
        run_wrk unlimited "http://127.0.0.1:$b_port/" "$here/overhead/xff.lua" "$keys" \
            "$((sent % keys))"
    done
    [ "$sent" -ge "$keys" ] ||
        echo "note: only $sent measured requests were sent to the limited proxy, fewer than" \
            "$keys keys: use a longer --duration or more --rounds to cycle through all of them"
    w_now="$(worker_of "${pid_of[limited]}")"
    [ "$w_now" = "$w_lim" ] || echo "warning: the limited proxy's worker was replaced during the runs"
    read -r rss1 anon1 shm1 <<<"$(mem "$w_now")"
    limited_total="$(curl -s "http://127.0.0.1:$a_admin/metrics" |
        awk '/^breakwater_rate_limited_total\{policy="per_client"\}/ {print $2}')"
    keys_gauge="$(curl -s "http://127.0.0.1:$a_admin/metrics" |
        awk '/^breakwater_rate_limit_keys\{policy="per_client"\}/ {print $2}')"
    stop_bw limited
    stop_bw unlimited
    summary "(b) rate limiting, $keys distinct keys via X-Forwarded-For, table $table entries: on vs off" \
        limited unlimited
    echo "  limited worker memory (kB)  before: VmRSS $rss0 RssAnon $anon0 RssShmem $shm0"
    echo "                              after:  VmRSS $rss1 RssAnon $anon1 RssShmem $shm1"
    echo "  limited worker memory after each measured round (kB):${per_round}"
    echo "  breakwater_rate_limited_total ${limited_total:-?}, breakwater_rate_limit_keys ${keys_gauge:-?}"
    cat <<'EOF'
  RssShmem grows while the fixed table's pages are first touched (up to the table size) and then
  stays; RssAnon (the worker's private memory) must not grow with the number of keys: compare the
  rounds, each of which continues with new keys.
EOF
fi
