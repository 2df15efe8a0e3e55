#!/usr/bin/env bash
# Side-by-side throughput comparison of breakwater, nginx and HAProxy.
#
# Every proxy forwards to the same upstream (a separate nginx answering a fixed 128-byte body)
# with the same worker count, keep-alive on both sides, access logs off and the same timeouts.
# wrk drives each one over plain HTTP and over TLS (same self-signed certificate for all) at each
# connection count. For every run the script records requests/s and p99 latency from wrk, the CPU
# time the proxy's own processes used per request (from /proc/<pid>/stat), and wrk's error
# counts; then it prints a table and breakwater's ratio to nginx.
#
# Everything lives in a private temporary directory that the exit trap removes, after stopping
# every process this script started. Only loopback addresses are used.
#
# See test/bench/README.md for what each figure means and the caveats.

set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

duration=10
warmup=2
connections="64 1000"
workers=1
only="breakwater nginx haproxy"
modes="plain tls"
bin="$repo/build/breakwater"
threads=1
pin=auto
markdown=0
keep=0
baseline=1

usage() {
    cat <<EOF
usage: $(basename "$0") [options]

  --duration S        measured seconds per run (default $duration)
  --warmup S          warm-up seconds before each run (default $warmup; 0 disables)
  --connections "N.." connection counts (default "$connections")
  --workers N         worker processes / threads for each proxy (default $workers)
  --only NAME         run only this proxy: breakwater, nginx or haproxy (repeatable)
  --modes "M.."       plain and/or tls (default "$modes")
  --bin PATH          breakwater binary (default <repo>/build/breakwater)
  --threads N         wrk threads (default $threads)
  --no-pin            do not pin the proxy and the load generator to separate CPUs
  --no-baseline       skip the direct-to-upstream reference run
  --markdown          also print the results as Markdown tables
  --keep              keep the temporary directory (configs, logs, raw wrk output)
  -h, --help          this text
EOF
}

only_set=0
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) duration="$2"; shift 2 ;;
        --warmup) warmup="$2"; shift 2 ;;
        --connections) connections="$2"; shift 2 ;;
        --workers) workers="$2"; shift 2 ;;
        --only)
            if [ "$only_set" = 0 ]; then only=""; only_set=1; fi
            only="$only $2"; shift 2 ;;
        --modes) modes="$2"; shift 2 ;;
        --bin) bin="$2"; shift 2 ;;
        --threads) threads="$2"; shift 2 ;;
        --no-pin) pin=no; shift ;;
        --no-baseline) baseline=0; shift ;;
        --markdown) markdown=1; shift ;;
        --keep) keep=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "compare.sh: unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
done

die() { echo "compare.sh: $*" >&2; exit 1; }
say() { echo "== $*" >&2; }

is_uint() { case "$1" in ''|*[!0-9]*) return 1 ;; *) return 0 ;; esac; }
at_least() { is_uint "$1" && [ "$1" -ge "$2" ]; }
at_least "$duration" 1 || die "--duration must be a whole number of seconds >= 1"
is_uint "$warmup" || die "--warmup must be a whole number of seconds"
at_least "$workers" 1 || die "--workers must be >= 1"
at_least "$threads" 1 || die "--threads must be >= 1"
for c in $connections; do
    at_least "$c" "$threads" || die "bad connection count '$c' (must be >= --threads)"
done
for p in $only; do
    case "$p" in breakwater|nginx|haproxy) ;; *) die "unknown proxy '$p'" ;; esac
done
for m in $modes; do
    case "$m" in plain|tls) ;; *) die "unknown mode '$m' (plain or tls)" ;; esac
done

# --- tools ---------------------------------------------------------------------------------
need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found in PATH${2:+ ($2)}"; }
need wrk
need curl
need openssl
need nginx "the upstream is an nginx instance"
need python3
case " $only " in *" haproxy "*) need haproxy ;; esac
case " $only " in
    *" breakwater "*)
        [ -x "$bin" ] || die "breakwater binary not found at $bin (build it, pass --bin, or use --only)"
        bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")" ;;
esac
nginx_bin="$(command -v nginx)"
report="$here/report.py"
clk_tck="$(getconf CLK_TCK)"

# --- file descriptors ----------------------------------------------------------------------
max_conn=0
for c in $connections; do [ "$c" -gt "$max_conn" ] && max_conn=$c; done
# Each proxied connection costs the proxy two descriptors and wrk one. Take as many as the hard
# limit allows (up to 65536) and fail early if that is not enough for the largest run.
want_nofile=65536
hard="$(ulimit -Hn)"
if [ "$hard" != unlimited ] && [ "$hard" -lt "$want_nofile" ]; then
    want_nofile="$hard"
fi
[ "$want_nofile" -ge $((max_conn * 2 + 256)) ] ||
    die "open-file hard limit $hard is too low for $max_conn connections (raise it: ulimit -Hn)"
ulimit -n "$want_nofile"
nofile="$(ulimit -n)"
# HAProxy refuses to start when maxconn needs more descriptors than it may open.
ha_maxconn=$(((nofile - 256) / 2))

# --- CPU placement -------------------------------------------------------------------------
# On a small machine the proxy, the upstream and wrk share the cores. With one worker we give
# the proxy CPU 0 to itself and put the upstream and wrk on the remaining CPUs, so every proxy
# sees the same interference. With several workers the proxy gets all CPUs but the last.
ncpu="$(nproc)"
proxy_cpus=""
load_cpus=""
on_proxy=()
on_load=()
cpu_range() { if [ "$1" = "$2" ]; then echo "$1"; else echo "$1-$2"; fi; }
if [ "$pin" = auto ] && command -v taskset >/dev/null 2>&1 && [ "$ncpu" -ge 2 ]; then
    if [ "$workers" -lt "$ncpu" ]; then
        proxy_cpus="$(cpu_range 0 $((workers - 1)))"
        load_cpus="$(cpu_range "$workers" $((ncpu - 1)))"
        # Prefixes for simple commands, so that "$!" is the server itself, not a subshell.
        on_proxy=(taskset -c "$proxy_cpus")
        on_load=(taskset -c "$load_cpus")
    fi
fi

# --- temporary directory and cleanup -------------------------------------------------------
tmp="$(mktemp -d "${TMPDIR:-/tmp}/breakwater-bench.XXXXXX")"
started=()

. "$here/lib.sh"

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local i
    for ((i = ${#started[@]} - 1; i >= 0; i--)); do stop_pid "${started[$i]}"; done
    if [ "$keep" = 1 ]; then
        echo "compare.sh: kept $tmp" >&2
    else
        rm -rf "$tmp"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- ports ---------------------------------------------------------------------------------
read -r up_port bw_port bw_tls_port bw_admin_port ngx_port ngx_tls_port ha_port ha_tls_port \
    <<<"$(free_ports 8)"

# --- certificate ---------------------------------------------------------------------------
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$tmp/server.key" -out "$tmp/server.crt" >"$tmp/openssl.log" 2>&1 ||
    die "openssl could not create the certificate (see $tmp/openssl.log)"
cat "$tmp/server.crt" "$tmp/server.key" >"$tmp/server.pem"

# --- configurations (templates in conf/, filled with sed) ---------------------------------
body="$(head -c 128 /dev/zero | tr '\0' 'b')"
nginx_user=""
[ "$(id -u)" = 0 ] && nginx_user="user root;"
render() { # template output
    sed -e "s|@TMP@|$tmp|g" -e "s|@UP_PORT@|$up_port|g" -e "s|@BODY@|$body|g" \
        -e "s|@WORKERS@|$workers|g" -e "s|@NGINX_USER@|$nginx_user|g" \
        -e "s|@BW_PORT@|$bw_port|g" -e "s|@BW_TLS_PORT@|$bw_tls_port|g" \
        -e "s|@BW_ADMIN_PORT@|$bw_admin_port|g" \
        -e "s|@NGX_PORT@|$ngx_port|g" -e "s|@NGX_TLS_PORT@|$ngx_tls_port|g" \
        -e "s|@HA_MAXCONN@|$ha_maxconn|g" -e "s|@HA_PORT@|$ha_port|g" -e "s|@HA_TLS_PORT@|$ha_tls_port|g" \
        "$here/conf/$1" >"$tmp/$2"
}
mkdir -p "$tmp/upstream" "$tmp/nginx"
render upstream-nginx.conf upstream/nginx.conf
render proxy-nginx.conf nginx/nginx.conf
render haproxy.cfg haproxy.cfg
render breakwater.json breakwater.json

# --- processes ------------------------------------------------------------------------------
# Waits until URL answers 200 with the upstream's body, or fails with the log's tail.
wait_up() { # name url pid log
    local name="$1" url="$2" pid="$3" log="$4" i got
    for i in $(seq 1 100); do
        if ! alive "$pid"; then
            tail -n 20 "$log" >&2 || true
            die "$name exited during start-up (its log is above; --keep keeps $log)"
        fi
        got="$(curl -sk --max-time 1 "$url" 2>/dev/null || true)"
        [ "$got" = "$body" ] && return 0
        sleep 0.1
    done
    tail -n 20 "$log" >&2 || true
    die "$name did not answer 200 with the upstream body on $url within 10 s"
}

# Sum of utime+stime, in clock ticks, of a process and all its descendants (master + workers).
# Field numbers count from after the ")" that ends the command name, which may contain spaces:
# there utime and stime are the 12th and 13th fields (14 and 15 of proc(5)).
proc_ticks() {
    local root="$1" total=0 p rest kid
    rest="$(cat "/proc/$root/stat" 2>/dev/null)" || { echo 0; return; }
    rest="${rest##*) }"
    # shellcheck disable=SC2086
    set -- $rest
    total=$(( ${12} + ${13} ))
    for kid in $(pgrep -P "$root" 2>/dev/null || true); do
        total=$((total + $(proc_ticks "$kid")))
    done
    echo "$total"
}

results="$tmp/results.tsv"
printf 'proxy\tmode\tconns\trequests\trps\tp99_us\tcpu_us_per_req\tcpu_pct\tnon2xx\tsock_errors\n' >"$results"

# Runs wrk against URL once for warm-up and once measured, accounting CPU of PID's tree.
measure() { # label mode conns url pid
    local label="$1" mode="$2" conns="$3" url="$4" pid="$5" out t0 t1 parsed
    out="$tmp/wrk-$label-$mode-$conns.txt"
    if [ "$warmup" -gt 0 ]; then
        "${on_load[@]}" wrk -t "$threads" -c "$conns" -d "${warmup}s" "$url" >/dev/null 2>&1 || true
    fi
    alive "$pid" || die "$label died during warm-up"
    t0="$(proc_ticks "$pid")"
    "${on_load[@]}" wrk -t "$threads" -c "$conns" -d "${duration}s" --latency "$url" >"$out" 2>&1 ||
        die "wrk failed against $label ($url): $(tail -n 3 "$out")"
    t1="$(proc_ticks "$pid")"
    alive "$pid" || die "$label died during the measured run"
    parsed="$(python3 "$report" wrk "$out" "$((t1 - t0))" "$clk_tck" "$duration")" ||
        die "could not parse wrk output $out"
    printf '%s\t%s\t%s\t%s\n' "$label" "$mode" "$conns" "$parsed" >>"$results"
    say "$label $mode c=$conns: $(python3 "$report" line "$results")"
}

start_upstream() {
    "${on_load[@]}" "$nginx_bin" -p "$tmp/upstream" -c "$tmp/upstream/nginx.conf" \
        >"$tmp/upstream/stderr.log" 2>&1 &
    up_pid=$!
    started+=("$up_pid")
    wait_up "upstream nginx" "http://127.0.0.1:$up_port/" "$up_pid" "$tmp/upstream/stderr.log"
}

# Starts one proxy and records its pid and URLs in pids[NAME], plain_urls[NAME], tls_urls[NAME].
declare -A pids plain_urls tls_urls
start_proxy() { # name
    local name="$1" log pid
    case "$name" in
        nginx)
            log="$tmp/nginx/stderr.log"
            "${on_proxy[@]}" "$nginx_bin" -p "$tmp/nginx" -c "$tmp/nginx/nginx.conf" >"$log" 2>&1 &
            pid=$!
            plain_urls[$name]="http://127.0.0.1:$ngx_port/"
            tls_urls[$name]="https://127.0.0.1:$ngx_tls_port/" ;;
        haproxy)
            log="$tmp/haproxy.log"
            "${on_proxy[@]}" haproxy -db -f "$tmp/haproxy.cfg" >"$log" 2>&1 &
            pid=$!
            plain_urls[$name]="http://127.0.0.1:$ha_port/"
            tls_urls[$name]="https://127.0.0.1:$ha_tls_port/" ;;
        breakwater)
            log="$tmp/breakwater.log"
            "${on_proxy[@]}" "$bin" -c "$tmp/breakwater.json" >"$log" 2>&1 &
            pid=$!
            plain_urls[$name]="http://127.0.0.1:$bw_port/"
            tls_urls[$name]="https://127.0.0.1:$bw_tls_port/" ;;
    esac
    pids[$name]=$pid
    started+=("$pid")
    wait_up "$name" "${plain_urls[$name]}" "$pid" "$log"
    case " $modes " in *" tls "*) wait_up "$name (TLS)" "${tls_urls[$name]}" "$pid" "$log" ;; esac
}

# --- environment report --------------------------------------------------------------------
env_file="$tmp/environment.txt"
{
    echo "date:       $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "kernel:     $(uname -sr)"
    echo "load avg:   $(cut -d' ' -f1-3 /proc/loadavg) (before the runs; other load skews every figure)"
    echo "cpu:        $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1) x $ncpu"
    echo "wrk:        $(wrk -v 2>&1 | head -n 1 | sed 's/ Copyright.*//')"
    echo "nginx:      $("$nginx_bin" -v 2>&1 | sed 's/^nginx version: //')"
    case " $only " in *" haproxy "*) echo "haproxy:    $(haproxy -v | head -n 1)" ;; esac
    case " $only " in *" breakwater "*) echo "breakwater: $("$bin" -V 2>&1 | head -n 1)" ;; esac
    echo "openssl:    $(openssl version)"
    echo "settings:   workers=$workers wrk_threads=$threads duration=${duration}s warmup=${warmup}s" \
        "connections=[$connections] modes=[$modes] nofile=$nofile"
    if [ -n "$proxy_cpus" ]; then
        echo "placement:  proxy on CPU $proxy_cpus; upstream and wrk on CPU $load_cpus"
    else
        echo "placement:  not pinned (proxy, upstream and wrk share all $ncpu CPUs)"
    fi
} >"$env_file"
cat "$env_file" >&2

# --- run -----------------------------------------------------------------------------------
start_upstream
if [ "$baseline" = 1 ]; then
    for c in $connections; do
        measure upstream-direct plain "$c" "http://127.0.0.1:$up_port/" "$up_pid"
    done
fi
# All proxies run at once (an idle one costs nothing) and the runs are interleaved, proxy by proxy
# within each cell of the matrix, so a change in background load affects all of them alike.
names=""
for name in breakwater nginx haproxy; do
    case " $only " in *" $name "*) names="$names $name" ;; esac
done
for name in $names; do
    say "starting $name"
    start_proxy "$name"
done
for m in $modes; do
    for c in $connections; do
        for name in $names; do
            if [ "$m" = tls ]; then url="${tls_urls[$name]}"; else url="${plain_urls[$name]}"; fi
            measure "$name" "$m" "$c" "$url" "${pids[$name]}"
        done
    done
done

echo
cat "$env_file"
echo
python3 "$report" table "$results"
if [ "$markdown" = 1 ]; then
    echo
    python3 "$report" markdown "$results"
fi
python3 "$report" check "$results" || die "some runs had errors (see the errors column): figures are not valid"
