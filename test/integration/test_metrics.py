"""The /metrics endpoint: exact counts summed over workers, the names of the contract, histogram
consistency, and the output accepted by `promtool check metrics`."""

import os
import shutil
import signal
import subprocess

import pytest

import harness
from harness import Client, build_request, metric_sum

SLOW = harness.SLOW

CONTRACT_NAMES = [
    "breakwater_requests_total", "breakwater_request_duration_seconds",
    "breakwater_upstream_errors_total", "breakwater_circuit_breaker_state",
    "breakwater_circuit_breaker_transitions_total", "breakwater_circuit_breaker_rejected_total",
    "breakwater_rate_limited_total", "breakwater_rate_limit_keys",
    "breakwater_connections_active", "breakwater_worker_restarts_total",
    "breakwater_config_reloads_total", "breakwater_build_info",
]


def metrics_text(bw):
    r = harness.admin_request(bw, "GET", "/metrics")
    assert r.status == 200, r
    ctype = r.header("content-type", "")
    assert ctype.startswith("text/plain") and "version=0.0.4" in ctype, ctype
    return r.body.decode("utf-8")


def families(text):
    """{name: type} from the # TYPE lines."""
    out = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            out[name] = kind.strip()
    return out


def send_spread(bw, n, target="/"):
    """n requests, one per fresh connection, split evenly over the two workers."""
    groups = harness.spread_connections(bw, (n + 1) // 2)
    conns = harness.interleave(groups)
    statuses = []
    try:
        for c in conns[:n]:
            c.send(build_request("GET", target, [("Connection", "close")]))
            statuses.append(c.read_response().status)
    finally:
        for c in conns:
            c.close()
    return statuses


def test_request_count_is_exact_across_workers(upstream, breakwater_factory):
    # Connections are opened and spread before any sends a byte: no header deadline meanwhile.
    cfg = harness.base_config([upstream], workers=2, limits={"header_timeout_ms": 120000})
    cfg["routes"] = [{"path_prefix": "/other", "upstream": "api"},
                     {"path_prefix": "/", "upstream": "api", "name": "main"}]
    bw = breakwater_factory(cfg)
    assert send_spread(bw, 37, "/counted") == [200] * 37
    assert send_spread(bw, 5, "/other/x") == [200] * 5
    assert len(upstream.requests) == 42
    m = harness.wait_metric(bw, "breakwater_requests_total", 42)
    assert metric_sum(m, "breakwater_requests_total", route="main", upstream="api",
                      code="200") == 37
    # Without a name, the route label is host + path_prefix.
    assert metric_sum(m, "breakwater_requests_total", route="/other", upstream="api",
                      code="200") == 5
    assert metric_sum(m, "breakwater_requests_total") == 42
    assert metric_sum(m, "breakwater_request_duration_seconds_count", upstream="api") == 42
    # Scraping does not count as traffic.
    m2 = harness.scrape(bw)
    assert metric_sum(m2, "breakwater_requests_total") == 42


def test_histogram_is_consistent(upstream_factory, breakwater_factory):
    up = upstream_factory(harness.slow(0.12))
    bw = breakwater_factory(harness.base_config([up], workers=2))
    assert send_spread(bw, 6) == [200] * 6
    m = harness.wait_metric(bw, "breakwater_request_duration_seconds_count", 6, upstream="api")
    buckets = sorted(((float(ls["le"]), v) for n, ls, v in m
                      if n == "breakwater_request_duration_seconds_bucket"
                      and ls.get("upstream") == "api"), key=lambda x: x[0])
    assert buckets and buckets[-1][0] == float("inf"), buckets
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), "buckets are not cumulative: %r" % buckets
    assert counts[-1] == 6
    assert metric_sum(m, "breakwater_request_duration_seconds_count", upstream="api") == 6
    total = metric_sum(m, "breakwater_request_duration_seconds_sum", upstream="api")
    assert 6 * 0.1 <= total <= 6 * 30 * SLOW, total
    # No request took less than 0.1 s.
    below = [v for le, v in buckets if le < 0.1]
    assert all(v == 0 for v in below), buckets


def test_upstream_error_kinds(upstream_factory, breakwater_factory):
    cfg = harness.base_config([harness.dead_address()], workers=2)
    no_breaker = {"failure_threshold": 1000}
    timeout_up = upstream_factory(harness.never_answer)
    reset_up = upstream_factory(harness.reset_connection)
    invalid_up = upstream_factory(harness.raw_then_close(b"this is not HTTP\r\n\r\n"))
    status_up = upstream_factory(harness.static(503, b"down"))
    cfg["upstreams"] = {
        "connect": {"servers": [harness.dead_address()]},
        "timeout": {"servers": [timeout_up.address], "response_timeout_ms": int(300 * SLOW)},
        "reset": {"servers": [reset_up.address]},
        "invalid": {"servers": [invalid_up.address]},
        "status": {"servers": [status_up.address]},
    }
    for u in cfg["upstreams"].values():
        u.update({"retries": 0, "circuit_breaker": no_breaker})
    cfg["routes"] = [{"path_prefix": "/%s" % k, "upstream": k} for k in cfg["upstreams"]]
    bw = breakwater_factory(cfg)
    expect = {"connect": 502, "timeout": 504, "reset": 502, "invalid": 502, "status": 503}
    for kind, code in expect.items():
        for _ in range(2):
            status, _, _, _ = harness.get(bw.port, "/%s/x" % kind, close_wait=0)
            assert status == code, (kind, status)
    m = harness.wait_metric(bw, "breakwater_requests_total", 10)
    for kind, code in expect.items():
        assert metric_sum(m, "breakwater_upstream_errors_total", upstream=kind,
                          kind=kind) == 2, kind
        assert metric_sum(m, "breakwater_upstream_errors_total", upstream=kind) == 2, kind
        assert metric_sum(m, "breakwater_requests_total", upstream=kind, code=str(code)) == 2


def test_connections_active_gauge(upstream, breakwater_factory):
    bw = breakwater_factory(harness.base_config([upstream], workers=2))
    label = bw.config["listeners"][0]["address"]

    def active():
        return metric_sum(harness.scrape(bw), "breakwater_connections_active", listener=label)

    assert active() == 0
    held = [Client(bw.port) for _ in range(3)]
    try:
        for c in held:
            assert c.request("GET", "/").status == 200
        harness.wait_until(lambda: active() == 3, 5 * SLOW, message="3 active connections")
    finally:
        for c in held:
            c.close()
    harness.wait_until(lambda: active() == 0, 5 * SLOW, message="0 active connections")


def test_restarts_reloads_and_build_info(upstream, bw_bin, breakwater_factory):
    bw = breakwater_factory(harness.base_config([upstream], workers=2))
    m = harness.scrape(bw)
    assert (metric_sum(m, "breakwater_worker_restarts_total") or 0) == 0
    assert (metric_sum(m, "breakwater_config_reloads_total", result="success") or 0) == 0
    assert (metric_sum(m, "breakwater_config_reloads_total", result="failure") or 0) == 0
    info = [(ls, v) for n, ls, v in m if n == "breakwater_build_info"]
    assert len(info) == 1 and info[0][1] == 1 and info[0][0].get("version"), info
    version = subprocess.run([bw_bin, "-V"], capture_output=True, text=True, timeout=10)
    assert info[0][0]["version"] in version.stdout + version.stderr, (info, version)

    # A worker killed: one restart.
    victim = bw.wait_workers(2)[0]
    os.kill(victim, signal.SIGKILL)
    harness.wait_until(
        lambda: metric_sum(harness.scrape(bw), "breakwater_worker_restarts_total") == 1,
        10 * SLOW, message="worker_restarts_total to reach 1")

    # A good reload, then a bad one.
    bw.signal(signal.SIGHUP)
    harness.wait_until(
        lambda: metric_sum(harness.scrape(bw), "breakwater_config_reloads_total",
                           result="success") == 1, 10 * SLOW, message="a successful reload")
    bw.config_path.write_text("{ not json")
    bw.signal(signal.SIGHUP)
    harness.wait_until(
        lambda: metric_sum(harness.scrape(bw), "breakwater_config_reloads_total",
                           result="failure") == 1, 10 * SLOW, message="a failed reload")
    bw.write_config()
    assert harness.get(bw.port, "/", close_wait=0)[0] == 200


def test_promtool_accepts_the_output(upstream_factory, breakwater_factory):
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.fail("promtool not found (Debian package prometheus)")
    ok = upstream_factory()
    bad = upstream_factory(harness.static(503, b"down"))
    cfg = harness.base_config([ok], workers=2)
    cfg["upstreams"]["bad"] = {"servers": [bad.address], "retries": 0,
                               "circuit_breaker": {"failure_threshold": 2}}
    cfg["routes"] = [{"path_prefix": "/bad", "upstream": "bad"},
                     {"path_prefix": "/", "upstream": "api", "rate_limit": "per_client",
                      "name": "main"}]
    cfg["rate_limits"] = {"per_client": {"capacity": 3, "refill_per_sec": 0}}
    bw = breakwater_factory(cfg)
    # Every family gets samples: successes, upstream failures, an open breaker with
    # rejections, and rate-limited requests.
    for i in range(5):
        harness.get(bw.port, "/x%d" % i, close_wait=0)
        harness.get(bw.port, "/bad/%d" % i, close_wait=0)
    harness.wait_metric(bw, "breakwater_requests_total", 10)
    text = metrics_text(bw)
    names = families(text)
    for name in CONTRACT_NAMES:
        assert name in names, "%s missing from /metrics" % name
    assert names["breakwater_request_duration_seconds"] == "histogram"
    for name in ("breakwater_requests_total", "breakwater_upstream_errors_total",
                 "breakwater_circuit_breaker_rejected_total", "breakwater_rate_limited_total",
                 "breakwater_worker_restarts_total", "breakwater_config_reloads_total"):
        assert names[name] == "counter", (name, names[name])
    for name in ("breakwater_circuit_breaker_state", "breakwater_connections_active",
                 "breakwater_rate_limit_keys"):
        assert names[name] == "gauge", (name, names[name])
    m = harness.parse_metrics(text)
    assert metric_sum(m, "breakwater_rate_limited_total", policy="per_client") == 2
    assert metric_sum(m, "breakwater_requests_total",
                      route="main", code="429") == 2
    assert not [ls for n, ls, v in m if n.startswith("breakwater_redis_")], \
        "redis metrics without a redis section"
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, "promtool check metrics failed:\n%s%s\n--- output ---\n%s" % (
        proc.stdout, proc.stderr, text[:4000])
