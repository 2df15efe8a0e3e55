"""Breakers that recover without traffic, and half-open permits that cannot leak.

An upstream that is out of rotation gets no requests, so nothing here may depend on a request
arriving to move a breaker on: the open period ends on the monotonic clock, the master makes the
open -> half_open transition, and readiness follows. A probe's permit is given back when its
client goes away, a probe is decided by its response head, and a connect that fails at once
counts as a failure. Wall-clock steps are made with libfaketime (monotonic time left alone).
"""

import glob
import json
import os
import socket
import struct
import threading
import time

import pytest

import harness
from harness import Client, build_request, respond

SLOW = harness.SLOW


class Switch:
    """Upstream handler flipped by the test: ok (200), fail (503), hang (answers after `hold`
    seconds or when released), stream (a chunked 200 whose body lasts until released)."""

    def __init__(self, mode="ok"):
        self.mode = mode
        self.release = threading.Event()
        self.stream_started = threading.Event()

    def __call__(self, req, conn):
        mode = self.mode
        if mode == "fail":
            return respond(503, b"down", [("Content-Type", "text/plain")])
        if mode == "hang":
            while not self.release.is_set():
                if not conn.sleep(0.05):
                    return None
            return respond(200, b"late", [("Content-Type", "text/plain")])
        if mode == "stream":
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                         b"Content-Type: text/plain\r\n\r\n5\r\nfirst\r\n")
            self.stream_started.set()
            # A chunk every 200 ms keeps the body within the response timeout's gap.
            while not self.release.is_set():
                if not conn.sleep(0.2):
                    return None
                conn.sendall(b"1\r\n.\r\n")
            conn.sendall(b"0\r\n\r\n")
            return None
        return respond(200, b"ok", [("Content-Type", "text/plain")])


def config(servers, critical=True, workers=2, **breaker):
    cb = {"failure_threshold": 2, "reset_timeout_ms": int(800 * SLOW)}
    cb.update(breaker)
    return harness.base_config(servers, workers=workers, upstreams={
        "api": {"retries": 0, "critical": critical, "circuit_breaker": cb}})


def fresh(bw, target="/"):
    with Client(bw.port) as c:
        c.send(build_request("GET", target, [("Connection", "close")]))
        return c.read_response()


def open_breaker(bw, sw, n=2):
    sw.mode = "fail"
    for _ in range(n):
        assert fresh(bw).status == 503
    harness.wait_until(lambda: harness.breaker_state(bw, "api") == "open", 5 * SLOW,
                       message="breaker to open")


def cb_state(bw):
    return harness.upstream_state(bw, "api")["circuit_breaker"]


def test_critical_upstream_returns_to_ready_with_no_traffic(upstream_factory,
                                                             breakwater_factory):
    sw = Switch()
    up = upstream_factory(sw)
    bw = breakwater_factory(config([up]))
    open_breaker(bw, sw)
    status, doc = harness.readyz(bw)
    assert (status, doc["status"]) == (503, "unhealthy"), doc
    n = len(up.all_requests)
    # No request at all from here on: the open period ends by itself.
    harness.wait_until(lambda: harness.breaker_state(bw, "api") == "half_open", 10 * SLOW,
                       message="half_open with no traffic")
    for port in (bw.admin_port, bw.port):
        status, doc = harness.readyz(bw, port)
        assert (status, doc["ready"], doc["status"]) == (200, True, "degraded"), doc
        assert harness.readyz_check(doc, "upstream:api")["circuit_state"] == "half_open"
    samples = harness.scrape(bw)
    assert harness.metric_sum(samples, "breakwater_circuit_breaker_state", upstream="api") == 3
    assert harness.metric_sum(samples, "breakwater_circuit_breaker_transitions_total",
                              upstream="api", to="half_open") == 1
    assert len(up.all_requests) == n, "the transition needed no request to the upstream"
    bw.wait_log(r"breaker api: open -> half_open")
    # The first request is the probe; its success closes the breaker.
    sw.mode = "ok"
    assert fresh(bw).status == 200
    harness.wait_until(lambda: harness.breaker_state(bw, "api") == "closed", 5 * SLOW,
                       message="breaker to close")
    assert harness.readyz(bw)[0] == 200


def _reset_socket(c):
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.sock.close()


def test_probe_whose_client_resets_gives_its_permit_back(upstream_factory, breakwater_factory):
    sw = Switch()
    up = upstream_factory(sw)
    # Default timeouts: a leaked permit would block probing for 31 s.
    bw = breakwater_factory(config([up], half_open_max_requests=1))
    open_breaker(bw, sw)
    harness.wait_until(lambda: harness.breaker_state(bw, "api") == "half_open", 10 * SLOW,
                       message="half_open")
    sw.mode = "hang"
    n = len(up.all_requests)
    c = Client(bw.port)
    c.send(build_request("GET", "/probe", [("Connection", "close")]))
    up.wait_all_requests(n + 1, 5)
    assert cb_state(bw)["half_open_permits"] == 1
    # While the permit is out, a second client is refused.
    r = fresh(bw)
    assert r.status == 503 and json.loads(r.body)["error"] == "circuit open", r
    _reset_socket(c)
    harness.wait_until(lambda: cb_state(bw)["half_open_permits"] == 0, 5 * SLOW,
                       message="the aborted probe's permit to come back")
    assert cb_state(bw)["state"] == "half_open"
    sw.mode = "ok"
    sw.release.set()
    r = fresh(bw)
    assert r.status == 200, r
    harness.wait_until(lambda: harness.breaker_state(bw, "api") == "closed", 5 * SLOW,
                       message="breaker to close")


def test_streaming_probe_is_decided_at_its_head(upstream_factory, breakwater_factory):
    sw = Switch()
    up = upstream_factory(sw)
    cfg = config([up], half_open_max_requests=1)
    cfg["upstreams"]["api"].update({"connect_timeout_ms": 300,
                                    "response_timeout_ms": int(1000 * SLOW)})
    bw = breakwater_factory(cfg)
    open_breaker(bw, sw)
    harness.wait_until(lambda: harness.breaker_state(bw, "api") == "half_open", 10 * SLOW,
                       message="half_open")
    sw.mode = "stream"
    c = Client(bw.port, timeout=30 * SLOW)
    try:
        c.send(build_request("GET", "/stream", [("Connection", "close")]))
        assert sw.stream_started.wait(5 * SLOW)
        # The body is still streaming (for longer than the 1.3 s lease) and the breaker has
        # already closed on the strength of the head.
        harness.wait_until(lambda: harness.breaker_state(bw, "api") == "closed", 5 * SLOW,
                           message="breaker to close at the probe's head")
        assert not sw.release.is_set()
        t_end = time.monotonic() + 1.5 * SLOW
        while time.monotonic() < t_end:  # outlive the lease; nothing may re-decide the probe
            assert harness.breaker_state(bw, "api") == "closed"
            time.sleep(0.1)
        sw.mode = "ok"
        assert fresh(bw).status == 200  # a closed breaker admits everyone at once
        sw.release.set()
        r = c.read_response()
        assert r.status == 200 and r.body.startswith(b"first."), r
        cb = cb_state(bw)
        assert cb["state"] == "closed" and cb["transitions"]["closed"] == 1, cb
    finally:
        sw.release.set()
        c.close()


def test_synchronous_connect_failure_counts(breakwater_factory):
    # Connecting to the broadcast address fails inside connect() itself (ENETUNREACH).
    cfg = config(["255.255.255.255:80"], critical=False)
    bw = breakwater_factory(cfg)
    for _ in range(2):
        r = fresh(bw)
        assert r.status == 502, r
    harness.wait_until(lambda: harness.breaker_state(bw, "api") == "open", 5 * SLOW,
                       message="breaker to open on synchronous connect failures")
    samples = harness.scrape(bw)
    assert harness.metric_sum(samples, "breakwater_upstream_errors_total", upstream="api",
                              kind="connect") == 2
    r = fresh(bw)
    assert r.status == 503 and json.loads(r.body)["error"] == "circuit open", r


def _libfaketime():
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    return found[0] if found else None


@pytest.mark.skipif(_libfaketime() is None, reason="libfaketime is not installed")
def test_wall_clock_steps_change_nothing(upstream_factory, breakwater_factory, tmp_path):
    sw = Switch()
    up = upstream_factory(sw)
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    env = {
        "LD_PRELOAD": _libfaketime(),
        "FAKETIME_TIMESTAMP_FILE": str(offset),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_DONT_RESET": "1",
    }
    if harness.SANITIZED:
        env["ASAN_OPTIONS"] = os.environ.get("ASAN_OPTIONS", "") + ":verify_asan_link_order=0"
    reset_ms = int(3000 * SLOW)
    cfg = config([up], reset_timeout_ms=reset_ms, half_open_max_requests=1)
    # The half-open lease is connect + response timeout: 1.8 s here.
    cfg["upstreams"]["api"].update({"connect_timeout_ms": 300,
                                    "response_timeout_ms": int(1500 * SLOW)})
    bw = breakwater_factory(cfg, env=env)
    bw.wait_workers(2)
    open_breaker(bw, sw)
    t_open = time.monotonic()
    # One hour back: the open period still ends reset_timeout_ms after it began.
    offset.write_text("-3600\n")
    harness.wait_until(lambda: _wall_shifted(bw, -3600), 5 * SLOW, message="the wall clock step")
    r = fresh(bw)
    assert r.status == 503, r
    assert int(r.header("retry-after")) <= reset_ms // 1000 + 1, r.headers
    harness.wait_until(lambda: harness.breaker_state(bw, "api") == "half_open",
                       reset_ms / 1000.0 + 5 * SLOW, message="half_open after the wall step")
    assert time.monotonic() - t_open >= reset_ms / 1000.0 - 0.2

    # A probe holder that dies with its permit, then a 10 min step back: the lease still
    # expires after connect + response timeout, and the next request probes.
    sw.mode = "hang"
    groups = harness.spread_connections(bw, 1)
    victim = sorted(groups)[0]
    n = len(up.all_requests)
    holder = groups[victim][0]
    holder.send(build_request("GET", "/probe", [("Connection", "close")]))
    up.wait_all_requests(n + 1, 5)
    offset.write_text("-4200\n")
    harness.wait_until(lambda: _wall_shifted(bw, -4200), 5 * SLOW, message="a second step")
    os.kill(victim, 9)
    for cs in groups.values():
        for c in cs:
            c.close()
    sw.mode = "ok"
    t_kill = time.monotonic()

    def probed():
        r = fresh(bw)
        return r.status == 200
    harness.wait_until(probed, 10 * SLOW, interval=0.1, message="a new probe after the lease")
    assert time.monotonic() - t_kill < 1.8 * SLOW + 3
    harness.wait_until(lambda: harness.breaker_state(bw, "api") == "closed", 5 * SLOW,
                       message="breaker to close after the probe")


def _wall_shifted(bw, seconds):
    """True when the proxy's wall clock (its /readyz timestamp) is shifted by about `seconds`."""
    from datetime import datetime, timezone
    ts = harness.readyz(bw)[1]["timestamp"]
    theirs = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    delta = theirs.timestamp() - time.time()
    return abs(delta - seconds) < 60


def test_fleet_follower_recovers_without_traffic_too(upstream_factory, breakwater_factory,
                                                     tmp_path):
    """With Redis, instance B follows A's opening; when the open period ends both go half_open
    by themselves and both pods are ready again, with no request to either."""
    redis = harness.RedisServer(tmp_path)
    try:
        sw_a, sw_b = Switch(), Switch()
        up_a, up_b = upstream_factory(sw_a), upstream_factory(sw_b)
        reset_ms = int(1500 * SLOW)

        def fleet(up):
            cfg = config([up], workers=1, reset_timeout_ms=reset_ms)
            cfg["redis"] = {"url": redis.url, "key_prefix": "bwrecovery",
                            "sync_interval_ms": 100}
            return cfg
        a, b = breakwater_factory(fleet(up_a)), breakwater_factory(fleet(up_b))
        for bw in (a, b):
            harness.wait_until(
                lambda: harness.metric_sum(harness.scrape(bw), "breakwater_redis_up") == 1,
                10 * SLOW, message="redis up on instance %d" % bw.n)
        open_breaker(a, sw_a)
        harness.wait_until(lambda: harness.breaker_state(b, "api") == "open", 5 * SLOW,
                           message="B to follow the fleet")
        assert harness.readyz(b)[0] == 503
        n_a, n_b = len(up_a.all_requests), len(up_b.all_requests)
        for bw in (a, b):
            harness.wait_until(lambda: harness.readyz(bw)[0] == 200,
                               reset_ms / 1000.0 + 10 * SLOW,
                               message="instance %d ready again with no traffic" % bw.n)
            assert harness.breaker_state(bw, "api") == "half_open"
        assert (len(up_a.all_requests), len(up_b.all_requests)) == (n_a, n_b)
    finally:
        redis.kill()


def test_times_in_upstreams_are_wall_clock_times(upstream_factory, breakwater_factory):
    """Breakers run on the monotonic clock; what /upstreams shows is converted to wall time,
    also after an operator reset."""
    from datetime import datetime, timezone

    def age(iso):
        t = datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
        return abs(time.time() - t.timestamp())
    sw = Switch()
    up = upstream_factory(sw)
    bw = breakwater_factory(config([up], reset_timeout_ms=60000))
    open_breaker(bw, sw)
    cb = cb_state(bw)
    assert age(cb["since"]) < 60 and age(cb["opened_at"]) < 60, cb
    assert harness.admin_request(bw, "POST", "/upstreams/api/reset").status == 200
    cb = cb_state(bw)
    assert cb["state"] == "closed" and age(cb["since"]) < 60, cb
    assert age(cb["opened_at"]) < 60, cb
