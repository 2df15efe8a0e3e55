"""File-descriptor limits: a worker out of descriptors pauses accepting instead of spinning
(bounded CPU, at most a log line a second, counted in breakwater_accept_errors_total), and
serves again once descriptors are free; RLIMIT_NOFILE is compared with max_connections at start
and on reload, raised when the hard limit allows, and a shortfall is logged with the numbers."""

import os
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

import harness

SLOW = harness.SLOW


def cpu_seconds(pid):
    fields = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_files_limit(pid):
    for line in Path("/proc/%d/limits" % pid).read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-files line in /proc/%d/limits" % pid)


def wrapped_binary(tmp_path, bw_bin, soft, hard):
    """A launcher that starts breakwater under these limits (exec keeps the PID)."""
    path = tmp_path / ("bw-nofile-%d-%d" % (soft, hard))
    path.write_text("#!/bin/sh\nexec prlimit --nofile=%d:%d -- %s \"$@\"\n" % (soft, hard, bw_bin))
    path.chmod(0o755)
    return path


def test_descriptor_exhaustion_pauses_accept(upstream, breakwater_factory):
    bw = breakwater_factory(harness.base_config([upstream], workers=1))
    pid = bw.worker_pids()[0]
    subprocess.run(["prlimit", "--pid", str(pid), "--nofile=48:48"], check=True)
    conns = []
    try:
        for _ in range(60):
            conns.append(socket.create_connection(("127.0.0.1", bw.port), timeout=5))
        bw.wait_log(r"accept failed: Too many open files")
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(2.0)  # measuring CPU over a fixed window is the point here
        used = cpu_seconds(pid) - cpu0
        elapsed = time.monotonic() - t0
        assert used < 0.25 * elapsed, "worker used %.2f s of CPU in %.2f s" % (used, elapsed)
        lines = [ln for ln in bw.read_error_log().splitlines() if "accept failed" in ln]
        assert 1 <= len(lines) <= 6, lines[:10]
        errors = harness.metric_sum(harness.scrape(bw), "breakwater_accept_errors_total",
                                    listener=bw.config["listeners"][0]["address"])
        assert errors is not None and errors >= 1
    finally:
        for c in conns:
            c.close()
    # Descriptors are free again: the worker accepts and serves within its backoff.
    harness.wait_until(lambda: harness.get(bw.port, "/after", close_wait=0)[0] == 200,
                       timeout=10 * SLOW, message="a request served after the exhaustion")


def test_soft_limit_raised_at_start(upstream, bw_bin, tmp_path):
    # The hard limit is what this process has (raising it needs a privilege a sandbox may lack).
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    conns = min(5000, (hard - 200) // 2)
    if conns < 1000:
        pytest.skip("hard open-file limit %d is too low for this test" % hard)
    cfg = harness.base_config([upstream], workers=1)
    cfg["limits"] = {"max_connections": conns}
    launcher = wrapped_binary(tmp_path, bw_bin, 512, hard)
    with harness.Breakwater(cfg, tmp_path, binary=str(launcher)) as bw:
        # 2 per connection + 1 listener + 32 pooled connections to one server + 64 in reserve
        need = 2 * conns + 1 + 32 + 64
        assert open_files_limit(bw.worker_pids()[0]) == (need, hard)
        bw.wait_log(r"raised the open-file limit from 512 to %d" % need)


def test_shortfall_logged_at_start_and_reload(upstream, bw_bin, tmp_path):
    cfg = harness.base_config([upstream], workers=1)
    cfg["limits"] = {"max_connections": 2000}
    launcher = wrapped_binary(tmp_path, bw_bin, 256, 512)
    with harness.Breakwater(cfg, tmp_path, binary=str(launcher)) as bw:
        check_shortfall(bw, cfg)


def check_shortfall(bw, cfg):
    m = bw.wait_log(r"limits.max_connections 2000 needs about (\d+) open files per worker, "
                    r"but the limit is 512 \(hard limit 512\)")
    assert int(m.group(1)) == 2 * 2000 + 1 + 32 + 64
    assert open_files_limit(bw.worker_pids()[0]) == (512, 512)
    # Proxying still works within what the limit allows.
    assert harness.get(bw.port, "/", close_wait=0)[0] == 200
    cfg["limits"] = {"max_connections": 3000}
    bw.write_config(cfg)
    bw.signal(signal.SIGHUP)
    bw.wait_log(r"limits.max_connections 3000 needs about \d+ open files per worker")
