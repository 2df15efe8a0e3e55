# Process and port helpers shared by the benchmark scripts in this directory (sourced, not run).

# True while PID runs (a child that exited stays a zombie until waited for, so kill -0 is not
# enough).
alive() {
    local st
    st="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    st="${st##*) }"
    [ "${st%% *}" != Z ]
}

# Every descendant of PID, children first.
descendants() {
    local kid
    for kid in $(pgrep -P "$1" 2>/dev/null || true); do
        echo "$kid"
        descendants "$kid"
    done
}

# Stops a process the script started: TERM, up to 5 s to exit, then KILL for it and for any
# descendant (workers) left behind.
stop_pid() {
    local pid="$1" kids i k
    alive "$pid" || { wait "$pid" 2>/dev/null || true; return 0; }
    kids="$(descendants "$pid")"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
        alive "$pid" || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for k in $kids; do kill -KILL "$k" 2>/dev/null || true; done
}

# N free loopback ports, distinct: every socket is held until all are chosen.
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
held = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    held.append(s)
print(" ".join(str(s.getsockname()[1]) for s in held))
PY
}
