"""Per-client rate limits with two workers sharing one table: exact counts under concurrent
requests on both workers, client identity (trusted X-Forwarded-For, header keys), the RateLimit
headers, dry run, and refill."""

import json
import signal
import time

import harness
from harness import Client, build_request, metric_sum

SLOW = harness.SLOW


def rl_config(up, policy, trusted=("127.0.0.1/32",), workers=2, name="per_client"):
    cfg = harness.base_config([up], workers=workers)
    cfg["rate_limits"] = {name: policy}
    cfg["routes"] = [{"path_prefix": "/", "upstream": "api", "rate_limit": name}]
    cfg["trusted_proxies"] = list(trusted)
    return cfg


def request(bw, target="/", headers=None):
    """One GET on a fresh connection; returns the Response."""
    with Client(bw.port) as c:
        c.send(build_request("GET", target, list(headers or []) + [("Connection", "close")]))
        return c.read_response()


def assert_limited(r, upstream="api"):
    assert r.status == 429, r
    assert r.header("content-type", "").startswith("application/json"), r.headers
    assert json.loads(r.body) == {"error": "rate limited", "upstream": upstream}, r.body
    ra = r.header("retry-after")
    assert ra is not None and ra.isdigit() and int(ra) >= 1, "Retry-After %r" % ra


def assert_ratelimit_headers(r, capacity):
    for h in ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"):
        assert r.headers.count(h) == 1, (h, r.headers)
        assert r.header(h).isdigit(), (h, r.header(h))
    assert int(r.header("ratelimit-limit")) == capacity, r.headers
    assert 0 <= int(r.header("ratelimit-remaining")) <= capacity, r.headers


def fire_concurrently(conns, headers=None):
    """Sends one request on each connection at once, then reads every response."""
    raw = build_request("GET", "/", list(headers or []) + [("Connection", "close")])
    for c in conns:
        c.send(raw)
    return [c.read_response(timeout=15) for c in conns]


def test_one_client_on_both_workers_gets_exactly_capacity(upstream, breakwater_factory):
    C = 10
    cfg = rl_config(upstream, {"capacity": C, "refill_per_sec": 0})
    # The connections are opened (and spread over the workers) before any sends a byte; on a
    # loaded machine that can outlast the default 10 s header deadline, which closes them.
    cfg["limits"] = {"header_timeout_ms": 120000}
    bw = breakwater_factory(cfg)
    groups = harness.spread_connections(bw, 20)
    conns = harness.interleave(groups)
    try:
        results = fire_concurrently(conns)
    finally:
        for c in conns:
            c.close()
    accepted = [r for r in results if r.status == 200]
    refused = [r for r in results if r.status != 200]
    assert len(accepted) == C, sorted(r.status for r in results)
    for r in refused:
        assert_limited(r)
    for r in results:
        assert_ratelimit_headers(r, C)
    assert len(upstream.all_requests) == C, "refused requests reached the upstream"
    # Later requests, on either worker, are refused too: the bucket never refills.
    groups = harness.spread_connections(bw, 2)
    try:
        for c in harness.interleave(groups):
            c.send(build_request("GET", "/", [("Connection", "close")]))
            assert_limited(c.read_response())
    finally:
        for cs in groups.values():
            for c in cs:
                c.close()
    assert len(upstream.all_requests) == C
    m = harness.wait_metric(bw, "breakwater_rate_limited_total", 34, policy="per_client")
    assert metric_sum(m, "breakwater_rate_limit_keys", policy="per_client") == 1


def test_clients_behind_a_trusted_proxy_are_independent(upstream, breakwater_factory):
    C = 3
    bw = breakwater_factory(rl_config(upstream, {"capacity": C, "refill_per_sec": 0}))
    clients = ["203.0.113.%d" % i for i in range(1, 6)]
    groups = harness.spread_connections(bw, 13)
    conns = harness.interleave(groups)
    outcome = {}
    try:
        # Five clients' requests interleaved, on both workers, plus the proxy's own address.
        i = 0
        for _ in range(C + 2):
            for ip in clients:
                c = conns[i]
                i += 1
                c.send(build_request("GET", "/", [("X-Forwarded-For", ip),
                                                  ("Connection", "close")]))
                outcome.setdefault(ip, []).append(c.read_response().status)
    finally:
        for c in conns:
            c.close()
    for ip in clients:
        assert outcome[ip] == [200] * C + [429] * 2, (ip, outcome[ip])
    # Requests without X-Forwarded-For are charged to the peer, 127.0.0.1: a fresh bucket.
    assert [request(bw).status for _ in range(C + 1)] == [200] * C + [429]
    got = upstream.requests
    assert len(got) == len(clients) * C + C
    assert got[0].headers.get("x-forwarded-for").startswith("203.0.113.")


def test_rightmost_untrusted_address_is_the_client(upstream, breakwater_factory):
    bw = breakwater_factory(rl_config(upstream, {"capacity": 2, "refill_per_sec": 0},
                                      trusted=["127.0.0.1/32", "10.0.0.0/8"]))
    # Three spellings of the same client 198.51.100.7: the left part is client-controlled and
    # ignored, a trusted hop on the right is skipped.
    chains = ["198.51.100.7", "192.0.2.99, 198.51.100.7", "198.51.100.7, 10.1.2.3"]
    statuses = [request(bw, headers=[("X-Forwarded-For", x)]).status for x in chains]
    assert statuses == [200, 200, 429], statuses
    # Another client is not affected.
    assert request(bw, headers=[("X-Forwarded-For", "198.51.100.8")]).status == 200


def test_untrusted_peer_cannot_choose_its_identity(upstream, breakwater_factory):
    for trusted in ([], ["10.0.0.0/8"]):
        up = harness.Upstream().start()
        try:
            bw = breakwater_factory(rl_config(up, {"capacity": 3, "refill_per_sec": 0},
                                              trusted=trusted))
            statuses = [request(bw, headers=[("X-Forwarded-For", "203.0.113.%d" % i)]).status
                        for i in range(6)]
            assert statuses == [200] * 3 + [429] * 3, (trusted, statuses)
            assert len(up.all_requests) == 3
            bw.stop()
        finally:
            up.stop()


def test_header_key(upstream, breakwater_factory):
    bw = breakwater_factory(rl_config(
        upstream, {"key": "header:X-Api-Key", "capacity": 2, "refill_per_sec": 0}, name="per_key"))
    seq = [("X-Api-Key", "alpha"), ("x-api-key", "alpha"), ("X-API-KEY", "alpha"),
           ("X-Api-Key", "beta"), ("X-Api-Key", "beta"), ("X-Api-Key", "beta")]
    statuses = [request(bw, headers=[h]).status for h in seq]
    assert statuses == [200, 200, 429, 200, 200, 429], statuses
    # The peer address is not the key: other X-Forwarded-For, same key, same bucket.
    r = request(bw, headers=[("X-Api-Key", "alpha"), ("X-Forwarded-For", "203.0.113.1")])
    assert_limited(r)
    # Requests without the header share one bucket.
    assert [request(bw).status for _ in range(3)] == [200, 200, 429]
    harness.wait_metric(bw, "breakwater_rate_limited_total", 4, policy="per_key")


def test_ratelimit_headers_count_down(upstream, breakwater_factory):
    C = 5
    bw = breakwater_factory(rl_config(upstream, {"capacity": C, "refill_per_sec": 1}))
    remaining, resets = [], []
    start = time.monotonic()
    for _ in range(C):
        r = request(bw)
        assert r.status == 200, r
        assert_ratelimit_headers(r, C)
        assert r.header("retry-after") is None, r.headers
        remaining.append(int(r.header("ratelimit-remaining")))
        resets.append(int(r.header("ratelimit-reset")))
    # Refill is 1/s: a token can come back only once per second of test time, so the count
    # never goes up and is 0 at the end on any run shorter than a second.
    assert remaining[0] == C - 1, remaining
    assert remaining == sorted(remaining, reverse=True), remaining
    assert remaining[-1] <= int(time.monotonic() - start), remaining
    assert all(1 <= x <= C for x in resets), resets
    assert resets == sorted(resets), resets
    r = request(bw)
    if r.status == 429:  # unless a second passed and a token came back
        assert_limited(r)
        assert_ratelimit_headers(r, C)
        assert r.header("ratelimit-remaining") == "0"
        assert int(r.header("retry-after")) == 1


def test_dry_run_never_refuses_but_counts(upstream, breakwater_factory):
    bw = breakwater_factory(rl_config(
        upstream, {"capacity": 2, "refill_per_sec": 0, "dry_run": True}, name="trial"))
    groups = harness.spread_connections(bw, 3)
    conns = harness.interleave(groups)
    try:
        results = fire_concurrently(conns)
    finally:
        for c in conns:
            c.close()
    assert [r.status for r in results] == [200] * 6
    for r in results:
        assert_ratelimit_headers(r, 2)
        assert r.header("retry-after") is None
    assert len(upstream.requests) == 6
    m = harness.wait_metric(bw, "breakwater_rate_limited_total", 4, policy="trial")
    assert metric_sum(m, "breakwater_requests_total", code="429") in (None, 0)


def test_refill_brings_tokens_back(upstream, breakwater_factory):
    C, R = 2, 20
    bw = breakwater_factory(rl_config(upstream, {"capacity": C, "refill_per_sec": R}))
    start = time.monotonic()
    first = [request(bw).status for _ in range(C)]
    assert first == [200] * C
    # Drain whatever refilled meanwhile until a refusal.
    refused = None
    for _ in range(50):
        r = request(bw)
        if r.status == 429:
            refused = r
            break
    assert refused is not None, "never refused"
    assert_limited(refused)
    assert refused.header("retry-after") == "1"
    t_refused = time.monotonic()
    # A token comes back within 1/R s (0.05 s): poll for it.
    r = harness.wait_until(lambda: (lambda x: x if x.status == 200 else None)(request(bw)),
                           2.0 * SLOW, interval=0.01, message="a refilled token")
    waited = time.monotonic() - t_refused
    assert waited <= 1.0 * SLOW, "refill took %.3f s for a 0.05 s interval" % waited
    # Never more than the bucket allows over the whole run.
    elapsed = time.monotonic() - start
    accepted = len(upstream.requests)
    assert accepted <= C + R * elapsed + 1, (accepted, elapsed)


def test_environment_sets_the_default_policy(upstream, breakwater_factory):
    bw = breakwater_factory(rl_config(upstream, {"key": "client_ip"}, name="default"),
                            env={"RATE_LIMIT_CAPACITY": "3", "RATE_LIMIT_REFILL_RATE": "0"})
    results = [request(bw) for _ in range(5)]
    assert [r.status for r in results] == [200, 200, 200, 429, 429]
    assert results[0].header("ratelimit-limit") == "3"


def test_buckets_survive_a_reload(upstream, breakwater_factory):
    bw = breakwater_factory(rl_config(upstream, {"capacity": 2, "refill_per_sec": 0}))
    assert [request(bw).status for _ in range(3)] == [200, 200, 429]
    cfg = json.loads(json.dumps(bw.config))
    cfg["upstreams"]["api"]["response_timeout_ms"] = int(9000 * SLOW)
    bw.write_config(cfg)
    bw.signal(signal.SIGHUP)
    harness.wait_until(
        lambda: metric_sum(harness.scrape(bw), "breakwater_config_reloads_total",
                           result="success") == 1, 10 * SLOW, message="the reload")
    assert_limited(request(bw))
    assert len(upstream.all_requests) == 2
