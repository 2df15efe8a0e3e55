#!/usr/bin/env bash
# Client errors while breakwater is reloaded under keep-alive load. Not a test: it prints figures
# (test/integration/test_reload_drain.py is the test that requires zero).
#
# wrk keeps --connections busy keep-alive connections through breakwater (2 workers) to a small
# nginx, while the script sends --reloads SIGHUPs, one every --interval seconds; each SIGHUP starts
# a new generation of workers and drains the old one. wrk's "Socket errors" line (connect, read,
# write, timeout) and its count of non-2xx responses are what clients lost. Everything listens on
# free loopback ports and lives in a temporary directory removed on exit.

set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
bin="$repo/build/breakwater"
conns=64
reloads=10
interval=0.5

while [ $# -gt 0 ]; do
    case "$1" in
        --bin) bin="$2"; shift 2 ;;
        --connections) conns="$2"; shift 2 ;;
        --reloads) reloads="$2"; shift 2 ;;
        --interval) interval="$2"; shift 2 ;;
        -h|--help) echo "usage: $(basename "$0") [--bin PATH] [--connections N] [--reloads N] [--interval S]"; exit 0 ;;
        *) echo "reload_load.sh: unknown option: $1" >&2; exit 2 ;;
    esac
done
die() { echo "reload_load.sh: $*" >&2; exit 1; }
for tool in wrk nginx curl python3; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found in PATH"
done
[ -x "$bin" ] || die "breakwater binary not found at $bin"
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"

. "$here/lib.sh"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/breakwater-reload.XXXXXX")"
started=()
cleanup() {
    local p
    for p in "${started[@]}"; do stop_pid "$p"; done
    rm -rf "$tmp"
}
trap cleanup EXIT

read -r up_port bw_port admin_port < <(free_ports 3)
wait_200() { # name url pid log
    local i
    for i in $(seq 1 100); do
        alive "$3" || { tail -n 20 "$4" >&2; die "$1 exited during start-up"; }
        [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$2" 2>/dev/null)" = 200 ] && return 0
        sleep 0.1
    done
    die "$1 did not answer 200 on $2 within 10 s"
}

mkdir -p "$tmp/nginx"
nginx_user=""
[ "$(id -u)" = 0 ] && nginx_user="user root;"
cat >"$tmp/nginx/nginx.conf" <<CONF
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
        location / { default_type text/plain; return 200 "ok\n"; }
    }
}
CONF
nginx -p "$tmp/nginx" -c "$tmp/nginx/nginx.conf" >"$tmp/nginx/stderr.log" 2>&1 &
started+=("$!")
wait_200 nginx "http://127.0.0.1:$up_port/" "$!" "$tmp/nginx/stderr.log"

cat >"$tmp/bw.json" <<CONF
{
  "workers": 2,
  "listeners": [{"address": "127.0.0.1:$bw_port"}],
  "admin": {"address": "127.0.0.1:$admin_port"},
  "upstreams": {"bench": {"servers": ["127.0.0.1:$up_port"], "keepalive_max_idle": 1024}},
  "routes": [{"path_prefix": "/", "upstream": "bench"}],
  "log": {"access_log": "off"},
  "shutdown_timeout_ms": 10000
}
CONF
"$bin" -c "$tmp/bw.json" >"$tmp/bw.log" 2>&1 &
bw_pid=$!
started+=("$bw_pid")
wait_200 breakwater "http://127.0.0.1:$bw_port/" "$bw_pid" "$tmp/bw.log"

duration=$(python3 -c "import math; print(int(math.ceil($reloads * $interval + 3)))")
wrk -t2 -c"$conns" -d"${duration}s" "http://127.0.0.1:$bw_port/" >"$tmp/wrk.out" 2>&1 &
wrk_pid=$!
sleep 1
for _ in $(seq 1 "$reloads"); do
    kill -HUP "$bw_pid"
    sleep "$interval"
done
wait "$wrk_pid" || true
echo "connections: $conns, reloads: $reloads, interval: ${interval}s"
grep -E "requests in|Socket errors|Non-2xx" "$tmp/wrk.out" || echo "no socket errors reported"
echo "reloads accepted: $(curl -s "http://127.0.0.1:$admin_port/metrics" | sed -n 's/^breakwater_config_reloads_total{result="success"} //p')"
