"""A client that pipelines requests and never reads the responses: the worker stops parsing
while a response's worth of output waits, so its memory stays bounded however much the client
sends, and other clients keep being served. Also a slow reader gets every response in order."""

import socket
import time

import harness
from harness import Breakwater, build_request

SLOW = harness.SLOW
# The bound a connection may add to a worker: one response's worth of output (256 KiB high
# water), the head-sized input window, buffer slack. Measured growth is in VmRSS; the old code
# grew by tens of MB in the same test.
BOUND_KB = 6 * 1024


def flood(port, request, seconds, rcvbuf=4096):
    """Sends `request` over and over without reading for `seconds`; returns bytes sent."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.setblocking(False)
    burst = request * 64
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sent += s.send(burst)
        except BlockingIOError:
            time.sleep(0.01)  # the proxy stopped reading: exactly what is being tested
    return s, sent


def rss_kb(pid):
    return Breakwater.proc_status(pid, "VmRSS")


def check_flood(bw, request, seconds=3.0):
    pid = bw.worker_pids()[0]
    before = rss_kb(pid)
    conn, sent = flood(bw.port, request, seconds)
    try:
        grown = rss_kb(pid) - before
        # Other clients are still served while the flood connection is held.
        status, _, _, _ = harness.get(bw.port, "/other", close_wait=0)
        assert status in (200, 404)
        return sent, grown
    finally:
        conn.close()


def test_pipelined_probes_do_not_grow_memory(upstream, breakwater_factory):
    bw = breakwater_factory(harness.base_config([upstream], workers=1), env=harness.unquarantined_env())
    sent, grown = check_flood(bw, build_request("GET", "/healthz"))
    assert grown < BOUND_KB, "worker grew by %d kB while the client sent %d bytes" % (grown, sent)
    # The proxy stopped reading: far less was accepted than the old code took in 3 s (40 MB).
    assert sent < 8 << 20, sent


def test_pipelined_readyz_do_not_grow_memory(upstream, breakwater_factory):
    bw = breakwater_factory(harness.base_config([upstream], workers=1), env=harness.unquarantined_env())
    sent, grown = check_flood(bw, build_request("GET", "/readyz"))
    assert grown < BOUND_KB, "worker grew by %d kB while the client sent %d bytes" % (grown, sent)


def test_pipelined_proxied_requests_do_not_grow_memory(upstream_factory, breakwater_factory):
    up = upstream_factory(harness.static(200, b"x" * 16384))
    bw = breakwater_factory(harness.base_config([up], workers=1), env=harness.unquarantined_env())
    sent, grown = check_flood(bw, build_request("GET", "/x"))
    assert grown < BOUND_KB, "worker grew by %d kB while the client sent %d bytes" % (grown, sent)
    # Only as many requests reached the upstream as one connection's bounded buffers allow.
    assert len(up.requests) < 400, len(up.requests)


def test_slow_reader_gets_every_pipelined_response(upstream_factory, breakwater_factory):
    up = upstream_factory(harness.static(200, b"y" * 65536))
    bw = breakwater_factory(harness.base_config([up], workers=1))
    n = 40
    s = socket.create_connection(("127.0.0.1", bw.port))
    s.settimeout(30 * SLOW)
    # 2.6 MB of responses to requests sent at once, read in small steps: the proxy holds the
    # later requests back while output waits, then must resume each time the client catches up.
    s.sendall(b"".join(build_request("GET", "/r%d" % i) for i in range(n)))
    got = b""
    deadline = time.monotonic() + 60 * SLOW
    while (got.count(b"HTTP/1.1 200") < n or not got.endswith(b"y" * 16)) and \
            time.monotonic() < deadline:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
        time.sleep(0.002)
    s.close()
    assert got.count(b"HTTP/1.1 200 ") == n
    assert [r.target for r in up.requests] == ["/r%d" % i for i in range(n)]
