"""Active health checks, run by the master once per instance, seen from outside.

Servers failing their check are skipped by every worker and come back after healthy_threshold
passes; with two workers each server is still checked once per interval; a passing check
closes an open breaker with no client traffic; and check endpoints that hang, answer garbage
or answer a 10 MB body cost a timer and one socket, never the master's loop or its memory.
"""

import threading
import time

import harness
from harness import Client, build_request, respond

SLOW = harness.SLOW


class Checked:
    """Upstream handler: /healthz answers `check` (ok, fail, hang, garbage, huge); every other
    path answers `traffic` (ok or fail)."""

    def __init__(self, check="ok", traffic="ok"):
        self.check = check
        self.traffic = traffic
        self.checks = 0
        self.served = 0
        self.lock = threading.Lock()

    def __call__(self, req, conn):
        if req.target == "/healthz":
            with self.lock:
                self.checks += 1
            mode = self.check
            if mode == "fail":
                return respond(500, b"sick")
            if mode == "hang":
                conn.sleep(30)
                return None
            if mode == "garbage":
                conn.sendall(b"\x00\x01 not http at all\r\n\r\n")
                conn.close()
                return None
            if mode == "huge":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10485760\r\n\r\n")
                chunk = b"x" * 65536
                try:
                    for _ in range(160):
                        conn.sendall(chunk)
                except OSError:
                    pass  # the checker closes after the head
                conn.close()
                return None
            return respond(200, b"ok")
        with self.lock:
            self.served += 1
        if self.traffic == "fail":
            return respond(503, b"down")
        return respond(200, b"ok")


def hc(**kw):
    d = {"path": "/healthz", "interval_ms": int(200 * SLOW), "timeout_ms": int(500 * SLOW),
         "healthy_threshold": 2, "unhealthy_threshold": 2}
    d.update(kw)
    return d


def config(servers, workers=2, health=None, **up):
    u = {"retries": 0, "health_check": health or hc()}
    u.update(up)
    return harness.base_config(servers, workers=workers, upstreams={"api": u})


def server_doc(bw, address):
    for s in harness.upstream_state(bw, "api")["servers"]:
        if s["address"] == address:
            return s
    raise AssertionError("server %s not in /upstreams" % address)


def one(bw):
    with Client(bw.port) as c:
        c.send(build_request("GET", "/x", [("Connection", "close")]))
        return c.read_response()


def test_failing_server_is_skipped_and_comes_back(upstream_factory, breakwater_factory):
    good_h, bad_h = Checked(), Checked(check="fail")
    good, bad = upstream_factory(good_h), upstream_factory(bad_h)
    bw = breakwater_factory(config([good, bad]))
    harness.wait_until(lambda: server_doc(bw, bad.address)["healthy"] is False, 10 * SLOW,
                       message="the failing server to turn unhealthy")
    doc = server_doc(bw, bad.address)
    assert doc["last_check"]["result"] == "status" and doc["last_check"]["status"] == 500, doc
    assert doc["last_check"]["time"].endswith("Z") and doc["ejected"] is False, doc
    assert server_doc(bw, good.address)["last_check"]["result"] == "pass"
    bw.wait_log(r"upstream api: server %s is unhealthy: health check /healthz unexpected status"
                % bad.address.replace(".", r"\."))
    served = bad_h.served
    for _ in range(10):
        assert one(bw).status == 200
    assert bad_h.served == served, "an unhealthy server was picked"
    samples = harness.scrape(bw)
    assert harness.metric_sum(samples, "breakwater_upstream_server_healthy", upstream="api",
                              server=bad.address) == 0
    assert harness.metric_sum(samples, "breakwater_health_checks_total", upstream="api",
                              result="fail") >= 2
    assert harness.metric_sum(samples, "breakwater_health_checks_total", upstream="api",
                              result="pass") >= 1
    # It recovers: two passes in a row and it is picked again.
    bad_h.check = "ok"
    harness.wait_until(lambda: server_doc(bw, bad.address)["healthy"] is True, 10 * SLOW,
                       message="the server to be healthy again")
    harness.wait_until(lambda: one(bw).status == 200 and bad_h.served > served, 10 * SLOW,
                       message="the recovered server to get traffic")


def test_checks_run_once_per_instance(upstream_factory, breakwater_factory):
    h = Checked()
    up = upstream_factory(h)
    interval = int(250 * SLOW)
    bw = breakwater_factory(config([up], workers=2, health=hc(interval_ms=interval)))
    bw.wait_workers(2)
    harness.wait_until(lambda: h.checks >= 2, 10 * SLOW, message="the first checks")
    c0, t0 = h.checks, time.monotonic()
    harness.wait_until(lambda: time.monotonic() - t0 >= 2.0 * SLOW, 10 * SLOW,
                       message="two seconds of checks")
    c1, t1 = h.checks, time.monotonic()
    expected = (t1 - t0) * 1000.0 / interval
    # Once per interval, not once per worker (which would double it).
    assert (c1 - c0) <= expected + 2, (c1 - c0, expected)
    assert (c1 - c0) >= expected * 0.5, (c1 - c0, expected)
    n = harness.metric_sum(harness.scrape(bw), "breakwater_health_checks_total", upstream="api",
                           result="pass")
    assert abs(n - h.checks) <= 1, (n, h.checks)


def test_passing_check_closes_an_open_breaker_without_traffic(upstream_factory,
                                                              breakwater_factory):
    h = Checked(traffic="fail")
    up = upstream_factory(h)
    cfg = config([up], critical=True,
                 circuit_breaker={"failure_threshold": 2, "reset_timeout_ms": int(600 * SLOW),
                                  "half_open_success_threshold": 2})
    bw = breakwater_factory(cfg)
    for _ in range(2):
        assert one(bw).status == 503
    harness.wait_until(lambda: harness.breaker_state(bw, "api") == "open", 5 * SLOW,
                       message="breaker to open")
    assert harness.readyz(bw)[0] == 503
    served = h.served
    # No client request from here: the checks, which pass, close it.
    harness.wait_until(lambda: harness.breaker_state(bw, "api") == "closed", 10 * SLOW,
                       message="the checks to close the breaker")
    status, doc = harness.readyz(bw)
    assert (status, doc["status"]) == (200, "healthy"), doc
    assert h.served == served
    bw.wait_log(r"breaker api: half_open -> closed after 2 successful probes \(health check")


def _rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for %d" % pid)


def test_bad_check_endpoints_block_nothing(upstream_factory, breakwater_factory):
    hang_h, garbage_h, huge_h = Checked("hang"), Checked("garbage"), Checked("huge")
    hang, garbage, huge = (upstream_factory(x) for x in (hang_h, garbage_h, huge_h))
    cfg = harness.base_config([hang], workers=2, upstreams={"api": {
        "servers": [hang.address, garbage.address, huge.address], "retries": 0,
        "health_check": hc(timeout_ms=int(300 * SLOW), interval_ms=int(150 * SLOW))}})
    bw = breakwater_factory(cfg)
    harness.wait_until(lambda: server_doc(bw, hang.address)["last_check"] is not None,
                       10 * SLOW, message="a first check of the hanging server")
    rss0 = _rss_kb(bw.proc.pid)
    t_end = time.monotonic() + 2.0 * SLOW
    while time.monotonic() < t_end:
        # The master's loop answers at once while checks hang.
        t0 = time.monotonic()
        assert harness.admin_request(bw, "GET", "/healthz").status == 200
        assert time.monotonic() - t0 < 0.5 * SLOW
        time.sleep(0.1)
    assert server_doc(bw, hang.address)["last_check"]["result"] == "timeout"
    assert server_doc(bw, hang.address)["healthy"] is False
    doc = server_doc(bw, garbage.address)
    assert doc["last_check"]["result"] == "invalid" and doc["healthy"] is False, doc
    # The 10 MB body is never read: its status decides, and it costs no memory.
    doc = server_doc(bw, huge.address)
    assert doc["last_check"]["result"] == "pass" and doc["healthy"] is True, doc
    assert huge_h.checks >= 5
    assert _rss_kb(bw.proc.pid) - rss0 < 4096, "master memory grew during the checks"
    bw.wait_log(r"health check /healthz no answer within timeout_ms")
    bw.wait_log(r"health check /healthz invalid HTTP response")
    assert bw.running()
