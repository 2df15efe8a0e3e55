"""Reloads and drains lose no request under keep-alive load.

Keep-alive clients send requests back to back while the proxy is reloaded again and again
(each SIGHUP starts a new generation of workers and drains the old one) and finally stopped
with SIGTERM. A draining worker must answer a request that has begun with `Connection: close`
instead of closing the connection under it, and close an idle connection only after
drain_idle_grace_ms with nothing received. The clients count every request that got no
complete 200 response: the count must be 0. BW_LOAD_CONNECTIONS and BW_LOAD_RELOADS change the
size of the run (docs/operations.md records a measurement with 64 and 10).
"""

import os
import signal
import time

import harness
from harness import SLOW, metric_sum

CONNECTIONS = int(os.environ.get("BW_LOAD_CONNECTIONS", "32"))
RELOADS = int(os.environ.get("BW_LOAD_RELOADS", "8"))


def reloads_done(bw):
    return metric_sum(harness.scrape(bw), "breakwater_config_reloads_total", result="success") or 0


def test_reloads_under_keepalive_load_lose_nothing(upstream, breakwater_factory):
    bw = breakwater_factory(harness.base_config(upstream, workers=2, shutdown_timeout_ms=10000))
    load = harness.KeepAliveLoad(bw.port, n=CONNECTIONS).start()
    try:
        harness.wait_until(lambda: load.total() >= 4 * CONNECTIONS, 20 * SLOW,
                           message="the load running")
        for i in range(1, RELOADS + 1):
            before = load.total()
            bw.signal(signal.SIGHUP)
            harness.wait_until(lambda: reloads_done(bw) >= i, 10 * SLOW,
                               message="reload %d" % i)
            # Traffic keeps flowing through the new generation before the next reload.
            harness.wait_until(lambda: load.total() >= before + 2 * CONNECTIONS, 20 * SLOW,
                               message="requests after reload %d" % i)
    finally:
        load.stop()
    print("\nreloads: %d, connections: %d, requests: %d, failed: %d, clean closes: %d"
          % (RELOADS, CONNECTIONS, load.ok + load.failed, load.failed, load.clean_closes))
    assert load.failed == 0, load.failures
    assert load.ok > RELOADS * 2 * CONNECTIONS
    # Every reload made the old workers tell their clients to reconnect.
    assert load.clean_closes >= CONNECTIONS


def test_sigterm_under_keepalive_load_answers_what_began(upstream, breakwater_factory):
    bw = breakwater_factory(harness.base_config(upstream, workers=2, shutdown_timeout_ms=10000))
    load = harness.KeepAliveLoad(bw.port, n=CONNECTIONS, refused_ok=True).start()
    try:
        harness.wait_until(lambda: load.total() >= 4 * CONNECTIONS, 20 * SLOW,
                           message="the load running")
        bw.signal(signal.SIGTERM)
        # Every client sees its connection end cleanly and then finds the port closed.
        harness.wait_until(lambda: load.refused >= CONNECTIONS, 20 * SLOW,
                           message="every client told to go away")
    finally:
        load.stop()
    assert bw.proc.wait(20 * SLOW) == 0
    print("\nSIGTERM: connections: %d, requests: %d, failed: %d" % (CONNECTIONS, load.total(),
                                                                   load.failed))
    assert load.failed == 0, load.failures


def test_idle_connection_closed_after_grace(upstream, breakwater_factory):
    grace_ms = int(600 * SLOW)
    bw = breakwater_factory(harness.base_config(upstream, drain_idle_grace_ms=grace_ms,
                                                shutdown_timeout_ms=20000))
    idle = harness.Client(bw.port)
    assert idle.request("GET", "/a", headers=[("Host", "x")]).status == 200
    late = harness.Client(bw.port)
    assert late.request("GET", "/b", headers=[("Host", "x")]).status == 200
    t0 = time.monotonic()
    bw.signal(signal.SIGHUP)
    harness.wait_until(lambda: reloads_done(bw) >= 1, 10 * SLOW, message="the reload")
    # A request that begins within the grace period is answered, with Connection: close.
    late.send(b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n")
    r = late.read_response()
    assert r.status == 200 and r.header("connection") == "close"
    assert late.wait_closed(5 * SLOW)
    # The idle one is closed after the grace period, not before.
    assert idle.wait_closed(grace_ms / 1000.0 + 10 * SLOW)
    assert time.monotonic() - t0 >= grace_ms / 1000.0 * 0.9
    idle.close()
    late.close()
