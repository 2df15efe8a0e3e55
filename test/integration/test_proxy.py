"""Proxying behaviour seen from outside: routing, balancing, header rewriting, message bodies
that must or must not exist, keep-alive on both sides, retries, and the proxy's own errors and
timeouts."""

import re
import select
import threading
import time

import pytest

import harness
from harness import Client, build_request, error_json, respond

SLOW = harness.SLOW
# Failures in these tests must not open the circuit breaker and turn into 503s.
NO_BREAKER = {"circuit_breaker": {"failure_threshold": 100000}}


def start(factory, servers, **overrides):
    cfg = harness.base_config(servers, **overrides)
    cfg["upstreams"]["api"] = harness._merge(NO_BREAKER, cfg["upstreams"]["api"])
    return factory(cfg)


def port_of(resp):
    return int(resp.header("x-upstream-port"))


def echo_target(req, conn):
    """Answers with the request target as the body."""
    return respond(200, req.target.encode(), [("X-Upstream-Port", str(conn.upstream.port))])


def assert_proxy_error(status, headers, body, expected_status, reason, upstream=None):
    assert status == expected_status, (status, body)
    assert headers.get("content-type", "").startswith("application/json"), headers
    doc = error_json(body)
    assert doc["error"] == reason, doc
    if upstream is None:
        assert "upstream" not in doc, doc
    else:
        assert doc["upstream"] == upstream, doc


# -- routing and balancing -------------------------------------------------------------------

def test_routing_by_host_and_path_prefix_first_match_wins(upstream_factory, breakwater_factory):
    a, b, c = (upstream_factory(echo_target) for _ in range(3))
    cfg = harness.base_config([a])
    cfg["upstreams"] = {"a": {"servers": [a.address]}, "b": {"servers": [b.address]},
                        "c": {"servers": [c.address]}}
    cfg["routes"] = [
        {"host": "api.test", "path_prefix": "/v1/", "upstream": "a"},
        {"path_prefix": "/v1/special", "upstream": "b"},
        {"path_prefix": "/v1/", "upstream": "b"},
        {"host": "static.test", "upstream": "c"},
    ]
    bw = breakwater_factory(cfg)
    cases = [
        ("api.test", "/v1/users", a),
        ("api.test", "/v1/special", a),       # the host route comes first
        ("other.test", "/v1/special", b),
        ("other.test", "/v1/users", b),
        ("static.test", "/img/logo.png", c),
        ("STATIC.test:8080", "/x", c),         # host compared case-insensitively, port ignored
    ]
    for host, target, up in cases:
        status, headers, body, _ = harness.get(bw.port, target, host=host, close_wait=0)
        assert (status, body) == (200, target.encode()), (host, target)
        assert int(headers.get("x-upstream-port")) == up.port, (host, target)
    status, headers, body, _ = harness.get(bw.port, "/nowhere", host="other.test", close_wait=0)
    assert_proxy_error(status, headers, body, 404, "no route")
    status, headers, body, _ = harness.get(bw.port, "/v2/x", host="api.test", close_wait=0)
    assert_proxy_error(status, headers, body, 404, "no route")
    assert sum(len(u.requests) for u in (a, b, c)) == len(cases)


def test_round_robin_alternates(upstream_factory, breakwater_factory):
    a, b = upstream_factory(), upstream_factory()
    bw = start(breakwater_factory, [a, b])
    with Client(bw.port) as c:
        ports = [port_of(c.request("GET", "/rr/%d" % i)) for i in range(10)]
    assert set(ports) == {a.port, b.port}
    assert all(p != q for p, q in zip(ports, ports[1:])), ports


def test_least_conn_prefers_the_idle_server(upstream_factory, breakwater_factory):
    release = threading.Event()

    def handler(req, conn):
        if req.target == "/hold":
            release.wait(30 * SLOW)
        return respond(200, req.target.encode(), [("X-Upstream-Port", str(conn.upstream.port))])

    a, b = upstream_factory(handler), upstream_factory(handler)
    bw = start(breakwater_factory, [a, b], upstreams={"api": {"balance": "least_conn"}})
    holder = Client(bw.port)
    try:
        holder.send(build_request("GET", "/hold"))
        busy = harness.wait_until(
            lambda: next((u for u in (a, b) if u.all_requests), None), 10 * SLOW,
            message="the held request to reach an upstream")
        idle = b if busy is a else a
        with Client(bw.port) as c:
            ports = [port_of(c.request("GET", "/quick/%d" % i)) for i in range(6)]
        assert ports == [idle.port] * 6, "least_conn sent requests to the busy server"
        release.set()
        assert holder.read_response().status == 200
    finally:
        release.set()
        holder.close()


# -- headers ---------------------------------------------------------------------------------

def test_host_passed_through_unchanged(upstream, breakwater_factory):
    bw = start(breakwater_factory, [upstream])
    status, _, _, _ = harness.get(bw.port, "/h", host="Example.TEST:8080", close_wait=0)
    assert status == 200
    req = upstream.wait_requests(1)[0]
    assert req.headers.get_all("host") == ["Example.TEST:8080"]


def test_forwarded_headers(upstream, breakwater_factory):
    bw = start(breakwater_factory, [upstream])
    with Client(bw.port) as c:
        assert c.request("GET", "/a", {"X-Forwarded-For": "1.2.3.4"}).status == 200
        assert c.request("GET", "/b").status == 200
        assert c.request("GET", "/c", {"X-Forwarded-Proto": "https"}).status == 200
    ra, rb, rc = upstream.wait_requests(3)
    assert ra.headers.get_all("x-forwarded-for") == ["1.2.3.4, 127.0.0.1"]
    assert rb.headers.get_all("x-forwarded-for") == ["127.0.0.1"]
    for r in (ra, rb, rc):
        # The proxy terminates plain HTTP here: a client's claim of https is not passed on.
        assert r.headers.get_all("x-forwarded-proto") == ["http"], r.headers


def test_request_id_passed_through_or_generated(upstream, breakwater_factory):
    bw = start(breakwater_factory, [upstream])
    with Client(bw.port) as c:
        assert c.request("GET", "/a", {"X-Request-Id": "client-chosen-id-42"}).status == 200
        assert c.request("GET", "/b").status == 200
        assert c.request("GET", "/c").status == 200
    ra, rb, rc = upstream.wait_requests(3)
    assert ra.headers.get_all("x-request-id") == ["client-chosen-id-42"]
    ids = [r.headers.get_all("x-request-id") for r in (rb, rc)]
    for got in ids:
        assert len(got) == 1 and re.fullmatch(r"[0-9a-f]{32}", got[0]), got
    assert ids[0] != ids[1]


HOP_BY_HOP = ["connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"]


def test_hop_by_hop_headers_removed_towards_upstream(upstream, breakwater_factory):
    bw = start(breakwater_factory, [upstream])
    with Client(bw.port) as c:
        r = c.request("GET", "/a", [
            ("Connection", "keep-alive, X-Secret"), ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"), ("TE", "trailers"), ("Trailer", "X-T"),
            ("Upgrade", "example/1"), ("X-Secret", "s1"), ("X-Kept", "k1")])
        assert r.status == 200
    status, _, _, closed = harness.http_request(bw.port, build_request("GET", "/b", [
        ("Connection", "close, X-Secret"), ("X-Secret", "s2"), ("X-Kept", "k2")]))
    assert status == 200 and closed
    ra, rb = upstream.wait_requests(2)
    for r, kept in ((ra, "k1"), (rb, "k2")):
        names = r.headers.names()
        for h in HOP_BY_HOP + ["x-secret"]:
            if h == "connection":
                # The proxy may manage its own upstream connection, but never forward the
                # client's tokens.
                assert all("secret" not in v.lower() for v in r.headers.get_all(h)), r.headers
            else:
                assert h not in names, "%s forwarded: %r" % (h, r.headers)
        assert r.headers.get_all("x-kept") == [kept]


def test_hop_by_hop_headers_removed_towards_client(upstream_factory, breakwater_factory):
    def handler(req, conn):
        return respond(200, b"body", [
            ("Connection", "X-Up-Secret"), ("Keep-Alive", "timeout=5, max=100"),
            ("Proxy-Connection", "keep-alive"), ("Trailer", "X-T"), ("Upgrade", "example/1"),
            ("X-Up-Secret", "s"), ("X-Up-Kept", "k")])

    up = upstream_factory(handler)
    bw = start(breakwater_factory, [up])
    with Client(bw.port) as c:
        r = c.request("GET", "/a")
        assert (r.status, r.body) == (200, b"body")
        names = r.headers.names()
        for h in ["keep-alive", "proxy-connection", "trailer", "upgrade", "x-up-secret"]:
            assert h not in names, "%s passed to the client: %r" % (h, r.headers)
        assert all("secret" not in v.lower() for v in r.headers.get_all("connection"))
        assert r.headers.get_all("x-up-kept") == ["k"]
        # The upstream's Connection header did not close the client connection.
        assert c.request("GET", "/b").status == 200


def test_upstream_always_receives_http11(upstream, breakwater_factory):
    bw = start(breakwater_factory, [upstream])
    status, _, body, _ = harness.http_request(
        bw.port, build_request("GET", "/old", version="HTTP/1.0"))
    assert (status, body) == (200, b"hello from upstream")
    assert upstream.wait_requests(1)[0].version == "HTTP/1.1"


# -- bodies that must not exist --------------------------------------------------------------

def test_head_response_has_no_body_even_if_upstream_sends_one(upstream_factory,
                                                              breakwater_factory):
    def handler(req, conn):
        if req.method == "HEAD":
            # Wrong on purpose: a body after the head of a HEAD response.
            return respond(200, b"0123456789", [("X-Upstream-Port", str(conn.upstream.port))])
        return respond(200, b"real body", [("X-Upstream-Port", str(conn.upstream.port))])

    up = upstream_factory(handler)
    bw = start(breakwater_factory, [up])
    with Client(bw.port) as c:
        c.send(build_request("HEAD", "/h") + build_request("GET", "/g"))
        head = c.read_response("HEAD")
        assert head.status == 200
        assert head.header("content-length") == "10"
        get = c.read_response()
        assert (get.status, get.body) == (200, b"real body")
        assert c.pending() == b"", "stray bytes after the responses: %r" % c.pending()
        assert not c.wait_closed(0.2)


def test_204_and_304_carry_no_body(upstream_factory, breakwater_factory):
    def handler(req, conn):
        if req.target == "/204":
            return b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n"
        if req.target == "/304":
            # A 304 may announce the length of the representation it stands for.
            return b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 100\r\n\r\n'
        return respond(200, b"after")

    up = upstream_factory(handler)
    bw = start(breakwater_factory, [up])
    with Client(bw.port) as c:
        c.send(build_request("GET", "/204") + build_request("GET", "/304")
               + build_request("GET", "/after"))
        r204, r304, after = c.read_response(), c.read_response(), c.read_response()
    assert (r204.status, r204.body) == (204, b"")
    assert "transfer-encoding" not in r204.headers and "content-length" not in r204.headers
    assert (r304.status, r304.body) == (304, b"")
    assert "transfer-encoding" not in r304.headers
    assert (after.status, after.body) == (200, b"after")


# -- keep-alive and pipelining ---------------------------------------------------------------

def test_pipelined_requests_answered_in_order(upstream_factory, breakwater_factory):
    def handler(req, conn):
        if req.target == "/1":
            conn.sleep(0.3)  # the first answer is the slowest
        return respond(200, ("body of %s" % req.target).encode())

    up = upstream_factory(handler)
    bw = start(breakwater_factory, [up])
    with Client(bw.port) as c:
        c.send(b"".join(build_request("GET", "/%d" % i) for i in (1, 2, 3)))
        bodies = [c.read_response().body for _ in range(3)]
    assert bodies == [b"body of /1", b"body of /2", b"body of /3"]
    assert [r.target for r in up.requests] == ["/1", "/2", "/3"]


def test_upstream_connections_are_reused(upstream, breakwater_factory):
    bw = start(breakwater_factory, [upstream])
    with Client(bw.port) as c:
        for i in range(20):
            r = c.request("GET", "/ka/%d" % i)
            assert (r.status, r.body) == (200, b"hello from upstream")
    assert len(upstream.requests) == 20
    assert upstream.connections <= 2, "%d upstream connections for 20 requests" % (
        upstream.connections)


def test_pooled_connection_closed_by_upstream_is_retried(upstream_factory, breakwater_factory):
    up = upstream_factory(harness.close_after_response())
    bw = start(breakwater_factory, [up])
    with Client(bw.port) as c:
        for i in range(20):
            r = c.request("GET", "/stale/%d" % i)
            assert (r.status, r.body) == (200, b"hello from upstream"), i
    assert len(up.requests) == 20


# -- retries and upstream failures -----------------------------------------------------------

def test_idempotent_requests_retried_on_other_server(upstream, breakwater_factory):
    bw = start(breakwater_factory, [harness.dead_address(), upstream])
    with Client(bw.port) as c:
        for i in range(8):
            r = c.request("GET", "/retry/%d" % i)
            assert (r.status, r.body) == (200, b"hello from upstream"), i
    assert len(upstream.requests) == 8


def test_post_retried_when_connect_failed(upstream, breakwater_factory):
    bw = start(breakwater_factory, [harness.dead_address(), upstream])
    with Client(bw.port) as c:
        for i in range(4):
            r = c.request("POST", "/post/%d" % i, body=b"payload %d" % i)
            assert r.status == 200, (i, r)
    got = upstream.wait_requests(4)
    assert [(r.target, r.body) for r in got] == [
        ("/post/%d" % i, b"payload %d" % i) for i in range(4)]


def test_post_not_retried_after_upstream_reset(upstream_factory, breakwater_factory):
    bad = upstream_factory(harness.reset_connection)
    good = upstream_factory()
    bw = start(breakwater_factory, [bad, good])
    hit_bad = 0
    for i in range(4):
        target = "/once/%d" % i
        status, headers, body, _ = harness.http_request(
            bw.port, build_request("POST", target, body=b"data"), close_wait=0)
        if any(r.target == target for r in bad.all_requests):
            hit_bad += 1
            assert_proxy_error(status, headers, body, 502, "bad gateway", "api")
            # The access-log line is written when the exchange is over, after any retry.
            bw.wait_log(r'"path":"%s".*"status":502' % re.escape(target), access=True)
            assert all(r.target != target for r in good.all_requests), "POST was retried"
        else:
            assert status == 200
    assert hit_bad >= 1, "round robin never chose the resetting server"


def test_dead_single_upstream_is_502(breakwater_factory):
    bw = start(breakwater_factory, [harness.dead_address()])
    status, headers, body, _ = harness.get(bw.port, "/x", close_wait=0)
    assert_proxy_error(status, headers, body, 502, "bad gateway", "api")


def test_upstream_closing_without_answer_is_502(upstream_factory, breakwater_factory):
    up = upstream_factory(harness.close_without_answer)
    bw = start(breakwater_factory, [up])
    status, headers, body, _ = harness.get(bw.port, "/x", close_wait=0)
    assert_proxy_error(status, headers, body, 502, "bad gateway", "api")


def test_response_timeout_is_504(upstream_factory, breakwater_factory):
    up = upstream_factory(harness.never_answer)
    bw = start(breakwater_factory, [up], upstreams={"api": {"response_timeout_ms": 300}})
    t0 = time.monotonic()
    status, headers, body, _ = harness.get(bw.port, "/slow", close_wait=0)
    elapsed = time.monotonic() - t0
    assert_proxy_error(status, headers, body, 504, "gateway timeout", "api")
    assert elapsed >= 0.25, "answered before the timeout (%.2fs)" % elapsed
    assert elapsed < 5 * SLOW


def test_connect_timeout_is_504(breakwater_factory):
    with harness.Blackhole() as hole:
        bw = start(breakwater_factory, [hole.address],
                   upstreams={"api": {"connect_timeout_ms": 300}})
        t0 = time.monotonic()
        status, headers, body, _ = harness.get(bw.port, "/x", close_wait=0)
        elapsed = time.monotonic() - t0
    assert_proxy_error(status, headers, body, 504, "gateway timeout", "api")
    assert elapsed < 5 * SLOW


# -- client timeouts -------------------------------------------------------------------------

def test_partial_head_gets_408_and_close(upstream, breakwater_factory):
    bw = start(breakwater_factory, [upstream], limits={"header_timeout_ms": 500})
    with Client(bw.port) as c:
        t0 = time.monotonic()
        c.send(b"GET /partial HTTP/1.1\r\nHost: example.test\r\n")
        r = c.read_response(timeout=10)
        elapsed = time.monotonic() - t0
        assert r.status == 408
        assert error_json(r.body)["error"] == "request timeout"
        assert c.wait_closed(5 * SLOW)
    assert elapsed >= 0.4, "408 after %.2fs, before the header timeout" % elapsed
    assert upstream.all_requests == []


def test_slowloris_trickle_still_gets_408(upstream, breakwater_factory):
    """The header timeout bounds the whole head, not the gap between bytes."""
    bw = start(breakwater_factory, [upstream], limits={"header_timeout_ms": 500})
    with Client(bw.port) as c:
        t0 = time.monotonic()
        head = b"GET /trickle HTTP/1.1\r\nHost: example.test\r\n" + b"X-Pad: a\r\n" * 200
        for i in range(len(head)):
            if not c.try_send(head[i:i + 1]) or c.sock in _readable([c.sock]):
                break
            if time.monotonic() - t0 > 10 * SLOW:
                pytest.fail("no 408 while trickling the head for 10 s")
            time.sleep(0.05)
        r = c.read_response(timeout=10)
        assert r.status == 408
        assert c.wait_closed(5 * SLOW)
    assert upstream.all_requests == []


def _readable(socks):
    return select.select(socks, [], [], 0)[0]


def test_idle_keepalive_connection_closed_silently(upstream, breakwater_factory):
    bw = start(breakwater_factory, [upstream], limits={"client_idle_timeout_ms": 500})
    with Client(bw.port) as c:
        assert c.request("GET", "/once").status == 200
        t0 = time.monotonic()
        assert c.wait_closed(10 * SLOW), "idle connection not closed"
        assert time.monotonic() - t0 >= 0.4
        assert c.pending() == b"", "idle close sent bytes: %r" % c.pending()


# -- Expect and protocol versions ------------------------------------------------------------

def test_expect_100_continue(upstream, breakwater_factory):
    bw = start(breakwater_factory, [upstream])
    with Client(bw.port) as c:
        c.send(b"POST /upload HTTP/1.1\r\nHost: example.test\r\nContent-Length: 5\r\n"
               b"Expect: 100-continue\r\n\r\n")
        interim = c.read_response(skip_interim=False, timeout=10)
        assert interim.status == 100
        c.send(b"hello")
        final = c.read_response()
        assert (final.status, final.body) == (200, b"hello from upstream")
    req = upstream.wait_requests(1)[0]
    assert req.body == b"hello"
    assert "expect" not in req.headers


def test_http10_client_gets_unchunked_response_and_close(upstream_factory, breakwater_factory):
    up = upstream_factory(harness.chunked([b"hello ", b"world"]))
    bw = start(breakwater_factory, [up])
    with Client(bw.port) as c:
        c.send(build_request("GET", "/old", version="HTTP/1.0"))
        r = c.read_response()
        assert r.status == 200 and r.body == b"hello world" and r.complete
        assert "transfer-encoding" not in r.headers
        assert c.wait_closed(5 * SLOW)


def test_http10_keepalive_honoured(upstream, breakwater_factory):
    bw = start(breakwater_factory, [upstream])
    with Client(bw.port) as c:
        for i in range(3):
            c.send(build_request("GET", "/k/%d" % i, {"Connection": "keep-alive"},
                                 version="HTTP/1.0"))
            r = c.read_response()
            assert (r.status, r.body) == (200, b"hello from upstream")
            assert r.framing == "length"
            assert "transfer-encoding" not in r.headers
        assert not c.wait_closed(0.3)


def test_chunked_response_passed_to_http11_client(upstream_factory, breakwater_factory):
    chunks = [b"first ", b"x" * 10000, b" last"]
    up = upstream_factory(harness.chunked(chunks))
    bw = start(breakwater_factory, [up])
    with Client(bw.port) as c:
        r = c.request("GET", "/c")
        assert r.status == 200 and r.framing == "chunked" and r.complete
        assert r.body == b"".join(chunks)
        assert c.request("GET", "/again").status == 200


def test_close_delimited_response(upstream_factory, breakwater_factory):
    payload = b"until the upstream closes " * 100
    up = upstream_factory(harness.close_delimited(payload))
    bw = start(breakwater_factory, [up])
    with Client(bw.port) as c:
        r = c.request("GET", "/cd")
        assert r.status == 200 and r.complete and r.body == payload
        assert r.framing == "chunked", "an HTTP/1.1 client should get a chunked body"
        assert c.request("GET", "/again").body == payload
    with Client(bw.port) as c:
        c.send(build_request("GET", "/cd10", version="HTTP/1.0"))
        r = c.read_response()
        assert r.status == 200 and r.body == payload
        assert r.framing in ("close", "length")
        assert c.wait_closed(5 * SLOW)


def test_upstream_sees_client_address_in_forwarded_for_only_once(upstream, breakwater_factory):
    bw = start(breakwater_factory, [upstream])
    with Client(bw.port) as c:
        r = c.request("GET", "/x", [("X-Forwarded-For", "10.0.0.1"),
                                    ("X-Forwarded-For", "10.0.0.2")])
        assert r.status == 200
    req = upstream.wait_requests(1)[0]
    joined = ", ".join(req.headers.get_all("x-forwarded-for"))
    assert [p.strip() for p in joined.split(",")] == ["10.0.0.1", "10.0.0.2", "127.0.0.1"]


def test_large_request_and_response_headers_pass(upstream_factory, breakwater_factory):
    big = "v" * 6000

    def handler(req, conn):
        return respond(200, b"ok", [("X-Big-Response", big)])

    up = upstream_factory(handler)
    bw = start(breakwater_factory, [up])
    with Client(bw.port) as c:
        r = c.request("GET", "/big", {"X-Big-Request": big})
        assert r.status == 200 and r.header("x-big-response") == big
    assert up.wait_requests(1)[0].header("x-big-request") == big

