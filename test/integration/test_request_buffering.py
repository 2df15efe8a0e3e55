"""Request buffering: a body up to limits.request_buffer_bytes is read whole before an upstream
connection is taken, so a slow client cannot pin one while it dribbles; larger bodies, and routes
with request_buffering false, stream as soon as the head is parsed."""

import json
import time

import harness
from harness import Client, build_request, chunked_body

SLOW = harness.SLOW


def dribble(c, data, pieces, pause):
    step = max(1, len(data) // pieces)
    for i in range(0, len(data), step):
        c.send(data[i:i + step])
        time.sleep(pause)  # a slow client is what is being simulated


def config(up, **route):
    cfg = harness.base_config([up], workers=1)
    cfg["routes"][0].update(route)
    return cfg


def test_small_body_is_read_before_connecting(upstream, breakwater_factory):
    bw = breakwater_factory(config(upstream))
    body = b"b" * 1000
    with Client(bw.port) as c:
        c.send(build_request("POST", "/slow", [("Content-Length", str(len(body)))],
                             content_length=False))
        dribble(c, body[:-1], 5, 0.1)
        # Everything but the last byte has been sent: no upstream connection yet.
        assert upstream.connections == 0
        c.send(body[-1:])
        r = c.read_response()
    assert r.status == 200, r
    assert upstream.connections == 1
    assert upstream.requests[-1].body == body


def test_small_chunked_body_is_read_before_connecting(upstream, breakwater_factory):
    bw = breakwater_factory(config(upstream))
    raw = chunked_body([b"c" * 300, b"d" * 300])
    with Client(bw.port) as c:
        c.send(build_request("POST", "/slow", [("Transfer-Encoding", "chunked")],
                             content_length=False))
        dribble(c, raw[:-3], 4, 0.1)
        assert upstream.connections == 0
        c.send(raw[-3:])
        r = c.read_response()
    assert r.status == 200, r
    assert upstream.requests[-1].body == b"c" * 300 + b"d" * 300


def test_route_without_buffering_streams_at_once(upstream, breakwater_factory):
    bw = breakwater_factory(config(upstream, request_buffering=False))
    body = b"e" * 1000
    with Client(bw.port) as c:
        c.send(build_request("POST", "/s", [("Content-Length", str(len(body)))],
                             content_length=False))
        c.send(body[:10])
        harness.wait_until(lambda: upstream.connections == 1, timeout=5 * SLOW,
                           message="the upstream connection opened before the body ended")
        c.send(body[10:])
        assert c.read_response().status == 200
    assert upstream.requests[-1].body == body


def test_large_body_streams(upstream, breakwater_factory):
    cfg = config(upstream)
    cfg["limits"] = {"request_buffer_bytes": 4096}
    bw = breakwater_factory(cfg)
    body = b"f" * 20000
    with Client(bw.port) as c:
        c.send(build_request("POST", "/big", [("Content-Length", str(len(body)))],
                             content_length=False))
        c.send(body[:100])
        harness.wait_until(lambda: upstream.connections == 1, timeout=5 * SLOW,
                           message="a body over request_buffer_bytes streams at once")
        c.send(body[100:])
        assert c.read_response().status == 200
    assert upstream.requests[-1].body == body


def test_large_chunked_body_streams_once_over_the_limit(upstream, breakwater_factory):
    cfg = config(upstream)
    cfg["limits"] = {"request_buffer_bytes": 4096}
    bw = breakwater_factory(cfg)
    chunks = [b"g" * 3000, b"h" * 3000, b"i" * 3000]
    raw = chunked_body(chunks)
    with Client(bw.port) as c:
        c.send(build_request("POST", "/big", [("Transfer-Encoding", "chunked")],
                             content_length=False))
        c.send(raw[:6100])
        harness.wait_until(lambda: upstream.connections == 1, timeout=5 * SLOW,
                           message="a chunked body past request_buffer_bytes streams")
        c.send(raw[6100:])
        assert c.read_response().status == 200
    assert upstream.requests[-1].body == b"".join(chunks)


def test_client_that_gives_up_while_buffering_costs_the_upstream_nothing(upstream,
                                                                        breakwater_factory):
    bw = breakwater_factory(config(upstream))
    with Client(bw.port) as c:
        c.send(build_request("POST", "/gone", [("Content-Length", "5000")],
                             content_length=False) + b"x" * 100)
    line = harness.wait_until(
        lambda: [json.loads(x) for x in bw.read_access_log().splitlines() if x.strip()],
        message="the abandoned request in the access log")[-1]
    assert line["status"] == 499 and line["path"] == "/gone"
    assert upstream.connections == 0
