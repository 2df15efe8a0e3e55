"""Passive outlier ejection per server, shared by the workers, seen from outside.

A pool with one live server and one that refuses (or whose connect hangs) must not make most
requests slow or retried: after outlier_detection.consecutive_failures failures in a row the bad
server is skipped for the ejection time, /upstreams and the metrics show it, and at least one
server always stays in (max_ejection_percent).
"""

import time

import harness
from harness import Client, build_request

SLOW = harness.SLOW


def one(bw, target="/"):
    with Client(bw.port) as c:
        t0 = time.monotonic()
        c.send(build_request("GET", target, [("Connection", "close")]))
        r = c.read_response()
        return r, time.monotonic() - t0


def config(servers, workers=2, **outlier):
    od = {"consecutive_failures": 3, "base_ejection_ms": 60000}
    od.update(outlier)
    return harness.base_config(servers, workers=workers, upstreams={
        "api": {"retries": 1, "outlier_detection": od,
                "circuit_breaker": {"failure_threshold": 1000}}})


def server_doc(bw, address):
    for s in harness.upstream_state(bw, "api")["servers"]:
        if s["address"] == address:
            return s
    raise AssertionError("server %s not in /upstreams" % address)


def connect_errors(bw):
    return harness.metric_sum(harness.scrape(bw), "breakwater_upstream_errors_total",
                              upstream="api", kind="connect") or 0


def test_refusing_server_is_ejected_and_skipped(upstream_factory, breakwater_factory):
    up = upstream_factory()
    dead = harness.dead_address()
    bw = breakwater_factory(config([up, dead]))
    statuses = [one(bw)[0].status for _ in range(30)]
    assert statuses == [200] * 30, statuses
    # Three failures eject it (a request racing on the other worker may add one); without
    # ejection about half of the 30 requests would hit it.
    errors = connect_errors(bw)
    assert 3 <= errors <= 4, errors
    doc = server_doc(bw, dead)
    assert doc["ejected"] is True and doc["healthy"] is False, doc
    assert doc["ejected_until"] is not None and doc["ejected_until"].endswith("Z"), doc
    assert doc["consecutive_failures"] == 0, doc
    live = server_doc(bw, up.address)
    assert live["healthy"] is True and live["ejected"] is False, live
    assert live["ejected_until"] is None and live["active_requests"] == 0, live
    assert harness.upstream_state(bw, "api")["ejections_total"] == 1
    samples = harness.scrape(bw)
    assert harness.metric_sum(samples, "breakwater_upstream_ejections_total", upstream="api") == 1
    assert harness.metric_sum(samples, "breakwater_upstream_server_healthy", upstream="api",
                              server=dead) == 0
    assert harness.metric_sum(samples, "breakwater_upstream_server_healthy", upstream="api",
                              server=up.address) == 1
    bw.wait_log(r"upstream api: server %s ejected for 60000 ms after 3 consecutive failures"
                % dead.replace(".", r"\."))
    assert harness.breaker_state(bw, "api") == "closed"


def test_hanging_connect_does_not_slow_most_requests(upstream_factory, breakwater_factory):
    up = upstream_factory()
    with harness.Blackhole() as bh:
        cfg = config([up, bh.address])
        cfg["upstreams"]["api"]["connect_timeout_ms"] = int(500 * SLOW)
        bw = breakwater_factory(cfg)
        times = []
        for _ in range(20):
            r, elapsed = one(bw)
            assert r.status == 200, r
            times.append(elapsed)
        slow = [t for t in times if t >= 0.4 * SLOW]
        # Only the attempts before the ejection wait for the connect timeout.
        assert len(slow) <= 4, times
        assert server_doc(bw, bh.address)["ejected"] is True


def test_at_least_one_server_stays_in(breakwater_factory):
    dead1, dead2 = harness.dead_address(), harness.dead_address()
    bw = breakwater_factory(config([dead1, dead2], max_ejection_percent=100))
    for _ in range(20):
        assert one(bw)[0].status == 502
    docs = [server_doc(bw, a) for a in (dead1, dead2)]
    assert sorted(d["ejected"] for d in docs) == [False, True], docs
    assert harness.upstream_state(bw, "api")["ejections_total"] == 1


def test_ejection_ends_by_itself_and_grows_when_it_fails_again(upstream_factory,
                                                                breakwater_factory):
    up = upstream_factory()
    dead = harness.dead_address()
    base = int(1000 * SLOW)
    bw = breakwater_factory(config([up, dead], base_ejection_ms=base, max_ejection_ms=base * 10))
    harness.wait_until(lambda: one(bw)[0].status == 200 and server_doc(bw, dead)["ejected"],
                       10 * SLOW, message="the dead server to be ejected")
    t0 = time.monotonic()
    # No traffic: the ejection ends on its own.
    harness.wait_until(lambda: not server_doc(bw, dead)["ejected"], 5 * SLOW,
                       message="the ejection to end")
    assert time.monotonic() - t0 >= base / 1000.0 * 0.5
    assert server_doc(bw, dead)["healthy"] is True
    # It is picked again, fails again, and goes out for twice as long.
    harness.wait_until(lambda: one(bw)[0].status == 200 and server_doc(bw, dead)["ejected"],
                       10 * SLOW, message="the second ejection")
    doc = server_doc(bw, dead)
    assert doc["ejections"] == 2, doc
    assert harness.upstream_state(bw, "api")["ejections_total"] == 2


def test_consecutive_failures_zero_turns_detection_off(upstream_factory, breakwater_factory):
    up = upstream_factory()
    dead = harness.dead_address()
    bw = breakwater_factory(config([up, dead], consecutive_failures=0))
    for _ in range(12):
        assert one(bw)[0].status == 200
    assert connect_errors(bw) >= 5
    doc = server_doc(bw, dead)
    assert doc["ejected"] is False and doc["consecutive_failures"] >= 5, doc
    assert harness.upstream_state(bw, "api")["ejections_total"] == 0


def test_config_check_reports_bad_outlier_fields(tmp_path, bw_bin):
    import json
    import subprocess
    cfg = harness.base_config(["127.0.0.1:9"], upstreams={"api": {
        "outlier_detection": {"consecutive_failures": -1, "base_ejection_ms": 5000,
                              "max_ejection_ms": 1000, "max_ejection_percent": 101,
                              "bogus": 1}}})
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg, indent=2))
    r = subprocess.run([str(bw_bin), "-t", "-c", str(path)], capture_output=True, text=True,
                       timeout=10)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    for field in ("consecutive_failures", "max_ejection_ms", "max_ejection_percent", "bogus"):
        assert "upstreams.api.outlier_detection.%s" % field in out, out
